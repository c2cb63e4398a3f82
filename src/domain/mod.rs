//! The contract with producers: requests, cancels, replies, ids and error codes. No I/O here.

pub mod cancel;
pub mod error;
pub mod generation;
pub mod ids;
pub mod limits;
mod probe;
pub mod reply;
pub mod request;

pub use cancel::{Cancel, CancelDocument};
pub use error::{ErrorCode, RequestError};
pub use generation::{GenerationInfo, GenerationParams, Task, Truncation};
pub use ids::{RequestId, UserId};
pub use limits::{Deferral, DeferralReason, LimitInfo, Scope, Work};
pub use reply::{ImageInfo, ReplyDocument, ReplyStatus, Timings};
pub use request::{
    GenerationRequest, Params, PartialRequest, RequestDocument, StyleChoice, WireImage, WireParams, WireStyle,
    CONTRACT_VERSION,
};
