//! The model kinds kiln knows, one file each. A kind implements
//! [`Pipeline`](super::pipeline::Pipeline) on its manifest section; adding one is a file here, a
//! variant of [`PipelineSpec`](super::manifest::PipelineSpec) and its arm in
//! [`PipelineSpec::pipeline`](super::manifest::PipelineSpec::pipeline).

pub mod arbitrary_style;
pub mod diffusion;
mod photo;
pub mod style_bank;
