//! What the benchmarks share: the binary, settings from the environment, a clean environment to
//! run authlink in, and CPU time from `/proc`. Each benchmark uses a part of it.

#![allow(dead_code)]

use std::process::Command;

/// The release `authlink` binary that Cargo built for the benchmark.
pub const BIN: &str = env!("CARGO_BIN_EXE_authlink");

/// A numeric setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A fresh random master key (base64 of 32 bytes).
pub fn random_master_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = std::array::from_fn(|_| rand::random::<u8>());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The environment authlink runs in: our `AUTHLINK_*` variables only, in a folder of its own (so
/// no `./authlink.toml` is read).
pub struct Env {
    /// The `AUTHLINK_*` variables.
    pub vars: Vec<(String, String)>,
    /// The working folder.
    pub dir: tempfile::TempDir,
}

impl Env {
    /// `authlink <args>` in this environment, with every other `AUTHLINK_*` variable removed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("AUTHLINK_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }
}

/// `utime + stime` of a process (all its threads), in clock ticks, from `/proc/<pid>/stat`
/// (`self` for this process).
pub fn process_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}
