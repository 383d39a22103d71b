//! `skyhold keys show|encrypt|rotate|forget-retired`.

use crate::cli::{KeysAction, KeysArgs, NodeArgs};
use crate::config::{FileConfig, Node};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use skyhold_core::keys::{self, Commit, NodeKeys};
use skyhold_db::crypto::{Key, KeyRing};
use skyhold_types::time::cs_date;
use std::time::{Duration, Instant};

fn node(args: &NodeArgs) -> Result<Node> {
    let file = FileConfig::load(args.config.as_deref())?;
    Node::resolve(args, &file)
}

pub async fn run(a: KeysArgs) -> Result<u8> {
    match a.action {
        KeysAction::Show { node: args } => {
            let n = node(&args)?;
            println!("{}", serde_json::to_string_pretty(&show(&n).await?)?);
            Ok(0)
        }
        KeysAction::Encrypt { node: args, value } => {
            let n = node(&args)?;
            let key = n.load_key()?;
            println!("ENC({})", key.encrypt(&value)?);
            Ok(0)
        }
        KeysAction::Rotate { node: args, wait, abort } => {
            let n = node(&args)?;
            let out = if abort { rotate_abort(&n).await? } else { rotate(&n, Duration::from_secs(wait)).await? };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(0)
        }
        KeysAction::ForgetRetired { node: args } => {
            let n = node(&args)?;
            println!("{}", serde_json::to_string_pretty(&forget_retired(&n, &args).await?)?);
            Ok(0)
        }
    }
}

async fn show(n: &Node) -> Result<Value> {
    let ring = n.load_key()?;
    let (st, usage) = match n.open_db(false).await {
        Ok(db) => {
            let mut c = db.conn().await?;
            let st = keys::read_state(&mut c).await.ok();
            let usage = keys::stored_key_usage(&mut c).await.ok();
            (st, usage)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "database not reachable: showing the key file only");
            (None, None)
        }
    };
    let cluster = st.as_ref().and_then(|s| s.cluster_fingerprint.clone());
    let staged = st.as_ref().and_then(|s| s.staged.as_ref()).map(|s| s.fingerprint.clone());
    let keys: Vec<Value> = ring
        .keys()
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let fp = k.fingerprint();
            let role = if i == 0 {
                "primary"
            } else if cluster.as_deref() == Some(fp.as_str()) {
                "cluster"
            } else if staged.as_deref() == Some(fp.as_str()) {
                "staged"
            } else {
                "retired"
            };
            json!({ "fingerprint": fp, "role": role, "cluster": cluster.as_deref() == Some(fp.as_str()) })
        })
        .collect();
    let rotation = st.as_ref().map(|s| {
        json!({
            "staged": s.staged.as_ref().map(|x| x.fingerprint.clone()),
            "staged_at": s.staged.as_ref().and_then(|x| x.staged_ms).map(cs_date),
            "acknowledged_by": s.staged.as_ref().map(|x| acked_by(s, &x.fingerprint)),
            "previous_fingerprint": s.previous_fingerprint,
            "rotated_at": s.rotated_ms.map(cs_date),
        })
    });
    Ok(json!({
        "key_file": n.key_file.display().to_string(),
        "fingerprint": ring.primary().fingerprint(),
        "keys": keys,
        "cluster_fingerprint": cluster,
        "matches_cluster": cluster.as_deref().map(|c| c == ring.primary().fingerprint()),
        "holds_cluster_key": cluster.as_deref().map(|c| ring.contains(c)),
        "rotation": rotation,
        "stored_secrets": usage.map(|u| u.into_iter().map(|(fp, count)| json!({
            "key": fp.unwrap_or_else(|| "v1 (no fingerprint)".into()), "count": count,
        })).collect::<Vec<_>>()),
    }))
}

/// Who acknowledged `fingerprint` (server ids, as `key_ack.` names hold them).
fn acked_by(st: &keys::KeyState, fingerprint: &str) -> Vec<String> {
    st.acks
        .iter()
        .filter(|(_, fp)| fp == fingerprint)
        .map(|(name, _)| name.trim_start_matches(keys::META_ACK_PREFIX).to_string())
        .collect()
}

/// Change this node's key file the way servers change theirs (it may be a server's file).
fn update_own_file(n: &Node, ring: &KeyRing, f: impl FnOnce(&KeyRing) -> Option<KeyRing>) {
    let nk = NodeKeys::new(ring.clone(), Some(n.key_file.clone()));
    if let Err(e) = nk.update(f) {
        tracing::warn!(key_file = %n.key_file.display(), error = %e, "could not update this node's key file");
    }
}

async fn rotate(n: &Node, wait: Duration) -> Result<Value> {
    let ring = n.load_key()?;
    let path = n.key_file.display().to_string();
    let db = n.open_db(false).await?;
    let started = Instant::now();
    let (k2, staged_now) = keys::rotate_stage(&db, &ring, &path).await.map_err(|e| anyhow!("{e}"))?;
    let fp2 = k2.fingerprint();
    if staged_now {
        tracing::info!(new = %fp2, "new encryption key staged; waiting for every management server to hold it");
    } else {
        tracing::info!(new = %fp2, "continuing the staged rotation");
    }
    update_own_file(n, &ring, |r| (!r.contains(&fp2)).then(|| r.with_added(k2.clone())));
    let deadline = started + wait;
    let mut acked: Vec<String>;
    let (previous, users, rotated_ms) = loop {
        let pending = {
            let mut c = db.conn().await?;
            let pending = keys::rotate_pending(&mut c, &fp2).await.map_err(|e| anyhow!("{e}"))?;
            let st = keys::read_state(&mut c).await.map_err(|e| anyhow!("{e}"))?;
            acked = acked_by(&st, &fp2);
            pending
        };
        let waiting = if pending.is_empty() {
            match keys::rotate_commit(&db, &ring, &k2, &path).await.map_err(|e| anyhow!("{e}"))? {
                Commit::Done { previous, users, rotated_ms } => break (previous, users, rotated_ms),
                Commit::AlreadyDone => {
                    return Ok(json!({
                        "rotated": true, "fingerprint": fp2, "note": "completed by another `skyhold keys rotate`",
                    }));
                }
                Commit::Waiting(w) => w,
            }
        } else {
            pending
        };
        if Instant::now() >= deadline {
            let names: Vec<String> = waiting
                .iter()
                .map(|m| format!("{} ({}, heartbeat {} ms ago)", m.id, m.state, m.heartbeat_age_ms))
                .collect();
            bail!(
                "the new key {fp2} is staged, but these management servers did not acknowledge it within {} s: {}; \
                 the rotation stays staged (stored secrets still use the current key): start or fix them and run \
                 `skyhold keys rotate` again to continue, or `skyhold keys rotate --abort`",
                wait.as_secs(),
                names.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took_ms = started.elapsed().as_millis() as u64;
    tracing::info!(new = %fp2, %previous, users, took_ms, "encryption key rotated");
    update_own_file(n, &ring, |r| r.with_added(k2.clone()).promoted(&fp2));
    Ok(json!({
        "rotated": true,
        "fingerprint": fp2,
        "previous_fingerprint": previous,
        "rotated_at": cs_date(rotated_ms),
        "acknowledged_by": acked,
        "reencrypted_api_secrets": users,
        "took_ms": took_ms,
        "key_file": path,
        "next": "servers make the new key primary within a second; the previous key stays in key files to \
                 decrypt ENC(...) values: re-encrypt them with `skyhold keys encrypt`, then run \
                 `skyhold keys forget-retired` on each node",
    }))
}

async fn rotate_abort(n: &Node) -> Result<Value> {
    let db = n.open_db(false).await?;
    let aborted = keys::rotate_abort(&db).await.map_err(|e| anyhow!("{e}"))?;
    Ok(json!({ "aborted": aborted }))
}

async fn forget_retired(n: &Node, args: &NodeArgs) -> Result<Value> {
    let ring = n.load_key()?;
    let path = n.key_file.display().to_string();
    let db = n.open_db(false).await?;
    let st = keys::check_ring(&db, &ring, &path).await.map_err(|e| anyhow!("{e}"))?;
    if let Some(s) = &st.staged {
        bail!("a key rotation to {} is staged: finish it (`skyhold keys rotate`) or abort it first", s.fingerprint);
    }
    let cluster = st.cluster_fingerprint.clone().ok_or_else(|| anyhow!("the database has no key fingerprint"))?;
    let key: Key = ring.get(&cluster).cloned().ok_or_else(|| anyhow!("the key ring lost the cluster key"))?;
    if let Some(props) = &args.db_properties {
        let text = std::fs::read_to_string(props).with_context(|| format!("read {}", props.display()))?;
        skyhold_db::props::DbProperties::parse(&text, Some(&KeyRing::new(key.clone()))).map_err(|e| {
            anyhow!(
                "{}: {e}: an ENC(...) value still needs a retired key; re-encrypt it with `skyhold keys encrypt` \
                 and run this again",
                props.display()
            )
        })?;
    }
    let dropped: Vec<String> = ring.fingerprints().into_iter().filter(|f| *f != cluster).collect();
    NodeKeys::new(ring, Some(n.key_file.clone()))
        .update(|_| Some(KeyRing::new(key.clone())))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(json!({ "key_file": path, "kept": cluster, "dropped": dropped }))
}
