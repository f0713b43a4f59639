//! Meta's `signed_request` (Instagram deauthorization and data deletion callbacks), which anyone
//! can post. Whatever is posted, verifying it never panics. A request signed with the app secret
//! verifies, naming the user it was signed for; the same request signed with another secret, or
//! with one character of its signature or payload replaced, does not.
#![no_main]

use arbitrary::Arbitrary;
use authlink::http::pages::deauth::verify_signed_request;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const SECRET: &[u8] = b"the-instagram-app-secret";

#[derive(Debug, Arbitrary)]
enum UserId {
    Text(String),
    Number(u64),
    Other(bool),
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// Anything posted as `signed_request`.
    Posted(String),
    /// A payload signed with the app secret (or another), then maybe changed.
    Signed {
        algorithm: String,
        hmac_sha256: bool,
        user_id: UserId,
        issued_at: Option<i64>,
        padded: bool,
        other_secret: Option<Vec<u8>>,
        change: Option<(bool, usize, u8)>,
    },
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn sign(payload: &str, secret: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(payload.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fuzz_target!(|input: Input| {
    match input {
        Input::Posted(text) => {
            let _ = verify_signed_request(&text, SECRET);
        }
        Input::Signed { algorithm, hmac_sha256, user_id, issued_at, padded, other_secret, change } => {
            let algorithm = if hmac_sha256 { "HMAC-SHA256".to_string() } else { algorithm };
            let user_json = match &user_id {
                UserId::Text(s) => serde_json::Value::String(s.clone()),
                UserId::Number(n) => serde_json::Value::from(*n),
                UserId::Other(b) => serde_json::Value::Bool(*b),
            };
            let mut payload = serde_json::json!({ "algorithm": algorithm, "user_id": user_json });
            if let Some(at) = issued_at {
                payload["issued_at"] = serde_json::Value::from(at);
            }
            let mut payload = URL_SAFE_NO_PAD.encode(payload.to_string());
            if padded {
                while !payload.len().is_multiple_of(4) {
                    payload.push('=');
                }
            }
            let secret = other_secret.as_deref().unwrap_or(SECRET);
            let signature = sign(&payload, secret);
            let (mut signature, mut payload) = (signature.into_bytes(), payload.into_bytes());
            let mut changed = false;
            if let Some((in_signature, at, to)) = change {
                let part = if in_signature { &mut signature } else { &mut payload };
                let at = at % part.len();
                let to = ALPHABET[usize::from(to) % ALPHABET.len()];
                // A padding character stays: dropping or adding padding is allowed by design.
                if part[at] != to && part[at] != b'=' {
                    part[at] = to;
                    changed = true;
                }
            }
            let posted = format!(
                "{}.{}",
                String::from_utf8(signature).expect("ASCII"),
                String::from_utf8(payload).expect("ASCII")
            );
            let verified = verify_signed_request(&posted, SECRET);
            let expected_user = match &user_id {
                UserId::Text(s) if !s.is_empty() => Some(s.clone()),
                UserId::Number(n) => Some(n.to_string()),
                _ => None,
            };
            let valid = other_secret.as_deref().is_none_or(|s| s == SECRET)
                && !changed
                && algorithm.eq_ignore_ascii_case("HMAC-SHA256")
                && expected_user.is_some();
            match verified {
                Some((_, user)) => {
                    assert!(valid, "verified a request it must refuse: {posted}");
                    assert_eq!(Some(user), expected_user);
                }
                None => assert!(!valid, "refused a valid request: {posted}"),
            }
        }
    }
});
