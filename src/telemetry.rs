//! Logging: JSON lines in production, readable text on a terminal; `RUST_LOG` overrides the filter.

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, Layer};

/// Install the global subscriber. Call once, first thing.
pub fn init(settings: &TelemetrySettings) {
    let (filter, rejected) = filter(std::env::var("RUST_LOG").ok().as_deref(), &settings.filter);
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let layer = fmt::layer().with_writer(std::io::stderr);
    let layer = match json {
        true => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        false => layer.with_filter(filter).boxed(),
    };
    tracing_subscriber::registry().with(layer).init();
    if let Some((directives, error)) = rejected {
        tracing::warn!(directives, error, "log filter not understood; logging at info");
    }
}

/// The filter: `RUST_LOG` when set, else `telemetry.filter`. Directives are `target=level` lists
/// (`info,kiln=debug,ort=warn`); anything else falls back to `info`, and the rejected text and why
/// come back to be logged.
fn filter(rust_log: Option<&str>, configured: &str) -> (Targets, Option<(String, String)>) {
    let directives = rust_log.filter(|v| !v.trim().is_empty()).unwrap_or(configured);
    match directives.parse::<Targets>() {
        Ok(targets) => (targets, None),
        Err(e) => (
            Targets::new().with_default(tracing::Level::INFO),
            Some((directives.to_owned(), e.to_string())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn rust_log_wins_over_the_configured_filter_and_nonsense_falls_back_to_info() {
        let (targets, rejected) = filter(None, "info,ort=warn");
        assert!(rejected.is_none());
        assert!(targets.would_enable("kiln::worker", &Level::INFO));
        assert!(!targets.would_enable("ort::session", &Level::INFO));
        assert!(targets.would_enable("ort::session", &Level::WARN));

        let (targets, _) = filter(Some("kiln=debug"), "info,ort=warn");
        assert!(targets.would_enable("kiln::worker", &Level::DEBUG));
        assert!(!targets.would_enable("lapin", &Level::ERROR));

        let (targets, rejected) = filter(Some("kiln=loud"), "info");
        assert_eq!(rejected.unwrap().0, "kiln=loud");
        assert!(targets.would_enable("kiln", &Level::INFO) && !targets.would_enable("kiln", &Level::DEBUG));
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, readable text when it is. Default.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Format. Default `auto`.
    pub format: LogFormat,
    /// `tracing` filter directives; `RUST_LOG` wins when set. Default `info,ort=warn` (ONNX Runtime
    /// is chatty at info).
    pub filter: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            filter: "info,ort=warn".into(),
        }
    }
}
