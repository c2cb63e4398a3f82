//! A diffusion model's sessions on the inference thread, and the phases of a request on them:
//! `begin` (text encoder and starting latents, batched over the requests that start together),
//! `step` (one UNet call for any set of rows of one size, each row at its own step where the export
//! takes a timestep per row, then each request's own guidance and scheduler update) and `finish`
//! (one VAE decode for the rows that are done).
//!
//! Between phases a request is a [`DiffusionRow`]: plain data (embeddings, latents, scheduler,
//! noise stream, step index) that the engine keeps running, pauses or drops at any step boundary
//! ([`StepRunner`]). Whole-request batching ([`DiffusionRunner::run_batch`]) is the same phases run
//! over one fixed batch.

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use ort::session::{Session, SessionInputValue};
use ort::value::TensorElementType;
use ort::value::TensorRef;

use super::model::DiffusionModel;
use super::DiffusionInput;
use crate::diffusion::noise::TorchGenerator;
use crate::diffusion::scheduler::{self, Scheduler};
use crate::domain::Task;
use crate::inference::pipeline::{inputs_of, ModelInput, Runner, StepRow, StepRunner};

/// The sessions of one diffusion model, with the tensor names and types its export uses.
pub struct DiffusionRunner {
    /// The model's name (metrics).
    name: String,
    text_encoder: Session,
    unet: Session,
    vae_decoder: Session,
    vae_encoder: Option<Session>,
    model: Arc<DiffusionModel>,
    io: Io,
}

/// How this export names and types its tensors (optimum's names; types read from the files).
#[derive(Debug)]
struct Io {
    /// `input_ids` is int32 (some exports) rather than int64 (optimum).
    ids_int32: bool,
    /// The text encoder's hidden states output.
    text_output: String,
    /// `timestep`'s element type (float32 in optimum's export) and whether it is one value per row
    /// (`[B]`) rather than a scalar.
    timestep_type: TensorElementType,
    timestep_per_row: bool,
    /// The UNet's guidance-embedding input, for LCM-distilled models.
    timestep_cond: Option<String>,
    unet_output: String,
    vae_decoder_output: String,
    vae_encoder_output: String,
}

/// One request between steps: plain data that can be kept, paused or dropped.
#[derive(Debug)]
pub struct RequestState {
    /// Its own scheduler, at its own step.
    pub scheduler: Box<dyn Scheduler>,
    /// Its own noise stream (`torch.Generator("cpu").manual_seed(seed)`).
    pub rng: TorchGenerator,
    /// The latents, `[C, h, w]`.
    pub latents: Vec<f32>,
    /// `edit`: the input image's latents (the VAE posterior's mode), concatenated to each row.
    pub image_latents: Option<Vec<f32>>,
}

/// A request on the inference thread: what it runs, its text embeddings, its state and its step.
/// Everything a step needs is here, so it can run beside any other row of its model and shape.
#[derive(Debug)]
pub struct DiffusionRow {
    plan: super::Plan,
    /// `[rows, seq, dim]`: `[negative, prompt]` with guidance, `[prompt, negative, negative]` for a
    /// guided edit (diffusers' orders), `[prompt]` without.
    embeddings: Vec<f32>,
    /// `(seq, dim)`.
    embedding_shape: (usize, usize),
    /// `[C, h, w]` of the latents.
    dims: [usize; 3],
    state: RequestState,
    /// The next step's index (from `plan.start` to `plan.steps`).
    step: usize,
}

impl DiffusionRow {
    /// The timestep of its next step.
    fn timestep(&self) -> f32 {
        self.state.scheduler.timesteps()[self.step]
    }
}

impl StepRow for DiffusionRow {
    fn done(&self) -> u32 {
        (self.step as u32).saturating_sub(self.plan.start)
    }
    fn total(&self) -> u32 {
        self.plan.steps_run()
    }
    fn network_rows(&self) -> usize {
        self.plan.rows as usize
    }
    fn step_key(&self) -> u64 {
        u64::from(self.timestep().to_bits())
    }
    fn bytes(&self) -> usize {
        let floats = self.embeddings.len()
            + self.state.latents.len()
            + self.state.image_latents.as_ref().map_or(0, Vec::len)
            + 2 * self.state.latents.len(); // a multistep scheduler's history, at most
        floats * std::mem::size_of::<f32>() + std::mem::size_of::<Self>()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The VAE posterior of one image: mean and log-variance, `[C, h, w]` each.
type Moments = (Vec<f32>, Vec<f32>);

/// Each request's text embeddings, and their `(seq, dim)`.
type Embeddings = (Vec<Vec<f32>>, (usize, usize));

impl DiffusionRunner {
    /// Wrap the sessions, checking their inputs and outputs against the folder's description.
    pub fn new(
        name: &str,
        text_encoder: Session,
        unet: Session,
        vae_decoder: Session,
        vae_encoder: Option<Session>,
        model: Arc<DiffusionModel>,
    ) -> anyhow::Result<Self> {
        let io = Io::read(&text_encoder, &unet, &vae_decoder, vae_encoder.as_ref(), &model)?;
        if io.timestep_per_row {
            tracing::info!(
                model = name,
                "the UNet takes a timestep per row: rows at any step share a call"
            );
        } else {
            tracing::info!(
                model = name,
                "the UNet takes one timestep per call (an export not rewritten with \
                 models/tools/per_row_timestep.py): only rows at equal timesteps share a call"
            );
        }
        Ok(Self {
            name: name.to_owned(),
            text_encoder,
            unet,
            vae_decoder,
            vae_encoder,
            model,
            io,
        })
    }

    /// Run whole requests of one shape, scheduler and step range together from first step to last;
    /// one image `[3, H, W]` in `[-1, 1]` per request (whole-request batching).
    pub fn run_batch(&mut self, batch: &[&DiffusionInput]) -> Result<Vec<Vec<f32>>, String> {
        let plan = &batch[0].plan;
        // The batcher keys batches by size and group; a mix here would be a bug, not bad input.
        let schedule = |p: &super::Plan| (p.scheduler, p.steps, p.start, p.width, p.height, p.task);
        if batch.iter().any(|i| schedule(&i.plan) != schedule(plan)) {
            return Err("a diffusion batch mixed sizes, schedules or tasks".into());
        }
        let mut rows = self.begin_rows(batch)?;
        while rows[0].step < plan.steps as usize {
            let mut refs: Vec<&mut DiffusionRow> = rows.iter_mut().collect();
            self.step_rows(&mut refs)?;
        }
        let refs: Vec<&DiffusionRow> = rows.iter().collect();
        self.decode(&refs)
    }

    fn latent_dims(&self, plan: &super::Plan) -> [usize; 3] {
        let s = self.model.vae_scale;
        [
            self.model.latent_channels,
            (plan.height / s) as usize,
            (plan.width / s) as usize,
        ]
    }

    /// Text embeddings and starting latents for each request (text encoder and VAE encoder batched).
    fn begin_rows(&mut self, batch: &[&DiffusionInput]) -> Result<Vec<DiffusionRow>, String> {
        let (embeddings, embedding_shape) = self.encode_text(batch)?;
        let states = self.start(batch)?;
        Ok(batch
            .iter()
            .zip(embeddings)
            .zip(states)
            .map(|((input, embeddings), state)| DiffusionRow {
                plan: input.plan.clone(),
                embeddings,
                embedding_shape,
                dims: self.latent_dims(&input.plan),
                state,
                step: input.plan.start as usize,
            })
            .collect())
    }

    /// Each request's text embeddings (its rows, in diffusers' order), from one encoder call.
    fn encode_text(&mut self, batch: &[&DiffusionInput]) -> Result<Embeddings, String> {
        let mut ids: Vec<&[i64]> = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        for input in batch {
            let (p, n) = (input.prompt_ids.as_slice(), input.negative_ids.as_slice());
            let rows: &[&[i64]] = match input.plan.rows {
                1 => &[p],
                2 => &[n, p],
                _ => &[p, n, n],
            };
            counts.push(rows.len());
            ids.extend_from_slice(rows);
        }
        let seq = ids[0].len();
        let flat: Vec<i64> = ids.concat();
        let outputs = if self.io.ids_int32 {
            let flat: Vec<i32> = flat.iter().map(|&i| i as i32).collect();
            let tensor = TensorRef::from_array_view(([ids.len(), seq], flat.as_slice())).map_err(err)?;
            self.text_encoder
                .run(ort::inputs!["input_ids" => tensor])
                .map_err(err)?
        } else {
            let tensor = TensorRef::from_array_view(([ids.len(), seq], flat.as_slice())).map_err(err)?;
            self.text_encoder
                .run(ort::inputs!["input_ids" => tensor])
                .map_err(err)?
        };
        let (shape, data) = outputs[self.io.text_output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        if shape.len() != 3 || shape[0] as usize != ids.len() {
            return Err(format!(
                "the text encoder returned shape {shape:?} for {} rows",
                ids.len()
            ));
        }
        let per_row = (shape[1] * shape[2]) as usize;
        let mut rest = data;
        let embeddings = counts
            .iter()
            .map(|&count| {
                let (mine, tail) = rest.split_at(count * per_row);
                rest = tail;
                mine.to_vec()
            })
            .collect();
        Ok((embeddings, (shape[1] as usize, shape[2] as usize)))
    }

    /// Each request's starting latents, drawn from its own generator in diffusers' order:
    /// text-to-image and edit draw the initial noise once; image-to-image draws the VAE posterior
    /// sample, then the noise it is mixed with at the first step.
    fn start(&mut self, batch: &[&DiffusionInput]) -> Result<Vec<RequestState>, String> {
        let moments = self.encode_images(batch)?;
        let mut states = Vec::with_capacity(batch.len());
        for (input, moments) in batch.iter().zip(moments) {
            let plan = &input.plan;
            let n: usize = self.latent_dims(plan).iter().product();
            let scheduler = scheduler::build(plan.scheduler, &self.model.scheduler_config, plan.steps as usize)
                .map_err(|e| e.to_string())?;
            let mut rng = TorchGenerator::new(u64::from(input.seed));
            let (latents, image_latents) = match (plan.task, moments) {
                (Task::ImageToImage, Some((mean, logvar))) => {
                    let sample = rng.randn(n);
                    let scale = self.model.scaling_factor;
                    let init: Vec<f32> = mean
                        .iter()
                        .zip(&logvar)
                        .zip(&sample)
                        .map(|((m, lv), s)| (m + (0.5 * lv.clamp(-30.0, 20.0)).exp() * s) * scale)
                        .collect();
                    let noise = rng.randn(n);
                    (scheduler.add_noise(&init, &noise, plan.start as usize), None)
                }
                (task, moments) => {
                    let sigma = scheduler.init_noise_sigma();
                    let latents = rng.randn(n).into_iter().map(|x| x * sigma).collect();
                    let image_latents = (task == Task::Edit).then(|| moments.map(|(mean, _)| mean));
                    (latents, image_latents.flatten())
                }
            };
            states.push(RequestState {
                scheduler,
                rng,
                latents,
                image_latents,
            });
        }
        Ok(states)
    }

    /// The VAE posterior's mean and log-variance for each request with an input image.
    fn encode_images(&mut self, batch: &[&DiffusionInput]) -> Result<Vec<Option<Moments>>, String> {
        let with_image: Vec<&[f32]> = batch.iter().filter_map(|i| i.image.as_deref()).collect();
        if with_image.is_empty() {
            return Ok(batch.iter().map(|_| None).collect());
        }
        let encoder = self
            .vae_encoder
            .as_mut()
            .ok_or("this model has no vae_encoder for its input images")?;
        let plan = &batch[0].plan;
        let (h, w) = (plan.height as usize, plan.width as usize);
        if batch
            .iter()
            .any(|i| (i.plan.height, i.plan.width) != (plan.height, plan.width))
        {
            return Err("a diffusion batch mixed sizes".into());
        }
        let flat = with_image.concat();
        let tensor = TensorRef::from_array_view(([with_image.len(), 3, h, w], flat.as_slice())).map_err(err)?;
        let outputs = encoder.run(ort::inputs!["sample" => tensor]).map_err(err)?;
        let (_, data) = outputs[self.io.vae_encoder_output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        let per = data.len() / with_image.len();
        let half = per / 2;
        let mut moments = data
            .chunks_exact(per)
            .map(|m| Some((m[..half].to_vec(), m[half..].to_vec())));
        Ok(batch
            .iter()
            .map(|i| {
                if i.image.is_some() {
                    moments.next().flatten()
                } else {
                    None
                }
            })
            .collect())
    }

    /// One step for each row, each at its own step: one network call for all their network rows,
    /// then each request's guidance and scheduler update. Rows share a model and a size; without a
    /// per-row timestep input they must also share the timestep.
    fn step_rows(&mut self, rows: &mut [&mut DiffusionRow]) -> Result<(), String> {
        let dims = rows[0].dims;
        if rows.iter().any(|r| r.dims != dims) {
            return Err("a diffusion step mixed sizes".into());
        }
        if rows.iter().any(|r| r.step >= r.plan.steps as usize) {
            return Err("a finished request was given another step".into());
        }
        if !self.io.timestep_per_row && rows.iter().any(|r| r.timestep() != rows[0].timestep()) {
            return Err("rows at different timesteps in one call of a UNet that takes one timestep".into());
        }
        let n: usize = dims.iter().product();
        let total_rows: usize = rows.iter().map(|r| r.plan.rows as usize).sum();
        let channels = if rows[0].state.image_latents.is_some() {
            2 * dims[0]
        } else {
            dims[0]
        };
        let (seq, dim) = rows[0].embedding_shape;
        let mut sample = Vec::with_capacity(total_rows * channels * dims[1] * dims[2]);
        let mut embeddings = Vec::with_capacity(total_rows * seq * dim);
        let mut timesteps = Vec::with_capacity(total_rows);
        let mut guidance_rows = Vec::with_capacity(total_rows);
        for row in rows.iter() {
            let mut scaled = row.state.latents.clone();
            row.state.scheduler.scale_model_input(&mut scaled, row.step);
            let span_rows = row.plan.rows as usize;
            for k in 0..span_rows {
                sample.extend_from_slice(&scaled);
                if let Some(image) = &row.state.image_latents {
                    // A guided edit's third row is unconditional on the image: zeros.
                    if span_rows == 3 && k == 2 {
                        sample.extend(std::iter::repeat_n(0.0, image.len()));
                    } else {
                        sample.extend_from_slice(image);
                    }
                }
                timesteps.push(row.timestep());
                guidance_rows.push(row.plan.guidance_scale);
            }
            embeddings.extend_from_slice(&row.embeddings);
        }
        if sample.len() != total_rows * channels * dims[1] * dims[2] || embeddings.len() != total_rows * seq * dim {
            return Err("a diffusion step mixed tasks or text encoders".into());
        }
        let started = std::time::Instant::now();
        let shape = [total_rows, channels, dims[1], dims[2]];
        let noise = self.unet_call(&sample, shape, &embeddings, (seq, dim), &timesteps, &guidance_rows)?;
        let seconds = started.elapsed().as_secs_f64();
        crate::metrics::observe_denoising_step(&self.name, rows.len(), total_rows, seconds);
        let mut first = 0;
        for row in rows.iter_mut() {
            let count = row.plan.rows as usize;
            let out = |r: usize| &noise[(first + r) * n..(first + r + 1) * n];
            let plan = &row.plan;
            let g = plan.guidance_scale;
            let prediction: Vec<f32> = match count {
                1 => out(0).to_vec(),
                2 => out(0).iter().zip(out(1)).map(|(u, c)| u + g * (c - u)).collect(),
                _ => {
                    let ig = plan.image_guidance_scale.unwrap_or(1.0);
                    let (text, image, uncond) = (out(0), out(1), out(2));
                    (0..n)
                        .map(|k| uncond[k] + g * (text[k] - image[k]) + ig * (image[k] - uncond[k]))
                        .collect()
                }
            };
            first += count;
            let step = row.step;
            let state = &mut row.state;
            state
                .scheduler
                .step(&prediction, step, &mut state.latents, &mut state.rng);
            row.step += 1;
        }
        Ok(())
    }

    fn unet_call(
        &mut self,
        sample: &[f32],
        shape: [usize; 4],
        embeddings: &[f32],
        (seq, dim): (usize, usize),
        timesteps: &[f32],
        guidance_rows: &[f32],
    ) -> Result<Vec<f32>, String> {
        let timesteps = if self.io.timestep_per_row {
            timesteps
        } else {
            &timesteps[..1]
        };
        let timesteps_i64: Vec<i64> = timesteps.iter().map(|&t| t.round() as i64).collect();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                "sample".into(),
                TensorRef::from_array_view((shape, sample)).map_err(err)?.into(),
            ),
            (
                "encoder_hidden_states".into(),
                TensorRef::from_array_view(([shape[0], seq, dim], embeddings))
                    .map_err(err)?
                    .into(),
            ),
        ];
        let timestep: SessionInputValue<'_> = match (self.io.timestep_type, self.io.timestep_per_row) {
            (TensorElementType::Int64, true) => TensorRef::from_array_view(([shape[0]], timesteps_i64.as_slice()))
                .map_err(err)?
                .into(),
            (TensorElementType::Int64, false) => TensorRef::from_array_view(((), timesteps_i64.as_slice()))
                .map_err(err)?
                .into(),
            (_, true) => TensorRef::from_array_view(([shape[0]], timesteps)).map_err(err)?.into(),
            (_, false) => TensorRef::from_array_view(((), timesteps)).map_err(err)?.into(),
        };
        inputs.push(("timestep".into(), timestep));
        let cond;
        if let (Some(name), Some(dim)) = (&self.io.timestep_cond, self.model.time_cond_proj_dim) {
            cond = guidance_rows
                .iter()
                .flat_map(|g| guidance_embedding(*g, dim))
                .collect::<Vec<f32>>();
            let tensor = TensorRef::from_array_view(([shape[0], dim], cond.as_slice())).map_err(err)?;
            inputs.push((name.as_str().into(), tensor.into()));
        }
        let outputs = self.unet.run(inputs).map_err(err)?;
        let (_, data) = outputs[self.io.unet_output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        Ok(data.to_vec())
    }

    /// Decode every row's latents in one VAE call; a non-finite value fails the call (so the
    /// engine retries its requests one by one and only the bad one fails).
    fn decode(&mut self, rows: &[&DiffusionRow]) -> Result<Vec<Vec<f32>>, String> {
        let dims = rows[0].dims;
        if rows.iter().any(|r| r.dims != dims) {
            return Err("a diffusion decode mixed sizes".into());
        }
        let scale = self.model.scaling_factor;
        let latents: Vec<f32> = rows
            .iter()
            .flat_map(|r| r.state.latents.iter().map(move |x| x / scale))
            .collect();
        let tensor =
            TensorRef::from_array_view(([rows.len(), dims[0], dims[1], dims[2]], latents.as_slice())).map_err(err)?;
        let outputs = self
            .vae_decoder
            .run(ort::inputs!["latent_sample" => tensor])
            .map_err(err)?;
        let (_, data) = outputs[self.io.vae_decoder_output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
            return Err(format!("the model produced {bad} (not a finite number) in the image"));
        }
        let per = data.len() / rows.len();
        Ok(data.chunks_exact(per).map(<[f32]>::to_vec).collect())
    }
}

impl Runner for DiffusionRunner {
    fn run(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Vec<f32>>, String> {
        let batch = inputs_of::<DiffusionInput>(inputs)?;
        self.run_batch(&batch)
    }

    fn stepper(&mut self) -> Option<&mut dyn StepRunner> {
        Some(self)
    }
}

impl StepRunner for DiffusionRunner {
    fn begin(&mut self, inputs: &[&ModelInput]) -> Result<Vec<Box<dyn StepRow>>, String> {
        let batch = inputs_of::<DiffusionInput>(inputs)?;
        let rows = self.begin_rows(&batch)?;
        Ok(rows.into_iter().map(|r| Box::new(r) as Box<dyn StepRow>).collect())
    }

    fn step(&mut self, rows: &mut [&mut dyn StepRow]) -> Result<(), String> {
        let mut own: Vec<&mut DiffusionRow> = rows
            .iter_mut()
            .map(|r| r.as_any_mut().downcast_mut::<DiffusionRow>().ok_or_else(not_ours))
            .collect::<Result<_, _>>()?;
        self.step_rows(&mut own)
    }

    fn finish(&mut self, rows: &[&dyn StepRow]) -> Result<Vec<Vec<f32>>, String> {
        let own: Vec<&DiffusionRow> = rows
            .iter()
            .map(|r| r.as_any().downcast_ref::<DiffusionRow>().ok_or_else(not_ours))
            .collect::<Result<_, _>>()?;
        self.decode(&own)
    }

    fn mixed_steps(&self) -> bool {
        self.io.timestep_per_row
    }
}

fn not_ours() -> String {
    "a step row of another kind of model".to_owned()
}

/// diffusers' `get_guidance_scale_embedding(w - 1, dim)`: sines and cosines of `(w − 1) × 1000`,
/// the guidance input of LCM-distilled UNets (`timestep_cond`).
pub fn guidance_embedding(guidance_scale: f32, dim: usize) -> Vec<f32> {
    let w = (guidance_scale - 1.0) * 1000.0;
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|k| (k as f32 * -step).exp()).collect();
    let mut emb: Vec<f32> = freqs.iter().map(|f| (w * f).sin()).collect();
    emb.extend(freqs.iter().map(|f| (w * f).cos()));
    emb.resize(dim, 0.0);
    emb
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Io {
    fn read(
        text_encoder: &Session,
        unet: &Session,
        vae_decoder: &Session,
        vae_encoder: Option<&Session>,
        model: &DiffusionModel,
    ) -> anyhow::Result<Self> {
        use crate::inference::runtime::check_names;
        let input = |s: &Session, name: &str| s.inputs().iter().find(|i| i.name() == name).map(|i| i.dtype().clone());
        check_names(text_encoder, &["input_ids"], &[]).map_err(|e| anyhow::anyhow!("text_encoder: {e}"))?;
        check_names(unet, &["sample", "timestep", "encoder_hidden_states"], &[])
            .map_err(|e| anyhow::anyhow!("unet: {e}"))?;
        check_names(vae_decoder, &["latent_sample"], &[]).map_err(|e| anyhow::anyhow!("vae_decoder: {e}"))?;
        if let Some(encoder) = vae_encoder {
            check_names(encoder, &["sample"], &[]).map_err(|e| anyhow::anyhow!("vae_encoder: {e}"))?;
        }
        let ids = input(text_encoder, "input_ids").and_then(|t| t.tensor_type());
        let ids_int32 = match ids {
            Some(TensorElementType::Int64) => false,
            Some(TensorElementType::Int32) => true,
            other => anyhow::bail!("text_encoder: input_ids is {other:?}; kiln feeds int64 or int32"),
        };
        let timestep = input(unet, "timestep").expect("checked above");
        let timestep_type = timestep.tensor_type().unwrap_or(TensorElementType::Float32);
        anyhow::ensure!(
            matches!(timestep_type, TensorElementType::Float32 | TensorElementType::Int64),
            "unet: timestep is {timestep_type:?}; kiln feeds float32 or int64"
        );
        let timestep_per_row = timestep.tensor_shape().is_some_and(|s| !s.is_empty());
        for (session, name, part) in [(unet, "sample", "unet"), (vae_decoder, "latent_sample", "vae_decoder")] {
            let ty = input(session, name).and_then(|t| t.tensor_type());
            anyhow::ensure!(
                ty == Some(TensorElementType::Float32),
                "{part}: {name} is {ty:?}; kiln runs float32 exports (export without --fp16)"
            );
        }
        let timestep_cond = input(unet, "timestep_cond").map(|_| "timestep_cond".to_owned());
        anyhow::ensure!(
            timestep_cond.is_some() == model.time_cond_proj_dim.is_some(),
            "unet: the config's time_cond_proj_dim ({:?}) and the ONNX input timestep_cond ({}) disagree",
            model.time_cond_proj_dim,
            if timestep_cond.is_some() { "present" } else { "absent" }
        );
        let output = |s: &Session, preferred: &str| {
            s.outputs()
                .iter()
                .find(|o| o.name() == preferred)
                .or_else(|| s.outputs().first())
                .map(|o| o.name().to_owned())
                .unwrap_or_else(|| preferred.to_owned())
        };
        Ok(Self {
            ids_int32,
            text_output: output(text_encoder, "last_hidden_state"),
            timestep_type,
            timestep_per_row,
            timestep_cond,
            unet_output: output(unet, "out_sample"),
            vae_decoder_output: output(vae_decoder, "sample"),
            vae_encoder_output: vae_encoder
                .map_or_else(|| "latent_parameters".into(), |e| output(e, "latent_parameters")),
        })
    }
}
