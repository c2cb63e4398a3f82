//! Command-line interface: `kiln worker`, `kiln submit`, `kiln cancel`, `kiln models`, `kiln limits`,
//! `kiln bench`, `kiln simulate`.
//!
//! The library holds the worker and the producer client ([`kiln::submit`]); this module only turns
//! command lines into calls of them. `kiln bench` lives here too ([`bench`]): a load generator is
//! a client of the worker, not part of it.

mod bench;
mod cancel;
mod simulate;
mod submit;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use kiln::configuration::Settings;
use kiln::inference::ModelRegistry;
use kiln::rate_limit::RedisLimiter;
use kiln::startup::Application;

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
    /// Send one request (a photo to stylize, a prompt, or both) and write the PNG the workers send
    /// back.
    Submit(Box<submit::SubmitArgs>),
    /// Ask every worker to stop a request by its request id: one it holds stops at its next step
    /// and is answered `cancelled`; one still queued is stopped when it arrives.
    Cancel(cancel::CancelArgs),
    /// List the models this configuration serves.
    Models,
    /// Load-test a worker started in this process: simulated users per tier, open-loop arrivals
    /// through the real broker and Redis; prints images/s, waits and outcomes per tier.
    Bench(bench::BenchArgs),
    /// Simulate step-level against whole-request batching of a diffusion model on a device's
    /// step-time curve (discrete events, no device needed); prints goodput and latency per policy.
    Simulate(simulate::SimulateArgs),
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

/// Run a parsed command line.
pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Worker => {
            let app = tokio::task::spawn_blocking(move || Application::build(settings)).await??;
            app.run_until_stopped(kiln::shutdown::shutdown_signal()).await
        }
        Command::Submit(args) => submit::run(*args, &settings).await,
        Command::Cancel(args) => cancel::run(args, &settings).await,
        Command::Bench(args) => bench::run(args, settings).await.map(drop),
        Command::Simulate(args) => simulate::run(args, &settings),
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

async fn limits(command: LimitsCommand, settings: &Settings) -> anyhow::Result<()> {
    settings.validate()?;
    let redis = RedisLimiter::new(std::sync::Arc::new(settings.rate_limit.clone()))?;
    let user = match &command {
        LimitsCommand::Show { user } | LimitsCommand::SetTier { user, .. } | LimitsCommand::Reset { user } => user,
    };
    kiln::domain::UserId::parse(user)?;
    let now = kiln::rate_limit::now_ms();
    match &command {
        LimitsCommand::Show { .. } => {}
        LimitsCommand::SetTier { tier, .. } => redis.set_tier(user, tier).await?,
        LimitsCommand::Reset { .. } => redis.reset(user, now).await?,
    }
    let state = redis.show(user, now).await?;
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(())
}
