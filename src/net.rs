//! Outbound requests to addresses chosen by users (webhook endpoints), guarded against SSRF.
//!
//! A webhook URL is checked twice: when it is saved (its host must resolve, and only to public
//! addresses) and at every delivery, by the resolver the HTTP client itself uses, so that a DNS
//! answer that changes after the check (rebinding) cannot reach loopback, private, link-local or
//! other special addresses. `webhooks.allow_private_targets` lifts the restriction for tests and
//! on-premise receivers, and `webhooks.private_networks` for the private addresses of the networks
//! it lists, except for link-local addresses and the cloud providers' metadata endpoints, which
//! no receiver needs and which hand out the host's credentials.
//!
//! Also the reading of `Retry-After` ([`parse_retry_after`]), shared by webhook deliveries and the
//! provider adapters.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

/// Longest wait for a user-given target (webhook endpoint, logo, avatar) to take a connection,
/// TLS handshake included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The network a client address is counted in by per-address limits (the link pages' rate
/// limit, the dashboard's sign-in throttle): an IPv4 address as it is, an IPv6 address by its
/// /64 (the network of one subscriber or host, whose other addresses it can use at will). An
/// IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

/// A boxed future, as resolvers return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves host names: the system resolver in production, a stub in tests.
pub trait HostResolver: Send + Sync + std::fmt::Debug {
    /// The addresses of `host`.
    fn lookup(&self, host: &str) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn lookup(&self, host: &str) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        let host = host.to_string();
        Box::pin(
            async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect()) },
        )
    }
}

/// Whether `ip` is refused even with `webhooks.allow_private_targets`: link-local addresses
/// (169.254.0.0/16, fe80::/10), where the cloud providers' metadata endpoints answer with the
/// host's credentials, and the other metadata addresses (AWS's IPv6 one, Alibaba's, Oracle's,
/// Azure's host endpoint, Google Cloud's IPv6 one). An on-premise receiver lives on none of them. IPv6 addresses that
/// carry an IPv4 address (IPv4-mapped, -compatible and -translated, 6to4, NAT64 with the
/// well-known or a local-use prefix) are judged by it too.
pub fn is_never_allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || [[100, 100, 100, 200], [192, 0, 0, 192], [168, 63, 129, 16]].contains(&v4.octets())
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let low32 = Ipv4Addr::from(u128::from(v6) as u32);
            let never = |v4: Ipv4Addr| is_never_allowed(IpAddr::V4(v4));
            // IPv4-compatible (::/96) and IPv4-translated (::ffff:0:0:0/96, SIIT), which
            // `is_public` refuses outright: the IPv4 address in the last 32 bits.
            let compatible = s[..6] == [0; 6] || s[..6] == [0, 0, 0, 0, 0xffff, 0];
            // NAT64's local-use prefix 64:ff9b:1::/48 (RFC 8215) holds translator prefixes of any
            // length RFC 6052 allows within it (/48, /56, /64, /96), each with the IPv4 address
            // in its own place: every one is judged.
            let local_nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1;
            carried_ipv4(v6).is_some_and(never)
                || (compatible && never(low32))
                || (local_nat64 && [48, 56, 64, 96].into_iter().any(|len| never(rfc6052_ipv4(v6, len))))
                || (s[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || v6 == Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

/// The IPv4 address RFC 6052 places in `v6` behind a translator prefix of `prefix_len` bits (32,
/// 40, 48, 56, 64 or 96): the 32 bits after the prefix, skipping bits 64..72 (the reserved "u"
/// octet).
fn rfc6052_ipv4(v6: Ipv6Addr, prefix_len: u32) -> Ipv4Addr {
    let x = u128::from(v6);
    // The 120 bits without the u octet: bits 0..64, then 72..128.
    let without_u = ((x >> 64) << 56) | (x & ((1u128 << 56) - 1));
    let start = if prefix_len <= 64 { prefix_len } else { prefix_len - 8 };
    Ipv4Addr::from((without_u >> (120 - start - 32)) as u32)
}

/// Whether an IPv6 address leads through a relay to another host: 6to4 (2002::/16), NAT64
/// (64:ff9b::/96 and the local-use 64:ff9b:1::/48) and Teredo (2001::/32). A listed private
/// network admits none of them.
fn is_tunnel(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    s[0] == 0x2002
        || (s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1))
        || (s[0] == 0x2001 && s[1] == 0)
}

/// The IPv4 address an IPv6 address leads to: ::ffff:0:0/96, IPv4-mapped (the socket connects
/// to the IPv4 address); 2002::/16, 6to4 (a relay forwards to the IPv4 address in bits 16..48);
/// 64:ff9b::/96, NAT64's well-known prefix (the translator connects to the IPv4 address in the
/// last 32 bits; public ones are how IPv6-only hosts reach IPv4).
fn carried_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(v4) = v6.to_ipv4_mapped() {
        Some(v4)
    } else if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        Some(v4(s[6], s[7]))
    } else {
        None
    }
}

/// Whether `ip` is a public unicast address (not loopback, private, link-local, CGNAT,
/// unique-local, site-local, multicast, documentation, benchmarking, unspecified, the cloud
/// metadata range, or Azure's host endpoint 168.63.129.16, which answers its own VMs only). IPv6 addresses that carry an IPv4 address a gateway would reach (IPv4-mapped,
/// 6to4, NAT64) are judged by that IPv4 address; the deprecated IPv4-compatible range and
/// Teredo are refused outright.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o == [168, 63, 129, 16]
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = carried_ipv4(v6) {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // ::/96, IPv4-compatible (deprecated; includes :: and ::1).
                || s[..6] == [0; 6]
                // ::ffff:0:0:0/96, IPv4-translated.
                || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0)
                // The rest of 64:ff9b::/32, such as the local-use NAT64 prefix 64:ff9b:1::/48.
                || (s[0] == 0x0064 && s[1] == 0xff9b)
                // 100::/64, discard-only.
                || (s[0] == 0x0100 && s[1..4] == [0; 3])
                // 2001::/32, Teredo (tunnels to an IPv4 address), and 2001:2::/48, benchmarking.
                || (s[0] == 0x2001 && (s[1] == 0 || (s[1] == 2 && s[2] == 0)))
                // fc00::/7 unique-local, fe80::/10 link-local, fec0::/10 site-local (deprecated).
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                // 2001:db8::/32 and 3fff::/20, documentation.
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x3fff && s[1] < 0x1000))
        }
    }
}

/// What a refused target is told, whatever the reason.
const TARGET_REFUSED: &str = "the host does not resolve to an address that may be used (public addresses only, unless \
     `webhooks.allow_private_targets` or `webhooks.private_networks` allows private and loopback ones; link-local \
     and cloud metadata addresses never)";

/// The private and loopback addresses a guard lets through, beyond public ones.
#[derive(Debug, Clone)]
pub enum PrivateTargets {
    /// Every one (`webhooks.allow_private_targets`).
    All,
    /// Those in these networks (`webhooks.private_networks`; none when empty).
    Networks(Arc<[ipnet::IpNet]>),
}

impl PrivateTargets {
    /// Whether `ip` is one of them. An IPv4-mapped IPv6 address, which the system connects to
    /// as its IPv4 address, is one when that address is (not the tunnelled forms, 6to4 or
    /// NAT64, which lead through a relay). A listed network admits no address that is not a
    /// host's: unspecified (0.0.0.0/8, `::`, which reach the local host), multicast or
    /// broadcast.
    pub fn admits(&self, ip: IpAddr) -> bool {
        match self {
            PrivateTargets::All => true,
            PrivateTargets::Networks(nets) => {
                let ip = match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    IpAddr::V4(_) => ip,
                };
                let host = match ip {
                    IpAddr::V4(v4) => v4.octets()[0] != 0 && !v4.is_multicast() && !v4.is_broadcast(),
                    IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast() && !is_tunnel(v6),
                };
                host && nets.iter().any(|n| n.contains(&ip))
            }
        }
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The host did not resolve. The message is the same as [`Private`](Self::Private)'s: told
    /// apart, they would tell whoever gave the URL which names exist in the internal network.
    #[error("{TARGET_REFUSED}")]
    Unresolvable,
    /// It resolves to an address that is not allowed. The address is not in the message, which
    /// goes back to whoever gave the URL: it would tell them where names of the internal
    /// network point.
    #[error("{TARGET_REFUSED}")]
    Private(IpAddr),
}

/// The guard: resolves with `inner` and refuses non-public addresses unless allowed.
#[derive(Debug, Clone)]
pub struct Guard {
    inner: Arc<dyn HostResolver>,
    private: PrivateTargets,
    /// Plain http: with listed networks, only their addresses, never a public one.
    plain_http: bool,
}

impl Guard {
    /// A guard over `inner` that lets every private address through (`allow_private`) or none.
    pub fn new(inner: Arc<dyn HostResolver>, allow_private: bool) -> Self {
        let private =
            if allow_private { PrivateTargets::All } else { PrivateTargets::Networks(Arc::new([])) };
        Self::with(inner, private)
    }

    /// A guard over `inner` that lets `private` addresses through.
    pub fn with(inner: Arc<dyn HostResolver>, private: PrivateTargets) -> Self {
        Self { inner, private, plain_http: false }
    }

    /// This guard for plain http requests: where private targets are admitted by network, it
    /// refuses public addresses too, so that the connection itself (resolved anew by the
    /// client) cannot be led over the internet by a DNS answer that changed since the check.
    pub fn for_plain_http(&self) -> Self {
        Self { plain_http: true, ..self.clone() }
    }

    /// Whether `ip` may be a target: a public address (not for plain http under listed
    /// networks), or a private one this guard admits; never a link-local or metadata one.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if is_never_allowed(ip) {
            return false;
        }
        if self.plain_http && matches!(self.private, PrivateTargets::Networks(_)) {
            // Whatever the networks listed (a public block, 0.0.0.0/0), never over the internet.
            return !is_public(ip) && self.private.admits(ip);
        }
        is_public(ip) || self.private.admits(ip)
    }

    /// Whether any private address may be a target: without, plain `http` never may.
    pub fn admits_any_private(&self) -> bool {
        match &self.private {
            PrivateTargets::All => true,
            PrivateTargets::Networks(nets) => !nets.is_empty(),
        }
    }

    /// Whether plain `http` may be sent to a host with these addresses: only inside the
    /// private targets admitted (an on-premise receiver), never over the internet.
    pub fn admits_plain_http(&self, addrs: &[IpAddr]) -> bool {
        match &self.private {
            PrivateTargets::All => true,
            PrivateTargets::Networks(_) => {
                !addrs.is_empty() && addrs.iter().all(|ip| !is_public(*ip) && self.private.admits(*ip))
            }
        }
    }

    /// Checks a host (a name or an IP literal) and returns its addresses.
    pub async fn check_host(&self, host: &str) -> Result<Vec<IpAddr>, TargetError> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let addrs = match literal.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self.inner.lookup(host).await.map_err(|_| TargetError::Unresolvable)?,
        };
        if addrs.is_empty() {
            return Err(TargetError::Unresolvable);
        }
        if let Some(bad) = addrs.iter().find(|ip| !self.allows(**ip)) {
            return Err(TargetError::Private(*bad));
        }
        Ok(addrs)
    }

    /// Checks the host of `url` when it is an IP literal. A literal never reaches the resolver,
    /// so the client's connections skip this guard's check for it: every request this guard's
    /// client sends to a URL that came from outside must be checked here first. A name is
    /// checked when the client resolves it.
    pub async fn check_literal(&self, url: &url::Url) -> Result<(), TargetError> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_host(&ip.to_string()).await.map(drop),
            Some(url::Host::Ipv6(ip)) => self.check_host(&ip.to_string()).await.map(drop),
            Some(url::Host::Domain(_)) | None => Ok(()),
        }
    }

    /// An HTTP client whose every connection goes through this guard: no redirects followed,
    /// a timeout, rustls, and never a proxy. A proxy (`HTTPS_PROXY`, `ALL_PROXY` and the like in
    /// the environment) would resolve the host itself, out of this guard's reach, and could be
    /// led to a private address by a DNS answer that changes after the check.
    pub fn client(&self, timeout: Duration) -> reqwest::Client {
        self.client_as(timeout, concat!("authlink-webhooks/", env!("CARGO_PKG_VERSION")))
    }

    /// [`client`](Self::client), sending `user_agent`.
    pub fn client_as(&self, timeout: Duration, user_agent: &str) -> reqwest::Client {
        #[allow(clippy::expect_used)] // only fails if the TLS backend cannot initialise at all
        reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(self.clone()))
            .timeout(timeout)
            // A target that does not even take the connection gives up its slot early.
            .connect_timeout(timeout.min(CONNECT_TIMEOUT))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(user_agent)
            .build()
            .expect("HTTP client")
    }
}

impl Resolve for Guard {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        Box::pin(async move {
            let addrs = guard
                .check_host(name.as_str())
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            let out: Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect::<Vec<_>>().into_iter());
            Ok(out)
        })
    }
}

/// A request error of a guarded client in words, without the URL (which may carry credentials
/// in its query): what happened, and the guard's refusal when it was one.
pub fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("private") || text.contains("resolve") {
            out = format!("{out}: {text}");
            break;
        }
        source = s.source();
    }
    out
}

/// The longest wait a `Retry-After` can ask for.
const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// A `Retry-After` value (RFC 9110 §10.2.3) as a wait from `now`: delay-seconds, or an
/// HTTP-date in any of its three forms; a date in the past means no wait. At most a day.
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    let secs = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time".
        value.parse::<u64>().unwrap_or(u64::MAX)
    } else {
        u64::try_from((http_date(value)? - now).whole_seconds()).unwrap_or(0)
    };
    Some(Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS)))
}

/// Parses an HTTP-date: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or one of the obsolete
/// forms recipients must still accept, RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`).
pub fn http_date(value: &str) -> Option<OffsetDateTime> {
    // IMF-fixdate is an RFC 2822 date in GMT.
    if let Ok(at) = OffsetDateTime::parse(value, &Rfc2822) {
        return Some(at);
    }
    // The obsolete forms, rewritten as RFC 2822 (whose two-digit years are 19xx from 50 on).
    // The weekday is redundant with the date and dropped.
    let rewritten = match value.split_once(", ") {
        Some((_, rest)) => {
            let (date, clock) = rest.split_once(' ')?;
            if date.matches('-').count() != 2 {
                return None;
            }
            format!("{} {clock}", date.replace('-', " "))
        }
        None => match value.split_whitespace().collect::<Vec<_>>().as_slice() {
            [_, month, day, clock, year] => format!("{day} {month} {year} {clock} GMT"),
            _ => return None,
        },
    };
    OffsetDateTime::parse(&rewritten, &Rfc2822).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2025-03-01 12:00:00 UTC);

    fn wait(value: &str) -> Option<u64> {
        parse_retry_after(value, NOW).map(|d| d.as_secs())
    }

    /// The metadata address stays refused in every IPv6 form that carries it to a translator
    /// (SIIT, NAT64's local-use prefix in each of its layouts: /96, /48, /56, /64), while a
    /// private address so carried is only a private one.
    #[test]
    fn metadata_is_never_reached_through_a_translator() {
        let never = |ip: &str| is_never_allowed(ip.parse().unwrap());
        for ip in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:a9fe:a9:fe00::",
            "64:ff9b:1:a9:fe:a9fe::",
            "64:ff9b:1:0:a9:fea9:fe00:0",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(never(ip), "{ip}");
        }
        for ip in ["10.0.0.1", "64:ff9b:1::a00:1", "64:ff9b:1:a00:1::", "::ffff:0:a00:1", "fd12::1"] {
            assert!(!never(ip), "{ip}");
        }
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(wait("120"), Some(120));
        assert_eq!(wait(" 0 "), Some(0));
        // Bounded to a day, however large.
        assert_eq!(wait("604800"), Some(86_400));
        assert_eq!(wait("99999999999999999999999999"), Some(86_400));
        for bad in ["", "-5", "1.5", "soon", "12 s"] {
            assert_eq!(wait(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // IMF-fixdate, the form senders use.
        assert_eq!(wait("Sat, 01 Mar 2025 12:02:00 GMT"), Some(120));
        assert_eq!(wait("Sat, 01 Mar 2025 14:00:00 GMT"), Some(7200));
        // The obsolete forms: RFC 850 and asctime.
        assert_eq!(wait("Saturday, 01-Mar-25 12:00:30 GMT"), Some(30));
        assert_eq!(wait("Sat Mar  1 12:10:00 2025"), Some(600));
        // A date in the past: no wait. Far ahead: a day at most.
        assert_eq!(wait("Sun, 06 Nov 1994 08:49:37 GMT"), Some(0));
        assert_eq!(wait("Mon, 01 Mar 2027 12:00:00 GMT"), Some(86_400));
        for bad in [
            "Sat, 32 Mar 2025 12:00:00 GMT",
            "Sat, 01 Mar 2025 25:00:00 GMT",
            "Saturday, 01 Mar 25 12:00:30 GMT",
            "Sat Mar 1 12:10:00",
            "tomorrow",
            "Sat, 01 Mar",
        ] {
            assert_eq!(wait(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn ip_literals_are_checked_without_the_resolver() {
        let guard = Guard::new(Arc::new(SystemResolver), false);
        for url in
            ["https://10.1.2.3/a.png", "https://127.0.0.1:8443/", "https://[fd00::1]/x", "http://[::1]/"]
        {
            let url = url::Url::parse(url).unwrap();
            assert!(matches!(guard.check_literal(&url).await, Err(TargetError::Private(_))), "{url}");
        }
        let public = url::Url::parse("https://93.184.215.14/a.png").unwrap();
        assert_eq!(guard.check_literal(&public).await, Ok(()));
        // Names are left to the resolver, which the client consults at connection time.
        let name = url::Url::parse("https://localhost/a.png").unwrap();
        assert_eq!(guard.check_literal(&name).await, Ok(()));
        let open = Guard::new(Arc::new(SystemResolver), true);
        assert_eq!(open.check_literal(&url::Url::parse("https://10.1.2.3/").unwrap()).await, Ok(()));
    }

    /// A resolver that answers from a table and records what it was asked.
    #[derive(Debug, Default)]
    struct Stub {
        answers: Vec<(&'static str, Vec<IpAddr>)>,
        asked: Mutex<Vec<String>>,
    }

    impl HostResolver for Stub {
        fn lookup(&self, host: &str) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
            self.asked.lock().unwrap().push(host.to_string());
            let found = self.answers.iter().find(|(h, _)| *h == host).map(|(_, a)| a.clone());
            Box::pin(async move { found.ok_or_else(|| std::io::Error::other("NXDOMAIN")) })
        }
    }

    fn stub() -> Arc<Stub> {
        Arc::new(Stub {
            answers: vec![
                ("public.example", vec!["93.184.216.34".parse().unwrap()]),
                ("loopback.example", vec!["127.0.0.1".parse().unwrap()]),
                ("metadata.example", vec!["169.254.169.254".parse().unwrap()]),
                ("ten.example", vec!["10.1.2.3".parse().unwrap()]),
                ("v6loop.example", vec!["::1".parse().unwrap()]),
                ("ula.example", vec!["fd00::1".parse().unwrap()]),
                ("mapped.example", vec!["::ffff:192.168.1.1".parse().unwrap()]),
                // Rebinding-style answer: one public and one private address.
                ("mixed.example", vec!["93.184.216.34".parse().unwrap(), "192.168.0.10".parse().unwrap()]),
            ],
            asked: Mutex::default(),
        })
    }

    /// `webhooks.private_networks`: the private addresses in the listed networks pass (also
    /// IPv4-mapped), no other private one does, link-local and metadata addresses never, even
    /// listed; plain http only to a host whose addresses all lie in them.
    #[tokio::test]
    async fn private_networks_admit_only_their_addresses() {
        let listed = [
            "10.1.0.0/16",
            "127.0.0.1/32",
            "169.254.0.0/16",
            "fd00::/8",
            "0.0.0.0/8",
            "224.0.0.0/4",
            "ff00::/8",
        ];
        let nets: Vec<ipnet::IpNet> = listed.iter().map(|n| n.parse().unwrap()).collect();
        let guard = Guard::with(stub(), PrivateTargets::Networks(nets.into()));
        for host in ["ten.example", "loopback.example", "ula.example", "public.example"] {
            assert!(guard.check_host(host).await.is_ok(), "{host}");
        }
        for literal in ["10.1.255.1", "127.0.0.1", "::ffff:10.1.0.9", "fd12::1"] {
            assert!(guard.check_host(literal).await.is_ok(), "{literal}");
        }
        for refused in ["10.2.0.1", "127.0.0.2", "192.168.1.1", "::1", "mapped.example", "mixed.example"] {
            assert!(matches!(guard.check_host(refused).await, Err(TargetError::Private(_))), "{refused}");
        }
        // Listed or not, link-local and metadata addresses stay refused, and so do addresses
        // that are no host's (0.0.0.0 reaches the local host).
        for never in [
            "169.254.169.254",
            "169.254.1.1",
            "metadata.example",
            "fd20:ce::254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "ff02::1",
        ] {
            assert!(matches!(guard.check_host(never).await, Err(TargetError::Private(_))), "{never}");
        }
        let ips = |list: &[&str]| list.iter().map(|ip| ip.parse().unwrap()).collect::<Vec<IpAddr>>();
        assert!(guard.admits_any_private());
        assert!(guard.admits_plain_http(&ips(&["10.1.2.3", "fd00::5"])));
        assert!(!guard.admits_plain_http(&ips(&["10.1.2.3", "93.184.216.34"])), "not over the internet");
        assert!(!guard.admits_plain_http(&ips(&["93.184.216.34"])));
        assert!(!guard.admits_plain_http(&[]));
        // For plain http, nothing public either: the client's own lookup cannot lead it there.
        let plain = guard.for_plain_http();
        assert!(plain.check_host("ten.example").await.is_ok());
        assert!(matches!(plain.check_host("public.example").await, Err(TargetError::Private(_))));
        assert!(Guard::new(stub(), true).for_plain_http().check_host("public.example").await.is_ok());
        // Nor when the networks listed take in public addresses.
        let everything = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        let wide = Guard::with(stub(), PrivateTargets::Networks(everything.into()));
        assert!(wide.check_host("public.example").await.is_ok());
        assert!(wide.for_plain_http().check_host("ten.example").await.is_ok());
        assert!(matches!(
            wide.for_plain_http().check_host("public.example").await,
            Err(TargetError::Private(_))
        ));
        // Nor a tunnel that leads through a relay to another host.
        for tunnel in ["2001:0:4136:e378::1", "64:ff9b::a01:203", "64:ff9b:1::a01:203", "2002:a01:203::1"] {
            assert!(matches!(wide.check_host(tunnel).await, Err(TargetError::Private(_))), "{tunnel}");
        }
        let none = Guard::new(stub(), false);
        assert!(!none.admits_any_private() && !none.admits_plain_http(&ips(&["10.1.2.3"])));
        let all = Guard::new(stub(), true);
        assert!(all.admits_any_private() && all.admits_plain_http(&ips(&["93.184.216.34"])));
    }

    #[tokio::test]
    async fn private_targets_are_refused_through_the_resolver() {
        let s = stub();
        let guard = Guard::new(s.clone(), false);
        assert!(guard.check_host("public.example").await.is_ok());
        for host in [
            "loopback.example",
            "metadata.example",
            "ten.example",
            "v6loop.example",
            "ula.example",
            "mapped.example",
            "mixed.example",
        ] {
            assert!(matches!(guard.check_host(host).await, Err(TargetError::Private(_))), "{host}");
        }
        for literal in ["127.0.0.1", "[::1]", "169.254.169.254", "10.0.0.1", "0.0.0.0", "100.64.0.1"] {
            assert!(matches!(guard.check_host(literal).await, Err(TargetError::Private(_))), "{literal}");
        }
        assert_eq!(guard.check_host("nxdomain.example").await, Err(TargetError::Unresolvable));
        // Literals never reach the resolver; names always do.
        let asked = s.asked.lock().unwrap().clone();
        assert!(asked.iter().all(|h| h.ends_with(".example")));
    }

    #[tokio::test]
    async fn the_client_refuses_before_connecting() {
        let guard = Guard::new(stub(), false);
        let client = guard.client(Duration::from_secs(2));
        // The stub maps this name to 10.1.2.3; the resolver refuses it, so no connection is tried.
        let err = client.get("http://ten.example:9/").send().await.unwrap_err();
        let chain = format!("{err:?}");
        assert!(chain.contains("Private(10.1.2.3)"), "{chain}");
    }

    #[tokio::test]
    async fn allow_private_targets_lifts_the_restriction() {
        let guard = Guard::new(stub(), true);
        for host in ["loopback.example", "127.0.0.1", "ten.example", "ula.example", "mapped.example", "[::1]"]
        {
            assert!(guard.check_host(host).await.is_ok(), "{host}");
        }
        // But not for link-local addresses and the metadata endpoints, in any form.
        for host in [
            "metadata.example",
            "169.254.169.254",
            "169.254.0.1",
            "[fe80::1]",
            "[::ffff:169.254.169.254]",
            "[fd00:ec2::254]",
            "[fd20:ce::254]",
            "[64:ff9b::a9fe:a9fe]",
            "[2002:a9fe:a9fe::]",
            "[::a9fe:a9fe]",
            "100.100.100.200",
            "192.0.0.192",
            "168.63.129.16",
        ] {
            assert!(matches!(guard.check_host(host).await, Err(TargetError::Private(_))), "{host}");
        }
        // Not every unique-local or shared address is one.
        for host in ["[fd00:ec2::253]", "100.100.100.201", "192.0.0.193"] {
            assert!(guard.check_host(host).await.is_ok(), "{host}");
        }
    }

    #[test]
    fn unresolvable_and_private_read_the_same() {
        // Told apart, they would show which internal names exist.
        assert_eq!(
            TargetError::Unresolvable.to_string(),
            TargetError::Private(IpAddr::from([10, 0, 0, 1])).to_string()
        );
    }

    #[test]
    fn public_addresses() {
        for ip in [
            "8.8.8.8",
            "2606:4700::1111",
            "93.184.216.34",
            "::ffff:8.8.8.8",
            // 6to4 and NAT64 of a public IPv4 address.
            "2002:808:808::1",
            "64:ff9b::808:808",
            "2001:4860:4860::8888",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ipv4_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "0.0.0.0",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "168.63.129.16",
            "::ffff:168.63.129.16",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        assert!(is_public("168.63.129.17".parse().unwrap()));
    }

    #[test]
    fn ipv6_ranges_that_reach_private_space_are_not_public() {
        for ip in [
            // ::/96, IPv4-compatible: whatever the IPv4 part.
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "::",
            "::1",
            // ::ffff:0:0/96, IPv4-mapped private, loopback, link-local and CGNAT addresses.
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:172.16.0.1",
            "::ffff:192.168.1.1",
            "::ffff:169.254.169.254",
            "::ffff:100.64.0.1",
            "::ffff:0.0.0.0",
            // ::ffff:0:0:0/96, IPv4-translated.
            "::ffff:0:8.8.8.8",
            "::ffff:0:10.0.0.1",
            // fec0::/10, site-local.
            "fec0::1",
            "feff:ffff::1",
            // 2002::/16, 6to4 around private, loopback and metadata addresses.
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2002:c0a8:101::1",
            "2002:a9fe:a9fe::",
            "2002::1",
            // 64:ff9b::/96, NAT64 around private addresses, and the local-use prefix.
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::c0a8:101",
            "64:ff9b:1::808:808",
            // Teredo, benchmarking, discard-only, documentation.
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "100::1",
            "2001:db8::1",
            "3fff::1",
            // Unique-local, link-local, multicast.
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn embedded_private_addresses_are_refused_as_literals() {
        let guard = Guard::new(stub(), false);
        for literal in
            ["[::127.0.0.1]", "[::ffff:10.0.0.1]", "[fec0::1]", "[2002:7f00:1::]", "[64:ff9b::a00:1]"]
        {
            assert!(matches!(guard.check_host(literal).await, Err(TargetError::Private(_))), "{literal}");
        }
    }
}
