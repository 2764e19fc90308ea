//! Sync end to end: real relay, real loopback sockets, real sled folders.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use tandem::client::{connect, sync_once, SyncConfig};
use tandem::{DocId, Event, Origin, Repo};

use crate::support::{note_schema, open};
use crate::wire::{relay, token};

const LONG: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn url(addr: std::net::SocketAddr) -> String {
    format!("ws://{addr}")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn sync(repo: &Repo, cfg: &SyncConfig) -> tandem::client::SyncReport {
    sync_once(repo, cfg.clone(), LONG).await.expect("sync pass")
}

/// Wait (bounded) for an event matching `pred`.
async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        match e {
            Ok(e) if pred(&e) => return,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(e) => panic!("event channel closed while waiting for {what}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converge_show_the_same_conflict_and_fan_out_live() {
    let relay = relay(None).await;
    let cfg = SyncConfig::new(&url(relay.addr)).token(&token("team", &[], &["default"], HOUR));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let names = ["alice", "bob", "carol"];
    let devices: Vec<Repo> = dirs
        .iter()
        .zip(names)
        .map(|(d, n)| open(d.path(), n, note_schema()))
        .collect();
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);

    let id = a
        .create(
            "note",
            json!({"title": "Trip", "body": "pack", "pinned": false}),
        )
        .unwrap();
    sync(a, &cfg).await;
    sync(b, &cfg).await;
    sync(c, &cfg).await;
    assert_eq!(c.get(&id).unwrap().value["title"], "Trip");

    // Offline edits on all three.
    a.change(&id, |tx| {
        tx.set("pinned", true)?;
        tx.set("title", "Trip to Rome")
    })
    .unwrap();
    b.change(&id, |tx| {
        tx.splice_text("body", 4, 0, " bags")?;
        tx.set("title", "Rome trip")
    })
    .unwrap();
    c.change(&id, |tx| {
        tx.increment("views", 1)?;
        tx.merge_put("labels", "travel", true)
    })
    .unwrap();
    for _ in 0..2 {
        for d in &devices {
            sync(d, &cfg).await;
        }
    }
    let ea = a.get(&id).unwrap();
    for d in &devices {
        let e = d.get(&id).unwrap();
        assert_eq!(e.heads, ea.heads, "same heads everywhere");
        assert_eq!(e.value, ea.value);
        assert!(
            d.outbox_docs().unwrap().is_empty(),
            "everything acknowledged"
        );
    }
    assert_eq!(ea.value["pinned"], true);
    assert_eq!(ea.value["body"], "pack bags");
    assert_eq!(ea.value["views"], 1);
    assert_eq!(ea.value["labels"], json!({"travel": true}));
    let conflicts = a.conflicts(&id, false).unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].versions.len(), 2);
    for d in &devices {
        assert_eq!(
            d.conflicts(&id, false).unwrap(),
            conflicts,
            "the same conflict on every device"
        );
    }

    // Live: with background sync running, an edit on one device reaches the others.
    let handles: Vec<_> = devices.iter().map(|d| connect(d, cfg.clone())).collect();
    for h in &handles {
        h.wait_synced(LONG).await.unwrap();
    }
    let mut rx_b = b.subscribe();
    let mut rx_c = c.subscribe();
    {
        let a = a.clone();
        blocking(move || a.resolve(&id, "title", json!("Rome, June")).unwrap()).await;
    }
    for rx in [&mut rx_b, &mut rx_c] {
        wait_event(
            rx,
            "the resolution to arrive live",
            |e| matches!(e, Event::ConflictResolved { doc, .. } if *doc == id),
        )
        .await;
    }
    assert_eq!(c.get(&id).unwrap().value["title"], "Rome, June");
    assert!(c.conflicts(&id, false).unwrap().is_empty());
    let before = b.get(&id).unwrap().heads;
    {
        let c2 = c.clone();
        blocking(move || {
            c2.change(&id, |tx| tx.splice_text("body", 0, 0, "Do: "))
                .unwrap()
        })
        .await;
    }
    wait_event(&mut rx_b, "a live text edit", |e| {
        matches!(e, Event::Changed { doc, origin: Origin::Remote, heads, .. } if *doc == id && heads != &before)
    })
    .await;
    assert_eq!(b.get(&id).unwrap().value["body"], "Do: pack bags");
    for h in handles {
        h.stop().await;
    }
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_pulls_only_the_documents_that_changed() {
    let relay = relay(None).await;
    let cfg = SyncConfig::new(&url(relay.addr)).token(&token("team", &[], &["default"], HOUR));
    let (dw, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let writer = open(dw.path(), "writer", note_schema());
    let reader = open(dr.path(), "reader", note_schema());
    let ids: Vec<DocId> = {
        let w = writer.clone();
        blocking(move || {
            (0..1000)
                .map(|i| w.create("note", json!({"title": format!("n{i}")})).unwrap())
                .collect()
        })
        .await
    };
    sync(&writer, &cfg).await;
    sync(&reader, &cfg).await;
    assert_eq!(reader.list(Some("note"), false).unwrap().len(), 1000);

    {
        let w = writer.clone();
        let changed = ids[..10].to_vec();
        blocking(move || {
            for id in changed {
                w.change(&id, |tx| tx.set("pinned", true)).unwrap();
            }
        })
        .await;
    }
    sync(&writer, &cfg).await;
    let stats = &relay.log.stats();
    let pulls_before = stats.pulls.load(std::sync::atomic::Ordering::Relaxed);
    let feeds_before = stats.feed_pages.load(std::sync::atomic::Ordering::Relaxed);
    let report = sync(&reader, &cfg).await;
    let pulls = stats.pulls.load(std::sync::atomic::Ordering::Relaxed) - pulls_before;
    let feeds = stats.feed_pages.load(std::sync::atomic::Ordering::Relaxed) - feeds_before;
    assert_eq!(pulls, 10, "only the 10 changed documents are pulled");
    assert!(
        feeds <= 2,
        "one feed page (plus at most one empty check), got {feeds}"
    );
    assert_eq!(report.docs_pulled, 10);
    for id in &ids[..10] {
        assert_eq!(reader.get(id).unwrap().value["pinned"], true);
    }
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_relay_is_repopulated_by_its_devices() {
    let rdir = tempfile::tempdir().unwrap();
    let relay1 = relay(Some(rdir.path().join("r"))).await;
    let addr = relay1.addr;
    let cfg = SyncConfig::new(&url(addr)).token(&token("team", &[], &["default"], HOUR));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), "alice", note_schema());
    let b = open(db.path(), "bob", note_schema());
    let x = a.create("note", json!({"title": "x"})).unwrap();
    let y = b.create("note", json!({"title": "y"})).unwrap();
    sync(&a, &cfg).await;
    sync(&b, &cfg).await;
    sync(&a, &cfg).await;
    relay1.shutdown().await.unwrap();

    // A new, empty relay (a wiped folder or database) on the same address.
    let relay2 = crate::wire::relay_with(Some(rdir.path().join("r2")), |c| c.listen = addr).await;
    a.change(&x, |tx| tx.set("pinned", true)).unwrap();
    sync(&a, &cfg).await;
    sync(&b, &cfg).await;
    sync(&a, &cfg).await;
    for d in [&a, &b] {
        for id in [&x, &y] {
            assert_eq!(d.get(id).unwrap().heads, a.get(id).unwrap().heads);
        }
    }
    assert_eq!(b.get(&x).unwrap().value["pinned"], true);
    for id in [&x, &y] {
        let rec = relay2
            .log
            .record(id)
            .unwrap()
            .expect("the relay has the document again");
        assert_eq!(
            rec.head as usize,
            a.history(id).unwrap().len(),
            "every change, no duplicate"
        );
    }
    relay2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_reports_growing_progress_and_resumes_after_a_cut() {
    let relay = relay(None).await;
    let cfg = SyncConfig::new(&url(relay.addr)).token(&token("team", &[], &["default"], HOUR));
    let (dw, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let writer = open(dw.path(), "writer", note_schema());
    let blob = "x".repeat(10_000);
    {
        let w = writer.clone();
        blocking(move || {
            for i in 0..2000 {
                w.create("note", json!({"title": format!("{i} {blob}")}))
                    .unwrap();
            }
        })
        .await;
    }
    sync(&writer, &cfg).await;
    let total: u64 = relay
        .log
        .stats()
        .changes_accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(total, 2000);

    let reader = open(dr.path(), "reader", note_schema());
    let mut rx = reader.subscribe();
    let small = SyncConfig {
        max_pull_bytes: 64 << 10,
        ..cfg.clone()
    };
    let handle = connect(&reader, small.clone());
    // Watch progress until half-way, then cut the connection.
    let mut last = 0u64;
    let mut seen_total;
    let mut seen_bytes;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("progress events");
        if let Ok(Event::Progress {
            direction: tandem::Direction::Download,
            changes_done: done,
            changes_total: total,
            bytes_done,
            ..
        }) = e
        {
            assert!(done >= last, "progress only grows ({last} -> {done})");
            assert!(done <= total);
            last = done;
            seen_total = total;
            seen_bytes = bytes_done;
            // The feed comes in pages of 1,000 entries: wait until both announced their changes.
            if total >= 2000 && done * 2 >= total {
                break;
            }
        }
    }
    handle.stop().await;
    assert_eq!(seen_total, 2000, "the feed announced every change up front");
    assert!(
        seen_bytes >= 9_000_000,
        "about half of ~20 MB fetched, saw {seen_bytes}"
    );
    let pulled_before = relay
        .log
        .stats()
        .pulled_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let have = reader.list(Some("note"), false).unwrap().len();
    assert!(
        have > 0 && have < 2000,
        "stopped half-way ({have} documents)"
    );

    // Resume: only what is missing is fetched, and progress ends at 100%.
    let mut rx = reader.subscribe();
    sync(&reader, &small).await;
    let pulled = relay
        .log
        .stats()
        .pulled_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let log_total: u64 = relay
        .log
        .documents()
        .unwrap()
        .iter()
        .map(|(_, r)| r.log_bytes)
        .sum();
    assert!(pulled_before > 0 && pulled_before < log_total);
    // Everything once, plus at most the pages that were in flight when the connection was cut.
    assert!(
        pulled <= log_total + 4 * (64 << 10),
        "finished pages were fetched again: {pulled} bytes pulled for a log of {log_total}"
    );
    assert_eq!(reader.list(Some("note"), false).unwrap().len(), 2000);
    let mut final_progress = None;
    loop {
        let e = match rx.try_recv() {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => break,
        };
        if let Event::Progress {
            direction: tandem::Direction::Download,
            changes_done,
            changes_total,
            bytes_done,
            bytes_total,
        } = e
        {
            assert!(bytes_done <= bytes_total);
            final_progress = Some((changes_done, changes_total));
        }
    }
    let (done, total) = final_progress.expect("progress events on resume");
    assert_eq!(done, total, "progress ends at 100%");
    relay.shutdown().await.unwrap();
}

/// The set of change hashes a relay folder holds for each document (the relay must be stopped).
pub fn relay_hashes(dir: &std::path::Path) -> std::collections::BTreeMap<DocId, BTreeSet<String>> {
    let log = tandem::relay::log::RelayLog::open(dir).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for (id, _) in log.documents().unwrap() {
        let page = log.contents(&id).unwrap();
        let mut hashes = BTreeSet::new();
        let n = page.changes.len();
        for c in page.changes {
            hashes.insert(tandem::crdt::parse_change(&c).unwrap().hash().to_string());
        }
        assert_eq!(hashes.len(), n, "no duplicate in the log of {id}");
        out.insert(id, hashes);
    }
    out
}
