//! Real database nodes for Skyhold's tests and benchmarks, started as child processes on free
//! ports under a directory the caller owns (usually a temporary directory in `/dev/shm`):
//!
//! - [`start_mdb`]: one MariaDB server with a binary log and GTIDs, writable or read-only
//!   ([`Mdb`]);
//! - [`start_pair`]: a GTID primary/replica pair, with [`promote`] (the operator's failover) and
//!   [`reattach_as_replica`] (the old primary follows the new one);
//! - [`Galera::start`]: an N-node MariaDB Galera cluster (rsync state transfer), whose nodes
//!   ([`GNode`]) can be killed, stopped (`SIGSTOP`), resumed and restarted;
//! - [`Bmc::start`] (module [`bmc`]): an IPMI BMC (`ipmi_sim`, spoken to with `ipmitool`) for one
//!   simulated host, whose power-off kills the process standing for the host;
//! - [`ledger`]: the agents' ledgers read and replayed against invariants 5 and 7 (ground truth
//!   for the tests and the benchmarks alike);
//! - [`proxy`]: a TCP proxy to cut and heal (a database partition, a host cut off its management
//!   network).
//!
//! Every process is killed (SIGKILL, by its own handle) and reaped when its owner is dropped, so a
//! failing test or bench leaves nothing running. Needs `mariadbd`, `mariadb`,
//! `mariadb-install-db` (and `mariadb-dump` to rebuild a replica); Galera also needs the
//! `galera-4` provider and `rsync` (`scripts/test.sh` installs them).

pub mod bmc;
pub mod ledger;
pub mod proxy;

pub use bmc::{Bmc, have_ipmi};

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Galera provider library of Debian's `galera-4` package.
pub const GALERA_PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";

/// The replication account [`start_pair`] creates on the primary.
pub const REPL_USER: &str = "repl";
/// The replication account's password.
pub const REPL_PASSWORD: &str = "replpw";

/// Child processes that are killed (SIGKILL) and reaped when this is dropped, passing or
/// panicking: no leftover processes.
pub struct Kids(pub Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Have the child `cmd` starts receive SIGKILL when the thread that starts it exits (Linux
/// `PR_SET_PDEATHSIG`), so that a test or bench killed outright (a timeout's SIGKILL) leaves no
/// database behind. Best effort: a child that changes its user (Galera nodes run as `mysql`)
/// loses the setting. Start long-lived children from a thread that outlives them.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; it only calls prctl(2), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from))
    }
}

/// Whether `mariadbd` can be run here.
pub fn have_mariadb() -> bool {
    Command::new("mariadbd").arg("--version").output().is_ok()
}

/// Whether a Galera cluster can be started here (`galera-4` provider and `rsync`).
pub fn have_galera() -> bool {
    Path::new(GALERA_PROVIDER).exists() && Command::new("rsync").arg("--version").output().is_ok() && have_mariadb()
}

/// `/dev/shm` when it exists (database files in memory), else `/tmp`: where node directories go.
pub fn fast_tmp() -> &'static Path {
    if Path::new("/dev/shm").exists() { Path::new("/dev/shm") } else { Path::new("/tmp") }
}

/// A TCP port that is free on 127.0.0.1 right now (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port on 127.0.0.1")
}

/// Call `f` every 20 ms until it returns `Some`, for at most `within`.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `q` (one or more statements) as `root` without a password on the node at
/// `127.0.0.1:port` through the `mariadb` client. Returns the output without column names,
/// tab-separated and trimmed, or the client's error text.
pub fn sql(port: u16, q: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", &format!("-P{port}"), "-uroot", "-N", "-B", "-e", q])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The first row of `q` as column name → value (empty when there is no row), e.g.
/// `SHOW SLAVE STATUS`.
pub fn sql_row(port: u16, q: &str) -> Result<BTreeMap<String, String>, String> {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", &format!("-P{port}"), "-uroot", "-B", "-e", q])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(head), Some(row)) = (lines.next(), lines.next()) else { return Ok(BTreeMap::new()) };
    Ok(head.split('\t').map(str::to_string).zip(row.split('\t').map(str::to_string)).collect())
}

/// One MariaDB server (not Galera) with a binary log, row format and strict GTIDs, so it can
/// be a replication primary or replica. Dropping it kills it.
pub struct Mdb {
    child: Option<Child>,
    /// The SQL port on 127.0.0.1; a restart keeps it.
    pub port: u16,
    /// `--server-id`.
    pub server_id: u32,
    /// The node's directory: `data/`, `err.log`, the socket and the pid file.
    pub dir: PathBuf,
}

impl Drop for Mdb {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `mariadb-install-db` into `dir/data`, run as `user`, up to three attempts (it occasionally
/// fails on a loaded machine); the last attempt's output on failure.
fn install_db(dir: &Path, user: &str, chown: bool) -> Result<()> {
    let mut last = String::new();
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        if chown {
            chown_mysql(dir);
        }
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", &format!("--user={user}"), "--auth-root-authentication-method=normal"])
            .arg("--skip-test-db")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .output()
            .context("run mariadb-install-db")?;
        if out.status.success() {
            if chown {
                chown_mysql(dir);
            }
            return Ok(());
        }
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    bail!("mariadb-install-db failed 3 times in {}: {last}", dir.display())
}

impl Mdb {
    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (by the child's handle) and reap; nothing if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start `mariadbd` on this node's directory and port (first start, or a restart after
    /// [`Mdb::kill9`]: crash recovery included) and wait up to 30 s until it answers.
    pub fn start(&mut self, read_only: bool) -> Result<()> {
        if self.is_running() {
            bail!("MariaDB node {} is already running", self.dir.display());
        }
        let dir = &self.dir;
        let mut child = die_with_parent(&mut Command::new("mariadbd"))
            .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1", "--skip-name-resolve"])
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("err.log").display()))
            .args(["--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2", "--max-connections=500"])
            .args(["--log-bin=mysql-bin", "--binlog-format=ROW", "--log-slave-updates=1", "--gtid-strict-mode=1"])
            .arg(format!("--server-id={}", self.server_id))
            .arg(format!("--read-only={}", if read_only { 1 } else { 0 }))
            .args(["--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start mariadbd")?;
        let port = self.port;
        let up = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(false);
            }
            sql(port, "select 1").ok().map(|_| true)
        });
        if up == Some(true) {
            self.child = Some(child);
            return Ok(());
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("mariadbd on port {port} did not come up within 30 s\n{}", self.log_tail(20))
    }

    /// The last `n` lines of the node's error log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.dir.join("err.log"), n)
    }
}

fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("---- last lines of {} ----\n{}", path.display(), lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// Install and start one MariaDB node in `base/name` on a free port: binary log, row format,
/// `--log-slave-updates`, strict GTIDs, `--server-id=server_id`, read-only if asked. Up to five
/// ports are tried (another process may take a free port before the server binds it).
pub fn start_mdb(base: &Path, name: &str, server_id: u32, read_only: bool) -> Result<Mdb> {
    let dir = base.join(name);
    install_db(&dir, "root", false)?;
    let mut last = None;
    for _ in 0..5 {
        let mut m = Mdb { child: None, port: free_port(), server_id, dir: dir.clone() };
        match m.start(read_only) {
            Ok(()) => return Ok(m),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("mariadbd did not start")))
}

/// A GTID primary/replica pair (asynchronous replication).
pub struct Pair {
    /// Writable, server id 1 (`base/p1`).
    pub primary: Mdb,
    /// Read-only, server id 2 (`base/r1`), replicating from the primary.
    pub replica: Mdb,
}

/// Start a primary and a replica under `base`, create the replication account ([`REPL_USER`])
/// and the application account `user`@`%` identified by `password` with every privilege on the
/// primary, attach the replica ([`attach_replica`]) and wait until the account has reached it.
pub fn start_pair(base: &Path, user: &str, password: &str) -> Result<Pair> {
    let primary = start_mdb(base, "p1", 1, false).context("start the primary")?;
    let replica = start_mdb(base, "r1", 2, true).context("start the replica")?;
    sql(
        primary.port,
        &format!(
            "CREATE USER {REPL_USER}@'%' IDENTIFIED BY '{REPL_PASSWORD}'; \
             GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO {REPL_USER}@'%'; \
             CREATE USER {user}@'%' IDENTIFIED BY '{password}'; GRANT ALL ON *.* TO {user}@'%';"
        ),
    )
    .map_err(anyhow::Error::msg)
    .context("create the accounts on the primary")?;
    attach_replica(replica.port, primary.port, "slave_pos", Duration::from_secs(20))?;
    wait_for(Duration::from_secs(20), || {
        sql(replica.port, &format!("SELECT COUNT(*) FROM mysql.user WHERE user='{user}'")).ok().filter(|n| n == "1")
    })
    .context("the accounts did not replicate within 20 s")?;
    Ok(Pair { primary, replica })
}

/// `CHANGE MASTER TO` the node at `primary_port` (GTID positions `use_gtid`: `slave_pos` or
/// `current_pos`, connect retry 1 s) and `START SLAVE` on the node at `replica_port`, then wait
/// until both replication threads run. A replication error is returned with its text.
pub fn attach_replica(replica_port: u16, primary_port: u16, use_gtid: &str, within: Duration) -> Result<()> {
    sql(
        replica_port,
        &format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary_port}, MASTER_USER='{REPL_USER}', \
             MASTER_PASSWORD='{REPL_PASSWORD}', MASTER_USE_GTID={use_gtid}, MASTER_CONNECT_RETRY=1; START SLAVE;"
        ),
    )
    .map_err(anyhow::Error::msg)
    .context("CHANGE MASTER TO / START SLAVE")?;
    let end = Instant::now() + within;
    loop {
        let st = sql_row(replica_port, "SHOW SLAVE STATUS").map_err(anyhow::Error::msg)?;
        let field = |k: &str| st.get(k).map(String::as_str).unwrap_or("");
        if field("Slave_IO_Running") == "Yes" && field("Slave_SQL_Running") == "Yes" {
            return Ok(());
        }
        for (no, err) in [("Last_IO_Errno", "Last_IO_Error"), ("Last_SQL_Errno", "Last_SQL_Error")] {
            if !matches!(field(no), "" | "0") {
                bail!("replication from port {primary_port} failed: {} {}", field(no), field(err));
            }
        }
        if Instant::now() > end {
            bail!("replication from port {primary_port} not running within {} s: {st:?}", within.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the replica at `replica_port` has applied everything the node at `primary_port`
/// has written to its binary log so far (`MASTER_GTID_WAIT`).
pub fn wait_caught_up(primary_port: u16, replica_port: u16, within: Duration) -> Result<()> {
    let gtid = sql(primary_port, "SELECT @@gtid_binlog_pos").map_err(anyhow::Error::msg)?;
    let secs = within.as_secs_f64().max(0.1);
    let r = sql(replica_port, &format!("SELECT MASTER_GTID_WAIT('{gtid}', {secs:.1})")).map_err(anyhow::Error::msg)?;
    if r != "0" {
        bail!("the replica on port {replica_port} did not reach {gtid} within {secs:.1} s");
    }
    Ok(())
}

/// Promote the replica at `port` to primary, as an operator or orchestrator does when the
/// primary is lost: stop receiving, give the SQL thread up to `drain` to apply what was already
/// received (its `Gtid_IO_Pos`), then `STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0`.
/// Returns whether the relay log was fully applied within `drain`.
pub fn promote(port: u16, drain: Duration) -> Result<bool> {
    sql(port, "STOP SLAVE IO_THREAD").map_err(anyhow::Error::msg).context("STOP SLAVE IO_THREAD")?;
    let io_pos =
        sql_row(port, "SHOW SLAVE STATUS").map_err(anyhow::Error::msg)?.get("Gtid_IO_Pos").cloned().unwrap_or_default();
    let drained = if io_pos.is_empty() || drain.is_zero() {
        drain.is_zero()
    } else {
        let q = format!("SELECT MASTER_GTID_WAIT('{io_pos}', {:.3})", drain.as_secs_f64());
        sql(port, &q).map(|r| r == "0").unwrap_or(false)
    };
    sql(port, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0;")
        .map_err(anyhow::Error::msg)
        .context("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0")?;
    Ok(drained || io_pos.is_empty())
}

/// How [`reattach_as_replica`] brought the old primary back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejoin {
    /// Its history was a prefix of the new primary's: it resumed replicating from its own GTID
    /// position.
    Resumed,
    /// It had committed transactions the new primary never received (asynchronous replication
    /// loses them at a failover), so it was wiped and reloaded from a dump of the new primary.
    Rebuilt,
}

/// Start the stopped node `old` (a former primary) read-only as a replica of the node at
/// `primary_port`, and wait until it has caught up. It first resumes from its own GTID position
/// (`MASTER_USE_GTID=current_pos`); if replication refuses that position (the old node holds
/// transactions the new primary does not have), the node is rebuilt: a fresh data directory,
/// loaded from `mariadb-dump --single-transaction --gtid` of the new primary's databases and
/// accounts, replicating from the dump's position.
pub fn reattach_as_replica(old: &mut Mdb, primary_port: u16, within: Duration) -> Result<Rejoin> {
    if !old.is_running() {
        old.start(true)?;
    }
    let resumed = attach_replica(old.port, primary_port, "current_pos", within)
        .and_then(|()| wait_caught_up(primary_port, old.port, within));
    if resumed.is_ok() {
        return Ok(Rejoin::Resumed);
    }
    rebuild_replica(old, primary_port, within).with_context(|| {
        format!("resuming failed ({:#}), and so did rebuilding", resumed.err().unwrap_or_else(|| anyhow::anyhow!("?")))
    })?;
    Ok(Rejoin::Rebuilt)
}

/// Wipe `node`, reinstall it and load it from the node at `primary_port` (see
/// [`reattach_as_replica`]).
pub fn rebuild_replica(node: &mut Mdb, primary_port: u16, within: Duration) -> Result<()> {
    node.kill9();
    install_db(&node.dir, "root", false)?;
    node.start(true)?;
    let dbs = sql(primary_port, "SHOW DATABASES").map_err(anyhow::Error::msg)?;
    let dbs: Vec<&str> =
        dbs.lines().filter(|d| !matches!(*d, "mysql" | "information_schema" | "performance_schema" | "sys")).collect();
    let dump = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new("mariadb-dump")
            .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", &format!("-P{primary_port}"), "-uroot"])
            .args(args)
            .output()
            .context("run mariadb-dump")?;
        if !out.status.success() {
            bail!("mariadb-dump failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    // Accounts first (not binlogged on the replica: no errant GTIDs), then the data with the
    // GTID position it was taken at (`SET GLOBAL gtid_slave_pos`).
    let accounts = dump(&["--no-create-info", "--replace", "--skip-triggers", "mysql", "global_priv"])?;
    load(node.port, Some("mysql"), &accounts)?;
    sql(node.port, "SET SESSION sql_log_bin = 0; FLUSH PRIVILEGES").map_err(anyhow::Error::msg)?;
    if !dbs.is_empty() {
        let mut args =
            vec!["--single-transaction", "--gtid", "--master-data=1", "--routines", "--events", "--databases"];
        args.extend(dbs.iter().copied());
        let data = dump(&args)?;
        load(node.port, None, &data)?;
    }
    attach_replica(node.port, primary_port, "slave_pos", within)?;
    wait_caught_up(primary_port, node.port, within)
}

/// Feed `script` to the `mariadb` client on `port` (in database `db`), with the binary log off
/// for the session.
fn load(port: u16, db: Option<&str>, script: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", &format!("-P{port}"), "-uroot"])
        .arg("--init-command=SET SESSION sql_log_bin = 0")
        .args(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run mariadb")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script).context("write the dump to mariadb")?;
    }
    let out = child.wait_with_output().context("wait for mariadb")?;
    if !out.status.success() {
        bail!("loading the dump failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn chown_mysql(p: &Path) {
    let _ = Command::new("chown").args(["-R", "mysql:mysql"]).arg(p).status();
}

fn signal(pid: Option<u32>, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = pid.context("the node is not running")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).with_context(|| format!("{sig} to {pid}"))
}

/// One MariaDB Galera node (run as the `mysql` user; state transfer by rsync; the group
/// communication timeouts shortened so that a dead node is evicted within a few seconds).
/// Dropping it kills it.
pub struct GNode {
    child: Option<Child>,
    /// SQL port.
    pub port: u16,
    /// Group communication port (`gmcast.listen_addr`, the address in the cluster list).
    pub gcomm: u16,
    /// Incremental state transfer port.
    pub ist: u16,
    /// State snapshot transfer (rsync) port.
    pub sst: u16,
    /// The node's directory: `data/`, `err.log`, the socket and the pid file.
    pub dir: PathBuf,
}

impl Drop for GNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl GNode {
    /// Install node `i` in `base/g{i}` (owned by `mysql`; `mariadb-install-db` is tried three
    /// times) on free ports. It is not started.
    pub fn new(base: &Path, i: usize) -> Result<GNode> {
        let dir = base.join(format!("g{i}"));
        install_db(&dir, "mysql", true)?;
        Ok(GNode { child: None, port: free_port(), gcomm: free_port(), ist: free_port(), sst: free_port(), dir })
    }

    /// Start `mariadbd` as a member of `cluster` (`host:gcomm` list); `new_cluster` bootstraps
    /// a new cluster from this node. Returns at once (see [`GNode::wait_synced`]).
    pub fn start(&mut self, cluster: &str, new_cluster: bool) -> Result<()> {
        if self.is_running() {
            bail!("Galera node {} is already running", self.dir.display());
        }
        let prov = format!(
            "base_port={g};gmcast.listen_addr=tcp://127.0.0.1:{g};ist.recv_addr=127.0.0.1:{i};gcache.size=32M;\
             evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;evs.keepalive_period=PT0.5S;evs.inactive_check_period=PT0.5S",
            g = self.gcomm,
            i = self.ist
        );
        let mut cmd = Command::new("mariadbd");
        cmd.args(["--no-defaults", "--user=mysql", "--bind-address=127.0.0.1", "--skip-name-resolve"])
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!("--log-error={}", self.dir.join("err.log").display()))
            .args(["--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2", "--max-connections=500"])
            .args(["--binlog-format=ROW", "--default-storage-engine=InnoDB", "--innodb-autoinc-lock-mode=2"])
            .args(["--wsrep-on=ON", &format!("--wsrep-provider={GALERA_PROVIDER}"), "--wsrep-cluster-name=skyt"])
            .arg(format!("--wsrep-cluster-address=gcomm://{cluster}"))
            .arg(format!("--wsrep-node-address=127.0.0.1:{}", self.gcomm))
            .arg(format!("--wsrep-provider-options={prov}"))
            .args(["--wsrep-sst-method=rsync", "--wsrep-sst-auth=root:"])
            .arg(format!("--wsrep-sst-receive-address=127.0.0.1:{}", self.sst))
            .args(["--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if new_cluster {
            cmd.arg("--wsrep-new-cluster");
        }
        self.child = Some(die_with_parent(&mut cmd).spawn().context("start a Galera node")?);
        Ok(())
    }

    /// Whether the node answers and reports `wsrep_local_state_comment` = `Synced`.
    pub fn synced(&self) -> bool {
        sql(self.port, "SHOW GLOBAL STATUS LIKE 'wsrep_local_state_comment'")
            .map(|s| s.ends_with("Synced"))
            .unwrap_or(false)
    }

    /// Wait up to `within` until the node is Synced; fails early if the process exits.
    pub fn wait_synced(&mut self, within: Duration) -> Result<()> {
        let end = Instant::now() + within;
        loop {
            if self.synced() {
                return Ok(());
            }
            if !self.is_running() {
                bail!("Galera node on port {} exited\n{}", self.port, self.log_tail(30));
            }
            if Instant::now() > end {
                bail!(
                    "Galera node on port {} not Synced within {} s\n{}",
                    self.port,
                    within.as_secs(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (by the child's handle) and reap; nothing if it is not running.
    pub fn kill9(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
    }

    /// SIGSTOP: the node hangs (connections stay open, nothing answers).
    pub fn sigstop(&self) -> Result<()> {
        signal(self.pid(), nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT: a stopped node resumes.
    pub fn sigcont(&self) -> Result<()> {
        signal(self.pid(), nix::sys::signal::Signal::SIGCONT)
    }

    /// The last `n` lines of the node's error log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.dir.join("err.log"), n)
    }
}

/// A MariaDB Galera cluster of [`GNode`]s on 127.0.0.1.
pub struct Galera {
    /// The nodes, in the order they were started (node 0 bootstrapped the cluster).
    pub nodes: Vec<GNode>,
    /// The `gcomm://` member list, `127.0.0.1:GCOMM,...`.
    pub cluster: String,
}

impl Galera {
    /// Install `n` nodes under `base` (made world-readable for the `mysql` user), bootstrap the
    /// cluster from node 0 (Synced within 30 s), then start the others one at a time, each
    /// Synced within 60 s.
    pub fn start(base: &Path, n: usize) -> Result<Galera> {
        let _ = Command::new("chmod").arg("755").arg(base).status();
        let nodes = (1..=n).map(|i| GNode::new(base, i)).collect::<Result<Vec<_>>>()?;
        let cluster = nodes.iter().map(|n| format!("127.0.0.1:{}", n.gcomm)).collect::<Vec<_>>().join(",");
        let mut g = Galera { nodes, cluster };
        g.nodes[0].start(&g.cluster, true)?;
        g.nodes[0].wait_synced(Duration::from_secs(30)).context("node 1 bootstraps")?;
        for i in 1..n {
            g.nodes[i].start(&g.cluster, false)?;
            g.nodes[i].wait_synced(Duration::from_secs(60)).with_context(|| format!("node {} joins", i + 1))?;
        }
        Ok(g)
    }

    /// Restart the stopped node `i` into the cluster (incremental or full state transfer) and
    /// wait up to `within` until it is Synced.
    pub fn rejoin(&mut self, i: usize, within: Duration) -> Result<()> {
        let cluster = self.cluster.clone();
        let node = &mut self.nodes[i];
        node.start(&cluster, false)?;
        node.wait_synced(within).with_context(|| format!("node {} rejoins", i + 1))
    }

    /// The nodes' SQL addresses, `127.0.0.1:PORT`, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect()
    }
}
