//! The `diffusion` pipeline: Stable Diffusion ONNX folders as `optimum` exports them (SD 1.x/2.x,
//! turbo and LCM-distilled models of that layout, InstructPix2Pix edit models), serving
//! `text_to_image`, `image_to_image` and `edit`.
//!
//! - [`model`]: the manifest section and what is read from the folder (tasks, size multiple,
//!   tokenizer, scheduler configuration);
//! - [`plan`]: a request checked against the model, defaults filled in (no decoding: admission
//!   prices it from this);
//! - this file: [`Pipeline`] (check, prepare on the CPU pool: tokenize, draw the seed, decode and
//!   lay out the input image);
//! - [`runner`]: the sessions and the denoising loop on the inference thread.
//!
//! The numerics that need no ONNX Runtime (tokenizer, schedulers, torch's generator) are in
//! [`crate::diffusion`].

pub mod model;
pub mod plan;
pub mod runner;

use std::sync::Arc;

use crate::domain::{GenerationInfo, GenerationRequest, RequestError, Task, Truncation, Work};
use crate::imaging::{decode_rgb, resize_rgb, tensor, Layout, ValueRange};
use crate::inference::finish::Finish;
use crate::inference::manifest::Manifest;
use crate::inference::pipeline::{ModelInput, Pipeline, Prepared, Runner};
use crate::inference::runtime::Runtime;
pub use model::{DiffusionModel, DiffusionSpec};
use plan::{plan, Plan};
pub use runner::DiffusionRunner;

/// Images go in and come out of the VAE as `[-1, 1]`.
const VAE_RANGE: ValueRange = ValueRange { low: -1.0, high: 1.0 };

/// One request, ready for the inference thread.
#[derive(Debug, Clone)]
pub struct DiffusionInput {
    /// What to run.
    pub plan: Plan,
    /// The noise's seed.
    pub seed: u32,
    /// The prompt's token ids, padded to the encoder's length.
    pub prompt_ids: Vec<i64>,
    /// The negative prompt's (empty when none): the unconditional rows.
    pub negative_ids: Vec<i64>,
    /// `image_to_image` and `edit`: the input image `[3, H, W]` in `[-1, 1]`, at the plan's size.
    pub image: Option<Vec<f32>>,
}

impl Pipeline for DiffusionSpec {
    fn check(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Work, RequestError> {
        Ok(plan(manifest, self.model(), request)?.work())
    }

    fn output_size(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<(u32, u32), RequestError> {
        let plan = plan(manifest, self.model(), request)?;
        Ok((plan.width, plan.height))
    }

    fn planned_steps(&self, manifest: &Manifest, request: &GenerationRequest) -> Option<u32> {
        plan(manifest, self.model(), request).ok().map(|plan| plan.steps)
    }

    fn prepare(&self, manifest: &Manifest, request: &GenerationRequest) -> Result<Prepared, RequestError> {
        let model = self.model();
        let plan = plan(manifest, model, request)?;
        let g = &request.params.generation;
        let seed = g.seed.unwrap_or_else(rand_seed);
        let prompt = model.tokenizer.encode(g.prompt.as_deref().unwrap_or_default());
        let negative = model.tokenizer.encode(g.negative_prompt.as_deref().unwrap_or_default());
        let image = match (plan.task.takes_image(), request.image.as_deref()) {
            (true, Some(bytes)) => {
                let photo = decode_rgb(bytes, &manifest.limits.decode_limits(), "image")?;
                let photo = resize_rgb(&photo, plan.width, plan.height);
                let mut t = vec![0.0; 3 * plan.width as usize * plan.height as usize];
                tensor::write_tensor(&photo, plan.width, plan.height, Layout::Nchw, VAE_RANGE, &mut t);
                Some(t)
            }
            _ => None,
        };
        let truncation = |e: &crate::diffusion::tokenizer::Encoded| {
            e.truncated.then(|| Truncation {
                tokens_used: e.tokens_used as u32,
                tokens_dropped: e.tokens_dropped as u32,
                text_used: model.tokenizer.decode(&e.ids),
            })
        };
        let guided_negative = plan.rows > 1;
        let generation = GenerationInfo {
            task: plan.task,
            scheduler: plan.scheduler.as_str().to_owned(),
            seed,
            steps: plan.steps,
            steps_run: plan.steps_run(),
            guidance_scale: plan.guidance_scale,
            image_guidance_scale: plan.image_guidance_scale,
            prompt_truncated: truncation(&prompt),
            negative_prompt_truncated: if guided_negative { truncation(&negative) } else { None },
        };
        let (width, height) = (plan.width, plan.height);
        let group = plan.batch_group();
        let steps = plan.steps_run();
        Ok(Prepared {
            input: ModelInput::new(
                (width, height),
                DiffusionInput {
                    plan,
                    seed,
                    prompt_ids: prompt.ids,
                    negative_ids: negative.ids,
                    image,
                },
            )
            .with_group(group)
            .with_steps(steps),
            finish: Finish {
                tensor_width: width,
                tensor_height: height,
                layout: Layout::Nchw,
                value_range: VAE_RANGE,
                crop: (width, height),
                output: (width, height),
                blend: None,
            },
            generation: Some(generation),
        })
    }

    fn load(&self, manifest: &Manifest, runtime: &Runtime) -> anyhow::Result<Box<dyn Runner>> {
        let model = Arc::clone(self.model.as_ref().expect("the folder was read"));
        let f = &model.files;
        let vae_encoder = f.vae_encoder.as_deref().map(|p| runtime.session(p)).transpose()?;
        Ok(Box::new(DiffusionRunner::new(
            &manifest.name,
            runtime.session(&f.text_encoder)?,
            runtime.session(&f.unet)?,
            runtime.session(&f.vae_decoder)?,
            vae_encoder,
            model,
        )?))
    }

    fn batches(&self) -> bool {
        true
    }

    /// One guided step of text-to-image (or edit, for an edit model) at the smallest size.
    fn warmup_input(&self, manifest: &Manifest) -> ModelInput {
        let model = self.model();
        let side = manifest.limits.min_side;
        let task = model.tasks[0];
        let rows = if model.time_cond_proj_dim.is_some() {
            1
        } else if task == Task::Edit {
            3
        } else {
            2
        };
        let plan = Plan {
            task,
            scheduler: model.default_scheduler,
            steps: 1,
            start: 0,
            guidance_scale: 2.0,
            image_guidance_scale: (task == Task::Edit).then_some(1.5),
            strength: None,
            width: side,
            height: side,
            rows,
        };
        let ids = model.tokenizer.encode("warm up").ids;
        let input = DiffusionInput {
            image: (task == Task::Edit).then(|| vec![0.0; 3 * side as usize * side as usize]),
            negative_ids: model.tokenizer.encode("").ids,
            prompt_ids: ids,
            seed: 0,
            plan,
        };
        let group = input.plan.batch_group();
        ModelInput::new((side, side), input).with_group(group)
    }
}

/// A seed for a request that gave none: random, and reported in the reply.
fn rand_seed() -> u32 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}
