//! A rate-limit lease that is always given back: explicitly at the end of the journey, or, on any
//! path that leaves early (an error, a cancelled task, a panic), when the guard is dropped.

use std::sync::Arc;

use crate::rate_limit::{Lease, Limiter};

/// Holds a request's place among its user's requests in flight until it is released.
#[must_use = "a lease held by nobody is released at once"]
pub(super) struct LeaseGuard {
    held: Option<(Arc<Limiter>, Lease)>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("lease", &self.held.as_ref().map(|(_, lease)| lease))
            .finish()
    }
}

impl LeaseGuard {
    /// Nothing held (limits off, or the request was not admitted by the limiter).
    pub(super) fn none() -> Self {
        Self { held: None }
    }

    /// `lease`, to be given back to `limiter`.
    pub(super) fn new(limiter: Arc<Limiter>, lease: Lease) -> Self {
        Self {
            held: Some((limiter, lease)),
        }
    }

    /// Give the lease back now, waiting for the limiter.
    pub(super) async fn release(mut self) {
        if let Some((limiter, lease)) = self.held.take() {
            limiter.release(lease).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Not released on the way: release it in the background. Without a runtime (the process
        // is ending) the lease expires in Redis by itself.
        if let Some((limiter, lease)) = self.held.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { limiter.release(lease).await });
            }
        }
    }
}
