//! The JSON API: every route, bad input of every kind, tenant isolation, OpenAPI.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_nowhere, expect_json, token_of};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    let mut list = tests![
        workspaces_crud,
        links_lifecycle,
        link_pagination_and_search,
        link_bad_input,
        request_bad_input,
        nul_and_out_of_range_input_is_refused,
        removed_webhook_endpoint_is_gone,
        requests_are_limited_per_key_and_address,
        api_keys_lifecycle,
        active_keys_and_endpoints_are_bounded,
        tenant_isolation,
        audit_log_lists_changes,
        openapi_matches_routes,
        health_probes,
        secrets_are_not_stored_or_logged,
    ];
    list.push((
        "database_lost_gives_503_and_recovers",
        |app| Box::pin(database_lost_gives_503_and_recovers(app)),
        crate::Only::Postgres,
    ));
    list.push((
        "writes_go_on_when_the_database_ends_every_connection",
        |app| Box::pin(writes_go_on_when_the_database_ends_every_connection(app)),
        crate::Only::Postgres,
    ));
    list.push((
        "link_edit_waits_for_a_revocation_and_keeps_it",
        |app| Box::pin(link_edit_waits_for_a_revocation_and_keeps_it(app)),
        crate::Only::Postgres,
    ));
    list.push((
        "a_lock_held_past_the_lock_timeout_answers_503",
        |app| Box::pin(a_lock_held_past_the_lock_timeout_answers_503(app)),
        crate::Only::Postgres,
    ));
    list
}

/// PostgreSQL: a connection of the test's own whose open transaction holds link `id`'s row lock.
async fn link_locked_elsewhere(app: &TestApp, id: &str) -> sqlx::PgConnection {
    use sqlx::{Connection, Executor};
    let crate::helpers::Backend::Postgres(server) = &app.backend else { panic!("PostgreSQL only") };
    let schema = app.schema.clone().unwrap();
    let mut other = sqlx::PgConnection::connect(server).await.unwrap();
    other.execute("BEGIN").await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT id FROM {schema}.links WHERE id = $1 FOR UPDATE")))
        .bind(id)
        .execute(&mut other)
        .await
        .unwrap();
    other
}

/// PostgreSQL: a statement waits for a lock no longer than `database.lock_timeout_secs` (here
/// 1 s): an edit of a link another transaction keeps locked answers 503 (to be tried again) and
/// changes nothing, and goes through once the lock is given back.
async fn a_lock_held_past_the_lock_timeout_answers_503(app: TestApp) {
    use sqlx::Executor;
    let (app, restarted) = app.restart_with(&[("AUTHLINK_DATABASE__LOCK_TIMEOUT_SECS", "1")]).await;
    let wid = app.workspace("Stuck");
    let key = app.workspace_key(&wid);
    let (id, _) = app.link(&wid, "Client");
    let mut other = link_locked_elsewhere(&app, &id).await;
    let refused = app
        .api(reqwest::Method::PATCH, &format!("/links/{id}"), &key)
        .json(&json!({"label": "Renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["retry-after"], "5", "a client knows when to try again");
    let refused = crate::helpers::expect_json(refused, 503).await;
    assert_eq!(refused["code"], "database_unavailable", "{refused}");
    assert_eq!(app.api_get(&format!("/links/{id}"), &key, 200).await["label"], "Client");
    other.execute("ROLLBACK").await.unwrap();
    let edited = app.api_patch(&format!("/links/{id}"), &key, json!({"label": "Renamed"}), 200).await;
    assert_eq!(edited["label"], "Renamed");
    restarted.run().await;
}

/// PostgreSQL: an edit of a link's label made while another transaction revokes it waits for
/// that transaction and applies to the revoked link: the revocation is not undone.
async fn link_edit_waits_for_a_revocation_and_keeps_it(app: TestApp) {
    use sqlx::Executor;
    let schema = app.schema.clone().unwrap();
    let wid = app.workspace("Races");
    let key = app.workspace_key(&wid);
    let (id, url) = app.link(&wid, "Client");
    let mut other = link_locked_elsewhere(&app, &id).await;
    let edit = {
        let (client, path, key) = (app.client.clone(), app.url(&format!("/api/v1/links/{id}")), key.clone());
        tokio::spawn(async move {
            client
                .patch(path)
                .bearer_auth(key)
                .json(&json!({"label": "Renamed"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    assert!(
        crate::helpers::statement_waits_on_lock(&app, "%FROM links WHERE id = $1 FOR UPDATE%").await,
        "the edit waited for the other transaction"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE {schema}.links SET revoked_at = 1 WHERE id = $1")))
        .bind(&id)
        .execute(&mut other)
        .await
        .unwrap();
    other.execute("COMMIT").await.unwrap();
    assert_eq!(edit.await.unwrap(), 200);
    let link = app.api_get(&format!("/links/{id}"), &key, 200).await;
    assert_eq!(link["label"], "Renamed");
    assert_eq!(link["status"], "revoked", "{link}");
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 410);
}

async fn workspaces_crud(app: TestApp) {
    let admin = app.admin_key();
    let w = app
        .api_post(
            "/workspaces",
            &admin,
            json!({"name": "Acme Social", "branding": {"display_name": "Acme", "accent_color": "#FF5500"},
                   "allowed_redirects": ["https://acme.example/done"]}),
            201,
        )
        .await;
    assert_eq!(w["slug"], "acme-social");
    assert_eq!(w["branding"]["accent_color"], "#ff5500");
    let id = w["id"].as_str().unwrap();
    let got = app.api_get(&format!("/workspaces/{id}"), &admin, 200).await;
    assert_eq!(got["name"], "Acme Social");
    let by_slug = app.api_get("/workspaces/acme-social", &admin, 200).await;
    assert_eq!(by_slug["id"], id);
    // A default success redirect must stay within the allow-list: a new list without it is
    // refused unless the default changes in the same request.
    let path = format!("/workspaces/{id}");
    app.api_patch(&path, &admin, json!({"success_redirect": "https://acme.example/done"}), 200).await;
    let p =
        app.api_patch(&path, &admin, json!({"allowed_redirects": ["https://other.example/cb"]}), 422).await;
    assert_eq!(p["errors"][0]["field"], "success_redirect", "{p}");
    assert_eq!(
        app.api_get(&path, &admin, 200).await["allowed_redirects"],
        json!(["https://acme.example/done"])
    );
    let updated = app
        .api_patch(
            &format!("/workspaces/{id}"),
            &admin,
            json!({"name": "Acme Social Ltd", "allowed_redirects": [], "success_redirect": ""}),
            200,
        )
        .await;
    assert_eq!(updated["name"], "Acme Social Ltd");
    assert_eq!(updated["success_redirect"], Value::Null);
    assert_eq!(updated["allowed_redirects"], json!([]));
    // A taken slug is a validation error on `slug`.
    let dup = app.api_post("/workspaces", &admin, json!({"name": "Other", "slug": "acme-social"}), 422).await;
    assert_eq!(dup["errors"][0]["field"], "slug");
    let list = app.api_get("/workspaces", &admin, 200).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2 - 1);
    // A workspace key cannot create workspaces, and sees only its own.
    let wkey = app.workspace_key(id);
    let p = app.api_post("/workspaces", &wkey, json!({"name": "Sneaky"}), 403).await;
    assert_eq!(p["code"], "forbidden");
    let other = app.workspace("Other Agency");
    app.api_get(&format!("/workspaces/{other}"), &wkey, 404).await;
    let mine = app.api_get("/workspaces", &wkey, 200).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1);
    app.api_get("/workspaces/does-not-exist", &admin, 404).await;
}

async fn links_lifecycle(app: TestApp) {
    let admin = app.admin_key();
    let w = app
        .api_post(
            "/workspaces",
            &admin,
            json!({"name": "Agency", "allowed_redirects": ["https://agency.example/cb"]}),
            201,
        )
        .await;
    let wid = w["id"].as_str().unwrap();
    let key = app.workspace_key(wid);
    let link = app
        .api_post(
            "/links",
            &key,
            json!({"label": "Client One", "client_ref": "crm-42", "platforms": ["tiktok"], "expires_in": "30d",
                   "max_uses": 3, "redirect_url": "https://agency.example/cb/done"}),
            201,
        )
        .await;
    let id = link["id"].as_str().unwrap().to_string();
    let url = link["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!("{}/l/", app.base)), "{url}");
    assert_eq!(link["status"], "active");
    assert_eq!(link["platforms"], json!(["tiktok"]));
    assert_eq!(link["use_count"], 0);
    assert_eq!(link["max_uses"], 3);
    assert_eq!(link["workspace_id"], wid);
    assert!(link["expires_at"].is_string());
    assert!(link["created_by"].as_str().unwrap().starts_with("api_key:"));

    // The landing page works; the same URL again later (members can copy it again).
    let page = app.client.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let got = app.api_get(&format!("/links/{id}"), &key, 200).await;
    assert_eq!(got["url"], url);

    // Update.
    let up = app
        .api_patch(
            &format!("/links/{id}"),
            &key,
            json!({"label": "Client 1", "redirect_url": null, "expires_at": null}),
            200,
        )
        .await;
    assert_eq!(up["label"], "Client 1");
    assert!(up["redirect_url"].is_null());
    assert!(up["expires_at"].is_null());

    // Rotate: new URL, old one dead at once, same id.
    let rotated = app.api_post(&format!("/links/{id}/rotate"), &key, json!({}), 200).await;
    let new_url = rotated["url"].as_str().unwrap();
    assert_ne!(new_url, url);
    assert_eq!(rotated["id"], id.as_str());
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 404);
    assert_eq!(app.client.get(new_url).send().await.unwrap().status(), 200);

    // Revoke: dead at once (410), idempotent, cannot be rotated afterwards.
    let revoked = app.api_post(&format!("/links/{id}/revoke"), &key, json!({}), 200).await;
    assert_eq!(revoked["status"], "revoked");
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(app.client.get(new_url).send().await.unwrap().status(), 410);
    app.api_post(&format!("/links/{id}/revoke"), &key, json!({}), 200).await;
    app.api_post(&format!("/links/{id}/rotate"), &key, json!({}), 409).await;

    // Admin keys must name the workspace.
    let p = app.api_post("/links", &admin, json!({"label": "x"}), 422).await;
    assert_eq!(p["errors"][0]["field"], "workspace_id");
    let ok = app.api_post("/links", &admin, json!({"label": "x", "workspace_id": wid}), 201).await;
    assert_eq!(ok["platforms"], json!(["tiktok", "instagram"]), "default: every enabled platform");
}

async fn link_pagination_and_search(app: TestApp) {
    let admin = app.admin_key();
    let wid = app.workspace("Paging");
    for i in 0..5 {
        app.api_post(
            "/links",
            &admin,
            json!({"workspace_id": wid, "label": format!("Client {i}"), "client_ref": format!("ref-{i}")}),
            201,
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/links?workspace_id={wid}&limit=2&cursor={c}"),
            None => format!("/links?workspace_id={wid}&limit=2"),
        };
        let page = app.api_get(&path, &admin, 200).await;
        let items = page["data"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|l| l["label"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec!["Client 4", "Client 3", "Client 2", "Client 1", "Client 0"],
        "newest first, each once"
    );
    let found = app.api_get(&format!("/links?workspace_id={wid}&q=REF-3"), &admin, 200).await;
    assert_eq!(found["data"].as_array().unwrap().len(), 1);
    assert_eq!(found["data"][0]["label"], "Client 3");
    let none = app.api_get(&format!("/links?workspace_id={wid}&q=%25"), &admin, 200).await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0, "`%` is matched literally");
    // Case is ignored in every alphabet, on both databases (SQLite's LOWER() folds ASCII only).
    app.api_post(
        "/links",
        &admin,
        json!({"workspace_id": wid, "label": "Émilie Zoë [Café]*", "client_ref": "ÄRZTE-Σ"}),
        201,
    )
    .await;
    for q in ["émilie", "ÉMILIE", "zoË", "[café]", "ärzte-σ", "CAFÉ]*"] {
        let path = format!("/links?workspace_id={wid}&q={}", urlencoding(q));
        let found = app.api_get(&path, &admin, 200).await;
        let labels: Vec<&str> =
            found["data"].as_array().unwrap().iter().map(|l| l["label"].as_str().unwrap()).collect();
        assert_eq!(labels, ["Émilie Zoë [Café]*"], "{q}");
    }
    for q in ["émilie?", "**", "Emilie", "zoe"] {
        let path = format!("/links?workspace_id={wid}&q={}", urlencoding(q));
        let found = app.api_get(&path, &admin, 200).await;
        assert_eq!(found["data"].as_array().unwrap().len(), 0, "{q}: matched literally, accents kept");
    }
    // A backslash is a character like any other (PostgreSQL's LIKE escapes with it).
    app.api_post("/links", &admin, json!({"workspace_id": wid, "label": "Share C:\\dir"}), 201).await;
    for (q, expected) in [("c:\\dir", 1), ("\\", 1), ("c:dir", 0), ("clie\\nt", 0)] {
        let path = format!("/links?workspace_id={wid}&q={}", urlencoding(q));
        let found = app.api_get(&path, &admin, 200).await;
        assert_eq!(found["data"].as_array().unwrap().len(), expected, "{q}");
    }
}

fn urlencoding(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn field_error(app: &TestApp, key: &str, body: Value, field: &str) {
    let p = app.api_post("/links", key, body.clone(), 422).await;
    assert_eq!(p["code"], "validation_failed", "{body}");
    let fields: Vec<&str> =
        p["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert!(fields.contains(&field), "expected an error on {field} for {body}, got {p}");
}

async fn link_bad_input(app: TestApp) {
    let admin = app.admin_key();
    let wid = app.workspace("Strict");
    app.api_patch(
        &format!("/workspaces/{wid}"),
        &admin,
        json!({"allowed_redirects": ["https://ok.example/cb"]}),
        200,
    )
    .await;
    let key = app.workspace_key(&wid);
    // A query parameter that does not parse gets a problem document too.
    for path in ["/links?limit=abc", "/connections?status=sideways&limit=-", "/audit-events?limit=x"] {
        let res = app.api(reqwest::Method::GET, path, &key).send().await.unwrap();
        assert_eq!(res.status(), 422, "{path}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "{path}");
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["code"], "validation_failed", "{path}: {p}");
        assert_eq!(p["errors"][0]["field"], "query", "{path}: {p}");
    }
    // No answer of the API is kept by a cache: some carry secrets (here, link URLs).
    for path in ["/links", "/nonsense"] {
        let res = app.api(reqwest::Method::GET, path, &key).send().await.unwrap();
        assert_eq!(res.headers()["cache-control"], "no-store", "{path}");
    }
    // A parameter the operation does not know (a misspelt filter would otherwise list everything),
    // and a cursor that is no `next_cursor`, are refused rather than answered with a first page.
    // Every operation, whether it takes query parameters or none, refuses one it does not take.
    let some_id = "0190a6e4-0000-7000-8000-000000000000";
    for (path, field) in [
        ("/links?search=acme", "search"),
        ("/connections?platform=tiktok", "platform"),
        (&format!("/connections/{some_id}?expand=tokens") as &str, "expand"),
        (&format!("/connections/{some_id}/access-token?fresh=1") as &str, "fresh"),
        ("/api-keys?workspace=acme", "workspace"),
        (&format!("/workspaces/{wid}?include=all") as &str, "include"),
        ("/links?cursor=garbage", "cursor"),
        ("/connections?cursor=0", "cursor"),
        ("/audit-events?cursor=%27", "cursor"),
        ("/workspaces?cursor=zzz", "cursor"),
    ] {
        let p = app.api_get(path, &key, 422).await;
        assert_eq!(p["errors"][0]["field"], field, "{path}: {p}");
    }
    let p = app.api_post(&format!("/links/{some_id}/revoke?force=1"), &key, json!({}), 422).await;
    assert_eq!(p["errors"][0]["field"], "force", "{p}");
    // Without a valid key, the answer is still 401, whatever the query.
    let res = app.client.get(app.url("/api/v1/links?search=acme")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    field_error(&app, &key, json!({"label": ""}), "label").await;
    field_error(&app, &key, json!({"label": "   "}), "label").await;
    field_error(&app, &key, json!({"label": "x".repeat(10_000)}), "label").await;
    field_error(&app, &key, json!({"label": "a", "redirect_url": "not a url"}), "redirect_url").await;
    field_error(&app, &key, json!({"label": "a", "redirect_url": "https://evil.example/cb"}), "redirect_url")
        .await;
    field_error(&app, &key, json!({"label": "a", "redirect_url": "https://ok.example/cbx"}), "redirect_url")
        .await;
    field_error(&app, &key, json!({"label": "a", "redirect_url": "javascript:alert(1)"}), "redirect_url")
        .await;
    field_error(&app, &key, json!({"label": "a", "max_uses": 0}), "max_uses").await;
    field_error(&app, &key, json!({"label": "a", "max_uses": -5}), "max_uses").await;
    field_error(&app, &key, json!({"label": "a", "expires_in": "soon"}), "expires_in").await;
    field_error(&app, &key, json!({"label": "a", "expires_at": "2001-01-01T00:00:00Z"}), "expires_at").await;
    field_error(&app, &key, json!({"label": "a", "expires_at": "2999-01-01T00:00:00Z"}), "expires_at").await;
    field_error(&app, &key, json!({"label": "a", "expires_in": "3651d"}), "expires_in").await;
    field_error(&app, &key, json!({"label": "a", "platforms": ["myspace"]}), "platforms").await;
    field_error(&app, &key, json!({"label": "a", "platforms": []}), "platforms").await;
    field_error(&app, &admin, json!({"label": "a", "workspace_id": "nope"}), "workspace_id").await;
    // Several errors at once are all reported.
    let p = app.api_post("/links", &key, json!({"label": "", "max_uses": 0}), 422).await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 2);
    // Unknown fields are refused rather than ignored.
    let p = app.api_post("/links", &key, json!({"label": "a", "labl": "typo"}), 422).await;
    assert_eq!(p["code"], "validation_failed");
    // Nothing was created by any of these.
    let list = app.api_get("/links", &key, 200).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    // Updates validate too.
    let ok = app.api_post("/links", &key, json!({"label": "fine"}), 201).await;
    let id = ok["id"].as_str().unwrap();
    app.api_patch(&format!("/links/{id}"), &key, json!({"label": ""}), 422).await;
    app.api_patch(&format!("/links/{id}"), &key, json!({"redirect_url": "https://evil.example/"}), 422).await;
    let path = format!("/links/{id}");
    for (body, field) in [
        (json!({"expires_at": "2999-01-01T00:00:00Z"}), "expires_at"),
        (json!({"expires_in": "soon"}), "expires_in"),
        (json!({"expires_in": "1d", "expires_at": "2030-01-01T00:00:00Z"}), "expires_in"),
        (json!({"expires_in": "1d", "expires_at": null}), "expires_in"),
    ] {
        let p = app.api_patch(&path, &key, body.clone(), 422).await;
        assert_eq!(p["errors"][0]["field"], field, "{body}: {p}");
    }
    // A lifetime, as at creation; then no expiry.
    let dated = app.api_patch(&path, &key, json!({"expires_in": "2d"}), 200).await;
    let at = time::OffsetDateTime::parse(
        dated["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = at - time::OffsetDateTime::now_utc();
    assert!(left > time::Duration::hours(47) && left <= time::Duration::hours(48), "{dated}");
    assert_eq!(app.api_patch(&path, &key, json!({"expires_at": null}), 200).await["expires_at"], Value::Null);
    app.api_get("/links/not-an-id", &key, 404).await;
    app.api_get("/links/0190a000-0000-7000-8000-000000000000", &key, 404).await;
}

async fn request_bad_input(app: TestApp) {
    let admin = app.admin_key();
    let wid = app.workspace("Requests");
    let key = app.workspace_key(&wid);
    // No key, malformed key, unknown key, wrong scheme.
    let res = app.client.get(app.url("/api/v1/links")).send().await.unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    expect_json(res, 401).await;
    for bad in ["garbage", "alk_123", &format!("{}x", key), &key.replace(&key[20..30], "AAAAAAAAAA")] {
        app.api_get("/links", bad, 401).await;
    }
    let res = app
        .client
        .get(app.url("/api/v1/links"))
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    expect_json(res, 401).await;
    // Wrong content type: 415.
    let res = app
        .api(Method::POST, "/links", &key)
        .header("content-type", "text/plain")
        .body("{\"label\":\"x\"}")
        .send()
        .await
        .unwrap();
    let p = expect_json(res, 415).await;
    assert_eq!(p["code"], "unsupported_media_type");
    // Malformed JSON: 400.
    let res = app
        .api(Method::POST, "/links", &key)
        .header("content-type", "application/json")
        .body("{\"label\":")
        .send()
        .await
        .unwrap();
    expect_json(res, 400).await;
    // Oversized body: 413.
    // Just over the 64 KiB limit: small enough for the socket buffers to take the whole body
    // before the server answers and closes, so the client reads the answer instead of a
    // broken pipe.
    let big = json!({"label": "x".repeat(80_000)});
    let res = app.api(Method::POST, "/links", &key).json(&big).send().await.unwrap();
    let p = expect_json(res, 413).await;
    assert_eq!(p["code"], "payload_too_large");
    // Unknown API route: a problem document too.
    app.api_get("/nope", &admin, 404).await;
}

/// Text PostgreSQL cannot store (a NUL character) and page sizes out of range are refused with
/// the right status, on every backend, instead of reaching the database (a 500 on PostgreSQL).
async fn nul_and_out_of_range_input_is_refused(app: TestApp) {
    let admin = app.admin_key();
    let wid = app.workspace("Nul");
    let key = app.workspace_key(&wid);
    // In a query: 422 naming the parameter.
    for path in [
        "/connections?cursor=a%00b",
        "/audit-events?action=%00",
        "/links?q=x%00",
        "/webhooks?workspace_id=%00",
    ] {
        let p = app.api_get(path, &key, 422).await;
        assert_eq!(p["code"], "validation_failed", "{path}: {p}");
        assert!(p["errors"][0]["message"].as_str().unwrap().contains("control"), "{path}: {p}");
    }
    // A workspace named by a text that is neither an id nor a slug is not looked up.
    app.api_get("/workspaces/a%00b", &admin, 404).await;
    for (path, body) in [
        ("/links", json!({"label": "x", "workspace_id": "a\u{0}b"})),
        ("/api-keys", json!({"workspace_id": "a\u{0}"})),
        ("/webhooks", json!({"url": "https://example.com/", "workspace_id": "a\u{0}"})),
    ] {
        let p = app.api_post(path, &admin, body, 422).await;
        assert_eq!(p["errors"][0]["field"], "workspace_id", "{path}: {p}");
    }
    // Page sizes: 1 to 200; anything else is refused, not silently changed.
    for limit in ["0", "201", "-1"] {
        let p = app.api_get(&format!("/links?limit={limit}"), &key, 422).await;
        assert_eq!(p["errors"][0]["field"], "limit", "{limit}: {p}");
    }
    assert_eq!(app.api_get("/links?limit=200", &key, 200).await["data"].as_array().unwrap().len(), 0);
    // An empty filter value is refused like any other value outside its list.
    for (path, field) in [("/connections?status=", "status"), ("/connections?provider=", "provider")] {
        assert_eq!(app.api_get(path, &key, 422).await["errors"][0]["field"], field, "{path}");
    }
    // The dashboard: the sign-in form and any address with a NUL get 400, not a database error.
    let login = app.client.get(app.url("/app/login")).send().await.unwrap().text().await.unwrap();
    let csrf = login.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap();
    let res = app
        .client
        .post(app.url("/app/login"))
        .form(&[("csrf", csrf), ("email", "a\u{0}@example.com"), ("password", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app.client.get(app.url("/app/login?next=%00")).send().await.unwrap();
    assert_eq!(res.status(), 400);
    app.logs_caught_up().await;
    let logs = app.log_text();
    assert!(!logs.contains("internal error"), "{logs}");
}

/// A new workspace, a key of it, and a webhook endpoint of it pointing at a new receiver:
/// (workspace id, key, receiver, endpoint id).
async fn hooked_workspace(app: &TestApp, name: &str) -> (String, String, crate::health::Receiver, String) {
    let wid = app.workspace(name);
    let key = app.workspace_key(&wid);
    let receiver = crate::health::Receiver::start().await;
    let endpoint = app.api_post("/webhooks", &key, json!({"url": receiver.url}), 201).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (wid, key, receiver, endpoint)
}

/// A removed webhook endpoint is gone from the API: not listed, not readable, not editable, and
/// its deliveries cannot be sent again; only its delivery log stays readable (API and CLI).
async fn removed_webhook_endpoint_is_gone(app: TestApp) {
    let (_, key, receiver, id) = hooked_workspace(&app, "Hooks").await;
    let test = app.api_post(&format!("/webhooks/{id}/test"), &key, json!({}), 202).await;
    assert!(test["event_id"].is_string());
    receiver.wait_for(1, 20).await;
    let deliveries = app.api_get(&format!("/webhooks/{id}/deliveries"), &key, 200).await;
    let delivery = deliveries["data"][0]["id"].as_str().unwrap().to_string();
    let res = app.api(Method::DELETE, &format!("/webhooks/{id}"), &key).send().await.unwrap();
    expect_json(res, 200).await;
    app.api_get(&format!("/webhooks/{id}"), &key, 404).await;
    let log = app.api_get(&format!("/webhooks/{id}/deliveries"), &key, 200).await;
    // (The delivery's outcome may be recorded after the receiver got it: compare what stays.)
    let ids = |v: &Value| -> Vec<(Value, Value)> {
        v["data"].as_array().unwrap().iter().map(|d| (d["id"].clone(), d["event_id"].clone())).collect()
    };
    assert_eq!(ids(&log), ids(&deliveries), "the same deliveries: {log}");
    let listed = app.cli_json(&["webhook", "deliveries", &id]);
    assert_eq!(listed[0]["id"], delivery.as_str(), "{listed}");
    let out = app.cli(&["webhook", "deliveries", &id]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&delivery));
    // Another workspace's key still sees nothing of it.
    let other = app.workspace_key(&app.workspace("Others"));
    app.api_get(&format!("/webhooks/{id}/deliveries"), &other, 404).await;
    assert_eq!(app.api_get("/webhooks", &key, 200).await.as_array().unwrap().len(), 0);
    app.api_patch(&format!("/webhooks/{id}"), &key, json!({"enabled": true}), 404).await;
    app.api_post(&format!("/webhooks/{id}/rotate-secret"), &key, json!({}), 404).await;
    app.api_post(&format!("/webhook-deliveries/{delivery}/redeliver"), &key, json!({}), 404).await;
    let res = app.api(Method::DELETE, &format!("/webhooks/{id}"), &key).send().await.unwrap();
    expect_json(res, 404).await;
    // The row stays for the delivery log's sake, disabled for good.
    assert_eq!(app.count("webhook_endpoints").await, 1);
}

/// Each API key has its own budget of requests (a minute's worth at once, then the rate); past
/// it, 429 with `Retry-After` as a problem document, other keys unaffected. Requests without a
/// valid key are limited per address, and once refused are not checked against the database.
async fn requests_are_limited_per_key_and_address(app: TestApp) {
    let (app, cleanup) = app
        .restart_with(&[
            ("AUTHLINK_HTTP__API_REQUESTS_PER_MINUTE", "30"),
            ("AUTHLINK_HTTP__LINK_REQUESTS_PER_MINUTE", "12"),
        ])
        .await;
    let wid = app.workspace("Limits");
    let (one, two) = (app.workspace_key(&wid), app.workspace_key(&wid));
    // How many more a bucket refilled at `per_second` may have let through since `since` (the
    // bounds below allow for a slow, loaded run without depending on its speed).
    let refilled = |since: std::time::Instant, per_second: f64| {
        (since.elapsed().as_secs_f64() * per_second).ceil() as usize
    };
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(app.api(Method::GET, "/links", &one).send().await.unwrap().status().as_u16());
    }
    // A minute's worth at once (30), then one every two seconds.
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok >= 30 && ok <= 30 + refilled(started, 0.5), "{statuses:?}");
    assert!(statuses[..30].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    let limited = loop {
        let res = app.api(Method::GET, "/links", &one).send().await.unwrap();
        if res.status() == 429 {
            break res;
        }
        assert!(started.elapsed().as_secs() < 60, "never limited again");
    };
    let wait: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    let p = expect_json(limited, 429).await;
    assert_eq!(p["code"], "rate_limited");
    // Another key has its own budget.
    app.api_get("/links", &two, 200).await;
    // Wrong keys: 401 until the address's budget (a quarter of 12 a minute, at least 10, one
    // back every five seconds) is used, then 429 for requests without a valid key; a valid key
    // from the same address still passes, on its own budget.
    let started = std::time::Instant::now();
    let mut bad = Vec::new();
    for i in 0..15 {
        let res = app.api(Method::GET, "/links", &format!("alk_{i:012}_wrong")).send().await.unwrap();
        bad.push(res.status().as_u16());
    }
    let refused = bad.iter().filter(|s| **s == 401).count();
    assert!(refused >= 10 && refused <= 10 + refilled(started, 0.2), "{bad:?}");
    assert!(bad[10..].iter().all(|s| *s == 401 || *s == 429) && bad.contains(&429), "{bad:?}");
    let res = app.api(Method::GET, "/links", &format!("alk_{:012}_wrong", 99)).send().await.unwrap();
    assert_eq!(res.status(), 429, "a wrong key from the refused address");
    assert!(res.headers().contains_key("retry-after"));
    let res = app.api(Method::GET, "/links", "").send().await.unwrap();
    assert_eq!(res.status(), 429, "no key from the refused address");
    app.api_get("/links", &two, 200).await;
    cleanup.run().await;
}

async fn api_keys_lifecycle(app: TestApp) {
    let admin = app.admin_key();
    let wid = app.workspace("Keys");
    let created = app.api_post("/api-keys", &admin, json!({"workspace_id": wid, "name": "ci"}), 201).await;
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(created["admin"], false);
    // The key works, is listed without its secret, and shows its last use.
    app.api_get("/links", &secret, 200).await;
    let list = app.api_get("/api-keys", &secret, 200).await;
    let listed = list.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].get("secret").is_none());
    assert!(!list.to_string().contains(&secret));
    assert!(listed[0]["last_used_at"].is_string());
    // A workspace key cannot mint admin keys, can mint keys for its own workspace only.
    app.api_post("/api-keys", &secret, json!({"admin": true}), 403).await;
    let other = app.workspace("Elsewhere");
    app.api_post("/api-keys", &secret, json!({"workspace_id": other}), 422).await;
    let second = app.api_post("/api-keys", &secret, json!({"name": "second"}), 201).await;
    assert_eq!(second["workspace_id"], wid.as_str());
    // Admin keys via the API.
    let a2 = app.api_post("/api-keys", &admin, json!({"admin": true, "name": "support"}), 201).await;
    assert_eq!(a2["admin"], true);
    // Revoke: 401 from then on.
    let id = created["id"].as_str().unwrap();
    let second_secret = second["secret"].as_str().unwrap();
    app.api_post(&format!("/api-keys/{id}/revoke"), second_secret, json!({}), 200).await;
    let p = app.api_get("/links", &secret, 401).await;
    assert_eq!(p["code"], "unauthorized");
    // A workspace key cannot see or revoke the admin key.
    let admin_id = a2["id"].as_str().unwrap();
    app.api_post(&format!("/api-keys/{admin_id}/revoke"), second_secret, json!({}), 404).await;
    // An admin key lists one workspace's keys with `workspace_id` (id or slug), every key
    // without; a workspace key may name its own workspace only.
    let ids = |list: &Value| -> Vec<String> {
        list.as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_string()).collect()
    };
    let of_keys = app.api_get(&format!("/api-keys?workspace_id={wid}"), &admin, 200).await;
    assert_eq!(ids(&of_keys), [id.to_string(), second["id"].as_str().unwrap().to_string()]);
    assert_eq!(ids(&app.api_get("/api-keys?workspace_id=keys", &admin, 200).await), ids(&of_keys));
    assert!(ids(&app.api_get("/api-keys", &admin, 200).await).contains(&admin_id.to_string()));
    app.api_get(&format!("/api-keys?workspace_id={other}"), second_secret, 404).await;
    assert_eq!(app.api_get(&format!("/api-keys?workspace_id={wid}"), second_secret, 200).await, of_keys);
}

/// A workspace holds at most 50 active API keys and 20 webhook endpoints (every event goes to
/// each endpoint): 409 beyond, until one is revoked or removed.
async fn active_keys_and_endpoints_are_bounded(app: TestApp) {
    let admin = app.admin_key();
    let wid = app.workspace("Bounded");
    let mut ids = Vec::new();
    for i in 0..50 {
        let k = app
            .api_post("/api-keys", &admin, json!({"workspace_id": wid, "name": format!("k{i}")}), 201)
            .await;
        ids.push(k["id"].as_str().unwrap().to_string());
    }
    let p = app.api_post("/api-keys", &admin, json!({"workspace_id": wid}), 409).await;
    assert!(p["detail"].as_str().unwrap().contains("at most 50"), "{p}");
    // Another workspace has its own count.
    let other = app.workspace("Other");
    app.api_post("/api-keys", &admin, json!({"workspace_id": other}), 201).await;
    app.api_post(&format!("/api-keys/{}/revoke", ids[0]), &admin, json!({}), 200).await;
    app.api_post("/api-keys", &admin, json!({"workspace_id": wid}), 201).await;

    let receiver = crate::health::Receiver::start().await;
    let key = app.workspace_key(&other);
    let mut endpoints = Vec::new();
    for i in 0..20 {
        let url = format!("{}/{i}", receiver.url);
        endpoints.push(
            app.api_post("/webhooks", &key, json!({"url": url}), 201).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let p = app.api_post("/webhooks", &key, json!({"url": receiver.url}), 409).await;
    assert!(p["detail"].as_str().unwrap().contains("at most 20"), "{p}");
    let res =
        app.api(reqwest::Method::DELETE, &format!("/webhooks/{}", endpoints[0]), &key).send().await.unwrap();
    assert_eq!(res.status(), 200);
    app.api_post("/webhooks", &key, json!({"url": receiver.url}), 201).await;
}

async fn tenant_isolation(app: TestApp) {
    let a = app.workspace("Tenant A");
    let b = app.workspace("Tenant B");
    let key_a = app.workspace_key(&a);
    let key_b = app.workspace_key(&b);
    let (link_b, url_b) = app.link(&b, "B's client");
    // A cannot read, list, change, revoke or rotate B's link: it does not exist for A.
    app.api_get(&format!("/links/{link_b}"), &key_a, 404).await;
    app.api_patch(&format!("/links/{link_b}"), &key_a, json!({"label": "pwned"}), 404).await;
    app.api_post(&format!("/links/{link_b}/revoke"), &key_a, json!({}), 404).await;
    app.api_post(&format!("/links/{link_b}/rotate"), &key_a, json!({}), 404).await;
    app.api_get(&format!("/links?workspace_id={b}"), &key_a, 404).await;
    let own = app.api_get("/links", &key_a, 200).await;
    assert_eq!(own["data"].as_array().unwrap().len(), 0);
    app.api_post("/links", &key_a, json!({"label": "x", "workspace_id": b}), 422).await;
    app.api_patch(&format!("/workspaces/{b}"), &key_a, json!({"name": "pwned"}), 404).await;
    let audit = app.api_get("/audit-events", &key_a, 200).await;
    let events = audit["data"].as_array().unwrap();
    // A's own events (its creation, its key's) are listed, and none of B's.
    assert!(!events.is_empty(), "A's own events are listed: {audit}");
    assert!(events.iter().all(|e| e["workspace_id"] == a.as_str()), "{audit}");
    app.api_get(&format!("/audit-events?workspace_id={b}"), &key_a, 404).await;
    // A's own workspace may be named by its slug in a filter, as everywhere else; B's may not.
    let slug_a =
        app.api_get(&format!("/workspaces/{a}"), &key_a, 200).await["slug"].as_str().unwrap().to_string();
    let slug_b =
        app.api_get(&format!("/workspaces/{b}"), &key_b, 200).await["slug"].as_str().unwrap().to_string();
    for listing in ["links", "connections", "audit-events"] {
        app.api_get(&format!("/{listing}?workspace_id={slug_a}"), &key_a, 200).await;
        app.api_get(&format!("/{listing}?workspace_id={slug_b}"), &key_a, 404).await;
    }
    // B's link is untouched.
    let still = app.api_get(&format!("/links/{link_b}"), &key_b, 200).await;
    assert_eq!(still["label"], "B's client");
    assert_eq!(still["url"], url_b);
    assert_eq!(still["status"], "active");
}

async fn audit_log_lists_changes(app: TestApp) {
    let wid = app.workspace("Audited");
    let key = app.workspace_key(&wid);
    let link = app.api_post("/links", &key, json!({"label": "audited"}), 201).await;
    let id = link["id"].as_str().unwrap();
    app.api_post(&format!("/links/{id}/rotate"), &key, json!({}), 200).await;
    app.api_post(&format!("/links/{id}/revoke"), &key, json!({}), 200).await;
    let log = app.api_get(&format!("/audit-events?target_id={id}"), &key, 200).await;
    let actions: Vec<&str> =
        log["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, vec!["link.revoked", "link.rotated", "link.created"]);
    let entry = &log["data"][0];
    assert_eq!(entry["actor_kind"], "api_key");
    assert!(entry["actor_id"].is_string());
    assert_eq!(entry["target_kind"], "link");
    let only = app.api_get("/audit-events?action=link.rotated", &key, 200).await;
    assert_eq!(only["data"].as_array().unwrap().len(), 1);
    // CLI changes are audited with the CLI as actor.
    let cli_entries = app.cli_json(&["audit", "list", "--workspace", &wid]);
    assert!(
        cli_entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "workspace.created" && e["actor_kind"] == "cli")
    );
    // The audit log never holds the link's token.
    let token = token_of(link["url"].as_str().unwrap());
    assert!(!log.to_string().contains(&token));
}

async fn openapi_matches_routes(app: TestApp) {
    let res = app.client.get(app.url("/api/v1/openapi.json")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    // Every route the API serves is documented ...
    let expected = [
        ("/workspaces", "get"),
        ("/workspaces", "post"),
        ("/workspaces/{id}", "get"),
        ("/workspaces/{id}", "patch"),
        ("/links", "get"),
        ("/links", "post"),
        ("/links/{id}", "get"),
        ("/links/{id}", "patch"),
        ("/links/{id}/revoke", "post"),
        ("/links/{id}/rotate", "post"),
        ("/links/{id}/attempts", "get"),
        ("/api-keys", "get"),
        ("/api-keys", "post"),
        ("/api-keys/{id}/revoke", "post"),
        ("/audit-events", "get"),
        ("/connections", "get"),
        ("/connections/{id}", "get"),
        ("/connections/{id}/disconnect", "post"),
        ("/connections/{id}/access-token", "get"),
        ("/connections/{id}/refresh", "post"),
        ("/connections/{id}/check", "post"),
        ("/webhooks", "get"),
        ("/webhooks", "post"),
        ("/webhooks/{id}", "get"),
        ("/webhooks/{id}", "patch"),
        ("/webhooks/{id}", "delete"),
        ("/webhooks/{id}/rotate-secret", "post"),
        ("/webhooks/{id}/test", "post"),
        ("/webhooks/{id}/deliveries", "get"),
        ("/webhook-deliveries/{id}/redeliver", "post"),
    ];
    for (path, method) in expected {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} is not documented");
    }
    // ... and every documented operation is served (401 without a key, never 404 or 405).
    let mut operations = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", "0190a000-0000-7000-8000-000000000000");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let res = app.client.request(m, app.url(&format!("/api/v1{concrete}"))).send().await.unwrap();
            assert_eq!(res.status(), 401, "{method} {path} is documented but not served as documented");
            // Every operation may answer 500 (a bug, a value it cannot open), with a problem.
            let internal = &item[method]["responses"]["500"]["content"]["application/problem+json"];
            assert!(internal.is_object(), "{method} {path} does not document 500");
            operations += 1;
        }
    }
    assert_eq!(operations, expected.len(), "documented operations and served routes differ");
    // Schemas are named by their type's name: two types of one name would leave one of them
    // described as the other. A link's connect attempts and a delivery's attempts are two.
    let schemas = &doc["components"]["schemas"];
    assert!(
        schemas["ConnectAttempt"]["properties"]["reference"].is_object(),
        "{}",
        schemas["ConnectAttempt"]
    );
    assert!(schemas["AttemptView"]["properties"]["at"].is_object(), "{}", schemas["AttemptView"]);
    // The CLI prints the same document.
    let out = app.cli(&["openapi"]);
    let cli_doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli_doc["paths"], doc["paths"]);
    // A reader that stops early (`authlink openapi | head`) is no error: the document is larger
    // than a pipe holds, so the CLI is still writing when the reader goes.
    assert!(out.stdout.len() > 1 << 17, "{}", out.stdout.len());
    let mut child = std::process::Command::new(crate::helpers::binary())
        .arg("openapi")
        .current_dir(app.dir.path())
        .env_remove("AUTHLINK_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut head).unwrap();
    drop(child.stdout.take());
    let stopped = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(stopped.status.success() && stderr.is_empty(), "{:?}: {stderr}", stopped.status);
}

async fn health_probes(app: TestApp) {
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ready");
}

async fn secrets_are_not_stored_or_logged(app: TestApp) {
    let wid = app.workspace("Secrets");
    let key = app.workspace_key(&wid);
    let link = app.api_post("/links", &key, json!({"label": "secret client"}), 201).await;
    let url = link["url"].as_str().unwrap();
    let token = token_of(url);
    let id = link["id"].as_str().unwrap();
    // Use the link and the key the way clients and agencies do.
    assert_eq!(app.client.get(url).send().await.unwrap().status(), 200);
    let rotated = app.api_post(&format!("/links/{id}/rotate"), &key, json!({}), 200).await;
    let new_token = token_of(rotated["url"].as_str().unwrap());
    assert_eq!(app.client.get(rotated["url"].as_str().unwrap()).send().await.unwrap().status(), 200);
    let admin = app.admin_key();
    app.api_get("/workspaces", &admin, 200).await;
    // Make sure the server has flushed its log lines for these requests.
    app.client.get(app.url("/healthz")).send().await.unwrap();
    for (what, secret) in [
        ("link token", &token),
        ("rotated link token", &new_token),
        ("API key", &key),
        ("admin API key", &admin),
    ] {
        assert_nowhere(&app, what, secret).await;
    }
    // The token is stored as its SHA-256.
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(new_token.as_bytes()));
    assert!(app.database_dump().await.contains(&hash));
    // And link paths are logged redacted.
    app.wait_for_log("/l/[redacted]", 10).await;
}

/// PostgreSQL ends every connection of the server's pool (as a restart or a failover does): the
/// next requests, reads and writes, go through on new connections instead of failing on each
/// dead one.
async fn writes_go_on_when_the_database_ends_every_connection(app: TestApp) {
    use sqlx::Connection;
    let crate::helpers::Backend::Postgres(url) = &app.backend else { return };
    let wid = app.workspace("Ended");
    let key = app.workspace_key(&wid);
    // Several connections in the pool: requests at once.
    let reads: Vec<_> = (0..6).map(|_| app.api(Method::GET, "/links", &key).send()).collect();
    for res in futures::future::join_all(reads).await {
        assert_eq!(res.unwrap().status(), 200);
    }
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    let (ended,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1) AS t",
    )
    .bind(app.schema.as_deref().unwrap())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended >= 2, "the pool held {ended} connections");
    // (As after any restart, the dead connections have been idle a while by the next request.)
    tokio::time::sleep(authlink::db::PING_AFTER_IDLE + std::time::Duration::from_millis(50)).await;
    for round in 0..3 {
        app.api_post("/links", &key, json!({"label": format!("after {round}")}), 201).await;
    }
    assert_eq!(app.count("links").await, 3);
}

async fn database_lost_gives_503_and_recovers(app: TestApp) {
    // A second server reaches PostgreSQL through a proxy that the test can cut. The first one
    // runs no background jobs, so the second is the only worker.
    let crate::helpers::Backend::Postgres(_) = &app.backend else { return };
    let (app, first) = app.restart_with(&[("AUTHLINK_JOBS__ENABLED", "false")]).await;
    let upstream = url::Url::parse(&app.db_url).unwrap();
    let target = format!("{}:{}", upstream.host_str().unwrap(), upstream.port().unwrap_or(5432));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            let target = target.clone();
            let mut cut = cut_rx.clone();
            if *cut.borrow() {
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.wait_for(|c| *c) => {}
                }
            });
        }
    });
    let mut proxied = upstream.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(proxy_port)).unwrap();
    let (wid, key, receiver, endpoint) = hooked_workspace(&app, "Outage").await;
    let second = TestApp::spawn_with(
        app.backend.clone(),
        &[
            ("AUTHLINK_DATABASE_URL", proxied.as_str()),
            ("AUTHLINK_MASTER_KEY", &app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1),
            ("AUTHLINK_DATABASE__ACQUIRE_TIMEOUT_SECS", "2"),
        ],
    )
    .await;
    let cleanup = second.cleanup_handle();
    second.api_get("/links", &key, 200).await;
    let css = second.client.get(second.url(&format!("/brand/{wid}.css"))).send().await.unwrap();
    assert_eq!(css.status(), 200);
    // A client at the provider when the database goes: the callback still sends the browser to a
    // clean URL (the code and state out of the address bar), whose page says to try again.
    let (_, link_url) = second.link(&wid, "Client");
    let browser = crate::connect::new_browser();
    let account = authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id;
    let flow =
        crate::connect::start_and_consent(&browser, &second, &link_url, "tiktok", account, "allow", None)
            .await;
    let test_event = |server: &TestApp| {
        let res =
            server.api(Method::POST, &format!("/webhooks/{endpoint}/test"), &key).json(&json!({})).send();
        async move { expect_json(res.await.unwrap(), 202).await["event_id"].as_str().unwrap().to_string() }
    };
    let ready = |server: &TestApp| {
        let res = server.client.get(server.url("/readyz")).send();
        async move { res.await.unwrap().status().as_u16() }
    };
    let mut events = Vec::new();
    let mut recoveries = Vec::new();
    const OUTAGES: usize = 5;
    for round in 0..OUTAGES {
        // Queued just before the outage: delivered before it or after it, never lost.
        events.push(test_event(&second).await);
        cut_tx.send(true).unwrap();
        let p = expect_json(second.api(Method::GET, "/links", &key).send().await.unwrap(), 503).await;
        assert_eq!(p["code"], "database_unavailable");
        let res =
            second.api(Method::POST, "/links", &key).json(&json!({"label": "during"})).send().await.unwrap();
        assert_eq!(expect_json(res, 503).await["code"], "database_unavailable");
        assert_eq!(ready(&second).await, 503);
        if round == 0 {
            // The brand stylesheet: not a 404 (cached as "no colours"), and not kept.
            let css = second.client.get(second.url(&format!("/brand/{wid}.css"))).send().await.unwrap();
            assert_eq!(css.status(), 503);
            assert_eq!(css.headers()["cache-control"], "no-store");
            let res = browser.get(flow.callback.split('#').next().unwrap()).send().await.unwrap();
            assert_eq!(res.status(), 303);
            let to = res.headers()["location"].to_str().unwrap().to_string();
            assert!(to.starts_with("/oauth/tiktok/failed?reason=unavailable"), "{to}");
            let page = browser.get(second.url(&to)).send().await.unwrap();
            assert_eq!(page.status(), 503);
            assert_eq!(page.headers()["retry-after"], "60");
        }
        // The database comes back: the same process serves again, without a restart.
        cut_tx.send(false).unwrap();
        let back = std::time::Instant::now();
        crate::health::eventually("readiness after the outage", 10, || async {
            (ready(&second).await == 200).then_some(Value::Null)
        })
        .await;
        recoveries.push(back.elapsed());
        second.api_post("/links", &key, json!({"label": format!("after outage {round}")}), 201).await;
        // The worker runs again: an event queued now is delivered too.
        events.push(test_event(&second).await);
        receiver.wait_for(events.len(), 20).await;
    }
    let delivered: std::collections::HashSet<String> =
        receiver.got.lock().unwrap().iter().map(|r| r.headers["webhook-id"].clone()).collect();
    for event in &events {
        assert!(delivered.contains(event), "event {event} was delivered");
    }
    // Nothing was written during the outages: the links are the client's and those made after them.
    assert_eq!(app.count("links").await, OUTAGES as i64 + 1);
    assert_eq!(app.count("connections").await, 0);
    eprintln!("recovered from {OUTAGES} database outages in {recoveries:?}");
    cleanup.run().await;
    first.run().await;
}
