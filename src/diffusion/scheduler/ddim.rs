//! DDIM (Song et al. 2020) with `eta = 0`, the pipelines' default: diffusers 0.35.2 `DDIMScheduler`.
//!
//! Deterministic: each step predicts `x̂₀` (clipped when `clip_sample`, which defaults to **true** for
//! this class) and the noise, and re-noises `x̂₀` to the previous timestep `t - T / steps` (diffusers
//! uses that offset whatever the spacing). The sample needs no input scaling; `init_noise_sigma` is 1.

use super::betas::{AlphaSchedule, DDPM_BETAS};
use super::config::{Prediction, SchedulerConfig, SPACINGS};
use super::spacing::integer_timesteps;
use super::{assert_same_len, check_steps, check_timesteps, clamp, Scheduler, SchedulerError, SchedulerKind};
use crate::diffusion::noise::TorchGenerator;

/// `DDIMScheduler` after `set_timesteps(steps)`.
#[derive(Clone, Debug)]
pub(crate) struct Ddim {
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    /// `alphas_cumprod` used past the end of the schedule: 1 with `set_alpha_to_one`, else `ᾱ₀`.
    final_alpha_cumprod: f32,
    /// `num_train_timesteps / steps`, the distance to the previous timestep.
    step_ratio: i64,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is set.
    clip: Option<f32>,
}

impl Ddim {
    /// Reads the keys `DDIMScheduler.__init__` knows, with its defaults.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let keys = config.reader(SchedulerKind::Ddim);
        // DDIMScheduler clips by default (`clip_sample=True`): a config without the key clips.
        let AlphaSchedule {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip,
        } = AlphaSchedule::read(&keys, &DDPM_BETAS, true)?;
        let spacing = keys.choice("timestep_spacing", "leading", &SPACINGS)?;
        let offset = keys.usize("steps_offset", 0)?;
        let train_steps = alphas_cumprod.len();
        check_steps(SchedulerKind::Ddim, steps, train_steps)?;
        let timesteps = integer_timesteps(spacing, train_steps, steps, offset);
        check_timesteps(
            SchedulerKind::Ddim,
            steps,
            timesteps.iter().map(|&t| t as f64),
            train_steps,
        )?;
        Ok(Self {
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (train_steps / steps) as i64,
            prediction,
            clip,
        })
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn step(&self, model_output: &[f32], i: usize, sample: &mut [f32], _rng: &mut TorchGenerator) {
        assert_same_len(model_output, sample);
        let t = self.timesteps[i];
        let prev_t = t - self.step_ratio;
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha_t, sqrt_beta_t) = (alpha_t.sqrt(), beta_t.sqrt());
        // eta = 0: std_dev_t = 0 · sqrt(variance), kept so that a non-finite variance propagates as in torch.
        let variance = ((1.0 - alpha_prev) / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = 0.0 * variance.sqrt();
        let direction_scale = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let sqrt_alpha_prev = alpha_prev.sqrt();
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let (mut x0, epsilon) = match self.prediction {
                Prediction::Epsilon => ((*x - sqrt_beta_t * m) / sqrt_alpha_t, m),
                Prediction::Sample => (m, (*x - sqrt_alpha_t * m) / sqrt_beta_t),
                Prediction::V => (sqrt_alpha_t * *x - sqrt_beta_t * m, sqrt_alpha_t * m + sqrt_beta_t * *x),
            };
            if let Some(range) = self.clip {
                x0 = clamp(x0, range);
            }
            *x = sqrt_alpha_prev * x0 + direction_scale * epsilon;
        }
    }

    /// `sqrt(ᾱ_t) · original + sqrt(1 - ᾱ_t) · noise` at `t = timesteps[i]`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        assert_same_len(original, noise);
        add_noise_at(&self.alphas_cumprod, self.timesteps[i], original, noise)
    }
}

/// DDIM's and LCM's `add_noise` (float32, as torch computes it).
pub(crate) fn add_noise_at(alphas_cumprod: &[f32], t: i64, original: &[f32], noise: &[f32]) -> Vec<f32> {
    let alpha = alphas_cumprod[t as usize];
    let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
    original.iter().zip(noise).map(|(&o, &n)| a * o + b * n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;

    #[test]
    fn the_sd15_pndm_file_gives_leading_timesteps() {
        let ddim = Ddim::new(&SchedulerConfig::from_json(SD15).unwrap(), 20).unwrap();
        let expected: Vec<f32> = (0..20).rev().map(|i| (i * 50 + 1) as f32).collect();
        assert_eq!(ddim.timesteps(), &expected[..]);
        assert_eq!(ddim.timesteps()[..3], [951.0, 901.0, 851.0]);
        assert_eq!(ddim.clip, None);
        // Without `clip_sample` in the file, DDIM's own default (true) applies.
        let ddim = Ddim::new(&SchedulerConfig::from_json("{}").unwrap(), 20).unwrap();
        assert_eq!(ddim.clip, Some(1.0));
    }

    #[test]
    fn thresholding_is_refused_by_name() {
        let config = SchedulerConfig::from_json(r#"{"thresholding": true}"#).unwrap();
        assert!(Ddim::new(&config, 10).unwrap_err().to_string().contains("thresholding"));
    }
}
