//! The catalogue of global settings (CloudStack's `configuration` table). Names are CloudStack's, so
//! operators' scripts keep working; defaults are Skyhold's (faster where that is safe).

/// Value type of a setting, used to validate `updateConfiguration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    Integer,
    Float,
    Boolean,
    String,
    /// One of a fixed list of values.
    Choice(&'static [&'static str]),
}

impl SettingKind {
    pub fn type_name(self) -> &'static str {
        match self {
            SettingKind::Integer => "Integer",
            SettingKind::Float => "Float",
            SettingKind::Boolean => "Boolean",
            SettingKind::String | SettingKind::Choice(_) => "String",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SettingDef {
    pub name: &'static str,
    pub default: &'static str,
    pub category: &'static str,
    pub kind: SettingKind,
    pub description: &'static str,
}

pub const CLUSTER_HEARTBEAT_INTERVAL: &str = "cluster.heartbeat.interval";
pub const CLUSTER_HEARTBEAT_THRESHOLD: &str = "cluster.heartbeat.threshold";
pub const PING_INTERVAL: &str = "ping.interval";
pub const PING_TIMEOUT: &str = "ping.timeout";
pub const HOST: &str = "host";
pub const AGENT_LB_ALGORITHM: &str = "indirect.agent.lb.algorithm";
pub const HA_WORKERS: &str = "ha.workers";
pub const HA_TAG: &str = "ha.tag";
pub const FORCE_HA: &str = "force.ha";
pub const MAX_RETRIES: &str = "max.retries";
pub const TIME_BETWEEN_FAILURES: &str = "time.between.failures";
pub const RESTART_RETRY_INTERVAL: &str = "restart.retry.interval";
pub const JOB_EXPIRE_MINUTES: &str = "job.expire.minutes";
pub const JOB_CANCEL_THRESHOLD_MINUTES: &str = "job.cancel.threshold.minutes";
pub const DEFAULT_PAGE_SIZE: &str = "default.page.size";
pub const AGENT_COMMAND_TIMEOUT: &str = "wait";
pub const SESSION_TIMEOUT: &str = "session.timeout";

pub const SETTINGS: &[SettingDef] = &[
    SettingDef {
        name: CLUSTER_HEARTBEAT_INTERVAL,
        default: "500",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Interval (in milliseconds) between management server heartbeats",
    },
    SettingDef {
        name: CLUSTER_HEARTBEAT_THRESHOLD,
        default: "2500",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Heartbeat age (in milliseconds) after which a management server is declared down",
    },
    SettingDef {
        name: PING_INTERVAL,
        default: "2",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Interval (in seconds) between agent pings",
    },
    SettingDef {
        name: PING_TIMEOUT,
        default: "2.5",
        category: "Advanced",
        kind: SettingKind::Float,
        description: "Multiplier of ping.interval after which a silent host is investigated",
    },
    SettingDef {
        name: HOST,
        default: "",
        category: "Advanced",
        kind: SettingKind::String,
        description: "Comma-separated management server addresses (host:port or a load balancer VIP) handed to agents",
    },
    SettingDef {
        name: AGENT_LB_ALGORITHM,
        default: "static",
        category: "Advanced",
        kind: SettingKind::Choice(&["static", "roundrobin", "shuffle"]),
        description: "How agents are spread over the management servers: static, roundrobin or shuffle",
    },
    SettingDef {
        name: HA_WORKERS,
        default: "16",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Number of concurrent HA restart workers per management server",
    },
    SettingDef {
        name: HA_TAG,
        default: "",
        category: "Advanced",
        kind: SettingKind::String,
        description: "Host tag of hosts dedicated to HA restarts",
    },
    SettingDef {
        name: FORCE_HA,
        default: "false",
        category: "Advanced",
        kind: SettingKind::Boolean,
        description: "Force HA for every VM, whatever its offering says",
    },
    SettingDef {
        name: MAX_RETRIES,
        default: "5",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Maximum number of attempts of an HA restart",
    },
    SettingDef {
        name: TIME_BETWEEN_FAILURES,
        default: "3600",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Time (in seconds) within which repeated failures of a VM count together",
    },
    SettingDef {
        name: RESTART_RETRY_INTERVAL,
        default: "10",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Time (in seconds) between attempts of a failed HA restart",
    },
    SettingDef {
        name: JOB_EXPIRE_MINUTES,
        default: "1440",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Time (in minutes) after which finished async jobs are removed",
    },
    SettingDef {
        name: JOB_CANCEL_THRESHOLD_MINUTES,
        default: "60",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Time (in minutes) a job may wait behind another job on the same object before it fails",
    },
    SettingDef {
        name: DEFAULT_PAGE_SIZE,
        default: "500",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Default page size of list commands",
    },
    SettingDef {
        name: AGENT_COMMAND_TIMEOUT,
        default: "30",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Time (in seconds) to wait for an agent's answer to a command",
    },
    SettingDef {
        name: SESSION_TIMEOUT,
        default: "1800",
        category: "Advanced",
        kind: SettingKind::Integer,
        description: "Idle time (in seconds) after which a login session expires",
    },
];

/// Look up a setting's definition.
pub fn setting_def(name: &str) -> Option<&'static SettingDef> {
    SETTINGS.iter().find(|d| d.name == name)
}

/// Check a value against a setting's type; `Err` says what is wrong, for a 431.
pub fn validate(def: &SettingDef, value: &str) -> Result<String, String> {
    let v = value.trim();
    match def.kind {
        SettingKind::Integer => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(|n| n.to_string())
            .ok_or_else(|| format!("value of {} must be a non-negative integer", def.name)),
        SettingKind::Float => v
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n > 0.0)
            .map(|_| v.to_string())
            .ok_or_else(|| format!("value of {} must be a positive number", def.name)),
        SettingKind::Boolean => match v.to_ascii_lowercase().as_str() {
            "true" | "false" => Ok(v.to_ascii_lowercase()),
            _ => Err(format!("value of {} must be true or false", def.name)),
        },
        SettingKind::String => {
            if v.len() > 4096 {
                Err(format!("value of {} is too long", def.name))
            } else {
                Ok(v.to_string())
            }
        }
        SettingKind::Choice(opts) => opts
            .iter()
            .find(|o| o.eq_ignore_ascii_case(v))
            .map(|o| o.to_string())
            .ok_or_else(|| format!("value of {} must be one of: {}", def.name, opts.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_unique_and_defaults_valid() {
        for (i, d) in SETTINGS.iter().enumerate() {
            assert!(SETTINGS[i + 1..].iter().all(|o| o.name != d.name), "{}", d.name);
            if !d.default.is_empty() {
                assert!(validate(d, d.default).is_ok(), "{}", d.name);
            }
        }
    }

    #[test]
    fn validation() {
        let d = setting_def(AGENT_LB_ALGORITHM).unwrap();
        assert_eq!(validate(d, "RoundRobin").unwrap(), "roundrobin");
        assert!(validate(d, "random").is_err());
        let d = setting_def(PING_INTERVAL).unwrap();
        assert!(validate(d, "-1").is_err());
        assert!(validate(d, "abc").is_err());
    }
}
