//! The command line: the operator's surface.
//!
//! Every command prints a readable result, or JSON with `--json`. A failure prints one line,
//! `error: ...`, to standard error (with `--json`, one JSON object `{"error": {"kind",
//! "message", "fields"}}`), after the log lines the command wrote there, and exits non-zero (2
//! for configuration and usage mistakes, 1 otherwise).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::db::DbError;
use crate::domain::FieldError;
use crate::service::{self, Actor, Scope, ServiceError};
use crate::startup::{self, Application, StartupError};
use crate::state::AppState;

/// authlink issues secure, reusable authentication links through which clients connect their
/// TikTok and Instagram accounts to an agency's workspace.
#[derive(Debug, Parser)]
#[command(name = "authlink", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML). Default: ./authlink.toml when it exists.
    #[arg(long, global = true, env = "AUTHLINK_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text (results and errors; `serve` and `worker`
    /// print none: their logs are JSON with `log_format = "json"`).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (migrates the database first) and, unless `jobs.enabled = false`,
    /// the background jobs (token refresh, health checks, webhook delivery).
    Serve,
    /// Run only the background jobs (token refresh, health checks, webhook delivery). On
    /// PostgreSQL any number of workers and servers may run at once: they coordinate through the
    /// database. On SQLite run one `serve` or `worker` per database file.
    Worker,
    /// Apply the database migrations and exit.
    Migrate,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Make a new random master key (base64 of 32 bytes): printed, for AUTHLINK_MASTER_KEY, or
    /// with --output written to a new file (mode 0600), for master_key_file, so that it passes
    /// through no terminal and no shell history. Reads no configuration (it works while that is
    /// being edited).
    Keygen {
        /// Write the key to this new file (mode 0600) instead of printing it, and print its key id.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Master key rotation: which keys the stored secrets are sealed with, and re-sealing them
    /// with the current key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Write a consistent copy of the SQLite database to a new file, safe while authlink runs
    /// (on PostgreSQL, use pg_dump or the provider's snapshots). The copy holds sealed tokens:
    /// it is of use only with the master key, so keep the two apart.
    Backup {
        /// The file to write; it must not exist (it is created with mode 0600).
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
    },
    /// Replace the SQLite database with a copy made by `authlink backup`. Stop every authlink
    /// process using the database first (a restore refuses while another process has it open).
    /// The configured master key must open the copy, and the copy must not come from a newer
    /// authlink; the next start migrates an older one.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// Manage workspaces (agencies).
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Manage auth links.
    #[command(subcommand)]
    Link(LinkCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Inspect and manage connected accounts.
    #[command(subcommand)]
    Connection(ConnectionCommand),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage webhook endpoints.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Manage dashboard users (passwords are read from standard input or a prompt, never argv).
    #[command(subcommand)]
    User(UserCommand),
    /// Print the OpenAPI document of the JSON API. Reads no configuration.
    Openapi,
}

/// `authlink keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Show the active key, the earlier keys, how many stored secrets each key sealed, and the
    /// serve and worker processes on record with the key each seals with (those that stopped
    /// without saying so are marked "not running" until they are forgotten).
    Status,
    /// Seal every stored secret that is not sealed with the active master key (or is in the v1
    /// envelope, whose associated data does not name the workspace) again with it, then retire
    /// each earlier key no secret needs any more and no running process seals with (it may then
    /// be removed from the configuration). Safe while the service runs. Exits non-zero if any
    /// secret is left under another key or in the v1 envelope, or an earlier key stays because a
    /// process still seals with it.
    Rewrap {
        /// Rows re-sealed per transaction.
        #[arg(long, default_value_t = service::keys::DEFAULT_BATCH, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
}

/// `authlink config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration with secrets masked, where the master key comes from,
    /// and the OAuth callback URLs to register with each provider. Exits 2 when start-up would
    /// refuse the configuration (an https public URL or PostgreSQL without a master key).
    Check,
}

/// `authlink workspace ...`
#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace.
    Create {
        /// The agency's name.
        #[arg(long)]
        name: String,
        /// URL-friendly unique name (default: made from the name).
        #[arg(long)]
        slug: Option<String>,
        /// Name shown to clients (default: the name).
        #[arg(long)]
        display_name: Option<String>,
        /// Accent colour of client pages, like #4f46e5.
        #[arg(long)]
        accent_color: Option<String>,
        /// https URL of the logo: a PNG, JPEG, GIF or WebP image of at most 256 KB and 4096
        /// pixels a side. It is fetched now, and client pages show that copy.
        #[arg(long, value_name = "URL")]
        logo_url: Option<String>,
        /// Allowed success-redirect URL (origin + path prefix); repeat for several.
        #[arg(long = "allow-redirect", value_name = "URL")]
        allow_redirects: Vec<String>,
        /// Where the success page offers to send clients whose link names no redirect of its
        /// own (must be allowed by --allow-redirect).
        #[arg(long, value_name = "URL")]
        success_redirect: Option<String>,
    },
    /// List workspaces.
    List,
    /// Show one workspace (by id or slug).
    Show {
        /// Workspace id or slug.
        id: String,
    },
}

/// `authlink link ...`
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Create a link and print its URL.
    Create(LinkCreateArgs),
    /// List the links of a workspace, newest first.
    List {
        /// Workspace id or slug.
        #[arg(long)]
        workspace: String,
        /// Only links whose label or client reference contains this text.
        #[arg(long)]
        search: Option<String>,
        /// Most links to show (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// Show one link with every field.
    Show {
        /// Link id.
        id: String,
    },
    /// Change a link: only what is given changes. Accounts already connected stay connected.
    Update(LinkUpdateArgs),
    /// Revoke a link: it stops working at once.
    Revoke {
        /// Link id.
        id: String,
    },
    /// Give a link a new URL; the old URL stops working at once.
    Rotate {
        /// Link id.
        id: String,
    },
    /// List the connect attempts made through a link, newest first: how each ended, and the
    /// reference its client's page showed. Attempts are kept for 30 days after they expired.
    Attempts {
        /// Link id.
        id: String,
        /// Most attempts to show (1 to 10000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
}

/// Arguments of `link create`.
#[derive(Debug, Args)]
pub struct LinkCreateArgs {
    /// Workspace id or slug.
    #[arg(long)]
    pub workspace: String,
    /// Normally the client's name.
    #[arg(long)]
    pub label: String,
    /// A platform to offer (tiktok, instagram); repeat for several. Default: every enabled one.
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// Lifetime, like 30d, 12h or 2w. Default: no expiry.
    #[arg(long, value_name = "DURATION")]
    pub expires_in: Option<String>,
    /// Most successful connections through the link; once reached, it still reconnects the
    /// accounts it connected, but connects no new one.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_uses: Option<i64>,
    /// Where to send the client after connecting (must be in the workspace's allow-list).
    #[arg(long, value_name = "URL")]
    pub redirect_url: Option<String>,
    /// The agency's own reference for the client.
    #[arg(long, value_name = "REF")]
    pub client_ref: Option<String>,
    /// Do not list the accounts already connected through the link on its landing page (for
    /// links shared with many people).
    #[arg(long)]
    pub hide_connections: bool,
}

/// Arguments of `link update`.
#[derive(Debug, Args)]
pub struct LinkUpdateArgs {
    /// Link id.
    pub id: String,
    /// New label.
    #[arg(long)]
    pub label: Option<String>,
    /// New client reference.
    #[arg(long, value_name = "REF", conflicts_with = "no_client_ref")]
    pub client_ref: Option<String>,
    /// Remove the client reference.
    #[arg(long)]
    pub no_client_ref: bool,
    /// The platforms to offer (repeat for several); replaces the list.
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// A new lifetime from now, like 30d, 12h or 2w.
    #[arg(long, value_name = "DURATION", conflicts_with = "no_expiry")]
    pub expires_in: Option<String>,
    /// Remove the expiry.
    #[arg(long)]
    pub no_expiry: bool,
    /// A new use limit (at or below the uses so far, the link only repairs its accounts).
    #[arg(long, value_name = "N", allow_negative_numbers = true, conflicts_with = "no_max_uses")]
    pub max_uses: Option<i64>,
    /// Remove the use limit.
    #[arg(long)]
    pub no_max_uses: bool,
    /// A new success redirect (must be in the workspace's allow-list).
    #[arg(long, value_name = "URL", conflicts_with = "no_redirect_url")]
    pub redirect_url: Option<String>,
    /// Remove the success redirect.
    #[arg(long)]
    pub no_redirect_url: bool,
    /// Stop listing the accounts connected through the link on its page.
    #[arg(long, conflicts_with = "show_connections")]
    pub hide_connections: bool,
    /// List them again.
    #[arg(long)]
    pub show_connections: bool,
}

impl LinkUpdateArgs {
    /// The change, with `now` for a lifetime given as a duration.
    fn change(self, now: time::OffsetDateTime) -> Result<(String, service::links::LinkUpdate), CliError> {
        let either = |value: Option<String>, clear: bool| match (value, clear) {
            (Some(v), _) => Some(Some(v)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let expires_at = match (self.expires_in, self.no_expiry) {
            (Some(d), _) => Some(Some(
                now + crate::domain::parse_duration("expires_in", &d)
                    .map_err(|e| CliError::from(ServiceError::Validation(vec![e])))?,
            )),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let change = service::links::LinkUpdate {
            label: self.label,
            client_ref: either(self.client_ref, self.no_client_ref),
            expires_at,
            expires_in: None,
            redirect_url: either(self.redirect_url, self.no_redirect_url),
            hide_connections: match (self.hide_connections, self.show_connections) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            platforms: (!self.platforms.is_empty()).then_some(self.platforms),
            max_uses: match (self.max_uses, self.no_max_uses) {
                (Some(m), _) => Some(Some(m)),
                (None, true) => Some(None),
                (None, false) => None,
            },
        };
        let nothing = change.label.is_none()
            && change.client_ref.is_none()
            && change.expires_at.is_none()
            && change.redirect_url.is_none()
            && change.hide_connections.is_none()
            && change.platforms.is_none()
            && change.max_uses.is_none();
        if nothing {
            return Err(CliError::new(2, "nothing to change: give at least one option (see --help)"));
        }
        Ok((self.id, change))
    }
}

/// `authlink apikey ...`
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key and print it once.
    Create {
        /// The workspace the key is limited to (id or slug); required unless --admin.
        #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
        workspace: Option<String>,
        /// Make a platform-admin key that spans every workspace.
        #[arg(long)]
        admin: bool,
        /// A name to recognise the key by.
        #[arg(long)]
        name: Option<String>,
    },
    /// List API keys (never the keys themselves).
    List {
        /// Only the keys of this workspace (id or slug).
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Revoke an API key.
    Revoke {
        /// API key id.
        id: String,
    },
}

/// `authlink connection ...`
#[derive(Debug, Subcommand)]
pub enum ConnectionCommand {
    /// List the connections of a workspace, newest first.
    List {
        /// Workspace id or slug.
        #[arg(long)]
        workspace: String,
        /// Only this status: active, broken or disconnected.
        #[arg(long)]
        status: Option<String>,
        /// Only this platform: tiktok or instagram.
        #[arg(long)]
        provider: Option<String>,
        /// Only the connections made (or last repaired) through this link (id).
        #[arg(long, value_name = "LINK_ID")]
        link: Option<String>,
        /// The next page: the connections after this one (the last id of the previous page).
        #[arg(long, value_name = "CONNECTION_ID")]
        before: Option<String>,
        /// Most connections to show (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// Show one connection with its history (never its tokens).
    Show {
        /// Connection id.
        id: String,
    },
    /// Revoke the grant at the provider where possible and mark the connection disconnected.
    ///
    /// Fails, the connection left connected, while the provider cannot revoke the grant
    /// (unreachable, rate-limited, failing, or refusing authlink's credentials) or the access
    /// token cannot be refreshed first, and when the client reconnects the account meanwhile.
    Disconnect {
        /// Connection id.
        id: String,
    },
    /// Print a valid access token, refreshing it first when it would expire within 5 minutes.
    Token {
        /// Connection id.
        id: String,
    },
    /// Refresh the tokens now (waits for a refresh already running elsewhere). A token the
    /// provider does not refresh yet (Instagram: under 24 hours old) is left as it is: the outcome
    /// is `too_early`, which is not a failure; nor is `broken` (the grant is dead: the outcome says
    /// why). Exits 1 when the provider could not be asked for now (`transient`).
    Refresh {
        /// Connection id.
        id: String,
    },
    /// Run the health check now (a profile call that catches revoked grants). Exits 0 whatever
    /// the verdict (`current`, `refreshed`, or `broken` with the reason); 1 when the provider
    /// could not be asked for now (`transient`).
    Check {
        /// Connection id.
        id: String,
    },
}

/// `authlink webhook ...`
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Add an endpoint and print its id and signing secret (shown once).
    Add {
        /// Workspace id or slug.
        #[arg(long)]
        workspace: String,
        /// The https URL events are POSTed to.
        #[arg(long)]
        url: String,
        /// An event type to send (repeat for several). Default: all.
        #[arg(long = "event", value_name = "EVENT")]
        events: Vec<String>,
        /// A note.
        #[arg(long)]
        description: Option<String>,
    },
    /// List endpoints.
    List {
        /// Only this workspace (id or slug).
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Turn deliveries back on for an endpoint (one disabled by the agency, or automatically
    /// after a 410 or deliveries that used up their retries).
    Enable {
        /// Endpoint id.
        id: String,
    },
    /// Stop deliveries to an endpoint; pending ones are cancelled.
    Disable {
        /// Endpoint id.
        id: String,
    },
    /// Remove an endpoint (its delivery log stays).
    Remove {
        /// Endpoint id.
        id: String,
    },
    /// Send a test event and wait up to 15 s for a running server or worker to deliver it.
    Test {
        /// Endpoint id.
        id: String,
    },
    /// Show the delivery log of an endpoint.
    Deliveries {
        /// Endpoint id.
        id: String,
        /// Most deliveries to show (1 to 200).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=200))]
        limit: i64,
    },
    /// Deliver an event again now (same webhook-id).
    Redeliver {
        /// Delivery id.
        id: String,
    },
    /// Rotate the signing secret and print the new one (the old one signs too for 24 h). Refused
    /// within 24 h of the last rotation, unless --stop-current-now.
    RotateSecret {
        /// Endpoint id.
        id: String,
        /// The current secret leaked: it stops signing now (and so does one rotated out less than
        /// a day ago); allowed at any time.
        #[arg(long)]
        stop_current_now: bool,
    },
}

/// `authlink audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit entries, newest first.
    List {
        /// Only this workspace (id or slug).
        #[arg(long)]
        workspace: Option<String>,
        /// Only this action, e.g. link.revoked.
        #[arg(long)]
        action: Option<String>,
        /// Most entries to show (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
}

/// A failure of a command, with its exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
    /// A stable name of the kind of failure, for `--json`.
    kind: &'static str,
    /// The fields at fault, for validation failures.
    fields: Vec<FieldError>,
}

impl CliError {
    /// A failure with exit `code` (2: a usage or configuration mistake, 1: anything else).
    fn new(code: u8, message: impl Into<String>) -> Self {
        let kind = if code == 2 { "usage" } else { "failed" };
        CliError { message: message.into(), code, kind, fields: Vec::new() }
    }

    /// The same failure under another `kind`.
    fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    /// Reports the failure on standard error: one line, or with `--json` one JSON object
    /// `{"error": {"kind", "message", "fields"?}}`, so that a script reading JSON gets JSON.
    fn report(&self, json: bool) {
        if json {
            let mut error = serde_json::json!({"kind": self.kind, "message": self.message});
            if !self.fields.is_empty() {
                error["fields"] = serde_json::json!(self.fields);
            }
            eprintln!("{}", serde_json::json!({ "error": error }));
        } else {
            eprintln!("error: {}", self.message);
        }
    }
}

/// The command-line flag of a field the service names (the API's name): a message names the
/// flag the user typed.
fn flag_of(field: &str) -> String {
    let field = field.strip_prefix("branding.").unwrap_or(field);
    match field {
        "platforms" => "platform".into(),
        "events" => "event".into(),
        "allowed_redirects" => "allow-redirect".into(),
        "workspace_id" => "workspace".into(),
        other => other.replace('_', "-"),
    }
}

/// An id given on the command line, checked as the API checks it (lower case, so that SQLite and
/// PostgreSQL compare it alike): a mistyped one is a usage mistake, not an empty listing.
fn id_flag(flag: &str, value: Option<String>) -> Result<Option<String>, CliError> {
    match value {
        Some(v) if !crate::db::is_id(&v) => Err(ServiceError::Validation(vec![FieldError::new(
            flag,
            "must be an id (8-4-4-4-12 hexadecimal digits)",
        )])
        .into()),
        Some(v) => Ok(Some(v.to_ascii_lowercase())),
        None => Ok(None),
    }
}

impl From<ServiceError> for CliError {
    fn from(e: ServiceError) -> Self {
        let message = match &e {
            ServiceError::Validation(errors) => errors
                .iter()
                .map(|e| match e.field.as_str() {
                    // Read from standard input or a prompt, never from a flag.
                    "password" => format!("the password: {}", e.message),
                    field => format!("--{}: {}", flag_of(field), e.message),
                })
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        };
        let kind = match &e {
            ServiceError::NotFound(_) => "not_found",
            ServiceError::Validation(_) => "validation_failed",
            ServiceError::Forbidden(_) => "forbidden",
            ServiceError::Conflict(_) | ServiceError::Stale(_) | ServiceError::Db(DbError::Conflict(_)) => {
                "conflict"
            }
            ServiceError::Unavailable(_) => "provider_unavailable",
            ServiceError::Db(DbError::Unavailable(_)) => "database_unavailable",
            _ => "internal",
        };
        let fields = match e {
            ServiceError::Validation(errors) => errors,
            _ => Vec::new(),
        };
        // A value the operator gave that does not pass is a usage mistake.
        let code = if kind == "validation_failed" { 2 } else { 1 };
        CliError { message, code, kind, fields }
    }
}

impl From<StartupError> for CliError {
    fn from(e: StartupError) -> Self {
        let code = e.exit_code();
        CliError {
            message: e.to_string(),
            code,
            kind: if code == 2 { "configuration" } else { "startup" },
            fields: Vec::new(),
        }
    }
}

impl From<crate::db::backup::BackupError> for CliError {
    fn from(e: crate::db::backup::BackupError) -> Self {
        CliError::new(if e.is_usage() { 2 } else { 1 }, e.to_string())
    }
}

type CliResult = Result<(), CliError>;

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.json;
    let result = match without_configuration(&cli) {
        Some(result) => result,
        None => {
            let config = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    CliError::new(2, e.to_string()).kind("configuration").report(json);
                    return ExitCode::from(2);
                }
            };
            crate::telemetry::init(config.log_format);
            dispatch(cli, config).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            e.report(json);
            ExitCode::from(e.code)
        }
    }
}

/// The commands that need no configuration, run without reading it, so that they work where it
/// is missing, broken or half-edited (a new master key made in the middle of a key rotation);
/// `None` for the others.
fn without_configuration(cli: &Cli) -> Option<CliResult> {
    match &cli.command {
        Command::Keygen { output } => Some(keygen(cli.json, output.as_deref())),
        Command::Openapi => Some(openapi()),
        _ => None,
    }
}

/// `authlink openapi`.
fn openapi() -> CliResult {
    out(serde_json::to_string_pretty(&crate::http::api::openapi()).unwrap_or_default());
    Ok(())
}

/// `authlink keygen [--output FILE]`.
fn keygen(json: bool, output: Option<&std::path::Path>) -> CliResult {
    use secrecy::ExposeSecret;
    let Some(path) = output else {
        let (_, key) = crate::crypto::KeyRing::generate();
        print(json, &serde_json::json!({"master_key": key.expose_secret()}), |_| {
            key.expose_secret().to_string()
        });
        return Ok(());
    };
    // A new file only: an existing key file may be the one the data is sealed with.
    if path.symlink_metadata().is_ok() {
        return Err(CliError::new(
            2,
            format!("{} already exists: a key file is never overwritten", path.display()),
        ));
    }
    let ring = crate::crypto::KeyRing::create_file(path).map_err(|e| CliError::new(1, e.to_string()))?;
    let kid = ring.active_kid().to_string();
    print(json, &serde_json::json!({"master_key_file": path, "kid": kid}), |_| {
        format!(
            "master key {kid} written to {} (mode 0600): set AUTHLINK_MASTER_KEY_FILE={}",
            path.display(),
            path.display()
        )
    });
    Ok(())
}

/// Says, on standard error and off the listing, that a listing as long as its `--limit` may have
/// more entries than it shows.
fn more_may_follow(json: bool, shown: usize, limit: i64) {
    if !json && i64::try_from(shown).is_ok_and(|n| n >= limit) {
        eprintln!("more may follow: the listing stopped at --limit {limit}");
    }
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        out(serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        out(human(value));
    }
}

/// Writes a line to standard output. A reader that went away before the end
/// (`authlink openapi | head`) is no error: what it did not read, it did not want. Any other
/// failure is said on standard error (`println!` would panic on either).
fn out(text: impl std::fmt::Display) {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: cannot write to standard output: {e}");
        }
        _ => {}
    }
}

async fn state(config: Config) -> Result<AppState, CliError> {
    Ok(startup::build_state(config).await?)
}

async fn dispatch(cli: Cli, config: Config) -> CliResult {
    let json = cli.json;
    match cli.command {
        Command::Serve => {
            let app = Application::build(config).await?;
            app.run_until_stopped().await.map_err(|e| CliError::new(1, format!("server failed: {e}")))
        }
        Command::Migrate => {
            startup::open_database(&config).await?;
            print(json, &serde_json::json!({"migrated": true}), |_| "database is up to date".into());
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            let mut masked = config.masked();
            masked["master_key_source"] = startup::key_source(&config)?.into();
            // Every key that is set, retired ones and a development key file included, must read
            // as one (what `serve` would refuse, this refuses too); with none at all yet, a
            // development setup makes one at its first start.
            match startup::load_existing_keyring(&config) {
                Ok(_) => {}
                Err(StartupError::NoKey { .. }) if startup::production_setup(&config).is_none() => {
                    startup::check_retired_keys(&config)?;
                }
                Err(e) => return Err(e.into()),
            }
            if json {
                out(serde_json::to_string_pretty(&masked).unwrap_or_default());
            } else {
                out("configuration is valid\n");
                out(serde_json::to_string_pretty(&masked).unwrap_or_default());
                out("\nRegister these callback URLs in the providers' developer consoles:");
                for (what, path) in [
                    ("TikTok redirect URI", "/oauth/tiktok/callback"),
                    ("Instagram redirect URI", "/oauth/instagram/callback"),
                    ("Instagram deauthorize callback", "/oauth/instagram/deauthorize"),
                    ("Instagram data deletion request callback", "/oauth/instagram/data-deletion"),
                ] {
                    out(format_args!("  {what}: {}", config.public(path)));
                }
            }
            Ok(())
        }
        // (Run without reading the configuration: see `without_configuration`.)
        Command::Keygen { output } => keygen(json, output.as_deref()),
        Command::Openapi => openapi(),
        Command::Backup { output } => backup(&config, json, output).await,
        Command::Restore { from } => restore(&config, json, from).await,
        Command::Keys(cmd) => keys(state(config).await?, json, cmd).await,
        Command::Workspace(cmd) => workspace(state(config).await?, json, cmd).await,
        Command::Link(cmd) => link(state(config).await?, json, cmd).await,
        Command::Apikey(cmd) => apikey(state(config).await?, json, cmd).await,
        Command::Connection(cmd) => connection(state(config).await?, json, cmd).await,
        Command::Audit(cmd) => audit(state(config).await?, json, cmd).await,
        Command::Webhook(cmd) => webhook(state(config).await?, json, cmd).await,
        Command::User(cmd) => user(config, json, cmd).await,
        Command::Worker => {
            let state = state(config).await?;
            startup::run_worker(state).await.map_err(|e| CliError::new(1, format!("worker failed: {e}")))
        }
    }
}

/// The SQLite file of the configured database, for `backup` and `restore`.
fn sqlite_file(config: &Config, command: &str) -> Result<PathBuf, CliError> {
    use secrecy::ExposeSecret;
    crate::db::sqlite_path(config.database_url.expose_secret()).ok_or_else(|| {
        let message = if config.is_sqlite() {
            format!("`authlink {command}` needs a SQLite database in a file, and `database_url` names none")
        } else {
            format!(
                "`authlink {command}` is for SQLite; on PostgreSQL use pg_dump and pg_restore (or the \
                 provider's snapshots), and keep the master key apart from the dump"
            )
        };
        CliError::new(2, message).kind("configuration")
    })
}

/// Runs blocking file work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::db::backup::BackupError> + Send + 'static,
) -> Result<T, CliError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CliError::new(1, format!("internal error: {e}")))?
        .map_err(CliError::from)
}

/// The keys a backup needs, in words.
fn keys_needed(summary: &crate::db::backup::Summary) -> String {
    let kids: Vec<&str> = summary.keys.iter().filter(|k| !k.retired).map(|k| k.kid.as_str()).collect();
    match kids.as_slice() {
        [] => "no master key yet (nothing is sealed in it)".into(),
        [one] => format!("the master key with id {one}"),
        more => format!("the master keys with ids {}", more.join(", ")),
    }
}

async fn backup(config: &Config, json: bool, output: PathBuf) -> CliResult {
    let db = sqlite_file(config, "backup")?;
    let summary = blocking(move || crate::db::backup::backup(&db, &output)).await?;
    print(json, &summary, |s| {
        format!(
            "backup written to {} ({} bytes, schema version {}): {}.\n\
             Its sealed tokens open only with {}: keep that key, and keep it apart from the backup.",
            s.path.display(),
            s.bytes,
            s.schema_version,
            s.contents(),
            keys_needed(s)
        )
    });
    Ok(())
}

async fn restore(config: &Config, json: bool, from: PathBuf) -> CliResult {
    let db = sqlite_file(config, "restore")?;
    // Everything is checked before the database is touched.
    let keys = startup::load_existing_keyring(config)?;
    let summary = blocking({
        let from = from.clone();
        move || crate::db::backup::inspect(&from)
    })
    .await?;
    let known = crate::db::sqlite_schema_version();
    if summary.schema_version > known {
        return Err(CliError::new(
            2,
            format!(
                "{} was made by a newer authlink (schema version {}; this one knows up to {known}): restore it \
                 with that version",
                from.display(),
                summary.schema_version
            ),
        ));
    }
    let checks: Vec<startup::StoredKey<'_>> = summary
        .keys
        .iter()
        .map(|k| startup::StoredKey { kid: &k.kid, check_value: &k.check_value, retired: k.retired })
        .collect();
    startup::verify_keyring(&keys, &checks)?;
    // As start-up would find at the next start: values sealed with a key that is not configured
    // (retired by a re-wrap, then sealed with again by a process still running with it).
    let missing: Vec<&str> =
        summary.sealed_with.iter().filter(|kid| !keys.has_kid(kid)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(StartupError::KeyStillNeeded { kids: missing.join(", ") }.into());
    }
    // Said whole, and said when new: a relative data folder read from another working directory
    // restores into a new file beside it, not into the database the service uses.
    let new = !db.exists();
    let target = db.clone();
    blocking(move || crate::db::backup::restore(&from, &target)).await?;
    let db = std::fs::canonicalize(&db).unwrap_or(db);
    tracing::warn!(database = %db.display(), backup = %summary.path.display(), new, "database restored from a backup");
    print(json, &serde_json::json!({"restored": &summary, "database": db, "new_file": new}), |_| {
        format!(
            "{} restored from {}: {} (schema version {}; the next start migrates it when older).{}",
            db.display(),
            summary.path.display(),
            summary.contents(),
            summary.schema_version,
            if new { " The database file did not exist before: it is a new one." } else { "" }
        )
    });
    Ok(())
}

fn ts(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

async fn workspace(app: AppState, json: bool, cmd: WorkspaceCommand) -> CliResult {
    use service::workspaces::{self, Branding, NewWorkspace, WorkspaceView};
    let describe = |w: &WorkspaceView| {
        format!(
            "{}  {}  (slug {})\n  display name: {}\n  logo: {}\n  accent colour: {}\n  allowed redirects: {}\n  default success redirect: {}",
            w.id,
            w.name,
            w.slug,
            w.branding.display_name.as_deref().unwrap_or("-"),
            w.branding.logo_url.as_deref().unwrap_or("-"),
            w.branding.accent_color.as_deref().unwrap_or("-"),
            if w.allowed_redirects.is_empty() { "-".into() } else { w.allowed_redirects.join(", ") },
            w.success_redirect.as_deref().unwrap_or("-")
        )
    };
    match cmd {
        WorkspaceCommand::Create {
            name,
            slug,
            display_name,
            accent_color,
            logo_url,
            allow_redirects,
            success_redirect,
        } => {
            let w = workspaces::create(
                &app,
                &Actor::Cli,
                &Scope::Admin,
                NewWorkspace {
                    name,
                    slug,
                    branding: Some(Branding { display_name, logo_url, accent_color }),
                    allowed_redirects: Some(allow_redirects),
                    success_redirect,
                },
            )
            .await?;
            print(json, &w, |w| describe(w));
        }
        WorkspaceCommand::List => {
            let list = workspaces::list(&app, &Scope::Admin, None, 10_000).await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    return "no workspaces yet: create one with `authlink workspace create --name NAME`"
                        .into();
                }
                list.iter()
                    .map(|w| format!("{}  {:<24}  {}", w.id, w.slug, w.name))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        WorkspaceCommand::Show { id } => {
            let w = workspaces::get(&app, &Scope::Admin, &id).await?;
            print(json, &w, |w| describe(w));
        }
    }
    Ok(())
}

async fn workspace_id(app: &AppState, key: &str) -> Result<String, CliError> {
    match service::workspaces::get_row(app, &Scope::Admin, key).await {
        Ok(w) => Ok(w.id),
        Err(ServiceError::NotFound(_)) => {
            Err(CliError::new(1, format!("--workspace: no workspace with id or slug `{key}`"))
                .kind("not_found"))
        }
        Err(e) => Err(e.into()),
    }
}

async fn link(app: AppState, json: bool, cmd: LinkCommand) -> CliResult {
    use service::links::{self, LinkView, ListQuery, NewLink};
    let describe = |l: &LinkView| {
        format!(
            "{}\n  id: {}\n  workspace: {}\n  label: {}\n  client ref: {}\n  platforms: {}\n  status: {}\n  expires: {}\n  uses: {}{}\n  last used: {}\n  redirect: {}\n  created: {} by {}\n  revoked: {}\n  rotated: {}\n  connections on the page: {}",
            l.url,
            l.id,
            l.workspace_id,
            l.label,
            l.client_ref.as_deref().unwrap_or("-"),
            l.platforms.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "),
            l.status.as_str(),
            ts(l.expires_at),
            l.use_count,
            l.max_uses.map(|m| format!(" of {m}")).unwrap_or_default(),
            ts(l.last_used_at),
            l.redirect_url.as_deref().unwrap_or("-"),
            ts(Some(l.created_at)),
            l.created_by,
            ts(l.revoked_at),
            ts(l.rotated_at),
            if l.hide_connections { "hidden" } else { "listed" },
        )
    };
    match cmd {
        LinkCommand::Create(a) => {
            let workspace = workspace_id(&app, &a.workspace).await?;
            let l = links::create(
                &app,
                &Actor::Cli,
                &Scope::Admin,
                NewLink {
                    workspace_id: Some(workspace),
                    label: a.label,
                    client_ref: a.client_ref,
                    platforms: if a.platforms.is_empty() { None } else { Some(a.platforms) },
                    expires_in: a.expires_in,
                    expires_at: None,
                    max_uses: a.max_uses,
                    redirect_url: a.redirect_url,
                    hide_connections: Some(a.hide_connections),
                },
            )
            .await?;
            print(json, &l, |l| l.url.clone());
        }
        LinkCommand::List { workspace, search, limit } => {
            let workspace = workspace_id(&app, &workspace).await?;
            let list = links::list(
                &app,
                &Scope::Admin,
                &ListQuery { workspace_id: Some(workspace), search, before: None, limit },
            )
            .await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    return "no links".into();
                }
                list.iter()
                    .map(|l| {
                        format!(
                            "{}  {:<8}  uses {:<4}  {}  {}",
                            l.id,
                            l.status.as_str(),
                            l.use_count,
                            l.label,
                            l.url
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            more_may_follow(json, list.len(), limit);
        }
        LinkCommand::Show { id } => {
            let l = links::get(&app, &Scope::Admin, &id).await?;
            print(json, &l, |l| describe(l));
        }
        LinkCommand::Update(a) => {
            let (id, change) = a.change(app.now())?;
            let l = links::update(&app, &Actor::Cli, &Scope::Admin, &id, change).await?;
            print(json, &l, |l| describe(l));
        }
        LinkCommand::Revoke { id } => {
            let l = links::revoke(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &l, |l| format!("revoked link {}", l.id));
        }
        LinkCommand::Rotate { id } => {
            let l = links::rotate(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &l, |l| l.url.clone());
        }
        LinkCommand::Attempts { id, limit } => {
            let list = service::attempts::of_link(&app, &Scope::Admin, &id, None, limit).await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    return "no attempts".into();
                }
                list.iter()
                    .map(|a| {
                        format!(
                            "{}  {}  {:<9}  {:<11}  {}",
                            a.reference,
                            a.started_at
                                .format(&time::format_description::well_known::Rfc3339)
                                .unwrap_or_default(),
                            a.provider,
                            a.status.as_str(),
                            a.description
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

async fn apikey(app: AppState, json: bool, cmd: ApiKeyCommand) -> CliResult {
    use service::api_keys::{self, NewApiKey};
    match cmd {
        ApiKeyCommand::Create { workspace, admin, name } => {
            let workspace_id = match workspace {
                Some(w) => Some(workspace_id(&app, &w).await?),
                None => None,
            };
            let k =
                api_keys::create(&app, &Actor::Cli, &Scope::Admin, NewApiKey { workspace_id, admin, name })
                    .await?;
            print(json, &k, |k| {
                format!(
                    "{}\n\nThis is the only time the key is shown. Store it now. (id {})",
                    k.secret, k.key.id
                )
            });
        }
        ApiKeyCommand::List { workspace } => {
            let scope = match workspace {
                Some(w) => Scope::Workspace(workspace_id(&app, &w).await?),
                None => Scope::Admin,
            };
            let list = api_keys::list(&app, &scope, None).await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    return "no API keys".into();
                }
                list.iter()
                    .map(|k| {
                        format!(
                            "{}  {}…  {:<10}  {}  {}",
                            k.id,
                            k.prefix,
                            if k.revoked_at.is_some() { "revoked" } else { "active" },
                            k.workspace_id.as_deref().unwrap_or("platform-admin"),
                            k.name
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ApiKeyCommand::Revoke { id } => {
            let k = api_keys::revoke(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &k, |k| format!("revoked API key {} ({}…)", k.id, k.prefix));
        }
    }
    Ok(())
}

async fn connection(app: AppState, json: bool, cmd: ConnectionCommand) -> CliResult {
    use service::connections::{self, ConnectionStatus, ConnectionView, ListQuery};
    let line = |c: &ConnectionView| {
        format!(
            "{}  {:<9}  {:<12}  {:<24}  {}{}",
            c.id,
            c.provider.as_str(),
            c.status.as_str(),
            c.username
                .as_deref()
                .map(|u| format!("@{u}"))
                .or(c.display_name.clone())
                .unwrap_or_else(|| c.provider_account_id.clone()),
            if c.sandbox { "[sandbox] " } else { "" },
            c.status_reason.as_deref().unwrap_or("")
        )
    };
    match cmd {
        ConnectionCommand::List { workspace, status, provider, link, before, limit } => {
            let workspace = workspace_id(&app, &workspace).await?;
            let status = match status.as_deref() {
                None => None,
                Some("active") => Some(ConnectionStatus::Active),
                Some("broken") => Some(ConnectionStatus::Broken),
                Some("disconnected") => Some(ConnectionStatus::Disconnected),
                Some(other) => {
                    let message = format!("`{other}` is not one of active, broken, disconnected");
                    return Err(ServiceError::Validation(vec![FieldError::new("status", message)]).into());
                }
            };
            let provider = match provider {
                None => None,
                Some(p) => Some(p.parse().map_err(|e: FieldError| {
                    ServiceError::Validation(vec![FieldError::new("provider", e.message)])
                })?),
            };
            let link = id_flag("link", link)?;
            let before = id_flag("before", before)?;
            let list = connections::list(
                &app,
                &Scope::Admin,
                &ListQuery { workspace_id: Some(workspace), status, provider, link_id: link, before, limit },
            )
            .await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    "no connections".into()
                } else {
                    list.iter().map(line).collect::<Vec<_>>().join("\n")
                }
            });
            // A full page may have a next one; the hint goes to standard error, off the listing.
            if !json
                && i64::try_from(list.len()).is_ok_and(|n| n >= limit)
                && let Some(last) = list.last()
            {
                eprintln!("more may follow: add --before {}", last.id);
            }
        }
        ConnectionCommand::Show { id } => {
            let c = connections::get(&app, &Scope::Admin, &id).await?;
            print(json, &c, |c| {
                let v = &c.connection;
                let mut out = format!(
                    "{}\n  workspace: {}\n  link: {}\n  account id: {}\n  display name: {}\n  scopes: {}\n  access token expires: {}\n  refresh token expires: {}\n  connected: {}\n  last refreshed: {}\n  next refresh: {}\n  reconnects: {}\n  repair link: {}\n  history:",
                    line(v),
                    v.workspace_id,
                    v.link_id.as_deref().unwrap_or("-"),
                    v.provider_account_id,
                    v.display_name.as_deref().unwrap_or("-"),
                    v.scopes.join(", "),
                    ts(v.access_token_expires_at),
                    ts(v.refresh_token_expires_at),
                    ts(Some(v.connected_at)),
                    ts(v.last_refreshed_at),
                    ts(v.next_refresh_at),
                    v.reconnect_count,
                    c.repair_url.as_deref().unwrap_or("-"),
                );
                for e in &c.events {
                    out.push_str(&format!(
                        "\n    {}  {:<12}  {}",
                        ts(Some(e.at)),
                        e.kind,
                        e.detail.as_deref().unwrap_or("")
                    ));
                }
                out
            });
        }
        ConnectionCommand::Disconnect { id } => {
            let c = connections::disconnect(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &c, |c| {
                format!("disconnected {}: {}", c.id, c.status_reason.as_deref().unwrap_or(""))
            });
        }
        ConnectionCommand::Refresh { id } => {
            connections::get_active_row(&app, &Scope::Admin, &id).await?;
            let words = match service::refresh::refresh_requested(&app, &id, None).await? {
                service::refresh::Requested::Done(outcome) => outcome_words(outcome),
                service::refresh::Requested::NotYet { message, .. } => ("too_early", Some(message)),
            };
            run_outcome(&app, json, &id, words, "connection.refresh_requested").await?;
        }
        ConnectionCommand::Check { id } => {
            connections::get_active_row(&app, &Scope::Admin, &id).await?;
            let outcome = service::refresh::check(&app, &id).await?;
            run_outcome(&app, json, &id, outcome_words(outcome), "connection.check_requested").await?;
        }
        ConnectionCommand::Token { id } => {
            let t = connections::access_token(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &t, |t| t.access_token.clone());
            // The token alone on standard output (for pipes); its expiry beside it.
            if !json {
                match t.expires_at {
                    Some(at) => eprintln!("expires at {}", ts(Some(at))),
                    None => eprintln!("no expiry reported by the provider"),
                }
            }
        }
    }
    Ok(())
}

async fn keys(app: AppState, json: bool, cmd: KeysCommand) -> CliResult {
    use service::keys::{self, SealedCount};
    let counts = |sealed: &[SealedCount]| {
        sealed
            .iter()
            .map(|c| {
                let kid = if c.kid.is_empty() { "(not an envelope)" } else { c.kid.as_str() };
                // Values from before the workspace was bound: `keys rewrap` moves them on.
                let legacy =
                    if c.envelope == "v1" { " (v1 envelope: not bound to its workspace)" } else { "" };
                format!("  {}.{}  key {kid}{legacy}: {}", c.table, c.column, c.count)
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    match cmd {
        KeysCommand::Status => {
            let status = keys::status(&app).await?;
            print(json, &status, |s| {
                let mut out = format!("active key: {}\nkeys:", s.active_kid);
                for k in &s.keys {
                    out.push_str(&format!(
                        "\n  {}  {}  first used {}  retired {}",
                        k.kid,
                        k.configured,
                        ts(k.first_used_at),
                        ts(k.retired_at)
                    ));
                }
                out.push_str("\nsealed values:\n");
                out.push_str(&if s.sealed.is_empty() { "  none".to_string() } else { counts(&s.sealed) });
                let legacy: i64 = s.sealed.iter().filter(|c| c.envelope == "v1").map(|c| c.count).sum();
                if legacy > 0 {
                    let values =
                        if legacy == 1 { "1 value is".into() } else { format!("{legacy} values are") };
                    out.push_str(&format!(
                        "\n{values} in the v1 envelope, not bound to a workspace: `authlink keys rewrap` \
                         seals them again"
                    ));
                }
                out.push_str("\nprocesses (serve and worker; running: a heartbeat in the last 90 s):");
                if s.processes.is_empty() {
                    out.push_str("\n  none");
                }
                for p in &s.processes {
                    out.push_str(&format!(
                        "\n  {}  seals with {}  started {}  last seen {}{}",
                        p.describe(),
                        p.active_kid,
                        ts(Some(p.started_at)),
                        ts(Some(p.seen_at)),
                        if p.running { "" } else { "  (not running)" }
                    ));
                }
                out
            });
            Ok(())
        }
        KeysCommand::Rewrap { batch } => {
            let report = keys::rewrap(&app, &Actor::Cli, batch).await?;
            print(json, &report, |r| {
                let mut out = format!("active key: {}", r.active_kid);
                for c in &r.columns {
                    out.push_str(&format!(
                        "\n  {}.{}: {} re-sealed, {} changed meanwhile, {} unreadable",
                        c.table, c.column, c.resealed, c.changed_meanwhile, c.unreadable
                    ));
                }
                for u in &r.unreadable {
                    out.push_str(&format!(
                        "\n  unreadable: {}.{} row {}: {}",
                        u.table, u.column, u.id, u.error
                    ));
                }
                if r.remaining.is_empty() {
                    out.push_str(
                        "\nevery stored secret is sealed with the active key, in the current envelope",
                    );
                } else {
                    out.push_str("\nstill sealed with another key, or in the v1 envelope:\n");
                    out.push_str(&counts(&r.remaining));
                }
                for kid in &r.retired {
                    out.push_str(&format!(
                        "\nretired key {kid}: it may now be removed from the configuration"
                    ));
                }
                for h in &r.held {
                    let who: Vec<String> = h.processes.iter().map(|p| p.describe()).collect();
                    out.push_str(&format!(
                        "\nkey {} is not retired: still the active key of {}",
                        h.kid,
                        who.join(", ")
                    ));
                }
                out
            });
            if report.complete() {
                Ok(())
            } else if report.remaining.is_empty() {
                Err(CliError::new(
                    1,
                    format!(
                        "every secret is sealed with the active key, but {} earlier key(s) stay until the processes \
                         listed above run with the new configuration (restart them, then run `authlink keys rewrap` \
                         again; a process stopped without saying so counts as running for 90 s)",
                        report.held.len()
                    ),
                ))
            } else {
                Err(CliError::new(
                    1,
                    format!(
                        "{} secrets are still sealed with another key: unreadable ones are listed above; others were \
                         written meanwhile by a process that still seals with an earlier key (run again once every \
                         process uses the new key)",
                        report.remaining.iter().map(|c| c.count).sum::<i64>()
                    ),
                ))
            }
        }
    }
}

async fn audit(app: AppState, json: bool, cmd: AuditCommand) -> CliResult {
    match cmd {
        AuditCommand::List { workspace, action, limit } => {
            let workspace = match workspace {
                Some(w) => Some(workspace_id(&app, &w).await?),
                None => None,
            };
            let list = service::audit::list(
                &app,
                &Scope::Admin,
                workspace.as_deref(),
                action.as_deref(),
                None,
                None,
                limit,
            )
            .await?;
            print(json, &list, |list| {
                list.iter()
                    .map(|a| {
                        format!(
                            "{}  {:<24}  {}:{}  by {}{}",
                            ts(Some(a.created_at)),
                            a.action,
                            a.target_kind,
                            a.target_id,
                            a.actor_kind,
                            a.actor_id.as_deref().map(|i| format!(":{i}")).unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            more_may_follow(json, list.len(), limit);
        }
    }
    Ok(())
}

/// An outcome's word and detail, as `connection refresh|check` print them.
fn outcome_words(outcome: service::refresh::Outcome) -> (&'static str, Option<String>) {
    use service::refresh::Outcome;
    match outcome {
        Outcome::Refreshed(_) => ("refreshed", None),
        Outcome::Current(_) => ("current", None),
        Outcome::Transient(r) => ("transient", Some(r)),
        Outcome::Broken(r) => ("broken", Some(r)),
    }
}

async fn run_outcome(
    app: &AppState,
    json: bool,
    id: &str,
    (word, detail): (&'static str, Option<String>),
    action: &str,
) -> CliResult {
    let c = service::connections::get(app, &Scope::Admin, id).await?;
    let mut conn = app.db.writer().await.map_err(|e| CliError::from(ServiceError::from(e)))?;
    service::audit::record(
        &mut conn,
        app.now_ms(),
        &Actor::Cli,
        Some(&c.connection.workspace_id),
        action,
        "connection",
        id,
        serde_json::json!({"outcome": word}),
    )
    .await?;
    let value = serde_json::json!({"outcome": word, "detail": detail, "connection": c.connection});
    print(json, &value, |_| match &detail {
        Some(d) => format!("{word}: {d}"),
        None => format!("{word}: status {}", c.connection.status.as_str()),
    });
    if word == "transient" {
        return Err(CliError::new(
            1,
            format!("the provider is temporarily unavailable: {}", detail.unwrap_or_default()),
        ));
    }
    Ok(())
}

async fn webhook(app: AppState, json: bool, cmd: WebhookCommand) -> CliResult {
    use service::webhooks::{self, NewEndpoint};
    match cmd {
        WebhookCommand::Add { workspace, url, events, description } => {
            let workspace_id = workspace_id(&app, &workspace).await?;
            let created = webhooks::create(
                &app,
                &Actor::Cli,
                &Scope::Admin,
                NewEndpoint {
                    workspace_id: Some(workspace_id),
                    url,
                    events: if events.is_empty() { None } else { Some(events) },
                    description,
                },
            )
            .await?;
            print(json, &created, |c| {
                format!(
                    "{}\nsecret: {}\n\nThis is the only time the secret is shown. Store it now.",
                    c.endpoint.id, c.secret
                )
            });
        }
        WebhookCommand::List { workspace } => {
            let workspace_id = match workspace {
                Some(w) => Some(workspace_id(&app, &w).await?),
                None => None,
            };
            let list = webhooks::list(&app, &Scope::Admin, workspace_id.as_deref()).await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    return "no webhook endpoints".into();
                }
                list.iter()
                    .map(|e| {
                        format!(
                            "{}  {:<8}  {}  [{}]{}",
                            e.id,
                            if e.enabled { "enabled" } else { "disabled" },
                            e.url,
                            e.events.join(","),
                            e.disabled_reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        WebhookCommand::Enable { ref id } | WebhookCommand::Disable { ref id } => {
            let enable = matches!(cmd, WebhookCommand::Enable { .. });
            let enabled = enable;
            let change = webhooks::EndpointUpdate { enabled: Some(enabled), ..Default::default() };
            let e = webhooks::update(&app, &Actor::Cli, &Scope::Admin, id, change).await?;
            print(json, &e, |e| {
                format!("webhook endpoint {} {}", e.id, if e.enabled { "enabled" } else { "disabled" })
            });
        }
        WebhookCommand::Remove { id } => {
            let e = webhooks::remove(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &e, |e| format!("removed webhook endpoint {}", e.id));
        }
        WebhookCommand::Test { id } => {
            let event_id = webhooks::send_test(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
            let delivery = loop {
                let list = webhooks::deliveries(&app, &Scope::Admin, &id, None, 20).await?;
                let found = list.into_iter().find(|d| d.event_id == event_id);
                match found {
                    Some(d) if d.attempts > 0 || tokio::time::Instant::now() > deadline => break Some(d),
                    None if tokio::time::Instant::now() > deadline => break None,
                    _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
                }
            };
            let value = serde_json::json!({"event_id": event_id, "delivery": delivery});
            print(json, &value, |_| match &delivery {
                Some(d) if d.attempts > 0 => format!(
                    "test event {event_id}: {} (HTTP {})",
                    if d.status == "succeeded" { "delivered" } else { "not delivered" },
                    d.last_status_code.map(|c| c.to_string()).unwrap_or_else(|| "none".into())
                ),
                _ => format!("test event {event_id} is queued; no server or worker delivered it within 15 s"),
            });
            if delivery.as_ref().is_none_or(|d| d.status != "succeeded") {
                return Err(CliError::new(1, "the test event was not delivered"));
            }
        }
        WebhookCommand::Deliveries { id, limit } => {
            let list = webhooks::deliveries(&app, &Scope::Admin, &id, None, limit).await?;
            print(json, &list, |list| {
                list.iter()
                    .map(|d| {
                        format!(
                            "{}  {:<10}  {:<24}  attempts {}  last HTTP {}",
                            d.id,
                            d.status,
                            d.event_type,
                            d.attempts,
                            d.last_status_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            more_may_follow(json, list.len(), limit);
        }
        WebhookCommand::Redeliver { id } => {
            let d = webhooks::redeliver(&app, &Actor::Cli, &Scope::Admin, &id).await?;
            print(json, &d, |d| format!("delivery {} queued again (webhook-id {})", d.id, d.event_id));
        }
        WebhookCommand::RotateSecret { id, stop_current_now } => {
            let current =
                if stop_current_now { webhooks::Current::StopsNow } else { webhooks::Current::KeepsSigning };
            let e = webhooks::rotate_secret(&app, &Actor::Cli, &Scope::Admin, &id, current).await?;
            print(json, &e, |e| {
                let previous = match current {
                    webhooks::Current::KeepsSigning => "The previous secret keeps signing for 24 hours.",
                    webhooks::Current::StopsNow => "Only this secret signs from now on.",
                };
                format!("secret: {}\n\n{previous}", e.secret)
            });
        }
    }
    Ok(())
}

/// `authlink user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a dashboard user. The password (12 to 256 characters, not the email address) is
    /// read from standard input (one line) when it is not a terminal, else asked for twice at a
    /// prompt that does not echo.
    Create {
        /// The user's email address (unique, case-insensitively).
        #[arg(long)]
        email: String,
        /// Make a platform admin, who sees and manages every workspace.
        #[arg(long)]
        admin: bool,
    },
    /// Add a user to a workspace, or change their role there. The account is attached at once:
    /// make sure its person controls it (an account made through an invitation link proves no
    /// address; `reset-password` hands them one only they then know).
    AddMember {
        /// The user's email address.
        #[arg(long)]
        email: String,
        /// Workspace id or slug.
        #[arg(long)]
        workspace: String,
        /// `owner` (also manages members, branding, webhooks and API keys) or `member` (an owner
        /// made a member loses the invitations they sent and the API keys they made there).
        #[arg(long, default_value = "member", value_parser = ["owner", "member"])]
        role: String,
    },
    /// Remove a user from a workspace; the invitations they sent there are withdrawn and the API
    /// keys they made there (and the keys made with those) revoked.
    RemoveMember {
        /// The user's email address.
        #[arg(long)]
        email: String,
        /// Workspace id or slug.
        #[arg(long)]
        workspace: String,
    },
    /// List users and their workspaces.
    List,
    /// Disable a user: they cannot sign in any more, their sessions and trusted browsers end
    /// now, their pending invitations are withdrawn and the API keys they made (and the keys
    /// made with those) revoked.
    Disable {
        /// The user's email address.
        #[arg(long)]
        email: String,
    },
    /// Set a new password for a user (read like `create`); ends the user's sessions and the
    /// trust of every browser they signed in from.
    ResetPassword {
        /// The user's email address.
        #[arg(long)]
        email: String,
    },
}

/// Reads a new password: one line from standard input when it is not a terminal (scripts, CI),
/// else twice from a prompt on the terminal without echo. Never from the command line, where
/// other users could see it in the process list and shell history.
fn read_new_password() -> Result<secrecy::SecretString, CliError> {
    use std::io::{BufRead, IsTerminal};
    let fail = |message: String| CliError::new(2, message);
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("New password: ")
            .map_err(|e| fail(format!("cannot read the password: {e}")))?;
        let second = rpassword::prompt_password("New password again: ")
            .map_err(|e| fail(format!("cannot read the password: {e}")))?;
        if first != second {
            return Err(fail("the two passwords differ".into()));
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| fail(format!("cannot read the password from standard input: {e}")))?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        return Err(fail("no password given (write it on standard input, one line)".into()));
    }
    Ok(secrecy::SecretString::from(password))
}

async fn user(config: Config, json: bool, cmd: UserCommand) -> CliResult {
    use service::users::{self, UserView};
    let describe = |u: &UserView| {
        let workspaces = if u.workspaces.is_empty() {
            "-".to_string()
        } else {
            u.workspaces.iter().map(|w| format!("{} ({})", w.slug, w.role)).collect::<Vec<_>>().join(", ")
        };
        format!(
            "{}  {:<32}  {:<14}  {:<8}  {}",
            u.id,
            u.email,
            if u.admin { "platform-admin" } else { "user" },
            if u.disabled { "disabled" } else { "active" },
            workspaces
        )
    };
    // Read the password before touching the database, so that nothing waits on a person.
    let password = match &cmd {
        UserCommand::Create { .. } | UserCommand::ResetPassword { .. } => Some(read_new_password()?),
        _ => None,
    };
    let app = state(config).await?;
    match (cmd, password) {
        (UserCommand::Create { email, admin }, Some(password)) => {
            let u = users::create(&app, &Actor::Cli, &email, &password, admin).await?;
            print(json, &u, |u| format!("created {}", describe(u)));
        }
        (UserCommand::ResetPassword { email }, Some(password)) => {
            let u = users::reset_password(&app, &Actor::Cli, &email, &password).await?;
            print(json, &u, |u| {
                format!("password set; every session and trusted browser of {} ended", u.email)
            });
        }
        (UserCommand::AddMember { email, workspace, role }, _) => {
            let workspace = workspace_id(&app, &workspace).await?;
            let m = users::add_member(&app, &Actor::Cli, &workspace, &email, &role).await?;
            print(json, &m, |m| format!("{} is {} of workspace {workspace}", m.email, m.role));
        }
        (UserCommand::RemoveMember { email, workspace }, _) => {
            let workspace = workspace_id(&app, &workspace).await?;
            let u = users::get_by_email(&app, &email).await?;
            users::remove_member(&app, &Actor::Cli, &workspace, &u.id).await?;
            print(
                json,
                &serde_json::json!({"removed": true, "user_id": u.id, "workspace_id": workspace}),
                |_| format!("{} removed from workspace {workspace}", u.email),
            );
        }
        (UserCommand::List, _) => {
            let list = users::list(&app).await?;
            print(json, &list, |list| {
                if list.is_empty() {
                    "no users yet: create the first admin with `authlink user create --email EMAIL --admin`"
                        .into()
                } else {
                    list.iter().map(describe).collect::<Vec<_>>().join("\n")
                }
            });
        }
        (UserCommand::Disable { email }, _) => {
            let u = users::disable(&app, &Actor::Cli, &email).await?;
            print(json, &u, |u| format!("disabled {}; their sessions ended", u.email));
        }
        (UserCommand::Create { .. } | UserCommand::ResetPassword { .. }, None) => {
            return Err(CliError::new(2, "no password given"));
        }
    }
    Ok(())
}
