//! Agent rebalancing: when a server joins (or comes back), agents move onto it gradually. Every
//! few seconds each server compares the number of agents connected to it with the least loaded
//! live server; if it has at least two more, it asks one agent (the one with the fewest hosts) to
//! reconnect there. One agent per server per round, so a join never causes a reconnect storm.

use crate::Core;
use std::time::Duration;

/// Seconds between rebalancing rounds.
pub const ROUND: Duration = Duration::from_secs(3);
/// How long the set of live servers must be unchanged before agents are moved.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Which server, if any, should receive one of `mine`'s agents. Pure; `counts` holds every live
/// server (including `mine`) with its number of connected agents.
pub fn plan_move<'a>(mine: &str, counts: &'a [(String, i64)]) -> Option<&'a str> {
    let my = counts.iter().find(|(id, _)| id == mine).map(|(_, c)| *c)?;
    let (target, least) = counts.iter().filter(|(id, _)| id != mine).min_by_key(|(id, c)| (*c, id.clone()))?;
    // Moving one agent helps only if it leaves the target still below me.
    (my >= *least + 2).then_some(target.as_str())
}

pub async fn run(core: Core) {
    loop {
        tokio::time::sleep(ROUND).await;
        if !core.is_registered() || core.is_shutting_down() {
            continue;
        }
        // Only in a settled cluster: right after a server died or joined, agents are moving
        // anyway, and a peer whose heartbeat is ageing may be dying (never send agents to it).
        let interval = core.settings().get_i64(skyhold_types::settings::CLUSTER_HEARTBEAT_INTERVAL).max(50);
        let peers = core.peers();
        if peers.is_empty()
            || core.peers_stable_for() < SETTLE
            || peers.iter().any(|p| p.heartbeat_age_ms > 2 * interval)
        {
            continue;
        }
        let counts = async {
            let mut c = core.db().conn().await?;
            skyhold_db::infra::host_agents_per_ms(&mut c).await
        }
        .await;
        let Ok(counts) = counts else { continue };
        let mut live: Vec<(String, i64)> = vec![(core.ms().id.clone(), core.agents().agent_count() as i64)];
        for p in &peers {
            let c = counts.iter().find(|(id, _, _)| id == &p.id).map(|(_, a, _)| *a).unwrap_or(0);
            live.push((p.id.clone(), c));
        }
        if let Some(target) = plan_move(&core.ms().id, &live)
            && let Some(p) = peers.iter().find(|p| p.id == target)
            && let Some(agent) =
                core.agents().reconnect_one(&p.agent_addr, "rebalancing agents across management servers")
        {
            tracing::info!(%agent, to = %p.id, "rebalancing: moved one agent to a less loaded server");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::plan_move;

    fn c(v: &[(&str, i64)]) -> Vec<(String, i64)> {
        v.iter().map(|(a, b)| (a.to_string(), *b)).collect()
    }

    #[test]
    fn table() {
        // A new server with nothing: the loaded one gives one agent.
        assert_eq!(plan_move("a", &c(&[("a", 6), ("b", 0)])), Some("b"));
        // Balanced within one: nothing moves.
        assert_eq!(plan_move("a", &c(&[("a", 3), ("b", 2)])), None);
        assert_eq!(plan_move("a", &c(&[("a", 1), ("b", 0)])), None);
        assert_eq!(plan_move("a", &c(&[("a", 2), ("b", 2), ("c", 2)])), None);
        // Three servers, one new: move to the emptiest.
        assert_eq!(plan_move("a", &c(&[("a", 5), ("b", 4), ("c", 0)])), Some("c"));
        // Not above share: do nothing even if someone is empty.
        assert_eq!(plan_move("b", &c(&[("a", 5), ("b", 1), ("c", 0)])), None);
        // Alone: nowhere to go.
        assert_eq!(plan_move("a", &c(&[("a", 9)])), None);
    }
}
