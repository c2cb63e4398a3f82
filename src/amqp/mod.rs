//! The broker side: connecting with backoff, the queue and exchange topology, confirmed replies.

pub mod connect;
pub mod publisher;
pub mod topology;

pub use connect::connect_with_retry;
pub use publisher::{OutgoingReply, PublishOutcome, ReplyPublisher, ReplyRoute, REPLY_HEADER, STATUS_HEADER};
pub use topology::Topology;
