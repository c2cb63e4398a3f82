//! What the simulated users ask for: `style` (the default: one photo, a style each, at one size) or
//! `diffusion` (text-to-image at one size, each request's step count drawn from a mix, so short and
//! long requests share the device).

use std::collections::BTreeMap;

use anyhow::Context;

use super::users::SplitMix;
use kiln::domain::{WireParams, WireStyle};

/// `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// `multistyle26` on the `--image` photo, styles cycling.
    Style,
    /// `--diffusion-model` text-to-image, steps from `--steps-mix`.
    Diffusion,
}

/// The request every user sends, but for its number.
pub enum Workload {
    /// A photo to stylize at `size`.
    Style { photo: Vec<u8>, size: u32 },
    /// A prompt to draw.
    Diffusion(Diffusion),
}

/// Text-to-image requests of one size, scheduler and guidance; the step count varies.
pub struct Diffusion {
    /// The model.
    pub model: String,
    /// Width and height.
    pub size: u32,
    /// Step counts and their shares (summing to 1), fewest steps first.
    pub steps: Vec<(u32, f64)>,
    /// Seeds the step draws.
    pub seed: u64,
}

/// Prompts, taken in turn: the tiny model draws noise whatever they say, but each is tokenized and
/// encoded as a real prompt would be.
const PROMPTS: [&str; 6] = [
    "a photo of an astronaut riding a horse on mars",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen, studio lighting, 35mm",
    "an isometric city block made of paper",
    "a red fox in fresh snow, morning light",
    "a cathedral interior, volumetric light, wide angle",
];

/// Classifier-free guidance: two network rows per request and step, as most deployments run.
const GUIDANCE: f64 = 7.5;

impl Workload {
    /// The model requests go to.
    pub fn model(&self) -> &str {
        match self {
            Self::Style { .. } => "multistyle26",
            Self::Diffusion(d) => &d.model,
        }
    }

    /// Request `n`'s parameters and image, and (diffusion) its step count: `steps`, or one drawn
    /// from the mix for `n` (the same for every run with the same seed).
    pub fn params(&self, n: usize, steps: Option<u32>) -> (WireParams, Option<&[u8]>, Option<u32>) {
        match self {
            Self::Style { photo, size } => {
                let params = WireParams {
                    style: Some(WireStyle::Index((n % 26) as i64)),
                    size: Some(*size),
                    ..Default::default()
                };
                (params, Some(photo), None)
            }
            Self::Diffusion(d) => {
                let steps = steps.unwrap_or_else(|| d.steps_of(n));
                let params = WireParams {
                    prompt: Some(PROMPTS[n % PROMPTS.len()].into()),
                    steps: Some(i64::from(steps)),
                    guidance_scale: Some(GUIDANCE),
                    scheduler: Some("euler".into()),
                    width: Some(i64::from(d.size)),
                    height: Some(i64::from(d.size)),
                    seed: Some((n as u64 % (1 << 32)).into()),
                    ..Default::default()
                };
                (params, None, Some(steps))
            }
        }
    }
}

impl Diffusion {
    /// The step count of request `n`: the `n`-th draw of a stream of its own (apart from the
    /// arrivals', so the arrival times do not depend on the mix).
    pub fn steps_of(&self, n: usize) -> u32 {
        let pick = SplitMix::at(self.seed ^ 0x5354_4550, n as u64);
        let mut acc = 0.0;
        for &(steps, share) in &self.steps {
            acc += share;
            if pick < acc {
                return steps;
            }
        }
        self.steps.last().map_or(1, |&(steps, _)| steps)
    }
}

/// `--steps-mix`: `steps=share,...`, shares normalised to sum to 1, fewest steps first.
pub fn parse_steps_mix(spec: &str) -> anyhow::Result<Vec<(u32, f64)>> {
    let mut mix = BTreeMap::new();
    for part in spec.split(',') {
        let (steps, share) = part
            .split_once('=')
            .with_context(|| format!("--steps-mix: {part:?} is not steps=share"))?;
        let steps: u32 = steps
            .trim()
            .parse()
            .with_context(|| format!("--steps-mix: bad step count in {part:?}"))?;
        let share: f64 = share
            .parse()
            .with_context(|| format!("--steps-mix: bad share in {part:?}"))?;
        anyhow::ensure!(steps >= 1, "--steps-mix: step counts start at 1");
        anyhow::ensure!(share > 0.0 && share.is_finite(), "--steps-mix: shares must be positive");
        *mix.entry(steps).or_insert(0.0) += share;
    }
    let total: f64 = mix.values().sum();
    Ok(mix.into_iter().map(|(steps, share)| (steps, share / total)).collect())
}

/// `--slo-base-ms`: `steps=ms,...`.
pub fn parse_slo_base(spec: &str) -> anyhow::Result<BTreeMap<u32, f64>> {
    spec.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (steps, ms) = part
                .split_once('=')
                .with_context(|| format!("--slo-base-ms: {part:?} is not steps=ms"))?;
            let ms: f64 = ms
                .parse()
                .with_context(|| format!("--slo-base-ms: bad ms in {part:?}"))?;
            anyhow::ensure!(ms > 0.0 && ms.is_finite(), "--slo-base-ms: times must be positive");
            Ok((steps.trim().parse()?, ms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diffusion(mix: &str) -> Diffusion {
        Diffusion {
            model: "sd-tiny-random".into(),
            size: 256,
            steps: parse_steps_mix(mix).unwrap(),
            seed: 7,
        }
    }

    #[test]
    fn a_steps_mix_is_normalised_sorted_and_bad_ones_refused() {
        assert_eq!(
            parse_steps_mix("50=1,4=2,20=1").unwrap(),
            [(4, 0.5), (20, 0.25), (50, 0.25)]
        );
        assert!(parse_steps_mix("4").is_err());
        assert!(parse_steps_mix("0=1").is_err());
        assert!(parse_steps_mix("4=-1").is_err());
        assert_eq!(
            parse_slo_base("4=100,50=900").unwrap(),
            BTreeMap::from([(4, 100.0), (50, 900.0)])
        );
        assert!(parse_slo_base("4=0").is_err());
    }

    #[test]
    fn step_counts_follow_the_mix_and_repeat_for_a_seed() {
        let d = diffusion("4=0.4,20=0.3,50=0.3");
        let drawn: Vec<u32> = (0..10_000).map(|n| d.steps_of(n)).collect();
        let share = |s: u32| drawn.iter().filter(|&&x| x == s).count() as f64 / drawn.len() as f64;
        assert!((share(4) - 0.4).abs() < 0.02, "{}", share(4));
        assert!((share(20) - 0.3).abs() < 0.02, "{}", share(20));
        assert!((share(50) - 0.3).abs() < 0.02, "{}", share(50));
        assert_eq!(drawn, (0..10_000).map(|n| d.steps_of(n)).collect::<Vec<_>>());
        let other = Diffusion {
            seed: 8,
            ..diffusion("4=0.4,20=0.3,50=0.3")
        };
        assert_ne!(drawn[..50], (0..50).map(|n| other.steps_of(n)).collect::<Vec<_>>());
    }

    #[test]
    fn a_diffusion_request_is_guided_euler_text_to_image_seeded_by_its_number() {
        let workload = Workload::Diffusion(diffusion("4=1"));
        let (params, image, steps) = workload.params(9, None);
        assert_eq!(steps, Some(4));
        assert!(image.is_none());
        assert_eq!(params.steps, Some(4));
        assert_eq!(params.guidance_scale, Some(7.5));
        assert_eq!(params.scheduler.as_deref(), Some("euler"));
        assert_eq!((params.width, params.height), (Some(256), Some(256)));
        assert_eq!(params.seed, Some(9u64.into()));
        assert_eq!(workload.params(9, Some(50)).2, Some(50));
    }
}
