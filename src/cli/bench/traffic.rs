//! What sends: the users' requests, to their tiers' queues, entered in the book; the three ways a
//! run sends them (one at a time alone, closed loop, open loop).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;

use super::book::Book;
use super::counters::EngineCounters;
use super::report::Window;
use super::users::{Arrivals, Users};
use kiln::amqp::Topology;

/// How long a request may take before the bench gives up on it (a 50-step request at 256 px takes
/// about 2 s alone on a 2-core CPU).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// The users' requests, to their tiers' queues, entered in the book.
pub struct Traffic<'a> {
    /// Who sends what.
    pub users: &'a Users,
    /// Where to.
    pub topology: &'a Topology,
    /// Where it is entered.
    pub book: &'a Book,
}

impl Traffic<'_> {
    /// Publish the `n`-th request of a user of `tier` (with `steps` denoising steps, or as the
    /// workload draws them); returns its id.
    fn send(
        &self,
        tier: &str,
        n: usize,
        steps: Option<u32>,
    ) -> (String, impl std::future::Future<Output = anyhow::Result<()>>) {
        let request = self.users.request(tier, n, steps);
        let id = request.document.request_id.clone();
        (
            id,
            self.book.send(self.topology.tier_queue(tier), tier.to_owned(), request),
        )
    }

    /// Publish and wait until the broker has confirmed it.
    async fn send_confirmed(&self, tier: &str, n: usize, steps: Option<u32>) -> anyhow::Result<String> {
        let (id, send) = self.send(tier, n, steps);
        tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .context("the broker did not confirm a request within 60 s")??;
        Ok(id)
    }

    /// Unloaded: for each of `steps`, `repeats` requests of the last tier, one at a time (each sent
    /// when the last one's reply came), after one request whose time is not kept (first use of the
    /// size's buffers). Their times are in the book.
    pub async fn unloaded(&self, steps: &[u32], repeats: usize) -> anyhow::Result<()> {
        let tier = self.users.last_tier()?;
        if let Some(&first) = steps.first() {
            let id = self.send_confirmed(tier, 0, Some(first)).await?;
            self.book.wait_final(id, REPLY_TIMEOUT).await;
            self.book.take();
        }
        let mut n = 1;
        for &s in steps {
            for _ in 0..repeats {
                let id = self.send_confirmed(tier, n, Some(s)).await?;
                n += 1;
                self.book.wait_final(id, REPLY_TIMEOUT).await;
            }
        }
        Ok(())
    }

    /// Closed loop: keep `in_flight` requests of the last tier in the worker for `window`; images/s.
    pub async fn capacity(&self, window: Duration, in_flight: usize) -> anyhow::Result<f64> {
        let tier = self.users.last_tier()?;
        let started = Instant::now();
        let before = EngineCounters::read();
        let mut n = 0;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        while started.elapsed() < window {
            while pending.len() < in_flight {
                let id = self.send_confirmed(tier, n, None).await?;
                n += 1;
                pending.push(self.book.wait_final(id, REPLY_TIMEOUT));
            }
            pending.next().await;
        }
        let images = EngineCounters::read().since(before).images;
        let elapsed = started.elapsed();
        while pending.next().await.is_some() {}
        self.book.take();
        Ok(images / elapsed.as_secs_f64())
    }

    /// Open loop: Poisson arrivals at `offered` per second for `window`, drawn from `seed`, tier
    /// by share, each send on a task of its own.
    pub async fn open_loop(&self, offered: f64, window: Duration, seed: u64) -> Window {
        let started = Instant::now();
        let before = EngineCounters::read();
        for (n, (at, pick)) in Arrivals::new(offered, window, seed).enumerate() {
            tokio::time::sleep_until((started + at).into()).await;
            let (_, send) = self.send(self.users.tier_at(pick), n, None);
            tokio::spawn(send);
        }
        Window {
            started,
            sending: started.elapsed(),
            engine: EngineCounters::read().since(before),
        }
    }
}
