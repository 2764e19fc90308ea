//! The `tandem` command line: inspect and edit a device store, settle conflicts, sync with a
//! relay, run a relay, and mint tokens. Flags are parsed into `Cli` (clap) and turned into a
//! configuration in one place per command; every error maps to the exit codes of docs/cli.md.
//! Data goes to stdout, diagnostics to stderr. The only module allowed to use anyhow.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
