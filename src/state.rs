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
    /// The client that fetches connected accounts' avatars (through `webhook_guard`), and the
    /// one for the sandbox's own avatars on this server (loopback allowed): built once, not
    /// for every page view.
    pub avatar_clients: AvatarClients,
    /// Work that runs on to its end when the request that asked for it goes away.
    pub detached: Detached,
}

/// See [`App::avatar_clients`].
#[derive(Debug)]
pub struct AvatarClients {
    /// For avatars at the provider's CDN.
    pub provider: reqwest::Client,
    /// For the sandbox's avatars, served by this process.
    pub sandbox: reqwest::Client,
}

/// Work that must not stop halfway because the request waiting for it went away (the client
/// gave up, the request timed out, the shutdown's grace period ended): a refresh whose provider
/// may already have rotated the refresh token, whose new token exists nowhere else until stored;
/// a disconnect that revoked the grant at the provider. See [`AppState::detached`]; shutdown
/// waits for it ([`Detached::drain`]).
#[derive(Debug, Default)]
pub struct Detached(Arc<tokio::sync::RwLock<()>>);

impl Detached {
    /// Waits until no detached work runs.
    pub async fn drain(&self) {
        drop(self.0.write().await);
    }
}

impl AppState {
    /// Runs `work` on a task of its own and waits for its result: if the caller is dropped
    /// meanwhile, the work still runs to its end. A panic in it is the caller's panic.
    pub async fn detached<T, F>(&self, work: F) -> crate::service::ServiceResult<T>
    where
        F: std::future::Future<Output = crate::service::ServiceResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let running = self.detached.0.clone().read_owned().await;
        let task = tokio::spawn(async move {
            let _running = running;
            work.await
        });
        match task.await {
            Ok(result) => result,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only when the runtime itself stops.
                Err(_) => Err(crate::service::ServiceError::Unavailable("authlink is stopping".into())),
            },
        }
    }

    /// Runs `work` in place, like an `.await` of it, unless the caller is dropped before it ends
    /// (the client went away): then the rest of it runs on a task of its own, to its end, and a
    /// shutdown waits for it as for [`detached`](Self::detached) work. Unlike `detached`, the
    /// common case (the caller waits) costs no task hand-off.
    pub async fn to_the_end<T, F>(&self, work: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let running = self.detached.0.clone().read_owned().await;
        let mut rest = RestOnDrop(Some(Box::pin(async move {
            let _running = running;
            work.await
        })));
        let out = std::future::poll_fn(|cx| match rest.0.as_mut() {
            Some(work) => work.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        })
        .await;
        rest.0 = None;
        out
    }
}

/// Work begun in place, handed to a task of its own if it is dropped before its end.
struct RestOnDrop<T: Send + 'static>(Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>);

impl<T: Send + 'static> Drop for RestOnDrop<T> {
    fn drop(&mut self) {
        if let Some(rest) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                rest.await;
            });
        }
    }
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
