//! Rate limits, token buckets in memory (per instance): per client address on the link URL
//! space (`/l/...`), so that link tokens cannot be guessed at speed; per API key on the JSON API,
//! and per client address for API requests without a valid key.
//!
//! A client address is counted as a [`ClientNet`](crate::http::ratelimit::ClientNet): an IPv6
//! client by its /64, since a host on an IPv6 network can usually use any address of its /64,
//! and would otherwise get a fresh budget with each one.
//!
//! The client address is the peer address, or, when the peer is a trusted reverse proxy
//! (`http.trusted_proxies`: loopback by default), the last address of
//! `X-Forwarded-For` that is not a trusted proxy itself: the one the outermost trusted proxy
//! saw. Addresses a client wrote into the header before that are never believed.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::pages::{MessagePage, render};

/// Token buckets, one per key (a client address, an API key), in memory (per instance).
#[derive(Debug, Clone)]
pub struct Limiter<K> {
    per_minute: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<K, (f64, Instant)>>>,
}

/// The link pages' limiter: per client address (its /64 for IPv6).
pub type LinkLimiter = Limiter<ClientNet>;

/// What the per-address limits count by: an IPv4 address as it is, an IPv6 address by its /64
/// (the network of one subscriber or host, whose other addresses it can use at will). An
/// IPv4-mapped IPv6 address counts as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientNet(IpAddr);

impl ClientNet {
    /// The network `ip` is counted in.
    pub fn of(ip: IpAddr) -> Self {
        Self(crate::net::client_network(ip))
    }
}

impl<K: Hash + Eq> Limiter<K> {
    /// `per_minute` requests a minute on average, bursts up to a quarter of that (at least 10).
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        Self::with_burst(per_minute, (per_minute / 4.0).max(10.0))
    }

    /// `per_minute` requests a minute on average, bursts up to `burst`.
    pub fn with_burst(per_minute: f64, burst: f64) -> Self {
        Self { per_minute, burst, buckets: Arc::default() }
    }

    fn bucket<'a>(
        &self,
        buckets: &'a mut HashMap<K, (f64, Instant)>,
        key: K,
        now: Instant,
    ) -> &'a mut (f64, Instant) {
        if buckets.len() > 100_000 {
            // Forget full buckets (clients that went quiet) so memory stays bounded.
            let (rate, burst) = (self.per_minute / 60.0, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let rate = self.per_minute / 60.0;
        let entry = buckets.entry(key).or_insert((self.burst, now));
        *entry = ((entry.0 + now.duration_since(entry.1).as_secs_f64() * rate).min(self.burst), now);
        entry
    }

    /// Takes one token for `key`; `Err(seconds)` to wait when the bucket is empty.
    pub fn check(&self, key: K, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = self.per_minute / 60.0;
        let entry = self.bucket(&mut buckets, key, now);
        if entry.0 >= 1.0 {
            entry.0 -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - entry.0) / rate).ceil().max(1.0) as u64)
        }
    }

    /// Whether `key` has a token left, without taking it; `Err(seconds)` to wait when not.
    pub fn peek(&self, key: K, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = self.per_minute / 60.0;
        let entry = self.bucket(&mut buckets, key, now);
        if entry.0 >= 1.0 { Ok(()) } else { Err(((1.0 - entry.0) / rate).ceil().max(1.0) as u64) }
    }
}

/// The JSON API's limits, as a request extension of the API routes: requests per API key, and
/// requests without a valid key per client address (once their bucket is empty, only keys this
/// instance has seen valid are still looked up in the database).
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Per API key id: `http.api_requests_per_minute`, bursts up to a minute's worth.
    pub per_key: Limiter<String>,
    /// Per client address, for requests whose key is missing or wrong:
    /// `http.link_requests_per_minute`, like the link pages (both guard against guessing).
    pub failures: Limiter<ClientNet>,
    /// The SHA-256 of the keys seen valid lately (at most [`KNOWN_KEYS`]).
    known: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// How many keys [`ApiLimits`] remembers (forgotten all at once when full).
const KNOWN_KEYS: usize = 10_000;

impl ApiLimits {
    /// The limits of `config`.
    pub fn new(config: &crate::config::HttpConfig) -> Self {
        let per_minute = f64::from(config.api_requests_per_minute.max(1));
        Self {
            per_key: Limiter::with_burst(per_minute, per_minute),
            failures: Limiter::new(config.link_requests_per_minute),
            known: Arc::default(),
        }
    }

    /// Remembers that `key` (kept as its SHA-256) was valid.
    pub fn remember_key(&self, key: &str) {
        let fingerprint = crate::crypto::sha256_hex(key.as_bytes());
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= KNOWN_KEYS {
                known.clear();
            }
            known.insert(fingerprint);
        }
    }

    /// Whether `key`, whole, was seen valid lately.
    pub fn knows_key(&self, key: &str) -> bool {
        let fingerprint = crate::crypto::sha256_hex(key.as_bytes());
        self.known.lock().is_ok_and(|known| known.contains(&fingerprint))
    }
}

/// The reverse proxies whose `X-Forwarded-For` is believed (`http.trusted_proxies`), as a
/// request extension.
#[derive(Debug, Clone)]
pub struct TrustedProxies(pub Arc<[ipnet::IpNet]>);

impl TrustedProxies {
    fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may show up as an IPv4-mapped IPv6 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl Default for TrustedProxies {
    fn default() -> Self {
        Self(crate::config::DEFAULT_TRUSTED_PROXIES.iter().filter_map(|s| s.parse().ok()).collect())
    }
}

/// The client's address (see the module documentation), from a request's headers and
/// extensions; shared with the dashboard's login throttling.
pub fn client_ip_of(headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
    let fallback;
    let trusted = match extensions.get::<TrustedProxies>() {
        Some(t) => t,
        None => {
            fallback = TrustedProxies::default();
            &fallback
        }
    };
    let peer = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if let Some(ip) = peer.filter(|ip| !trusted.contains(*ip)) {
        if headers.contains_key("x-forwarded-for") {
            warn_once_of_untrusted_proxy(ip);
        }
        return Some(ip);
    }
    // From the nearest hop outwards: each trusted proxy vouches for the address before it.
    let mut client = peer;
    let chain = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    for entry in chain.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else { break };
        client = Some(ip);
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// Says in the log, once for each of the first few such peers, that a peer that is no trusted
/// proxy sent `X-Forwarded-For`: a reverse proxy that is not in `http.trusted_proxies`, whose
/// clients then all count as its address (one rate limit for all of them), or a client writing
/// the header itself (which must not keep a proxy's warning from being said).
fn warn_once_of_untrusted_proxy(peer: IpAddr) {
    static WARNED: Mutex<Vec<IpAddr>> = Mutex::new(Vec::new());
    let first_time = WARNED.lock().is_ok_and(|mut warned| {
        let new = warned.len() < 16 && !warned.contains(&peer);
        if new {
            warned.push(peer);
        }
        new
    });
    if first_time {
        tracing::warn!(
            %peer,
            "a request from an address that is not in http.trusted_proxies carried X-Forwarded-For, which was \
             ignored: if that address is your reverse proxy or load balancer, add it (or its network) to \
             http.trusted_proxies, or every client behind it shares its address and its rate limits \
             (said once for this address)"
        );
    }
}

/// The client's address of a request.
pub fn client_ip(req: &Request) -> Option<IpAddr> {
    client_ip_of(req.headers(), req.extensions())
}

/// Whether `path` counts against the link pages' limit: the link pages, the providers' callbacks
/// (each a write, whatever state it carries), and the success page's avatar, which the server
/// fetches from the provider at every request.
fn is_limited(path: &str) -> bool {
    path.starts_with("/l/")
        || (path.starts_with("/oauth/") && path.ends_with("/callback"))
        || (path.starts_with("/connected/") && path.ends_with("/avatar"))
}

/// Middleware for the link pages.
pub async fn limit_links(State(limiter): State<LinkLimiter>, req: Request, next: Next) -> Response {
    if is_limited(req.uri().path())
        && let Some(ip) = client_ip(&req)
        && let Err(wait) = limiter.check(ClientNet::of(ip), Instant::now())
    {
        tracing::warn!(client = %ip, "link requests rate-limited");
        // A provider's callback leaves for a clean address at once: its `code` and `state` must
        // not stay in the address bar and the history (the page there says to wait).
        let provider =
            req.uri().path().strip_prefix("/oauth/").and_then(|rest| rest.strip_suffix("/callback"));
        if let Some(platform) = provider.and_then(|p| p.parse::<crate::domain::Platform>().ok()) {
            return super::pages::connect::rate_limited_callback(platform);
        }
        let mut page = MessagePage::new(
            "Too many requests",
            "Too many requests came from your network in a short time.",
        )
        .next(match wait {
            1 => "Please wait a second, then try again.".to_string(),
            _ => format!("Please wait {wait} seconds, then try again."),
        });
        // Back to the link's page, once the wait is over.
        if let Some(link_page) = super::pages::link_page_of(req.uri().path()) {
            page = page.retry(link_page);
        }
        let mut res = render(StatusCode::TOO_MANY_REQUESTS, &page);
        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return res.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A key seen valid is known whole: its public prefix with another tail is not.
    #[test]
    fn keys_seen_valid_are_known_whole() {
        let limits = ApiLimits::new(&crate::config::HttpConfig::default());
        let key = "alk_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(!limits.knows_key(key));
        limits.remember_key(key);
        assert!(limits.knows_key(key));
        assert!(!limits.knows_key("alk_0123456789ab_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"));
        assert!(!limits.knows_key("alk_0123456789ab"));
    }

    #[test]
    fn link_pages_callbacks_and_avatars_are_limited() {
        for path in ["/l/abc", "/l/abc/connect/tiktok", "/oauth/tiktok/callback", "/connected/0192/avatar"] {
            assert!(is_limited(path), "{path}");
        }
        // Meta's signed callbacks come from Meta's servers, for every client at once.
        for path in [
            "/connected/0192",
            "/oauth/instagram/deauthorize",
            "/oauth/tiktok/failed",
            "/app",
            "/api/v1/links",
            "/lx",
        ] {
            assert!(!is_limited(path), "{path}");
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_ipv4_clients_by_their_address() {
        let net = |s: &str| ClientNet::of(s.parse().unwrap());
        // IPv6: every address of a /64 shares one budget; another /64 has its own.
        assert_eq!(net("2001:db8:1:2:aaaa::1"), net("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(net("2001:db8:1:2::7"), ClientNet("2001:db8:1:2::".parse().unwrap()));
        assert_ne!(net("2001:db8:1:2::1"), net("2001:db8:1:3::1"));
        // IPv4: each address on its own, as before, also when seen IPv4-mapped.
        assert_ne!(net("203.0.113.7"), net("203.0.113.8"));
        assert_eq!(net("::ffff:203.0.113.7"), net("203.0.113.7"));
        // A limiter sees the whole /64 as one client.
        let limiter = LinkLimiter::new(60);
        let t0 = Instant::now();
        let allowed =
            (0..100u16).filter(|i| limiter.check(net(&format!("2001:db8:1:2::{i:x}")), t0).is_ok()).count();
        assert_eq!(allowed, 15, "one burst for the /64");
        assert!(limiter.check(net("2001:db8:1:3::1"), t0).is_ok(), "another /64");
    }

    #[test]
    fn buckets_refill_at_the_configured_rate() {
        let limiter = LinkLimiter::new(60);
        let ip = ClientNet::of("203.0.113.7".parse().unwrap());
        let other = ClientNet::of("203.0.113.8".parse().unwrap());
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| limiter.check(ip, t0).is_ok()).count();
        assert_eq!(allowed, 15, "the burst");
        assert!(limiter.check(other, t0).is_ok(), "per client");
        assert_eq!(limiter.check(ip, t0), Err(1));
        // One a second comes back.
        assert!(limiter.check(ip, t0 + Duration::from_secs(1)).is_ok());
        assert!(limiter.check(ip, t0 + Duration::from_secs(1)).is_err());
    }

    fn client(peer: &str, forwarded: &[&str], trusted: Option<&[&str]>) -> Option<IpAddr> {
        let mut headers = HeaderMap::new();
        for v in forwarded {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        let mut extensions = Extensions::new();
        extensions.insert(ConnectInfo(SocketAddr::new(peer.parse().unwrap(), 40_000)));
        if let Some(list) = trusted {
            extensions.insert(TrustedProxies(list.iter().map(|s| s.parse().unwrap()).collect()));
        }
        client_ip_of(&headers, &extensions)
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // A public peer is the client, whatever it writes.
        assert_eq!(client("203.0.113.9", &["198.51.100.1"], None), ip("203.0.113.9"));
        // Behind one trusted proxy: the address it saw (the last entry), not what the client wrote.
        assert_eq!(client("127.0.0.1", &["6.6.6.6, 198.51.100.1"], None), ip("198.51.100.1"));
        // A peer on a private network is not believed by default: it may be a hop that rewrote
        // the client's address (a container's port forwarding), not a proxy that wrote the header.
        assert_eq!(client("10.0.0.2", &["198.51.100.1"], None), ip("10.0.0.2"));
        assert_eq!(client("fd00::2", &["198.51.100.1"], None), ip("fd00::2"));
        // Behind two trusted proxies: the first untrusted address from the right.
        let lan = Some(&["127.0.0.0/8", "10.0.0.0/8"][..]);
        assert_eq!(client("10.0.0.2", &["6.6.6.6, 198.51.100.1, 10.0.0.1"], lan), ip("198.51.100.1"));
        // The chain split over several header lines reads the same.
        assert_eq!(client("10.0.0.2", &["6.6.6.6", "198.51.100.1", "10.0.0.1"], lan), ip("198.51.100.1"));
        // No header: the proxy itself; garbage stops the walk at the last believed hop.
        assert_eq!(client("127.0.0.1", &[], None), ip("127.0.0.1"));
        assert_eq!(client("10.0.0.2", &["198.51.100.1, not-an-ip, 10.0.0.1"], lan), ip("10.0.0.1"));
        // No trusted proxies: the peer, always; a peer outside the list is not believed either.
        assert_eq!(client("127.0.0.1", &["198.51.100.1"], Some(&[])), ip("127.0.0.1"));
        assert_eq!(client("172.17.0.1", &["198.51.100.1"], Some(&["10.0.0.0/8"])), ip("172.17.0.1"));
        // An IPv4 peer seen as an IPv4-mapped IPv6 address is matched as IPv4.
        assert_eq!(client("::ffff:127.0.0.1", &["198.51.100.1"], None), ip("198.51.100.1"));
    }
}
