//! Command-line interface: `kiln worker`, `kiln submit`, `kiln models`, `kiln limits`, `kiln bench`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::amqp::Topology;
use crate::configuration::Settings;
use crate::domain::{ReplyStatus, RequestDocument, WireImage, WireParams, CONTRACT_VERSION};
use crate::inference::ModelRegistry;
use crate::rate_limit::RedisLimiter;
use crate::startup::Application;
use crate::submit::{parse_style, Producer};

/// kiln: turns queued image requests into images on GPUs (or CPUs).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Settings file (TOML); `KILN_*` environment variables override it.
    #[arg(long, global = true, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume requests from RabbitMQ and reply with images, until SIGTERM.
    Worker,
    /// Send one photo to the workers and write the PNG they send back.
    Submit(SubmitArgs),
    /// List the models this configuration serves.
    Models,
    /// Load-test a worker started in this process: simulated users per tier, open-loop arrivals
    /// through the real broker and Redis; prints images/s, waits and outcomes per tier.
    Bench(crate::loadgen::BenchArgs),
    /// Inspect and change a user's rate-limit state in Redis.
    #[command(subcommand)]
    Limits(LimitsCommand),
}

/// `kiln limits` subcommands.
#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Print a user's tier, rate, quota and in-flight state as JSON.
    Show {
        /// The user id.
        user: String,
    },
    /// Set a user's tier (what billing does).
    SetTier {
        /// The user id.
        user: String,
        /// A configured tier.
        tier: String,
    },
    /// Forget a user's usage: rate, today's quota, in-flight leases (the tier stays).
    Reset {
        /// The user id.
        user: String,
    },
}

/// `kiln submit` arguments.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The photo (JPEG, PNG or WebP).
    pub image: PathBuf,
    /// Model name.
    #[arg(long, default_value = "multistyle26")]
    pub model: String,
    /// Built-in style: an index (7) or a blend (3:0.5,12:0.5).
    #[arg(long)]
    pub style: Option<String>,
    /// A picture to use as the style (model arbitrary-style).
    #[arg(long)]
    pub style_image: Option<PathBuf>,
    /// How strongly the style is applied, 0 to 1.
    #[arg(long)]
    pub strength: Option<f64>,
    /// Longer side of the output, in pixels.
    #[arg(long)]
    pub size: Option<u32>,
    /// Give up (reply `expired`) if rendering has not started this many seconds from now.
    #[arg(long)]
    pub deadline_secs: Option<u64>,
    /// User id to send.
    #[arg(long, default_value = "cli-user")]
    pub user: String,
    /// Send to this tier's request queue (`<prefix>.requests.<tier>`) instead of the shared one.
    #[arg(long)]
    pub tier: Option<String>,
    /// Where to write the PNG (default: next to the photo, `<name>.kiln.png`).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// How long to wait for the reply, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// Run a parsed command line.
pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Worker => {
            let app = tokio::task::spawn_blocking(move || Application::build(settings)).await??;
            app.run_until_stopped(crate::shutdown::shutdown_signal()).await
        }
        Command::Submit(args) => submit(args, &settings).await,
        Command::Bench(args) => crate::loadgen::run(args, settings).await.map(drop),
        Command::Limits(command) => limits(command, &settings).await,
        Command::Models => {
            for m in ModelRegistry::load(&settings.models, &settings.batching)?.iter() {
                println!(
                    "{}\t{}\n\tlicence: {}\n\torigin: {}",
                    m.name, m.description, m.licence, m.origin
                );
            }
            Ok(())
        }
    }
}

async fn submit(args: SubmitArgs, settings: &Settings) -> anyhow::Result<()> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let now = time::OffsetDateTime::now_utc();
    let rfc3339 = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339);
    let request = RequestDocument {
        version: CONTRACT_VERSION,
        request_id: uuid::Uuid::new_v4().to_string(),
        user_id: args.user.clone(),
        model: args.model.clone(),
        params: WireParams {
            style: args.style.as_deref().map(parse_style).transpose()?,
            style_image: args
                .style_image
                .as_deref()
                .map(read)
                .transpose()?
                .map(|b| WireImage::from_bytes(&b)),
            strength: args.strength,
            size: args.size,
        },
        image: WireImage::from_bytes(&read(&args.image)?),
        deadline: args
            .deadline_secs
            .map(|s| rfc3339(now + Duration::from_secs(s)))
            .transpose()?,
        created_at: Some(rfc3339(now)?),
        tier: None,
    };
    let topology = Topology::new(&settings.amqp.topology);
    let queue = match &args.tier {
        Some(tier) => topology.tier_queue(tier),
        None => topology.requests,
    };
    let mut producer = Producer::connect(&settings.amqp.url, &queue).await?;
    let reply = producer.request(&request, Duration::from_secs(args.timeout_secs)).await;
    producer.close().await;
    let reply = reply?;
    let doc = &reply.document;
    if doc.status == ReplyStatus::Error {
        let error = doc.error.as_ref().context("an error reply without an error")?;
        anyhow::bail!("the worker answered {}: {}", error.code, error.message);
    }
    let out = args.out.unwrap_or_else(|| args.image.with_extension("kiln.png"));
    std::fs::write(&out, &reply.body).with_context(|| format!("cannot write {}", out.display()))?;
    let image = doc.image.as_ref().context("an ok reply without an image")?;
    let t = &doc.timings_ms;
    eprintln!(
        "{}x{} PNG from {} ({}): inference {:.0} ms, total {:.0} ms in the worker",
        image.width,
        image.height,
        doc.worker_id,
        doc.model.as_deref().unwrap_or("?"),
        t.inference,
        t.total
    );
    println!("{}", out.display());
    Ok(())
}

async fn limits(command: LimitsCommand, settings: &Settings) -> anyhow::Result<()> {
    settings.rate_limit.validate()?;
    let redis = RedisLimiter::new(std::sync::Arc::new(settings.rate_limit.clone()))?;
    let user = match &command {
        LimitsCommand::Show { user } | LimitsCommand::SetTier { user, .. } | LimitsCommand::Reset { user } => user,
    };
    crate::domain::UserId::parse(user)?;
    let now = crate::rate_limit::now_ms();
    match &command {
        LimitsCommand::Show { .. } => {}
        LimitsCommand::SetTier { tier, .. } => redis.set_tier(user, tier).await?,
        LimitsCommand::Reset { .. } => redis.reset(user, now).await?,
    }
    let state = redis.show(user, now).await?;
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(())
}
