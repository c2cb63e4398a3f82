//! Worker throughput against the raw model, in one run (run with `scripts/bench.sh`).
//!
//! For each size and batch size: raw ONNX Runtime images/s (a tight loop on a preloaded batch of
//! tensors, mixed styles, the same session options and thread count as the worker), then end-to-end
//! images/s of a worker whose `batching.max_batch_size` is that batch size (publish N requests with
//! mixed styles to RabbitMQ, time until the last reply), alternating for `--rounds` rounds so drift
//! hits both alike. From those, the batching gain: best batch ÷ batch 1, raw and worker, and the
//! share of the raw gain the worker captures. Also: cold start of `kiln worker` to ready, its peak
//! RSS, and where the per-request time goes.
//!
//! With `--raw-variants fp16` (any variants the model's manifest lists), each raw round also times
//! those files on the same inputs, and the report adds their images/s ÷ the default file's and the
//! PSNR of their 8-bit outputs against the default's: the speed and quality of a reduced-precision
//! variant on the provider in use. `bound` (alone or as `fp16+bound`) times a file through an
//! IoBinding on tensors in pinned host memory (CUDA) or ONNX Runtime's CPU allocator (CPU) instead
//! of views of kiln's buffers: what `inference.cuda.pinned_io` changes. With
//! `KILN_INFERENCE__CUDA__PINNED_IO=true` the default file's raw rounds are bound too, like the
//! worker's batches.
//!
//! The `KILN_*` environment applies to the raw sessions and to the worker processes alike, so on a
//! GPU machine `KILN_INFERENCE__EXECUTION_PROVIDER=cuda KILN_INFERENCE__RUNTIME_LIBRARY=...` makes
//! every figure a CUDA one (scripts/bench.sh).
//!
//! Prints a Markdown table and writes `target/bench/worker_throughput.json`.

mod common;

use std::io::Cursor;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{mean, repo, settings, Worker};

use kiln::amqp::Topology;
use kiln::configuration::Settings;
use kiln::domain::{ReplyStatus, RequestDocument, WireImage, WireParams, WireStyle, CONTRACT_VERSION};
use kiln::imaging::{Layout, ValueRange};
use kiln::inference::tensor_io::{BoundIo, TensorIo};
use kiln::inference::{ActiveProvider, Runtime};
use kiln::submit::{new_request, Producer};
use ort::value::TensorRef;

struct Args {
    sizes: Vec<u32>,
    batches: Vec<usize>,
    threads: usize,
    seconds: f64,
    rounds: usize,
    raw_variants: Vec<String>,
    raw_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        sizes: vec![256, 512],
        batches: vec![1, 4],
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        seconds: 5.0,
        rounds: 6,
        raw_variants: Vec::new(),
        raw_only: false,
    };
    let mut argv: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    if let Some(i) = argv.iter().position(|s| s == "--raw-only") {
        a.raw_only = true;
        argv.remove(i);
    }
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--sizes", Some(v)) => a.sizes = v.split(',').map(|s| s.parse().unwrap()).collect(),
            ("--batches", Some(v)) => a.batches = v.split(',').map(|s| s.parse().unwrap()).collect(),
            ("--threads", Some(v)) => a.threads = v.parse().unwrap(),
            ("--seconds", Some(v)) => a.seconds = v.parse().unwrap(),
            ("--rounds", Some(v)) => a.rounds = v.parse().unwrap(),
            ("--raw-variants", Some(v)) => a.raw_variants = v.split(',').map(str::to_owned).collect(),
            _ => panic!(
                "usage: worker_throughput [--sizes 256,512] [--batches 1,4] [--threads N] [--seconds S] [--rounds R] [--raw-variants fp16,bound,fp16+bound] [--raw-only]"
            ),
        }
    }
    a
}

/// The multistyle26 file the settings serve (`variant`: another one its manifest lists).
fn model_file(settings: &Settings, variant: Option<&str>) -> PathBuf {
    let mut manifest = kiln::inference::Manifest::load(&repo().join("models/multistyle26")).unwrap();
    if let Some(v) = variant.or(settings.models.variants.get("multistyle26").map(String::as_str)) {
        manifest.select_variant(v).unwrap();
    }
    manifest.files_in_use().remove(0)
}

/// A file to time raw: the default file or a variant, through views of host buffers or bound
/// tensors (`+bound`: pinned host memory and an IoBinding on CUDA, ONNX Runtime's CPU allocator on
/// CPU; see `inference.cuda.pinned_io`).
struct RawFile {
    name: String,
    file: PathBuf,
    io: TensorIo,
}

impl RawFile {
    /// `fp16`, `bound`, `fp16+bound`: a variant the manifest lists and/or `bound`.
    fn parse(spec: &str, settings: &Settings, runtime: &Runtime) -> Self {
        let bound = spec.split('+').any(|p| p == "bound");
        let variant = spec.split('+').find(|&p| p != "bound");
        Self {
            name: spec.to_owned(),
            file: model_file(settings, variant),
            io: if bound { bound_io(runtime) } else { runtime.tensor_io() },
        }
    }
}

/// Bound tensors on the provider in use: pinned memory of the GPU on CUDA, the CPU allocator else.
fn bound_io(runtime: &Runtime) -> TensorIo {
    match runtime.provider() {
        ActiveProvider::Cuda { device_id } => TensorIo::Bound {
            pinned: Some(device_id),
        },
        _ => TensorIo::Bound { pinned: None },
    }
}

/// Raw model throughput: `session.run` on a preloaded `[batch, 3, size, size]` tensor of the photo
/// with a different style per sample, for `seconds` (with bound tensors: `run_binding` on tensors
/// preloaded in the bound memory, the output bound to it too). Also returns the last output.
fn raw_images_per_second(
    runtime: &Runtime,
    model: &RawFile,
    photo: &[u8],
    size: u32,
    batch: usize,
    seconds: f64,
) -> (f64, Vec<f32>) {
    let mut session = runtime.session(&model.file).unwrap();
    let s = size as usize;
    // The same photo the worker gets, as the tensor the worker would build from it: content
    // matters (a flat grey image would skip the real activations' arithmetic).
    let rgb = image::load_from_memory(photo).unwrap().into_rgb8();
    let mut image = vec![0.0f32; 3 * s * s];
    kiln::imaging::tensor::write_tensor(
        &rgb,
        size,
        size,
        Layout::Nchw,
        ValueRange { low: 0.0, high: 1.0 },
        &mut image,
    );
    let images = image.repeat(batch);
    let mut weights = vec![0.0f32; 26 * batch];
    for i in 0..batch {
        weights[26 * i + (7 + i) % 26] = 1.0;
    }
    let binding = match model.io {
        TensorIo::Views => None,
        TensorIo::Bound { pinned } => {
            let io = BoundIo::new(&session, pinned).unwrap();
            let mut binding = session.create_binding().unwrap();
            let image_tensor = io.tensor(&[batch, 3, s, s], std::iter::repeat_n(image.as_slice(), batch));
            let weights_tensor = io.tensor(&[batch, 26], weights.chunks_exact(26));
            binding.bind_input("image", &image_tensor.unwrap()).unwrap();
            binding.bind_input("style_weights", &weights_tensor.unwrap()).unwrap();
            binding.bind_output_to_device("stylized", io.output()).unwrap();
            Some(binding)
        }
    };
    let mut run = |keep: bool| {
        let out = match &binding {
            Some(binding) => session.run_binding(binding).unwrap(),
            None => session
                .run(ort::inputs![
                    "image" => TensorRef::from_array_view(([batch, 3, s, s], images.as_slice())).unwrap(),
                    "style_weights" => TensorRef::from_array_view(([batch, 26], weights.as_slice())).unwrap(),
                ])
                .unwrap(),
        };
        std::hint::black_box(&out);
        keep.then(|| out["stylized"].try_extract_tensor::<f32>().unwrap().1.to_vec())
    };
    let output = run(true).expect("kept"); // warm-up
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed().as_secs_f64() < seconds || n < 3 {
        run(false);
        n += 1;
    }
    (f64::from(n) * batch as f64 / started.elapsed().as_secs_f64(), output)
}

/// `--raw-only`: the model file alone (and its variants), no broker, no worker: images/s per size
/// and batch, variants ÷ default and their PSNR. Writes `target/bench/raw_variants.json`.
fn raw_only(args: &Args, runtime: &Runtime, model: &RawFile, variants: &[RawFile]) {
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let photo = jpeg_of_size(size);
        for &batch in &args.batches {
            let mut raw = RawRounds::new(runtime, model, variants);
            for _ in 0..args.rounds {
                raw.round(&photo, size, batch, args.seconds);
            }
            rows.push(serde_json::json!({
                "size": size, "batch": batch, "raw_images_per_second": raw.default,
                "raw_mean": mean(&raw.default), "raw_variants": raw.variants_json(),
            }));
        }
    }
    print_variant_table(args.rounds, &rows);
    let report = serde_json::json!({
        "provider": runtime.provider().name(), "threads": args.threads, "rows": rows,
    });
    std::fs::create_dir_all(repo().join("target/bench")).unwrap();
    std::fs::write(
        repo().join("target/bench/raw_variants.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
}

/// Raw rounds of the default file and of each variant on the same batch, one after the other:
/// images/s per round of each, and each variant's worst PSNR against the default's output.
struct RawRounds<'a> {
    runtime: &'a Runtime,
    model: &'a RawFile,
    variants: &'a [RawFile],
    default: Vec<f64>,
    rates: Vec<Vec<f64>>,
    worst_psnr: Vec<f64>,
}

impl<'a> RawRounds<'a> {
    fn new(runtime: &'a Runtime, model: &'a RawFile, variants: &'a [RawFile]) -> Self {
        Self {
            runtime,
            model,
            variants,
            default: Vec::new(),
            rates: vec![Vec::new(); variants.len()],
            worst_psnr: vec![f64::INFINITY; variants.len()],
        }
    }

    /// One round of each file; returns the default file's images/s.
    fn round(&mut self, photo: &[u8], size: u32, batch: usize, seconds: f64) -> f64 {
        let (rate, reference) = raw_images_per_second(self.runtime, self.model, photo, size, batch, seconds);
        self.default.push(rate);
        for (i, file) in self.variants.iter().enumerate() {
            let (v, output) = raw_images_per_second(self.runtime, file, photo, size, batch, seconds);
            self.rates[i].push(v);
            self.worst_psnr[i] = self.worst_psnr[i].min(psnr(&output, &reference));
        }
        rate
    }

    /// Per variant: images/s per round, mean, ÷ the default's mean, per-round ratios, worst PSNR.
    fn variants_json(&self) -> Vec<serde_json::Value> {
        let default_mean = mean(&self.default);
        self.variants
            .iter()
            .zip(&self.rates)
            .zip(&self.worst_psnr)
            .map(|((file, rates), psnr)| {
                let paired: Vec<f64> = rates.iter().zip(&self.default).map(|(v, r)| v / r).collect();
                serde_json::json!({
                    "variant": file.name, "tensor_io": format!("{:?}", file.io), "images_per_second": rates, "mean": mean(rates),
                    "ratio_to_default": mean(rates) / default_mean,
                    "paired_ratios": paired, "min_psnr_db": psnr,
                })
            })
            .collect()
    }
}

/// The default file's raw images/s and each variant's against it, per size and batch.
fn print_variant_table(rounds: usize, rows: &[serde_json::Value]) {
    println!(
        "\n| size | batch | file | raw img/s (mean of {rounds}) | ÷ default raw | per-round ratios | worst PSNR vs default |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | default | {:.2} | - | - | - |",
            r["size"],
            r["batch"],
            r["raw_mean"].as_f64().unwrap()
        );
        for v in r["raw_variants"].as_array().unwrap() {
            let paired: Vec<String> = v["paired_ratios"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| format!("{:.2}", x.as_f64().unwrap()))
                .collect();
            println!(
                "| {} | {} | {} | {:.2} | **{:.3}** | {} | {:.1} dB |",
                r["size"],
                r["batch"],
                v["variant"].as_str().unwrap(),
                v["mean"].as_f64().unwrap(),
                v["ratio_to_default"].as_f64().unwrap(),
                paired.join(", "),
                v["min_psnr_db"].as_f64().unwrap(),
            );
        }
    }
}

/// PSNR (dB) of two model outputs in [0, 1] after 8-bit quantisation, as the worker quantises.
fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round();
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(q(*x) - q(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

struct WorkerRun {
    images_per_second: f64,
    preprocess_ms: f64,
    inference_ms: f64,
    encode_ms: f64,
    request_bytes: usize,
    reply_bytes: usize,
}

/// End-to-end: publish `count` requests at once, time from the first publish to the last reply.
async fn worker_images_per_second(producer: &mut Producer, photo: &[u8], count: usize) -> WorkerRun {
    let requests: Vec<RequestDocument> = (0..count)
        .map(|i| {
            let params = WireParams {
                style: Some(WireStyle::Index((7 + i as i64) % 26)),
                ..Default::default()
            };
            new_request("bench", "multistyle26", params, Some(photo))
        })
        .collect();
    let request_bytes = serde_json::to_vec(&requests[0]).unwrap().len();
    let started = Instant::now();
    for r in &requests {
        producer.send(r).await.unwrap();
    }
    let (mut pre, mut inf, mut enc, mut reply_bytes) = (0.0, 0.0, 0.0, 0);
    for _ in 0..count {
        let reply = producer.next_reply(Duration::from_secs(600)).await.unwrap();
        assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
        let t = &reply.document.timings_ms;
        (pre, inf, enc) = (pre + t.preprocess, inf + t.inference, enc + t.encode);
        reply_bytes += reply.body.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = count as f64;
    WorkerRun {
        images_per_second: n / elapsed,
        preprocess_ms: pre / n,
        inference_ms: inf / n,
        encode_ms: enc / n,
        request_bytes,
        reply_bytes: reply_bytes / count,
    }
}

fn jpeg_of_size(size: u32) -> Vec<u8> {
    let photo = image::open(repo().join("samples/astronaut.jpg")).unwrap();
    let resized = photo.resize_exact(size, size, image::imageops::Lanczos3).into_rgb8();
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&resized)
        .unwrap();
    out.into_inner()
}

/// What the wire encoding and PNG compression cost per image (milliseconds, this process, one core).
fn wire_costs(size: u32) -> serde_json::Value {
    use image::ImageEncoder;
    let photo = jpeg_of_size(size);
    let stylized = image::open(repo().join("tests/data/ref-style7.png"))
        .unwrap()
        .resize_exact(size, size, image::imageops::Lanczos3)
        .into_rgb8();
    let time = |n: u32, mut f: Box<dyn FnMut() -> usize>| {
        let started = Instant::now();
        let mut bytes = 0;
        for _ in 0..n {
            bytes = f();
        }
        (started.elapsed().as_secs_f64() * 1000.0 / f64::from(n), bytes)
    };
    let png = |compression: image::codecs::png::CompressionType| {
        let img = stylized.clone();
        Box::new(move || {
            let mut out = Vec::new();
            image::codecs::png::PngEncoder::new_with_quality(
                &mut out,
                compression,
                image::codecs::png::FilterType::Paeth,
            )
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .unwrap();
            out.len()
        }) as Box<dyn FnMut() -> usize>
    };
    let (fast_ms, fast_bytes) = time(20, png(image::codecs::png::CompressionType::Fast));
    let (default_ms, default_bytes) = time(3, png(image::codecs::png::CompressionType::Default));
    let kiln_png = kiln::imaging::encode_png(&stylized).len();
    let doc = RequestDocument {
        version: CONTRACT_VERSION,
        request_id: "r".into(),
        user_id: "u".into(),
        model: "multistyle26".into(),
        params: WireParams::default(),
        image: Some(WireImage::from_bytes(&photo)),
        deadline: None,
        created_at: None,
        tier: None,
        progress: false,
    };
    let body = serde_json::to_vec(&doc).unwrap();
    let (parse_ms, _) = time(
        50,
        Box::new(move || {
            kiln::domain::GenerationRequest::parse(&body, usize::MAX)
                .unwrap()
                .image
                .map_or(0, |i| i.len())
        }),
    );
    serde_json::json!({
        "size": size, "jpeg_bytes": photo.len(), "request_json_bytes": serde_json::to_vec(&doc).unwrap().len(),
        "request_parse_and_base64_ms": parse_ms, "png_fast_ms": fast_ms, "png_fast_bytes": fast_bytes,
        "png_default_ms": default_ms, "png_default_bytes": default_bytes, "kiln_png_bytes": kiln_png,
    })
}

fn main() {
    let args = args();
    let base = settings(args.threads);
    let runtime = Runtime::init(&base.inference).expect("ONNX Runtime (run scripts/setup.sh)");
    let model = RawFile {
        name: "default".into(),
        file: model_file(&base, None),
        io: runtime.tensor_io(),
    };
    let variants: Vec<RawFile> = args
        .raw_variants
        .iter()
        .map(|v| RawFile::parse(v, &base, &runtime))
        .collect();
    eprintln!(
        "provider {}, model {} ({:?}), raw variants {:?}",
        runtime.provider().name(),
        model.file.display(),
        model.io,
        variants.iter().map(|v| (&v.name, &v.io)).collect::<Vec<_>>()
    );
    if args.raw_only {
        return raw_only(&args, &runtime, &model, &variants);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let workers: Vec<(usize, Worker)> = args
        .batches
        .iter()
        .map(|&b| {
            let env = [
                ("KILN_BATCHING__MAX_BATCH_SIZE", b.to_string()),
                ("KILN_AMQP__PREFETCH", (4 * b).max(16).to_string()),
                ("KILN_MODELS__ENABLED", "multistyle26,arbitrary-style".to_owned()),
            ];
            (b, Worker::spawn(args.threads, &env))
        })
        .collect();
    let cold_start = workers[0].1.cold_start;
    let mut producers: Vec<Producer> = workers
        .iter()
        .map(|(_, w)| {
            let queue = Topology::new(&w.settings.amqp.topology).requests;
            rt.block_on(Producer::connect(&w.settings.amqp.url, &queue)).unwrap()
        })
        .collect();

    let mut rows = Vec::new();
    for &size in &args.sizes {
        let photo = jpeg_of_size(size);
        for ((batch, _), producer) in workers.iter().zip(&mut producers) {
            let batch = *batch;
            rt.block_on(worker_images_per_second(producer, &photo, 2 * batch)); // warm-up at this size
            let mut raw_rounds = RawRounds::new(&runtime, &model, &variants);
            let mut e2e = Vec::new();
            for _ in 0..args.rounds {
                let r = raw_rounds.round(&photo, size, batch, args.seconds);
                let count = ((r * args.seconds).round() as usize).max(4 * batch);
                e2e.push(rt.block_on(worker_images_per_second(producer, &photo, count)));
            }
            let raw_variants = raw_rounds.variants_json();
            let raw = raw_rounds.default;
            let raw_mean = mean(&raw);
            let e2e_mean = e2e.iter().map(|w| w.images_per_second).sum::<f64>() / e2e.len() as f64;
            let last = e2e.last().unwrap();
            // Each round's worker rate over the raw rate just before it: how much noise is in the mean.
            let mut paired: Vec<f64> = raw.iter().zip(&e2e).map(|(r, w)| w.images_per_second / r).collect();
            paired.sort_by(f64::total_cmp);
            rows.push(serde_json::json!({
                "size": size,
                "batch": batch,
                "raw_images_per_second": raw,
                "worker_images_per_second": e2e.iter().map(|w| w.images_per_second).collect::<Vec<_>>(),
                "raw_mean": raw_mean,
                "worker_mean": e2e_mean,
                "ratio": e2e_mean / raw_mean,
                "paired_ratios_sorted": paired,
                "worker_mean_ms": {"preprocess": last.preprocess_ms, "inference": last.inference_ms, "encode": last.encode_ms},
                "request_bytes": last.request_bytes,
                "reply_png_bytes": last.reply_bytes,
                "raw_variants": raw_variants,
            }));
            eprintln!(
                "size {size} batch {batch}: raw {raw:.2?} img/s, worker {:.2?} img/s",
                e2e.iter().map(|w| w.images_per_second).collect::<Vec<_>>()
            );
        }
    }
    for producer in producers {
        rt.block_on(producer.close());
    }
    let rss = workers.into_iter().map(|(_, w)| w.stop(&rt)).fold(0.0f64, f64::max);

    // Batching gain per size: best batch ÷ batch 1, raw and worker.
    let gains: Vec<serde_json::Value> = args
        .sizes
        .iter()
        .filter_map(|&size| {
            let of = |batch: usize, key: &str| {
                rows.iter()
                    .find(|r| r["size"] == size && r["batch"] == batch)
                    .map(|r| r[key].as_f64().unwrap())
            };
            let (raw1, worker1) = (of(1, "raw_mean")?, of(1, "worker_mean")?);
            let best_raw = args
                .batches
                .iter()
                .filter_map(|&b| of(b, "raw_mean"))
                .fold(0.0, f64::max);
            let best_worker = args
                .batches
                .iter()
                .filter_map(|&b| of(b, "worker_mean"))
                .fold(0.0, f64::max);
            let (raw_gain, worker_gain) = (best_raw / raw1, best_worker / worker1);
            Some(serde_json::json!({
                "size": size, "raw_gain": raw_gain, "worker_gain": worker_gain,
                "captured": worker_gain / raw_gain,
            }))
        })
        .collect();

    let wire: Vec<serde_json::Value> = args.sizes.iter().map(|&size| wire_costs(size)).collect();
    let report = serde_json::json!({
        "provider": runtime.provider().name(),
        "model": model.file.strip_prefix(repo()).unwrap_or(&model.file), "tensor_io": format!("{:?}", model.io),
        "wire": wire,
        "threads": args.threads,
        "cold_start_seconds": cold_start,
        "worker_peak_rss_mib": rss,
        "sizes": rows,
        "batching_gain": gains,
    });
    std::fs::create_dir_all(repo().join("target/bench")).unwrap();
    std::fs::write(
        repo().join("target/bench/worker_throughput.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();

    println!(
        "threads: {}; cold start to ready: {cold_start:.2} s; worker peak RSS: {rss:.0} MiB\n",
        args.threads
    );
    println!(
        "| size | batch | raw ort img/s (mean of {0}) | worker img/s (mean of {0}) | worker ÷ raw | per-round ratios, min–max | worker ms: decode+resize / inference / PNG | request / reply bytes |",
        args.rounds
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let paired = r["paired_ratios_sorted"].as_array().unwrap();
        let ms = &r["worker_mean_ms"];
        println!(
            "| {} | {} | {:.2} | {:.2} | **{:.3}** | {:.2}–{:.2} | {:.1} / {:.1} / {:.1} | {} / {} |",
            r["size"],
            r["batch"],
            r["raw_mean"].as_f64().unwrap(),
            r["worker_mean"].as_f64().unwrap(),
            r["ratio"].as_f64().unwrap(),
            paired.first().unwrap().as_f64().unwrap(),
            paired.last().unwrap().as_f64().unwrap(),
            ms["preprocess"].as_f64().unwrap(),
            ms["inference"].as_f64().unwrap(),
            ms["encode"].as_f64().unwrap(),
            r["request_bytes"],
            r["reply_png_bytes"],
        );
    }
    println!("\n| size | raw gain (best batch ÷ batch 1) | worker gain | worker gain ÷ raw gain |");
    println!("| --- | --- | --- | --- |");
    for g in &gains {
        println!(
            "| {} | {:.3} | {:.3} | **{:.3}** |",
            g["size"],
            g["raw_gain"].as_f64().unwrap(),
            g["worker_gain"].as_f64().unwrap(),
            g["captured"].as_f64().unwrap(),
        );
    }
    println!("\n| size | JPEG in / request JSON bytes | parse + base64 ms | PNG fast: ms / bytes | PNG default: ms / bytes |");
    println!("| --- | --- | --- | --- | --- |");
    for w in &wire {
        println!(
            "| {} | {} / {} | {:.2} | {:.1} / {} | {:.1} / {} |",
            w["size"],
            w["jpeg_bytes"],
            w["request_json_bytes"],
            w["request_parse_and_base64_ms"].as_f64().unwrap(),
            w["png_fast_ms"].as_f64().unwrap(),
            w["png_fast_bytes"],
            w["png_default_ms"].as_f64().unwrap(),
            w["png_default_bytes"],
        );
    }
    if !variants.is_empty() {
        print_variant_table(args.rounds, &rows);
    }
}
