//! A Stable Diffusion model as `optimum` exports it, and the few manifest lines that serve it.
//!
//! The folder (`model_index.json`, `scheduler/`, `text_encoder/`, `tokenizer/`, `unet/`,
//! `vae_decoder/`, `vae_encoder/`) says nearly everything: the tasks (a 4-channel UNet draws and
//! redraws, an 8-channel one edits in the InstructPix2Pix layout), the size multiple (the VAE's
//! factor × 2^(UNet levels − 1)), the default side (`unet.sample_size` × the VAE's factor), the
//! latent scaling, whether the UNet takes a guidance embedding (`time_cond_proj_dim`: LCM-distilled
//! models), the tokenizer and the scheduler configuration. `model_index.json` is the torch
//! pipeline's (it names `vae`, not the two VAE folders), so the folders are what counts. The ONNX
//! inputs are checked against all this when the sessions load ([`super::runner`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use serde::Deserialize;
use serde_json::Value;

use crate::diffusion::scheduler::{SchedulerConfig, SchedulerKind};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::domain::Task;
use crate::inference::manifest::ModelLimits;

/// `[pipeline] kind = "diffusion"`. Every key is optional: the defaults come from the folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSpec {
    /// Schedulers a request may pick. Default: all four (`euler`, `euler_ancestral`, `ddim`, `lcm`).
    #[serde(default)]
    pub schedulers: Option<Vec<String>>,
    /// Scheduler when the request names none. Default: the one `scheduler_config.json` names when
    /// kiln has it, else `euler`.
    #[serde(default)]
    pub default_scheduler: Option<String>,
    /// Steps when the request gives none. Default 25 (4 with the `lcm` scheduler).
    #[serde(default)]
    pub default_steps: Option<u32>,
    /// Most steps a request may ask for. Default 50.
    #[serde(default)]
    pub max_steps: Option<u32>,
    /// Guidance when the request gives none. Default 7.5 (8.5 for a UNet with a guidance embedding).
    #[serde(default)]
    pub default_guidance_scale: Option<f32>,
    /// Largest guidance a request may ask for. Default 20.
    #[serde(default)]
    pub max_guidance_scale: Option<f32>,
    /// `edit`: image guidance when the request gives none. Default 1.5.
    #[serde(default)]
    pub default_image_guidance_scale: Option<f32>,
    /// `image_to_image`: strength when the request gives none. Default 0.8.
    #[serde(default)]
    pub default_strength: Option<f64>,
    /// What was read from the folder (not in the file; set by [`DiffusionSpec::read_folder`]).
    #[serde(skip)]
    pub(crate) model: Option<Arc<DiffusionModel>>,
}

/// A diffusion model as the worker serves it: the manifest's choices resolved against the folder.
#[derive(Debug)]
pub struct DiffusionModel {
    /// The tasks it does, the default first.
    pub tasks: Vec<Task>,
    /// Schedulers a request may pick.
    pub schedulers: Vec<SchedulerKind>,
    /// The scheduler when the request names none.
    pub default_scheduler: SchedulerKind,
    /// `scheduler/scheduler_config.json`, as written.
    pub scheduler_config: SchedulerConfig,
    /// Steps when the request gives none.
    pub default_steps: u32,
    /// Most steps.
    pub max_steps: u32,
    /// Guidance when the request gives none.
    pub default_guidance_scale: f32,
    /// Largest guidance.
    pub max_guidance_scale: f32,
    /// `edit`'s image guidance when the request gives none.
    pub default_image_guidance_scale: f32,
    /// `image_to_image`'s strength when the request gives none.
    pub default_strength: f64,
    /// The text encoder's tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Pixels per latent pixel (8 for Stable Diffusion's VAE).
    pub vae_scale: u32,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub scaling_factor: f32,
    /// Image sides must be multiples of this: `vae_scale` × 2^(UNet levels − 1).
    pub multiple_of: u32,
    /// The side the UNet was trained at (`sample_size` × `vae_scale`).
    pub native_side: u32,
    /// The size of the UNet's guidance embedding input (`timestep_cond`), for LCM-distilled
    /// models: guidance is then an input, not a second row.
    pub time_cond_proj_dim: Option<usize>,
    /// The ONNX files.
    pub files: DiffusionFiles,
}

/// The ONNX files of a diffusion folder.
#[derive(Debug, Clone)]
pub struct DiffusionFiles {
    /// `text_encoder/model.onnx`.
    pub text_encoder: PathBuf,
    /// `unet/model.onnx`.
    pub unet: PathBuf,
    /// `vae_decoder/model.onnx`.
    pub vae_decoder: PathBuf,
    /// `vae_encoder/model.onnx`, when the export has one (needed by `image_to_image` and `edit`).
    pub vae_encoder: Option<PathBuf>,
}

impl DiffusionSpec {
    /// What was read from the folder.
    pub fn model(&self) -> &DiffusionModel {
        self.model
            .as_deref()
            .expect("Manifest::load reads a diffusion model's folder before anyone uses it")
    }

    /// Read the folder and resolve the manifest's choices against it. Errors name the file.
    pub fn read_folder(&mut self, dir: &Path) -> anyhow::Result<()> {
        let model = DiffusionModel::read(self, dir)?;
        self.model = Some(Arc::new(model));
        Ok(())
    }

    /// The limits of a model whose manifest has no `[limits]`: sides multiples of the model's
    /// multiple, from one multiple to twice the native side, the native side by default.
    pub fn derived_limits(&self) -> ModelLimits {
        let model = self.model();
        ModelLimits {
            min_side: model.multiple_of,
            max_side: 2 * model.native_side,
            default_max_side: model.native_side,
            multiple_of: model.multiple_of,
            max_input_bytes: 20 << 20,
            max_input_side: 8192,
            max_input_pixels: 40_000_000,
        }
    }
}

impl DiffusionModel {
    fn read(spec: &DiffusionSpec, dir: &Path) -> anyhow::Result<Self> {
        let onnx = |part: &str| dir.join(part).join("model.onnx");
        let files = DiffusionFiles {
            text_encoder: onnx("text_encoder"),
            unet: onnx("unet"),
            vae_decoder: onnx("vae_decoder"),
            vae_encoder: Some(onnx("vae_encoder")).filter(|p| p.is_file()),
        };
        for file in [&files.text_encoder, &files.unet, &files.vae_decoder] {
            ensure!(
                file.is_file(),
                "{} is missing: a diffusion model is a folder as optimum exports it (see docs/diffusion.md)",
                file.display()
            );
        }
        let unet = read_json(&dir.join("unet/config.json"))?;
        let vae = read_json(&dir.join("vae_decoder/config.json"))?;

        let vae_blocks = array_len(&vae, "block_out_channels", "vae_decoder/config.json")?;
        let vae_scale = 1u32 << (vae_blocks.max(1) - 1);
        let latent_channels = uint(&vae, "latent_channels").unwrap_or(4) as usize;
        let scaling_factor = vae.get("scaling_factor").and_then(Value::as_f64).unwrap_or(0.18215) as f32;
        let levels = array_len(&unet, "down_block_types", "unet/config.json")?;
        let multiple_of = vae_scale << (levels.max(1) - 1);
        let sample_size = match unet.get("sample_size") {
            Some(Value::Array(sides)) => sides.iter().filter_map(Value::as_u64).max(),
            Some(other) => other.as_u64(),
            None => None,
        }
        .unwrap_or(64) as u32;
        let native_side = (sample_size * vae_scale).next_multiple_of(multiple_of);
        let in_channels = uint(&unet, "in_channels").unwrap_or(4) as usize;
        let time_cond_proj_dim = uint(&unet, "time_cond_proj_dim").map(|d| d as usize);

        let tasks = if in_channels == latent_channels {
            let mut tasks = vec![Task::TextToImage];
            if files.vae_encoder.is_some() {
                tasks.push(Task::ImageToImage);
            }
            tasks
        } else if in_channels == 2 * latent_channels {
            ensure!(
                files.vae_encoder.is_some(),
                "{}: an {in_channels}-channel UNet edits images, which needs vae_encoder/model.onnx",
                dir.display()
            );
            vec![Task::Edit]
        } else {
            bail!(
                "{}: the UNet takes {in_channels} channels; kiln knows {latent_channels} (text/image to image) and {} (edit)",
                dir.join("unet/config.json").display(),
                2 * latent_channels
            );
        };

        let config_path = dir.join("scheduler/scheduler_config.json");
        let config_text =
            std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
        let scheduler_config =
            SchedulerConfig::from_json(&config_text).with_context(|| format!("invalid {}", config_path.display()))?;
        let schedulers = match &spec.schedulers {
            None => SchedulerKind::ALL.to_vec(),
            Some(names) => names.iter().map(|n| scheduler_kind(n)).collect::<anyhow::Result<_>>()?,
        };
        ensure!(!schedulers.is_empty(), "pipeline.schedulers is empty");
        let default_scheduler = match &spec.default_scheduler {
            Some(name) => scheduler_kind(name)?,
            None => scheduler_config
                .class_name()
                .and_then(SchedulerKind::from_class_name)
                .filter(|k| schedulers.contains(k))
                .unwrap_or(schedulers[0]),
        };
        ensure!(
            schedulers.contains(&default_scheduler),
            "pipeline.default_scheduler {:?} is not among pipeline.schedulers",
            default_scheduler.as_str()
        );
        // Each scheduler must build from this configuration: an option kiln does not implement is
        // a startup error, not a request's surprise.
        for kind in &schedulers {
            crate::diffusion::scheduler::build(*kind, &scheduler_config, 1)
                .with_context(|| format!("scheduler {} from {}", kind.as_str(), config_path.display()))?;
        }

        let max_steps = spec.max_steps.unwrap_or(50);
        let default_steps = spec
            .default_steps
            .unwrap_or(if default_scheduler == SchedulerKind::Lcm { 4 } else { 25 });
        ensure!(
            (1..=max_steps).contains(&default_steps),
            "pipeline.default_steps must be between 1 and max_steps ({max_steps})"
        );
        let max_guidance_scale = spec.max_guidance_scale.unwrap_or(20.0);
        let default_guidance_scale =
            spec.default_guidance_scale
                .unwrap_or(if time_cond_proj_dim.is_some() { 8.5 } else { 7.5 });
        ensure!(
            (0.0..=max_guidance_scale).contains(&default_guidance_scale),
            "pipeline.default_guidance_scale must be between 0 and max_guidance_scale ({max_guidance_scale})"
        );
        let default_strength = spec.default_strength.unwrap_or(0.8);
        ensure!(
            default_strength > 0.0 && default_strength <= 1.0,
            "pipeline.default_strength must be in (0, 1]"
        );
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))
            .with_context(|| format!("cannot load the tokenizer of {}", dir.display()))?;
        Ok(Self {
            tasks,
            schedulers,
            default_scheduler,
            scheduler_config,
            default_steps,
            max_steps,
            default_guidance_scale,
            max_guidance_scale,
            default_image_guidance_scale: spec.default_image_guidance_scale.unwrap_or(1.5),
            default_strength,
            tokenizer,
            vae_scale,
            latent_channels,
            scaling_factor,
            multiple_of,
            native_side,
            time_cond_proj_dim,
            files,
        })
    }

    /// Every ONNX file the model uses.
    pub fn onnx_files(&self) -> Vec<PathBuf> {
        let f = &self.files;
        let mut files = vec![f.text_encoder.clone(), f.unet.clone(), f.vae_decoder.clone()];
        files.extend(f.vae_encoder.clone());
        files
    }
}

fn scheduler_kind(name: &str) -> anyhow::Result<SchedulerKind> {
    name.parse::<SchedulerKind>().map_err(|_| {
        let known: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
        anyhow::anyhow!(
            "unknown scheduler {name:?} in the manifest; kiln has {}",
            known.join(", ")
        )
    })
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn uint(config: &Value, key: &str) -> Option<u64> {
    config.get(key).and_then(Value::as_u64)
}

fn array_len(config: &Value, key: &str, file: &str) -> anyhow::Result<u32> {
    config
        .get(key)
        .and_then(Value::as_array)
        .map(|a| a.len() as u32)
        .with_context(|| format!("{file} has no list `{key}`"))
}
