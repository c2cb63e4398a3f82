//! A diffusion request resolved against its model: every parameter checked (each bad one a clear
//! error code, before anything is charged) and every default filled in. Needs no decoding: the
//! input image's header gives its size.

use crate::diffusion::scheduler::{img2img_start, SchedulerKind};
use crate::domain::{ErrorCode, GenerationRequest, RequestError, Task, Work};
use crate::inference::manifest::{Manifest, ModelLimits};

use super::model::DiffusionModel;

/// What will be run for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The task.
    pub task: Task,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// Steps asked for (or the model's default), at most the worker's overload cap: the scheduler's
    /// timesteps are set for this many.
    pub steps: u32,
    /// The first step run: 0, or for `image_to_image` `steps − ⌊steps × strength⌋`.
    pub start: u32,
    /// Text guidance (≤ 1: none).
    pub guidance_scale: f32,
    /// `edit`: image guidance.
    pub image_guidance_scale: Option<f32>,
    /// `image_to_image`: how far the image is noised.
    pub strength: Option<f64>,
    /// The image's size, a multiple of the model's on each side.
    pub width: u32,
    /// See `width`.
    pub height: u32,
    /// Rows of the denoising network per step: 2 with classifier-free guidance (unconditional and
    /// conditional), 3 for a guided edit (text, image, unconditional), else 1.
    pub rows: u32,
}

impl Plan {
    /// Steps the denoising loop runs.
    pub fn steps_run(&self) -> u32 {
        self.steps - self.start
    }

    /// The work this asks of the device, its price.
    pub fn work(&self) -> Work {
        Work {
            pixels: u64::from(self.width) * u64::from(self.height),
            denoising_evaluations: Some(u64::from(self.steps_run()) * u64::from(self.rows)),
        }
    }

    /// Requests batch together only with equal scheduler, steps and first step (they share the
    /// timesteps of every network call); shape and model are the batcher's own key.
    pub fn batch_group(&self) -> u64 {
        (self.scheduler as u64) << 48 | u64::from(self.steps) << 24 | u64::from(self.start)
    }
}

/// Longest prompt taken, in bytes: far more than the text encoder reads (77 tokens), little enough
/// that tokenizing it (quadratic in a word's length) stays cheap.
pub const MAX_PROMPT_BYTES: usize = 4096;

fn invalid(message: String) -> RequestError {
    RequestError::new(ErrorCode::InvalidParams, message)
}

/// Check a request against a diffusion model and fill in the defaults.
pub fn plan(manifest: &Manifest, model: &DiffusionModel, request: &GenerationRequest) -> Result<Plan, RequestError> {
    let name = &manifest.name;
    let params = &request.params;
    let g = &params.generation;
    for (field, given) in [
        ("style", params.style.is_some()),
        ("style_image", params.style_image.is_some()),
        ("size", params.size.is_some()),
    ] {
        if given {
            return Err(invalid(format!(
                "{name} is a diffusion model and takes no `{field}`; give width and height"
            )));
        }
    }
    // Without a task: the model's first task that takes what was sent (an image or not).
    let task = g.task.unwrap_or_else(|| {
        let sent_image = request.image.is_some();
        model
            .tasks
            .iter()
            .copied()
            .find(|t| t.takes_image() == sent_image)
            .unwrap_or(model.tasks[0])
    });
    if !model.tasks.contains(&task) {
        let tasks: Vec<&str> = model.tasks.iter().map(|t| t.as_str()).collect();
        return Err(RequestError::new(
            ErrorCode::UnsupportedTask,
            format!("{name} does not do {task}; it does {}", tasks.join(", ")),
        ));
    }
    match (task.takes_image(), &request.image) {
        (true, None) => {
            return Err(RequestError::new(
                ErrorCode::InvalidImage,
                format!("task {task} needs an `image` to start from"),
            ))
        }
        (false, Some(_)) => {
            return Err(invalid(format!(
                "task {task} takes no `image`; to start from a picture use task image_to_image{}",
                if model.tasks.contains(&Task::Edit) {
                    " or edit"
                } else {
                    ""
                }
            )))
        }
        _ => {}
    }
    match g.prompt.as_deref() {
        None => {
            return Err(RequestError::new(
                ErrorCode::InvalidPrompt,
                format!("task {task} needs a `prompt`"),
            ))
        }
        Some(p) if p.trim().is_empty() => {
            return Err(RequestError::new(ErrorCode::InvalidPrompt, "the prompt is empty"))
        }
        Some(_) => {}
    }
    for (field, text) in [("prompt", &g.prompt), ("negative_prompt", &g.negative_prompt)] {
        if let Some(text) = text.as_deref().filter(|t| t.len() > MAX_PROMPT_BYTES) {
            return Err(RequestError::new(
                ErrorCode::InvalidPrompt,
                format!(
                    "the {field} is {} bytes; the most is {MAX_PROMPT_BYTES} (the text encoder reads {} tokens, a few hundred characters)",
                    text.len(),
                    model.tokenizer.max_length()
                ),
            ));
        }
    }

    let scheduler = match g.scheduler.as_deref() {
        None => model.default_scheduler,
        Some(name_given) => {
            let allowed: Vec<&str> = model.schedulers.iter().map(|k| k.as_str()).collect();
            let kind = name_given.parse::<SchedulerKind>().map_err(|_| {
                RequestError::new(
                    ErrorCode::UnknownScheduler,
                    format!("unknown scheduler {name_given:?}; {name} allows {}", allowed.join(", ")),
                )
            })?;
            if !model.schedulers.contains(&kind) {
                return Err(RequestError::new(
                    ErrorCode::UnknownScheduler,
                    format!(
                        "{name} does not allow scheduler {name_given}; it allows {}",
                        allowed.join(", ")
                    ),
                ));
            }
            kind
        }
    };
    let steps = g.steps.unwrap_or(model.default_steps);
    if !(1..=model.max_steps).contains(&steps) {
        return Err(invalid(format!(
            "steps must be between 1 and {} for {name}, got {steps}",
            model.max_steps
        )));
    }
    // The worker's overload cap (never the producer's): the schedule is set for fewer steps, as if
    // they had been asked for, so an image-to-image start follows from strength on the cut count.
    let steps = request.steps_cap.map_or(steps, |cap| steps.min(cap.max(1)));
    let guidance_scale = g.guidance_scale.unwrap_or(model.default_guidance_scale);
    if guidance_scale > model.max_guidance_scale {
        return Err(invalid(format!(
            "guidance_scale must be between 0 and {} for {name}, got {guidance_scale}",
            model.max_guidance_scale
        )));
    }
    let image_guidance_scale = match (task, g.image_guidance_scale) {
        (Task::Edit, given) => {
            let s = given.unwrap_or(model.default_image_guidance_scale);
            if s > model.max_guidance_scale {
                return Err(invalid(format!(
                    "image_guidance_scale must be between 0 and {} for {name}, got {s}",
                    model.max_guidance_scale
                )));
            }
            Some(s)
        }
        (_, Some(_)) => return Err(invalid(format!("image_guidance_scale is for task edit, not {task}"))),
        (_, None) => None,
    };
    let (strength, start) = match (task, params.strength) {
        (Task::ImageToImage, given) => {
            let s = given.unwrap_or(model.default_strength);
            let start = img2img_start(steps as usize, s).min(steps as usize) as u32;
            if s <= 0.0 || start >= steps {
                return Err(invalid(format!(
                    "at strength {s} and {steps} steps no step would run; raise strength or steps"
                )));
            }
            (Some(s), start)
        }
        (_, Some(_)) => return Err(invalid(format!("strength is for task image_to_image, not {task}"))),
        (_, None) => (None, 0),
    };

    let (width, height) = size(manifest, &manifest.limits, task, request)?;
    let rows = match task {
        _ if model.time_cond_proj_dim.is_some() => 1,
        Task::Edit if guidance_scale > 1.0 && image_guidance_scale.is_some_and(|s| s >= 1.0) => 3,
        Task::Edit => 1,
        _ if guidance_scale > 1.0 => 2,
        _ => 1,
    };
    Ok(Plan {
        task,
        scheduler,
        steps,
        start,
        guidance_scale,
        image_guidance_scale,
        strength,
        width,
        height,
        rows,
    })
}

/// The image's size: `width` × `height` as given (each a multiple of the model's, within its
/// sides), else the model's default side; for an input image without them, the image's own size
/// fitted to the default side and rounded down to the multiple. The worker's overload cap then
/// shrinks it (rounded down to the multiple, never below the smallest side).
fn size(
    manifest: &Manifest,
    limits: &ModelLimits,
    task: Task,
    request: &GenerationRequest,
) -> Result<(u32, u32), RequestError> {
    let g = &request.params.generation;
    let multiple = limits.multiple_of;
    for (field, value) in [("width", g.width), ("height", g.height)] {
        let Some(v) = value else { continue };
        if v % multiple != 0 || v < limits.min_side || v > limits.max_side {
            return Err(invalid(format!(
                "{field} must be a multiple of {multiple} from {} to {} for {}, got {v}",
                limits.min_side, limits.max_side, manifest.name
            )));
        }
    }
    let natural = match (task.takes_image(), request.image.as_deref()) {
        (true, Some(bytes)) => {
            let (w, h) = crate::imaging::probe_dimensions(bytes, &limits.decode_limits(), "image")?;
            let (w, h) = crate::imaging::fit_long_side(w, h, w.max(h).min(limits.default_max_side));
            (
                round_down(w, multiple, limits.min_side),
                round_down(h, multiple, limits.min_side),
            )
        }
        _ => (limits.default_max_side, limits.default_max_side),
    };
    let (width, height) = (g.width.unwrap_or(natural.0), g.height.unwrap_or(natural.1));
    match request.size_cap {
        Some(cap) if width.max(height) > cap => {
            let (w, h) = crate::imaging::fit_long_side(width, height, cap);
            Ok((
                round_down(w, multiple, limits.min_side),
                round_down(h, multiple, limits.min_side),
            ))
        }
        _ => Ok((width, height)),
    }
}

fn round_down(value: u32, multiple: u32, min: u32) -> u32 {
    (value / multiple * multiple).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::manifest::PipelineSpec;

    fn model(name: &str) -> Manifest {
        Manifest::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join(name),
        )
        .unwrap()
    }

    fn request(model: &str, params: serde_json::Value, image: bool) -> GenerationRequest {
        let mut doc = serde_json::json!({
            "version": 1, "request_id": "r", "user_id": "u", "model": model, "params": params,
        });
        if image {
            let png = std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/astronaut-crop-250x198.png"),
            )
            .unwrap();
            doc["image"] = serde_json::json!({"data": crate::domain::WireImage::from_bytes(&png).data});
        }
        GenerationRequest::parse(&serde_json::to_vec(&doc).unwrap(), usize::MAX).unwrap()
    }

    fn plan_of(manifest: &Manifest, request: &GenerationRequest) -> Result<Plan, RequestError> {
        let PipelineSpec::Diffusion(spec) = &manifest.pipeline else {
            panic!("a diffusion model")
        };
        plan(manifest, spec.model(), request)
    }

    #[test]
    fn the_task_follows_what_was_sent_and_defaults_come_from_the_folder() {
        let sd = model("sd-tiny-random");
        let p = plan_of(
            &sd,
            &request("sd-tiny-random", serde_json::json!({"prompt": "a cat"}), false),
        )
        .unwrap();
        assert_eq!(
            (p.task, p.scheduler, p.steps, p.start, p.rows),
            (Task::TextToImage, SchedulerKind::Euler, 10, 0, 2)
        );
        assert_eq!((p.width, p.height, p.guidance_scale), (64, 64, 7.5));
        let p = plan_of(
            &sd,
            &request("sd-tiny-random", serde_json::json!({"prompt": "a cat"}), true),
        )
        .unwrap();
        assert_eq!((p.task, p.strength, p.start), (Task::ImageToImage, Some(0.8), 2));
        assert_eq!(
            (p.width, p.height),
            (64, 48),
            "the photo's aspect, fitted and rounded to 16"
        );
        let edit = model("pix2pix-tiny-random");
        let p = plan_of(
            &edit,
            &request("pix2pix-tiny-random", serde_json::json!({"prompt": "snow"}), true),
        )
        .unwrap();
        assert_eq!((p.task, p.rows, p.image_guidance_scale), (Task::Edit, 3, Some(1.5)));
        // The edit model's scheduler file names Euler ancestral: its default.
        assert_eq!(p.scheduler, SchedulerKind::EulerAncestral);
        let lcm = model("lcm-tiny-random");
        let p = plan_of(
            &lcm,
            &request("lcm-tiny-random", serde_json::json!({"prompt": "a cat"}), false),
        )
        .unwrap();
        assert_eq!(
            (p.scheduler, p.steps, p.rows, p.guidance_scale),
            (SchedulerKind::Lcm, 4, 1, 8.5)
        );
    }

    #[test]
    fn cost_follows_pixels_steps_and_rows() {
        let sd = model("sd-tiny-random");
        let work = |params| plan_of(&sd, &request("sd-tiny-random", params, false)).unwrap().work();
        let guided = work(serde_json::json!({"prompt": "a", "steps": 20, "width": 128, "height": 64}));
        assert_eq!((guided.pixels, guided.denoising_evaluations), (128 * 64, Some(40)));
        let unguided = work(serde_json::json!({"prompt": "a", "steps": 20, "guidance_scale": 1.0}));
        assert_eq!(unguided.denoising_evaluations, Some(20));
        let i2i = plan_of(
            &sd,
            &request(
                "sd-tiny-random",
                serde_json::json!({"prompt": "a", "steps": 10, "strength": 0.6}),
                true,
            ),
        )
        .unwrap();
        assert_eq!((i2i.steps_run(), i2i.work().denoising_evaluations), (6, Some(12)));
    }

    #[test]
    fn an_overload_cap_renders_smaller_on_the_model_multiple() {
        let sd = model("sd-tiny-random");
        let mut r = request(
            "sd-tiny-random",
            serde_json::json!({"prompt": "a", "width": 256, "height": 192}),
            false,
        );
        r.size_cap = Some(100);
        let p = plan_of(&sd, &r).unwrap();
        assert_eq!((p.width, p.height), (96, 64), "100 × 75, each rounded down to 16");
        r.size_cap = Some(512);
        assert_eq!(
            plan_of(&sd, &r).unwrap().width,
            256,
            "a cap above the size changes nothing"
        );
    }

    #[test]
    fn an_overload_steps_cap_runs_fewer_steps_as_if_they_had_been_asked_for() {
        let sd = model("sd-tiny-random");
        let mut r = request("sd-tiny-random", serde_json::json!({"prompt": "a", "steps": 30}), false);
        r.steps_cap = Some(20);
        let p = plan_of(&sd, &r).unwrap();
        assert_eq!((p.steps, p.start, p.steps_run()), (20, 0, 20));
        assert_eq!(p.work().denoising_evaluations, Some(40), "priced at the steps it runs");
        let uncapped = request("sd-tiny-random", serde_json::json!({"prompt": "a", "steps": 20}), false);
        assert_eq!(
            p.batch_group(),
            plan_of(&sd, &uncapped).unwrap().batch_group(),
            "it batches with requests that asked for 20"
        );
        r.steps_cap = Some(40);
        assert_eq!(
            plan_of(&sd, &r).unwrap().steps,
            30,
            "a cap above the steps changes nothing"
        );
        // Without `steps`, the model's default (10) is what the cap weighs against.
        let mut r = request("sd-tiny-random", serde_json::json!({"prompt": "a"}), false);
        r.steps_cap = Some(4);
        assert_eq!(plan_of(&sd, &r).unwrap().steps, 4);

        // Image to image: the first step follows from strength on the cut count, as diffusers'
        // pipeline does with num_inference_steps = 20: ⌊20 × 0.6⌋ = 12 run, from step 8.
        let mut r = request(
            "sd-tiny-random",
            serde_json::json!({"prompt": "a", "steps": 30, "strength": 0.6}),
            true,
        );
        assert_eq!(plan_of(&sd, &r).unwrap().steps_run(), 18);
        r.steps_cap = Some(20);
        let p = plan_of(&sd, &r).unwrap();
        assert_eq!((p.steps, p.start, p.steps_run()), (20, 8, 12));
        // A cap so low that the strength leaves no step is refused like such a request would be.
        let mut r = request(
            "sd-tiny-random",
            serde_json::json!({"prompt": "a", "steps": 30, "strength": 0.3}),
            true,
        );
        r.steps_cap = Some(3);
        assert_eq!(plan_of(&sd, &r).unwrap_err().code, ErrorCode::InvalidParams);
    }

    #[test]
    fn batch_groups_part_schedules_not_prompts_or_guidance() {
        let sd = model("sd-tiny-random");
        let group = |params| {
            plan_of(&sd, &request("sd-tiny-random", params, false))
                .unwrap()
                .batch_group()
        };
        let base = group(serde_json::json!({"prompt": "a", "steps": 10}));
        assert_eq!(
            base,
            group(serde_json::json!({"prompt": "b", "steps": 10, "guidance_scale": 1.0, "seed": 3}))
        );
        assert_ne!(base, group(serde_json::json!({"prompt": "a", "steps": 11})));
        assert_ne!(
            base,
            group(serde_json::json!({"prompt": "a", "steps": 10, "scheduler": "ddim"}))
        );
    }
}
