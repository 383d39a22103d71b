//! Typed identifiers. Every resource is named by a UUID string on the wire (as in CloudStack); the
//! newtypes keep a `VmId` from being passed where a `HostId` is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($($name:ident),* $(,)?) => {$(
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A fresh random (v4) id.
            pub fn random() -> Self {
                Self(uuid::Uuid::new_v4().to_string())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    )*};
}

id_type!(
    DomainId, AccountId, UserId, ZoneId, PodId, ClusterId, HostId, OfferingId, TemplateId, VmId, VolumeId, NicId,
    JobId, MsId, EventId, SessionId,
);

/// A fencing token: increases on every change of ownership (job lease, host connection, named
/// lock). Writes made on behalf of an owner carry the generation they were granted and change
/// nothing once a newer generation exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Generation(pub i64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Is `s` a syntactically valid UUID (what CloudStack accepts as an id parameter)?
pub fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}
