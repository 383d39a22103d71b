//! A real IPMI BMC for one simulated host: OpenIPMI's `ipmi_sim` on a free UDP port on 127.0.0.1,
//! spoken to with `ipmitool -I lanplus -C 3` (the lab recipe, `/work/shared/lab/README.md` §7).
//!
//! The directory given to [`Bmc::start`] holds `lan.conf`, `sim.emu`, the `power.sh`
//! chassis-control hook, `ipmi_sim.log`, the simulator's `state/` and the host's `host/`:
//! `host/power` (`1` on, `0` off), `host/ipmi-calls.log` (one line per hook call) and `host/pid`
//! (the process standing for the host: `power.sh` SIGKILLs it on power-off).

use crate::{die_with_parent, wait_for};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The BMC's address.
pub const BMC_ADDRESS: &str = "127.0.0.1";
/// The BMC's administrator (IPMI user 2).
pub const BMC_USER: &str = "admin";

/// The `chassis_control` hook: `power.sh <hostdir> get power | set power 0|1 | set reset 1 |
/// set boot X`. Power state in `<hostdir>/power`; on power-off, SIGKILL to the PID in
/// `<hostdir>/pid`.
const POWER_SH: &str = r#"#!/bin/sh
# chassis_control hook for ipmi_sim:  power.sh <hostdir> get power | set power 0|1 | set reset 1 | set boot X
# Power state lives in <hostdir>/power. On power-off, kills the PID in <hostdir>/pid (simulated host).
D=$1; op=$2; shift 2; mkdir -p "$D"; [ -f "$D/power" ] || echo 1 > "$D/power"
echo "$(date +%T.%N) $op $*" >> "$D/ipmi-calls.log"
case $op in
  get) for p in "$@"; do case $p in power) echo "power:$(cat "$D/power")";; boot) echo "boot:default";; *) exit 1;; esac; done ;;
  set) while [ $# -ge 2 ]; do case $1 in
         power) echo "$2" > "$D/power"; if [ "$2" = 0 ] && [ -f "$D/pid" ]; then kill -9 "$(cat "$D/pid")" 2>/dev/null; fi ;;
         reset|boot|identify) : ;;
         *) exit 1;; esac; shift 2; done ;;
  *) exit 1 ;;
esac
"#;

const SIM_EMU: &str = "mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
";

/// Whether `ipmi_sim` and `ipmitool` can be run here (Debian packages `openipmi`, `ipmitool`).
pub fn have_ipmi() -> bool {
    Command::new("ipmi_sim").arg("-v").output().is_ok() && Command::new("ipmitool").arg("-V").output().is_ok()
}

/// One simulated BMC (`ipmi_sim`) and its host's power state. Dropping it kills the simulator
/// (SIGKILL, by its handle); the host process in `host/pid` is the caller's.
pub struct Bmc {
    child: Option<Child>,
    /// The RMCP+ UDP port on [`BMC_ADDRESS`].
    pub port: u16,
    /// The directory given to [`Bmc::start`].
    pub dir: PathBuf,
    /// [`BMC_USER`]'s password.
    pub password: String,
    /// The BMC's GUID as `lan.conf` has it (32 hex digits, unique per start).
    pub guid: String,
}

impl Drop for Bmc {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Bmc {
    /// Start `ipmi_sim` for one host, configured in `dir` (created), with [`BMC_USER`] /
    /// `password` (at most 20 characters, no quotes or spaces), on a free UDP port of 127.0.0.1,
    /// and wait until it answers `chassis power status` with this BMC's own GUID behind it. The
    /// host starts powered on. Up to five ports are tried (another process may take a free port
    /// first). Start it from a thread that outlives it: the simulator gets SIGKILL when the
    /// starting thread exits.
    pub fn start(dir: &Path, password: &str) -> Result<Bmc> {
        if password.is_empty()
            || password.len() > 20
            || password.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\' || c.is_control())
        {
            bail!("BMC password must be 1-20 characters without spaces, quotes or backslashes");
        }
        let dir_str = dir.to_str().context("BMC directory must be UTF-8")?;
        if dir_str.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\') {
            bail!("BMC directory {dir_str:?} must not contain spaces or quotes (ipmi_sim's lan.conf)");
        }
        let host = dir.join("host");
        std::fs::create_dir_all(&host).with_context(|| format!("create {}", host.display()))?;
        std::fs::create_dir_all(dir.join("state"))?;
        let hook = dir.join("power.sh");
        std::fs::write(&hook, POWER_SH)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(dir.join("sim.emu"), SIM_EMU)?;
        std::fs::write(host.join("power"), "1\n")?;

        let mut last = None;
        for _ in 0..5 {
            let mut bmc = Bmc {
                child: None,
                port: free_udp_port()?,
                dir: dir.to_path_buf(),
                password: password.to_string(),
                guid: unique_guid(),
            };
            match bmc.launch() {
                Ok(()) => return Ok(bmc),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("ipmi_sim did not start")))
    }

    fn launch(&mut self) -> Result<()> {
        let dir = &self.dir;
        let name = format!("skyhold-bmc-{}", &self.guid[..12]);
        let lan = format!(
            "name \"{name}\"
set_working_mc 0x20
  startlan 1
    addr {BMC_ADDRESS} {port}
    priv_limit admin
    allowed_auths_callback none md5 straight
    allowed_auths_user none md5 straight
    allowed_auths_operator none md5 straight
    allowed_auths_admin none md5 straight
    guid {guid}
  endlan
  chassis_control \"{hook} {host}\"
  #    id valid name     passwd   priv  max-sess auths
  user 2 true  \"{BMC_USER}\"  \"{password}\"  admin 10       none md5 straight
",
            port = self.port,
            guid = self.guid,
            hook = dir.join("power.sh").display(),
            host = dir.join("host").display(),
            password = self.password,
        );
        std::fs::write(dir.join("lan.conf"), lan)?;
        let log = std::fs::File::create(dir.join("ipmi_sim.log"))?;
        let mut child = die_with_parent(&mut Command::new("ipmi_sim"))
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("sim.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start ipmi_sim (package openipmi)")?;
        // Event 1: the simulator has bound its UDP port (or exited: the port was taken).
        let port = self.port;
        let bound = wait_for(Duration::from_secs(10), || match child.try_wait() {
            Ok(Some(st)) => Some(Err(st)),
            _ => udp_bound(port).then_some(Ok(())),
        });
        let fail = |child: &mut Child, why: String| -> Result<()> {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("ipmi_sim.log")).unwrap_or_default();
            bail!("ipmi_sim on 127.0.0.1:{port}: {why}\n---- ipmi_sim.log ----\n{log}")
        };
        match bound {
            Some(Ok(())) => {}
            Some(Err(st)) => return fail(&mut child, format!("exited ({st})")),
            None => return fail(&mut child, "did not bind its port within 10 s".into()),
        }
        self.child = Some(child);
        // Event 2: it answers an authenticated session, and the BMC behind the port is this one.
        let answered = wait_for(Duration::from_secs(10), || match self.ipmitool(&["mc", "guid"]) {
            Ok(out) if guid_matches(&out, &self.guid) => Some(Ok(())),
            Ok(out) => Some(Err(format!("another BMC answers on this port: {out}"))),
            Err(_) => None,
        });
        let status = self.ipmitool(&["chassis", "power", "status"]);
        match (answered, status) {
            (Some(Ok(())), Ok(s)) if s.contains("Chassis Power is on") => Ok(()),
            (Some(Err(e)), _) => self.fail_launch(e),
            (None, _) => self.fail_launch("no answer to `mc guid` within 10 s".into()),
            (_, s) => self.fail_launch(format!("unexpected `chassis power status`: {s:?}")),
        }
    }

    fn fail_launch(&mut self, why: String) -> Result<()> {
        self.stop();
        let log = std::fs::read_to_string(self.dir.join("ipmi_sim.log")).unwrap_or_default();
        bail!("ipmi_sim on 127.0.0.1:{}: {why}\n---- ipmi_sim.log ----\n{log}", self.port)
    }

    /// Run `ipmitool -I lanplus -C 3 ... <args>` against this BMC as [`BMC_USER`] (password in
    /// `IPMI_PASSWORD`). Its stdout, or its stderr on failure.
    pub fn ipmitool(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-H", BMC_ADDRESS, "-p", &self.port.to_string(), "-U", BMC_USER])
            .args(["-E", "-N", "1", "-R", "1"])
            .args(args)
            .env("IPMI_PASSWORD", &self.password)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run ipmitool: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The host's directory (`power`, `pid`, `ipmi-calls.log`).
    pub fn host_dir(&self) -> PathBuf {
        self.dir.join("host")
    }

    /// The process standing for the host: `power.sh` SIGKILLs it on power-off.
    pub fn set_host_pid(&self, pid: u32) -> Result<()> {
        let tmp = self.host_dir().join("pid.tmp");
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, self.host_dir().join("pid"))?;
        Ok(())
    }

    /// The host's power as the hook last set it: `true` on (also before the first hook call).
    pub fn power(&self) -> bool {
        std::fs::read_to_string(self.host_dir().join("power")).map(|s| s.trim() != "0").unwrap_or(true)
    }

    /// The hook's log: one line per call, `HH:MM:SS.nanos get power` / `... set power 0`.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.host_dir().join("ipmi-calls.log"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The simulator's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the simulator is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kill the simulator (SIGKILL by its handle) and reap it: the BMC stops answering, as if it
    /// lost power with its host. Nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A UDP port that is free on 127.0.0.1 right now (bound to port 0, then released).
fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a free UDP port on 127.0.0.1")?;
    Ok(s.local_addr()?.port())
}

/// Whether some socket is bound to UDP `127.0.0.1:port` (or `0.0.0.0:port`), from `/proc/net/udp`.
fn udp_bound(port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else { return false };
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|local| local.ends_with(&suffix) && (local.starts_with("0100007F:") || local.starts_with("00000000:")))
}

/// 32 hex digits, unique per call in this machine's lifetime (time, PID, counter).
fn unique_guid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{:08x}{:08x}", std::process::id(), n as u32)
}

/// Whether `ipmitool mc guid` output shows `guid`. ipmitool reorders the 16 bytes by the
/// encoding it detects (reversed, per field, or as stored), so the bytes are compared as a set.
fn guid_matches(mc_guid_output: &str, guid: &str) -> bool {
    let Some(line) = mc_guid_output.lines().find(|l| l.trim_start().starts_with("System GUID")) else { return false };
    let Some((_, value)) = line.split_once(':') else { return false };
    let printed: String = value.chars().filter(char::is_ascii_hexdigit).collect();
    guid_bytes(&printed) == guid_bytes(guid) && printed.len() == 32
}

fn guid_bytes(hex: &str) -> Vec<String> {
    let mut v: Vec<String> =
        (0..hex.len() / 2).filter_map(|i| hex.get(2 * i..2 * i + 2)).map(str::to_ascii_lowercase).collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_is_recognised_in_any_byte_order() {
        // as ipmitool 1.8.19 prints ipmi_sim 1.0.13's GUIDs
        let g = "0123456789abcdef0123456789abcdef";
        assert!(guid_matches("System GUID   : efcdab89-6745-2301-efcd-ab8967452301\nGUID Encoding : IPMI\n", g));
        let g = "18ea46dccd3bc89d000001e100000006";
        assert!(guid_matches("System GUID   : 18EA46DCCD3BC89D000001E100000006\n", g));
        assert!(!guid_matches("System GUID   : 18EA46DCCD3BC89D000001E100000007\n", g));
        assert!(!guid_matches("GUID Encoding : IPMI\n", g));
        let a = unique_guid();
        assert_eq!(a.len(), 32);
        assert_ne!(a, unique_guid());
    }

    #[test]
    fn start_power_off_and_stop() {
        if !have_ipmi() {
            assert!(std::env::var_os("CI").is_none(), "ipmi_sim and ipmitool must be installed under CI");
            eprintln!("skipping: ipmi_sim/ipmitool not installed");
            return;
        }
        let tmp = tempfile::tempdir_in(crate::fast_tmp()).expect("tempdir");
        let mut bmc = Bmc::start(&tmp.path().join("bmc"), "pw1").expect("start ipmi_sim");
        assert!(bmc.power());
        let mut host = crate::Kids(vec![Command::new("sleep").arg("600").spawn().expect("sleep")]);
        bmc.set_host_pid(host.0[0].id()).expect("pid");
        let out = bmc.ipmitool(&["chassis", "power", "off"]).expect("power off");
        assert!(out.contains("Down/Off"), "{out}");
        let st = wait_for(Duration::from_secs(10), || host.0[0].try_wait().ok().flatten()).expect("host killed");
        assert!(!st.success(), "the host was killed: {st}");
        assert!(!bmc.power());
        assert!(bmc.calls().iter().any(|c| c.ends_with("set power 0")), "{:?}", bmc.calls());
        bmc.stop();
        assert!(!bmc.is_running());
        assert!(!udp_bound(bmc.port) || bmc.ipmitool(&["chassis", "power", "status"]).is_err());
    }
}
