//! Diffusion: the worker end to end against a raw ONNX Runtime pipeline loop, in one run
//! (`scripts/bench-diffusion.sh`).
//!
//! For each batch size: the raw loop (text encoder for the batch's rows, `steps` UNet calls on
//! `[2 × batch, 4, h, w]` with classifier-free guidance and the Euler update, one VAE decode; the
//! same model files, session options and thread count as the worker), then a `kiln worker` serving
//! only that model with `batching.max_batch_size` = the batch size, sent `4 × batch` text-to-image
//! requests at once through RabbitMQ (same size, steps, scheduler; a seed each), timed from the
//! first publish to the last reply. Rounds alternate raw and worker, so drift hits both alike;
//! the report gives worker ÷ raw per round and their mean. Also: the time of one UNet call by
//! batch size (rows = 2 × batch), and per image-step.
//!
//! `KILN_*` applies to the raw sessions and to the worker alike (CUDA on a GPU machine).
//! Prints Markdown tables and writes `target/bench/diffusion_throughput.json`.

mod common;

use std::time::{Duration, Instant};

use common::{mean, repo, settings, Worker};
use kiln::amqp::Topology;
use kiln::diffusion::scheduler::{self, SchedulerConfig, SchedulerKind};
use kiln::diffusion::tokenizer::ClipTokenizer;
use kiln::domain::{ReplyStatus, WireParams};
use kiln::inference::Runtime;
use kiln::submit::{new_request, Producer};
use ort::session::Session;
use ort::value::TensorRef;

struct Args {
    model: String,
    size: u32,
    steps: usize,
    batches: Vec<usize>,
    threads: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        model: "sd-tiny-random".into(),
        size: 256,
        steps: 20,
        batches: vec![1, 2, 4],
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        rounds: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--model", Some(v)) => a.model = v.clone(),
            ("--size", Some(v)) => a.size = v.parse().unwrap(),
            ("--steps", Some(v)) => a.steps = v.parse().unwrap(),
            ("--batches", Some(v)) => a.batches = v.split(',').map(|s| s.parse().unwrap()).collect(),
            ("--threads", Some(v)) => a.threads = v.parse().unwrap(),
            ("--rounds", Some(v)) => a.rounds = v.parse().unwrap(),
            _ => panic!(
                "usage: diffusion_throughput [--model sd-tiny-random] [--size 256] [--steps 20] [--batches 1,2,4] [--threads N] [--rounds R]"
            ),
        }
    }
    a
}

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

/// The model's three sessions, run by hand.
struct RawPipeline {
    text_encoder: Session,
    unet: Session,
    vae_decoder: Session,
    config: SchedulerConfig,
    prompt: Vec<i64>,
    empty: Vec<i64>,
}

/// What one raw batch took.
struct RawRun {
    seconds: f64,
    unet_seconds: Vec<f64>,
}

impl RawPipeline {
    /// The model `model` in `models_dir` (`models.dir`: `KILN_MODELS__DIR` moves it, for the worker
    /// too).
    fn load(runtime: &Runtime, models_dir: &std::path::Path, model: &str) -> Self {
        let dir = repo().join(models_dir).join(model);
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
        let config =
            SchedulerConfig::from_json(&std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).unwrap())
                .unwrap();
        let session = |part: &str| runtime.session(&dir.join(part).join("model.onnx")).unwrap();
        Self {
            text_encoder: session("text_encoder"),
            unet: session("unet"),
            vae_decoder: session("vae_decoder"),
            config,
            prompt: tokenizer.encode(PROMPT).ids,
            empty: tokenizer.encode("").ids,
        }
    }

    /// One text-to-image batch of `batch` requests with guidance 7.5: the whole loop.
    fn run(&mut self, batch: usize, size: u32, steps: usize) -> RawRun {
        let started = Instant::now();
        let rows = 2 * batch;
        let ids: Vec<i64> = (0..batch)
            .flat_map(|_| [self.empty.clone(), self.prompt.clone()].concat())
            .collect();
        let out = self
            .text_encoder
            .run(ort::inputs!["input_ids" => TensorRef::from_array_view(([rows, 77], ids.as_slice())).unwrap()])
            .unwrap();
        let (shape, hidden) = out["last_hidden_state"].try_extract_tensor::<f32>().unwrap();
        let (seq, dim) = (shape[1] as usize, shape[2] as usize);
        let hidden = hidden.to_vec();
        drop(out);
        let side = (size / 8) as usize;
        let n = 4 * side * side;
        let scheduler = scheduler::build(SchedulerKind::Euler, &self.config, steps).unwrap();
        let mut rng = kiln::diffusion::noise::TorchGenerator::new(0);
        let sigma = scheduler.init_noise_sigma();
        let mut latents: Vec<Vec<f32>> = (0..batch)
            .map(|_| rng.randn(n).into_iter().map(|x| x * sigma).collect())
            .collect();
        let mut unet_seconds = Vec::with_capacity(steps);
        for i in 0..steps {
            let mut sample = Vec::with_capacity(rows * n);
            for l in &latents {
                let mut scaled = l.clone();
                scheduler.scale_model_input(&mut scaled, i);
                sample.extend_from_slice(&scaled);
                sample.extend_from_slice(&scaled);
            }
            let t = [scheduler.timesteps()[i]];
            let call = Instant::now();
            let out = self
                .unet
                .run(ort::inputs![
                    "sample" => TensorRef::from_array_view(([rows, 4, side, side], sample.as_slice())).unwrap(),
                    "timestep" => TensorRef::from_array_view(((), &t[..])).unwrap(),
                    "encoder_hidden_states" => TensorRef::from_array_view(([rows, seq, dim], hidden.as_slice())).unwrap(),
                ])
                .unwrap();
            unet_seconds.push(call.elapsed().as_secs_f64());
            let (_, noise) = out["out_sample"].try_extract_tensor::<f32>().unwrap();
            for (r, l) in latents.iter_mut().enumerate() {
                let (u, c) = (
                    &noise[2 * r * n..(2 * r + 1) * n],
                    &noise[(2 * r + 1) * n..(2 * r + 2) * n],
                );
                let guided: Vec<f32> = u.iter().zip(c).map(|(u, c)| u + 7.5 * (c - u)).collect();
                scheduler.step(&guided, i, l, &mut rng);
            }
        }
        let flat: Vec<f32> = latents.iter().flatten().map(|x| x / 0.18215).collect();
        let out = self
            .vae_decoder
            .run(ort::inputs![
                "latent_sample" => TensorRef::from_array_view(([batch, 4, side, side], flat.as_slice())).unwrap()
            ])
            .unwrap();
        std::hint::black_box(&out);
        RawRun {
            seconds: started.elapsed().as_secs_f64(),
            unet_seconds,
        }
    }
}

/// Publish `count` requests at once; images/s from the first publish to the last reply, and the
/// batch sizes the worker reported.
async fn worker_images_per_second(producer: &mut Producer, args: &Args, count: usize) -> (f64, Vec<usize>) {
    let requests: Vec<_> = (0..count)
        .map(|i| {
            let params = WireParams {
                prompt: Some(PROMPT.into()),
                steps: Some(args.steps as i64),
                guidance_scale: Some(7.5),
                scheduler: Some("euler".into()),
                width: Some(i64::from(args.size)),
                height: Some(i64::from(args.size)),
                seed: Some((i as u64).into()),
                ..Default::default()
            };
            new_request("bench", &args.model, params, None)
        })
        .collect();
    let started = Instant::now();
    for r in &requests {
        producer.send(r).await.unwrap();
    }
    let mut batches = Vec::new();
    for _ in 0..count {
        let reply = producer.next_reply(Duration::from_secs(1800)).await.unwrap();
        assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
        batches.push(reply.document.batch_size.unwrap_or(0));
    }
    (count as f64 / started.elapsed().as_secs_f64(), batches)
}

fn main() {
    let args = args();
    let base = settings(args.threads);
    let runtime = Runtime::init(&base.inference).expect("ONNX Runtime (run scripts/setup.sh)");
    let mut raw = RawPipeline::load(&runtime, &base.models.dir, &args.model);
    let rt = tokio::runtime::Runtime::new().unwrap();
    eprintln!(
        "provider {}, model {}, {} px, {} steps, threads {}",
        runtime.provider().name(),
        args.model,
        args.size,
        args.steps,
        args.threads
    );
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let env = [
            ("KILN_MODELS__ENABLED", args.model.clone()),
            ("KILN_BATCHING__MAX_BATCH_SIZE", batch.to_string()),
            // Whole batches of equal requests, as the raw loop runs them (step-level batching is
            // compared with whole-request batching by scripts/bench-step-batching.sh).
            ("KILN_BATCHING__DIFFUSION__MODE", "request".to_owned()),
            ("KILN_AMQP__PREFETCH", (4 * batch).max(16).to_string()),
        ];
        let worker = Worker::spawn(args.threads, &env);
        let cold_start = worker.cold_start;
        let queue = Topology::new(&worker.settings.amqp.topology).requests;
        let mut producer = rt
            .block_on(Producer::connect(&worker.settings.amqp.url, &queue))
            .unwrap();
        raw.run(batch, args.size, 2); // warm-up at this shape
        rt.block_on(worker_images_per_second(&mut producer, &args, batch));
        let (mut raw_rates, mut worker_rates, mut unet_ms, mut seen) = (vec![], vec![], vec![], vec![]);
        for _ in 0..args.rounds {
            let r = raw.run(batch, args.size, args.steps);
            raw_rates.push(batch as f64 / r.seconds);
            unet_ms.push(1000.0 * mean(&r.unet_seconds));
            let (rate, batches) = rt.block_on(worker_images_per_second(&mut producer, &args, 4 * batch));
            worker_rates.push(rate);
            seen.extend(batches);
        }
        rt.block_on(producer.close());
        let rss = worker.stop(&rt);
        let ratios: Vec<f64> = raw_rates.iter().zip(&worker_rates).map(|(r, w)| w / r).collect();
        let unet = mean(&unet_ms);
        eprintln!("batch {batch}: raw {raw_rates:.3?} img/s, worker {worker_rates:.3?} img/s");
        rows.push(serde_json::json!({
            "batch": batch, "raw_images_per_second": raw_rates, "worker_images_per_second": worker_rates,
            "raw_mean": mean(&raw_rates), "worker_mean": mean(&worker_rates), "ratio": mean(&worker_rates) / mean(&raw_rates),
            "paired_ratios": ratios, "unet_call_ms": unet, "unet_ms_per_image_step": unet / batch as f64,
            "worker_batch_sizes_seen": seen, "worker_peak_rss_mib": rss, "worker_cold_start_seconds": cold_start,
        }));
    }
    let report = serde_json::json!({
        "provider": runtime.provider().name(), "model": args.model, "size": args.size, "steps": args.steps,
        "threads": args.threads, "rounds": args.rounds, "rows": rows,
    });
    std::fs::create_dir_all(repo().join("target/bench")).unwrap();
    std::fs::write(
        repo().join("target/bench/diffusion_throughput.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!(
        "\n{} px, {} Euler steps, guidance 7.5 (2 UNet rows per image), {} threads, {}\n",
        args.size,
        args.steps,
        args.threads,
        runtime.provider().name()
    );
    println!(
        "| batch | raw loop img/s (mean of {0}) | worker img/s (mean of {0}) | worker ÷ raw | per-round ratios | UNet call ms (rows = 2 × batch) | UNet ms per image-step |",
        args.rounds
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let paired: Vec<String> = r["paired_ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| format!("{:.3}", x.as_f64().unwrap()))
            .collect();
        println!(
            "| {} | {:.3} | {:.3} | **{:.3}** | {} | {:.1} | {:.1} |",
            r["batch"],
            r["raw_mean"].as_f64().unwrap(),
            r["worker_mean"].as_f64().unwrap(),
            r["ratio"].as_f64().unwrap(),
            paired.join(", "),
            r["unet_call_ms"].as_f64().unwrap(),
            r["unet_ms_per_image_step"].as_f64().unwrap(),
        );
    }
}
