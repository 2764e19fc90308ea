//! Argument parsing and dispatch for the `tandem` binary.

mod relay;
mod store;
mod sync;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit codes (docs/cli.md).
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// An error with the exit code it should end the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<tandem::Error> for Failure {
    fn from(e: tandem::Error) -> Self {
        Failure::new(e.exit_code(), e.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::new(EXIT_FAILURE, format!("{e:#}"))
    }
}

pub type CmdResult = Result<(), Failure>;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Offline-first sync engine: inspect stores, sync, run a relay"
)]
pub struct Cli {
    /// Data folder (store commands: ./tandem-data or $TANDEM_DATA; relay: ./tandem-relay or
    /// $TANDEM_RELAY_DATA).
    #[arg(long, global = true, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Schema file (default: ./tandem.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    /// Print JSON (shapes in docs/cli.md).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an entity and print its id.
    New(store::NewArgs),
    /// Set fields of a document.
    Set(store::SetArgs),
    /// Print a document (or one field).
    Get(store::GetArgs),
    /// List documents.
    Ls(store::LsArgs),
    /// Delete a document (a tombstone that syncs).
    Rm(store::DocArg),
    /// A document's history, newest first.
    Log(store::LogArgs),
    /// A document now or at a point of its history.
    Show(store::ShowArgs),
    /// Field-level differences between two points of a document.
    Diff(store::DiffArgs),
    /// Open conflicts, every version side by side.
    Conflicts(store::ConflictsArgs),
    /// Settle a conflict.
    Resolve(store::ResolveArgs),
    /// Sync status of documents.
    Status(store::StatusArgs),
    /// Write a document as standard Automerge bytes.
    Export(store::ExportArgs),
    /// Merge an Automerge file into the store.
    Import(store::ImportArgs),
    /// Sync the store with a relay.
    Sync(sync::SyncArgs),
    /// Run a relay server.
    Relay(relay::RelayArgs),
    /// Mint an access token for a relay.
    Token(relay::TokenArgs),
    /// Move an embedded relay's data into PostgreSQL, and verify it (counts and hashes).
    MigrateRelay(relay::MigrateArgs),
}

impl Cli {
    /// The data folder for a command: the flag, else the env variable, else the default.
    pub fn data_dir(&self, env: &str, default: &str) -> PathBuf {
        self.data
            .clone()
            .or_else(|| std::env::var_os(env).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(default))
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let default_level = if matches!(cli.command, Command::Relay(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match &cli.command {
        Command::New(a) => store::new(&cli, a),
        Command::Set(a) => store::set(&cli, a),
        Command::Get(a) => store::get(&cli, a),
        Command::Ls(a) => store::ls(&cli, a),
        Command::Rm(a) => store::rm(&cli, a),
        Command::Log(a) => store::log(&cli, a),
        Command::Show(a) => store::show(&cli, a),
        Command::Diff(a) => store::diff(&cli, a),
        Command::Conflicts(a) => store::conflicts(&cli, a),
        Command::Resolve(a) => store::resolve(&cli, a),
        Command::Status(a) => store::status(&cli, a),
        Command::Export(a) => store::export(&cli, a),
        Command::Import(a) => store::import(&cli, a),
        Command::Sync(a) => sync::run(&cli, a),
        Command::Relay(args) => relay::run(&cli, args),
        Command::Token(args) => relay::token(&cli, args),
        Command::MigrateRelay(args) => relay::migrate(&cli, args),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("tandem: {}", f.message);
            f.code
        }
    }
}
