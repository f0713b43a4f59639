//! The pages a client reaches without an account: the link page, the connect button, the OAuth
//! callback, the result and failure pages, and Meta's deauthorization callbacks, served by the
//! real router on a real SQLite database, or on PostgreSQL with `AUTHLINK_FUZZ_POSTGRES_URL`
//! (sandbox providers; the providers' token endpoints are unreachable, so no flow can complete).
//!
//! Whatever is requested (a malformed or guessed link token, a tampered state, any callback
//! parameters, any cookie, any form body), and also after a real start, with the flow's own
//! state and any other parameters:
//! - the answer is never 500 (a panic would be one) and never another 5xx, except that a real
//!   flow's callback, and then its result page, may say the provider was unreachable (502 or
//!   504);
//! - a redirect never leaves the service's origin;
//! - no connection is ever written (security.md matrix 7, 9 and 11; a failed attempt writes
//!   nothing).
#![no_main]

use std::net::SocketAddr;
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use authlink::config::Config;
use authlink::service::connections::ListQuery;
use authlink::service::links::NewLink;
use authlink::service::workspaces::NewWorkspace;
use authlink::service::{Actor, Scope};
use authlink::state::AppState;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// Nothing listens there: the sandbox's endpoints, which the adapters call, are unreachable.
const PUBLIC_URL: &str = "http://127.0.0.1:9";

struct World {
    rt: tokio::runtime::Runtime,
    state: AppState,
    router: Router,
    /// The link's token.
    token: String,
    /// The browser cookie the link page set, as `name=value`, and its start form's field.
    cookie: String,
    form: String,
    _dir: tempfile::TempDir,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    // Errors only (a page that failed logs why), on standard error next to libFuzzer's report.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::ERROR)
        .with_writer(std::io::stderr)
        .try_init();
    let dir = tempfile::tempdir().expect("temporary folder");
    // A new SQLite file, or the PostgreSQL database `AUTHLINK_FUZZ_POSTGRES_URL` names.
    let database_url = std::env::var("AUTHLINK_FUZZ_POSTGRES_URL")
        .unwrap_or_else(|_| format!("sqlite://{}/authlink.db", dir.path().display()));
    let env: Vec<(String, String)> = [
        ("AUTHLINK_DATABASE_URL", database_url),
        ("AUTHLINK_DATA_DIR", dir.path().display().to_string()),
        ("AUTHLINK_MASTER_KEY", "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=".into()),
        ("AUTHLINK_PUBLIC_URL", PUBLIC_URL.into()),
        ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "1".into()),
        ("AUTHLINK_HTTP__LINK_REQUESTS_PER_MINUTE", "1000000000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = Config::load_from(None, &env).expect("configuration");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (state, token) = rt.block_on(async {
        let state = authlink::startup::build_state(config).await.expect("state");
        let workspace = authlink::service::workspaces::create(
            &state,
            &Actor::Cli,
            &Scope::Admin,
            // A name of its own, for a PostgreSQL database that earlier runs used.
            NewWorkspace { name: format!("Fuzz {}", std::process::id()), ..Default::default() },
        )
        .await
        .expect("workspace");
        let link = authlink::service::links::create(
            &state,
            &Actor::Cli,
            &Scope::Admin,
            NewLink { workspace_id: Some(workspace.id), label: "Client".into(), ..Default::default() },
        )
        .await
        .expect("link");
        let token = link.url.rsplit('/').next().expect("a link URL").to_string();
        (state, token)
    });
    let router = authlink::http::router(state.clone());
    let mut world = World { rt, state, router, token, cookie: String::new(), form: String::new(), _dir: dir };
    let (status, headers, body) =
        world.send(Method::GET, &format!("/l/{}", world.token), None, Vec::new(), &[]);
    assert_eq!(status, StatusCode::OK, "the link page");
    let set_cookie = headers.get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).expect("a browser cookie");
    world.cookie = set_cookie.split(';').next().expect("name=value").to_string();
    world.form = String::from_utf8_lossy(&body)
        .split("name=\"form\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the start form's field")
        .to_string();
    world
});

impl World {
    fn send(
        &self,
        method: Method,
        path_and_query: &str,
        cookie: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path_and_query);
        if let Some(cookie) = cookie {
            req = req.header(header::COOKIE, cookie);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(Body::from(body)).expect("a request");
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
        self.rt.block_on(async {
            let res = self.router.clone().oneshot(req).await.expect("infallible");
            let (parts, body) = res.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.expect("a body").to_vec();
            (parts.status, parts.headers, body)
        })
    }

    fn connections(&self) -> usize {
        self.rt.block_on(async {
            let query = ListQuery {
                workspace_id: None,
                status: None,
                provider: None,
                link_id: None,
                before: None,
                limit: 1,
            };
            authlink::service::connections::list(&self.state, &Scope::Admin, &query)
                .await
                .expect("list")
                .len()
        })
    }
}

#[derive(Debug, Arbitrary)]
enum Token {
    Link,
    LinkWith(String),
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum Cookie {
    None,
    Browser,
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum Platform {
    TikTok,
    Instagram,
    Any(String),
}

impl Platform {
    fn segment(&self) -> String {
        match self {
            Platform::TikTok => "tiktok".into(),
            Platform::Instagram => "instagram".into(),
            Platform::Any(any) => encode(any, false),
        }
    }
}

/// A query parameter: the callback's own names, or any other.
#[derive(Debug, Arbitrary)]
enum Param {
    State(String),
    Code(String),
    Error(String),
    Denied,
    ErrorDescription(String),
    Scopes(String),
    Iss(String),
    Other(String, String),
    /// Written as it is, unencoded.
    Raw(String),
}

fn query(params: &[Param]) -> String {
    let pair = |name: &str, value: &str| format!("{name}={}", encode(value, false));
    params
        .iter()
        .map(|p| match p {
            Param::State(v) => pair("state", v),
            Param::Code(v) => pair("code", v),
            Param::Error(v) => pair("error", v),
            Param::Denied => "error=access_denied&error_description=The+user+denied".to_string(),
            Param::ErrorDescription(v) => pair("error_description", v),
            Param::Scopes(v) => pair("scopes", v),
            Param::Iss(v) => pair("iss", v),
            Param::Other(name, v) => format!("{}={}", encode(name, false), encode(v, false)),
            Param::Raw(raw) => encode(raw, true),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[derive(Debug, Arbitrary)]
enum Form {
    /// The field of the link page's form, for the browser cookie.
    Real,
    Any(String),
    /// Any body at all.
    Body(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Step {
    Landing {
        token: Token,
    },
    Start {
        token: Token,
        platform: Platform,
        form: Form,
        cookie: Cookie,
        origin: Option<String>,
        fetch_site: Option<String>,
    },
    Callback {
        platform: Platform,
        params: Vec<Param>,
        cookie: Cookie,
    },
    /// A real start, then its callback with the flow's state and any other parameters.
    RealCallback {
        instagram: bool,
        other_provider: bool,
        params: Vec<Param>,
        cookie: Cookie,
        drop_state: bool,
    },
    Result {
        id: String,
        cookie: Cookie,
    },
    Failed {
        platform: Platform,
        params: Vec<Param>,
    },
    Meta {
        deletion: bool,
        body: Vec<u8>,
    },
    DeletionStatus {
        code: String,
    },
}

/// Percent-encodes `s` for a path segment; for a query, `=&%+/?` stay as they are, so that inputs
/// can write pairs and escapes of their own.
fn encode(s: &str, query: bool) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'!')
        .remove(b'*')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b',')
        .remove(b';')
        .remove(b':')
        .remove(b'@')
        .remove(b'$');
    const QUERY: &AsciiSet =
        &SEGMENT.remove(b'=').remove(b'&').remove(b'%').remove(b'+').remove(b'/').remove(b'?');
    utf8_percent_encode(s, if query { QUERY } else { SEGMENT }).to_string()
}

fn header_value(s: &str) -> Option<&str> {
    HeaderValue::from_str(s).is_ok().then_some(s)
}

fuzz_target!(|step: Step| {
    let world = &*WORLD;
    let token = |t: &Token| match t {
        Token::Link => world.token.clone(),
        Token::LinkWith(extra) => format!("{}{}", world.token, encode(extra, false)),
        Token::Any(any) => encode(any, false),
    };
    let cookie = |c: &Cookie| match c {
        Cookie::None => None,
        Cookie::Browser => Some(world.cookie.clone()),
        Cookie::Any(any) => header_value(any).map(str::to_string),
    };
    let form_body = "application/x-www-form-urlencoded";
    let mut real_flow = false;
    let (status, headers, body) = match &step {
        Step::Landing { token: t } => {
            world.send(Method::GET, &format!("/l/{}", token(t)), None, Vec::new(), &[])
        }
        Step::Start { token: t, platform, form, cookie: c, origin, fetch_site } => {
            let body = match form {
                Form::Real => format!("form={}", world.form).into_bytes(),
                Form::Any(f) => format!("form={}", encode(f, false)).into_bytes(),
                Form::Body(body) => body.clone(),
            };
            let mut extra = vec![("content-type", form_body)];
            if let Some(origin) = origin.as_deref().and_then(header_value) {
                extra.push(("origin", origin));
            }
            if let Some(site) = fetch_site.as_deref().and_then(header_value) {
                extra.push(("sec-fetch-site", site));
            }
            let path = format!("/l/{}/connect/{}", token(t), platform.segment());
            world.send(Method::POST, &path, cookie(c).as_deref(), body, &extra)
        }
        Step::Callback { platform, params, cookie: c } => {
            let path = format!("/oauth/{}/callback?{}", platform.segment(), query(params));
            world.send(Method::GET, &path, cookie(c).as_deref(), Vec::new(), &[])
        }
        Step::RealCallback { instagram, other_provider, params, cookie: c, drop_state } => {
            let platform = if *instagram { "instagram" } else { "tiktok" };
            let start = format!("/l/{}/connect/{platform}", world.token);
            let real_start = || {
                let body = format!("form={}", world.form).into_bytes();
                world.send(Method::POST, &start, Some(&world.cookie), body, &[("content-type", form_body)])
            };
            let (mut status, mut headers, _) = real_start();
            if status == StatusCode::TOO_MANY_REQUESTS {
                // The link has as many attempts open as it may (runs leave theirs open): past
                // their ten minutes, they hold no place.
                world.state.system_clock.advance(601);
                (status, headers, _) = real_start();
            }
            assert_eq!(status, StatusCode::SEE_OTHER, "a real start");
            let location = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).expect("a redirect");
            let state = location
                .split(['?', '&'])
                .find_map(|pair| pair.strip_prefix("state="))
                .expect("the flow's state")
                .to_string();
            let callback_platform = match (instagram, other_provider) {
                (false, false) | (true, true) => "tiktok",
                _ => "instagram",
            };
            let mut query = query(params);
            if !drop_state {
                query = format!("state={state}&{query}");
            }
            real_flow = true;
            let path = format!("/oauth/{callback_platform}/callback?{query}");
            world.send(Method::GET, &path, cookie(c).as_deref(), Vec::new(), &[])
        }
        Step::Result { id, cookie: c } => world.send(
            Method::GET,
            &format!("/connected/{}", encode(id, false)),
            cookie(c).as_deref(),
            Vec::new(),
            &[],
        ),
        Step::Failed { platform, params } => {
            let path = format!("/oauth/{}/failed?{}", platform.segment(), query(params));
            world.send(Method::GET, &path, None, Vec::new(), &[])
        }
        Step::Meta { deletion, body } => {
            let path =
                if *deletion { "/oauth/instagram/data-deletion" } else { "/oauth/instagram/deauthorize" };
            world.send(Method::POST, path, None, body.clone(), &[("content-type", form_body)])
        }
        Step::DeletionStatus { code } => {
            let path = format!("/oauth/instagram/data-deletion/{}", encode(code, false));
            world.send(Method::GET, &path, None, Vec::new(), &[])
        }
    };
    if status.is_server_error() {
        let page = String::from_utf8_lossy(&body);
        let title = page.split("<h1>").nth(1).and_then(|rest| rest.split("</h1>").next()).unwrap_or(&page);
        // Only a real flow reaches the provider, whose unreachable endpoints end it with 502 or
        // 504; its result page, which the fuzzer may find by the flow's id, says so again.
        let provider_failure = real_flow || matches!(step, Step::Result { .. });
        assert!(
            provider_failure && matches!(status, StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT),
            "{status} ({title}) for {step:?}"
        );
    }
    if let Some(location) = headers.get(header::LOCATION) {
        let location = location.to_str().expect("an ASCII Location");
        let on_origin =
            (location.starts_with('/') && !location.starts_with("//") && !location.starts_with("/\\"))
                || location.starts_with(&format!("{PUBLIC_URL}/"));
        assert!(on_origin, "redirect off the origin: {location} for {step:?}");
    }
    if real_flow {
        assert_eq!(world.connections(), 0, "a connection was written by {step:?}");
    }
});
