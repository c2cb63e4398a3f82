//! The diffusion pipelines against diffusers' own PyTorch pipelines: the same weights (the tiny
//! random models in `models/*-tiny-random`), seeds, schedulers, steps and guidance give the same
//! picture within 2 levels (`tests/data/diffusion/cases.json`, made by
//! `models/tools/make_tiny_diffusion.py`). Runs the model kind's own prepare, runner and finish,
//! without the broker; `diffusion_worker` does the same through it.

use std::collections::HashMap;
use std::path::Path;

use image::RgbImage;
use kiln::domain::{GenerationRequest, RequestDocument, WireImage, WireParams, CONTRACT_VERSION};
use kiln::inference::{Manifest, ModelInput, Prepared, Runner, Runtime};
use serde::Deserialize;

use crate::helpers::{read, repo, test_settings};

/// One reference case, as the fixture script wrote it.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub task: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: i64,
    pub guidance_scale: f64,
    pub image_guidance_scale: Option<f64>,
    pub strength: Option<f64>,
    pub seed: u64,
    pub width: i64,
    pub height: i64,
    pub scheduler: String,
    pub image: Option<String>,
    pub reference: String,
    pub prompt_ids: Vec<i64>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub prompt_ids_without_ftfy: Option<Vec<i64>>,
    #[serde(default)]
    pub reference_without_ftfy: Option<String>,
}

/// Every case.
pub fn cases() -> Vec<Case> {
    serde_json::from_slice(&read("tests/data/diffusion/cases.json")).expect("cases.json")
}

/// The case named `name`.
pub fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .expect("a case of that name")
}

/// The request document a producer would send for a case.
pub fn document(case: &Case) -> RequestDocument {
    RequestDocument {
        version: CONTRACT_VERSION,
        request_id: format!("case-{}", case.name),
        user_id: "diffusion-test".into(),
        model: case.model.clone(),
        params: WireParams {
            task: Some(case.task.clone()),
            prompt: Some(case.prompt.clone()),
            negative_prompt: case.negative_prompt.clone(),
            steps: Some(case.steps),
            guidance_scale: Some(case.guidance_scale),
            image_guidance_scale: case.image_guidance_scale,
            strength: case.strength,
            seed: Some(case.seed.into()),
            width: Some(case.width),
            height: Some(case.height),
            scheduler: Some(case.scheduler.clone()),
            ..Default::default()
        },
        image: case
            .image
            .as_ref()
            .map(|p| WireImage::from_bytes(&read(&format!("tests/data/{p}")))),
        deadline: None,
        created_at: None,
        tier: None,
        progress: false,
    }
}

/// Parse a document as the worker does.
pub fn parse(doc: &RequestDocument) -> GenerationRequest {
    GenerationRequest::parse(&serde_json::to_vec(doc).unwrap(), usize::MAX).expect("a valid request")
}

/// The reference PNG of a case.
pub fn reference(relative: &str) -> RgbImage {
    image::open(repo().join("tests/data").join(relative))
        .expect("a reference PNG")
        .into_rgb8()
}

/// Largest and mean absolute difference, in levels.
pub fn difference(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut max, mut sum) = (0u8, 0u64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

/// The three tiny models' manifests and runners, on the CPU.
pub struct Models {
    manifests: HashMap<String, Manifest>,
    runners: HashMap<String, Box<dyn Runner>>,
}

impl Models {
    pub fn load() -> Self {
        let settings = test_settings();
        let runtime = Runtime::init(&settings.inference).expect("ONNX Runtime (scripts/setup.sh)");
        let mut manifests = HashMap::new();
        let mut runners = HashMap::new();
        for name in ["sd-tiny-random", "pix2pix-tiny-random", "lcm-tiny-random"] {
            let manifest = Manifest::load(&repo().join("models").join(name)).expect("the manifest loads");
            let runner = manifest
                .pipeline
                .pipeline()
                .load(&manifest, &runtime)
                .expect("the sessions load");
            runners.insert(name.to_owned(), runner);
            manifests.insert(name.to_owned(), manifest);
        }
        Self { manifests, runners }
    }

    pub fn manifest(&self, model: &str) -> &Manifest {
        &self.manifests[model]
    }

    /// Prepare a request as the CPU pool does.
    pub fn prepare(&self, request: &GenerationRequest) -> Prepared {
        let manifest = self.manifest(&request.model);
        manifest
            .pipeline
            .pipeline()
            .prepare(manifest, request)
            .expect("a valid request")
    }

    /// Run prepared requests of one model as one batch; their images.
    pub fn run(&mut self, model: &str, prepared: Vec<Prepared>) -> Vec<RgbImage> {
        let inputs: Vec<&ModelInput> = prepared.iter().map(|p| &p.input).collect();
        let outputs = self
            .runners
            .get_mut(model)
            .unwrap()
            .run(&inputs)
            .expect("the model runs");
        prepared
            .into_iter()
            .zip(outputs)
            .map(|(p, output)| p.finish.apply(&output))
            .collect()
    }

    /// One request alone.
    pub fn render(&mut self, request: &GenerationRequest) -> RgbImage {
        let prepared = self.prepare(request);
        self.run(&request.model, vec![prepared]).remove(0)
    }
}

#[test]
fn every_case_matches_diffusers_within_two_levels() {
    let mut models = Models::load();
    let mut report = Vec::new();
    for case in cases() {
        let image = models.render(&parse(&document(&case)));
        let (max, mean) = difference(&image, &reference(&case.reference));
        report.push(format!("{}: max {max}, mean {mean:.3}", case.name));
        assert!(
            max <= 2,
            "{} differs from diffusers by up to {max} levels (mean {mean:.3})",
            case.name
        );
    }
    eprintln!("{}", report.join("\n"));
    assert!(report.len() >= 16, "every scheduler, task and guidance mode has a case");
}

#[test]
fn every_case_is_a_request_the_published_schema_accepts() {
    for case in cases() {
        crate::contract::assert_valid_request(&document(&case));
    }
}

#[test]
fn prompts_are_tokenized_as_diffusers_does_with_ftfy_and_a_long_one_is_cut_and_said_to_be() {
    let models = Models::load();
    for case in cases() {
        let prepared = models.prepare(&parse(&document(&case)));
        let generation = prepared
            .generation
            .as_ref()
            .expect("a diffusion reply says what it did");
        assert_eq!(generation.prompt_truncated.is_some(), case.truncated, "{}", case.name);
        let manifest = models.manifest(&case.model);
        let kiln::inference::manifest::PipelineSpec::Diffusion(spec) = &manifest.pipeline else {
            panic!("a diffusion model")
        };
        let ids = spec.model().tokenizer.encode(&case.prompt).ids;
        assert_eq!(ids, case.prompt_ids, "{}", case.name);
        if let Some(without) = &case.prompt_ids_without_ftfy {
            assert_ne!(&ids, without, "without ftfy this prompt tokenizes differently");
        }
    }
    let long = case("t2i-long-prompt");
    let generation = models.prepare(&parse(&document(&long))).generation.unwrap();
    let cut = generation.prompt_truncated.expect("the reply says the prompt was cut");
    assert_eq!(cut.tokens_used, 75);
    assert!(cut.tokens_dropped > 0);
    assert!(
        long.prompt.to_lowercase().starts_with(&cut.text_used[..40]),
        "{}",
        cut.text_used
    );
}

#[test]
fn the_non_ascii_reference_tells_ftfy_tokenization_apart() {
    // The test above would pass a tokenizer without ftfy's fixes if the two tokenizations drew the
    // same picture: they do not (that is why the ftfy one is the reference).
    let case = case("t2i-non-ascii");
    let without = reference(
        case.reference_without_ftfy
            .as_deref()
            .expect("the fixture rendered both"),
    );
    let (max, mean) = difference(&reference(&case.reference), &without);
    assert!(max > 2 && mean > 1.0, "max {max}, mean {mean}");
}

#[test]
fn batch_companions_move_an_image_by_at_most_one_level() {
    let mut models = Models::load();
    for (lead, others) in [
        (
            "t2i-euler",
            ["t2i-negative", "t2i-euler-no-guidance", "t2i-long-prompt"],
        ),
        ("i2i-euler", ["i2i-euler", "i2i-euler", "i2i-euler"]),
        ("edit", ["edit", "edit-no-guidance", "edit"]),
    ] {
        let lead_case = case(lead);
        let alone = models.render(&parse(&document(&lead_case)));
        let mut batch = vec![models.prepare(&parse(&document(&lead_case)))];
        for (k, other) in others.iter().enumerate() {
            let mut doc = document(&case(other));
            // Same schedule as the lead (a batch shares its timesteps), other seeds and prompts.
            doc.params.seed = Some((1000 + k as u64).into());
            doc.params.prompt = Some(format!("{} number {k}", doc.params.prompt.unwrap()));
            batch.push(models.prepare(&parse(&doc)));
        }
        let groups: Vec<u64> = batch.iter().map(|p| p.input.group()).collect();
        assert!(groups.iter().all(|g| *g == groups[0]), "{lead}: one batch group");
        let together = models.run(&lead_case.model, batch).remove(0);
        let (max, mean) = difference(&alone, &together);
        eprintln!("{lead}: alone vs in a batch of 4: max {max}, mean {mean:.4}");
        assert!(max <= 1, "{lead}: batch companions moved the image by {max} levels");
    }
}

#[test]
fn the_same_request_gives_the_same_bytes_and_the_seed_decides_the_picture() {
    let mut models = Models::load();
    let base = case("t2i-euler-ancestral");
    let first = models.render(&parse(&document(&base)));
    let again = models.render(&parse(&document(&base)));
    assert_eq!(first.as_raw(), again.as_raw());
    let mut other_seed = document(&base);
    other_seed.params.seed = Some(43u64.into());
    let other = models.render(&parse(&other_seed));
    assert!(
        difference(&first, &other).1 > 10.0,
        "another seed draws another picture"
    );

    // Without a seed one is drawn, and the reply carries it: sending it back reproduces the image.
    let mut unseeded = document(&base);
    unseeded.params.seed = None;
    let prepared = models.prepare(&parse(&unseeded));
    let seed = prepared.generation.as_ref().unwrap().seed;
    let drawn = models.run(&base.model, vec![prepared]).remove(0);
    unseeded.params.seed = Some(seed.into());
    assert_eq!(models.render(&parse(&unseeded)).as_raw(), drawn.as_raw());
}

#[test]
fn sizes_come_from_the_model_and_other_sizes_are_refused() {
    let models = Models::load();
    let manifest = models.manifest("sd-tiny-random");
    // 8 px VAE × a two-level UNet: multiples of 16, derived from the folder.
    let kiln::inference::manifest::PipelineSpec::Diffusion(spec) = &manifest.pipeline else {
        panic!("a diffusion model")
    };
    assert_eq!(spec.derived_limits().multiple_of, 16);
    assert_eq!(spec.derived_limits().default_max_side, 64);
    let mut doc = document(&case("t2i-euler"));
    doc.params.width = None;
    doc.params.height = None;
    let generation = models.prepare(&parse(&doc));
    assert_eq!((generation.finish.output), (64, 64), "the native side by default");
    // An image task without a size: the photo's own size, fitted and rounded to the multiple.
    let mut doc = document(&case("i2i-euler"));
    doc.params.width = None;
    doc.params.height = None;
    doc.image = Some(WireImage::from_bytes(&read("tests/data/astronaut-crop-250x198.png")));
    assert_eq!(models.prepare(&parse(&doc)).finish.output, (64, 48));
    assert!(Path::new(&repo().join("models/sd-tiny-random/unet/model.onnx")).is_file());
}
