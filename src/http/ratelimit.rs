//! A per-client rate limit on the link URL space (`/l/...`), so that link tokens cannot be
//! guessed at speed: a token bucket per client address, in memory (per instance).
//!
//! The client address is the peer address, or, when the peer is a proxy on a private network
//! (loopback, private or link-local), the last address of `X-Forwarded-For`, which is the one
//! that proxy saw.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::pages::{MessagePage, render};

/// Token buckets per client address.
#[derive(Debug, Clone)]
pub struct LinkLimiter {
    per_minute: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<IpAddr, (f64, Instant)>>>,
}

impl LinkLimiter {
    /// `per_minute` requests a minute on average, bursts up to a quarter of that (at least 10).
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        Self { per_minute, burst: (per_minute / 4.0).max(10.0), buckets: Arc::default() }
    }

    /// Takes one token for `ip`; `Err(seconds)` to wait when the bucket is empty.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 100_000 {
            // Forget full buckets (clients that went quiet) so memory stays bounded.
            let (rate, burst) = (self.per_minute / 60.0, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let rate = self.per_minute / 60.0;
        let entry = buckets.entry(ip).or_insert((self.burst, now));
        let refilled = (entry.0 + now.duration_since(entry.1).as_secs_f64() * rate).min(self.burst);
        if refilled >= 1.0 {
            *entry = (refilled - 1.0, now);
            Ok(())
        } else {
            *entry = (refilled, now);
            Err(((1.0 - refilled) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// The client's address (see the module documentation), from a request's headers and
/// extensions; shared with the dashboard's login throttling.
pub fn client_ip_of(headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
    let peer = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let forwarded = || {
        headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
    };
    let behind_proxy = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unique_local(),
    };
    match peer {
        Some(ip) if behind_proxy(ip) => Some(forwarded().unwrap_or(ip)),
        Some(ip) => Some(ip),
        None => forwarded(),
    }
}

/// The client's address of a request.
pub fn client_ip(req: &Request) -> Option<IpAddr> {
    client_ip_of(req.headers(), req.extensions())
}

/// Middleware for the link pages.
pub async fn limit_links(State(limiter): State<LinkLimiter>, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/l/") {
        if let Some(ip) = client_ip(&req) {
            if let Err(wait) = limiter.check(ip, Instant::now()) {
                tracing::warn!(client = %ip, "link requests rate-limited");
                let mut res = render(
                    StatusCode::TOO_MANY_REQUESTS,
                    &MessagePage::new(
                        "Too many requests",
                        "This device opened too many links in a short time.",
                    )
                    .next(format!("Please wait {wait} seconds, then try again.")),
                );
                if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
                    res.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return res.into_response();
            }
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn buckets_refill_at_the_configured_rate() {
        let limiter = LinkLimiter::new(60);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| limiter.check(ip, t0).is_ok()).count();
        assert_eq!(allowed, 15, "the burst");
        assert!(limiter.check(other, t0).is_ok(), "per client");
        assert_eq!(limiter.check(ip, t0), Err(1));
        // One a second comes back.
        assert!(limiter.check(ip, t0 + Duration::from_secs(1)).is_ok());
        assert!(limiter.check(ip, t0 + Duration::from_secs(1)).is_err());
    }
}
