//! authlink: secure, reusable authentication links that connect a client's social accounts to an
//! agency's workspace.
//!
//! A tour of the crate, from the outside in:
//!
//! - [`cli`] is the operator's surface: `serve`, `worker`, `migrate`, `config check` and the admin
//!   verbs.
//! - [`startup`] builds an [`startup::Application`]: it loads the key ring, connects and migrates
//!   the database, binds the listener and runs the HTTP server and the background jobs until a
//!   shutdown signal. [`state`] is what every handler and job shares.
//! - [`http`] holds the router: the public link pages ([`http::pages`]), the dashboard
//!   ([`http::dashboard`]), the JSON API ([`http::api`]), the health probes, the rate limits and
//!   the layers every response goes through.
//! - [`service`] holds the operations that the CLI, the API and the dashboard share (create a link,
//!   revoke it, refresh a token, ...): validation, storage and the audit entry, in one transaction.
//! - [`jobs`] runs the background work: the refresh scheduler, health checks, expiry notices and
//!   webhook delivery, each unit claimed with a lease in the database.
//! - [`providers`] holds the OAuth adapters (TikTok, Instagram), which follow the providers' wire
//!   contracts; [`sandbox`] is the built-in simulator of those contracts that they talk to when
//!   no credentials are configured.
//! - [`db`] is the only module that writes SQL. Most statements run on SQLite and PostgreSQL
//!   alike through sqlx's `Any` driver; on a SQLite file, the connect flow's run on synchronous
//!   rusqlite connections instead (`db::lite`), without sqlx's thread switch per statement. The
//!   few places where the dialects differ are kept inside it.
//! - [`crypto`] seals secrets at rest (link tokens, OAuth tokens) with XChaCha20-Poly1305, binding
//!   each ciphertext to its row, and makes the random tokens.
//! - [`net`] guards outbound requests to addresses users chose (webhook endpoints) against SSRF.
//! - [`metrics`] records Prometheus metrics, served on an address of their own when enabled;
//!   [`telemetry`] sets up the logs.
//! - [`config`] layers defaults, `authlink.toml` and `AUTHLINK_*` environment variables.
//! - [`domain`] holds validated value types (platforms, labels, redirect URLs, durations);
//!   [`clock`] is time as a dependency, so tests and the sandbox can move it.

/// Implements `Debug` for a struct that holds secrets: the `shown` fields as usual, the
/// `hidden` ones as `[redacted]`, so that a value logged with `?` (or printed by a panic) never
/// carries them.
macro_rules! redacted_debug {
    ($ty:ident $(<$lt:lifetime>)?, shown: [$($shown:ident),* $(,)?], hidden: [$($hidden:ident),* $(,)?] $(,)?) => {
        impl $(<$lt>)? std::fmt::Debug for $ty $(<$lt>)? {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($shown), &self.$shown))*
                    $(.field(stringify!($hidden), &"[redacted]"))*
                    .finish()
            }
        }
    };
}

pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod net;
pub mod providers;
pub mod sandbox;
pub mod service;
pub mod startup;
pub mod state;
pub mod telemetry;
