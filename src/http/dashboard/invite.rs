//! The invitation link, `/app/invite/{token}`: where someone invited to a workspace joins it (see
//! [`crate::service::invitations`]).
//!
//! The holder of a pending invitation sees the workspace and the address invited, and either
//! joins with one click (signed in to that address's account), is asked to sign in to it, or
//! creates it with a password of their own. The token is part of the path, which the request
//! log redacts; the page sends no referrer.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::auth::{ClientIp, signed_in_to};
use super::{
    DashResult, FormData, FormErrors, Layout, cookie, csrf_for, csrf_matches, login_cookie_name, message,
    read_cookie, render, secret, see_other, session_cookie_name,
};
use crate::crypto;
use crate::service::invitations::{self, Ended, Opened, Pending, Refused};
use crate::service::users::{self, Authenticated};
use crate::state::AppState;

/// What the invitation page offers.
enum Offer {
    /// Signed in to the invited account: join.
    Join,
    /// Signed in to another account: sign out first.
    OtherAccount {
        /// The signed-in account's address.
        me: String,
    },
    /// Not signed in, and an account uses the address: sign in to it.
    SignIn {
        /// The sign-in page, returning here.
        sign_in_url: String,
    },
    /// Not signed in, and no account uses the address: create it.
    Create,
}

#[derive(Template)]
#[template(path = "dashboard/invite.html")]
struct InvitePage {
    l: Layout,
    action: String,
    workspace: String,
    email: String,
    role: String,
    expires: String,
    offer: Offer,
    errors: FormErrors,
}

/// The session a request carries, if it is valid, with its token.
async fn session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(Authenticated, String)>, super::DashError> {
    let Some(token) = read_cookie(headers, session_cookie_name(state)) else { return Ok(None) };
    Ok(users::authenticate(state, token).await?.map(|a| (a, token.to_string())))
}

/// The page for a link that leads nowhere or no longer works.
fn gone(opened: &Opened) -> Response {
    match opened {
        Opened::Ended(Ended::Accepted) => message(
            StatusCode::GONE,
            "This invitation has been used",
            "Somebody has already joined the workspace with this invitation link.",
            "If that was you, sign in. Otherwise, ask whoever invited you for a new link.",
        ),
        Opened::Ended(Ended::Revoked) => message(
            StatusCode::GONE,
            "This invitation was withdrawn",
            "The workspace's owner withdrew this invitation, or sent a newer one.",
            "Ask whoever invited you for a new link.",
        ),
        Opened::Ended(Ended::Expired) => message(
            StatusCode::GONE,
            "This invitation has expired",
            "Invitation links work for seven days.",
            "Ask whoever invited you for a new link.",
        ),
        Opened::Unknown | Opened::Pending(_) => message(
            StatusCode::NOT_FOUND,
            "This invitation link does not work",
            "No invitation has this address. Part of the link may be missing.",
            "Copy the whole link from the message you were sent, or ask whoever invited you for a new one.",
        ),
    }
}

/// Renders the page for a pending invitation, as the request's browser should see it.
async fn page(
    state: &AppState,
    headers: &HeaderMap,
    token: &str,
    pending: &Pending,
    status: StatusCode,
    errors: FormErrors,
) -> DashResult {
    let action = format!("/app/invite/{token}");
    let (offer, csrf, fresh) = match session(state, headers).await? {
        Some((a, session_token)) => {
            let offer = if a.user.email_normalized == pending.row.email_normalized {
                Offer::Join
            } else {
                Offer::OtherAccount { me: a.user.email.clone() }
            };
            (offer, csrf_for(&session_token), None)
        }
        None => {
            let offer = if pending.account_exists {
                let next: String = url::form_urlencoded::byte_serialize(action.as_bytes()).collect();
                Offer::SignIn { sign_in_url: format!("/app/login?next={next}") }
            } else {
                Offer::Create
            };
            // The account form's CSRF token comes from the pre-sign-in cookie, as the sign-in form's;
            // the cookie is set again with each page, so a form just shown does not expire soon.
            let login = match read_cookie(headers, login_cookie_name(state)) {
                Some(t) => t.to_string(),
                None => crypto::random_token(),
            };
            (offer, csrf_for(&login), Some(login))
        }
    };
    let p = InvitePage {
        l: Layout::bare(csrf, None),
        action,
        workspace: pending.workspace_name.clone(),
        email: pending.row.email.clone(),
        role: pending.row.role.clone(),
        expires: super::fmt_ms(pending.row.expires_at),
        offer,
        errors,
    };
    let mut res = render(status, &p);
    if let Some(t) = fresh {
        res.headers_mut().append(header::SET_COOKIE, cookie(state, login_cookie_name(state), Some(&t), 3600));
    }
    Ok(res)
}

/// `GET /app/invite/{token}`.
pub async fn show(
    State(state): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> DashResult {
    match invitations::open(&state, &token).await? {
        Opened::Pending(p) => page(&state, &headers, &token, &p, StatusCode::OK, FormErrors::default()).await,
        other => Ok(gone(&other)),
    }
}

/// `POST /app/invite/{token}`: `action=join` (signed in to the invited account) or
/// `action=create` (the account, with `password` and `confirm`).
pub async fn answer(
    State(state): State<AppState>,
    Path(token): Path<String>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: FormData,
) -> DashResult {
    let refused = |r: Refused| async {
        match r {
            Refused::Gone(opened) => Ok(gone(&opened)),
            // The page tells what to do instead (sign in, sign out, or create the account).
            Refused::OtherAccount { .. } | Refused::WrongPath => {
                match invitations::open(&state, &token).await? {
                    Opened::Pending(p) => {
                        page(&state, &headers, &token, &p, StatusCode::CONFLICT, FormErrors::default()).await
                    }
                    other => Ok(gone(&other)),
                }
            }
        }
    };
    match form.get("action") {
        "join" => {
            // Joining acts for the signed-in account: the form must carry its session's token,
            // not the pre-sign-in one.
            let Some((a, session_token)) = session(&state, &headers).await? else {
                return Ok(see_other(&format!("/app/invite/{token}")));
            };
            if !csrf_matches(&session_token, form.get("csrf")) {
                return Ok(see_other(&format!("/app/invite/{token}")));
            }
            match invitations::accept(&state, &token, &a.user).await? {
                Ok(joined) => {
                    Ok(see_other(&format!("/app/w/{}?notice=invitation_accepted", joined.workspace_slug)))
                }
                Err(r) => refused(r).await,
            }
        }
        "create" => {
            let password = secret(&form, "password");
            let confirm = secret(&form, "confirm");
            let previous = read_cookie(&headers, session_cookie_name(&state));
            match invitations::accept_with_new_account(&state, &token, &password, &confirm, &ip, previous)
                .await
            {
                Ok(Ok((joined, new))) => Ok(signed_in_to(
                    &state,
                    &format!("/app/w/{}?notice=invitation_accepted", joined.workspace_slug),
                    &new,
                )),
                Ok(Err(r)) => refused(r).await,
                Err(e) => {
                    let errors = FormErrors::from_service(e)?;
                    match invitations::open(&state, &token).await? {
                        Opened::Pending(p) => {
                            page(&state, &headers, &token, &p, StatusCode::UNPROCESSABLE_ENTITY, errors).await
                        }
                        other => Ok(gone(&other)),
                    }
                }
            }
        }
        _ => Ok(message(
            StatusCode::BAD_REQUEST,
            "That cannot be done here",
            "This form asks to join a workspace or to create an account, and it asked for neither.",
            "Open the invitation link again.",
        )),
    }
}
