//! Test harness: real RabbitMQ on localhost, real ONNX Runtime, a unique topology prefix per test
//! so tests run in parallel and clean up after themselves.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use kiln::amqp::Topology;
use kiln::configuration::Settings;
use kiln::domain::{RequestDocument, WireImage, WireParams, WireStyle, CONTRACT_VERSION};
use kiln::startup::Application;
use kiln::submit::Producer;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::SecretString;
use tokio::sync::{oneshot, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::task::JoinHandle;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The broker every test talks to.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long a test waits for one reply before failing (CI machines are slow and share 2 cores).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under `tests/data` or elsewhere in the repository.
pub fn read(relative: &str) -> Vec<u8> {
    let path = repo().join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Settings for a test worker: a fresh topology prefix, absolute paths, fast retries.
pub fn test_settings() -> Settings {
    init_logs();
    let mut s = Settings::default();
    s.amqp.topology.prefix = format!("kiln-test-{}", uuid::Uuid::new_v4().simple());
    s.amqp.reconnect.initial_ms = 50;
    s.amqp.reconnect.max_ms = 500;
    s.amqp.prefetch = 4;
    s.inference.runtime_library = Some(repo().join(s.inference.runtime_library_path()));
    s.models.dir = repo().join("models");
    s.worker.id = Some("test-worker".into());
    s.worker.shutdown_grace_ms = 30_000;
    // Tests about limits turn them on with a key prefix of their own; the others must not be
    // throttled by each other.
    s.rate_limit.enabled = false;
    s.rate_limit.key_prefix = s.amqp.topology.prefix.clone();
    // Any free port for /metrics, /readyz; heartbeats only where a test looks at them.
    s.http.bind = "127.0.0.1:0".into();
    s.heartbeat.enabled = false;
    s
}

fn init_logs() {
    let filter: tracing_subscriber::filter::Targets = "info,ort=warn".parse().expect("a valid filter");
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .finish()
        .with(filter)
        .try_init();
}

/// Workers in this process share its metrics (process-wide statics). A test that asserts exact
/// process-wide values (an unlabelled gauge, a total over every model) runs its worker *alone*:
/// it holds this lock for writing, every other in-process worker (and engine) for reading. Under
/// nextest (one process per test) nobody ever waits; under `cargo test` (one process, tests in
/// threads) those tests wait for the others and the others for them.
static PROCESS_METRICS: LazyLock<Arc<RwLock<()>>> = LazyLock::new(Arc::default);

/// A share of the process's metrics (see [`PROCESS_METRICS`]), held while it lives.
#[derive(Debug)]
pub enum MetricsShare {
    /// Others record too.
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    /// Nobody else records in this process.
    Alone(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// Record metrics in this process alongside other tests (any in-process worker or engine).
pub async fn shared_metrics() -> MetricsShare {
    MetricsShare::Shared(Arc::clone(&PROCESS_METRICS).read_owned().await)
}

/// [`shared_metrics`] for a test without a runtime.
pub fn shared_metrics_blocking() -> MetricsShare {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(shared_metrics())
}

/// Be the only test recording metrics in this process (for exact process-wide values).
pub async fn alone_with_metrics() -> MetricsShare {
    MetricsShare::Alone(Arc::clone(&PROCESS_METRICS).write_owned().await)
}

/// A worker running inside the test process.
pub struct TestApp {
    /// Its settings.
    pub settings: Settings,
    /// Its queue and exchange names.
    pub topology: Topology,
    /// Where it serves `/metrics`, `/healthz`, `/readyz`.
    pub http_addr: SocketAddr,
    /// The cancels it heard and the requests it holds (its `Services::cancellations`).
    pub cancellations: kiln::cancel::Cancellations,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _metrics: MetricsShare,
}

/// Build and start a worker with test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Build and start a worker with test settings changed by `customize`; returns once it consumes.
pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    customize(&mut settings);
    let app = TestApp::start(settings).await;
    app.wait_until_consuming().await;
    app
}

/// [`spawn_app_with`], the only worker recording metrics in this process while it lives (for
/// tests of exact process-wide values; see [`PROCESS_METRICS`]).
pub async fn spawn_app_alone_with(customize: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    customize(&mut settings);
    let alone = alone_with_metrics().await;
    let app = TestApp::start_with(settings, alone).await;
    app.wait_until_consuming().await;
    app
}

impl TestApp {
    /// Start a worker with exactly these settings (it may still be connecting when this returns).
    pub async fn start(settings: Settings) -> Self {
        Self::start_with(settings, shared_metrics().await).await
    }

    /// [`TestApp::start`], the only worker recording metrics in this process while it lives.
    pub async fn start_alone(settings: Settings) -> Self {
        Self::start_with(settings, alone_with_metrics().await).await
    }

    async fn start_with(settings: Settings, metrics: MetricsShare) -> Self {
        let topology = settings.topology();
        let build_settings = settings.clone();
        let app = tokio::task::spawn_blocking(move || Application::build(build_settings))
            .await
            .unwrap()
            .expect("the worker builds");
        let http_addr = app.http_addr();
        let cancellations = app.services().cancellations;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        }));
        Self {
            settings,
            topology,
            http_addr,
            cancellations,
            shutdown: Some(tx),
            task: Some(task),
            _metrics: metrics,
        }
    }

    /// Wait until the worker consumes from its request queue.
    pub async fn wait_until_consuming(&self) {
        let started = Instant::now();
        loop {
            // A passive declare of a missing queue closes the channel: use a fresh one each time,
            // on the worker's broker (its first node, when it names several).
            let channel = channel_on(&self.settings.amqp).await;
            // Consumers start in the order of `request_queues`: the last one means all of them.
            let last = &self.topology.request_queues.last().expect("a request queue").name;
            if let Ok(q) = channel
                .queue_declare(last.as_str().into(), passive(), FieldTable::default())
                .await
            {
                if q.consumer_count() > 0 {
                    return;
                }
            }
            assert!(started.elapsed() < REPLY_TIMEOUT, "the worker did not start consuming");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A producer sending to this worker's request queue.
    pub async fn producer(&self) -> Producer {
        Producer::connect(&SecretString::from(AMQP_URL), &self.topology.requests)
            .await
            .expect("producer connects")
    }

    /// Ask the worker to stop and wait until it has; the topology stays (see [`TestApp::cleanup`]).
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().expect("the worker stops cleanly");
        }
    }

    /// Stop the worker and delete its queues and exchanges.
    pub async fn stop(mut self) {
        self.shutdown().await;
        cleanup(&self.settings).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // A failed test does not reach stop(): delete the queues from a thread of our own.
        if self.shutdown.is_some() {
            let settings = self.settings.clone();
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(cleanup(&settings));
            })
            .join();
        }
    }
}

/// Options of a passive declare: does the queue exist?
pub fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

/// A channel on a connection of the test's own.
/// A channel on the first node of these settings' broker that answers (with their TLS files).
pub async fn channel_on(amqp: &kiln::configuration::AmqpSettings) -> Channel {
    let broker = kiln::amqp::connect::Broker::new(amqp).expect("usable amqp settings");
    let (connection, _) = kiln::amqp::connect::connect_any(&broker, &ConnectionProperties::default(), None)
        .await
        .expect("a broker node answers");
    let channel = connection.create_channel().await.unwrap();
    drop(connection);
    channel
}

pub async fn admin_channel() -> Channel {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let channel = connection.create_channel().await.unwrap();
    // Channels keep their connection open; it closes when the last of them is dropped.
    drop(connection);
    channel
}

/// A server-named queue that lives as long as `channel`'s connection; returns its name.
pub async fn exclusive_queue(channel: &Channel) -> String {
    let options = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    channel
        .queue_declare("".into(), options, FieldTable::default())
        .await
        .unwrap()
        .name()
        .to_string()
}

/// Consume a test's own queue without acks.
pub async fn consume(channel: &Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// A queue bound to the heartbeat exchange of `prefix` (declared here too, as the worker declares
/// it), consumed on `channel`: every worker's beats.
pub async fn heartbeats(channel: &Channel, prefix: &str) -> lapin::Consumer {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
    use lapin::types::FieldTable;
    let exchange = kiln::observability::heartbeat::exchange_name(prefix);
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = exclusive_queue(channel).await;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "worker.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    consume(channel, &queue).await
}

/// Messages ready in a queue (not counting unacknowledged ones).
pub async fn ready_messages(queue: &str) -> u32 {
    admin_channel()
        .await
        .queue_declare(queue.into(), passive(), FieldTable::default())
        .await
        .expect("the queue exists")
        .message_count()
}

/// Delete every queue and exchange a worker with these settings, or any test using its prefix,
/// may have declared: the topology with the tiers of these settings and the default ones (a
/// worker process started with the default tiers declares their queues too), and the heartbeat
/// exchange. What is not there is skipped.
pub async fn cleanup(settings: &Settings) {
    let defaults = Settings::default().rate_limit.tiers;
    let tiers: BTreeSet<&str> = settings
        .rate_limit
        .tiers
        .keys()
        .chain(defaults.keys())
        .map(String::as_str)
        .collect();
    let channel = admin_channel().await;
    Topology::with_tiers(&settings.amqp.topology, tiers)
        .delete(&channel)
        .await;
    let exchange = kiln::observability::heartbeat::exchange_name(&settings.amqp.topology.prefix);
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

/// How often [`poll_until`] tries again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// `future`'s output; panics naming `what` if it takes longer than `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(timeout, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {timeout:?}"))
}

/// Call `attempt` (every 50 ms) until it returns a value; panics naming `what` after `timeout`,
/// also when one attempt hangs.
pub async fn poll_until<T>(what: &str, timeout: Duration, mut attempt: impl AsyncFnMut() -> Option<T>) -> T {
    within(what, timeout, async {
        loop {
            if let Some(value) = attempt().await {
                return value;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await
}

/// A valid request for the default model.
pub fn request(image: &[u8], style: Option<WireStyle>) -> RequestDocument {
    RequestDocument {
        version: CONTRACT_VERSION,
        request_id: uuid::Uuid::new_v4().to_string(),
        user_id: "test-user".into(),
        model: "multistyle26".into(),
        params: WireParams {
            style,
            ..Default::default()
        },
        image: Some(WireImage::from_bytes(image)),
        deadline: None,
        created_at: None,
        tier: None,
        progress: false,
    }
}

/// Decode a PNG body.
pub fn decode_png(body: &[u8]) -> image::RgbImage {
    assert!(body.starts_with(b"\x89PNG\r\n\x1a\n"), "the body is not a PNG");
    image::load_from_memory_with_format(body, image::ImageFormat::Png)
        .expect("a decodable PNG")
        .into_rgb8()
}

/// A `kiln worker` child process, its stderr (JSON logs) collected line by line.
pub struct WorkerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The largest `VmHWM` read so far, in bytes (see [`WorkerProcess::peak_rss_bytes`]).
    peak_rss: Arc<std::sync::atomic::AtomicU64>,
    /// Tells the sampler to stop once the process is gone (its pid may be reused).
    gone: Arc<std::sync::atomic::AtomicBool>,
}

/// How often a [`WorkerProcess`]'s peak RSS is read while it runs.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes; `None` once the process is
/// gone (or a zombie, which has no memory fields).
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

impl WorkerProcess {
    /// Start `kiln worker` with these settings as `KILN_*` variables (plus `extra`).
    pub fn spawn(settings: &Settings, extra: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .arg("worker")
            .current_dir(repo())
            .env("KILN_AMQP__TOPOLOGY__PREFIX", &settings.amqp.topology.prefix)
            .env(
                "KILN_AMQP__TOPOLOGY__DELIVERY_LIMIT",
                settings.amqp.topology.delivery_limit.to_string(),
            )
            .env("KILN_AMQP__PREFETCH", settings.amqp.prefetch.to_string())
            .env("KILN_MODELS__ENABLED", "multistyle26")
            .env("KILN_RATE_LIMIT__ENABLED", settings.rate_limit.enabled.to_string())
            .env("KILN_RATE_LIMIT__KEY_PREFIX", &settings.rate_limit.key_prefix)
            .env("KILN_TELEMETRY__FORMAT", "json")
            .env("KILN_HTTP__BIND", &settings.http.bind)
            .env("KILN_HEARTBEAT__ENABLED", settings.heartbeat.enabled.to_string())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the kiln binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // VmHWM is the kernel's own peak of the process's RSS; reading it every 50 ms keeps it
        // for after a SIGKILL (up to the last 50 ms before it).
        let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (peak, stop, pid) = (Arc::clone(&peak_rss), Arc::clone(&gone), child.id());
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            while !stop.load(Ordering::SeqCst) {
                let Some(hwm) = proc_status_bytes(pid, "VmHWM") else {
                    break;
                };
                peak.fetch_max(hwm, Ordering::SeqCst);
                std::thread::sleep(RSS_SAMPLE_INTERVAL);
            }
        });
        Self {
            child,
            lines,
            peak_rss,
            gone,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident set size so far (`VmHWM`), in bytes: read now while it runs,
    /// and the last sample (taken every 50 ms) once it is gone.
    pub fn peak_rss_bytes(&self) -> u64 {
        use std::sync::atomic::Ordering;
        if !self.gone.load(Ordering::SeqCst) {
            if let Some(hwm) = proc_status_bytes(self.pid(), "VmHWM") {
                self.peak_rss.fetch_max(hwm, Ordering::SeqCst);
            }
        }
        self.peak_rss.load(Ordering::SeqCst)
    }

    /// Wait until a log line contains `needle`; panics with the log after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let started = Instant::now();
        while !self.log_contains(needle) {
            assert!(
                started.elapsed() < timeout,
                "no log line with {needle:?} in {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lines logged so far that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.count(needle) > 0
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Send SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Kill it with SIGKILL, as the OOM killer or a node failure would.
    pub fn kill(&mut self) {
        self.peak_rss_bytes();
        self.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for it to exit on its own; returns whether it exited successfully.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            self.peak_rss_bytes();
            if let Some(status) = self.child.try_wait().unwrap() {
                self.gone.store(true, std::sync::atomic::Ordering::SeqCst);
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "the worker did not exit; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Path of the Python with the example producer's dependencies (made by scripts/setup.sh).
pub fn venv_python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        Path::new(&python).exists(),
        "{} is missing: run scripts/setup.sh (it creates the venv with pika and the schema tools)",
        python.display()
    );
    python
}

/// A TCP proxy from a local port to a local service, whose connections can be cut: a broker or a
/// Redis that goes away and comes back, as a network partition or a restart looks to the worker.
pub struct TcpProxy {
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    partitioned: tokio::sync::watch::Sender<bool>,
}

impl TcpProxy {
    /// Listen on `port` and forward every connection to 127.0.0.1:`target`.
    pub async fn start(port: u16, target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let registry = Arc::clone(&connections);
        let (partitioned, watch) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                let forward = tokio::spawn(async move {
                    // Behind a partition nothing answers: the connection is held, unanswered,
                    // until the partition heals, then closed (the client's next try gets through).
                    if *watch.borrow_and_update() {
                        let _ = watch.wait_for(|partitioned| !partitioned).await;
                        return;
                    }
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().unwrap().push(forward);
            }
        });
        Self {
            accept,
            connections,
            partitioned,
        }
    }

    /// Cut the network until [`TcpProxy::heal`]: every open connection is closed, and a new one
    /// is accepted but never answered (held until the partition heals, then closed).
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
        self.sever();
    }

    /// End a [`TcpProxy::partition`]: the connections it held are closed, new ones forwarded.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }

    /// Cut every open connection (new ones are still accepted).
    pub fn sever(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.sever();
        self.accept.abort();
    }
}

/// One `GET` over HTTP/1.0 (the server closes the connection after the body): status and body.
pub async fn http_get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the HTTP endpoint accepts");
    let request = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// A worker's `/readyz`: status and the JSON report.
pub async fn readyz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_get(addr, "/readyz").await;
    (status, serde_json::from_str(&body).expect("a JSON report"))
}

/// The value of one series in a `/metrics` text: `series` is the name with its labels as the
/// worker writes them (`kiln_broker_node{node="127.0.0.1:5672"}`); `None` if absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().expect("a number"))
}

/// A free TCP port on 127.0.0.1 (nothing listens on it when this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Peak signal-to-noise ratio of two same-sized RGB images, in dB.
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}
