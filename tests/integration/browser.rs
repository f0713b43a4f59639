//! The browser suite (`tests/browser/suite.mjs`: Playwright driving Debian's chromium against
//! the real binary), run once as one trial of this harness.
//!
//! It needs `/usr/bin/chromium`, `node` and `tests/browser/node_modules/playwright-core`
//! (`cd tests/browser && npm ci`). When one is missing the trial is reported as *ignored*, with a
//! banner, like the PostgreSQL half of the suite; with `AUTHLINK_TEST_BROWSER=required` (as in
//! `.ci/run`) a missing piece is a failure instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Failed, Trial};

const CHROMIUM: &str = "/usr/bin/chromium";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the suite needs and this machine lacks.
fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    if Command::new("node").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        missing.push("node".into());
    }
    if !root().join("tests/browser/node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules/playwright-core (cd tests/browser && npm ci)".into());
    }
    missing
}

/// The browser trial: run, failed (required but missing) or ignored with a banner.
pub fn trials() -> Vec<Trial> {
    let missing = missing();
    let required = std::env::var("AUTHLINK_TEST_BROWSER").is_ok_and(|v| v == "required");
    let name = "browser::suite";
    if missing.is_empty() {
        return vec![Trial::test(name, run)];
    }
    let what = missing.join(", ");
    if required {
        return vec![Trial::test(name, move || {
            Err(Failed::from(format!("AUTHLINK_TEST_BROWSER=required but this machine lacks: {what}")))
        })];
    }
    eprintln!("\n{}", "=".repeat(78));
    eprintln!("  The browser suite cannot run here: missing {what}.");
    eprintln!("  It is SKIPPED and shown as ignored below (browser::suite).");
    eprintln!("  Set AUTHLINK_TEST_BROWSER=required to make this a failure (as .ci/run does).");
    eprintln!("{}\n", "=".repeat(78));
    // Run anyway (`--ignored`, `--include-ignored`): a skip, not a pass.
    let skipped = move || -> Result<(), Failed> {
        Err(Failed::from(format!("SKIPPED, not run: the browser is unavailable (missing {what})")))
    };
    vec![Trial::test(name, skipped).with_ignored_flag(true)]
}

fn run() -> Result<(), Failed> {
    let out = Command::new("node")
        .arg("tests/browser/suite.mjs")
        .current_dir(root())
        .env("AUTHLINK_BIN", env!("CARGO_BIN_EXE_authlink"))
        .env("AUTHLINK_CHROMIUM", CHROMIUM)
        .output()
        .map_err(|e| Failed::from(format!("cannot run node: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Failed::from(format!(
        "the browser suite failed ({}); screenshots are in test-artifacts/browser/\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}
