//! `kiln cancel`: ask every worker to stop a request, by its request id.

use anyhow::bail;

use kiln::amqp::connect::Broker;
use kiln::amqp::Topology;
use kiln::configuration::Settings;
use kiln::submit::Producer;

/// `kiln cancel` arguments.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The `request_id` of the request to stop (any producer's).
    pub request_id: String,
    /// Why, for the workers' logs.
    #[arg(long)]
    pub reason: Option<String>,
}

/// Publish the cancel on `<prefix>.cancel`; fail when no worker is listening.
pub async fn run(args: CancelArgs, settings: &Settings) -> anyhow::Result<()> {
    let topology = Topology::new(&settings.amqp.topology);
    let producer = Producer::connect(Broker::new(&settings.amqp)?, &topology.requests).await?;
    let heard = producer.cancel(&args.request_id, args.reason.as_deref()).await;
    producer.close().await;
    if !heard? {
        bail!(
            "no worker listens on {}: nothing was cancelled",
            topology.cancel_exchange
        );
    }
    eprintln!(
        "cancel for {} sent on {}: a worker holding it stops it and answers `cancelled`; the others \
         stop it if it reaches them",
        args.request_id, topology.cancel_exchange
    );
    Ok(())
}
