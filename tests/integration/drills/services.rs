//! A Redis and a RabbitMQ node of the drill's own, for the drills that restart them: the shared
//! ones on 6379 and 5672 serve every other test running meanwhile.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{free_port, poll_until, repo};

/// A `redis-server` on a free port that persists every write before answering it
/// (`appendonly yes`, `appendfsync always`), so a restart, even after `kill -9`, keeps every
/// charge and outcome record the workers were told about.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Start it and wait until it answers.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-drill-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port: free_port(),
            dir,
            child: None,
        };
        redis.spawn();
        redis.wait_until_up().await;
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
    }

    /// `kill -9`: a crash, no shutdown save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port and data (after [`PrivateRedis::kill`]); returns once it
    /// has loaded its data and answers.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_until_up().await;
    }

    async fn wait_until_up(&self) {
        let port = self.port;
        poll_until("the private Redis answers", Duration::from_secs(30), async || {
            ping(port).await.then_some(())
        })
        .await;
    }
}

/// Whether a Redis on `port` answers `PING` with `PONG` (not `LOADING`).
async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").await.is_ok()
        && stream.read_exact(&mut answer).await.is_ok()
        && &answer == b"+PONG\r\n"
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node of its own (`scripts/rabbitmq-node.sh`: node kd1@localhost, port 5687),
/// stopped and removed when dropped.
pub struct PrivateBroker {
    dir: PathBuf,
    url: String,
}

impl PrivateBroker {
    /// Start it (about 7 s here) and return once it accepts connections.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-drill-rabbitmq-{}", uuid::Uuid::new_v4().simple()));
        let output = script().arg("start").arg(&dir).output().expect("the node script runs");
        assert!(
            output.status.success(),
            "the private RabbitMQ node did not start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let url = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        Self { dir, url }
    }

    /// Its AMQP URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stop the node (its whole Erlang VM) and start it again on the same data; returns once it
    /// accepts connections again. Blocking (seconds): call it from `spawn_blocking`.
    pub fn restart(dir: &std::path::Path) {
        let output = script().arg("restart").arg(dir).output().expect("the node script runs");
        assert!(
            output.status.success(),
            "the private RabbitMQ node did not restart: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Its data folder (for [`PrivateBroker::restart`]).
    pub fn dir(&self) -> PathBuf {
        self.dir.clone()
    }
}

fn script() -> Command {
    Command::new(repo().join("scripts/rabbitmq-node.sh"))
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = script().arg("stop").arg(&self.dir).status();
    }
}
