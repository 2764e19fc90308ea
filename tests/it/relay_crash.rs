//! kill -9 the real relay binary while devices push: every acknowledged change survives in the
//! log, unacknowledged ones are retried, everyone converges, and the log has no duplicate.

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::json;
use tandem::client::{sync_once, SyncConfig};
use tandem::{DocId, Repo};

use crate::support::{note_schema, open};
use crate::sync::relay_hashes;

fn cycles() -> usize {
    std::env::var("TANDEM_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Start the relay binary on `addr` and wait until it accepts connections.
fn start_relay(dir: &std::path::Path, addr: SocketAddr) -> Child {
    let listen = addr.to_string();
    let args: Vec<&std::ffi::OsStr> = vec![
        "--insecure-no-auth".as_ref(),
        "--listen".as_ref(),
        listen.as_ref(),
        "--data".as_ref(),
        dir.as_os_str(),
    ];
    crate::support::spawn_relay(&args).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_change_survives_relay_kill_9() {
    let seed = std::env::var("TANDEM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rdir = tempfile::tempdir().unwrap();
    let data = rdir.path().join("relay");
    let addr = free_port();
    let cfg = SyncConfig::new(&format!("ws://{addr}"));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let devices: Vec<Repo> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| open(d.path(), &format!("dev{i}"), note_schema()))
        .collect();
    let docs: Vec<DocId> = (0..4)
        .map(|i| {
            devices[0]
                .create("note", json!({"title": format!("d{i}")}))
                .unwrap()
        })
        .collect();

    let mut relay = start_relay(&data, addr);
    for cycle in 0..cycles() {
        // Each device writes, then pushes while the relay is killed at a random moment.
        for (i, d) in devices.iter().enumerate() {
            for _ in 0..3 {
                let id = docs[rng.gen_range(0..docs.len())];
                if d.get(&id).is_ok() {
                    d.change(&id, |tx| tx.increment("views", 1)).unwrap();
                }
            }
            let _ = i;
        }
        let passes: Vec<_> = devices
            .iter()
            .map(|d| {
                let d = d.clone();
                let cfg = cfg.clone();
                tokio::spawn(async move { sync_once(&d, cfg, Duration::from_secs(20)).await })
            })
            .collect();
        // Chaos, not a wait: kill after a random 0-40 ms.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..40))).await;
        relay.kill().unwrap();
        relay.wait().unwrap();
        for p in passes {
            let _ = p.await.unwrap(); // a pass may fail: the relay died under it
        }
        // Every change a device no longer holds in its outbox was acknowledged: it must be in
        // the log after the crash.
        let held = relay_hashes(&data);
        for d in &devices {
            for id in &docs {
                let Ok(all) = d.all_changes(id) else { continue };
                let pending: Vec<Vec<u8>> =
                    d.outbox(id).unwrap().into_iter().map(|(_, b)| b).collect();
                for c in all.iter().filter(|c| !pending.contains(c)) {
                    let h = tandem::crdt::parse_change(c).unwrap().hash().to_string();
                    let in_log = held.get(id).is_some_and(|s| s.contains(&h));
                    // Changes that came *from* the relay are acknowledged by definition; only
                    // this device's own changes are checked against the log.
                    if tandem::crdt::parse_change(c).unwrap().actor_id() == &d.device().actor() {
                        assert!(
                            in_log,
                            "cycle {cycle}: acknowledged change {h} of {id} lost (seed {seed})"
                        );
                    }
                }
            }
        }
        relay = start_relay(&data, addr);
    }
    // Settle: everyone converges, nothing pending, no duplicates.
    for _ in 0..2 {
        for d in &devices {
            sync_once(d, cfg.clone(), Duration::from_secs(60))
                .await
                .expect("final sync");
        }
    }
    for id in &docs {
        let heads: Vec<_> = devices.iter().map(|d| d.get(id).unwrap().heads).collect();
        assert_eq!(heads[0], heads[1], "devices converge on {id}");
    }
    for d in &devices {
        assert!(
            d.outbox_docs().unwrap().is_empty(),
            "unacknowledged changes were retried until acked"
        );
    }
    relay.kill().unwrap();
    relay.wait().unwrap();
    let held = relay_hashes(&data);
    for id in &docs {
        assert_eq!(
            held[id].len(),
            devices[0].history(id).unwrap().len(),
            "the log has every change once"
        );
    }
}
