//! The `style_bank` pipeline (the default model, `multistyle26`): one network, a bank of learned
//! styles, a weight vector per sample that selects or blends them.
//!
//! Pre-processing and post-processing run on blocking threads; only [`StyleBankRunner::run`] runs
//! on the inference thread.

use ort::session::{IoBinding, Session};
use ort::value::TensorRef;

use super::photo;
use crate::domain::{ErrorCode, GenerationRequest, RequestError, StyleChoice, Work};
use crate::imaging::{decode_rgb, resize_rgb, tensor};
use crate::inference::finish::Finish;
use crate::inference::manifest::{Manifest, StyleBankSpec};
use crate::inference::output_size::request_output_size;
use crate::inference::pipeline::{inputs_of, ModelInput, Pipeline, Prepared, Runner};
use crate::inference::runtime::{check_names, Runtime};
use crate::inference::tensor_io::{BoundIo, TensorIo};

/// One sample, ready for the network.
#[derive(Debug)]
pub struct StyleBankInput {
    /// `3 × height × width` values in the manifest's layout.
    pub image: Vec<f32>,
    /// One weight per style, summing to 1.
    pub weights: Vec<f32>,
    /// Tensor width (padded).
    pub width: u32,
    /// Tensor height (padded).
    pub height: u32,
}

impl Pipeline for StyleBankSpec {
    fn check(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Work, RequestError> {
        check(manifest, self, request)?;
        photo::work(manifest, request)
    }

    fn output_size(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<(u32, u32), RequestError> {
        photo::output_size(manifest, request)
    }

    fn prepare(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Prepared, RequestError> {
        prepare(manifest, self, request)
    }

    fn load(&self, manifest: &Manifest, runtime: &Runtime) -> anyhow::Result<Box<dyn Runner>> {
        let session = runtime.session(&manifest.dir.join(&self.file))?;
        Ok(Box::new(StyleBankRunner::new(
            session,
            self.clone(),
            runtime.tensor_io(),
        )?))
    }

    fn batches(&self) -> bool {
        true
    }

    fn warmup_input(&self, manifest: &Manifest) -> ModelInput {
        let side = manifest
            .limits
            .min_side
            .max(64)
            .next_multiple_of(manifest.limits.multiple_of);
        let mut weights = vec![0.0; self.styles];
        weights[0] = 1.0;
        let input = StyleBankInput {
            image: vec![0.5; 3 * side as usize * side as usize],
            weights,
            width: side,
            height: side,
        };
        ModelInput::new((side, side), input)
    }
}

/// Decode, check, resize and lay out one request for a style bank model.
fn prepare(manifest: &Manifest, spec: &StyleBankSpec, request: &GenerationRequest) -> Result<Prepared, RequestError> {
    let weights = check(manifest, spec, request)?;
    let params = &request.params;
    let limits = &manifest.limits;
    let photo = decode_rgb(photo::photo(manifest, request)?, &limits.decode_limits(), "image")?;
    let (width, height) = request_output_size(limits, request, photo.dimensions())?;
    let photo = resize_rgb(&photo, width, height);

    // Padded up to the shape bucket, so that requests of nearby sizes share a batch (the padding
    // is reflected picture, cropped off afterwards).
    let bucket = manifest.shape_bucket.max(limits.multiple_of);
    let (tensor_w, tensor_h) = (round_up(width, bucket), round_up(height, bucket));
    let mut image = vec![0.0; 3 * tensor_w as usize * tensor_h as usize];
    tensor::write_tensor(&photo, tensor_w, tensor_h, spec.layout, spec.value_range, &mut image);

    let strength = params.strength.unwrap_or(1.0) as f32;
    Ok(Prepared {
        input: ModelInput::new(
            (tensor_w, tensor_h),
            StyleBankInput {
                image,
                weights,
                width: tensor_w,
                height: tensor_h,
            },
        ),
        finish: Finish {
            tensor_width: tensor_w,
            tensor_height: tensor_h,
            layout: spec.layout,
            value_range: spec.value_range,
            crop: (width, height),
            output: (width, height),
            blend: (strength < 1.0).then_some((photo, strength)),
        },
        generation: None,
    })
}

/// The checks that need no decoding: parameters this model takes, a valid style. Returns the
/// style weights.
fn check(manifest: &Manifest, spec: &StyleBankSpec, request: &GenerationRequest) -> Result<Vec<f32>, RequestError> {
    if request.params.style_image.is_some() {
        return Err(RequestError::new(
            ErrorCode::InvalidParams,
            format!(
                "{} does not take style_image; choose a built-in style with `style`",
                manifest.name
            ),
        ));
    }
    style_weights(request.params.style.as_ref(), spec.styles)
}

fn round_up(value: u32, multiple: u32) -> u32 {
    value.div_ceil(multiple) * multiple
}

/// The weight vector for a style choice: one-hot for a single style, normalised for a blend.
fn style_weights(choice: Option<&StyleChoice>, styles: usize) -> Result<Vec<f32>, RequestError> {
    let check = |index: i64| -> Result<usize, RequestError> {
        usize::try_from(index).ok().filter(|&i| i < styles).ok_or_else(|| {
            RequestError::new(
                ErrorCode::UnknownStyle,
                format!("style {index} does not exist; styles are 0 to {}", styles - 1),
            )
        })
    };
    let mut weights = vec![0.0_f64; styles];
    match choice {
        None => weights[0] = 1.0,
        Some(StyleChoice::Single(index)) => weights[check(*index)?] = 1.0,
        Some(StyleChoice::Blend(pairs)) => {
            for &(index, weight) in pairs {
                weights[check(index)?] += weight;
            }
        }
    }
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return Err(RequestError::new(
            ErrorCode::InvalidParams,
            "style weights must not all be zero",
        ));
    }
    Ok(weights.into_iter().map(|w| (w / total) as f32).collect())
}

/// Owns the session of a style bank model, on the inference thread.
pub struct StyleBankRunner {
    session: Session,
    spec: StyleBankSpec,
    bound: Option<BoundIo>,
}

impl Runner for StyleBankRunner {
    fn run(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String> {
        StyleBankRunner::run(self, &inputs_of::<StyleBankInput>(inputs)?)
    }
}

impl StyleBankRunner {
    /// Wrap a session built from the manifest's file, checking it has the tensors the manifest names.
    pub fn new(session: Session, spec: StyleBankSpec, io: TensorIo) -> anyhow::Result<Self> {
        check_names(&session, &[&spec.image_input, &spec.weights_input], &[&spec.output])?;
        let bound = match io {
            TensorIo::Views => None,
            TensorIo::Bound { pinned } => Some(BoundIo::new(&session, pinned).map_err(|e| match pinned {
                Some(gpu) => anyhow::anyhow!(
                    "inference.cuda.pinned_io: cannot allocate tensors in pinned memory of GPU {gpu}: {e}"
                ),
                None => anyhow::anyhow!("cannot allocate tensors with ONNX Runtime's CPU allocator: {e}"),
            })?),
        };
        Ok(Self { session, spec, bound })
    }

    /// Run a batch of samples of the same tensor size; returns one output per sample.
    pub fn run(&mut self, batch: &[&StyleBankInput]) -> Result<Vec<Vec<f32>>, String> {
        let first = batch.first().ok_or("empty batch")?;
        let (w, h) = (first.width as usize, first.height as usize);
        if batch.iter().any(|s| (s.width as usize, s.height as usize) != (w, h)) {
            return Err("a batch must share one tensor size".into());
        }
        if batch
            .iter()
            .any(|s| s.image.len() != 3 * w * h || s.weights.len() != self.spec.styles)
        {
            return Err(format!(
                "a sample does not hold 3x{h}x{w} values and {} style weights",
                self.spec.styles
            ));
        }
        let n = batch.len();
        let image_shape = match self.spec.layout {
            crate::imaging::Layout::Nchw => [n, 3, h, w],
            crate::imaging::Layout::Nhwc => [n, h, w, 3],
        };
        let weights_shape = [n, self.spec.styles];
        let e = |e: ort::Error| e.to_string();
        let (images, weights, binding);
        let outputs = match &self.bound {
            // The batch concatenated into kiln's buffers, run on views of them.
            None => {
                images = batch.iter().map(|s| s.image.as_slice()).collect::<Vec<_>>().concat();
                weights = batch.iter().map(|s| s.weights.as_slice()).collect::<Vec<_>>().concat();
                self.session
                    .run(ort::inputs![
                        self.spec.image_input.as_str() => TensorRef::from_array_view((image_shape, images.as_slice())).map_err(e)?,
                        self.spec.weights_input.as_str() => TensorRef::from_array_view((weights_shape, weights.as_slice())).map_err(e)?,
                    ])
                    .map_err(e)?
            }
            // The batch written into ONNX Runtime's tensors, the output bound to the same memory.
            Some(io) => {
                let image = io.tensor(&image_shape, batch.iter().map(|s| s.image.as_slice()));
                let weights = io.tensor(&weights_shape, batch.iter().map(|s| s.weights.as_slice()));
                let bind = || -> ort::Result<IoBinding> {
                    let mut binding = self.session.create_binding()?;
                    binding.bind_input(self.spec.image_input.as_str(), &image?)?;
                    binding.bind_input(self.spec.weights_input.as_str(), &weights?)?;
                    binding.bind_output_to_device(self.spec.output.as_str(), io.output())?;
                    Ok(binding)
                };
                binding = bind().map_err(e)?;
                self.session.run_binding(&binding).map_err(e)?
            }
        };
        let data = outputs[self.spec.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(e)?
            .1;
        let sample = 3 * w * h;
        if data.len() != n * sample {
            return Err(format!(
                "the model returned {} values for {n} samples of {w}x{h}",
                data.len()
            ));
        }
        Ok(data.chunks_exact(sample).map(<[f32]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_for_single_styles_and_blends() {
        assert_eq!(style_weights(None, 3).unwrap(), vec![1.0, 0.0, 0.0]);
        assert_eq!(
            style_weights(Some(&StyleChoice::Single(2)), 3).unwrap(),
            vec![0.0, 0.0, 1.0]
        );
        let blend = StyleChoice::Blend(vec![(0, 1.0), (2, 3.0)]);
        assert_eq!(style_weights(Some(&blend), 3).unwrap(), vec![0.25, 0.0, 0.75]);
    }

    #[test]
    fn bad_styles_have_their_own_codes() {
        let code = |c: StyleChoice| style_weights(Some(&c), 26).unwrap_err().code;
        assert_eq!(code(StyleChoice::Single(26)), ErrorCode::UnknownStyle);
        assert_eq!(code(StyleChoice::Single(-1)), ErrorCode::UnknownStyle);
        assert_eq!(code(StyleChoice::Blend(vec![(30, 1.0)])), ErrorCode::UnknownStyle);
        assert_eq!(code(StyleChoice::Blend(vec![(3, 0.0)])), ErrorCode::InvalidParams);
        assert_eq!(code(StyleChoice::Blend(vec![])), ErrorCode::InvalidParams);
    }
}
