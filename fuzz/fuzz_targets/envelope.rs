//! Sealed values at rest (security.md §2, crypto at rest; matrix 14). Whatever text is stored
//! where an envelope belongs, opening it never panics. A value sealed for one place opens there,
//! to the same bytes, and nowhere else; and no change to a sealed envelope (one character
//! replaced, or the text cut short) opens.
#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use authlink::crypto::{Aad, KeyRing, envelope_kid};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

/// An active key and a decrypt-only one, so that a changed key id can name another real key.
static RING: LazyLock<KeyRing> = LazyLock::new(|| {
    let key = |byte: u8| SecretString::from(base64_key(byte));
    KeyRing::from_base64(&key(7), &[key(9)]).expect("two valid keys")
});

fn base64_key(byte: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

#[derive(Debug, Arbitrary, PartialEq, Eq)]
struct Place {
    workspace: String,
    table: String,
    row: String,
    column: String,
}

impl Place {
    fn aad(&self) -> Aad<'_> {
        Aad::new(&self.workspace, &self.table, &self.row, &self.column)
    }
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// Any stored text, opened for any place.
    Open { envelope: String, place: Place },
    /// An envelope of the right shape, naming a key of the ring, with any nonce and ciphertext.
    Parts { legacy: bool, retired_key: bool, nonce: String, ciphertext: String, place: Place },
    /// A value sealed, then opened where it was sealed, elsewhere, and changed.
    Sealed { plaintext: Vec<u8>, place: Place, elsewhere: Place, at: usize, replacement: u8, cut: usize },
}

/// The characters an envelope is written with.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:=+/v";

fuzz_target!(|input: Input| {
    let ring = &*RING;
    match input {
        Input::Open { envelope, place } => {
            let _ = envelope_kid(&envelope);
            let _ = ring.open(&envelope, place.aad());
            let _ = ring.open_str(&envelope, place.aad());
            let _ = ring.rewrap(&envelope, place.aad());
        }
        Input::Parts { legacy, retired_key, nonce, ciphertext, place } => {
            let kid =
                if retired_key { ring.retired_kids().next().unwrap_or_default() } else { ring.active_kid() };
            let version = if legacy { "v1" } else { "v2" };
            let envelope = format!("{version}:{kid}:{nonce}:{ciphertext}");
            assert!(ring.open(&envelope, place.aad()).is_err(), "a forged envelope opened: {envelope}");
        }
        Input::Sealed { plaintext, place, elsewhere, at, replacement, cut } => {
            let sealed = ring.seal(&plaintext, place.aad());
            let opened = ring.open(&sealed, place.aad()).expect("a sealed value opens where it was sealed");
            assert_eq!(opened.as_slice(), plaintext.as_slice());
            assert_eq!(ring.rewrap(&sealed, place.aad()).expect("rewrap"), None, "already current");
            if elsewhere != place {
                assert!(
                    ring.open(&sealed, elsewhere.aad()).is_err(),
                    "opened in another place: {elsewhere:?}"
                );
            }
            let mut changed = sealed.clone().into_bytes();
            let at = at % changed.len();
            let replacement = ALPHABET[usize::from(replacement) % ALPHABET.len()];
            if changed[at] != replacement {
                changed[at] = replacement;
                let changed = String::from_utf8(changed).expect("ASCII");
                assert!(ring.open(&changed, place.aad()).is_err(), "a changed envelope opened: {changed}");
            }
            let cut = cut % sealed.len();
            assert!(ring.open(&sealed[..cut], place.aad()).is_err(), "a cut envelope opened");
        }
    }
});
