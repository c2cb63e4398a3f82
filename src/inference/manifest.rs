//! Model manifests: `models/<name>/manifest.toml` says what files a model has, which tensors go
//! in and out, their layout and value range, the pipeline kind that drives them, and the limits on
//! what a request may ask for. A new model of an existing kind is a new folder, not new code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use super::pipeline::Pipeline;
pub use super::pipelines::diffusion::DiffusionSpec;
use crate::imaging::{DecodeLimits, Layout, ValueRange};

/// One model, as described by its manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name requests use in `model`.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Licence of the weights.
    pub licence: String,
    /// Where the weights come from.
    pub origin: String,
    /// How to run it.
    pub pipeline: PipelineSpec,
    /// `[limits]` as written: required for the style kinds; for a diffusion model, when absent,
    /// derived from the folder ([`DiffusionSpec::derived_limits`]).
    #[serde(default, rename = "limits")]
    pub limits_in_file: Option<ModelLimits>,
    /// What requests may ask of it (not in the file: `[limits]`, or derived).
    #[serde(skip)]
    pub limits: ModelLimits,
    /// The folder the manifest was read from (not in the file).
    #[serde(skip)]
    pub dir: PathBuf,
    /// Tensor sides are padded up to a multiple of this (from `batching.shape_bucket`, not in the
    /// file); 0 until the registry sets it, which means `limits.multiple_of`.
    #[serde(skip)]
    pub shape_bucket: u32,
    /// The variant selected by `models.variants` (not in the file); `None` is the default file.
    #[serde(skip)]
    pub variant: Option<String>,
}

/// The kinds of pipeline kiln knows how to drive.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PipelineSpec {
    /// A network with a bank of learned styles, chosen per sample by a weight vector.
    StyleBank(StyleBankSpec),
    /// A style-prediction network plus a transform network: any picture is a style.
    ArbitraryStyle(ArbitraryStyleSpec),
    /// A Stable Diffusion ONNX folder (optimum's layout): text encoder, UNet, VAE, a scheduler.
    Diffusion(DiffusionSpec),
}

impl PipelineSpec {
    /// The kind's implementation: the one place a kind's name meets its code.
    pub fn pipeline(&self) -> &dyn Pipeline {
        match self {
            Self::StyleBank(spec) => spec,
            Self::ArbitraryStyle(spec) => spec,
            Self::Diffusion(spec) => spec,
        }
    }
}

/// See [`PipelineSpec::StyleBank`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleBankSpec {
    /// ONNX file, relative to the manifest.
    pub file: PathBuf,
    /// Image input: `[N, 3, H, W]` or `[N, H, W, 3]` per `layout`.
    pub image_input: String,
    /// Style weights input: `[N, styles]`.
    pub weights_input: String,
    /// Image output, same layout and size as the input.
    pub output: String,
    /// Number of styles in the bank.
    pub styles: usize,
    /// Tensor layout.
    pub layout: Layout,
    /// Values that pixel 0 and 255 map to.
    pub value_range: ValueRange,
    /// Other builds of the same network (same inputs and outputs), by name, that an operator may
    /// select instead of `file` with `models.variants` (e.g. `fp16`: half precision for GPUs).
    #[serde(default)]
    pub variants: BTreeMap<String, VariantSpec>,
}

/// An alternative ONNX file for a style-bank model: same tensors, other precision or graph.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    /// ONNX file, relative to the manifest.
    pub file: PathBuf,
    /// What differs and what it costs in quality (shown in logs).
    pub description: String,
}

/// See [`PipelineSpec::ArbitraryStyle`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArbitraryStyleSpec {
    /// Style-prediction ONNX file.
    pub predict_file: PathBuf,
    /// Its image input `[1, style_size, style_size, 3]`.
    pub predict_input: String,
    /// Its style-vector output.
    pub predict_output: String,
    /// Transform ONNX file.
    pub transform_file: PathBuf,
    /// Its image input `[1, content_size, content_size, 3]`.
    pub transform_image_input: String,
    /// Its style-vector input.
    pub transform_style_input: String,
    /// Its image output.
    pub transform_output: String,
    /// Tensor layout of both networks' images.
    pub layout: Layout,
    /// Values that pixel 0 and 255 map to.
    pub value_range: ValueRange,
    /// The transform network's fixed square size.
    pub content_size: u32,
    /// The predictor's fixed square size.
    pub style_size: u32,
}

/// What a request may ask of a model.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Smallest side of input and output.
    pub min_side: u32,
    /// Largest output side a request may ask for.
    pub max_side: u32,
    /// Output side when the request gives no `size` and the input is larger.
    pub default_max_side: u32,
    /// Network input sizes are padded to a multiple of this.
    pub multiple_of: u32,
    /// Largest encoded input image.
    pub max_input_bytes: usize,
    /// Largest input width or height.
    pub max_input_side: u32,
    /// Largest input pixel count.
    pub max_input_pixels: u64,
}

impl ModelLimits {
    /// Limits for decoding an input image of this model.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_bytes: self.max_input_bytes,
            max_side: self.max_input_side,
            max_pixels: self.max_input_pixels,
            min_side: self.min_side,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if !(self.min_side >= 1 && self.min_side <= self.default_max_side && self.default_max_side <= self.max_side) {
            bail!("limits must satisfy 1 <= min_side <= default_max_side <= max_side");
        }
        if self.multiple_of == 0 || self.multiple_of > self.min_side {
            bail!("limits.multiple_of must be between 1 and min_side");
        }
        Ok(())
    }
}

impl Manifest {
    /// Read and check `dir/manifest.toml`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("manifest.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut manifest: Self =
            toml::from_str(&text).with_context(|| format!("invalid manifest {}", path.display()))?;
        manifest.dir = dir.to_owned();
        manifest.limits = match (&mut manifest.pipeline, manifest.limits_in_file.clone()) {
            (PipelineSpec::Diffusion(spec), written) => {
                spec.read_folder(dir)?;
                let derived = spec.derived_limits();
                let limits = written.unwrap_or(derived.clone());
                if limits.multiple_of % derived.multiple_of != 0 || limits.min_side % limits.multiple_of != 0 {
                    bail!(
                        "{}: limits.multiple_of must be a multiple of {} (what this model's VAE and UNet allow) \
                         and min_side a multiple of it",
                        path.display(),
                        derived.multiple_of
                    );
                }
                limits
            }
            (_, Some(limits)) => limits,
            (_, None) => bail!("{} has no [limits]", path.display()),
        };
        manifest
            .limits
            .check()
            .with_context(|| format!("invalid manifest {}", path.display()))?;
        for file in manifest.files() {
            if !file.is_file() {
                bail!("{} names {}, which does not exist", path.display(), file.display());
            }
        }
        Ok(manifest)
    }

    /// Every file the manifest names (the one in use and its variants), as paths; checked at load.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = self.files_in_use();
        if let PipelineSpec::StyleBank(s) = &self.pipeline {
            files.extend(s.variants.values().map(|v| self.dir.join(&v.file)));
        }
        files
    }

    /// The files this manifest serves now (the default file or the selected variant's).
    pub fn files_in_use(&self) -> Vec<PathBuf> {
        match &self.pipeline {
            PipelineSpec::StyleBank(s) => vec![self.dir.join(&s.file)],
            PipelineSpec::ArbitraryStyle(s) => vec![self.dir.join(&s.predict_file), self.dir.join(&s.transform_file)],
            PipelineSpec::Diffusion(s) => s.model().onnx_files(),
        }
    }

    /// Serve `variant`'s file instead of the default one. An unknown variant is an error that
    /// names the ones there are.
    pub fn select_variant(&mut self, variant: &str) -> anyhow::Result<()> {
        let PipelineSpec::StyleBank(spec) = &mut self.pipeline else {
            bail!("model {:?} has no variants (only style-bank models do)", self.name);
        };
        let Some(chosen) = spec.variants.get(variant) else {
            let known: Vec<&str> = spec.variants.keys().map(String::as_str).collect();
            bail!(
                "model {:?} has no variant {variant:?}; its variants: {}",
                self.name,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            );
        };
        spec.file = chosen.file.clone();
        self.variant = Some(variant.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
    }

    #[test]
    fn the_shipped_manifests_load() {
        let m = Manifest::load(&models_dir().join("multistyle26")).unwrap();
        assert_eq!(m.name, "multistyle26");
        assert!(matches!(m.pipeline, PipelineSpec::StyleBank(ref s) if s.styles == 26 && s.layout == Layout::Nchw));
        let m = Manifest::load(&models_dir().join("arbitrary-style")).unwrap();
        assert!(matches!(m.pipeline, PipelineSpec::ArbitraryStyle(ref s) if s.content_size == 384));
    }

    #[test]
    fn a_variant_replaces_the_file_and_an_unknown_one_is_refused_by_name() {
        let mut m = Manifest::load(&models_dir().join("multistyle26")).unwrap();
        m.select_variant("fp16").unwrap();
        assert!(
            matches!(m.pipeline, PipelineSpec::StyleBank(ref s) if s.file == Path::new("multistyle26-batched-fp16.onnx"))
        );
        assert_eq!(m.variant.as_deref(), Some("fp16"));
        let error = m.select_variant("int4").unwrap_err().to_string();
        assert!(
            error.contains("no variant \"int4\"") && error.contains("fp16"),
            "{error}"
        );
        let mut a = Manifest::load(&models_dir().join("arbitrary-style")).unwrap();
        assert!(a
            .select_variant("fp16")
            .unwrap_err()
            .to_string()
            .contains("no variants"));
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        let base = std::fs::read_to_string(models_dir().join("multistyle26/manifest.toml")).unwrap();
        let typo = base.replace("styles = 26", "stlyes = 26");
        assert!(toml::from_str::<Manifest>(&typo).is_err());
        let kind = base.replace("kind = \"style_bank\"", "kind = \"latent_video\"");
        assert!(toml::from_str::<Manifest>(&kind).is_err());
    }
}
