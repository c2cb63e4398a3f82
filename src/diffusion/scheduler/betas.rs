//! The training noise schedule every scheduler starts from: betas (`linear`, `scaled_linear`,
//! `squaredcos_cap_v2` or `trained_betas`, optionally rescaled to zero terminal SNR) and their
//! `alphas_cumprod`, with torch's float32 semantics: `torch.linspace` is a fused multiply-add from either
//! end, `torch.cumprod` a float64 running product rounded to float32 at each output.

use serde_json::Value;

use super::config::{Keys, Prediction};
use super::SchedulerError;

/// What DDIM and LCM read alike: the training schedule, the alpha "before" the first training
/// step (`set_alpha_to_one`), how the model's output is read, and the clipping of the predicted
/// sample (`clip_sample`, whose default differs: DDIM true, LCM false).
pub(crate) struct AlphaSchedule {
    pub(crate) alphas_cumprod: Vec<f32>,
    pub(crate) final_alpha_cumprod: f32,
    pub(crate) prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is set.
    pub(crate) clip: Option<f32>,
}

impl AlphaSchedule {
    /// Read those keys, with the scheduler's beta defaults and `clip_sample` default.
    pub(crate) fn read(keys: &Keys<'_>, betas: &BetaDefaults, clip_by_default: bool) -> Result<Self, SchedulerError> {
        let alphas_cumprod = alphas_cumprod(keys, betas)?;
        let final_alpha_cumprod = if keys.bool("set_alpha_to_one", true)? {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let prediction = keys.choice(
            "prediction_type",
            "epsilon",
            &[
                ("epsilon", Prediction::Epsilon),
                ("sample", Prediction::Sample),
                ("v_prediction", Prediction::V),
            ],
        )?;
        keys.refuse_true("thresholding")?;
        let clip_range = keys.f64("clip_sample_range", 1.0)? as f32;
        let clip = keys.bool("clip_sample", clip_by_default)?.then_some(clip_range);
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCos,
}

/// Defaults of the beta keys, which differ between schedulers (LCM's are SD's, the others' DDPM's).
pub(crate) struct BetaDefaults {
    pub(crate) beta_start: f64,
    pub(crate) beta_end: f64,
    pub(crate) beta_schedule: &'static str,
}

/// DDPM's defaults, used by Euler, Euler ancestral and DDIM.
pub(crate) const DDPM_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
};

/// The training noise schedule: `alphas_cumprod[t]` for `t` in `0..num_train_timesteps`, float32.
pub(crate) fn alphas_cumprod(keys: &Keys<'_>, defaults: &BetaDefaults) -> Result<Vec<f32>, SchedulerError> {
    let steps = keys.usize("num_train_timesteps", 1000)?;
    if steps < 2 {
        return Err(keys.invalid("num_train_timesteps", "an integer of at least 2", &Value::from(steps)));
    }
    let schedule = keys.choice(
        "beta_schedule",
        defaults.beta_schedule,
        &[
            ("linear", BetaSchedule::Linear),
            ("scaled_linear", BetaSchedule::ScaledLinear),
            ("squaredcos_cap_v2", BetaSchedule::SquaredCos),
        ],
    )?;
    let start = keys.f64("beta_start", defaults.beta_start)?;
    let end = keys.f64("beta_end", defaults.beta_end)?;
    let mut betas = match (keys.trained_betas()?, schedule) {
        (Some(betas), _) if betas.len() != steps => {
            let found = Value::from(format!("{} values", betas.len()));
            return Err(keys.invalid("trained_betas", "as many values as num_train_timesteps", &found));
        }
        (Some(betas), _) => betas,
        (None, BetaSchedule::Linear) => torch_linspace(start, end, steps),
        (None, BetaSchedule::ScaledLinear) => torch_linspace(start.sqrt(), end.sqrt(), steps)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        (None, BetaSchedule::SquaredCos) => betas_for_alpha_bar(steps),
    };
    if keys.bool("rescale_betas_zero_snr", false)? {
        betas = rescale_zero_terminal_snr(&betas);
    }
    Ok(cumprod(betas.iter().map(|b| 1.0 - b)))
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: each half is a fused
/// multiply-add from its own end.
fn torch_linspace(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of float32 values: a float64 running product, rounded to float32 at each output.
fn cumprod(alphas: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut product = 1.0f64;
    alphas
        .map(|a| {
            product *= f64::from(a);
            product as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine, max_beta 0.999): Python floats, then float32.
fn betas_for_alpha_bar(steps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..steps)
        .map(|i| {
            let (t1, t2) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in torch float32 operations.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt: Vec<f32> = cumprod(betas.iter().map(|b| 1.0 - b))
        .iter()
        .map(|a| a.sqrt())
        .collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt.iter().map(|s| (s - last) * scale).map(|s| s * s).collect();
    let alphas = std::iter::once(bar[0]).chain(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.map(|a| 1.0 - a).collect()
}
