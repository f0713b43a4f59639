//! The command line: every command, its JSON output, and bad values.

use std::process::Output;

use serde_json::Value;

use crate::connect::connect;
use crate::helpers::{Backend, TestApp, binary, new_master_key};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    tests![
        workspace_commands,
        link_commands,
        apikey_commands,
        link_command_bad_values,
        json_errors_under_json,
        config_check_and_bad_config,
        migrate_and_unreachable_database,
        wrong_master_key_is_refused,
        backup_and_restore,
        keygen_prints_or_writes_a_key,
        graceful_shutdown_finishes_requests,
        shutdown_stops_requests_at_the_end_of_the_grace_period,
    ]
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Asserts a failure with a one-line error mentioning `needle`.
fn assert_fails(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got: {}", stdout(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(needle), "error should mention {needle}: {err}");
}

async fn workspace_commands(app: TestApp) {
    let w = app.cli_json(&[
        "workspace",
        "create",
        "--name",
        "Brightside Media",
        "--accent-color",
        "#123456",
        "--allow-redirect",
        "https://brightside.example/done",
    ]);
    assert_eq!(w["slug"], "brightside-media");
    assert_eq!(w["allowed_redirects"][0], "https://brightside.example/done");
    let id = w["id"].as_str().unwrap();
    let human = app.cli(&["workspace", "show", "brightside-media"]);
    assert!(human.status.success());
    assert!(stdout(&human).contains(id));
    let shown = app.cli_json(&["workspace", "show", id]);
    assert_eq!(shown["name"], "Brightside Media");
    let list = app.cli_json(&["workspace", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(stdout(&app.cli(&["workspace", "list"])).contains("brightside-media"));
    assert_fails(&app.cli(&["workspace", "show", "nope"]), "not found");
    assert_fails(&app.cli(&["workspace", "create", "--name", ""]), "--name");
    // A value that does not pass validation is a usage mistake: exit 2, like an unknown flag.
    assert_eq!(app.cli(&["workspace", "create", "--name", ""]).status.code(), Some(2));
    assert_fails(&app.cli(&["workspace", "create", "--name", "X", "--slug", "Bad Slug"]), "--slug");
    assert_fails(
        &app.cli(&["workspace", "create", "--name", "Dup", "--slug", "brightside-media"]),
        "already taken",
    );
    assert_fails(&app.cli(&["workspace", "create", "--name", "X", "--accent-color", "red"]), "accent");
}

async fn link_commands(app: TestApp) {
    let wid = app.cli_json(&[
        "workspace",
        "create",
        "--name",
        "Links Inc",
        "--allow-redirect",
        "https://links.example/ok",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Plain output is the URL alone.
    let out = app.cli(&["link", "create", "--workspace", "links-inc", "--label", "Plain"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let url = stdout(&out).trim().to_string();
    assert!(url.starts_with(&format!("{}/l/", app.base)) && !url.contains(' '), "{url}");
    let created = app.cli_json(&[
        "link",
        "create",
        "--workspace",
        &wid,
        "--label",
        "Client Co",
        "--platform",
        "instagram",
        "--expires-in",
        "30d",
        "--max-uses",
        "2",
        "--redirect-url",
        "https://links.example/ok/next",
        "--client-ref",
        "CRM-7",
    ]);
    let id = created["id"].as_str().unwrap();
    assert!(created["url"].as_str().unwrap().starts_with(&app.base));
    let shown = app.cli_json(&["link", "show", id]);
    for field in [
        "id",
        "workspace_id",
        "label",
        "client_ref",
        "platforms",
        "url",
        "status",
        "expires_at",
        "max_uses",
        "redirect_url",
        "use_count",
        "last_used_at",
        "created_by",
        "created_at",
        "revoked_at",
    ] {
        assert!(shown.get(field).is_some(), "link show --json lacks {field}");
    }
    assert_eq!(shown["use_count"], 0);
    assert_eq!(shown["platforms"], serde_json::json!(["instagram"]));
    assert_eq!(shown["client_ref"], "CRM-7");
    assert_eq!(shown["created_by"], "cli");
    let list = app.cli_json(&["link", "list", "--workspace", &wid]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    // A limit out of range is refused, not quietly changed; a listing cut at its limit says so.
    for limit in ["0", "10001"] {
        let out = app.cli(&["link", "list", "--workspace", &wid, "--limit", limit]);
        assert_eq!(out.status.code(), Some(2), "--limit {limit}");
    }
    let cut = app.cli(&["link", "list", "--workspace", &wid, "--limit", "1"]);
    assert!(cut.status.success());
    assert_eq!(String::from_utf8_lossy(&cut.stdout).lines().count(), 1);
    assert!(String::from_utf8_lossy(&cut.stderr).contains("more may follow"), "{cut:?}");
    let human = stdout(&app.cli(&["link", "show", id]));
    assert!(human.contains("Client Co") && human.contains("uses: 0 of 2"), "{human}");
    assert!(human.contains("connections on the page: listed"), "{human}");
    let hidden = stdout(&app.cli(&["link", "update", id, "--hide-connections"]));
    assert!(hidden.contains("connections on the page: hidden"), "{hidden}");
    app.cli_json(&["link", "update", id, "--show-connections"]);
    // Rotate prints the new URL; the old one is dead.
    let old_url = created["url"].as_str().unwrap();
    let rotated = app.cli_json(&["link", "rotate", id]);
    let new_url = rotated["url"].as_str().unwrap();
    assert_ne!(new_url, old_url);
    assert_eq!(app.client.get(old_url).send().await.unwrap().status(), 404);
    assert_eq!(app.client.get(new_url).send().await.unwrap().status(), 200);
    let plain_rotate = app.cli(&["link", "rotate", id]);
    assert!(stdout(&plain_rotate).trim().starts_with(&format!("{}/l/", app.base)));
    // Revoke.
    let revoked = app.cli_json(&["link", "revoke", id]);
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(app.cli_json(&["link", "show", id])["status"], "revoked");
    assert_fails(&app.cli(&["link", "show", "0190a000-0000-7000-8000-000000000000"]), "not found");
    assert_fails(&app.cli(&["link", "revoke", "nope"]), "not found");
}

/// With `--json`, a failure is one JSON object on standard error, for every kind of failure,
/// with the same exit codes as without.
async fn json_errors_under_json(app: TestApp) {
    let wid = app.workspace("Json Errors");
    let error_of = |o: &Output| -> serde_json::Value {
        assert!(!o.status.success(), "{}", stdout(o));
        assert!(stdout(o).is_empty(), "nothing on standard output: {}", stdout(o));
        let err = stderr(o);
        let line = err
            .lines()
            .find(|l| l.starts_with("{\"error\""))
            .unwrap_or_else(|| panic!("no JSON error: {err}"));
        serde_json::from_str::<serde_json::Value>(line).unwrap()["error"].clone()
    };
    // A value that fails validation: exit 2, each field named.
    let o = app.cli(&["link", "create", "--workspace", &wid, "--label", "", "--max-uses", "0", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let e = error_of(&o);
    assert_eq!(e["kind"], "validation_failed", "{e}");
    let fields: Vec<&str> =
        e["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
    assert!(fields.contains(&"label") && fields.contains(&"max_uses"), "{e}");
    // Nothing by that name: exit 1.
    let o = app.cli(&["link", "list", "--workspace", "no-such-workspace", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(error_of(&o)["kind"], "not_found");
    let o = app.cli(&["connection", "show", "01a21766-7405-7266-b61f-bbc2d63cc464", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(error_of(&o)["kind"], "not_found");
    // A list filter or cursor that is no id: a validation failure naming the flag, not an empty
    // or a first page.
    for (flag, value) in [("--before", "acme"), ("--before", "0"), ("--link", "not-an-id")] {
        let o = app.cli(&["connection", "list", "--workspace", &wid, flag, value, "--json"]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}");
        let e = error_of(&o);
        assert_eq!(e["kind"], "validation_failed", "{e}");
        assert_eq!(e["fields"][0]["field"], flag.trim_start_matches("--"), "{e}");
        assert_fails(
            &app.cli(&["connection", "list", "--workspace", &wid, flag, value]),
            &format!("{flag}:"),
        );
    }
    let o = app.cli(&["connection", "list", "--workspace", &wid, "--status", "sleeping", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(error_of(&o)["fields"][0]["field"], "status");
    // A validation message names the flag as it is typed, not the API's field.
    for (args, flag) in [
        (vec!["link", "create", "--workspace", &wid, "--label", "a", "--platform", "myspace"], "--platform:"),
        (
            vec!["webhook", "add", "--workspace", &wid, "--url", "https://example.com/h", "--event", "bogus"],
            "--event:",
        ),
        (
            vec!["workspace", "create", "--name", "Flags", "--allow-redirect", "not a url"],
            "--allow-redirect:",
        ),
    ] {
        assert_fails(&app.cli(&args), flag);
    }
    // An argument that is not valid Unicode is a usage mistake like any other, reported in the
    // form asked for (it was a panic).
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"a\xfe");
    let o = app.cli(&[
        std::ffi::OsStr::new("connection"),
        std::ffi::OsStr::new("token"),
        bad,
        std::ffi::OsStr::new("--json"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(error_of(&o)["kind"], "usage");
    let o = app.cli(&[std::ffi::OsStr::new("link"), std::ffi::OsStr::new("show"), bad]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("error:") && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    // A usage mistake caught by the parser: exit 2.
    let o = app.cli(&["link", "create", "--label", "a", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let e = error_of(&o);
    assert_eq!(e["kind"], "usage");
    assert!(e["message"].as_str().unwrap().contains("--workspace"), "{e}");
    // A command without its subcommand says so, not what the command is for.
    for args in [["--json", "link"], ["link", "--json"]] {
        let o = app.cli(&args);
        assert_eq!(o.status.code(), Some(2));
        let e = error_of(&o);
        assert_eq!(e["kind"], "usage");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("subcommand") && !message.contains("Manage auth links"), "{args:?}: {e}");
    }
    // A broken configuration: exit 2.
    let o = app.cli_env(
        &["link", "list", "--workspace", &wid, "--json"],
        &[("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KYE", "x")],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = error_of(&o);
    assert_eq!(e["kind"], "configuration");
    assert!(e["message"].as_str().unwrap().contains("client_kye"), "{e}");
    // The commands that read no configuration still work with it broken: a new master key can
    // be made while the configuration is being edited for it.
    let broken = [("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KYE", "x")];
    let made = app.cli_env(&["keygen", "--json"], &broken);
    assert!(made.status.success(), "{}", stderr(&made));
    let key: Value = serde_json::from_slice(&made.stdout).unwrap();
    assert_eq!(key["master_key"].as_str().unwrap().len(), 44, "{key}");
    let spec = app.cli_env(&["openapi"], &broken);
    assert!(spec.status.success(), "{}", stderr(&spec));
    assert!(String::from_utf8_lossy(&spec.stdout).contains("\"openapi\""));
    // Without --json, the one line as before.
    assert_fails(&app.cli(&["link", "list", "--workspace", "no-such-workspace"]), "--workspace");
}

async fn link_command_bad_values(app: TestApp) {
    app.workspace("Bad Values");
    let ws = "bad-values";
    for (args, needle) in [
        (vec!["--label", ""], "--label"),
        (vec!["--label", &"x".repeat(10_000)], "--label"),
        (vec!["--label", "a", "--max-uses", "0"], "--max-uses"),
        (vec!["--label", "a", "--max-uses", "-3"], "--max-uses"),
        (vec!["--label", "a", "--expires-in", "forever"], "--expires-in"),
        (vec!["--label", "a", "--redirect-url", "not a url"], "--redirect-url"),
        (vec!["--label", "a", "--redirect-url", "https://evil.example/"], "--redirect-url"),
        (vec!["--label", "a", "--platform", "myspace"], "--platform:"),
    ] {
        let mut full = vec!["link", "create", "--workspace", ws];
        full.extend(args.iter().copied());
        assert_fails(&app.cli(&full), needle);
    }
    assert_fails(
        &app.cli(&["link", "create", "--workspace", "no-such-workspace", "--label", "a"]),
        "--workspace",
    );
    assert_fails(&app.cli(&["link", "list", "--workspace", "no-such-workspace"]), "--workspace");
    // Usage errors come from clap with exit code 2.
    let o = app.cli(&["link", "create", "--label", "a"]);
    assert_eq!(o.status.code(), Some(2));
    let o = app.cli(&["link", "create", "--workspace", ws, "--label", "a", "--max-uses", "many"]);
    assert_eq!(o.status.code(), Some(2));
    // Every command has --help.
    for cmd in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["config", "check", "--help"],
        vec!["workspace", "create", "--help"],
        vec!["link", "create", "--help"],
        vec!["link", "rotate", "--help"],
        vec!["apikey", "create", "--help"],
        vec!["connection", "token", "--help"],
        vec!["audit", "list", "--help"],
    ] {
        let o = app.cli(&cmd);
        assert!(o.status.success() && stdout(&o).contains("Usage"), "{cmd:?} --help");
    }
    // Nothing was created.
    assert_eq!(app.cli_json(&["link", "list", "--workspace", ws]).as_array().unwrap().len(), 0);
}

async fn apikey_commands(app: TestApp) {
    let wid = app.workspace("Key Holder");
    let out = app.cli(&["apikey", "create", "--workspace", &wid, "--name", "ci"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let secret = text.lines().next().unwrap().trim().to_string();
    assert!(secret.starts_with("alk_") && text.contains("only time"));
    app.api_get("/links", &secret, 200).await;
    let admin = app.cli_json(&["apikey", "create", "--admin"]);
    assert_eq!(admin["admin"], true);
    let list = app.cli_json(&["apikey", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(&secret));
    let scoped = app.cli_json(&["apikey", "list", "--workspace", &wid]);
    assert_eq!(scoped.as_array().unwrap().len(), 1);
    let id = scoped[0]["id"].as_str().unwrap();
    let revoked = app.cli_json(&["apikey", "revoke", id]);
    assert!(revoked["revoked_at"].is_string());
    app.api_get("/links", &secret, 401).await;
    assert_fails(&app.cli(&["apikey", "revoke", "nope"]), "not found");
    assert_eq!(app.cli(&["apikey", "create"]).status.code(), Some(2), "--workspace or --admin is required");
    assert_fails(&app.cli(&["apikey", "create", "--workspace", "nope"]), "--workspace");
}

async fn config_check_and_bad_config(app: TestApp) {
    let out = app.cli_env(
        &["config", "check"],
        &[
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "tiktok-client-key"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET", "tiktok-secret-value"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let register = text.split("Register these callback URLs").nth(1).expect("the URLs to register");
    let base = &app.base;
    for line in [
        format!("TikTok redirect URI: {base}/oauth/tiktok/callback"),
        format!("Instagram redirect URI: {base}/oauth/instagram/callback"),
        format!("Instagram deauthorize callback: {base}/oauth/instagram/deauthorize"),
        format!("Instagram data deletion request callback: {base}/oauth/instagram/data-deletion"),
    ] {
        assert!(register.contains(&line), "{line}: {text}");
    }
    assert!(!text.contains("tiktok-secret-value"), "secrets are masked");
    let master = &app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1;
    assert!(!text.contains(master.as_str()), "the master key is masked");
    let json: Value = serde_json::from_slice(&app.cli(&["config", "check", "--json"]).stdout).unwrap();
    assert_eq!(json["master_key"], "********");
    // A log filter that does not parse is said, not silently replaced.
    let out = app.cli_env(&["config", "check"], &[("AUTHLINK_LOG", "authlink=tracee")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("AUTHLINK_LOG is not a valid filter"), "{}", stderr(&out));
    assert_eq!(
        json["master_key_source"],
        "the `master_key` setting (the configuration file, or AUTHLINK_MASTER_KEY)"
    );
    // Without a key: where one would come from, or, where start-up would refuse, the same error.
    let dev = tempfile::tempdir().unwrap();
    let data_dir = dev.path().display().to_string();
    let no_key = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(binary());
        crate::helpers::clear_authlink_env(&mut cmd);
        cmd.args(["config", "check", "--json"]).env("AUTHLINK_DATA_DIR", &data_dir);
        cmd.envs(extra.iter().copied()).output().unwrap()
    };
    let json: Value = serde_json::from_slice(&no_key(&[]).stdout).unwrap();
    assert!(json["master_key_source"].as_str().unwrap().starts_with("none yet: a development key"), "{json}");
    // No `database_url`: the SQLite file in the data folder.
    assert_eq!(json["database_url"], format!("sqlite://{data_dir}/authlink.db"), "{json}");
    let out = no_key(&[("AUTHLINK_PUBLIC_URL", "https://links.example.com")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("public URL is https"), "{}", stderr(&out));
    assert!(!dev.path().join("master.key").exists(), "config check writes no key");
    // Without an active key, a retired key that does not read as one, or a development key
    // file that does not, is refused as `serve` would refuse it.
    let out = no_key(&[("AUTHLINK_RETIRED_MASTER_KEYS", "not-a-key")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("retired_master_keys") && !stderr(&out).contains("not-a-key"),
        "{}",
        stderr(&out)
    );
    std::fs::write(dev.path().join("master.key"), "garbage\n").unwrap();
    let out = no_key(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    std::fs::remove_file(dev.path().join("master.key")).unwrap();
    // A master key that does not read as one is refused by the check, as `serve` would refuse
    // it, without showing it.
    let out = app.cli_env(&["config", "check"], &[("AUTHLINK_MASTER_KEY", "not-a-key-at-all")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("master_key") && !stderr(&out).contains("not-a-key-at-all"),
        "{}",
        stderr(&out)
    );
    // A typo in a key: exit 2 naming the key.
    let out = app.cli_env(&["config", "check"], &[("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KYE", "x")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("client_kye"), "{}", stderr(&out));
    for (key, value, needle) in [
        ("AUTHLINK_PUBLIC_URL", "not a url", "public_url"),
        ("AUTHLINK_LISTEN", "everywhere", "listen"),
        ("AUTHLINK_HTTP__BODY_LIMIT_BYTES", "big", "body_limit_bytes"),
        ("AUTHLINK_DATABASE_URL", "mysql://localhost/x", "database_url"),
        ("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "0", "`http.request_timeout_secs`: must be positive"),
        ("AUTHLINK_JOBS__REFRESH_BATCH", "0", "`jobs.refresh_batch`: must be positive"),
        ("AUTHLINK_JOBS__WEBHOOK_BATCH", "0", "`jobs.webhook_batch`: must be positive"),
    ] {
        let out = app.cli_env(&["serve"], &[(key, value)]);
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        assert!(stderr(&out).contains(needle), "{key}: {}", stderr(&out));
    }
    // A broken TOML file.
    let path = app.dir.path().join("broken.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:1\"\nunknown_section_key = 1\n").unwrap();
    let out = app.cli(&["--config", path.to_str().unwrap(), "config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown_section_key"));
    let out = app.cli(&["--config", "/nonexistent/authlink.toml", "config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    // A bad master key: exit 2 naming the key.
    let out = app.cli_env(&["workspace", "list"], &[("AUTHLINK_MASTER_KEY", "dG9vIHNob3J0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("master_key"));
}

async fn migrate_and_unreachable_database(app: TestApp) {
    let out = app.cli(&["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("up to date"));
    // A fresh SQLite file is created and migrated.
    let fresh = app.dir.path().join("sub/fresh.db");
    let url = format!("sqlite://{}", fresh.display());
    let out = app.cli_env(&["migrate"], &[("AUTHLINK_DATABASE_URL", &url)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fresh.exists());
    // An unreachable database: a clear message naming the setting, where it points (without the
    // password) and why, and a non-zero exit.
    let out = app.cli_env(
        &["workspace", "list"],
        &[
            ("AUTHLINK_DATABASE_URL", "postgres://postgres:hunter2@127.0.0.1:1/none"),
            ("AUTHLINK_DATABASE__ACQUIRE_TIMEOUT_SECS", "2"),
        ],
    );
    assert_fails(&out, "cannot use database_url postgres://postgres:****@127.0.0.1:1/none");
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    // A SQLite file whose folder cannot be made: the path is named.
    std::fs::write(app.dir.path().join("plain-file"), "").unwrap();
    let url = format!("sqlite://{}/plain-file/x.db", app.dir.path().display());
    let out = app.cli_env(&["migrate"], &[("AUTHLINK_DATABASE_URL", &url)]);
    assert_fails(&out, &format!("cannot use database_url {url}"));
    let out = app.cli_env(
        &["serve"],
        &[
            ("AUTHLINK_DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
            ("AUTHLINK_DATABASE__ACQUIRE_TIMEOUT_SECS", "2"),
            ("AUTHLINK_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_fails(&out, "database");
}

async fn wrong_master_key_is_refused(app: TestApp) {
    let wid = app.workspace("Keyed");
    app.link(&wid, "sealed");
    let out =
        app.cli_env(&["link", "list", "--workspace", &wid], &[("AUTHLINK_MASTER_KEY", &new_master_key())]);
    assert_fails(&out, "does not match");
    let out = app.cli_env(
        &["serve"],
        &[("AUTHLINK_MASTER_KEY", &new_master_key()), ("AUTHLINK_LISTEN", "127.0.0.1:0")],
    );
    assert_fails(&out, "does not match");
    // The right key still works: nothing was changed by the refused attempts.
    assert_eq!(app.cli_json(&["link", "list", "--workspace", &wid]).as_array().unwrap().len(), 1);
    // Without any key configured, a development key file is created (0600) in the data folder.
    let dev_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args(["workspace", "list"])
        .env_remove("AUTHLINK_MASTER_KEY")
        .env("AUTHLINK_DATA_DIR", dev_dir.path())
        .env("AUTHLINK_DATABASE_URL", format!("sqlite://{}/dev.db", dev_dir.path().display()))
        .env("AUTHLINK_LOG_FORMAT", "human")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("DEVELOPMENT SETUP"));
    let key_file = dev_dir.path().join("master.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    // A production setup (an https public URL, or PostgreSQL) gets no development key: the
    // command stops with a configuration error (exit 2) before touching the database, and
    // writes no key file.
    let no_key = |url: &str, database: String| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(binary())
            .args(["workspace", "list"])
            .env_remove("AUTHLINK_MASTER_KEY")
            .env("AUTHLINK_DATA_DIR", dir.path())
            .env("AUTHLINK_PUBLIC_URL", url)
            .env("AUTHLINK_DATABASE_URL", database.replace("{dir}", &dir.path().display().to_string()))
            .env("AUTHLINK_LOG_FORMAT", "human")
            .output()
            .unwrap();
        assert!(!dir.path().join("master.key").exists(), "no key file is written");
        assert!(!dir.path().join("prod.db").exists(), "the database is not touched");
        out
    };
    let out = no_key("https://links.example.com", "sqlite://{dir}/prod.db".into());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("AUTHLINK_MASTER_KEY") && stderr(&out).contains("public URL is https"));
    // Port 9 (discard) on loopback: refused before any connection is tried.
    let out = no_key("http://127.0.0.1:8080", "postgres://postgres@127.0.0.1:9/none".into());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("the database is PostgreSQL"), "{}", stderr(&out));
    // A development key already in the data folder still opens the data under an https public
    // URL (a running deployment is not stopped), with a warning at every start.
    let out = std::process::Command::new(binary())
        .args(["workspace", "list"])
        .env_remove("AUTHLINK_MASTER_KEY")
        .env("AUTHLINK_DATA_DIR", dev_dir.path())
        .env("AUTHLINK_PUBLIC_URL", "https://links.example.com")
        .env("AUTHLINK_DATABASE_URL", format!("sqlite://{}/dev.db", dev_dir.path().display()))
        .env("AUTHLINK_LOG_FORMAT", "human")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("read from the data folder"), "{}", stderr(&out));
}

async fn backup_and_restore(app: TestApp) {
    let backup_dir = tempfile::tempdir().unwrap();
    let copy = backup_dir.path().join("authlink-backup.db");
    let copy_arg = copy.display().to_string();
    if matches!(app.backend, Backend::Postgres(_)) {
        // PostgreSQL has its own tools; both commands say so (exit 2) and write nothing.
        for args in
            [vec!["backup", "--output", copy_arg.as_str()], vec!["restore", "--from", copy_arg.as_str()]]
        {
            let out = app.cli(&args);
            assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
            assert_fails(&out, "pg_dump");
        }
        assert!(!copy.exists());
        return;
    }
    let wid = app.workspace("Backed Up");
    let (link_id, url) = app.link(&wid, "Client");
    let account = authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id;
    connect(&app.client, &app, &url, "tiktok", account).await;
    let connection_id =
        app.cli_json(&["connection", "list", "--workspace", &wid])[0]["id"].as_str().unwrap().to_string();
    let token_before = app.cli_json(&["connection", "token", &connection_id])["access_token"].clone();
    assert!(token_before.is_string());
    let kid = app.cli_json(&["keys", "status"])["active_kid"].as_str().unwrap().to_string();

    // Taken while the server runs, from its live database (its WAL included).
    let summary = app.cli_json(&["backup", "--output", &copy_arg]);
    assert_eq!(summary["path"], copy_arg.as_str());
    assert_eq!(
        (summary["workspaces"].as_i64(), summary["links"].as_i64(), summary["connections"].as_i64()),
        (Some(1), Some(1), Some(1))
    );
    assert!(summary["schema_version"].as_i64().unwrap() > 0);
    assert_eq!(summary["keys"][0]["kid"], kid.as_str());
    assert!(summary.to_string().find("check_value").is_none(), "{summary}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), summary["bytes"].as_u64().unwrap());
    // No secret of the flow is in the copy in plain text.
    let bytes = std::fs::read(&copy).unwrap();
    let plain = String::from_utf8_lossy(&bytes);
    assert!(!plain.contains(&crate::helpers::token_of(&url)), "the link token is sealed in the copy");
    assert!(!plain.contains(token_before.as_str().unwrap()), "the access token is sealed in the copy");
    // A backup never overwrites a file, and leaves no partial file behind.
    let out = app.cli(&["backup", "--output", &copy_arg]);
    assert_eq!(out.status.code(), Some(2));
    assert_fails(&out, "already exists");
    assert_eq!(std::fs::read(&copy).unwrap(), bytes, "the existing file is unchanged");
    assert_eq!(std::fs::read_dir(backup_dir.path()).unwrap().count(), 1, "no partial file is left");

    // Changes after the backup: the link is revoked, another one made.
    app.cli_json(&["link", "revoke", &link_id]);
    app.link(&wid, "Later");
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 410);

    // Checked before anything is written: a file that is not a backup, a missing one, another
    // master key, and the database itself.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_db = format!("sqlite://{}/restored.db", fresh.path().display());
    let garbage = backup_dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database at all, just some bytes that go on for a while").unwrap();
    for (from, needle) in [
        (garbage.display().to_string(), "not an authlink backup"),
        (backup_dir.path().join("missing.db").display().to_string(), "not an authlink backup"),
    ] {
        let out = app.cli_env(&["restore", "--from", &from], &[("AUTHLINK_DATABASE_URL", &fresh_db)]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert_fails(&out, needle);
    }
    let out = app.cli_env(
        &["restore", "--from", &copy_arg],
        &[("AUTHLINK_DATABASE_URL", &fresh_db), ("AUTHLINK_MASTER_KEY", &new_master_key())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_fails(&out, "does not match");
    assert!(!fresh.path().join("restored.db").exists(), "nothing was written");
    // A copy from a newer authlink (a migration this build does not know).
    let newer = backup_dir.path().join("newer.db");
    std::fs::copy(&copy, &newer).unwrap();
    {
        use sqlx::Connection;
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", newer.display())).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990101000000, 'from the future', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let out = app.cli_env(
        &["restore", "--from", &newer.display().to_string()],
        &[("AUTHLINK_DATABASE_URL", &fresh_db)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_fails(&out, "newer authlink");
    assert!(!fresh.path().join("restored.db").exists(), "nothing was written");
    // A copy whose values need a key the configuration lacks: its key retired (by a re-wrap in
    // the copy's past) and another one active, while values are still sealed with the retired
    // one (by a process that ran with it meanwhile). Refused, as the next start would refuse it.
    let straggler = backup_dir.path().join("straggler.db");
    std::fs::copy(&copy, &straggler).unwrap();
    let other_key = new_master_key();
    let other = authlink::crypto::KeyRing::from_base64(&other_key.clone().into(), &[]).unwrap();
    {
        use sqlx::Connection;
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", straggler.display())).await.unwrap();
        sqlx::query("UPDATE key_checks SET retired_at = 1").execute(&mut conn).await.unwrap();
        sqlx::query("INSERT INTO key_checks (kid, check_value, created_at) VALUES ($1, $2, 2)")
            .bind(other.active_kid())
            .bind(other.check_value())
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let out = app.cli_env(
        &["restore", "--from", &straggler.display().to_string()],
        &[("AUTHLINK_DATABASE_URL", &fresh_db), ("AUTHLINK_MASTER_KEY", &other_key)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_fails(&out, &kid);
    assert!(!fresh.path().join("restored.db").exists(), "nothing was written");
    let out = app.cli(&["restore", "--from", app.db_url.trim_start_matches("sqlite://")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_fails(&out, "the database itself");

    // Into a new database: the data as it was, and the sealed token opens with the same key.
    let restored =
        app.cli_env(&["--json", "restore", "--from", &copy_arg], &[("AUTHLINK_DATABASE_URL", &fresh_db)]);
    assert!(restored.status.success(), "{}", stderr(&restored));
    // Readable by its owner only, as a database `serve` makes.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(fresh.path().join("restored.db")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let restored: Value = serde_json::from_slice(&restored.stdout).unwrap();
    assert_eq!(restored["restored"]["connections"], 1);
    assert_eq!(restored["new_file"], true, "said to be new");
    // A database named relative to the working directory is named whole.
    let relative = app.cli_env(
        &["--json", "restore", "--from", &copy_arg],
        &[("AUTHLINK_DATABASE_URL", "sqlite://relative-restore.db")],
    );
    assert!(relative.status.success(), "{}", stderr(&relative));
    let relative: Value = serde_json::from_slice(&relative.stdout).unwrap();
    let whole = app.dir.path().join("relative-restore.db").canonicalize().unwrap();
    assert_eq!(relative["database"], whole.display().to_string(), "{relative}");
    let on_fresh = |args: &[&str]| -> Value {
        let out = app.cli_env(&[&["--json"], args].concat(), &[("AUTHLINK_DATABASE_URL", &fresh_db)]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let links = on_fresh(&["link", "list", "--workspace", &wid]);
    assert_eq!(links.as_array().unwrap().len(), 1);
    assert_eq!(links[0]["status"], "active");
    assert_eq!(on_fresh(&["connection", "token", &connection_id])["access_token"], token_before);

    // Over the live database: refused while the server runs (it changes nothing), done once
    // the server is stopped, which then serves the data as it was.
    let out = app.cli(&["restore", "--from", &copy_arg]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_fails(&out, "in use by another process");
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 410, "still revoked");
    app.kill();
    let out = app.cli(&["--json", "restore", "--from", &copy_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["new_file"], false);
    let (app, cleanup) = app.restart_with(&[]).await;
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 200, "the revoked link is back");
    assert_eq!(app.cli_json(&["link", "list", "--workspace", &wid]).as_array().unwrap().len(), 1);
    assert_eq!(app.cli_json(&["connection", "token", &connection_id])["access_token"], token_before);
    cleanup.run().await;
}

async fn keygen_prints_or_writes_a_key(app: TestApp) {
    use base64::Engine;
    let decode = |v: &str| base64::engine::general_purpose::STANDARD.decode(v.trim()).unwrap();
    let a = app.cli_json(&["keygen"])["master_key"].as_str().unwrap().to_string();
    let b = app.cli_json(&["keygen"])["master_key"].as_str().unwrap().to_string();
    assert_eq!(decode(&a).len(), 32);
    assert_ne!(a, b, "a new key each time");
    // Into a new file, mode 0600, for master_key_file; never over an existing one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/master.key");
    let path_arg = path.display().to_string();
    let made = app.cli_json(&["keygen", "--output", &path_arg]);
    assert_eq!(made["master_key_file"], path_arg.as_str());
    assert!(made.get("master_key").is_none(), "the key itself is not printed");
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(decode(&written).len(), 32);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let again = app.cli(&["keygen", "--output", &path_arg]);
    assert_eq!(again.status.code(), Some(2));
    assert_fails(&again, "already exists");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written, "the file is unchanged");
    // The file opens a new database, whose active key is the one printed.
    let db = format!("sqlite://{}/keyed.db", dir.path().display());
    let with_file = [("AUTHLINK_DATABASE_URL", db.as_str()), ("AUTHLINK_MASTER_KEY_FILE", path_arg.as_str())];
    let mut cmd = std::process::Command::new(binary());
    crate::helpers::clear_authlink_env(&mut cmd);
    let out =
        cmd.args(["keys", "status", "--json"]).envs(with_file).current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["active_kid"], made["kid"]);
}

async fn graceful_shutdown_finishes_requests(app: TestApp) {
    // A slow request (the sandbox's token endpoint, told to answer after 1.5 s) is in flight when
    // SIGTERM arrives: it still gets its answer, and the server exits cleanly.
    app.sandbox("/tiktok/scenario", serde_json::json!({"fail_next": [{"endpoint": "token", "kind": "slow", "count": 1}], "slow_ms": 1500}))
        .await;
    let client = app.client.clone();
    let url = app.url("/sandbox/tiktok/v2/oauth/token/");
    let slow = tokio::spawn(async move {
        client
            .post(url)
            // An authorization code: the script slows the token endpoint's code exchanges.
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", "none"),
                ("client_key", "x"),
                ("client_secret", "y"),
            ])
            .send()
            .await
    });
    // Wait until the sandbox has received the request, then signal.
    sandbox_received_a_token_call(&app).await;
    let status = std::process::Command::new("kill").args(["-TERM", &app.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let res = slow.await.unwrap().expect("the in-flight request was answered");
    // The sandbox's own answer, once its delay is over: this client is not one it knows.
    let status = res.status().as_u16();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 401, "answered by the token endpoint: {body}");
    assert!(body.contains("invalid_client"), "{body}");
    assert_eq!(app.wait_exit(), Some(0));
    // The last line the server writes: every line before it has been read from its pipe too.
    app.wait_for_log("authlink stopped", 10).await;
    let log = app.log_text();
    assert!(log.contains("shutdown signal received"), "{log}");
    // The grace period (10 s) outlasts a provider call (2 s): nothing to say about it.
    assert!(!log.contains("shutdown_grace_secs is not longer"), "{log}");
}

/// Waits (at most 20 s) until the sandbox's TikTok token endpoint has received a call.
async fn sandbox_received_a_token_call(app: &TestApp) {
    crate::health::eventually("the sandbox to receive the token request", 20, || async {
        let stats = app.sandbox_stats("tiktok").await;
        let calls = stats["refresh_calls"].as_u64().unwrap_or(0) + stats["token_calls"].as_u64().unwrap_or(0);
        (calls > 0).then_some(stats)
    })
    .await;
}

/// A request still running when the grace period after SIGTERM ends (the sandbox's token endpoint
/// told to answer after 25 s, the grace 1 s) does not hold the process: it is cut off unanswered,
/// and the process still cleans up (its record removed) and exits 0.
async fn shutdown_stops_requests_at_the_end_of_the_grace_period(app: TestApp) {
    let (app, cleanup) = app.restart_with(&[("AUTHLINK_HTTP__SHUTDOWN_GRACE_SECS", "1")]).await;
    // Shorter than the provider timeout (2 s here): said at start.
    assert!(
        app.log_text().contains("http.shutdown_grace_secs is not longer than providers.timeout_secs"),
        "{}",
        app.log_text()
    );
    let scenario = serde_json::json!({"fail_next": [{"endpoint": "token", "kind": "slow", "count": 1}], "slow_ms": 25_000});
    app.sandbox("/tiktok/scenario", scenario).await;
    let client = app.client.clone();
    let url = app.url("/sandbox/tiktok/v2/oauth/token/");
    let slow = tokio::spawn(async move {
        let form = [
            ("grant_type", "authorization_code"),
            ("code", "none"),
            ("client_key", "x"),
            ("client_secret", "y"),
        ];
        client.post(url).form(&form).send().await
    });
    sandbox_received_a_token_call(&app).await;
    assert_eq!(app.cli_json(&["keys", "status"])["processes"].as_array().unwrap().len(), 1);
    let status = std::process::Command::new("kill").args(["-TERM", &app.pid().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(app.wait_exit(), Some(0));
    let outcome = slow.await.unwrap();
    assert!(outcome.is_err(), "cut off unanswered, not answered after the grace period: {outcome:?}");
    // The last line the server writes: every line before it has been read from its pipe too.
    app.wait_for_log("authlink stopped", 10).await;
    let log = app.log_text();
    assert!(log.contains("requests still running after the grace period; stopping"), "{log}");
    assert!(log.contains("authlink stopped"), "{log}");
    assert!(app.cli_json(&["keys", "status"])["processes"].as_array().unwrap().is_empty(), "its record went");
    cleanup.run().await;
}
