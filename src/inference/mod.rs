//! Everything between a parsed request and an RGB result.
//!
//! - [`manifest`]: what a model is (files, tensors, limits), read from `models/<name>/manifest.toml`.
//! - [`registry`]: the models this worker serves; turns a request into a [`Prepared`] input.
//! - [`runtime`]: ONNX Runtime, the execution provider (CPU or CUDA, never a silent fallback).
//! - [`engine`]: the dedicated inference thread that owns every session.
//! - [`batcher`]: which waiting requests run together, and which go first (tiers by weight).
//! - [`style_bank`], [`arbitrary_style`]: the two pipeline kinds.
//!
//! Preparation ([`ModelRegistry::prepare`]) and finishing ([`Finish::apply`]) are CPU work for
//! blocking threads; only the model run happens on the inference thread.

pub mod arbitrary_style;
pub mod batcher;
pub mod engine;
pub mod manifest;
pub mod registry;
pub mod runtime;
pub mod style_bank;

use image::RgbImage;

pub use batcher::{BatchKey, BatchLimits};
pub use engine::{EngineOptions, EngineSnapshot, InferenceEngine, InferenceError, InferenceHandle, JobOptions};
pub use manifest::Manifest;
pub use registry::ModelRegistry;
pub use runtime::{ActiveProvider, Runtime, StartupError};

use crate::domain::{ErrorCode, GenerationRequest, RequestError};
use crate::imaging::{resize_rgb, tensor, Layout, ValueRange};
use manifest::ModelLimits;

/// A request made ready for its model: the tensors, and what turns the output into the result.
#[derive(Debug)]
pub struct Prepared {
    /// Goes to the inference thread.
    pub input: ModelInput,
    /// Stays with the request until the output comes back.
    pub finish: Finish,
}

/// Model inputs, by pipeline kind.
#[derive(Debug)]
pub enum ModelInput {
    /// For a `style_bank` model.
    StyleBank(style_bank::StyleBankInput),
    /// For an `arbitrary_style` model.
    ArbitraryStyle(arbitrary_style::ArbitraryStyleInput),
}

impl ModelInput {
    /// The tensor size of this input (width, height): requests batch together only when equal.
    pub fn shape(&self) -> (u32, u32) {
        match self {
            Self::StyleBank(i) => (i.width, i.height),
            Self::ArbitraryStyle(i) => {
                let side = (i.content.len() / 3).isqrt() as u32;
                (side, side)
            }
        }
    }
}

/// How one output tensor becomes the result image.
#[derive(Debug)]
pub struct Finish {
    /// Output tensor width.
    pub tensor_width: u32,
    /// Output tensor height.
    pub tensor_height: u32,
    /// Output tensor layout.
    pub layout: Layout,
    /// Output value range.
    pub value_range: ValueRange,
    /// The top-left region of the tensor that holds the picture (the rest is padding).
    pub crop: (u32, u32),
    /// Final size; the crop is resized to it when they differ.
    pub output: (u32, u32),
    /// The network's input picture and the strength to mix the result with it.
    pub blend: Option<(RgbImage, f32)>,
}

impl Finish {
    /// Turn one output sample into the result image.
    pub fn apply(self, output: &[f32]) -> RgbImage {
        let image = tensor::tensor_to_image(
            output,
            (self.tensor_width, self.tensor_height),
            self.layout,
            self.value_range,
            self.crop,
            self.blend.as_ref().map(|(img, s)| (img, *s)),
        );
        if image.dimensions() == self.output {
            return image;
        }
        resize_rgb(&image, self.output.0, self.output.1)
    }
}

/// The output size for a request, with the worker's own cap (overload) applied when it has one.
fn request_output_size(
    limits: &ModelLimits,
    request: &GenerationRequest,
    dims: (u32, u32),
) -> Result<(u32, u32), RequestError> {
    let size = request.params.size;
    let size = match request.size_cap {
        // An invalid `size` stays invalid: the cap never turns a refusal into an image.
        Some(cap) if size.is_none_or(|s| s <= limits.max_side) => {
            let natural = size.unwrap_or_else(|| dims.0.max(dims.1).min(limits.default_max_side));
            Some(natural.min(cap).max(limits.min_side))
        }
        _ => size,
    };
    output_size(limits, size, dims)
}

/// The output size for a request: `size` as the longer side (checked against the model's limits),
/// or the input's own size capped at `default_max_side`.
fn output_size(
    limits: &ModelLimits,
    size: Option<u32>,
    (width, height): (u32, u32),
) -> Result<(u32, u32), RequestError> {
    let long = match size {
        Some(s) if s < limits.min_side || s > limits.max_side => {
            return Err(RequestError::new(
                ErrorCode::InvalidParams,
                format!(
                    "size must be between {} and {}, got {s}",
                    limits.min_side, limits.max_side
                ),
            ))
        }
        Some(s) => s,
        None => width.max(height).min(limits.default_max_side),
    };
    if long == width.max(height) {
        return Ok((width, height));
    }
    let (w, h) = crate::imaging::fit_long_side(width, height, long);
    if w.min(h) < limits.min_side {
        return Err(RequestError::new(
            ErrorCode::InvalidParams,
            format!(
                "at size {long} the {width}x{height} image would be {w}x{h}, under the minimum side of {}",
                limits.min_side
            ),
        ));
    }
    Ok((w, h))
}

/// Check that a session has the inputs and outputs a manifest names.
fn check_names(session: &ort::session::Session, inputs: &[&str], outputs: &[&str]) -> anyhow::Result<()> {
    for name in inputs {
        if !session.inputs().iter().any(|i| i.name() == *name) {
            let have: Vec<_> = session.inputs().iter().map(|i| i.name().to_owned()).collect();
            anyhow::bail!("the model has no input {name:?} (it has {have:?})");
        }
    }
    for name in outputs {
        if !session.outputs().iter().any(|o| o.name() == *name) {
            let have: Vec<_> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
            anyhow::bail!("the model has no output {name:?} (it has {have:?})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ModelLimits = ModelLimits {
        min_side: 32,
        max_side: 2048,
        default_max_side: 1024,
        multiple_of: 4,
        max_input_bytes: 1,
        max_input_side: 1,
        max_input_pixels: 1,
    };

    #[test]
    fn output_size_defaults_to_the_input_capped() {
        assert_eq!(output_size(&LIMITS, None, (600, 400)).unwrap(), (600, 400));
        assert_eq!(output_size(&LIMITS, None, (3000, 1500)).unwrap(), (1024, 512));
        assert_eq!(output_size(&LIMITS, Some(300), (600, 400)).unwrap(), (300, 200));
        assert_eq!(output_size(&LIMITS, Some(1200), (600, 400)).unwrap(), (1200, 800));
    }

    #[test]
    fn output_size_refuses_what_the_model_cannot_do() {
        let code = |size, dims| output_size(&LIMITS, size, dims).unwrap_err().code;
        assert_eq!(code(Some(4096), (600, 400)), ErrorCode::InvalidParams);
        assert_eq!(code(Some(16), (600, 400)), ErrorCode::InvalidParams);
        assert_eq!(code(Some(64), (2000, 100)), ErrorCode::InvalidParams);
    }
}
