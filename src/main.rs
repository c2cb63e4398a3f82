//! The `kiln` binary: telemetry, settings, then the subcommand (see [`cli`]).

mod cli;

use clap::Parser;
use kiln::configuration::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    kiln::telemetry::init(&settings.telemetry);
    match cli::run(cli, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kiln failed");
            std::process::ExitCode::FAILURE
        }
    }
}
