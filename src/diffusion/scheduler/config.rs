//! A model's `scheduler_config.json`, read the way diffusers' `<Class>.from_pretrained(dir,
//! subfolder="scheduler")` reads it: each scheduler takes the keys its constructor knows, with its own
//! defaults for missing ones, whatever `_class_name` says; other keys are ignored. A key whose value this
//! crate does not implement is an error naming the key, never silently ignored.
//!
//! Numbers are read with serde_json's parser, which is exact for the short decimals these files hold
//! (at most 15 significant digits with a small exponent); anything longer could be 1 ulp off in float64,
//! far below the float32 the schedules are computed in.

use serde_json::{Map, Value};

use super::{SchedulerError, SchedulerKind};

/// The parsed `scheduler_config.json` of one model: parse once per model, build a scheduler per request.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    keys: Map<String, Value>,
}

impl SchedulerConfig {
    /// Parses the text of a `scheduler_config.json` (a JSON object). Values are checked when a scheduler
    /// is built, since each scheduler knows different keys.
    pub fn from_json(text: &str) -> Result<Self, SchedulerError> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(keys)) => Ok(Self { keys }),
            Ok(other) => Err(SchedulerError::InvalidJson(format!(
                "expected an object, found {}",
                kind_of(&other)
            ))),
            Err(e) => Err(SchedulerError::InvalidJson(e.to_string())),
        }
    }

    /// The `_class_name` the file names (informational: it does not choose the scheduler).
    pub fn class_name(&self) -> Option<&str> {
        self.keys.get("_class_name").and_then(Value::as_str)
    }

    pub(crate) fn reader(&self, scheduler: SchedulerKind) -> Keys<'_> {
        Keys {
            keys: &self.keys,
            scheduler,
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the keys one scheduler knows, with that scheduler's defaults.
pub(crate) struct Keys<'a> {
    keys: &'a Map<String, Value>,
    scheduler: SchedulerKind,
}

impl Keys<'_> {
    pub(crate) fn invalid(&self, key: &str, expected: &'static str, found: &Value) -> SchedulerError {
        SchedulerError::InvalidValue {
            key: key.to_owned(),
            expected,
            found: found.to_string(),
        }
    }

    /// A float key. JSON integers are accepted, as Python would.
    pub(crate) fn f64(&self, key: &str, default: f64) -> Result<f64, SchedulerError> {
        match self.keys.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.invalid(key, "a number", v)),
        }
    }

    /// A non-negative integer key.
    pub(crate) fn usize(&self, key: &str, default: usize) -> Result<usize, SchedulerError> {
        match self.keys.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.invalid(key, "a non-negative integer", v)),
        }
    }

    /// A boolean key; `null` is false, as Python's truthiness makes it.
    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool, SchedulerError> {
        match self.keys.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| self.invalid(key, "a boolean", v)),
        }
    }

    /// A string key whose value must be one of `options` (the values this crate implements).
    pub(crate) fn choice<T: Copy>(
        &self,
        key: &'static str,
        default: &str,
        options: &[(&str, T)],
    ) -> Result<T, SchedulerError> {
        let value = match self.keys.get(key) {
            None => default,
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(self.invalid(key, "a string", v)),
        };
        options
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, t)| *t)
            .ok_or_else(|| self.unsupported(key, format!("\"{value}\"")))
    }

    /// A boolean feature this crate does not implement: only its default `false` is accepted.
    pub(crate) fn refuse_true(&self, key: &'static str) -> Result<(), SchedulerError> {
        if self.bool(key, false)? {
            return Err(self.unsupported(key, "true".to_owned()));
        }
        Ok(())
    }

    /// The scheduler these keys are read for.
    pub(crate) fn scheduler(&self) -> SchedulerKind {
        self.scheduler
    }

    pub(crate) fn unsupported(&self, key: &'static str, value: String) -> SchedulerError {
        SchedulerError::Unsupported {
            scheduler: self.scheduler,
            key,
            value,
        }
    }

    /// `trained_betas`: absent or `null`, or a list of numbers.
    pub(crate) fn trained_betas(&self) -> Result<Option<Vec<f32>>, SchedulerError> {
        match self.keys.get("trained_betas") {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Array(items)) => items
                .iter()
                .map(|x| x.as_f64().map(|b| b as f32))
                .collect::<Option<Vec<f32>>>()
                .map(Some)
                .ok_or_else(|| self.invalid("trained_betas", "null or a list of numbers", v)),
            Some(v) => Err(self.invalid("trained_betas", "null or a list of numbers", v)),
        }
    }
}

/// How the model's output is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prediction {
    /// The noise (`epsilon`).
    Epsilon,
    /// The velocity (`v_prediction`).
    V,
    /// The denoised sample itself (`sample`).
    Sample,
}

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

pub(crate) const SPACINGS: [(&str, Spacing); 3] = [
    ("linspace", Spacing::Linspace),
    ("leading", Spacing::Leading),
    ("trailing", Spacing::Trailing),
];

#[cfg(test)]
mod tests {
    use super::super::{build, SchedulerError, SchedulerKind};
    use super::*;

    #[test]
    fn each_scheduler_applies_its_own_defaults_to_the_sd15_file() {
        let config = SchedulerConfig::from_json(
            r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
            "clip_sample": false}"#,
        )
        .unwrap();
        assert_eq!(config.class_name(), Some("PNDMScheduler"));
        let euler = build(SchedulerKind::Euler, &config, 20).unwrap();
        let ddim = build(SchedulerKind::Ddim, &config, 20).unwrap();
        // Euler's default spacing is "linspace": 999, 946.42..., ..., 0 (steps_offset unused).
        assert_eq!(euler.timesteps()[..2], [999.0, (999.0f64 / 19.0 * 18.0) as f32]);
        assert_eq!(euler.timesteps()[19], 0.0);
        // DDIM's is "leading": 951, 901, ..., 1.
        assert_eq!(ddim.timesteps()[..3], [951.0, 901.0, 851.0]);
        assert_eq!(ddim.timesteps()[19], 1.0);
    }

    #[test]
    fn kinds_round_trip_their_wire_names() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.as_str().parse::<SchedulerKind>(), Ok(kind));
        }
        assert!(matches!(
            "pndm".parse::<SchedulerKind>(),
            Err(SchedulerError::UnknownKind(_))
        ));
        assert_eq!(SchedulerKind::from_class_name("LCMScheduler"), Some(SchedulerKind::Lcm));
        assert_eq!(SchedulerKind::from_class_name("PNDMScheduler"), None);
        let config = SchedulerConfig::from_json("{}").unwrap();
        for kind in SchedulerKind::ALL {
            let scheduler = build(kind, &config, 4).unwrap();
            let copy = scheduler.clone();
            assert_eq!((copy.kind(), copy.timesteps()), (kind, scheduler.timesteps()));
        }
    }

    #[test]
    fn bad_configs_are_refused_by_key() {
        let cases = [
            (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
            (r#"{"prediction_type": "flow"}"#, "prediction_type"),
            (r#"{"beta_start": "0.1"}"#, "beta_start"),
            (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
            (r#"{"rescale_betas_zero_snr": "yes"}"#, "rescale_betas_zero_snr"),
            // LCMScheduler reads these two keys but never uses them, so only the others check them.
            (r#"{"timestep_spacing": "uniform"}"#, "timestep_spacing"),
            (r#"{"steps_offset": -1}"#, "steps_offset"),
        ];
        for (n, (json, key)) in cases.into_iter().enumerate() {
            let config = SchedulerConfig::from_json(json).unwrap();
            for kind in SchedulerKind::ALL
                .into_iter()
                .filter(|&k| n < 5 || k != SchedulerKind::Lcm)
            {
                let err = build(kind, &config, 10).expect_err(json);
                assert!(err.to_string().contains(key), "{kind}: {err}");
            }
        }
        assert!(matches!(
            SchedulerConfig::from_json("[1]"),
            Err(SchedulerError::InvalidJson(_))
        ));
        let config = SchedulerConfig::from_json("{}").unwrap();
        for kind in SchedulerKind::ALL {
            assert!(matches!(
                build(kind, &config, 0),
                Err(SchedulerError::InvalidSteps { .. })
            ));
        }
    }
}
