//! What the single-pass style kinds share: the input photo every request of theirs must carry, the
//! size of their result (from the photo's header), and the generation parameters they refuse.

use crate::domain::{ErrorCode, GenerationRequest, RequestError, Work};
use crate::inference::manifest::Manifest;
use crate::inference::output_size::request_output_size;

/// The request's photo (still encoded): `invalid_image` when there is none, and any generation
/// parameter (`prompt`, `steps`, …) is `invalid_params`: this model would silently ignore it.
pub(crate) fn photo<'r>(manifest: &Manifest, request: &'r GenerationRequest) -> Result<&'r [u8], RequestError> {
    if let Some(field) = request.params.generation.first_given() {
        return Err(RequestError::new(
            ErrorCode::InvalidParams,
            format!(
                "{} is a style model and takes no `{field}`; generation parameters are for diffusion models",
                manifest.name
            ),
        ));
    }
    request.image.as_deref().ok_or_else(|| {
        RequestError::new(
            ErrorCode::InvalidImage,
            format!("{} needs an `image`: the photo to stylize", manifest.name),
        )
    })
}

/// The result's size from the photo's header alone (no decoding), with the worker's cap.
pub(crate) fn output_size(manifest: &Manifest, request: &GenerationRequest) -> Result<(u32, u32), RequestError> {
    let limits = &manifest.limits;
    let dims = crate::imaging::probe_dimensions(photo(manifest, request)?, &limits.decode_limits(), "image")?;
    request_output_size(limits, request, dims)
}

/// One pass of the network over the result's pixels.
pub(crate) fn work(manifest: &Manifest, request: &GenerationRequest) -> Result<Work, RequestError> {
    let (w, h) = output_size(manifest, request)?;
    Ok(Work::single_pass(u64::from(w) * u64::from(h)))
}
