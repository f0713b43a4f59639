//! The providers' answers (providers.md), which authlink reads but does not control. Whatever a
//! provider (or a proxy in front of it) answers, parsing never panics; tokens are taken from a
//! success status only (RFC 6749 §5.1); and no failure's text, which is logged and stored as the
//! connection's reason, holds a secret the request carried (security.md O8), whether the answer
//! echoed it as it is or percent- or form-encoded.
#![no_main]

use arbitrary::Arbitrary;
use authlink::providers::fuzzing::{Answer, Parsed, parse, sanitize};
use libfuzzer_sys::fuzz_target;

/// What a request carries: the client secret, an authorization code (TikTok's hold `*` and `!`),
/// an access token and a refresh token.
const SECRETS: [&str; 4] =
    ["cs9fK2mQ7xLp4Rt8Wz", "C0de*!Xy7-abc.def_ghi~jk", "act.AbC123xyz!456+uvw", "rft.ZyX987*wvu654%2F"];

/// The fields the providers' error answers carry, at the top level or under `error`/`data`.
const FIELDS: [&str; 12] = [
    "error",
    "error_description",
    "message",
    "log_id",
    "error_type",
    "error_message",
    "code",
    "description",
    "error_user_msg",
    "error_user_title",
    "fbtrace_id",
    "type",
];

#[derive(Debug, Arbitrary, Clone, Copy)]
enum Encoding {
    Plain,
    /// Every byte as `%XX`.
    Percent,
    /// As a form encodes it: reserved characters as `%XX`, spaces as `+`.
    Form,
}

#[derive(Debug, Arbitrary)]
enum Piece {
    Text(String),
    Secret(u8, Encoding),
}

#[derive(Debug, Arbitrary)]
enum Nest {
    Top,
    Error,
    Data,
    DataList,
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// Any body with any status.
    Raw { answer: u8, status: u16, retry_after: Option<u16>, body: String },
    /// A JSON answer whose fields echo the request's secrets.
    Echo { answer: u8, status: u16, nest: Nest, fields: Vec<(u8, Vec<Piece>)>, code: Option<i64> },
    /// The redaction alone, with secrets of any token alphabet.
    Redact { secrets: Vec<Vec<u8>>, pieces: Vec<Piece> },
}

fn encode(secret: &str, encoding: Encoding) -> String {
    match encoding {
        Encoding::Plain => secret.to_string(),
        Encoding::Percent => secret.bytes().map(|b| format!("%{b:02X}")).collect(),
        Encoding::Form => secret
            .bytes()
            .map(|b| match b {
                b' ' => "+".to_string(),
                b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => char::from(b).to_string(),
                b => format!("%{b:02X}"),
            })
            .collect(),
    }
}

fn text(pieces: &[Piece], secrets: &[&str]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.clone(),
            Piece::Secret(i, e) => encode(secrets[usize::from(*i) % secrets.len()], *e),
        })
        .collect()
}

/// The text read the way a person (or a log search) would: as it is, and percent-decoded once.
fn readings(text: &str) -> [String; 2] {
    let decoded = percent_decode(&text.replace('+', " "));
    [text.to_string(), decoded]
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn assert_no_secret(texts: &[String], secrets: &[&str], input: &dyn std::fmt::Debug) {
    for text in texts {
        for reading in readings(text) {
            for secret in secrets {
                assert!(!reading.contains(secret), "secret {secret:?} in {reading:?} (from {input:?})");
            }
        }
    }
}

fn check(answer: u8, status: u16, retry_after: Option<u64>, body: &str, input: &dyn std::fmt::Debug) {
    let answer = Answer::ALL[usize::from(answer) % Answer::ALL.len()];
    let status = 100 + status % 500;
    match parse(answer, status, retry_after, body, &SECRETS) {
        Parsed::Tokens(tokens) => {
            assert!((200..300).contains(&status), "tokens taken from HTTP {status}: {input:?}");
            assert!(tokens.iter().all(|t| !t.is_empty()), "an empty token was taken");
        }
        Parsed::Profile(profile) => {
            assert!((200..300).contains(&status), "a profile taken from HTTP {status}: {input:?}");
            assert!(!profile.account_id.is_empty(), "a profile without an account id");
        }
        Parsed::Revoked => assert!((200..300).contains(&status), "revocation taken from HTTP {status}"),
        Parsed::Failed(texts) => assert_no_secret(&texts, &SECRETS, input),
    }
}

fuzz_target!(|input: Input| {
    match &input {
        Input::Raw { answer, status, retry_after, body } => {
            check(*answer, *status, retry_after.map(u64::from), body, &input);
        }
        Input::Echo { answer, status, nest, fields, code } => {
            let mut obj = serde_json::Map::new();
            for (field, pieces) in fields {
                let name = FIELDS[usize::from(*field) % FIELDS.len()];
                obj.insert(name.to_string(), serde_json::Value::String(text(pieces, &SECRETS)));
            }
            if let Some(code) = code {
                obj.insert("code".into(), serde_json::Value::from(*code));
            }
            let obj = serde_json::Value::Object(obj);
            let body = match nest {
                Nest::Top => obj,
                Nest::Error => serde_json::json!({ "error": obj }),
                Nest::Data => serde_json::json!({ "data": obj }),
                Nest::DataList => serde_json::json!({ "data": [obj] }),
            };
            check(*answer, *status, None, &body.to_string(), &input);
        }
        Input::Redact { secrets, pieces } => {
            // Tokens are long and written with a token alphabet; the marker `[redacted]` is not.
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~*!+/=%";
            let secrets: Vec<String> = secrets
                .iter()
                .map(|s| s.iter().map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect())
                .filter(|s: &String| s.len() >= 12)
                .collect();
            if secrets.is_empty() {
                return;
            }
            let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let out = sanitize(&text(pieces, &secrets), &secrets);
            assert_no_secret(&[out], &secrets, &input);
        }
    }
});
