//! CloudStack's state names, and the VM state machine.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident => $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($var),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            /// Case-insensitive, as CloudStack's enum parameters are.
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                $(if s.eq_ignore_ascii_case($s) { return Ok($name::$var); })*
                Err(UnknownState(s.to_string()))
            }
        }
    };
}

/// A state name that is not one of the enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state '{0}'")]
pub struct UnknownState(pub String);

str_enum!(
    /// CloudStack's VM states (never invent others).
    VmState {
        Starting => "Starting",
        Running => "Running",
        Stopping => "Stopping",
        Stopped => "Stopped",
        Migrating => "Migrating",
        Error => "Error",
        Destroyed => "Destroyed",
        Expunging => "Expunging",
    }
);

/// The events that move a VM between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    StartRequested,
    OperationSucceeded,
    OperationFailed,
    StopRequested,
    DestroyRequested,
    RecoveryRequested,
    ExpungeRequested,
    /// The hypervisor reports the VM stopped without a command (crash, host fenced).
    StoppedOutOfBand,
}

impl VmState {
    /// The VM state machine. `None` means the event is not allowed in this state.
    /// `OperationSucceeded`/`OperationFailed` resolve the transitional states.
    pub fn next(self, ev: VmEvent) -> Option<VmState> {
        use VmEvent::*;
        use VmState::*;
        Some(match (self, ev) {
            (Stopped | Error, StartRequested) => Starting,
            (Starting, OperationSucceeded) => Running,
            (Starting, OperationFailed) => Stopped,
            (Running | Error, StopRequested) => Stopping,
            (Stopping, OperationSucceeded) => Stopped,
            (Stopping, OperationFailed) => Running,
            (Running | Stopped | Error | Starting | Stopping, DestroyRequested) => Destroyed,
            (Destroyed, RecoveryRequested) => Stopped,
            (Destroyed | Stopped | Error, ExpungeRequested) => Expunging,
            (Running | Starting | Stopping | Migrating, StoppedOutOfBand) => Stopped,
            _ => return None,
        })
    }

    /// States in which a job is still working on the VM.
    pub fn is_transitional(self) -> bool {
        matches!(self, VmState::Starting | VmState::Stopping | VmState::Migrating | VmState::Expunging)
    }
}

str_enum!(
    /// Host connection status, as CloudStack names it.
    HostStatus {
        Creating => "Creating",
        Connecting => "Connecting",
        Up => "Up",
        Down => "Down",
        Disconnected => "Disconnected",
        Alert => "Alert",
        Removed => "Removed",
        Error => "Error",
        Rebalancing => "Rebalancing",
    }
);

str_enum!(
    /// Allocation state of zones, pods, clusters and hosts (`updateHost allocationstate=`).
    AllocationState {
        Enabled => "Enabled",
        Disabled => "Disabled",
    }
);

str_enum!(
    /// Host resource state (what `updateHost allocationstate` and maintenance change).
    ResourceState {
        Enabled => "Enabled",
        Disabled => "Disabled",
        PrepareForMaintenance => "PrepareForMaintenance",
        ErrorInMaintenance => "ErrorInMaintenance",
        Maintenance => "Maintenance",
    }
);

str_enum!(
    /// Management server membership state.
    MsState {
        Up => "Up",
        Down => "Down",
        PreparingForShutdown => "PreparingForShutdown",
        ReadyForShutdown => "ReadyForShutdown",
    }
);

/// Async job status as the API reports it: 0 pending, 1 success, 2 failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    Pending = 0,
    Succeeded = 1,
    Failed = 2,
}

impl JobStatus {
    pub fn from_i64(v: i64) -> JobStatus {
        match v {
            1 => JobStatus::Succeeded,
            2 => JobStatus::Failed,
            _ => JobStatus::Pending,
        }
    }
}

/// Account types as CloudStack numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountType {
    User = 0,
    Admin = 1,
    DomainAdmin = 2,
}

impl AccountType {
    pub fn from_i64(v: i64) -> AccountType {
        match v {
            1 => AccountType::Admin,
            2 => AccountType::DomainAdmin,
            _ => AccountType::User,
        }
    }
    /// Role type name CloudStack shows (`roletype`).
    pub fn role_name(self) -> &'static str {
        match self {
            AccountType::User => "User",
            AccountType::Admin => "Admin",
            AccountType::DomainAdmin => "DomainAdmin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_machine_table() {
        use VmEvent::*;
        use VmState::*;
        let table = [
            (Stopped, StartRequested, Some(Starting)),
            (Running, StartRequested, None),
            (Starting, OperationSucceeded, Some(Running)),
            (Starting, OperationFailed, Some(Stopped)),
            (Running, StopRequested, Some(Stopping)),
            (Stopped, StopRequested, None),
            (Stopping, OperationSucceeded, Some(Stopped)),
            (Destroyed, RecoveryRequested, Some(Stopped)),
            (Running, RecoveryRequested, None),
            (Destroyed, ExpungeRequested, Some(Expunging)),
            (Running, ExpungeRequested, None),
            (Expunging, DestroyRequested, None),
            (Running, StoppedOutOfBand, Some(Stopped)),
        ];
        for (from, ev, to) in table {
            assert_eq!(from.next(ev), to, "{from} on {ev:?}");
        }
    }

    #[test]
    fn parse_is_case_insensitive() {
        assert_eq!("running".parse::<VmState>(), Ok(VmState::Running));
        assert_eq!("DISABLED".parse::<AllocationState>(), Ok(AllocationState::Disabled));
        assert!("Exploded".parse::<VmState>().is_err());
    }
}
