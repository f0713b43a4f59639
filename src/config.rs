//! Configuration: built-in defaults, then `authlink.toml`, then `AUTHLINK_*` environment variables
//! (`__` separates nesting levels: `AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY`).
//!
//! Every structure denies unknown keys, so a typo stops start-up with a message that names the key
//! instead of being silently ignored. Secrets are [`SecretString`]s and are masked by
//! [`Config::masked`], which is what `authlink config check` prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::domain::Platform;

/// Environment variables with the `AUTHLINK_` prefix that are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["CONFIG", "LOG"];

/// The whole configuration of one authlink instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The base URL of every link and callback, as clients reach this instance.
    pub public_url: Url,
    /// The socket address the HTTP server binds.
    pub listen: SocketAddr,
    /// `sqlite://...` or `postgres://...`; the scheme picks the backend. When not set:
    /// [`default_database_url`] of `data_dir`, a SQLite file there.
    pub database_url: SecretString,
    /// The folder for the default SQLite file (when `database_url` is not set) and the
    /// development key file.
    pub data_dir: PathBuf,
    /// Base64 of the 32-byte master key that seals secrets at rest.
    pub master_key: Option<SecretString>,
    /// A file holding the base64 master key (instead of `master_key`: setting both is refused).
    pub master_key_file: Option<PathBuf>,
    /// Earlier master keys (base64), kept to open values sealed before a key rotation until
    /// `authlink keys rewrap` has sealed them again with the current key. One key or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub retired_master_keys: Vec<SecretString>,
    /// Files holding earlier master keys, like `retired_master_keys`. One path or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub retired_master_key_files: Vec<PathBuf>,
    /// `human` or `json` log lines.
    pub log_format: LogFormat,
    /// HTTP server limits.
    pub http: HttpConfig,
    /// Connection pool settings.
    pub database: DatabaseConfig,
    /// OAuth providers.
    #[serde(default)]
    pub providers: ProvidersConfig,
    /// The built-in provider simulator.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Background jobs (token refresh, health checks, webhook delivery).
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Webhook delivery.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Prometheus metrics, served on an address of their own (keep it private: loopback or an
/// internal network).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (`serve` and `worker`); unset: no metrics.
    pub listen: Option<SocketAddr>,
}

/// Background jobs. Every instance may run them: they coordinate through leases in the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Run the background jobs inside `serve` (`authlink worker` runs them alone).
    pub enabled: bool,
    /// How often the schedulers look for due work, in milliseconds.
    pub tick_ms: u64,
    /// How long a refresh or delivery claim lasts before another process may take it over.
    pub lease_secs: u64,
    /// Most connections claimed per scheduler round.
    pub refresh_batch: u32,
    /// Most refreshes in flight at once in this process.
    pub refresh_concurrency: usize,
    /// Interval of the cheap per-connection health check (spread out), in seconds.
    pub health_check_interval_secs: u64,
    /// How long before a grant runs out `connection.expiring` is announced, in seconds.
    pub expiring_notice_secs: u64,
    /// Most webhook deliveries claimed per round.
    pub webhook_batch: u32,
    /// Most webhook deliveries in flight at once in this process.
    pub webhook_concurrency: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tick_ms: 1000,
            lease_secs: 60,
            refresh_batch: 200,
            refresh_concurrency: 32,
            health_check_interval_secs: 86_400,
            expiring_notice_secs: 7 * 86_400,
            webhook_batch: 50,
            webhook_concurrency: 8,
        }
    }
}

/// Webhook delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Allow endpoints that resolve to loopback, private or link-local addresses (tests and
    /// on-premise receivers). Off by default: such targets are refused before connecting. The
    /// same guard fetches every other address users give (workspace logos, account avatars).
    pub allow_private_targets: bool,
    /// Networks (`10.20.0.0/16`) and addresses whose private and loopback addresses may be
    /// targets, when `allow_private_targets` is off: an on-premise receiver's network alone
    /// rather than every private address. Plain `http` is admitted for a host whose addresses
    /// all lie in them. Link-local and cloud metadata addresses stay refused.
    pub private_networks: Vec<String>,
    /// Timeout of one delivery attempt, in seconds.
    pub timeout_secs: u64,
    /// How long finished deliveries (delivered, given up or cancelled), their attempts and their
    /// events are kept, in days; then the housekeeping deletes them.
    pub retention_days: u32,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_private_targets: false,
            private_networks: Vec::new(),
            timeout_secs: 15,
            retention_days: 30,
        }
    }
}

impl WebhooksConfig {
    /// [`private_networks`](Self::private_networks), parsed.
    pub fn private_target_networks(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        parse_networks("webhooks.private_networks", &self.private_networks)
    }

    /// What the outbound guard lets through beyond public addresses.
    pub fn private_targets(&self) -> crate::net::PrivateTargets {
        if self.allow_private_targets {
            crate::net::PrivateTargets::All
        } else {
            // Checked when the configuration is loaded.
            crate::net::PrivateTargets::Networks(self.private_target_networks().unwrap_or_default().into())
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// HTTP server limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest accepted request body, in bytes (larger bodies get 413).
    pub body_limit_bytes: usize,
    /// Longest time a request may take before the server answers 503; also how long a client
    /// has to send a request's headers before its connection is closed.
    pub request_timeout_secs: u64,
    /// Longest time, from a shutdown signal, to let in-flight requests and then claimed
    /// background work finish.
    pub shutdown_grace_secs: u64,
    /// Requests a minute one client may make to link pages (`/l/...`) and the providers'
    /// callbacks, against token guessing;
    /// also the limit of JSON API requests without a valid key, per client address.
    pub link_requests_per_minute: u32,
    /// Connect attempts one link may have open at once (started within their ten minutes and
    /// not yet back from the provider), across instances; a start beyond them gets 429. Bounds
    /// what anyone holding a link can make authlink store, from any number of addresses.
    pub link_open_attempts: u32,
    /// JSON API requests a minute per API key (bursts up to a minute's worth); more get 429.
    pub api_requests_per_minute: u32,
    /// Addresses (`10.0.0.5`) and networks (`10.0.0.0/8`) of the reverse proxies whose
    /// `X-Forwarded-For` is believed: the client is the last address in it that is not one of
    /// these. Default: loopback only (a proxy on the same host). `[]`: the peer address, always.
    /// A proxy on another host must be listed: a peer is never believed for being on a private
    /// network, where a hop that rewrites addresses (a container's port forwarding, a cluster's
    /// node port) would let any client choose its address.
    pub trusted_proxies: Vec<String>,
}

/// The default [`HttpConfig::trusted_proxies`]: loopback (a reverse proxy on the same host).
pub const DEFAULT_TRUSTED_PROXIES: [&str; 2] = ["127.0.0.0/8", "::1/128"];

impl HttpConfig {
    /// [`trusted_proxies`](Self::trusted_proxies), parsed (a plain address is a network of one).
    pub fn trusted_proxy_networks(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        parse_networks("http.trusted_proxies", &self.trusted_proxies)
    }
}

/// A list of addresses and networks, as the setting `key` gives it (a plain address is a
/// network of one).
fn parse_networks(key: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "key `{key}`: `{s}` is not an address or a network like 10.0.0.0/8"
                    ))
                })
        })
        .collect()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_limit_bytes: 64 * 1024,
            request_timeout_secs: 30,
            shutdown_grace_secs: 20,
            link_requests_per_minute: 300,
            link_open_attempts: 100,
            api_requests_per_minute: 1200,
            trusted_proxies: DEFAULT_TRUSTED_PROXIES.iter().map(|s| (*s).to_string()).collect(),
        }
    }
}

/// Connection pool settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Most connections in the pool (on SQLite: reader connections; writes use one more).
    pub max_connections: u32,
    /// How long a request waits for a connection before it gets 503.
    pub acquire_timeout_secs: u64,
    /// PostgreSQL: the longest a statement may run, and a transaction stay idle, before the
    /// server ends it (a statement stuck behind a stuck transaction, say); migrations excepted.
    pub statement_timeout_secs: u64,
    /// PostgreSQL: the longest a statement waits for a row or table lock before it fails (503,
    /// to be tried again).
    pub lock_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout_secs: 5,
            statement_timeout_secs: 300,
            lock_timeout_secs: 30,
        }
    }
}

/// The provider sections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// TikTok Login Kit for Web.
    pub tiktok: TikTokConfig,
    /// Instagram API with Instagram Login.
    pub instagram: InstagramConfig,
    /// Timeout of every call to a provider, in seconds.
    pub timeout_secs: u64,
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        Self { tiktok: TikTokConfig::default(), instagram: InstagramConfig::default(), timeout_secs: 10 }
    }
}

/// TikTok settings; every URL defaults to the real endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TikTokConfig {
    /// Offer TikTok on links.
    pub enabled: bool,
    /// `true`: run against the built-in simulator even when credentials are set. `false`: run
    /// against TikTok, which needs `client_key` and `client_secret`. Unset: the simulator exactly
    /// when neither credential is set.
    pub sandbox: Option<bool>,
    /// The app's client key (TikTok's name for the client id).
    pub client_key: Option<String>,
    /// The app's client secret.
    pub client_secret: Option<SecretString>,
    /// Scopes asked for (comma-joined on the wire).
    pub scopes: Vec<String>,
    /// Of those, the scopes without which a connection is refused (the client is asked to try
    /// again with every permission on). Unset: all of `scopes`. A client may switch off the
    /// others: the connection is made and its status reason names what is missing.
    /// `user.info.basic` is always required.
    pub required_scopes: Option<Vec<String>>,
    /// Authorization page.
    pub authorize_url: Url,
    /// Token endpoint (code exchange and refresh).
    pub token_url: Url,
    /// Base of the v2 API (`/v2/user/info/`, `/v2/oauth/revoke/`).
    pub api_base_url: Url,
}

#[allow(clippy::expect_used)] // constant URLs, checked by the tests
fn constant_url(s: &str) -> Url {
    Url::parse(s).expect("constant URL")
}

impl Default for TikTokConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sandbox: None,
            client_key: None,
            client_secret: None,
            scopes: vec!["user.info.basic".into(), "user.info.profile".into()],
            required_scopes: None,
            authorize_url: constant_url("https://www.tiktok.com/v2/auth/authorize/"),
            token_url: constant_url("https://open.tiktokapis.com/v2/oauth/token/"),
            api_base_url: constant_url("https://open.tiktokapis.com"),
        }
    }
}

/// Instagram settings; every URL defaults to the real endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstagramConfig {
    /// Offer Instagram on links.
    pub enabled: bool,
    /// `true`: run against the built-in simulator even when credentials are set. `false`: run
    /// against Instagram, which needs `client_id` and `client_secret`. Unset: the simulator
    /// exactly when neither credential is set.
    pub sandbox: Option<bool>,
    /// The Instagram app id (not the Meta app id).
    pub client_id: Option<String>,
    /// The Instagram app secret; also verifies Meta's signed requests.
    pub client_secret: Option<SecretString>,
    /// Scopes asked for.
    pub scopes: Vec<String>,
    /// Of those, the scopes without which a connection is refused. Unset: all of `scopes`.
    /// `instagram_business_basic` is always required.
    pub required_scopes: Option<Vec<String>>,
    /// Authorization page.
    pub authorize_url: Url,
    /// Short-lived token endpoint.
    pub token_url: Url,
    /// Graph API host (long-lived exchange, refresh, profile).
    pub graph_base_url: Url,
    /// Graph API version used for the profile call.
    pub graph_api_version: String,
    /// The secret of the Meta app that holds the Instagram product, if it differs from
    /// `client_secret`: Meta's deauthorize and data-deletion requests are also accepted when
    /// signed with it (which of the two secrets signs them is not documented).
    pub meta_app_secret: Option<SecretString>,
}

impl Default for InstagramConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sandbox: None,
            client_id: None,
            client_secret: None,
            scopes: vec!["instagram_business_basic".into()],
            required_scopes: None,
            authorize_url: constant_url("https://www.instagram.com/oauth/authorize"),
            token_url: constant_url("https://api.instagram.com/oauth/access_token"),
            graph_base_url: constant_url("https://graph.instagram.com"),
            graph_api_version: "v23.0".into(),
            meta_app_secret: None,
        }
    }
}

/// The built-in provider simulator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Serve `/sandbox/control/...`, which lets tests and demos script failures and move the
    /// sandbox's clock. Never enable it on a public instance.
    pub control_api: bool,
}

/// The scopes a connection cannot do without: `required` (unset: all of `scopes`), and `basic`.
fn required_of(basic: &str, scopes: &[String], required: Option<&[String]>) -> Vec<String> {
    let mut out: Vec<String> = required.unwrap_or(scopes).to_vec();
    if !out.iter().any(|s| s == basic) {
        out.insert(0, basic.to_string());
    }
    out
}

/// A SQLite `database_url` must name a file authlink can write: an empty path or `:memory:` gives
/// each connection a database of its own that is gone when the connection closes, and a
/// read-only one refuses every write.
fn check_sqlite_url(url: &str) -> Result<(), ConfigError> {
    let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) else {
        return Ok(());
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let refused = if path.is_empty() {
        Some("names no file")
    } else if path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory") {
        Some("names an in-memory database, whose data would be lost")
    } else if query.split('&').any(|kv| {
        kv == "mode=ro"
            || kv.strip_prefix("immutable=").is_some_and(|v| !matches!(v, "0" | "false" | "no" | "off"))
    }) {
        Some("opens the database read-only")
    } else {
        None
    };
    match refused {
        Some(why) => Err(ConfigError::Invalid(format!(
            "key `database_url`: {why}; give the path of a SQLite file, e.g. sqlite:///var/lib/authlink/authlink.db"
        ))),
        None => Ok(()),
    }
}

/// Refuses scopes without the basic one, which every connection needs (the profile call), and a
/// required scope that is not asked for.
fn check_required(
    provider: &str,
    basic: &str,
    scopes: &[String],
    required: Option<&[String]>,
) -> Result<(), ConfigError> {
    if !scopes.iter().any(|s| s == basic) {
        return Err(ConfigError::Invalid(format!(
            "key `providers.{provider}.scopes`: must include `{basic}`, which every connection needs"
        )));
    }
    match required.unwrap_or_default().iter().find(|r| !scopes.contains(r)) {
        Some(r) => Err(ConfigError::Invalid(format!(
            "key `providers.{provider}.required_scopes`: `{r}` is not in `providers.{provider}.scopes`"
        ))),
        None => Ok(()),
    }
}

impl ProvidersConfig {
    /// The scopes without which a connection of `platform` is refused.
    pub fn required_scopes(&self, platform: Platform) -> Vec<String> {
        match platform {
            Platform::Tiktok => {
                required_of("user.info.basic", &self.tiktok.scopes, self.tiktok.required_scopes.as_deref())
            }
            Platform::Instagram => required_of(
                "instagram_business_basic",
                &self.instagram.scopes,
                self.instagram.required_scopes.as_deref(),
            ),
        }
    }
}

impl TikTokConfig {
    /// Whether this provider runs against the built-in simulator: `sandbox = true`, or no
    /// `sandbox` setting and no credentials. (A validated configuration has both credentials
    /// whenever this is false.)
    pub fn is_sandbox(&self) -> bool {
        sandbox_mode(self.sandbox, self.client_key.as_deref(), self.client_secret.as_ref())
    }
}

impl InstagramConfig {
    /// Whether this provider runs against the built-in simulator: `sandbox = true`, or no
    /// `sandbox` setting and no credentials. (A validated configuration has both credentials
    /// whenever this is false.)
    pub fn is_sandbox(&self) -> bool {
        sandbox_mode(self.sandbox, self.client_id.as_deref(), self.client_secret.as_ref())
    }
}

/// Whether `url`'s host is this host: `localhost` or a loopback address.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        None => false,
    }
}

/// Whether a credential counts as set: present and not blank (an empty environment variable is
/// a missing credential, not an empty one).
fn is_set(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.trim().is_empty())
}

fn sandbox_mode(sandbox: Option<bool>, id: Option<&str>, secret: Option<&SecretString>) -> bool {
    match sandbox {
        Some(explicit) => explicit,
        None => !is_set(id) && !is_set(secret.map(|s| s.expose_secret())),
    }
}

/// Refuses credentials that would silently fall back to the simulator: with `sandbox = false`
/// both must be set, and without a `sandbox` setting they are set together or not at all. Only
/// `sandbox = true` runs the simulator whatever is set. The message names the missing keys and
/// never a value.
fn check_credentials(
    provider: &str,
    name: &str,
    sandbox: Option<bool>,
    (id_key, id): (&str, Option<&str>),
    secret: Option<&SecretString>,
) -> Result<(), ConfigError> {
    let id_set = is_set(id);
    let secret_set = is_set(secret.map(|s| s.expose_secret()));
    if sandbox == Some(true) || (id_set && secret_set) || (sandbox.is_none() && !id_set && !secret_set) {
        return Ok(());
    }
    let missing: Vec<String> = [(id_key, id_set), ("client_secret", secret_set)]
        .into_iter()
        .filter(|(_, set)| !set)
        .map(|(key, _)| format!("`providers.{provider}.{key}`"))
        .collect();
    let (subject, verb) = match missing.as_slice() {
        [one] => (one.clone(), "is"),
        many => (many.join(" and "), "are"),
    };
    let why = if sandbox == Some(false) {
        format!("`providers.{provider}.sandbox = false` asks for the real {name} API, which needs both")
    } else {
        format!("only one of the two {name} credentials is set, and the real {name} API needs both")
    };
    Err(ConfigError::Invalid(format!(
        "key {subject}: {verb} missing; {why}. Set {subject}, or set `providers.{provider}.sandbox = true` \
         to run {name} against the built-in simulator"
    )))
}

/// Why a configuration could not be loaded. The message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key is unknown, or a value could not be parsed.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The file named by `--config` or `AUTHLINK_CONFIG` does not exist.
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
}

/// The defaults, as a serializable tree for figment's lowest layer.
#[derive(Serialize)]
struct Defaults {
    public_url: String,
    listen: String,
    data_dir: String,
    log_format: LogFormat,
    http: HttpConfig,
    database: DatabaseConfig,
    sandbox: SandboxConfig,
}

impl Config {
    /// Loads the configuration: defaults < TOML file < `AUTHLINK_*` environment.
    ///
    /// `file` is the path from `--config`/`AUTHLINK_CONFIG`; without one, `./authlink.toml` is
    /// read when it exists.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let defaults = Defaults {
            public_url: "http://127.0.0.1:8080".into(),
            listen: "127.0.0.1:8080".into(),
            data_dir: "authlink-data".into(),
            log_format: LogFormat::Human,
            http: HttpConfig::default(),
            database: DatabaseConfig::default(),
            sandbox: SandboxConfig::default(),
        };
        let mut figment = Figment::from(Serialized::defaults(defaults));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::MissingFile(path.to_path_buf()));
                }
                figment = figment.merge(Toml::file(path));
            }
            None => {
                let default_path = Path::new("authlink.toml");
                if default_path.exists() {
                    figment = figment.merge(Toml::file(default_path));
                }
            }
        }
        // Only the variables we were handed, so tests do not depend on the process environment.
        let env_pairs: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("AUTHLINK_")?;
                if NON_CONFIG_ENV.contains(&rest)
                    || rest.starts_with("TEST_")
                    || rest.starts_with("FUZZ_")
                    || is_service_link(rest)
                {
                    return None;
                }
                Some((rest.to_ascii_lowercase().replace("__", "."), v.clone()))
            })
            .collect();
        for (key, value) in env_pairs {
            // Values from the environment are parsed like TOML values would be where that is
            // unambiguous (numbers, booleans, lists); everything else stays a string.
            let parsed = parse_env_value(&value);
            figment = figment.merge(Serialized::global(&key, parsed));
        }
        // No `database_url` in any layer: the SQLite file in `data_dir`, wherever that is set (an
        // unusable `data_dir` is reported by the extraction below).
        if figment.find_value("database_url").is_err()
            && let Ok(data_dir) = figment.extract_inner::<PathBuf>("data_dir")
        {
            figment = figment.merge(Serialized::global("database_url", default_database_url(&data_dir)));
        }
        let config: Config = figment.extract_lossy().map_err(|e| {
            let messages: Vec<String> = e.into_iter().map(describe_figment_error).collect();
            ConfigError::Invalid(messages.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.http.trusted_proxy_networks()?;
        self.webhooks.private_target_networks()?;
        if !matches!(self.public_url.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid("key `public_url`: must be an http or https URL".into()));
        }
        if self.public_url.query().is_some() || self.public_url.fragment().is_some() {
            return Err(ConfigError::Invalid("key `public_url`: must not have a query or fragment".into()));
        }
        let db = self.database_url.expose_secret();
        if !(db.starts_with("sqlite:") || db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid(
                "key `database_url`: must start with sqlite:, postgres:// or postgresql://".into(),
            ));
        }
        check_sqlite_url(db)?;
        // Two active keys: whichever were taken, the other would be silently ignored, and a
        // rotation half done (the new key in one, the old in the other) would seal with the
        // wrong one.
        if self.master_key.is_some() && self.master_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "keys `master_key` and `master_key_file` are both set: set one (an earlier key goes in \
                 `retired_master_keys` or `retired_master_key_files`)"
                    .into(),
            ));
        }
        // Zero would stop the service doing its work: every request answering 503 (timeout), a
        // job round claiming nothing and starting again at once (batches), nothing in flight.
        for (key, is_zero) in [
            ("http.body_limit_bytes", self.http.body_limit_bytes == 0),
            ("http.request_timeout_secs", self.http.request_timeout_secs == 0),
            ("jobs.tick_ms", self.jobs.tick_ms == 0),
            ("jobs.lease_secs", self.jobs.lease_secs == 0),
            ("jobs.refresh_batch", self.jobs.refresh_batch == 0),
            ("jobs.refresh_concurrency", self.jobs.refresh_concurrency == 0),
            ("jobs.webhook_batch", self.jobs.webhook_batch == 0),
            ("jobs.webhook_concurrency", self.jobs.webhook_concurrency == 0),
            ("database.max_connections", self.database.max_connections == 0),
            ("database.acquire_timeout_secs", self.database.acquire_timeout_secs == 0),
            ("database.statement_timeout_secs", self.database.statement_timeout_secs == 0),
            ("database.lock_timeout_secs", self.database.lock_timeout_secs == 0),
            ("providers.timeout_secs", self.providers.timeout_secs == 0),
            ("webhooks.timeout_secs", self.webhooks.timeout_secs == 0),
            ("webhooks.retention_days", self.webhooks.retention_days == 0),
            ("http.link_requests_per_minute", self.http.link_requests_per_minute == 0),
            ("http.link_open_attempts", self.http.link_open_attempts == 0),
            ("http.api_requests_per_minute", self.http.api_requests_per_minute == 0),
        ] {
            if is_zero {
                return Err(ConfigError::Invalid(format!("key `{key}`: must be positive")));
            }
        }
        // Past these a value is a mistake (and the arithmetic on it could overflow).
        const DAY: u64 = 86_400;
        for (key, value, max) in [
            ("http.request_timeout_secs", self.http.request_timeout_secs, DAY),
            ("http.shutdown_grace_secs", self.http.shutdown_grace_secs, DAY),
            ("database.acquire_timeout_secs", self.database.acquire_timeout_secs, 3_600),
            ("database.statement_timeout_secs", self.database.statement_timeout_secs, DAY),
            ("database.lock_timeout_secs", self.database.lock_timeout_secs, DAY),
            ("providers.timeout_secs", self.providers.timeout_secs, 3_600),
            ("webhooks.timeout_secs", self.webhooks.timeout_secs, 3_600),
            ("webhooks.retention_days", u64::from(self.webhooks.retention_days), 3_650),
            ("jobs.tick_ms", self.jobs.tick_ms, 3_600_000),
            ("jobs.lease_secs", self.jobs.lease_secs, DAY),
            ("jobs.health_check_interval_secs", self.jobs.health_check_interval_secs, 30 * DAY),
            ("jobs.expiring_notice_secs", self.jobs.expiring_notice_secs, 365 * DAY),
            ("jobs.refresh_batch", u64::from(self.jobs.refresh_batch), 100_000),
            ("jobs.webhook_batch", u64::from(self.jobs.webhook_batch), 100_000),
            ("jobs.refresh_concurrency", self.jobs.refresh_concurrency as u64, 10_000),
            ("jobs.webhook_concurrency", self.jobs.webhook_concurrency as u64, 10_000),
        ] {
            if value > max {
                return Err(ConfigError::Invalid(format!("key `{key}`: must be at most {max}")));
            }
        }
        // Every active connection's provider is asked once per interval.
        if self.jobs.health_check_interval_secs < 60 {
            return Err(ConfigError::Invalid(
                "key `jobs.health_check_interval_secs`: must be at least 60 (each check is a call to the provider, \
                 which limits them)"
                    .into(),
            ));
        }
        if self.sandbox.control_api && self.is_https() {
            return Err(ConfigError::Invalid(
                "key `sandbox.control_api`: its endpoints take no credentials and move the service's clock; \
                 it is for tests and demos on an http public_url, not for an https deployment"
                    .into(),
            ));
        }
        if self.jobs.lease_secs <= self.providers.timeout_secs {
            return Err(ConfigError::Invalid(format!(
                "key `jobs.lease_secs`: must be longer than `providers.timeout_secs` ({}s), or no refresh could \
                 finish within its claim",
                self.providers.timeout_secs
            )));
        }
        let (tiktok, instagram) = (&self.providers.tiktok, &self.providers.instagram);
        // A disabled provider runs in neither mode, so its credentials are not checked.
        if tiktok.enabled {
            check_credentials(
                "tiktok",
                "TikTok",
                tiktok.sandbox,
                ("client_key", tiktok.client_key.as_deref()),
                tiktok.client_secret.as_ref(),
            )?;
        }
        if instagram.enabled {
            check_credentials(
                "instagram",
                "Instagram",
                instagram.sandbox,
                ("client_id", instagram.client_id.as_deref()),
                instagram.client_secret.as_ref(),
            )?;
        }
        check_required("tiktok", "user.info.basic", &tiktok.scopes, tiktok.required_scopes.as_deref())?;
        check_required(
            "instagram",
            "instagram_business_basic",
            &instagram.scopes,
            instagram.required_scopes.as_deref(),
        )?;
        let version = instagram.graph_api_version.strip_prefix('v').unwrap_or_default();
        let numbered = |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_digit());
        if !version.split_once('.').is_some_and(|(major, minor)| numbered(major) && numbered(minor)) {
            return Err(ConfigError::Invalid(
                "key `providers.instagram.graph_api_version`: must look like v23.0".into(),
            ));
        }
        // A live provider is sent the client secret, codes, verifiers and tokens at these: https,
        // or plain http to this host only (a provider simulated beside it). The sandbox ignores
        // them.
        let tiktok = self.providers.tiktok.enabled && !self.providers.tiktok.is_sandbox();
        let instagram = self.providers.instagram.enabled && !self.providers.instagram.is_sandbox();
        for (key, url, live) in [
            ("providers.tiktok.authorize_url", &self.providers.tiktok.authorize_url, tiktok),
            ("providers.tiktok.token_url", &self.providers.tiktok.token_url, tiktok),
            ("providers.tiktok.api_base_url", &self.providers.tiktok.api_base_url, tiktok),
            ("providers.instagram.authorize_url", &self.providers.instagram.authorize_url, instagram),
            ("providers.instagram.token_url", &self.providers.instagram.token_url, instagram),
            ("providers.instagram.graph_base_url", &self.providers.instagram.graph_base_url, instagram),
        ] {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::Invalid(format!("key `{key}`: must be an http or https URL")));
            }
            if live && url.scheme() == "http" && !is_loopback(url) {
                return Err(ConfigError::Invalid(format!(
                    "key `{key}`: must be an https URL (the provider is sent the app's secret, codes and \
                     tokens there); plain http only to a loopback host"
                )));
            }
        }
        Ok(())
    }

    /// Whether the public URL is https (cookies then get `Secure` and the `__Host-` prefix).
    pub fn is_https(&self) -> bool {
        self.public_url.scheme() == "https"
    }

    /// Whether the database is SQLite (else PostgreSQL: `validate` admits nothing else).
    pub fn is_sqlite(&self) -> bool {
        self.database_url.expose_secret().starts_with("sqlite:")
    }

    /// The absolute URL of a path under the public URL.
    pub fn public(&self, path: &str) -> String {
        format!("{}{}", self.public_url.as_str().trim_end_matches('/'), path)
    }

    /// The platforms offered by default on new links: every enabled provider.
    pub fn enabled_platforms(&self) -> Vec<Platform> {
        let mut out = Vec::new();
        if self.providers.tiktok.enabled {
            out.push(Platform::Tiktok);
        }
        if self.providers.instagram.enabled {
            out.push(Platform::Instagram);
        }
        out
    }

    /// The effective configuration with every secret replaced by `"********"` (or `null`).
    pub fn masked(&self) -> serde_json::Value {
        let mask = |s: &Option<SecretString>| s.as_ref().map(|_| "********");
        let tiktok = &self.providers.tiktok;
        let instagram = &self.providers.instagram;
        serde_json::json!({
            "public_url": self.public_url.as_str(),
            "listen": self.listen.to_string(),
            "database_url": mask_database_url(self.database_url.expose_secret()),
            "data_dir": self.data_dir.display().to_string(),
            "master_key": mask(&self.master_key),
            "master_key_file": self.master_key_file.as_ref().map(|p| p.display().to_string()),
            "retired_master_keys": self.retired_master_keys.iter().map(|_| "********").collect::<Vec<_>>(),
            "retired_master_key_files": self
                .retired_master_key_files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>(),
            "log_format": self.log_format,
            "http": self.http,
            "database": self.database,
            "sandbox": self.sandbox,
            "jobs": self.jobs,
            "webhooks": self.webhooks,
            "metrics": self.metrics,
            "providers": {
                "timeout_secs": self.providers.timeout_secs,
                "tiktok": {
                    "enabled": tiktok.enabled,
                    "mode": if tiktok.is_sandbox() { "sandbox" } else { "live" },
                    "client_key": tiktok.client_key,
                    "client_secret": mask(&tiktok.client_secret),
                    "scopes": tiktok.scopes,
                    "required_scopes": self.providers.required_scopes(Platform::Tiktok),
                    "authorize_url": tiktok.authorize_url.as_str(),
                    "token_url": tiktok.token_url.as_str(),
                    "api_base_url": tiktok.api_base_url.as_str(),
                    "redirect_uri": self.public("/oauth/tiktok/callback"),
                },
                "instagram": {
                    "enabled": instagram.enabled,
                    "mode": if instagram.is_sandbox() { "sandbox" } else { "live" },
                    "client_id": instagram.client_id,
                    "client_secret": mask(&instagram.client_secret),
                    "scopes": instagram.scopes,
                    "required_scopes": self.providers.required_scopes(Platform::Instagram),
                    "authorize_url": instagram.authorize_url.as_str(),
                    "token_url": instagram.token_url.as_str(),
                    "graph_base_url": instagram.graph_base_url.as_str(),
                    "graph_api_version": instagram.graph_api_version,
                    "meta_app_secret": mask(&instagram.meta_app_secret),
                    "redirect_uri": self.public("/oauth/instagram/callback"),
                    "deauthorize_callback_url": self.public("/oauth/instagram/deauthorize"),
                    "data_deletion_callback_url": self.public("/oauth/instagram/data-deletion"),
                },
            },
        })
    }
}

/// The database URL when none is configured: the SQLite file `authlink.db` in `data_dir`.
pub fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("authlink.db").display())
}

/// Hides the password of a database URL (`postgres://user:****@host/db`).
pub fn mask_database_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        // Not a URL: nothing can be told apart in it, so nothing of it is shown.
        return "(not a URL)".to_string();
    };
    // A user part holding an unencoded `/`, `?` or `#` ends the authority early, and what
    // follows it is read as a port, path, query or fragment: an `@` after the authority may end
    // a password the parser did not see as one. Only the scheme is shown then.
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if parsed.scheme() != "sqlite" && rest[authority_end..].contains('@') {
        return format!("{}://(hidden: the URL holds an `@` outside its user part)", parsed.scheme());
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("****"));
    }
    // libpq's parameters that carry a secret (PostgreSQL takes `password` in the query too).
    const SECRET: [&str; 3] = ["password", "sslpassword", "passfile"];
    if parsed.query_pairs().any(|(k, _)| SECRET.contains(&k.as_ref())) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if SECRET.contains(&k.as_ref()) { "****".to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Whether `name` (after `AUTHLINK_`) is one of the variables Kubernetes gives every pod for a
/// Service named `authlink` (`AUTHLINK_SERVICE_HOST`, `AUTHLINK_PORT_8080_TCP_ADDR`, ...): no
/// setting of ours, and no reason to refuse to start.
fn is_service_link(name: &str) -> bool {
    name == "PORT"
        || name.starts_with("PORT_")
        || name.starts_with("SERVICE_HOST")
        || name.starts_with("SERVICE_PORT")
}

/// An environment value: a `[a, b]` list, or a string that figment's lossy extraction turns into
/// a number or a boolean where the configuration expects one (so numeric-looking ids stay text).
fn parse_env_value(value: &str) -> figment::value::Value {
    use figment::value::Value;
    let trimmed = value.trim();
    if trimmed.starts_with('[') && trimmed.ends_with(']') {
        let inner = &trimmed[1..trimmed.len() - 1];
        let items: Vec<Value> = inner
            .split(',')
            .map(|s| s.trim().trim_matches('"'))
            .filter(|s| !s.is_empty())
            .map(Value::from)
            .collect();
        return Value::from(items);
    }
    Value::from(value.to_string())
}

/// A list setting that also takes a single value (`AUTHLINK_RETIRED_MASTER_KEYS=<key>` as well as
/// `[<key>, <key>]`).
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        Many(Vec<T>),
        One(T),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(v) => vec![v],
    })
}

fn describe_figment_error(e: figment::Error) -> String {
    use figment::error::{Actual, Kind};
    let key = if e.path.is_empty() { None } else { Some(e.path.join(".")) };
    // Values from the environment are merged as serialized values, which figment names by type:
    // the variable is named from the key. A file is named by its path.
    let source = e.metadata.as_ref().map(|m| match (&m.source, &key) {
        (Some(figment::Source::File(path)), _) => format!("{} {}", m.name, path.display()),
        (_, Some(k)) if m.name.starts_with("figment::") => {
            format!("the environment, AUTHLINK_{}", k.replace('.', "__").to_ascii_uppercase())
        }
        _ if m.name.starts_with("figment::") => "the environment".to_string(),
        _ => m.name.to_string(),
    });
    // Never the value itself: it may be a secret (a database URL with its password, a key) in
    // the wrong place or of the wrong type.
    let kind = match &e.kind {
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let found = match actual {
                Actual::Bool(_) => "a boolean",
                Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) => "a number",
                Actual::Char(_) | Actual::Str(_) | Actual::Bytes(_) => "a string",
                Actual::Seq => "a list",
                Actual::Map => "a table",
                _ => "another kind of value",
            };
            format!("invalid value: found {found}, expected {expected}")
        }
        // A TOML syntax error quotes the line it is on: only the position and the reason stay.
        Kind::Message(m) => m
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.starts_with('|')
                    || t.split_once(" |").is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit())))
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    match (key, source) {
        (Some(k), Some(s)) => format!("key `{k}` (from {s}): {kind}"),
        (Some(k), None) => format!("key `{k}`: {kind}"),
        (None, Some(s)) => format!("{kind} (from {s})"),
        (None, None) => kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load() {
        let c = Config::load_from(None, &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url.expose_secret(), "sqlite://authlink-data/authlink.db");
        assert!(c.providers.tiktok.is_sandbox());
        assert_eq!(c.providers.timeout_secs, 10);
        assert_eq!(c.public_url.as_str(), "http://127.0.0.1:8080/");
    }

    /// Neither a TOML syntax error nor a value of the wrong type shows the value: it may be a
    /// secret written in the wrong place.
    #[test]
    fn configuration_errors_never_show_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authlink.toml");
        std::fs::write(
            &path,
            "public_url = \"http://x.example\"\ndatabase_url = postgres://app:S3cret@db/x\n",
        )
        .unwrap();
        let e = Config::load_from(Some(&path), &[]).unwrap_err().to_string();
        assert!(!e.contains("S3cret") && e.contains("line 2"), "{e}");
        // The file is named by its path, the variable by its name.
        assert!(e.contains(&path.display().to_string()), "{e}");
        let e = Config::load_from(None, &env(&[("AUTHLINK_DATABASE", "postgres://u:pw-secret@h/db")]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw-secret") && e.contains("database"), "{e}");
        let e = Config::load_from(None, &env(&[("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS") && !e.contains("soon"), "{e}");
    }

    /// The variables Kubernetes gives the pods of a Service named `authlink` are no settings;
    /// a misspelt setting still stops start-up.
    #[test]
    fn service_link_variables_are_not_settings() {
        let links = env(&[
            ("AUTHLINK_SERVICE_HOST", "10.0.0.1"),
            ("AUTHLINK_SERVICE_PORT", "80"),
            ("AUTHLINK_SERVICE_PORT_HTTP", "80"),
            ("AUTHLINK_PORT", "tcp://10.0.0.1:80"),
            ("AUTHLINK_PORT_80_TCP_ADDR", "10.0.0.1"),
        ]);
        Config::load_from(None, &links).unwrap();
        let e = Config::load_from(None, &env(&[("AUTHLINK_PUBLIC_UR", "https://x.example")])).unwrap_err();
        assert!(e.to_string().contains("public_ur"), "{e}");
    }

    /// A live provider's endpoints are https (or plain http to a loopback host); a sandboxed
    /// one's are not used, and not judged.
    #[test]
    fn live_provider_endpoints_are_https() {
        let live = [
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "key"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET", "secret"),
        ];
        let with = |url: &str| {
            let mut pairs = env(&live);
            pairs.push(("AUTHLINK_PROVIDERS__TIKTOK__TOKEN_URL".into(), url.into()));
            Config::load_from(None, &pairs)
        };
        let e = with("http://open.tiktokapis.com/v2/oauth/token/").unwrap_err().to_string();
        assert!(e.contains("providers.tiktok.token_url") && e.contains("https"), "{e}");
        for ok in [
            "https://open.tiktokapis.com/v2/oauth/token/",
            "http://127.0.0.1:9/token/",
            "http://localhost/t",
            "http://localhost./t",
            "http://[::1]:9/t",
            "http://[::ffff:127.0.0.1]/t",
        ] {
            with(ok).unwrap();
        }
        let sandboxed = env(&[("AUTHLINK_PROVIDERS__TIKTOK__TOKEN_URL", "http://tiktok.example/token/")]);
        assert!(Config::load_from(None, &sandboxed).unwrap().providers.tiktok.is_sandbox());
    }

    #[test]
    fn one_active_master_key_only() {
        let both =
            env(&[("AUTHLINK_MASTER_KEY", "a2V5LW9uZQ=="), ("AUTHLINK_MASTER_KEY_FILE", "/k/master.key")]);
        let e = Config::load_from(None, &both).unwrap_err().to_string();
        assert!(e.contains("`master_key` and `master_key_file` are both set"), "{e}");
        assert!(!e.contains("a2V5"), "{e}");
        for one in [&both[..1], &both[1..]] {
            Config::load_from(None, one).unwrap();
        }
    }

    #[test]
    fn retired_master_keys_take_one_key_or_a_list_and_are_masked() {
        let one = Config::load_from(None, &env(&[("AUTHLINK_RETIRED_MASTER_KEYS", "a2V5LW9uZQ==")])).unwrap();
        assert_eq!(one.retired_master_keys.len(), 1);
        assert_eq!(one.retired_master_keys[0].expose_secret(), "a2V5LW9uZQ==");
        let many = Config::load_from(
            None,
            &env(&[("AUTHLINK_RETIRED_MASTER_KEYS", "[a2V5LW9uZQ==, a2V5LXR3bw==]")]),
        )
        .unwrap();
        let keys: Vec<&str> = many.retired_master_keys.iter().map(|k| k.expose_secret()).collect();
        assert_eq!(keys, ["a2V5LW9uZQ==", "a2V5LXR3bw=="]);
        let masked = many.masked().to_string();
        assert!(!masked.contains("a2V5") && masked.contains("retired_master_keys"));
        let files =
            Config::load_from(None, &env(&[("AUTHLINK_RETIRED_MASTER_KEY_FILES", "/k/old.key")])).unwrap();
        assert_eq!(files.retired_master_key_files, [PathBuf::from("/k/old.key")]);
        assert!(Config::load_from(None, &[]).unwrap().retired_master_keys.is_empty());
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = Config::load_from(
            None,
            &env(&[
                ("AUTHLINK_LISTEN", "0.0.0.0:9000"),
                ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "12345"),
                ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET", "s3cret"),
                ("AUTHLINK_HTTP__BODY_LIMIT_BYTES", "1000"),
                ("AUTHLINK_CONFIG", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.providers.tiktok.client_key.as_deref(), Some("12345"));
        assert!(!c.providers.tiktok.is_sandbox());
        assert_eq!(c.http.body_limit_bytes, 1000);
        let masked = c.masked().to_string();
        assert!(!masked.contains("s3cret"));
        assert!(masked.contains("********"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::load_from(None, &env(&[("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEYS", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_keys"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err =
            Config::load_from(None, &env(&[("AUTHLINK_PUBLIC_URL", "not a url")])).unwrap_err().to_string();
        assert!(err.contains("public_url"), "{err}");
        let err = Config::load_from(None, &env(&[("AUTHLINK_LISTEN", "nowhere")])).unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let err = Config::load_from(None, &env(&[("AUTHLINK_HTTP__BODY_LIMIT_BYTES", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("body_limit_bytes"), "{err}");
        let err =
            Config::load_from(None, &env(&[("AUTHLINK_DATABASE_URL", "mysql://x")])).unwrap_err().to_string();
        assert!(err.contains("database_url"), "{err}");
        let err =
            Config::load_from(None, &env(&[("AUTHLINK_JOBS__LEASE_SECS", "10")])).unwrap_err().to_string();
        assert!(err.contains("lease_secs") && err.contains("providers.timeout_secs"), "{err}");
    }

    #[test]
    fn private_networks_are_read_and_checked() {
        let config = Config::load_from(
            None,
            &env(&[("AUTHLINK_WEBHOOKS__PRIVATE_NETWORKS", "[10.20.0.0/16, 192.168.7.3, fd00::/8]")]),
        )
        .unwrap();
        let nets = config.webhooks.private_target_networks().unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[1].contains(&"192.168.7.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(
            matches!(config.webhooks.private_targets(), crate::net::PrivateTargets::Networks(n) if n.len() == 3)
        );
        let err = Config::load_from(None, &env(&[("AUTHLINK_WEBHOOKS__PRIVATE_NETWORKS", "[10.0.0.0/33]")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: key `webhooks.private_networks`: `10.0.0.0/33` is not an address or a network like 10.0.0.0/8"
        );
    }

    #[test]
    fn zero_sizes_and_timeouts_are_refused_naming_the_key() {
        for (var, key) in [
            ("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "http.request_timeout_secs"),
            ("AUTHLINK_HTTP__BODY_LIMIT_BYTES", "http.body_limit_bytes"),
            ("AUTHLINK_JOBS__TICK_MS", "jobs.tick_ms"),
            ("AUTHLINK_JOBS__LEASE_SECS", "jobs.lease_secs"),
            ("AUTHLINK_JOBS__REFRESH_BATCH", "jobs.refresh_batch"),
            ("AUTHLINK_JOBS__REFRESH_CONCURRENCY", "jobs.refresh_concurrency"),
            ("AUTHLINK_JOBS__WEBHOOK_BATCH", "jobs.webhook_batch"),
            ("AUTHLINK_JOBS__WEBHOOK_CONCURRENCY", "jobs.webhook_concurrency"),
            ("AUTHLINK_DATABASE__MAX_CONNECTIONS", "database.max_connections"),
            ("AUTHLINK_DATABASE__ACQUIRE_TIMEOUT_SECS", "database.acquire_timeout_secs"),
            ("AUTHLINK_DATABASE__STATEMENT_TIMEOUT_SECS", "database.statement_timeout_secs"),
            ("AUTHLINK_DATABASE__LOCK_TIMEOUT_SECS", "database.lock_timeout_secs"),
            ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "providers.timeout_secs"),
            ("AUTHLINK_WEBHOOKS__TIMEOUT_SECS", "webhooks.timeout_secs"),
            ("AUTHLINK_WEBHOOKS__RETENTION_DAYS", "webhooks.retention_days"),
            ("AUTHLINK_HTTP__LINK_REQUESTS_PER_MINUTE", "http.link_requests_per_minute"),
            ("AUTHLINK_HTTP__LINK_OPEN_ATTEMPTS", "http.link_open_attempts"),
            ("AUTHLINK_HTTP__API_REQUESTS_PER_MINUTE", "http.api_requests_per_minute"),
        ] {
            let err = Config::load_from(None, &env(&[(var, "0")])).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{var}: {err}");
            assert_eq!(err.to_string(), format!("invalid configuration: key `{key}`: must be positive"));
        }
    }

    #[test]
    fn settings_past_their_bounds_are_refused_naming_the_key() {
        let refused = |pairs: &[(&str, &str)]| Config::load_from(None, &env(pairs)).unwrap_err().to_string();
        for (var, key, max) in [
            ("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "http.request_timeout_secs", "86400"),
            ("AUTHLINK_HTTP__SHUTDOWN_GRACE_SECS", "http.shutdown_grace_secs", "86400"),
            ("AUTHLINK_JOBS__REFRESH_CONCURRENCY", "jobs.refresh_concurrency", "10000"),
            ("AUTHLINK_JOBS__WEBHOOK_CONCURRENCY", "jobs.webhook_concurrency", "10000"),
            ("AUTHLINK_JOBS__HEALTH_CHECK_INTERVAL_SECS", "jobs.health_check_interval_secs", "2592000"),
            ("AUTHLINK_JOBS__TICK_MS", "jobs.tick_ms", "3600000"),
        ] {
            assert_eq!(
                refused(&[(var, "18446744073709551615")]),
                format!("invalid configuration: key `{key}`: must be at most {max}")
            );
        }
        for interval in ["0", "59"] {
            let err = refused(&[("AUTHLINK_JOBS__HEALTH_CHECK_INTERVAL_SECS", interval)]);
            assert!(err.contains("key `jobs.health_check_interval_secs`: must be at least 60"), "{err}");
        }
        assert!(
            Config::load_from(None, &env(&[("AUTHLINK_JOBS__HEALTH_CHECK_INTERVAL_SECS", "60")])).is_ok()
        );
        // The unauthenticated sandbox control API is for http test and demo setups only.
        let err = refused(&[
            ("AUTHLINK_SANDBOX__CONTROL_API", "true"),
            ("AUTHLINK_PUBLIC_URL", "https://connect.example.com"),
        ]);
        assert!(err.contains("key `sandbox.control_api`"), "{err}");
        assert!(Config::load_from(None, &env(&[("AUTHLINK_SANDBOX__CONTROL_API", "true")])).is_ok());
    }

    #[test]
    fn provider_settings_every_connection_needs_are_checked() {
        let refused = |pairs: &[(&str, &str)]| Config::load_from(None, &env(pairs)).unwrap_err().to_string();
        for (var, value, key, needs) in [
            ("AUTHLINK_PROVIDERS__TIKTOK__SCOPES", "[user.info.profile]", "tiktok", "user.info.basic"),
            ("AUTHLINK_PROVIDERS__TIKTOK__SCOPES", "[]", "tiktok", "user.info.basic"),
            ("AUTHLINK_PROVIDERS__INSTAGRAM__SCOPES", "[]", "instagram", "instagram_business_basic"),
        ] {
            let err = refused(&[(var, value)]);
            assert!(err.contains(&format!("key `providers.{key}.scopes`: must include `{needs}`")), "{err}");
        }
        for version in ["23.0", "v23", "v23.x", "v.0", "latest"] {
            let err = refused(&[("AUTHLINK_PROVIDERS__INSTAGRAM__GRAPH_API_VERSION", version)]);
            assert!(err.contains("key `providers.instagram.graph_api_version`"), "{version}: {err}");
        }
        let c =
            Config::load_from(None, &env(&[("AUTHLINK_PROVIDERS__INSTAGRAM__GRAPH_API_VERSION", "v24.0")]));
        assert!(c.is_ok());
    }

    #[test]
    fn a_sqlite_url_must_name_a_writable_file() {
        for (url, why) in [
            ("sqlite://", "names no file"),
            ("sqlite:", "names no file"),
            ("sqlite://?mode=rwc", "names no file"),
            ("sqlite::memory:", "in-memory"),
            ("sqlite://data.db?mode=memory&cache=shared", "in-memory"),
            ("sqlite://data.db?mode=ro", "read-only"),
            ("sqlite:///var/lib/a.db?immutable=1", "read-only"),
            ("sqlite:///var/lib/a.db?immutable=true", "read-only"),
        ] {
            let err =
                Config::load_from(None, &env(&[("AUTHLINK_DATABASE_URL", url)])).unwrap_err().to_string();
            assert!(err.contains("key `database_url`") && err.contains(why), "{url}: {err}");
            assert!(!err.contains(url) || url.len() < 10, "the value is not echoed: {err}");
        }
        for url in ["sqlite://data.db", "sqlite:data.db", "sqlite:///var/lib/a.db?mode=rwc"] {
            assert!(Config::load_from(None, &env(&[("AUTHLINK_DATABASE_URL", url)])).is_ok(), "{url}");
        }
    }

    #[test]
    fn fuzzing_variables_are_not_settings() {
        let c =
            Config::load_from(None, &env(&[("AUTHLINK_FUZZ_POSTGRES_URL", "postgres://x@h/db")])).unwrap();
        assert_eq!(c.database_url.expose_secret(), "sqlite://authlink-data/authlink.db");
    }

    #[test]
    fn the_default_database_is_a_sqlite_file_in_data_dir() {
        let load = |pairs: &[(&str, &str)]| Config::load_from(None, &env(pairs)).unwrap();
        // From the environment, relative or absolute.
        let c = load(&[("AUTHLINK_DATA_DIR", "/var/lib/authlink")]);
        assert_eq!(c.database_url.expose_secret(), "sqlite:///var/lib/authlink/authlink.db");
        assert_eq!(
            c.masked()["database_url"],
            "sqlite:///var/lib/authlink/authlink.db",
            "config check shows it"
        );
        let c = load(&[("AUTHLINK_DATA_DIR", "state/")]);
        assert_eq!(c.database_url.expose_secret(), "sqlite://state/authlink.db");
        // From a TOML file, and a set `database_url` wins wherever it is set.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authlink.toml");
        std::fs::write(&path, "data_dir = \"/srv/authlink\"\n").unwrap();
        let c = Config::load_from(Some(&path), &[]).unwrap();
        assert_eq!(c.database_url.expose_secret(), "sqlite:///srv/authlink/authlink.db");
        let pg = "postgres://authlink@db.internal/authlink";
        let c = Config::load_from(Some(&path), &env(&[("AUTHLINK_DATABASE_URL", pg)])).unwrap();
        assert_eq!((c.database_url.expose_secret(), c.data_dir.as_path()), (pg, Path::new("/srv/authlink")));
        std::fs::write(&path, "database_url = \"sqlite://elsewhere/x.db\"\n").unwrap();
        let c = Config::load_from(Some(&path), &env(&[("AUTHLINK_DATA_DIR", "/srv/authlink")])).unwrap();
        assert_eq!(c.database_url.expose_secret(), "sqlite://elsewhere/x.db");
    }

    #[test]
    fn toml_file_is_layered_under_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authlink.toml");
        std::fs::write(
            &path,
            "public_url = \"https://links.example.com/\"\nlisten = \"127.0.0.1:7000\"\n[providers.instagram]\nclient_id = \"abc\"\nclient_secret = \"def\"\n",
        )
        .unwrap();
        let c = Config::load_from(Some(&path), &env(&[("AUTHLINK_LISTEN", "127.0.0.1:7001")])).unwrap();
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.public("/l/x"), "https://links.example.com/l/x");
        assert_eq!(c.providers.instagram.client_id.as_deref(), Some("abc"));
        assert!(c.is_https());
    }

    #[test]
    fn the_example_file_is_valid() {
        let c = Config::load_from(Some(Path::new("config.example.toml")), &[]).unwrap();
        assert!(!c.providers.tiktok.is_sandbox());
        assert_eq!(c.public("/oauth/tiktok/callback"), "https://links.example.com/oauth/tiktok/callback");
    }

    #[test]
    fn sandbox_mode_follows_the_setting_and_the_credentials() {
        let load = |pairs: &[(&str, &str)]| Config::load_from(None, &env(pairs));
        // Nothing set: the simulator, for both providers.
        let c = load(&[]).unwrap();
        assert!(c.providers.tiktok.is_sandbox() && c.providers.instagram.is_sandbox());
        assert_eq!(c.masked()["providers"]["tiktok"]["mode"], "sandbox");
        // Both credentials: live, with or without `sandbox = false`.
        let both = [
            ("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_ID", "17841"),
            ("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_SECRET", "ig-s3cret"),
        ];
        assert!(!load(&both).unwrap().providers.instagram.is_sandbox());
        let mut explicit = both.to_vec();
        explicit.push(("AUTHLINK_PROVIDERS__INSTAGRAM__SANDBOX", "false"));
        let c = load(&explicit).unwrap();
        assert!(!c.providers.instagram.is_sandbox());
        assert_eq!(c.masked()["providers"]["instagram"]["mode"], "live");
        // `sandbox = true` wins over any credentials, even half of them.
        explicit.push(("AUTHLINK_PROVIDERS__INSTAGRAM__SANDBOX", "true"));
        assert!(load(&explicit).unwrap().providers.instagram.is_sandbox());
        let c = load(&[
            ("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "true"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "ck"),
        ])
        .unwrap();
        assert!(c.providers.tiktok.is_sandbox());
    }

    #[test]
    fn live_mode_without_its_credentials_is_refused_naming_them() {
        let err = |pairs: &[(&str, &str)]| Config::load_from(None, &env(pairs)).unwrap_err().to_string();
        // `sandbox = false` and nothing else: both keys are named.
        let e = err(&[("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "false")]);
        assert!(
            e.contains("`providers.tiktok.client_key` and `providers.tiktok.client_secret`: are missing"),
            "{e}"
        );
        assert!(e.contains("sandbox = false") && e.contains("sandbox = true"), "{e}");
        // `sandbox = false` with half of them: the missing one is named, and no value is shown.
        let e = err(&[
            ("AUTHLINK_PROVIDERS__INSTAGRAM__SANDBOX", "false"),
            ("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_SECRET", "ig-s3cret-value"),
        ]);
        assert!(e.contains("`providers.instagram.client_id`: is missing"), "{e}");
        assert!(!e.contains("client_secret`") && !e.contains("ig-s3cret-value"), "{e}");
        // No `sandbox` setting and half of the credentials: refused too.
        let e = err(&[("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "ck")]);
        assert!(e.contains("`providers.tiktok.client_secret`: is missing"), "{e}");
        assert!(e.contains("only one of the two TikTok credentials"), "{e}");
        let e = err(&[("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_SECRET", "s")]);
        assert!(e.contains("`providers.instagram.client_id`: is missing"), "{e}");
        // A blank value counts as missing.
        let e = err(&[
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "ck"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET", "  "),
        ]);
        assert!(e.contains("`providers.tiktok.client_secret`: is missing"), "{e}");
        // The same from a TOML file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authlink.toml");
        std::fs::write(&path, "[providers.tiktok]\nsandbox = false\nclient_key = \"ck\"\n").unwrap();
        let e = Config::load_from(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("`providers.tiktok.client_secret`: is missing"), "{e}");
        // A disabled provider runs in neither mode: its credentials are not checked.
        assert!(
            Config::load_from(
                None,
                &env(&[
                    ("AUTHLINK_PROVIDERS__TIKTOK__ENABLED", "false"),
                    ("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "false"),
                ])
            )
            .is_ok()
        );
    }

    #[test]
    fn database_password_is_masked() {
        assert_eq!(mask_database_url("postgres://u:pw@localhost/db"), "postgres://u:****@localhost/db");
        assert_eq!(
            mask_database_url("postgres://h/db?sslmode=require&password=pw%21"),
            "postgres://h/db?sslmode=require&password=****"
        );
        assert_eq!(mask_database_url("sqlite://authlink.db?mode=rwc"), "sqlite://authlink.db?mode=rwc");
        assert_eq!(mask_database_url("sqlite:///srv/a@b/authlink.db"), "sqlite:///srv/a@b/authlink.db");
        assert_eq!(mask_database_url("://u:pw@h"), "(not a URL)");
        // Unencoded `@` in a password: the parser takes the last one as the end of the user part.
        assert_eq!(mask_database_url("postgres://u:p@ss@h/db"), "postgres://u:****@h/db");
        // Unencoded `/`, `?` or `#` in a password, read as a port and a path, a query or a
        // fragment: nothing of it is shown, nor of an `@` anywhere else.
        for url in [
            "postgres://u:12/34@h/db",
            "postgres://u:12?34@h/db",
            "postgres://u:12#34@h/db",
            "postgres://h/db?options=a@b",
            "postgres://u:12@34/56@h/db",
            "postgres://user@srv:12/34@h/db",
        ] {
            let masked = mask_database_url(url);
            assert!(masked.starts_with("postgres://(hidden"), "{url}: {masked}");
            assert!(!masked.contains("34") && !masked.contains("12") && !masked.contains("a@b"), "{masked}");
        }
    }

    #[test]
    fn required_scopes_default_to_all_asked_and_must_be_asked() {
        let c = Config::load_from(None, &[]).unwrap();
        assert_eq!(
            c.providers.required_scopes(Platform::Tiktok),
            vec!["user.info.basic", "user.info.profile"]
        );
        let c = Config::load_from(
            None,
            &env(&[("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[user.info.profile]")]),
        )
        .unwrap();
        // The basic scope is always required.
        assert_eq!(
            c.providers.required_scopes(Platform::Tiktok),
            vec!["user.info.basic", "user.info.profile"]
        );
        let c =
            Config::load_from(None, &env(&[("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[]")])).unwrap();
        assert_eq!(c.providers.required_scopes(Platform::Tiktok), vec!["user.info.basic"]);
        let err = Config::load_from(
            None,
            &env(&[(
                "AUTHLINK_PROVIDERS__INSTAGRAM__REQUIRED_SCOPES",
                "[instagram_business_content_publish]",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("providers.instagram.required_scopes") && err.contains("content_publish"),
            "{err}"
        );
    }
}
