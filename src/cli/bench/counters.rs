//! The inference thread's counters, read where every other reader reads them: the Prometheus
//! metrics that `/metrics` serves ([`kiln::metrics::render`]), from the worker in this process.

/// Running totals of the inference thread (every model).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineCounters {
    /// `kiln_inference_busy_seconds_total`: time spent running models.
    pub busy_seconds: f64,
    /// `kiln_inference_batch_size_count`: model runs.
    pub batches: f64,
    /// `kiln_inference_images_total`: images rendered.
    pub images: f64,
    /// `kiln_denoising_steps_total`: diffusion image-steps (one per request per denoising step).
    pub image_steps: f64,
    /// `kiln_denoising_step_seconds_count`: denoising network calls.
    pub denoising_calls: f64,
    /// `kiln_denoising_step_seconds_sum`: time in those calls.
    pub denoising_seconds: f64,
}

impl EngineCounters {
    /// The totals now.
    pub fn read() -> Self {
        Self::parse(&kiln::metrics::render())
    }

    /// The totals in a text exposition (format 0.0.4), summed over labels.
    fn parse(text: &str) -> Self {
        Self {
            busy_seconds: sum(text, "kiln_inference_busy_seconds_total"),
            batches: sum(text, "kiln_inference_batch_size_count"),
            images: sum(text, "kiln_inference_images_total"),
            image_steps: sum(text, "kiln_denoising_steps_total"),
            denoising_calls: sum(text, "kiln_denoising_step_seconds_count"),
            denoising_seconds: sum(text, "kiln_denoising_step_seconds_sum"),
        }
    }

    /// What was counted since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            busy_seconds: self.busy_seconds - before.busy_seconds,
            batches: self.batches - before.batches,
            images: self.images - before.images,
            image_steps: self.image_steps - before.image_steps,
            denoising_calls: self.denoising_calls - before.denoising_calls,
            denoising_seconds: self.denoising_seconds - before.denoising_seconds,
        }
    }
}

/// The sum of every sample of `metric` (any labels).
fn sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let (_, value) = line.rsplit_once(' ')?;
            (&line[..name_end] == metric)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_labels_and_other_series_ignored() {
        let text = "\
# HELP kiln_inference_images_total Images the models rendered.
# TYPE kiln_inference_images_total counter
kiln_inference_images_total{model=\"a\"} 3
kiln_inference_images_total{model=\"b b\"} 4
kiln_inference_images_total_other 100
kiln_inference_batch_size_bucket{model=\"a\",le=\"1\"} 9
kiln_inference_batch_size_count{model=\"a\"} 2
kiln_inference_batch_size_count{model=\"b\"} 1
kiln_inference_busy_seconds_total 0.25
kiln_denoising_steps_total{model=\"a\"} 40
kiln_denoising_step_seconds_sum{model=\"a\"} 1.5
kiln_denoising_step_seconds_count{model=\"a\"} 30
";
        let counters = EngineCounters::parse(text);
        assert_eq!(
            counters,
            EngineCounters {
                busy_seconds: 0.25,
                batches: 3.0,
                images: 7.0,
                image_steps: 40.0,
                denoising_calls: 30.0,
                denoising_seconds: 1.5,
            }
        );
        assert_eq!(counters.since(counters), EngineCounters::default());
    }

    #[test]
    fn a_model_run_shows_in_the_counters() {
        let before = EngineCounters::read();
        kiln::metrics::observe_batch("bench-counter-test", 4, 0.5);
        let counted = EngineCounters::read().since(before);
        assert_eq!(counted.batches, 1.0);
        assert_eq!(counted.images, 4.0);
        assert!((counted.busy_seconds - 0.5).abs() < 1e-9, "{counted:?}");
    }
}
