//! Connect attempts through a link, as the agency sees them: how each ended, in plain words,
//! with the short reference the client's page showed. Kept for
//! [`RETENTION_MS`](crate::db::oauth_flows::RETENTION_MS) after they expired.

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Scope, ServiceResult, links};
use crate::clock::from_millis;
use crate::db::{self, oauth_flows::FlowRow};
use crate::state::App;

/// Where an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    /// The account was connected, or connected again.
    Connected,
    /// It failed: `outcome` says how.
    Failed,
    /// The client is at the platform (less than ten minutes since the start), or its answer is
    /// being handled.
    InProgress,
    /// The client did not come back from the platform within ten minutes: they left, or came
    /// back in another browser.
    Abandoned,
}

impl AttemptStatus {
    /// The word the dashboard shows.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Connected => "connected",
            AttemptStatus::Failed => "failed",
            AttemptStatus::InProgress => "in_progress",
            AttemptStatus::Abandoned => "abandoned",
        }
    }
}

/// One connect attempt through a link.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectAttempt {
    /// The attempt's id.
    pub id: String,
    /// The short reference the client's page showed (the id's last eight characters, upper
    /// case).
    pub reference: String,
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// Where it stands.
    pub status: AttemptStatus,
    /// How it ended: `connected`, `reconnected` or a failure's code (`denied`, `scopes_missing`,
    /// `setup_error`, `exchange_refused`, `provider_busy`, `provider_unavailable`, `exchange_failed`,
    /// `profile_failed`, `provider_error`, `account_not_allowed`, `link_gone`, `link_used_up`,
    /// `unavailable`, `internal`); `null` while it has not ended.
    pub outcome: Option<String>,
    /// What happened, in plain words.
    pub description: String,
    /// What went wrong, when it is known: the required scopes the client switched off
    /// (comma-separated), or the `error` the platform sent back.
    pub detail: Option<String>,
    /// The connection it made or repaired.
    pub connection_id: Option<String>,
    /// When the client pressed the platform's button.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: OffsetDateTime,
    /// When the client came back from the platform.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub returned_at: Option<OffsetDateTime>,
}

/// The short reference of an attempt, shown on its client's failure page and beside it in the
/// agency's listing: the last eight characters of its id, the random part of a UUIDv7. It is no
/// secret: an attempt's pages are for its own browser, whatever is known of the attempt.
pub fn reference(id: &str) -> String {
    id.get(id.len().saturating_sub(8)..).unwrap_or(id).to_ascii_uppercase()
}

/// The attempts through the link `link_id`, newest first: at most `limit`, older than the
/// attempt `before` when given.
pub async fn of_link(
    app: &App,
    scope: &Scope,
    link_id: &str,
    before: Option<&str>,
    limit: i64,
) -> ServiceResult<Vec<ConnectAttempt>> {
    let link = links::get_row(app, scope, link_id).await?;
    let mut conn = app.db.read().await?;
    let rows = db::oauth_flows::of_link(&mut conn, &link.id, before, limit).await?;
    let now = app.now_ms();
    // A callback ends within the request timeout, its answer recorded or not.
    let handled_within =
        i64::try_from(app.config.http.request_timeout_secs).unwrap_or(i64::MAX).saturating_mul(1000);
    Ok(rows.iter().map(|r| view(r, now, handled_within)).collect())
}

/// `row` as the agency sees it at `now_ms`, a callback being handled within `handled_within_ms`.
fn view(row: &FlowRow, now_ms: i64, handled_within_ms: i64) -> ConnectAttempt {
    let status = match (row.outcome.as_deref(), row.consumed_at) {
        (Some("connected" | "reconnected"), _) => AttemptStatus::Connected,
        (Some(_), _) => AttemptStatus::Failed,
        // The answer came and its end was never recorded: the database failed under it, or the
        // process stopped.
        (None, Some(at)) if at.saturating_add(handled_within_ms) < now_ms => AttemptStatus::Failed,
        (None, Some(_)) => AttemptStatus::InProgress,
        (None, None) if row.expires_at > now_ms => AttemptStatus::InProgress,
        (None, None) => AttemptStatus::Abandoned,
    };
    ConnectAttempt {
        id: row.id.clone(),
        reference: reference(&row.id),
        provider: row.provider.clone(),
        status,
        outcome: row.outcome.clone(),
        description: describe(status, row.outcome.as_deref(), row.detail.as_deref()),
        detail: row.detail.clone(),
        connection_id: row.connection_id.clone(),
        started_at: from_millis(row.created_at),
        returned_at: row.consumed_at.map(from_millis),
    }
}

/// What happened, in words for the agency.
pub fn describe(status: AttemptStatus, outcome: Option<&str>, detail: Option<&str>) -> String {
    let with = |s: &str| match detail {
        Some(d) => format!("{s} ({d})."),
        None => format!("{s}."),
    };
    let Some(outcome) = outcome else {
        return match status {
            AttemptStatus::InProgress => "The client is at the platform, or its answer is being handled.",
            AttemptStatus::Abandoned => {
                "The client did not come back from the platform within ten minutes: they left it, came back in \
                 another browser, or the platform sent back an error without the attempt's state (authlink's \
                 log has it)."
            }
            _ => {
                "The platform's answer arrived, but how the attempt ended was not recorded: authlink's database \
                 failed under it, or its process stopped. The client can try again from the link."
            }
        }
        .to_string();
    };
    match outcome {
        "connected" => "Connected a new account.".into(),
        "reconnected" => "Connected an account again (its connection was updated).".into(),
        "denied" => "The client chose not to allow access on the platform.".into(),
        "scopes_missing" => with("The client switched off a permission you require"),
        "account_not_allowed" => {
            "The platform reported an account type that cannot be connected (a personal account).".into()
        }
        "setup_error" => with(
            "The platform refused authlink's authorization request: check the platform's client key, the \
             scopes configured for it and the callback URL registered with it. Every client meets this until \
             it is fixed",
        ),
        "exchange_refused" => {
            "The platform refused the code exchange for authlink's credentials or redirect URI: check the \
             platform's client secret and the callback URL registered with it (authlink's log has the \
             platform's words). Every client meets this until it is fixed."
                .into()
        }
        "provider_busy" => with("The platform reported a passing problem instead of its consent screen"),
        "provider_error" => with("The platform sent back an error"),
        "provider_unavailable" => "The platform was slow or could not be reached.".into(),
        "exchange_failed" => {
            "The platform did not accept the authorization code (expired, used already, or not issued for this \
             attempt's browser), or its answer did not read; the client was asked to try again."
                .into()
        }
        "profile_failed" => "The platform's profile call failed after the code exchange.".into(),
        "link_gone" => {
            "The link was revoked, rotated or expired while the client was at the platform.".into()
        }
        "link_used_up" => {
            "The link had reached its limit of connections, and this account was not one it had connected."
                .into()
        }
        "unavailable" => "authlink's database could not be reached.".into(),
        "internal" => "An internal error of authlink's: its log has the details.".into(),
        other => format!("Ended as {other}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(outcome: Option<&str>, consumed_at: Option<i64>, expires_at: i64) -> FlowRow {
        FlowRow {
            id: "0193a4b2-0000-7000-8000-00000abc12ef".into(),
            state_hash: String::new(),
            browser_hash: String::new(),
            link_id: "l".into(),
            workspace_id: "w".into(),
            provider: "tiktok".into(),
            verifier_sealed: String::new(),
            created_at: 1_000,
            expires_at,
            consumed_at,
            outcome: outcome.map(str::to_string),
            connection_id: None,
            detail: Some("video.list".into()),
            link_token_hash: None,
        }
    }

    #[test]
    fn an_attempt_stands_where_its_row_says() {
        let now = 10_000;
        let status = |outcome, consumed, expires| view(&row(outcome, consumed, expires), now, 30_000).status;
        assert_eq!(status(Some("connected"), Some(2_000), 601_000), AttemptStatus::Connected);
        assert_eq!(status(Some("reconnected"), Some(2_000), 5_000), AttemptStatus::Connected);
        assert_eq!(status(Some("denied"), Some(2_000), 601_000), AttemptStatus::Failed);
        assert_eq!(status(None, None, 601_000), AttemptStatus::InProgress);
        assert_eq!(status(None, Some(2_000), 601_000), AttemptStatus::InProgress, "being handled");
        assert_eq!(view(&row(None, Some(2_000), 601_000), 40_000, 30_000).status, AttemptStatus::Failed);
        assert_eq!(status(None, None, 5_000), AttemptStatus::Abandoned);
        assert_eq!(view(&row(None, Some(2_000), 5_000), 40_000, 30_000).status, AttemptStatus::Failed);
        let v = view(&row(Some("scopes_missing"), Some(2_000), 5_000), now, 30_000);
        assert_eq!(v.reference, "0ABC12EF");
        assert!(v.description.contains("(video.list)"), "{}", v.description);
        assert_eq!(v.returned_at, Some(from_millis(2_000)));
    }
}
