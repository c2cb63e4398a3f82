//! Noise schedulers for Stable Diffusion pipelines, numerically equal to diffusers 0.35.2 (with torch
//! 2.15.0's float32 arithmetic): [`SchedulerKind::Euler`] (`EulerDiscreteScheduler`),
//! [`SchedulerKind::EulerAncestral`] (`EulerAncestralDiscreteScheduler`), [`SchedulerKind::Ddim`]
//! (`DDIMScheduler`, `eta = 0`) and [`SchedulerKind::Lcm`] (`LCMScheduler`), one file each.
//!
//! A [`Scheduler`] is built (by [`build`]) per request from the model's [`SchedulerConfig`] (its
//! `scheduler_config.json` as written on disk: each scheduler applies its own defaults to missing keys,
//! like `<Class>.from_pretrained(dir, subfolder="scheduler")`) and a step count. It is then immutable
//! plain data with candle's five operations; the step index is explicit, so a request's state
//! (latents, step index, [`TorchGenerator`]) can be paused, resumed or dropped between steps:
//!
//! ```text
//! latents = randn(n) · init_noise_sigma                (img2img: add_noise(x₀, randn, t_start))
//! for i in start..timesteps.len():                     (start = 0, or img2img_start(steps, strength))
//!     x_in = latents; scale_model_input(x_in, i)
//!     model_output = unet(x_in, timesteps[i])          (classifier-free guidance applied by the caller)
//!     step(model_output, i, latents, rng)
//! ```
//!
//! Checked number by number against `tests/data/diffusion/scheduler_traces.json`
//! (`make_scheduler_traces.py` next to it): timesteps exactly; values computed through a square root
//! within a few float32 ulps, because torch's CPU `sqrt` is MKL's and not correctly rounded while kiln
//! uses IEEE `sqrt` (against diffusers with IEEE `sqrt` substituted, every value is bit-identical).
//! Values a config sets that are not implemented here (Karras sigmas, thresholding, unknown beta
//! schedules, ...) are refused when building.

mod betas;
mod config;
mod ddim;
mod euler;
mod euler_ancestral;
mod lcm;
mod spacing;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use config::SchedulerConfig;

use crate::diffusion::noise::TorchGenerator;

/// Which scheduler a request asks for; wire names `euler`, `euler_ancestral`, `ddim`, `lcm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers' `EulerDiscreteScheduler`.
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers' `DDIMScheduler`.
    Ddim,
    /// diffusers' `LCMScheduler`.
    Lcm,
}

impl SchedulerKind {
    /// All kinds, in wire-name order.
    pub const ALL: [SchedulerKind; 4] = [Self::Euler, Self::EulerAncestral, Self::Ddim, Self::Lcm];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_ancestral",
            Self::Ddim => "ddim",
            Self::Lcm => "lcm",
        }
    }
}

impl SchedulerKind {
    /// The kind a `scheduler_config.json`'s `_class_name` names, if kiln implements that class.
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        match class_name {
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            "DDIMScheduler" => Some(Self::Ddim),
            "LCMScheduler" => Some(Self::Lcm),
            _ => None,
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| SchedulerError::UnknownKind(s.to_owned()))
    }
}

/// Why a scheduler cannot be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// The scheduler name is not one of the wire names.
    #[error("unknown scheduler `{0}` (expected euler, euler_ancestral, ddim or lcm)")]
    UnknownKind(String),
    /// `scheduler_config.json` is not a JSON object.
    #[error("scheduler_config.json is not a JSON object: {0}")]
    InvalidJson(String),
    /// A key has a value of the wrong type or range.
    #[error("scheduler_config.json: `{key}` must be {expected}, found {found}")]
    InvalidValue {
        /// The key.
        key: String,
        /// What it must be.
        expected: &'static str,
        /// The value found.
        found: String,
    },
    /// A key has a value this scheduler does not implement (or diffusers does not know).
    #[error("{scheduler} scheduler: scheduler_config.json sets `{key}` = {value}, which is not supported")]
    Unsupported {
        /// The scheduler being built.
        scheduler: SchedulerKind,
        /// The key.
        key: &'static str,
        /// The value, as JSON.
        value: String,
    },
    /// The step count is out of range for this scheduler and config.
    #[error("{scheduler} scheduler cannot run {steps} steps: {reason}")]
    InvalidSteps {
        /// The scheduler being built.
        scheduler: SchedulerKind,
        /// The requested step count.
        steps: usize,
        /// Why.
        reason: String,
    },
}

/// One request's noise schedule, `set_timesteps(steps)` done: candle's five operations with an explicit
/// step index. Implementations are immutable plain data (`Send + Sync`, cloneable through
/// [`Clone`] on `Box<dyn Scheduler>`); the step index and the latents belong to the request.
pub trait Scheduler: Send + Sync + fmt::Debug {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;

    /// The timestep passed to the UNet at each step index, as float32 (diffusers' `scheduler.timesteps`:
    /// float32 for the Euler schedulers, integers for DDIM and LCM). Its length is the step count.
    fn timesteps(&self) -> &[f32];

    /// The Euler schedulers' sigmas: one per timestep, then the final one. `None` for DDIM and LCM.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// The factor that turns unit-variance noise into initial latents (`latents * init_noise_sigma`).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// `scale_model_input(sample, timesteps[i])`, in place: what the UNet sees at step `i`.
    ///
    /// # Panics
    /// If `i >= timesteps().len()` (as do [`step`](Self::step) and [`add_noise`](Self::add_noise)).
    fn scale_model_input(&self, sample: &mut [f32], i: usize) {
        assert!(i < self.timesteps().len(), "step index {i} out of range");
        let _ = sample;
    }

    /// `step(model_output, timesteps[i], sample, generator=rng)`: replaces `sample` (one row's latents)
    /// with the previous sample. Draws from `rng` exactly when diffusers does: Euler ancestral once per
    /// step, LCM at every step but the last, each a `randn` of `model_output.len()` values.
    ///
    /// # Panics
    /// If `i` is out of range or `model_output` and `sample` differ in length.
    fn step(&self, model_output: &[f32], i: usize, sample: &mut [f32], rng: &mut TorchGenerator);

    /// `add_noise(original, noise, timesteps[i:i+1])` as the img2img pipeline calls it (after
    /// `set_begin_index(i)`): the noisy latents to start denoising from at step index `i`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32>;

    /// A boxed copy (what `Clone` on `Box<dyn Scheduler>` calls).
    fn clone_box(&self) -> Box<dyn Scheduler>;
}

impl Clone for Box<dyn Scheduler> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Builds `kind` from a model's config for `steps` inference steps (diffusers' `from_pretrained` then
/// `set_timesteps(steps)`). Fails on unsupported config values, naming the key, and on step counts
/// diffusers refuses or schedules outside the training range.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(match kind {
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(config, steps)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, steps)?),
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(config, steps)?),
    })
}

/// The first step index of an img2img run (`StableDiffusionImg2ImgPipeline.get_timesteps`):
/// `steps - min(int(steps * strength), steps)`, with Python's float product and truncation (so
/// `img2img_start(100, 0.29) == 72`). Equals `steps` when `strength * steps < 1`: nothing to run, and
/// no step index to add noise at, so the caller must refuse such a request.
pub fn img2img_start(steps: usize, strength: f64) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    steps - init
}

/// Step counts every scheduler refuses: 0, and more than the training timesteps.
fn check_steps(scheduler: SchedulerKind, steps: usize, train_steps: usize) -> Result<(), SchedulerError> {
    if steps == 0 || steps > train_steps {
        let reason = format!("the step count must be from 1 to num_train_timesteps = {train_steps}");
        return Err(SchedulerError::InvalidSteps {
            scheduler,
            steps,
            reason,
        });
    }
    Ok(())
}

/// Refuses schedules diffusers 0.35.2 gets wrong: with "trailing" spacing some step counts (61, 103,
/// ...) yield one timestep too many, ending at -1; "leading" with a large offset can pass the end.
fn check_timesteps(
    scheduler: SchedulerKind,
    steps: usize,
    timesteps: impl ExactSizeIterator<Item = f64>,
    train_steps: usize,
) -> Result<(), SchedulerError> {
    let count = timesteps.len();
    let outside: Vec<f64> = timesteps.filter(|&t| t < 0.0 || t > (train_steps - 1) as f64).collect();
    if count != steps || !outside.is_empty() {
        let reason = format!(
            "diffusers' schedule has {count} timesteps, {} outside 0..{train_steps} ({outside:?})",
            outside.len()
        );
        return Err(SchedulerError::InvalidSteps {
            scheduler,
            steps,
            reason,
        });
    }
    Ok(())
}

/// The shared precondition of `step` and `add_noise`.
fn assert_same_len(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "scheduler inputs differ in length");
}

/// `torch.clamp(x, -range, range)` (NaN stays NaN).
fn clamp(x: f32, range: f32) -> f32 {
    if x.is_nan() {
        x
    } else {
        x.max(-range).min(range)
    }
}
