//! The numerics of Stable Diffusion pipelines that need no ONNX Runtime: the CLIP tokenizer, the
//! noise schedulers, and torch's CPU random generator. Each is plain data a request owns, so the
//! inference thread can batch, pause or resume requests between steps without changing an image.
//!
//! The model kind that drives these with ONNX Runtime sessions is
//! [`crate::inference::pipelines::diffusion`].

pub mod noise;
pub mod scheduler;
pub mod tokenizer;
