//! Where a VM should run: a pure function over a snapshot of hosts, table-tested.
//!
//! Allocation states: a host is offered to ordinary placements only when it is Up, its resource
//! state is Enabled and its pod and cluster are Enabled (`HostCap::allocatable`). A Disabled pod or
//! cluster takes no new VMs, as in CloudStack, but it is an allocation policy, not a health
//! verdict: HA restarts and an administrator's explicit host (`Request::ignore_allocation`) may
//! still use its hosts.

/// The facts about one host the planner needs.
#[derive(Debug, Clone)]
pub struct HostCap {
    pub id: String,
    pub zone_id: String,
    pub pod_id: String,
    pub cluster_id: String,
    pub up: bool,
    /// The host's own resource state is Enabled.
    pub enabled: bool,
    /// The host's pod and cluster are Enabled (allocation state).
    pub allocatable: bool,
    pub tags: Vec<String>,
    pub cpu_total: i64,
    pub cpu_used: i64,
    pub mem_total_mb: i64,
    pub mem_used_mb: i64,
}

impl HostCap {
    fn fits(&self, cpu: i64, mem_mb: i64) -> bool {
        self.cpu_total - self.cpu_used >= cpu && self.mem_total_mb - self.mem_used_mb >= mem_mb
    }
}

/// The planner's view of the hosts in the database.
pub fn caps_of(hosts: &[skyhold_db::infra::Host]) -> Vec<HostCap> {
    hosts
        .iter()
        .map(|h| HostCap {
            id: h.id.clone(),
            zone_id: h.zone_id.clone(),
            pod_id: h.pod_id.clone(),
            cluster_id: h.cluster_id.clone(),
            up: h.status == "Up",
            enabled: h.resource_state == "Enabled",
            allocatable: h.pod_state == "Enabled" && h.cluster_state == "Enabled",
            tags: h.tags.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
            cpu_total: h.cpu_cores,
            cpu_used: h.used_cpu,
            mem_total_mb: h.mem_mb,
            mem_used_mb: h.used_mem_mb,
        })
        .collect()
}

/// What is being placed.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub zone_id: &'a str,
    pub cpu: i64,
    pub mem_mb: i64,
    /// An admin's explicit `hostid`: that host or nothing.
    pub required_host: Option<&'a str>,
    /// Try this host first (the VM's last host).
    pub preferred_host: Option<&'a str>,
    /// Hosts carrying this tag are kept for HA restarts (`ha.tag`).
    pub avoid_tag: Option<&'a str>,
    /// Only hosts carrying this tag (HA restarts when `ha.tag` is set).
    pub require_tag: Option<&'a str>,
    /// Only hosts of this pod (the VM's address belongs to its pod's range).
    pub pod_id: Option<&'a str>,
    /// Only hosts of this cluster (HA restarts stay in the failed host's cluster).
    pub cluster_id: Option<&'a str>,
    /// Hosts already tried and refused in this placement.
    pub exclude: &'a [String],
    /// Also use hosts whose pod or cluster is Disabled: HA restarts (restoring a VM that was
    /// running beats an allocation policy) and an administrator's explicit `hostid`.
    pub ignore_allocation: bool,
}

/// Why nothing was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoHost {
    /// The required host does not exist, is down or disabled.
    RequiredHostUnusable,
    /// The required host lacks capacity.
    RequiredHostFull,
    /// No usable host in the zone has room.
    NoCapacity,
}

/// Pick a host: the required one, else the preferred one if it fits, else the eligible host with
/// the most free memory (spreading load), ties broken by id for determinism.
pub fn choose_host<'h>(hosts: &'h [HostCap], req: &Request<'_>) -> Result<&'h HostCap, NoHost> {
    let usable = |h: &&HostCap| {
        h.up && h.enabled
            && (h.allocatable || req.ignore_allocation)
            && h.zone_id == req.zone_id
            && req.pod_id.is_none_or(|p| h.pod_id == p)
            && req.cluster_id.is_none_or(|c| h.cluster_id == c)
            && !req.exclude.iter().any(|x| x == &h.id)
    };
    if let Some(rid) = req.required_host {
        let h = hosts.iter().find(|h| h.id == rid).filter(usable).ok_or(NoHost::RequiredHostUnusable)?;
        return if h.fits(req.cpu, req.mem_mb) { Ok(h) } else { Err(NoHost::RequiredHostFull) };
    }
    let eligible = |h: &&HostCap| {
        usable(h)
            && h.fits(req.cpu, req.mem_mb)
            && !req.avoid_tag.is_some_and(|t| !t.is_empty() && h.tags.iter().any(|x| x == t))
            && req.require_tag.is_none_or(|t| t.is_empty() || h.tags.iter().any(|x| x == t))
    };
    if let Some(pid) = req.preferred_host
        && let Some(h) = hosts.iter().filter(eligible).find(|h| h.id == pid)
    {
        return Ok(h);
    }
    hosts
        .iter()
        .filter(eligible)
        .max_by(|a, b| {
            let fa = a.mem_total_mb - a.mem_used_mb;
            let fb = b.mem_total_mb - b.mem_used_mb;
            fa.cmp(&fb).then_with(|| b.id.cmp(&a.id))
        })
        .ok_or(NoHost::NoCapacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str, zone: &str, cpu_used: i64, mem_used: i64) -> HostCap {
        HostCap {
            id: id.into(),
            zone_id: zone.into(),
            pod_id: "p1".into(),
            cluster_id: "c1".into(),
            up: true,
            enabled: true,
            allocatable: true,
            tags: vec![],
            cpu_total: 8,
            cpu_used,
            mem_total_mb: 8192,
            mem_used_mb: mem_used,
        }
    }

    fn req<'a>(zone: &'a str) -> Request<'a> {
        Request {
            zone_id: zone,
            cpu: 2,
            mem_mb: 2048,
            required_host: None,
            preferred_host: None,
            avoid_tag: None,
            require_tag: None,
            pod_id: None,
            cluster_id: None,
            exclude: &[],
            ignore_allocation: false,
        }
    }

    #[test]
    fn ha_restarts_stay_in_the_cluster_and_use_ha_hosts() {
        let mut a = h("a", "z1", 0, 0);
        let mut b = h("b", "z1", 0, 4096);
        b.cluster_id = "c2".into();
        let mut t = h("t", "z1", 0, 2048);
        t.tags = vec!["ha".into()];
        let hosts = vec![a.clone(), b.clone(), t.clone()];
        // Ordinary deployments avoid the HA host.
        let r = Request { avoid_tag: Some("ha"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "a");
        // HA restarts: only the cluster, and only ha-tagged hosts when ha.tag is set.
        let r = Request { cluster_id: Some("c1"), require_tag: Some("ha"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "t");
        let r = Request { cluster_id: Some("c2"), require_tag: Some("ha"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::NoCapacity));
        let r = Request { cluster_id: Some("c2"), require_tag: Some(""), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "b");
        // Never another zone.
        a.zone_id = "z2".into();
        t.up = false;
        let hosts = vec![a, b, t];
        let r = Request { cluster_id: Some("c1"), require_tag: None, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::NoCapacity));
    }

    #[test]
    fn a_vm_stays_in_the_pod_of_its_address() {
        let mut b = h("b", "z1", 0, 0);
        b.pod_id = "p2".into();
        let hosts = vec![h("a", "z1", 0, 4096), b];
        assert_eq!(choose_host(&hosts, &req("z1")).unwrap().id, "b");
        let r = Request { pod_id: Some("p1"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "a");
        let r = Request { pod_id: Some("p1"), required_host: Some("b"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::RequiredHostUnusable));
    }

    #[test]
    fn picks_most_free_memory_in_zone() {
        let hosts = vec![h("a", "z1", 0, 4096), h("b", "z1", 0, 1024), h("c", "z2", 0, 0)];
        assert_eq!(choose_host(&hosts, &req("z1")).unwrap().id, "b");
    }

    #[test]
    fn table() {
        let mut down = h("d", "z1", 0, 0);
        down.up = false;
        let mut disabled = h("e", "z1", 0, 0);
        disabled.enabled = false;
        let mut tagged = h("t", "z1", 0, 0);
        tagged.tags = vec!["ha_host".into()];
        let full = h("f", "z1", 7, 0);
        let ok = h("o", "z1", 0, 6000);

        let hosts = vec![down.clone(), disabled.clone(), tagged.clone(), full.clone(), ok.clone()];
        // Tagged host is free-est but reserved for HA.
        let mut r = req("z1");
        r.avoid_tag = Some("ha_host");
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "o");
        // Without ha.tag it is used.
        assert_eq!(choose_host(&hosts, &req("z1")).unwrap().id, "t");
        // Required host semantics.
        let mut r = req("z1");
        r.required_host = Some("d");
        assert_eq!(choose_host(&hosts, &r).unwrap_err(), NoHost::RequiredHostUnusable);
        r.required_host = Some("f");
        assert_eq!(choose_host(&hosts, &r).unwrap_err(), NoHost::RequiredHostFull);
        r.required_host = Some("nope");
        assert_eq!(choose_host(&hosts, &r).unwrap_err(), NoHost::RequiredHostUnusable);
        // Preferred host wins when it fits.
        let mut r = req("z1");
        r.preferred_host = Some("o");
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "o");
        // Exclusions and no capacity.
        let ex = vec!["t".to_string(), "o".to_string()];
        let mut r = req("z1");
        r.exclude = &ex;
        assert_eq!(choose_host(&hosts, &r).unwrap_err(), NoHost::NoCapacity);
        assert_eq!(choose_host(&hosts, &req("z9")).unwrap_err(), NoHost::NoCapacity);
    }

    #[test]
    fn disabled_pods_and_clusters_take_no_ordinary_placements() {
        // "x": the freest host, in a Disabled pod or cluster (caps_of folds both into allocatable).
        let mut x = h("x", "z1", 0, 0);
        x.allocatable = false;
        let a = h("a", "z1", 0, 4096);
        let full = h("f", "z1", 8, 0);
        let hosts = vec![x.clone(), a];
        // Ordinary deployments, starts and migrations skip it.
        assert_eq!(choose_host(&hosts, &req("z1")).unwrap().id, "a");
        // Even as the preferred (last) host.
        let r = Request { preferred_host: Some("x"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "a");
        // Only it left: no capacity, as CloudStack reports it.
        let only = vec![x.clone(), full];
        assert_eq!(choose_host(&only, &req("z1")).err(), Some(NoHost::NoCapacity));
        // Named explicitly without the flag: unusable.
        let r = Request { required_host: Some("x"), ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::RequiredHostUnusable));
        // An administrator's explicit host (the caller sets the flag): allowed.
        let r = Request { required_host: Some("x"), ignore_allocation: true, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "x");
        // HA restarts: allowed in a Disabled cluster, still within the cluster and the tag rules.
        let r = Request { cluster_id: Some("c1"), require_tag: Some(""), ignore_allocation: true, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "x");
        let r = Request { preferred_host: Some("x"), ignore_allocation: true, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).unwrap().id, "x");
        let r = Request { cluster_id: Some("c1"), require_tag: Some("ha"), ignore_allocation: true, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::NoCapacity));
        // The flag never revives a host that is down or disabled itself.
        let mut down = x.clone();
        down.up = false;
        let mut off = x;
        off.id = "o".into();
        off.enabled = false;
        let hosts = vec![down, off];
        let r = Request { ignore_allocation: true, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::NoCapacity));
        let r = Request { required_host: Some("o"), ignore_allocation: true, ..req("z1") };
        assert_eq!(choose_host(&hosts, &r).err(), Some(NoHost::RequiredHostUnusable));
    }
}
