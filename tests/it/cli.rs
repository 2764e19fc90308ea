//! The `tandem` binary as a user meets it: outputs (human and --json), exit codes, messages.
//! Ids, hashes and times vary from run to run, so outputs are normalized before comparing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const SCHEMA: &str = r#"version = 1
[types.note]
title  = "critical"
body   = "text"
pinned = "lww"
views  = "counter"
labels = "merge"
"#;

pub struct Cli {
    pub dir: tempfile::TempDir,
    /// Values replaced by placeholders in outputs.
    pub names: Vec<(String, String)>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

impl Cli {
    pub fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tandem.toml"), SCHEMA).unwrap();
        Cli {
            dir,
            names: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_as("alice", args)
    }

    pub fn run_as(&self, author: &str, args: &[&str]) -> Run {
        let out: Output = Command::new(exe())
            .args(args)
            .current_dir(self.path())
            .env("TANDEM_AUTHOR", author)
            .env_remove("TANDEM_DATA")
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: self.normalize(&String::from_utf8_lossy(&out.stdout)),
            stderr: self.normalize(&String::from_utf8_lossy(&out.stderr)),
        }
    }

    /// Run and expect success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "tandem {args:?} failed: {}", r.stderr);
        r.stdout
    }

    pub fn name(&mut self, value: &str, placeholder: &str) {
        self.names
            .push((value.to_string(), placeholder.to_string()));
    }

    fn normalize(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (v, p) in &self.names {
            s = s.replace(v.as_str(), p);
        }
        // Ages: "oldest 3s old" depends on how busy the machine is.
        let mut from = 0;
        while let Some(at) = s[from..].find("oldest ") {
            let i = from + at + "oldest ".len();
            let digits = s[i..].chars().take_while(|c| c.is_ascii_digit()).count();
            if digits > 0 && s[i + digits..].starts_with("s old") {
                s.replace_range(i..i + digits + 1, "<age>");
            }
            from = i;
        }
        // Dates: YYYY-MM-DD HH:MM:SS UTC.
        let mut out = String::new();
        let bytes: Vec<char> = s.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            let rest: String = bytes[i..bytes.len().min(i + 23)].iter().collect();
            if rest.len() == 23
                && rest.ends_with(" UTC")
                && rest.as_bytes()[4] == b'-'
                && rest.as_bytes()[13] == b':'
            {
                out.push_str("<time>");
                i += 23;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        out
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn every_store_command_human_and_json() {
    let mut cli = Cli::new();
    let id = cli
        .ok(&["new", "note", "title=Groceries", "body=milk", "views=2"])
        .trim()
        .to_string();
    cli.name(&id, "<doc>");
    assert_eq!(cli.ok(&["get", &id, "title"]), "Groceries\n");
    assert_eq!(
        cli.ok(&["get", &id[..6], "views"]),
        "2\n",
        "a unique prefix names the document"
    );
    assert_eq!(
        cli.ok(&["get", &id]),
        "{\n  \"title\": \"Groceries\",\n  \"body\": \"milk\",\n  \"pinned\": null,\n  \"views\": 2,\n  \"labels\": {}\n}\n"
    );
    let e = json(&cli.ok(&["--json", "get", &id]));
    assert_eq!(e["id"], "<doc>");
    assert_eq!(e["type"], "note");
    assert_eq!(e["namespace"], "default");
    assert_eq!(e["schema"], 1);
    assert_eq!(e["conflicts"], serde_json::json!([]));
    assert_eq!(
        json(&cli.ok(&["get", &id, "title", "--json"]))["value"],
        "Groceries"
    );

    assert_eq!(
        cli.ok(&[
            "set",
            &id,
            "body=oat milk",
            "views=+3",
            "labels={\"home\":true}",
            "pinned=true",
            "-m",
            "weekend"
        ]),
        ""
    );
    let set = json(&cli.ok(&["--json", "set", &id, "labels={\"home\":null}"]));
    assert_eq!(set["change"].as_str().unwrap().len(), 64);
    assert_eq!(cli.ok(&["get", &id, "body"]), "oat milk\n");
    assert_eq!(cli.ok(&["get", &id, "views"]), "5\n");
    assert_eq!(cli.ok(&["get", &id, "labels"]), "{}\n");

    let ls = cli.ok(&["ls"]);
    assert_eq!(ls, "<doc>\tnote\tdefault\tpending 3\n");
    let ls = json(&cli.ok(&["ls", "--json"]));
    assert_eq!(ls[0]["pending"], 3);

    let log = json(&cli.ok(&["log", &id, "--json"]));
    let hashes: Vec<String> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hash"].as_str().unwrap().to_string())
        .collect();
    // Full hashes first, so their prefixes do not shadow them.
    for (i, h) in hashes.iter().enumerate() {
        cli.name(h, &format!("<H{}>", hashes.len() - 1 - i));
    }
    for (i, h) in hashes.iter().enumerate() {
        cli.name(&h[..8], &format!("<h{}>", hashes.len() - 1 - i));
    }
    assert_eq!(log[1]["message"], "weekend");
    assert_eq!(log[1]["author"], "alice");
    assert_eq!(
        cli.ok(&["log", &id, "--oneline"]),
        "<h2> alice <time> [labels] \n<h1> alice <time> [body,pinned,views,labels] weekend\n<h0> alice <time> [title,body,views,labels] create note\n"
    );
    let full = cli.ok(&["log", &id]);
    assert!(
        full.starts_with("change <H2>\nAuthor:  alice (actor "),
        "{full}"
    );
    assert!(
        full.contains("Parents: <h1>\nChanged: labels (1 ops)\n"),
        "{full}"
    );
    assert!(full.contains("\n    weekend\n"), "{full}");

    let first = &hashes[2][..8];
    assert_eq!(
        cli.ok(&["show", &id, "--at", first]),
        "{\n  \"title\": \"Groceries\",\n  \"body\": \"milk\",\n  \"pinned\": null,\n  \"views\": 2,\n  \"labels\": {}\n}\n"
    );
    assert_eq!(
        json(&cli.ok(&["show", &id, "--at", first, "--json"]))["heads"][0],
        "<H0>"
    );
    assert_eq!(
        cli.ok(&["diff", &id, first]),
        "body: at 0 +\"oat \"\npinned: null -> true\nviews: 2 -> 5\n"
    );
    let d = json(&cli.ok(&["diff", &id, first, &hashes[1][..8], "--json"]));
    assert_eq!(d[0]["field"], "body");
    assert_eq!(d[0]["text"][0]["inserted"], "oat ");

    assert_eq!(
        cli.ok(&["status", &id]),
        "pending (3 changes, oldest <age> old)\n"
    );
    let st = json(&cli.ok(&["status", "--json"]));
    assert_eq!(st["total"]["pending"], 1);
    assert_eq!(st["documents"][0]["status"], "pending");
    assert_eq!(cli.ok(&["status"]), "<doc>\tpending (3 changes, oldest <age> old)\n1 documents: 0 synced, 0 syncing, 1 pending, 0 conflict\n");

    let r = cli.run(&["conflicts"]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "", "no open conflicts\n")
    );
    assert_eq!(
        json(&cli.ok(&["conflicts", "--json"])),
        serde_json::json!([])
    );

    // Export, import into another store, delete.
    let file = cli.path().join("x.automerge");
    cli.ok(&["export", &id, "-o", file.to_str().unwrap()]);
    let bytes = std::fs::read(&file).unwrap();
    automerge::Automerge::load(&bytes).unwrap();
    let named = cli.path().join(format!("{id}.automerge"));
    cli.ok(&["export", &id]);
    assert!(named.exists(), "default export name is <doc-id>.automerge");
    assert_eq!(
        cli.ok(&["--data", "other", "import", named.to_str().unwrap()]),
        "<doc>\n",
        "the id comes from the file name"
    );
    assert_eq!(
        cli.ok(&["--data", "other", "get", &id, "body"]),
        "oat milk\n"
    );
    let fresh = cli.ok(&["--data", "other", "import", file.to_str().unwrap()]);
    assert_ne!(
        fresh, "<doc>\n",
        "a file not named by an id makes a new document"
    );
    cli.ok(&["rm", &id]);
    assert_eq!(cli.ok(&["ls"]), "");
    assert_eq!(
        cli.ok(&["ls", "--deleted"]),
        "<doc>\tnote\tdefault\tdeleted, pending 4\n"
    );
}

#[test]
fn conflicts_and_resolve_by_pick() {
    let mut cli = Cli::new();
    let id = cli.ok(&["new", "note", "title=Plan"]).trim().to_string();
    cli.name(&id, "<doc>");
    // Make a concurrent edit in another store and bring it back through export/import.
    let file = cli.path().join(format!("{id}.automerge"));
    cli.ok(&["export", &id]);
    let r = cli.run_as("bob", &["--data", "bob", "import", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        cli.run_as("bob", &["--data", "bob", "set", &id, "title=Plan B"])
            .code,
        0
    );
    cli.ok(&["set", &id, "title=Plan A"]);
    assert_eq!(
        cli.run_as(
            "bob",
            &["--data", "bob", "export", &id, "-o", "bob.automerge"]
        )
        .code,
        0
    );
    cli.ok(&["import", "bob.automerge", "--id", &id]);

    let r = cli.run(&["get", &id, "title"]);
    assert!(r.stderr.contains("'title' is in conflict"), "{}", r.stderr);
    let c = json(&cli.ok(&["conflicts", "--json"]));
    assert_eq!(c[0]["field"], "title");
    let versions = c[0]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    let human = cli.ok(&["conflicts", &id]);
    assert!(
        human.starts_with("<doc> title (critical)\n  1) \""),
        "{human}"
    );
    assert!(
        human.contains("by alice") && human.contains("by bob"),
        "{human}"
    );
    assert_eq!(cli.ok(&["status", &id]), "conflict (title)\n");
    let bob_n = versions.iter().find(|v| v["author"] == "bob").unwrap()["n"]
        .as_u64()
        .unwrap();
    cli.ok(&["resolve", &id, "title", "--pick", &bob_n.to_string()]);
    assert_eq!(cli.ok(&["get", &id, "title"]), "Plan B\n");
    assert_eq!(
        json(&cli.ok(&["conflicts", "--json"])),
        serde_json::json!([])
    );
    let log = cli.ok(&["log", &id, "--oneline"]);
    assert!(
        log.lines()
            .next()
            .unwrap()
            .ends_with("resolve title = Plan B (decided by alice)"),
        "{log}"
    );
}

#[test]
fn errors_have_exit_codes_and_helpful_messages() {
    let cli = Cli::new();
    let id = cli.ok(&["new", "note", "title=x"]).trim().to_string();

    let r = cli.run(&[]);
    assert_eq!(r.code, 2, "no command is a usage error");
    let r = cli.run(&["get", "zzzz"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stderr.contains("no document matches 'zzzz'"),
        "{}",
        r.stderr
    );
    // A prefix that shares three characters with the id and then differs from it.
    let other = if id[3..].starts_with('x') { 'y' } else { 'x' };
    let r = cli.run(&["get", &format!("{}{other}", &id[..3])]);
    assert_eq!(r.code, 3);
    assert!(
        r.stderr.contains("did you mean"),
        "closest ids are suggested: {}",
        r.stderr
    );
    let r = cli.run(&["set", &id, "colour=red"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stderr
            .contains("its fields: title, body, pinned, views, labels"),
        "{}",
        r.stderr
    );
    let r = cli.run(&["set", &id, "views=3"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("write +3 or -3"), "{}", r.stderr);
    let r = cli.run(&["set", &id, "labels=oops"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("merge field") && r.stderr.contains("JSON object"),
        "{}",
        r.stderr
    );
    let r = cli.run(&["set", &id, "novalue"]);
    assert_eq!(r.code, 2);
    let r = cli.run(&["show", &id, "--at", "ab"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("at least 4 hex characters"),
        "{}",
        r.stderr
    );
    let r = cli.run(&["show", &id, "--at", "0000000"]);
    assert!(r.code == 3 || r.code == 0, "{}", r.stderr);
    let r = cli.run(&["resolve", &id, "title", "--pick", "1"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("not in conflict"), "{}", r.stderr);
    let r = cli.run(&["resolve", &id, "title"]);
    assert_eq!(r.code, 2, "--pick or --value is required");
    let r = cli.run(&["--data", "nowhere", "ls"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("no store at nowhere"), "{}", r.stderr);
    assert!(
        !cli.path().join("nowhere").exists(),
        "read-only commands never create a store"
    );
    let r = cli.run(&["import", "missing.automerge"]);
    assert_eq!(r.code, 3);
    std::fs::write(cli.path().join("trunc.automerge"), b"\x85\x6f\x4a\x83\x00").unwrap();
    let r = cli.run(&["import", "trunc.automerge"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("not an Automerge document"),
        "{}",
        r.stderr
    );

    // A store held by another process: exit 4 naming the pid.
    let held = tandem::Repo::open(
        cli.path().join("tandem-data"),
        tandem::RepoOptions::new("holder"),
    )
    .unwrap();
    let r = cli.run(&["ls"]);
    assert_eq!(r.code, 4);
    assert!(
        r.stderr.contains(&format!("pid {}", std::process::id())),
        "{}",
        r.stderr
    );
    drop(held);
}

#[test]
fn an_ambiguous_prefix_lists_the_candidates() {
    let cli = Cli::new();
    let mut ids: Vec<String> = Vec::new();
    // Base58 ids: among 60 documents two share a first character.
    for _ in 0..60 {
        ids.push(cli.ok(&["new", "note"]).trim().to_string());
    }
    let first = ids
        .iter()
        .map(|s| &s[..1])
        .find(|p| ids.iter().filter(|s| s.starts_with(p)).count() > 1)
        .unwrap();
    let r = cli.run(&["get", first]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("is ambiguous; it matches:"),
        "{}",
        r.stderr
    );
}

/// Start the relay binary with a JWT secret; returns the child and its URL.
fn relay_with_secret(dir: &Path) -> (std::process::Child, String) {
    std::fs::write(dir.join("secret"), "cli-test-secret-0123456789\n").unwrap();
    let (secret, data) = (dir.join("secret"), dir.join("relay"));
    let (child, addr) = crate::support::spawn_relay(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--jwt-secret-file".as_ref(),
        secret.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
    ]);
    (child, format!("ws://{addr}"))
}

#[test]
fn sync_exit_codes_for_auth_and_connection_failures() {
    let cli = Cli::new();
    let (mut relay, url) = relay_with_secret(cli.path());
    let secret = cli.path().join("secret");
    let token = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "--jwt-secret-file",
            secret.to_str().unwrap(),
            "--sub",
            "t",
            "--ns",
            "default",
        ];
        args.extend_from_slice(extra);
        cli.ok(&args).trim().to_string()
    };
    let rw = token(&["--write"]);
    let ro = token(&[]);
    cli.ok(&["new", "note", "title=x"]);

    // No token, a forged token, an expired one: refused, exit 5.
    let r = cli.run(&["sync", "--relay", &url, "--once"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("refused"), "{}", r.stderr);
    // Another first character of the signature (the last one may carry only padding bits).
    let dot = rw.rfind('.').unwrap() + 1;
    let swap = if rw[dot..].starts_with('A') { "B" } else { "A" };
    let forged = format!("{}{swap}{}", &rw[..dot], &rw[dot + 1..]);
    assert_eq!(
        cli.run(&["sync", "--relay", &url, "--token", &forged, "--once"])
            .code,
        5
    );
    let expired = token(&["--ttl", "0s"]);
    assert_eq!(
        cli.run(&["sync", "--relay", &url, "--token", &expired, "--once"])
            .code,
        5
    );
    // A read-only token with local changes pending cannot finish: exit 5.
    let r = cli.run(&["sync", "--relay", &url, "--token", &ro, "--once"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    // The right token works; then the read-only one has nothing pending and succeeds.
    let r = cli.run(&["sync", "--relay", &url, "--token", &rw, "--once"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "pushed 1 changes (1 documents), pulled 0 changes (0 documents)\n"
    );
    let r = cli.run(&[
        "--data", "reader", "sync", "--relay", &url, "--token", &ro, "--once", "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(json(&r.stdout)["changes_pulled"], 1);
    assert_eq!(
        cli.ok(&["status"]).lines().last().unwrap(),
        "1 documents: 1 synced, 0 syncing, 0 pending, 0 conflict"
    );
    relay.kill().unwrap();
    relay.wait().unwrap();
    // Nobody listening: unreachable, exit 6.
    let r = cli.run(&["sync", "--relay", &url, "--token", &rw, "--once"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("unreachable"), "{}", r.stderr);
    // Usage: --once or --watch is required.
    assert_eq!(cli.run(&["sync", "--relay", &url]).code, 2);
}

#[test]
fn a_relay_folder_in_the_old_storage_format_is_read_after_the_relay_upgraded_it() {
    use automerge::transaction::Transactable;
    use tandem::relay::log::RelayLog;
    use tandem::store::{Backend, Batch, SledBackend, StoreOptions};

    let cli = Cli::new();
    let data = cli.path().join("relay");
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "title", "kept").unwrap();
    tx.commit();
    let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
    let id = tandem::ids::DocId([7; 16]);
    RelayLog::open(&data)
        .unwrap()
        .push("default", &id, &[change])
        .unwrap();
    let read = || cli.run(&["--data", "relay", "get", &id.to_string(), "title"]);
    assert_eq!(read().stdout.trim(), "kept");

    // Format 1 stored the bare id, without the storage format after it.
    let backend = SledBackend::open(&data, &StoreOptions::default()).unwrap();
    let id_key = b"Rid".to_vec();
    let stored = backend.get(&id_key).unwrap().unwrap();
    assert_eq!(stored.len(), 17);
    let mut batch = Batch::default();
    batch.put(id_key, stored[..16].to_vec());
    backend.write(batch).unwrap();
    backend.sync().unwrap();
    drop(backend);
    let r = read();
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("older storage format") && r.stderr.contains("tandem relay --data"),
        "{}",
        r.stderr
    );
    assert!(
        RelayLog::needs_upgrade(&SledBackend::open(&data, &StoreOptions::default()).unwrap())
            .unwrap()
    );

    drop(RelayLog::open(&data).unwrap()); // what a relay's start does
    assert_eq!(read().stdout.trim(), "kept");
}
