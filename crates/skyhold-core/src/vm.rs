//! VM operations as the API asks for them. State-changing ones only validate and queue a durable
//! job (in the same transaction as any rows they create) and return its id at once; the job
//! executor does the work (`jobs/`).

use crate::events::{EventOwner, record};
use crate::{Core, CoreError};
use serde_json::json;
use skyhold_db::job::{NewJob, job_insert};
use skyhold_db::vm::{NewVm, NewVolume, Nic, Vm, VmFilter, nic_insert, vm_fetch, vm_insert, volume_insert_root};
use skyhold_db::{Page, Sql, retry_tx};
use skyhold_types::{CsError, ErrorCode, VmState};

/// Who is asking.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub username: String,
    pub account_id: String,
    pub account_name: String,
    pub domain_id: String,
    pub account_type: i64,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.account_type == 1
    }
    pub fn owner(&self) -> EventOwner {
        EventOwner {
            account_id: self.account_id.clone(),
            domain_id: self.domain_id.clone(),
            user_id: Some(self.user_id.clone()),
        }
    }
}

/// CloudStack's job command names (the `cmd` field of job responses).
pub mod cmd {
    pub const DEPLOY: &str = "org.apache.cloudstack.api.command.admin.vm.DeployVMCmdByAdmin";
    pub const START: &str = "org.apache.cloudstack.api.command.admin.vm.StartVMCmdByAdmin";
    pub const STOP: &str = "org.apache.cloudstack.api.command.admin.vm.StopVMCmdByAdmin";
    pub const REBOOT: &str = "org.apache.cloudstack.api.command.admin.vm.RebootVMCmdByAdmin";
    pub const DESTROY: &str = "org.apache.cloudstack.api.command.admin.vm.DestroyVMCmdByAdmin";
    pub const EXPUNGE: &str = "org.apache.cloudstack.api.command.admin.vm.ExpungeVMCmd";
    pub const MIGRATE: &str = "org.apache.cloudstack.api.command.admin.vm.MigrateVMCmd";
    pub const HOST_PREPARE_MAINTENANCE: &str = "org.apache.cloudstack.api.command.admin.host.PrepareForMaintenanceCmd";
    pub const HOST_CANCEL_MAINTENANCE: &str = "org.apache.cloudstack.api.command.admin.host.CancelMaintenanceCmd";
}

/// `deployVirtualMachine` after parameter parsing.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub zone_id: String,
    pub template_id: String,
    pub offering_id: String,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub host_id: Option<String>,
    pub start: bool,
    pub ha_enable: Option<bool>,
}

/// What a queued job works on.
#[derive(Clone, Copy)]
enum JobTarget<'a> {
    Vm(&'a str),
    Host(&'a str),
}

fn not_found(what: &str, id: &str) -> CoreError {
    CoreError::param(format!("Unable to find {what} with specified id {id}"))
}

/// Fetch a VM the caller may see, or 431 naming the id.
pub async fn vm_visible(c: &mut dyn Sql, caller: &Caller, id: &str) -> Result<Vm, CoreError> {
    match vm_fetch(c, id).await? {
        Some(vm) if caller.is_admin() || vm.account_id == caller.account_id => Ok(vm),
        _ => Err(CoreError::param(format!(
            "Unable to execute API command due to invalid value. Invalid parameter id value={id} due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class."
        ))),
    }
}

/// Valid VM host name (RFC 1123 label, as CloudStack requires).
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.chars().next().is_some_and(|c| c.is_ascii_digit())
}

impl Core {
    /// Create a VM (Stopped, with root volume and NIC) and queue its deploy job, in one transaction.
    pub async fn vm_deploy(&self, caller: &Caller, req: DeployRequest) -> Result<(String, String), CoreError> {
        if self.is_shutting_down() {
            return Err(CoreError::cs(ErrorCode::Unavailable, "management server is shutting down"));
        }
        if req.host_id.is_some() && !caller.is_admin() {
            return Err(CoreError::cs(ErrorCode::AccountError, "only an administrator may choose the host"));
        }
        // Reads only; run as a (rerunnable) transaction so a database failover in the middle
        // waits and retries instead of failing the call.
        let (zone, template, offering, pods) = retry_tx!(self.db(), |tx| {
            async {
                let c = &mut tx;
                let zones = skyhold_db::infra::zone_list(c).await?;
                let zone =
                    zones.into_iter().find(|z| z.id == req.zone_id).ok_or_else(|| not_found("zone", &req.zone_id))?;
                let template = skyhold_db::infra::template_list(c)
                    .await?
                    .into_iter()
                    .find(|t| {
                        t.id == req.template_id
                            && (t.is_public || t.account_id == caller.account_id || caller.is_admin())
                    })
                    .ok_or_else(|| not_found("template", &req.template_id))?;
                if let Some(z) = &template.zone_id
                    && z != &zone.id
                {
                    return Err(CoreError::param(format!(
                        "template {} is not available in zone {}",
                        template.id, zone.id
                    )));
                }
                let offering = skyhold_db::infra::offering_list(c)
                    .await?
                    .into_iter()
                    .find(|o| o.id == req.offering_id)
                    .ok_or_else(|| not_found("service offering", &req.offering_id))?;
                // The VM's address comes from a pod's range, and it runs only in that pod: the
                // required host's pod, or the first Enabled pod of the zone with a free address.
                let host_pod = match &req.host_id {
                    Some(h) => match skyhold_db::infra::host_fetch(c, h).await? {
                        None => return Err(not_found("host", h)),
                        Some(host) if host.zone_id != zone.id => {
                            return Err(CoreError::param(format!(
                                "host {} is not in zone {} (parameter hostid)",
                                host.name, zone.name
                            )));
                        }
                        Some(host) => Some(host.pod_id),
                    },
                    None => None,
                };
                let pods: Vec<_> = skyhold_db::infra::pod_list(c)
                    .await?
                    .into_iter()
                    .filter(|p| p.zone_id == zone.id)
                    .filter(|p| match &host_pod {
                        // An admin's explicit host: its pod, whatever its allocation state (as
                        // placement allows the required host).
                        Some(hp) => &p.id == hp,
                        None => p.allocation_state == "Enabled",
                    })
                    .collect();
                if pods.is_empty() {
                    return Err(CoreError::cs(
                        ErrorCode::InsufficientCapacity,
                        match host_pod {
                            Some(_) => {
                                format!("Insufficient address capacity: the host's pod is not in zone {}", zone.name)
                            }
                            None => format!(
                                "Insufficient address capacity: zone {} has no Enabled pod with a guest IP range",
                                zone.name
                            ),
                        },
                    ));
                }
                Ok::<_, CoreError>((zone, template, offering, pods))
            }
            .await
        })?;
        if zone.allocation_state != "Enabled" && !caller.is_admin() {
            return Err(CoreError::cs(ErrorCode::ResourceUnavailable, format!("zone {} is disabled", zone.name)));
        }
        let vm_id = uuid::Uuid::new_v4().to_string();
        let name = match &req.name {
            Some(n) => {
                if !valid_vm_name(n) {
                    return Err(CoreError::param(
                        "Invalid value for parameter name: a VM name must be 1-63 letters, digits or hyphens, \
                         start with a letter and not end with a hyphen",
                    ));
                }
                n.clone()
            }
            None => format!("VM-{vm_id}"),
        };
        let display_name = req.display_name.clone().unwrap_or_else(|| name.clone());
        if display_name.len() > 255 {
            return Err(CoreError::param("Invalid value for parameter displayname: longer than 255 characters"));
        }
        let ha = req.ha_enable.unwrap_or(offering.offer_ha);
        if ha && offering.storage_type == "local" {
            return Err(CoreError::param(
                "HA cannot be enabled for a VM on local storage: HA needs shared primary storage",
            ));
        }
        let job_id = uuid::Uuid::new_v4().to_string();
        let params = json!({ "start": req.start, "hostid": req.host_id }).to_string();
        let owner = caller.owner();
        retry_tx!(self.db(), |tx| {
            async {
                // A rerun after a lost COMMIT answer: the first attempt did commit.
                if skyhold_db::job::job_fetch(&mut tx, &job_id).await?.is_some() {
                    return Ok(());
                }
                if skyhold_db::vm::vm_name_taken(&mut tx, &caller.account_id, &name).await? {
                    return Err(CoreError::param(format!(
                        "A VM with name {name} already exists in account {}",
                        caller.account_name
                    )));
                }
                let nic_id = uuid::Uuid::new_v4().to_string();
                let mut placed = None;
                for p in &pods {
                    if let Some(ip) = skyhold_db::infra::pod_ip_allocate(&mut tx, &p.id, &nic_id).await? {
                        placed = Some((p, ip));
                        break;
                    }
                }
                let Some((pod, ip)) = placed else {
                    return Err(CoreError::cs(
                        ErrorCode::InsufficientCapacity,
                        format!("Insufficient address capacity: no free IP address left in zone {}", zone.name),
                    ));
                };
                vm_insert(
                    &mut tx,
                    &NewVm {
                        id: vm_id.clone(),
                        name: name.clone(),
                        display_name: display_name.clone(),
                        instance_name: format!("i-{}", &vm_id[..8]),
                        state: VmState::Stopped.as_str().into(),
                        account_id: caller.account_id.clone(),
                        domain_id: caller.domain_id.clone(),
                        user_id: caller.user_id.clone(),
                        zone_id: zone.id.clone(),
                        pod_id: Some(pod.id.clone()),
                        template_id: template.id.clone(),
                        offering_id: offering.id.clone(),
                        cpu: offering.cpu,
                        cpu_mhz: offering.cpu_mhz,
                        mem_mb: offering.mem_mb,
                        ha_enabled: ha,
                    },
                )
                .await?;
                volume_insert_root(
                    &mut tx,
                    &NewVolume {
                        id: uuid::Uuid::new_v4().to_string(),
                        vm_id: vm_id.clone(),
                        name: format!("ROOT-{}", &vm_id[..8]),
                        size_bytes: template.size_bytes,
                        zone_id: zone.id.clone(),
                        account_id: caller.account_id.clone(),
                        domain_id: caller.domain_id.clone(),
                        template_id: template.id.clone(),
                        storage_type: offering.storage_type.clone(),
                    },
                )
                .await?;
                nic_insert(
                    &mut tx,
                    &Nic {
                        id: nic_id.clone(),
                        vm_id: vm_id.clone(),
                        pod_id: pod.id.clone(),
                        ip,
                        netmask: pod.netmask.clone(),
                        gateway: pod.gateway.clone(),
                        mac: random_mac(),
                        is_default: true,
                    },
                )
                .await?;
                job_insert(
                    &mut tx,
                    &NewJob {
                        id: job_id.clone(),
                        cmd: cmd::DEPLOY.into(),
                        user_id: caller.user_id.clone(),
                        account_id: caller.account_id.clone(),
                        domain_id: caller.domain_id.clone(),
                        instance_type: Some("VirtualMachine".into()),
                        instance_id: Some(vm_id.clone()),
                        params: params.clone(),
                    },
                )
                .await?;
                record(
                    &mut tx,
                    &owner,
                    "VM.CREATE",
                    "INFO",
                    format!("Created VM {name}"),
                    Some(("VirtualMachine", &vm_id)),
                )
                .await?;
                Ok::<(), CoreError>(())
            }
            .await
        })?;
        self.wake_cluster();
        Ok((vm_id, job_id))
    }

    /// Queue a job on an existing VM after checking the caller may touch it and the request makes
    /// sense now. Returns the job id.
    pub async fn vm_queue_job(
        &self,
        caller: &Caller,
        vm_id: &str,
        cmd: &'static str,
        params: serde_json::Value,
    ) -> Result<String, CoreError> {
        self.queue_job(caller, cmd, params.to_string(), JobTarget::Vm(vm_id)).await
    }

    /// Queue a host job (`prepareHostForMaintenance`, `cancelHostMaintenance`); returns its id.
    pub async fn host_queue_job(&self, caller: &Caller, host_id: &str, cmd: &'static str) -> Result<String, CoreError> {
        self.queue_job(caller, cmd, "{}".into(), JobTarget::Host(host_id)).await
    }

    /// Check the request against its object and insert the job, in one transaction; wake the
    /// executors. Returns the job id.
    async fn queue_job(
        &self,
        caller: &Caller,
        cmd: &'static str,
        params: String,
        target: JobTarget<'_>,
    ) -> Result<String, CoreError> {
        if self.is_shutting_down() {
            return Err(CoreError::cs(ErrorCode::Unavailable, "management server is shutting down"));
        }
        let job_id = uuid::Uuid::new_v4().to_string();
        retry_tx!(self.db(), |tx| {
            async {
                // A rerun after a lost COMMIT answer: the first attempt did commit.
                if skyhold_db::job::job_fetch(&mut tx, &job_id).await?.is_some() {
                    return Ok(());
                }
                let (kind, id) = match target {
                    JobTarget::Vm(vm_id) => {
                        let vm = vm_visible(&mut tx, caller, vm_id).await?;
                        let state: VmState = vm.state.parse().unwrap_or(VmState::Error);
                        let refused = match cmd {
                            cmd::START | cmd::STOP | cmd::REBOOT => {
                                matches!(state, VmState::Destroyed | VmState::Expunging)
                            }
                            cmd::DESTROY => state == VmState::Expunging,
                            cmd::EXPUNGE => state == VmState::Expunging,
                            _ => false,
                        };
                        if refused {
                            return Err(CoreError::cs(
                                ErrorCode::ParamError,
                                format!("VM {} is in state {}; the operation is not allowed", vm.name, vm.state),
                            ));
                        }
                        ("VirtualMachine", vm.id)
                    }
                    JobTarget::Host(host_id) => match skyhold_db::infra::host_fetch(&mut tx, host_id).await? {
                        Some(h) => ("Host", h.id),
                        None => return Err(not_found("host", host_id)),
                    },
                };
                job_insert(
                    &mut tx,
                    &NewJob {
                        id: job_id.clone(),
                        cmd: cmd.into(),
                        user_id: caller.user_id.clone(),
                        account_id: caller.account_id.clone(),
                        domain_id: caller.domain_id.clone(),
                        instance_type: Some(kind.into()),
                        instance_id: Some(id),
                        params: params.clone(),
                    },
                )
                .await?;
                Ok::<(), CoreError>(())
            }
            .await
        })?;
        self.wake_cluster();
        Ok(job_id)
    }

    /// `recoverVirtualMachine`: Destroyed -> Stopped (synchronous, as in CloudStack).
    pub async fn vm_recover(&self, caller: &Caller, vm_id: &str) -> Result<(), CoreError> {
        let owner = caller.owner();
        retry_tx!(self.db(), |tx| {
            async {
                let vm = vm_visible(&mut tx, caller, vm_id).await?;
                if vm.state != "Destroyed" {
                    return Err(CoreError::param(format!(
                        "VM {} is in state {}; only a Destroyed VM can be recovered",
                        vm.name, vm.state
                    )));
                }
                let moved = skyhold_db::vm::vm_transition(
                    &mut tx,
                    &vm.id,
                    &["Destroyed"],
                    "Stopped",
                    skyhold_db::vm::HostChange::Clear,
                    None,
                )
                .await?;
                if !moved {
                    return Err(CoreError::cs(ErrorCode::ResourceInUse, "VM changed state concurrently; retry"));
                }
                record(
                    &mut tx,
                    &owner,
                    "VM.RECOVER",
                    "INFO",
                    format!("Recovered VM {}", vm.name),
                    Some(("VirtualMachine", &vm.id)),
                )
                .await?;
                Ok::<(), CoreError>(())
            }
            .await
        })
    }

    /// `updateVirtualMachine` (`displayname`, `haenable`).
    pub async fn vm_update(
        &self,
        caller: &Caller,
        vm_id: &str,
        display_name: Option<&str>,
        ha_enable: Option<bool>,
    ) -> Result<(), CoreError> {
        let owner = caller.owner();
        retry_tx!(self.db(), |tx| {
            async {
                let vm = vm_visible(&mut tx, caller, vm_id).await?;
                if ha_enable == Some(true) {
                    let offering = skyhold_db::infra::offering_list(&mut tx)
                        .await?
                        .into_iter()
                        .find(|o| o.id == vm.offering_id);
                    if offering.is_some_and(|o| o.storage_type == "local") {
                        return Err(CoreError::param(
                            "HA cannot be enabled for this VM: its root volume is on local storage, and HA needs shared primary storage",
                        ));
                    }
                }
                skyhold_db::vm::vm_update_attrs(&mut tx, &vm.id, display_name, ha_enable).await?;
                record(&mut tx, &owner, "VM.UPDATE", "INFO", format!("Updated VM {}", vm.name), Some(("VirtualMachine", &vm.id)))
                    .await?;
                Ok::<(), CoreError>(())
            }
            .await
        })
    }

    /// A VM and its NICs, rendered for the caller.
    pub async fn vm_render(&self, caller: &Caller, vm_id: &str) -> Result<serde_json::Value, CoreError> {
        let mut c = self.db().conn().await?;
        let vm = vm_visible(&mut c, caller, vm_id).await?;
        let nics = skyhold_db::vm::nic_list_for_vms(&mut c, std::slice::from_ref(&vm.id)).await?;
        Ok(crate::view::vm_json(&vm, &nics, caller.is_admin()))
    }

    /// One page of VMs visible to the caller, rendered, and the total.
    pub async fn vm_list(
        &self,
        caller: &Caller,
        mut filter: VmFilter,
        page: Page,
    ) -> Result<(Vec<serde_json::Value>, i64), CoreError> {
        if !caller.is_admin() {
            filter.account_id = Some(caller.account_id.clone());
        }
        let mut c = self.db().conn().await?;
        let (vms, total) = skyhold_db::vm::vm_list(&mut c, &filter, page).await?;
        let ids: Vec<String> = vms.iter().map(|v| v.id.clone()).collect();
        let nics = skyhold_db::vm::nic_list_for_vms(&mut c, &ids).await?;
        let mut by_vm: std::collections::HashMap<&str, Vec<Nic>> = std::collections::HashMap::new();
        for n in &nics {
            by_vm.entry(n.vm_id.as_str()).or_default().push(n.clone());
        }
        let out = vms
            .iter()
            .map(|v| {
                crate::view::vm_json(v, by_vm.get(v.id.as_str()).map(Vec::as_slice).unwrap_or(&[]), caller.is_admin())
            })
            .collect();
        Ok((out, total))
    }
}

fn random_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("1e:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0] & 0x7f, b[1], b[2], rand::random::<u8>())
}

/// Error for a request that names an unknown id of some kind.
pub fn unknown_id(param: &str, id: &str) -> CsError {
    CsError::param(format!("Unable to execute API command due to invalid value. Invalid parameter {param} value={id}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn vm_names() {
        for ok in ["web1", "a", "web-server-01"] {
            assert!(super::valid_vm_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "1abc", "has space", "ünï", &"x".repeat(64)] {
            assert!(!super::valid_vm_name(bad), "{bad}");
        }
    }
}
