//! Inference timesteps and interpolated sigmas, with numpy 2's arithmetic (`linspace`, float `arange`,
//! round-half-to-even, `interp`), which diffusers uses to build its schedules.

use super::config::Spacing;

/// `numpy.linspace(start, stop, num, endpoint)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let step = delta / div as f64;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            let i = i as f64;
            match div {
                0 => i * delta,
                _ if step == 0.0 => i / div as f64 * delta,
                _ => i * step,
            }
        })
        .map(|v| v + start)
        .collect();
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `numpy.arange(start, stop, step)` in float64: `start`, `start + step`, then `start + i * delta`
/// with `delta` the difference of the first two.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The spacing arithmetic shared by Euler, Euler ancestral and DDIM, before each casts to its dtype:
/// float64 values, in the descending order of diffusers' `scheduler.timesteps`.
fn spaced(spacing: Spacing, train_steps: usize, steps: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let mut t = np_linspace(0.0, (train_steps - 1) as f64, steps, true);
            t.reverse();
            t
        }
        Spacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            np_arange(train_steps as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// Euler's and Euler ancestral's float32 timesteps (`np.linspace(..., dtype=np.float32)`, or rounded
/// integers cast to float32, plus `steps_offset` for "leading").
pub(crate) fn float_timesteps(spacing: Spacing, train_steps: usize, steps: usize, steps_offset: usize) -> Vec<f32> {
    spaced(spacing, train_steps, steps, steps_offset)
        .into_iter()
        .map(|t| t as f32)
        .collect()
}

/// DDIM's integer timesteps ("linspace" is rounded half to even, as `ndarray.round` does).
pub(crate) fn integer_timesteps(spacing: Spacing, train_steps: usize, steps: usize, steps_offset: usize) -> Vec<i64> {
    spaced(spacing, train_steps, steps, steps_offset)
        .into_iter()
        .map(|t| t.round_ties_even() as i64)
        .collect()
}

/// `np.interp(timesteps, np.arange(len(sigmas)), sigmas)` with `sigmas = ((1 - ᾱ) / ᾱ) ** 0.5` in float32:
/// Euler's sigma at each (possibly fractional) timestep, in float64.
pub(crate) fn interpolated_sigmas(alphas_cumprod: &[f32], timesteps: &[f32]) -> Vec<f64> {
    let sigmas: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| f64::from(((1.0 - a) / a).sqrt()))
        .collect();
    let last = sigmas.len() - 1;
    timesteps
        .iter()
        .map(|&t| {
            let x = f64::from(t);
            if x <= 0.0 {
                return sigmas[0];
            }
            if x >= last as f64 {
                return sigmas[last];
            }
            let j = x.floor() as usize;
            if j as f64 == x {
                return sigmas[j];
            }
            let slope = (sigmas[j + 1] - sigmas[j]) / 1.0;
            slope * (x - j as f64) + sigmas[j]
        })
        .collect()
}
