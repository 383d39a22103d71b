//! `skyhold keys show|encrypt`.

use crate::cli::{KeysAction, KeysArgs};
use crate::config::{FileConfig, Node};
use anyhow::Result;
use serde_json::json;

pub async fn run(a: KeysArgs) -> Result<u8> {
    match a.action {
        KeysAction::Show { node } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            let key = n.load_key()?;
            let cluster = match n.open_db(false).await {
                Ok(db) => {
                    let mut c = db.conn().await?;
                    skyhold_db::config::meta_get(&mut c, "key_fingerprint").await.ok().flatten()
                }
                Err(_) => None,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "key_file": n.key_file.display().to_string(),
                    "fingerprint": key.fingerprint(),
                    "cluster_fingerprint": cluster,
                    "matches_cluster": cluster.as_deref().map(|c| c == key.fingerprint()),
                }))?
            );
            Ok(0)
        }
        KeysAction::Encrypt { node, value } => {
            let file = FileConfig::load(node.config.as_deref())?;
            let n = Node::resolve(&node, &file)?;
            let key = n.load_key()?;
            println!("ENC({})", key.encrypt(&value)?);
            Ok(0)
        }
    }
}
