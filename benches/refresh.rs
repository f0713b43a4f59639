//! Refresh-scheduler benchmark (PostgreSQL): `cargo bench --bench refresh`.
//!
//! 1. Throughput: N connections (default 100,000) all due, refreshed against the sandbox by two
//!    `authlink worker` processes; refreshes per second together, worker memory over time, and
//!    the proof of zero double refreshes (sandbox counters and one attempt row per connection).
//! 2. Key rotation: every sealed token of those connections re-sealed under a new master key by
//!    `authlink keys rewrap` (the old key decrypt-only); its time, and a check that no value is
//!    left under the old key. The new key is used from then on.
//! 3. Idle cost: M connections (default 1,000,000) with none due; CPU time one worker spends in
//!    30 s, and the plan of the due query.
//!
//! Needs PostgreSQL at `AUTHLINK_BENCH_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Everything runs on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

mod common;
use common::{Env, env_usize, process_ticks, random_master_key};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn start_serve(env: &Env) -> (Child, String) {
    let mut child = env
        .command(&["serve"])
        .env("AUTHLINK_LISTEN", "127.0.0.1:0")
        .env("AUTHLINK_JOBS__ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "authlink listening"
                && let Some(tx) = tx.take()
            {
                let _ =
                    tx.send(v["public_url"].as_str().unwrap_or_default().trim_end_matches('/').to_string());
            }
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(60)).expect("authlink serve started");
    (child, base)
}

#[tokio::main]
async fn main() {
    let pg = std::env::var("AUTHLINK_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let Ok(mut admin) = PgConnection::connect(&pg).await else {
        eprintln!("refresh benchmark skipped: PostgreSQL is not reachable at {pg}");
        return;
    };
    let n = env_usize("BENCH_REFRESH_CONNECTIONS", 100_000);
    let idle_n = env_usize("BENCH_IDLE_CONNECTIONS", 1_000_000);
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut admin).await.unwrap();
    let sep = if pg.contains('?') { '&' } else { '?' };
    let db_url = format!("{pg}{sep}options=-c%20search_path%3D{schema}");
    let key = random_master_key();
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        vars: vec![
            ("AUTHLINK_DATABASE_URL".into(), db_url.clone()),
            ("AUTHLINK_DATA_DIR".into(), dir.path().display().to_string()),
            ("AUTHLINK_MASTER_KEY".into(), key.clone()),
            ("AUTHLINK_LOG_FORMAT".into(), "json".into()),
            ("AUTHLINK_LOG".into(), "warn,authlink=info".into()),
            ("AUTHLINK_SANDBOX__CONTROL_API".into(), "true".into()),
            ("AUTHLINK_DATABASE__MAX_CONNECTIONS".into(), "16".into()),
        ],
        dir,
    };
    let (mut serve, base) = start_serve(&env);
    let mut env = env;
    env.vars.push(("AUTHLINK_PUBLIC_URL".into(), base.clone()));
    let out = env.command(&["workspace", "create", "--name", "Bench", "--json"]).output().unwrap();
    let workspace: Value = serde_json::from_slice(&out.stdout).unwrap();
    let workspace = workspace["id"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();

    // --- Throughput -------------------------------------------------------------------------
    eprintln!("minting {n} grants and inserting {n} due connections ...");
    let keys = authlink::crypto::KeyRing::from_base64(&key.clone().into(), &[]).unwrap();
    let mut conn = PgConnection::connect(&db_url).await.unwrap();
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let mut left = n;
    while left > 0 {
        let count = left.min(20_000);
        left -= count;
        let grants: Value = http
            .post(format!("{base}/sandbox/control/tiktok/grants"))
            .json(&json!({"count": count}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for chunk in grants["grants"].as_array().unwrap().chunks(1000) {
            let mut sql = String::from(
                "INSERT INTO connections (id, workspace_id, provider, provider_account_id, scopes, access_token_sealed, \
                 access_expires_at, refresh_token_sealed, refresh_expires_at, token_generation, status, sandbox, connected_at, \
                 reconnect_count, created_at, updated_at, refresh_failures) VALUES ",
            );
            let mut rows = Vec::new();
            let mut schedules = Vec::new();
            for g in chunk {
                let id = uuid::Uuid::now_v7().to_string();
                let access = keys.seal_str(
                    g["access_token"].as_str().unwrap(),
                    authlink::crypto::Aad::new(&workspace, "connections", &id, "access_token"),
                );
                let refresh = keys.seal_str(
                    g["refresh_token"].as_str().unwrap(),
                    authlink::crypto::Aad::new(&workspace, "connections", &id, "refresh_token"),
                );
                rows.push(format!(
                    "('{id}', '{workspace}', 'tiktok', '{}', 'user.info.basic,user.info.profile', '{access}', {}, '{refresh}', {}, 1, 'active', 1, {now_ms}, 0, {now_ms}, {now_ms}, 0)",
                    g["open_id"].as_str().unwrap(),
                    now_ms + 86_400_000,
                    now_ms + 31_536_000_000,
                ));
                schedules.push(format!("('{id}', {})", now_ms - 1000));
            }
            sql.push_str(&rows.join(","));
            sqlx::query(sqlx::AssertSqlSafe(&*sql)).execute(&mut conn).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO refresh_schedule (connection_id, next_refresh_at) VALUES {}",
                schedules.join(",")
            )))
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
    sqlx::query("ANALYZE connections").execute(&mut conn).await.unwrap();
    sqlx::query("ANALYZE refresh_schedule").execute(&mut conn).await.unwrap();

    let worker_pool = env_usize("BENCH_WORKER_DB_CONNECTIONS", 24).to_string();
    let worker_concurrency = env_usize("BENCH_WORKER_CONCURRENCY", 64).to_string();
    let worker_env = [
        ("AUTHLINK_JOBS__TICK_MS", "50"),
        ("AUTHLINK_JOBS__REFRESH_BATCH", "500"),
        ("AUTHLINK_JOBS__REFRESH_CONCURRENCY", worker_concurrency.as_str()),
        ("AUTHLINK_DATABASE__MAX_CONNECTIONS", worker_pool.as_str()),
        ("AUTHLINK_LOG", "error"),
    ];
    eprintln!(
        "workers: {worker_pool} database connections and {worker_concurrency} refreshes in flight each"
    );
    let spawn_worker = |env: &Env| {
        let mut cmd = env.command(&["worker"]);
        cmd.envs(worker_env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::null());
        cmd.spawn().unwrap()
    };
    let started = Instant::now();
    let mut w1 = spawn_worker(&env);
    let mut w2 = spawn_worker(&env);
    let mut rss_samples: Vec<(f64, u64, u64, i64)> = Vec::new();
    loop {
        let (done,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM refresh_attempts WHERE outcome = 'succeeded'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        rss_samples.push((started.elapsed().as_secs_f64(), rss_kib(w1.id()), rss_kib(w2.id()), done));
        if done as usize >= n || started.elapsed() > Duration::from_secs(900) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Stopped as an operator stops them (SIGTERM), so that they remove their process records:
    // the re-wrap below does not retire a key that a running process still seals with.
    terminate(&mut w1);
    terminate(&mut w2);
    let stats: Value =
        http.get(format!("{base}/sandbox/control/tiktok/stats")).send().await.unwrap().json().await.unwrap();
    terminate(&mut serve);
    let (attempts, distinct, owners): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT connection_id), COUNT(DISTINCT owner) FROM refresh_attempts",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let done = rss_samples.last().map(|s| s.3).unwrap_or(0);
    // Throughput from the first refresh to the last (worker start-up excluded).
    let first = rss_samples.iter().find(|s| s.3 > 0).map(|s| s.0).unwrap_or(0.0);
    let rate = done as f64 / (elapsed - first).max(0.001);
    let peak1 = rss_samples.iter().map(|s| s.1).max().unwrap_or(0);
    let peak2 = rss_samples.iter().map(|s| s.2).max().unwrap_or(0);
    let early = rss_samples.iter().find(|s| s.3 as usize >= n / 10).map(|s| s.1.max(s.2)).unwrap_or(0);

    eprintln!(
        "throughput: {done} refreshes in {:.1} s = {rate:.0}/s; sandbox {stats}; attempts {attempts}, distinct {distinct}, owners {owners}; worker peaks {peak1} / {peak2} KiB, {early} KiB at 10 %",
        elapsed - first
    );

    // --- Key rotation: every sealed token re-sealed under a new master key --------------------
    eprintln!("re-wrapping every sealed value under a new master key ...");
    let new_key = random_master_key();
    let rewrap_started = Instant::now();
    let out = env
        .command(&["keys", "rewrap", "--json"])
        .env("AUTHLINK_MASTER_KEY", &new_key)
        .env("AUTHLINK_RETIRED_MASTER_KEYS", &key)
        .env("AUTHLINK_LOG", "error")
        .output()
        .unwrap();
    let rewrap_secs = rewrap_started.elapsed().as_secs_f64();
    assert!(out.status.success(), "keys rewrap failed: {}", String::from_utf8_lossy(&out.stderr));
    let rewrap: Value = serde_json::from_slice(&out.stdout).unwrap();
    let resealed: u64 =
        rewrap["columns"].as_array().unwrap().iter().map(|c| c["resealed"].as_u64().unwrap()).sum();
    let (old_left,): (i64,) = sqlx::query_as(
        // Any envelope version (`v1:`, `v2:`, ...), then the key id.
        "SELECT COUNT(*) FROM connections WHERE access_token_sealed NOT LIKE 'v_:' || $1 || ':%' \
         OR refresh_token_sealed NOT LIKE 'v_:' || $1 || ':%'",
    )
    .bind(rewrap["active_kid"].as_str().unwrap())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    eprintln!(
        "re-wrap: {resealed} values in {rewrap_secs:.1} s; {old_left} connections with a value under another key"
    );
    // From here on the new key is the one configured (the old one is retired).
    for (k, v) in env.vars.iter_mut() {
        if k == "AUTHLINK_MASTER_KEY" {
            v.clone_from(&new_key);
        }
    }

    // --- Idle cost ----------------------------------------------------------------------------
    eprintln!("inserting {idle_n} connections with none due ...");
    sqlx::query("DELETE FROM refresh_attempts").execute(&mut conn).await.unwrap();
    sqlx::query("DELETE FROM connection_events").execute(&mut conn).await.unwrap();
    sqlx::query("DELETE FROM refresh_schedule").execute(&mut conn).await.unwrap();
    sqlx::query("DELETE FROM connections").execute(&mut conn).await.unwrap();
    let far = now_ms + 40 * 86_400_000;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO connections (id, workspace_id, provider, provider_account_id, scopes, access_token_sealed, access_expires_at, \
         token_generation, status, sandbox, connected_at, reconnect_count, created_at, updated_at, refresh_failures, next_check_at) \
         SELECT gen_random_uuid()::text, '{workspace}', 'tiktok', 'idle-' || g, 'user.info.basic', 'v1:x:y:z', {far}, 1, 'active', 1, \
         {now_ms}, 0, {now_ms}, {now_ms}, 0, {far} + g FROM generate_series(1, {idle_n}) g"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO refresh_schedule (connection_id, next_refresh_at) \
         SELECT id, {far} + CAST(substr(provider_account_id, 6) AS BIGINT) FROM connections"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE connections").execute(&mut conn).await.unwrap();
    sqlx::query("ANALYZE refresh_schedule").execute(&mut conn).await.unwrap();
    let plan: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "EXPLAIN UPDATE refresh_schedule SET lease_owner = 'bench', lease_until = {now_ms} + 60000 \
         WHERE connection_id = ANY(ARRAY(SELECT connection_id FROM refresh_schedule WHERE next_refresh_at <= {now_ms} \
         AND (lease_until IS NULL OR lease_until < {now_ms}) \
         AND EXISTS (SELECT 1 FROM connections c WHERE c.id = refresh_schedule.connection_id \
           AND ',tiktok:sandbox,instagram:sandbox,' LIKE '%,' || c.provider || CASE WHEN c.sandbox = 0 THEN '' ELSE ':sandbox' END || ',%') \
         ORDER BY next_refresh_at LIMIT 200 FOR UPDATE SKIP LOCKED)) \
         RETURNING connection_id"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut idle = env.command(&["worker"]);
    idle.stdout(Stdio::null()).stderr(Stdio::null()).env("AUTHLINK_LOG", "error");
    let mut idle = idle.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let t0 = process_ticks(&idle.id().to_string());
    let window = 30.0;
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let t1 = process_ticks(&idle.id().to_string());
    let idle_rss = rss_kib(idle.id());
    let _ = idle.kill();
    let _ = idle.wait();
    let idle_cpu = (t1 - t0) as f64 / ticks_per_sec / window * 100.0;

    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&mut admin)
        .await
        .unwrap();

    let pass = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let mut report = String::new();
    report.push_str("| scenario | figure | target | result |\n|---|---|---|---|\n");
    report.push_str(&format!(
        "| {n} due connections, 2 workers | {rate:.0} refreshes/s ({done} in {:.1} s) | ≥ 2000/s | {} |\n",
        elapsed - first,
        pass(rate >= 2000.0)
    ));
    report.push_str(&format!(
        "| double refreshes | sandbox refresh calls {}, reuse {}, invalid_grant {}; attempts {attempts} for {distinct} connections by {owners} workers | 0 | {} |\n",
        stats["refresh_calls"], stats["refresh_token_reuse"], stats["invalid_grant"],
        pass(stats["refresh_token_reuse"] == 0 && stats["invalid_grant"] == 0 && attempts == distinct && distinct as usize == n)
    ));
    report.push_str(&format!(
        "| worker memory | peak {:.1} / {:.1} MiB; {:.1} MiB at 10 % done | flat (bounded batches) | {} |\n",
        peak1 as f64 / 1024.0,
        peak2 as f64 / 1024.0,
        early as f64 / 1024.0,
        pass(peak1.max(peak2) as f64 <= early as f64 * 1.5 + 4096.0)
    ));
    report.push_str(&format!(
        "| key rotation: `authlink keys rewrap` | {resealed} sealed values re-sealed in {rewrap_secs:.1} s ({:.0}/s, process start included); {old_left} left under the old key | — | {} |\n",
        resealed as f64 / rewrap_secs.max(0.001),
        pass(old_left == 0 && rewrap["retired"].as_array().is_some_and(|r| r.len() == 1))
    ));
    report.push_str(&format!(
        "| {idle_n} connections, none due | one worker: {idle_cpu:.2} % of one core over {window:.0} s, RSS {:.1} MiB | < 1 % | {} |\n",
        idle_rss as f64 / 1024.0,
        pass(idle_cpu < 1.0)
    ));
    report.push_str("\nThe scheduler's claim statement, as `claim_due_refreshes` sends it (PostgreSQL, EXPLAIN):\n\n```\n");
    for (line,) in &plan {
        report.push_str(line);
        report.push('\n');
    }
    report.push_str("```\n");
    println!("{report}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/bench-refresh-report.md", &report);
}

/// Stops a process with SIGTERM and waits for it (it finishes its work and removes its record).
fn terminate(child: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}
