//! Meta's deauthorize and data deletion callbacks for Instagram.
//!
//! Meta POSTs a form with one field, `signed_request` = `<sig>.<payload>` (base64url, padding
//! optional). The signature is HMAC-SHA256 with the app secret over the payload segment exactly
//! as received, compared in constant time; the payload's `algorithm` must be `HMAC-SHA256` and
//! its `user_id` is the app-scoped id. An invalid signature gets 400 and changes nothing.
//!
//! - Deauthorize: every connection of that account is marked disconnected at once (tokens
//!   erased), with `connection.disconnected`.
//! - Data deletion: tokens and profile data are erased, and the answer is
//!   `{"url": <status page>, "confirmation_code": <code>}` as Meta requires.

use askama::Template;
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
use crate::service::{Actor, audit, webhooks};
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

fn app_secret(state: &AppState) -> Vec<u8> {
    let ig = &state.config.providers.instagram;
    if ig.is_sandbox() {
        crate::sandbox::INSTAGRAM_CLIENT_SECRET.as_bytes().to_vec()
    } else {
        ig.client_secret.as_ref().map(|s| s.expose_secret().as_bytes().to_vec()).unwrap_or_default()
    }
}

fn bad_signature() -> Response {
    tracing::warn!("Instagram callback with a missing or invalid signed_request refused");
    (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "invalid signed_request"}))).into_response()
}

/// Erases tokens (and, for a deletion, profile data) of every connection of the account.
async fn erase(
    state: &AppState,
    user_id: &str,
    delete_profile: bool,
) -> crate::service::ServiceResult<usize> {
    let now = state.now_ms();
    let mut tx = state.db.begin_write().await?;
    let rows = db::connections::by_app_scoped_id(&mut tx, "instagram", user_id).await?;
    let count = rows.len();
    for mut row in rows {
        let was = ConnectionStatus::parse(&row.status);
        row.status = ConnectionStatus::Disconnected.as_str().into();
        row.status_reason = Some(if delete_profile {
            "The account holder asked Meta to delete their data; tokens and profile data were erased.".into()
        } else {
            "The account holder removed the app on Instagram.".into()
        });
        row.access_token_sealed = None;
        row.refresh_token_sealed = None;
        row.access_expires_at = None;
        row.refresh_expires_at = None;
        row.next_refresh_at = None;
        row.next_check_at = None;
        row.token_generation += 1;
        if delete_profile {
            row.username = None;
            row.display_name = None;
            row.avatar_url = None;
        }
        row.updated_at = now;
        db::connections::update(&mut tx, &row).await?;
        if delete_profile {
            db::connections::scrub_events(&mut tx, &row.id).await?;
        }
        let kind = if delete_profile { "data_deleted" } else { "disconnected" };
        db::connections::insert_event(
            &mut tx,
            &connections::event(&row, kind, row.status_reason.clone(), now),
        )
        .await?;
        audit::record(
            &mut tx,
            now,
            &Actor::System,
            Some(&row.workspace_id),
            &format!("connection.{kind}"),
            "connection",
            &row.id,
            serde_json::json!({"source": "meta_callback"}),
        )
        .await?;
        if was != ConnectionStatus::Disconnected {
            let data = connections::event_data(&mut tx, state, &row, row.status_reason.as_deref()).await?;
            webhooks::emit(&mut tx, state, now, &row.workspace_id, "connection.disconnected", data).await?;
        }
    }
    tx.commit().await?;
    Ok(count)
}

/// `POST /oauth/instagram/deauthorize`.
pub async fn instagram_deauthorize(
    State(state): State<AppState>,
    Form(form): Form<SignedRequestForm>,
) -> Response {
    let Some((_, user_id)) =
        form.signed_request.as_deref().and_then(|s| verify_signed_request(s, &app_secret(&state)))
    else {
        return bad_signature();
    };
    match erase(&state, &user_id, false).await {
        Ok(n) => {
            tracing::info!(connections = n, "Instagram deauthorization processed");
            (StatusCode::OK, Json(serde_json::json!({"ok": true}))).into_response()
        }
        Err(e) => super::service_error_page(e),
    }
}

/// `POST /oauth/instagram/data-deletion`.
pub async fn instagram_data_deletion(
    State(state): State<AppState>,
    Form(form): Form<SignedRequestForm>,
) -> Response {
    let Some((_, user_id)) =
        form.signed_request.as_deref().and_then(|s| verify_signed_request(s, &app_secret(&state)))
    else {
        return bad_signature();
    };
    let count = match erase(&state, &user_id, true).await {
        Ok(n) => n,
        Err(e) => return super::service_error_page(e),
    };
    let code = hex::encode(crypto::random_bytes::<12>());
    let recorded = async {
        let mut conn = state.db.writer().await?;
        db::webhooks::insert_deletion_request(
            &mut conn,
            &code,
            "instagram",
            i64::try_from(count).unwrap_or(0),
            state.now_ms(),
        )
        .await
    }
    .await;
    if let Err(e) = recorded {
        return super::service_error_page(e.into());
    }
    tracing::info!(connections = count, "Instagram data deletion processed");
    Json(serde_json::json!({
        "url": state.config.public(&format!("/oauth/instagram/data-deletion/{code}")),
        "confirmation_code": code,
    }))
    .into_response()
}

#[derive(Template)]
#[template(path = "client/message.html")]
struct StatusPage {
    title: String,
    message: String,
    next_step: Option<String>,
    try_again: Option<String>,
    reference: Option<String>,
    workspace_name: Option<String>,
    workspace_id: Option<String>,
    brand_version: i64,
}

/// `GET /oauth/instagram/data-deletion/{code}`: the status of a deletion request.
pub async fn instagram_deletion_status(State(state): State<AppState>, Path(code): Path<String>) -> Response {
    let found = async {
        let mut conn = state.db.read().await?;
        db::webhooks::get_deletion_request(&mut conn, &code).await
    }
    .await;
    match found {
        Ok(Some((_, _, created_at))) => {
            let at = crate::clock::from_millis(created_at)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            render(
                StatusCode::OK,
                &StatusPage {
                    title: "Data deletion completed".into(),
                    message: format!(
                        "Your request of {at} was processed: the access tokens and profile data were deleted."
                    ),
                    next_step: None,
                    try_again: None,
                    reference: Some(code),
                    workspace_name: None,
                    workspace_id: None,
                    brand_version: 0,
                },
            )
        }
        Ok(None) => render(
            StatusCode::NOT_FOUND,
            &MessagePage::new("Unknown request", "No data deletion request has this confirmation code."),
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
}
