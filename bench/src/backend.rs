//! Which database a benchmark runs on (`--backend`), shared by the benchmark binaries.

use clap::ValueEnum;

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
