//! Shared helpers for the integration tests.

use tandem::{Repo, RepoOptions, Schema};

pub const NOTE_SCHEMA: &str = r#"
version = 1
[types.note]
title  = "critical"   # user-prompted when devices disagree
body   = "text"       # character-level CRDT
pinned = "lww"        # last writer by logical clock
views  = "counter"    # concurrent increments add
labels = "merge"      # nested map, keys merge independently
"#;

pub fn note_schema() -> Schema {
    Schema::from_toml(NOTE_SCHEMA).expect("note schema")
}

/// A repo on a real sled folder.
pub fn open(dir: &std::path::Path, author: &str, schema: Schema) -> Repo {
    Repo::open(dir, RepoOptions::new(author).schema(schema)).expect("open repo")
}

/// Exchange every change of `id` between two repos (both directions), with no network.
pub fn exchange(a: &Repo, b: &Repo, id: &tandem::DocId) {
    let ns = a
        .meta(id)
        .map(|m| m.namespace)
        .unwrap_or_else(|_| "default".into());
    if let Ok(changes) = a.all_changes(id) {
        b.apply_remote(id, &ns, &changes).expect("apply a -> b");
    }
    if let Ok(changes) = b.all_changes(id) {
        a.apply_remote(id, &ns, &changes).expect("apply b -> a");
    }
}

/// Start the real `tandem relay` binary with `args` (after `relay`) and wait for the line it
/// prints once it accepts connections; returns the child and the address it listens on.
pub fn spawn_relay(args: &[&std::ffi::OsStr]) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(crate::cli::exe())
        .arg("relay")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the relay did not start: {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}
