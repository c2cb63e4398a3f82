//! Resizing RGB images (Lanczos3, SIMD through `fast_image_resize`).

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// Dimensions with the longer side equal to `long_side` and the aspect ratio kept (rounded, ≥ 1).
pub fn fit_long_side(width: u32, height: u32, long_side: u32) -> (u32, u32) {
    let scale = f64::from(long_side) / f64::from(width.max(height));
    let w = (f64::from(width) * scale).round().max(1.0) as u32;
    let h = (f64::from(height) * scale).round().max(1.0) as u32;
    (w, h)
}

/// `image` resized to `width` × `height` with a Lanczos3 filter; a copy when the size is unchanged.
pub fn resize_rgb(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let mut dst = Image::new(width, height, PixelType::U8x3);
    Resizer::new()
        .resize(
            image,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .expect("both images are U8x3 with non-zero sizes");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("the buffer is width × height × 3")
}

/// The centre square of `image`.
pub fn centre_square(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let side = w.min(h);
    image::imageops::crop_imm(image, (w - side) / 2, (h - side) / 2, side, side).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_the_long_side_and_keeps_the_aspect() {
        assert_eq!(fit_long_side(600, 400, 300), (300, 200));
        assert_eq!(fit_long_side(400, 600, 300), (200, 300));
        assert_eq!(fit_long_side(1000, 1, 10), (10, 1));
    }

    #[test]
    fn resizes_to_the_requested_size_and_keeps_flat_colour() {
        let img = RgbImage::from_pixel(64, 48, image::Rgb([200, 100, 50]));
        let out = resize_rgb(&img, 32, 24);
        assert_eq!(out.dimensions(), (32, 24));
        assert!(out.pixels().all(|p| p.0 == [200, 100, 50]));
        assert_eq!(centre_square(&img).dimensions(), (48, 48));
    }
}
