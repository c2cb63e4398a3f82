//! The `kiln` binary: telemetry, settings, then the subcommand (see [`kiln::cli`]).

use clap::Parser;
use kiln::cli::Cli;
use kiln::configuration::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    kiln::telemetry::init(&settings.telemetry);
    match kiln::cli::run(cli, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kiln failed");
            std::process::ExitCode::FAILURE
        }
    }
}
