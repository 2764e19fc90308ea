//! Kill -9 against a real process: a child writes in a loop and prints each write that returned
//! success; it is killed at random moments; every printed write must be in the store after
//! reopening.
//!
//! The child is this test binary itself, re-run with `TANDEM_CRASH_CHILD` set.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::{note_schema, open};

/// Cycles in CI; more with `TANDEM_CRASH_CYCLES`.
fn cycles() -> usize {
    std::env::var("TANDEM_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var("TANDEM_CRASH_CHILD") else {
        return;
    };
    let repo = open(std::path::Path::new(&dir), "child", note_schema());
    let main = repo
        .list(Some("note"), true)
        .unwrap()
        .into_iter()
        .find(|(id, _)| repo.get(id).unwrap().value["title"] == "crash");
    let id = match main {
        Some((id, _)) => id,
        None => {
            let id = repo.create("note", json!({"title": "crash"})).unwrap();
            println!("created {id}");
            id
        }
    };
    // Bounded: the parent kills us long before this ends.
    for i in 0..200_000u64 {
        let tag = format!("{}-{i};", std::process::id());
        repo.change(&id, |tx| {
            tx.splice_text("body", 0, 0, &tag)?;
            tx.increment("views", 1)
        })
        .unwrap();
        // Also new documents, so that kills land in creation too.
        if i % 7 == 0 {
            let d = repo.create("note", json!({"title": tag.clone()})).unwrap();
            println!("doc {d} {tag}");
        }
        println!("ok {tag}");
    }
}

#[test]
fn every_acknowledged_write_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("TANDEM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7),
    );
    let mut acked: Vec<String> = Vec::new();
    let mut docs: Vec<(String, String)> = Vec::new();
    for cycle in 0..cycles() {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::crash_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TANDEM_CRASH_CHILD", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Kill after a random number of acknowledged writes (an event, not a timer).
        let kill_after = rng.gen_range(1..60);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < kill_after && Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(tag) = line.strip_prefix("ok ") {
                acked.push(tag.to_string());
                seen += 1;
            } else if let Some(rest) = line.strip_prefix("doc ") {
                let (d, tag) = rest.split_once(' ').unwrap();
                docs.push((d.to_string(), tag.to_string()));
            }
        }
        assert!(seen > 0, "cycle {cycle}: the child acknowledged nothing");
        child.kill().unwrap(); // SIGKILL
                               // Whatever it printed before dying was acknowledged too.
        for line in lines.map_while(Result::ok) {
            if let Some(tag) = line.strip_prefix("ok ") {
                acked.push(tag.to_string());
            } else if let Some(rest) = line.strip_prefix("doc ") {
                let (d, tag) = rest.split_once(' ').unwrap();
                docs.push((d.to_string(), tag.to_string()));
            }
        }
        child.wait().unwrap();

        let repo = open(dir.path(), "checker", note_schema());
        let notes = repo.list(Some("note"), true).unwrap();
        let main = notes
            .iter()
            .find(|(id, _)| repo.get(id).unwrap().value["title"] == "crash")
            .map(|(id, _)| *id)
            .expect("the main note exists");
        let body = repo.get(&main).unwrap().value["body"]
            .as_str()
            .unwrap()
            .to_string();
        for tag in &acked {
            assert!(
                body.contains(tag.as_str()),
                "cycle {cycle}: acknowledged write {tag} is lost"
            );
        }
        assert!(repo.get(&main).unwrap().value["views"].as_u64().unwrap() >= acked.len() as u64);
        for (d, tag) in &docs {
            let id = repo.find(d).unwrap();
            assert_eq!(repo.get(&id).unwrap().value["title"], tag.as_str());
        }
    }
    assert!(acked.len() >= cycles());
}
