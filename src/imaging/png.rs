//! PNG encoding of results.

use image::{codecs::png, ExtendedColorType, ImageEncoder, RgbImage};

/// Encode as PNG with fast (fdeflate) compression: a few milliseconds per megapixel, against tens
/// for the default level, for files ~10–20% larger. Throughput wins; BENCHMARKS.md has the numbers.
pub fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::with_capacity(image.as_raw().len() / 2);
    png::PngEncoder::new_with_quality(&mut out, png::CompressionType::Fast, png::FilterType::Paeth)
        .write_image(image.as_raw(), image.width(), image.height(), ExtendedColorType::Rgb8)
        .expect("writing RGB8 of matching size into a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_pixels() {
        let img = RgbImage::from_fn(37, 21, |x, y| image::Rgb([x as u8, y as u8, (x * y) as u8]));
        let decoded = image::load_from_memory(&encode_png(&img)).unwrap().into_rgb8();
        assert_eq!(decoded, img);
    }
}
