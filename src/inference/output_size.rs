//! The size of a request's result: `size` as the longer side (checked against the model's
//! limits), or the input's own size capped at `default_max_side`, with the worker's overload cap.

use super::manifest::ModelLimits;
use crate::domain::{ErrorCode, GenerationRequest, RequestError};

/// The output size for a request, with the worker's own cap (overload) applied when it has one.
pub(super) fn request_output_size(
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
