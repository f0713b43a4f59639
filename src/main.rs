//! The `authlink` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match authlink::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        // A usage mistake under `--json`: reported as JSON too, like every other failure. (The
        // arguments as the OS gave them: the mistake may be one that is not valid Unicode.)
        Err(e) if std::env::args_os().any(|a| a == "--json") => {
            let text = e.to_string();
            // A command given without its subcommand: clap's text is the command's help.
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let usage = text.lines().find(|l| l.starts_with("Usage: ")).unwrap_or_default();
                let message = format!("a subcommand is required ({usage})");
                eprintln!("{}", serde_json::json!({"error": {"kind": "usage", "message": message}}));
                return ExitCode::from(2);
            }
            let message = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.trim().trim_start_matches("error: "))
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("{}", serde_json::json!({"error": {"kind": "usage", "message": message}}));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    authlink::cli::run(cli).await
}
