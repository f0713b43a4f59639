//! The connect flow against the sandbox, for both providers: success, reconnect, several
//! accounts, every failure path, the connections API and CLI, and that no secret leaks.

use reqwest::{Client, Response};
use serde_json::{Value, json};

use authlink::sandbox::{INSTAGRAM_ACCOUNTS, TIKTOK_ACCOUNTS};

use crate::helpers::{TestApp, assert_nowhere, token_of};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    let mut list = tests![
        tiktok_connect_reconnect_and_second_account,
        instagram_connect_reconnect_and_second_account,
        consent_denied,
        provider_error_text_cannot_forge_log_lines,
        state_failures_make_no_token_call,
        an_answer_again_while_the_first_is_completed,
        link_gone_between_start_and_callback,
        link_rotated_between_start_and_callback,
        link_used_up_while_at_the_provider,
        a_link_bounds_its_open_attempts,
        used_up_link_repairs_its_own_accounts_only,
        accounts_to_repair_lead_the_links_page,
        provider_failures,
        provider_calls_end_before_the_request_timeout,
        fewer_scopes_than_required,
        personal_instagram_account_is_refused,
        success_redirect_and_landing_list,
        connections_api_and_cli,
        access_token_refreshes_when_expiring,
        no_secret_in_database_or_logs,
        metrics_count_requests_and_flows,
        avatars_on_private_addresses_are_not_fetched,
        sandbox_on_postgres_is_warned_about,
        sandbox_by_default_on_https_is_warned_about,
        worker_warns_of_a_sandbox_on_https_too,
    ];
    list.push((
        "first_connection_racing_another_becomes_a_reconnect",
        |app| Box::pin(first_connection_racing_another_becomes_a_reconnect(app)),
        crate::Only::Postgres,
    ));
    list
}

/// The provider's answer arriving again while the first one is still being completed (a second
/// tap on Allow): its browser is shown a page that looks again by itself, then the result. An
/// attempt whose callback was cut short without an outcome says that nothing was connected and
/// leads back to the link.
async fn an_answer_again_while_the_first_is_completed(app: TestApp) {
    use crate::health::eventually;
    // The provider's time limit outlasts the steps taken while TikTok holds the code exchange.
    let (app, restarted) = app.restart_with(&[("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "20")]).await;
    let wid = app.workspace("Twice");
    let (_, url) = app.link(&wid, "Client");
    let held = || async {
        let stats = app.sandbox_stats("tiktok").await;
        (stats["held"] == 1).then_some(stats)
    };
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "token", "kind": "hold"}], "slow_ms": 60_000}),
    )
    .await;
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    let (client, callback) = (app.client.clone(), flow.callback.clone());
    let first = tokio::spawn(async move { client.get(callback).send().await.unwrap() });
    eventually("the code exchange to be held at TikTok", 30, held).await;
    let again = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["refresh"], "2");
    let result_url = again.url().to_string();
    assert!(result_url.contains("/connected/"), "{result_url}");
    let html = again.text().await.unwrap();
    assert!(html.contains("Finishing your connection") && html.contains(">Check again</a>"), "{html}");
    // Another browser is shown nothing of it.
    assert_eq!(new_browser().get(&result_url).send().await.unwrap().status(), 404);
    // The first answer goes on and ends: the same page now shows the account.
    assert_eq!(app.sandbox("/tiktok/release", json!({})).await["released"], 1);
    let first = first.await.unwrap();
    assert_eq!(first.status(), 303);
    assert_eq!(app.url(first.headers()["location"].to_str().unwrap()), result_url);
    let done = app.client.get(&result_url).send().await.unwrap();
    assert_eq!(done.status(), 200);
    assert!(done.headers().get("refresh").is_none());
    assert!(done.text().await.unwrap().contains("account is connected"));
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"], 1);

    // A callback held past the request's time limit (and its margin) will never record an
    // outcome: its page says that nothing was connected, and leads back to the link.
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "token", "kind": "hold"}]})).await;
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 1), "allow", None).await;
    let (client, callback) = (app.client.clone(), flow.callback.clone());
    let first = tokio::spawn(async move { client.get(callback).send().await.unwrap() });
    eventually("the code exchange to be held at TikTok", 30, held).await;
    app.advance_clock(36).await;
    let again = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(again.status(), 200);
    assert!(again.headers().get("refresh").is_none());
    let html = again.text().await.unwrap();
    assert!(html.contains("did not finish") && html.contains("Nothing was connected"), "{html}");
    assert!(html.contains(&format!("href=\"/l/{}\">Try again</a>", token_of(&url))), "{html}");
    app.sandbox("/tiktok/release", json!({})).await;
    first.await.unwrap();

    // A first answer whose browser goes away while TikTok holds its code exchange (the second tap
    // cancels the first navigation) still ends: the account is connected, and the page of the
    // second tap says so.
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "token", "kind": "hold"}]})).await;
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 2), "allow", None).await;
    let (client, callback) = (app.client.clone(), flow.callback.clone());
    let first = tokio::spawn(async move { client.get(callback).send().await });
    eventually("the code exchange to be held at TikTok", 30, held).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    app.sandbox("/tiktok/release", json!({})).await;
    eventually("the abandoned answer's attempt to end", 30, || async {
        let page = finish(&app.client, &app, &flow.callback).await;
        let html = page.text().await.unwrap();
        html.contains("account is connected").then_some(Value::Null)
    })
    .await;
    let connected = connections(&app, &app.workspace_key(&wid)).await;
    assert!(
        connected.iter().any(|c| c["provider_account_id"] == account("tiktok", 2).as_str()),
        "{connected:?}"
    );
    restarted.run().await;
}

/// PostgreSQL: another transaction stores the account's first connection while the callback's
/// transaction looks for it (it sees nothing yet) and then inserts. The insert waits for the
/// other transaction, finds the account taken, and the callback reconnects that connection
/// instead of failing on the unique key.
async fn first_connection_racing_another_becomes_a_reconnect(app: TestApp) {
    use sqlx::{Connection, Executor};
    let crate::helpers::Backend::Postgres(server) = &app.backend else { panic!("PostgreSQL only") };
    let schema = app.schema.clone().unwrap();
    let wid = app.workspace("Race");
    let (_, url) = app.link(&wid, "Client");
    let open_id = account("tiktok", 0);
    let flow = start_and_consent(&app.client, &app, &url, "tiktok", &open_id, "allow", None).await;
    // The other transaction: the same account's connection, not committed yet.
    let mut other = sqlx::PgConnection::connect(server).await.unwrap();
    other.execute("BEGIN").await.unwrap();
    let racer = uuid::Uuid::now_v7().to_string();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.connections (id, workspace_id, provider, provider_account_id, scopes, token_generation, \
         status, sandbox, connected_at, reconnect_count, created_at, updated_at, refresh_failures) \
         VALUES ($1, $2, 'tiktok', $3, 'user.info.basic', 0, 'active', 1, $4, 0, $4, $4, 0)"
    )))
    .bind(&racer)
    .bind(&wid)
    .bind(&open_id)
    .bind(now)
    .execute(&mut other)
    .await
    .unwrap();
    let callback = {
        let (client, base, callback) = (app.client.clone(), app.url(""), flow.callback.clone());
        tokio::spawn(async move {
            let res = client.get(&callback).send().await.unwrap();
            let status = res.status().as_u16();
            let location = res.headers().get("location").map(|v| v.to_str().unwrap().to_string());
            let Some(location) = location.filter(|_| status == 303) else {
                return (status, res.text().await.unwrap());
            };
            let page =
                client.get(format!("{}{}", base.trim_end_matches('/'), location)).send().await.unwrap();
            (page.status().as_u16(), page.text().await.unwrap())
        })
    };
    // Wait (bounded) until the callback's insert is blocked on the other transaction's row.
    assert!(
        crate::helpers::statement_waits_on_lock(&app, "INSERT INTO connections%").await,
        "the callback's insert waited for the other transaction"
    );
    other.execute("COMMIT").await.unwrap();
    let (status, html) = callback.await.unwrap();
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("is reconnected"), "{html}");
    let key = app.workspace_key(&wid);
    let list = connections(&app, &key).await;
    assert_eq!(list.len(), 1, "no duplicate");
    assert_eq!(list[0]["id"], racer.as_str());
    assert_eq!(list[0]["reconnect_count"], 1);
    assert_eq!(list[0]["status"], "active");
}

/// The accounts of a provider, as ids the consent form accepts.
fn account(provider: &str, i: usize) -> String {
    match provider {
        "tiktok" => TIKTOK_ACCOUNTS[i].open_id.to_string(),
        _ => INSTAGRAM_ACCOUNTS[i].user_id.to_string(),
    }
}

/// One pass through the consent page: what the browser sees at each hop.
pub struct Flow {
    /// The provider callback URL the sandbox redirected to (with code and state).
    pub callback: String,
}

/// Starts a flow from a link and answers the sandbox consent page. Returns the callback URL.
pub async fn start_and_consent(
    client: &Client,
    app: &TestApp,
    link_url: &str,
    provider: &str,
    account_id: &str,
    decision: &str,
    granted: Option<&[&str]>,
) -> Flow {
    let authorize = start(client, app, link_url, provider).await;
    consent(client, app, &authorize, provider, account_id, decision, granted).await
}

/// Opens the link and starts a flow: returns the provider's authorize URL.
pub async fn start(client: &Client, app: &TestApp, link_url: &str, provider: &str) -> String {
    let token = token_of(link_url);
    let landing = client.get(link_url).send().await.unwrap();
    assert_eq!(landing.status(), 200);
    let form = form_field(&landing.text().await.unwrap());
    let start = client
        .post(app.url(&format!("/l/{token}/connect/{provider}")))
        .form(&[("form", form.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 303, "{}", start.text().await.unwrap());
    let authorize = start.headers()["location"].to_str().unwrap().to_string();
    assert!(authorize.starts_with(&app.url(&format!("/sandbox/{provider}/"))), "{authorize}");
    assert!(!authorize.contains("code_verifier"));
    authorize
}

/// The start forms' hidden `form` field on a landing page.
pub fn form_field(html: &str) -> String {
    let rest = html.split("name=\"form\" value=\"").nth(1).expect("a start form on the page");
    rest.split('"').next().unwrap().to_string()
}

/// Answers the sandbox consent page at `authorize`. Returns the callback URL.
pub async fn consent(
    client: &Client,
    app: &TestApp,
    authorize: &str,
    provider: &str,
    account_id: &str,
    decision: &str,
    granted: Option<&[&str]>,
) -> Flow {
    let consent = client.get(authorize).send().await.unwrap();
    assert_eq!(consent.status(), 200, "{}", consent.text().await.unwrap());
    let page = consent.text().await.unwrap();
    assert!(page.to_lowercase().contains("sandbox"));
    let parsed = url::Url::parse(authorize).unwrap();
    let mut form: Vec<(String, String)> =
        parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    form.push(("account".into(), account_id.into()));
    form.push(("decision".into(), decision.into()));
    for g in granted.unwrap_or(&[]) {
        form.push(("granted".into(), g.to_string()));
    }
    let mut post_url = parsed.clone();
    post_url.set_query(None);
    let answer = client.post(post_url.as_str()).form(&form).send().await.unwrap();
    assert_eq!(answer.status(), 302, "{}", answer.text().await.unwrap());
    let callback = answer.headers()["location"].to_str().unwrap().to_string();
    assert!(callback.starts_with(&app.url(&format!("/oauth/{provider}/callback?"))), "{callback}");
    Flow { callback }
}

/// Follows the callback and the redirect to the result page.
pub async fn finish(client: &Client, app: &TestApp, callback: &str) -> Response {
    // Browsers never send the fragment (`#_` from Instagram).
    let callback = callback.split('#').next().unwrap();
    let res = client.get(callback).send().await.unwrap();
    if res.status() != 303 {
        return res;
    }
    let location = res.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with("/connected/")
            || (location.starts_with("/oauth/") && location.contains("/failed?reason=")),
        "clean result URL: {location}"
    );
    assert!(!location.contains("code") && !location.contains("state="), "{location}");
    client.get(app.url(&location)).send().await.unwrap()
}

/// A whole successful flow: returns the final page's HTML.
pub async fn connect(
    client: &Client,
    app: &TestApp,
    link_url: &str,
    provider: &str,
    account_id: &str,
) -> String {
    let flow = start_and_consent(client, app, link_url, provider, account_id, "allow", None).await;
    let page = finish(client, app, &flow.callback).await;
    let status = page.status();
    let html = page.text().await.unwrap();
    assert_eq!(status, 200, "{html}");
    html
}

/// A new workspace, a key of it, and a link of it through which the first sandbox TikTok
/// account is connected: (workspace id, key, link id, link URL, connection id).
pub async fn connected_workspace(app: &TestApp, name: &str) -> (String, String, String, String, String) {
    let wid = app.workspace(name);
    let key = app.workspace_key(&wid);
    let (link_id, link_url) = app.link(&wid, "Client");
    connect(&app.client, app, &link_url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    let connection =
        app.api_get("/connections", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    (wid, key, link_id, link_url, connection)
}

pub fn new_browser() -> Client {
    Client::builder().cookie_store(true).redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn connections(app: &TestApp, key: &str) -> Vec<Value> {
    app.api_get("/connections", key, 200).await["data"].as_array().unwrap().clone()
}

async fn connect_reconnect_and_second_account(app: TestApp, provider: &str) {
    let wid = app.workspace("Flow Agency");
    let key = app.workspace_key(&wid);
    let (link_id, url) = app.link(&wid, "Client");
    let html = connect(&app.client, &app, &url, provider, &account(provider, 0)).await;
    assert!(html.contains("is connected"), "{html}");
    assert!(html.contains("Flow Agency"));
    assert!(html.contains("sandbox"));
    let handle = match provider {
        "tiktok" => TIKTOK_ACCOUNTS[0].username,
        _ => INSTAGRAM_ACCOUNTS[0].username,
    };
    assert!(html.contains(handle), "the handle is shown");
    let list = connections(&app, &key).await;
    assert_eq!(list.len(), 1);
    let first = &list[0];
    assert_eq!(first["provider"], provider);
    assert_eq!(first["status"], "active");
    assert_eq!(first["reconnect_count"], 0);
    assert_eq!(first["sandbox"], true);
    assert_eq!(first["link_id"], link_id.as_str());
    assert_eq!(first["provider_account_id"], account(provider, 0));
    assert!(first.get("access_token").is_none() && !first.to_string().contains("access_token\":"));
    // The same account again, through the same link: same connection, reconnect count 1.
    let html = connect(&app.client, &app, &url, provider, &account(provider, 0)).await;
    assert!(html.contains("reconnected"), "{html}");
    let list = connections(&app, &key).await;
    assert_eq!(list.len(), 1, "never a duplicate");
    assert_eq!(list[0]["id"], first["id"]);
    assert_eq!(list[0]["reconnect_count"], 1);
    // A second account through the same link, from another browser.
    let other = new_browser();
    connect(&other, &app, &url, provider, &account(provider, 1)).await;
    let list = connections(&app, &key).await;
    assert_eq!(list.len(), 2);
    // The history and the link's use count.
    let detail = app.api_get(&format!("/connections/{}", first["id"].as_str().unwrap()), &key, 200).await;
    let kinds: Vec<&str> =
        detail["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["created", "reconnected"]);
    // Each entry names the link by its label, and by its id, which does not change.
    let through = format!("via link “Client” ({link_id})");
    assert!(detail["events"][0]["detail"].as_str().unwrap().ends_with(&through), "{detail}");
    let link = app.api_get(&format!("/links/{link_id}"), &key, 200).await;
    assert_eq!(link["use_count"], 3);
    assert!(link["last_used_at"].is_string());
    // The sandbox saw PKCE (TikTok: 64 hex chars, distinct per flow).
    if provider == "tiktok" {
        let stats = app.sandbox_stats("tiktok").await;
        let challenges: Vec<&str> =
            stats["challenges"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(challenges.len(), 3);
        assert!(challenges.iter().all(|c| c.len() == 64 && c.chars().all(|ch| ch.is_ascii_hexdigit())));
        let mut unique = challenges.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 3);
    }
    assert_ended_attempts_keep_no_verifier(&app, 3).await;
}

/// `ended` attempts have ended, and none of them keeps its PKCE verifier (erased with the
/// outcome: nothing needs it any more).
async fn assert_ended_attempts_keep_no_verifier(app: &TestApp, ended: i64) {
    let count = |condition: &str| {
        let sql = format!("SELECT CAST(COUNT(*) AS TEXT) FROM {{schema}}.oauth_flows WHERE {condition}");
        async move { app.text(&sql).await.parse::<i64>().unwrap() }
    };
    assert_eq!(count("outcome IS NOT NULL").await, ended);
    assert_eq!(count("outcome IS NOT NULL AND verifier_sealed <> ''").await, 0);
}

async fn tiktok_connect_reconnect_and_second_account(app: TestApp) {
    connect_reconnect_and_second_account(app, "tiktok").await;
}

async fn instagram_connect_reconnect_and_second_account(app: TestApp) {
    connect_reconnect_and_second_account(app, "instagram").await;
}

pub async fn assert_nothing_connected(app: &TestApp) {
    assert_eq!(app.count("connections").await, 0, "a failed attempt writes no connection");
    assert!(!app.database_dump().await.contains("act."), "and no token");
}

/// The sandbox keeps its codes and tokens in the process: on PostgreSQL, the shape of a
/// deployment with many instances, the operator is warned at start; on SQLite (one process) not.
async fn sandbox_on_postgres_is_warned_about(app: TestApp) {
    let warning = "a provider runs in sandbox mode";
    // Served: the start's lines before the first request are written.
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);
    match app.backend {
        crate::helpers::Backend::Postgres(_) => app.wait_for_log(warning, 10).await,
        crate::helpers::Backend::Sqlite => {
            app.logs_caught_up().await;
            assert!(!app.log_text().contains(warning), "{}", app.log_text());
        }
    }
}

/// `authlink worker` says it too at start (it refreshes the simulated provider's tokens), and
/// not when the simulator is meant.
async fn worker_warns_of_a_sandbox_on_https_too(app: TestApp) {
    let https =
        [("AUTHLINK_PUBLIC_URL", "https://links.example.com"), ("AUTHLINK_SANDBOX__CONTROL_API", "false")];
    let log = worker_start_log(&app, &https);
    for provider in ["tiktok", "instagram"] {
        assert!(log.contains(&format!("{provider} runs in sandbox mode on a public https address")), "{log}");
    }
    let mut meant = https.to_vec();
    meant.extend([
        ("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "true"),
        ("AUTHLINK_PROVIDERS__INSTAGRAM__SANDBOX", "true"),
    ]);
    let log = worker_start_log(&app, &meant);
    assert!(!log.contains("on a public https address"), "{log}");
}

/// What `authlink worker` logs (at `info`) up to the line that says it runs; then it is stopped.
fn worker_start_log(app: &TestApp, extra: &[(&str, &str)]) -> String {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(crate::helpers::binary());
    cmd.arg("worker")
        .current_dir(app.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    crate::helpers::clear_authlink_env(&mut cmd);
    cmd.envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.env("AUTHLINK_LOG", "info");
    cmd.envs(extra.iter().copied());
    let mut worker = cmd.spawn().unwrap();
    let stderr = worker.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("authlink worker running") {
                break;
            }
        }
        let _ = tx.send(seen);
    });
    let seen = rx.recv_timeout(std::time::Duration::from_secs(60));
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = reader.join();
    let seen = seen.expect("the worker said it runs within 60 s");
    assert!(seen.contains("authlink worker running"), "the worker stopped before it ran: {seen}");
    seen
}

/// A provider simulated on a public https address for want of credentials is said at start
/// (credentials that were not mounted would otherwise give clients a fake consent screen in
/// silence); with `sandbox = true` it is meant, and not said.
async fn sandbox_by_default_on_https_is_warned_about(app: TestApp) {
    let https =
        [("AUTHLINK_PUBLIC_URL", "https://links.example.com"), ("AUTHLINK_SANDBOX__CONTROL_API", "false")];
    let (app, restarted) = app.restart_with(&https).await;
    for provider in ["tiktok", "instagram"] {
        app.wait_for_log(&format!("{provider} runs in sandbox mode on a public https address"), 10).await;
    }
    restarted.run().await;
    let mut meant = https.to_vec();
    meant.extend([
        ("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "true"),
        ("AUTHLINK_PROVIDERS__INSTAGRAM__SANDBOX", "true"),
    ]);
    // (Said before the line that it listens, which the restart waits for.)
    let (app, restarted) = app.restart_with(&meant).await;
    assert!(app.log_text().contains("authlink listening"));
    assert!(!app.log_text().contains("on a public https address"), "{}", app.log_text());
    restarted.run().await;
}

async fn consent_denied(app: TestApp) {
    let wid = app.workspace("Deny");
    let (link_id, url) = app.link(&wid, "Client");
    let mut result_page = String::new();
    for provider in ["tiktok", "instagram"] {
        let flow =
            start_and_consent(&app.client, &app, &url, provider, &account(provider, 0), "deny", None).await;
        assert!(flow.callback.contains("error=access_denied"));
        // A PKCE verifier is kept for TikTok's attempt only: Instagram Login has no PKCE.
        let sql = format!(
            "SELECT CAST(COUNT(*) AS TEXT) FROM {{schema}}.oauth_flows \
             WHERE provider = '{provider}' AND outcome IS NULL AND verifier_sealed <> ''"
        );
        assert_eq!(app.text(&sql).await, if provider == "tiktok" { "1" } else { "0" });
        let page = finish(&app.client, &app, &flow.callback).await;
        assert_eq!(page.status(), 403);
        result_page = page.url().to_string();
        let html = page.text().await.unwrap();
        assert!(html.contains("Connection cancelled"), "{html}");
        let name = if provider == "tiktok" { "TikTok" } else { "Instagram" };
        assert!(
            html.contains(&format!("Sandbox mode: this {name} is a simulation, not the real one.")),
            "a sandbox attempt's failure page says so: {html}"
        );
        assert!(
            html.contains(&format!("href=\"/l/{}\"", token_of(&url))),
            "try again leads back to the link"
        );
        // Its next step points at that button, not at the message the link came in.
        assert!(
            html.contains(&format!("press Try again, choose {name}, then choose Allow"))
                && !html.contains("link you were sent"),
            "{html}"
        );
        assert_eq!(app.sandbox_stats(provider).await["token_calls"], 0);
    }
    // The deny_all switch: Allow behaves as Deny.
    app.sandbox("/tiktok/scenario", json!({"deny_all": true})).await;
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 403);
    assert_nothing_connected(&app).await;
    assert_ended_attempts_keep_no_verifier(&app, 3).await;
    // Once the link is revoked, an attempt's page no longer leads back to it (its page would
    // only say that it no longer works), nor speaks of a button it does not show.
    let key = app.workspace_key(&wid);
    app.api_post(&format!("/links/{link_id}/revoke"), &key, json!({}), 200).await;
    let page = app.client.get(&result_page).send().await.unwrap();
    assert_eq!(page.status(), 403);
    let html = page.text().await.unwrap();
    assert!(html.contains("Connection cancelled") && !html.contains("href=\"/l/"), "{html}");
    assert!(!html.contains("Try again"), "{html}");
}

/// The callback's `error_description` and `error_reason` come from the address bar: with plain
/// text logs, a line break in them must not start a log line of its own.
async fn provider_error_text_cannot_forge_log_lines(app: TestApp) {
    let (app, cleanup) = app.restart_with(&[("AUTHLINK_LOG_FORMAT", "human")]).await;
    let wid = app.workspace("Forged");
    let (_, url) = app.link(&wid, "Client");
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "deny", None).await;
    let forged = "FORGED admin signed in";
    let mut callback = url::Url::parse(flow.callback.split('#').next().unwrap()).unwrap();
    let kept: Vec<(String, String)> = callback
        .query_pairs()
        .filter(|(k, _)| k != "error_reason" && k != "error_description")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    callback
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("error_reason", &format!("x\r\n{forged}"))
        .append_pair("error_description", &format!("nothing\n{forged}"));
    let callback = callback.to_string();
    assert_eq!(finish(&app.client, &app, &callback).await.status(), 403);
    app.logs_caught_up().await;
    let log = app.log_text();
    assert!(log.contains("provider returned an error to the callback"), "{log}");
    assert!(log.contains(&format!("nothing\\n{forged}")), "written escaped: {log}");
    assert!(!log.lines().any(|l| l.trim_start().starts_with("FORGED")), "{log}");
    cleanup.run().await;
}

async fn state_failures_make_no_token_call(app: TestApp) {
    let wid = app.workspace("States");
    let (_, url) = app.link(&wid, "Client");
    let try_again = format!("href=\"/l/{}\"", token_of(&url));
    // Missing and unknown state.
    let res = finish(&app.client, &app, &app.url("/oauth/tiktok/callback?code=abc")).await;
    assert_eq!(res.status(), 400);
    let res = finish(
        &app.client,
        &app,
        &app.url("/oauth/tiktok/callback?code=abc&state=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    )
    .await;
    assert_eq!(res.status(), 400);
    // A denial without `state` is still a denial.
    let res = finish(&app.client, &app, &app.url("/oauth/tiktok/callback?error=access_denied")).await;
    assert_eq!(res.status(), 403);
    let html = res.text().await.unwrap();
    assert!(html.contains("Connection cancelled"), "{html}");
    // With no attempt to lead back from, the page points at the link the client was sent.
    assert!(
        html.contains("start again from the link you were sent") && !html.contains("Try again"),
        "{html}"
    );
    // Another browser: the victim's callback replayed elsewhere. Its page does not lead to the link.
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    let attacker = new_browser();
    let res = finish(&attacker, &app, &flow.callback).await;
    assert_eq!(res.status(), 400);
    let html = res.text().await.unwrap();
    assert!(html.contains("same browser") && !html.contains(&try_again), "{html}");
    // Nor does it tell whose link it was.
    assert!(!html.contains("<p class=\"eyebrow\">States</p>") && !html.contains("/brand/"), "{html}");
    // Mix-up: TikTok's answer delivered to the Instagram callback.
    let mixed = flow.callback.replace("/oauth/tiktok/callback", "/oauth/instagram/callback");
    let res = finish(&app.client, &app, &mixed).await;
    assert_eq!(res.status(), 400);
    assert!(res.url().path().starts_with("/oauth/tiktok/failed"), "{}", res.url());
    let html = res.text().await.unwrap();
    assert!(html.contains("did not come from TikTok, where this attempt was started"), "{html}");
    // An `iss` parameter (neither provider sends one) is refused.
    let res = finish(&app.client, &app, &format!("{}&iss=https://evil.example", flow.callback)).await;
    assert_eq!(res.status(), 400);
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"], 0, "no code exchange for any of these");
    // Expired: more than ten minutes between start and callback.
    let flow2 =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    app.advance_clock(601).await;
    let res = finish(&app.client, &app, &flow2.callback).await;
    assert_eq!(res.status(), 400);
    let html = res.text().await.unwrap();
    assert!(html.contains("ten minutes") && html.contains(&try_again), "{html}");
    assert!(html.contains("Press Try again, then choose TikTok once more."), "{html}");
    // In the attempt's own browser, branded as the link's pages are.
    assert!(html.contains("<p class=\"eyebrow\">States</p>") && html.contains("/brand/"), "{html}");
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"], 0);
    assert_nothing_connected(&app).await;
    // Reused: the first use succeeds; the same answer again in the same browser (a second tap on
    // Allow, Back into the provider's page) makes no call and shows how the attempt ended, even
    // past the attempt's ten minutes; in another browser it is refused.
    let flow3 =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    let first = finish(&app.client, &app, &flow3.callback).await;
    assert_eq!(first.status(), 200);
    let result_url = first.url().to_string();
    let calls = app.sandbox_stats("tiktok").await["token_calls"].as_u64().unwrap();
    assert_eq!(calls, 1);
    app.advance_clock(601).await;
    let res = finish(&app.client, &app, &flow3.callback).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().to_string(), result_url);
    let html = res.text().await.unwrap();
    assert!(html.contains("Connected") && !html.contains("already used"), "{html}");
    let res = finish(&new_browser(), &app, &flow3.callback).await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("same browser"));
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"].as_u64().unwrap(), calls);
    // The refusal page alone: an unknown or missing reason is not a page (an HTML one, still).
    for path in [
        "/oauth/tiktok/failed?reason=nonsense",
        "/oauth/tiktok/failed",
        "/oauth/tiktok/failed?reason=denied&reason=denied",
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"), "{path}");
    }
    // A callback whose query does not read is refused in words, from a clean URL.
    let res = app.client.get(app.url("/oauth/tiktok/callback?state=a&state=b&code=c")).send().await.unwrap();
    assert_eq!(res.status(), 303);
    assert!(
        res.headers()["location"].to_str().unwrap().starts_with("/oauth/tiktok/failed?reason=provider_error")
    );
}

async fn link_gone_between_start_and_callback(app: TestApp) {
    let wid = app.workspace("Gone");
    let (id, url) = app.link(&wid, "Client");
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    app.cli_json(&["link", "revoke", &id]);
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 410);
    let html = page.text().await.unwrap();
    assert!(!html.contains("href=\"/l/"), "no try again through a link that cannot connect: {html}");
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"], 0);
    assert_nothing_connected(&app).await;
    // A revoked link cannot start a flow either, from a page opened before it was revoked.
    let token = token_of(&url);
    let res = app
        .client
        .post(app.url(&format!("/l/{token}/connect/tiktok")))
        .form(&[("form", form_field(&landing).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 410);
}

/// Rotating a link (the answer to a leaked URL) ends what was started with the old URL: a flow
/// at the provider connects nothing, and no page of an old flow, failed or successful, leads to
/// the new URL.
async fn link_rotated_between_start_and_callback(app: TestApp) {
    let wid = app.workspace("Rotated");
    let (id, url) = app.link(&wid, "Client");
    let old_href = format!("href=\"/l/{}\"", token_of(&url));
    // One account connected before the rotation: its success page offers the link.
    let first =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 1), "allow", None).await;
    let done = finish(&app.client, &app, &first.callback).await;
    assert_eq!(done.status(), 200);
    let success_url = done.url().to_string();
    assert!(success_url.contains("/connected/"), "{success_url}");
    assert!(done.text().await.unwrap().contains(&old_href), "connect another, before the rotation");
    // Another started, and at the provider when the link is rotated.
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    let rotated = app.cli_json(&["link", "rotate", &id]);
    let fresh = rotated["url"].as_str().unwrap().to_string();
    let new_token = token_of(&fresh);
    assert_ne!(new_token, token_of(&url));
    let calls = app.sandbox_stats("tiktok").await["token_calls"].as_u64().unwrap();
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 410);
    let html = page.text().await.unwrap();
    assert!(html.contains("replaced"), "{html}");
    assert!(!html.contains(&new_token) && !html.contains("href=\"/l/"), "no way to the new URL: {html}");
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"].as_u64().unwrap(), calls, "no code exchange");
    assert_eq!(app.count("connections").await, 1, "nothing connected");
    // The earlier success page no longer leads to the link, old or new.
    let again = app.client.get(&success_url).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let html = again.text().await.unwrap();
    assert!(!html.contains(&new_token) && !html.contains("href=\"/l/"), "{html}");
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 404, "the old URL is dead");
    // The new URL works, and its own pages lead back to it.
    let page = connect(&app.client, &app, &fresh, "tiktok", &account("tiktok", 0)).await;
    assert!(page.contains(&format!("href=\"/l/{new_token}\"")), "{page}");
    // A flow is bound to the URL it was started with, not judged by the clock: here the rotation
    // reads as made before the flow started (a start that read the link while the rotation was
    // being committed, or a host whose clock runs behind), and still ends it.
    let flow =
        start_and_consent(&app.client, &app, &fresh, "tiktok", &account("tiktok", 1), "allow", None).await;
    let newest = app.cli_json(&["link", "rotate", &id])["url"].as_str().unwrap().to_string();
    app.execute(&format!("UPDATE {{schema}}.links SET rotated_at = 1 WHERE id = '{id}'")).await;
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 410);
    let html = page.text().await.unwrap();
    assert!(!html.contains(&token_of(&newest)) && !html.contains("href=\"/l/"), "{html}");
    assert_eq!(app.count("connections").await, 2, "nothing more connected");
    // Flows started before the URL was recorded with them (by an earlier version) are judged by
    // the time of the link's last rotation: one started after it connects, one before it does not.
    let forget_urls = "UPDATE {schema}.oauth_flows SET link_token_hash = NULL";
    let flow =
        start_and_consent(&app.client, &app, &newest, "tiktok", &account("tiktok", 2), "allow", None).await;
    app.execute(forget_urls).await;
    assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 200);
    let flow =
        start_and_consent(&app.client, &app, &newest, "tiktok", &account("tiktok", 1), "allow", None).await;
    app.execute(forget_urls).await;
    app.cli_json(&["link", "rotate", &id]);
    assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 410);
    assert_eq!(app.count("connections").await, 3);
}

/// A link has at most `http.link_open_attempts` attempts open at once (here 3): a start beyond
/// them gets 429 and stores nothing, through that link only; an attempt back from the provider,
/// or one past its ten minutes, frees its place.
async fn a_link_bounds_its_open_attempts(app: TestApp) {
    let (app, restarted) = app.restart_with(&[("AUTHLINK_HTTP__LINK_OPEN_ATTEMPTS", "3")]).await;
    let wid = app.workspace("Busy");
    let (link_id, url) = app.link(&wid, "Client");
    let (_, other) = app.link(&wid, "Other client");
    let browser = new_browser();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(start(&browser, &app, &url, "tiktok").await);
    }
    let refused_start = || async {
        let landing = browser.get(&url).send().await.unwrap().text().await.unwrap();
        browser
            .post(app.url(&format!("/l/{}/connect/tiktok", token_of(&url))))
            .form(&[("form", form_field(&landing).as_str())])
            .send()
            .await
            .unwrap()
    };
    let attempts = app.count("oauth_flows").await;
    let refused = refused_start().await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "300");
    let html = refused.text().await.unwrap();
    assert!(html.contains("This link is busy") && html.contains("Busy"), "branded: {html}");
    assert!(html.contains(&format!("href=\"/l/{}\"", token_of(&url))), "a Try again: {html}");
    assert_eq!(app.count("oauth_flows").await, attempts, "nothing stored");
    app.wait_for_log("the link has as many attempts open as http.link_open_attempts allows", 10).await;
    assert!(!app.log_text().contains(&token_of(&url)), "no link token in the log");
    // Another link of the workspace is not held back by this one's attempts.
    start(&browser, &app, &other, "tiktok").await;
    // One attempt back from the provider frees its place.
    let flow = consent(&browser, &app, &open[0], "tiktok", &account("tiktok", 0), "allow", None).await;
    assert_eq!(finish(&browser, &app, &flow.callback).await.status(), 200);
    start(&browser, &app, &url, "tiktok").await;
    assert_eq!(refused_start().await.status(), 429);
    // Past their ten minutes, abandoned attempts hold no place either.
    app.advance_clock(601).await;
    for _ in 0..3 {
        start(&browser, &app, &url, "tiktok").await;
    }
    assert_eq!(refused_start().await.status(), 429);
    // Rotated (the answer to a leaked link flooded with starts), the link's new URL has every
    // place: attempts the old URL started can no longer connect.
    let fresh = app.cli_json(&["link", "rotate", &link_id])["url"].as_str().unwrap().to_string();
    for _ in 0..3 {
        start(&browser, &app, &fresh, "tiktok").await;
    }
    restarted.run().await;
}

/// Two tabs start flows through a link good for one connection; the second callback's code
/// exchange is held at the provider while the first completes. The second finds the link used
/// up in its own transaction: it stores nothing, and the link is counted once.
async fn link_used_up_while_at_the_provider(app: TestApp) {
    // The provider's time limit outlasts the first flow, run while TikTok holds the second's
    // code exchange.
    let (app, restarted) = app.restart_with(&[("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "20")]).await;
    let wid = app.workspace("Once");
    let link = app.cli_json(&["link", "create", "--workspace", &wid, "--label", "Client", "--max-uses", "1"]);
    let (id, url) = (link["id"].as_str().unwrap(), link["url"].as_str().unwrap());
    let first =
        start_and_consent(&app.client, &app, url, "tiktok", &account("tiktok", 0), "allow", None).await;
    let second =
        start_and_consent(&app.client, &app, url, "tiktok", &account("tiktok", 1), "allow", None).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "token", "kind": "hold"}], "slow_ms": 60_000}),
    )
    .await;
    let held = {
        let (client, app_url, callback) = (app.client.clone(), app.url(""), second.callback.clone());
        tokio::spawn(async move {
            let res = client.get(&callback).send().await.unwrap();
            assert_eq!(res.status(), 303);
            let location = res.headers()["location"].to_str().unwrap().to_string();
            let page =
                client.get(format!("{}{}", app_url.trim_end_matches('/'), location)).send().await.unwrap();
            (page.status().as_u16(), page.text().await.unwrap())
        })
    };
    crate::health::eventually("the second exchange to be held at TikTok", 30, || async {
        let stats = app.sandbox_stats("tiktok").await;
        (stats["held"] == 1).then_some(stats)
    })
    .await;
    let page = finish(&app.client, &app, &first.callback).await;
    assert_eq!(page.status(), 200, "{}", page.text().await.unwrap());
    assert_eq!(app.sandbox("/tiktok/release", json!({})).await["released"], 1);
    let (status, html) = held.await.unwrap();
    assert_eq!(status, 410, "{html}");
    assert!(html.contains("reached its limit"), "{html}");
    assert_eq!(app.count("connections").await, 1, "the second account was not connected");
    let link = app.cli_json(&["link", "show", id]);
    assert_eq!(link["use_count"], 1, "{link}");
    restarted.run().await;
}

/// A link good for one account, used up: its page still opens and says it only reconnects; a
/// new account is refused at the callback (410, nothing stored, not counted); the account it
/// connected, once broken, is repaired through it (counted as a use); revoked, it repairs nothing.
async fn used_up_link_repairs_its_own_accounts_only(app: TestApp) {
    let wid = app.workspace("Limited");
    let key = app.workspace_key(&wid);
    let link = app.cli_json(&["link", "create", "--workspace", &wid, "--label", "Client", "--max-uses", "1"]);
    let (link_id, url) =
        (link["id"].as_str().unwrap().to_string(), link["url"].as_str().unwrap().to_string());
    let html = connect(&app.client, &app, &url, "tiktok", &account("tiktok", 0)).await;
    // Its success page offers no other account: the link can connect none.
    assert!(!html.contains("Connect another account"), "{html}");
    let id = app.api_get("/connections", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(app.api_get(&format!("/links/{link_id}"), &key, 200).await["status"], "used_up");
    let landing = app.client.get(&url).send().await.unwrap();
    assert_eq!(landing.status(), 200);
    let landing = landing.text().await.unwrap();
    assert!(landing.contains("It can still reconnect those accounts"), "{landing}");
    // It says what it can still do: reconnect, not connect.
    assert!(landing.contains("<h1>Reconnect your TikTok account</h1>"), "{landing}");
    // Only the platforms of its own accounts: the link offers Instagram too, where it has none.
    assert!(!landing.contains("/connect/instagram"), "{landing}");
    assert!(
        landing.contains(">Reconnect a TikTok account<") && !landing.contains(">Connect TikTok<"),
        "{landing}"
    );
    // The accounts it can reconnect are listed before the buttons that reconnect them.
    let (listed, offered) =
        (landing.find("Already connected through this link"), landing.find(">Reconnect a TikTok"));
    assert!(matches!((listed, offered), (Some(l), Some(o)) if l < o), "{landing}");
    // A new account: refused once the account is known, nothing stored.
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 1), "allow", None).await;
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 410);
    assert!(page.text().await.unwrap().contains("reached its limit"));
    assert_eq!(app.count("connections").await, 1);
    assert_eq!(app.api_get(&format!("/links/{link_id}"), &key, 200).await["use_count"], 1);
    // The first account breaks (its refresh token refused) and is repaired through the link.
    // The refusal is scripted before the clock moves: the background refresh, due then, may run
    // first (and then meets it).
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "refresh", "kind": "invalid_grant"}]}))
        .await;
    app.advance_clock(86_400).await;
    app.api_get(&format!("/connections/{id}/access-token"), &key, 409).await;
    assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["status"], "broken");
    // Its page now leads with that account and its button, and offers no other platform.
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(landing.contains("This account needs reconnecting"), "{landing}");
    assert!(
        !landing.contains("Reconnect another account") && !landing.contains("Reconnect a TikTok"),
        "{landing}"
    );
    assert!(!landing.contains("/connect/instagram"), "{landing}");
    let html = connect(&app.client, &app, &url, "tiktok", &account("tiktok", 0)).await;
    assert!(html.contains("is reconnected"), "{html}");
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!((c["status"].as_str(), c["reconnect_count"].as_i64()), (Some("active"), Some(1)), "{c}");
    let shown = app.api_get(&format!("/links/{link_id}"), &key, 200).await;
    assert_eq!(
        (shown["use_count"].as_i64(), shown["status"].as_str()),
        (Some(2), Some("used_up")),
        "{shown}"
    );
    // Removed by the agency while its client was at TikTok, the account is no longer the link's
    // to repair: refused like a new one (the page offers it no more either), nothing changed.
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(!landing.contains("/connect/"), "{landing}");
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 410);
    assert!(page.text().await.unwrap().contains("reached its limit"));
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!((c["status"].as_str(), c["reconnect_count"].as_i64()), (Some("disconnected"), Some(1)), "{c}");
    assert_eq!(app.api_get(&format!("/links/{link_id}"), &key, 200).await["use_count"], 2);
    // Revoked, the link repairs nothing.
    app.api_post(&format!("/links/{link_id}/revoke"), &key, json!({}), 200).await;
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 410);
}

/// Two broken accounts of a link, and one that works: the page leads with the two, each with its
/// own Reconnect button, and lists the working one after the platforms.
async fn accounts_to_repair_lead_the_links_page(app: TestApp) {
    let wid = app.workspace("Repairs");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    for i in 0..3 {
        connect(&app.client, &app, &url, "tiktok", &account("tiktok", i)).await;
    }
    let listed = app.api_get("/connections", &key, 200).await;
    let ids: Vec<String> =
        listed["data"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3, "{listed}");
    // Two of them break: their refresh tokens are refused (scripted before the clock moves: the
    // background refresh, due then, may meet the refusals first). The third refreshes.
    let refused = json!({"endpoint": "refresh", "kind": "invalid_grant"});
    app.sandbox("/tiktok/scenario", json!({"fail_next": [refused, refused]})).await;
    app.advance_clock(86_400).await;
    let mut broken = 0;
    for id in &ids {
        let res = app
            .api(reqwest::Method::GET, &format!("/connections/{id}/access-token"), &key)
            .send()
            .await
            .unwrap();
        if res.status() == 409 {
            broken += 1;
        }
    }
    assert_eq!(broken, 2);
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(
        landing.contains("These accounts need reconnecting") && landing.contains("They have stopped"),
        "{landing}"
    );
    assert_eq!(landing.matches(">Reconnect<span").count(), 2, "{landing}");
    let (repairs, platforms, others) = (
        landing.find("These accounts need reconnecting"),
        landing.find(">Connect TikTok<"),
        landing.find("Also connected through this link"),
    );
    assert!(
        matches!((repairs, platforms, others), (Some(r), Some(p), Some(o)) if r < p && p < o),
        "{landing}"
    );
    assert_eq!(landing.matches("Needs reconnecting").count(), 2, "{landing}");
    assert_eq!(landing.matches(">Connected<").count(), 1, "{landing}");
}

async fn provider_failures(app: TestApp) {
    let wid = app.workspace("Failures");
    let (_, url) = app.link(&wid, "Client");
    let mut spent = Vec::new();
    for (provider, endpoint, kind, status) in [
        ("tiktok", "token", "invalid_grant", 502),
        ("tiktok", "token", "server_error", 504),
        ("tiktok", "token", "rate_limit", 504),
        ("tiktok", "token", "html_error", 504),
        ("tiktok", "token", "slow", 504),
        ("tiktok", "profile", "access_token_invalid", 502),
        ("tiktok", "profile", "server_error", 504),
        ("instagram", "token", "bad_code", 502),
        ("instagram", "exchange_long_lived", "server_error", 504),
        ("instagram", "profile", "access_token_invalid", 502),
        ("instagram", "profile", "slow", 504),
    ] {
        app.sandbox(
            &format!("/{provider}/scenario"),
            json!({"fail_next": [{"endpoint": endpoint, "kind": kind}], "slow_ms": 4000}),
        )
        .await;
        let flow =
            start_and_consent(&app.client, &app, &url, provider, &account(provider, 0), "allow", None).await;
        let callback = url::Url::parse(flow.callback.split('#').next().unwrap()).unwrap();
        for (k, v) in callback.query_pairs() {
            if k == "code" || k == "state" {
                spent.push((format!("{provider} {k} ({endpoint} {kind})"), v.into_owned()));
            }
        }
        let page = finish(&app.client, &app, &flow.callback).await;
        assert_eq!(page.status().as_u16(), status, "{provider} {endpoint} {kind}");
        let html = page.text().await.unwrap();
        assert!(html.contains("Nothing was connected"), "{provider} {endpoint} {kind}: {html}");
        assert!(html.contains("Try again"));
        assert_nothing_connected(&app).await;
    }
    // The failures are logged (the code exchange's among them) without the code or the state.
    assert_eq!(spent.len(), 22, "a code and a state per flow: {spent:?}");
    for (what, secret) in &spent {
        assert_nowhere(&app, what, secret).await;
    }
}

/// Instagram's three calls, each within the provider timeout, together longer than the request
/// timeout: the client gets the "did not answer in time" page, not a bare error.
async fn provider_calls_end_before_the_request_timeout(app: TestApp) {
    let (app, restarted) = app
        .restart_with(&[
            ("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "3"),
            ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "10"),
        ])
        .await;
    let wid = app.workspace("Slow");
    let (_, url) = app.link(&wid, "Client");
    app.sandbox(
        "/instagram/scenario",
        json!({"fail_next": [{"endpoint": "token", "kind": "slow"}, {"endpoint": "exchange_long_lived", "kind": "slow"}],
               "slow_ms": 1800}),
    )
    .await;
    let flow =
        start_and_consent(&app.client, &app, &url, "instagram", &account("instagram", 0), "allow", None)
            .await;
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 504);
    let html = page.text().await.unwrap();
    assert!(html.contains("did not answer in time") && html.contains("Try again"), "{html}");
    assert_nothing_connected(&app).await;
    restarted.run().await;
}

async fn fewer_scopes_than_required(app: TestApp) {
    let wid = app.workspace("Scopes");
    let (_, url) = app.link(&wid, "Client");
    // The client unticks user.info.profile (only the required basic scope stays granted).
    let flow = start_and_consent(
        &app.client,
        &app,
        &url,
        "tiktok",
        &account("tiktok", 0),
        "allow",
        Some(&["user.info.basic"]),
    )
    .await;
    assert!(
        flow.callback.contains("scopes=user.info.basic&") || flow.callback.contains("scopes=user.info.basic")
    );
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 403);
    let html = page.text().await.unwrap();
    assert!(html.contains("permissions were not granted"), "{html}");
    // The page names the permission that was switched off, in the client's words.
    assert!(
        html.contains("A permission the agency cannot work without was switched off on TikTok: See your username, bio and verified status."),
        "{html}"
    );
    assert_nothing_connected(&app).await;
    // The agency sees the attempt, with what was missing and the reference the client was shown.
    let key = app.workspace_key(&wid);
    let link_id = app.api_get("/links", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    let tried = app.api_get(&format!("/links/{link_id}/attempts"), &key, 200).await;
    let attempt = &tried["data"][0];
    assert_eq!(attempt["status"], "failed", "{tried}");
    assert_eq!(attempt["outcome"], "scopes_missing");
    assert_eq!(attempt["detail"], "user.info.profile");
    let reference = attempt["reference"].as_str().unwrap();
    assert!(html.contains(&format!("Reference: {reference}.")), "{reference}: {html}");
    // With only the basic scope required, the same grant connects the account, and its status
    // reason says what is missing.
    let (app, restarted) =
        app.restart_with(&[("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[user.info.basic]")]).await;
    let flow = start_and_consent(
        &app.client,
        &app,
        &url,
        "tiktok",
        &account("tiktok", 0),
        "allow",
        Some(&["user.info.basic"]),
    )
    .await;
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 200);
    let key = app.workspace_key(&wid);
    let list = connections(&app, &key).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["status"], "active");
    assert_eq!(list[0]["scopes"], json!(["user.info.basic"]));
    assert_eq!(list[0]["status_reason"], "Granted without user.info.profile.");
    // A full grant later clears the note.
    let flow =
        start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok", 0), "allow", None).await;
    assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 200);
    let list = connections(&app, &key).await;
    assert!(list[0]["status_reason"].is_null(), "{}", list[0]);
    assert_eq!(list[0]["reconnect_count"], 1);
    restarted.run().await;
}

async fn personal_instagram_account_is_refused(app: TestApp) {
    let wid = app.workspace("Personal");
    let (_, url) = app.link(&wid, "Client");
    let personal =
        INSTAGRAM_ACCOUNTS.iter().find(|a| a.account_type == "PERSONAL").expect("a personal account");
    let flow =
        start_and_consent(&app.client, &app, &url, "instagram", &personal.user_id.to_string(), "allow", None)
            .await;
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 403);
    assert!(page.text().await.unwrap().contains("professional"));
    assert_nothing_connected(&app).await;
}

async fn success_redirect_and_landing_list(app: TestApp) {
    let w = app.cli_json(&[
        "workspace",
        "create",
        "--name",
        "Redirects",
        "--allow-redirect",
        "https://agency.example/done",
    ]);
    let wid = w["id"].as_str().unwrap();
    let link = app.cli_json(&[
        "link",
        "create",
        "--workspace",
        wid,
        "--label",
        "Client",
        "--redirect-url",
        "https://agency.example/done?from=authlink",
    ]);
    let url = link["url"].as_str().unwrap();
    let html = connect(&app.client, &app, url, "tiktok", &account("tiktok", 0)).await;
    let key = app.workspace_key(wid);
    let conn = &connections(&app, &key).await[0];
    let id = conn["id"].as_str().unwrap();
    let expected = format!(
        "https://agency.example/done?from=authlink&status=connected&provider=tiktok&connection_id={id}"
    );
    assert!(
        html.replace("&#38;", "&").replace("&amp;", "&").contains(&expected),
        "success redirect button: {html}"
    );
    assert!(html.contains(&format!("href=\"/l/{}\"", token_of(url))), "connect another account");
    // The avatar comes from our own origin (fetched server-side), only for this browser.
    let avatar_path = html.split("src=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert!(avatar_path.starts_with("/connected/") && avatar_path.ends_with("/avatar"), "{avatar_path}");
    let img = app.client.get(app.url(&avatar_path)).send().await.unwrap();
    assert_eq!(img.status(), 200);
    assert!(img.headers()["content-type"].to_str().unwrap().starts_with("image/"));
    assert_eq!(new_browser().get(app.url(&avatar_path)).send().await.unwrap().status(), 404);
    // The landing page now lists the account, with its status.
    let landing = app.client.get(url).send().await.unwrap().text().await.unwrap();
    assert!(
        landing.contains("Already connected")
            && landing.contains("@sandbox.creator")
            && landing.contains("Connected")
    );
    // The result page is only for the browser that ran the flow.
    let other = new_browser();
    let res = app.client.get(url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let stranger =
        other.get(app.url("/connected/0190a000-0000-7000-8000-000000000000")).send().await.unwrap();
    assert_eq!(stranger.status(), 404);
    // Once the workspace takes the URL off its allow-list, the link's redirect is no longer offered.
    app.api_patch(
        &format!("/workspaces/{wid}"),
        &app.admin_key(),
        json!({"allowed_redirects": ["https://other.example/"]}),
        200,
    )
    .await;
    let html = connect(&app.client, &app, url, "tiktok", &account("tiktok", 1)).await;
    assert!(html.contains("is connected") && !html.contains("agency.example"), "{html}");
    // A workspace's default redirect serves the links that name none; a link's own wins.
    let w = app.cli_json(&[
        "workspace",
        "create",
        "--name",
        "Defaults",
        "--allow-redirect",
        "https://agency.example/",
        "--success-redirect",
        "https://agency.example/welcome",
    ]);
    assert_eq!(w["success_redirect"], "https://agency.example/welcome");
    let wid = w["id"].as_str().unwrap();
    let (_, plain) = app.link(wid, "Client");
    let html = connect(&new_browser(), &app, &plain, "instagram", &account("instagram", 0)).await;
    assert!(
        html.replace("&#38;", "&")
            .contains("https://agency.example/welcome?status=connected&provider=instagram"),
        "{html}"
    );
    let own = app.cli_json(&[
        "link",
        "create",
        "--workspace",
        wid,
        "--label",
        "Own",
        "--redirect-url",
        "https://agency.example/own",
    ]);
    let html =
        connect(&new_browser(), &app, own["url"].as_str().unwrap(), "tiktok", &account("tiktok", 2)).await;
    let html = html.replace("&#38;", "&");
    assert!(
        html.contains("https://agency.example/own?status=connected") && !html.contains("/welcome"),
        "{html}"
    );
    // Not in the allow-list: refused on write.
    let admin = app.admin_key();
    let p = app
        .api_patch(
            &format!("/workspaces/{wid}"),
            &admin,
            json!({"success_redirect": "https://elsewhere.example/"}),
            422,
        )
        .await;
    assert!(p.to_string().contains("success_redirect"), "{p}");
    let cleared =
        app.api_patch(&format!("/workspaces/{wid}"), &admin, json!({"success_redirect": ""}), 200).await;
    assert!(cleared["success_redirect"].is_null(), "{cleared}");
}

async fn connections_api_and_cli(app: TestApp) {
    let wid = app.workspace("Conn API");
    let key = app.workspace_key(&wid);
    let other_key = app.workspace_key(&app.workspace("Other"));
    let (link_id, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", &account("tiktok", 0)).await;
    connect(&new_browser(), &app, &url, "instagram", &account("instagram", 0)).await;
    let list = connections(&app, &key).await;
    assert_eq!(list.len(), 2);
    let tiktok = list.iter().find(|c| c["provider"] == "tiktok").unwrap();
    let tid = tiktok["id"].as_str().unwrap();
    // Filters.
    assert_eq!(
        app.api_get("/connections?provider=instagram", &key, 200).await["data"].as_array().unwrap().len(),
        1
    );
    assert_eq!(
        app.api_get("/connections?status=broken", &key, 200).await["data"].as_array().unwrap().len(),
        0
    );
    assert_eq!(
        app.api_get(&format!("/connections?link_id={link_id}"), &key, 200).await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(app.api_get("/connections?limit=1", &key, 200).await["data"].as_array().unwrap().len(), 1);
    app.api_get("/connections?status=sideways", &key, 422).await;
    // Tenant isolation.
    app.api_get(&format!("/connections/{tid}"), &other_key, 404).await;
    app.api_get(&format!("/connections/{tid}/access-token"), &other_key, 404).await;
    app.api_post(&format!("/connections/{tid}/disconnect"), &other_key, json!({}), 404).await;
    assert_eq!(connections(&app, &other_key).await.len(), 0);
    // Access token through the API and the CLI; every read is audited.
    let token = app.api_get(&format!("/connections/{tid}/access-token"), &key, 200).await;
    let access = token["access_token"].as_str().unwrap().to_string();
    assert!(!access.is_empty() && token["expires_at"].is_string() && token["sandbox"] == true);
    let cli_token = app.cli(&["connection", "token", tid]);
    assert!(cli_token.status.success());
    assert_eq!(String::from_utf8_lossy(&cli_token.stdout).trim(), access);
    let expires = token["expires_at"].as_str().unwrap();
    assert!(String::from_utf8_lossy(&cli_token.stderr).contains(&format!("expires at {expires}")));
    let reads =
        app.api_get(&format!("/audit-events?action=connection.token_read&target_id={tid}"), &key, 200).await;
    assert_eq!(reads["data"].as_array().unwrap().len(), 2);
    // CLI listing marks sandbox connections.
    let out = app.cli(&["connection", "list", "--workspace", &wid]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[sandbox]") && text.contains("@sandbox.creator"), "{text}");
    let listed = app.cli_json(&["connection", "list", "--workspace", &wid, "--status", "active"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    // Filters by link and provider, and pages with --before (the hint names the next cursor).
    let (other_link, other_url) = app.link(&wid, "Other client");
    connect(&new_browser(), &app, &other_url, "tiktok", &account("tiktok", 1)).await;
    let by_link = app.cli_json(&["connection", "list", "--workspace", &wid, "--link", &other_link]);
    assert_eq!(by_link.as_array().unwrap().len(), 1);
    assert_eq!(by_link[0]["link_id"], other_link.as_str());
    let by_link = app.cli_json(&["connection", "list", "--workspace", &wid, "--link", &link_id]);
    assert_eq!(by_link.as_array().unwrap().len(), 2);
    let tiktoks = app.cli_json(&["connection", "list", "--workspace", &wid, "--provider", "tiktok"]);
    assert_eq!(tiktoks.as_array().unwrap().len(), 2);
    let page = app.cli(&["connection", "list", "--workspace", &wid, "--limit", "2"]);
    let hint = String::from_utf8_lossy(&page.stderr).to_string();
    let cursor = hint.trim().rsplit(' ').next().unwrap().to_string();
    assert!(hint.contains("--before") && cursor.len() == 36, "{hint}");
    let rest =
        app.cli_json(&["connection", "list", "--workspace", &wid, "--limit", "2", "--before", &cursor]);
    let first_page = app.cli_json(&["connection", "list", "--workspace", &wid, "--limit", "2"]);
    let mut seen: Vec<&str> =
        first_page.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    seen.extend(rest.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()));
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 3, "two pages hold the three connections once each");
    let shown = app.cli_json(&["connection", "show", tid]);
    assert_eq!(shown["events"][0]["kind"], "created");
    assert!(!shown.to_string().contains(&access));
    // Disconnect: revoked at TikTok, marked disconnected, tokens erased.
    let revokes = app.sandbox_stats("tiktok").await["revoke_calls"].as_u64().unwrap();
    let done = app.cli_json(&["connection", "disconnect", tid]);
    assert_eq!(done["status"], "disconnected");
    assert_eq!(app.sandbox_stats("tiktok").await["revoke_calls"].as_u64().unwrap(), revokes + 1);
    let p = app.api_get(&format!("/connections/{tid}/access-token"), &key, 409).await;
    assert_eq!(p["code"], "conflict");
    let ig = list.iter().find(|c| c["provider"] == "instagram").unwrap()["id"].as_str().unwrap().to_string();
    let done = app.api_post(&format!("/connections/{ig}/disconnect"), &key, json!({}), 200).await;
    assert!(done["status_reason"].as_str().unwrap().contains("offers no revocation"));
    assert_eq!(
        app.cli_json(&["connection", "list", "--workspace", &wid, "--status", "disconnected"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The landing page tells the client where they stand.
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(landing.contains("Removed by the agency"), "{landing}");
    assert_eq!(
        app.cli(&["connection", "list", "--workspace", &wid, "--status", "sideways"]).status.code(),
        Some(2)
    );
}

async fn access_token_refreshes_when_expiring(app: TestApp) {
    let wid = app.workspace("Refresh");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", &account("tiktok", 0)).await;
    let id = connections(&app, &key).await[0]["id"].as_str().unwrap().to_string();
    let first = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    // Not due: the same token, no refresh call.
    let again = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    assert_eq!(first["access_token"], again["access_token"]);
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"], 0);
    // Within five minutes of expiry: refreshed first (the refresh token rotates).
    app.advance_clock(86_400 - 200).await;
    let path = format!("/connections/{id}/access-token");
    let concurrent = futures::future::join_all((0..5).map(|_| app.api_get(&path, &key, 200))).await;
    let fresh = &concurrent[0];
    assert_ne!(fresh["access_token"], first["access_token"]);
    assert!(
        concurrent.iter().all(|t| t["access_token"] == fresh["access_token"]),
        "one refresh, shared by all readers"
    );
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!(stats["refresh_calls"], 1, "single flight");
    assert_eq!(stats["refresh_token_reuse"], 0);
    let detail = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert!(detail["events"].as_array().unwrap().iter().any(|e| e["kind"] == "refreshed"));
    // Within five minutes of expiry again, the provider failing for now: the token, still valid
    // for more than a minute, is handed out as it is; with less than a minute left, 503. The
    // failures are scripted before the clock moves: the background refresh, due then too, may
    // run before the read (and then meets them as well).
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "server_error", "count": 50}]}),
    )
    .await;
    let calls = app.sandbox_stats("tiktok").await["refresh_calls"].as_u64().unwrap();
    app.advance_clock(86_400 - 200).await;
    let kept = app.api_get(&path, &key, 200).await;
    assert_eq!(kept["access_token"], fresh["access_token"]);
    assert!(
        app.sandbox_stats("tiktok").await["refresh_calls"].as_u64().unwrap() > calls,
        "a refresh was tried"
    );
    app.advance_clock(150).await;
    app.api_get(&path, &key, 503).await;
    // A permanent refresh failure breaks the connection with a readable reason (scripted before
    // the clock moves, as above).
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "refresh", "kind": "invalid_grant"}]}))
        .await;
    app.advance_clock(86_400).await;
    let p = app.api_get(&format!("/connections/{id}/access-token"), &key, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("broken"));
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken");
    assert!(c["status_reason"].as_str().unwrap().len() > 10);
    // While the link offers TikTok no more, its page offers no repair that would lead nowhere.
    let link = app.api_get("/links", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    app.api_patch(&format!("/links/{link}"), &key, json!({"platforms": ["instagram"]}), 200).await;
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(landing.contains("through a link that offers it"), "{landing}");
    assert!(!landing.contains("/connect/tiktok") && !landing.contains(">Reconnect<"), "{landing}");
    app.api_patch(&format!("/links/{link}"), &key, json!({"platforms": ["tiktok", "instagram"]}), 200).await;
    // The client repairs it through the same link.
    let landing = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(landing.contains("Needs reconnecting") && landing.contains(">Reconnect<"), "{landing}");
    // The account to repair comes first, above the platforms, and is not listed twice.
    let (repair, platforms) =
        (landing.find("This account needs reconnecting"), landing.find(">Connect TikTok<"));
    assert!(matches!((repair, platforms), (Some(r), Some(p)) if r < p), "{landing}");
    assert_eq!(landing.matches("Needs reconnecting").count(), 1, "{landing}");
    assert!(!landing.contains("Already connected through this link"), "{landing}");
    connect(&app.client, &app, &url, "tiktok", &account("tiktok", 0)).await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active");
    assert_eq!(c["reconnect_count"], 1);
}

async fn no_secret_in_database_or_logs(app: TestApp) {
    let wid = app.workspace("Canaries");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let mut codes_and_states = Vec::new();
    for provider in ["tiktok", "instagram"] {
        let flow =
            start_and_consent(&app.client, &app, &url, provider, &account(provider, 0), "allow", None).await;
        let parsed = url::Url::parse(flow.callback.split('#').next().unwrap()).unwrap();
        for (k, v) in parsed.query_pairs() {
            if k == "code" || k == "state" {
                codes_and_states.push((format!("{provider} {k}"), v.into_owned()));
            }
        }
        assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 200);
    }
    let mut tokens = Vec::new();
    for c in connections(&app, &key).await {
        let id = c["id"].as_str().unwrap();
        let t = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
        tokens.push((
            format!("{} access token", c["provider"]),
            t["access_token"].as_str().unwrap().to_string(),
        ));
    }
    // Each callback carried a code and a state, and each of the two connections has a token:
    // none of them is missing from the search below.
    let mut gathered: Vec<&str> = codes_and_states.iter().map(|(what, _)| what.as_str()).collect();
    gathered.sort_unstable();
    assert_eq!(gathered, ["instagram code", "instagram state", "tiktok code", "tiktok state"]);
    assert_eq!(tokens.len(), 2, "one access token per connection");
    let dump = app.database_dump().await;
    app.logs_caught_up().await;
    let logs = app.log_text();
    let link_token = token_of(&url);
    for (what, secret) in
        codes_and_states.iter().chain(tokens.iter()).chain([("link token".to_string(), link_token)].iter())
    {
        assert!(secret.len() >= 16, "{what} looks too short to search for: {secret}");
        assert!(!dump.contains(secret.as_str()), "the database holds the {what} in plain text");
        assert!(!logs.contains(secret.as_str()), "the logs hold the {what}");
    }
    // Refresh tokens are never shown; the sandbox's TikTok tokens have recognisable prefixes.
    assert!(!dump.contains("rft.") && !dump.contains("act."), "no TikTok token in the database");
    assert!(!logs.contains("rft.") && !logs.contains("act."), "no TikTok token in the logs");
}

/// The value of the sample of `metric` whose labels include every one of `labels`.
fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_count_requests_and_flows(app: TestApp) {
    let (app, cleanup) = app.restart_with(&[("AUTHLINK_METRICS__LISTEN", "127.0.0.1:0")]).await;
    let addr = app
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "metrics listening")
        .and_then(|v| v["addr"].as_str().map(str::to_string))
        .expect("the metrics address is logged");
    let wid = app.workspace("Metrics");
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", TIKTOK_ACCOUNTS[0].open_id).await;
    connect(&app.client, &app, &url, "tiktok", TIKTOK_ACCOUNTS[0].open_id).await;
    let missing = finish(&app.client, &app, &app.url("/oauth/tiktok/callback?code=abc")).await;
    assert_eq!(missing.status(), 400);
    // A forced refresh that succeeds, and one the provider refuses for good.
    let key = app.workspace_key(&wid);
    let id = app.api_get("/connections", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "refresh", "kind": "invalid_grant"}]}))
        .await;
    app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;

    // Made-up methods are counted as one: a label per method would grow without bound.
    for method in ["BREW", "X-ONE", "X-TWO"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        app.client.request(method, app.url("/healthz")).send().await.unwrap();
    }
    let res = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let body = res.text().await.unwrap();
    let flows = |outcome: &str| {
        sample(
            &body,
            "authlink_connect_flows_total",
            &["provider=\"tiktok\"", &format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!(flows("connected"), Some(1.0), "{body}");
    assert_eq!(flows("reconnected"), Some(1.0));
    assert_eq!(flows("state_missing"), Some(1.0));
    assert_eq!(sample(&body, "authlink_connect_flows_started_total", &["provider=\"tiktok\""]), Some(2.0));
    // Requests by route template: two landing pages, no token in any label.
    let landing = ["route=\"/l/{token}\"", "method=\"GET\"", "status=\"200\""];
    assert_eq!(sample(&body, "authlink_http_requests_total", &landing), Some(2.0));
    assert!(sample(&body, "authlink_http_request_duration_seconds_count", &landing[..2]).is_some());
    assert!(
        sample(&body, "authlink_http_requests_total", &["route=\"/healthz\"", "method=\"other\""]).is_some()
    );
    assert!(!body.contains("BREW") && !body.contains("X-ONE"), "{body}");
    let refreshes = |outcome: &str| {
        sample(&body, "authlink_refreshes_total", &["provider=\"tiktok\"", &format!("outcome=\"{outcome}\"")])
    };
    assert_eq!(refreshes("refreshed"), Some(1.0), "{body}");
    assert_eq!(refreshes("broken"), Some(1.0));
    assert_eq!(
        sample(&body, "authlink_connections", &["provider=\"tiktok\"", "status=\"broken\""]),
        Some(1.0)
    );
    assert!(!body.contains(&token_of(&url)), "no link token in the metrics");
    assert!(body.contains("authlink_build_info{version=\""), "{body}");
    // Only on the metrics address.
    let public = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404);
    cleanup.run().await;
}

/// The success page's avatar is fetched server-side from the URL the provider gave: an address
/// inside the network (here given as an IP literal, which no resolver sees) is never contacted.
async fn avatars_on_private_addresses_are_not_fetched(app: TestApp) {
    // The suite allows private webhook targets (its receivers are on loopback); not here.
    let app =
        TestApp::spawn_with(app.backend.clone(), &[("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "false")])
            .await;
    let cleanup = app.cleanup_handle();
    let wid = app.workspace("Avatars");
    let (_, url) = app.link(&wid, "Client");
    let html = connect(&app.client, &app, &url, "tiktok", &account("tiktok", 0)).await;
    let avatar_path = html.split("src=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert_eq!(
        app.client.get(app.url(&avatar_path)).send().await.unwrap().status(),
        200,
        "the sandbox's own"
    );
    // A listener inside the network, standing for an internal service.
    let inside = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    inside.set_nonblocking(true).unwrap();
    let port = inside.local_addr().unwrap().port();
    for target in
        [format!("https://127.0.0.1:{port}/a.png"), format!("https://[::ffff:127.0.0.1]:{port}/a.png")]
    {
        app.execute(&format!("UPDATE {{schema}}.connections SET avatar_url = '{target}'")).await;
        let res = app.client.get(app.url(&avatar_path)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{target}");
    }
    // The answers came back: a connection made for them would be waiting in the backlog.
    let contacted = inside.accept();
    assert!(
        matches!(&contacted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the internal address was contacted: {contacted:?}"
    );
    cleanup.run().await;
}
