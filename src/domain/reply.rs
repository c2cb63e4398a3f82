//! The reply document (contract v1): what a producer gets back for every request.

use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, RequestError};
use super::generation::GenerationInfo;
use super::limits::{Deferral, LimitInfo};
use super::request::CONTRACT_VERSION;

/// `ok` or `error` (final), or a notice that is not final: `deferred`, `progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    /// The image is in the body.
    Ok,
    /// `error` says why there is no image.
    Error,
    /// Not final: the request waits in a delay queue (`deferred` says how long); its reply follows.
    Deferred,
    /// Not final: a multi-step model ran a step of the request (`progress` says which); sent only
    /// when the request asked for it. Its reply follows.
    Progress,
}

impl ReplyStatus {
    /// The status as it appears on the wire (and in the `kiln-status` header).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Deferred => "deferred",
            Self::Progress => "progress",
        }
    }
}

/// The reply document, carried in the `kiln-reply` header (and in the body of error replies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyDocument {
    /// Contract version.
    pub version: u32,
    /// The request's id; `null` when the request could not be parsed far enough.
    pub request_id: Option<String>,
    /// Whether there is an image.
    pub status: ReplyStatus,
    /// The model that was asked for; `null` when unknown.
    pub model: Option<String>,
    /// The image in the body, when `status` is `ok`.
    pub image: Option<ImageInfo>,
    /// Why there is no image, when `status` is `error`.
    pub error: Option<ErrorInfo>,
    /// Where the time went.
    pub timings_ms: Timings,
    /// The worker that answered.
    pub worker_id: String,
    /// The user's rate limit as of this request (absent when limits are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<LimitInfo>,
    /// For a `deferred` notice: when the request comes back, and why it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Deferral>,
    /// On `ok`: how many requests shared the model run (dynamic batching).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// On `ok`: the image was made smaller than asked because the worker was overloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<Degraded>,
    /// On `ok` from a diffusion model: the task, scheduler, seed and steps used, and whether the
    /// prompt was cut to the text encoder's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationInfo>,
    /// For a `progress` notice: the step just run, of how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressInfo>,
}

/// How a reply was degraded under overload: the output's size capped, a multi-step model's steps
/// cut, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Degraded {
    /// The output's longer side was capped at this; absent when the size was not capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_side: Option<u32>,
    /// A multi-step model ran with this many denoising steps instead of the ones asked for;
    /// absent when the steps were not cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Why: `overloaded`.
    pub reason: String,
}

/// Where a request run step by step is: `step` of `steps` done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressInfo {
    /// Steps run so far (1 after the first).
    pub step: u32,
    /// Steps the request runs in all (`generation.steps_run` of its final reply).
    pub steps: u32,
}

/// The PNG in the body of a successful reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Always `png`.
    pub format: String,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// Size of the body.
    pub bytes: usize,
}

/// The error of an error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Machine-readable, stable.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

impl From<&RequestError> for ErrorInfo {
    fn from(e: &RequestError) -> Self {
        Self {
            code: e.code,
            message: e.message.clone(),
        }
    }
}

/// Milliseconds spent in each stage (see `docs/contract.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From the request's creation (or enqueueing) to its receipt by the worker; `null` if unknown.
    pub queue_wait: Option<f64>,
    /// Decoding and resizing.
    pub preprocess: f64,
    /// The model run.
    pub inference: f64,
    /// PNG encoding.
    pub encode: f64,
    /// From receipt to the reply being ready.
    pub total: f64,
    /// Of the time to the reply, how long the prepared request waited for its batch to start
    /// (priority, batching, the device busy); absent when it never reached the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_wait: Option<f64>,
}

impl ReplyDocument {
    /// A successful reply.
    pub fn ok(request_id: String, model: String, image: ImageInfo, timings: Timings, worker_id: String) -> Self {
        Self {
            version: CONTRACT_VERSION,
            request_id: Some(request_id),
            status: ReplyStatus::Ok,
            model: Some(model),
            image: Some(image),
            error: None,
            timings_ms: timings,
            worker_id,
            rate_limit: None,
            deferred: None,
            batch_size: None,
            degraded: None,
            generation: None,
            progress: None,
        }
    }

    /// An error reply.
    pub fn error(
        request_id: Option<String>,
        model: Option<String>,
        error: &RequestError,
        timings: Timings,
        worker_id: String,
    ) -> Self {
        Self {
            version: CONTRACT_VERSION,
            request_id,
            status: ReplyStatus::Error,
            model,
            image: None,
            error: Some(error.into()),
            timings_ms: timings,
            worker_id,
            rate_limit: None,
            deferred: None,
            batch_size: None,
            degraded: None,
            generation: None,
            progress: None,
        }
    }

    /// A notice that the request was deferred (not final: its reply follows).
    pub fn deferred(
        request_id: String,
        model: String,
        deferral: Deferral,
        rate_limit: Option<LimitInfo>,
        worker_id: String,
    ) -> Self {
        Self {
            version: CONTRACT_VERSION,
            request_id: Some(request_id),
            status: ReplyStatus::Deferred,
            model: Some(model),
            image: None,
            error: None,
            timings_ms: Timings::default(),
            worker_id,
            rate_limit,
            deferred: Some(deferral),
            batch_size: None,
            degraded: None,
            generation: None,
            progress: None,
        }
    }

    /// A notice that a multi-step model ran `step` of the request's `steps` (not final: its reply
    /// follows).
    pub fn progress(request_id: String, model: String, step: u32, steps: u32, worker_id: String) -> Self {
        Self {
            version: CONTRACT_VERSION,
            request_id: Some(request_id),
            status: ReplyStatus::Progress,
            model: Some(model),
            image: None,
            error: None,
            timings_ms: Timings::default(),
            worker_id,
            rate_limit: None,
            deferred: None,
            batch_size: None,
            degraded: None,
            generation: None,
            progress: Some(ProgressInfo { step, steps }),
        }
    }

    /// Whether this is the request's final answer (`ok` or `error`), not a notice (`deferred`,
    /// `progress`).
    pub fn is_final(&self) -> bool {
        matches!(self.status, ReplyStatus::Ok | ReplyStatus::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_notice_is_not_final_and_says_the_step() {
        let notice = ReplyDocument::progress("r-1".into(), "sd".into(), 3, 10, "w".into());
        assert!(!notice.is_final());
        let wire = serde_json::to_value(&notice).unwrap();
        assert_eq!(wire["status"], "progress");
        assert_eq!(wire["progress"], serde_json::json!({"step": 3, "steps": 10}));
        assert_eq!(
            (wire["image"].clone(), wire["error"].clone()),
            (serde_json::Value::Null, serde_json::Value::Null)
        );
        assert!(wire.get("deferred").is_none() && wire.get("generation").is_none());
        assert_eq!(serde_json::from_value::<ReplyDocument>(wire).unwrap(), notice);
        assert_eq!(ReplyStatus::Progress.as_str(), "progress");

        let ok = ReplyDocument::ok("r-1".into(), "sd".into(), image(), Timings::default(), "w".into());
        assert!(ok.is_final());
        assert!(serde_json::to_value(&ok).unwrap().get("progress").is_none());
    }

    #[test]
    fn degraded_names_only_what_was_cut() {
        let steps_only = Degraded {
            max_side: None,
            steps: Some(20),
            reason: "overloaded".into(),
        };
        assert_eq!(
            serde_json::to_value(&steps_only).unwrap(),
            serde_json::json!({"steps": 20, "reason": "overloaded"})
        );
        let size_only: Degraded = serde_json::from_str(r#"{"max_side": 512, "reason": "overloaded"}"#).unwrap();
        assert_eq!((size_only.max_side, size_only.steps), (Some(512), None));
    }

    fn image() -> ImageInfo {
        ImageInfo {
            format: "png".into(),
            width: 1,
            height: 1,
            bytes: 1,
        }
    }
}
