//! The state shared by every request handler and background task.

use std::ops::Deref;
use std::sync::Arc;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::db::Db;
use crate::providers::Providers;
use crate::sandbox::Sandbox;

/// Cheap to clone: one `Arc` around [`App`].
#[derive(Clone, Debug)]
pub struct AppState(pub Arc<App>);

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// Everything a handler may need. One context instead of many extractors keeps handler
/// signatures short and makes the dependencies of the service visible in one place.
#[derive(Debug)]
pub struct App {
    /// The effective configuration.
    pub config: Config,
    /// The database.
    pub db: Db,
    /// The keys that seal secrets at rest.
    pub keys: KeyRing,
    /// The time source; the sandbox control endpoint may move it forward.
    pub clock: Arc<dyn Clock>,
    /// The same clock with its control handle (for the sandbox control endpoint).
    pub system_clock: Arc<SystemClock>,
    /// The provider adapters, pointed at the real providers or at the sandbox.
    pub providers: Providers,
    /// The built-in provider simulator's state.
    pub sandbox: Arc<Sandbox>,
    /// The SSRF guard for webhook endpoints (resolver and address policy).
    pub webhook_guard: crate::net::Guard,
}

impl App {
    /// The current time.
    pub fn now(&self) -> time::OffsetDateTime {
        self.clock.now()
    }

    /// The current time in database form (ms since the epoch).
    pub fn now_ms(&self) -> i64 {
        crate::clock::to_millis(self.clock.now())
    }
}
