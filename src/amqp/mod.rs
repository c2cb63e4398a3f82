//! The broker side: connecting with backoff, the queue and exchange topology, consuming the request
//! queues, confirmed replies, hearing cancels.

pub mod cancel;
pub mod connect;
pub mod consume;
pub mod publisher;
pub mod reply_queue;
pub mod reply_queues;
pub mod settings;
pub mod topology;

pub use cancel::{CancelListener, Listening};
pub use connect::connect_with_retry;
pub use consume::{Consumers, SessionEnd};
pub use publisher::{OutgoingReply, PublishOutcome, ReplyPublisher, ReplyRoute, REPLY_HEADER, STATUS_HEADER};
pub use reply_queue::private_reply_queue;
pub use reply_queues::ReplyQueues;
pub use topology::Topology;
