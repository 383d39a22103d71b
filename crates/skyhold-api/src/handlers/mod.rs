//! Command handlers, one file per resource family.

mod admin;
mod ha;
mod infra;
mod jobs;
mod vm;

use crate::params::Params;
use crate::reply::Reply;
use skyhold_core::vm::Caller;
use skyhold_core::{Core, CoreError};
use skyhold_types::CsError;

/// What a handler sees.
pub struct Ctx<'a> {
    pub core: &'a Core,
    pub caller: &'a Caller,
    pub p: &'a Params,
    pub name: &'a str,
}

impl Ctx<'_> {
    pub fn default_page_size(&self) -> u64 {
        self.core.settings().get_i64(skyhold_types::settings::DEFAULT_PAGE_SIZE).max(1) as u64
    }
}

pub type HResult = Result<Reply, CsError>;

/// Map a domain error to what the caller sees (storage failures logged once here).
pub fn cs(e: CoreError) -> CsError {
    if let CoreError::Db(db) = &e {
        tracing::warn!(error = %db, "storage error while handling a command");
    }
    e.to_cs()
}

pub async fn dispatch(ctx: &Ctx<'_>) -> HResult {
    match ctx.name {
        "listCapabilities" => admin::list_capabilities(ctx).await,
        "listApis" => admin::list_apis(ctx).await,
        "listZones" => infra::list_zones(ctx).await,
        "createZone" => infra::create_zone(ctx).await,
        "updateZone" => infra::update_zone(ctx).await,
        "listPods" => infra::list_pods(ctx).await,
        "createPod" => infra::create_pod(ctx).await,
        "updatePod" => infra::update_pod(ctx).await,
        "listClusters" => infra::list_clusters(ctx).await,
        "addCluster" => infra::add_cluster(ctx).await,
        "updateCluster" => infra::update_cluster(ctx).await,
        "listHosts" => infra::list_hosts(ctx).await,
        "updateHost" => infra::update_host(ctx).await,
        "listServiceOfferings" => infra::list_service_offerings(ctx).await,
        "listTemplates" => infra::list_templates(ctx).await,
        "listHypervisors" => infra::list_hypervisors(ctx).await,
        "deployVirtualMachine" => vm::deploy(ctx).await,
        "startVirtualMachine" => vm::start(ctx).await,
        "stopVirtualMachine" => vm::stop(ctx).await,
        "rebootVirtualMachine" => vm::reboot(ctx).await,
        "destroyVirtualMachine" => vm::destroy(ctx).await,
        "recoverVirtualMachine" => vm::recover(ctx).await,
        "expungeVirtualMachine" => vm::expunge(ctx).await,
        "updateVirtualMachine" => vm::update(ctx).await,
        "listVirtualMachines" => vm::list(ctx).await,
        "listVolumes" => vm::list_volumes(ctx).await,
        "queryAsyncJobResult" => jobs::query(ctx).await,
        "listAsyncJobs" => jobs::list(ctx).await,
        "listConfigurations" => admin::list_configurations(ctx).await,
        "updateConfiguration" => admin::update_configuration(ctx).await,
        "listEvents" => admin::list_events(ctx).await,
        "listManagementServers" => admin::list_management_servers(ctx).await,
        "prepareForShutdown" | "cancelShutdown" | "readyForShutdown" => admin::shutdown(ctx).await,
        "listDomains" => admin::list_domains(ctx).await,
        "listAccounts" => admin::list_accounts(ctx).await,
        "listUsers" => admin::list_users(ctx).await,
        "listRegions" => admin::list_regions(ctx).await,
        "listAlerts" => ha::list_alerts(ctx).await,
        "migrateVirtualMachine" => ha::migrate(ctx).await,
        "prepareHostForMaintenance" => ha::host_job(ctx, skyhold_core::vm::cmd::HOST_PREPARE_MAINTENANCE).await,
        "cancelHostMaintenance" => ha::host_job(ctx, skyhold_core::vm::cmd::HOST_CANCEL_MAINTENANCE).await,
        "configureOutOfBandManagement" => ha::configure_oob(ctx).await,
        "enableOutOfBandManagementForHost" => ha::enable_oob(ctx, true).await,
        "disableOutOfBandManagementForHost" => ha::enable_oob(ctx, false).await,
        other => Err(CsError::new(
            skyhold_types::ErrorCode::Unauthorized,
            format!("The given command {other} does not exist or it is not available for user"),
        )),
    }
}
