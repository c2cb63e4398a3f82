//! Rendering an admitted request: preparation and finishing on the CPU pool, the model run in the
//! next batch that fits it on the inference thread.

use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;

use super::deadline::Deadline;
use super::settle::Failure;
use super::{ms, Services};
use crate::cancel::StopFlag;
use crate::domain::{GenerationInfo, GenerationRequest, ImageInfo, Timings};
use crate::imaging::encode_png;
use crate::inference::{InferenceError, JobOptions, StepProgress};
use tokio::sync::mpsc;

/// A rendered request.
#[derive(Debug)]
pub(super) struct Rendered {
    /// The PNG.
    pub png: Vec<u8>,
    /// What it is.
    pub info: ImageInfo,
    /// How many requests shared its model run.
    pub batch_size: usize,
    /// What a generative model did (task, seed, steps), for the reply.
    pub generation: Option<GenerationInfo>,
}

/// What the request's task shares with the inference thread while it renders.
#[derive(Debug, Default)]
pub(super) struct Watched {
    /// Set when it is cancelled or abandoned.
    pub stop: StopFlag,
    /// Where step progress goes, when the request asked for notices.
    pub progress: Option<mpsc::UnboundedSender<StepProgress>>,
}

/// The failure of a request stopped before it reached the device.
fn stopped(stop: &StopFlag) -> Result<(), Failure> {
    match stop.reason() {
        None => Ok(()),
        Some(reason) => Err(InferenceError::Stopped(reason).into()),
    }
}

/// Prepare (CPU pool), check the deadline again, infer (by `class`'s priority), finish and encode
/// (CPU pool). Fills in the timings of each stage it reaches.
pub(super) async fn render(
    services: &Services,
    request: GenerationRequest,
    class: usize,
    since: OffsetDateTime,
    timings: &mut Timings,
    watched: Watched,
) -> Result<Rendered, Failure> {
    let started = Instant::now();
    let registry = Arc::clone(&services.registry);
    let (prepared, request) = services
        .cpu
        .run_as(class, move || registry.prepare(&request).map(|p| (p, request)))
        .await??;
    timings.preprocess = ms(started.elapsed());
    let tier = services.schedule.class(class);
    // Preparation can take a while for big images; check the deadline again before the device.
    let deadline = Deadline::of(&request, tier, since);
    deadline.check(tier, "inference")?;
    stopped(&watched.stop)?;
    let options = JobOptions {
        class,
        deadline: deadline.instant(),
        stop: watched.stop.clone(),
        progress: watched.progress,
    };
    let inferred = services
        .inference
        .infer(&request.model, prepared.input, options)
        .await?;
    timings.inference = ms(inferred.elapsed);
    timings.batch_wait = Some(ms(inferred.waited));
    let batch_size = inferred.batch_size;

    let started = Instant::now();
    let (finish, generation) = (prepared.finish, prepared.generation);
    let (png, info) = services
        .cpu
        .run_as(class, move || {
            let image = finish.apply(&inferred.output);
            let png = encode_png(&image);
            let info = ImageInfo {
                format: "png".into(),
                width: image.width(),
                height: image.height(),
                bytes: png.len(),
            };
            (png, info)
        })
        .await?;
    timings.encode = ms(started.elapsed());
    Ok(Rendered {
        png,
        info,
        batch_size,
        generation,
    })
}
