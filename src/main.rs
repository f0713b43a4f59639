//! The `authlink` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = authlink::cli::Cli::parse();
    authlink::cli::run(cli).await
}
