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
    // Rust's own report where the log would not show the line (errors filtered out).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if tracing::enabled!(tracing::Level::ERROR) { log_panic(info) } else { report(info) }
    }));
    if let Some(refused) = refused {
        tracing::warn!(refused = %refused, "AUTHLINK_LOG is not a valid filter; logging at the default levels");
    }
}

/// Logs a panic (a bug: a request answers 500 and a job is started again, but the process goes
/// on) as an error line with its message and where it happened, in the log's own format, instead
/// of Rust's plain-text report; with the backtrace when `RUST_BACKTRACE` asks for one.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    let location = info.location().map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line()));
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(panic = %message, %location, %backtrace, "a bug: panicked");
    } else {
        tracing::error!(panic = %message, %location, "a bug: panicked");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    /// What `f` returns, and what it logged on this thread meanwhile (plain text).
    pub(crate) fn logged<R>(f: impl FnOnce() -> R) -> (R, String) {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let logged = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        (out, logged)
    }

    /// A panic is an error line of the log, with its message and the place it happened.
    #[test]
    fn a_panic_is_logged_with_its_message_and_place() {
        let ((), logged) = logged(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(super::log_panic));
            let caught = std::panic::catch_unwind(|| panic!("an invariant broken at {}", 7));
            std::panic::set_hook(previous);
            assert!(caught.is_err());
        });
        assert!(logged.contains("ERROR") && logged.contains("a bug: panicked"), "{logged}");
        assert!(logged.contains("an invariant broken at 7") && logged.contains("telemetry.rs:"), "{logged}");
    }
}
