//! Loading every model's runner on the inference thread, and warming each one up at the batch
//! sizes it will see.

use std::collections::HashMap;
use std::time::Instant;

use crate::inference::manifest::Manifest;
use crate::inference::pipeline::{ModelInput, Runner};
use crate::inference::runtime::Runtime;
use crate::inference::BatchLimits;

/// Runners by model name.
pub(super) type Runners = HashMap<String, Box<dyn Runner>>;

/// Build each model's runner; with `warmup`, run it once alone and once at its largest batch
/// (from `limits`), so ONNX Runtime (and CUDA's algorithm search) prepares each shape before the
/// first request of it.
pub(super) fn load_runners(
    runtime: &Runtime,
    manifests: &[Manifest],
    warmup: bool,
    limits: impl Fn(&str) -> BatchLimits,
) -> anyhow::Result<Runners> {
    let mut runners = Runners::new();
    for manifest in manifests {
        let started = Instant::now();
        let pipeline = manifest.pipeline.pipeline();
        let mut runner = pipeline.load(manifest, runtime)?;
        if warmup {
            let max = limits(&manifest.name).max_batch_size;
            let sizes = if pipeline.batches() && max > 1 {
                vec![1, max]
            } else {
                vec![1]
            };
            for n in sizes {
                let inputs: Vec<ModelInput> = (0..n).map(|_| pipeline.warmup_input(manifest)).collect();
                let refs: Vec<&ModelInput> = inputs.iter().collect();
                runner
                    .run(&refs)
                    .map_err(|e| anyhow::anyhow!("warm-up run of {} (batch {n}) failed: {e}", manifest.name))?;
            }
        }
        crate::metrics::set_model_load_seconds(&manifest.name, started.elapsed().as_secs_f64());
        crate::metrics::set_model_info(&manifest.name, manifest.variant.as_deref().unwrap_or("default"));
        tracing::info!(
            model = %manifest.name,
            variant = manifest.variant.as_deref().unwrap_or("default"),
            files = ?manifest.files_in_use(),
            provider = runtime.provider().name(),
            load_seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        runners.insert(manifest.name.clone(), runner);
    }
    Ok(runners)
}
