//! Entry points for the fuzz targets (`fuzz/`): the parsers of the providers' answers and the
//! redaction of the texts they send, which are private to the adapters.
//!
//! Compiled only with `--cfg fuzzing`, as `cargo fuzz` builds; not part of the library's API.

use std::time::Duration;

use secrecy::ExposeSecret;
use time::OffsetDateTime;

use super::tiktok::RawResponse;
use super::{Profile, ProviderError, instagram, tiktok};

/// Which answer a body is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// TikTok's token endpoint (code exchange and refresh).
    TikTokToken,
    /// TikTok's `/v2/user/info/`.
    TikTokUserInfo,
    /// TikTok's revocation endpoint.
    TikTokRevoke,
    /// Instagram's `oauth/access_token` (the short-lived token).
    InstagramShortLived,
    /// Instagram's long-lived exchange and refresh.
    InstagramLongLived,
    /// Instagram's `/me`.
    InstagramProfile,
}

impl Answer {
    /// Every answer, for a fuzz input to pick from.
    pub const ALL: [Answer; 6] = [
        Answer::TikTokToken,
        Answer::TikTokUserInfo,
        Answer::TikTokRevoke,
        Answer::InstagramShortLived,
        Answer::InstagramLongLived,
        Answer::InstagramProfile,
    ];
}

/// What a parser made of an answer.
#[derive(Debug)]
pub enum Parsed {
    /// Tokens taken from the answer: the access token, then the refresh token if any.
    Tokens(Vec<String>),
    /// A profile.
    Profile(Profile),
    /// The revocation was accepted.
    Revoked,
    /// A failure, with every text of it that is logged or stored (its `Display`, its `Debug` and
    /// its reason).
    Failed(Vec<String>),
}

/// Parses `body`, answered with `status` (and `Retry-After` in seconds), as `answer`; `secrets`
/// are the values the request carried (client secret, code, tokens), which no failure may echo.
pub fn parse(answer: Answer, status: u16, retry_after: Option<u64>, body: &str, secrets: &[&str]) -> Parsed {
    let raw =
        RawResponse { status, retry_after: retry_after.map(Duration::from_secs), body: body.to_string() };
    let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
    let what = "fuzzed call";
    let result = match answer {
        Answer::TikTokToken => tiktok::parse_token_answer(&raw, now, what, secrets).map(|t| {
            let mut tokens = vec![t.access_token.expose_secret().to_string()];
            tokens.extend(t.refresh_token.map(|r| r.expose_secret().to_string()));
            Parsed::Tokens(tokens)
        }),
        Answer::TikTokUserInfo => tiktok::parse_user_info(&raw, what, secrets).map(Parsed::Profile),
        Answer::TikTokRevoke => tiktok::parse_revoke_answer(&raw, what, secrets).map(|()| Parsed::Revoked),
        Answer::InstagramShortLived => instagram::parse_short_lived(&raw, what, secrets)
            .map(|s| Parsed::Tokens(vec![s.access_token.expose_secret().to_string()])),
        Answer::InstagramLongLived => instagram::parse_long_lived(&raw, now, what, secrets)
            .map(|(token, _)| Parsed::Tokens(vec![token.expose_secret().to_string()])),
        Answer::InstagramProfile => instagram::parse_profile(&raw, what, secrets).map(Parsed::Profile),
    };
    result.unwrap_or_else(|e: ProviderError| {
        Parsed::Failed(vec![e.to_string(), format!("{e:?}"), e.reason().to_string()])
    })
}

/// The redaction every provider text goes through before it reaches a reason.
pub fn sanitize(text: &str, secrets: &[&str]) -> String {
    tiktok::sanitize(text, secrets)
}
