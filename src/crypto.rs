//! Secrets at rest and random tokens.
//!
//! A [`KeyRing`] seals values with XChaCha20-Poly1305 (192-bit random nonces, so random nonces
//! never collide in practice). A sealed value is the text envelope
//! `v2:<kid>:<base64url nonce>:<base64url ciphertext>`; the key id names the key that sealed it,
//! so keys can be rotated while old values stay readable. Each value is bound to its place by
//! associated data: the key id, the workspace, the table, the row id and the column. A ciphertext
//! copied to another row or column, or whose row was moved to another workspace, fails to open.
//! Values sealed before the workspace was part of it are in the `v1` envelope (associated data
//! without the workspace): they open, and a re-wrap moves them to `v2`.
//!
//! The key ring keeps a *key check value* in the database (see [`KeyRing::check_value`]): start-up
//! refuses to run with a key that does not match the data already stored.

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::TryRngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of a master key in bytes.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
/// Length of a key id: the first 4 bytes of a hash of the key, in hex.
pub const KID_LEN: usize = 8;
/// The envelope every new value is sealed in: its associated data names the workspace too.
pub const ENVELOPE_VERSION: &str = "v2";
/// The envelope of values sealed before the workspace was part of the associated data: still
/// opened, and sealed again as [`ENVELOPE_VERSION`] by `authlink keys rewrap`.
const LEGACY_ENVELOPE_VERSION: &str = "v1";
/// The plaintext sealed as the key check value.
const KEY_CHECK_PLAINTEXT: &[u8] = b"authlink key check";

/// Why a key could not be loaded or a value could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key is not base64 of 32 bytes.
    #[error("the master key must be base64 of exactly 32 bytes")]
    BadKey,
    /// The envelope is not `v2:<kid>:<nonce>:<ct>` (or `v1:…`).
    #[error("malformed sealed value")]
    Malformed,
    /// The envelope names a key this ring does not hold.
    #[error("sealed with key {0}, which is not configured")]
    UnknownKey(String),
    /// Authentication failed: wrong key, tampered value or value moved from another row.
    #[error("sealed value failed authentication")]
    Unauthentic,
    /// A key file does not hold a key.
    #[error("key file {path}: {why}; it must hold the base64 of exactly 32 bytes (see `authlink keygen`)")]
    BadKeyFile {
        /// The file.
        path: String,
        /// What is in it instead, in words (never the content).
        why: &'static str,
    },
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Where a sealed value lives: the associated data that binds a ciphertext to its place, so that
/// a ciphertext copied to another row, column or table, or a row moved to another workspace,
/// does not open.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// The workspace the row belongs to (empty for values of no workspace, such as key checks).
    pub workspace: &'a str,
    /// Table name, e.g. `links`.
    pub table: &'a str,
    /// Row id.
    pub row: &'a str,
    /// Column name, e.g. `token`.
    pub column: &'a str,
}

impl<'a> Aad<'a> {
    /// Associated data for `table`/`row`/`column` of `workspace`.
    pub fn new(workspace: &'a str, table: &'a str, row: &'a str, column: &'a str) -> Self {
        Self { workspace, table, row, column }
    }

    fn bytes(&self, kid: &str, version: &str) -> Vec<u8> {
        // Length-prefixed fields, so that no two different places produce the same bytes. A
        // legacy envelope's associated data has no workspace.
        let workspace = (version != LEGACY_ENVELOPE_VERSION).then_some(self.workspace);
        let mut out = Vec::new();
        for part in
            [Some(kid), workspace, Some(self.table), Some(self.row), Some(self.column)].into_iter().flatten()
        {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

struct RingKey {
    kid: String,
    cipher: XChaCha20Poly1305,
}

/// The keys that seal and open secrets at rest: one active key, plus older keys that only open.
pub struct KeyRing {
    active: RingKey,
    retired: Vec<RingKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active_kid", &self.active.kid)
            .field("retired_kids", &self.retired.iter().map(|k| &k.kid).collect::<Vec<_>>())
            .finish()
    }
}

fn ring_key(bytes: &[u8]) -> Result<RingKey, CryptoError> {
    if bytes.len() != KEY_LEN {
        return Err(CryptoError::BadKey);
    }
    // The key id is derived from the key, so the same key always has the same id and an id
    // reveals nothing usable about the key.
    // (Hashed in two parts: no copy of the key on the heap.)
    let digest = Sha256::new().chain_update(b"authlink-kid:").chain_update(bytes).finalize();
    let kid = hex::encode(&digest[..KID_LEN / 2]);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(bytes));
    Ok(RingKey { kid, cipher })
}

fn decode_key(key: &SecretString) -> Result<RingKey, CryptoError> {
    let text = key.expose_secret().trim();
    let bytes = Zeroizing::new(
        STANDARD.decode(text).or_else(|_| URL_SAFE_NO_PAD.decode(text)).map_err(|_| CryptoError::BadKey)?,
    );
    ring_key(&bytes)
}

/// Reads the key in a key file; a file that holds no key is named, and what is wrong said
/// without its content.
fn key_from_file(path: &Path) -> Result<RingKey, CryptoError> {
    let text = read_key_file(path)?;
    decode_key(&text).map_err(|_| CryptoError::BadKeyFile {
        path: path.display().to_string(),
        why: if text.expose_secret().trim().is_empty() { "it is empty" } else { "it holds no key" },
    })
}

/// Reads a key file (base64 text). A file that other users may read is used, with a warning
/// naming the file (secret stores often mount files that way, and refusing would take the service
/// down), since anyone who reads it can open every sealed value.
pub fn read_key_file(path: &Path) -> Result<SecretString, CryptoError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the master key file can be read by other users; restrict it to mode 0600 or 0400"
                );
            }
        }
    }
    std::fs::read_to_string(path)
        .map(SecretString::from)
        .map_err(|source| CryptoError::KeyFile { path: path.display().to_string(), source })
}

impl KeyRing {
    /// A ring with one active key and any number of decrypt-only keys, all base64.
    pub fn from_base64(active: &SecretString, retired: &[SecretString]) -> Result<Self, CryptoError> {
        let mut ring = Self { active: decode_key(active)?, retired: Vec::new() };
        for key in retired {
            ring.add_retired(key)?;
        }
        Ok(ring)
    }

    /// A ring with a fresh random key (tests and `authlink keygen`).
    pub fn generate() -> (Self, SecretString) {
        let key = Zeroizing::new(random_bytes::<KEY_LEN>());
        let encoded = SecretString::from(STANDARD.encode(key.as_slice()));
        #[allow(clippy::expect_used)] // a fresh 32-byte key is always valid
        let ring = Self::from_base64(&encoded, &[]).expect("fresh key");
        (ring, encoded)
    }

    /// Reads the base64 key in `path`.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        Ok(Self { active: key_from_file(path)?, retired: Vec::new() })
    }

    /// Adds a decrypt-only key read from a key file.
    pub fn add_retired_file(&mut self, path: &Path) -> Result<(), CryptoError> {
        self.push_retired(key_from_file(path)?);
        Ok(())
    }

    /// Adds a decrypt-only key (base64), for values sealed before a key rotation.
    pub fn add_retired(&mut self, key: &SecretString) -> Result<(), CryptoError> {
        self.push_retired(decode_key(key)?);
        Ok(())
    }

    fn push_retired(&mut self, key: RingKey) {
        if key.kid != self.active.kid && !self.retired.iter().any(|k| k.kid == key.kid) {
            self.retired.push(key);
        }
    }

    /// Creates `path` with a fresh key, readable by the owner only (mode 0600), and returns the
    /// ring. Fails if the file already exists.
    ///
    /// The key is written to a temporary file beside it first, which is then linked to `path`
    /// (which fails if `path` exists): a write cut short (a full disk, a crash) leaves no empty
    /// or partial key file that a later start would find.
    pub fn create_file(path: &Path) -> Result<Self, CryptoError> {
        let err = |source| CryptoError::KeyFile { path: path.display().to_string(), source };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(err)?;
        if path.symlink_metadata().is_ok() {
            return Err(err(std::io::ErrorKind::AlreadyExists.into()));
        }
        let (ring, encoded) = Self::generate();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = parent.join(format!(".{name}.{}.tmp", &random_token()[..12]));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let write = |file: &mut std::fs::File| -> std::io::Result<()> {
            file.write_all(encoded.expose_secret().as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()
        };
        let linked = options
            .open(&temp)
            .and_then(|mut file| write(&mut file))
            .and_then(|()| std::fs::hard_link(&temp, path));
        // The temporary name goes whatever happened (a crash between the two leaves it, mode
        // 0600, beside the key file).
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(err(e)),
            // A file system without hard links (some network and FAT mounts): written in place,
            // as a new file.
            Err(_) => {
                let mut file = options.open(path).map_err(err)?;
                if let Err(e) = write(&mut file) {
                    drop(file);
                    let _ = std::fs::remove_file(path);
                    return Err(err(e));
                }
            }
        }
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
        Ok(ring)
    }

    /// The id of the key that seals new values.
    pub fn active_kid(&self) -> &str {
        &self.active.kid
    }

    /// Seals `plaintext` for the place `aad` with the active key.
    pub fn seal(&self, plaintext: &[u8], aad: Aad<'_>) -> String {
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let nonce = XNonce::from_slice(&nonce_bytes);
        let aad_bytes = aad.bytes(&self.active.kid, ENVELOPE_VERSION);
        #[allow(clippy::expect_used)] // encryption with a valid key and nonce cannot fail
        let ct = self
            .active
            .cipher
            .encrypt(nonce, Payload { msg: plaintext, aad: &aad_bytes })
            .expect("XChaCha20-Poly1305 encryption");
        format!(
            "{ENVELOPE_VERSION}:{}:{}:{}",
            self.active.kid,
            URL_SAFE_NO_PAD.encode(nonce_bytes),
            URL_SAFE_NO_PAD.encode(ct)
        )
    }

    /// Seals a string.
    pub fn seal_str(&self, plaintext: &str, aad: Aad<'_>) -> String {
        self.seal(plaintext.as_bytes(), aad)
    }

    /// Opens an envelope sealed for the place `aad`.
    pub fn open(&self, envelope: &str, aad: Aad<'_>) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let mut parts = envelope.split(':');
        let (Some(version), Some(kid), Some(nonce), Some(ct), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Malformed);
        };
        if version != ENVELOPE_VERSION && version != LEGACY_ENVELOPE_VERSION {
            return Err(CryptoError::Malformed);
        }
        let key = std::iter::once(&self.active)
            .chain(self.retired.iter())
            .find(|k| k.kid == kid)
            .ok_or_else(|| CryptoError::UnknownKey(kid.to_string()))?;
        let nonce = URL_SAFE_NO_PAD.decode(nonce).map_err(|_| CryptoError::Malformed)?;
        if nonce.len() != NONCE_LEN {
            return Err(CryptoError::Malformed);
        }
        let ct = URL_SAFE_NO_PAD.decode(ct).map_err(|_| CryptoError::Malformed)?;
        let aad_bytes = aad.bytes(kid, version);
        key.cipher
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ct, aad: &aad_bytes })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Unauthentic)
    }

    /// Opens an envelope holding UTF-8 text.
    pub fn open_str(&self, envelope: &str, aad: Aad<'_>) -> Result<SecretString, CryptoError> {
        let bytes = self.open(envelope, aad)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| CryptoError::Malformed)?;
        Ok(SecretString::from(text.to_string()))
    }

    /// A fresh key check value for the active key: stored once, verified on every start.
    pub fn check_value(&self) -> String {
        self.seal(KEY_CHECK_PLAINTEXT, Aad::new("", "key_checks", &self.active.kid, "check"))
    }

    /// Whether `check` (a stored check value for `kid`) opens with this ring.
    pub fn verify_check_value(&self, kid: &str, check: &str) -> bool {
        matches!(
            self.open(check, Aad::new("", "key_checks", kid, "check")),
            Ok(plain) if plain.as_slice() == KEY_CHECK_PLAINTEXT
        )
    }

    /// The ids of the decrypt-only keys.
    pub fn retired_kids(&self) -> impl Iterator<Item = &str> {
        self.retired.iter().map(|k| k.kid.as_str())
    }

    /// Opens `envelope` (sealed with any key of the ring, in either envelope) and seals it again
    /// with the active key in the current envelope for the same place. An envelope that is both
    /// already is opened (so that a damaged one is reported) and returned as it is: `None`.
    pub fn rewrap(&self, envelope: &str, aad: Aad<'_>) -> Result<Option<String>, CryptoError> {
        let plain = self.open(envelope, aad)?;
        if envelope.starts_with(ENVELOPE_VERSION) && envelope_kid(envelope) == Some(self.active_kid()) {
            return Ok(None);
        }
        Ok(Some(self.seal(&plain, aad)))
    }

    /// Whether this ring holds a key with id `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.active.kid == kid || self.retired.iter().any(|k| k.kid == kid)
    }
}

/// The key id an envelope names, if it has the shape of either envelope.
pub fn envelope_kid(envelope: &str) -> Option<&str> {
    let mut parts = envelope.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ENVELOPE_VERSION | LEGACY_ENVELOPE_VERSION), Some(kid), Some(_)) => Some(kid),
        _ => None,
    }
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    #[allow(clippy::expect_used)] // without an OS random source no secret can be made safely
    rand::rngs::OsRng.try_fill_bytes(&mut buf).expect("the OS random number generator failed");
    buf
}

/// A URL-safe random token with 256 bits of entropy (43 characters).
pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// Lowercase hex SHA-256 of `data`: how tokens and keys are looked up without storing them.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Constant-time equality of two byte strings.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip() {
        let (ring, _) = KeyRing::generate();
        let env = ring.seal_str("hello", Aad::new("w1", "links", "1", "token"));
        assert!(env.starts_with(&format!("v2:{}:", ring.active_kid())));
        assert_eq!(
            ring.open_str(&env, Aad::new("w1", "links", "1", "token")).unwrap().expose_secret(),
            "hello"
        );
    }

    #[test]
    fn ciphertext_is_bound_to_its_row_and_column() {
        let (ring, _) = KeyRing::generate();
        let env = ring.seal_str("hello", Aad::new("w1", "links", "1", "token"));
        assert!(matches!(
            ring.open(&env, Aad::new("w1", "links", "2", "token")),
            Err(CryptoError::Unauthentic)
        ));
        assert!(matches!(
            ring.open(&env, Aad::new("w1", "links", "1", "other")),
            Err(CryptoError::Unauthentic)
        ));
        assert!(matches!(
            ring.open(&env, Aad::new("w1", "other", "1", "token")),
            Err(CryptoError::Unauthentic)
        ));
    }

    #[test]
    fn ciphertext_is_bound_to_its_workspace() {
        let (ring, _) = KeyRing::generate();
        let env = ring.seal_str("hello", Aad::new("w1", "connections", "c1", "access_token"));
        // The row moved to another workspace: its value no longer opens.
        let moved = Aad::new("w2", "connections", "c1", "access_token");
        assert!(matches!(ring.open(&env, moved), Err(CryptoError::Unauthentic)));
        assert!(ring.rewrap(&env, moved).is_err());
    }

    /// A value in the envelope of before the workspace was bound (`v1`), as stored databases
    /// hold them: it opens, and a re-wrap (with the same key) moves it to the current envelope.
    fn seal_legacy(ring: &KeyRing, plaintext: &str, aad: Aad<'_>) -> String {
        let nonce = random_bytes::<NONCE_LEN>();
        let ct = ring
            .active
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad.bytes(ring.active_kid(), LEGACY_ENVELOPE_VERSION),
                },
            )
            .unwrap();
        format!("v1:{}:{}:{}", ring.active_kid(), URL_SAFE_NO_PAD.encode(nonce), URL_SAFE_NO_PAD.encode(ct))
    }

    #[test]
    fn legacy_envelopes_open_and_are_rewrapped_into_the_current_one() {
        let (ring, _) = KeyRing::generate();
        let place = Aad::new("w1", "links", "l1", "token");
        let legacy = seal_legacy(&ring, "old", place);
        assert_eq!(envelope_kid(&legacy), Some(ring.active_kid()));
        assert_eq!(ring.open_str(&legacy, place).unwrap().expose_secret(), "old");
        // A legacy value names no workspace: any workspace opens it, until it is re-wrapped.
        let other = Aad::new("w2", "links", "l1", "token");
        assert!(ring.open(&legacy, other).is_ok());
        assert!(ring.open(&legacy, Aad::new("w1", "links", "l2", "token")).is_err());
        let current = ring.rewrap(&legacy, place).unwrap().expect("a legacy value is re-sealed");
        assert!(current.starts_with(&format!("v2:{}:", ring.active_kid())));
        assert_eq!(ring.open_str(&current, place).unwrap().expose_secret(), "old");
        assert!(ring.open(&current, other).is_err());
        assert!(ring.rewrap(&current, place).unwrap().is_none());
        // A legacy key check value still verifies.
        let check =
            seal_legacy(&ring, "authlink key check", Aad::new("", "key_checks", ring.active_kid(), "check"));
        assert!(ring.verify_check_value(ring.active_kid(), &check));
    }

    #[test]
    fn tampering_is_detected_without_panic() {
        let (ring, _) = KeyRing::generate();
        let env = ring.seal_str("hello", Aad::new("w1", "t", "r", "c"));
        // Flip each character of the ciphertext part in turn.
        let prefix_len = env.rfind(':').unwrap() + 1;
        for i in prefix_len..env.len() {
            let mut bytes = env.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            if tampered == env {
                continue;
            }
            assert!(ring.open(&tampered, Aad::new("w1", "t", "r", "c")).is_err());
        }
        assert!(matches!(ring.open("garbage", Aad::new("w1", "t", "r", "c")), Err(CryptoError::Malformed)));
        assert!(matches!(
            ring.open("v1:x:y:z:w", Aad::new("w1", "t", "r", "c")),
            Err(CryptoError::Malformed)
        ));
    }

    #[test]
    fn other_key_cannot_open_and_retired_keys_can() {
        let (old, old_b64) = KeyRing::generate();
        let (_, new_b64) = KeyRing::generate();
        let env = old.seal_str("v", Aad::new("w1", "t", "r", "c"));
        let new_only = KeyRing::from_base64(&new_b64, &[]).unwrap();
        assert!(matches!(
            new_only.open(&env, Aad::new("w1", "t", "r", "c")),
            Err(CryptoError::UnknownKey(_))
        ));
        let rotated = KeyRing::from_base64(&new_b64, &[old_b64]).unwrap();
        assert_eq!(rotated.open_str(&env, Aad::new("w1", "t", "r", "c")).unwrap().expose_secret(), "v");
        assert_ne!(rotated.active_kid(), old.active_kid());
    }

    #[test]
    fn rewrap_moves_a_value_to_the_active_key_and_keeps_its_place() {
        let (old, old_b64) = KeyRing::generate();
        let (_, new_b64) = KeyRing::generate();
        let place = Aad::new("w1", "connections", "c1", "access_token");
        let env = old.seal_str("secret", place);
        let rotated = KeyRing::from_base64(&new_b64, &[old_b64]).unwrap();
        assert_eq!(rotated.retired_kids().collect::<Vec<_>>(), vec![old.active_kid()]);
        let moved = rotated.rewrap(&env, place).unwrap().expect("an old-key value is re-sealed");
        assert_eq!(envelope_kid(&moved), Some(rotated.active_kid()));
        assert_eq!(rotated.active_kid().len(), KID_LEN);
        // Readable with the new key alone, only in its own place.
        let new_only = KeyRing::from_base64(&new_b64, &[]).unwrap();
        assert_eq!(new_only.open_str(&moved, place).unwrap().expose_secret(), "secret");
        assert!(new_only.open(&moved, Aad::new("w1", "connections", "c2", "access_token")).is_err());
        // Already current: left as it is. Damaged or moved: an error, never a re-seal.
        assert!(rotated.rewrap(&moved, place).unwrap().is_none());
        assert!(rotated.rewrap(&env, Aad::new("w1", "connections", "c2", "access_token")).is_err());
        assert!(rotated.rewrap("v1:deadbeef:AAAA:AAAA", place).is_err());
        assert_eq!(envelope_kid("garbage"), None);
    }

    #[test]
    fn key_check_value_detects_the_wrong_key() {
        let (a, _) = KeyRing::generate();
        let (b, _) = KeyRing::generate();
        let check = a.check_value();
        assert!(a.verify_check_value(a.active_kid(), &check));
        assert!(!b.verify_check_value(a.active_kid(), &check));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(KeyRing::from_base64(&SecretString::from("c2hvcnQ="), &[]).is_err());
        assert!(KeyRing::from_base64(&SecretString::from("not base64!"), &[]).is_err());
    }

    #[test]
    fn key_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        let ring = KeyRing::create_file(&path).unwrap();
        let again = KeyRing::from_file(&path).unwrap();
        assert_eq!(ring.active_kid(), again.active_kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(KeyRing::create_file(&path).is_err(), "never overwrites a key");
        assert_eq!(KeyRing::from_file(&path).unwrap().active_kid(), ring.active_kid(), "unchanged");
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["master.key"], "no temporary file is left");
        // A file that holds no key is named, and its content is not shown.
        for (content, why) in
            [("", "it is empty"), ("\n", "it is empty"), ("c2VjcmV0LXNob3J0", "it holds no key")]
        {
            let bad = dir.path().join("bad.key");
            std::fs::write(&bad, content).unwrap();
            let e = KeyRing::from_file(&bad).unwrap_err().to_string();
            assert!(e.contains(&bad.display().to_string()) && e.contains(why), "{e}");
            assert!(!e.contains("c2Vj"), "{e}");
            let mut ring = KeyRing::from_file(&path).unwrap();
            let e = ring.add_retired_file(&bad).unwrap_err().to_string();
            assert!(e.contains(&bad.display().to_string()) && e.contains(why), "{e}");
        }
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token());
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    /// Security matrix 16: a million link tokens, no two alike, each 43 characters of the
    /// URL-safe alphabet; every character of that alphabet is used at each of the first ten
    /// positions (a generator with a stuck or narrow position fails).
    #[test]
    fn a_million_tokens_are_distinct() {
        const N: usize = 1_000_000;
        let mut seen = std::collections::HashSet::with_capacity(N);
        let mut used = [[false; 128]; 10];
        for _ in 0..N {
            let t = random_token();
            assert_eq!(t.len(), 43);
            for (i, b) in t.bytes().take(10).enumerate() {
                used[i][usize::from(b)] = true;
            }
            assert!(seen.insert(t), "a token repeated");
        }
        for (i, chars) in used.iter().enumerate() {
            assert_eq!(chars.iter().filter(|u| **u).count(), 64, "position {i}");
        }
    }

    /// A key file other users can read is used, with a warning naming it; a private one without.
    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (_, key) = KeyRing::generate();
        std::fs::write(&path, key.expose_secret()).unwrap();
        let read_with_mode = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let (read, logged) = crate::telemetry::tests::logged(|| read_key_file(&path));
            assert_eq!(read.unwrap().expose_secret(), key.expose_secret());
            logged
        };
        let open = read_with_mode(0o644);
        assert!(open.contains("can be read by other users") && open.contains("master.key"), "{open}");
        assert!(!open.contains(key.expose_secret()), "the key is never logged");
        assert_eq!(read_with_mode(0o600), "");
    }
}
