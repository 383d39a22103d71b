//! Command-line options the benchmark binaries share, flattened into each binary's `Args` with
//! `#[command(flatten)]`: the binary under test (`--skyhold`), the databases to run on
//! (`--backend`, `--mysql-url`) and what is left behind (`--json-out`, `--tmp-dir`, `--keep`).
//!
//! Each group is flattened where its options stand in that binary's `--help`. The help texts
//! here are the common ones; a binary whose option covers something narrower rewords it with
//! `#[command(mut_arg("keep", |a| a.help("...")))]` on its `Args`, so that every `--help` says
//! exactly what that binary does.

use crate::backend::{Backend, BackendArg, BenchDb};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// `--skyhold PATH`.
#[derive(clap::Args, Debug, Clone)]
pub struct SkyholdArgs {
    /// The skyhold binary to benchmark.
    #[arg(long, default_value = "target/release/skyhold")]
    pub skyhold: PathBuf,
}

impl SkyholdArgs {
    /// The binary's absolute path, or an error saying how to build it when it is missing.
    pub fn binary(&self) -> Result<PathBuf> {
        if !self.skyhold.is_file() {
            bail!(
                "{} not found: build it first (cargo build --release -p skyhold) or pass --skyhold PATH",
                self.skyhold.display()
            );
        }
        std::fs::canonicalize(&self.skyhold).with_context(|| format!("resolve {}", self.skyhold.display()))
    }
}

/// `--backend sqlite|mariadb|both` and the MariaDB server of `--mysql-url`.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Which database(s) to run on.
    #[arg(long, value_enum, default_value_t = BackendArg::Sqlite)]
    pub backend: BackendArg,
    /// MariaDB/MySQL server URL without a database (mysql://USER:PASS@HOST:PORT); the bench
    /// creates databases of its own there and drops them at the end.
    #[arg(long, env = "SKYHOLD_BENCH_MYSQL_URL")]
    pub mysql_url: Option<String>,
}

impl BackendArgs {
    /// The backends to run, in order; an error when MariaDB is among them without a server.
    pub fn backends(&self) -> Result<Vec<Backend>> {
        let backends = self.backend.expand();
        if backends.contains(&Backend::MySql) && self.mysql_url.is_none() {
            bail!("--backend mariadb/both needs --mysql-url mysql://USER:PASS@HOST:PORT (or SKYHOLD_BENCH_MYSQL_URL)");
        }
        Ok(backends)
    }

    /// A fresh database on backend `b`: `skyhold.db` in `dir` (which must exist), or a new database
    /// named `PREFIX` + 8 random hex digits on the `--mysql-url` server. Nothing is created yet:
    /// `skyhold db init` creates it.
    pub fn database(&self, b: Backend, dir: &Path, prefix: &str) -> Result<BenchDb> {
        match b {
            Backend::Sqlite => Ok(BenchDb::sqlite(dir)),
            Backend::MySql => {
                let server = self.mysql_url.as_deref().context("--backend mariadb needs --mysql-url")?;
                Ok(BenchDb::mysql(server, prefix))
            }
        }
    }
}

/// `--json-out FILE`, `--tmp-dir DIR` and `--keep`.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArgs {
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Parent directory of the temporary data directory (SQLite files, logs, ledgers).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Keep the data directory and the MariaDB databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

impl OutputArgs {
    /// A new temporary directory `PREFIX` + random characters in `--tmp-dir`, else in `$TMPDIR`
    /// (or `/tmp`).
    pub fn temp_dir(&self, prefix: &str) -> Result<TempDir> {
        self.temp_dir_or(prefix, &std::env::temp_dir())
    }

    /// A new temporary directory `PREFIX` + random characters in `--tmp-dir`, else in
    /// `default_parent`.
    pub fn temp_dir_or(&self, prefix: &str, default_parent: &Path) -> Result<TempDir> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.tmp_dir.as_deref().unwrap_or(default_parent))
            .context("create a temporary directory")
    }

    /// With `--json-out`, write `report()` there (see [`crate::util::write_json`]). The report
    /// is only built when it is wanted.
    pub fn write_json(&self, report: impl FnOnce() -> Value) -> Result<()> {
        match &self.json_out {
            Some(path) => crate::util::write_json(path, report()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The shared options as a binary flattens them.
    #[derive(Parser, Debug)]
    struct Args {
        #[command(flatten)]
        bin: SkyholdArgs,
        #[command(flatten)]
        db: BackendArgs,
        #[command(flatten)]
        out: OutputArgs,
    }

    #[test]
    fn flattened_options_parse_with_their_defaults() {
        let a = Args::try_parse_from(["bench", "--mysql-url", "mysql://u:p@h:1/", "--keep"]).unwrap();
        assert_eq!(a.bin.skyhold, PathBuf::from("target/release/skyhold"));
        assert_eq!(a.db.backend, BackendArg::Sqlite);
        assert!(a.out.keep && a.out.json_out.is_none() && a.out.tmp_dir.is_none());
        let a = Args::try_parse_from(["bench", "--backend", "mysql", "--mysql-url", "mysql://u:p@h:1/"]).unwrap();
        assert_eq!(a.db.backends().unwrap(), vec![Backend::MySql]);
    }

    #[test]
    fn mariadb_needs_a_server() {
        let db = BackendArgs { backend: BackendArg::Both, mysql_url: None };
        assert!(db.backends().is_err());
        assert!(db.database(Backend::MySql, Path::new("/x"), "p_").is_err());
        assert_eq!(db.database(Backend::Sqlite, Path::new("/x"), "p_").unwrap().url, "sqlite:///x/skyhold.db");
        let db = BackendArgs { mysql_url: Some("mysql://u:p@h:1/".into()), ..db };
        let m = db.database(Backend::MySql, Path::new("/x"), "p_").unwrap();
        let name = m.mysql_name().unwrap();
        assert!(name.starts_with("p_") && name.len() == 10, "{name}");
        assert_eq!(m.url, format!("mysql://u:p@h:1/{name}"));
    }
}
