//! IPMI fencing against a real BMC simulator (`ipmi_sim`) through the real `ipmitool`.
//!
//! Skipped when `ipmi_sim`/`ipmitool` are missing, except under `CI` (scripts/test.sh installs
//! them), where their absence fails the test.

use skyhold_core::fence::ProofKind;
use skyhold_core::fence::ipmi::{self, FenceError, IpmiTarget, PowerStatus};
use skyhold_testkit::bmc::{BMC_ADDRESS, BMC_USER};
use skyhold_testkit::{Bmc, fast_tmp, have_ipmi};
use std::time::{Duration, Instant};

fn skip() -> bool {
    let have = have_ipmi();
    if !have {
        assert!(std::env::var_os("CI").is_none(), "ipmi_sim and ipmitool must be installed under CI (scripts/test.sh)");
        eprintln!("skipping: ipmi_sim/ipmitool not installed (apt-get install ipmitool openipmi)");
    }
    !have
}

fn start(tmp: &tempfile::TempDir) -> Bmc {
    Bmc::start(&tmp.path().join("bmc"), "hunter2").expect("start ipmi_sim")
}

fn target(bmc: &Bmc, password: &str) -> IpmiTarget {
    IpmiTarget {
        address: BMC_ADDRESS.to_string(),
        port: bmc.port,
        username: BMC_USER.to_string(),
        password: password.to_string(),
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(fast_tmp()).expect("tempdir")
}

#[tokio::test]
async fn power_status_reads_on() {
    if skip() {
        return;
    }
    let tmp = tmp();
    let bmc = start(&tmp);
    let t0 = Instant::now();
    let st = ipmi::power_status(&target(&bmc, "hunter2")).await.expect("power status");
    eprintln!("power_status: {} ms", t0.elapsed().as_millis());
    assert_eq!(st, PowerStatus::On);
}

#[tokio::test]
async fn power_off_gives_ipmi_proof_and_kills_the_host() {
    if skip() {
        return;
    }
    let tmp = tmp();
    let bmc = start(&tmp);
    let t = target(&bmc, "hunter2");
    // The process standing for the host: power-off must really kill it.
    let mut host = tokio::process::Command::new("sleep").arg("600").kill_on_drop(true).spawn().expect("spawn sleep");
    bmc.set_host_pid(host.id().expect("host pid")).expect("write pid");

    let t0 = Instant::now();
    let proof = ipmi::power_off(&t, Duration::from_secs(10)).await.expect("fence proof");
    let took = t0.elapsed();
    eprintln!("power_off -> proof: {} ms; {}", took.as_millis(), proof.describe());

    assert_eq!(proof.kind(), &ProofKind::Ipmi { address: format!("127.0.0.1:{}", bmc.port) });
    assert!(proof.describe().contains(&format!("BMC 127.0.0.1:{}", bmc.port)), "{}", proof.describe());
    // The host died (SIGKILL from the chassis-control hook) — waited on as an event, bounded.
    let st = tokio::time::timeout(Duration::from_secs(5), host.wait()).await.expect("host killed").expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "host process killed by SIGKILL: {st}");
    assert!(!bmc.power(), "power file says off");
    let calls = bmc.calls();
    assert!(calls.iter().any(|c| c.ends_with("set power 0")), "hook log: {calls:?}");
    assert_eq!(ipmi::power_status(&t).await.expect("status"), PowerStatus::Off);

    // Power it back on (cancel / maintenance).
    ipmi::power_on(&t).await.expect("power on");
    assert_eq!(ipmi::power_status(&t).await.expect("status"), PowerStatus::On);
    assert!(bmc.power());
    assert!(bmc.calls().iter().any(|c| c.ends_with("set power 1")), "hook log: {:?}", bmc.calls());
}

#[tokio::test]
async fn wrong_password_is_refused_without_proof() {
    if skip() {
        return;
    }
    let tmp = tmp();
    let bmc = start(&tmp);
    let mut host = tokio::process::Command::new("sleep").arg("600").kill_on_drop(true).spawn().expect("spawn sleep");
    bmc.set_host_pid(host.id().expect("host pid")).expect("write pid");

    let t0 = Instant::now();
    let err = ipmi::power_off(&target(&bmc, "wrong"), Duration::from_secs(10)).await.expect_err("no proof");
    eprintln!("wrong password -> error after {} ms: {err}", t0.elapsed().as_millis());
    assert!(matches!(err, FenceError::AuthRefused { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("refused the login of user \"admin\"") && msg.contains("RAKP 2 HMAC is invalid"), "{msg}");
    assert!(!msg.contains("wrong\"") && !msg.contains("hunter2"), "no password in the message: {msg}");
    // Ended at once (no retries until the deadline), and the host is untouched.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(bmc.power());
    assert!(!bmc.calls().iter().any(|c| c.contains("set power")), "{:?}", bmc.calls());
    assert!(host.try_wait().expect("try_wait").is_none(), "host still running");

    let err = ipmi::power_status(&target(&bmc, "wrong")).await.expect_err("refused");
    assert!(matches!(err, FenceError::AuthRefused { .. }), "{err}");
}

#[tokio::test]
async fn stopped_bmc_is_not_answering_within_the_timeout() {
    if skip() {
        return;
    }
    let tmp = tmp();
    let mut bmc = start(&tmp);
    let t = target(&bmc, "hunter2");
    assert_eq!(ipmi::power_status(&t).await.expect("status"), PowerStatus::On);
    bmc.stop(); // the BMC lost power with its host: proves nothing

    let within = Duration::from_secs(3);
    let t0 = Instant::now();
    let err = ipmi::power_off(&t, within).await.expect_err("no proof from a silent BMC");
    let took = t0.elapsed();
    eprintln!("stopped BMC: power_off error after {} ms: {err}", took.as_millis());
    assert!(matches!(err, FenceError::NotAnswering { .. }), "{err}");
    assert!(err.to_string().contains(&format!("BMC 127.0.0.1:{} is not answering", bmc.port)), "{err}");
    assert!(took >= within && took < within + Duration::from_secs(1), "bounded by `within`: {took:?}");

    // power_status on its own: ipmitool gives up by itself (-N 1 -R 2) before CALL_TIMEOUT.
    let t0 = Instant::now();
    let err = ipmi::power_status(&t).await.expect_err("not answering");
    let took = t0.elapsed();
    eprintln!("stopped BMC: power_status error after {} ms: {err}", took.as_millis());
    assert!(matches!(err, FenceError::NotAnswering { .. }), "{err}");
    assert!(took <= ipmi::CALL_TIMEOUT + Duration::from_secs(1), "{took:?}");
}
