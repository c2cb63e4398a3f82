//! The simulated device: what a UNet, text-encoder or VAE call of B requests costs.

use anyhow::{ensure, Context};

/// UNet seconds per call by requests in it (each guided: 2 network rows), linearly interpolated
/// between points and extrapolated from the last two.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Curve {
    /// (requests, seconds), ascending in requests.
    pub(super) points: Vec<(f64, f64)>,
}

impl Curve {
    /// `B=ms,...`, with a point at B = 1.
    pub(super) fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut points = Vec::new();
        for part in spec.split(',') {
            let (b, ms) = part
                .split_once('=')
                .with_context(|| format!("--curve: {part:?} is not B=ms"))?;
            let b: f64 = b
                .trim()
                .parse()
                .with_context(|| format!("--curve: bad B in {part:?}"))?;
            let ms: f64 = ms
                .trim()
                .parse()
                .with_context(|| format!("--curve: bad ms in {part:?}"))?;
            ensure!(
                b >= 1.0 && ms > 0.0 && ms.is_finite(),
                "--curve: B ≥ 1 and ms > 0 in {part:?}"
            );
            points.push((b, ms / 1000.0));
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        ensure!(points[0].0 == 1.0, "--curve needs a point at B = 1");
        Ok(Self { points })
    }

    /// Seconds for a call with `requests` requests (0 for none).
    pub(super) fn seconds(&self, requests: usize) -> f64 {
        if requests == 0 {
            return 0.0;
        }
        let b = requests as f64;
        let p = &self.points;
        if p.len() == 1 {
            return p[0].1 * b;
        }
        let i = p.iter().position(|(x, _)| *x >= b).unwrap_or(p.len() - 1).max(1);
        let ((b0, s0), (b1, s1)) = (p[i - 1], p[i]);
        s0 + (s1 - s0) * (b - b0) / (b1 - b0)
    }

    /// The same curve with every time multiplied by `factor`.
    pub(super) fn scaled(&self, factor: f64) -> Self {
        Self {
            points: self.points.iter().map(|(b, s)| (*b, s * factor)).collect(),
        }
    }
}

/// A named curve with the facts that go with it.
pub(super) struct Preset {
    pub(super) name: &'static str,
    pub(super) points: &'static str,
    /// Image side, pixels.
    pub(super) size: u32,
    /// Whether the worker's GPU defaults apply (caps, batch size).
    pub(super) gpu: bool,
    pub(super) begin_ratio: f64,
    pub(super) decode_ratio: f64,
    /// The text encoder's hidden size (what a paused row's embeddings hold).
    pub(super) hidden: usize,
}

/// `--curve` presets; a curve given as points takes the first one's other facts.
pub(super) const PRESETS: [Preset; 2] = [
    // SD 1.5, 512², guided, on an H200. t(1) = 20 ms is an assumption (a single-request guided step
    // on H200-class GPUs: 15–25 ms); t(16) = 16/3.2 × t(1) (the published 3.2× image-steps/s
    // at batch 16 over 1, SGLang, Qwen-Image, 512²); linear between: t(B) = t1 · (11/15 + 4/15 · B).
    // Text encoder and VAE from NVIDIA's TensorRT SD 1.5 512² breakdown at batch 1 (CLIP 4 ms,
    // UNet 792 ms for 50 steps, VAE 19 ms): 0.25 and 1.2 UNet steps.
    Preset {
        name: "h200-512",
        points: "1=20,16=100",
        size: 512,
        gpu: true,
        begin_ratio: 0.25,
        decode_ratio: 1.2,
        hidden: 768,
    },
    // sd-tiny-random, 256 px, the 2-vCPU VM (BENCHMARKS.md, Diffusion: UNet call 42.3 / 79.9 /
    // 157.3 ms at 1 / 2 / 4 requests); text encoder and VAE decode timed beside the UNet with
    // onnxruntime 1.31.1, same model, 2 threads, alternating (BENCHMARKS.md, this simulation).
    Preset {
        name: "cpu-tiny-256",
        points: "1=42.3,2=79.9,4=157.3",
        size: 256,
        gpu: false,
        begin_ratio: 0.04,
        decode_ratio: 1.04,
        hidden: 32,
    },
];

/// What each call costs.
#[derive(Debug, Clone)]
pub(super) struct Device {
    pub(super) curve: Curve,
    /// Text encoder call ÷ UNet call at equal batch.
    pub(super) begin_ratio: f64,
    /// VAE decode call ÷ UNet call at equal batch.
    pub(super) decode_ratio: f64,
    /// One UNet call per group of rows at the same timestep.
    pub(super) scalar_timestep: bool,
}

impl Device {
    /// One denoising step of `requests` guided requests.
    pub(super) fn unet(&self, requests: usize) -> f64 {
        self.curve.seconds(requests)
    }

    /// The text encoder for `requests` requests (prompt and negative prompt each).
    pub(super) fn begin(&self, requests: usize) -> f64 {
        self.begin_ratio * self.curve.seconds(requests)
    }

    /// The VAE decoder for `requests` latents.
    pub(super) fn decode(&self, requests: usize) -> f64 {
        self.decode_ratio * self.curve.seconds(requests)
    }

    /// Seconds for a request of `steps` steps alone on the device.
    pub(super) fn unloaded(&self, steps: u32) -> f64 {
        self.begin(1) + f64::from(steps) * self.unet(1) + self.decode(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_interpolates_linearly_and_extrapolates_from_the_last_points() {
        let c = Curve::parse("16=100,1=20").unwrap();
        assert!((c.seconds(1) - 0.020).abs() < 1e-12);
        assert!((c.seconds(16) - 0.100).abs() < 1e-12);
        // t1 · (11/15 + 4/15 · B): 3.2× the image-steps/s at 16.
        assert!((c.seconds(4) - 0.020 * (11.0 + 16.0) / 15.0).abs() < 1e-12);
        assert!((16.0 / c.seconds(16)) / (1.0 / c.seconds(1)) - 3.2 < 1e-9);
        assert!((c.seconds(31) - 0.180).abs() < 1e-12);
        assert_eq!(c.seconds(0), 0.0);
        let cpu = Curve::parse(PRESETS[1].points).unwrap();
        assert!((cpu.seconds(3) - (0.0799 + 0.1573) / 2.0).abs() < 1e-12);
        assert!((Curve::parse("1=10").unwrap().seconds(3) - 0.030).abs() < 1e-12);
        assert!(Curve::parse("2=30").is_err(), "a curve needs B = 1");
        assert!(Curve::parse("1=x").is_err());
        assert!(Curve::parse("1=0").is_err());
    }

    #[test]
    fn a_request_alone_costs_begin_steps_and_decode() {
        let d = Device {
            curve: Curve::parse("1=20,16=100").unwrap(),
            begin_ratio: 0.25,
            decode_ratio: 1.2,
            scalar_timestep: false,
        };
        assert!((d.unloaded(20) - (0.005 + 20.0 * 0.020 + 0.024)).abs() < 1e-12);
        assert!((d.decode(16) - 0.120).abs() < 1e-12);
    }
}
