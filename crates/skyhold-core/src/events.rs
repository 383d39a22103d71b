//! Recording events (`listEvents`).

use crate::CoreError;
use skyhold_db::Sql;
use skyhold_db::event::{Event, event_insert};

/// Who an event belongs to.
#[derive(Debug, Clone)]
pub struct EventOwner {
    pub account_id: String,
    pub domain_id: String,
    pub user_id: Option<String>,
}

/// Who system events (membership, takeovers, key rotation) belong to: the first administrator
/// account.
pub async fn system_owner(c: &mut dyn Sql) -> Result<EventOwner, CoreError> {
    let admin = skyhold_db::account::user_list(c).await?.into_iter().find(|u| u.account_type == 1);
    Ok(match admin {
        Some(u) => EventOwner { account_id: u.account_id, domain_id: u.domain_id, user_id: None },
        None => EventOwner { account_id: String::new(), domain_id: String::new(), user_id: None },
    })
}

/// Append an event in the caller's transaction (or connection).
pub async fn record(
    c: &mut dyn Sql,
    owner: &EventOwner,
    event_type: &str,
    level: &str,
    description: impl Into<String>,
    resource: Option<(&str, &str)>,
) -> Result<(), CoreError> {
    let e = Event {
        id: uuid::Uuid::new_v4().to_string(),
        event_type: event_type.to_string(),
        level: level.to_string(),
        state: "Completed".to_string(),
        description: description.into(),
        resource_type: resource.map(|r| r.0.to_string()),
        resource_id: resource.map(|r| r.1.to_string()),
        account_id: owner.account_id.clone(),
        domain_id: owner.domain_id.clone(),
        user_id: owner.user_id.clone(),
        created_ms: 0,
    };
    event_insert(c, &e).await?;
    Ok(())
}
