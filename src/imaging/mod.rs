//! Image work that happens off the inference thread: decoding untrusted bytes, resizing, tensor
//! layout, and PNG encoding.

pub mod decode;
pub mod png;
pub mod resize;
pub mod tensor;
mod webp_check;

pub use decode::{decode_rgb, probe_dimensions, DecodeLimits};
pub use png::encode_png;
pub use resize::{centre_square, fit_long_side, resize_rgb};
pub use tensor::{Layout, ValueRange};
