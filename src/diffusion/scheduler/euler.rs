//! Euler (Karras et al. 2022, Algorithm 2 without churn): diffusers 0.35.2 `EulerDiscreteScheduler`.
//!
//! Sigmas are interpolated at the (possibly fractional) timesteps in float64 and stored as float32; the
//! UNet input is divided by `sqrt(σ² + 1)`; one step moves the sample along the derivative
//! `(x - x̂₀) / σ` to the next sigma. No randomness (`s_churn` is 0 in the pipelines).

use super::betas::{alphas_cumprod, DDPM_BETAS};
use super::config::{Keys, Prediction, SchedulerConfig, Spacing, SPACINGS};
use super::spacing::{float_timesteps, interpolated_sigmas};
use super::{assert_same_len, check_steps, check_timesteps, Scheduler, SchedulerError, SchedulerKind};
use crate::diffusion::noise::TorchGenerator;

/// `EulerDiscreteScheduler` after `set_timesteps(steps)`.
#[derive(Clone, Debug)]
pub(crate) struct Euler {
    timesteps: Vec<f32>,
    /// One sigma per timestep, then the final sigma (0, or σ_min with `final_sigmas_type = "sigma_min"`).
    sigmas: Vec<f32>,
    prediction: Prediction,
    init_noise_sigma: f32,
}

impl Euler {
    /// Reads the keys `EulerDiscreteScheduler.__init__` knows, with its defaults.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let keys = config.reader(SchedulerKind::Euler);
        let prediction = keys.choice(
            "prediction_type",
            "epsilon",
            &[
                ("epsilon", Prediction::Epsilon),
                ("v_prediction", Prediction::V),
                ("sample", Prediction::Sample),
                ("original_sample", Prediction::Sample),
            ],
        )?;
        keys.choice("interpolation_type", "linear", &[("linear", ())])?;
        for key in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"] {
            keys.refuse_true(key)?;
        }
        let continuous = keys.choice(
            "timestep_type",
            "discrete",
            &[("discrete", false), ("continuous", true)],
        )?;
        if continuous && prediction == Prediction::V {
            return Err(keys.unsupported("timestep_type", "\"continuous\" with v_prediction".to_owned()));
        }
        let sigma_min_last = keys.choice("final_sigmas_type", "zero", &[("zero", false), ("sigma_min", true)])?;
        let SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        } = sigma_schedule(&keys, steps, sigma_min_last)?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction,
            init_noise_sigma,
        })
    }
}

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
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

    fn step(&self, model_output: &[f32], i: usize, sample: &mut [f32], _rng: &mut TorchGenerator) {
        assert_same_len(model_output, sample);
        // sigma_hat = sigma * (gamma + 1) with gamma = 0.
        let sigma = self.sigmas[i];
        let dt = self.sigmas[i + 1] - sigma;
        let denominator = sigma * sigma + 1.0;
        let c_out = -sigma / denominator.sqrt();
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let denoised = match self.prediction {
                Prediction::Epsilon => *x - sigma * m,
                Prediction::V => m * c_out + *x / denominator,
                Prediction::Sample => m,
            };
            let derivative = (*x - denoised) / sigma;
            *x += derivative * dt;
        }
    }

    /// `original + noise · σᵢ`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        assert_same_len(original, noise);
        let sigma = self.sigmas[i];
        original.iter().zip(noise).map(|(&o, &n)| o + n * sigma).collect()
    }
}

/// The timesteps and sigmas both Euler schedulers compute in `set_timesteps`.
pub(crate) struct SigmaSchedule {
    pub(crate) timesteps: Vec<f32>,
    /// One sigma per timestep, then the final sigma.
    pub(crate) sigmas: Vec<f32>,
    pub(crate) init_noise_sigma: f32,
}

/// `set_timesteps(steps)` of `EulerDiscreteScheduler` / `EulerAncestralDiscreteScheduler`: float32
/// timesteps, sigmas interpolated in float64 then stored as float32, and `init_noise_sigma` (the largest
/// sigma, or `sqrt(σ_max² + 1)` with "leading" spacing).
pub(crate) fn sigma_schedule(
    keys: &Keys<'_>,
    steps: usize,
    sigma_min_last: bool,
) -> Result<SigmaSchedule, SchedulerError> {
    let mut alphas_cumprod = alphas_cumprod(keys, &DDPM_BETAS)?;
    if keys.bool("rescale_betas_zero_snr", false)? {
        // diffusers keeps the last sigma finite this way.
        let last = alphas_cumprod.len() - 1;
        alphas_cumprod[last] = 2f32.powi(-24);
    }
    let spacing = keys.choice("timestep_spacing", "linspace", &SPACINGS)?;
    let offset = keys.usize("steps_offset", 0)?;
    let train_steps = alphas_cumprod.len();
    check_steps(keys.scheduler(), steps, train_steps)?;
    let timesteps = float_timesteps(spacing, train_steps, steps, offset);
    check_timesteps(
        keys.scheduler(),
        steps,
        timesteps.iter().map(|&t| f64::from(t)),
        train_steps,
    )?;
    let last_sigma = if sigma_min_last {
        ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt()
    } else {
        0.0
    };
    let sigmas: Vec<f32> = interpolated_sigmas(&alphas_cumprod, &timesteps)
        .into_iter()
        .map(|s| s as f32)
        .chain(std::iter::once(last_sigma))
        .collect();
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match spacing {
        Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        Spacing::Linspace | Spacing::Trailing => max_sigma,
    };
    Ok(SigmaSchedule {
        timesteps,
        sigmas,
        init_noise_sigma,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;

    #[test]
    fn the_sd15_pndm_file_gives_linspace_timesteps() {
        let euler = Euler::new(&SchedulerConfig::from_json(SD15).unwrap(), 4).unwrap();
        assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        assert_eq!(euler.sigmas[4], 0.0);
        assert!(
            (euler.init_noise_sigma() - 14.6146).abs() < 1e-3,
            "{}",
            euler.init_noise_sigma()
        );
    }

    #[test]
    fn karras_sigmas_are_refused_by_name() {
        let config = SchedulerConfig::from_json(r#"{"use_karras_sigmas": true}"#).unwrap();
        let err = Euler::new(&config, 10).unwrap_err();
        assert!(err.to_string().contains("use_karras_sigmas"), "{err}");
        let config = SchedulerConfig::from_json(r#"{"interpolation_type": "log_linear"}"#).unwrap();
        assert!(Euler::new(&config, 10)
            .unwrap_err()
            .to_string()
            .contains("interpolation_type"));
    }
}
