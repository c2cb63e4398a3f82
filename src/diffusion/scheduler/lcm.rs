//! Latent consistency model sampling (Luo et al. 2023): diffusers 0.35.2 `LCMScheduler`.
//!
//! Timesteps are taken from the distillation schedule `k·i - 1` (`k = T / original_inference_steps`),
//! evenly skipping through it; `timestep_spacing` and `steps_offset` are read by diffusers but unused.
//! Each step computes the consistency-model output `denoised = c_out · x̂₀ + c_skip · x` and, except at
//! the last step, re-noises it to the next timestep with `randn(model_output.len())` from the request's
//! generator. At the last step the sample becomes `denoised`.

use super::betas::{AlphaSchedule, BetaDefaults};
use super::config::{Prediction, SchedulerConfig};
use super::ddim::add_noise_at;
use super::spacing::np_linspace;
use super::{assert_same_len, check_steps, clamp, Scheduler, SchedulerError, SchedulerKind};
use crate::diffusion::noise::TorchGenerator;

/// `LCMScheduler`'s beta defaults (Stable Diffusion's).
const LCM_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
};

/// `LCMScheduler` after `set_timesteps(steps)`.
#[derive(Clone, Debug)]
pub(crate) struct Lcm {
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    /// Reads the keys `LCMScheduler.__init__` knows, with its defaults.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let keys = config.reader(SchedulerKind::Lcm);
        let AlphaSchedule {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip,
        } = AlphaSchedule::read(&keys, &LCM_BETAS, false)?;
        let timestep_scaling = keys.f64("timestep_scaling", 10.0)? as f32;
        let train_steps = alphas_cumprod.len();
        check_steps(SchedulerKind::Lcm, steps, train_steps)?;
        let original_steps = keys.usize("original_inference_steps", 50)?;
        if original_steps == 0 || original_steps > train_steps {
            let found = serde_json::Value::from(original_steps);
            return Err(SchedulerError::InvalidValue {
                key: "original_inference_steps".to_owned(),
                expected: "an integer from 1 to num_train_timesteps",
                found: found.to_string(),
            });
        }
        if steps > original_steps {
            return Err(SchedulerError::InvalidSteps {
                scheduler: SchedulerKind::Lcm,
                steps,
                reason: format!("LCM allows at most original_inference_steps = {original_steps} steps"),
            });
        }
        // set_timesteps with strength 1: the distillation schedule, reversed, then evenly skipped.
        let k = (train_steps / original_steps) as i64;
        let origin: Vec<i64> = (1..=original_steps as i64).rev().map(|i| i * k - 1).collect();
        let timesteps: Vec<i64> = np_linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|index| origin[index.floor() as usize])
            .collect();
        Ok(Self {
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip,
            timestep_scaling,
        })
    }
}

impl Scheduler for Lcm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn step(&self, model_output: &[f32], i: usize, sample: &mut [f32], rng: &mut TorchGenerator) {
        assert_same_len(model_output, sample);
        let t = self.timesteps[i];
        let last = i + 1 == self.timesteps.len();
        let prev_t = if last { t } else { self.timesteps[i + 1] };
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (sqrt_alpha_t, sqrt_beta_t) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
        let (sqrt_alpha_prev, sqrt_beta_prev) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
        // get_scalings_for_boundary_condition_discrete, sigma_data = 0.5; `0.25 / x` is
        // `reciprocal(x) * 0.25` for a tensor x.
        let scaled = t as f32 * self.timestep_scaling;
        let c_skip = (1.0 / (scaled * scaled + 0.25)) * 0.25;
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let noise = if last {
            Vec::new()
        } else {
            rng.randn(model_output.len())
        };
        for (k, (x, &m)) in sample.iter_mut().zip(model_output).enumerate() {
            let mut x0 = match self.prediction {
                Prediction::Epsilon => (*x - sqrt_beta_t * m) / sqrt_alpha_t,
                Prediction::Sample => m,
                Prediction::V => sqrt_alpha_t * *x - sqrt_beta_t * m,
            };
            if let Some(range) = self.clip {
                x0 = clamp(x0, range);
            }
            let denoised = c_out * x0 + c_skip * *x;
            *x = if last {
                denoised
            } else {
                sqrt_alpha_prev * denoised + sqrt_beta_prev * noise[k]
            };
        }
    }

    /// `sqrt(ᾱ_t) · original + sqrt(1 - ᾱ_t) · noise` at `t = timesteps[i]`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        assert_same_len(original, noise);
        add_noise_at(&self.alphas_cumprod, self.timesteps[i], original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_skip_through_the_distillation_schedule() {
        let lcm = Lcm::new(&SchedulerConfig::from_json("{}").unwrap(), 4).unwrap();
        assert_eq!(lcm.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        let err = Lcm::new(&SchedulerConfig::from_json("{}").unwrap(), 51).unwrap_err();
        assert!(err.to_string().contains("original_inference_steps"), "{err}");
    }

    #[test]
    fn only_the_last_step_draws_no_noise() {
        let lcm = Lcm::new(&SchedulerConfig::from_json("{}").unwrap(), 2).unwrap();
        let (mut rng, mut reference) = (TorchGenerator::new(3), TorchGenerator::new(3));
        let mut sample = vec![0.25f32; 16];
        lcm.step(&[0.1; 16], 0, &mut sample, &mut rng);
        lcm.step(&[0.1; 16], 1, &mut sample, &mut rng);
        reference.randn(16);
        assert_eq!(rng.randn(16), reference.randn(16));
    }
}
