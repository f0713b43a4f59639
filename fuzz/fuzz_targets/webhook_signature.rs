//! The webhook signer (Standard Webhooks v1, security.md §4). Whatever the stored secret, the
//! message id, the timestamp and the body, signing never panics; with a valid `whsec_` secret the
//! signature is `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under the decoded
//! secret, computed here independently of the signer; and the specification's known answer holds.
#![no_main]

use arbitrary::Arbitrary;
use authlink::service::webhooks::sign;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

#[derive(Debug, Arbitrary)]
enum Input {
    /// Any stored secret text.
    AnySecret { secret: String, id: String, timestamp: i64, body: Vec<u8> },
    /// A secret of 24 to 64 random bytes, as `whsec_` and its base64.
    Secret { key: [u8; 64], len: u8, id: String, timestamp: i64, body: Vec<u8> },
}

fuzz_target!(|input: Input| {
    // The known answer from the specification's own tests.
    assert_eq!(
        sign(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .as_deref(),
        Some("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=")
    );
    match input {
        Input::AnySecret { secret, id, timestamp, body } => {
            let _ = sign(&secret, &id, timestamp, &body);
        }
        Input::Secret { key, len, id, timestamp, body } => {
            let key = &key[..24 + usize::from(len) % 41];
            let secret = format!("whsec_{}", STANDARD.encode(key));
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(&body);
            let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
            assert_eq!(sign(&secret, &id, timestamp, &body), Some(expected));
        }
    }
});
