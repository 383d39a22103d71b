//! Command-line interface. Every flag can also come from an environment variable (`SKYHOLD_...`)
//! and, for `server` and `db`, from the TOML config file (`--config`); the command line wins,
//! then the environment, then the file, then the defaults.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "skyhold",
    version,
    about = "Skyhold: a highly available, CloudStack-compatible cloud management server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a complete demo cloud on this machine: SQLite database, a management server and a
    /// simulator agent. Keeps its data in --data-dir across restarts.
    Demo(DemoArgs),
    /// Run a management server.
    Server(ServerArgs),
    /// Run a hypervisor agent that connects out to the management servers.
    Agent(AgentArgs),
    /// Create, upgrade or inspect the database.
    Db(DbArgs),
    /// Manage accounts.
    Account(AccountArgs),
    /// Inspect and steer the management server cluster.
    Cluster(ClusterArgs),
    /// The node's encryption key ring: fingerprints, ENC(...) values for config files, rotation.
    Keys(KeysArgs),
    /// Host and VM HA: suspect or fenced hosts and pending HA work.
    Ha(HaArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HaArgs {
    #[command(subcommand)]
    pub action: HaAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum HaAction {
    /// Hosts that are not Up and Available, and HA restarts not finished yet (JSON).
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum KeysAction {
    /// Show the key file's keys (primary, staged, retired) and, if the database is reachable,
    /// the cluster's key and the state of a rotation.
    Show {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print VALUE encrypted with the node's primary key as ENC(...), for db.properties.
    Encrypt {
        #[command(flatten)]
        node: NodeArgs,
        /// The value to encrypt.
        value: String,
    },
    /// Rotate the cluster's encryption key while the servers keep serving: stage a new key, wait
    /// until every running management server holds it, then re-encrypt every stored secret under
    /// it. Run on any one node; running it again continues a staged rotation.
    Rotate {
        #[command(flatten)]
        node: NodeArgs,
        /// Seconds to wait for every management server to acknowledge the new key.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Drop a staged rotation instead (servers keep the unused key until forget-retired).
        #[arg(long)]
        abort: bool,
    },
    /// Drop every key but the cluster's from this node's key file, once no ENC(...) value needs
    /// a retired key (checked for --db-properties).
    ForgetRetired {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterAction {
    /// Every management server with its state, heartbeat age, run id, agents and running jobs.
    Status {
        #[command(flatten)]
        node: NodeArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drain a server: no new jobs, agents to peers, jobs finished or handed over.
    Drain {
        #[command(flatten)]
        node: NodeArgs,
        /// Management server id.
        id: String,
    },
    /// Cancel a drain.
    Cancel {
        #[command(flatten)]
        node: NodeArgs,
        /// Management server id.
        id: String,
    },
}

/// Where the database is and where the node keeps its files.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// TOML config file (keys: data_dir, db, key_file, ms_id, bind, service_ip, api_port,
    /// agent_port, cluster_port).
    #[arg(long, env = "SKYHOLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node data directory: key file, server id, SQLite database by default.
    #[arg(long, env = "SKYHOLD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or mysql://USER:PASS@HOST:PORT/DB (default: SQLite in the data dir).
    #[arg(long, env = "SKYHOLD_DB")]
    pub db: Option<String>,
    /// Encryption key file (default: DATA_DIR/key). Every server of a cluster needs the same one.
    #[arg(long, env = "SKYHOLD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Read the database settings from a CloudStack db.properties file (db.cloud.host, ...;
    /// ENC(...) values decrypted with the key file). --db wins over it.
    #[arg(long, env = "SKYHOLD_DB_PROPERTIES")]
    pub db_properties: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Stable management server id (default: kept in DATA_DIR/ms-id, created on first start).
    #[arg(long, env = "SKYHOLD_MS_ID")]
    pub ms_id: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "SKYHOLD_BIND")]
    pub bind: Option<String>,
    /// Address peers and agents use to reach this server (default: the bind address, or
    /// 127.0.0.1 when binding all interfaces).
    #[arg(long, env = "SKYHOLD_SERVICE_IP")]
    pub service_ip: Option<String>,
    /// CloudStack API port (0 picks a free one).
    #[arg(long, env = "SKYHOLD_API_PORT")]
    pub api_port: Option<u16>,
    /// Agent port.
    #[arg(long, env = "SKYHOLD_AGENT_PORT")]
    pub agent_port: Option<u16>,
    /// Peer (cluster) port.
    #[arg(long, env = "SKYHOLD_CLUSTER_PORT")]
    pub cluster_port: Option<u16>,
    /// Write the bound ports as JSON to this file once listening.
    #[arg(long, env = "SKYHOLD_PORTS_FILE")]
    pub ports_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo keeps its database, keys and logs.
    #[arg(long, env = "SKYHOLD_DATA_DIR", default_value = "skyhold-demo")]
    pub data_dir: PathBuf,
    /// Run the demo on this database instead of the embedded SQLite file
    /// (mysql://USER:PASS@HOST:PORT/DB).
    #[arg(long, conflicts_with = "db_properties")]
    pub db: Option<String>,
    /// Run the demo on the database a CloudStack db.properties file names.
    #[arg(long)]
    pub db_properties: Option<PathBuf>,
    /// Number of simulated hypervisor hosts (0 starts no agent).
    #[arg(long, default_value_t = 4)]
    pub hosts: u32,
    /// Number of management server processes.
    #[arg(long, default_value_t = 1)]
    pub servers: u32,
    /// API port of the first server (0 picks free ports).
    #[arg(long, env = "SKYHOLD_API_PORT", default_value_t = 8080)]
    pub api_port: u16,
    /// Agent port of the first server.
    #[arg(long, env = "SKYHOLD_AGENT_PORT", default_value_t = 8250)]
    pub agent_port: u16,
    /// Peer port of the first server.
    #[arg(long, env = "SKYHOLD_CLUSTER_PORT", default_value_t = 9090)]
    pub cluster_port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Management server agent addresses, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "SKYHOLD_MGMT", value_delimiter = ',', required = true)]
    pub mgmt: Vec<String>,
    /// Join token (from `skyhold db init` or DATA_DIR/agent.token).
    #[arg(long, env = "SKYHOLD_AGENT_TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "SKYHOLD_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Use the simulator hypervisor driver (the only driver in this build).
    #[arg(long, default_value_t = true)]
    pub simulator: bool,
    /// Number of simulated hosts this agent runs.
    #[arg(long, default_value_t = 1)]
    pub hosts: u32,
    /// Stable agent id; host identities derive from it (default: the machine's hostname).
    #[arg(long, env = "SKYHOLD_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Append every executed command to this JSON-lines ledger.
    #[arg(long, env = "SKYHOLD_LEDGER")]
    pub ledger: Option<PathBuf>,
    /// Fault injection: OP=SUBSTRING fails OP (start, stop, reboot, destroy, migrate_out, migrate_done,
    /// migrate_abort, *) of VMs whose name contains SUBSTRING.
    #[arg(long = "fail")]
    pub fail: Vec<String>,
    /// CPU cores per simulated host.
    #[arg(long, default_value_t = 32)]
    pub host_cpus: u32,
    /// CPU speed (MHz) per simulated host.
    #[arg(long, default_value_t = 2000)]
    pub host_cpu_mhz: u32,
    /// Memory (MB) per simulated host.
    #[arg(long, default_value_t = 131_072)]
    pub host_mem_mb: u64,
    /// Simulated hypervisor latency: each command waits this long before executing.
    #[arg(long, default_value_t = 0)]
    pub command_delay_ms: u64,
    /// The hosts' mount of their cluster's shared primary storage (a directory; every agent of the
    /// cluster points at the same one). Enables the storage heartbeat (DIR/heartbeat/<host guid>),
    /// stopping VMs on storage loss, and self-fencing.
    #[arg(long, env = "SKYHOLD_AGENT_STORAGE")]
    pub storage: Option<PathBuf>,
    /// Period of the storage heartbeat writes (and of crash-file checks), in ms.
    #[arg(long, default_value_t = skyhold_agent::DEFAULT_HEARTBEAT_INTERVAL_MS)]
    pub heartbeat_interval_ms: u64,
    /// A host that cannot write its storage heartbeat for this long (ms) stops its VMs and refuses
    /// starts until a write succeeds again.
    #[arg(long, default_value_t = skyhold_agent::DEFAULT_STORAGE_TIMEOUT_MS)]
    pub storage_timeout_ms: u64,
    /// With --storage: no management server and no storage heartbeat write for this long (ms) and the
    /// agent stops every VM of its hosts (a watchdog's reset). Management servers wait longer than
    /// this before restarting a silent host's VMs elsewhere.
    #[arg(long, default_value_t = skyhold_agent::DEFAULT_SELF_FENCE_AFTER_MS)]
    pub self_fence_after_ms: u64,
    /// Listener standing for the hosts' management network: neighbours TCP-connect to it to check
    /// this host (use 0.0.0.0:PORT across machines; port 0 picks a free one).
    #[arg(long, default_value = skyhold_agent::DEFAULT_CHECK_LISTEN)]
    pub check_listen: String,
    /// Test controls: while DIR/isolate exists the check listener is closed (host unreachable from
    /// its neighbours); a file DIR/crash/<vm id> crashes that VM at the next heartbeat tick.
    #[arg(long)]
    pub control_dir: Option<PathBuf>,
    /// Use only the --mgmt addresses and ignore the lists management servers push (agents that
    /// reach the servers through a load balancer's virtual address).
    #[arg(long)]
    pub static_mgmt: bool,
    /// Zone (UUID or name) of hosts the servers have not seen before (agent.properties `zone`);
    /// without --zone, --pod and --cluster new hosts join the first cluster.
    #[arg(long)]
    pub zone: Option<String>,
    /// Pod (UUID or name) of new hosts (agent.properties `pod`).
    #[arg(long)]
    pub pod: Option<String>,
    /// Cluster (UUID or name) of new hosts (agent.properties `cluster`). A host keeps the place
    /// it was first registered in.
    #[arg(long)]
    pub cluster: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    #[command(subcommand)]
    pub action: DbAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DbAction {
    /// Create the schema, the ROOT domain, the admin account with API keys and a password, the
    /// node's key file and an agent join token. Refuses an initialised database without --force.
    Init {
        #[command(flatten)]
        node: NodeArgs,
        /// Erase an existing database first.
        #[arg(long)]
        force: bool,
        /// Admin password (default: generated and printed).
        #[arg(long, env = "SKYHOLD_ADMIN_PASSWORD")]
        admin_password: Option<String>,
        /// Also create a demo zone, pod, cluster, offerings and templates.
        #[arg(long)]
        seed: bool,
    },
    /// Apply pending schema migrations. Refuses a database newer than this binary.
    Migrate {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show the schema version and whether the database is initialised.
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Write a consistent copy of the database (SQLite: VACUUM INTO; MariaDB: mariadb-dump
    /// --single-transaction). Back up before `db migrate`.
    Backup {
        #[command(flatten)]
        node: NodeArgs,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct AccountArgs {
    #[command(subcommand)]
    pub action: AccountAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AccountAction {
    /// Create an account with one user and an API key pair; prints the credentials as JSON.
    Create {
        #[command(flatten)]
        node: NodeArgs,
        /// Account (and user) name.
        #[arg(long)]
        name: String,
        /// Make it an administrator.
        #[arg(long)]
        admin: bool,
        /// Password (default: generated).
        #[arg(long)]
        password: Option<String>,
    },
}
