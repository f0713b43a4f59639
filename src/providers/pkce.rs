//! PKCE (RFC 7636): verifiers and their S256 challenges, in the standard base64url encoding and in
//! TikTok's lowercase-hex variant (providers.md §2.3).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// A fresh code verifier: 32 bytes from the OS CSPRNG, base64url without padding (43 characters,
/// all from the RFC 7636 alphabet `[A-Za-z0-9-._~]`).
pub fn new_verifier() -> String {
    URL_SAFE_NO_PAD.encode(crate::crypto::random_bytes::<32>())
}

/// The standard S256 challenge: base64url (no padding) of SHA-256(verifier).
pub fn s256_base64url(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// TikTok's S256 challenge: the lowercase hex of SHA-256(verifier) (64 characters).
pub fn s256_hex(verifier: &str) -> String {
    hex::encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7636 appendix B.
    const RFC_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    #[test]
    fn standard_challenge_matches_rfc_7636_appendix_b() {
        assert_eq!(s256_base64url(RFC_VERIFIER), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn tiktok_hex_challenge_matches_known_answer() {
        assert_eq!(
            s256_hex(RFC_VERIFIER),
            "13d31e961a1ad8ec2f16b10c4c982e0876a878ad6df144566ee1894acb70f9c3"
        );
    }

    #[test]
    fn verifiers_are_43_chars_of_the_rfc_alphabet_and_fresh() {
        let a = new_verifier();
        let b = new_verifier();
        assert_eq!(a.len(), 43);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c)));
        assert_ne!(a, b);
    }
}
