//! Dashboard benchmark: `cargo bench --bench dashboard`.
//!
//! The target of the issue: dashboard pages render in under 20 ms at p99 with 100,000
//! connections in the workspace. This starts the release binary on a fresh database, creates an
//! admin, a workspace with N connections (default 100,000; `BENCH_DASHBOARD_CONNECTIONS`), their
//! history and audit entries, a few hundred links, and a second, smaller workspace; signs in over
//! HTTP like a browser (cookie jar, CSRF token of the sign-in form) and requests the pages one at
//! a time, going round them: `BENCH_DASHBOARD_WARMUP` (30) rounds unmeasured, then
//! `BENCH_DASHBOARD_REQUESTS` (300) rounds measured. A request's time is from sending it until
//! the whole body has arrived, over loopback. The report (a markdown table with p50/p99/max per
//! page and PASS/FAIL against 20 ms at p99, the machine and how busy it was, and the plans of
//! the connection and audit queries) is printed and written to
//! `target/bench-dashboard-report.md`.
//!
//! SQLite by default (a file in a temporary folder, as `serve` runs out of the box). With
//! `BENCH_DASHBOARD_BACKEND=postgres` it runs on PostgreSQL at `AUTHLINK_BENCH_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`) in a schema of its own, and writes
//! `target/bench-dashboard-report-postgres.md`.
//!
//! The rows are inserted with SQL: the pages never open the sealed token columns of
//! connections, so those hold a placeholder. Links are created through the API, because their
//! pages (and a connection's repair link) open the sealed link token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authlink::db::Backend;
use authlink::db::audit::{AuditFilter, list_sql as audit_list_sql};
use authlink::db::dashboard::{CONNECTION_COUNTS_SQL, ConnectionSearch, connections_sql};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::{AnyConnection, Connection, Row};

mod common;
use common::{Env, env_usize, process_ticks, random_master_key};

const TARGET_P99_MS: f64 = 20.0;
const EMAIL: &str = "bench-admin@example.com";
const MAIN_SLUG: &str = "bench";
const OTHER_SLUG: &str = "other";

// ---------------------------------------------------------------------------------------------
// The binary

impl Env {
    /// Runs a CLI command with `--json`, optionally writing `stdin`, and parses its output.
    fn cli(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let mut cmd = self.command(args);
        cmd.arg("--json").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            let mut pipe = child.stdin.take().unwrap();
            if let Some(input) = stdin {
                pipe.write_all(input.as_bytes()).unwrap();
                pipe.write_all(b"\n").unwrap();
            }
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "authlink {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

/// Starts `authlink serve` (jobs off: the scheduler would only add noise) and returns it with
/// its public URL and its log lines.
fn start_serve(env: &Env) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = env
        .command(&["serve"])
        .env("AUTHLINK_LISTEN", "127.0.0.1:0")
        .env("AUTHLINK_JOBS__ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let logs = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "authlink listening"
                    && let Some(tx) = tx.take()
                {
                    let url = v["public_url"].as_str().unwrap_or_default();
                    let _ = tx.send(url.trim_end_matches('/').to_string());
                }
                logs.lock().unwrap().push(line);
            }
        });
    }
    let Ok(base) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        panic!("authlink serve did not start:\n{}", logs.lock().unwrap().join("\n"));
    };
    (child, base, logs)
}

// ---------------------------------------------------------------------------------------------
// Data

const FIRST_NAMES: &[&str] = &[
    "anna", "ben", "carla", "david", "emma", "felix", "grace", "hugo", "ines", "jonas", "kate", "leo", "mia",
    "noah", "olivia", "paul", "rosa", "sam", "tina", "yusuf", "zoe", "lucas", "maya", "omar", "nina",
    "chloe",
];
const ADJECTIVES: &[&str] = &[
    "sunny", "urban", "golden", "little", "wild", "daily", "happy", "green", "blue", "cozy", "fresh",
    "bright", "silver", "rustic", "modern", "sweet", "bold", "quiet", "lucky", "north", "velvet", "coastal",
    "tiny",
];
const THINGS: &[&str] = &[
    "cafe", "bakery", "studio", "fitness", "kitchen", "travels", "beauty", "garden", "coffee", "books",
    "yoga", "design", "photo", "bistro", "fashion", "barber", "market", "crafts", "pets", "records",
    "florist", "wines",
];
const CITIES: &[&str] = &[
    "berlin", "paris", "lisbon", "austin", "leeds", "milan", "oslo", "madrid", "lyon", "porto", "dublin",
    "vienna",
];
const BROKEN_REASONS: &[&str] = &[
    "The account revoked access to the app (invalid_grant).",
    "The refresh token expired; the client needs to reconnect.",
    "A permission was removed: user.info.profile.",
];

fn pick<'a>(rng: &mut StdRng, list: &[&'a str]) -> &'a str {
    list[rng.random_range(0..list.len())]
}

fn title(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// A plausible, unique handle and the display name that goes with it.
fn handle(rng: &mut StdRng, taken: &mut HashSet<String>) -> (String, String) {
    loop {
        let (a, t, f, c) =
            (pick(rng, ADJECTIVES), pick(rng, THINGS), pick(rng, FIRST_NAMES), pick(rng, CITIES));
        let (mut h, name) = match rng.random_range(0..6) {
            0 => (format!("{a}.{t}"), format!("{} {}", title(a), title(t))),
            1 => (format!("{a}.{t}_{c}"), format!("{} {} {}", title(a), title(t), title(c))),
            2 => (format!("{f}.{t}"), format!("{} · {}", title(f), title(t))),
            3 => (format!("the{a}{t}"), format!("The {} {}", title(a), title(t))),
            4 => (format!("{t}_by_{f}"), format!("{} by {}", title(t), title(f))),
            _ => (format!("{a}{t}.{c}"), format!("{} {} {}", title(a), title(t), title(c))),
        };
        if rng.random_bool(0.5) {
            h.push_str(&rng.random_range(1..2000).to_string());
        }
        if taken.insert(h.clone()) {
            return (h, name);
        }
    }
}

/// A SQL literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn opt_lit(s: Option<&str>) -> String {
    s.map(lit).unwrap_or_else(|| "NULL".into())
}

/// A UUIDv7 for a moment in the past, so that ids sort like the times they carry.
fn id_at(ms: i64) -> String {
    let ts =
        uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, ((ms % 1000) * 1_000_000) as u32);
    uuid::Uuid::new_v7(ts).to_string()
}

#[derive(Default)]
struct Inserted {
    connections: usize,
    events: usize,
    audit: usize,
    handles: Vec<String>,
    ids: Vec<String>,
}

/// Inserts `n` connections of `workspace` connected over the two years before `now_ms`, their
/// history and (with `audit`) their audit entries, in one transaction.
#[allow(clippy::too_many_arguments)]
async fn insert_connections(
    conn: &mut AnyConnection,
    rng: &mut StdRng,
    taken: &mut HashSet<String>,
    workspace: &str,
    links: &[String],
    admin_id: &str,
    n: usize,
    now_ms: i64,
    audit: bool,
) -> Inserted {
    const BATCH: usize = 500;
    let span = 730 * 86_400_000_i64;
    let start = now_ms - span;
    let step = span / n.max(1) as i64;
    let mut out = Inserted::default();
    let mut tx = conn.begin().await.unwrap();
    let mut rows = Vec::with_capacity(BATCH);
    let mut schedules = Vec::with_capacity(BATCH);
    let mut events = Vec::with_capacity(BATCH * 3);
    let mut entries = Vec::with_capacity(BATCH * 2);
    for i in 0..n {
        let at = start + i as i64 * step + rng.random_range(0..step.max(1));
        let id = id_at(at);
        let instagram = rng.random_bool(0.4);
        let provider = if instagram { "instagram" } else { "tiktok" };
        let account = if instagram {
            format!("1784{:013}", out.connections + 1_000_000 * (workspace.len() % 7))
        } else {
            format!("-000{}", uuid::Uuid::new_v4().simple())
        };
        let (h, name) = handle(rng, taken);
        // A few TikTok accounts did not grant the profile scope: no handle, only a name.
        let username = (instagram || rng.random_bool(0.98)).then_some(h.as_str());
        let roll: f64 = rng.random();
        let status = if roll < 0.85 {
            "active"
        } else if roll < 0.95 {
            "broken"
        } else {
            "disconnected"
        };
        let reason = match status {
            "broken" => Some(pick(rng, BROKEN_REASONS)),
            "disconnected" => Some("Disconnected from the dashboard."),
            _ => None,
        };
        let scopes = if instagram {
            "instagram_business_basic,instagram_business_manage_insights"
        } else {
            "user.info.basic,user.info.profile,video.list"
        };
        let link = (!links.is_empty()).then(|| links[rng.random_range(0..links.len())].as_str());
        let sealed = (status != "disconnected").then_some("bench:not-a-sealed-token");
        let updated = (at + rng.random_range(0..30 * 86_400_000_i64)).min(now_ms);
        let access_expires = if instagram { now_ms + 50 * 86_400_000 } else { now_ms + 86_400_000 };
        let next_refresh = (status == "active").then_some(access_expires - 600_000);
        rows.push(format!(
            "({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, 1, {}, {}, 0, {at}, {}, {}, {at}, {updated}, 0, {})",
            lit(&id),
            lit(workspace),
            opt_lit(link),
            lit(provider),
            lit(&account),
            if instagram { lit(&format!("9{}", &account[4..])) } else { "NULL".into() },
            opt_lit(username),
            lit(&name),
            opt_lit(rng.random_bool(0.5).then_some("https://cdn.example.invalid/avatar.jpg")),
            lit(scopes),
            opt_lit(sealed),
            if sealed.is_some() { access_expires.to_string() } else { "NULL".into() },
            opt_lit(sealed),
            if sealed.is_some() { (now_ms + 365 * 86_400_000).to_string() } else { "NULL".into() },
            lit(status),
            opt_lit(reason),
            if sealed.is_some() { (now_ms - rng.random_range(0..86_400_000_i64)).to_string() } else { "NULL".into() },
            rng.random_range(0..3),
            next_refresh.map(|v| (v + 3_600_000).to_string()).unwrap_or_else(|| "NULL".into()),
        ));
        schedules.push(format!(
            "({}, {})",
            lit(&id),
            next_refresh.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into())
        ));
        let mut event = |kind: &str, detail: Option<&str>, when: i64| {
            events.push(format!(
                "({}, {}, {}, {}, {}, {when})",
                lit(&id_at(when)),
                lit(&id),
                lit(workspace),
                lit(kind),
                opt_lit(detail)
            ));
        };
        event("created", Some(&format!("connected through the link as @{h}")), at);
        for k in 0..rng.random_range(0..3_i64) {
            event("refreshed", None, (at + (k + 1) * 86_400_000).min(now_ms));
        }
        if let Some(r) = reason {
            event(if status == "broken" { "broken" } else { "disconnected" }, Some(r), updated);
        }
        if audit {
            let mut entry =
                |actor_kind: &str, actor: Option<&str>, action: &str, details: Value, when: i64| {
                    entries.push(format!(
                        "({}, {}, {}, {}, {}, 'connection', {}, {}, {when})",
                        lit(&id_at(when)),
                        lit(workspace),
                        lit(actor_kind),
                        opt_lit(actor),
                        lit(action),
                        lit(&id),
                        lit(&details.to_string()),
                    ));
                };
            entry("client", None, "connection.created", json!({"provider": provider, "link_id": link}), at);
            // A few reconnections through the link, long ago: a rare action deep in the log.
            if rng.random_bool(0.003) {
                entry("client", None, "connection.reconnected", json!({"provider": provider}), at + 1000);
            }
            match status {
                "broken" => entry("system", None, "connection.broken", json!({"reason": reason}), updated),
                "disconnected" => {
                    entry("user", Some(admin_id), "connection.disconnected", json!({}), updated)
                }
                _ => {}
            }
        }
        if let Some(u) = username {
            out.handles.push(u.to_string());
        }
        out.ids.push(id);
        out.connections += 1;
        if rows.len() == BATCH || i + 1 == n {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO connections (id, workspace_id, link_id, provider, provider_account_id, app_scoped_id, \
                 username, display_name, avatar_url, scopes, access_token_sealed, access_expires_at, \
                 refresh_token_sealed, refresh_expires_at, token_generation, status, status_reason, sandbox, \
                 connected_at, last_refreshed_at, reconnect_count, created_at, updated_at, \
                 refresh_failures, next_check_at) VALUES {}",
                rows.join(",")
            )))
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO refresh_schedule (connection_id, next_refresh_at) VALUES {}",
                schedules.join(",")
            )))
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO connection_events (id, connection_id, workspace_id, kind, detail, created_at) VALUES {}",
                events.join(",")
            )))
            .execute(&mut *tx)
            .await
            .unwrap();
            if !entries.is_empty() {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO audit_log (id, workspace_id, actor_kind, actor_id, action, target_kind, target_id, \
                     details, created_at) VALUES {}",
                    entries.join(",")
                )))
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            out.events += events.len();
            out.audit += entries.len();
            rows.clear();
            schedules.clear();
            events.clear();
            entries.clear();
        }
    }
    tx.commit().await.unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// Measuring

struct Page {
    name: String,
    urls: Vec<String>,
    /// Rows (list items) the page must show, at least.
    min_rows: usize,
}

struct Measured {
    name: String,
    p50: f64,
    p99: f64,
    max: f64,
    rows: usize,
    kib: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The list items of a page (connections, links, audit entries).
fn rows_of(html: &str) -> usize {
    html.matches("<li class=\"item\"").count()
}

/// The `href` of the anchor whose text is `text`, unescaped.
fn href_of(html: &str, text: &str) -> Option<String> {
    let end = html.find(&format!("\">{text}</a>"))?;
    let start = html[..end].rfind("href=\"")? + "href=\"".len();
    Some(html[start..end].replace("&amp;", "&").replace("&#38;", "&"))
}

async fn get(client: &reqwest::Client, base: &str, path: &str) -> (reqwest::StatusCode, String) {
    let res = client.get(format!("{base}{path}")).send().await.unwrap();
    let status = res.status();
    (status, res.text().await.unwrap())
}

/// Requests every page once per round, `warmup` rounds unmeasured and then `n` measured, so that
/// a passing burst of load from elsewhere on the machine falls on every page alike rather than
/// on whichever page was being measured.
async fn measure(
    client: &reqwest::Client,
    base: &str,
    pages: &[Page],
    warmup: usize,
    n: usize,
) -> Vec<Measured> {
    let mut times = vec![Vec::with_capacity(n); pages.len()];
    let mut rows = vec![usize::MAX; pages.len()];
    let mut bytes = vec![0usize; pages.len()];
    for round in 0..warmup + n {
        if round == warmup {
            eprintln!("warmed up; measuring {n} rounds of {} pages ...", pages.len());
        }
        for (k, page) in pages.iter().enumerate() {
            let url = format!("{base}{}", page.urls[round % page.urls.len()]);
            let started = Instant::now();
            let res = client.get(&url).send().await.unwrap();
            let status = res.status();
            let body = res.bytes().await.unwrap();
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
            if round >= warmup {
                times[k].push(elapsed);
                rows[k] = rows[k].min(rows_of(&String::from_utf8_lossy(&body)));
                bytes[k] += body.len();
            }
        }
    }
    pages
        .iter()
        .zip(times)
        .zip(rows.into_iter().zip(bytes))
        .map(|((page, mut times), (rows, bytes))| {
            assert!(rows >= page.min_rows, "{}: {rows} rows, expected at least {}", page.name, page.min_rows);
            times.sort_by(f64::total_cmp);
            Measured {
                name: page.name.clone(),
                p50: percentile(&times, 0.50),
                p99: percentile(&times, 0.99),
                max: times.last().copied().unwrap_or(0.0),
                rows,
                kib: bytes as f64 / n as f64 / 1024.0,
            }
        })
        .collect()
}

/// The plan of one statement, one line per step.
async fn plan(
    conn: &mut AnyConnection,
    backend: Backend,
    sql: &str,
    params: &[String],
    limit: Option<i64>,
) -> String {
    let explain = match backend {
        Backend::Sqlite => format!("EXPLAIN QUERY PLAN {sql}"),
        Backend::Postgres => format!("EXPLAIN {sql}"),
    };
    let mut q = sqlx::query(sqlx::AssertSqlSafe(&*explain));
    for p in params {
        q = q.bind(p.clone());
    }
    if let Some(limit) = limit {
        q = q.bind(limit);
    }
    let rows = q.fetch_all(conn).await.unwrap();
    rows.iter()
        .map(|r| match backend {
            Backend::Sqlite => r.try_get::<String, _>(3).unwrap_or_default(),
            Backend::Postgres => r.try_get::<String, _>(0).unwrap_or_default(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string()))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB RAM", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{model}, {cores} cores, {mem}")
}

/// Busy CPU time of the whole machine, in clock ticks (`/proc/stat`: all but idle and iowait).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    sqlx::any::install_default_drivers();
    let n = env_usize("BENCH_DASHBOARD_CONNECTIONS", 100_000);
    let other_n = env_usize("BENCH_DASHBOARD_OTHER_CONNECTIONS", 10_000);
    let n_links = env_usize("BENCH_DASHBOARD_LINKS", 300);
    let requests = env_usize("BENCH_DASHBOARD_REQUESTS", 300).max(1);
    let warmup = env_usize("BENCH_DASHBOARD_WARMUP", 30);
    let postgres = std::env::var("BENCH_DASHBOARD_BACKEND").is_ok_and(|b| b == "postgres");
    let machine = machine();
    let load_before = load_average();

    // --- The database and the server --------------------------------------------------------
    let dir = tempfile::tempdir().unwrap();
    let (backend, db_url, pg_schema) = if postgres {
        let pg = std::env::var("AUTHLINK_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let Ok(mut admin) = AnyConnection::connect(&pg).await else {
            eprintln!("dashboard benchmark skipped: PostgreSQL is not reachable at {pg}");
            return;
        };
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let sep = if pg.contains('?') { '&' } else { '?' };
        (Backend::Postgres, format!("{pg}{sep}options=-c%20search_path%3D{schema}"), Some((pg, schema)))
    } else {
        (Backend::Sqlite, format!("sqlite://{}/authlink.db", dir.path().display()), None)
    };
    let mut env = Env {
        vars: vec![
            ("AUTHLINK_DATABASE_URL".into(), db_url.clone()),
            ("AUTHLINK_DATA_DIR".into(), dir.path().display().to_string()),
            ("AUTHLINK_MASTER_KEY".into(), random_master_key()),
            ("AUTHLINK_LOG_FORMAT".into(), "json".into()),
            ("AUTHLINK_LOG".into(), "warn,authlink=info".into()),
            // The data is made through the API with one key, as fast as it answers.
            ("AUTHLINK_HTTP__API_REQUESTS_PER_MINUTE".into(), "1000000000".into()),
        ],
        dir,
    };
    let (mut serve, base, logs) = start_serve(&env);
    env.vars.push(("AUTHLINK_PUBLIC_URL".into(), base.clone()));

    let password = format!("bench-{}", uuid::Uuid::new_v4().simple());
    env.cli(&["user", "create", "--email", EMAIL, "--admin"], Some(&password));
    let main_ws =
        env.cli(&["workspace", "create", "--name", "Bench Agency", "--slug", MAIN_SLUG], None)["id"]
            .as_str()
            .unwrap()
            .to_string();
    let other_ws =
        env.cli(&["workspace", "create", "--name", "Other Agency", "--slug", OTHER_SLUG], None)["id"]
            .as_str()
            .unwrap()
            .to_string();
    let key = env.cli(&["apikey", "create", "--workspace", MAIN_SLUG, "--name", "bench"], None)["secret"]
        .as_str()
        .unwrap()
        .to_string();

    // --- Links through the API, a tenth of them revoked --------------------------------------
    eprintln!("creating {n_links} links ...");
    let http = reqwest::Client::new();
    let mut rng = StdRng::seed_from_u64(20_251_125);
    let mut links = Vec::with_capacity(n_links);
    for i in 0..n_links {
        let label = format!("{} {}", title(pick(&mut rng, ADJECTIVES)), title(pick(&mut rng, THINGS)));
        let res = http
            .post(format!("{base}/api/v1/links"))
            .bearer_auth(&key)
            .json(&json!({"label": label, "client_ref": format!("C-{i:04}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
        let link: Value = res.json().await.unwrap();
        let id = link["id"].as_str().unwrap().to_string();
        if i % 10 == 9 {
            let res =
                http.post(format!("{base}/api/v1/links/{id}/revoke")).bearer_auth(&key).send().await.unwrap();
            assert!(res.status().is_success(), "revoke: {}", res.status());
        }
        links.push(id);
    }

    // --- Connections, history and audit entries with SQL ------------------------------------
    eprintln!("inserting {n} connections (and {other_n} in a second workspace) with their history ...");
    let started = Instant::now();
    let mut conn = AnyConnection::connect(&db_url).await.unwrap();
    if backend == Backend::Sqlite {
        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut conn).await.unwrap();
    }
    let (admin_id,): (String,) = sqlx::query_as("SELECT id FROM users WHERE email_normalized = $1")
        .bind(EMAIL)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let mut taken = HashSet::new();
    let data =
        insert_connections(&mut conn, &mut rng, &mut taken, &main_ws, &links, &admin_id, n, now_ms, true)
            .await;
    let other =
        insert_connections(&mut conn, &mut rng, &mut taken, &other_ws, &[], &admin_id, other_n, now_ms, true)
            .await;
    // The overview's counters (kept by triggers) agree with the rows.
    type Count = (String, String, String, i64);
    let counted: Vec<Count> = sqlx::query_as(
        "SELECT workspace_id, provider, status, COUNT(*) FROM connections GROUP BY workspace_id, provider, status \
         ORDER BY workspace_id, provider, status",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let kept: Vec<Count> = sqlx::query_as(
        "SELECT workspace_id, provider, status, n FROM connection_counts WHERE n <> 0 \
         ORDER BY workspace_id, provider, status",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(counted, kept, "connection_counts disagrees with the connections");
    if backend == Backend::Postgres {
        // What autovacuum would have done by the time a workspace has this many connections.
        sqlx::raw_sql("VACUUM ANALYZE").execute(&mut conn).await.unwrap();
    }
    eprintln!(
        "inserted {} + {} connections, {} events, {} audit entries in {:.1} s",
        data.connections,
        other.connections,
        data.events + other.events,
        data.audit + other.audit,
        started.elapsed().as_secs_f64()
    );

    // --- Sign in like a browser -------------------------------------------------------------
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (_, login) = get(&client, &base, "/app/login").await;
    let csrf = {
        let start = login.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
        login[start..start + login[start..].find('"').unwrap()].to_string()
    };
    let res = client
        .post(format!("{base}/app/login"))
        .form(&[("csrf", csrf.as_str()), ("email", EMAIL), ("password", password.as_str()), ("next", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "sign-in failed: {}", res.text().await.unwrap_or_default());

    // --- The pages --------------------------------------------------------------------------
    let w = format!("/app/w/{MAIN_SLUG}");
    let (_, first) = get(&client, &base, &format!("{w}/connections")).await;
    let second = href_of(&first, "Older connections").expect("the first page links to the next");
    let deep = format!("{w}/connections?before={}", data.ids[n / 10]);
    let sample = |rng: &mut StdRng, count: usize| -> Vec<usize> {
        (0..count).map(|_| rng.random_range(0..data.handles.len())).collect()
    };
    let prefixes: Vec<String> = sample(&mut rng, 50)
        .into_iter()
        .map(|i| {
            let h = &data.handles[i];
            h.chars().take(rng.random_range(3..=8).min(h.len())).collect()
        })
        .collect();
    let full: Vec<String> = sample(&mut rng, 50).into_iter().map(|i| data.handles[i].clone()).collect();
    // The second page of searches with many results, through the link the first page shows.
    let mut next_pages = Vec::new();
    for i in sample(&mut rng, 20) {
        let two: String = data.handles[i].chars().take(2).collect();
        let (_, html) = get(&client, &base, &format!("{w}/connections?q={two}")).await;
        next_pages.extend(href_of(&html, "More results"));
    }
    assert!(!next_pages.is_empty(), "no search had a second page");
    let details: Vec<String> = (0..50)
        .map(|_| format!("{w}/connections/{}", data.ids[rng.random_range(0..data.ids.len())]))
        .collect();
    let link_pages: Vec<String> =
        (0..50).map(|_| format!("{w}/links/{}", links[rng.random_range(0..links.len())])).collect();
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let page =
        |name: &str, urls: Vec<String>, min_rows: usize| Page { name: name.to_string(), urls, min_rows };
    let pages = vec![
        page("Overview", vec![w.clone()], 1),
        page("Connections, newest first", vec![format!("{w}/connections")], 25),
        page("Connections, status = broken", vec![format!("{w}/connections?status=broken")], 25),
        page("Connections, status = disconnected", vec![format!("{w}/connections?status=disconnected")], 25),
        page("Connections, platform = Instagram", vec![format!("{w}/connections?platform=instagram")], 25),
        page(
            "Connections, broken on Instagram",
            vec![format!("{w}/connections?status=broken&platform=instagram")],
            25,
        ),
        page(
            "Handle search, first 3–8 characters",
            prefixes.iter().map(|p| format!("{w}/connections?q={}", enc(p))).collect(),
            1,
        ),
        page(
            "Handle search, whole handle",
            full.iter().map(|h| format!("{w}/connections?q={}", enc(h))).collect(),
            1,
        ),
        page(
            "Handle search, one letter",
            ('a'..='z').filter(|c| !"qxjk".contains(*c)).map(|c| format!("{w}/connections?q={c}")).collect(),
            0,
        ),
        page("Handle search, no match", vec![format!("{w}/connections?q=zzqx")], 0),
        page(
            "Handle search + status = broken",
            prefixes.iter().map(|p| format!("{w}/connections?q={}&status=broken", enc(&p[..3]))).collect(),
            0,
        ),
        page("Handle search, next page (cursor)", next_pages, 1),
        page("Second page (keyset cursor)", vec![second], 25),
        page("Page at the 90,000th newest (cursor)", vec![deep], 25),
        page("Connection detail", details.clone(), 0),
        page("Links", vec![format!("{w}/links")], 25),
        page("Link detail, with its connections", link_pages, 0),
        page("Audit log", vec![format!("{w}/audit")], 25),
        page(
            "Audit log, action = connection.disconnected",
            vec![format!("{w}/audit?action=connection.disconnected")],
            0,
        ),
        page(
            "Audit log, action = connection.reconnected (rare)",
            vec![format!("{w}/audit?action=connection.reconnected")],
            25,
        ),
        page(
            "Audit log, one connection's entries",
            details
                .iter()
                .map(|d| format!("{w}/audit?target={}", d.rsplit('/').next().unwrap_or_default()))
                .collect(),
            1,
        ),
        page(
            "Audit log, one connection's connection.created entry",
            details
                .iter()
                .map(|d| {
                    let id = d.rsplit('/').next().unwrap_or_default();
                    format!("{w}/audit?action=connection.created&target={id}")
                })
                .collect(),
            1,
        ),
        page(
            "Admins' search across workspaces (handle)",
            prefixes.iter().map(|p| format!("/app/search?q={}", enc(p))).collect(),
            1,
        ),
    ];
    let server_pid = serve.id().to_string();
    let cpu_before =
        (machine_busy_ticks(), process_ticks(&server_pid), process_ticks("self"), Instant::now());
    let results = measure(&client, &base, &pages, warmup, requests).await;
    let load_after = load_average();
    // Cores used while measuring (warm-up included), at 100 ticks a second (USER_HZ on Linux).
    let cores = |ticks: u64| ticks as f64 / 100.0 / cpu_before.3.elapsed().as_secs_f64();
    let busy = machine_busy_ticks().saturating_sub(cpu_before.0);
    let server_cpu = process_ticks(&server_pid).saturating_sub(cpu_before.1);
    let bench_cpu = process_ticks("self").saturating_sub(cpu_before.2);
    let others_cpu = busy.saturating_sub(server_cpu + bench_cpu);

    // --- Plans of the queries ----------------------------------------------------------------
    let searches: Vec<(&str, ConnectionSearch<'_>)> = vec![
        ("newest first", ConnectionSearch { workspace_id: Some(&main_ws), ..Default::default() }),
        (
            "status = broken",
            ConnectionSearch { workspace_id: Some(&main_ws), status: Some("broken"), ..Default::default() },
        ),
        (
            "handle search",
            ConnectionSearch {
                workspace_id: Some(&main_ws),
                search: Some(&prefixes[0]),
                ..Default::default()
            },
        ),
        (
            "handle search + status = broken",
            ConnectionSearch {
                workspace_id: Some(&main_ws),
                status: Some("broken"),
                search: Some(&prefixes[0]),
                ..Default::default()
            },
        ),
        (
            "handle search, next page",
            ConnectionSearch {
                workspace_id: Some(&main_ws),
                search: Some(&prefixes[0]),
                cursor: Some(&data.ids[0]),
                ..Default::default()
            },
        ),
        ("admins' handle search", ConnectionSearch { search: Some(&prefixes[0]), ..Default::default() }),
    ];
    let mut plans = String::new();
    for (name, f) in &searches {
        let cursor_handle = f.cursor.map(|_| prefixes[0].to_ascii_lowercase());
        let (sql, params) = connections_sql(backend, f, cursor_handle.as_deref());
        let _ = writeln!(plans, "{name}:\n{}\n", plan(&mut conn, backend, &sql, &params, Some(26)).await);
    }
    let counts = plan(&mut conn, backend, CONNECTION_COUNTS_SQL, std::slice::from_ref(&main_ws), None).await;
    let _ = writeln!(plans, "overview counts:\n{counts}\n");
    let target = data.ids[0].clone();
    let audits: Vec<(&str, AuditFilter<'_>)> = vec![
        ("audit log", AuditFilter { workspace_id: Some(&main_ws), ..Default::default() }),
        (
            "audit log, action",
            AuditFilter {
                workspace_id: Some(&main_ws),
                action: Some("connection.reconnected"),
                ..Default::default()
            },
        ),
        (
            "audit log, object",
            AuditFilter { workspace_id: Some(&main_ws), target_id: Some(&target), ..Default::default() },
        ),
        (
            "audit log, object and action",
            AuditFilter {
                workspace_id: Some(&main_ws),
                target_id: Some(&target),
                action: Some("connection.created"),
                before: None,
            },
        ),
    ];
    for (name, f) in &audits {
        let (sql, params) = audit_list_sql(f);
        let _ = writeln!(plans, "{name}:\n{}\n", plan(&mut conn, backend, &sql, &params, Some(26)).await);
    }
    let version: (String,) = match backend {
        Backend::Sqlite => sqlx::query_as("SELECT 'SQLite ' || sqlite_version()"),
        Backend::Postgres => sqlx::query_as("SELECT version()"),
    }
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    if let Some((pg, schema)) = pg_schema {
        let mut admin = AnyConnection::connect(&pg).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let slow: Vec<String> =
        logs.lock().unwrap().iter().filter(|l| l.contains("slow statement")).take(5).cloned().collect();

    // --- Report -----------------------------------------------------------------------------
    let mut report = String::new();
    let _ = writeln!(
        report,
        "Dashboard pages, {} connections in the workspace (+ {} in another), {} connection events, {} audit \
         entries, {n_links} links; {} on {}.\n",
        data.connections,
        other.connections,
        data.events + other.events,
        data.audit + other.audit + n_links,
        version.0,
        if backend == Backend::Sqlite {
            "a file in a temporary folder (no ANALYZE: authlink never runs it)"
        } else {
            "loopback, after VACUUM ANALYZE"
        },
    );
    let _ = writeln!(
        report,
        "Machine: {machine}. The load generator (this benchmark, one request at a time over loopback \
         HTTP/1.1 with keep-alive) shares the machine with the server{}. While measuring, the server used \
         {:.2} cores, the load generator {:.2}, other processes {:.2}{}; load average {load_before} before the \
         run, {load_after} after it. Requests go round the pages, {warmup} rounds of warm-up and then \
         {requests} measured rounds; a request's time runs from sending it to the last byte of the body.\n",
        if backend == Backend::Postgres { " and PostgreSQL" } else { "" },
        cores(server_cpu),
        cores(bench_cpu),
        cores(others_cpu),
        if backend == Backend::Postgres { " (PostgreSQL among them)" } else { "" },
    );
    let _ = writeln!(report, "| page | p50 ms | p99 ms | max ms | rows | KiB | p99 < {TARGET_P99_MS} ms |");
    let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|---|");
    for r in &results {
        let _ = writeln!(
            report,
            "| {} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {} |",
            r.name,
            r.p50,
            r.p99,
            r.max,
            r.rows,
            r.kib,
            if r.p99 < TARGET_P99_MS { "PASS" } else { "FAIL" }
        );
    }
    let _ = writeln!(report, "\n`rows`: the fewest list items a response of the page showed.\n");
    let _ = writeln!(report, "Plans of the queries ({}):\n\n```\n{}\n```", version.0, plans.trim_end());
    if !slow.is_empty() {
        let _ = writeln!(report, "\nSlow statements logged by the server:\n\n```\n{}\n```", slow.join("\n"));
    }
    println!("{report}");
    let _ = std::fs::create_dir_all("target");
    let path = if backend == Backend::Postgres {
        "target/bench-dashboard-report-postgres.md"
    } else {
        "target/bench-dashboard-report.md"
    };
    std::fs::write(path, &report).unwrap();
    eprintln!("report written to {path}");
}
