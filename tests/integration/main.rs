//! The integration suite: one binary (linking is slow, so not one per file), with a custom
//! harness (libtest-mimic) so that every test runs twice, on SQLite and on PostgreSQL, and the
//! PostgreSQL half is reported as *ignored*, with a banner, when no server is reachable, rather
//! than silently passing.
//!
//! Each test gets its own database (a temporary SQLite file, or a fresh PostgreSQL schema) and
//! drives the real `authlink` binary over HTTP on a random port, with a cookie jar, the way a
//! browser would; CLI tests run the binary as a subprocess against the same database.
//!
//! PostgreSQL: `AUTHLINK_TEST_POSTGRES_URL` (when set, an unreachable server fails the suite),
//! else `postgres://postgres@127.0.0.1:5432/test` if it answers.
//!
//! A test that runs longer than its time limit (ten minutes; `AUTHLINK_TEST_TIME_LIMIT_SECS`)
//! is stopped and fails, named, instead of holding up the suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod browser;
mod cli;
mod conformance;
mod connect;
mod dashboard;
mod health;
mod helpers;
mod keys;
mod pages;
mod provider_fixes;
mod sandbox_switches;
mod webhook_fixes;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use helpers::{Backend, TestApp};
use libtest_mimic::{Arguments, Failed, Trial};

/// An async test taking a running app.
pub type TestFn = fn(TestApp) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a test runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// On both backends.
    Both,
    /// Only on PostgreSQL (needs something only a server has, e.g. a connection to cut).
    Postgres,
}

/// Registers tests: `tests![name, ...]` makes a list of (name, fn, where).
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|app| Box::pin($name(app))) as $crate::TestFn, $crate::Only::Both)),*]
    };
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // Tests mostly wait on child processes and sockets: run more of them than there are cores.
    if args.test_threads.is_none() {
        args.test_threads = Some(4);
    }
    let mut all: Vec<(&'static str, &'static str, TestFn, Only)> = Vec::new();
    for (module, list) in [
        ("api", api::tests()),
        ("cli", cli::tests()),
        ("pages", pages::tests()),
        ("connect", connect::tests()),
        ("conformance", conformance::tests()),
        ("health", health::tests()),
        ("dashboard", dashboard::tests()),
        ("keys", keys::tests()),
        ("provider_fixes", provider_fixes::tests()),
        ("sandbox_switches", sandbox_switches::tests()),
        ("webhook_fixes", webhook_fixes::tests()),
    ] {
        for (name, f, only) in list {
            all.push((module, name, f, only));
        }
    }

    let pg = helpers::postgres_availability();
    let mut trials = Vec::new();
    for (module, name, f, only) in all {
        if only == Only::Both {
            let trial = format!("sqlite::{module}::{name}");
            trials.push(Trial::test(trial.clone(), move || run(&trial, Backend::Sqlite, f)));
        }
        let pg_trial = {
            let pg = pg.clone();
            let trial = format!("postgres::{module}::{name}");
            Trial::test(trial.clone(), move || match pg {
                helpers::PgAvailability::Available(url) => run(&trial, Backend::Postgres(url), f),
                helpers::PgAvailability::Required(why) => Err(Failed::from(format!(
                    "AUTHLINK_TEST_POSTGRES_URL is set but PostgreSQL is unreachable: {why}"
                ))),
                // Run anyway (`--ignored`, `--include-ignored`): a skip, not a pass.
                helpers::PgAvailability::Absent(why) => {
                    Err(Failed::from(format!("SKIPPED, not run: PostgreSQL is unavailable ({why})")))
                }
            })
        };
        let skipped = matches!(pg, helpers::PgAvailability::Absent(_));
        trials.push(pg_trial.with_ignored_flag(skipped));
    }
    trials.extend(browser::trials());
    if let helpers::PgAvailability::Absent(why) = &pg {
        let n = trials.iter().filter(|t| t.name().starts_with("postgres::")).count();
        eprintln!("\n{}", "=".repeat(78));
        eprintln!("  PostgreSQL is not reachable ({why}).");
        eprintln!("  {n} PostgreSQL tests are SKIPPED and shown as ignored below.");
        eprintln!("  Start PostgreSQL or set AUTHLINK_TEST_POSTGRES_URL to run them.");
        eprintln!("{}\n", "=".repeat(78));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    if let helpers::PgAvailability::Absent(_) = &pg {
        eprintln!("\nREMINDER: the PostgreSQL half of the suite was SKIPPED (no server reachable).\n");
    }
    conclusion.exit_code()
}

/// How long one test may run (its server's start and its clean-up aside) before it is stopped and
/// reported as failed; `AUTHLINK_TEST_TIME_LIMIT_SECS` changes it (a deeper fuzzing run of the
/// conformance test may need more).
fn time_limit() -> Duration {
    let secs = std::env::var("AUTHLINK_TEST_TIME_LIMIT_SECS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(600))
}

fn run(name: &str, backend: Backend, f: TestFn) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(e.to_string()))?;
    let limit = time_limit();
    let (result, timed_out) = rt.block_on(async move {
        let app = TestApp::spawn(backend).await;
        let cleanup = app.cleanup_handle();
        let task = tokio::spawn(f(app));
        let abort = task.abort_handle();
        let Ok(result) = tokio::time::timeout(limit, task).await else {
            // Cancelled at its next await; one stuck in a blocking call is left behind below.
            abort.abort();
            cleanup.run().await;
            let msg = format!("{name} did not finish within {} s and was stopped", limit.as_secs());
            return (Err(Failed::from(msg)), true);
        };
        cleanup.run().await;
        let result = match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "test panicked".into());
                Err(Failed::from(msg))
            }
            Err(e) => Err(Failed::from(e.to_string())),
        };
        (result, false)
    });
    if timed_out {
        // Dropping the runtime would wait for a test stuck in a blocking call (a child process
        // that never exits) for ever.
        rt.shutdown_background();
    }
    result
}
