//! The schedulers against diffusers 0.35.2: every number in `tests/data/diffusion/scheduler_traces.json`
//! (written by `make_scheduler_traces.py` next to it).
//!
//! Timesteps and `img2img_start` must be identical. Everything downstream of a square root is compared
//! within a tolerance (see [`tolerances`]): torch's CPU float32 `sqrt` / `** 0.5` is MKL's `vmsSqrt`,
//! which differs from IEEE `sqrt` by 1 ulp on 17% of inputs, and kiln uses IEEE `sqrt`. Against the
//! reference written by `make_scheduler_traces.py --ieee-sqrt` (pass its path in
//! `KILN_IEEE_SQRT_TRACES`), every value must be bit-identical.

use serde_json::Value;

use super::*;

/// The committed reference, or with `KILN_IEEE_SQRT_TRACES=<file>` the one `make_scheduler_traces.py
/// --ieee-sqrt` writes (torch's MKL square root replaced by IEEE's), which must match bit for bit.
fn traces() -> Value {
    let path = std::env::var("KILN_IEEE_SQRT_TRACES").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/diffusion/scheduler_traces.json"
        )
        .into()
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn ieee_reference() -> bool {
    std::env::var_os("KILN_IEEE_SQRT_TRACES").is_some()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn usize_of(case: &Value, key: &str) -> usize {
    case[key].as_u64().unwrap() as usize
}

/// Builds the case's scheduler from its config, as written in the reference file.
fn build_case(doc: &Value, case: &Value) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let kind: SchedulerKind = case["scheduler"].as_str().unwrap().parse().unwrap();
    let config = SchedulerConfig::from_json(&doc["configs"][case["config"].as_str().unwrap()].to_string()).unwrap();
    build(kind, &config, usize_of(case, "steps"))
}

fn name(case: &Value) -> String {
    format!("{} / {} / {} steps", case["scheduler"], case["config"], case["steps"])
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{k}]: {g:e} != {w:e}");
    }
}

/// How closely a group of values agrees with the reference.
#[derive(Default)]
struct Agreement {
    values: usize,
    identical: usize,
    /// The largest |got - want| / max |want| over the compared vectors.
    worst: f32,
}

impl Agreement {
    /// Bit for bit against the IEEE-sqrt reference; otherwise within `tolerance` times the largest
    /// magnitude in `want` (torch's MKL square root is up to 0.75 ulp off IEEE's).
    fn check(&mut self, got: &[f32], want: &[f32], tolerance: f32, what: &str) {
        if ieee_reference() {
            assert_bits(got, want, what);
        }
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(f32::MIN_POSITIVE, |m, w| m.max(w.abs()));
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let deviation = (g - w).abs() / scale;
            assert!(deviation <= tolerance, "{what}[{k}]: {g:e} != {w:e}");
            self.worst = self.worst.max(deviation);
        }
        self.values += got.len();
        self.identical += got.iter().zip(want).filter(|(g, w)| g.to_bits() == w.to_bits()).count();
    }

    fn report(&self, what: &str) {
        eprintln!(
            "{what}: {} of {} bit-identical, worst deviation {:.2e}",
            self.identical, self.values, self.worst
        );
    }
}

fn check_sum(got: &[f32], want: &Value, tolerance: f64, what: &str) {
    let sum: f64 = got.iter().map(|&x| f64::from(x)).sum();
    let magnitude: f64 = got.iter().map(|&x| f64::from(x).abs()).sum();
    let want = want.as_f64().unwrap();
    assert!(
        (sum - want).abs() <= tolerance * magnitude.max(1e-30),
        "{what}: sum {sum} != {want}"
    );
}

/// Tolerances against the committed reference (torch's MKL square root), relative to the largest
/// magnitude compared: (sigmas, `init_noise_sigma` and the scale of `scale_model_input`; samples after
/// up to 50 steps). Zero-terminal-SNR configs get wider ones: diffusers' float32
/// `rescale_zero_terminal_snr` subtracts nearly equal square roots, which magnifies their last-bit
/// differences (sigmas near the end of the schedule differ by up to 6.6e-6, samples by up to 6.1e-5).
fn tolerances(doc: &Value, case: &Value) -> (f32, f32) {
    let config = &doc["configs"][case["config"].as_str().unwrap()];
    if config["rescale_betas_zero_snr"] == true {
        (1e-5, 1e-4)
    } else {
        (4e-7, 4e-6)
    }
}

/// The fixture's stand-in UNet: `x_in * 0.3 + randn * 0.7` in float32.
fn fake_model(x_in: &[f32], model_rng: &mut TorchGenerator) -> Vec<f32> {
    let eps = model_rng.randn(x_in.len());
    x_in.iter().zip(&eps).map(|(x, e)| x * 0.3 + e * 0.7).collect()
}

/// The pipelines' loop from step index `start`, checked against the recorded per-step values.
fn denoise(
    doc: &Value,
    scheduler: &dyn Scheduler,
    start: usize,
    latents: &mut [f32],
    case: &Value,
    agreement: &mut [Agreement; 2],
) {
    let mut model_rng = TorchGenerator::new(doc["seeds"]["model"].as_u64().unwrap());
    let mut step_rng = TorchGenerator::new(doc["seeds"]["step"].as_u64().unwrap());
    let records = case["per_step"].as_array().unwrap();
    assert_eq!(
        records.len(),
        scheduler.timesteps().len() - start,
        "{}: step count",
        name(case)
    );
    let (sigma_tolerance, sample_tolerance) = tolerances(doc, case);
    for (i, record) in (start..).zip(records) {
        let what = format!("{} step {i}", name(case));
        let mut one = [1.0f32];
        scheduler.scale_model_input(&mut one, i);
        let want = [record["scaled_one"].as_f64().unwrap() as f32];
        agreement[0].check(&one, &want, sigma_tolerance, &format!("{what} scale_model_input(1)"));
        let mut x_in = latents.to_vec();
        scheduler.scale_model_input(&mut x_in, i);
        let model_output = fake_model(&x_in, &mut model_rng);
        scheduler.step(&model_output, i, latents, &mut step_rng);
        for (got, key) in [(&x_in[..], "x_in"), (&latents[..], "sample")] {
            let head = floats(&record[key]["head"]);
            agreement[1].check(&got[..head.len()], &head, sample_tolerance, &format!("{what} {key}"));
            check_sum(
                got,
                &record[key]["sum"],
                f64::from(sample_tolerance),
                &format!("{what} {key}"),
            );
        }
    }
    agreement[1].check(
        latents,
        &floats(&case["final"]),
        sample_tolerance,
        &format!("{} final", name(case)),
    );
}

#[test]
fn schedules_match_diffusers_for_every_step_count() {
    let doc = traces();
    let (mut refused_here, mut sigmas_agreement) = (0, Agreement::default());
    for case in doc["schedules"].as_array().unwrap() {
        let timesteps = floats(&case["timesteps"]);
        let scheduler = match build_case(&doc, case) {
            Ok(s) => s,
            Err(SchedulerError::InvalidSteps { .. }) => {
                // Only schedules diffusers gets wrong may be refused.
                let steps = usize_of(case, "steps");
                assert!(
                    timesteps.len() != steps || timesteps.iter().any(|&t| t < 0.0),
                    "{} refused",
                    name(case)
                );
                refused_here += 1;
                continue;
            }
            Err(e) => panic!("{}: {e}", name(case)),
        };
        assert_bits(scheduler.timesteps(), &timesteps, &format!("{} timesteps", name(case)));
        let sigmas = scheduler.sigmas();
        if let Some(sigmas) = sigmas {
            let want = floats(&case["sigmas"]);
            for (k, (got, want)) in sigmas.iter().zip(&want).enumerate() {
                let what = format!("{} sigmas[{k}]", name(case));
                sigmas_agreement.check(&[*got], &[*want], tolerances(&doc, case).0, &what);
            }
        }
    }
    sigmas_agreement.report("Euler sigmas");
    // Euler, Euler ancestral and DDIM with "trailing" spacing (v_trailing_zsnr) at 61 steps.
    assert_eq!(refused_here, 3);
}

#[test]
fn what_diffusers_refuses_is_refused() {
    let doc = traces();
    for case in doc["refused"].as_array().unwrap() {
        let err = build_case(&doc, case).expect_err(&name(case));
        let diffusers = case["error"].as_str().unwrap();
        match err {
            SchedulerError::Unsupported { key, .. } => assert!(diffusers.contains(key), "{}: {diffusers}", name(case)),
            SchedulerError::InvalidSteps { .. } => assert!(diffusers.contains("steps"), "{}", name(case)),
            other => panic!("{}: {other}", name(case)),
        }
    }
}

#[test]
fn denoising_traces_match_diffusers() {
    let doc = traces();
    for (kind, zero_snr) in SchedulerKind::ALL.into_iter().flat_map(|k| [(k, false), (k, true)]) {
        let mut agreement = [Agreement::default(), Agreement::default()];
        for case in doc["traces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["scheduler"] == kind.as_str())
        {
            if (tolerances(&doc, case).0 > 1e-6) != zero_snr {
                continue;
            }
            let scheduler = build_case(&doc, case).unwrap_or_else(|e| panic!("{}: {e}", name(case)));
            assert_bits(scheduler.timesteps(), &floats(&case["timesteps"]), &name(case));
            let init = case["init_noise_sigma"].as_f64().unwrap() as f32;
            let what = format!("{} init_noise_sigma", name(case));
            agreement[0].check(
                &[scheduler.init_noise_sigma()],
                &[init],
                tolerances(&doc, case).0,
                &what,
            );
            let mut latents = TorchGenerator::new(doc["seeds"]["latents"].as_u64().unwrap()).randn(256);
            latents.iter_mut().for_each(|x| *x *= scheduler.init_noise_sigma());
            denoise(&doc, scheduler.as_ref(), 0, &mut latents, case, &mut agreement);
        }
        let configs = if zero_snr { "zero-SNR configs" } else { "other configs" };
        agreement[0].report(&format!("{kind}, {configs}: sigma-derived scalars"));
        agreement[1].report(&format!("{kind}, {configs}: samples"));
    }
}

#[test]
fn add_noise_matches_diffusers() {
    let doc = traces();
    let mut agreement = Agreement::default();
    for case in doc["add_noise"].as_array().unwrap() {
        let scheduler = build_case(&doc, case).unwrap();
        let original = TorchGenerator::new(case["original_seed"].as_u64().unwrap()).randn(256);
        let noise = TorchGenerator::new(case["noise_seed"].as_u64().unwrap()).randn(256);
        let noisy = scheduler.add_noise(&original, &noise, usize_of(case, "index"));
        let what = format!("{} add_noise at {}", name(case), case["index"]);
        agreement.check(&noisy, &floats(&case["noisy"]), tolerances(&doc, case).1, &what);
    }
    agreement.report("add_noise");
}

#[test]
fn img2img_runs_match_diffusers() {
    let doc = traces();
    let mut agreement = [Agreement::default(), Agreement::default()];
    for case in doc["img2img"].as_array().unwrap() {
        let scheduler = build_case(&doc, case).unwrap();
        let start = img2img_start(usize_of(case, "steps"), case["strength"].as_f64().unwrap());
        assert_eq!(start, usize_of(case, "t_start"), "{}", name(case));
        let original = TorchGenerator::new(case["original_seed"].as_u64().unwrap()).randn(256);
        let noise = TorchGenerator::new(case["noise_seed"].as_u64().unwrap()).randn(256);
        let mut latents = scheduler.add_noise(&original, &noise, start);
        denoise(&doc, scheduler.as_ref(), start, &mut latents, case, &mut agreement);
    }
    agreement[1].report("img2img samples");
}

#[test]
fn img2img_start_matches_the_pipeline() {
    for case in traces()["img2img_start"].as_array().unwrap() {
        let (steps, strength) = (usize_of(case, "steps"), case["strength"].as_f64().unwrap());
        assert_eq!(
            img2img_start(steps, strength),
            usize_of(case, "t_start"),
            "{steps} steps, strength {strength}"
        );
    }
}
