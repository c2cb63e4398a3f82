//! Stopping a request that is already on its way: cancelled by its producer (a message on the
//! cancel exchange, which every worker binds) or abandoned (its `reply_to` queue is gone).
//!
//! Every request this worker holds is *tracked* from receipt to reply: [`Cancellations::track`]
//! gives it a [`StopFlag`], which the worker checks between stages and the inference thread checks
//! between denoising steps. A cancel for a request this worker does not hold is remembered for
//! `remember` (a request waiting in a delay queue comes back later, perhaps to another worker:
//! every worker hears every cancel), so it is stopped on arrival.
//!
//! Cancels reach [`Cancellations::cancel`] from the listener on the cancel exchange,
//! [`crate::amqp::cancel`]; `remember` is the `[cancel]` setting [`CancelSettings::remember_secs`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `[cancel]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CancelSettings {
    /// How long a worker remembers a cancel, in seconds, so that the request is stopped when it
    /// arrives later: still queued, or back from a delay queue (perhaps at another worker: every
    /// worker hears every cancel). Default 900 (15 minutes): longer than a free request lives
    /// (its default deadline is 10 minutes) and than rate, in-flight and overload deferrals
    /// usually last; a request deferred longer (a daily quota, whose trips last up to 4096 s)
    /// that comes back after the cancel is forgotten is served. At least 1.
    pub remember_secs: u64,
}

impl Default for CancelSettings {
    fn default() -> Self {
        Self { remember_secs: 900 }
    }
}

impl CancelSettings {
    /// The checks types cannot make.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.remember_secs >= 1, "cancel.remember_secs must be at least 1");
        Ok(())
    }

    /// How long a cancel is remembered.
    pub fn remember(&self) -> Duration {
        Duration::from_secs(self.remember_secs)
    }
}

/// Why a request was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its producer cancelled it.
    Cancelled,
    /// Its reply queue is gone: nobody waits for it.
    Abandoned,
}

/// Shared between a request's task and the inference thread: set once, read between steps.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the request to stop; the first reason given stays.
    pub fn stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Cancelled => 1,
            StopReason::Abandoned => 2,
        };
        let _ = self.0.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Why it should stop, if it should.
    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::Abandoned),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Requests held now, by id: their flags (a request id can be held twice, briefly, when the
    /// broker redelivers).
    held: HashMap<String, Vec<StopFlag>>,
    /// Cancels seen, by id, with when they are forgotten.
    cancelled: HashMap<String, Instant>,
}

/// The cancels this worker heard and the requests it holds. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cancellations {
    state: Arc<Mutex<State>>,
    remember: Duration,
}

impl Cancellations {
    /// Remember a cancel for `remember` after it was heard.
    pub fn new(remember: Duration) -> Self {
        Self {
            state: Arc::default(),
            remember,
        }
    }

    /// Track a request from now until the returned guard drops. Its flag is already set when a
    /// cancel for it was heard earlier.
    pub fn track(&self, request_id: &str) -> Tracked {
        let flag = StopFlag::new();
        let mut state = self.state.lock().expect("cancellations lock");
        if state
            .cancelled
            .get(request_id)
            .is_some_and(|until| *until > Instant::now())
        {
            flag.stop(StopReason::Cancelled);
        }
        state.held.entry(request_id.to_owned()).or_default().push(flag.clone());
        Tracked {
            owner: self.clone(),
            request_id: request_id.to_owned(),
            flag,
        }
    }

    /// A producer cancelled `request_id`: stop it if it is held, and remember it. Returns whether
    /// this worker held it.
    pub fn cancel(&self, request_id: &str) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().expect("cancellations lock");
        state.cancelled.retain(|_, until| *until > now);
        state.cancelled.insert(request_id.to_owned(), now + self.remember);
        match state.held.get(request_id) {
            Some(flags) => {
                flags.iter().for_each(|f| f.stop(StopReason::Cancelled));
                true
            }
            None => false,
        }
    }

    /// Whether a cancel for `request_id` was heard (and not yet forgotten).
    pub fn is_cancelled(&self, request_id: &str) -> bool {
        let state = self.state.lock().expect("cancellations lock");
        state
            .cancelled
            .get(request_id)
            .is_some_and(|until| *until > Instant::now())
    }

    fn untrack(&self, request_id: &str, flag: &StopFlag) {
        let mut state = self.state.lock().expect("cancellations lock");
        if let Some(flags) = state.held.get_mut(request_id) {
            flags.retain(|f| !Arc::ptr_eq(&f.0, &flag.0));
            if flags.is_empty() {
                state.held.remove(request_id);
            }
        }
    }
}

/// A request held by this worker; dropping it stops the tracking.
#[derive(Debug)]
pub struct Tracked {
    owner: Cancellations,
    request_id: String,
    flag: StopFlag,
}

impl Tracked {
    /// The request's flag.
    pub fn flag(&self) -> &StopFlag {
        &self.flag
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.owner.untrack(&self.request_id, &self.flag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_stops_the_held_request_and_one_that_arrives_later() {
        let cancellations = Cancellations::new(Duration::from_secs(60));
        let held = cancellations.track("a");
        assert_eq!(held.flag().reason(), None);
        assert!(cancellations.cancel("a"));
        assert_eq!(held.flag().reason(), Some(StopReason::Cancelled));
        drop(held);
        assert!(!cancellations.cancel("b"), "b is not held");
        let later = cancellations.track("b");
        assert_eq!(later.flag().reason(), Some(StopReason::Cancelled));
        assert_eq!(cancellations.track("c").flag().reason(), None);
    }

    #[test]
    fn a_cancel_is_forgotten_after_its_time() {
        let cancellations = Cancellations::new(Duration::ZERO);
        cancellations.cancel("a");
        assert!(!cancellations.is_cancelled("a"));
        assert_eq!(cancellations.track("a").flag().reason(), None);
    }

    #[test]
    fn the_first_reason_stays() {
        let flag = StopFlag::new();
        flag.stop(StopReason::Abandoned);
        flag.stop(StopReason::Cancelled);
        assert_eq!(flag.reason(), Some(StopReason::Abandoned));
    }
}
