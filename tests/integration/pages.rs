//! The public landing page of a link.

use serde_json::json;

use crate::helpers::{TestApp, token_of};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    tests![
        landing_page_shows_branding_and_platforms,
        unknown_and_gone_links,
        get_never_changes_state,
        pages_are_hardened,
        link_guessing_is_rate_limited,
        forwarded_for_counts_only_from_trusted_proxies,
        hostile_input_never_breaks_a_public_page,
        a_key_the_database_cannot_hold_is_not_found,
        slow_request_headers_lose_the_connection,
        timeouts_and_wrong_methods_get_bodies_and_security_headers,
        handler_set_policies_forbid_framing_base_and_objects,
        workspace_logo_is_checked_copied_and_served_from_our_origin,
        workspace_changes_apply_to_the_version_they_were_made_from,
    ]
}

/// The security headers every answer carries; the CSP has at least `directives`.
fn assert_hardened(what: &str, res: &reqwest::Response, directives: &[&str]) {
    let h = res.headers();
    let csp = h.get("content-security-policy").map(|v| v.to_str().unwrap()).unwrap_or_default();
    for directive in directives {
        assert!(csp.contains(directive), "{what}: CSP {csp:?} lacks {directive}");
    }
    assert_eq!(h.get("x-content-type-options").map(|v| v.to_str().unwrap()), Some("nosniff"), "{what}");
    assert_eq!(h.get("x-frame-options").map(|v| v.to_str().unwrap()), Some("DENY"), "{what}");
    assert_eq!(h.get("referrer-policy").map(|v| v.to_str().unwrap()), Some("no-referrer"), "{what}");
}

const CSP_BASICS: [&str; 4] =
    ["default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'", "object-src 'none'"];

/// A request past `http.request_timeout_secs` gets 503 with a body in its caller's form (a page,
/// or a problem document under `/api/`), and a method a route does not take gets 405 the same
/// way with `Allow`; every one of them carries the security headers.
async fn timeouts_and_wrong_methods_get_bodies_and_security_headers(app: TestApp) {
    let (app, restarted) = app
        .restart_with(&[
            ("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "2"),
            ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "10"),
        ])
        .await;
    // A page: the sandbox's token endpoint, told to answer after the request timeout.
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "token", "kind": "slow"}], "slow_ms": 8000}),
    )
    .await;
    let res = app
        .client
        .post(app.url("/sandbox/tiktok/v2/oauth/token/"))
        .form(&[("grant_type", "authorization_code")])
        .send()
        .await
        .unwrap();
    // Cut at the request timeout: the sandbox's own answer, after 8 s, would not be a 503.
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "60", "the minute the page asks for");
    assert_hardened("a page's timeout", &res, &CSP_BASICS);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(res.text().await.unwrap().contains("This took too long"));
    // The API: a refresh whose provider answers after the request timeout.
    let (_, key, _, _, connection) = crate::connect::connected_workspace(&app, "Timeouts").await;
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "slow"}], "slow_ms": 8000}),
    )
    .await;
    let res = app
        .api(reqwest::Method::POST, &format!("/connections/{connection}/refresh"), &key)
        .send()
        .await
        .unwrap();
    assert_hardened("an API timeout", &res, &CSP_BASICS);
    let problem = crate::helpers::expect_json(res, 503).await;
    assert_eq!(
        (problem["code"].as_str(), problem["status"].as_i64()),
        (Some("request_timeout"), Some(503)),
        "{problem}"
    );
    // A method an API route does not take: a problem document, with `Allow`.
    let res = app.api(reqwest::Method::PUT, "/links", &key).json(&json!({})).send().await.unwrap();
    assert_hardened("an API 405", &res, &CSP_BASICS);
    let allow = res.headers().get("allow").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let problem = crate::helpers::expect_json(res, 405).await;
    assert_eq!(problem["code"], "method_not_allowed", "{problem}");
    // The same for a page (the connect button's address, and the dashboard's sign-in).
    let (_, url) = app.link(&app.workspace("Methods"), "Client");
    for (method, path, allowed) in [
        (reqwest::Method::GET, format!("/l/{}/connect/tiktok", token_of(&url)), "POST"),
        (reqwest::Method::PUT, "/app/login".to_string(), "POST"),
    ] {
        let res = app.client.request(method.clone(), app.url(&path)).send().await.unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert_hardened(&format!("{method} {path}"), &res, &CSP_BASICS);
        let allow = res.headers().get("allow").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        assert!(allow.contains(allowed), "{method} {path}: {allow}");
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(res.text().await.unwrap().contains("does not take this kind of request"), "{method} {path}");
    }
    restarted.run().await;
}

/// The answers whose handlers set a policy of their own (the connected account's avatar, the
/// sandbox's consent page and avatars) still forbid framing, `<base>` and plugins.
async fn handler_set_policies_forbid_framing_base_and_objects(app: TestApp) {
    let (_, url) = app.link(&app.workspace("Policies"), "Client");
    let authorize = crate::connect::start(&app.client, &app, &url, "tiktok").await;
    let consent = app.client.get(&authorize).send().await.unwrap();
    assert_eq!(consent.status(), 200);
    assert_hardened("the sandbox's consent page", &consent, &CSP_BASICS);
    let avatar = app.client.get(app.url("/sandbox/avatars/sunny.svg")).send().await.unwrap();
    assert_eq!(avatar.status(), 200);
    assert_hardened("a sandbox avatar", &avatar, &CSP_BASICS);
    let flow = crate::connect::consent(
        &app.client,
        &app,
        &authorize,
        "tiktok",
        authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id,
        "allow",
        None,
    )
    .await;
    let html = crate::connect::finish(&app.client, &app, &flow.callback).await.text().await.unwrap();
    let avatar_path = html.split("src=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert!(avatar_path.ends_with("/avatar"), "{avatar_path}");
    let avatar = app.client.get(app.url(&avatar_path)).send().await.unwrap();
    assert_eq!(avatar.status(), 200);
    assert_hardened(
        "the connected account's avatar",
        &avatar,
        &["sandbox", "default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'", "object-src 'none'"],
    );
}

async fn landing_page_shows_branding_and_platforms(app: TestApp) {
    let w = app.cli_json(&[
        "workspace",
        "create",
        "--name",
        "Glow Agency",
        "--display-name",
        "Glow",
        "--accent-color",
        "#ffd400",
    ]);
    let wid = w["id"].as_str().unwrap();
    let link = app.cli_json(&[
        "link",
        "create",
        "--workspace",
        wid,
        "--label",
        "Sunny <Cafe>",
        "--platform",
        "tiktok",
    ]);
    let res = app.client.get(link["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(html.contains("Glow"), "branding");
    assert!(html.contains("Sunny &lt;Cafe&gt;") || html.contains("Sunny &#60;Cafe&#62;"), "label, escaped");
    assert!(!html.contains("<Cafe>"));
    assert!(html.contains("Connect TikTok"));
    assert!(!html.contains("Connect Instagram"), "only the offered platforms");
    assert!(html.contains("See your display name and profile picture"), "what the platform grants");
    assert!(html.contains("method=\"post\""), "buttons are POST forms");
    assert!(html.contains("sandbox"), "sandbox mode is visible");
    // The accent colour arrives as a same-origin stylesheet (no inline styles).
    let css =
        app.client.get(app.url(&format!("/brand/{wid}.css"))).send().await.unwrap().text().await.unwrap();
    assert!(css.contains("--accent: #ffd400") && css.contains("--accent-text: #000000"), "{css}");
    assert_eq!(app.client.get(app.url("/brand/nope.css")).send().await.unwrap().status(), 404);
}

async fn unknown_and_gone_links(app: TestApp) {
    let wid = app.workspace("Gone Inc");
    for path in [
        "/l/",
        "/l/short",
        "/l/not_a_token_but_43_chars_long_xxxxxxxxxxxxx",
        "/l/%00%01",
        "/l/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "/l/%FF",
        "/l/%C3%28/connect/tiktok",
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8", "{path}");
        let html = res.text().await.unwrap();
        assert!(html.contains("does not work") || html.contains("not found"), "{path}");
    }
    // A path that decodes to no text is not found wherever it points, each part of the site
    // answering in its own form.
    let key = app.workspace_key(&wid);
    let res = app.api(reqwest::Method::GET, "/connections/%FF", &key).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(
        res.headers()["cache-control"],
        "no-store",
        "answered outside the API's router, kept by no cache"
    );
    for path in ["/app/w/%FF", "/connected/%FE%FF", "/brand/%FF.css"] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
        assert!(res.text().await.unwrap().contains("Page not found"), "{path}");
    }
    // Revoked: 410 telling the client to ask the agency.
    let (id, url) = app.link(&wid, "revoked");
    app.cli_json(&["link", "revoke", &id]);
    let res = app.client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 410);
    let html = res.text().await.unwrap();
    assert!(
        html.contains("ask Gone Inc to send you a new link") && html.contains("stay connected"),
        "{html}"
    );
    // Expired: 410 once the clock passes the expiry.
    let expiring =
        app.cli_json(&["link", "create", "--workspace", &wid, "--label", "soon", "--expires-in", "1h"]);
    let url = expiring["url"].as_str().unwrap();
    assert_eq!(app.client.get(url).send().await.unwrap().status(), 200);
    app.advance_clock(3601).await;
    let res = app.client.get(url).send().await.unwrap();
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("expired"));
    let admin = app.admin_key();
    let shown = app.api_get(&format!("/links/{}", expiring["id"].as_str().unwrap()), &admin, 200).await;
    assert_eq!(shown["status"], "expired");
    // Unknown pages are a 404 page too.
    assert_eq!(app.client.get(app.url("/nothing/here")).send().await.unwrap().status(), 404);
}

async fn get_never_changes_state(app: TestApp) {
    let wid = app.workspace("Scanners");
    let (id, url) = app.link(&wid, "scanned");
    let before = app.cli_json(&["link", "show", &id]);
    let audit_before = app.count("audit_log").await;
    for _ in 0..25 {
        assert_eq!(app.client.get(&url).send().await.unwrap().status(), 200);
        assert_eq!(app.client.head(&url).send().await.unwrap().status(), 200);
    }
    let after = app.cli_json(&["link", "show", &id]);
    assert_eq!(before, after, "GET and HEAD change nothing");
    assert_eq!(app.count("audit_log").await, audit_before);
    assert_eq!(app.count("oauth_flows").await, 0, "no flow starts on GET");
    // The connect endpoint does not answer GET.
    let token = token_of(&url);
    let res = app.client.get(app.url(&format!("/l/{token}/connect/tiktok"))).send().await.unwrap();
    assert_eq!(res.status(), 405);
}

async fn pages_are_hardened(app: TestApp) {
    let wid = app.workspace("Hardened");
    // A link of one platform asks for that account by name.
    let one =
        app.cli_json(&["link", "create", "--workspace", &wid, "--label", "one", "--platform", "instagram"]);
    let html = app.client.get(one["url"].as_str().unwrap()).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("<h1>Connect your Instagram account</h1>"), "{html}");
    let (_, url) = app.link(&wid, "client");
    let html = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("<h1>Connect your accounts</h1>"), "{html}");
    let res = app.client.get(&url).send().await.unwrap();
    let h = res.headers().clone();
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    let csp = h["content-security-policy"].to_str().unwrap();
    for directive in ["default-src 'none'", "frame-ancestors 'none'", "object-src 'none'", "base-uri 'none'"]
    {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"));
    let html = res.text().await.unwrap();
    // No third-party assets: every src/href is same-origin (relative).
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let value = part.split('"').next().unwrap();
            assert!(value.starts_with('/'), "{attr}{value} is not same-origin");
        }
    }
    assert!(!html.contains("<script"), "no JavaScript needed");
    assert!(html.contains("name=\"viewport\""), "phone-friendly");
    let robots = app.client.get(app.url("/robots.txt")).send().await.unwrap().text().await.unwrap();
    assert!(robots.contains("Disallow: /l/"));
    // Cross-site posts to the connect endpoint are refused and start nothing.
    let token = token_of(&url);
    let res = app
        .client
        .post(app.url(&format!("/l/{token}/connect/tiktok")))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    // Its page leads to the link's own page, where the button is.
    let html = res.text().await.unwrap();
    assert!(html.contains(&format!("href=\"/l/{token}\">Try again</a>")), "{html}");
    let res = app
        .client
        .post(app.url(&format!("/l/{token}/connect/tiktok")))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    // A browser that sends no fetch metadata, and `Origin: null` (another site's page under
    // `no-referrer`), with no cookie of ours (SameSite=Lax keeps it off cross-site posts) or with
    // it but without the form's token: refused too.
    let anonymous = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let res = anonymous
        .post(app.url(&format!("/l/{token}/connect/tiktok")))
        .header("origin", "null")
        .form(&[("form", "0".repeat(64).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.text().await.unwrap().contains("allow cookies"));
    let landing = app.client.get(&url).send().await.unwrap();
    let cookie = landing.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Max-Age=86400")
    );
    let form = crate::connect::form_field(&landing.text().await.unwrap());
    for body in [vec![], vec![("form", "0".repeat(64))], vec![("other", form.clone())]] {
        let res = app
            .client
            .post(app.url(&format!("/l/{token}/connect/tiktok")))
            .header("origin", "null")
            .form(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "{body:?}");
    }
    // The token of another browser does not do either.
    let other = reqwest::Client::builder().cookie_store(true).build().unwrap();
    let theirs = other.get(&url).send().await.unwrap().text().await.unwrap();
    let res = app
        .client
        .post(app.url(&format!("/l/{token}/connect/tiktok")))
        .form(&[("form", crate::connect::form_field(&theirs).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(app.count("oauth_flows").await, 0);
    // With this browser's cookie and token, `Origin: null` (our own page under `no-referrer`)
    // starts a flow, and the answer renews the cookie.
    let res = app
        .client
        .post(app.url(&format!("/l/{token}/connect/tiktok")))
        .header("origin", "null")
        .form(&[("form", form.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["set-cookie"].to_str().unwrap(), cookie);
    assert_eq!(app.count("oauth_flows").await, 1);
    let _ = json!({});
}

async fn link_guessing_is_rate_limited(app: TestApp) {
    // The default limit (300 a minute, bursts of 75) lets a person through and stops a guesser.
    let mut answers = std::collections::BTreeMap::new();
    for i in 0..400 {
        let guess = format!("{:0>43}", i);
        let res = app.client.get(app.url(&format!("/l/{guess}"))).send().await.unwrap();
        if res.status() == 429 {
            assert!(res.headers().get("retry-after").is_some());
            // The page leads back to the link, for when the wait is over.
            let html = res.text().await.unwrap();
            assert!(
                html.contains(&format!("href=\"/l/{guess}\"")) && html.contains("your network"),
                "{html}"
            );
            *answers.entry(429).or_insert(0) += 1;
            continue;
        }
        *answers.entry(res.status().as_u16()).or_insert(0) += 1;
    }
    let limited = answers.get(&429).copied().unwrap_or(0);
    assert!(limited >= 300, "most guesses are refused after the burst: {answers:?}");
    assert!(answers.get(&404).copied().unwrap_or(0) >= 50, "{answers:?}");
    // The providers' callbacks count against the same budget (a made-up state costs a write);
    // a refused one leaves its `code` and `state` behind at once, for a page that says to wait.
    // (The budget refills five a second: a callback may find one back, but not twenty in a row.)
    let mut limited = None;
    for _ in 0..20 {
        let res = app.client.get(app.url("/oauth/tiktok/callback?code=c&state=s")).send().await.unwrap();
        assert_eq!(res.status(), 303);
        let location = res.headers()["location"].to_str().unwrap().to_string();
        if location == "/oauth/tiktok/failed?reason=rate_limited" {
            limited = Some(location);
            break;
        }
        assert_eq!(location, "/oauth/tiktok/failed?reason=state_unknown");
    }
    let location = limited.expect("callbacks are limited with the link pages");
    let res = app.client.get(app.url(&location)).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert!(res.text().await.unwrap().contains("Too many requests came from your network"));
    // Other paths are not limited.
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200);
}

/// Behind a trusted proxy (loopback, by default) each forwarded address is its own client; with
/// no trusted proxies a client that writes `X-Forwarded-For` itself is still one client.
async fn forwarded_for_counts_only_from_trusted_proxies(app: TestApp) {
    let guesses = |app: &TestApp| {
        let (client, base) = (app.client.clone(), app.url(""));
        async move {
            let mut limited = 0;
            for i in 0..20 {
                let res = client
                    .get(format!("{}/l/{:0>43}", base.trim_end_matches('/'), i))
                    .header("x-forwarded-for", format!("198.51.100.{i}"))
                    .send()
                    .await
                    .unwrap();
                limited += usize::from(res.status() == 429);
            }
            limited
        }
    };
    let (app, first) = app.restart_with(&[("AUTHLINK_HTTP__LINK_REQUESTS_PER_MINUTE", "40")]).await;
    assert_eq!(guesses(&app).await, 0, "twenty clients behind the local proxy, one request each");
    let (app, second) = app.restart_with(&[("AUTHLINK_HTTP__TRUSTED_PROXIES", "[]")]).await;
    assert!(guesses(&app).await >= 10, "one client, whatever it writes in the header");
    // The operator is told, once, that a peer outside the list sent the header.
    app.wait_for_log("carried X-Forwarded-For, which was ignored", 10).await;
    app.logs_caught_up().await;
    assert_eq!(app.log_text().matches("carried X-Forwarded-For, which was ignored").count(), 1);
    second.run().await;
    first.run().await;
}

/// Every public route (link pages, the callbacks and their result pages, Meta's callbacks, and
/// the sandbox's provider pages and endpoints), given hostile values in its path and every
/// parameter it reads: never a server error, never the markup unescaped, nothing connected.
async fn hostile_input_never_breaks_a_public_page(app: TestApp) {
    // Enough link requests for the whole sweep from one address.
    let (app, cleanup) = app.restart_with(&[("AUTHLINK_HTTP__LINK_REQUESTS_PER_MINUTE", "1000000")]).await;
    let wid = app.workspace("Hostile");
    let (_, link) = app.link(&wid, "Client");
    let token = token_of(&link);
    const MARKUP: &str = "<script>alert(1)</script>";
    let long = "y".repeat(1_000);
    let values: Vec<String> = [
        "",
        " ",
        "0",
        "-1",
        "99999999999999999999999",
        MARKUP,
        "\"><img src=x onerror=alert(1)>",
        "'; DROP TABLE links; --",
        "\u{202e}evil\u{200b}",
        "💥",
        "line\r\nbreak",
        "%2e%2e%2f",
        "//evil.example",
        "javascript:alert(1)",
        "access_denied",
        "tiktok",
        "instagram",
        // PostgreSQL cannot hold a NUL character in text: it must not reach a query as an error.
        "\u{0}",
        "nul\u{0}inside",
    ]
    .iter()
    .map(|v| v.to_string())
    .chain([long])
    .collect();
    let params = [
        "state",
        "code",
        "error",
        "error_reason",
        "error_description",
        "scopes",
        "iss",
        "reason",
        "flow",
        "client_key",
        "client_id",
        "redirect_uri",
        "scope",
        "response_type",
        "code_challenge",
        "code_challenge_method",
        "decision",
        "account",
        "granted",
        "fields",
        "access_token",
        "grant_type",
        "refresh_token",
        "client_secret",
        "code_verifier",
        "token",
        "signed_request",
        "form",
    ];
    let gets = [
        format!("/l/{token}"),
        "/oauth/tiktok/callback".to_string(),
        "/oauth/instagram/callback".to_string(),
        "/oauth/tiktok/failed".to_string(),
        "/oauth/instagram/failed".to_string(),
        "/sandbox/tiktok/v2/auth/authorize/".to_string(),
        "/sandbox/instagram/oauth/authorize".to_string(),
        "/sandbox/tiktok/v2/user/info/".to_string(),
        "/sandbox/instagram/graph/access_token".to_string(),
        "/sandbox/instagram/graph/refresh_access_token".to_string(),
        "/sandbox/instagram/graph/v23.0/me".to_string(),
    ];
    let posts = [
        format!("/l/{token}/connect/tiktok"),
        "/sandbox/tiktok/v2/auth/authorize/".to_string(),
        "/sandbox/instagram/oauth/authorize".to_string(),
        "/sandbox/tiktok/v2/oauth/token/".to_string(),
        "/sandbox/tiktok/v2/oauth/revoke/".to_string(),
        "/sandbox/instagram/oauth/access_token".to_string(),
        "/oauth/instagram/deauthorize".to_string(),
        "/oauth/instagram/data-deletion".to_string(),
    ];
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for value in &values {
        let pairs: Vec<(&str, &str)> = params.iter().map(|p| (*p, value.as_str())).collect();
        let encoded: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        let mut paths: Vec<String> = gets.to_vec();
        paths.push(format!("/l/{encoded}"));
        paths.push(format!("/connected/{encoded}"));
        paths.push(format!("/connected/{encoded}/avatar"));
        paths.push(format!("/oauth/instagram/data-deletion/{encoded}"));
        paths.push(format!("/brand/{encoded}.css"));
        for path in &paths {
            let mut url = url::Url::parse(&app.url(path)).unwrap();
            url.query_pairs_mut().extend_pairs(&pairs);
            let res = client.get(url.as_str()).send().await.unwrap();
            let status = res.status().as_u16();
            let body = res.text().await.unwrap();
            assert!(status < 500, "GET {path} with {value:?}: {status} {body}");
            assert!(!body.contains(MARKUP), "GET {path}: markup unescaped: {body}");
        }
        for path in &posts {
            let res =
                client.post(app.url(path)).header("origin", app.url("")).form(&pairs).send().await.unwrap();
            let status = res.status().as_u16();
            let body = res.text().await.unwrap();
            assert!(status < 500, "POST {path} with {value:?}: {status} {body}");
            assert!(!body.contains(MARKUP), "POST {path}: markup unescaped: {body}");
        }
    }
    assert_eq!(app.count("connections").await, 0);
    app.logs_caught_up().await;
    let logs = app.log_text();
    assert!(!logs.contains("internal error"), "{logs}");
    cleanup.run().await;
}

/// A key holding a NUL character, which PostgreSQL cannot hold in text (SQLite can), matches
/// nothing: on PostgreSQL the query fails with the database's own error, which the service layer
/// turns into "not found" (a 404 for pages and the API), never an internal error.
async fn a_key_the_database_cannot_hold_is_not_found(app: TestApp) {
    use authlink::service::ServiceError;
    let db = authlink::db::Db::connect(
        &app.db_url.clone().into(),
        &authlink::config::DatabaseConfig {
            max_connections: 1,
            acquire_timeout_secs: 5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut conn = db.read().await.unwrap();
    let found = authlink::db::webhooks::get_deletion_request(&mut conn, "nul\u{0}inside").await;
    drop(conn);
    match found {
        Ok(row) => {
            assert!(!app.db_url.starts_with("postgres"), "PostgreSQL took a NUL character");
            assert_eq!(row, None);
        }
        Err(e) => {
            assert!(app.db_url.starts_with("postgres"), "{e}");
            assert!(matches!(e, authlink::db::DbError::InvalidText(_)), "{e}");
            let e = ServiceError::from(e);
            assert!(matches!(e, ServiceError::NotFound(_)), "{e}");
        }
    }
    db.close().await;
}

/// A client that trickles a request's headers (slowloris) loses the connection once
/// `http.request_timeout_secs` has passed, while a client that sends its request on a
/// connection held open is served.
async fn slow_request_headers_lose_the_connection(app: TestApp) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::spawn_with(app.backend.clone(), &[("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "1")]).await;
    let cleanup = app.cleanup_handle();
    let addr = app.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server closes it (at most a bounded wait here, far above the one-second limit).
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 20 s");
    let text = String::from_utf8_lossy(&buf);
    assert!(!text.contains("200 OK"), "no request was served: {text}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "not before the limit");
    // A whole request is served, and so is a second one on the same connection.
    let mut ok = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for _ in 0..2 {
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let answer = read_one_answer(&mut ok).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    cleanup.run().await;
}

/// Reads one HTTP/1.1 answer with a `Content-Length` body from `stream`.
async fn read_one_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed mid-answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        if buf.len() >= end + 4 + length {
            return text;
        }
    }
}

/// A 1×1 PNG.
const PNG_1X1: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\x0dIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\0\x05\0\x01\xff\x89\x99=\x1d\0\0\0\0IEND\xaeB`\x82";

/// A PNG header that declares `width`×`height` pixels, padded to `len` bytes.
fn png_header(width: u32, height: u32, len: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&[8, 6, 0, 0, 0]);
    b.resize(len.max(b.len()), 0);
    b
}

/// A web server on loopback with a logo and the ways a logo URL goes wrong; counts the requests
/// for each path.
async fn logo_host() -> (String, std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>) {
    use axum::http::{StatusCode, Uri, header};
    use axum::response::IntoResponse;
    let hits = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let counted = counted.clone();
        async move {
            *counted.lock().unwrap().entry(uri.path().to_string()).or_default() += 1;
            let png = |body: Vec<u8>, ct: &'static str| ([(header::CONTENT_TYPE, ct)], body).into_response();
            match uri.path() {
                "/logo.png" => png(PNG_1X1.to_vec(), "image/png"),
                // The bytes decide, not the header.
                "/logo-as-text" => png(png_header(200, 60, 100), "text/plain"),
                "/page.html" => png(b"<!doctype html><p>Welcome".to_vec(), "image/png"),
                "/logo.svg" => png(
                    b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>".to_vec(),
                    "image/svg+xml",
                ),
                "/big.png" => png(png_header(100, 100, 300 * 1024), "image/png"),
                // Too big, sent in chunks without a length: counted as it arrives.
                "/endless.png" => {
                    let chunk = axum::body::Bytes::from(png_header(100, 100, 64 * 1024));
                    let chunks = (0..8).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                    (
                        [(header::CONTENT_TYPE, "image/png")],
                        axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
                    )
                        .into_response()
                }
                "/huge.png" => png(png_header(20_000, 20_000, 100), "image/png"),
                "/moved.png" => (StatusCode::FOUND, [(header::LOCATION, "/logo.png")]).into_response(),
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, hits)
}

/// The `src` of the first logo image on a page, if any.
fn logo_src(html: &str) -> Option<String> {
    let at = html.find("<img class=\"logo\" src=\"")? + "<img class=\"logo\" src=\"".len();
    Some(html[at..].split('"').next()?.to_string())
}

async fn workspace_logo_is_checked_copied_and_served_from_our_origin(app: TestApp) {
    use sha2::Digest;
    let (host, hits) = logo_host().await;
    let admin = app.admin_key();
    let w = app
        .api_post(
            "/workspaces",
            &admin,
            json!({"name": "Logo Co", "branding": {"logo_url": format!("{host}/logo.png")}}),
            201,
        )
        .await;
    let wid = w["id"].as_str().unwrap().to_string();
    assert_eq!(
        w["branding"]["logo_url"],
        format!("{host}/logo.png"),
        "the agency's own URL stays in the API"
    );
    let (_, link) = app.link(&wid, "Client");

    // The landing page shows the copy, from our origin, named by its SHA-256.
    let html = app.client.get(&link).send().await.unwrap().text().await.unwrap();
    let sha = hex::encode(sha2::Sha256::digest(PNG_1X1));
    let src = logo_src(&html).expect("a logo on the landing page");
    assert_eq!(src, format!("/brand/{wid}/logo/{sha}"));
    assert!(!html.contains("class=\"monogram\""), "the logo replaces the initial");
    assert!(!html.contains(&host), "the page names no other site");
    let res = app.client.get(app.url(&src)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_hardened("logo", &res, &["sandbox", "default-src 'none'"]);
    assert_eq!(res.headers()["content-type"], "image/png");
    assert!(res.headers()["cache-control"].to_str().unwrap().contains("immutable"));
    assert_eq!(res.headers()["cross-origin-resource-policy"], "same-origin");
    assert_eq!(res.bytes().await.unwrap().as_ref(), PNG_1X1);
    // Other names: not found.
    for other in [
        format!("/brand/{wid}/logo/{}", "0".repeat(64)),
        format!("/brand/{wid}/logo/{}", sha.to_uppercase()),
        format!("/brand/{wid}/logo/{sha}x"),
        format!("/brand/not-an-id/logo/{sha}"),
    ] {
        assert_eq!(app.client.get(app.url(&other)).send().await.unwrap().status(), 404, "{other}");
    }

    // Every way a logo URL goes wrong is refused on the field, in words, and changes nothing.
    let before = app.api_get(&format!("/workspaces/{wid}"), &admin, 200).await;
    for (path, says) in [
        ("/page.html", "not a PNG, JPEG, GIF or WebP image"),
        ("/logo.svg", "not a PNG, JPEG, GIF or WebP image"),
        ("/big.png", "larger than 256 KB"),
        ("/endless.png", "larger than 256 KB"),
        ("/huge.png", "20000×20000 pixels"),
        ("/missing.png", "HTTP 404"),
        ("/moved.png", "redirect"),
    ] {
        let url = format!("{host}{path}");
        let p = app
            .api_patch(
                &format!("/workspaces/{wid}"),
                &admin,
                json!({"branding": {"logo_url": url, "accent_color": "#112233"}}),
                422,
            )
            .await;
        assert_eq!(p["errors"][0]["field"], "branding.logo_url", "{path}: {p}");
        let message = p["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
        assert!(!message.contains(&host), "{path}: the message does not repeat the URL");
    }
    // A request refused for another field fetches nothing.
    let fetched = hits.lock().unwrap().values().sum::<usize>();
    let p = app
        .api_patch(
            &format!("/workspaces/{wid}"),
            &admin,
            json!({"branding": {"logo_url": format!("{host}/logo-as-text"), "accent_color": "red"}}),
            422,
        )
        .await;
    assert_eq!(p["errors"][0]["field"], "branding.accent_color", "{p}");
    assert_eq!(hits.lock().unwrap().values().sum::<usize>(), fetched, "no fetch for a refused request");
    assert_eq!(app.api_get(&format!("/workspaces/{wid}"), &admin, 200).await, before, "nothing changed");
    assert_eq!(app.client.get(app.url(&src)).send().await.unwrap().status(), 200, "the copy is kept");

    // The same URL again is not fetched again; another one replaces the copy.
    let fetched = hits.lock().unwrap()["/logo.png"];
    assert_eq!(fetched, 1);
    app.api_patch(
        &format!("/workspaces/{wid}"),
        &admin,
        json!({"branding": {"logo_url": format!("{host}/logo.png"), "accent_color": "#112233"}}),
        200,
    )
    .await;
    assert_eq!(hits.lock().unwrap()["/logo.png"], fetched, "kept, not fetched again");
    app.api_patch(
        &format!("/workspaces/{wid}"),
        &admin,
        json!({"branding": {"logo_url": format!("{host}/logo-as-text")}}),
        200,
    )
    .await;
    let html = app.client.get(&link).send().await.unwrap().text().await.unwrap();
    let new_src = logo_src(&html).unwrap();
    assert_ne!(new_src, src);
    assert_eq!(app.client.get(app.url(&src)).send().await.unwrap().status(), 404, "the old copy is gone");
    let res = app.client.get(app.url(&new_src)).send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "image/png", "served as what its bytes are");

    // The workspace's message pages carry it too.
    let (gone_id, gone) = app.link(&wid, "Gone");
    app.cli_json(&["link", "revoke", &gone_id]);
    let res = app.client.get(&gone).send().await.unwrap();
    assert_eq!(res.status(), 410);
    assert_eq!(logo_src(&res.text().await.unwrap()).as_deref(), Some(new_src.as_str()));
    // And the success page.
    let success = crate::connect::connect(
        &app.client,
        &app,
        &link,
        "tiktok",
        authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id,
    )
    .await;
    assert!(success.contains("is connected"), "{success}");
    assert_eq!(logo_src(&success).as_deref(), Some(new_src.as_str()));

    // Without a logo URL: the initial again, and no copy kept.
    app.api_patch(
        &format!("/workspaces/{wid}"),
        &admin,
        json!({"branding": {"display_name": "Logo Co"}}),
        200,
    )
    .await;
    let html = app.client.get(&link).send().await.unwrap().text().await.unwrap();
    assert!(logo_src(&html).is_none() && html.contains("class=\"monogram\""));
    assert_eq!(app.client.get(app.url(&new_src)).send().await.unwrap().status(), 404);
    assert_eq!(app.count("workspace_logos").await, 0);

    // The CLI checks the same way, and the fetch goes through the guard of user-given addresses:
    // with private addresses refused, a loopback logo is not fetched at all.
    let out =
        app.cli(&["workspace", "create", "--name", "Bad Logo", "--logo-url", &format!("{host}/page.html")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a PNG, JPEG, GIF or WebP image"));
    let before = hits.lock().unwrap().values().sum::<usize>();
    let out = app.cli_env(
        &["workspace", "create", "--name", "Private Logo", "--logo-url", &format!("{host}/logo.png")],
        &[("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "false")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not resolve to an address that may be used"), "{stderr}");
    assert_eq!(hits.lock().unwrap().values().sum::<usize>(), before, "no request reached the host");
}

/// A logo host whose one image is answered only when the test says so: `arrived` gets a message
/// when the request is in, and the answer waits for `release`.
async fn gated_logo_host() -> (String, tokio::sync::mpsc::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
    use axum::http::header;
    use axum::response::IntoResponse;
    let (arrived_tx, arrived) = tokio::sync::mpsc::channel(4);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = std::sync::Arc::new(tokio::sync::Mutex::new(Some(released)));
    let app = axum::Router::new().route(
        "/gated.png",
        axum::routing::get(move || {
            let (arrived_tx, released) = (arrived_tx.clone(), released.clone());
            async move {
                arrived_tx.send(()).await.unwrap();
                if let Some(r) = released.lock().await.take() {
                    let _ = r.await;
                }
                ([(header::CONTENT_TYPE, "image/png")], PNG_1X1.to_vec()).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, arrived, release)
}

/// `PATCH /workspaces/{id}` with `If-Match` applies only to the version read (else 412, nothing
/// fetched or written); without it, a change saved while a logo is fetched makes the slower
/// change 409 instead of undoing the other.
async fn workspace_changes_apply_to_the_version_they_were_made_from(app: TestApp) {
    let admin = app.admin_key();
    let (host, hits) = logo_host().await;
    let w = app.api_post("/workspaces", &admin, json!({"name": "Versioned"}), 201).await;
    let path = format!("/workspaces/{}", w["id"].as_str().unwrap());
    let etag_of = |res: &reqwest::Response| {
        res.headers().get("etag").map(|v| v.to_str().unwrap().to_string()).expect("an ETag")
    };
    let patch = |if_match: Option<&str>, body: serde_json::Value| {
        let mut req = app.api(reqwest::Method::PATCH, &path, &admin).json(&body);
        if let Some(tag) = if_match {
            req = req.header("if-match", tag);
        }
        req.send()
    };
    let res = app.api(reqwest::Method::GET, &path, &admin).send().await.unwrap();
    let first = etag_of(&res);
    assert!(first.starts_with('"') && first.ends_with('"') && first.len() > 2, "{first}");

    let res = patch(Some(&first), json!({"name": "Versioned Two"})).await.unwrap();
    assert_eq!(res.status(), 200);
    let second = etag_of(&res);
    assert_ne!(second, first, "a change makes a new version");
    let res = app.api(reqwest::Method::GET, &path, &admin).send().await.unwrap();
    assert_eq!(etag_of(&res), second, "a read gives the version the change answered with");

    // Made from an older version, a weak tag, or no tag at all: 412, and nothing changes, not
    // even a fetch of the logo the change names.
    for stale in [first.as_str(), &format!("W/{second}"), "\"not-a-version\"", "garbage"] {
        let res =
            patch(Some(stale), json!({"name": "Lost", "branding": {"logo_url": format!("{host}/logo.png")}}))
                .await
                .unwrap();
        let p = crate::helpers::expect_json(res, 412).await;
        assert_eq!(p["code"], "precondition_failed", "{stale}: {p}");
    }
    assert!(hits.lock().unwrap().is_empty(), "no logo fetched for a refused change");
    // An invalid change is told what to correct first.
    let res = patch(Some(&first), json!({"branding": {"accent_color": "red"}})).await.unwrap();
    assert_eq!(res.status(), 422);
    let shown = app.api_get(&path, &admin, 200).await;
    assert_eq!(shown["name"], "Versioned Two");
    // The current version among others, or `*`, applies.
    let res = patch(Some(&format!("{first}, {second}")), json!({"name": "Versioned Three"})).await.unwrap();
    assert_eq!(res.status(), 200);
    let res = patch(Some("*"), json!({"name": "Versioned Four"})).await.unwrap();
    assert_eq!(res.status(), 200);

    // Without If-Match: a rename saved while a logo is being fetched wins; the change that
    // fetched it is refused when it is about to write, and neither its name nor its logo is kept.
    let (gated, mut arrived, release) = gated_logo_host().await;
    let slow = tokio::spawn(patch(
        None,
        json!({"name": "Slow", "branding": {"logo_url": format!("{gated}/gated.png")}}),
    ));
    arrived.recv().await.expect("the logo request arrives");
    let res = patch(None, json!({"name": "Quick"})).await.unwrap();
    assert_eq!(res.status(), 200);
    release.send(()).unwrap();
    let p = crate::helpers::expect_json(slow.await.unwrap().unwrap(), 409).await;
    assert_eq!(p["code"], "conflict");
    let shown = app.api_get(&path, &admin, 200).await;
    assert_eq!(shown["name"], "Quick");
    assert!(shown["branding"]["logo_url"].is_null(), "{shown}");
    assert_eq!(app.count("workspace_logos").await, 0, "no copy kept of a logo whose change was refused");
}
