//! Euler ancestral: diffusers 0.35.2 `EulerAncestralDiscreteScheduler`.
//!
//! The same sigmas as [`Euler`](super::euler): each step goes down to `σ_down` along the Euler
//! derivative, then adds fresh noise of scale `σ_up` (`σ_down² + σ_up² = σ_next²`). It draws
//! `randn(model_output.len())` from the request's generator at **every** step, the last included
//! (where `σ_up = 0`), exactly as diffusers does.

use super::config::{Prediction, SchedulerConfig};
use super::euler::{sigma_schedule, SigmaSchedule};
use super::{assert_same_len, Scheduler, SchedulerError, SchedulerKind};
use crate::diffusion::noise::TorchGenerator;

/// `EulerAncestralDiscreteScheduler` after `set_timesteps(steps)`.
#[derive(Clone, Debug)]
pub(crate) struct EulerAncestral {
    timesteps: Vec<f32>,
    /// One sigma per timestep, then 0.
    sigmas: Vec<f32>,
    prediction: Prediction,
    init_noise_sigma: f32,
}

impl EulerAncestral {
    /// Reads the keys `EulerAncestralDiscreteScheduler.__init__` knows, with its defaults. Its
    /// "sample" prediction raises `NotImplementedError` in diffusers, so it is refused here.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let keys = config.reader(SchedulerKind::EulerAncestral);
        let prediction = keys.choice(
            "prediction_type",
            "epsilon",
            &[("epsilon", Prediction::Epsilon), ("v_prediction", Prediction::V)],
        )?;
        let SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        } = sigma_schedule(&keys, steps, false)?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction,
            init_noise_sigma,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// `sample / sqrt(σᵢ² + 1)`.
    fn scale_model_input(&self, sample: &mut [f32], i: usize) {
        let sigma = self.sigmas[i];
        let scale = (sigma * sigma + 1.0).sqrt();
        sample.iter_mut().for_each(|x| *x /= scale);
    }

    fn step(&self, model_output: &[f32], i: usize, sample: &mut [f32], rng: &mut TorchGenerator) {
        assert_same_len(model_output, sample);
        let (sigma, sigma_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let sigma_up = ((sigma_to * sigma_to) * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let denominator = sigma * sigma + 1.0;
        let c_out = -sigma / denominator.sqrt();
        let noise = rng.randn(model_output.len());
        for ((x, &m), &n) in sample.iter_mut().zip(model_output).zip(&noise) {
            let denoised = match self.prediction {
                Prediction::Epsilon => *x - sigma * m,
                Prediction::V => m * c_out + *x / denominator,
                Prediction::Sample => unreachable!("refused when built"),
            };
            let derivative = (*x - denoised) / sigma;
            let prev = *x + derivative * dt;
            *x = prev + n * sigma_up;
        }
    }

    /// `original + noise · σᵢ`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        assert_same_len(original, noise);
        let sigma = self.sigmas[i];
        original.iter().zip(noise).map(|(&o, &n)| o + n * sigma).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_prediction_is_refused_by_name() {
        let config = SchedulerConfig::from_json(r#"{"prediction_type": "sample"}"#).unwrap();
        let err = EulerAncestral::new(&config, 10).unwrap_err();
        assert!(err.to_string().contains("prediction_type"), "{err}");
    }

    #[test]
    fn every_step_draws_one_noise_tensor() {
        let config = SchedulerConfig::from_json("{}").unwrap();
        let scheduler = EulerAncestral::new(&config, 2).unwrap();
        let (mut rng, mut reference) = (TorchGenerator::new(5), TorchGenerator::new(5));
        let mut sample = vec![0.5f32; 32];
        for i in 0..2 {
            scheduler.step(&[0.1; 32], i, &mut sample, &mut rng);
            reference.randn(32);
        }
        assert_eq!(rng.randn(16), reference.randn(16));
    }
}
