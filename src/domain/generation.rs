//! The generation part of the contract: what a request asks of a diffusion model (task, prompt,
//! steps, guidance, seed, size, scheduler), well-formed but not yet checked against a model, and
//! what the reply says was done.

use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, RequestError};

/// What a diffusion request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// A prompt becomes a picture; no input image.
    TextToImage,
    /// The input image, noised to `strength`, is redrawn after the prompt.
    ImageToImage,
    /// The input image is edited by a plain-language instruction (InstructPix2Pix models).
    Edit,
}

impl Task {
    /// Every task, in the contract's order.
    pub const ALL: [Task; 3] = [Task::TextToImage, Task::ImageToImage, Task::Edit];

    /// The task as the contract writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TextToImage => "text_to_image",
            Self::ImageToImage => "image_to_image",
            Self::Edit => "edit",
        }
    }

    /// Whether the task takes an input image.
    pub fn takes_image(self) -> bool {
        self != Self::TextToImage
    }

    /// A task named on the wire; an unknown name is `unsupported_task`.
    pub fn parse(name: &str) -> Result<Self, RequestError> {
        Self::ALL.into_iter().find(|t| t.as_str() == name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
            RequestError::new(
                ErrorCode::UnsupportedTask,
                format!("unknown task {name:?}; tasks: {}", known.join(", ")),
            )
        })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The generation parameters of a request: each well-formed (types, finite numbers, integers in
/// range), none yet checked against a model. All `None` for a style request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParams {
    /// `task`.
    pub task: Option<Task>,
    /// `prompt`, as given (may be empty: the model decides).
    pub prompt: Option<String>,
    /// `negative_prompt`.
    pub negative_prompt: Option<String>,
    /// `steps`, ≥ 0.
    pub steps: Option<u32>,
    /// `guidance_scale`, finite.
    pub guidance_scale: Option<f32>,
    /// `image_guidance_scale`, finite.
    pub image_guidance_scale: Option<f32>,
    /// `seed`, 0 ..= 4 294 967 295.
    pub seed: Option<u32>,
    /// `width`.
    pub width: Option<u32>,
    /// `height`.
    pub height: Option<u32>,
    /// `scheduler`, by name.
    pub scheduler: Option<String>,
}

impl GenerationParams {
    /// The name of the first generation parameter given, if any (for models that take none).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("task", self.task.is_some()),
            ("prompt", self.prompt.is_some()),
            ("negative_prompt", self.negative_prompt.is_some()),
            ("steps", self.steps.is_some()),
            ("guidance_scale", self.guidance_scale.is_some()),
            ("image_guidance_scale", self.image_guidance_scale.is_some()),
            ("seed", self.seed.is_some()),
            ("width", self.width.is_some()),
            ("height", self.height.is_some()),
            ("scheduler", self.scheduler.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }
}

/// The largest seed: seeds are those of `torch.Generator("cpu").manual_seed`, which keeps 32 bits.
pub const MAX_SEED: u64 = u32::MAX as u64;

/// `seed` from the wire: an integer from 0 to [`MAX_SEED`].
pub fn seed(value: &serde_json::Number) -> Result<u32, RequestError> {
    value
        .as_u64()
        .filter(|s| *s <= MAX_SEED)
        .map(|s| s as u32)
        .ok_or_else(|| {
            RequestError::new(
                ErrorCode::InvalidParams,
                format!("seed must be an integer from 0 to {MAX_SEED}, got {value}"),
            )
        })
}

/// A count (`steps`, `width`, `height`) from the wire: a non-negative integer that fits 32 bits.
pub fn count(field: &str, value: i64) -> Result<u32, RequestError> {
    u32::try_from(value).map_err(|_| {
        RequestError::new(
            ErrorCode::InvalidParams,
            format!("{field} must be a positive integer, got {value}"),
        )
    })
}

/// A guidance scale from the wire: finite and not negative.
pub fn scale(field: &str, value: f64) -> Result<f32, RequestError> {
    if value.is_finite() && value >= 0.0 && value <= f64::from(f32::MAX) {
        Ok(value as f32)
    } else {
        Err(RequestError::new(
            ErrorCode::InvalidParams,
            format!("{field} must be a number of at least 0, got {value}"),
        ))
    }
}

/// What a diffusion reply says was done, so the producer can reproduce or show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// The task run.
    pub task: Task,
    /// The scheduler used.
    pub scheduler: String,
    /// The seed of the noise: the request's, or the one drawn for it when it gave none. The same
    /// request with this seed gives the same image.
    pub seed: u32,
    /// Denoising steps asked for (`steps`, or the model's default).
    pub steps: u32,
    /// Denoising steps run: fewer than `steps` for `image_to_image` (`steps × strength`).
    pub steps_run: u32,
    /// Text guidance used (1 = none).
    pub guidance_scale: f32,
    /// Image guidance used, for `edit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_guidance_scale: Option<f32>,
    /// Set when the prompt was longer than the text encoder takes: only its beginning was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_truncated: Option<Truncation>,
    /// The same for the negative prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt_truncated: Option<Truncation>,
}

/// How a prompt was cut to the text encoder's limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truncation {
    /// Tokens of the prompt that were used (the encoder's limit less the start and end tokens).
    pub tokens_used: u32,
    /// Tokens cut off the end.
    pub tokens_dropped: u32,
    /// The text that was used, as the tokenizer reads it back (lower case, cleaned).
    pub text_used: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_and_seeds_from_the_wire() {
        for task in Task::ALL {
            assert_eq!(Task::parse(task.as_str()).unwrap(), task);
            assert_eq!(serde_json::to_string(&task).unwrap(), format!("\"{task}\""));
        }
        assert_eq!(Task::parse("inpaint").unwrap_err().code, ErrorCode::UnsupportedTask);
        assert_eq!(seed(&serde_json::Number::from(4_294_967_295u64)).unwrap(), u32::MAX);
        for bad in ["-1", "4294967296", "1.5", "1e30"] {
            let n: serde_json::Number = serde_json::from_str(bad).unwrap();
            assert_eq!(seed(&n).unwrap_err().code, ErrorCode::InvalidParams, "{bad}");
        }
        assert_eq!(count("steps", -3).unwrap_err().code, ErrorCode::InvalidParams);
        assert_eq!(
            scale("guidance_scale", -0.5).unwrap_err().code,
            ErrorCode::InvalidParams
        );
    }
}
