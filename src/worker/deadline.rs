//! A request's deadline: its own, or its tier's default counted from its creation.

use std::time::Instant;

use time::OffsetDateTime;

use crate::domain::{ErrorCode, GenerationRequest, RequestError};
use crate::scheduling::TierClass;

/// When rendering must have started, and whose deadline that is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    at: Option<OffsetDateTime>,
    own: bool,
}

impl Deadline {
    /// `request`'s own deadline, or `tier`'s default counted from `since` (its creation).
    pub(super) fn of(request: &GenerationRequest, tier: &TierClass, since: OffsetDateTime) -> Self {
        match request.deadline {
            Some(at) => Self {
                at: Some(at),
                own: true,
            },
            None => Self {
                at: tier.default_deadline.map(|d| since + d),
                own: false,
            },
        }
    }

    /// The monotonic instant of the deadline (now, if it is already past), for the batcher.
    pub(super) fn instant(&self) -> Option<Instant> {
        self.at.map(|at| {
            let ahead = (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
            Instant::now() + std::time::Duration::try_from(ahead).unwrap_or_default()
        })
    }

    /// The `expired` error if the deadline passed, counted at `stage`; `tier` names a default.
    pub(super) fn check(&self, tier: &TierClass, stage: &'static str) -> Result<(), RequestError> {
        let Some(deadline) = self.at else { return Ok(()) };
        let now = OffsetDateTime::now_utc();
        if now <= deadline {
            return Ok(());
        }
        crate::metrics::record_expired(stage);
        let late = (now - deadline).as_seconds_f64();
        let whose = match self.own {
            true => "the deadline".to_owned(),
            false => format!("the {} tier's default deadline", tier.tier),
        };
        Err(RequestError::new(
            ErrorCode::Expired,
            format!("{whose} passed {late:.3} s before rendering could start"),
        ))
    }
}
