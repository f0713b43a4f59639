//! authlink: secure, reusable authentication links that connect a client's social accounts to an
//! agency's workspace.
//!
//! A tour of the crate, from the outside in:
//!
//! - [`cli`] is the operator's surface: `serve`, `migrate`, `config check` and the admin verbs.
//! - [`startup`] builds an [`startup::Application`]: it loads the key ring, connects and migrates
//!   the database, binds the listener and runs the HTTP server until a shutdown signal.
//! - [`http`] holds the router: the public link pages ([`http::pages`]), the dashboard
//!   ([`http::dashboard`]), the JSON API ([`http::api`]) and the health probes.
//! - [`service`] holds the operations that the CLI and the API share (create a link, revoke it,
//!   ...): validation, storage and the audit entry, in one transaction.
//! - [`db`] is the only module that writes SQL. It runs the same statements on SQLite and
//!   PostgreSQL through sqlx's `Any` driver; the few places where the dialects differ are kept
//!   inside it.
//! - [`crypto`] seals secrets at rest (link tokens, OAuth tokens) with XChaCha20-Poly1305, binding
//!   each ciphertext to its row, and makes the random tokens.
//! - [`config`] layers defaults, `authlink.toml` and `AUTHLINK_*` environment variables.
//! - [`domain`] holds validated value types (platforms, labels, redirect URLs, durations).

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
