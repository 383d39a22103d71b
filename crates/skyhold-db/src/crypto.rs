//! Secrets at rest: AES-256-GCM under the node's key file (the seed's `key`/`iv`, in one file), and
//! PBKDF2-SHA256 password hashes. API secret keys must be recoverable (to check HMAC signatures)
//! so they are encrypted; passwords are only ever compared, so they are hashed.
//!
//! A key file holds a **key ring**: one 64-hex key per line, the first is the primary (it encrypts
//! `ENC(...)` values for config files), the others only decrypt (kept after a rotation so that
//! older values still open). A single-line file is a ring of one. Ciphertexts name their key:
//! `v2:<fingerprint>:<base64(nonce||ciphertext)>`; the older `v1:<base64>` form (no fingerprint) is
//! still read by trying every key of the ring.
//!
//! The database stores the cluster key's fingerprint (`cloud_meta.key_fingerprint`); a server whose
//! ring does not hold that key refuses to start instead of failing later when it decrypts.

use crate::DbError;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use std::path::Path;

const PBKDF2_ROUNDS: u32 = 60_000;

fn undecryptable() -> DbError {
    DbError::Crypto(
        "cannot decrypt a stored secret: this node's key file differs from the one that encrypted it".into(),
    )
}

/// One AES-256 key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

impl Key {
    pub fn generate() -> Key {
        Key { bytes: rand::random() }
    }

    /// Load a key file and return its primary key.
    pub fn load(path: &Path) -> Result<Key, DbError> {
        Ok(KeyRing::load(path)?.primary().clone())
    }

    pub fn from_hex(s: &str) -> Result<Key, String> {
        let v = hex::decode(s).map_err(|_| "the key file must hold 64 hex characters per line".to_string())?;
        let bytes: [u8; 32] =
            v.try_into().map_err(|_| "the key file must hold 64 hex characters per line".to_string())?;
        Ok(Key { bytes })
    }

    /// Write a key file holding only this key, mode 0600, refusing to overwrite an existing one.
    pub fn save_new(&self, path: &Path) -> Result<(), DbError> {
        KeyRing::new(self.clone()).save_new(path)
    }

    /// Short public identity of the key, stored in the database.
    pub fn fingerprint(&self) -> String {
        let d = Sha256::digest(self.bytes);
        hex::encode(&d[..8])
    }

    /// Encrypt to `v2:<fingerprint>:<base64(nonce||ciphertext)>`.
    pub fn encrypt(&self, plain: &str) -> Result<String, DbError> {
        let cipher = Aes256Gcm::new_from_slice(&self.bytes).map_err(|_| DbError::Crypto("bad key length".into()))?;
        let nonce_bytes: [u8; 12] = rand::random();
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), plain.as_bytes())
            .map_err(|_| DbError::Crypto("encryption failed".into()))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&ct);
        Ok(format!("v2:{}:{}", self.fingerprint(), B64.encode(out)))
    }

    /// Decrypt a `v2:` value made by this key or a `v1:` value.
    pub fn decrypt(&self, enc: &str) -> Result<String, DbError> {
        match parse_ciphertext(enc)? {
            (Some(fp), body) if fp == self.fingerprint() => self.open(&body),
            (Some(fp), _) => Err(DbError::Crypto(format!(
                "cannot decrypt a stored secret: it was encrypted with key {fp}, not with this key ({})",
                self.fingerprint()
            ))),
            (None, body) => self.open(&body),
        }
    }

    fn open(&self, raw: &[u8]) -> Result<String, DbError> {
        if raw.len() < 12 + 16 {
            return Err(undecryptable());
        }
        let cipher = Aes256Gcm::new_from_slice(&self.bytes).map_err(|_| DbError::Crypto("bad key length".into()))?;
        let plain = cipher.decrypt(Nonce::from_slice(&raw[..12]), &raw[12..]).map_err(|_| undecryptable())?;
        String::from_utf8(plain).map_err(|_| undecryptable())
    }
}

/// `(fingerprint for v2, nonce||ciphertext)`.
fn parse_ciphertext(enc: &str) -> Result<(Option<&str>, Vec<u8>), DbError> {
    if let Some(rest) = enc.strip_prefix("v2:") {
        let (fp, body) = rest.split_once(':').ok_or_else(undecryptable)?;
        let raw = B64.decode(body).map_err(|_| undecryptable())?;
        return Ok((Some(fp), raw));
    }
    let body = enc.strip_prefix("v1:").ok_or_else(undecryptable)?;
    Ok((None, B64.decode(body).map_err(|_| undecryptable())?))
}

/// The fingerprint a `v2:` ciphertext names (`None` for `v1:` values and garbage).
pub fn ciphertext_fingerprint(enc: &str) -> Option<&str> {
    enc.strip_prefix("v2:").and_then(|r| r.split_once(':')).map(|(fp, _)| fp)
}

/// An ordered set of keys: the first (primary) encrypts, every key decrypts. Never empty.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRing {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.fingerprints()).finish()
    }
}

impl From<Key> for KeyRing {
    fn from(k: Key) -> KeyRing {
        KeyRing::new(k)
    }
}

impl KeyRing {
    pub fn new(primary: Key) -> KeyRing {
        KeyRing { keys: vec![primary] }
    }

    /// A ring from keys in order (duplicates dropped, first kept); `None` if `keys` is empty.
    pub fn from_keys(keys: Vec<Key>) -> Option<KeyRing> {
        let mut out: Vec<Key> = Vec::with_capacity(keys.len());
        for k in keys {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        (!out.is_empty()).then_some(KeyRing { keys: out })
    }

    pub fn primary(&self) -> &Key {
        &self.keys[0]
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(Key::fingerprint).collect()
    }

    /// The key with this fingerprint.
    pub fn get(&self, fingerprint: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.fingerprint() == fingerprint)
    }

    pub fn contains(&self, fingerprint: &str) -> bool {
        self.get(fingerprint).is_some()
    }

    /// Encrypt with the primary key.
    pub fn encrypt(&self, plain: &str) -> Result<String, DbError> {
        self.primary().encrypt(plain)
    }

    /// Decrypt with the key a `v2:` value names, or (for `v1:`) with whichever key opens it.
    pub fn decrypt(&self, enc: &str) -> Result<String, DbError> {
        match parse_ciphertext(enc)? {
            (Some(fp), body) => match self.get(fp) {
                Some(k) => k.open(&body),
                None => Err(DbError::Crypto(format!(
                    "cannot decrypt a stored secret: it was encrypted with key {fp}, which this node's key file \
                     does not hold (it holds {})",
                    self.fingerprints().join(", ")
                ))),
            },
            (None, body) => self.keys.iter().find_map(|k| k.open(&body).ok()).ok_or_else(undecryptable),
        }
    }

    /// This ring with `k` appended (unchanged if it already holds it).
    pub fn with_added(&self, k: Key) -> KeyRing {
        let mut keys = self.keys.clone();
        if !keys.contains(&k) {
            keys.push(k);
        }
        KeyRing { keys }
    }

    /// This ring with the key `fingerprint` moved to the front, the others in their order.
    pub fn promoted(&self, fingerprint: &str) -> Option<KeyRing> {
        let k = self.get(fingerprint)?.clone();
        let mut keys = vec![k.clone()];
        keys.extend(self.keys.iter().filter(|x| **x != k).cloned());
        Some(KeyRing { keys })
    }

    /// Encrypt key `k` under this ring's key `fingerprint`, to hand it to the nodes through the
    /// database (a staged rotation).
    pub fn wrap_key(&self, fingerprint: &str, k: &Key) -> Result<String, DbError> {
        let w = self.get(fingerprint).ok_or_else(|| DbError::Crypto(format!("no key {fingerprint} in the ring")))?;
        w.encrypt(&hex::encode(k.bytes))
    }

    /// The key inside a value made by [`KeyRing::wrap_key`].
    pub fn unwrap_key(&self, wrapped: &str) -> Result<Key, DbError> {
        let hex = self.decrypt(wrapped)?;
        Key::from_hex(&hex).map_err(|_| DbError::Crypto("the wrapped key is malformed".into()))
    }

    /// Parse a key file's text: one 64-hex key per line, blank lines and `#` comments ignored.
    pub fn parse(text: &str) -> Result<KeyRing, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(Key::from_hex(line).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        KeyRing::from_keys(keys).ok_or_else(|| "the key file holds no key (64 hex characters per line)".to_string())
    }

    /// The key file's text (the primary first). A ring of one is the old single-line format.
    pub fn to_text(&self) -> String {
        self.keys.iter().map(|k| format!("{}\n", hex::encode(k.bytes))).collect()
    }

    pub fn load(path: &Path) -> Result<KeyRing, DbError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DbError::Io { path: path.display().to_string(), source })?;
        KeyRing::parse(&text).map_err(|e| DbError::Crypto(format!("{}: {e}", path.display())))
    }

    /// Write a new key file with mode 0600, refusing to overwrite an existing one.
    pub fn save_new(&self, path: &Path) -> Result<(), DbError> {
        use std::io::Write;
        let io = |source| DbError::Io { path: path.display().to_string(), source };
        let mut f = private_options().create_new(true).open(path).map_err(io)?;
        f.write_all(self.to_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(())
    }

    /// Replace the key file atomically: a temporary file in the same directory (mode 0600),
    /// fsync, rename over the old one, fsync the directory. A crash leaves the old or the new file,
    /// never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), DbError> {
        use std::io::Write;
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| DbError::Io { path: p, source }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "key".into());
        let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), random_token(6)));
        let res = (|| {
            let mut f = private_options().create_new(true).open(&tmp).map_err(io(&tmp))?;
            f.write_all(self.to_text().as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, path).map_err(io(path))?;
            if let Ok(d) = std::fs::File::open(&dir) {
                d.sync_all().map_err(io(&dir))?;
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

fn private_options() -> std::fs::OpenOptions {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Hash a password for storage.
pub fn password_hash(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, PBKDF2_ROUNDS, &mut out);
    format!("pbkdf2-sha256${PBKDF2_ROUNDS}${}${}", B64.encode(salt), B64.encode(out))
}

/// Check a password against a stored hash, in constant time.
pub fn password_verify(password: &str, stored: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [scheme, rounds, salt, hash] = parts.as_slice() else {
        return false;
    };
    if *scheme != "pbkdf2-sha256" {
        return false;
    }
    let (Ok(rounds), Ok(salt), Ok(hash)) = (rounds.parse::<u32>(), B64.decode(salt), B64.decode(hash)) else {
        return false;
    };
    if rounds == 0 || rounds > 10_000_000 || hash.len() != 32 {
        return false;
    }
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, rounds, &mut out);
    out.iter().zip(hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A random token of `n` bytes, URL-safe base64 without padding (API keys, session ids).
pub fn random_token(n: usize) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Hex SHA-256 of `data` (join-token hashes).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypt_roundtrip_and_wrong_key() {
        let k = Key::generate();
        let e = k.encrypt("s3cret").unwrap();
        assert!(!e.contains("s3cret"));
        assert_eq!(k.decrypt(&e).unwrap(), "s3cret");
        let other = Key::generate();
        assert!(other.decrypt(&e).is_err());
        assert!(k.decrypt("garbage").is_err());
        assert_ne!(k.fingerprint(), other.fingerprint());
    }

    #[test]
    fn passwords() {
        let h = password_hash("password");
        assert!(password_verify("password", &h));
        assert!(!password_verify("Password", &h));
        assert!(!password_verify("password", "nonsense"));
    }

    #[test]
    fn key_file_roundtrip() {
        let dir = std::env::temp_dir().join(format!("skyhold-key-{}", random_token(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key");
        let k = Key::generate();
        k.save_new(&p).unwrap();
        assert!(k.save_new(&p).is_err(), "must not overwrite");
        assert_eq!(Key::load(&p).unwrap().fingerprint(), k.fingerprint());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `v1:` value as the previous release wrote it.
    fn v1(k: &Key, plain: &str) -> String {
        let v2 = k.encrypt(plain).unwrap();
        let body = v2.rsplit_once(':').unwrap().1;
        format!("v1:{body}")
    }

    #[test]
    fn ring_decrypts_v1_and_v2_by_fingerprint() {
        let (k1, k2, k3) = (Key::generate(), Key::generate(), Key::generate());
        let ring = KeyRing::from_keys(vec![k2.clone(), k1.clone()]).unwrap();
        assert_eq!(ring.primary(), &k2);
        // v2 carries the key's fingerprint; the ring picks that key.
        let e1 = k1.encrypt("one").unwrap();
        assert!(e1.starts_with(&format!("v2:{}:", k1.fingerprint())), "{e1}");
        assert_eq!(ciphertext_fingerprint(&e1), Some(k1.fingerprint().as_str()));
        assert_eq!(ring.decrypt(&e1).unwrap(), "one");
        let e2 = ring.encrypt("two").unwrap();
        assert_eq!(ciphertext_fingerprint(&e2), Some(k2.fingerprint().as_str()), "the primary encrypts");
        assert_eq!(ring.decrypt(&e2).unwrap(), "two");
        assert!(k1.decrypt(&e2).is_err(), "a single key refuses another key's v2 value");
        // v1 (no fingerprint): whichever key opens it.
        assert_eq!(ring.decrypt(&v1(&k1, "old")).unwrap(), "old");
        assert_eq!(k1.decrypt(&v1(&k1, "old")).unwrap(), "old");
        assert!(KeyRing::new(k3.clone()).decrypt(&v1(&k1, "old")).is_err());
        // A key the ring does not hold is named in the error.
        let e3 = k3.encrypt("three").unwrap();
        let err = ring.decrypt(&e3).unwrap_err().to_string();
        assert!(err.contains(&k3.fingerprint()), "{err}");
        // A v2 value whose fingerprint was altered does not open with another key.
        let forged = e1.replacen(&k1.fingerprint(), &k2.fingerprint(), 1);
        assert!(ring.decrypt(&forged).is_err());
        assert!(ring.decrypt("v2:nocolon").is_err() && ring.decrypt("v3:x:y").is_err());
    }

    #[test]
    fn ring_promote_add_and_wrap() {
        let (k1, k2) = (Key::generate(), Key::generate());
        let ring = KeyRing::new(k1.clone()).with_added(k2.clone()).with_added(k1.clone());
        assert_eq!(ring.fingerprints(), vec![k1.fingerprint(), k2.fingerprint()]);
        let p = ring.promoted(&k2.fingerprint()).unwrap();
        assert_eq!(p.fingerprints(), vec![k2.fingerprint(), k1.fingerprint()]);
        assert!(ring.promoted("0000000000000000").is_none());
        let wrapped = KeyRing::new(k1.clone()).wrap_key(&k1.fingerprint(), &k2).unwrap();
        assert!(!wrapped.contains(&hex::encode(k2.bytes)));
        assert_eq!(KeyRing::new(k1.clone()).unwrap_key(&wrapped).unwrap(), k2);
        assert!(KeyRing::new(k2).unwrap_key(&wrapped).is_err(), "only the wrapping key unwraps");
        assert!(KeyRing::from_keys(vec![]).is_none());
    }

    #[test]
    fn ring_file_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let (k1, k2) = (Key::generate(), Key::generate());
        // An old single-line file is a ring of one.
        std::fs::write(&p, format!("{}\n", hex::encode(k1.bytes))).unwrap();
        assert_eq!(KeyRing::load(&p).unwrap(), KeyRing::new(k1.clone()));
        // Atomic replace with a ring; the order is kept, the mode is 0600, no temp file is left.
        let ring = KeyRing::from_keys(vec![k2.clone(), k1.clone()]).unwrap();
        ring.save(&p).unwrap();
        assert_eq!(KeyRing::load(&p).unwrap(), ring);
        assert_eq!(Key::load(&p).unwrap(), k2, "Key::load reads the primary");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        // Comments and blank lines are ignored; a bad line is named.
        let text = format!("# ring\n\n{}\n  {}  \n", hex::encode(k1.bytes), hex::encode(k2.bytes));
        assert_eq!(KeyRing::parse(&text).unwrap().fingerprints(), vec![k1.fingerprint(), k2.fingerprint()]);
        let e = KeyRing::parse(&format!("{}\nxyz\n", hex::encode(k1.bytes))).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(KeyRing::parse("\n# nothing\n").is_err());
    }
}
