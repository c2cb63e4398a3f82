//! The models this worker serves, by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;

use super::manifest::Manifest;
use super::pipeline::Prepared;
use super::settings::{BatchingSettings, ModelSettings};
use crate::domain::{ErrorCode, GenerationRequest, RequestError, Work};

/// Manifests of the enabled models. Cheap to share; the sessions live on the inference thread.
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<Manifest>>,
}

impl ModelRegistry {
    /// Read the manifest of every enabled model. A missing or invalid one is a startup error.
    pub fn load(settings: &ModelSettings, batching: &BatchingSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !settings.enabled.is_empty(),
            "models.enabled is empty: there would be nothing to serve"
        );
        if let Some(unknown) = batching.models.keys().find(|m| !settings.enabled.contains(m)) {
            anyhow::bail!("batching.models.{unknown} names a model that is not enabled");
        }
        if let Some(unknown) = settings.variants.keys().find(|m| !settings.enabled.contains(m)) {
            anyhow::bail!("models.variants.{unknown} names a model that is not enabled");
        }
        let mut models = BTreeMap::new();
        for name in &settings.enabled {
            let dir = settings.dir.join(name);
            let mut manifest =
                Manifest::load(&dir).with_context(|| format!("model {name:?} is enabled but cannot be loaded"))?;
            let multiple = manifest.limits.multiple_of;
            let bucket = match batching.shape_bucket(name) {
                0 => multiple,
                bucket => bucket,
            };
            anyhow::ensure!(
                bucket % multiple == 0,
                "batching.shape_bucket for {name} is {bucket}: it must be a multiple of the model's limits.multiple_of ({multiple})"
            );
            manifest.shape_bucket = bucket;
            if let Some(variant) = settings.variants.get(name) {
                manifest.select_variant(variant).context("models.variants")?;
            }
            anyhow::ensure!(
                manifest.name == *name,
                "{} declares name {:?}; the folder and the name must agree",
                dir.display(),
                manifest.name
            );
            models.insert(name.clone(), Arc::new(manifest));
        }
        Ok(Self { models })
    }

    /// The manifest of a model, or `unknown_model`.
    pub fn get(&self, name: &str) -> Result<&Arc<Manifest>, RequestError> {
        self.models.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            RequestError::new(
                ErrorCode::UnknownModel,
                format!("model {name:?} is not served here; models: {}", known.join(", ")),
            )
        })
    }

    /// Every model, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Manifest>> {
        self.models.values()
    }

    /// Everything about a request that can be checked without decoding it (model, parameters, image
    /// headers, output size). Returns the work it asks for, which its cost is computed from.
    pub fn check(&self, request: &GenerationRequest) -> Result<Work, RequestError> {
        let manifest = self.get(&request.model)?;
        manifest.pipeline.pipeline().check(manifest, request)
    }

    /// The size of the image a request will get, from the image header alone (no decoding).
    pub fn output_size(&self, request: &GenerationRequest) -> Result<(u32, u32), RequestError> {
        let manifest = self.get(&request.model)?;
        manifest.pipeline.pipeline().output_size(manifest, request)
    }

    /// The denoising steps a multi-step model's schedule would have for a request (see
    /// [`super::Pipeline::planned_steps`]), without decoding; `None` for single-pass models, unknown
    /// models and requests the model would refuse.
    pub fn planned_steps(&self, request: &GenerationRequest) -> Option<u32> {
        let manifest = self.get(&request.model).ok()?;
        manifest.pipeline.pipeline().planned_steps(manifest, request)
    }

    /// Decode and check a request's inputs against its model, and lay them out for the network.
    /// CPU-bound: call from a blocking thread.
    pub fn prepare(&self, request: &GenerationRequest) -> Result<Prepared, RequestError> {
        let manifest = self.get(&request.model)?;
        manifest.pipeline.pipeline().prepare(manifest, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> (ModelSettings, BatchingSettings) {
        let models = ModelSettings {
            dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
            ..ModelSettings::default()
        };
        (models, BatchingSettings::default())
    }

    #[test]
    fn a_configured_variant_is_what_the_registry_serves() {
        let (mut models, batching) = settings();
        models.variants.insert("multistyle26".into(), "fp16".into());
        let registry = ModelRegistry::load(&models, &batching).unwrap();
        let manifest = registry.get("multistyle26").unwrap();
        assert_eq!(manifest.variant.as_deref(), Some("fp16"));
        assert!(manifest.files_in_use()[0].ends_with("multistyle26-batched-fp16.onnx"));
        assert_eq!(registry.get("arbitrary-style").unwrap().variant, None);
    }

    #[test]
    fn variants_of_unknown_models_or_unknown_variants_stop_the_start() {
        let (mut models, batching) = settings();
        models.variants.insert("sdxl".into(), "fp16".into());
        let error = ModelRegistry::load(&models, &batching).unwrap_err().to_string();
        assert!(error.contains("models.variants.sdxl"), "{error}");

        let (mut models, batching) = settings();
        models.variants.insert("multistyle26".into(), "int8".into());
        let error = format!("{:#}", ModelRegistry::load(&models, &batching).unwrap_err());
        assert!(
            error.contains("no variant \"int8\"") && error.contains("fp16"),
            "{error}"
        );
    }
}
