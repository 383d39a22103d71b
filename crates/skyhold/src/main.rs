//! `skyhold`: the one binary. Subcommands: `demo` (the quickstart), `server` (a management
//! server), `agent` (a hypervisor agent, with the simulator driver), `db` (init/migrate/status)
//! and `account` (create API users).

mod agent_cmd;
mod cli;
mod cluster_cmd;
mod config;
mod db_cmd;
mod demo;
mod keys_cmd;
mod server_cmd;

use clap::Parser;

/// `skyhold ha status`.
async fn ha_cmd(a: cli::HaArgs) -> anyhow::Result<u8> {
    match a.action {
        cli::HaAction::Status { node } => {
            let file = config::FileConfig::load(node.config.as_deref())?;
            let db = config::Node::resolve(&node, &file)?.open_db(false).await?;
            let st = skyhold_core::ha::status(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", serde_json::to_string_pretty(&st)?);
            Ok(0)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let res = rt.block_on(async move {
        match cli.command {
            cli::Cmd::Demo(a) => demo::run(a).await,
            cli::Cmd::Server(a) => server_cmd::run(a).await,
            cli::Cmd::Agent(a) => agent_cmd::run(a).await,
            cli::Cmd::Db(a) => db_cmd::run(a).await,
            cli::Cmd::Account(a) => db_cmd::account(a).await,
            cli::Cmd::Cluster(a) => cluster_cmd::run(a).await,
            cli::Cmd::Keys(a) => keys_cmd::run(a).await,
            cli::Cmd::Ha(a) => ha_cmd(a).await,
        }
    });
    match res {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
