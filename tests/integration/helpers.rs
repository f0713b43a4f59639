//! Spawning the real binary against a fresh database, and typed helpers to drive it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;

/// Which database a test runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    /// A fresh SQLite file in a temporary folder.
    Sqlite,
    /// A fresh schema on this PostgreSQL server.
    Postgres(String),
}

/// Whether PostgreSQL tests can run.
#[derive(Clone, Debug)]
pub enum PgAvailability {
    /// The server answers at this URL.
    Available(String),
    /// `AUTHLINK_TEST_POSTGRES_URL` was set but the server does not answer: a failure.
    Required(String),
    /// No server: the PostgreSQL half is skipped (loudly).
    Absent(String),
}

/// Probes the PostgreSQL server once for the whole run.
pub fn postgres_availability() -> PgAvailability {
    let explicit = std::env::var("AUTHLINK_TEST_POSTGRES_URL").ok().filter(|s| !s.is_empty());
    let url = explicit.clone().unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return PgAvailability::Absent(e.to_string()),
    };
    let probe = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?
            .close()
            .await
            .map_err(|e| e.to_string())
    });
    match (probe, explicit) {
        (Ok(()), _) => PgAvailability::Available(url),
        (Err(e), Some(_)) => PgAvailability::Required(e),
        (Err(e), None) => PgAvailability::Absent(format!("{url}: {e}")),
    }
}

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_authlink")
}

/// A server process, killed when the last handle on it goes: a test that fails before its
/// clean-up (a panic unwinds through its app and clean-up handles) leaves no server running.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A running `authlink serve` with its own database.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client with a cookie jar, not following redirects (tests look at each hop).
    pub client: reqwest::Client,
    /// The environment the binary runs with (for CLI calls).
    pub env: Vec<(String, String)>,
    /// The backend.
    pub backend: Backend,
    /// The database URL.
    pub db_url: String,
    /// The PostgreSQL schema, if any.
    pub schema: Option<String>,
    /// The temporary data folder (SQLite file, key file).
    pub dir: Arc<tempfile::TempDir>,
    /// Everything the server logged.
    pub logs: Arc<Mutex<String>>,
    child: Arc<Mutex<Option<Server>>>,
}

/// Runs the clean-up of a test app after the test finished (kill the server, drop the schema).
pub struct Cleanup {
    child: Arc<Mutex<Option<Server>>>,
    /// The server's process id (0 if it was already stopped).
    pid: u32,
    backend: Backend,
    schema: Option<String>,
}

impl Cleanup {
    /// Kills the server and drops the PostgreSQL schema.
    pub async fn run(self) {
        let server = match self.child.try_lock() {
            Ok(mut guard) => guard.take(),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().take(),
            // A test stopped at its time limit may still hold the lock while it waits for the
            // server to exit: the server is killed by its id, which ends that wait (the waiter
            // then reaps it).
            Err(std::sync::TryLockError::WouldBlock) => {
                if self.pid != 0 {
                    let _ = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
                }
                None
            }
        };
        if let Some(mut c) = server {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let (Backend::Postgres(url), Some(schema)) = (&self.backend, &self.schema)
            && let Ok(mut conn) = sqlx::PgConnection::connect(url).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
                .execute(&mut conn)
                .await;
        }
    }
}

/// A master key for tests (fresh per app).
pub fn new_master_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = std::array::from_fn(|_| rand::random::<u8>());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A new, empty schema on the PostgreSQL server at `url`, named `{prefix}_<random>`: the URL of
/// a database whose search path is that schema, and the schema's name.
pub async fn new_schema(url: &str, prefix: &str) -> (String, String) {
    let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    // (Named after its schema too, so that a test can find its server's connections.)
    (format!("{url}{sep}options=-c%20search_path%3D{schema}&application_name={schema}"), schema)
}

impl TestApp {
    /// Starts the server on a new database.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, &[]).await
    }

    /// Starts the server on a new database with extra environment variables.
    pub async fn spawn_with(backend: Backend, extra: &[(&str, &str)]) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let (db_url, schema) = match &backend {
            Backend::Sqlite => (format!("sqlite://{}/authlink.db", dir.path().display()), None),
            Backend::Postgres(url) => {
                let (db_url, schema) = new_schema(url, "t").await;
                (db_url, Some(schema))
            }
        };
        let mut env: Vec<(String, String)> = vec![
            ("AUTHLINK_DATABASE_URL".into(), db_url.clone()),
            ("AUTHLINK_DATA_DIR".into(), dir.path().display().to_string()),
            ("AUTHLINK_MASTER_KEY".into(), new_master_key()),
            ("AUTHLINK_LOG_FORMAT".into(), "json".into()),
            ("AUTHLINK_LOG".into(), "debug,authlink=trace,hyper=info,h2=info,rustls=info,sqlx=info".into()),
            ("AUTHLINK_SANDBOX__CONTROL_API".into(), "true".into()),
            ("AUTHLINK_PROVIDERS__TIMEOUT_SECS".into(), "2".into()),
            ("AUTHLINK_HTTP__SHUTDOWN_GRACE_SECS".into(), "10".into()),
            ("AUTHLINK_JOBS__TICK_MS".into(), "100".into()),
            ("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS".into(), "true".into()),
        ];
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let mut serve_env = env.clone();
        if !serve_env.iter().any(|(k, _)| k == "AUTHLINK_LISTEN") {
            serve_env.push(("AUTHLINK_LISTEN".into(), "127.0.0.1:0".into()));
        }
        let mut cmd = Command::new(binary());
        cmd.arg("serve").stdout(Stdio::null()).stderr(Stdio::piped()).current_dir(dir.path());
        clear_authlink_env(&mut cmd);
        cmd.envs(serve_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = cmd.spawn().expect("start authlink serve");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push_str(&line);
                    logs.lock().unwrap().push('\n');
                    // The ready line, as JSON or (`AUTHLINK_LOG_FORMAT=human`) as text.
                    let ready = match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v["message"] == "authlink listening" => {
                            Some(v["public_url"].as_str().unwrap_or_default().to_string())
                        }
                        Err(_) if line.contains("authlink listening") => line
                            .split_whitespace()
                            .find_map(|f| f.strip_prefix("public_url="))
                            .map(|u| u.trim_matches('"').to_string()),
                        _ => None,
                    };
                    if let Some(url) = ready
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(Ok(url));
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err(logs.lock().unwrap().clone()));
                }
            });
        }
        let base = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(Ok(url))) => url.trim_end_matches('/').to_string(),
            Ok(Ok(Err(logs))) => panic!("authlink serve exited before listening:\n{logs}"),
            _ => {
                // Not left running behind the failed test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("authlink serve did not start listening in time:\n{}", logs.lock().unwrap())
            }
        };
        env.push(("AUTHLINK_PUBLIC_URL".into(), base.clone()));
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        TestApp {
            base,
            client,
            env,
            backend,
            db_url,
            schema,
            dir,
            logs,
            child: Arc::new(Mutex::new(Some(Server(child)))),
        }
    }

    /// The clean-up to run after the test.
    pub fn cleanup_handle(&self) -> Cleanup {
        Cleanup {
            child: self.child.clone(),
            pid: self.pid(),
            backend: self.backend.clone(),
            schema: self.schema.clone(),
        }
    }

    /// Stops the server now.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server as an orchestrator does (SIGTERM), and waits for it to exit (within its
    /// shutdown grace period); its exit code.
    pub fn stop(&self) -> Option<i32> {
        let mut guard = self.child.lock().unwrap();
        let child = guard.as_mut()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let code = tokio::task::block_in_place(|| child.wait()).ok().and_then(|s| s.code());
        guard.take();
        code
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits for the server process to exit and returns its status code.
    pub fn wait_exit(&self) -> Option<i32> {
        let mut guard = self.child.lock().unwrap();
        let status = guard.as_mut()?.wait().ok()?;
        guard.take();
        status.code()
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Runs the CLI with this app's environment (plus `extra`).
    pub fn cli_env<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).current_dir(self.dir.path()).stdin(Stdio::null());
        clear_authlink_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.env("AUTHLINK_LOG_FORMAT", "human");
        cmd.env("AUTHLINK_LOG", "warn");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        // The CLI blocks this thread: let the runtime move its other tasks (test receivers)
        // to another worker meanwhile.
        tokio::task::block_in_place(|| cmd.output()).expect("run authlink")
    }

    /// Runs the CLI.
    pub fn cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        self.cli_env(args, &[])
    }

    /// Runs the CLI with `--json`, expects success, and parses the output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        self.cli_json_env(args, &[])
    }

    /// [`cli_json`](Self::cli_json) with `extra` in the environment.
    pub fn cli_json_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli_env(&all, extra);
        assert!(
            out.status.success(),
            "authlink {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("authlink {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// A platform-admin API key (made with the CLI).
    pub fn admin_key(&self) -> String {
        self.cli_json(&["apikey", "create", "--admin", "--name", "test admin"])["secret"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Creates a workspace through the CLI; returns its id.
    pub fn workspace(&self, name: &str) -> String {
        self.cli_json(&["workspace", "create", "--name", name])["id"].as_str().unwrap().to_string()
    }

    /// A workspace key for `workspace` (made with the CLI).
    pub fn workspace_key(&self, workspace: &str) -> String {
        self.cli_json(&["apikey", "create", "--workspace", workspace])["secret"].as_str().unwrap().to_string()
    }

    /// Creates a link through the CLI; returns (id, url).
    pub fn link(&self, workspace: &str, label: &str) -> (String, String) {
        let v = self.cli_json(&["link", "create", "--workspace", workspace, "--label", label]);
        (v["id"].as_str().unwrap().to_string(), v["url"].as_str().unwrap().to_string())
    }

    /// An authenticated API request.
    pub fn api(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(&format!("/api/v1{path}"))).bearer_auth(key)
    }

    /// GET an API path, expecting `status`; returns the JSON body.
    pub async fn api_get(&self, path: &str, key: &str, status: u16) -> Value {
        let res = self.api(reqwest::Method::GET, path, key).send().await.unwrap();
        expect_json(res, status).await
    }

    /// POST JSON to an API path, expecting `status`; returns the JSON body.
    pub async fn api_post(&self, path: &str, key: &str, body: Value, status: u16) -> Value {
        let res = self.api(reqwest::Method::POST, path, key).json(&body).send().await.unwrap();
        expect_json(res, status).await
    }

    /// PATCH JSON.
    pub async fn api_patch(&self, path: &str, key: &str, body: Value, status: u16) -> Value {
        let res = self.api(reqwest::Method::PATCH, path, key).json(&body).send().await.unwrap();
        expect_json(res, status).await
    }

    /// POST to the sandbox control API.
    pub async fn sandbox(&self, path: &str, body: Value) -> Value {
        let res =
            self.client.post(self.url(&format!("/sandbox/control{path}"))).json(&body).send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        assert!(status.is_success(), "sandbox control {path} answered {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// The sandbox's counters for a provider.
    pub async fn sandbox_stats(&self, provider: &str) -> Value {
        let res =
            self.client.get(self.url(&format!("/sandbox/control/{provider}/stats"))).send().await.unwrap();
        assert!(res.status().is_success());
        res.json().await.unwrap()
    }

    /// Moves the shared clock forward.
    pub async fn advance_clock(&self, seconds: i64) {
        self.sandbox("/clock/advance", json!({ "seconds": seconds })).await;
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until every line the server logged before this call has been read from its pipe: a
    /// request to a unique missing page is logged (404s are logged at info) after them.
    pub async fn logs_caught_up(&self) {
        let marker = format!("/log-marker-{}", uuid::Uuid::new_v4());
        let res = self.client.get(self.url(&marker)).send().await.expect("the server answers");
        assert_eq!(res.status(), 404);
        self.wait_for_log(&marker, 10).await;
    }

    /// Waits until the log holds more than `seen` lines holding `needle`; returns the last.
    pub async fn wait_for_another_log_line(&self, needle: &str, seen: usize, secs: u64) -> String {
        let what = format!("log line {} holding {needle:?}", seen + 1);
        let line = crate::health::eventually(&what, secs, || async {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            (lines.len() > seen).then(|| Value::String(lines[lines.len() - 1].to_string()))
        })
        .await;
        line.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the server has logged a line holding `needle` (up to `secs`). A line the
    /// server wrote before answering may still be in the pipe when the answer arrives: the logs
    /// are read from it by a thread of their own.
    pub async fn wait_for_log(&self, needle: &str, secs: u64) {
        let what = format!("a log line holding {needle:?}");
        crate::health::eventually(&what, secs, || async {
            self.log_text().contains(needle).then_some(Value::Null)
        })
        .await;
    }

    /// Every byte the database holds, as text: the SQLite file and its WAL, or every row of
    /// every table of the schema.
    pub async fn database_dump(&self) -> String {
        match &self.backend {
            Backend::Sqlite => {
                let mut out = String::new();
                for name in ["authlink.db", "authlink.db-wal"] {
                    if let Ok(bytes) = std::fs::read(self.dir.path().join(name)) {
                        out.push_str(&String::from_utf8_lossy(&bytes));
                    }
                }
                out
            }
            Backend::Postgres(_) => self.logical_dump(&[]).await,
        }
    }

    /// Every row of every table except `except`, as text (SQLite: each value `quote()`d; PostgreSQL:
    /// each row cast to text): what the database holds logically, without the free pages of the
    /// file.
    pub async fn logical_dump(&self, except: &[&str]) -> String {
        let tables: Vec<String> = match &self.backend {
            Backend::Sqlite => {
                self.column(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                )
                .await
            }
            Backend::Postgres(_) => {
                let schema = self.schema.as_deref().unwrap();
                let sql = format!(
                    "SELECT table_name::text FROM information_schema.tables WHERE table_schema = '{schema}'"
                );
                self.column(&sql).await
            }
        };
        let mut out = String::new();
        for t in tables.iter().filter(|t| !except.contains(&t.as_str())) {
            let select = match &self.backend {
                Backend::Sqlite => {
                    let cols: Vec<String> =
                        self.column(&format!("SELECT name FROM pragma_table_info('{t}')")).await;
                    let row = cols
                        .iter()
                        .map(|c| format!("quote(\"{c}\")"))
                        .collect::<Vec<_>>()
                        .join(" || '|' || ");
                    format!("SELECT {row} FROM \"{t}\"")
                }
                Backend::Postgres(_) => format!("SELECT t::text FROM {{schema}}.{t} t"),
            };
            for row in self.column::<String>(&select).await {
                out.push_str(&row);
                out.push('\n');
            }
        }
        out
    }

    /// A direct connection to the SQLite file.
    async fn sqlite(&self) -> sqlx::SqliteConnection {
        sqlx::SqliteConnection::connect(&format!("sqlite://{}/authlink.db", self.dir.path().display()))
            .await
            .unwrap()
    }

    /// Runs one statement through a direct connection (`{schema}.` is replaced by the PostgreSQL
    /// schema, or removed on SQLite); returns the rows it changed.
    pub async fn execute(&self, sql: &str) -> u64 {
        match &self.backend {
            Backend::Sqlite => {
                let mut conn = self.sqlite().await;
                sqlx::query(sqlx::AssertSqlSafe(&*sql.replace("{schema}.", "")))
                    .execute(&mut conn)
                    .await
                    .unwrap()
                    .rows_affected()
            }
            Backend::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                let sql = sql.replace("{schema}", self.schema.as_deref().unwrap());
                sqlx::query(sqlx::AssertSqlSafe(&*sql)).execute(&mut conn).await.unwrap().rows_affected()
            }
        }
    }

    /// One text value through a direct connection (`{schema}.` as for [`execute`](Self::execute)).
    pub async fn text(&self, sql: &str) -> String {
        self.one(sql).await
    }

    /// The one value `sql` selects, through a direct connection.
    async fn one<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
        T: Send + Unpin,
    {
        self.column(sql).await.into_iter().next().expect("one row")
    }

    /// The first column of every row `sql` selects, through a direct connection (`{schema}.` as
    /// for [`execute`](Self::execute)).
    async fn column<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
        T: Send + Unpin,
    {
        match &self.backend {
            Backend::Sqlite => {
                let mut conn = self.sqlite().await;
                sqlx::query_scalar(sqlx::AssertSqlSafe(&*sql.replace("{schema}.", "")))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
            }
            Backend::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                let sql = sql.replace("{schema}", self.schema.as_deref().unwrap());
                sqlx::query_scalar(sqlx::AssertSqlSafe(&*sql)).fetch_all(&mut conn).await.unwrap()
            }
        }
    }

    /// Stops this server and starts another on the same address, database and data folder, with
    /// the same environment plus `extra`. Returns the new app and the clean-up of what only it
    /// holds.
    pub async fn restart_with(self, extra: &[(&str, &str)]) -> (TestApp, Cleanup) {
        // Stopped cleanly, as a rolling restart would: it removes its process record.
        self.stop();
        let listen = self.base.trim_start_matches("http://").to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("AUTHLINK_DATABASE_URL", self.db_url.as_str()),
            ("AUTHLINK_LISTEN", listen.as_str()),
            ("AUTHLINK_PUBLIC_URL", self.base.as_str()),
        ];
        for (k, v) in &self.env {
            if k.starts_with("AUTHLINK_") && k != "AUTHLINK_PUBLIC_URL" && !extra.iter().any(|(e, _)| e == k)
            {
                env.push((k.as_str(), v.as_str()));
            }
        }
        env.extend_from_slice(extra);
        let mut fresh = TestApp::spawn_with(self.backend.clone(), &env).await;
        // The fresh app made an unused schema and folder: point it at the original ones.
        let unused = fresh.cleanup_handle();
        fresh.schema = self.schema.clone();
        fresh.dir = self.dir.clone();
        fresh.db_url = self.db_url.clone();
        (fresh, unused)
    }

    /// Counts rows of a table (through a direct connection).
    pub async fn count(&self, table: &str) -> i64 {
        self.one(&format!("SELECT COUNT(*) FROM {{schema}}.{table}")).await
    }
}

/// Removes every `AUTHLINK_*` variable the test process has, so that a developer's shell does
/// not change what the binary sees.
pub fn clear_authlink_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTHLINK_") {
            cmd.env_remove(k);
        }
    }
}

/// Asserts the status and parses the JSON body.
pub async fn expect_json(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "unexpected status; body: {text}");
    if got >= 400 {
        assert!(ct.starts_with("application/problem+json"), "errors are problem documents, got {ct}: {text}");
    }
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The token part of a link URL.
pub fn token_of(url: &str) -> String {
    url.rsplit("/l/").next().unwrap().to_string()
}

/// Asserts that neither the logs nor the database contain `secret`.
pub async fn assert_nowhere(app: &TestApp, what: &str, secret: &str) {
    assert!(!secret.is_empty());
    app.logs_caught_up().await;
    assert!(!app.log_text().contains(secret), "the logs contain the {what}");
    assert!(!app.database_dump().await.contains(secret), "the database contains the {what} in plain text");
}

/// PostgreSQL: waits (at most five seconds, polling) until a statement of `app`'s own processes
/// whose text matches the `LIKE` pattern `query_like` waits on a lock another transaction holds.
/// Whether it did. Their connections are told apart from other tests' by their application name,
/// which is the test's schema (see [`new_schema`]).
pub async fn statement_waits_on_lock(app: &TestApp, query_like: &str) -> bool {
    use sqlx::Connection;
    let Backend::Postgres(server) = &app.backend else { panic!("PostgreSQL only") };
    let application_name = app.schema.as_deref().expect("a PostgreSQL app has a schema");
    let mut watcher = sqlx::PgConnection::connect(server).await.unwrap();
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock' AND query LIKE $2",
        )
        .bind(application_name)
        .bind(query_like)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
