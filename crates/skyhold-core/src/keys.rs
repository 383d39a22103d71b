//! The node's key ring, held so it can be swapped while the server runs, and the cluster-wide key
//! rotation (`skyhold keys rotate`).
//!
//! The rotation protocol, in `cloud_meta` (K1 the cluster key, K2 the new one):
//!
//! 1. **Stage** (`rotate_stage`, one transaction): `key_staged` = K2 wrapped (encrypted) under K1,
//!    `key_staged_fingerprint`, `key_staged_ms`; event `KEY.ROTATE.STAGED`.
//! 2. **Adopt** (`sync`, every server, every second, and at start): a server that sees a staged
//!    key it does not hold unwraps it with K1, rewrites its key file as [K1, K2] (atomically,
//!    fsynced), switches its in-memory ring, and only then writes `key_ack.<ms id>` = fp(K2).
//! 3. **Commit** (`rotate_commit`, one transaction, only when every management server that is not
//!    Down has acknowledged, checked inside that transaction): every encrypted value is re-encrypted
//!    under K2, `key_fingerprint` = K2, `key_previous_fingerprint` = K1, `key_rotated_ms`; the
//!    staged key and the acknowledgements are deleted; event `KEY.ROTATE.DONE`.
//! 4. **Promote** (`sync`): a server whose ring holds the cluster key as a non-primary key moves it
//!    to the front: key file [K2, K1]. K1 stays to decrypt old `ENC(...)` values in config files
//!    until the operator runs `skyhold keys forget-retired`.
//!
//! Invariant: no server ever sees a ciphertext it cannot decrypt. Before the commit every stored
//! value is under K1, which every server holds; the commit happens only when every live server
//! holds K2 as well, and a server that registers after the commit's check re-runs `sync` before
//! serving: it either finds the key still staged (and adopts it) or finds the rotation done and
//! refuses to start. Writers of new encrypted values (`cluster_key_locked`) lock the
//! `key_fingerprint` row, so they encrypt under the key the cluster has when they commit.

use crate::{Core, CoreError};
use skyhold_db::config::{meta_get, meta_set};
use skyhold_db::crypto::{Key, KeyRing, ciphertext_fingerprint};
use skyhold_db::ms::{MgmtServer, ms_list};
use skyhold_db::secrets::{meta_delete_prefix, meta_get_locked, meta_list_prefix, user_secret_list, user_secret_set};
use skyhold_db::{Db, Sql, now_ms, retry_tx};
use skyhold_types::{CsError, ErrorCode};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub const META_FINGERPRINT: &str = "key_fingerprint";
pub const META_PREVIOUS: &str = "key_previous_fingerprint";
pub const META_ROTATED_MS: &str = "key_rotated_ms";
pub const META_STAGED: &str = "key_staged";
pub const META_STAGED_FP: &str = "key_staged_fingerprint";
pub const META_STAGED_MS: &str = "key_staged_ms";
/// `key_ack.<ms id>`: the staged key's fingerprint, once that server's key file holds it.
pub const META_ACK_PREFIX: &str = "key_ack.";

/// The `cloud_meta` name of a server's acknowledgement. Names hold 64 characters: an id longer
/// than fits is replaced by a digest of it.
pub fn ack_name(ms_id: &str) -> String {
    if META_ACK_PREFIX.len() + ms_id.len() <= 64 {
        format!("{META_ACK_PREFIX}{ms_id}")
    } else {
        format!("{META_ACK_PREFIX}sha256:{}", &skyhold_db::crypto::sha256_hex(ms_id.as_bytes())[..40])
    }
}

/// How often a server looks for a staged or promoted key.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The node's key ring: in memory (swapped atomically) and, for a server, in its key file.
pub struct NodeKeys {
    path: Option<PathBuf>,
    ring: RwLock<Arc<KeyRing>>,
    /// Serialises read-modify-write of the key file within this process.
    file: Mutex<()>,
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKeys({:?}, {:?})", self.path, self.current())
    }
}

impl NodeKeys {
    /// `path`: the key file the ring was read from and is rewritten to (`None`: memory only).
    pub fn new(ring: KeyRing, path: Option<PathBuf>) -> NodeKeys {
        NodeKeys { path, ring: RwLock::new(Arc::new(ring)), file: Mutex::new(()) }
    }

    /// The ring as it is now.
    pub fn current(&self) -> Arc<KeyRing> {
        match self.ring.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn path_display(&self) -> String {
        self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "the key file".into())
    }

    /// Change the ring: `f` gets the key file's ring as it is on disk now (another process on
    /// this node may share the file), returns the new one or `None` for no change. The file is
    /// written first (atomically), then the in-memory ring switched. Returns whether it changed.
    pub fn update(&self, f: impl FnOnce(&KeyRing) -> Option<KeyRing>) -> Result<bool, CoreError> {
        let _g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let base = match &self.path {
            Some(p) => KeyRing::load(p)?,
            None => (*self.current()).clone(),
        };
        let Some(new) = f(&base) else { return Ok(false) };
        if new != base
            && let Some(p) = &self.path
        {
            new.save(p)?;
        }
        let changed = *self.current() != new;
        match self.ring.write() {
            Ok(mut w) => *w = Arc::new(new),
            Err(p) => *p.into_inner() = Arc::new(new),
        }
        Ok(changed)
    }
}

/// A staged rotation.
#[derive(Debug, Clone)]
pub struct Staged {
    pub fingerprint: String,
    /// The new key, encrypted under the cluster key.
    pub wrapped: String,
    pub staged_ms: Option<i64>,
}

/// The key state in `cloud_meta`.
#[derive(Debug, Clone, Default)]
pub struct KeyState {
    pub cluster_fingerprint: Option<String>,
    pub previous_fingerprint: Option<String>,
    pub rotated_ms: Option<i64>,
    pub staged: Option<Staged>,
    /// `(ack name, acknowledged fingerprint)`, see [`ack_name`].
    pub acks: Vec<(String, String)>,
}

impl KeyState {
    pub fn ack_of(&self, ms_id: &str) -> Option<&str> {
        let name = ack_name(ms_id);
        self.acks.iter().find(|(n, _)| *n == name).map(|(_, fp)| fp.as_str())
    }
}

/// Read the key state (one query).
pub async fn read_state(c: &mut dyn Sql) -> Result<KeyState, CoreError> {
    let mut st = KeyState::default();
    let (mut staged_fp, mut wrapped, mut staged_ms) = (None, None, None);
    for (name, value) in meta_list_prefix(c, "key_").await? {
        match name.as_str() {
            META_FINGERPRINT => st.cluster_fingerprint = Some(value),
            META_PREVIOUS => st.previous_fingerprint = Some(value),
            META_ROTATED_MS => st.rotated_ms = value.parse().ok(),
            META_STAGED => wrapped = Some(value),
            META_STAGED_FP => staged_fp = Some(value),
            META_STAGED_MS => staged_ms = value.parse().ok(),
            n if n.starts_with(META_ACK_PREFIX) => st.acks.push((name, value)),
            _ => {}
        }
    }
    if let (Some(fingerprint), Some(wrapped)) = (staged_fp, wrapped) {
        st.staged = Some(Staged { fingerprint, wrapped, staged_ms });
    }
    Ok(st)
}

/// "encryption key does not match the cluster's key", with when the cluster's key was rotated if
/// this ring holds only older keys.
pub fn mismatch(key_path: &str, st: &KeyState, ring: &KeyRing) -> CoreError {
    let mut msg = format!("encryption key does not match the cluster's key: copy {key_path} from an existing node");
    if let Some(ms) = st.rotated_ms {
        let when = skyhold_types::time::cs_date(ms);
        if st.previous_fingerprint.as_deref().is_some_and(|p| ring.contains(p)) {
            msg.push_str(&format!(
                " (the cluster's key was rotated at {when}; this key file holds only the previous key {})",
                st.previous_fingerprint.as_deref().unwrap_or_default()
            ));
        } else {
            msg.push_str(&format!(" (the cluster's key was last rotated at {when})"));
        }
    }
    CoreError::Cs(CsError::new(ErrorCode::Internal, msg))
}

fn not_initialised() -> CoreError {
    CoreError::Cs(CsError::new(ErrorCode::Internal, "the database is not initialised: run `skyhold db init`"))
}

/// Refuse a ring that does not hold the cluster's key (for commands that only read).
pub async fn check_ring(db: &Db, ring: &KeyRing, key_path: &str) -> Result<KeyState, CoreError> {
    let mut c = db.conn().await?;
    let st = read_state(&mut c).await?;
    match st.cluster_fingerprint.as_deref() {
        None => Err(not_initialised()),
        Some(fp) if ring.contains(fp) => Ok(st),
        Some(_) => Err(mismatch(key_path, &st, ring)),
    }
}

/// At server start, before anything is decrypted: refuse a ring without the cluster's key; adopt
/// a staged key; make the cluster's key primary if it is not.
pub async fn check_at_start(db: &Db, keys: &NodeKeys) -> Result<(), CoreError> {
    let st = check_ring(db, &keys.current(), &keys.path_display()).await?;
    adopt_and_promote(keys, &st)?;
    Ok(())
}

/// Adopt a staged key (returns whether the ring now holds it) and promote the cluster's key.
fn adopt_and_promote(keys: &NodeKeys, st: &KeyState) -> Result<bool, CoreError> {
    let mut holds_staged = false;
    if let Some(s) = &st.staged {
        let ring = keys.current();
        if ring.contains(&s.fingerprint) {
            // Already in memory; make sure the file holds it too (the file was replaced).
            if let Some(k) = ring.get(&s.fingerprint).cloned() {
                keys.update(|r| (!r.contains(&s.fingerprint)).then(|| r.with_added(k)))?;
            }
            holds_staged = true;
        } else {
            let k = ring.unwrap_key(&s.wrapped)?;
            if k.fingerprint() != s.fingerprint {
                return Err(CoreError::Cs(CsError::internal(format!(
                    "the staged key's fingerprint is {} but cloud_meta says {}",
                    k.fingerprint(),
                    s.fingerprint
                ))));
            }
            keys.update(|r| Some(r.with_added(k.clone())))?;
            tracing::info!(
                staged = %s.fingerprint,
                key_file = %keys.path_display(),
                "added the staged encryption key to the key ring (it only decrypts until the rotation completes)"
            );
            holds_staged = true;
        }
    }
    if let Some(cluster) = &st.cluster_fingerprint {
        let ring = keys.current();
        if ring.primary().fingerprint() != *cluster && ring.contains(cluster) && keys.update(|r| r.promoted(cluster))? {
            tracing::info!(
                fingerprint = %cluster,
                key_file = %keys.path_display(),
                "the cluster's encryption key is now this node's primary key"
            );
        }
    }
    Ok(holds_staged)
}

/// One pass of the key watcher: adopt and acknowledge a staged key, promote the cluster's key.
/// Errs with the mismatch message when the cluster's key is not in this server's ring.
pub async fn sync(core: &Core) -> Result<(), CoreError> {
    let keys = core.node_keys();
    let st = {
        let mut c = core.db().conn().await?;
        read_state(&mut c).await?
    };
    let Some(cluster) = st.cluster_fingerprint.clone() else { return Ok(()) };
    if !keys.current().contains(&cluster) {
        return Err(mismatch(&keys.path_display(), &st, &keys.current()));
    }
    let holds_staged = adopt_and_promote(keys, &st)?;
    if let Some(s) = &st.staged
        && holds_staged
        && st.ack_of(&core.ms().id) != Some(s.fingerprint.as_str())
    {
        let mut c = core.db().conn().await?;
        meta_set(&mut c, &ack_name(&core.ms().id), &s.fingerprint).await?;
        tracing::info!(staged = %s.fingerprint, "acknowledged the staged encryption key");
    }
    Ok(())
}

/// Right after registering, before serving: a rotation may have completed between the start-up
/// check and the registration (the rotation did not wait for a server it could not see). Errs
/// only when this server cannot decrypt the cluster's values.
pub async fn check_after_register(core: &Core) -> Result<(), CoreError> {
    match sync(core).await {
        Err(CoreError::Db(e)) => {
            tracing::warn!(error = %e, "could not check the encryption key state; retrying in the background");
            Ok(())
        }
        other => other,
    }
}

/// The key watcher: [`sync`] every [`SYNC_INTERVAL`].
pub async fn run(core: Core) {
    let mut last_err: Option<String> = None;
    loop {
        tokio::time::sleep(SYNC_INTERVAL).await;
        match sync(&core).await {
            Ok(()) => last_err = None,
            Err(e) => {
                let text = e.to_string();
                if last_err.as_deref() != Some(text.as_str()) {
                    match &e {
                        CoreError::Db(_) => tracing::warn!(error = %text, "could not check the encryption key state"),
                        _ => tracing::error!(error = %text, "encryption key problem"),
                    }
                    last_err = Some(text);
                }
            }
        }
    }
}

/// The key a new database value is encrypted with: the cluster's key (its `cloud_meta` row locked
/// until the caller's transaction ends, so a rotation cannot commit in between), or the primary
/// before `db init` has recorded one.
pub async fn cluster_key_locked(c: &mut dyn Sql, ring: &KeyRing) -> Result<Key, CoreError> {
    match meta_get_locked(c, META_FINGERPRINT).await? {
        None => Ok(ring.primary().clone()),
        Some(fp) => ring.get(&fp).cloned().ok_or_else(|| {
            CoreError::Cs(CsError::internal(format!(
                "encryption key does not match the cluster's key ({fp}): this node's key ring holds {}",
                ring.fingerprints().join(", ")
            )))
        }),
    }
}

/// Stage a rotation, or find the one already staged. Returns the new key and whether this call
/// staged it.
pub async fn rotate_stage(db: &Db, ring: &KeyRing, key_path: &str) -> Result<(Key, bool), CoreError> {
    let owner = {
        let mut c = db.conn().await?;
        crate::events::system_owner(&mut c).await?
    };
    retry_tx!(db, |tx| {
        async {
            let cluster = meta_get_locked(&mut tx, META_FINGERPRINT).await?.ok_or_else(not_initialised)?;
            let st = read_state(&mut tx).await?;
            if !ring.contains(&cluster) {
                return Err(mismatch(key_path, &st, ring));
            }
            if let Some(s) = &st.staged {
                let k = ring.unwrap_key(&s.wrapped)?;
                return Ok((k, false));
            }
            let k = Key::generate();
            let now = now_ms(&mut tx).await?;
            meta_set(&mut tx, META_STAGED, &ring.wrap_key(&cluster, &k)?).await?;
            meta_set(&mut tx, META_STAGED_FP, &k.fingerprint()).await?;
            meta_set(&mut tx, META_STAGED_MS, &now.to_string()).await?;
            meta_delete_prefix(&mut tx, META_ACK_PREFIX).await?;
            crate::events::record(
                &mut tx,
                &owner,
                "KEY.ROTATE.STAGED",
                "INFO",
                format!(
                    "Encryption key rotation staged: {cluster} -> {}; waiting for every management server",
                    k.fingerprint()
                ),
                None,
            )
            .await?;
            Ok((k, true))
        }
        .await
    })
}

/// Management servers that are not Down and have not acknowledged `fingerprint`.
pub async fn rotate_pending(c: &mut dyn Sql, fingerprint: &str) -> Result<Vec<MgmtServer>, CoreError> {
    let st = read_state(c).await?;
    let servers = ms_list(c).await?;
    Ok(servers.into_iter().filter(|m| m.state != "Down" && st.ack_of(&m.id) != Some(fingerprint)).collect())
}

/// What [`rotate_commit`] did.
#[derive(Debug, Clone)]
pub enum Commit {
    /// The cluster key is now the new key.
    Done { previous: String, users: usize, rotated_ms: i64 },
    /// Not yet: these servers have not acknowledged (nothing was changed).
    Waiting(Vec<MgmtServer>),
    /// Another `rotate` already finished this rotation.
    AlreadyDone,
}

/// Finish a staged rotation in one transaction, if every server that is not Down has
/// acknowledged the new key (checked inside the transaction).
pub async fn rotate_commit(db: &Db, ring: &KeyRing, new: &Key, key_path: &str) -> Result<Commit, CoreError> {
    let owner = {
        let mut c = db.conn().await?;
        crate::events::system_owner(&mut c).await?
    };
    let fp2 = new.fingerprint();
    let both = ring.with_added(new.clone());
    retry_tx!(db, |tx| {
        async {
            let cluster = meta_get_locked(&mut tx, META_FINGERPRINT).await?.ok_or_else(not_initialised)?;
            if cluster == fp2 {
                return Ok(Commit::AlreadyDone);
            }
            let st = read_state(&mut tx).await?;
            if !ring.contains(&cluster) {
                return Err(mismatch(key_path, &st, ring));
            }
            if st.staged.as_ref().map(|s| s.fingerprint.as_str()) != Some(fp2.as_str()) {
                return Err(CoreError::Cs(CsError::internal(format!(
                    "the rotation to key {fp2} is no longer staged (aborted, or replaced by another rotation)"
                ))));
            }
            let waiting = rotate_pending(&mut tx, &fp2).await?;
            if !waiting.is_empty() {
                return Ok(Commit::Waiting(waiting));
            }
            // Every encrypted value, under the new key. A value no key of the ring opens stops
            // the rotation (nothing is changed): better than losing it.
            let users = user_secret_list(&mut tx).await?;
            for (id, enc) in &users {
                let plain = both.decrypt(enc).map_err(|e| {
                    CoreError::Cs(CsError::internal(format!("cannot re-encrypt the API secret of user {id}: {e}")))
                })?;
                user_secret_set(&mut tx, id, &new.encrypt(&plain)?).await?;
            }
            if let Some(enc) = meta_get(&mut tx, "cluster_secret").await? {
                let plain = both.decrypt(&enc).map_err(|e| {
                    CoreError::Cs(CsError::internal(format!("cannot re-encrypt the cluster secret: {e}")))
                })?;
                meta_set(&mut tx, "cluster_secret", &new.encrypt(&plain)?).await?;
            }
            let now = now_ms(&mut tx).await?;
            meta_set(&mut tx, META_FINGERPRINT, &fp2).await?;
            meta_set(&mut tx, META_PREVIOUS, &cluster).await?;
            meta_set(&mut tx, META_ROTATED_MS, &now.to_string()).await?;
            meta_delete_prefix(&mut tx, META_STAGED).await?;
            meta_delete_prefix(&mut tx, META_ACK_PREFIX).await?;
            crate::events::record(
                &mut tx,
                &owner,
                "KEY.ROTATE.DONE",
                "INFO",
                format!(
                    "Encryption key rotated: {cluster} -> {fp2}; {} API secrets and the cluster secret re-encrypted",
                    users.len()
                ),
                None,
            )
            .await?;
            Ok(Commit::Done { previous: cluster, users: users.len(), rotated_ms: now })
        }
        .await
    })
}

/// Drop a staged rotation. Servers keep the unused key in their rings (harmless; `forget-retired`
/// drops it). Returns the fingerprint of the key that was staged.
pub async fn rotate_abort(db: &Db) -> Result<Option<String>, CoreError> {
    let owner = {
        let mut c = db.conn().await?;
        crate::events::system_owner(&mut c).await?
    };
    retry_tx!(db, |tx| {
        async {
            let _ = meta_get_locked(&mut tx, META_FINGERPRINT).await?;
            let st = read_state(&mut tx).await?;
            let Some(s) = st.staged else { return Ok(None) };
            meta_delete_prefix(&mut tx, META_STAGED).await?;
            meta_delete_prefix(&mut tx, META_ACK_PREFIX).await?;
            crate::events::record(
                &mut tx,
                &owner,
                "KEY.ROTATE.ABORTED",
                "WARN",
                format!("Encryption key rotation to {} aborted", s.fingerprint),
                None,
            )
            .await?;
            Ok(Some(s.fingerprint))
        }
        .await
    })
}

/// Fingerprints of the stored secrets' keys (`None` for `v1:` values), for `keys show`.
pub async fn stored_key_usage(c: &mut dyn Sql) -> Result<Vec<(Option<String>, usize)>, CoreError> {
    let mut values: Vec<String> = user_secret_list(c).await?.into_iter().map(|(_, e)| e).collect();
    if let Some(s) = meta_get(c, "cluster_secret").await? {
        values.push(s);
    }
    let mut out: Vec<(Option<String>, usize)> = Vec::new();
    for v in &values {
        let fp = ciphertext_fingerprint(v).map(str::to_string);
        match out.iter_mut().find(|(f, _)| *f == fp) {
            Some((_, n)) => *n += 1,
            None => out.push((fp, 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_keys_update_writes_the_file_then_swaps() {
        let dir = std::env::temp_dir().join(format!("skyhold-nodekeys-{}", skyhold_db::crypto::random_token(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let (k1, k2) = (Key::generate(), Key::generate());
        k1.save_new(&path).unwrap();
        let nk = NodeKeys::new(KeyRing::load(&path).unwrap(), Some(path.clone()));
        let before = nk.current();
        assert!(nk.update(|r| Some(r.with_added(k2.clone()))).unwrap());
        assert_eq!(KeyRing::load(&path).unwrap().fingerprints(), vec![k1.fingerprint(), k2.fingerprint()]);
        assert_eq!(*nk.current(), KeyRing::load(&path).unwrap());
        assert_eq!(before.fingerprints(), vec![k1.fingerprint()], "a snapshot taken before stays valid");
        assert!(!nk.update(|r| Some(r.with_added(k2.clone()))).unwrap(), "no change");
        assert!(!nk.update(|r| r.promoted("0000000000000000")).unwrap(), "unknown key: no change");
        assert!(nk.update(|r| r.promoted(&k2.fingerprint())).unwrap());
        assert_eq!(KeyRing::load(&path).unwrap().fingerprints(), vec![k2.fingerprint(), k1.fingerprint()]);
        assert_eq!(nk.current().primary(), &k2);
        // A missing file is an error and changes nothing in memory.
        std::fs::remove_file(&path).unwrap();
        assert!(nk.update(|r| Some(r.clone())).is_err());
        assert_eq!(nk.current().primary(), &k2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ack_names_fit_the_column() {
        assert_eq!(ack_name("ms1"), "key_ack.ms1");
        let long = "x".repeat(64);
        assert!(ack_name(&long).len() <= 64 && ack_name(&long) != ack_name(&"y".repeat(64)));
        let st = KeyState { acks: vec![(ack_name(&long), "fp".into())], ..KeyState::default() };
        assert_eq!(st.ack_of(&long), Some("fp"));
        assert_eq!(st.ack_of("ms1"), None);
    }
}
