//! Whether a request may use the device now: its deadline, the worker's overload policy for its
//! tier, its cost and the user's limits in Redis.

use std::sync::Arc;

use super::deadline::Deadline;
use super::incoming::Incoming;
use super::lease::LeaseGuard;
use super::Services;
use crate::domain::reply::Degraded;
use crate::domain::{Deferral, DeferralReason, ErrorCode, GenerationRequest, LimitInfo, RequestError, Scope};
use crate::inference::ModelRegistry;
use crate::rate_limit::{AtLimit, Decision, Limiter};
use crate::scheduling::{OverloadAction, Schedule};

/// What to do with a request before it goes near the device.
#[derive(Debug)]
pub(super) enum Admission {
    /// Render it; the guard gives the lease back.
    Go {
        lease: LeaseGuard,
        rate_limit: Option<LimitInfo>,
        /// Set when overload capped its size or its steps.
        degraded: Option<Degraded>,
    },
    /// Answer with this error.
    Refuse {
        error: RequestError,
        rate_limit: Option<LimitInfo>,
    },
    /// Put it in a delay queue.
    Defer {
        deferral: Deferral,
        rate_limit: Option<LimitInfo>,
    },
}

impl Admission {
    /// The limit the limiter reported, if it was asked.
    pub(super) fn rate_limit(&self) -> Option<&LimitInfo> {
        match self {
            Self::Go { rate_limit, .. } | Self::Refuse { rate_limit, .. } | Self::Defer { rate_limit, .. } => {
                rate_limit.as_ref()
            }
        }
    }
}

/// Decide, in order: deadline passed → `expired`; overloaded and the tier defers → defer;
/// overloaded and the tier degrades → cap the size and the steps; then the limiter, which prices
/// what will run (after the caps). When the limiter names the user's tier, `incoming.class` becomes
/// that tier's.
pub(super) async fn admit(services: &Services, incoming: &mut Incoming) -> Admission {
    let schedule = &services.schedule;
    let tier = schedule.class(incoming.class);
    if let Err(error) = Deadline::of(&incoming.request, tier, incoming.since).check(tier, "admission") {
        return Admission::Refuse {
            error,
            rate_limit: None,
        };
    }
    let overloaded = schedule.overloaded(incoming.queue_wait.and_then(|w| w.try_into().ok()));
    let mut degraded = None;
    if overloaded {
        match tier.overload {
            OverloadAction::Defer => {
                return Admission::Defer {
                    deferral: Deferral {
                        retry_after_ms: schedule.overload.defer_ms,
                        reason: DeferralReason::Overloaded,
                        count: incoming.deferrals + 1,
                    },
                    rate_limit: None,
                }
            }
            OverloadAction::Degrade => degraded = degrade(&services.registry, schedule, &mut incoming.request),
            OverloadAction::Serve => {}
        }
    }
    let admission = ask_limiter(
        services.limiter.as_ref(),
        &services.registry,
        &incoming.request,
        incoming.deferrals,
    )
    .await;
    match admission {
        Admission::Go { lease, rate_limit, .. } => {
            if let Some(info) = &rate_limit {
                incoming.class = schedule.class_of(Some(info.tier.as_str()));
            }
            Admission::Go {
                lease,
                rate_limit,
                degraded,
            }
        }
        other => other,
    }
}

/// Serve less under overload: cap the output's longer side at `degrade_max_side` when it would be
/// larger, and a multi-step model's steps at `degrade_steps` when it plans more; what was cut, if
/// anything, for the reply. Both are weighed without decoding.
fn degrade(registry: &ModelRegistry, schedule: &Schedule, request: &mut GenerationRequest) -> Option<Degraded> {
    let overload = &schedule.overload;
    let max_side = registry
        .output_size(request)
        .is_ok_and(|(w, h)| w.max(h) > overload.degrade_max_side)
        .then_some(overload.degrade_max_side);
    let steps = registry
        .planned_steps(request)
        .is_some_and(|steps| steps > overload.degrade_steps)
        .then_some(overload.degrade_steps);
    request.size_cap = max_side;
    request.steps_cap = steps;
    // An image-to-image request at a very low strength could be left no step to run: serve it
    // with its own steps rather than refuse it for the worker's cut.
    let steps = if steps.is_some() && registry.planned_steps(request).is_none() {
        request.steps_cap = None;
        None
    } else {
        steps
    };
    (max_side.is_some() || steps.is_some()).then(|| Degraded {
        max_side,
        steps,
        reason: "overloaded".into(),
    })
}

/// Price the request (from the image header alone, no decoding) and ask the limiter.
async fn ask_limiter(
    limiter: Option<&Arc<Limiter>>,
    registry: &ModelRegistry,
    request: &GenerationRequest,
    deferrals: u32,
) -> Admission {
    let Some(limiter) = limiter else {
        return Admission::Go {
            lease: LeaseGuard::none(),
            rate_limit: None,
            degraded: None,
        };
    };
    let refuse = |error| Admission::Refuse {
        error,
        rate_limit: None,
    };
    // Refuse what would fail anyway before charging the user for it.
    let work = match registry.check(request) {
        Ok(work) => work,
        Err(error) => return refuse(error),
    };
    let cost_settings = &limiter.settings().cost;
    let cost = cost_settings.units(&work);
    if cost > u64::from(cost_settings.max_units) {
        let evaluations = work
            .denoising_evaluations
            .map(|e| format!(" x {e} denoising evaluations"))
            .unwrap_or_default();
        return refuse(RequestError::new(
            ErrorCode::InvalidParams,
            format!(
                "this request costs {cost} units ({} output pixels{evaluations}); the most a request may cost is {}",
                work.pixels, cost_settings.max_units
            ),
        ));
    }
    let deferral = |retry_after_ms, reason| Deferral {
        retry_after_ms,
        reason,
        count: deferrals + 1,
    };
    match limiter
        .decide(request.user_id.as_str(), cost, request.request_id.as_str())
        .await
    {
        Decision::Admitted { lease, info } => Admission::Go {
            lease: LeaseGuard::new(Arc::clone(limiter), lease),
            rate_limit: Some(info),
            degraded: None,
        },
        Decision::TooCostly { tier, max_units } => refuse(RequestError::new(
            ErrorCode::InvalidParams,
            format!(
                "this request costs {cost} units; tier {tier} admits at most {max_units} at once or per day, so it \
                 could never run; ask for a smaller size"
            ),
        )),
        Decision::Limited {
            info,
            policy: AtLimit::Reject,
        } => Admission::Refuse {
            error: RequestError::new(ErrorCode::RateLimited, limit_message(&info)),
            rate_limit: Some(info),
        },
        Decision::Limited {
            info,
            policy: AtLimit::Defer,
        } => Admission::Defer {
            deferral: deferral(info.retry_after_ms, DeferralReason::of_limit(info.scope)),
            rate_limit: Some(info),
        },
        Decision::Unavailable { retry_after_ms } => Admission::Defer {
            deferral: deferral(retry_after_ms, DeferralReason::LimiterUnavailable),
            rate_limit: None,
        },
    }
}

fn limit_message(info: &LimitInfo) -> String {
    let what = match info.scope {
        Scope::Rate => format!("the {} tier's rate (burst {} units)", info.tier, info.limit),
        Scope::DailyQuota => format!("the {} tier's daily quota of {} units", info.tier, info.limit),
        Scope::InFlight => format!("the {} tier's {} requests in flight", info.tier, info.limit),
    };
    format!("over {what}; retry in {:.1} s", info.retry_after_ms as f64 / 1000.0)
}
