//! Building the application: key ring, database, state, listener; and running it until a
//! shutdown signal, letting in-flight requests finish.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::crypto::{CryptoError, KeyRing};
use crate::db::{self, Db, DbError};
use crate::providers::{self, Providers};
use crate::sandbox::Sandbox;
use crate::state::{App, AppState};

/// Why the service could not start. Each message tells the operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The master key setting is unusable.
    #[error("invalid configuration: key `{key}`: {source}")]
    BadKey {
        /// The configuration key.
        key: &'static str,
        /// Why.
        source: CryptoError,
    },
    /// No key is configured, and this is not a development setup, where one would be created.
    #[error(
        "no master key: set AUTHLINK_MASTER_KEY (base64 of 32 bytes, see `authlink keygen`) or master_key_file. \
         A development key is created in the data folder only with an http public URL and a SQLite database; \
         here {why}"
    )]
    NoKey {
        /// What makes this setup a production one.
        why: &'static str,
    },
    /// The configured key is not the one the stored data was sealed with.
    #[error(
        "the master key does not match the data in this database (stored key ids: {stored}; configured: {configured}). \
         Configure the key this database was created with (to rotate it: the new key as master_key, the old one in \
         retired_master_keys); refusing to start so that no data is sealed with the wrong key"
    )]
    KeyMismatch {
        /// Key ids found in the database.
        stored: String,
        /// The configured key id.
        configured: String,
    },
    /// Stored values may still be sealed with a key that is not configured.
    #[error(
        "values in this database may still be sealed with key {kids}, which is not configured. Add that \
         master key to retired_master_keys (or retired_master_key_files) and run `authlink keys rewrap`; a key can \
         be removed once `authlink keys status` shows it retired and no value sealed with it"
    )]
    KeyStillNeeded {
        /// The missing key ids.
        kids: String,
    },
    /// The database could not be reached or migrated.
    #[error("database: {0}")]
    Database(#[from] DbError),
    /// The configured database could not be opened or migrated.
    #[error("cannot use database_url {url}: {source}")]
    DatabaseAt {
        /// `database_url`, its password masked.
        url: String,
        /// Why.
        source: DbError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl StartupError {
    /// The process exit code: 2 for configuration mistakes, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::BadKey { .. }
            | StartupError::NoKey { .. }
            | StartupError::KeyMismatch { .. }
            | StartupError::KeyStillNeeded { .. } => 2,
            _ => 1,
        }
    }
}

/// Loads the master key: `master_key` or `master_key_file` (not both), else `<data_dir>/master.key`,
/// which is created (mode 0600, with a loud warning) in a development setup only (see
/// [`production_setup`]); then the retired keys, which only open values sealed before a rotation.
pub fn load_keyring(config: &Config) -> Result<KeyRing, StartupError> {
    with_retired_keys(config, active_key(config, true)?)
}

/// The configured key ring, as [`load_keyring`] but never creating a key: for checking that
/// the keys at hand open existing data (a restored backup).
pub fn load_existing_keyring(config: &Config) -> Result<KeyRing, StartupError> {
    with_retired_keys(config, active_key(config, false)?)
}

/// Reads `config`'s retired keys (beside a throwaway active key): what `config check` can check
/// of a development setup that has no key yet.
pub fn check_retired_keys(config: &Config) -> Result<(), StartupError> {
    with_retired_keys(config, KeyRing::generate().0).map(|_| ())
}

fn with_retired_keys(config: &Config, mut ring: KeyRing) -> Result<KeyRing, StartupError> {
    for key in &config.retired_master_keys {
        ring.add_retired(key)
            .map_err(|source| StartupError::BadKey { key: "retired_master_keys", source })?;
    }
    for path in &config.retired_master_key_files {
        ring.add_retired_file(path)
            .map_err(|source| StartupError::BadKey { key: "retired_master_key_files", source })?;
    }
    Ok(ring)
}

/// What makes this setup a production one, where a master key must be configured: a key
/// written next to the data would go wherever the data goes (backups, copies), and every
/// instance sharing a PostgreSQL database would make a different one.
pub fn production_setup(config: &Config) -> Option<&'static str> {
    if config.is_https() {
        Some("the public URL is https")
    } else if !config.is_sqlite() {
        Some("the database is PostgreSQL")
    } else {
        None
    }
}

/// Where the master key will come from, in words, for `authlink config check`; the error
/// start-up would give when there is none and none may be made. Reads no key.
pub fn key_source(config: &Config) -> Result<String, StartupError> {
    if config.master_key.is_some() {
        return Ok("the `master_key` setting (the configuration file, or AUTHLINK_MASTER_KEY)".into());
    }
    if let Some(path) = &config.master_key_file {
        return Ok(format!("master_key_file {}", path.display()));
    }
    let path = config.data_dir.join("master.key");
    match (path.exists(), production_setup(config)) {
        (true, None) => Ok(format!("development key {}", path.display())),
        (true, Some(why)) => Ok(format!(
            "development key {}, although {why}: move it to a secret store and set AUTHLINK_MASTER_KEY",
            path.display()
        )),
        (false, None) => Ok(format!("none yet: a development key will be written to {}", path.display())),
        (false, Some(why)) => Err(StartupError::NoKey { why }),
    }
}

fn active_key(config: &Config, may_create: bool) -> Result<KeyRing, StartupError> {
    if let Some(key) = &config.master_key {
        return KeyRing::from_base64(key, &[])
            .map_err(|source| StartupError::BadKey { key: "master_key", source });
    }
    if let Some(path) = &config.master_key_file {
        return KeyRing::from_file(path)
            .map_err(|source| StartupError::BadKey { key: "master_key_file", source });
    }
    let path: PathBuf = config.data_dir.join("master.key");
    let production = production_setup(config);
    if path.exists() {
        let ring =
            KeyRing::from_file(&path).map_err(|source| StartupError::BadKey { key: "data_dir", source })?;
        if let Some(why) = production {
            // Refusing now would stop a running deployment; it is told instead, at every start.
            tracing::warn!(
                path = %path.display(),
                "the master key is read from the data folder, where a development setup keeps it, but {why}. \
                 Move it to a secret store and set AUTHLINK_MASTER_KEY (or master_key_file outside the data \
                 folder), so that backups of the data do not carry the key that opens them."
            );
        }
        return Ok(ring);
    }
    if let Some(why) = production {
        return Err(StartupError::NoKey { why });
    }
    if !may_create {
        return Err(StartupError::NoKey {
            why: "the key that sealed existing data is needed, and none is made",
        });
    }
    let ring =
        KeyRing::create_file(&path).map_err(|source| StartupError::BadKey { key: "data_dir", source })?;
    tracing::warn!(
        path = %path.display(),
        "DEVELOPMENT SETUP: no master key was configured, so a new one was written to the data folder. \
         Anyone who can read that file can decrypt the stored tokens. For production set AUTHLINK_MASTER_KEY \
         (see `authlink keygen`) and keep the key outside the data folder and its backups."
    );
    Ok(ring)
}

/// Proves the key ring matches the data: opens the stored key check values, or stores the first
/// one on a fresh database. Refuses a ring that lacks a key stored values may still be sealed
/// with (one that sealed data here and has not been retired by a re-wrap).
pub async fn check_keyring(db: &Db, keys: &KeyRing, now_ms: i64) -> Result<(), StartupError> {
    let mut tx = db.begin_write().await?;
    db::key_checks::lock(&mut tx, db.backend()).await?;
    let stored = db::key_checks::all(&mut tx).await?;
    let checks: Vec<StoredKey<'_>> = stored
        .iter()
        .map(|c| StoredKey { kid: &c.kid, check_value: &c.check_value, retired: c.retired_at.is_some() })
        .collect();
    verify_keyring(keys, &checks)?;
    // A retired key that is not configured any more must really be needed by no value: one
    // sealed with it after it was retired (by a process still running with it) would be lost.
    // Counted once, at the first start without it: found needed by none, the key is forgotten.
    let gone: Vec<&str> = stored
        .iter()
        .filter(|c| c.retired_at.is_some() && !keys.has_kid(&c.kid))
        .map(|c| c.kid.as_str())
        .collect();
    if !gone.is_empty() {
        let mut needed = Vec::new();
        for col in db::sealed::SEALED_COLUMNS {
            for (_, kid, count) in db::sealed::count_by_kid(&mut tx, col).await? {
                if count > 0 && gone.contains(&kid.as_str()) && !needed.contains(&kid) {
                    needed.push(kid);
                }
            }
        }
        if !needed.is_empty() {
            return Err(StartupError::KeyStillNeeded { kids: needed.join(", ") });
        }
        for kid in &gone {
            db::key_checks::forget(&mut tx, kid).await?;
            tracing::info!(
                kid,
                "a retired master key that is no longer configured is forgotten: no value needs it"
            );
        }
    }
    match stored.iter().find(|c| c.kid == keys.active_kid()) {
        None => {
            db::key_checks::insert(&mut tx, keys.active_kid(), &keys.check_value(), now_ms).await?;
        }
        // A retired key made active again seals new values: it is needed again.
        Some(c) if c.retired_at.is_some() => db::key_checks::set_retired(&mut tx, &c.kid, None).await?,
        Some(_) => {}
    }
    tx.commit().await?;
    Ok(())
}

/// A key check value stored with the data.
#[derive(Debug, Clone, Copy)]
pub struct StoredKey<'a> {
    /// The key's id.
    pub kid: &'a str,
    /// Its check value (a sealed constant).
    pub check_value: &'a str,
    /// Whether no stored value needs the key any more.
    pub retired: bool,
}

/// Whether `keys` opens data with these key checks: the configured keys that sealed data here
/// must open their check values, at least one must have (unless nothing was sealed yet), and
/// no key a stored value may still need can be missing.
pub fn verify_keyring(keys: &KeyRing, stored: &[StoredKey<'_>]) -> Result<(), StartupError> {
    let ours: Vec<&StoredKey<'_>> = stored.iter().filter(|c| keys.has_kid(c.kid)).collect();
    let verified = ours.iter().all(|c| keys.verify_check_value(c.kid, c.check_value));
    let knows_data = stored.is_empty() || (!ours.is_empty() && verified);
    if !knows_data {
        return Err(StartupError::KeyMismatch {
            stored: stored.iter().map(|c| c.kid).collect::<Vec<_>>().join(", "),
            configured: keys.active_kid().to_string(),
        });
    }
    let missing: Vec<&str> =
        stored.iter().filter(|c| !keys.has_kid(c.kid) && !c.retired).map(|c| c.kid).collect();
    if !missing.is_empty() {
        return Err(StartupError::KeyStillNeeded { kids: missing.join(", ") });
    }
    Ok(())
}

/// The state of a service on a new SQLite database in `dir`, with the default settings.
#[cfg(test)]
pub(crate) async fn state_for_tests(dir: &std::path::Path) -> AppState {
    let env = [
        ("AUTHLINK_DATABASE_URL".to_string(), format!("sqlite://{}/authlink.db", dir.display())),
        ("AUTHLINK_DATA_DIR".to_string(), dir.display().to_string()),
    ];
    let config = Config::load_from(None, &env).unwrap_or_else(|e| panic!("test configuration: {e}"));
    build_state(config).await.unwrap_or_else(|e| panic!("test state: {e}"))
}

/// Opens the configured database and brings its schema up to date; a failure names the setting
/// and where it points (its password masked).
pub async fn open_database(config: &Config) -> Result<Db, StartupError> {
    let at = |source| StartupError::DatabaseAt {
        url: crate::config::mask_database_url(secrecy::ExposeSecret::expose_secret(&config.database_url)),
        source,
    };
    let db = Db::connect(&config.database_url, &config.database).await.map_err(at)?;
    db.migrate().await.map_err(at)?;
    Ok(db)
}

/// Connects, migrates and checks the key: the state every command works with.
pub async fn build_state(config: Config) -> Result<AppState, StartupError> {
    let keys = load_keyring(&config)?;
    let db = open_database(&config).await?;
    let system_clock = SystemClock::shared();
    let clock: Arc<dyn Clock> = system_clock.clone();
    check_keyring(&db, &keys, crate::clock::to_millis(clock.now())).await?;
    let http = providers::http_client(Duration::from_secs(config.providers.timeout_secs.max(1)));
    let providers = Providers::from_config(&config, http);
    let sandbox = Arc::new(Sandbox::new(&config, system_clock.clone()));
    let webhook_guard =
        crate::net::Guard::with(Arc::new(crate::net::SystemResolver), config.webhooks.private_targets());
    let avatar_timeout = Duration::from_secs(5);
    let avatar_clients = crate::state::AvatarClients {
        provider: webhook_guard.client(avatar_timeout),
        sandbox: crate::net::Guard::new(Arc::new(crate::net::SystemResolver), true).client(avatar_timeout),
    };
    let detached = crate::state::Detached::default();
    Ok(AppState(Arc::new(App {
        config,
        db,
        keys,
        clock,
        system_clock,
        providers,
        sandbox,
        webhook_guard,
        avatar_clients,
        detached,
    })))
}

/// A built application: bound, migrated, ready to serve.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Binds the listen address first (so a port of 0 picks a free port, whose address then
    /// becomes the public URL if none was configured), then builds the state.
    pub async fn build(mut config: Config) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartupError::Bind { addr: config.listen, source })?;
        let addr =
            listener.local_addr().map_err(|source| StartupError::Bind { addr: config.listen, source })?;
        if config.listen.port() == 0
            && config.public_url.as_str() == "http://127.0.0.1:8080/"
            && let Ok(url) = url::Url::parse(&format!("http://{addr}"))
        {
            config.public_url = url;
        }
        let state = build_state(config).await?;
        Ok(Self { listener, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until SIGTERM or Ctrl-C, then lets in-flight requests and claimed background work
    /// finish (together, within the configured grace period from the signal) and closes the
    /// database.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let addr = self.local_addr();
        let state = self.state.clone();
        let router = crate::http::router(state.clone());
        let grace = Duration::from_secs(state.config.http.shutdown_grace_secs);
        let stop_signal = shutdown_signal();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        start_metrics(&state, stop_rx.clone()).await?;
        let process =
            crate::service::processes::register(&state, "serve").await.map_err(std::io::Error::other)?;
        let process_id = process.id.clone();
        // The heartbeat has a stop of its own: it beats until the process has nothing left that
        // may seal a value (a re-wrap must not count it gone, and retire its key, before).
        let (beat_tx, beat_rx) = tokio::sync::watch::channel(false);
        let heartbeat = tokio::spawn(crate::service::processes::run(state.0.clone(), process, beat_rx));
        let housekeeping = tokio::spawn(housekeeping(state.clone(), stop_rx.clone()));
        let jobs =
            state.config.jobs.enabled.then(|| tokio::spawn(crate::jobs::run(state.clone(), stop_rx.clone())));
        // Before the line that says it is ready, which starts whoever waits for it.
        warn_if_grace_is_short(&state.config);
        warn_if_simulated_in_public(&state.config);
        tracing::info!(addr = %addr, public_url = %state.config.public_url, "authlink listening");
        let providers = &state.config.providers;
        let in_sandbox = (providers.tiktok.enabled && providers.tiktok.is_sandbox())
            || (providers.instagram.enabled && providers.instagram.is_sandbox());
        if in_sandbox && !state.config.is_sqlite() {
            tracing::warn!(
                "a provider runs in sandbox mode, whose simulated accounts, codes and tokens live in this \
                 process: run a single instance (behind a load balancer, a code issued by one instance would \
                 be exchanged at another), or configure the provider's credentials"
            );
        }
        let header_timeout = Duration::from_secs(state.config.http.request_timeout_secs);
        // One grace period from the signal for everything still running: requests, then jobs.
        let deadline = Arc::new(std::sync::OnceLock::new());
        let set_deadline = deadline.clone();
        let server = serve(self.listener, router, header_timeout, async move {
            stop_signal.await;
            let _ = set_deadline.set(tokio::time::Instant::now() + grace);
            tracing::info!("shutdown signal received; finishing in-flight requests");
            let _ = stop_tx.send(true);
        });
        let deadline = move || deadline.get().copied().unwrap_or_else(|| tokio::time::Instant::now() + grace);
        let server = tokio::spawn(async move {
            server.await;
            Ok::<(), std::io::Error>(())
        });
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            _ = async {
                let _ = stop_rx.wait_for(|stop| *stop).await;
                tokio::time::sleep_until(deadline()).await;
            } => {
                tracing::warn!(grace_secs = grace.as_secs(), "requests still running after the grace period; stopping");
                server.abort();
                Ok(Ok(()))
            }
        };
        housekeeping.abort();
        if let Some(jobs) = jobs {
            // Let claimed work finish (its leases would otherwise have to run out).
            finish_by(deadline(), jobs, "background jobs still running after the grace period; stopping")
                .await;
        }
        // Work whose requests went away (a refresh whose answer must be stored) finishes too.
        let drained = tokio::time::timeout_at(deadline(), state.detached.drain()).await.is_ok();
        if !drained {
            tracing::warn!("work of requests that went away still running after the grace period; stopping");
        }
        // The heartbeat stops (a beat it was writing finishes first), and the record goes once
        // nothing of this process runs any more (jobs cut short were aborted; work of requests
        // that went away is not, so its record then runs out instead).
        stop_heartbeat(beat_tx, heartbeat).await;
        deregister_unless_cut_short(&state, &process_id, drained).await;
        state.db.close().await;
        tracing::info!("authlink stopped");
        match result {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Waits for `task` until `deadline`; then aborts it (logging `late`) and waits for it to be gone.
/// Returns whether it finished in time.
async fn finish_by<T>(
    deadline: tokio::time::Instant,
    mut task: tokio::task::JoinHandle<T>,
    late: &str,
) -> bool {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        tracing::warn!("{late}");
        task.abort();
        let _ = task.await;
        return false;
    }
    true
}

/// Removes this process's record once its work is over; when work of requests that went away
/// outlasted the grace period (it is not aborted, and may still seal a value), the record is left
/// to count the process as running until it runs out (90 s), so that a re-wrap meanwhile does
/// not retire the key it seals with.
async fn deregister_unless_cut_short(state: &AppState, process_id: &str, finished: bool) {
    if finished {
        crate::service::processes::deregister(state, process_id).await;
    } else {
        tracing::warn!(
            "work still running at the end of the grace period: this process's record is left to run out"
        );
    }
}

/// Installs the metrics recorder and serves `/metrics` when `metrics.listen` is set.
async fn start_metrics(state: &AppState, stop: tokio::sync::watch::Receiver<bool>) -> std::io::Result<()> {
    let Some(addr) = state.config.metrics.listen else { return Ok(()) };
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "metrics.listen is not a loopback address: GET /metrics answers anyone who can reach it, without \
             credentials (the version, requests by route, connections by platform and status); keep the port \
             to the scraper's network"
        );
    }
    let handle = crate::metrics::install().map_err(std::io::Error::other)?;
    crate::metrics::serve(addr, handle, state.clone(), stop)
        .await
        .map(|_| ())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (metrics.listen): {e}")))
}

/// Says at start when a provider is simulated on a public (https) address only because its
/// credentials are missing or blank (a secret that was not mounted, say): clients would see the
/// sandbox's consent screen and connect no real account. `sandbox = true` says it is meant.
fn warn_if_simulated_in_public(config: &Config) {
    if !config.is_https() {
        return;
    }
    let p = &config.providers;
    for (name, simulated, on_purpose) in [
        ("tiktok", p.tiktok.enabled && p.tiktok.is_sandbox(), p.tiktok.sandbox == Some(true)),
        ("instagram", p.instagram.enabled && p.instagram.is_sandbox(), p.instagram.sandbox == Some(true)),
    ] {
        if simulated && !on_purpose {
            tracing::warn!(
                provider = name,
                "{name} runs in sandbox mode on a public https address because no credentials are configured: \
                 clients see a simulated consent screen and no real account is connected; configure its \
                 credentials, or set providers.{name}.sandbox = true if the simulator is meant"
            );
        }
    }
}

/// Says at start when the grace period after SIGTERM is not longer than a provider call: a
/// refresh still waiting for its provider when the grace ends is cut off, and a refresh token the
/// provider rotated meanwhile is lost (the connection then needs its client again).
fn warn_if_grace_is_short(config: &Config) {
    let (grace, call) = (config.http.shutdown_grace_secs, config.providers.timeout_secs);
    if grace <= call {
        tracing::warn!(
            shutdown_grace_secs = grace,
            provider_timeout_secs = call,
            "http.shutdown_grace_secs is not longer than providers.timeout_secs: a refresh still waiting for \
             its provider when a shutdown's grace period ends is cut off, and a refresh token the provider \
             rotated meanwhile is lost; set the grace period longer than the provider timeout"
        );
    }
}

/// Runs only the background jobs (`authlink worker`) until SIGTERM or Ctrl-C.
pub async fn run_worker(state: AppState) -> std::io::Result<()> {
    let stop_signal = shutdown_signal();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    start_metrics(&state, stop_rx.clone()).await?;
    let process =
        crate::service::processes::register(&state, "worker").await.map_err(std::io::Error::other)?;
    let process_id = process.id.clone();
    // Its own stop, as in `serve`: it beats until the jobs have finished.
    let (beat_tx, beat_rx) = tokio::sync::watch::channel(false);
    let heartbeat = tokio::spawn(crate::service::processes::run(state.0.clone(), process, beat_rx));
    let jobs = tokio::spawn(crate::jobs::run(state.clone(), stop_rx.clone()));
    let housekeeping = tokio::spawn(housekeeping(state.clone(), stop_rx));
    warn_if_grace_is_short(&state.config);
    warn_if_simulated_in_public(&state.config);
    tracing::info!(process_id = %process_id, "authlink worker running");
    stop_signal.await;
    tracing::info!("shutdown signal received; finishing claimed work");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(state.config.http.shutdown_grace_secs);
    finish_by(deadline, jobs, "background jobs still running after the grace period; stopping").await;
    housekeeping.abort();
    stop_heartbeat(beat_tx, heartbeat).await;
    // (Jobs cut short were aborted: nothing of this process runs any more.)
    crate::service::processes::deregister(&state, &process_id).await;
    state.db.close().await;
    Ok(())
}

/// Stops the heartbeat once the process's work is over; a beat it was writing may finish (a few
/// seconds at most).
async fn stop_heartbeat(stop: tokio::sync::watch::Sender<bool>, heartbeat: tokio::task::JoinHandle<()>) {
    let _ = stop.send(true);
    let by = tokio::time::Instant::now() + Duration::from_secs(5);
    finish_by(by, heartbeat, "the heartbeat did not stop in time").await;
}

/// Periodic clean-up: expired OAuth flows, webhook deliveries past their retention, and webhook
/// secrets that stopped signing.
async fn housekeeping(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let purged = async {
            let mut conn = state.db.writer().await?;
            db::oauth_flows::purge_expired(&mut conn, state.now_ms()).await
        }
        .await;
        match purged {
            Ok(n) if n > 0 => tracing::debug!(purged = n, "expired OAuth flows removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "housekeeping failed"),
        }
        if let Err(e) = purge_webhooks(&state, &mut stop).await {
            tracing::warn!(error = %e, "webhook housekeeping failed");
        }
    }
}

/// Deletes finished webhook deliveries older than `webhooks.retention_days`, in short
/// transactions (the writer is not held for long), and forgets expired previous secrets.
async fn purge_webhooks(
    state: &AppState,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), crate::db::DbError> {
    const BATCH: i64 = 1000;
    let now = state.now_ms();
    let before = now - i64::from(state.config.webhooks.retention_days) * 86_400_000;
    let (mut deliveries, mut events) = (0, 0);
    // At most 100 batches a round; the rest waits for the next.
    for _ in 0..100 {
        if *stop.borrow() {
            break;
        }
        let mut tx = state.db.begin_write().await?;
        // Processes purge one batch at a time: the batch's two deletions each pick the oldest
        // finished deliveries, and another process's deletion between them would make the second
        // pick deliveries whose attempts the first left (a foreign key violation, or a deadlock).
        db::advisory_lock(&mut tx, state.db.backend(), "webhook purge").await?;
        let (d, e) = db::webhooks::purge_finished(&mut tx, before, BATCH).await?;
        tx.commit().await?;
        deliveries += d;
        events += e;
        if d < BATCH as u64 && e < BATCH as u64 {
            break;
        }
    }
    let secrets = db::webhooks::forget_previous_secrets(&mut *state.db.writer().await?, now).await?;
    let endpoints = {
        let mut tx = state.db.begin_write().await?;
        // (With the purge above: an endpoint is deleted only once no delivery refers to it.)
        db::advisory_lock(&mut tx, state.db.backend(), "webhook purge").await?;
        let n = db::webhooks::purge_removed_endpoints(&mut tx, before, BATCH).await?;
        tx.commit().await?;
        n
    };
    if deliveries + events + secrets + endpoints > 0 {
        tracing::info!(
            deliveries,
            events,
            secrets,
            removed_endpoints = endpoints,
            "webhook housekeeping: old deliveries, expired secrets and removed endpoints deleted"
        );
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    // On Unix the handlers are installed now, not when the future is first polled: a signal that
    // comes as soon as the process has said it is ready must not meet the default action, an
    // exit without clean-up.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    one.recv().await;
                }
                (Err(_), Err(_)) => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves `router` on `listener` until `signal` completes, then lets open connections finish
/// their requests (the caller bounds how long). As `axum::serve` does (HTTP/1.1, the peer's
/// address as `ConnectInfo`), plus what it leaves out: a timer, so that a client must send a
/// request's headers within `header_timeout` or lose the connection. Without it, connections
/// that trickle their headers a byte at a time (slowloris) stay open for as long as the client
/// likes, each holding a socket and a task.
async fn serve(
    mut listener: TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            // Errors are logged and retried inside (as `axum::serve` does).
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut signal => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
