//! What operators see: `/metrics` (exact counts, promtool, a real Prometheus scraping it, the
//! dashboard and alert rules naming only exported metrics), `/readyz` and `/healthz`, the
//! heartbeat on the broker, and W3C trace context from requests to replies.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kiln::domain::{ErrorCode, ReplyStatus, WireStyle};
use kiln::observability::heartbeat;
use kiln::rate_limit::AtLimit;
use kiln::trace_context::TraceParent;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::consume;
use crate::helpers::{
    admin_channel, exclusive_queue, free_port, http_get, read, repo, request, spawn_app_alone_with, spawn_app_with,
    test_settings, within, TcpProxy, TestApp, WorkerProcess, REPLY_TIMEOUT,
};

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `/metrics` scrape, parsed: every sample with its labels, and every family's type.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    /// What happened since `before`: counters and histograms less their values then (the process's
    /// metrics outlive each worker of a test run in one process); gauges as they are.
    fn since(mut self, before: &Scrape) -> Self {
        let cumulative = |name: &str| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|b| self.types.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            matches!(self.types.get(base).map(String::as_str), Some("counter" | "histogram"))
        };
        let cumulative: Vec<bool> = self.samples.iter().map(|(name, _, _)| cumulative(name)).collect();
        let mut keep = Vec::with_capacity(self.samples.len());
        for ((name, labels, mut value), cumulative) in self.samples.into_iter().zip(cumulative) {
            let then = before.samples.iter().find(|(n, l, _)| *n == name && *l == labels);
            if let (true, Some((_, _, then))) = (cumulative, then) {
                value -= then;
                // A counter this worker never moved is not one of its series.
                if value == 0.0 && self.types.get(&name).is_some_and(|t| t == "counter") {
                    continue;
                }
            }
            keep.push((name, labels, value));
        }
        self.samples = keep;
        self
    }

    fn parse(text: String) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closed labels");
                    let labels = inner
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("a number in {line:?}")),
            };
            samples.push((name, labels, value));
        }
        Self { text, samples, types }
    }

    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| *v)
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }

    /// How many samples named `name` have labels including `labels`.
    fn series(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.matching(name, labels).count()
    }

    /// Every sample name and family name.
    fn names(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .map(|(n, _, _)| n.clone())
            .chain(self.types.keys().cloned())
            .collect()
    }
}

/// Counters and histograms as they are when a test's worker starts, by its address: the process's
/// metrics outlive each worker when the tests share one process (`cargo test`).
static BASELINES: std::sync::Mutex<BTreeMap<SocketAddr, Scrape>> = std::sync::Mutex::new(BTreeMap::new());

/// From now on, [`scrape`] of `app` reports counts since now: what this worker did. For a worker
/// that runs alone (no other worker records meanwhile).
fn counts_from_now(app: &TestApp) {
    let now = Scrape::parse(kiln::metrics::render());
    BASELINES.lock().unwrap().insert(app.http_addr, now);
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let scrape = Scrape::parse(body);
    match BASELINES.lock().unwrap().get(&addr) {
        Some(before) => scrape.since(before),
        None => scrape,
    }
}

/// Scrape until `ready` holds (the last request's metrics are recorded just after its reply).
async fn scrape_until(addr: SocketAddr, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = Instant::now();
    loop {
        let s = scrape(addr).await;
        if ready(&s) {
            return s;
        }
        assert!(
            started.elapsed() < REPLY_TIMEOUT,
            "waited for {what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `kiln worker` process serving multistyle26, ready, with its `/metrics` address.
async fn worker_process() -> (WorkerProcess, kiln::configuration::Settings, SocketAddr) {
    let mut settings = test_settings();
    settings.http.bind = format!("127.0.0.1:{}", free_port());
    let http_addr = settings.http.bind.parse().unwrap();
    let worker = WorkerProcess::spawn(&settings, &[]);
    worker.wait_for_log("worker ready", REPLY_TIMEOUT).await;
    (worker, settings, http_addr)
}

/// Stop a [`worker_process`] and remove its topology.
async fn stop_worker_process(mut worker: WorkerProcess, settings: &kiln::configuration::Settings) {
    worker.terminate();
    assert!(worker.wait_exit(REPLY_TIMEOUT).await.success());
    crate::helpers::cleanup(settings).await;
}

fn one_model(s: &mut kiln::configuration::Settings) {
    s.models.enabled = vec!["multistyle26".into()];
}

fn no_gpu_here() -> bool {
    !std::path::Path::new("/proc/driver/nvidia").exists()
}

#[tokio::test]
async fn metrics_count_exactly_what_the_worker_did_and_promtool_has_nothing_to_say() {
    // A worker process of its own, so every series it exports is its own (gauges included: in
    // this process, other tests' workers may have set them).
    let (worker, settings, http_addr) = worker_process().await;
    let mut producer = kiln::submit::Producer::connect(&settings.amqp.url, &settings.topology().requests)
        .await
        .expect("producer connects");
    let photo = read("tests/data/astronaut-256.png");
    for style in [3, 5] {
        let reply = producer
            .request(&request(&photo, Some(WireStyle::Index(style))), REPLY_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(reply.document.status, ReplyStatus::Ok);
    }
    let reply = producer
        .request(&request(&photo, Some(WireStyle::Index(30))), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(reply.document.error.unwrap().code, ErrorCode::UnknownStyle);
    let mut unknown_model = request(&photo, Some(WireStyle::Index(1)));
    unknown_model.model = "no-such-model".into();
    let reply = producer.request(&unknown_model, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.error.unwrap().code, ErrorCode::UnknownModel);
    producer.send_raw(b"not json at all", "malformed-1").await.unwrap();
    let reply = producer.reply_to("malformed-1", REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.error.unwrap().code, ErrorCode::MalformedRequest);

    let s = scrape_until(http_addr, "5 settled requests", |s| {
        s.sum("kiln_requests_total", &[]) == 5.0
    })
    .await;
    let requests = |labels: &[(&str, &str)]| s.sum("kiln_requests_total", labels);
    // Limits are off in tests: the tier is the request queue's, and `kiln.requests` counts as the
    // default tier's.
    assert_eq!(
        requests(&[("model", "multistyle26"), ("tier", "free"), ("outcome", "ok")]),
        2.0
    );
    assert_eq!(
        requests(&[("model", "multistyle26"), ("outcome", "unknown_style")]),
        1.0
    );
    // A model this worker does not serve is never a label value: it could be anything.
    assert_eq!(requests(&[("model", "unknown"), ("outcome", "unknown_model")]), 1.0);
    assert_eq!(requests(&[("model", "unknown"), ("outcome", "malformed_request")]), 1.0);
    assert_eq!(s.series("kiln_requests_total", &[]), 4);

    // One model run per image; the warm-up run is not a request and is not counted.
    let model = [("model", "multistyle26")];
    assert_eq!(s.sum("kiln_inference_batch_size_count", &model), 2.0);
    assert_eq!(s.sum("kiln_inference_batch_size_sum", &model), 2.0);
    assert_eq!(
        s.sum(
            "kiln_inference_batch_size_bucket",
            &[("model", "multistyle26"), ("le", "1")]
        ),
        2.0
    );
    assert_eq!(s.sum("kiln_inference_images_total", &model), 2.0);
    assert_eq!(s.sum("kiln_inference_batch_duration_seconds_count", &model), 2.0);
    let busy = s.sum("kiln_inference_busy_seconds_total", &[]);
    assert!(busy > 0.0);
    assert!((busy - s.sum("kiln_inference_batch_duration_seconds_sum", &model)).abs() < 1e-9);
    // Per request: inference for the two images; queue wait for the four that parsed (the
    // producer sets the AMQP timestamp); end to end for all five.
    assert_eq!(s.sum("kiln_request_inference_seconds_count", &model), 2.0);
    assert_eq!(s.sum("kiln_request_inference_seconds_count", &[]), 2.0);
    assert_eq!(s.sum("kiln_request_queue_wait_seconds_count", &[]), 4.0);
    assert_eq!(
        s.sum("kiln_request_queue_wait_seconds_count", &[("model", "unknown")]),
        1.0
    );
    assert_eq!(s.sum("kiln_request_duration_seconds_count", &[]), 5.0);
    assert_eq!(s.sum("kiln_request_duration_seconds_bucket", &[("le", "+Inf")]), 5.0);
    assert_eq!(s.sum("kiln_requests_in_flight", &[]), 0.0);

    assert_eq!(s.sum("kiln_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(s.sum("kiln_execution_provider_info", &[("provider", "cpu")]), 1.0);
    assert_eq!(s.series("kiln_model_load_seconds", &[]), 1);
    assert_eq!(
        s.sum("kiln_model_info", &[("model", "multistyle26"), ("variant", "default")]),
        1.0
    );
    assert!(s.sum("kiln_model_load_seconds", &model) > 0.0);
    assert_eq!(s.sum("kiln_ready", &[]), 1.0);
    assert_eq!(s.sum("kiln_broker_reconnects_total", &[]), 0.0);
    assert_eq!(s.sum("kiln_broker_failovers_total", &[]), 0.0);
    assert_eq!(s.sum("kiln_broker_node", &[("node", "127.0.0.1:5672")]), 1.0);
    assert_eq!(s.series("kiln_broker_node", &[]), 1);
    assert_eq!(s.series("kiln_rate_limit_decisions_total", &[]), 0, "limits are off");
    assert!(!s.text.contains("test-user"), "a user id is never a label value");
    if no_gpu_here() {
        assert!(!s.text.contains("kiln_gpu_"), "no GPU, no GPU series");
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/setup.sh)");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(s.text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(checked.status.success(), "promtool check metrics failed: {said}");
    assert_eq!(said.trim(), "", "promtool check metrics has something to say");

    producer.close().await;
    stop_worker_process(worker, &settings).await;
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join("observability/prometheus/kiln-alerts.yml"))
        .output()
        .expect("promtool is installed (scripts/setup.sh)");
    let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

/// A Prometheus server of the test's own: random port, temporary config and storage.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-prometheus-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules = repo().join("observability/prometheus/kiln-alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: kiln\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/setup.sh)");
        Self { child, dir, addr }
    }

    async fn api(&self, path_and_query: &str) -> Option<Value> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let request = format!("GET {path_and_query} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8(raw).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }

    /// The instant vector of `query` (empty until the series exists).
    async fn query(&self, query: &str) -> Vec<Value> {
        let answer = self
            .api(&format!("/api/v1/query?query={}", percent_encode(query)))
            .await;
        match answer {
            Some(v) if v["status"] == "success" => v["data"]["result"].as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Wait until `query` returns one sample whose value is `value`; returns its labels.
    async fn wait_for(&self, query: &str, value: &str) -> Value {
        let started = Instant::now();
        loop {
            let result = self.query(query).await;
            if let [one] = result.as_slice() {
                if one["value"][1] == value {
                    return one["metric"].clone();
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "Prometheus never answered {query} = {value}; last answer {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_worker_evaluates_the_alert_rules_and_runs_the_dashboard_queries() {
    // A worker process of its own: Prometheus reads absolute values, which in this process other
    // tests' workers may already have moved (`cargo test` runs them all in one).
    let (worker, settings, http_addr) = worker_process().await;
    let mut producer = kiln::submit::Producer::connect(&settings.amqp.url, &settings.topology().requests)
        .await
        .expect("producer connects");
    let photo = read("tests/data/astronaut-256.png");
    let reply = producer
        .request(&request(&photo, Some(WireStyle::Index(2))), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    scrape_until(http_addr, "the request counted", |s| {
        s.sum("kiln_requests_total", &[]) == 1.0
    })
    .await;

    let prometheus = Prometheus::start(http_addr);
    prometheus.wait_for(r#"up{job="kiln"}"#, "1").await;
    let labels = prometheus
        .wait_for(r#"kiln_requests_total{job="kiln",outcome="ok"}"#, "1")
        .await;
    assert_eq!(labels["model"], "multistyle26");
    assert_eq!(labels["tier"], "free", "the shared queue counts as the default tier");
    prometheus
        .wait_for(r#"sum(kiln_inference_batch_size_count{job="kiln"})"#, "1")
        .await;
    prometheus.wait_for(r#"kiln_ready{job="kiln"}"#, "1").await;

    // Every alert rule evaluates against real data without an error.
    let started = Instant::now();
    loop {
        let rules = prometheus.api("/api/v1/rules").await;
        let rules: Vec<Value> = rules
            .iter()
            .flat_map(|r| r["data"]["groups"].as_array().cloned().unwrap_or_default())
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            assert_eq!(rules.len(), 13);
            // Nothing is wrong with this worker, so nothing fires.
            assert!(rules.iter().all(|r| r["state"] == "inactive"), "{rules:#?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the alert rules did not all evaluate: {rules:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every dashboard query is PromQL Prometheus accepts (Grafana's variables filled in).
    let dashboard: Value = serde_json::from_slice(&read("observability/grafana/kiln.json")).unwrap();
    for query in dashboard_queries(&dashboard) {
        let promql = query
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("label_values(kiln_build_info, instance)", "kiln_build_info");
        let answer = prometheus
            .api(&format!("/api/v1/query?query={}", percent_encode(&promql)))
            .await
            .expect("Prometheus answers");
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
    }

    producer.close().await;
    stop_worker_process(worker, &settings).await;
}

async fn next_heartbeat(consumer: &mut lapin::Consumer) -> (Value, lapin::message::Delivery) {
    let delivery = tokio::time::timeout(REPLY_TIMEOUT, consumer.next())
        .await
        .expect("a heartbeat in time")
        .expect("the consumer is open")
        .expect("a delivery");
    (serde_json::from_slice(&delivery.data).expect("JSON"), delivery)
}

fn heartbeat_schema() -> jsonschema::Validator {
    let schema: Value = serde_json::from_slice(&read("schemas/heartbeat.v1.schema.json")).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[tokio::test]
async fn heartbeats_describe_the_worker_and_the_last_one_says_stopping() {
    let mut app = spawn_app_alone_with(|s| {
        one_model(s);
        s.heartbeat.enabled = true;
        s.heartbeat.interval_ms = 200;
    })
    .await;
    counts_from_now(&app);
    let channel = admin_channel().await;
    let mut consumer = crate::helpers::heartbeats(&channel, &app.settings.amqp.topology.prefix).await;
    let schema = heartbeat_schema();

    // Beats made before the worker recorded that it consumes may still say `starting`.
    let (beat, delivery) = within("a serving heartbeat", REPLY_TIMEOUT, async {
        loop {
            let (beat, delivery) = next_heartbeat(&mut consumer).await;
            if beat["state"] == "serving" {
                break (beat, delivery);
            }
            assert_eq!(beat["state"], "starting", "{beat}");
        }
    })
    .await;
    let errors: Vec<String> = schema.iter_errors(&beat).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{beat}: {errors:?}");
    assert_eq!(delivery.routing_key.as_str(), "worker.test-worker");
    assert_eq!(
        delivery.properties.kind().as_ref().map(|t| t.as_str()),
        Some(heartbeat::HEARTBEAT_TYPE)
    );
    assert_eq!(beat["version"], 1);
    assert_eq!(beat["worker_id"], "test-worker");
    assert_eq!(beat["state"], "serving");
    assert_eq!(beat["ready"], true);
    assert_eq!(beat["kiln_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(beat["models"], serde_json::json!(["multistyle26"]));
    assert_eq!(beat["execution_provider"], "cpu");
    assert_eq!(beat["interval_ms"], 200);
    assert_eq!(beat["capacity_images_per_second"], Value::Null, "nothing rendered yet");
    assert_eq!(beat["images_rendered"], 0);
    assert_eq!(beat["in_flight"], 0);
    assert_eq!(beat["queue"]["consumers"], 1);
    assert_eq!(beat["queue"]["requests_ready"], 0);
    assert_eq!(beat["queue"]["dead_letters"], 0);
    // The node of amqp.url the worker consumes on, as host:port (never the URL's credentials).
    assert_eq!(beat["broker_node"], "127.0.0.1:5672");
    assert_eq!(beat["broker_failovers"], 0);
    if no_gpu_here() {
        assert_eq!(beat["gpus"], serde_json::json!([]));
    }
    let sent = time::OffsetDateTime::parse(
        beat["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!((time::OffsetDateTime::now_utc() - sent).abs() < time::Duration::seconds(60));

    let mut producer = app.producer().await;
    let photo = read("tests/data/astronaut-256.png");
    let reply = producer
        .request(&request(&photo, Some(WireStyle::Index(4))), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    let beat = within("a heartbeat counting the image", REPLY_TIMEOUT, async {
        loop {
            let (beat, _) = next_heartbeat(&mut consumer).await;
            if beat["images_rendered"] == 1 {
                break beat;
            }
        }
    })
    .await;
    assert!(schema.is_valid(&beat), "{beat}");
    // Capacity is measured: one image per the busy time the metrics recorded for it.
    let busy = scrape(app.http_addr)
        .await
        .sum("kiln_inference_busy_seconds_total", &[]);
    let capacity = beat["capacity_images_per_second"]
        .as_f64()
        .expect("measured after an image");
    assert!(
        (capacity * busy - 1.0).abs() < 1e-6,
        "capacity {capacity}, busy {busy} s"
    );
    let fraction = beat["busy_fraction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&fraction));
    let s = scrape(app.http_addr).await;
    assert!(s.sum("kiln_heartbeats_total", &[("result", "ok")]) >= 2.0);
    assert_eq!(s.sum("kiln_queue_messages", &[("queue", "requests")]), 0.0);

    producer.close().await;
    app.shutdown().await;
    let last = within("a heartbeat after serving", REPLY_TIMEOUT, async {
        loop {
            let (beat, _) = next_heartbeat(&mut consumer).await;
            if beat["state"] != "serving" {
                break beat;
            }
        }
    })
    .await;
    assert_eq!(last["state"], "stopping", "{last}");
    assert_eq!(last["ready"], false);
    assert!(schema.is_valid(&last), "{last}");
    app.stop().await;
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let (status, body) = http_get(app.http_addr, "/readyz").await;
    (status, serde_json::from_str(&body).expect("a JSON report"))
}

async fn wait_readyz(app: &TestApp, want: u16) -> Value {
    let started = Instant::now();
    loop {
        let (status, report) = readyz(app).await;
        if status == want {
            return report;
        }
        assert!(
            started.elapsed() < REPLY_TIMEOUT,
            "/readyz stayed {status}, wanted {want}: {report}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn readyz_is_503_until_the_worker_consumes_and_while_the_broker_is_gone() {
    let port = free_port();
    let mut settings = test_settings();
    one_model(&mut settings);
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f").into();
    let app = TestApp::start_alone(settings).await;
    counts_from_now(&app);

    // No broker yet: alive, not ready, and the body says which check fails.
    let (status, report) = readyz(&app).await;
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["ready"], false);
    assert_eq!(report["failing"], serde_json::json!(["broker"]));
    assert_eq!(report["checks"]["broker"]["ok"], false);
    assert_eq!(report["checks"]["models"]["ok"], true);
    assert_eq!(report["checks"]["rate_limit"]["ok"], true);
    assert_eq!(http_get(app.http_addr, "/healthz").await.0, 200);
    assert_eq!(scrape(app.http_addr).await.sum("kiln_ready", &[]), 0.0);

    assert_eq!(report["broker_node"], Value::Null, "never connected yet");
    let node = format!("127.0.0.1:{port}");

    let proxy = TcpProxy::start(port, 5672).await;
    let report = wait_readyz(&app, 200).await;
    assert_eq!(report["ready"], true);
    assert_eq!(report["failing"], serde_json::json!([]));
    assert_eq!(report["broker_node"], node.as_str());
    assert_eq!(
        report["checks"]["broker"]["detail"],
        format!("connected to rabbit node {node} and consuming the request queue")
    );
    assert_eq!(scrape(app.http_addr).await.sum("kiln_ready", &[]), 1.0);

    // The broker goes away (connections cut, nothing listening): not ready, and counted.
    drop(proxy);
    let report = wait_readyz(&app, 503).await;
    assert_eq!(report["failing"], serde_json::json!(["broker"]));
    let detail = report["checks"]["broker"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("lost the connection to rabbit node {node}")),
        "{detail}"
    );
    assert_eq!(http_get(app.http_addr, "/healthz").await.0, 200);
    assert_eq!(
        scrape(app.http_addr).await.sum("kiln_broker_reconnects_total", &[]),
        1.0
    );

    // Back on the same node (the only one amqp.url names): a reconnect, not a failover.
    let _proxy = TcpProxy::start(port, 5672).await;
    let report = wait_readyz(&app, 200).await;
    assert_eq!(report["broker_node"], node.as_str());
    assert_eq!(report["broker_failovers"], 0);
    let s = scrape(app.http_addr).await;
    assert_eq!(s.sum("kiln_broker_failovers_total", &[]), 0.0);
    assert_eq!(s.sum("kiln_broker_node", &[("node", node.as_str())]), 1.0);
    app.stop().await;
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn reply_trace(channel: &Channel, requests: &str, headers: FieldTable) -> (TraceParent, Option<String>) {
    let replies = exclusive_queue(channel).await;
    let mut consumer = consume(channel, &replies).await;
    let photo = read("tests/data/astronaut-256.png");
    // A bad style: answered at once, and error replies must carry the trace as much as images.
    let body = serde_json::to_vec(&request(&photo, Some(WireStyle::Index(40)))).unwrap();
    channel
        .basic_publish(
            "".into(),
            requests.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_headers(headers),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(REPLY_TIMEOUT, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let headers = reply.properties.headers().clone().unwrap_or_default();
    let text = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8(s.as_bytes().to_vec()).unwrap()),
        _ => None,
    };
    let parent = TraceParent::parse(&text("traceparent").expect("a traceparent on the reply")).unwrap();
    (parent, text("tracestate"))
}

#[tokio::test]
async fn replies_continue_the_producers_w3c_trace() {
    let app = spawn_app_with(one_model).await;
    let channel = admin_channel().await;

    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(TRACEPARENT)),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString(LongString::from("congo=t61rcWkgMzE")),
    );
    let (reply, state) = reply_trace(&channel, &app.topology.requests, headers).await;
    let sent = TraceParent::parse(TRACEPARENT).unwrap();
    assert_eq!(reply.trace_id, sent.trace_id, "the same trace");
    assert_ne!(reply.parent_id, sent.parent_id, "the worker's own span");
    assert_eq!(reply.flags, 1, "the producer's sampling decision");
    assert_eq!(state.as_deref(), Some("congo=t61rcWkgMzE"));

    // No (or an invalid) traceparent: a new trace, still on the reply.
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString(LongString::from("congo=t61rcWkgMzE")),
    );
    let (reply, state) = reply_trace(&channel, &app.topology.requests, headers).await;
    assert_ne!(reply.trace_id, sent.trace_id);
    assert_eq!(reply.flags, 0);
    assert_eq!(state, None, "a tracestate without a valid traceparent is dropped");
    let (other, _) = reply_trace(&channel, &app.topology.requests, FieldTable::default()).await;
    assert_ne!(other.trace_id, reply.trace_id, "each request its own trace");

    app.stop().await;
}

#[tokio::test]
async fn the_json_log_of_a_request_carries_its_trace_and_the_reply_continues_it() {
    let settings = test_settings();
    let topology = kiln::amqp::Topology::new(&settings.amqp.topology);
    let mut worker = WorkerProcess::spawn(&settings, &[]);
    worker.wait_for_log("worker ready", REPLY_TIMEOUT).await;
    let channel = admin_channel().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(TRACEPARENT)),
    );
    let (reply, _) = reply_trace(&channel, &topology.requests, headers).await;
    assert_eq!(reply.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    worker
        .wait_for_log("4bf92f3577b34da6a3ce929d0e0e4736", REPLY_TIMEOUT)
        .await;
    let log = worker.log();
    let line = log
        .lines()
        .find(|l| l.contains("replied with an error"))
        .unwrap_or_else(|| panic!("no reply logged:\n{log}"));
    let line: Value = serde_json::from_str(line).expect("a JSON log line");
    let span = &line["span"];
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{line}");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{line}");
    assert_eq!(
        span["span_id"],
        reply.span_id_hex(),
        "the span id on the reply is the one logged"
    );
    assert_eq!(span["user_id"], "test-user");
    assert!(span["request_id"].is_string());
    worker.terminate();
    assert!(worker.wait_exit(REPLY_TIMEOUT).await.success());
    crate::helpers::cleanup(&settings).await;
}

/// Metric names in PromQL text: every `kiln_…` identifier.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(found) = promql[i..].find("kiln_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !ident(bytes[start - 1]) {
            names.insert(promql[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(target["expr"].as_str().expect("every target has an expr").to_owned());
            }
            panels(&panel["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut queries);
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = variable["definition"].as_str() {
            queries.push(q.to_owned());
        }
    }
    queries
}

#[tokio::test]
async fn every_metric_is_exported_and_the_dashboard_and_alerts_name_only_exported_metrics() {
    // A worker that goes through every path once: limits on with Redis unreachable (fail_open:
    // errors, the fallback, local decisions), a deferral, an expiry, a dead letter, heartbeats.
    let redis_port = free_port();
    let app = spawn_app_alone_with(|s| {
        // A style model and a diffusion model (its denoising metrics).
        s.models.enabled = vec!["multistyle26".into(), "sd-tiny-random".into()];
        s.heartbeat.enabled = true;
        s.heartbeat.interval_ms = 200;
        s.rate_limit.enabled = true;
        s.rate_limit.redis_url = format!("redis://127.0.0.1:{redis_port}/").into();
        let free = s.rate_limit.tiers.get_mut("free").expect("a free tier");
        free.burst = 1;
        free.rate_per_minute = 1.0;
        free.at_limit = AtLimit::Defer;
    })
    .await;
    counts_from_now(&app);
    let mut producer = app.producer().await;
    let photo = read("tests/data/astronaut-256.png");
    let reply = producer
        .request(&request(&photo, Some(WireStyle::Index(1))), REPLY_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok);
    let mut drawn = crate::diffusion::document(&crate::diffusion::case("t2i-lcm"));
    drawn.user_id = "test-user-diffusion".into();
    let reply = producer.request(&drawn, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.status, ReplyStatus::Ok, "{:?}", reply.document.error);
    let second = request(&photo, Some(WireStyle::Index(1)));
    producer.send(&second).await.unwrap();
    let notice = producer.next_reply(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(notice.document.status, ReplyStatus::Deferred);
    let mut late = request(&photo, Some(WireStyle::Index(1)));
    late.deadline = Some("2020-01-01T00:00:00Z".into());
    let reply = producer.request(&late, REPLY_TIMEOUT).await.unwrap();
    assert_eq!(reply.document.error.unwrap().code, ErrorCode::Expired);
    // A reply queue that does not exist: the request is dead-lettered on arrival, unserved.
    admin_channel()
        .await
        .basic_publish(
            "".into(),
            app.topology.requests.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&late).unwrap(),
            BasicProperties::default().with_reply_to(format!("no-such-queue-{}", uuid::Uuid::new_v4()).as_str().into()),
        )
        .await
        .unwrap();
    // No reply_to, and nothing bound for its id on the results exchange: its (expired) reply is
    // unroutable, so the request is dead-lettered after it.
    admin_channel()
        .await
        .basic_publish(
            "".into(),
            app.topology.requests.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&late).unwrap(),
            BasicProperties::default(),
        )
        .await
        .unwrap();

    let s = scrape_until(app.http_addr, "every declared metric, both dead letters settled", |s| {
        let names = s.names();
        kiln::metrics::METRIC_NAMES.iter().all(|n| names.contains(*n))
            && s.sum("kiln_requests_total", &[("outcome", "dead_lettered")]) >= 2.0
    })
    .await;
    assert_eq!(s.sum("kiln_rate_limit_fallback_active", &[]), 1.0);
    assert!(s.sum("kiln_redis_errors_total", &[]) >= 1.0);
    assert_eq!(s.sum("kiln_deferrals_total", &[("reason", "rate")]), 1.0);
    assert_eq!(
        s.sum(
            "kiln_rate_limit_decisions_total",
            &[("tier", "free"), ("result", "admitted")]
        ),
        2.0
    );
    assert_eq!(
        s.sum(
            "kiln_rate_limit_decisions_total",
            &[("tier", "free"), ("result", "deferred")]
        ),
        1.0
    );
    assert_eq!(s.sum("kiln_requests_expired_total", &[("stage", "admission")]), 2.0);
    assert_eq!(s.sum("kiln_dead_letters_total", &[("reason", "unroutable")]), 1.0);
    assert_eq!(s.sum("kiln_dead_letters_total", &[("reason", "reply_queue_gone")]), 1.0);
    assert_eq!(s.sum("kiln_requests_total", &[("outcome", "dead_lettered")]), 2.0);
    assert_eq!(
        s.sum("kiln_requests_total", &[("tier", "free"), ("outcome", "ok")]),
        2.0
    );
    // t2i-lcm: 4 steps of one request, one row each (no guidance).
    assert_eq!(s.sum("kiln_denoising_steps_total", &[("model", "sd-tiny-random")]), 4.0);
    assert_eq!(s.sum("kiln_denoising_rows_count", &[("model", "sd-tiny-random")]), 4.0);
    assert_eq!(s.sum("kiln_denoising_rows_sum", &[("model", "sd-tiny-random")]), 4.0);

    let exported = s.names();
    let gpu: BTreeSet<String> = kiln::gpu::METRIC_NAMES.iter().map(|n| n.to_string()).collect();
    let dashboard: Value =
        serde_json::from_slice(&read("observability/grafana/kiln.json")).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 30, "{} queries", queries.len());
    let mut used = BTreeSet::new();
    for query in &queries {
        let names = metric_names(query);
        assert!(!names.is_empty(), "a panel query names no kiln metric: {query}");
        for name in names {
            assert!(
                exported.contains(&name) || gpu.contains(&name),
                "the dashboard queries {name}, which the worker does not export: {query}"
            );
            used.insert(name);
        }
    }
    for needed in [
        "kiln_inference_batch_size_bucket",
        "kiln_request_queue_wait_seconds_bucket",
        "kiln_inference_busy_seconds_total",
        "kiln_rate_limit_decisions_total",
        "kiln_gpu_utilization_ratio",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
    assert_eq!(dashboard["uid"], "kiln-fleet");
    let alerts = String::from_utf8(read("observability/prometheus/kiln-alerts.yml")).unwrap();
    let alert_names = metric_names(&alerts);
    assert!(alert_names.len() >= 8);
    for name in alert_names {
        assert!(
            exported.contains(&name) || gpu.contains(&name),
            "an alert rule uses {name}, which the worker does not export"
        );
    }

    producer.close().await;
    app.stop().await;
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(r#"sum by (le) (rate(kiln_a_bucket{x="kiln_not"}[5m])) / kiln_b_total and notkiln_c"#);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["kiln_a_bucket", "kiln_b_total", "kiln_not"]
    );
}
