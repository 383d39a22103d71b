//! The simulator hypervisor driver: one simulated host's VMs, held in memory.
//!
//! Nothing here touches a real hypervisor. The simulator enforces the host's CPU-core and memory
//! capacity over its *running* VMs and can inject failures with [`FailRule`]s, so the management
//! server's placement, retry and error paths can be exercised honestly.
//!
//! Live migration is three commands so that the ledger never shows a VM running on two hosts: on the
//! source `migrate_out` pauses the VM (it no longer runs, but keeps its definition and its capacity),
//! the MS starts it on the destination, then `migrate_done` forgets it on the source or
//! `migrate_abort` resumes it there.

use std::collections::BTreeMap;

use skyhold_proto::{Command, CommandResult, HostPing, HostReport, PowerState, VmReport};

use crate::FailRule;

/// Hypervisor type reported by simulated hosts.
pub const HYPERVISOR: &str = "Simulator";

/// What a defined VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimState {
    Running,
    /// Paused on the source of a live migration: not running, but its capacity stays reserved.
    Migrating,
    Stopped,
}

#[derive(Debug, Clone)]
struct SimVm {
    name: String,
    cpu: u32,
    mem_mb: u64,
    state: SimState,
}

/// One simulated host: its capacity and the VMs defined on it (vm_id -> name, cpu, memory, state).
#[derive(Debug, Clone)]
pub struct Simulator {
    guid: String,
    name: String,
    cpu_cores: u32,
    cpu_mhz: u32,
    mem_mb: u64,
    fail_rules: Vec<FailRule>,
    vms: BTreeMap<String, SimVm>,
}

impl Simulator {
    /// An empty host with the given identity and capacity, and no fail rules.
    pub fn new(
        guid: impl Into<String>,
        name: impl Into<String>,
        cpu_cores: u32,
        cpu_mhz: u32,
        mem_mb: u64,
    ) -> Simulator {
        Simulator {
            guid: guid.into(),
            name: name.into(),
            cpu_cores,
            cpu_mhz,
            mem_mb,
            fail_rules: Vec::new(),
            vms: BTreeMap::new(),
        }
    }

    /// Replace the fault-injection rules.
    pub fn with_fail_rules(mut self, rules: Vec<FailRule>) -> Simulator {
        self.fail_rules = rules;
        self
    }

    pub fn guid(&self) -> &str {
        &self.guid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Power state of a VM defined on this host (`None` if the host does not know it). A VM paused
    /// for migration is `Stopped`.
    pub fn vm_state(&self, vm_id: &str) -> Option<PowerState> {
        self.vms
            .get(vm_id)
            .map(|v| if v.state == SimState::Running { PowerState::Running } else { PowerState::Stopped })
    }

    /// Whether the VM is paused on this host as the source of a live migration.
    pub fn is_migrating(&self, vm_id: &str) -> bool {
        self.vms.get(vm_id).is_some_and(|v| v.state == SimState::Migrating)
    }

    /// (cores, MiB) used by running VMs and VMs paused for migration.
    pub fn used(&self) -> (u64, u64) {
        self.vms
            .values()
            .filter(|vm| vm.state != SimState::Stopped)
            .fold((0, 0), |(c, m), vm| (c + u64::from(vm.cpu), m + vm.mem_mb))
    }

    fn running(&self) -> impl Iterator<Item = (&String, &SimVm)> {
        self.vms.iter().filter(|(_, vm)| vm.state == SimState::Running)
    }

    /// Stop every VM that runs or is paused for migration (the host lost its storage, or fenced
    /// itself). Returns their ids; definitions are kept, as after a `stop`.
    pub fn stop_all(&mut self) -> Vec<String> {
        let mut stopped = Vec::new();
        for (id, vm) in &mut self.vms {
            if vm.state != SimState::Stopped {
                vm.state = SimState::Stopped;
                stopped.push(id.clone());
            }
        }
        stopped
    }

    /// The running VM `vm_id` crashes (stops). `false` if it does not run here.
    pub fn crash(&mut self, vm_id: &str) -> bool {
        match self.vms.get_mut(vm_id) {
            Some(vm) if vm.state == SimState::Running => {
                vm.state = SimState::Stopped;
                true
            }
            _ => false,
        }
    }

    /// The VMs this host is running right now.
    pub fn vms(&self) -> Vec<VmReport> {
        self.running().map(|(id, _)| VmReport { vm_id: id.clone(), state: PowerState::Running }).collect()
    }

    /// This host's registration report (with the VMs it runs now).
    pub fn report(&self, ip: &str) -> HostReport {
        HostReport {
            guid: self.guid.clone(),
            name: self.name.clone(),
            ip: ip.to_owned(),
            cpu_cores: self.cpu_cores,
            cpu_mhz: self.cpu_mhz,
            mem_mb: self.mem_mb,
            hypervisor: HYPERVISOR.to_owned(),
            vms: self.vms(),
            check_addr: None,
            storage: None,
            place: Default::default(),
        }
    }

    /// This host's part of a ping (without storage heartbeat: the agent fills that in).
    pub fn ping(&self) -> HostPing {
        HostPing { guid: self.guid.clone(), vms: self.vms(), heartbeat: None, storage_ok: true, fenced: false }
    }

    /// Execute one command. Never panics; every refusal is a [`CommandResult::Failed`].
    /// ([`Command::CheckHost`] is not a hypervisor command: the agent answers it, see `Agent::handle`.)
    pub fn execute(&mut self, cmd: &Command) -> CommandResult {
        let op = cmd.name();
        let vm_id = cmd.vm_id();
        let vm_name = match cmd {
            Command::StartVm { name, .. } => name.as_str(),
            _ => self.vms.get(vm_id).map_or(vm_id, |vm| vm.name.as_str()),
        };
        if self.fail_rules.iter().any(|r| r.matches(op, vm_name)) {
            return failed(format!("simulated failure injected for {op} of {vm_name}"));
        }
        match cmd {
            Command::StartVm { vm_id, name, cpu, mem_mb } => self.start(vm_id, name, *cpu, *mem_mb),
            Command::StopVm { vm_id, force: _ } => {
                if let Some(vm) = self.vms.get_mut(vm_id) {
                    vm.state = SimState::Stopped;
                }
                ok(PowerState::Stopped)
            }
            Command::RebootVm { vm_id } => match self.vm_state(vm_id) {
                Some(PowerState::Running) => ok(PowerState::Running),
                _ => failed(format!("vm {vm_id} is not running on host {}", self.name)),
            },
            Command::DestroyVm { vm_id } => {
                self.vms.remove(vm_id);
                ok(PowerState::Stopped)
            }
            Command::CheckVm { vm_id } => ok(self.vm_state(vm_id).unwrap_or(PowerState::Stopped)),
            Command::CheckHost { .. } => failed(format!("{op} is not a hypervisor command")),
            Command::MigrateOut { vm_id } => match self.vms.get_mut(vm_id) {
                Some(vm) if vm.state != SimState::Stopped => {
                    vm.state = SimState::Migrating;
                    ok(PowerState::Stopped)
                }
                _ => failed(format!("vm {vm_id} is not running on host {}", self.name)),
            },
            Command::MigrateDone { vm_id } => match self.vms.get(vm_id) {
                Some(vm) if vm.state == SimState::Running => {
                    failed(format!("vm {vm_id} is running on host {}, not paused for migration", self.name))
                }
                _ => {
                    self.vms.remove(vm_id);
                    ok(PowerState::Stopped)
                }
            },
            Command::MigrateAbort { vm_id } => match self.vms.get_mut(vm_id) {
                Some(vm) if vm.state != SimState::Stopped => {
                    vm.state = SimState::Running;
                    ok(PowerState::Running)
                }
                _ => failed(format!("vm {vm_id} is not paused for migration on host {}", self.name)),
            },
        }
    }

    fn start(&mut self, vm_id: &str, name: &str, cpu: u32, mem_mb: u64) -> CommandResult {
        match self.vms.get(vm_id).map(|vm| vm.state) {
            Some(SimState::Running) => return ok(PowerState::Running),
            Some(SimState::Migrating) => {
                return failed(format!("vm {vm_id} is paused for migration on host {}", self.name));
            }
            Some(SimState::Stopped) | None => {}
        }
        let (used_cpu, used_mem) = self.used();
        let free_cpu = u64::from(self.cpu_cores).saturating_sub(used_cpu);
        let free_mem = self.mem_mb.saturating_sub(used_mem);
        if u64::from(cpu) > free_cpu || mem_mb > free_mem {
            return failed(format!(
                "insufficient capacity on host {}: vm {vm_id} needs {cpu} cores and {mem_mb} MB, \
                 {free_cpu} of {} cores and {free_mem} of {} MB are free",
                self.name, self.cpu_cores, self.mem_mb
            ));
        }
        self.vms.insert(vm_id.to_owned(), SimVm { name: name.to_owned(), cpu, mem_mb, state: SimState::Running });
        ok(PowerState::Running)
    }
}

fn ok(state: PowerState) -> CommandResult {
    CommandResult::Ok { state }
}

fn failed(message: String) -> CommandResult {
    CommandResult::Failed { message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Simulator {
        Simulator::new("g-h0", "sim-host-0", 4, 2000, 4096)
    }

    fn start(id: &str, name: &str, cpu: u32, mem_mb: u64) -> Command {
        Command::StartVm { vm_id: id.into(), name: name.into(), cpu, mem_mb }
    }

    const RUNNING: CommandResult = CommandResult::Ok { state: PowerState::Running };
    const STOPPED: CommandResult = CommandResult::Ok { state: PowerState::Stopped };

    fn failed_msg(r: CommandResult) -> String {
        match r {
            CommandResult::Failed { message } => message,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn capacity_cpu_and_memory() {
        let mut h = host();
        assert_eq!(h.execute(&start("v1", "a", 3, 1024)), RUNNING);
        // Starting again is a no-op and does not count twice.
        assert_eq!(h.execute(&start("v1", "a", 3, 1024)), RUNNING);
        assert_eq!(h.used(), (3, 1024));
        let msg = failed_msg(h.execute(&start("v2", "b", 2, 512)));
        assert!(msg.starts_with("insufficient capacity on host sim-host-0: "), "{msg}");
        assert_eq!(h.vm_state("v2"), None);
        assert_eq!(h.execute(&start("v2", "b", 1, 512)), RUNNING);
        // Exactly full on CPU; memory now limits too.
        let msg = failed_msg(h.execute(&start("v3", "c", 0, 4096)));
        assert!(msg.contains("insufficient capacity"), "{msg}");
        // Stopping frees capacity.
        let stop = Command::StopVm { vm_id: "v1".into(), force: false };
        assert_eq!(h.execute(&stop), STOPPED);
        assert_eq!(h.used(), (1, 512));
        assert_eq!(h.execute(&start("v3", "c", 3, 3584)), RUNNING);
        assert_eq!(h.vms().len(), 2);
    }

    #[test]
    fn stop_is_idempotent() {
        let mut h = host();
        let stop = Command::StopVm { vm_id: "ghost".into(), force: true };
        assert_eq!(h.execute(&stop), STOPPED);
        h.execute(&start("v1", "a", 1, 1));
        let stop = Command::StopVm { vm_id: "v1".into(), force: false };
        assert_eq!(h.execute(&stop), STOPPED);
        assert_eq!(h.execute(&stop), STOPPED);
        assert_eq!(h.vm_state("v1"), Some(PowerState::Stopped));
        assert!(h.vms().is_empty());
    }

    #[test]
    fn reboot_requires_running() {
        let mut h = host();
        let reboot = Command::RebootVm { vm_id: "v1".into() };
        assert_eq!(failed_msg(h.execute(&reboot)), "vm v1 is not running on host sim-host-0");
        h.execute(&start("v1", "a", 1, 1));
        assert_eq!(h.execute(&reboot), RUNNING);
        h.execute(&Command::StopVm { vm_id: "v1".into(), force: false });
        assert_eq!(failed_msg(h.execute(&reboot)), "vm v1 is not running on host sim-host-0");
    }

    #[test]
    fn destroy_and_check() {
        let mut h = host();
        let check = Command::CheckVm { vm_id: "v1".into() };
        assert_eq!(h.execute(&check), STOPPED);
        h.execute(&start("v1", "a", 1, 1));
        assert_eq!(h.execute(&check), RUNNING);
        let destroy = Command::DestroyVm { vm_id: "v1".into() };
        assert_eq!(h.execute(&destroy), STOPPED);
        assert_eq!(h.vm_state("v1"), None);
        assert_eq!(h.execute(&destroy), STOPPED);
        assert_eq!(h.execute(&check), STOPPED);
        assert_eq!(h.used(), (0, 0));
    }

    #[test]
    fn fail_rules_inject_without_changing_state() {
        let rules = vec![FailRule::parse("start=db").unwrap(), FailRule::parse("stop=web").unwrap()];
        let mut h = host().with_fail_rules(rules);
        assert_eq!(failed_msg(h.execute(&start("v1", "db-1", 1, 1))), "simulated failure injected for start of db-1");
        assert_eq!(h.vm_state("v1"), None);
        assert_eq!(h.execute(&start("v2", "web-1", 1, 1)), RUNNING);
        // For stop the stored name is used, not the id.
        let stop = Command::StopVm { vm_id: "v2".into(), force: true };
        assert_eq!(failed_msg(h.execute(&stop)), "simulated failure injected for stop of web-1");
        assert_eq!(h.vm_state("v2"), Some(PowerState::Running));
        // Other ops on the same VM are unaffected.
        assert_eq!(h.execute(&Command::RebootVm { vm_id: "v2".into() }), RUNNING);

        let mut h = host().with_fail_rules(vec![FailRule::parse("*=web").unwrap()]);
        assert_eq!(h.execute(&start("v3", "app", 1, 1)), RUNNING);
        assert!(failed_msg(h.execute(&start("v4", "web", 1, 1))).contains("start of web"));
        // Unknown VM: the id stands in for the name.
        assert!(failed_msg(h.execute(&Command::DestroyVm { vm_id: "web-x".into() })).contains("destroy of web-x"));
        // check is never failed by a rule.
        assert_eq!(h.execute(&Command::CheckVm { vm_id: "web-x".into() }), STOPPED);
    }

    #[test]
    fn report_and_ping() {
        let mut h = host();
        h.execute(&start("v1", "a", 1, 1));
        h.execute(&start("v2", "b", 1, 1));
        h.execute(&Command::StopVm { vm_id: "v2".into(), force: false });
        let r = h.report("10.0.0.1");
        assert_eq!(r.hypervisor, "Simulator");
        assert_eq!(r.cpu_cores, 4);
        assert_eq!(r.vms, vec![VmReport { vm_id: "v1".into(), state: PowerState::Running }]);
        assert_eq!(h.ping().vms, r.vms);
        assert_eq!(h.ping().guid, "g-h0");
    }
}
