//! Out-of-band power control through the `ipmitool` binary (IPMI 2.0 / RMCP+ over LAN).
//!
//! Every call runs `ipmitool -I lanplus -C 3 -H <address> -p <port> -U <user> -E -N 1 -R 2 -v
//! chassis ...` with the password in the child's `IPMI_PASSWORD` environment variable (never on
//! the command line, where `ps` shows it), stdin closed, and a total timeout after which the
//! child is killed. `-C 3` (AES-CBC-128 / HMAC-SHA1) avoids ipmitool's cipher suite discovery,
//! which costs about 10 s on some BMCs; `-v` makes ipmitool say *why* a session failed, which
//! separates a refused login from a BMC that does not answer.
//!
//! Only [`power_off`] gives a [`FenceProof`], and only after a `chassis power status` read back
//! says the power is off.

use super::{FenceProof, ProofKind};
use std::ffi::OsStr;
use std::fmt;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The longest a single `ipmitool` call may take in [`power_status`] and [`power_on`]. A BMC
/// that does not answer makes ipmitool (with `-N 1 -R 2`) give up after about 6 s by itself.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// After a `chassis power off` was acknowledged but the power still reads on, it is sent again
/// after this long.
const RESEND_AFTER: Duration = Duration::from_secs(2);
/// Pause between two read-backs of the power state.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// At most this much of ipmitool's output is quoted in an error.
const MAX_QUOTE: usize = 600;

/// A host's BMC. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct IpmiTarget {
    /// Host name or IP address of the BMC.
    pub address: String,
    /// RMCP+ UDP port (623 on real BMCs).
    pub port: u16,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for IpmiTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpmiTarget")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl IpmiTarget {
    /// `address:port` (`[address]:port` for an IPv6 address), as errors and proofs name the BMC.
    pub fn endpoint(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// The chassis power state as the BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerStatus {
    On,
    Off,
}

/// Why a power operation failed. No variant is a proof of anything: the host may still run.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("ipmitool is not installed here (install the `ipmitool` package): {0}")]
    IpmitoolMissing(String),
    #[error("cannot run ipmitool: {0}")]
    Spawn(String),
    #[error(
        "BMC {bmc} is not answering (check its address and port, that it has power and network, and that \
         IPMI over LAN is enabled): {detail}"
    )]
    NotAnswering { bmc: String, detail: String },
    #[error("BMC {bmc} refused the login of user {username:?} (wrong user name or password?): ipmitool said: {stderr}")]
    AuthRefused { bmc: String, username: String, stderr: String },
    #[error("BMC {bmc}: unexpected answer to `ipmitool {command}` ({status}): {output}")]
    UnexpectedOutput { bmc: String, command: String, status: String, output: String },
    #[error("BMC {bmc} acknowledged `chassis power off` but still reported power on after {waited_ms} ms")]
    StillOn { bmc: String, waited_ms: u64 },
}

/// The chassis power state (`chassis power status`), within [`CALL_TIMEOUT`].
pub async fn power_status(t: &IpmiTarget) -> Result<PowerStatus, FenceError> {
    status_within(OsStr::new("ipmitool"), t, CALL_TIMEOUT).await
}

/// Power the host on (`chassis power on`), within [`CALL_TIMEOUT`]: after a cancelled fence or
/// maintenance. Succeeds when the BMC acknowledges; read [`power_status`] to see the result.
pub async fn power_on(t: &IpmiTarget) -> Result<(), FenceError> {
    let out = run(OsStr::new("ipmitool"), t, &["chassis", "power", "on"], CALL_TIMEOUT).await?;
    tracing::info!(bmc = %t.endpoint(), answer = %out.trim(), "IPMI chassis power on");
    Ok(())
}

/// Fence a host: `chassis power off`, then read the power state back until it says off, all
/// within `within`. The proof comes only from an "off" read back; a lost acknowledgement is
/// covered by the read-back, and an order that does not take effect is sent again every 2 s.
/// A refused login or an unexpected answer ends at once; a BMC that does not answer is retried
/// until `within` has passed.
pub async fn power_off(t: &IpmiTarget, within: Duration) -> Result<FenceProof, FenceError> {
    power_off_with(OsStr::new("ipmitool"), t, within).await
}

async fn power_off_with(bin: &OsStr, t: &IpmiTarget, within: Duration) -> Result<FenceProof, FenceError> {
    let bmc = t.endpoint();
    let start = Instant::now();
    let deadline = start + within;
    let mut last_sent: Option<Instant> = None;
    let mut last_err: Option<FenceError> = None;
    let mut sends = 0u32;
    let mut reads = 0u32;
    tracing::info!(%bmc, within_ms = ms(within), "IPMI fence: chassis power off");
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
            let err = match last_err {
                Some(FenceError::NotAnswering { detail, .. }) => FenceError::NotAnswering {
                    bmc: bmc.clone(),
                    detail: format!("no power-off proof within {} ms; last: {detail}", ms(within)),
                },
                Some(e) => e,
                None => FenceError::NotAnswering {
                    bmc: bmc.clone(),
                    detail: format!("no power-off proof within {} ms", ms(within)),
                },
            };
            tracing::warn!(%bmc, error = %err, "IPMI fence failed: no proof");
            return Err(err);
        };
        if last_sent.is_none_or(|s| s.elapsed() >= RESEND_AFTER) {
            sends += 1;
            match run(bin, t, &["chassis", "power", "off"], left).await {
                Ok(out) => {
                    tracing::debug!(%bmc, answer = %out.trim(), "chassis power off acknowledged");
                    last_sent = Some(Instant::now());
                }
                Err(e @ FenceError::NotAnswering { .. }) => {
                    // The order may have arrived and only its answer got lost: read back anyway.
                    tracing::debug!(%bmc, error = %e, "chassis power off not acknowledged");
                    last_err = Some(e);
                }
                Err(e) => {
                    tracing::warn!(%bmc, error = %e, "IPMI fence failed: no proof");
                    return Err(e);
                }
            }
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { continue };
        reads += 1;
        match status_within(bin, t, left).await {
            Ok(PowerStatus::Off) => {
                let took = start.elapsed();
                let proof = FenceProof::new(
                    ProofKind::Ipmi { address: bmc.clone() },
                    format!(
                        "`chassis power off` sent {sends}x, power read back off after {} ms, {reads} read(s)",
                        ms(took)
                    ),
                );
                tracing::info!(%bmc, took_ms = ms(took), proof = %proof.describe(), "IPMI fence: host powered off");
                return Ok(proof);
            }
            Ok(PowerStatus::On) => {
                last_err = Some(FenceError::StillOn { bmc: bmc.clone(), waited_ms: ms(start.elapsed()) });
            }
            Err(e @ FenceError::NotAnswering { .. }) => last_err = Some(e),
            Err(e) => {
                tracing::warn!(%bmc, error = %e, "IPMI fence failed: no proof");
                return Err(e);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(POLL_INTERVAL.min(left)).await;
    }
}

async fn status_within(bin: &OsStr, t: &IpmiTarget, within: Duration) -> Result<PowerStatus, FenceError> {
    let out = run(bin, t, &["chassis", "power", "status"], within).await?;
    parse_status(&out).ok_or_else(|| FenceError::UnexpectedOutput {
        bmc: t.endpoint(),
        command: "chassis power status".to_string(),
        status: "exit status 0".to_string(),
        output: quote(&out),
    })
}

/// "Chassis Power is on" / "Chassis Power is off".
fn parse_status(stdout: &str) -> Option<PowerStatus> {
    stdout.lines().find_map(|l| {
        let l = l.trim().to_ascii_lowercase();
        match l.strip_prefix("chassis power is ")? {
            "on" => Some(PowerStatus::On),
            "off" => Some(PowerStatus::Off),
            _ => None,
        }
    })
}

/// Run `bin -I lanplus ... <args>` against `t`, killed after `within`. Its stdout on success.
async fn run(bin: &OsStr, t: &IpmiTarget, args: &[&str], within: Duration) -> Result<String, FenceError> {
    let bmc = t.endpoint();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-I", "lanplus", "-C", "3", "-H", &t.address, "-p", &t.port.to_string(), "-U", &t.username])
        .args(["-E", "-N", "1", "-R", "2", "-v"])
        .args(args)
        .env("IPMI_PASSWORD", &t.password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FenceError::IpmitoolMissing(format!("{}: {e}", bin.to_string_lossy())),
        _ => FenceError::Spawn(format!("{}: {e}", bin.to_string_lossy())),
    })?;
    let out = match tokio::time::timeout(within, child.wait_with_output()).await {
        // Dropping the future killed the child (kill_on_drop).
        Err(_) => {
            return Err(FenceError::NotAnswering {
                bmc,
                detail: format!("no answer to `ipmitool {}` within {} ms (killed)", args.join(" "), ms(within)),
            });
        }
        Ok(Err(e)) => return Err(FenceError::Spawn(format!("waiting for ipmitool: {e}"))),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = clean_stderr(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        return Ok(stdout);
    }
    Err(classify(&bmc, &t.username, &args.join(" "), &out.status.to_string(), &stdout, &stderr))
}

/// A failed ipmitool call, by what it printed (with `-v`).
fn classify(bmc: &str, username: &str, command: &str, status: &str, stdout: &str, stderr: &str) -> FenceError {
    let lower = stderr.to_ascii_lowercase();
    // A session that was refused. Checked first: the generic "Unable to establish IPMI v2 / RMCP+
    // session" follows these too.
    const AUTH: &[&str] = &[
        "hmac is invalid",
        "unauthorized name",
        "invalid user name",
        "unable to read password",
        "insufficient privilege",
        "unauthorized role",
        "requested privilege level exceeds",
        "invalid session id in request",
        "invalid integrity check value",
        "password is incorrect",
    ];
    const SILENT: &[&str] = &[
        "get auth capabilities error",
        "error issuing get channel authentication capabilities",
        "no response from remote controller",
        "unable to establish",
        "address lookup",
        "could not resolve",
        "unable to resolve",
        "connection refused",
        "network is unreachable",
        "no route to host",
        "insufficient resources for session",
    ];
    if AUTH.iter().any(|m| lower.contains(m)) {
        FenceError::AuthRefused { bmc: bmc.to_string(), username: username.to_string(), stderr: quote(stderr) }
    } else if SILENT.iter().any(|m| lower.contains(m)) {
        FenceError::NotAnswering { bmc: bmc.to_string(), detail: format!("ipmitool said: {}", quote(stderr)) }
    } else {
        let output = match (stdout.trim().is_empty(), stderr.trim().is_empty()) {
            (true, true) => "no output".to_string(),
            (false, true) => quote(stdout),
            (true, false) => quote(stderr),
            (false, false) => format!("{} / {}", quote(stdout), quote(stderr)),
        };
        FenceError::UnexpectedOutput {
            bmc: bmc.to_string(),
            command: command.to_string(),
            status: status.into(),
            output,
        }
    }
}

/// ipmitool's stderr without the chatter `-v` adds to every call, one line per message.
fn clean_stderr(stderr: &str) -> String {
    let mut kept = Vec::new();
    let mut after_vso = false;
    for line in stderr.lines() {
        let line = line.trim().trim_start_matches("> ").trim();
        let vso = line.starts_with("Running Get VSO Capabilities");
        let noise = line.is_empty()
            || vso
            || line.starts_with("Loading IANA PEN Registry")
            || line.starts_with("Discovered IPMB address")
            || (after_vso && line == "Invalid completion code received: Invalid command");
        after_vso = vso;
        if !noise {
            kept.push(line);
        }
    }
    kept.join("; ")
}

fn quote(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_QUOTE {
        return format!("\"{s}\"");
    }
    let mut end = MAX_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("\"{}...\"", &s[..end])
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> IpmiTarget {
        IpmiTarget { address: "10.0.0.7".into(), port: 623, username: "admin".into(), password: "s3cret!".into() }
    }

    #[test]
    fn debug_hides_the_password() {
        let d = format!("{:?}", target());
        assert!(!d.contains("s3cret"), "{d}");
        assert!(d.contains("10.0.0.7") && d.contains("admin") && d.contains("<redacted>"), "{d}");
    }

    #[test]
    fn endpoint() {
        assert_eq!(target().endpoint(), "10.0.0.7:623");
        let v6 = IpmiTarget { address: "fd00::7".into(), ..target() };
        assert_eq!(v6.endpoint(), "[fd00::7]:623");
    }

    #[test]
    fn parses_power_status() {
        assert_eq!(parse_status("Chassis Power is on\n"), Some(PowerStatus::On));
        assert_eq!(parse_status("Chassis Power is off\n"), Some(PowerStatus::Off));
        assert_eq!(parse_status("  chassis power is OFF  "), Some(PowerStatus::Off));
        assert_eq!(parse_status("Chassis Power Control: Down/Off\n"), None);
        assert_eq!(parse_status("Chassis Power is unknown"), None);
        assert_eq!(parse_status(""), None);
    }

    #[test]
    fn classifies_ipmitool_failures() {
        // stderr as ipmitool 1.8.19 prints it with -v (after clean_stderr)
        let wrong_pw = clean_stderr(
            "Loading IANA PEN Registry...\n> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n",
        );
        assert_eq!(wrong_pw, "RAKP 2 HMAC is invalid; Error: Unable to establish IPMI v2 / RMCP+ session");
        let wrong_user = "RAKP 2 message indicates an error : unauthorized name; Error: Unable to establish IPMI v2 / \
                          RMCP+ session";
        let dead = clean_stderr(
            "Loading IANA PEN Registry...\nGet Auth Capabilities error\nError issuing Get Channel Authentication \
             Capabilities request\nError: Unable to establish IPMI v2 / RMCP+ session\n",
        );
        let bad_cmd = clean_stderr(
            "Loading IANA PEN Registry...\nRunning Get VSO Capabilities my_addr 0x20, transit 0, target 0x20\nInvalid \
             completion code received: Invalid command\nDiscovered IPMB address 0x0\nInvalid chassis power command: x\n",
        );
        assert_eq!(bad_cmd, "Invalid chassis power command: x");
        let c = |stderr: &str| classify("10.0.0.7:623", "admin", "chassis power off", "exit status: 1", "", stderr);
        assert!(matches!(c(&wrong_pw), FenceError::AuthRefused { .. }), "{}", c(&wrong_pw));
        assert!(matches!(c(wrong_user), FenceError::AuthRefused { .. }));
        assert!(matches!(c("Unable to read password from environment"), FenceError::AuthRefused { .. }));
        assert!(matches!(c(&dead), FenceError::NotAnswering { .. }));
        assert!(matches!(c("Address lookup for nosuchbmc failed"), FenceError::NotAnswering { .. }));
        assert!(matches!(c(&bad_cmd), FenceError::UnexpectedOutput { .. }));
        assert!(matches!(c(""), FenceError::UnexpectedOutput { .. }));

        let msg = c(&wrong_pw).to_string();
        assert!(
            msg.contains("10.0.0.7:623") && msg.contains("\"admin\"") && msg.contains("RAKP 2 HMAC is invalid"),
            "{msg}"
        );
        let msg = c(&dead).to_string();
        assert!(msg.contains("not answering") && msg.contains("Get Auth Capabilities error"), "{msg}");
        let msg = c(&bad_cmd).to_string();
        assert!(msg.contains("chassis power off") && msg.contains("Invalid chassis power command"), "{msg}");
    }

    #[test]
    fn quote_is_bounded() {
        let long = "é".repeat(1000);
        let q = quote(&long);
        assert!(q.len() <= MAX_QUOTE + 6 && q.ends_with("...\""), "{}", q.len());
    }

    #[tokio::test]
    async fn missing_ipmitool_is_named() {
        let bin = OsStr::new("/nonexistent/skyhold-test/ipmitool");
        let e = power_off_with(bin, &target(), Duration::from_secs(1)).await.expect_err("no binary, no proof");
        assert!(matches!(e, FenceError::IpmitoolMissing(_)), "{e}");
        assert!(e.to_string().contains("install the `ipmitool` package"), "{e}");
        let e = status_within(bin, &target(), Duration::from_secs(1)).await.expect_err("no binary");
        assert!(matches!(e, FenceError::IpmitoolMissing(_)), "{e}");
    }
}
