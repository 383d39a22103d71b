//! The settings cache. Every server re-reads the `configuration` table when the settings sequence
//! (a counter bumped by every change) moves, polled every half second, so `updateConfiguration` applies on
//! every server without a restart.

use skyhold_db::{Db, DbError};
use skyhold_types::settings::{SETTINGS, setting_def};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

#[derive(Default)]
pub struct Settings {
    values: RwLock<HashMap<String, String>>,
    version: RwLock<Option<i64>>,
}

impl Settings {
    /// The value of a setting: the database's, else the catalogue default.
    pub fn get(&self, name: &str) -> String {
        if let Ok(v) = self.values.read()
            && let Some(s) = v.get(name)
        {
            return s.clone();
        }
        setting_def(name).map(|d| d.default.to_string()).unwrap_or_default()
    }

    pub fn get_i64(&self, name: &str) -> i64 {
        let v = self.get(name);
        v.trim().parse().unwrap_or_else(|_| setting_def(name).and_then(|d| d.default.parse().ok()).unwrap_or(0))
    }

    pub fn get_f64(&self, name: &str) -> f64 {
        let v = self.get(name);
        v.trim().parse().unwrap_or_else(|_| setting_def(name).and_then(|d| d.default.parse().ok()).unwrap_or(0.0))
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.get(name).trim().eq_ignore_ascii_case("true")
    }

    /// Reload if the table changed. Returns true if anything was reloaded.
    pub async fn refresh(&self, db: &Db) -> Result<bool, DbError> {
        let mut c = db.conn().await?;
        let ver = skyhold_db::config::config_version(&mut c).await?;
        let same = self.version.read().map(|v| *v == Some(ver)).unwrap_or(false);
        if same {
            return Ok(false);
        }
        let rows = skyhold_db::config::config_list(&mut c).await?;
        let map: HashMap<String, String> = rows.into_iter().map(|r| (r.name, r.value)).collect();
        if let Ok(mut v) = self.values.write() {
            *v = map;
        }
        if let Ok(mut v) = self.version.write() {
            *v = Some(ver);
        }
        Ok(true)
    }

    /// Known names with their current values (for listConfigurations).
    pub fn snapshot(&self) -> Vec<(&'static skyhold_types::settings::SettingDef, String)> {
        SETTINGS.iter().map(|d| (d, self.get(d.name))).collect()
    }
}

/// Poll for changes until the process ends.
pub async fn watch(core: crate::Core) {
    let mut last_host = core.settings().get(skyhold_types::settings::HOST);
    let mut last_lb = core.settings().get(skyhold_types::settings::AGENT_LB_ALGORITHM);
    loop {
        if let Err(e) = core.settings().refresh(core.db()).await {
            tracing::warn!(error = %e, "could not refresh settings");
        }
        // Agents hold the list of management addresses: push it when it changes (whether this
        // server or a peer applied the change).
        let host = core.settings().get(skyhold_types::settings::HOST);
        let lb = core.settings().get(skyhold_types::settings::AGENT_LB_ALGORITHM);
        if host != last_host || lb != last_lb {
            let n = core.agents().push_mgmt_lists(&core);
            tracing::info!(agents = n, host = %host, algorithm = %lb, "pushed new management server list to agents");
            last_host = host;
            last_lb = lb;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
