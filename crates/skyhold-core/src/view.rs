//! How domain objects look on the CloudStack wire. Job results are rendered when a job finishes
//! (as CloudStack does), so the renderer lives here and the API crate reuses it.

use serde_json::{Value, json};
use skyhold_db::vm::{Nic, Vm};
use skyhold_types::time::cs_date;

/// A VM as `listVirtualMachines` and job results show it. `admin` adds host and instance names.
pub fn vm_json(vm: &Vm, nics: &[Nic], admin: bool) -> Value {
    let nic: Vec<Value> = nics
        .iter()
        .filter(|n| n.vm_id == vm.id)
        .map(|n| {
            json!({
                "id": n.id,
                "ipaddress": n.ip,
                "netmask": n.netmask,
                "gateway": n.gateway,
                "macaddress": n.mac,
                "isdefault": n.is_default,
                "type": "Shared",
                "traffictype": "Guest",
                "broadcasturi": "vlan://untagged",
                "isolationuri": "vlan://untagged",
            })
        })
        .collect();
    let mut v = json!({
        "id": vm.id,
        "name": vm.name,
        "displayname": vm.display_name,
        "account": vm.account_name,
        "userid": vm.user_id,
        "domainid": vm.domain_id,
        "domain": vm.domain_name,
        "created": cs_date(vm.created_ms),
        "state": vm.state,
        "haenable": vm.ha_enabled,
        "zoneid": vm.zone_id,
        "zonename": vm.zone_name,
        "templateid": vm.template_id,
        "templatename": vm.template_name,
        "templatedisplaytext": vm.template_name,
        "serviceofferingid": vm.offering_id,
        "serviceofferingname": vm.offering_name,
        "cpunumber": vm.cpu,
        "cpuspeed": vm.cpu_mhz,
        "memory": vm.mem_mb,
        "guestosid": "",
        "rootdeviceid": 0,
        "rootdevicetype": "ROOT",
        "passwordenabled": false,
        "isdynamicallyscalable": false,
        "hypervisor": "Simulator",
        "nic": nic,
        "tags": [],
        "affinitygroup": [],
        "securitygroup": [],
    });
    if let Some(obj) = v.as_object_mut() {
        if admin {
            obj.insert("instancename".into(), json!(vm.instance_name));
            if let Some(h) = &vm.host_id {
                obj.insert("hostid".into(), json!(h));
            }
            if let Some(h) = &vm.host_name {
                obj.insert("hostname".into(), json!(h));
            }
        }
        if let Some(r) = &vm.state_reason
            && vm.state == "Error"
        {
            obj.insert("details".into(), json!({ "error": r }));
        }
    }
    v
}
