//! Structured logs with `tracing`: readable lines by default, JSON with `AUTHLINK_LOG_FORMAT=json`.
//! The level filter comes from `AUTHLINK_LOG` (e.g. `debug`, `authlink=trace`), default `info`.
//!
//! Nothing secret is ever passed to a log macro: link paths are redacted by the HTTP layer,
//! query strings are never logged, and tokens only exist as `SecretString`s, whose `Debug` prints
//! a placeholder.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber, writing to standard error.
pub fn init(format: LogFormat) {
    const DEFAULT: &str = "info,sqlx=warn,hyper=warn,tower_http=warn";
    let (filter, refused) = match std::env::var("AUTHLINK_LOG") {
        Ok(given) => match EnvFilter::try_new(&given) {
            Ok(filter) => (filter, None),
            // (A filter is no secret: it is named, with why it does not parse.)
            Err(e) => (EnvFilter::new(DEFAULT), Some(format!("{given:?}: {e}"))),
        },
        Err(_) => (EnvFilter::new(DEFAULT), None),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        // Colours only on a terminal: a file or a log collector would get escape codes.
        LogFormat::Human => builder.with_target(false).with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
    if let Some(refused) = refused {
        tracing::warn!(refused = %refused, "AUTHLINK_LOG is not a valid filter; logging at the default levels");
    }
}
