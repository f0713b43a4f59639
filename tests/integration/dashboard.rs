//! The dashboard under `/app`: sign-in, sessions and their cookies, the sign-in throttle, CSRF,
//! workspace isolation, forms with invalid values, the link, connection, settings and admin
//! pages, and the `authlink user` commands.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use reqwest::{Client, Response};
use serde_json::{Value, json};

use authlink::sandbox::TIKTOK_ACCOUNTS;

use crate::helpers::{TestApp, assert_nowhere, binary};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    let mut list = tests![
        link_settings_change_from_the_api_the_cli_and_the_dashboard,
        connect_attempts_are_listed_for_the_agency,
        hostile_input_never_breaks_a_page,
        sign_in_session_cookie_rotation_and_sign_out,
        wrong_password_gives_no_hint,
        sign_in_is_throttled_per_account_and_per_address,
        sign_in_throttle_holds_under_concurrent_attempts,
        a_lockout_from_elsewhere_spares_the_browsers_the_owner_signed_in_from,
        sign_in_throttle_counts_an_ipv6_network_as_one_address,
        invitations_hide_accounts_and_need_acceptance,
        invitations_end_with_their_sender_s_right_to_invite,
        missing_or_forged_csrf_is_refused,
        members_see_only_their_workspaces,
        invalid_link_form_comes_back_with_errors_and_values,
        link_created_revoked_and_rotated_through_the_dashboard,
        expired_session_returns_to_the_page_after_sign_in,
        next_never_leaves_the_dashboard,
        password_change,
        user_commands,
        members_branding_and_api_keys,
        branding_saved_meanwhile_comes_back_unsaved,
        api_keys_go_when_their_maker_loses_the_right_to_them,
        owners_removing_each_other_at_once_leave_one,
        a_disabled_owner_is_no_owner_to_leave_the_workspace_to,
        connection_pages_and_repair_link,
        used_up_link_is_still_the_repair_link,
        overview_counts_follow_every_change,
        handle_search_pages_in_handle_order,
        every_page_renders_without_inline_code,
        webhook_pages,
    ];
    list.push((
        "a_key_made_while_its_maker_is_removed_is_refused",
        |app| Box::pin(a_key_made_while_its_maker_is_removed_is_refused(app)),
        crate::Only::Postgres,
    ));
    list.push((
        "an_invitation_made_while_its_maker_is_removed_is_refused",
        |app| Box::pin(an_invitation_made_while_its_maker_is_removed_is_refused(app)),
        crate::Only::Postgres,
    ));
    list.push((
        "a_role_given_while_its_giver_is_removed_is_refused",
        |app| Box::pin(a_role_given_while_its_giver_is_removed_is_refused(app)),
        crate::Only::Postgres,
    ));
    list
}

const ADMIN: &str = "admin@example.com";
const PASSWORD: &str = "correct horse battery staple";

/// Runs the CLI with `stdin` written to its standard input.
fn cli_stdin(app: &TestApp, args: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(app.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTHLINK_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.env("AUTHLINK_LOG_FORMAT", "human").env("AUTHLINK_LOG", "warn");
    let mut child = cmd.spawn().expect("run authlink");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Creates a user through the CLI (password on standard input); returns the user's JSON.
fn create_user(app: &TestApp, email: &str, admin: bool) -> Value {
    let mut args = vec!["user", "create", "--email", email, "--json"];
    if admin {
        args.push("--admin");
    }
    let out = cli_stdin(app, &args, &format!("{PASSWORD}\n"));
    assert!(out.status.success(), "user create: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A browser: its own cookie jar, redirects not followed.
fn browser() -> Client {
    Client::builder().cookie_store(true).redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The CSRF token of the first form of a page.
fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    html[start..].split('"').next().unwrap().to_string()
}

async fn text(res: Response) -> (u16, String) {
    let status = res.status().as_u16();
    (status, res.text().await.unwrap())
}

fn location(res: &Response) -> String {
    res.headers().get("location").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

fn set_cookies(res: &Response) -> Vec<String> {
    res.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect()
}

/// Opens the sign-in page and submits it.
async fn sign_in_with(app: &TestApp, client: &Client, email: &str, password: &str, next: &str) -> Response {
    let (status, html) = text(client.get(app.url("/app/login")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{html}");
    client
        .post(app.url("/app/login"))
        .form(&[("csrf", csrf_of(&html).as_str()), ("email", email), ("password", password), ("next", next)])
        .send()
        .await
        .unwrap()
}

/// A signed-in browser.
async fn signed_in(app: &TestApp, email: &str) -> Client {
    let client = browser();
    let res = sign_in_with(app, &client, email, PASSWORD, "").await;
    assert_eq!(res.status(), 303, "sign-in failed: {}", res.text().await.unwrap());
    client
}

/// GETs a dashboard page, expecting `status`; returns the HTML.
async fn page(app: &TestApp, client: &Client, path: &str, status: u16) -> String {
    let (got, html) = text(client.get(app.url(path)).send().await.unwrap()).await;
    assert_eq!(got, status, "GET {path}: {html}");
    html
}

/// Submits a form of the dashboard with the page's CSRF token.
async fn post(app: &TestApp, client: &Client, csrf: &str, path: &str, fields: &[(&str, &str)]) -> Response {
    let mut form: Vec<(&str, &str)> = vec![("csrf", csrf)];
    form.extend_from_slice(fields);
    client.post(app.url(path)).form(&form).send().await.unwrap()
}

async fn sign_in_session_cookie_rotation_and_sign_out(app: TestApp) {
    create_user(&app, ADMIN, true);
    let client = browser();
    // Not signed in: to the sign-in page, remembering the page asked for.
    let res = client.get(app.url("/app/workspaces")).send().await.unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/app/login?next=%2Fapp%2Fworkspaces");
    // The sign-in page sets the pre-sign-in cookie its CSRF token is bound to.
    let res = client.get(app.url("/app/login")).send().await.unwrap();
    let cookies = set_cookies(&res);
    assert!(
        cookies.iter().any(|c| c.starts_with("authlink_login=") && c.contains("HttpOnly")),
        "{cookies:?}"
    );
    let html = res.text().await.unwrap();
    assert!(html.contains("<label for=\"email\">") && html.contains("<label for=\"password\">"));
    // Sign in: a session cookie, HttpOnly, SameSite=Lax, Path=/, not Secure on plain http.
    let res = client
        .post(app.url("/app/login"))
        .form(&[("csrf", csrf_of(&html).as_str()), ("email", "Admin@Example.com"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/app");
    let cookies = set_cookies(&res);
    let session =
        cookies.iter().find(|c| c.starts_with("authlink_session=")).expect("session cookie").clone();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=43200"] {
        assert!(session.contains(attr), "{session}");
    }
    assert!(!session.contains("Secure"), "no Secure on plain http: {session}");
    let token = session["authlink_session=".len()..].split(';').next().unwrap().to_string();
    assert_eq!(token.len(), 43, "256 bits, base64url");
    assert_eq!(app.count("sessions").await, 1);
    // The token is stored only as a hash, and never logged.
    assert_nowhere(&app, "session token", &token).await;
    assert_nowhere(&app, "password", PASSWORD).await;
    let html = page(&app, &client, "/app/workspaces", 200).await;
    assert!(html.contains(ADMIN));
    // Signing in again in the same browser makes a new session and ends the old one.
    let csrf = csrf_of(&html);
    let res = post(&app, &client, &csrf, "/app/login", &[("email", ADMIN), ("password", PASSWORD)]).await;
    assert_eq!(res.status(), 303);
    let second = set_cookies(&res).into_iter().find(|c| c.starts_with("authlink_session=")).unwrap();
    let token2 = second["authlink_session=".len()..].split(';').next().unwrap().to_string();
    assert_ne!(token, token2, "a new session id on every sign-in");
    assert_eq!(app.count("sessions").await, 1, "the previous session ended");
    let stale = Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let res = stale
        .get(app.url("/app/workspaces"))
        .header("cookie", format!("authlink_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "the old token no longer works");
    assert!(location(&res).starts_with("/app/login"));
    // Sign out: the session ends and the cookie is cleared.
    let html = page(&app, &client, "/app/workspaces", 200).await;
    let res = post(&app, &client, &csrf_of(&html), "/app/logout", &[]).await;
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/app/login?notice=signed_out");
    assert!(set_cookies(&res).iter().any(|c| c.starts_with("authlink_session=;") && c.contains("Max-Age=0")));
    assert_eq!(app.count("sessions").await, 0);
    let res = stale
        .get(app.url("/app/workspaces"))
        .header("cookie", format!("authlink_session={token2}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "invalid after sign-out");
    // Sign-in and sign-out are audited.
    let audit = app.cli_json(&["audit", "list"]);
    let actions: Vec<&str> =
        audit.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"user.signed_in") && actions.contains(&"user.signed_out"), "{actions:?}");
}

async fn wrong_password_gives_no_hint(app: TestApp) {
    create_user(&app, ADMIN, true);
    create_user(&app, "gone@example.com", false);
    app.cli_json(&["user", "disable", "--email", "gone@example.com"]);
    let mut bodies = Vec::new();
    for (email, password) in [
        (ADMIN, "wrong password, long enough"),
        ("nobody@example.com", "wrong password, long enough"),
        ("gone@example.com", PASSWORD),
    ] {
        let client = browser();
        let (status, html) = text(sign_in_with(&app, &client, email, password, "").await).await;
        assert_eq!(status, 401, "{email}");
        assert!(html.contains("The email or password is incorrect."), "{html}");
        assert!(html.contains(&format!("value=\"{email}\"")), "the email is kept");
        assert!(!html.contains(password), "the password is never echoed");
        bodies.push(html.replace(email, "EMAIL").replace(&csrf_of(&html), "CSRF"));
        assert_eq!(app.count("sessions").await, 0);
    }
    assert_eq!(bodies[0], bodies[1], "unknown email and wrong password look the same");
    assert_eq!(bodies[0], bodies[2], "a disabled account looks the same too");
}

/// One sign-in from a fresh browser, as seen from client address `ip` (through the local proxy):
/// the answer's status.
async fn sign_in_status(app: &TestApp, email: &str, password: &str, ip: String) -> u16 {
    let client = browser();
    let (_, html) = text(client.get(app.url("/app/login")).send().await.unwrap()).await;
    client
        .post(app.url("/app/login"))
        .header("x-forwarded-for", ip)
        .form(&[("csrf", csrf_of(&html).as_str()), ("email", email), ("password", password)])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn sign_in_is_throttled_per_account_and_per_address(app: TestApp) {
    create_user(&app, ADMIN, true);
    create_user(&app, "other@example.com", false);
    let attempt = |email: &'static str, password: &'static str, ip: &'static str| {
        sign_in_status(&app, email, password, ip.to_string())
    };
    // Per account: ten failures, then even the right password is refused for 15 minutes.
    for _ in 0..10 {
        assert_eq!(attempt(ADMIN, "not the password at all", "203.0.113.1").await, 401);
    }
    assert_eq!(attempt(ADMIN, PASSWORD, "203.0.113.2").await, 429);
    // Other accounts are not affected.
    assert_eq!(attempt("other@example.com", PASSWORD, "203.0.113.1").await, 303);
    // Unknown accounts are throttled the same way (the answer does not tell them apart).
    for _ in 0..10 {
        assert_eq!(attempt("ghost@example.com", "not the password at all", "203.0.113.3").await, 401);
    }
    assert_eq!(attempt("ghost@example.com", "not the password at all", "203.0.113.3").await, 429);
    // Per address: 50 failures from one address, spread over many accounts.
    const NAMES: [&str; 5] =
        ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"];
    let mut failures = 10; // the ghost's, from 203.0.113.3
    'outer: for _ in 0..10 {
        for name in NAMES {
            if failures >= 50 {
                break 'outer;
            }
            assert_eq!(attempt(name, "not the password at all", "203.0.113.3").await, 401);
            failures += 1;
        }
    }
    assert_eq!(attempt("other@example.com", PASSWORD, "203.0.113.3").await, 429, "the address is throttled");
    assert_eq!(attempt("other@example.com", PASSWORD, "203.0.113.4").await, 303, "other addresses are not");
    // The failures are kept in the database (they hold across restarts and instances) and
    // expire after the window.
    assert!(app.count("login_failures").await >= 60);
    app.advance_clock(15 * 60 + 1).await;
    assert_eq!(attempt(ADMIN, PASSWORD, "203.0.113.3").await, 303);
}

/// A sign-in from `client` (its cookie jar) as from address `ip`; returns the status.
async fn sign_in_from(app: &TestApp, client: &Client, email: &str, password: &str, ip: &str) -> u16 {
    let (_, html) = text(client.get(app.url("/app/login")).send().await.unwrap()).await;
    let res = client
        .post(app.url("/app/login"))
        .header("x-forwarded-for", ip)
        .form(&[("csrf", csrf_of(&html).as_str()), ("email", email), ("password", password)])
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    if status == 303 {
        // Signed out again, keeping the browser's other cookies, for the next attempt.
        let csrf = csrf_of(&page(app, client, "/app/account", 200).await);
        assert_eq!(post(app, client, &csrf, "/app/logout", &[]).await.status(), 303);
    }
    status
}

/// Ten failures from elsewhere lock an account for unknown browsers only: a browser its owner
/// signed in from keeps working, with a limit of its own; another account's browser cookie is no
/// help; an operator's password reset ends every browser's trust.
async fn a_lockout_from_elsewhere_spares_the_browsers_the_owner_signed_in_from(app: TestApp) {
    create_user(&app, ADMIN, true);
    create_user(&app, "other@example.com", false);
    let owner_browser = browser();
    let res = sign_in_with(&app, &owner_browser, ADMIN, PASSWORD, "").await;
    assert_eq!(res.status(), 303);
    let device =
        set_cookies(&res).into_iter().find(|c| c.starts_with("authlink_device=")).expect("a device cookie");
    assert!(
        device.contains("HttpOnly") && device.contains("SameSite=Lax") && device.contains("Max-Age=7776000")
    );
    let token = device["authlink_device=".len()..].split(';').next().unwrap().to_string();
    assert_nowhere(&app, "device cookie", &token).await;
    let csrf = csrf_of(&page(&app, &owner_browser, "/app/account", 200).await);
    assert_eq!(post(&app, &owner_browser, &csrf, "/app/logout", &[]).await.status(), 303);

    // Someone else fails ten times, from many addresses: unknown browsers are locked out.
    for i in 0..10 {
        assert_eq!(
            sign_in_status(&app, ADMIN, "not the password at all", format!("203.0.113.{i}")).await,
            401
        );
    }
    assert_eq!(sign_in_status(&app, ADMIN, PASSWORD, "198.51.100.7".into()).await, 429);
    // The owner's browser is not; its cookie is sent again, for another 90 days.
    let (_, html) = text(owner_browser.get(app.url("/app/login")).send().await.unwrap()).await;
    let res = owner_browser
        .post(app.url("/app/login"))
        .header("x-forwarded-for", "198.51.100.8")
        .form(&[("csrf", csrf_of(&html).as_str()), ("email", ADMIN), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    let again =
        set_cookies(&res).into_iter().find(|c| c.starts_with("authlink_device=")).expect("the cookie again");
    assert!(
        again.starts_with(&format!("authlink_device={token};")) && again.contains("Max-Age=7776000"),
        "{again}"
    );
    let csrf = csrf_of(&page(&app, &owner_browser, "/app/account", 200).await);
    assert_eq!(post(&app, &owner_browser, &csrf, "/app/logout", &[]).await.status(), 303);
    // It has a limit of its own: ten failures, then it is refused too.
    for _ in 0..10 {
        assert_eq!(
            sign_in_from(&app, &owner_browser, ADMIN, "not the password at all", "198.51.100.8").await,
            401
        );
    }
    assert_eq!(sign_in_from(&app, &owner_browser, ADMIN, PASSWORD, "198.51.100.8").await, 429);
    // The cookie of one account's browser does nothing for another account.
    let other_browser = browser();
    assert_eq!(sign_in_from(&app, &other_browser, "other@example.com", PASSWORD, "198.51.100.9").await, 303);
    assert_eq!(sign_in_from(&app, &other_browser, ADMIN, PASSWORD, "198.51.100.9").await, 429);

    // Fifteen minutes on, the owner signs in again; then the operator resets the password:
    // after that, no browser is trusted, and a lockout from elsewhere holds for the owner's too.
    app.advance_clock(15 * 60 + 1).await;
    assert_eq!(sign_in_from(&app, &owner_browser, ADMIN, PASSWORD, "198.51.100.8").await, 303);
    let out = cli_stdin(&app, &["user", "reset-password", "--email", ADMIN], "an entirely new passphrase\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(app.count("trusted_devices").await, 1, "only the other account's browser is trusted");
    for i in 0..10 {
        assert_eq!(
            sign_in_status(&app, ADMIN, "not the password at all", format!("203.0.113.{i}")).await,
            401
        );
    }
    assert_eq!(
        sign_in_from(&app, &owner_browser, ADMIN, "an entirely new passphrase", "198.51.100.8").await,
        429
    );
}

/// Attempts sent all at once: each is counted before its password is checked, so no more than
/// the limit are checked, whatever the concurrency.
async fn sign_in_throttle_holds_under_concurrent_attempts(app: TestApp) {
    create_user(&app, ADMIN, true);
    let attempt = |password: &'static str, ip: String| sign_in_status(&app, ADMIN, password, ip);
    let statuses = futures::future::join_all(
        (0..30).map(|i| attempt("not the password at all", format!("198.51.100.{i}"))),
    )
    .await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, refused), (10, 20), "{statuses:?}");
    assert_eq!(attempt(PASSWORD, "198.51.100.200".into()).await, 429);
}

/// An IPv6 host can usually take any address of its /64: the per-address limit counts the /64,
/// so that walking through its addresses buys no more guesses. Another /64 is another client.
async fn sign_in_throttle_counts_an_ipv6_network_as_one_address(app: TestApp) {
    create_user(&app, "other@example.com", false);
    const NAMES: [&str; 5] =
        ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"];
    let mut n = 0u32;
    for _ in 0..10 {
        for name in NAMES {
            n += 1;
            let ip = format!("2001:db8:1:2::{n:x}");
            assert_eq!(sign_in_status(&app, name, "not the password at all", ip).await, 401);
        }
    }
    let right = |ip: &str| sign_in_status(&app, "other@example.com", PASSWORD, ip.to_string());
    assert_eq!(right("2001:db8:1:2:ffff:ffff:ffff:ffff").await, 429, "another address of the same /64");
    assert_eq!(right("2001:db8:1:3::1").await, 303, "the next /64 is another client");
}

/// Workspace Acme with owner@example.com (an existing user) as its owner: the workspace's id,
/// the owner's signed-in browser and its CSRF token.
async fn acme_with_owner(app: &TestApp) -> (String, Client, String) {
    let w = app.cli_json(&["workspace", "create", "--name", "Acme"]);
    app.cli_json(&[
        "user",
        "add-member",
        "--email",
        "owner@example.com",
        "--workspace",
        "acme",
        "--role",
        "owner",
    ]);
    let owner = signed_in(app, "owner@example.com").await;
    let csrf = csrf_of(&page(app, &owner, "/app/w/acme/members", 200).await);
    (w["id"].as_str().unwrap().to_string(), owner, csrf)
}

/// The workspace version a branding form was shown with.
fn form_version(html: &str) -> String {
    let start =
        html.find("name=\"version\" value=\"").expect("a version field") + "name=\"version\" value=\"".len();
    html[start..].split('"').next().unwrap().to_string()
}

/// A branding form saved after someone else changed the workspace does not undo their change: it
/// comes back (409) with what was typed, unsaved, and saving it again then replaces theirs.
async fn branding_saved_meanwhile_comes_back_unsaved(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    let (wid, owner, csrf) = acme_with_owner(&app).await;
    let shown = form_version(&page(&app, &owner, "/app/w/acme/branding", 200).await);
    // Someone else renames the workspace through the API while the form is open.
    app.api_patch(&format!("/workspaces/{wid}"), &app.admin_key(), json!({"name": "Acme Renamed"}), 200)
        .await;
    fn with_version(version: &str) -> Vec<(&str, &str)> {
        vec![
            ("name", "Acme"),
            ("display_name", "Mine"),
            ("accent_color", "#123456"),
            ("action", "save"),
            ("version", version),
        ]
    }
    let (status, html) =
        text(post(&app, &owner, &csrf, "/app/w/acme/branding", &with_version(&shown)).await).await;
    assert_eq!(status, 409, "{html}");
    assert!(html.contains("someone else saved these settings after you opened this page"), "{html}");
    assert!(html.contains("href=\"#branding-form\""), "the summary leads to the form");
    assert!(html.contains("value=\"Mine\"") && html.contains("value=\"#123456\""), "what was typed is kept");
    let stored = app.cli_json(&["workspace", "show", "acme"]);
    assert_eq!(stored["name"], "Acme Renamed", "their change stands");
    assert!(stored["branding"]["display_name"].is_null(), "nothing of mine was saved");
    // The form now carries the version stored; saving it again replaces their change knowingly.
    let current = form_version(&html);
    assert_ne!(current, shown);
    // A version field that names no version matches none.
    let res = post(&app, &owner, &csrf, "/app/w/acme/branding", &with_version("yesterday")).await;
    assert_eq!(res.status(), 409);
    let res = post(&app, &owner, &csrf, "/app/w/acme/branding", &with_version(&current)).await;
    assert_eq!(location(&res), "/app/w/acme/branding?notice=branding_saved");
    let stored = app.cli_json(&["workspace", "show", "acme"]);
    assert_eq!(
        (stored["name"].as_str(), stored["branding"]["display_name"].as_str()),
        (Some("Acme"), Some("Mine"))
    );
}

/// Creates an API key from the dashboard's form; returns its secret.
async fn dashboard_key(app: &TestApp, owner: &Client, csrf: &str, name: &str) -> String {
    let (status, html) = text(post(app, owner, csrf, "/app/w/acme/api-keys", &[("name", name)]).await).await;
    assert_eq!(status, 201, "{html}");
    let pattern = "id=\"new-key\" type=\"text\" readonly value=\"";
    let start = html.find(pattern).unwrap() + pattern.len();
    html[start..].split('"').next().unwrap().to_string()
}

/// The API keys an owner made, and the keys made with those, are revoked when the owner is
/// removed from the workspace, made a member or disabled: they saw every secret once. Keys made
/// by others stay, and the keys page says who made each key.
async fn api_keys_go_when_their_maker_loses_the_right_to_them(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    let (_, owner, csrf) = acme_with_owner(&app).await;
    let mut makers = Vec::new();
    for who in ["leaver", "demoted", "disabled"] {
        let email = format!("{who}@example.com");
        create_user(&app, &email, false);
        app.cli_json(&["user", "add-member", "--email", &email, "--workspace", "acme", "--role", "owner"]);
        let client = signed_in(&app, &email).await;
        let their_csrf = csrf_of(&page(&app, &client, "/app/w/acme/members", 200).await);
        let key = dashboard_key(&app, &client, &their_csrf, &format!("{who} key")).await;
        // A key made with theirs, through the API, then rotated: the new key made with the old,
        // which then revokes itself. The new key is still theirs.
        let child = app.api_post("/api-keys", &key, json!({"name": format!("{who} child")}), 201).await;
        let old = child["secret"].as_str().unwrap();
        let new = app.api_post("/api-keys", old, json!({"name": format!("{who} rotated")}), 201).await;
        app.api_post(&format!("/api-keys/{}/revoke", child["id"].as_str().unwrap()), old, json!({}), 200)
            .await;
        makers.push((email, key, new["secret"].as_str().unwrap().to_string()));
    }
    let kept = dashboard_key(&app, &owner, &csrf, "owner key").await;
    let works = |secret: String| {
        let req = app.api(reqwest::Method::GET, "/links", &secret);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let html = page(&app, &owner, "/app/w/acme/api-keys", 200).await;
    assert!(html.contains("by leaver@example.com"), "{html}");
    assert!(html.contains(&format!("by the key {}…", &makers[0].1[..16])), "{html}");

    let user_id = |email: &str| {
        app.cli_json(&["user", "list"]).as_array().unwrap().iter().find(|u| u["email"] == email).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Removed from the workspace.
    let leaver = user_id(&makers[0].0);
    let res = post(&app, &owner, &csrf, &format!("/app/w/acme/members/{leaver}/remove"), &[]).await;
    assert_eq!(res.status(), 303);
    assert_eq!((works(makers[0].1.clone()).await, works(makers[0].2.clone()).await), (401, 401));
    assert_eq!(
        (works(makers[1].1.clone()).await, works(kept.clone()).await),
        (200, 200),
        "others' keys stay"
    );
    // Made a member.
    app.cli_json(&["user", "add-member", "--email", &makers[1].0, "--workspace", "acme", "--role", "member"]);
    assert_eq!((works(makers[1].1.clone()).await, works(makers[1].2.clone()).await), (401, 401));
    // Disabled.
    let out = app.cli(&["user", "disable", "--email", &makers[2].0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((works(makers[2].1.clone()).await, works(makers[2].2.clone()).await), (401, 401));
    assert_eq!(works(kept.clone()).await, 200);
    // Each revocation is in the audit log, with why.
    let audit = app.api_get("/audit-events?action=api_key.revoked", &kept, 200).await;
    let reasons: Vec<&str> =
        audit["data"].as_array().unwrap().iter().filter_map(|e| e["details"]["because"].as_str()).collect();
    assert_eq!(reasons.len(), 6, "{audit}");
    for why in ["removed from the workspace", "no longer an owner", "was disabled"] {
        assert_eq!(reasons.iter().filter(|r| r.contains(why)).count(), 2, "{why}: {reasons:?}");
    }
}

/// PostgreSQL: an owner makes a key while another transaction removes them from the workspace.
/// The key's creation waits for the removal (the maker's membership is locked and read again),
/// and is then refused: no key outlives the walk that revokes what its maker made.
async fn a_key_made_while_its_maker_is_removed_is_refused(app: TestApp) {
    let (status, html) =
        asked_while_the_owner_is_removed(&app, "/app/w/acme/api-keys", &[("name", "made meanwhile")]).await;
    assert_eq!(status, 403, "{html}");
    assert_eq!(app.count("api_keys").await, 0);
}

/// An owner's invitation asked for while the owner is being removed (the removal withdraws the
/// invitations the owner made, and one written after it would outlive it) is refused, on
/// PostgreSQL where the two run at once.
async fn an_invitation_made_while_its_maker_is_removed_is_refused(app: TestApp) {
    let form = [("email", "alt@evil.example"), ("role", "owner")];
    let (status, html) = asked_while_the_owner_is_removed(&app, "/app/w/acme/members", &form).await;
    assert_eq!(status, 403, "{html}");
    assert_eq!(app.count("member_invitations").await, 0);
}

/// The same for a role given to an existing member: refused, the member stays a member.
async fn a_role_given_while_its_giver_is_removed_is_refused(app: TestApp) {
    create_user(&app, "member@example.com", false);
    let form = [("email", "member@example.com"), ("role", "owner")];
    let add_member = |app: &TestApp| {
        app.cli_json(&[
            "user",
            "add-member",
            "--email",
            "member@example.com",
            "--workspace",
            "acme",
            "--role",
            "member",
        ]);
    };
    let (status, html) =
        asked_while_the_owner_is_removed_with(&app, add_member, "/app/w/acme/members", &form).await;
    assert_eq!(status, 403, "{html}");
    let role = app
        .text("SELECT role FROM {schema}.memberships m JOIN {schema}.users u ON u.id = m.user_id WHERE u.email = 'member@example.com'")
        .await;
    assert_eq!(role, "member");
}

/// [`asked_while_the_owner_is_removed_with`] with nothing more set up.
async fn asked_while_the_owner_is_removed(app: &TestApp, path: &str, form: &[(&str, &str)]) -> (u16, String) {
    asked_while_the_owner_is_removed_with(app, |_| {}, path, form).await
}

/// The owner of acme posts `form` to `path` while the owner's removal is held open in another
/// transaction (PostgreSQL only): the request comes to wait for the removal's lock, the removal
/// commits, and the answer is returned. `setup` runs once acme and its owner exist.
async fn asked_while_the_owner_is_removed_with(
    app: &TestApp,
    setup: impl FnOnce(&TestApp),
    path: &str,
    form: &[(&str, &str)],
) -> (u16, String) {
    use sqlx::Connection;
    let crate::helpers::Backend::Postgres(url) = &app.backend else { panic!("PostgreSQL only") };
    create_user(app, "owner@example.com", false);
    let (workspace_id, owner, csrf) = acme_with_owner(app).await;
    setup(app);
    let schema = app.schema.clone().unwrap();
    let users = app.cli_json(&["user", "list"]);
    let owner_row = users.as_array().unwrap().iter().find(|u| u["email"] == "owner@example.com").unwrap();
    let owner_id = owner_row["id"].as_str().unwrap().to_string();
    // The removal, held open.
    let mut removal = sqlx::PgConnection::connect(url).await.unwrap();
    let mut tx = removal.begin().await.unwrap();
    let removed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {schema}.memberships WHERE user_id = $1 AND workspace_id = $2"
    )))
    .bind(&owner_id)
    .bind(&workspace_id)
    .execute(&mut *tx)
    .await
    .unwrap();
    assert_eq!(removed.rows_affected(), 1);
    // The change is asked for meanwhile; it comes to wait for the removal's lock.
    let making = {
        let mut fields = vec![("csrf", csrf.as_str())];
        fields.extend_from_slice(form);
        let request = owner.post(app.url(path)).form(&fields);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let watch = sqlx::PgPool::connect(url).await.unwrap();
    crate::health::eventually("the key's creation to wait for the removal", 20, || {
        let query = sqlx::query_as::<_, (i64,)>(
            // The shared lock on the membership (not one of the background jobs' advisory locks,
            // which show as lock waits too).
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock' \
             AND query LIKE '%memberships%FOR SHARE%'",
        )
        .bind(schema.clone());
        let waiting = query.fetch_one(&watch);
        async move { (waiting.await.unwrap().0 > 0).then_some(serde_json::Value::Null) }
    })
    .await;
    tx.commit().await.unwrap();
    let answer = text(making.await.unwrap()).await;
    watch.close().await;
    answer
}

/// A disabled account cannot sign in, so it is no owner to leave a workspace to: the last owner
/// who can sign in is refused leaving, and being made a member, as if alone; the disabled owner
/// can still be made a member, and removed.
async fn a_disabled_owner_is_no_owner_to_leave_the_workspace_to(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    create_user(&app, "second@example.com", false);
    let (_, owner, csrf) = acme_with_owner(&app).await;
    app.cli_json(&[
        "user",
        "add-member",
        "--email",
        "second@example.com",
        "--workspace",
        "acme",
        "--role",
        "owner",
    ]);
    app.cli_json(&["user", "disable", "--email", "second@example.com"]);
    let users = app.cli_json(&["user", "list"]);
    let owner_row = users.as_array().unwrap().iter().find(|u| u["email"] == "owner@example.com").unwrap();
    let owner_id = owner_row["id"].as_str().unwrap();
    let (status, html) =
        text(post(&app, &owner, &csrf, &format!("/app/w/acme/members/{owner_id}/remove"), &[]).await).await;
    assert_eq!(status, 409, "{html}");
    let form = [("email", "owner@example.com"), ("role", "member")];
    let (status, html) = text(post(&app, &owner, &csrf, "/app/w/acme/members", &form).await).await;
    assert_eq!(status, 422, "{html}");
    assert!(html.contains("only owner"), "{html}");
    let role = app
        .text("SELECT m.role FROM {schema}.memberships m JOIN {schema}.users u ON u.id = m.user_id WHERE u.email = 'owner@example.com'")
        .await;
    assert_eq!(role, "owner");
    let second_row = users.as_array().unwrap().iter().find(|u| u["email"] == "second@example.com").unwrap();
    let second_id = second_row["id"].as_str().unwrap();
    let form = [("email", "second@example.com"), ("role", "member")];
    let res = post(&app, &owner, &csrf, "/app/w/acme/members", &form).await;
    assert_eq!(res.status(), 303, "the disabled owner made a member");
    let res = post(&app, &owner, &csrf, &format!("/app/w/acme/members/{second_id}/remove"), &[]).await;
    assert_eq!(res.status(), 303, "and removed");
    assert_eq!(app.text("SELECT CAST(COUNT(*) AS TEXT) FROM {schema}.memberships").await, "1");
}

/// Two owners who remove each other at the same moment: one removal is refused, so that the
/// workspace keeps an owner (the only-owner rule holds under concurrency, on PostgreSQL too).
async fn owners_removing_each_other_at_once_leave_one(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    create_user(&app, "second@example.com", false);
    let (_, first, first_csrf) = acme_with_owner(&app).await;
    let add = |email: &str| {
        app.cli_json(&["user", "add-member", "--email", email, "--workspace", "acme", "--role", "owner"]);
    };
    add("second@example.com");
    let second = signed_in(&app, "second@example.com").await;
    let second_csrf = csrf_of(&page(&app, &second, "/app/w/acme/members", 200).await);
    let users = app.cli_json(&["user", "list"]);
    let id_of = |email: &str| {
        users.as_array().unwrap().iter().find(|u| u["email"] == email).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (first_id, second_id) = (id_of("owner@example.com"), id_of("second@example.com"));
    let (remove_second, remove_first) =
        (format!("/app/w/acme/members/{second_id}/remove"), format!("/app/w/acme/members/{first_id}/remove"));
    for round in 0..8 {
        let (a, b) = tokio::join!(
            post(&app, &first, &first_csrf, &remove_second, &[]),
            post(&app, &second, &second_csrf, &remove_first, &[]),
        );
        // The other is refused: as the only owner left (409), or as no longer a member (404).
        let mut statuses = [a.status().as_u16(), b.status().as_u16()];
        statuses.sort_unstable();
        assert!(matches!(statuses, [303, 404 | 409]), "round {round}: {statuses:?}");
        let members = app.cli_json(&["user", "list"]);
        let owners = members
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["workspaces"].as_array().is_some_and(|w| w.iter().any(|m| m["role"] == "owner")))
            .count();
        assert_eq!(owners, 1, "round {round}: {members}");
        // The removed one is made owner again for the next round.
        add(if a.status() == 303 { "second@example.com" } else { "owner@example.com" });
    }
}

/// The invitation link of the members page an owner's invitation answered with.
fn invitation_url(html: &str) -> String {
    let start = html.find("id=\"invite-url\" type=\"text\" readonly value=\"").expect("an invitation link")
        + "id=\"invite-url\" type=\"text\" readonly value=\"".len();
    html[start..].split('"').next().unwrap().to_string()
}

/// Invites `email` as `role` from the owner's browser; returns the invitation link.
async fn invite(app: &TestApp, owner: &Client, csrf: &str, email: &str, role: &str) -> String {
    let res = post(app, owner, csrf, "/app/w/acme/members", &[("email", email), ("role", role)]).await;
    let (status, html) = text(res).await;
    assert_eq!(status, 201, "{html}");
    invitation_url(&html)
}

/// Opens an invitation link in `client` (signed out) and creates the account with `password`.
async fn create_account_through(client: &Client, url: &str, password: &str) {
    let (status, html) = text(client.get(url).send().await.unwrap()).await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("Create your account"), "{html}");
    let res = client
        .post(url)
        .form(&[
            ("csrf", csrf_of(&html).as_str()),
            ("action", "create"),
            ("password", password),
            ("confirm", password),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "{}", res.text().await.unwrap());
    assert_eq!(location(&res), "/app/w/acme?notice=invitation_accepted");
}

/// An owner invites by address; the answer is the same whether or not an account uses it, and
/// nobody joins without accepting: a new person creates the account with a password of their
/// own, an existing account signs in and joins, another account cannot use the link. Links are
/// single-use, can be withdrawn, are replaced by a newer invitation, expire after seven days, and
/// their tokens are in no log and, in plain text, in no table.
/// An invitation is withdrawn when its sender may no longer invite: removed from the workspace,
/// made a member, or disabled. Another owner's invitation stands.
async fn invitations_end_with_their_sender_s_right_to_invite(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    let (_, owner, csrf) = acme_with_owner(&app).await;
    let invite_as = |client: Client, csrf: String, email: &'static str| {
        let app = &app;
        async move {
            let res =
                post(app, &client, &csrf, "/app/w/acme/members", &[("email", email), ("role", "owner")])
                    .await;
            let (status, html) = text(res).await;
            assert_eq!(status, 201, "{html}");
            invitation_url(&html)
        }
    };
    let mut urls = Vec::new();
    for sender in ["removed@example.com", "demoted@example.com", "disabled@example.com"] {
        create_user(&app, sender, false);
        app.cli_json(&["user", "add-member", "--email", sender, "--workspace", "acme", "--role", "owner"]);
        let client = signed_in(&app, sender).await;
        let csrf = csrf_of(&page(&app, &client, "/app/w/acme/members", 200).await);
        let invitee = match sender {
            "removed@example.com" => "friend-a@example.com",
            "demoted@example.com" => "friend-b@example.com",
            _ => "friend-c@example.com",
        };
        urls.push(invite_as(client, csrf, invitee).await);
    }
    let kept = invite_as(owner, csrf, "welcome@example.com").await;
    for url in urls.iter().chain([&kept]) {
        assert_eq!(browser().get(url).send().await.unwrap().status(), 200, "{url}");
    }
    app.cli_json(&["user", "remove-member", "--email", "removed@example.com", "--workspace", "acme"]);
    app.cli_json(&[
        "user",
        "add-member",
        "--email",
        "demoted@example.com",
        "--workspace",
        "acme",
        "--role",
        "member",
    ]);
    app.cli_json(&["user", "disable", "--email", "disabled@example.com"]);
    for url in &urls {
        let (status, html) = text(browser().get(url).send().await.unwrap()).await;
        assert_eq!(status, 410, "{url}: {html}");
    }
    assert_eq!(browser().get(&kept).send().await.unwrap().status(), 200, "another owner's invitation stands");
    let audit = app.cli_json(&["audit", "list", "--action", "member.removed"]);
    assert_eq!(audit[0]["details"]["invitations_revoked"], 1, "{audit}");
}

async fn invitations_hide_accounts_and_need_acceptance(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    create_user(&app, "existing@example.com", false);
    create_user(&app, "bystander@example.com", false);
    let (_, owner, csrf) = acme_with_owner(&app).await;

    // The same answer for an address with an account and one without.
    let mut answers = Vec::new();
    let mut urls = Vec::new();
    for email in ["existing@example.com", "nobody@example.com"] {
        let res =
            post(&app, &owner, &csrf, "/app/w/acme/members", &[("email", email), ("role", "member")]).await;
        let (status, html) = text(res).await;
        assert_eq!(status, 201, "{html}");
        let url = invitation_url(&html);
        assert!(url.starts_with(&app.url("/app/invite/")), "{url}");
        // The page lists both pending invitations: compare the announcement only.
        let start = html.find("invite-title").unwrap();
        let end = html.find("</section>").unwrap();
        answers.push(html[start..end].replace(email, "EMAIL").replace(&url, "URL"));
        urls.push(url);
    }
    assert_eq!(answers[0], answers[1], "the answer tells nothing of the account");
    let (existing_url, new_url) = (urls[0].clone(), urls[1].clone());
    let members = page(&app, &owner, "/app/w/acme/members", 200).await;
    assert!(members.contains("Invited") && members.contains("nobody@example.com"), "{members}");
    let listed = app.cli_json(&["user", "list"]);
    let existing = listed.as_array().unwrap().iter().find(|u| u["email"] == "existing@example.com").unwrap();
    assert_eq!(existing["workspaces"], json!([]), "not a member before accepting: {existing}");

    // A new person: a password of their own, which the form checks, then signed in.
    let person = browser();
    let (status, html) = text(person.get(&new_url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(html.contains("Join Acme") && html.contains("nobody@example.com"), "{html}");
    let form_csrf = csrf_of(&html);
    for (password, confirm, field) in [
        ("short", "short", "password-error"),
        ("a long good password", "another one entirely", "confirm-error"),
    ] {
        let res = person
            .post(&new_url)
            .form(&[
                ("csrf", form_csrf.as_str()),
                ("action", "create"),
                ("password", password),
                ("confirm", confirm),
            ])
            .send()
            .await
            .unwrap();
        let (status, html) = text(res).await;
        assert_eq!(status, 422, "{html}");
        assert!(html.contains(field) && !html.contains(password), "{html}");
    }
    create_account_through(&person, &new_url, "a long good password").await;
    let overview = page(&app, &person, "/app/w/acme?notice=invitation_accepted", 200).await;
    assert!(overview.contains("you have joined"), "{overview}");
    let (status, html) = text(browser().get(&new_url).send().await.unwrap()).await;
    assert_eq!(status, 410, "single-use");
    assert!(html.contains("has been used"), "{html}");
    assert_eq!(
        sign_in_with(&app, &browser(), "nobody@example.com", "a long good password", "").await.status(),
        303
    );

    // An existing account: asked to sign in (no account can be created for the address), then
    // joins with one click.
    let holder = browser();
    let (status, html) = text(holder.get(&existing_url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Sign in as existing@example.com") && !html.contains("Create your account"),
        "{html}"
    );
    // A form posted anyway (with the pre-sign-in cookie's token, as the sign-in page has it).
    let pre_sign_in = csrf_of(&page(&app, &holder, "/app/login", 200).await);
    let res = holder
        .post(&existing_url)
        .form(&[
            ("csrf", pre_sign_in.as_str()),
            ("action", "create"),
            ("password", "x".repeat(20).as_str()),
            ("confirm", "x".repeat(20).as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409, "no second account for the address");
    // Another account signed in cannot take it.
    let bystander = signed_in(&app, "bystander@example.com").await;
    let html = page(&app, &bystander, &existing_url.replace(&app.url(""), ""), 200).await;
    assert!(html.contains("You are signed in as bystander@example.com"), "{html}");
    let res = post(
        &app,
        &bystander,
        &csrf_of(&html),
        &existing_url.replace(&app.url(""), ""),
        &[("action", "join")],
    )
    .await;
    assert_eq!(res.status(), 409);
    assert!(page(&app, &bystander, "/app/w/acme", 404).await.contains("Not found"));
    // The invited account signs in, comes back to the link, and joins.
    let res = sign_in_with(
        &app,
        &holder,
        "existing@example.com",
        PASSWORD,
        &existing_url.replace(&app.url(""), ""),
    )
    .await;
    assert_eq!(location(&res), existing_url.replace(&app.url(""), ""));
    let html = page(&app, &holder, &location(&res), 200).await;
    assert!(html.contains("Join Acme"), "{html}");
    let res = post(&app, &holder, &csrf_of(&html), &location(&res), &[("action", "join")]).await;
    assert_eq!(location(&res), "/app/w/acme?notice=invitation_accepted");
    page(&app, &holder, "/app/w/acme/links", 200).await;
    let members = page(&app, &owner, "/app/w/acme/members", 200).await;
    assert!(!members.contains("Invited"), "no invitation pending: {members}");

    // Withdrawn, replaced and expired links no longer work.
    let first = invite(&app, &owner, &csrf, "later@example.com", "owner").await;
    let second = invite(&app, &owner, &csrf, "later@example.com", "owner").await;
    let (status, html) = text(browser().get(&first).send().await.unwrap()).await;
    assert!(status == 410 && html.contains("withdrew"), "{status} {html}");
    let members = page(&app, &owner, "/app/w/acme/members", 200).await;
    assert_eq!(
        members.matches("<span class=\"item-title\">later@example.com</span>").count(),
        1,
        "the replaced invitation is no longer listed: {members}"
    );
    let id = members.split("/invitations/").nth(1).unwrap().split('/').next().unwrap().to_string();
    let res = post(&app, &owner, &csrf, &format!("/app/w/acme/invitations/{id}/revoke"), &[]).await;
    assert_eq!(location(&res), "/app/w/acme/members?notice=invitation_revoked");
    assert_eq!(browser().get(&second).send().await.unwrap().status(), 410);
    let third = invite(&app, &owner, &csrf, "later@example.com", "owner").await;
    // Owners see in the log whom they invited; members do not, as on the members page.
    let invited = "/app/w/acme/audit?action=member.invited";
    assert!(page(&app, &owner, invited, 200).await.contains("later@example.com"));
    let seen_by_member = page(&app, &holder, invited, 200).await;
    assert!(seen_by_member.contains("member.invited"), "{seen_by_member}");
    assert!(!seen_by_member.contains("later@example.com"), "{seen_by_member}");
    app.advance_clock(7 * 24 * 3600 + 1).await;
    let (status, html) = text(browser().get(&third).send().await.unwrap()).await;
    assert!(status == 410 && html.contains("expired"), "{status} {html}");
    // A link that never was.
    let (status, _) = text(browser().get(app.url("/app/invite/not-a-token")).send().await.unwrap()).await;
    assert_eq!(status, 404);
    let unknown = app.url(&format!("/app/invite/{}", "A".repeat(43)));
    assert_eq!(browser().get(&unknown).send().await.unwrap().status(), 404);

    // Audited, and the tokens are nowhere.
    let audit = app.cli_json(&["audit", "list", "--workspace", "acme"]);
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.contains(&"member.invited") && actions.contains(&"invitation.revoked"), "{actions:?}");
    for url in [&first, &second, &third, &new_url, &existing_url] {
        assert_nowhere(&app, "invitation token", url.rsplit('/').next().unwrap()).await;
    }
}

async fn missing_or_forged_csrf_is_refused(app: TestApp) {
    create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let client = signed_in(&app, ADMIN).await;
    let other = signed_in(&app, ADMIN).await;
    let html = page(&app, &client, "/app/w/acme/links/new", 200).await;
    let csrf = csrf_of(&html);
    let other_csrf = csrf_of(&page(&app, &other, "/app/w/acme/links/new", 200).await);
    assert_ne!(csrf, other_csrf);
    let fields = [("label", "Client"), ("platforms", "tiktok")];
    // Missing.
    let res = client.post(app.url("/app/w/acme/links")).form(&fields).send().await.unwrap();
    let (status, body) = text(res).await;
    assert_eq!(status, 403);
    assert!(body.contains("Request refused"), "{body}");
    // Forged, and another session's token.
    for bad in ["forged", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", other_csrf.as_str(), ""] {
        assert_eq!(post(&app, &client, bad, "/app/w/acme/links", &fields).await.status(), 403, "{bad}");
    }
    // A valid token from another site.
    let res = client
        .post(app.url("/app/w/acme/links"))
        .header("origin", "https://evil.example")
        .form(&[("csrf", csrf.as_str()), ("label", "Client"), ("platforms", "tiktok")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(app.count("links").await, 0, "nothing was created");
    // Sign-out and sign-in are guarded too.
    assert_eq!(post(&app, &client, "forged", "/app/logout", &[]).await.status(), 403);
    assert_eq!(app.count("sessions").await, 2);
    let fresh = browser();
    let res = fresh
        .post(app.url("/app/login"))
        .form(&[("email", ADMIN), ("password", PASSWORD), ("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "login CSRF: a form not rendered for this browser");
    // The sign-in form's token (bound to the pre-sign-in cookie) vouches for the sign-in only.
    let pre = browser();
    let login_csrf = csrf_of(&page(&app, &pre, "/app/login", 200).await);
    let res = pre
        .post(app.url("/app/w/acme/links"))
        .form(&[("csrf", login_csrf.as_str()), ("label", "Client"), ("platforms", "tiktok")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(app.count("links").await, 0);
    // With the right token it works.
    let res = post(&app, &client, &csrf, "/app/w/acme/links", &fields).await;
    assert_eq!(res.status(), 303);
    assert_eq!(app.count("links").await, 1);
}

async fn members_see_only_their_workspaces(app: TestApp) {
    create_user(&app, ADMIN, true);
    create_user(&app, "member@example.com", false);
    app.cli_json(&["workspace", "create", "--name", "Alpha"]);
    app.cli_json(&["workspace", "create", "--name", "Beta"]);
    let (beta_link, _) = app.link("beta", "Beta client");
    let added =
        app.cli_json(&["user", "add-member", "--email", "member@example.com", "--workspace", "alpha"]);
    assert_eq!(added["role"], "member");
    let member = signed_in(&app, "member@example.com").await;
    // Home goes straight to the only workspace.
    let res = member.get(app.url("/app")).send().await.unwrap();
    assert_eq!(location(&res), "/app/w/alpha");
    let html = page(&app, &member, "/app/w/alpha", 200).await;
    assert!(html.contains("Alpha"));
    let html = page(&app, &member, "/app/workspaces", 200).await;
    assert!(html.contains("Alpha") && !html.contains("Beta"));
    // Another workspace, and another workspace's objects through one's own: 404.
    for path in [
        "/app/w/beta".to_string(),
        "/app/w/beta/links".to_string(),
        "/app/w/beta/connections".to_string(),
        "/app/w/beta/members".to_string(),
        format!("/app/w/alpha/links/{beta_link}"),
        format!("/app/w/beta/links/{beta_link}"),
        format!("/app/w/alpha/links/{beta_link}/qr.svg"),
        "/app/w/nonexistent".to_string(),
        "/app/search?q=Beta".to_string(),
    ] {
        page(&app, &member, &path, 404).await;
    }
    let csrf = csrf_of(&page(&app, &member, "/app/w/alpha", 200).await);
    let res = post(&app, &member, &csrf, &format!("/app/w/alpha/links/{beta_link}/revoke"), &[]).await;
    assert_eq!(res.status(), 404);
    assert_eq!(post(&app, &member, &csrf, "/app/w/beta/links", &[("label", "x")]).await.status(), 404);
    assert_eq!(app.cli_json(&["link", "show", &beta_link])["status"], "active", "untouched");
    // A member (not an owner) may not change the workspace's settings.
    let res = post(&app, &member, &csrf, "/app/w/alpha/members", &[("email", "x@example.com")]).await;
    assert_eq!(res.status(), 403);
    let res = post(&app, &member, &csrf, "/app/w/alpha/api-keys", &[("name", "k")]).await;
    assert_eq!(res.status(), 403);
    // The admin sees both.
    let admin = signed_in(&app, ADMIN).await;
    let html = page(&app, &admin, "/app/workspaces", 200).await;
    assert!(html.contains("Alpha") && html.contains("Beta"));
    page(&app, &admin, &format!("/app/w/beta/links/{beta_link}"), 200).await;
    let html = page(&app, &admin, "/app/search?q=Beta+client", 200).await;
    assert!(html.contains(&format!("/app/w/beta/links/{beta_link}")), "{html}");
}

async fn invalid_link_form_comes_back_with_errors_and_values(app: TestApp) {
    create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let client = signed_in(&app, ADMIN).await;
    let csrf = csrf_of(&page(&app, &client, "/app/w/acme/links/new", 200).await);
    let res = post(
        &app,
        &client,
        &csrf,
        "/app/w/acme/links",
        &[
            ("label", "  "),
            ("client_ref", "ACME-42 <b>"),
            ("platforms", "tiktok"),
            ("expires_in", "soon"),
            ("max_uses", "-3"),
            ("redirect_url", "https://elsewhere.example/done"),
            ("hide_connections", "1"),
        ],
    )
    .await;
    let (status, html) = text(res).await;
    assert_eq!(status, 422, "{html}");
    for (id, message) in [
        ("label-error", "must not be empty"),
        ("expires_in-error", "must be a positive duration"),
        ("max_uses-error", "must be a positive number"),
        ("redirect_url-error", "allows no success redirects"),
    ] {
        let at = html.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no {id}: {html}"));
        assert!(html[at..at + 200].contains(message), "{id}: {}", &html[at..at + 200]);
    }
    assert!(html.contains("aria-invalid=\"true\""));
    assert!(html.contains("class=\"error-summary\""));
    // The summary names the fields as the form does, not by their API names.
    assert!(html.contains(">Use limit: must be a positive number") && !html.contains(">max_uses:"), "{html}");
    // The values are kept (escaped).
    assert!(
        html.contains("value=\"ACME-42 &#60;b&#62;\"") || html.contains("value=\"ACME-42 &lt;b&gt;\""),
        "{html}"
    );
    assert!(!html.contains("<b>"));
    assert!(html.contains("value=\"soon\"") && html.contains("value=\"-3\""));
    assert!(html.contains("value=\"https://elsewhere.example/done\""));
    assert!(html.contains("value=\"tiktok\" checked"), "the ticked platform stays ticked");
    assert!(!html.contains("value=\"instagram\" checked"));
    assert!(html.contains("name=\"hide_connections\" value=\"1\" checked"));
    // A value that is not a number at all.
    let res =
        post(&app, &client, &csrf, "/app/w/acme/links", &[("label", "Sunny"), ("max_uses", "lots")]).await;
    let (status, html) = text(res).await;
    assert_eq!(status, 422);
    assert!(
        html.contains("must be a whole number")
            && html.contains("value=\"lots\"")
            && html.contains("value=\"Sunny\"")
    );
    // No platform ticked.
    let res = post(&app, &client, &csrf, "/app/w/acme/links", &[("label", "Sunny")]).await;
    let (status, html) = text(res).await;
    assert_eq!(status, 422);
    assert!(html.contains("id=\"platforms-error\""), "{html}");
    assert_eq!(app.count("links").await, 0);
}

/// Every attempt through a link is listed for the agency, newest first, on the link's page, in
/// the API (paged, for the link's workspace only) and in the CLI: connected, cancelled by the
/// client (with the reference its page showed), at the platform, and abandoned once its ten
/// minutes are over.
async fn connect_attempts_are_listed_for_the_agency(app: TestApp) {
    use crate::connect::{connect, finish, start, start_and_consent};
    create_user(&app, ADMIN, true);
    let w = app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let wid = w["id"].as_str().unwrap();
    let key = app.workspace_key(wid);
    let (link_id, url) = app.link(wid, "Client");
    let open_id = TIKTOK_ACCOUNTS[0].open_id;
    let browser = crate::connect::new_browser();
    // Started, and the client never came back.
    start(&browser, &app, &url, "tiktok").await;
    app.advance_clock(11 * 60).await;
    connect(&browser, &app, &url, "tiktok", open_id).await;
    let connection_id =
        app.api_get("/connections", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    let flow = start_and_consent(&browser, &app, &url, "tiktok", open_id, "deny", None).await;
    let html = finish(&browser, &app, &flow.callback).await.text().await.unwrap();
    // At the platform now.
    start(&browser, &app, &url, "tiktok").await;

    let tried = app.api_get(&format!("/links/{link_id}/attempts"), &key, 200).await;
    let data = tried["data"].as_array().unwrap();
    let statuses: Vec<&str> = data.iter().map(|a| a["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["in_progress", "failed", "connected", "abandoned"], "{tried}");
    assert!(tried["next_cursor"].is_null());
    assert_eq!(data[1]["outcome"], "denied");
    assert_eq!(data[2]["outcome"], "connected");
    assert_eq!(data[2]["connection_id"], connection_id.as_str());
    assert!(data[3]["outcome"].is_null() && data[3]["returned_at"].is_null());
    let denied_ref = data[1]["reference"].as_str().unwrap();
    assert_eq!(denied_ref.len(), 8);
    assert!(html.contains(&format!("Reference: {denied_ref}.")), "the client was shown it: {html}");
    // Paged: two, then the other two.
    let first = app.api_get(&format!("/links/{link_id}/attempts?limit=2"), &key, 200).await;
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().unwrap();
    assert_eq!(cursor, data[1]["id"].as_str().unwrap());
    let rest = app.api_get(&format!("/links/{link_id}/attempts?limit=2&cursor={cursor}"), &key, 200).await;
    let ids: Vec<&Value> = rest["data"].as_array().unwrap().iter().map(|a| &a["id"]).collect();
    assert_eq!(ids, [&data[2]["id"], &data[3]["id"]]);
    // Another workspace's key does not see the link's attempts; a malformed cursor is refused.
    let other = app.cli_json(&["workspace", "create", "--name", "Other"]);
    let other_key = app.workspace_key(other["id"].as_str().unwrap());
    app.api_get(&format!("/links/{link_id}/attempts"), &other_key, 404).await;
    app.api_get(&format!("/links/{link_id}/attempts?cursor=nope"), &key, 422).await;
    let upper = cursor.to_ascii_uppercase();
    app.api_get(&format!("/links/{link_id}/attempts?cursor={upper}"), &key, 422).await;
    // The CLI lists the same, in words and in JSON.
    let listed = app.cli_json(&["link", "attempts", &link_id]);
    assert_eq!(listed.as_array().unwrap().len(), 4);
    assert_eq!(listed[1]["reference"], denied_ref);
    let out = app.cli(&["link", "attempts", &link_id]);
    let words = String::from_utf8(out.stdout).unwrap();
    assert!(
        words
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(denied_ref) && l.contains("The client chose not to allow access")),
        "{words}"
    );
    // The link's page shows them, with a way to the connection that was made.
    let client = signed_in(&app, ADMIN).await;
    let html = page(&app, &client, &format!("/app/w/acme/links/{link_id}"), 200).await;
    assert!(html.contains("Recent connect attempts"), "{html}");
    assert!(html.contains(&format!("<code>{denied_ref}</code>")), "{html}");
    assert!(html.contains("The client chose not to allow access on the platform."), "{html}");
    assert!(html.contains("did not come back from the platform within ten minutes"), "{html}");
    assert!(html.contains(&format!("/app/w/acme/connections/{connection_id}")), "{html}");
}

async fn link_created_revoked_and_rotated_through_the_dashboard(app: TestApp) {
    let admin = create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let client = signed_in(&app, ADMIN).await;
    let csrf = csrf_of(&page(&app, &client, "/app/w/acme/links/new", 200).await);
    let res = post(
        &app,
        &client,
        &csrf,
        "/app/w/acme/links",
        &[
            ("label", "Sunny Cafe"),
            ("client_ref", "C-7"),
            ("platforms", "tiktok"),
            ("platforms", "instagram"),
            ("expires_in", "30d"),
            ("max_uses", "3"),
            ("hide_connections", "1"),
        ],
    )
    .await;
    assert_eq!(res.status(), 303);
    let to = location(&res);
    assert!(to.starts_with("/app/w/acme/links/") && to.ends_with("?notice=link_created"), "{to}");
    let id = to.trim_start_matches("/app/w/acme/links/").split('?').next().unwrap().to_string();
    let shown = app.cli_json(&["link", "show", &id]);
    assert_eq!(shown["label"], "Sunny Cafe");
    assert_eq!(shown["max_uses"], 3);
    assert_eq!(shown["platforms"], json!(["tiktok", "instagram"]));
    assert_eq!(shown["hide_connections"], true);
    assert!(shown["expires_at"].is_string());
    assert_eq!(shown["created_by"], format!("user:{}", admin["id"].as_str().unwrap()));
    let url = shown["url"].as_str().unwrap().to_string();
    // The page shows the URL with a copy button and the QR code, and says it was created.
    let html = page(&app, &client, &to, 200).await;
    assert!(html.contains("Link created."));
    assert!(html.contains(&format!("value=\"{url}\"")));
    assert!(html.contains("data-copy=\"link-url\""));
    assert!(html.contains(&format!("/app/w/acme/links/{id}/qr.svg")));
    let qr = client.get(app.url(&format!("/app/w/acme/links/{id}/qr.svg"))).send().await.unwrap();
    assert_eq!(qr.status(), 200);
    assert_eq!(qr.headers()["content-type"], "image/svg+xml");
    assert_eq!(qr.headers()["cache-control"], "no-store");
    let svg = qr.text().await.unwrap();
    assert!(svg.contains("<svg") && svg.contains("<path"));
    // The link works, and is in the list and the search.
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 200);
    let html = page(&app, &client, "/app/w/acme/links?q=sunny", 200).await;
    assert!(html.contains("Sunny Cafe"));
    let html = page(&app, &client, "/app/w/acme/links?q=nothing-like-it", 200).await;
    assert!(!html.contains("Sunny Cafe"));
    // The audit log names the user.
    let audit = app.cli_json(&["audit", "list", "--action", "link.created"]);
    assert_eq!(audit[0]["actor_kind"], "user");
    assert_eq!(audit[0]["actor_id"], admin["id"]);
    // Rotate: a new URL, the old one is dead.
    let res = post(&app, &client, &csrf, &format!("/app/w/acme/links/{id}/rotate"), &[]).await;
    assert_eq!(location(&res), format!("/app/w/acme/links/{id}?notice=link_rotated"));
    let rotated = app.cli_json(&["link", "show", &id])["url"].as_str().unwrap().to_string();
    assert_ne!(rotated, url);
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 404);
    // Revoke: dead at once, and the page says so (no copy button, no QR code).
    let res = post(&app, &client, &csrf, &format!("/app/w/acme/links/{id}/revoke"), &[]).await;
    assert_eq!(location(&res), format!("/app/w/acme/links/{id}?notice=link_revoked"));
    assert_eq!(app.client.get(&rotated).send().await.unwrap().status(), 410);
    let html = page(&app, &client, &format!("/app/w/acme/links/{id}"), 200).await;
    assert!(html.contains("Revoked") && !html.contains("qr.svg"));
    page(&app, &client, &format!("/app/w/acme/links/{id}/qr.svg"), 404).await;
    // Rotating a revoked link is refused with a page that says why.
    let (status, html) =
        text(post(&app, &client, &csrf, &format!("/app/w/acme/links/{id}/rotate"), &[]).await).await;
    assert_eq!(status, 409);
    assert!(html.contains("revoked link cannot be rotated"), "{html}");
}

async fn expired_session_returns_to_the_page_after_sign_in(app: TestApp) {
    create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let client = signed_in(&app, ADMIN).await;
    page(&app, &client, "/app/w/acme/links", 200).await;
    // Idle for 31 minutes: the session has ended.
    app.advance_clock(31 * 60).await;
    let res = client.get(app.url("/app/w/acme/links?q=sun")).send().await.unwrap();
    assert_eq!(res.status(), 303);
    let to = location(&res);
    assert_eq!(to, "/app/login?next=%2Fapp%2Fw%2Facme%2Flinks%3Fq%3Dsun&notice=expired");
    let html = page(&app, &client, &to, 200).await;
    assert!(html.contains("Your session has ended"));
    assert!(html.contains("name=\"next\" value=\"/app/w/acme/links?q=sun\""), "{html}");
    assert_eq!(app.count("sessions").await, 0, "the ended session is deleted");
    let res = client
        .post(app.url("/app/login"))
        .form(&[
            ("csrf", csrf_of(&html).as_str()),
            ("email", ADMIN),
            ("password", PASSWORD),
            ("next", "/app/w/acme/links?q=sun"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/app/w/acme/links?q=sun", "back to the page asked for");
    // Activity keeps a session alive, but never beyond 12 hours.
    for _ in 0..28 {
        app.advance_clock(25 * 60).await;
        page(&app, &client, "/app/w/acme", 200).await;
    }
    app.advance_clock(25 * 60).await; // 12 h 5 min after sign-in
    let res = client.get(app.url("/app/w/acme")).send().await.unwrap();
    assert_eq!(res.status(), 303, "absolute timeout");
}

async fn next_never_leaves_the_dashboard(app: TestApp) {
    create_user(&app, ADMIN, true);
    for next in [
        "//evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "https://evil.example/app",
        "/%2F%2Fevil.example",
        "/app/%2f%2fevil.example",
        "/app/..//evil.example",
        "/app/%2e%2e/%2e%2e/evil",
        "javascript:alert(1)",
        "/app\r\nLocation: https://evil.example",
    ] {
        let client = browser();
        let res = sign_in_with(&app, &client, ADMIN, PASSWORD, next).await;
        assert_eq!(res.status(), 303, "{next}");
        assert_eq!(location(&res), "/app", "{next}");
        // The sign-in page does not carry it either.
        let url = format!(
            "{}/app/login?next={}",
            app.base,
            url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
        );
        let anon = browser();
        let html = anon.get(url).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("name=\"next\" value=\"\""), "{next}");
    }
    let client = browser();
    let res = sign_in_with(&app, &client, ADMIN, PASSWORD, "/app/account").await;
    assert_eq!(location(&res), "/app/account");
}

async fn password_change(app: TestApp) {
    create_user(&app, ADMIN, true);
    let client = signed_in(&app, ADMIN).await;
    let elsewhere = signed_in(&app, ADMIN).await;
    let csrf = csrf_of(&page(&app, &client, "/app/account", 200).await);
    let new = "a brand new passphrase";
    let change = |current: &'static str, new: &'static str, confirm: &'static str| {
        let (app, client, csrf) = (&app, &client, csrf.clone());
        async move {
            let fields =
                [("current_password", current), ("new_password", new), ("confirm_password", confirm)];
            text(post(app, client, &csrf, "/app/account/password", &fields).await).await
        }
    };
    let (status, html) =
        change("wrong current password", "a brand new passphrase", "a brand new passphrase").await;
    assert_eq!(status, 422);
    assert!(html.contains("id=\"current_password-error\"") && html.contains("is not your current password"));
    assert!(!html.contains("a brand new passphrase"), "passwords are never echoed");
    let (status, html) = change(PASSWORD, "a brand new passphrase", "something else entirely").await;
    assert_eq!(status, 422);
    assert!(html.contains("does not match the new password"));
    let (status, html) = change(PASSWORD, "short", "short").await;
    assert_eq!(status, 422);
    assert!(html.contains("at least 12 characters"));
    let sessions = || app.text("SELECT COALESCE(MIN(id) || ' ' || MAX(id), '') FROM {schema}.sessions");
    let before = sessions().await;
    assert_eq!(app.count("sessions").await, 2);
    let res = post(
        &app,
        &client,
        &csrf,
        "/app/account/password",
        &[("current_password", PASSWORD), ("new_password", new), ("confirm_password", new)],
    )
    .await;
    assert_eq!(location(&res), "/app/account?notice=password_changed");
    // Both sessions ended; this browser goes on with a new one (its old token may be what
    // someone else holds), the other is signed out.
    assert_eq!(app.count("sessions").await, 1);
    let after = sessions().await;
    let now_id = after.split(' ').next().unwrap();
    assert!(!before.contains(now_id), "a new session: {before} → {after}");
    page(&app, &client, "/app/account", 200).await;
    assert_eq!(elsewhere.get(app.url("/app/account")).send().await.unwrap().status(), 303);
    // The new password works, the old one not.
    assert_eq!(sign_in_with(&app, &browser(), ADMIN, PASSWORD, "").await.status(), 401);
    assert_eq!(sign_in_with(&app, &browser(), ADMIN, new, "").await.status(), 303);
    assert_nowhere(&app, "new password", new).await;
}

async fn user_commands(app: TestApp) {
    let created = create_user(&app, "Ops@Example.com", true);
    assert_eq!(created["email"], "Ops@Example.com");
    assert_eq!(created["admin"], true);
    // Emails are unique case-insensitively.
    let out = cli_stdin(&app, &["user", "create", "--email", "ops@example.COM"], &format!("{PASSWORD}\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // Too short a password, and none at all.
    let out = cli_stdin(&app, &["user", "create", "--email", "x@example.com"], "short\n");
    assert!(!out.status.success());
    // Named as what it is, not as a flag there is none of.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("the password: must be at least 12 characters") && !said.contains("--password"),
        "{said}"
    );
    let out = cli_stdin(&app, &["user", "create", "--email", "x@example.com"], "");
    assert!(!out.status.success());
    // Never from the command line.
    let out = app.cli(&["user", "create", "--email", "x@example.com", "--password", PASSWORD]);
    assert!(!out.status.success());
    // The hash has the OWASP argon2id parameters.
    let dump = app.database_dump().await;
    assert!(dump.contains("$argon2id$v=19$m=19456,t=2,p=1$"));
    assert_nowhere(&app, "password", PASSWORD).await;
    // add-member, list, disable.
    create_user(&app, "ann@example.com", false);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let m = app.cli_json(&[
        "user",
        "add-member",
        "--email",
        "ann@example.com",
        "--workspace",
        "acme",
        "--role",
        "owner",
    ]);
    assert_eq!(m["role"], "owner");
    let out = app.cli(&["user", "add-member", "--email", "nobody@example.com", "--workspace", "acme"]);
    assert!(!out.status.success());
    let out = app.cli(&[
        "user",
        "add-member",
        "--email",
        "ann@example.com",
        "--workspace",
        "acme",
        "--role",
        "god",
    ]);
    assert!(!out.status.success());
    let list = app.cli_json(&["user", "list"]);
    let ann = list.as_array().unwrap().iter().find(|u| u["email"] == "ann@example.com").unwrap().clone();
    assert_eq!(ann["workspaces"][0]["slug"], "acme");
    assert_eq!(ann["workspaces"][0]["role"], "owner");
    assert!(ann.get("password_hash").is_none());
    let human = String::from_utf8(app.cli(&["user", "list"]).stdout).unwrap();
    assert!(human.contains("ann@example.com") && human.contains("acme (owner)"), "{human}");
    let client = signed_in(&app, "ann@example.com").await;
    page(&app, &client, "/app/w/acme", 200).await;
    let disabled = app.cli_json(&["user", "disable", "--email", "ann@example.com"]);
    assert_eq!(disabled["disabled"], true);
    assert_eq!(client.get(app.url("/app/w/acme")).send().await.unwrap().status(), 303, "sessions died");
    assert_eq!(sign_in_with(&app, &browser(), "ann@example.com", PASSWORD, "").await.status(), 401);
    // reset-password ends sessions and sets the new password.
    let ops = signed_in(&app, "ops@example.com").await;
    let out =
        cli_stdin(&app, &["user", "reset-password", "--email", "ops@example.com"], "another long password\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ops.get(app.url("/app")).send().await.unwrap().status(), 303);
    assert_eq!(
        sign_in_with(&app, &browser(), "ops@example.com", "another long password", "").await.status(),
        303
    );
    // Everything is audited, by the CLI.
    let audit = app.cli_json(&["audit", "list"]);
    let cli_actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["actor_kind"] == "cli")
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for action in ["user.created", "member.added", "user.disabled", "user.password_reset"] {
        assert!(cli_actions.contains(&action), "{action}: {cli_actions:?}");
    }
}

async fn members_branding_and_api_keys(app: TestApp) {
    create_user(&app, "owner@example.com", false);
    let (wid, owner, csrf) = acme_with_owner(&app).await;
    let wid = wid.as_str();
    // A new member joins through an invitation.
    let url = invite(&app, &owner, &csrf, "new@example.com", "member").await;
    let newbie = browser();
    create_account_through(&newbie, &url, "welcome aboard friend").await;
    let html = page(&app, &newbie, "/app/w/acme/members", 200).await;
    assert!(html.contains("owner@example.com") && !html.contains("Save member"), "members cannot manage");
    // The last owner cannot be removed.
    let owner_id = app
        .cli_json(&["user", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "owner@example.com")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = post(&app, &owner, &csrf, &format!("/app/w/acme/members/{owner_id}/remove"), &[]).await;
    assert_eq!(res.status(), 409);
    // Branding: invalid values come back with errors and the values kept.
    let res = post(
        &app,
        &owner,
        &csrf,
        "/app/w/acme/branding",
        &[
            ("name", "Acme"),
            ("display_name", "Acme Social"),
            ("accent_color", "purple"),
            ("logo_url", "ftp://logo.example/x.png"),
            ("allowed_redirects", "https://agency.example/done\nnot a url"),
            ("action", "save"),
        ],
    )
    .await;
    let (status, html) = text(res).await;
    assert_eq!(status, 422, "{html}");
    assert!(html.contains("id=\"accent-error\"") && html.contains("value=\"purple\""));
    assert!(html.contains("id=\"logo_url-error\"") && html.contains("id=\"redirects-error\""));
    assert!(html.contains("not a url</textarea>"));
    // Preview without saving: the preview uses the unsaved colour, from a same-origin stylesheet.
    let res = post(
        &app,
        &owner,
        &csrf,
        "/app/w/acme/branding",
        &[("name", "Acme"), ("display_name", "Glow"), ("accent_color", "#ffd400"), ("action", "preview")],
    )
    .await;
    let (status, html) = text(res).await;
    assert_eq!(status, 200);
    assert!(html.contains("/app/preview/ffd400.css") && html.contains("data-preview-label>Glow<"));
    let css = owner.get(app.url("/app/preview/ffd400.css")).send().await.unwrap().text().await.unwrap();
    assert!(css.contains("--accent: #ffd400") && css.contains("--accent-text: #000000"));
    assert_eq!(owner.get(app.url("/app/preview/red;}.css")).send().await.unwrap().status(), 404);
    assert!(app.cli_json(&["workspace", "show", "acme"])["branding"]["accent_color"].is_null(), "not saved");
    // Save.
    let res = post(
        &app,
        &owner,
        &csrf,
        "/app/w/acme/branding",
        &[
            ("name", "Acme"),
            ("display_name", "Glow"),
            ("accent_color", "#FFD400"),
            ("allowed_redirects", "https://agency.example/done"),
            ("action", "save"),
        ],
    )
    .await;
    assert_eq!(location(&res), "/app/w/acme/branding?notice=branding_saved");
    let shown = app.cli_json(&["workspace", "show", "acme"]);
    assert_eq!(shown["branding"]["display_name"], "Glow");
    assert_eq!(shown["allowed_redirects"], json!(["https://agency.example/done"]));
    let css =
        app.client.get(app.url(&format!("/brand/{wid}.css"))).send().await.unwrap().text().await.unwrap();
    assert!(css.contains("#ffd400"));
    // API keys: shown once, then only the prefix; revocable.
    let res = post(&app, &owner, &csrf, "/app/w/acme/api-keys", &[("name", "reporting")]).await;
    let (status, html) = text(res).await;
    assert_eq!(status, 201);
    let pattern = "id=\"new-key\" type=\"text\" readonly value=\"";
    let start = html.find(pattern).unwrap() + pattern.len();
    let secret = html[start..].split('"').next().unwrap().to_string();
    assert!(secret.starts_with("alk_"), "{secret}");
    app.api_get("/links", &secret, 200).await;
    let html = page(&app, &owner, "/app/w/acme/api-keys", 200).await;
    assert!(!html.contains(&secret) && html.contains(&secret[..16]));
    let key_id =
        app.cli_json(&["apikey", "list", "--workspace", "acme"])[0]["id"].as_str().unwrap().to_string();
    let res = post(&app, &owner, &csrf, &format!("/app/w/acme/api-keys/{key_id}/revoke"), &[]).await;
    assert_eq!(location(&res), "/app/w/acme/api-keys?notice=key_revoked");
    let res = app.api(reqwest::Method::GET, "/links", &secret).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

async fn connection_pages_and_repair_link(app: TestApp) {
    create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let (link_id, url) = app.link("acme", "Sunny");
    let client_browser = browser();
    crate::connect::connect(&client_browser, &app, &url, "tiktok", TIKTOK_ACCOUNTS[0].open_id).await;
    let conn_id =
        app.cli_json(&["connection", "list", "--workspace", "acme"])[0]["id"].as_str().unwrap().to_string();
    let admin = signed_in(&app, ADMIN).await;
    let html = page(&app, &admin, "/app/w/acme", 200).await;
    assert!(html.contains("No broken connection"));
    let html = page(&app, &admin, "/app/w/acme/connections", 200).await;
    assert!(html.contains(&format!("@{}", TIKTOK_ACCOUNTS[0].username)) && html.contains("Connected"));
    let html = page(&app, &admin, "/app/w/acme/connections?status=broken", 200).await;
    assert!(!html.contains(TIKTOK_ACCOUNTS[0].username));
    let html = page(&app, &admin, "/app/w/acme/connections?q=SANDBOX.CREA&platform=tiktok", 200).await;
    assert!(html.contains(TIKTOK_ACCOUNTS[0].username));
    let html = page(&app, &admin, "/app/w/acme/connections?platform=instagram", 200).await;
    assert!(!html.contains(TIKTOK_ACCOUNTS[0].username));
    let html = page(&app, &admin, &format!("/app/w/acme/connections/{conn_id}"), 200).await;
    assert!(html.contains("user.info.basic") && html.contains(TIKTOK_ACCOUNTS[0].display_name));
    assert!(html.contains(&format!("/app/w/acme/links/{link_id}")));
    // When the token is refreshed next, on the page and in the command line's human output (with
    // the link that repairs the connection).
    let next =
        html.split("<dt>Next refresh</dt><dd>").nth(1).expect("a next refresh").split('<').next().unwrap();
    assert!(!next.is_empty() && next != "—", "{html}");
    let shown = app.cli_json(&["connection", "show", &conn_id]);
    let out = app.cli(&["connection", "show", &conn_id]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{human}");
    assert!(
        human.contains(&format!("\n  next refresh: {}\n", shown["next_refresh_at"].as_str().unwrap())),
        "{human}"
    );
    assert!(human.contains(&format!("\n  repair link: {url}\n")), "{human}");
    // Checked from its page: it works.
    let check = format!("/app/w/acme/connections/{conn_id}/check");
    let res = post(&app, &admin, &csrf_of(&html), &check, &[]).await;
    assert_eq!(location(&res), format!("/app/w/acme/connections/{conn_id}?notice=checked_ok"));
    assert!(page(&app, &admin, &location(&res), 200).await.contains("the connection works"));
    // Break it: the account revokes the app, a check from its page finds out.
    app.sandbox(&format!("/tiktok/accounts/{}/revoke", TIKTOK_ACCOUNTS[0].open_id), json!({})).await;
    let res = post(&app, &admin, &csrf_of(&html), &check, &[]).await;
    assert_eq!(location(&res), format!("/app/w/acme/connections/{conn_id}?notice=checked_broken"));
    assert_eq!(app.cli_json(&["connection", "show", &conn_id])["status"], "broken");
    let audit = app.cli_json(&["audit", "list", "--action", "connection.check_requested"]);
    assert_eq!(
        (audit.as_array().unwrap().len(), audit[0]["actor_kind"].as_str()),
        (2, Some("user")),
        "{audit}"
    );
    let html = page(&app, &admin, &format!("/app/w/acme/connections/{conn_id}"), 200).await;
    assert!(html.contains("Broken: needs reconnecting"));
    // A broken connection is not checked: its page offers no check, and a check sent anyway is
    // refused with its status, asking the provider nothing and recording no outcome.
    assert!(!html.contains("Check now"), "{html}");
    let (status, body) = text(post(&app, &admin, &csrf_of(&html), &check, &[]).await).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("the connection is broken"), "{body}");
    let audit = app.cli_json(&["audit", "list", "--action", "connection.check_requested"]);
    assert_eq!(audit.as_array().unwrap().len(), 2, "{audit}");
    assert!(html.contains(&format!("id=\"repair-url\" type=\"text\" readonly value=\"{url}\"")), "{html}");
    let html = page(&app, &admin, "/app/w/acme", 200).await;
    assert!(html.contains("Needs attention") && html.contains(&format!("/app/w/acme/connections/{conn_id}")));
    // Repair through the same link: active again.
    crate::connect::connect(&client_browser, &app, &url, "tiktok", TIKTOK_ACCOUNTS[0].open_id).await;
    let html = page(&app, &admin, &format!("/app/w/acme/connections/{conn_id}"), 200).await;
    assert!(html.contains("Connected") && !html.contains("repair-url"));
    // Disconnect.
    let csrf = csrf_of(&html);
    let res = post(&app, &admin, &csrf, &format!("/app/w/acme/connections/{conn_id}/disconnect"), &[]).await;
    assert_eq!(location(&res), format!("/app/w/acme/connections/{conn_id}?notice=disconnected"));
    assert_eq!(app.cli_json(&["connection", "show", &conn_id])["status"], "disconnected");
    let audit = app.cli_json(&["audit", "list", "--action", "connection.disconnected"]);
    assert_eq!(audit[0]["actor_kind"], "user");
    // The admins' search finds it by handle, marked as a sandbox connection as in every list.
    let html = page(&app, &admin, "/app/search?q=sandbox.creator", 200).await;
    assert!(html.contains(&format!("/app/w/acme/connections/{conn_id}")));
    let found = html.split("<h2>Connections</h2>").nth(1).unwrap();
    assert!(found.contains("<span class=\"badge sandbox\">sandbox</span>"), "{html}");
}

/// A link whose use limit is reached still repairs the accounts it connected: the API's
/// `repair_url` and the connection's page give it for a broken connection, until it is revoked.
async fn used_up_link_is_still_the_repair_link(app: TestApp) {
    create_user(&app, ADMIN, true);
    let wid = app.workspace("Acme");
    let key = app.workspace_key(&wid);
    let link =
        app.cli_json(&["link", "create", "--workspace", "acme", "--label", "Sunny", "--max-uses", "1"]);
    let (link_id, url) =
        (link["id"].as_str().unwrap().to_string(), link["url"].as_str().unwrap().to_string());
    crate::connect::connect(&browser(), &app, &url, "tiktok", TIKTOK_ACCOUNTS[0].open_id).await;
    let conn_id =
        app.cli_json(&["connection", "list", "--workspace", "acme"])[0]["id"].as_str().unwrap().to_string();
    assert_eq!(app.api_get(&format!("/links/{link_id}"), &key, 200).await["status"], "used_up");
    // The account revokes the app; a check finds out.
    app.sandbox(&format!("/tiktok/accounts/{}/revoke", TIKTOK_ACCOUNTS[0].open_id), json!({})).await;
    app.cli_json(&["connection", "check", &conn_id]);
    let shown = app.api_get(&format!("/connections/{conn_id}"), &key, 200).await;
    assert_eq!(
        (shown["status"].as_str(), shown["repair_url"].as_str()),
        (Some("broken"), Some(url.as_str()))
    );
    let admin = signed_in(&app, ADMIN).await;
    let html = page(&app, &admin, &format!("/app/w/acme/connections/{conn_id}"), 200).await;
    assert!(html.contains(&format!("id=\"repair-url\" type=\"text\" readonly value=\"{url}\"")), "{html}");
    assert!(!html.contains("can no longer be used"), "{html}");
    // Revoked, it repairs nothing: no repair link, and the page says so.
    app.api_post(&format!("/links/{link_id}/revoke"), &key, json!({}), 200).await;
    assert!(app.api_get(&format!("/connections/{conn_id}"), &key, 200).await["repair_url"].is_null());
    let html = page(&app, &admin, &format!("/app/w/acme/connections/{conn_id}"), 200).await;
    assert!(html.contains("can no longer be used") && !html.contains("repair-url"), "{html}");
}

/// The counters behind the overview (`connection_counts`, kept by triggers) against counting the
/// rows, on one database connection of the test's own.
async fn assert_counts_agree(conn: &mut sqlx::AnyConnection, step: &str) {
    type Count = (String, String, String, i64);
    let counted: Vec<Count> = sqlx::query_as(
        "SELECT workspace_id, provider, status, COUNT(*) FROM connections GROUP BY workspace_id, provider, status \
         ORDER BY workspace_id, provider, status",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let kept: Vec<Count> = sqlx::query_as(
        "SELECT workspace_id, provider, status, n FROM connection_counts WHERE n <> 0 \
         ORDER BY workspace_id, provider, status",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(counted, kept, "after {step}");
}

async fn overview_counts_follow_every_change(app: TestApp) {
    use sqlx::Connection;
    create_user(&app, ADMIN, true);
    let acme = app.cli_json(&["workspace", "create", "--name", "Acme"])["id"].as_str().unwrap().to_string();
    let beta = app.cli_json(&["workspace", "create", "--name", "Beta"])["id"].as_str().unwrap().to_string();
    let (_, url) = app.link("acme", "Sunny");
    let admin = signed_in(&app, ADMIN).await;
    let stat = |html: &str, what: &str| {
        let end = html.find(&format!("</span> {what}</li>")).unwrap_or_else(|| panic!("no {what} in {html}"));
        html[..end].rsplit('>').next().unwrap().parse::<i64>().unwrap()
    };
    let html = page(&app, &admin, "/app/w/acme", 200).await;
    assert_eq!((stat(&html, "connected"), stat(&html, "broken")), (0, 0));
    // Through the application: a client connects.
    crate::connect::connect(&browser(), &app, &url, "tiktok", TIKTOK_ACCOUNTS[0].open_id).await;
    let html = page(&app, &admin, "/app/w/acme", 200).await;
    assert_eq!(stat(&html, "connected"), 1);
    // Through SQL: a multi-row insert, status changes one and several at a time, an update that
    // changes no status, a move to another workspace, deletes.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db_url).await.unwrap();
    assert_counts_agree(&mut conn, "the connect flow").await;
    let rows: Vec<String> = (0..5)
        .map(|i| {
            let (provider, status) = [("tiktok", "active"), ("instagram", "broken")][i % 2];
            format!(
                "('{}', '{acme}', '{provider}', 'acct-{i}', 'user.info.basic', '{status}', 1, 1, 1)",
                uuid::Uuid::now_v7()
            )
        })
        .collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO connections (id, workspace_id, provider, provider_account_id, scopes, status, connected_at, \
         created_at, updated_at) VALUES {}",
        rows.join(", ")
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_counts_agree(&mut conn, "a multi-row insert").await;
    let html = page(&app, &admin, "/app/w/acme", 200).await;
    assert_eq!((stat(&html, "connected"), stat(&html, "broken")), (4, 2));
    let steps = [
        (
            "one status change",
            "UPDATE connections SET status = 'disconnected' WHERE provider_account_id = 'acct-0'",
        ),
        ("several status changes", "UPDATE connections SET status = 'active' WHERE status = 'broken'"),
        ("no status change", "UPDATE connections SET status = status, updated_at = 2"),
        ("a move", "UPDATE connections SET workspace_id = '{beta}' WHERE provider_account_id = 'acct-1'"),
        (
            "a change of platform",
            "UPDATE connections SET provider = 'instagram' WHERE provider_account_id = 'acct-2'",
        ),
        ("a delete", "DELETE FROM connections WHERE provider_account_id IN ('acct-3', 'acct-4')"),
    ];
    for (step, sql) in steps {
        sqlx::query(sqlx::AssertSqlSafe(&*sql.replace("{beta}", &beta))).execute(&mut conn).await.unwrap();
        assert_counts_agree(&mut conn, step).await;
    }
    let html = page(&app, &admin, "/app/w/acme", 200).await;
    assert_eq!((stat(&html, "connected"), stat(&html, "broken"), stat(&html, "disconnected")), (2, 0, 1));
    let html = page(&app, &admin, "/app/w/beta", 200).await;
    assert_eq!(stat(&html, "connected"), 1);
    conn.close().await.unwrap();
}

async fn handle_search_pages_in_handle_order(app: TestApp) {
    use sqlx::Connection;
    create_user(&app, ADMIN, true);
    let acme = app.cli_json(&["workspace", "create", "--name", "Acme"])["id"].as_str().unwrap().to_string();
    let admin = signed_in(&app, ADMIN).await;
    // sun.00 … sun.29 on TikTok, the same handle as sun.24 (in capitals) on Instagram, and
    // handles that do not start with "sun.".
    let mut handles: Vec<(&str, String)> = (0..30).map(|i| ("tiktok", format!("sun.{i:02}"))).collect();
    handles.push(("instagram", "SUN.24".into()));
    handles.extend([
        ("tiktok", "sunday".to_string()),
        ("tiktok", "xsun.1".into()),
        ("instagram", "moon".into()),
    ]);
    let mut rows: Vec<String> = handles
        .iter()
        .enumerate()
        .map(|(i, (provider, h))| {
            format!(
                "('{}', '{acme}', '{provider}', 'acct-{i}', '{h}', 'user.info.basic', 'active', 1, 1, 1)",
                uuid::Uuid::now_v7()
            )
        })
        .collect();
    // A connection of another workspace whose handle would sort among Acme's.
    let other = app.cli_json(&["workspace", "create", "--name", "Other"])["id"].as_str().unwrap().to_string();
    let foreign = uuid::Uuid::now_v7().to_string();
    rows.push(format!(
        "('{foreign}', '{other}', 'tiktok', 'acct-other', 'sun.20x', 'user.info.basic', 'active', 1, 1, 1)"
    ));
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db_url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO connections (id, workspace_id, provider, provider_account_id, username, scopes, status, \
         connected_at, created_at, updated_at) VALUES {}",
        rows.join(", ")
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let listed = |html: &str| -> Vec<(String, String)> {
        html.split("<a class=\"item-title\" href=\"/app/w/acme/connections/")
            .skip(1)
            .map(|s| {
                let (id, rest) = s.split_once("\">").unwrap();
                (rest.split_once('<').unwrap().0.to_lowercase(), id.to_string())
            })
            .collect()
    };
    let first = page(&app, &admin, "/app/w/acme/connections?q=%40Sun.", 200).await;
    assert!(first.contains("Search by the start of the handle"));
    let one = listed(&first);
    assert_eq!(one.len(), 25, "{first}");
    assert_eq!(one[0].0, "@sun.00");
    assert_eq!(one[24].0, "@sun.24");
    let more = {
        let end = first.find("\">More results</a>").expect("a link to more results");
        let start = first[..end].rfind("href=\"").unwrap() + "href=\"".len();
        first[start..end].replace("&amp;", "&").replace("&#38;", "&")
    };
    assert!(more.contains("after=") && !more.contains("before="), "{more}");
    let second = page(&app, &admin, &more, 200).await;
    assert!(second.contains(">First results</a>") && !second.contains(">More results</a>"));
    let two = listed(&second);
    assert_eq!(
        two.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>(),
        ["@sun.24", "@sun.25", "@sun.26", "@sun.27", "@sun.28", "@sun.29"]
    );
    // Another workspace's connection as the cursor is no cursor: the first results again, so
    // the page tells nothing of where its handle sorts, nor that it exists.
    let html = page(&app, &admin, &format!("/app/w/acme/connections?q=%40Sun.&after={foreign}"), 200).await;
    assert_eq!(listed(&html), one, "a foreign cursor starts from the first result");
    // Every match once, none of the others.
    let mut ids: Vec<&str> = one.iter().chain(&two).map(|(_, id)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 31);
    assert!(!first.contains("@sunday") && !second.contains("@sunday") && !second.contains("@xsun.1"));
    // The plain list is still newest first, and a search with a filter keeps it.
    let html = page(&app, &admin, "/app/w/acme/connections", 200).await;
    assert_eq!(listed(&html)[0].0, "@moon");
    let html = page(&app, &admin, "/app/w/acme/connections?q=sun.2&platform=instagram", 200).await;
    assert_eq!(listed(&html).len(), 1);
}

async fn every_page_renders_without_inline_code(app: TestApp) {
    create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let (link_id, _) = app.link("acme", "Sunny");
    let admin = signed_in(&app, ADMIN).await;
    let paths = [
        "/app/login".to_string(),
        "/app/workspaces".to_string(),
        "/app/account".to_string(),
        "/app/search?q=sun".to_string(),
        "/app/w/acme".to_string(),
        "/app/w/acme/links".to_string(),
        "/app/w/acme/links/new".to_string(),
        format!("/app/w/acme/links/{link_id}"),
        "/app/w/acme/connections".to_string(),
        "/app/w/acme/webhooks".to_string(),
        "/app/w/acme/api-keys".to_string(),
        "/app/w/acme/members".to_string(),
        "/app/w/acme/branding".to_string(),
        "/app/w/acme/audit?action=link.created".to_string(),
    ];
    for path in paths {
        let res = admin.get(app.url(&path)).send().await.unwrap();
        let status = res.status().as_u16();
        let h = res.headers().clone();
        let html = res.text().await.unwrap();
        if path == "/app/login" {
            assert_eq!(status, 303, "signed in: away from the sign-in page");
            continue;
        }
        assert_eq!(status, 200, "{path}: {html}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(
            !html.contains("<script>") && !html.contains("style=\"") && !html.contains("<style"),
            "{path}"
        );
        assert!(!html.contains(" onclick=") && !html.contains(" onsubmit="), "{path}");
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let value = part.split('"').next().unwrap();
                assert!(value.starts_with('/') || value.starts_with('#'), "{path}: {attr}{value}");
            }
        }
        assert!(html.contains("<h1"), "{path}: a heading");
        // Every input has a label (or is hidden).
        for part in html.split("<input").skip(1) {
            let tag = part.split('>').next().unwrap();
            if tag.contains("type=\"hidden\"") || tag.contains("type=\"checkbox\"") {
                continue;
            }
            let id = tag
                .split("id=\"")
                .nth(1)
                .map(|s| s.split('"').next().unwrap())
                .unwrap_or_else(|| panic!("{path}: input without id: {tag}"));
            assert!(html.contains(&format!("for=\"{id}\"")), "{path}: no label for {id}");
        }
    }
    for asset in ["/app/static/dashboard.css", "/app/static/dashboard.js"] {
        let res = admin.get(app.url(asset)).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // The dashboard's 404 for unknown paths under /app.
    page(&app, &admin, "/app/nothing/here", 404).await;
}

async fn webhook_pages(app: TestApp) {
    // Webhook endpoints must be public https addresses, unless private targets are allowed: this
    // test points one at a closed local port.
    let app2 =
        TestApp::spawn_with(app.backend.clone(), &[("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true")])
            .await;
    let cleanup = app2.cleanup_handle();
    let app = app2;
    create_user(&app, ADMIN, true);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let (link_id, _) = app.link("acme", "Sunny");
    let admin = signed_in(&app, ADMIN).await;
    let csrf = csrf_of(&page(&app, &admin, "/app/w/acme/webhooks", 200).await);
    // Invalid values come back with errors and the values kept.
    let res = post(
        &app,
        &admin,
        &csrf,
        "/app/w/acme/webhooks",
        &[("url", "not a url"), ("events", "link.revoked")],
    )
    .await;
    let (status, html) = text(res).await;
    assert_eq!(status, 422, "{html}");
    assert!(html.contains("id=\"url-error\"") && html.contains("value=\"not a url\""));
    assert!(html.contains("value=\"link.revoked\" checked"));
    // Created: the secret is shown once.
    let res = post(
        &app,
        &admin,
        &csrf,
        "/app/w/acme/webhooks",
        &[("url", "http://127.0.0.1:9/hook"), ("events", "link.revoked"), ("description", "ops")],
    )
    .await;
    let (status, html) = text(res).await;
    assert_eq!(status, 201, "{html}");
    let pattern = "id=\"new-secret\" type=\"text\" readonly value=\"";
    let start = html.find(pattern).unwrap() + pattern.len();
    let secret = html[start..].split('"').next().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let html = page(&app, &admin, "/app/w/acme/webhooks", 200).await;
    assert!(html.contains("http://127.0.0.1:9/hook") && !html.contains(&secret));
    let endpoint_href =
        html.split("href=\"/app/w/acme/webhooks/").nth(1).unwrap().split('"').next().unwrap().to_string();
    // An event: its delivery (failing: nothing listens) is in the log, and can be redelivered.
    app.cli_json(&["link", "revoke", &link_id]);
    let path = format!("/app/w/acme/webhooks/{endpoint_href}");
    let html = page(&app, &admin, &path, 200).await;
    assert!(html.contains("link.revoked"), "{html}");
    // A member sees the endpoints and their deliveries, but only the origin of their URLs (the
    // path may hold the receiver's own secret).
    create_user(&app, "member@example.com", false);
    app.cli_json(&["user", "add-member", "--email", "member@example.com", "--workspace", "acme"]);
    let member = signed_in(&app, "member@example.com").await;
    for seen in
        [page(&app, &member, "/app/w/acme/webhooks", 200).await, page(&app, &member, &path, 200).await]
    {
        assert!(seen.contains("http://127.0.0.1:9/…") && !seen.contains("/hook"), "{seen}");
    }
    assert!(page(&app, &member, &path, 200).await.contains("link.revoked"));
    let delivery =
        html.split("/app/w/acme/webhooks/deliveries/").nth(1).unwrap().split('/').next().unwrap().to_string();
    // Once its first attempt has ended (a redelivery is refused while one is under way).
    crate::health::eventually("the first attempt to end", 20, || async {
        let state = app
            .text(&format!(
                "SELECT CAST(attempts AS TEXT) || ' ' || COALESCE(lease_owner, 'none') \
                 FROM {{schema}}.webhook_deliveries WHERE id = '{delivery}'"
            ))
            .await;
        (!state.starts_with("0 ") && state.ends_with(" none")).then_some(Value::Null)
    })
    .await;
    let res =
        post(&app, &admin, &csrf, &format!("/app/w/acme/webhooks/deliveries/{delivery}/redeliver"), &[])
            .await;
    assert_eq!(location(&res), format!("{path}?notice=redelivered"));
    // Paused and turned back on, from the dashboard and from the command line.
    let res = post(&app, &admin, &csrf, &format!("{path}/disable"), &[]).await;
    assert_eq!(location(&res), format!("{path}?notice=endpoint_disabled"));
    let html = page(&app, &admin, &path, 200).await;
    assert!(
        html.contains("Disabled: Disabled by the agency.") && html.contains("Turn deliveries back on"),
        "{html}"
    );
    let overview = page(&app, &admin, "/app/w/acme", 200).await;
    assert!(
        overview.contains("receive no events") && overview.contains("http://127.0.0.1:9/hook"),
        "{overview}"
    );
    // A member sees the stopped endpoint, and the endpoint's changes in the log, by origin only.
    let seen = page(&app, &member, "/app/w/acme", 200).await;
    assert!(seen.contains("receive no events") && seen.contains("http://127.0.0.1:9/…"), "{seen}");
    let logged = page(&app, &member, "/app/w/acme/audit?action=webhook.created", 200).await;
    assert!(logged.contains("127.0.0.1:9/…"), "{logged}");
    for seen in [seen, logged] {
        assert!(!seen.contains("/hook"), "{seen}");
    }
    assert!(page(&app, &admin, "/app/w/acme/audit?action=webhook.created", 200).await.contains("/hook"));
    assert_eq!(app.cli_json(&["webhook", "enable", &endpoint_href])["enabled"], true);
    assert!(!page(&app, &admin, "/app/w/acme", 200).await.contains("receive no events"));
    assert_eq!(app.cli_json(&["webhook", "disable", &endpoint_href])["enabled"], false);
    let res = post(&app, &admin, &csrf, &format!("{path}/enable"), &[]).await;
    assert_eq!(location(&res), format!("{path}?notice=endpoint_enabled"));
    let html = page(&app, &admin, &location(&res), 200).await;
    assert!(
        html.contains("Deliveries to this endpoint are on again.") && html.contains("Pause deliveries"),
        "{html}"
    );
    // A test event, and a new signing secret shown once; not a second one within a day.
    let res = post(&app, &admin, &csrf, &format!("{path}/test"), &[]).await;
    assert_eq!(location(&res), format!("{path}?notice=test_sent"));
    let html = page(&app, &admin, &path, 200).await;
    assert!(html.contains("webhook.test"), "{html}");
    let (status, html) = text(post(&app, &admin, &csrf, &format!("{path}/rotate"), &[]).await).await;
    assert_eq!(status, 200, "{html}");
    let start = html.find(pattern).unwrap() + pattern.len();
    let rotated = html[start..].split('"').next().unwrap().to_string();
    assert!(rotated.starts_with("whsec_") && rotated != secret, "{rotated}");
    assert!(html.contains("previous secret also signs"), "{html}");
    let (status, html) = text(post(&app, &admin, &csrf, &format!("{path}/rotate"), &[]).await).await;
    assert_eq!(status, 409, "{html}");
    assert!(!html.contains("whsec_"), "{html}");
    // A leaked secret is replaced at once, whatever the last rotation: only the new one signs.
    let html = page(&app, &admin, &path, 200).await;
    assert!(html.contains("Secret leaked: replace it now"), "{html}");
    let (status, html) =
        text(post(&app, &admin, &csrf, &format!("{path}/rotate"), &[("leaked", "1")]).await).await;
    assert_eq!(status, 200, "{html}");
    let start = html.find(pattern).unwrap() + pattern.len();
    let replaced = html[start..].split('"').next().unwrap().to_string();
    assert!(replaced.starts_with("whsec_") && replaced != rotated, "{replaced}");
    assert!(html.contains("The previous secret no longer signs"), "{html}");
    // Removed.
    let res = post(&app, &admin, &csrf, &format!("{path}/remove"), &[]).await;
    assert_eq!(location(&res), "/app/w/acme/webhooks?notice=endpoint_removed");
    let html = page(&app, &admin, "/app/w/acme/webhooks", 200).await;
    let (active, removed) = html.split_once("Removed endpoints").expect("a list of removed endpoints");
    assert!(!active.contains("http://127.0.0.1:9/hook"), "{html}");
    assert!(removed.contains(&format!("href=\"{path}\"")), "{html}");
    // Its page stays, read-only, for its delivery log.
    let html = page(&app, &admin, &path, 200).await;
    assert!(html.contains("Removed: no more deliveries") && html.contains("link.revoked"), "{html}");
    for control in [
        "Pause deliveries",
        "Turn deliveries back on",
        "Redeliver",
        "Remove endpoint",
        "Send a test event",
        "New signing secret",
        "method=\"post\" action=\"/app/w/acme/webhooks/",
    ] {
        assert!(!html.contains(control), "{control}: {html}");
    }
    let res =
        post(&app, &admin, &csrf, &format!("/app/w/acme/webhooks/deliveries/{delivery}/redeliver"), &[])
            .await;
    assert_eq!(res.status(), 404);
    let res = post(&app, &admin, &csrf, &format!("{path}/enable"), &[]).await;
    assert_eq!(res.status(), 404);
    cleanup.run().await;
}

/// Every form and every filter of the dashboard, given hostile values in every field it reads
/// (empty, blank, very long, right-to-left and invisible characters, markup, SQL, huge and
/// negative numbers, odd URLs, line breaks): never a server error, never the markup unescaped.
async fn hostile_input_never_breaks_a_page(app: TestApp) {
    create_user(&app, ADMIN, true);
    let member = create_user(&app, "member@example.com", false);
    app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let (link_id, _) = app.link("acme", "Sunny");
    let admin = signed_in(&app, ADMIN).await;
    let csrf = csrf_of(&page(&app, &admin, "/app/w/acme/links/new", 200).await);
    const MARKUP: &str = "<script>alert(1)</script>";
    // Long, but the whole form (every field holding it) stays under the body limit: past it the
    // server answers 413 before reading the body, and the client may see a broken pipe instead.
    let long = "x".repeat(2_000);
    let values: Vec<String> = [
        "",
        " ",
        "\t",
        "0",
        "-1",
        "99999999999999999999999",
        "1e9",
        "NaN",
        "true",
        MARKUP,
        "'; DROP TABLE links; --",
        "\u{202e}evil\u{200b}",
        "\u{feff}",
        "💥💥💥",
        "line\r\nbreak",
        "https://[::1]:0/",
        "javascript:alert(1)",
        "//evil.example",
        "../../etc/passwd",
        "#zzz",
        "%00x",
        // PostgreSQL cannot hold a NUL character in text: it must not reach a query as an error.
        "\u{0}",
        "nul\u{0}inside",
        "tiktok,instagram",
        "owner",
        "admin",
    ]
    .iter()
    .map(|v| v.to_string())
    .chain([long])
    .collect();
    let fields = [
        "label",
        "client_ref",
        "expires_in",
        "max_uses",
        "redirect_url",
        "platforms",
        "hide_connections",
        "name",
        "slug",
        "display_name",
        "logo_url",
        "accent_color",
        "allowed_redirects",
        "success_redirect",
        "email",
        "role",
        "url",
        "events",
        "description",
        "action",
        "next",
        "password",
        "new_password",
        "current_password",
        "confirm",
    ];
    let member_id = member["id"].as_str().unwrap();
    let forms = [
        "/app/workspaces".to_string(),
        "/app/w/acme/links".to_string(),
        format!("/app/w/acme/links/{link_id}/rotate"),
        "/app/w/acme/api-keys".to_string(),
        "/app/w/acme/members".to_string(),
        format!("/app/w/acme/members/{member_id}/remove"),
        format!("/app/w/acme/invitations/{member_id}/revoke"),
        format!("/app/invite/{}", "A".repeat(43)),
        "/app/w/acme/branding".to_string(),
        "/app/w/acme/webhooks".to_string(),
        "/app/account/password".to_string(),
    ];
    let filters = [
        "/app/search",
        "/app/w/acme/links",
        "/app/w/acme/connections",
        "/app/w/acme/audit",
        "/app/workspaces",
    ];
    let query_fields = ["q", "before", "status", "provider", "link", "action", "page", "notice", "w"];
    for value in &values {
        for path in &forms {
            let body: Vec<(&str, &str)> = fields.iter().map(|f| (*f, value.as_str())).collect();
            let res = post(&app, &admin, &csrf, path, &body).await;
            let (status, html) = text(res).await;
            assert!(status < 500, "POST {path} with {value:?}: {status} {html}");
            assert!(!html.contains(MARKUP), "POST {path}: markup unescaped");
        }
        for path in filters {
            let mut url = url::Url::parse(&app.url(path)).unwrap();
            for f in query_fields {
                url.query_pairs_mut().append_pair(f, value);
            }
            let (status, html) = text(admin.get(url.as_str()).send().await.unwrap()).await;
            assert!(status < 500, "GET {url} : {status} {html}");
            assert!(!html.contains(MARKUP), "GET {path}: markup unescaped");
        }
    }
    // The session survived it all (nothing signed the browser out or broke the workspace).
    page(&app, &admin, "/app/w/acme", 200).await;
    app.logs_caught_up().await;
    let logs = app.log_text();
    assert!(!logs.contains("internal error"), "{logs}");
}

/// A link's settings (platforms and use limit included) change through the API, the CLI and the
/// dashboard's edit form; the link's page follows; invalid values are refused with the field.
async fn link_settings_change_from_the_api_the_cli_and_the_dashboard(app: TestApp) {
    create_user(&app, ADMIN, true);
    let w = app.cli_json(&["workspace", "create", "--name", "Acme"]);
    let key = app.workspace_key(w["id"].as_str().unwrap());
    let (id, url) = app.link("acme", "Sunny");
    let path = format!("/links/{id}");
    // API.
    let l =
        app.api_patch(&path, &key, serde_json::json!({"platforms": ["instagram"], "max_uses": 2}), 200).await;
    assert_eq!(
        (l["platforms"].clone(), l["max_uses"].clone()),
        (serde_json::json!(["instagram"]), serde_json::json!(2))
    );
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(landing.contains("Connect Instagram") && !landing.contains("Connect TikTok"), "{landing}");
    assert!(
        app.api_patch(&path, &key, serde_json::json!({"max_uses": null}), 200).await["max_uses"].is_null()
    );
    for (body, field) in [
        (serde_json::json!({"platforms": []}), "platforms"),
        (serde_json::json!({"platforms": ["myspace"]}), "platforms"),
        (serde_json::json!({"max_uses": 0}), "max_uses"),
    ] {
        assert_eq!(
            app.api_patch(&path, &key, body.clone(), 422).await["errors"][0]["field"],
            field,
            "{body}"
        );
    }
    // CLI.
    let l = app.cli_json(&[
        "link",
        "update",
        &id,
        "--label",
        "Sunny Cafe",
        "--max-uses",
        "1",
        "--platform",
        "tiktok",
    ]);
    assert_eq!((l["label"].as_str(), l["max_uses"].as_i64()), (Some("Sunny Cafe"), Some(1)), "{l}");
    assert_eq!(l["platforms"], serde_json::json!(["tiktok"]));
    let l =
        app.cli_json(&["link", "update", &id, "--no-max-uses", "--hide-connections", "--expires-in", "7d"]);
    assert!(l["max_uses"].is_null() && l["hide_connections"] == true && l["expires_at"].is_string(), "{l}");
    assert_eq!(app.cli(&["link", "update", &id]).status.code(), Some(2), "nothing to change");
    assert_eq!(app.cli(&["link", "update", &id, "--max-uses", "1", "--no-max-uses"]).status.code(), Some(2));
    assert_eq!(app.cli(&["link", "update", &id, "--expires-in", "soon"]).status.code(), Some(2));
    // Dashboard: the form comes with the current values, saves, and keeps them on an error.
    let admin = signed_in(&app, ADMIN).await;
    let edit = format!("/app/w/acme/links/{id}/edit");
    let html = page(&app, &admin, &edit, 200).await;
    assert!(html.contains("value=\"Sunny Cafe\"") && html.contains("value=\"tiktok\" checked"), "{html}");
    let csrf = csrf_of(&html);
    let res = post(
        &app,
        &admin,
        &csrf,
        &edit,
        &[("label", "Sunny"), ("platforms", "tiktok"), ("max_uses", "lots")],
    )
    .await;
    let (status, html) = text(res).await;
    assert_eq!(status, 422);
    assert!(html.contains("id=\"max_uses-error\"") && html.contains("value=\"lots\""), "{html}");
    let res = post(
        &app,
        &admin,
        &csrf,
        &edit,
        &[
            ("label", "Sunny Edited"),
            ("platforms", "tiktok"),
            ("platforms", "instagram"),
            ("max_uses", "5"),
            ("no_expiry", "1"),
        ],
    )
    .await;
    assert_eq!(location(&res), format!("/app/w/acme/links/{id}?notice=link_updated"));
    let l = app.api_get(&path, &key, 200).await;
    assert_eq!((l["label"].as_str(), l["max_uses"].as_i64()), (Some("Sunny Edited"), Some(5)), "{l}");
    assert!(l["expires_at"].is_null() && l["hide_connections"] == false, "{l}");
    assert_eq!(l["platforms"], serde_json::json!(["tiktok", "instagram"]));
    // Every change is in the audit log.
    let audit = app.api_get(&format!("/audit-events?action=link.updated&target_id={id}"), &key, 200).await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 5);
}
