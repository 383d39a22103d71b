//! Which database a benchmark runs on (`--backend`), and a fresh database on it for one run.

use anyhow::Result;
use clap::ValueEnum;
use std::path::Path;

/// `--backend sqlite|mariadb|both` (`mysql` is accepted for `mariadb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Sqlite,
    #[value(alias = "mysql")]
    Mariadb,
    Both,
}

impl BackendArg {
    /// The backends to run, in order.
    pub fn expand(self) -> Vec<Backend> {
        match self {
            BackendArg::Sqlite => vec![Backend::Sqlite],
            BackendArg::Mariadb => vec![Backend::MySql],
            BackendArg::Both => vec![Backend::Sqlite, Backend::MySql],
        }
    }
}

/// One database backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
}

impl Backend {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::MySql => "mariadb",
        }
    }
}

/// A fresh database for one part of a benchmark: a SQLite file, or a database of its own on a
/// MariaDB/MySQL server, dropped afterwards ([`BenchDb::drop_database`]).
#[derive(Debug, Clone)]
pub struct BenchDb {
    /// What `skyhold --db` takes.
    pub url: String,
    /// MariaDB: the server's URL (no database) and the database's name.
    mysql: Option<(String, String)>,
}

impl BenchDb {
    /// `skyhold.db` in `dir`; it goes away with `dir`.
    pub fn sqlite(dir: &Path) -> BenchDb {
        BenchDb { url: format!("sqlite://{}", dir.join("skyhold.db").display()), mysql: None }
    }

    /// A new database name (`PREFIX` + 8 random hex digits) on the MariaDB/MySQL server at
    /// `server_url`; `skyhold db init` creates the database.
    pub fn mysql(server_url: &str, prefix: &str) -> BenchDb {
        let server = server_url.trim_end_matches('/').to_string();
        let (url, name) = crate::util::new_mysql_database(&server, prefix);
        BenchDb { url, mysql: Some((server, name)) }
    }

    /// The MariaDB database's name; `None` on SQLite.
    pub fn mysql_name(&self) -> Option<&str> {
        self.mysql.as_ref().map(|(_, name)| name.as_str())
    }

    /// `DROP DATABASE` on MariaDB; nothing to do on SQLite (the file goes with its directory).
    pub async fn drop_database(&self) -> Result<()> {
        match &self.mysql {
            Some((server, name)) => crate::util::drop_mysql_database(server, name).await,
            None => Ok(()),
        }
    }

    /// At the end of a part: with `--keep`, say that the MariaDB database stays; otherwise drop
    /// it, printing (not returning) a failure so that the rest of the cleanup goes on.
    pub fn drop_unless_kept(&self, rt: &tokio::runtime::Runtime, keep: bool) {
        let Some(name) = self.mysql_name() else { return };
        if keep {
            println!("  kept (--keep): database {name}");
        } else if let Err(e) = rt.block_on(self.drop_database()) {
            eprintln!("could not drop database {name}: {e:#}");
        }
    }
}
