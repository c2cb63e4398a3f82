//! Whether a request may use the device now: its cost, the user's limits, the tier's policy.

use crate::domain::{Deferral, ErrorCode, GenerationRequest, LimitInfo, RequestError, Scope};
use crate::inference::ModelRegistry;
use crate::rate_limit::{AtLimit, Decision, Lease, Limiter};

/// What to do with a request before it goes near the device.
#[derive(Debug)]
pub(super) enum Admission {
    /// Render it; give the lease back afterwards.
    Go {
        lease: Option<Lease>,
        rate_limit: Option<LimitInfo>,
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

/// Price the request (from the image header alone, no decoding) and ask the limiter.
pub(super) async fn admit(
    limiter: Option<&Limiter>,
    registry: &ModelRegistry,
    request: &GenerationRequest,
    deferrals: u32,
) -> Admission {
    let Some(limiter) = limiter else {
        return Admission::Go {
            lease: None,
            rate_limit: None,
        };
    };
    let refuse = |error| Admission::Refuse {
        error,
        rate_limit: None,
    };
    // Refuse what would fail anyway before charging the user for it.
    let pixels = match registry.check(request) {
        Ok(pixels) => pixels,
        Err(error) => return refuse(error),
    };
    let cost_settings = &limiter.settings().cost;
    let cost = cost_settings.units(pixels);
    if cost > u64::from(cost_settings.max_units) {
        return refuse(RequestError::new(
            ErrorCode::InvalidParams,
            format!(
                "this request costs {cost} units ({pixels} output pixels); the most a request may cost is {}",
                cost_settings.max_units
            ),
        ));
    }
    match limiter
        .decide(request.user_id.as_str(), cost, request.request_id.as_str())
        .await
    {
        Decision::Admitted { lease, info } => Admission::Go {
            lease: Some(lease),
            rate_limit: Some(info),
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
            deferral: Deferral {
                retry_after_ms: info.retry_after_ms,
                reason: scope_name(info.scope).to_owned(),
                count: deferrals + 1,
            },
            rate_limit: Some(info),
        },
        Decision::Unavailable { retry_after_ms } => Admission::Defer {
            deferral: Deferral {
                retry_after_ms,
                reason: "limiter_unavailable".to_owned(),
                count: deferrals + 1,
            },
            rate_limit: None,
        },
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Rate => "rate",
        Scope::DailyQuota => "daily_quota",
        Scope::InFlight => "in_flight",
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
