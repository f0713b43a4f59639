//! Meta's deauthorize and data deletion callbacks for Instagram.
//!
//! Meta POSTs a form with one field, `signed_request` = `<sig>.<payload>` (base64url, padding
//! optional). The signature is HMAC-SHA256 with the app secret over the payload segment exactly
//! as received, compared in constant time; the payload's `algorithm` must be `HMAC-SHA256` and
//! its `user_id` is the app-scoped id. An invalid signature gets 400 and changes nothing.
//!
//! A request issued more than a day before it arrives (or more than five minutes ahead of our
//! clock) is refused the same way: a captured callback cannot be replayed later. The routes
//! answer 404 while Instagram is disabled; in sandbox mode they reach sandbox connections only
//! (the sandbox's app secret is public), and in live mode live connections only.
//!
//! - Deauthorize: every connection of that account is marked broken at once (tokens erased),
//!   with a reason and `connection.broken`: the client can repair it through the link.
//! - Data deletion: tokens and profile data are erased (the connection is broken the same way),
//!   and the answer is `{"url": <status page>, "confirmation_code": <code>}` as Meta requires.

use axum::Json;
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::Sha256;

use super::{MessagePage, render};
use crate::crypto;
use crate::db;
use crate::service::connections::{self, ConnectionStatus};
use crate::service::{Actor, audit};
use crate::state::AppState;

/// The form Meta posts.
#[derive(Debug, Deserialize)]
pub struct SignedRequestForm {
    signed_request: Option<String>,
}

/// The verified payload.
#[derive(Debug, Deserialize)]
pub struct SignedPayload {
    /// Must be `HMAC-SHA256`.
    pub algorithm: String,
    /// The app-scoped user id.
    pub user_id: serde_json::Value,
    /// When Meta issued it (unix seconds).
    #[serde(default)]
    pub issued_at: Option<i64>,
}

fn decode_b64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Verifies a `signed_request` with `secret`; returns the payload and the app-scoped user id.
pub fn verify_signed_request(signed: &str, secret: &[u8]) -> Option<(SignedPayload, String)> {
    let (sig, payload) = signed.split_once('.')?;
    let sig = decode_b64url(sig)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(payload.as_bytes());
    let expected = mac.finalize().into_bytes();
    if !crypto::constant_time_eq(&expected, &sig) {
        return None;
    }
    let parsed: SignedPayload = serde_json::from_slice(&decode_b64url(payload)?).ok()?;
    if !parsed.algorithm.eq_ignore_ascii_case("HMAC-SHA256") {
        return None;
    }
    let user_id = match &parsed.user_id {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    if user_id.is_empty() {
        return None;
    }
    Some((parsed, user_id))
}

/// The secrets that may sign Meta's requests (the Instagram app's, and the Meta app's when
/// configured), and whether they are the sandbox's; `None` while Instagram is disabled (nothing
/// may then be changed through these routes).
fn app_secrets(state: &AppState) -> Option<(Vec<Vec<u8>>, bool)> {
    let ig = &state.config.providers.instagram;
    if !ig.enabled {
        None
    } else if ig.is_sandbox() {
        // Both of the sandbox's secrets, as both of an app's may be configured (which one Meta
        // signs with is unconfirmed; the sandbox's `signing_secret` switch picks).
        Some((
            vec![
                crate::sandbox::INSTAGRAM_CLIENT_SECRET.as_bytes().to_vec(),
                crate::sandbox::META_APP_SECRET.as_bytes().to_vec(),
            ],
            true,
        ))
    } else {
        let secrets: Vec<Vec<u8>> = [&ig.client_secret, &ig.meta_app_secret]
            .into_iter()
            .flatten()
            .map(|s| s.expose_secret().as_bytes().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        (!secrets.is_empty()).then_some((secrets, false))
    }
}

/// How old a signed request may be when it arrives.
const MAX_AGE_SECS: i64 = 86_400;
/// How far ahead of our clock a signed request may claim to be issued.
const MAX_SKEW_SECS: i64 = 300;

fn bad_signature() -> Response {
    tracing::warn!("Instagram callback with a missing or invalid signed_request refused");
    (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "invalid signed_request"}))).into_response()
}

/// Why a callback was refused.
enum Refused {
    /// Instagram is disabled.
    Disabled,
    /// Missing or invalid signature.
    Signature,
    /// Issued too long ago or ahead of our clock, or without `issued_at` (Meta always sends it:
    /// a request without it could be replayed at any time).
    Stale(Option<i64>),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Disabled => StatusCode::NOT_FOUND.into_response(),
            Refused::Signature => bad_signature(),
            Refused::Stale(at) => {
                tracing::warn!(issued_at = ?at, "Instagram callback issued too long ago, ahead or at no stated time refused");
                (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "signed_request is not current"})))
                    .into_response()
            }
        }
    }
}

/// A verified request of this instance's Instagram app: the app-scoped user id and whether the
/// sandbox signed it.
fn verified(state: &AppState, form: &SignedRequestForm) -> Result<(String, bool), Refused> {
    let (secrets, sandbox) = app_secrets(state).ok_or(Refused::Disabled)?;
    let signed = form.signed_request.as_deref().ok_or(Refused::Signature)?;
    let (payload, user_id) =
        secrets.iter().find_map(|secret| verify_signed_request(signed, secret)).ok_or(Refused::Signature)?;
    let now = state.now_ms() / 1000;
    match payload.issued_at {
        Some(at) if (now - MAX_AGE_SECS..=now + MAX_SKEW_SECS).contains(&at) => Ok((user_id, sandbox)),
        at => Err(Refused::Stale(at)),
    }
}

/// Erases tokens (and, for a deletion, profile data) of every connection of the account made in
/// this mode (sandbox or live), and marks those not disconnected by the agency broken.
/// Erases what authlink holds of the app-scoped user `user_id`: the tokens, and with
/// `deletion_code` (a data deletion request) the profile too, the request being recorded under
/// that code in the same transaction, so that Meta's retry of a request whose answer it missed
/// finds nothing half done.
async fn erase(
    state: &AppState,
    user_id: &str,
    sandbox: bool,
    deletion_code: Option<&str>,
) -> crate::service::ServiceResult<usize> {
    let delete_profile = deletion_code.is_some();
    let now = state.now_ms();
    let mut tx = state.db.begin_write().await?;
    let rows =
        db::connections::by_app_scoped_id_for_update(&mut tx, state.db.backend(), "instagram", user_id)
            .await?;
    let rows: Vec<_> = rows.into_iter().filter(|r| (r.sandbox != 0) == sandbox).collect();
    let count = rows.len();
    for mut row in rows {
        let reason = if delete_profile {
            "The account holder asked Meta to delete their data; tokens and profile data were erased. The client can connect again through the link."
        } else {
            "The account holder removed the app on Instagram. The client can connect again through the link."
        };
        row.access_token_sealed = None;
        row.refresh_token_sealed = None;
        row.access_expires_at = None;
        row.refresh_expires_at = None;
        row.token_generation += 1;
        if delete_profile {
            row.username = None;
            row.display_name = None;
            row.avatar_url = None;
            db::connections::scrub_events(&mut tx, &row.id).await?;
        }
        if ConnectionStatus::parse(&row.status) == ConnectionStatus::Disconnected {
            // Removed by the agency already: only the erasure applies.
            row.updated_at = now;
            db::connections::update(&mut tx, &row).await?;
        } else {
            // History, audit and `connection.broken`, once.
            connections::mark_broken_in(&mut tx, state, &mut row, reason, now).await?;
        }
        if delete_profile {
            db::connections::insert_event(
                &mut tx,
                &connections::event(&row, "data_deleted", Some(reason.to_string()), now),
            )
            .await?;
            audit::record(
                &mut tx,
                now,
                &Actor::System,
                Some(&row.workspace_id),
                "connection.data_deleted",
                "connection",
                &row.id,
                serde_json::json!({"source": "meta_callback"}),
            )
            .await?;
        }
    }
    if let Some(code) = deletion_code {
        let erased = i64::try_from(count).unwrap_or(0);
        db::webhooks::insert_deletion_request(&mut tx, code, "instagram", erased, now).await?;
    }
    tx.commit().await?;
    Ok(count)
}

/// A failure of a Meta callback, answered in JSON like the callback's success (Meta retries).
fn callback_failed(e: crate::service::ServiceError) -> Response {
    use crate::service::ServiceError;
    let status = match &e {
        ServiceError::Db(crate::db::DbError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::error!(error = %e, "a Meta callback could not be processed");
    (status, Json(serde_json::json!({"error": "not processed; try again later"}))).into_response()
}

/// `POST /oauth/instagram/deauthorize`.
pub async fn instagram_deauthorize(
    State(state): State<AppState>,
    Form(form): Form<SignedRequestForm>,
) -> Response {
    let (user_id, sandbox) = match verified(&state, &form) {
        Ok(v) => v,
        Err(refused) => return refused.into_response(),
    };
    match erase(&state, &user_id, sandbox, None).await {
        Ok(n) => {
            tracing::info!(connections = n, "Instagram deauthorization processed");
            (StatusCode::OK, Json(serde_json::json!({"ok": true}))).into_response()
        }
        Err(e) => callback_failed(e),
    }
}

/// `POST /oauth/instagram/data-deletion`.
pub async fn instagram_data_deletion(
    State(state): State<AppState>,
    Form(form): Form<SignedRequestForm>,
) -> Response {
    let (user_id, sandbox) = match verified(&state, &form) {
        Ok(v) => v,
        Err(refused) => return refused.into_response(),
    };
    let code = hex::encode(crypto::random_bytes::<12>());
    let count = match erase(&state, &user_id, sandbox, Some(&code)).await {
        Ok(n) => n,
        Err(e) => return callback_failed(e),
    };
    tracing::info!(connections = count, "Instagram data deletion processed");
    Json(serde_json::json!({
        "url": state.config.public(&format!("/oauth/instagram/data-deletion/{code}")),
        "confirmation_code": code,
    }))
    .into_response()
}

/// `GET /oauth/instagram/data-deletion/{code}`: the status of a deletion request.
pub async fn instagram_deletion_status(State(state): State<AppState>, Path(code): Path<String>) -> Response {
    // Codes are 24 hex digits (see `data_deletion`); anything else is unknown without a query.
    let well_formed = code.len() == 24 && code.bytes().all(|b| b.is_ascii_hexdigit());
    let found = async {
        if !well_formed {
            return Ok(None);
        }
        let mut conn = state.db.read().await?;
        db::webhooks::get_deletion_request(&mut conn, &code).await
    }
    .await;
    match found {
        Ok(Some((_, _, created_at))) => {
            // In words a reader anywhere takes in: "1 March 2026, 10:04 UTC".
            let format = time::macros::format_description!(
                "[day padding:none] [month repr:long] [year], [hour]:[minute] UTC"
            );
            let at = crate::clock::from_millis(created_at).format(&format).unwrap_or_default();
            render(
                StatusCode::OK,
                &MessagePage {
                    reference: Some(code),
                    ..MessagePage::new(
                        "Data deletion completed",
                        format!(
                            "Your Instagram data deletion request of {at} was processed. The access to your \
                             Instagram account that was given through this service was removed, and your profile \
                             details (name, username and picture) were deleted."
                        ),
                    )
                    .next("Nothing else needs to be done.")
                },
            )
        }
        Ok(None) => render(
            StatusCode::NOT_FOUND,
            &MessagePage::new("Unknown request", "No data deletion request has this confirmation code.")
                .next("Check the confirmation code shown in Instagram's settings."),
        ),
        Err(e) => super::service_error_page(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_signed_request_known_answer() {
        // providers.md §10.
        let signed = "U2dma9V0PW6B-2cwc8EtO_kB5s4j4Ju_sEFo1GJrZIA.eyJhbGdvcml0aG0iOiJITUFDLVNIQTI1NiIsImlzc3VlZF9hdCI6MTc2NDAwMDAwMCwidXNlcl9pZCI6IjE3ODQxNDAwMDAwMDAwMDAxIn0";
        let (payload, user) = verify_signed_request(signed, b"app-secret-for-tests").unwrap();
        assert_eq!(user, "17841400000000001");
        assert_eq!(payload.issued_at, Some(1_764_000_000));
        // Padding is accepted too.
        let (sig, body) = signed.split_once('.').unwrap();
        assert!(verify_signed_request(&format!("{sig}=.{body}"), b"app-secret-for-tests").is_some());
        // Wrong secret, tampered payload, missing parts: refused.
        assert!(verify_signed_request(signed, b"other-secret").is_none());
        let tampered = signed.replace("eyJhbGdv", "eyJhbGdw");
        assert!(verify_signed_request(&tampered, b"app-secret-for-tests").is_none());
        assert!(verify_signed_request("nodot", b"app-secret-for-tests").is_none());
        assert!(verify_signed_request(".", b"app-secret-for-tests").is_none());
    }

    fn sign(payload: &str, secret: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(payload.as_bytes());
        format!("{}.{payload}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    proptest::proptest! {
        /// A request signed with the secret verifies and names its user; the same request with
        /// any one character of its payload changed, or checked with another secret, does not.
        #[test]
        fn only_the_exact_signed_payload_verifies(
            user in "[1-9][0-9]{0,17}",
            issued_at in 1_600_000_000i64..2_000_000_000,
            secret in proptest::collection::vec(proptest::num::u8::ANY, 1..64),
            at in proptest::num::usize::ANY,
            with in "[A-Za-z0-9_-]",
        ) {
            let body = serde_json::json!({"algorithm": "HMAC-SHA256", "issued_at": issued_at, "user_id": user});
            let payload = URL_SAFE_NO_PAD.encode(body.to_string());
            let signed = sign(&payload, &secret);
            let (parsed, got) = verify_signed_request(&signed, &secret).unwrap();
            proptest::prop_assert_eq!(&got, &user);
            proptest::prop_assert_eq!(parsed.issued_at, Some(issued_at));
            let i = at % payload.len();
            let mut changed = payload.clone();
            changed.replace_range(i..=i, &with);
            if changed != payload {
                let tampered = format!("{}.{changed}", signed.split_once('.').unwrap().0);
                proptest::prop_assert!(verify_signed_request(&tampered, &secret).is_none());
            }
            let mut other = secret.clone();
            other[0] ^= 1;
            proptest::prop_assert!(verify_signed_request(&signed, &other).is_none());
        }

        /// Whatever arrives as `signed_request`, the check answers without panicking, and
        /// accepts nothing not signed with the secret.
        #[test]
        fn arbitrary_input_is_refused(input in "\\PC{0,200}") {
            proptest::prop_assert!(verify_signed_request(&input, b"app-secret-for-tests").is_none());
        }
    }
}
