//! Secrets at rest: AES-256-GCM under the node's key file (the seed's `key`/`iv`, in one file), and
//! PBKDF2-SHA256 password hashes. API secret keys must be recoverable (to check HMAC signatures)
//! so they are encrypted; passwords are only ever compared, so they are hashed.
//!
//! The database stores the key's fingerprint (`cloud_meta.key_fingerprint`); a server whose key
//! file differs refuses to start instead of failing later when it decrypts.

use crate::DbError;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use std::path::Path;

const PBKDF2_ROUNDS: u32 = 60_000;

/// The node's encryption key.
#[derive(Clone)]
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

    /// Load a key file (64 hex characters).
    pub fn load(path: &Path) -> Result<Key, DbError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DbError::Io { path: path.display().to_string(), source })?;
        Key::from_hex(text.trim()).map_err(|e| DbError::Crypto(format!("{}: {e}", path.display())))
    }

    pub fn from_hex(s: &str) -> Result<Key, String> {
        let v = hex::decode(s).map_err(|_| "the key file must hold 64 hex characters".to_string())?;
        let bytes: [u8; 32] = v.try_into().map_err(|_| "the key file must hold 64 hex characters".to_string())?;
        Ok(Key { bytes })
    }

    /// Write the key file with mode 0600, refusing to overwrite an existing one.
    pub fn save_new(&self, path: &Path) -> Result<(), DbError> {
        use std::io::Write;
        let io = |source| DbError::Io { path: path.display().to_string(), source };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io)?;
        f.write_all(format!("{}\n", hex::encode(self.bytes)).as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(())
    }

    /// Short public identity of the key, stored in the database.
    pub fn fingerprint(&self) -> String {
        let d = Sha256::digest(self.bytes);
        hex::encode(&d[..8])
    }

    /// Encrypt to `v1:<base64(nonce||ciphertext)>`.
    pub fn encrypt(&self, plain: &str) -> Result<String, DbError> {
        let cipher = Aes256Gcm::new_from_slice(&self.bytes).map_err(|_| DbError::Crypto("bad key length".into()))?;
        let nonce_bytes: [u8; 12] = rand::random();
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), plain.as_bytes())
            .map_err(|_| DbError::Crypto("encryption failed".into()))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&ct);
        Ok(format!("v1:{}", B64.encode(out)))
    }

    pub fn decrypt(&self, enc: &str) -> Result<String, DbError> {
        let bad = || {
            DbError::Crypto(
                "cannot decrypt a stored secret: this node's key file differs from the one that \
                 encrypted it"
                    .into(),
            )
        };
        let body = enc.strip_prefix("v1:").ok_or_else(bad)?;
        let raw = B64.decode(body).map_err(|_| bad())?;
        if raw.len() < 12 + 16 {
            return Err(bad());
        }
        let cipher = Aes256Gcm::new_from_slice(&self.bytes).map_err(|_| DbError::Crypto("bad key length".into()))?;
        let plain = cipher.decrypt(Nonce::from_slice(&raw[..12]), &raw[12..]).map_err(|_| bad())?;
        String::from_utf8(plain).map_err(|_| bad())
    }
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
}
