//! How one output tensor becomes the result image: crop the padding, blend by strength, quantise,
//! resize to the final size. Runs on the CPU pool.

use image::RgbImage;

use crate::imaging::{resize_rgb, tensor, Layout, ValueRange};

/// How one output tensor becomes the result image.
#[derive(Debug)]
pub struct Finish {
    /// Output tensor width.
    pub tensor_width: u32,
    /// Output tensor height.
    pub tensor_height: u32,
    /// Output tensor layout.
    pub layout: Layout,
    /// Output value range.
    pub value_range: ValueRange,
    /// The top-left region of the tensor that holds the picture (the rest is padding).
    pub crop: (u32, u32),
    /// Final size; the crop is resized to it when they differ.
    pub output: (u32, u32),
    /// The network's input picture and the strength to mix the result with it.
    pub blend: Option<(RgbImage, f32)>,
}

impl Finish {
    /// Turn one output sample into the result image.
    pub fn apply(self, output: &[f32]) -> RgbImage {
        let image = tensor::tensor_to_image(
            output,
            (self.tensor_width, self.tensor_height),
            self.layout,
            self.value_range,
            self.crop,
            self.blend.as_ref().map(|(img, s)| (img, *s)),
        );
        if image.dimensions() == self.output {
            return image;
        }
        resize_rgb(&image, self.output.0, self.output.1)
    }
}
