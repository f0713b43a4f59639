//! The authlink benchmark harness: `cargo bench --bench harness`.
//!
//! One run measures, against the release `authlink` binary on a fresh SQLite database:
//!
//! * **floor**: a minimal axum server (this same binary re-executed with `--floor`) answering a
//!   fixed ~1 KB HTML page on `GET /`, loaded exactly like authlink. It is the ceiling of what an
//!   axum/tokio/hyper stack on this machine can do with this load generator, so the other
//!   scenarios are reported as a ratio to it.
//! * **landing**: `GET /l/{token}` of a link created with the CLI (expects 200).
//! * **connect**: complete TikTok connect flows against the built-in sandbox, each client with its
//!   own cookie jar: landing page, `POST /l/{token}/connect/tiktok`, the sandbox consent page, the
//!   consent decision, the OAuth callback (timed on its own, with the `Server-Timing` split between
//!   provider time and authlink's own work, and the database's part of the latter) and the success
//!   page.
//! * **link states**: one client requests, in turn, an unknown token (404), a revoked link (410)
//!   and an expired one (410), `BENCH_LINK_STATE_ROUNDS` times each (default 2,000), so that
//!   their latencies can be compared: a refused link should not be told from an unknown one by
//!   its timing (the capability-URL guidance).
//! * **memory**: idle RSS after start (`VmRSS`) and peak RSS under each load (`VmHWM`, reset with
//!   `/proc/<pid>/clear_refs` before each scenario when the kernel allows it).
//! * **startup**: time from spawning `authlink serve` on the existing database until `GET /readyz`
//!   answers 200, median of several runs.
//!
//! The load generator is in-process (reqwest with keep-alive, a fixed number of concurrent tasks,
//! a warm-up and a measured window). Only loopback is loaded, for a bounded time. Settings come
//! from the environment: `BENCH_CONNECTIONS` (default 32), `BENCH_SECONDS` (measured seconds per
//! scenario, default 10), `BENCH_WARMUP_SECONDS` (default 3), `BENCH_FLOW_CLIENTS` (default 8),
//! `BENCH_FLOW_NICE` (default 19), `BENCH_STARTUP_RUNS` (default 5), `BENCH_LINK_STATE_ROUNDS`
//! (default 2,000).
//!
//! The connect flow's browsers run on a runtime of their own whose threads have a lower scheduling
//! priority (`BENCH_FLOW_NICE`, set with `renice` as each thread starts; 0 leaves them as they
//! are). Load generator and server share two cores; at the same priority the scheduler lets a
//! browser thread take a core from authlink in the middle of a callback, and the callback's
//! `app` time then counts the generator's work as authlink's. A lower priority stands in for the
//! browsers being on other machines, as they are in production. The floor and landing scenarios
//! keep the default priority (a lower one changes how requests batch and lowers the floor).
//!
//! The report (markdown) is printed on standard output and written to
//! `<target dir>/bench-report.md`; progress goes to standard error.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::redirect::Policy;
use url::Url;

mod common;
use common::process_ticks;

/// The floor server's page: a fixed, small HTML document (about 1 KB).
const FLOOR_PAGE: &str = concat!(
    "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
    "<title>Connect your accounts</title>\n",
    "<style>body{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;",
    "color:#1f2937}h1{font-size:1.5rem}.card{border:1px solid #e5e7eb;border-radius:.75rem;",
    "padding:1rem 1.25rem;margin:1rem 0}button{background:#4f46e5;color:#fff;border:0;",
    "border-radius:.5rem;padding:.6rem 1rem;font-size:1rem}</style>\n</head>\n<body>\n",
    "<main>\n<h1>Bench Agency would like to connect your accounts</h1>\n",
    "<p>Connecting lets Bench Agency publish and read statistics on your behalf. You can ",
    "disconnect at any time from your account settings.</p>\n",
    "<div class=\"card\"><h2>TikTok</h2><p>Not connected yet.</p>",
    "<form method=\"post\" action=\"#\"><button type=\"submit\">Connect TikTok</button></form></div>\n",
    "<div class=\"card\"><h2>Instagram</h2><p>Not connected yet.</p>",
    "<form method=\"post\" action=\"#\"><button type=\"submit\">Connect Instagram</button></form></div>\n",
    "<p><small>This page is the benchmark floor: a fixed document served by a minimal axum ",
    "server.</small></p>\n</main>\n</body>\n</html>\n",
);

/// The sandbox's TikTok accounts (`TIKTOK_ACCOUNTS` in `src/sandbox/tiktok.rs`); flows rotate
/// through them.
const TIKTOK_OPEN_IDS: [&str; 3] = ["sbx-oid-creator-0001", "sbx-oid-brand-0002", "sbx-oid-newbie-0003"];

/// `http.link_requests_per_minute` for the benchmarked instance. The default (300 a minute per
/// client address) exists against token guessing and would turn a single-address load generator
/// into a stream of 429s; raising it keeps the limiter on the request path (its cost is measured)
/// without it ever refusing.
const LINK_RATE_LIMIT: u32 = 1_000_000_000;
/// The sandbox's TikTok user info answers 600 requests a minute, then 429, as TikTok documents
/// (providers.md §2.8): a limit of the simulated provider, not of authlink, that the connect
/// flows would meet within a second. The harness turns it off through the sandbox's control API
/// (`sandbox.control_api`), which adds routes and nothing to any other request's path.
const SANDBOX_SCENARIO: &str = r#"{"rate_limit_per_min": 0}"#;
/// Pause after a failed connect flow, so a broken setup does not spin.
const FAILURE_PAUSE: Duration = Duration::from_millis(10);
/// How long to wait for a server to start or stop before giving up.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);
/// How often startup is polled (`GET /readyz`).
const READY_POLL: Duration = Duration::from_millis(5);
/// How long a process is left alone after start before its idle RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--floor") {
        return floor_main();
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench harness failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The floor server
// ---------------------------------------------------------------------------------------------

/// The floor: a minimal axum server on the same runtime flavour as authlink (`#[tokio::main]`,
/// multi-threaded). Prints its port on standard output and exits when standard input closes, so
/// it never outlives the harness.
#[tokio::main]
async fn floor_main() -> ExitCode {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let port = match listener.local_addr() {
        Ok(a) => a.port(),
        Err(e) => {
            eprintln!("floor: no local address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{port}").and_then(|()| stdout.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let app =
        axum::Router::new().route("/", axum::routing::get(|| async { axum::response::Html(FLOOR_PAGE) }));
    match axum::serve(listener, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// The run's settings, from `BENCH_*` environment variables (bounded).
#[derive(Debug, Clone, Copy)]
struct Settings {
    /// Concurrent keep-alive connections for the request scenarios.
    connections: usize,
    /// Concurrent clients of the connect-flow scenario.
    flow_clients: usize,
    /// The niceness of the connect flow's browser threads (0: unchanged).
    flow_nice: u64,
    /// Warm-up before each measured window (not recorded).
    warmup: Duration,
    /// The measured window of each scenario.
    measure: Duration,
    /// How many times startup is measured.
    startup_runs: usize,
    /// Requests per link state in the link-states scenario.
    link_state_rounds: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        fn var(name: &str, default: u64, min: u64, max: u64) -> Result<u64> {
            match std::env::var(name) {
                Err(_) => Ok(default),
                Ok(v) => {
                    let n: u64 = v.trim().parse().with_context(|| format!("{name}={v:?} is not a number"))?;
                    if !(min..=max).contains(&n) {
                        bail!("{name}={n} is out of range {min}..={max}");
                    }
                    Ok(n)
                }
            }
        }
        Ok(Self {
            connections: usize::try_from(var("BENCH_CONNECTIONS", 32, 1, 256)?)?,
            flow_clients: usize::try_from(var("BENCH_FLOW_CLIENTS", 8, 1, 64)?)?,
            flow_nice: var("BENCH_FLOW_NICE", 19, 0, 19)?,
            warmup: Duration::from_secs(var("BENCH_WARMUP_SECONDS", 3, 0, 60)?),
            measure: Duration::from_secs(var("BENCH_SECONDS", 10, 1, 120)?),
            startup_runs: usize::try_from(var("BENCH_STARTUP_RUNS", 5, 1, 21)?)?,
            link_state_rounds: usize::try_from(var("BENCH_LINK_STATE_ROUNDS", 2_000, 100, 100_000)?)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// What a server wrote to its log: counts of warnings and errors and the last few of them.
#[derive(Debug, Default)]
struct LogTally {
    lines: u64,
    warnings: u64,
    errors: u64,
    last: VecDeque<String>,
}

/// A server process started by the harness. Dropping it kills the process.
struct Server {
    name: &'static str,
    child: Child,
    /// Log lines, forwarded until the receiver is dropped.
    lines: Option<Receiver<String>>,
    log: Arc<Mutex<LogTally>>,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Spawns `cmd` with its standard error read line by line in a thread: lines are forwarded to
    /// [`Server::lines`] until that receiver is dropped, and drained (tallied) afterwards so the
    /// server never blocks on a full pipe.
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(LogTally::default()));
        let tally = Arc::clone(&log);
        // `BENCH_KEEP_LOG=<file>`: authlink's log lines are also written there, for a closer look.
        let mut keep = std::env::var_os("BENCH_KEEP_LOG")
            .filter(|_| name == "authlink")
            .and_then(|path| std::fs::File::create(path).ok())
            .map(std::io::BufWriter::new);
        std::thread::spawn(move || {
            let mut reader = BufReader::with_capacity(64 * 1024, stderr);
            let mut line = String::new();
            let mut forward = true;
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(file) = keep.as_mut() {
                    let _ = file.write_all(line.as_bytes());
                }
                let warn = line.contains("\"level\":\"WARN\"");
                let error = line.contains("\"level\":\"ERROR\"");
                {
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    t.lines += 1;
                    if warn || error {
                        t.warnings += u64::from(warn);
                        t.errors += u64::from(error);
                        if t.last.len() == 5 {
                            t.last.pop_front();
                        }
                        t.last.push_back(line.trim_end().to_string());
                    }
                }
                if forward && tx.send(line.clone()).is_err() {
                    forward = false;
                }
            }
        });
        Ok(Self { name, child, lines: Some(rx), log })
    }

    /// Waits for authlink's `"authlink listening"` log line and returns its `public_url`. Stops
    /// forwarding log lines afterwards.
    fn wait_listening(&mut self) -> Result<Url> {
        let rx = self.lines.take().ok_or_else(|| anyhow!("{}: log already consumed", self.name))?;
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("authlink listening") {
                        let v: serde_json::Value = serde_json::from_str(line.trim())
                            .with_context(|| format!("{}: unreadable log line {line:?}", self.name))?;
                        let url = v
                            .get("public_url")
                            .and_then(|u| u.as_str())
                            .ok_or_else(|| anyhow!("{}: no public_url in {line:?}", self.name))?;
                        return Url::parse(url).with_context(|| format!("bad public_url {url:?}"));
                    }
                    seen.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{}: not listening after {PROCESS_TIMEOUT:?}; log:\n{}", self.name, seen.concat())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    bail!("{} exited ({status}) before listening; log:\n{}", self.name, seen.concat())
                }
            }
        }
    }

    /// Stops forwarding log lines (they are only drained and tallied from now on).
    fn detach_log(&mut self) {
        self.lines = None;
    }

    /// Whether the process is still running.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks the process to stop (SIGTERM, via `kill -TERM <pid>`), waits, and kills it if it is
    /// still running after the timeout.
    fn stop(mut self) -> Result<()> {
        if !self.running() {
            return Ok(());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while Instant::now() < deadline {
            if !self.running() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill().context("kill")?;
        self.child.wait().context("wait")?;
        bail!("{} did not stop on SIGTERM within {PROCESS_TIMEOUT:?}; killed", self.name)
    }

    /// The log's warnings and errors so far.
    fn log_summary(&self) -> (u64, u64, u64, Vec<String>) {
        let t = self.log.lock().unwrap_or_else(|e| e.into_inner());
        (t.lines, t.warnings, t.errors, t.last.iter().cloned().collect())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The floor server process (its standard input is a pipe: closing it stops the server).
struct Floor {
    child: Child,
    port: u16,
    _stdout: BufReader<ChildStdout>,
}

impl Floor {
    fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("current_exe")?;
        let mut child = Command::new(exe)
            .arg("--floor")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the floor server")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("floor: no stdout pipe"))?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).context("floor: reading its port")?;
        let port = line.trim().parse().with_context(|| format!("floor printed {line:?}, not a port"))?;
        Ok(Self { child, port, _stdout: stdout })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How authlink is run: the release binary with a clean `AUTHLINK_*` environment pointing at the
/// temporary data folder.
struct Authlink {
    dir: PathBuf,
    master_key: String,
}

impl Authlink {
    fn new(dir: &Path) -> Self {
        let key: [u8; 32] = rand::random();
        Self { dir: dir.to_path_buf(), master_key: base64::engine::general_purpose::STANDARD.encode(key) }
    }

    /// A command for the binary with `args`, run in the data folder (so no stray
    /// `./authlink.toml` is read) with only our `AUTHLINK_*` variables.
    fn command(&self, args: &[&str], extra: &[(&str, String)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_authlink"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AUTHLINK_") {
                cmd.env_remove(key);
            }
        }
        cmd.current_dir(&self.dir)
            .env("AUTHLINK_DATABASE_URL", format!("sqlite://{}/authlink.db", self.dir.display()))
            .env("AUTHLINK_DATA_DIR", &self.dir)
            .env("AUTHLINK_LISTEN", "127.0.0.1:0")
            .env("AUTHLINK_LOG_FORMAT", "json")
            .env("AUTHLINK_LOG", "warn,authlink=info")
            .env("AUTHLINK_MASTER_KEY", &self.master_key)
            .env("AUTHLINK_HTTP__LINK_REQUESTS_PER_MINUTE", LINK_RATE_LIMIT.to_string())
            .env("AUTHLINK_SANDBOX__CONTROL_API", "true");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.args(args);
        cmd
    }

    /// Runs a CLI command with `--json` and parses its output.
    fn cli(&self, public_url: &Url, args: &[&str]) -> Result<serde_json::Value> {
        let out = self
            .command(args, &[("AUTHLINK_PUBLIC_URL", public_url.to_string())])
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run authlink {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "authlink {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "authlink {}: output is not JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
    let kb: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("bad line {line:?}"))?;
    Ok(kb * 1024)
}

/// Current resident set size.
fn rss(pid: u32) -> Result<u64> {
    proc_status_bytes(pid, "VmRSS")
}

/// Peak resident set size since start or since the last [`reset_peak`].
fn peak_rss(pid: u32) -> Result<u64> {
    proc_status_bytes(pid, "VmHWM")
}

/// Resets the peak RSS to the current RSS (`echo 5 > /proc/<pid>/clear_refs`). Returns false when
/// the kernel does not allow it, in which case peaks are cumulative.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Clock ticks a second in `/proc` CPU times (`USER_HZ`; 100 on every mainstream Linux build).
const USER_HZ: f64 = 100.0;

/// CPU time counters at one instant, in clock ticks.
struct CpuSample {
    at: Instant,
    /// Time the whole machine ran processes (`/proc/stat`: user, nice, system; interrupt time is
    /// left out, as it is from the per-process times).
    machine: u64,
    /// Time the hypervisor gave this machine's CPUs to someone else (`/proc/stat`: steal).
    steal: u64,
    /// `utime + stime` of the server under load.
    server: u64,
    /// `utime + stime` of this harness (the load generator).
    harness: u64,
}

fn cpu_sample(server: u32) -> CpuSample {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // user nice system idle iowait irq softirq steal ... (guest time is already in user).
    let v: Vec<u64> = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .map(|l| l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    CpuSample {
        at: Instant::now(),
        machine: at(0) + at(1) + at(2),
        steal: at(7),
        server: process_ticks(&server.to_string()),
        harness: process_ticks("self"),
    }
}

/// Cores used during a scenario by the server, by the load generator and by other processes on
/// the machine (the larger that is, the less the figures mean), and CPU time stolen by the
/// hypervisor.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUsage {
    server: f64,
    harness: f64,
    other: f64,
    steal: f64,
}

impl CpuUsage {
    fn between(a: &CpuSample, b: &CpuSample) -> Self {
        let secs = (b.at - a.at).as_secs_f64().max(1e-9);
        let cores = |ticks: u64| ticks as f64 / USER_HZ / secs;
        let server = b.server.saturating_sub(a.server);
        let harness = b.harness.saturating_sub(a.harness);
        let machine = b.machine.saturating_sub(a.machine);
        Self {
            server: cores(server),
            harness: cores(harness),
            other: cores(machine.saturating_sub(server + harness)),
            steal: cores(b.steal.saturating_sub(a.steal)),
        }
    }

    fn describe(&self) -> String {
        format!("{:.2} / {:.2} / {:.2}", self.server, self.harness, self.other)
    }
}

/// Runs one scenario against the server `pid`, measuring the CPU it, the harness and everything
/// else used meanwhile.
fn with_cpu<T>(pid: u32, scenario: impl FnOnce() -> Result<T>) -> Result<(T, CpuUsage)> {
    let before = cpu_sample(pid);
    let out = scenario()?;
    let after = cpu_sample(pid);
    Ok((out, CpuUsage::between(&before, &after)))
}

/// The machine: CPU model, logical cores, memory, kernel.
#[derive(Debug, Clone)]
struct Machine {
    cpu: String,
    cores: usize,
    memory: u64,
    kernel: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let cores = if cores > 0 {
            cores
        } else {
            std::thread::available_parallelism().map(usize::from).unwrap_or(0)
        };
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| {
                    l.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse::<u64>().ok()
                })
            })
            .map_or(0, |kb| kb * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self { cpu, cores, memory, kernel }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------------------------

/// The outcome of one request scenario.
#[derive(Debug)]
struct LoadResult {
    /// Successful requests started in the measured window.
    requests: usize,
    /// From the start of the measured window to the last recorded completion.
    elapsed: Duration,
    /// Every recorded latency, sorted.
    latencies: Vec<Duration>,
    /// Failed requests (warm-up and measured window).
    errors: usize,
    /// The first failure, for the report.
    first_error: Option<String>,
    /// The size of a response body.
    body_bytes: usize,
}

impl LoadResult {
    fn per_second(&self) -> f64 {
        per_second(self.requests, self.elapsed)
    }
}

fn per_second(n: usize, elapsed: Duration) -> f64 {
    if elapsed.is_zero() { 0.0 } else { n as f64 / elapsed.as_secs_f64() }
}

/// A keep-alive HTTP/1.1 client for loopback: no proxy, no redirects.
fn http_client(pool: usize, cookies: bool) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(Policy::none())
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .cookie_store(cookies)
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")
}

/// `connections` tasks each loop `GET url` (expecting 200 and reading the whole body) for the
/// warm-up and then the measured window; latencies of requests started in the measured window are
/// recorded.
async fn request_load(url: Url, settings: Settings) -> Result<LoadResult> {
    let client = http_client(settings.connections, false)?;
    let start = Instant::now();
    let measure_start = start + settings.warmup;
    let end = measure_start + settings.measure;
    let mut tasks = Vec::with_capacity(settings.connections);
    for _ in 0..settings.connections {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(32 * 1024);
            let mut errors = 0usize;
            let mut first_error = None;
            let mut last_done = measure_start;
            let mut body_bytes = 0usize;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let outcome = async {
                    let res = client.get(url.clone()).send().await.map_err(|e| format!("request: {e}"))?;
                    if res.status() != StatusCode::OK {
                        return Err(format!("status {}", res.status()));
                    }
                    res.bytes().await.map(|b| b.len()).map_err(|e| format!("body: {e}"))
                }
                .await;
                let t1 = Instant::now();
                match outcome {
                    Ok(len) => {
                        body_bytes = len;
                        if t0 >= measure_start {
                            latencies.push(t1 - t0);
                            last_done = last_done.max(t1);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (latencies, errors, first_error, last_done, body_bytes)
        }));
    }
    let mut result = LoadResult {
        requests: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        errors: 0,
        first_error: None,
        body_bytes: 0,
    };
    let mut last_done = measure_start;
    for task in tasks {
        let (latencies, errors, first_error, done, body_bytes) = task.await.context("load task panicked")?;
        result.latencies.extend(latencies);
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
        last_done = last_done.max(done);
        result.body_bytes = result.body_bytes.max(body_bytes);
    }
    result.latencies.sort_unstable();
    result.requests = result.latencies.len();
    result.elapsed = last_done - measure_start;
    Ok(result)
}

/// The outcome of the connect-flow scenario.
#[derive(Debug)]
struct FlowResult {
    /// Flows completed (started in the measured window).
    flows: usize,
    /// From the start of the measured window to the last recorded completion.
    elapsed: Duration,
    /// Failed flows (warm-up and measured window).
    failures: usize,
    /// The first failure, for the report.
    first_failure: Option<String>,
    /// Latency of the callback request alone, sorted.
    callback: Vec<Duration>,
    /// `app` durations from the callback's `Server-Timing`, in ms, sorted.
    app_ms: Vec<f64>,
    /// `provider` durations from the callback's `Server-Timing`, in ms, sorted.
    provider_ms: Vec<f64>,
    /// `db` durations (the database's part of `app`), in ms, sorted.
    db_ms: Vec<f64>,
    /// `app` minus `db` of each callback, in ms, sorted.
    rest_ms: Vec<f64>,
}

impl FlowResult {
    fn per_second(&self) -> f64 {
        per_second(self.flows, self.elapsed)
    }
}

/// What one flow measured.
struct FlowTiming {
    callback: Duration,
    app_ms: Option<f64>,
    provider_ms: Option<f64>,
    db_ms: Option<f64>,
}

/// The `dur` of metric `name` in a `Server-Timing` value like `provider;dur=1.2, app;dur=0.3`.
fn server_timing(value: &str, name: &str) -> Option<f64> {
    value.split(',').find_map(|metric| {
        let mut parts = metric.split(';').map(str::trim);
        if parts.next()? != name {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("dur=")).and_then(|d| d.trim_matches('"').parse().ok())
    })
}

/// Checks the status and returns the resolved `Location`.
fn redirect_target(res: &reqwest::Response, expected: StatusCode, step: &str) -> Result<Url, String> {
    if res.status() != expected {
        return Err(format!("{step}: status {} (expected {expected})", res.status()));
    }
    let location = res
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("{step}: no Location"))?;
    res.url().join(location).map_err(|e| format!("{step}: bad Location {location:?}: {e}"))
}

/// GETs `url`, expects 200 and reads the body.
async fn get_page(client: &reqwest::Client, url: Url, step: &str) -> Result<(), String> {
    get_body(client, url, step).await.map(drop)
}

/// GETs `url`, expects 200 and returns the body.
async fn get_body(client: &reqwest::Client, url: Url, step: &str) -> Result<String, String> {
    let res = client.get(url).send().await.map_err(|e| format!("{step}: {e}"))?;
    if res.status() != StatusCode::OK {
        return Err(format!("{step}: status {}", res.status()));
    }
    res.text().await.map_err(|e| format!("{step}: body: {e}"))
}

/// The start forms' hidden `form` field on a landing page (hex, so it needs no encoding).
fn start_form_field(html: &str) -> Option<&str> {
    html.split("name=\"form\" value=\"").nth(1)?.split('"').next()
}

/// One complete TikTok connect flow through the sandbox, as a browser would run it.
async fn connect_flow(client: &reqwest::Client, link: &Url, open_id: &str) -> Result<FlowTiming, String> {
    // 1. The landing page, with the start form's hidden field.
    let landing = get_body(client, link.clone(), "landing").await?;
    let form = start_form_field(&landing).ok_or("landing: no start form")?;
    // 2. The connect button: 303 to the sandbox's authorization page.
    let connect = link.join(&format!("{}/connect/tiktok", link.path())).map_err(|e| e.to_string())?;
    let res = client
        .post(connect)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("form={form}"))
        .send()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let authorize = redirect_target(&res, StatusCode::SEE_OTHER, "connect")?;
    drop(res.bytes().await);
    // 3. The consent page.
    get_page(client, authorize.clone(), "consent page").await?;
    // 4. The decision: the authorize query verbatim, plus the choice; 302 to our callback.
    let form = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(authorize.query_pairs())
        .append_pair("decision", "allow")
        .append_pair("account", open_id)
        .finish();
    let mut decision_url = authorize.clone();
    decision_url.set_query(None);
    let res = client
        .post(decision_url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .map_err(|e| format!("decision: {e}"))?;
    let callback = redirect_target(&res, StatusCode::FOUND, "decision")?;
    drop(res.bytes().await);
    if !callback.path().ends_with("/oauth/tiktok/callback") {
        return Err(format!("decision: unexpected redirect to {}", callback.path()));
    }
    // 5. The callback, timed on its own: 303 to the result page.
    let t0 = Instant::now();
    let res = client.get(callback).send().await.map_err(|e| format!("callback: {e}"))?;
    let timing = res.headers().get("server-timing").and_then(|v| v.to_str().ok()).map(str::to_string);
    let result = redirect_target(&res, StatusCode::SEE_OTHER, "callback")?;
    drop(res.bytes().await);
    let callback_latency = t0.elapsed();
    if !result.path().starts_with("/connected/") {
        return Err(format!("callback: redirected to {} (a failed flow)", result.path()));
    }
    // 6. The success page.
    get_page(client, result, "result page").await?;
    Ok(FlowTiming {
        callback: callback_latency,
        app_ms: timing.as_deref().and_then(|t| server_timing(t, "app")),
        provider_ms: timing.as_deref().and_then(|t| server_timing(t, "provider")),
        db_ms: timing.as_deref().and_then(|t| server_timing(t, "db")),
    })
}

/// The connect flow's browsers' runtime. With a `nice` above 0, each of its threads lowers its own
/// scheduling priority with `renice` (on Linux a thread id names one thread) before it runs any
/// task; the flag stays true only if every one of them succeeded.
fn browser_runtime(nice: u64) -> Result<(tokio::runtime::Runtime, Arc<AtomicBool>)> {
    let reniced = Arc::new(AtomicBool::new(nice > 0));
    let flag = Arc::clone(&reniced);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("bench-browser");
    if nice > 0 {
        builder.on_thread_start(move || {
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string));
            let done = tid.is_some_and(|tid| {
                Command::new("renice")
                    .args(["-n", &nice.to_string(), "-p", &tid])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !done && flag.swap(false, Ordering::Relaxed) {
                eprintln!("bench: renice of a browser thread failed; the flow runs at the default priority");
            }
        });
    }
    let rt = builder.build().context("browser runtime")?;
    Ok((rt, reniced))
}

/// `flow_clients` browsers (each with its own cookie jar and connection) loop complete connect
/// flows for the warm-up and the measured window.
async fn flow_load(link: Url, settings: Settings) -> Result<FlowResult> {
    let start = Instant::now();
    let measure_start = start + settings.warmup;
    let end = measure_start + settings.measure;
    let mut tasks = Vec::with_capacity(settings.flow_clients);
    for index in 0..settings.flow_clients {
        let client = http_client(1, true)?;
        let link = link.clone();
        tasks.push(tokio::spawn(async move {
            let mut timings = Vec::new();
            let mut failures = 0usize;
            let mut first_failure = None;
            let mut last_done = measure_start;
            let mut n = index;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let open_id = TIKTOK_OPEN_IDS[n % TIKTOK_OPEN_IDS.len()];
                n += 1;
                match connect_flow(&client, &link, open_id).await {
                    Ok(t) => {
                        if t0 >= measure_start {
                            let t1 = Instant::now();
                            timings.push(t);
                            last_done = last_done.max(t1);
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        first_failure.get_or_insert(e);
                        tokio::time::sleep(FAILURE_PAUSE).await;
                    }
                }
            }
            (timings, failures, first_failure, last_done)
        }));
    }
    let mut result = FlowResult {
        flows: 0,
        elapsed: Duration::ZERO,
        failures: 0,
        first_failure: None,
        callback: Vec::new(),
        app_ms: Vec::new(),
        provider_ms: Vec::new(),
        db_ms: Vec::new(),
        rest_ms: Vec::new(),
    };
    let mut last_done = measure_start;
    for task in tasks {
        let (timings, failures, first_failure, done) = task.await.context("flow task panicked")?;
        result.flows += timings.len();
        for t in timings {
            result.callback.push(t.callback);
            result.app_ms.extend(t.app_ms);
            result.provider_ms.extend(t.provider_ms);
            result.db_ms.extend(t.db_ms);
            if let (Some(app), Some(db)) = (t.app_ms, t.db_ms) {
                result.rest_ms.push(app - db);
            }
        }
        result.failures += failures;
        if result.first_failure.is_none() {
            result.first_failure = first_failure;
        }
        last_done = last_done.max(done);
    }
    result.callback.sort_unstable();
    result.app_ms.sort_by(f64::total_cmp);
    result.provider_ms.sort_by(f64::total_cmp);
    result.db_ms.sort_by(f64::total_cmp);
    result.rest_ms.sort_by(f64::total_cmp);
    result.elapsed = last_done - measure_start;
    Ok(result)
}

/// Nearest-rank percentile of sorted values.
/// A link in one state and the status it must answer.
struct StateProbe {
    name: &'static str,
    url: Url,
    status: StatusCode,
}

/// Unmeasured rounds before the link-states scenario's measured ones.
const LINK_STATE_WARMUP: usize = 200;

/// One client, one request at a time, taking the probes in turn (each round starting from the
/// next one, so that none always follows the same other): the sorted latencies of each.
async fn link_states(
    probes: &[StateProbe],
    rounds: usize,
) -> Result<Vec<(&'static str, StatusCode, Vec<Duration>)>> {
    let client = http_client(1, false)?;
    let mut latencies: Vec<Vec<Duration>> = probes.iter().map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..LINK_STATE_WARMUP + rounds {
        for k in 0..probes.len() {
            let i = (round + k) % probes.len();
            let probe = &probes[i];
            let t0 = Instant::now();
            let res = client.get(probe.url.clone()).send().await.context("link states: request")?;
            let status = res.status();
            res.bytes().await.context("link states: body")?;
            let elapsed = t0.elapsed();
            if status != probe.status {
                bail!("link states: the {} answered {status}, not {}", probe.name, probe.status);
            }
            if round >= LINK_STATE_WARMUP {
                latencies[i].push(elapsed);
            }
        }
    }
    Ok(probes
        .iter()
        .zip(latencies)
        .map(|(p, mut l)| {
            l.sort_unstable();
            (p.name, p.status, l)
        })
        .collect())
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------------------------

/// A free loopback port (bound and released; the server binds it right after).
fn free_port() -> Result<u16> {
    let listener = StdTcpListener::bind("127.0.0.1:0").context("cannot bind a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// Spawns `authlink serve` on the existing database and times how long until `GET /readyz`
/// answers 200, polling every [`READY_POLL`].
fn measure_startup(rt: &tokio::runtime::Runtime, authlink: &Authlink) -> Result<Duration> {
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = authlink.command(
        &["serve"],
        &[("AUTHLINK_LISTEN", format!("127.0.0.1:{port}")), ("AUTHLINK_PUBLIC_URL", base.clone())],
    );
    let client = http_client(1, false)?;
    let ready = Url::parse(&format!("{base}/readyz"))?;
    let started = Instant::now();
    let mut server = Server::spawn("authlink (startup)", &mut cmd)?;
    server.detach_log();
    let elapsed = rt.block_on(async {
        loop {
            if let Ok(res) = client.get(ready.clone()).timeout(Duration::from_secs(1)).send().await
                && res.status() == StatusCode::OK
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > PROCESS_TIMEOUT {
                bail!("authlink not ready after {PROCESS_TIMEOUT:?}");
            }
            tokio::time::sleep(READY_POLL).await;
        }
    });
    let elapsed = match elapsed {
        Ok(e) => e,
        Err(e) => {
            let (_, _, _, last) = server.log_summary();
            return Err(e.context(format!("last log lines: {last:?}")));
        }
    };
    if !server.running() {
        bail!("authlink exited during the startup measurement");
    }
    server.stop()?;
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Everything one run measured.
struct Report {
    settings: Settings,
    machine: Machine,
    date: String,
    floor: LoadResult,
    floor_idle_rss: u64,
    floor_peak_rss: u64,
    floor_cpu: CpuUsage,
    landing: LoadResult,
    landing_peak_rss: u64,
    landing_cpu: CpuUsage,
    flows: FlowResult,
    flows_peak_rss: u64,
    flows_cpu: CpuUsage,
    /// The niceness the browser threads actually ran at (0 when `renice` was not asked or failed).
    flow_nice: u64,
    /// Each refused link state: its name, status and sorted latencies.
    link_states: Vec<(&'static str, StatusCode, Vec<Duration>)>,
    idle_rss: u64,
    peaks_reset: bool,
    startups: Vec<Duration>,
    log_warnings: u64,
    log_errors: u64,
    log_lines: u64,
    last_warnings: Vec<String>,
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let machine = Machine::read();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let authlink = Authlink::new(tmp.path());
    let window = format!("{}s warm-up + {}s measured", settings.warmup.as_secs(), settings.measure.as_secs());

    eprintln!(
        "bench: machine: {} ({} cores), binary {}",
        machine.cpu,
        machine.cores,
        env!("CARGO_BIN_EXE_authlink")
    );
    eprintln!("bench: starting authlink on a fresh SQLite database in {}", tmp.path().display());
    let mut server = Server::spawn("authlink", &mut authlink.command(&["serve"], &[]))?;
    let public_url = server.wait_listening()?;
    std::thread::sleep(IDLE_SETTLE);
    let idle_rss = rss(server.pid())?;

    let floor = Floor::start()?;
    std::thread::sleep(IDLE_SETTLE);
    let floor_idle_rss = rss(floor.pid())?;

    eprintln!("bench: creating a workspace and a link with the CLI");
    let workspace = authlink.cli(&public_url, &["workspace", "create", "--name", "Bench"])?;
    let workspace_id =
        workspace.get("id").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("no id in {workspace}"))?;
    let link =
        authlink.cli(&public_url, &["link", "create", "--workspace", workspace_id, "--label", "Client"])?;
    let link_url = link.get("url").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("no url in {link}"))?;
    let link_url = Url::parse(link_url).with_context(|| format!("bad link url {link_url:?}"))?;
    // For the link-states scenario, at the end: a revoked link, one that expires a second from
    // now (long past by then), and a well-formed token no link has.
    let new_link = |args: &[&str]| -> Result<(String, Url)> {
        let base = ["link", "create", "--workspace", workspace_id, "--label", "State"];
        let link = authlink.cli(&public_url, &[&base[..], args].concat())?;
        let id = link.get("id").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("no id in {link}"))?;
        let url = link.get("url").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("no url in {link}"))?;
        Ok((id.to_string(), Url::parse(url)?))
    };
    let (revoked_id, revoked_url) = new_link(&[])?;
    authlink.cli(&public_url, &["link", "revoke", &revoked_id])?;
    let (_, expired_url) = new_link(&["--expires-in", "1s"])?;
    let unknown_url = public_url.join(&format!(
        "/l/{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    ))?;

    let floor_url = Url::parse(&format!("http://127.0.0.1:{}/", floor.port))?;
    eprintln!("bench: floor: GET / with {} connections, {window}", settings.connections);
    let peaks_reset = reset_peak(floor.pid());
    let (floor_result, floor_cpu) = with_cpu(floor.pid(), || rt.block_on(request_load(floor_url, settings)))?;
    let floor_peak_rss = peak_rss(floor.pid())?;

    eprintln!("bench: landing: GET /l/{{token}} with {} connections, {window}", settings.connections);
    let peaks_reset = reset_peak(server.pid()) && peaks_reset;
    let (landing, landing_cpu) =
        with_cpu(server.pid(), || rt.block_on(request_load(link_url.clone(), settings)))?;
    let landing_peak_rss = peak_rss(server.pid())?;

    rt.block_on(async {
        let res = reqwest::Client::new()
            .post(public_url.join("/sandbox/control/tiktok/scenario")?)
            .header("content-type", "application/json")
            .body(SANDBOX_SCENARIO)
            .send()
            .await?;
        anyhow::ensure!(res.status().is_success(), "sandbox scenario: {}", res.status());
        Ok(())
    })
    .context("turning off the sandbox's user-info rate limit")?;
    eprintln!("bench: connect: TikTok flows with {} clients, {window}", settings.flow_clients);
    let peaks_reset = reset_peak(server.pid()) && peaks_reset;
    let (flow_rt, reniced) = browser_runtime(settings.flow_nice)?;
    let (flows, flows_cpu) = with_cpu(server.pid(), || flow_rt.block_on(flow_load(link_url, settings)))?;
    drop(flow_rt);
    let flow_nice = if reniced.load(Ordering::Relaxed) { settings.flow_nice } else { 0 };
    let flows_peak_rss = peak_rss(server.pid())?;

    eprintln!(
        "bench: link states: unknown, revoked and expired links, {} requests each",
        settings.link_state_rounds
    );
    let probes = [
        StateProbe { name: "unknown token", url: unknown_url, status: StatusCode::NOT_FOUND },
        StateProbe { name: "revoked link", url: revoked_url, status: StatusCode::GONE },
        StateProbe { name: "expired link", url: expired_url, status: StatusCode::GONE },
    ];
    let link_states = rt.block_on(link_states(&probes, settings.link_state_rounds))?;

    if !server.running() {
        bail!("authlink exited during the load");
    }
    let (log_lines, log_warnings, log_errors, last_warnings) = server.log_summary();
    server.stop()?;
    drop(floor);

    eprintln!("bench: startup: {} restarts on the existing database", settings.startup_runs);
    let mut startups = Vec::with_capacity(settings.startup_runs);
    for _ in 0..settings.startup_runs {
        startups.push(measure_startup(&rt, &authlink)?);
    }
    startups.sort_unstable();

    let report = Report {
        settings,
        machine,
        date,
        floor: floor_result,
        floor_idle_rss,
        floor_peak_rss,
        floor_cpu,
        landing,
        landing_peak_rss,
        landing_cpu,
        flows,
        flows_peak_rss,
        flows_cpu,
        flow_nice,
        link_states,
        idle_rss,
        peaks_reset,
        startups,
        log_warnings,
        log_errors,
        log_lines,
        last_warnings,
    };
    let text = report.render();
    println!("{text}");
    let path = report_path();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("bench: report written to {}", path.display());
    drop(tmp);
    Ok(())
}

/// `<target dir>/bench-report.md`: the target folder is found from this executable's path
/// (`<target>/release/deps/harness-…`), else `CARGO_TARGET_DIR`, else `./target`.
fn report_path() -> PathBuf {
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join("release").is_dir());
    let dir = from_exe
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    dir.join("bench-report.md")
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1000.0))
}

fn us(d: Option<Duration>) -> String {
    d.map(|d| format!("{} µs", d.as_micros())).unwrap_or_else(|| "n/a".into())
}

fn ms_f(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.2} ms"))
}

/// A target's verdict.
fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "n/a",
    }
}

/// Cores used by other processes above which a scenario's timings are flagged as disturbed.
const BUSY_MACHINE_CORES: f64 = 0.25;

/// A timing target's verdict, flagged when other processes competed for the CPU meanwhile.
fn timed_verdict(ok: Option<bool>, during: &[CpuUsage]) -> String {
    let v = verdict(ok);
    if ok.is_some() && during.iter().any(|c| c.other > BUSY_MACHINE_CORES) {
        format!("{v} (disturbed)")
    } else {
        v.to_string()
    }
}

impl Report {
    fn render(&self) -> String {
        let s = &self.settings;
        let floor_rps = self.floor.per_second();
        let ratio = |v: f64| if floor_rps > 0.0 { format!("{:.3}", v / floor_rps) } else { "n/a".into() };
        let landing_rps = self.landing.per_second();
        let flows_rps = self.flows.per_second();
        let landing_p99 = percentile(&self.landing.latencies, 99.0);
        let app_p50 = percentile(&self.flows.app_ms, 50.0);
        let app_p99 = percentile(&self.flows.app_ms, 99.0);
        let peak = self.landing_peak_rss.max(self.flows_peak_rss);
        let startup_median = percentile(&self.startups, 50.0);
        let mib_limit = |n: u64| n * 1024 * 1024;
        let peak_note = if self.peaks_reset { "" } else { " (cumulative: /proc/<pid>/clear_refs refused)" };

        let mut o = String::new();
        let _ = writeln!(o, "## authlink benchmark\n");
        let _ = writeln!(
            o,
            "- Machine: {}, {} logical cores, {:.1} GiB RAM, Linux {}",
            self.machine.cpu,
            self.machine.cores,
            self.machine.memory as f64 / (1024.0 * 1024.0 * 1024.0),
            self.machine.kernel
        );
        let _ = writeln!(o, "- Date: {}", self.date);
        let _ = writeln!(
            o,
            "- Load: {} keep-alive connections (connect flow: {} clients), {}s warm-up + {}s measured per \
             scenario, generator in the same machine (loopback)",
            s.connections,
            s.flow_clients,
            s.warmup.as_secs(),
            s.measure.as_secs()
        );
        let _ = writeln!(
            o,
            "- Connect-flow browsers: {}",
            if self.flow_nice > 0 {
                format!(
                    "threads at nice {} (a lower priority than authlink's, standing in for browsers on other \
                     machines)",
                    self.flow_nice
                )
            } else {
                "same priority as authlink".into()
            }
        );
        let _ = writeln!(
            o,
            "- authlink: release build, fresh SQLite database, sandbox providers, JSON logs at \
             `warn,authlink=info` (drained by the harness), `http.link_requests_per_minute` raised to \
             {LINK_RATE_LIMIT} (the default would refuse a single-address load generator), the sandbox's \
             control API on and its TikTok user-info rate limit (600 a minute, as documented) off \
             with `{SANDBOX_SCENARIO}`"
        );
        let _ = writeln!(
            o,
            "- Response sizes: floor {} bytes, landing {} bytes\n",
            self.floor.body_bytes, self.landing.body_bytes
        );

        let _ = writeln!(
            o,
            "| Scenario | Throughput | p50 | p99 | Errors | Peak RSS{peak_note} | vs floor | CPU cores: server / load gen / other |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            o,
            "| floor (`GET /`, minimal axum) | {:.0} req/s | {} | {} | {} | {} | 1.000 | {} |",
            floor_rps,
            ms(percentile(&self.floor.latencies, 50.0)),
            ms(percentile(&self.floor.latencies, 99.0)),
            self.floor.errors,
            mib(self.floor_peak_rss),
            self.floor_cpu.describe()
        );
        let _ = writeln!(
            o,
            "| landing (`GET /l/{{token}}`) | {:.0} req/s | {} | {} | {} | {} | {} | {} |",
            landing_rps,
            ms(percentile(&self.landing.latencies, 50.0)),
            ms(landing_p99),
            self.landing.errors,
            mib(self.landing_peak_rss),
            ratio(landing_rps),
            self.landing_cpu.describe()
        );
        let _ = writeln!(
            o,
            "| connect flow (TikTok sandbox; latency = callback request) | {:.1} flows/s | {} | {} | {} failed | {} | {} | {} |",
            flows_rps,
            ms(percentile(&self.flows.callback, 50.0)),
            ms(percentile(&self.flows.callback, 99.0)),
            self.flows.failures,
            mib(self.flows_peak_rss),
            ratio(flows_rps),
            self.flows_cpu.describe()
        );
        let _ = writeln!(
            o,
            "| callback `Server-Timing: app` (authlink's own work) | {} samples | {} | {} | | | | |",
            self.flows.app_ms.len(),
            ms_f(app_p50),
            ms_f(app_p99)
        );
        let _ = writeln!(
            o,
            "| callback `Server-Timing: provider` (sandbox calls) | {} samples | {} | {} | | | | |",
            self.flows.provider_ms.len(),
            ms_f(percentile(&self.flows.provider_ms, 50.0)),
            ms_f(percentile(&self.flows.provider_ms, 99.0))
        );
        let _ = writeln!(
            o,
            "| of `app`: `db` (the flow's reads and writes, waiting for the write permit included) | {} samples | {} | {} | | | | |",
            self.flows.db_ms.len(),
            ms_f(percentile(&self.flows.db_ms, 50.0)),
            ms_f(percentile(&self.flows.db_ms, 99.0))
        );
        let _ = writeln!(
            o,
            "| of `app`: the rest (`app` − `db`) | {} samples | {} | {} | | | | |",
            self.flows.rest_ms.len(),
            ms_f(percentile(&self.flows.rest_ms, 50.0)),
            ms_f(percentile(&self.flows.rest_ms, 99.0))
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| Link state (one client, {} requests each, in turn) | Status | p50 | p99 |",
            s.link_state_rounds
        );
        let _ = writeln!(o, "|---|---:|---:|---:|");
        for (name, status, l) in &self.link_states {
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} |",
                status.as_u16(),
                us(percentile(l, 50.0)),
                us(percentile(l, 99.0))
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "| Measurement | Value |");
        let _ = writeln!(o, "|---|---:|");
        let _ = writeln!(o, "| authlink idle RSS after start | {} |", mib(self.idle_rss));
        let _ = writeln!(o, "| floor idle RSS after start | {} |", mib(self.floor_idle_rss));
        let _ = writeln!(
            o,
            "| authlink startup to `/readyz` 200 (median of {}; min / max) | {} ({} / {}) |",
            self.startups.len(),
            ms(startup_median),
            ms(self.startups.first().copied()),
            ms(self.startups.last().copied())
        );
        let _ = writeln!(
            o,
            "| requests measured: floor / landing | {} / {} |",
            self.floor.requests, self.landing.requests
        );
        let _ = writeln!(o, "| connect flows measured | {} |", self.flows.flows);
        let _ = writeln!(
            o,
            "| authlink log lines during the run (warnings / errors) | {} ({} / {}) |",
            self.log_lines, self.log_warnings, self.log_errors
        );
        let _ = writeln!(o);

        let flows_target = floor_rps / 15.0;
        let _ = writeln!(o, "| Target | Measured | Result |");
        let _ = writeln!(o, "|---|---:|:---:|");
        let _ = writeln!(
            o,
            "| landing ≥ 50% of floor req/s ({:.0}) at {} connections | {:.0} req/s ({}) | {} |",
            floor_rps * 0.5,
            s.connections,
            landing_rps,
            ratio(landing_rps),
            timed_verdict(
                Some(floor_rps > 0.0 && landing_rps >= floor_rps * 0.5),
                &[self.floor_cpu, self.landing_cpu]
            )
        );
        let _ = writeln!(
            o,
            "| landing p99 < 5 ms at {} connections | {} | {} |",
            s.connections,
            ms(landing_p99),
            timed_verdict(landing_p99.map(|p| p < Duration::from_millis(5)), &[self.landing_cpu])
        );
        let _ = writeln!(
            o,
            "| landing and floor errors = 0 | {} / {} | {} |",
            self.landing.errors,
            self.floor.errors,
            verdict(Some(self.landing.errors == 0 && self.floor.errors == 0))
        );
        let _ = writeln!(
            o,
            "| idle RSS < 25 MiB | {} | {} |",
            mib(self.idle_rss),
            verdict(Some(self.idle_rss < mib_limit(25)))
        );
        let _ =
            writeln!(o, "| peak RSS < 64 MiB | {} | {} |", mib(peak), verdict(Some(peak < mib_limit(64))));
        let _ = writeln!(
            o,
            "| startup < 300 ms (median) | {} | {} |",
            ms(startup_median),
            verdict(startup_median.map(|d| d < Duration::from_millis(300)))
        );
        let _ = writeln!(
            o,
            "| connect flows/s ≥ floor / 15 ({:.1}) | {:.1} flows/s | {} |",
            flows_target,
            flows_rps,
            timed_verdict(
                Some(floor_rps > 0.0 && flows_rps >= flows_target),
                &[self.floor_cpu, self.flows_cpu]
            )
        );
        let _ = writeln!(
            o,
            "| failed connect flows = 0 | {} | {} |",
            self.flows.failures,
            verdict(Some(self.flows.failures == 0))
        );
        let _ = writeln!(
            o,
            "| callback app-time p99 < 2 ms | {} | {} |",
            ms_f(app_p99),
            timed_verdict(app_p99.map(|p| p < 2.0), &[self.flows_cpu])
        );

        let state_p50s: Vec<Duration> =
            self.link_states.iter().filter_map(|(_, _, l)| percentile(l, 50.0)).collect();
        let state_spread = match (state_p50s.iter().min(), state_p50s.iter().max()) {
            (Some(lo), Some(hi)) if state_p50s.len() == self.link_states.len() => Some(*hi - *lo),
            _ => None,
        };
        let _ = writeln!(
            o,
            "| unknown, revoked and expired links: p50s within 1 ms of each other | {} apart | {} |",
            us(state_spread),
            verdict(state_spread.map(|d| d <= Duration::from_millis(1)))
        );

        let mut notes = Vec::new();
        if let Some(e) = &self.floor.first_error {
            notes.push(format!("first floor error: {e}"));
        }
        if let Some(e) = &self.landing.first_error {
            notes.push(format!("first landing error: {e}"));
        }
        if let Some(e) = &self.flows.first_failure {
            notes.push(format!("first failed flow: {e}"));
        }
        if self.flows.app_ms.len() < self.flows.flows {
            notes.push(format!(
                "{} of {} callbacks had no `Server-Timing: app` value",
                self.flows.flows - self.flows.app_ms.len(),
                self.flows.flows
            ));
        }
        for (name, cpu) in
            [("floor", self.floor_cpu), ("landing", self.landing_cpu), ("connect flow", self.flows_cpu)]
        {
            if cpu.other > BUSY_MACHINE_CORES {
                notes.push(format!(
                    "other processes used {:.2} cores during the {name} scenario: the machine was not \
                     quiet, so its figures are disturbed",
                    cpu.other
                ));
            }
            if cpu.steal > 0.1 {
                notes.push(format!(
                    "the hypervisor took {:.2} cores (steal time) during the {name} scenario",
                    cpu.steal
                ));
            }
        }
        for w in &self.last_warnings {
            notes.push(format!("authlink log: `{w}`"));
        }
        if !notes.is_empty() {
            let _ = writeln!(o, "\nNotes:\n");
            for n in notes {
                let _ = writeln!(o, "- {n}");
            }
        }
        o
    }
}
