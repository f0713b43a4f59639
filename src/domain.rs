//! Validated value types shared by the CLI, the API and the pages.
//!
//! Each `parse` returns a [`FieldError`] that names the field and says, in plain words, what is
//! wrong; the API turns it into a 422 problem document and the CLI into a one-line error.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use url::Url;
use utoipa::ToSchema;

/// A validation failure on one input field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field, as named in the request (`label`, `redirect_url`, ...).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A platform a client can connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// TikTok (Login Kit for Web).
    Tiktok,
    /// Instagram (Instagram API with Instagram Login).
    Instagram,
}

impl Platform {
    /// Every platform authlink knows.
    pub const ALL: [Platform; 2] = [Platform::Tiktok, Platform::Instagram];

    /// The identifier used in URLs, JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Tiktok => "tiktok",
            Platform::Instagram => "instagram",
        }
    }

    /// The name shown to people.
    pub fn display_name(self) -> &'static str {
        match self {
            Platform::Tiktok => "TikTok",
            Platform::Instagram => "Instagram",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tiktok" => Ok(Platform::Tiktok),
            "instagram" => Ok(Platform::Instagram),
            other => Err(FieldError::new(
                "platforms",
                format!("unknown platform `{}` (expected tiktok or instagram)", truncate(other, 40)),
            )),
        }
    }
}

/// Parses a comma-separated list of platforms as stored in the database.
pub fn platforms_from_db(s: &str) -> Vec<Platform> {
    s.split(',').filter_map(|p| p.parse().ok()).collect()
}

/// The database form of a platform list.
pub fn platforms_to_db(p: &[Platform]) -> String {
    p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
}

/// Shortens `s` to at most `n` characters, for echoing bad input back safely.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// Longest label or name accepted.
pub const MAX_LABEL_CHARS: usize = 200;

/// A required, trimmed, single-line text of at most [`MAX_LABEL_CHARS`] characters.
pub fn parse_label(field: &str, value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if v.chars().count() > MAX_LABEL_CHARS {
        return Err(FieldError::new(field, format!("must be at most {MAX_LABEL_CHARS} characters")));
    }
    if v.chars().any(|c| c.is_control()) {
        return Err(FieldError::new(field, "must not contain control characters or line breaks"));
    }
    Ok(v.to_string())
}

/// An optional label: `None` or empty stays `None`.
pub fn parse_optional_label(field: &str, value: Option<&str>) -> Result<Option<String>, FieldError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => parse_label(field, v).map(Some),
    }
}

/// Whether `s` has the shape of one of our ids (a hyphenated UUID).
pub fn is_id_shaped(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()
}

/// A workspace slug: 1-63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`,
/// and not shaped like an id (commands and addresses take a workspace's id or its slug).
pub fn parse_slug(value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    if is_id_shaped(v) {
        return Err(FieldError::new("slug", "must not have the shape of an id, for which it would be taken"));
    }
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(v.to_string())
    } else {
        Err(FieldError::new(
            "slug",
            "must be 1-63 characters of lowercase letters, digits and dashes, not starting or ending with a dash",
        ))
    }
}

/// A slug made from a name (`"Acme Social!"` → `acme-social`); `workspace` if nothing is left.
pub fn slugify(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 60 {
            break;
        }
    }
    let trimmed = out.trim_matches('-').to_string();
    if trimmed.is_empty() {
        "workspace".into()
    } else if is_id_shaped(&trimmed) {
        format!("w-{trimmed}")
    } else {
        trimmed
    }
}

/// An `#rrggbb` colour.
pub fn parse_accent_color(value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    let ok = v.len() == 7 && v.starts_with('#') && v[1..].chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(FieldError::new("accent_color", "must be a colour like #1a2b3c"))
    }
}

fn is_loopback_host(url: &Url) -> bool {
    matches!(url.host_str(), Some("localhost") | Some("127.0.0.1") | Some("[::1]"))
}

/// An absolute `https` URL (or `http` on loopback, for development) with no credentials.
pub fn parse_web_url(field: &str, value: &str) -> Result<Url, FieldError> {
    let v = value.trim();
    if v.len() > 2048 {
        return Err(FieldError::new(field, "must be at most 2048 characters"));
    }
    let url = Url::parse(v).map_err(|_| FieldError::new(field, "must be an absolute URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&url) => {}
        _ => return Err(FieldError::new(field, "must be an https URL")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(field, "must have a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new(field, "must not contain a user name or password"));
    }
    if url.fragment().is_some() {
        return Err(FieldError::new(field, "must not contain a fragment"));
    }
    Ok(url)
}

/// An entry of a workspace's success-redirect allow-list: an origin and a path prefix, no query.
pub fn parse_allowed_redirect(value: &str) -> Result<Url, FieldError> {
    let url = parse_web_url("allowed_redirects", value)?;
    if url.query().is_some() {
        return Err(FieldError::new("allowed_redirects", "must not contain a query string"));
    }
    Ok(url)
}

/// Whether `candidate` is allowed by `entry`: the same origin exactly (scheme, host, port) and a
/// path under the entry's path, on a segment boundary (`/cb` allows `/cb` and `/cb/x`, not `/cbx`).
pub fn redirect_allowed(entry: &Url, candidate: &Url) -> bool {
    if entry.origin() != candidate.origin() {
        return false;
    }
    let prefix = entry.path();
    let path = candidate.path();
    if prefix == "/" || path == prefix {
        return true;
    }
    path.starts_with(prefix) && (prefix.ends_with('/') || path[prefix.len()..].starts_with('/'))
}

/// Checks a success redirect against a workspace's allow-list.
pub fn parse_success_redirect(value: &str, allow_list: &[Url]) -> Result<Url, FieldError> {
    let url = parse_web_url("redirect_url", value)?;
    if allow_list.iter().any(|entry| redirect_allowed(entry, &url)) {
        Ok(url)
    } else if allow_list.is_empty() {
        Err(FieldError::new(
            "redirect_url",
            "the workspace allows no success redirects; add the URL to its allow-list first",
        ))
    } else {
        Err(FieldError::new("redirect_url", "is not in the workspace's success-redirect allow-list"))
    }
}

/// A duration written as a number and a unit: `90s`, `30m`, `12h`, `30d`, `2w`.
pub fn parse_duration(field: &str, value: &str) -> Result<time::Duration, FieldError> {
    let v = value.trim();
    let err = || FieldError::new(field, "must be a positive duration like 30m, 12h, 30d or 2w");
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (n, unit) = v.split_at(split);
    let n: i64 = n.parse().map_err(|_| err())?;
    if n <= 0 {
        return Err(err());
    }
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(err()),
    };
    let total = n
        .checked_mul(secs)
        .filter(|t| *t <= MAX_LIFETIME_SECS)
        .ok_or_else(|| FieldError::new(field, "must be at most ten years"))?;
    Ok(time::Duration::seconds(total))
}

/// The longest lifetime a link can be given (ten years).
pub const MAX_LIFETIME_SECS: i64 = 10 * 365 * 86_400;

/// A link's expiry from `expires_in` (a duration from `now`) or `expires_at` (an instant), at
/// most one of them given: in the future, and at most ten years away. `None`: neither given.
pub fn parse_expiry(
    now: time::OffsetDateTime,
    expires_in: Option<&str>,
    expires_at: Option<time::OffsetDateTime>,
) -> Result<Option<time::OffsetDateTime>, FieldError> {
    match (expires_in, expires_at) {
        (Some(_), Some(_)) => Err(FieldError::new("expires_in", "give expires_in or expires_at, not both")),
        (Some(d), None) => parse_duration("expires_in", d).map(|d| Some(now + d)),
        (None, Some(at)) if at <= now => Err(FieldError::new("expires_at", "must be in the future")),
        (None, Some(at)) if at - now > time::Duration::seconds(MAX_LIFETIME_SECS) => {
            Err(FieldError::new("expires_at", "must be at most ten years away"))
        }
        (None, at) => Ok(at),
    }
}

/// A positive use limit.
pub fn parse_max_uses(value: i64) -> Result<i64, FieldError> {
    if value <= 0 {
        Err(FieldError::new("max_uses", "must be a positive number"))
    } else if value > 1_000_000 {
        Err(FieldError::new("max_uses", "must be at most 1000000"))
    } else {
        Ok(value)
    }
}

/// What a scope lets the agency do, in plain words for the client; a scope this build does not
/// know is named as it is.
pub fn scope_description(scope: &str) -> std::borrow::Cow<'static, str> {
    known_scope_description(scope).map_or_else(
        || format!("The permission “{}”", truncate(scope, 64)).into(),
        std::borrow::Cow::Borrowed,
    )
}

/// The plain words for a scope this build knows.
fn known_scope_description(scope: &str) -> Option<&'static str> {
    Some(match scope {
        "user.info.basic" => "See your display name and profile picture",
        "user.info.profile" => "See your username, bio and verified status",
        "user.info.stats" => "See your follower, following, like and video counts",
        "video.list" => "See your public videos",
        "video.upload" => "Upload videos as drafts to your account",
        "video.publish" => "Publish videos to your account",
        "instagram_business_basic" => "See your profile, photos and videos",
        "instagram_business_content_publish" => "Publish posts, reels and stories",
        "instagram_business_manage_messages" => "Read and answer your direct messages",
        "instagram_business_manage_comments" => "Read, answer and moderate comments",
        "instagram_business_manage_insights" => "See insights about your account and posts",
        _ => return None,
    })
}

/// Open-redirect payloads for the tests of every redirect parameter: each way of writing another
/// origin (scheme-relative, backslashes, user-info, look-alike hosts, encodings single and
/// double, dot segments, whitespace and control characters) before and after a path of ours.
#[cfg(test)]
pub(crate) fn open_redirect_corpus(own: &str) -> Vec<String> {
    let prefixes = [
        "",
        "/",
        "//",
        "///",
        "////",
        "\\",
        "\\\\",
        "/\\",
        "\\/",
        "/%5c",
        "%5c%5c",
        "%2f%2f",
        "/%2f",
        "%252f%252f",
        "https:",
        "https:/",
        "https://",
        "https:\\\\",
        "http://",
        "HTTPS://",
        "hTtP://",
        "javascript:",
        "data:text/html,",
        "//%09",
        "/\t/",
        " //",
        "\t//",
        "%09//",
        "%0d%0a//",
        "/./",
        "/../",
        "/%2e%2e/",
        "..%2f",
        "@",
        "/@",
        "//@",
    ];
    let hosts = [
        "evil.example".to_string(),
        "evil.example:443".to_string(),
        format!("{own}@evil.example"),
        format!("{own}.evil.example"),
        format!("evil.example#{own}"),
        format!("evil.example?{own}"),
        format!("evil.example\\{own}"),
        "evil%2eexample".to_string(),
        "ⓔvil.example".to_string(),
        "evil。example".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
        "0x7f000001".to_string(),
    ];
    let suffixes = ["", "/", "/app", "/cb", "?next=/app", "#/app"];
    let mut out = Vec::new();
    for p in prefixes {
        for h in &hosts {
            for s in suffixes {
                out.push(format!("{p}{h}{s}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No payload of the corpus passes the success-redirect check as another origin, whatever
    /// the allow-list entry; an accepted URL is on the entry's origin, under its path, without
    /// user-info.
    #[test]
    fn success_redirects_never_leave_the_allowed_origin() {
        let entry = Url::parse("https://client.example/cb").unwrap();
        let mut payloads = open_redirect_corpus("client.example");
        for p in open_redirect_corpus("client.example") {
            payloads.push(format!("https://client.example/cb{p}"));
            payloads.push(format!("https://client.example{p}"));
        }
        assert!(payloads.len() >= 500, "{}", payloads.len());
        let mut accepted = 0;
        for p in &payloads {
            if let Ok(u) = parse_success_redirect(p, std::slice::from_ref(&entry)) {
                accepted += 1;
                assert_eq!(u.origin(), entry.origin(), "{p} -> {u}");
                assert!(u.username().is_empty() && u.password().is_none(), "{p} -> {u}");
                assert!(u.path() == "/cb" || u.path().starts_with("/cb/"), "{p} -> {u}");
            }
        }
        // The corpus holds paths under the entry too: the check is not refusing everything.
        assert!(accepted > 0);
    }

    proptest::proptest! {
        /// Random URLs against random entries: allowed means same origin, and a path on a segment
        /// boundary under the entry's.
        #[test]
        fn redirect_allowed_is_origin_and_path_bound(
            entry_host in proptest::sample::select(vec!["a.example", "b.example", "a.example:8443"]),
            entry_path in proptest::sample::select(vec!["/", "/cb", "/cb/", "/a/b"]),
            host in proptest::sample::select(vec!["a.example", "b.example", "a.example:8443", "a.example.b.example"]),
            path in "(/[a-z.%]{0,4}){0,4}",
        ) {
            let entry = Url::parse(&format!("https://{entry_host}{entry_path}")).unwrap();
            if let Ok(candidate) = Url::parse(&format!("https://{host}{path}"))
                && redirect_allowed(&entry, &candidate) {
                    proptest::prop_assert_eq!(candidate.origin(), entry.origin());
                    let (p, e) = (candidate.path(), entry.path());
                    proptest::prop_assert!(
                        e == "/" || p == e || p.starts_with(&format!("{}/", e.trim_end_matches('/'))),
                        "{} under {}", p, e
                    );
                }
        }
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("label", "  Acme  ").unwrap(), "Acme");
        assert!(parse_label("label", "  ").is_err());
        assert!(parse_label("label", &"x".repeat(10_000)).is_err());
        assert!(parse_label("label", "a\nb").is_err());
    }

    #[test]
    fn slugs() {
        assert_eq!(slugify("Acme Social, Inc."), "acme-social-inc");
        assert_eq!(slugify("!!!"), "workspace");
        assert!(parse_slug("acme-1").is_ok());
        assert!(parse_slug("-acme").is_err());
        assert!(parse_slug("Acme").is_err());
        // Never shaped like an id, which commands and addresses would take it for.
        let id = "0190a6e4-0000-7000-8000-000000000000";
        assert!(parse_slug(id).is_err());
        assert!(parse_slug(&id[..35]).is_ok());
        assert_eq!(slugify(id), format!("w-{id}"));
        assert!(parse_slug(&slugify(id)).is_ok());
    }

    #[test]
    fn redirects_match_origin_and_path_prefix() {
        let entry = Url::parse("https://agency.example/callback").unwrap();
        let ok = |s: &str| redirect_allowed(&entry, &Url::parse(s).unwrap());
        assert!(ok("https://agency.example/callback"));
        assert!(ok("https://agency.example/callback/done?x=1"));
        assert!(!ok("https://agency.example/callbackevil"));
        assert!(!ok("https://agency.example.evil.com/callback"));
        assert!(!ok("http://agency.example/callback"));
        assert!(!ok("https://agency.example:444/callback"));
        assert!(!ok("https://evil.example/callback"));
        assert!(
            parse_success_redirect("https://user:pw@agency.example/callback", std::slice::from_ref(&entry))
                .is_err()
        );
        assert!(parse_success_redirect("javascript:alert(1)", std::slice::from_ref(&entry)).is_err());
        assert!(parse_success_redirect("//agency.example/callback", &[entry]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("d", "30d").unwrap(), time::Duration::days(30));
        assert_eq!(parse_duration("d", "12h").unwrap(), time::Duration::hours(12));
        for bad in ["", "0d", "-1d", "d", "10y", "5000000w"] {
            assert!(parse_duration("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn platforms() {
        assert_eq!("TikTok".parse::<Platform>().unwrap(), Platform::Tiktok);
        assert!("myspace".parse::<Platform>().is_err());
        assert_eq!(platforms_from_db(&platforms_to_db(&Platform::ALL)), Platform::ALL.to_vec());
    }

    #[test]
    fn colours() {
        assert_eq!(parse_accent_color("#AABBCC").unwrap(), "#aabbcc");
        assert!(parse_accent_color("red").is_err());
        assert!(parse_accent_color("#abc").is_err());
    }
}
