//! Events (`listEvents`): every decision an operator may want to read back.

use crate::{Ctx, DbError, Page, Sql, get_i64, get_opt_str, get_str, sql};

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub level: String,
    pub state: String,
    pub description: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub account_id: String,
    pub domain_id: String,
    pub user_id: Option<String>,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub event: Event,
    pub account_name: String,
    pub domain_name: String,
    pub username: Option<String>,
}

pub async fn event_insert(c: &mut dyn Sql, e: &Event) -> Result<(), DbError> {
    let (conn, dl) = c.parts();
    sqlx::query(&sql(
        dl,
        "INSERT INTO event (id, type, level, state, description, resource_type, resource_id, account_id, \
         domain_id, user_id, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {now})",
    ))
    .bind(&e.id)
    .bind(&e.event_type)
    .bind(&e.level)
    .bind(&e.state)
    .bind(&e.description)
    .bind(e.resource_type.clone())
    .bind(e.resource_id.clone())
    .bind(&e.account_id)
    .bind(&e.domain_id)
    .bind(e.user_id.clone())
    .execute(conn)
    .await
    .ctx("insert event")?;
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub account_id: Option<String>,
    pub event_type: Option<String>,
    pub level: Option<String>,
    pub id: Option<String>,
    pub keyword: Option<String>,
}

/// Events, newest first.
pub async fn event_list(c: &mut dyn Sql, f: &EventFilter, page: Page) -> Result<(Vec<EventRow>, i64), DbError> {
    let mut wh = vec!["1 = 1".to_string()];
    let mut binds = Vec::new();
    for (col, val) in
        [("e.account_id", &f.account_id), ("e.type", &f.event_type), ("e.level", &f.level), ("e.id", &f.id)]
    {
        if let Some(v) = val {
            wh.push(format!("{col} = ?"));
            binds.push(crate::Bind::S(v.clone()));
        }
    }
    if let Some(k) = &f.keyword {
        wh.push("(LOWER(e.description) LIKE LOWER(?) ESCAPE '!' OR LOWER(e.type) LIKE LOWER(?) ESCAPE '!')".into());
        let p = format!("%{}%", crate::like_escape(k));
        binds.push(crate::Bind::S(p.clone()));
        binds.push(crate::Bind::S(p));
    }
    let where_ = wh.join(" AND ");
    let (conn, _) = c.parts();
    let r = crate::bind_all(sqlx::query(&format!("SELECT COUNT(*) AS n FROM event e WHERE {where_}")), &binds)
        .fetch_one(&mut *conn)
        .await
        .ctx("count events")?;
    let total = get_i64(&r, "n")?;
    let q = format!(
        "SELECT e.id, e.type, e.level, e.state, e.description, e.resource_type, e.resource_id, e.account_id, \
         e.domain_id, e.user_id, e.created_ms, a.name AS account_name, d.name AS domain_name, u.username \
         FROM event e LEFT JOIN account a ON a.id = e.account_id LEFT JOIN domain d ON d.id = e.domain_id \
         LEFT JOIN users u ON u.id = e.user_id WHERE {where_} ORDER BY e.seq DESC{}",
        page.limit_clause()
    );
    let rows = crate::bind_all(sqlx::query(&q), &binds).fetch_all(conn).await.ctx("list events")?;
    let out = rows
        .iter()
        .map(|r| {
            Ok(EventRow {
                event: Event {
                    id: get_str(r, "id")?,
                    event_type: get_str(r, "type")?,
                    level: get_str(r, "level")?,
                    state: get_str(r, "state")?,
                    description: get_str(r, "description")?,
                    resource_type: get_opt_str(r, "resource_type")?,
                    resource_id: get_opt_str(r, "resource_id")?,
                    account_id: get_str(r, "account_id")?,
                    domain_id: get_str(r, "domain_id")?,
                    user_id: get_opt_str(r, "user_id")?,
                    created_ms: get_i64(r, "created_ms")?,
                },
                account_name: get_opt_str(r, "account_name")?.unwrap_or_default(),
                domain_name: get_opt_str(r, "domain_name")?.unwrap_or_default(),
                username: get_opt_str(r, "username")?,
            })
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    Ok((out, total))
}
