//! A producer's private reply queue: exclusive, auto-deleted, named by the broker, consumed
//! without acks (replies are the producer's own; losing the connection loses the queue anyway).

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};

/// Declare a private reply queue on `channel` and start consuming it; returns its name (for
/// `reply_to`) and the consumer.
pub async fn private_reply_queue(channel: &Channel) -> lapin::Result<(String, Consumer)> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let name = queue.name().to_string();
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((name, consumer))
}
