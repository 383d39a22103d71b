//! The command catalogue: every command Skyhold answers, whether it is async or admin-only, and
//! its parameters (what `listApis` reports, so `cloudmonkey sync` learns them).

use serde_json::{Value, json};

/// One API command.
pub struct CommandSpec {
    pub name: &'static str,
    pub is_async: bool,
    pub admin_only: bool,
    pub description: &'static str,
    /// `name:type` pairs separated by commas; a trailing `!` marks a required parameter.
    pub params: &'static str,
    /// Item key of list responses, or the object key of single-object responses.
    pub response_key: &'static str,
}

const PAGING: &str = "keyword:string,page:integer,pagesize:integer";

macro_rules! spec {
    ($name:literal, $async:literal, $admin:literal, $key:literal, $desc:literal, $params:expr) => {
        CommandSpec {
            name: $name,
            is_async: $async,
            admin_only: $admin,
            description: $desc,
            params: $params,
            response_key: $key,
        }
    };
}

/// Commands with real behaviour.
pub const COMMANDS: &[CommandSpec] = &[
    spec!(
        "login",
        false,
        false,
        "login",
        "Logs a user into the cloud and starts a session",
        "username:string!,password:string!,domain:string,domainId:uuid"
    ),
    spec!("logout", false, false, "logout", "Logs out the user", ""),
    spec!("listCapabilities", false, false, "capability", "Lists capabilities", ""),
    spec!("listApis", false, false, "api", "Lists all available APIs", "name:string"),
    spec!(
        "listZones",
        false,
        false,
        "zone",
        "Lists zones",
        "id:uuid,name:string,available:boolean,networktype:string,showcapacities:boolean,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "createZone",
        false,
        true,
        "zone",
        "Creates a Zone (Disabled unless allocationstate=Enabled, as in CloudStack)",
        "name:string!,networktype:string!,dns1:string!,internaldns1:string!,allocationstate:string"
    ),
    spec!(
        "updateZone",
        false,
        true,
        "zone",
        "Updates a Zone (allocationstate Enabled shows a new zone to users)",
        "id:uuid!,name:string,allocationstate:string,dns1:string,internaldns1:string"
    ),
    spec!(
        "listPods",
        false,
        true,
        "pod",
        "Lists all pods",
        "id:uuid,name:string,zoneid:uuid,allocationstate:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "createPod",
        false,
        true,
        "pod",
        "Creates a new Pod (endip defaults to the last usable address of the gateway's subnet)",
        "name:string!,zoneid:uuid!,gateway:string!,netmask:string!,startip:string!,endip:string,allocationstate:string"
    ),
    spec!(
        "updatePod",
        false,
        true,
        "pod",
        "Updates a Pod (name, allocationstate; its address range cannot change)",
        "id:uuid!,name:string,allocationstate:string"
    ),
    spec!(
        "addCluster",
        false,
        true,
        "cluster",
        "Adds a new cluster (hypervisor Simulator, clustertype CloudManaged)",
        "clustername:string!,clustertype:string!,hypervisor:string!,podid:uuid!,zoneid:uuid!,allocationstate:string"
    ),
    spec!(
        "listClusters",
        false,
        true,
        "cluster",
        "Lists clusters",
        "id:uuid,name:string,zoneid:uuid,podid:uuid,hypervisor:string,allocationstate:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "updateCluster",
        false,
        true,
        "cluster",
        "Updates an existing cluster (a Disabled cluster takes no new VMs; HA restarts still may)",
        "id:uuid!,clustername:string,allocationstate:string,clustertype:string,hypervisor:string,managedstate:string"
    ),
    spec!(
        "listHosts",
        false,
        true,
        "host",
        "Lists hosts",
        "id:uuid,name:string,zoneid:uuid,podid:uuid,clusterid:uuid,state:string,type:string,resourcestate:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!("updateHost", false, true, "host", "Updates a host", "id:uuid!,allocationstate:string,hosttags:string"),
    spec!(
        "listAlerts",
        false,
        true,
        "alert",
        "Lists all alerts",
        "id:uuid,type:integer,name:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "migrateVirtualMachine",
        true,
        true,
        "virtualmachine",
        "Attempts live migration of a virtual machine to another host",
        "virtualmachineid:uuid!,hostid:uuid"
    ),
    spec!("prepareHostForMaintenance", true, true, "host", "Prepares a host for maintenance", "id:uuid!"),
    spec!("cancelHostMaintenance", true, true, "host", "Cancels host maintenance", "id:uuid!"),
    spec!(
        "configureOutOfBandManagement",
        false,
        true,
        "outofbandmanagement",
        "Configures a host's out-of-band management interface",
        "hostid:uuid!,driver:string!,address:string!,port:integer,username:string!,password:string!"
    ),
    spec!(
        "enableOutOfBandManagementForHost",
        false,
        true,
        "outofbandmanagement",
        "Enables out-of-band management for a host",
        "hostid:uuid!"
    ),
    spec!(
        "disableOutOfBandManagementForHost",
        false,
        true,
        "outofbandmanagement",
        "Disables out-of-band management for a host",
        "hostid:uuid!"
    ),
    spec!(
        "listServiceOfferings",
        false,
        false,
        "serviceoffering",
        "Lists all available service offerings",
        "id:uuid,name:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "listTemplates",
        false,
        false,
        "template",
        "List all public, private, and privileged templates",
        "templatefilter:string!,id:uuid,name:string,zoneid:uuid,hypervisor:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "deployVirtualMachine",
        true,
        false,
        "virtualmachine",
        "Creates and automatically starts a virtual machine based on a service offering and template",
        "zoneid:uuid!,templateid:uuid!,serviceofferingid:uuid!,name:string,displayname:string,hostid:uuid,startvm:boolean,networkids:list,keypair:string,userdata:string,group:string"
    ),
    spec!("startVirtualMachine", true, false, "virtualmachine", "Starts a virtual machine", "id:uuid!,hostid:uuid"),
    spec!("stopVirtualMachine", true, false, "virtualmachine", "Stops a virtual machine", "id:uuid!,forced:boolean"),
    spec!("rebootVirtualMachine", true, false, "virtualmachine", "Reboots a virtual machine", "id:uuid!"),
    spec!(
        "destroyVirtualMachine",
        true,
        false,
        "virtualmachine",
        "Destroys a virtual machine",
        "id:uuid!,expunge:boolean"
    ),
    spec!("recoverVirtualMachine", false, false, "virtualmachine", "Recovers a virtual machine", "id:uuid!"),
    spec!("expungeVirtualMachine", true, true, "success", "Expunge a virtual machine", "id:uuid!"),
    spec!(
        "updateVirtualMachine",
        false,
        false,
        "virtualmachine",
        "Updates properties of a virtual machine",
        "id:uuid!,displayname:string,haenable:boolean"
    ),
    spec!(
        "listVirtualMachines",
        false,
        false,
        "virtualmachine",
        "List the virtual machines owned by the account",
        "id:uuid,ids:list,name:string,state:string,zoneid:uuid,hostid:uuid,account:string,domainid:uuid,listall:boolean,details:list,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "listVolumes",
        false,
        false,
        "volume",
        "Lists all volumes",
        "id:uuid,virtualmachineid:uuid,zoneid:uuid,type:string,listall:boolean,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "queryAsyncJobResult",
        false,
        false,
        "asyncjobs",
        "Retrieves the current status of asynchronous job",
        "jobid:uuid!"
    ),
    spec!(
        "listAsyncJobs",
        false,
        false,
        "asyncjobs",
        "Lists all pending asynchronous jobs for the account",
        "listall:boolean,startdate:date,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "listConfigurations",
        false,
        true,
        "configuration",
        "Lists all configurations",
        "name:string,category:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!("updateConfiguration", false, true, "configuration", "Updates a configuration", "name:string!,value:string"),
    spec!(
        "listEvents",
        false,
        false,
        "event",
        "A command to list events",
        "id:uuid,type:string,level:string,listall:boolean,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "listManagementServers",
        false,
        true,
        "managementserver",
        "Lists management servers",
        "id:uuid,name:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "prepareForShutdown",
        false,
        true,
        "readyforshutdown",
        "Prepares a management server for a safe shutdown: no new jobs, agents handed to peers",
        "managementserverid:string!"
    ),
    spec!(
        "cancelShutdown",
        false,
        true,
        "readyforshutdown",
        "Cancels a prepared shutdown of a management server",
        "managementserverid:string!"
    ),
    spec!(
        "readyForShutdown",
        false,
        true,
        "readyforshutdown",
        "Returns whether a management server is ready to be shut down",
        "managementserverid:string!"
    ),
    spec!(
        "listDomains",
        false,
        false,
        "domain",
        "Lists domains and provides detailed information for listed domains",
        "id:uuid,name:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "listAccounts",
        false,
        false,
        "account",
        "Lists accounts and provides detailed account information for listed accounts",
        "id:uuid,name:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!(
        "listUsers",
        false,
        false,
        "user",
        "Lists user accounts",
        "id:uuid,username:string,keyword:string,page:integer,pagesize:integer"
    ),
    spec!("listHypervisors", false, false, "hypervisor", "List hypervisors", "zoneid:uuid"),
    spec!("listRegions", false, false, "region", "Lists Regions", "id:integer,name:string"),
];

/// CloudStack list commands for resources Skyhold does not model yet: a valid empty list is the
/// honest answer (there are none).
pub const EMPTY_LISTS: &[&str] = &[
    "listNetworks",
    "listNetworkOfferings",
    "listDiskOfferings",
    "listSecurityGroups",
    "listSSHKeyPairs",
    "listAffinityGroups",
    "listProjects",
    "listProjectInvitations",
    "listTags",
    "listIsos",
    "listSnapshots",
    "listVMSnapshot",
    "listVPCs",
    "listVPCOfferings",
    "listPublicIpAddresses",
    "listLoadBalancerRules",
    "listFirewallRules",
    "listEgressFirewallRules",
    "listPortForwardingRules",
    "listIpForwardingRules",
    "listNetworkACLs",
    "listNetworkACLLists",
    "listStoragePools",
    "listImageStores",
    "listSecondaryStagingStores",
    "listSystemVms",
    "listRouters",
    "listOsTypes",
    "listOsCategories",
    "listInstanceGroups",
    "listVpnUsers",
    "listRemoteAccessVpns",
    "listSnapshotPolicies",
    "listVolumeSnapshotPolicies",
    "listUserData",
    "listBackups",
    "listKubernetesClusters",
    "listAutoScaleVmGroups",
    "listPhysicalNetworks",
    "listVlanIpRanges",
    "listNetworkServiceProviders",
    "listStorageTags",
    "listHostTags",
    "listLdapConfigurations",
    "listRoles",
    "listProjectAccounts",
];

pub fn find(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

pub fn is_empty_list(name: &str) -> bool {
    EMPTY_LISTS.contains(&name)
}

fn params_json(spec: &str) -> Vec<Value> {
    spec.split(',')
        .filter(|s| !s.is_empty())
        .map(|p| {
            let (p, required) = match p.strip_suffix('!') {
                Some(p) => (p, true),
                None => (p, false),
            };
            let (name, ty) = p.split_once(':').unwrap_or((p, "string"));
            json!({
                "name": name,
                "description": name,
                "type": ty,
                "length": 255,
                "required": required,
                "related": "",
                "since": "4.0.0",
            })
        })
        .collect()
}

/// The `listApis` entries visible to an admin or an ordinary user.
pub fn list_apis(admin: bool, only: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for c in COMMANDS.iter().filter(|c| admin || !c.admin_only) {
        if only.is_some_and(|n| n != c.name) {
            continue;
        }
        out.push(json!({
            "name": c.name,
            "description": c.description,
            "isasync": c.is_async,
            "related": "",
            "since": "4.0.0",
            "type": if c.is_async { "async" } else { "" },
            "params": params_json(c.params),
            "response": [ { "name": "id", "description": "the ID", "type": "string" } ],
        }));
    }
    for name in EMPTY_LISTS {
        if only.is_some_and(|n| n != *name) {
            continue;
        }
        out.push(json!({
            "name": name,
            "description": format!("{name} (none modelled yet: always an empty list)"),
            "isasync": false,
            "related": "",
            "since": "4.0.0",
            "params": params_json(PAGING),
            "response": [],
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn catalogue_is_consistent() {
        let mut names: Vec<&str> =
            super::COMMANDS.iter().map(|c| c.name).chain(super::EMPTY_LISTS.iter().copied()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(n, names.len(), "duplicate command names");
        let apis = super::list_apis(true, None);
        assert_eq!(apis.len(), n);
        let deploy = apis.iter().find(|a| a["name"] == "deployVirtualMachine").unwrap();
        assert_eq!(deploy["isasync"], true);
        let req: Vec<&str> = deploy["params"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["required"] == true)
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(req, ["zoneid", "templateid", "serviceofferingid"]);
        let user = super::list_apis(false, None);
        for admin_only in
            ["listHosts", "createZone", "createPod", "addCluster", "updateZone", "updatePod", "updateCluster"]
        {
            assert!(user.iter().all(|a| a["name"] != admin_only), "{admin_only} is admin-only");
        }
    }
}
