//! Several relay nodes sharing one PostgreSQL (and one Redis): devices on different nodes
//! converge, live edits cross nodes, and losing Redis or PostgreSQL loses nothing.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tandem::client::{connect, sync_once, SyncConfig};
use tandem::relay::RelayHandle;
use tandem::transport::{ErrorCode, RelayMsg};
use tandem::{DocId, Event, Origin, Repo};

use crate::support::{note_schema, open};
use crate::wire::{changes, relay_with, token, Raw};

const LONG: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const REDIS: &str = "redis://127.0.0.1:6379";

async fn node(pg: &str, redis: Option<&str>) -> RelayHandle {
    let (pg, redis) = (pg.to_string(), redis.map(str::to_string));
    relay_with(None, move |c| {
        c.postgres = Some(pg);
        c.redis = redis;
    })
    .await
}

fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

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

/// Wait until `repo` shows `doc`'s field `field` equal to `want`, on its event stream.
async fn wait_value(
    repo: &Repo,
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    doc: DocId,
    field: &str,
    want: serde_json::Value,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    while repo.get(&doc).map(|e| e.value[field].clone()).ok() != Some(want.clone()) {
        let e = tokio::time::timeout_at(deadline, rx.recv()).await;
        assert!(e.is_ok(), "timed out waiting for {field} = {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_postgres_converge_and_edits_cross_nodes_live() {
    let pg = crate::pg::fresh();
    let nodes = [
        node(&pg, Some(REDIS)).await,
        node(&pg, Some(REDIS)).await,
        node(&pg, Some(REDIS)).await,
    ];
    let t = token("team", &[], &["default"], HOUR);
    let cfgs: Vec<SyncConfig> = nodes
        .iter()
        .map(|n| SyncConfig::new(&url(n.addr)).token(&t))
        .collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let devices: Vec<Repo> = dirs
        .iter()
        .zip(["alice", "bob", "carol"])
        .map(|(d, n)| open(d.path(), n, note_schema()))
        .collect();
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let id = a
        .create("note", json!({"title": "Trip", "body": "pack"}))
        .unwrap();
    // Each device syncs through its own node only.
    sync_once(a, cfgs[0].clone(), LONG).await.unwrap();
    for (d, cfg) in devices.iter().zip(&cfgs) {
        sync_once(d, cfg.clone(), LONG).await.unwrap();
    }
    assert_eq!(c.get(&id).unwrap().value["title"], "Trip");
    // A conflict on a critical field, made offline on two nodes' devices.
    a.change(&id, |tx| tx.set("title", "Trip to Rome")).unwrap();
    b.change(&id, |tx| tx.set("title", "Rome trip")).unwrap();
    c.change(&id, |tx| tx.increment("views", 1)).unwrap();
    for _ in 0..2 {
        for (d, cfg) in devices.iter().zip(&cfgs) {
            sync_once(d, cfg.clone(), LONG).await.unwrap();
        }
    }
    let ea = a.get(&id).unwrap();
    let conflicts = a.conflicts(&id, false).unwrap();
    assert_eq!(conflicts.len(), 1, "the title conflict");
    for d in &devices {
        let e = d.get(&id).unwrap();
        assert_eq!((e.heads, e.value), (ea.heads.clone(), ea.value.clone()));
        assert_eq!(d.conflicts(&id, false).unwrap(), conflicts);
        assert!(
            d.outbox_docs().unwrap().is_empty(),
            "everything acknowledged"
        );
    }
    // Live: each device stays connected to its own node; edits cross nodes.
    let handles: Vec<_> = devices
        .iter()
        .zip(&cfgs)
        .map(|(d, cfg)| connect(d, cfg.clone()))
        .collect();
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
            "the resolution to cross nodes",
            |e| matches!(e, Event::ConflictResolved { doc, .. } if *doc == id),
        )
        .await;
    }
    let before = a.get(&id).unwrap().heads;
    let mut rx_a = a.subscribe();
    {
        let c = c.clone();
        blocking(move || {
            c.change(&id, |tx| tx.splice_text("body", 0, 0, "Do: "))
                .unwrap()
        })
        .await;
    }
    wait_event(&mut rx_a, "a live edit from node 3 on node 1", |e| {
        matches!(e, Event::Changed { doc, origin: Origin::Remote, heads, .. } if *doc == id && heads != &before)
    })
    .await;
    wait_value(b, &mut rx_b, id, "body", json!("Do: pack")).await;
    assert_eq!(a.get(&id).unwrap().value["body"], "Do: pack");
    for h in handles {
        h.stop().await;
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// A TCP relay to PostgreSQL that the test can cut.
struct Cut {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn cuttable_proxy(to: &str) -> Cut {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let to = to.to_string();
    tokio::spawn(async move {
        let mut rx_accept = rx.clone();
        loop {
            let (inbound, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                _ = rx_accept.wait_for(|s| *s) => return,
            };
            let to = to.clone();
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(&to).await else {
                    return;
                };
                let (mut i, mut o) = (inbound, outbound);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut i, &mut o) => {}
                    _ = rx.wait_for(|s| *s) => {}
                }
            });
        }
    });
    Cut { addr, stop }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_means_a_retryable_error_never_an_ack() {
    let pg = crate::pg::fresh();
    let proxy = cuttable_proxy("127.0.0.1:5432").await;
    let via = pg.replace("port=5432", &format!("port={}", proxy.addr.port()));
    assert_ne!(via, pg, "the test URL names port 5432");
    let relay = node(&via, None).await;
    let t = token("ada", &[], &["notes"], HOUR);
    let mut a = Raw::open(relay.addr, &t).await;
    let doc = DocId::generate();
    let cs = changes(3);
    // The node's feed poll cannot tell who pushed what it reads from PostgreSQL: it waits a
    // poll for the pusher's own fan-out to mark the change delivered, and a fan-out slower
    // than that gets the change back to its pusher. Look past that for the push's answer.
    async fn answer(a: &mut Raw, first: RelayMsg) -> RelayMsg {
        let mut m = first;
        for _ in 0..10 {
            if !matches!(m, RelayMsg::Changes { .. }) {
                break;
            }
            m = a.recv().await.expect("an answer to the push");
        }
        m
    }
    let m = a.push("notes", doc, 1, cs[..1].to_vec()).await;
    let m = answer(&mut a, m).await;
    assert!(matches!(m, RelayMsg::Ack { .. }), "{m:?}");
    proxy.stop.send(true).unwrap();
    let m = a.push("notes", doc, 2, cs[1..].to_vec()).await;
    let m = answer(&mut a, m).await;
    match &m {
        RelayMsg::Error { code, batch, .. } => {
            assert_eq!((*code, *batch), (ErrorCode::Internal, Some(2)), "{m:?}");
            assert!(!code.is_fatal());
        }
        other => panic!("expected a retryable error, got {other:?}"),
    }
    // Nothing of it was stored: a relay on the real database sees one change.
    let direct = node(&pg, None).await;
    assert_eq!(direct.log.record(&doc).unwrap().unwrap().head, 1);
    relay.shutdown().await.unwrap();
    direct.shutdown().await.unwrap();
}

/// A redis-server child, stopped when dropped: a test that fails leaves none running.
struct OwnRedis(std::process::Child);

impl OwnRedis {
    fn stop(&mut self) {
        let _ = self.0.kill();
        self.0.wait().unwrap();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A redis-server of this test's own on a free port (never the shared one), ready.
fn own_redis(port: u16) -> OwnRedis {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-server on PATH");
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines().take(200) {
        if line.unwrap().contains("Ready to accept connections") {
            return OwnRedis(child);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server did not start");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn until(rx: &mut tokio::sync::watch::Receiver<bool>, want: bool, what: &str) {
    tokio::time::timeout(LONG, rx.wait_for(|h| *h == want))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_edits_still_cross_nodes_and_redis_is_used_again_when_back() {
    let pg = crate::pg::fresh();
    let port = free_port();
    let redis_url = format!("redis://127.0.0.1:{port}");
    let mut redis = own_redis(port);
    let nodes = [
        node(&pg, Some(&redis_url)).await,
        node(&pg, Some(&redis_url)).await,
    ];
    let mut health: Vec<_> = nodes
        .iter()
        .map(|n| n.bus_health.clone().unwrap())
        .collect();
    for h in &mut health {
        until(h, true, "the nodes to subscribe to Redis").await;
    }
    let t = token("team", &[], &["default"], HOUR);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path(), "alice", note_schema());
    let b = open(dirs[1].path(), "bob", note_schema());
    let id = a.create("note", json!({"title": "v0"})).unwrap();
    let ha = connect(&a, SyncConfig::new(&url(nodes[0].addr)).token(&t));
    let hb = connect(&b, SyncConfig::new(&url(nodes[1].addr)).token(&t));
    ha.wait_synced(LONG).await.unwrap();
    let mut rx_b = b.subscribe();
    let edit = |v: &'static str| {
        let a = a.clone();
        blocking(move || a.change(&id, |tx| tx.set("title", v)).unwrap())
    };
    edit("v1").await;
    wait_value(&b, &mut rx_b, id, "title", json!("v1")).await;
    // Redis goes away: the nodes notice, and changes still cross (through the feeds).
    redis.stop();
    for h in &mut health {
        until(h, false, "the nodes to notice Redis is gone").await;
    }
    edit("v2").await;
    wait_value(&b, &mut rx_b, id, "title", json!("v2")).await;
    // Back (empty: as good as flushed): the nodes subscribe again, and changes cross.
    let mut redis = own_redis(port);
    for h in &mut health {
        until(h, true, "the nodes to subscribe again").await;
    }
    edit("v3").await;
    wait_value(&b, &mut rx_b, id, "title", json!("v3")).await;
    ha.wait_synced(LONG).await.unwrap();
    assert!(
        a.outbox_docs().unwrap().is_empty(),
        "every edit acknowledged"
    );
    // Nothing lost, nothing twice: the relay's log holds exactly the device's changes.
    let held = nodes[1].log.contents(&id).unwrap().changes.len();
    assert_eq!(held, a.all_changes(&id).unwrap().len());
    ha.stop().await;
    hb.stop().await;
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    redis.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_loses_no_acked_change_and_devices_resume_on_another() {
    let pg = crate::pg::fresh();
    let spawn = || {
        let args: Vec<std::ffi::OsString> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--insecure-no-auth".into(),
            "--postgres".into(),
            pg.clone().into(),
            "--redis".into(),
            REDIS.into(),
        ];
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        crate::support::spawn_relay(&refs)
    };
    let (mut first, addr1) = spawn();
    let (mut second, addr2) = spawn();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path(), "alice", note_schema());
    let b = open(dirs[1].path(), "bob", note_schema());
    // The writer prefers node 1 and falls back to node 2; the reader is on node 2.
    let ha = connect(
        &a,
        SyncConfig::new(&format!("{},{}", url(addr1), url(addr2))),
    );
    let hb = connect(&b, SyncConfig::new(&url(addr2)));
    let id = {
        let a = a.clone();
        blocking(move || a.create("note", json!({"title": "t", "views": 0})).unwrap()).await
    };
    ha.wait_synced(LONG).await.unwrap();
    // Pushes in flight through node 1 when it dies.
    for i in 0..40 {
        let a2 = a.clone();
        blocking(move || a2.change(&id, |tx| tx.increment("views", 1)).unwrap()).await;
        if i == 20 {
            first.kill().unwrap();
            first.wait().unwrap();
        }
    }
    ha.wait_synced(LONG).await.unwrap();
    assert!(
        a.outbox_docs().unwrap().is_empty(),
        "all acked after the failover"
    );
    let mut rx_b = b.subscribe();
    wait_value(&b, &mut rx_b, id, "views", json!(40)).await;
    // Every acked change is in the shared log exactly once.
    let check = node(&pg, None).await;
    let held = check.log.contents(&id).unwrap().changes;
    let mine = a.all_changes(&id).unwrap();
    assert_eq!(held.len(), mine.len(), "each change exactly once");
    let hashes: std::collections::BTreeSet<_> = held
        .iter()
        .map(|c| automerge::Change::from_bytes(c.clone()).unwrap().hash())
        .collect();
    assert_eq!(hashes.len(), held.len());
    ha.stop().await;
    hb.stop().await;
    check.shutdown().await.unwrap();
    second.kill().unwrap();
    second.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_relay_moves_a_sled_relay_with_its_seqs_feed_and_identity_verified() {
    use tandem::relay::log::RelayLog;
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<DocId> = (0..3).map(|_| DocId::generate()).collect();
    let (relay_id, feed, contents) = {
        let path = dir.path().to_path_buf();
        let docs = docs.clone();
        blocking(move || {
            let log = RelayLog::open(&path).unwrap();
            for (n, doc) in docs.iter().enumerate() {
                let cs = changes(4 + n);
                log.push(if n == 2 { "other" } else { "notes" }, doc, &cs)
                    .unwrap();
            }
            // One document compacted: its early changes live only in the snapshot.
            log.compact(&docs[0]).unwrap();
            log.push("notes", &docs[1], &changes(6)).unwrap();
            let feed = RelayLog::feed(&log, "notes", 0, 100).unwrap();
            let contents: Vec<usize> = docs
                .iter()
                .map(|d| RelayLog::log_hashes(&log, d).unwrap().len())
                .collect();
            (log.relay_id(), feed, contents)
        })
        .await
    };
    let pg = crate::pg::fresh();
    let out = std::process::Command::new(crate::cli::exe())
        .args(["--json", "migrate-relay", "--from-sled"])
        .arg(dir.path())
        .args(["--postgres", &pg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["documents"], 3);
    assert_eq!(report["changes"], contents.iter().sum::<usize>() as u64);
    // A node on the database is the same relay to devices: identity, feed and seqs.
    let n = node(&pg, None).await;
    let log = n.log.clone();
    let (id2, feed2, full) = blocking(move || {
        let full: Vec<usize> = docs
            .iter()
            .map(|d| log.contents(d).unwrap().changes.len())
            .collect();
        (log.relay_id(), log.feed("notes", 0, 100).unwrap(), full)
    })
    .await;
    assert_eq!(id2, relay_id);
    assert_eq!(feed2, feed);
    assert_eq!(full, contents, "every change, compacted ones too");
    // Migrating into a database that holds data is refused.
    let again = std::process::Command::new(crate::cli::exe())
        .args(["migrate-relay", "--from-sled"])
        .arg(dir.path())
        .args(["--postgres", &pg])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    n.shutdown().await.unwrap();
}

/// `n` changes by one fresh actor, each depending on the one before.
fn chain(n: usize) -> Vec<Vec<u8>> {
    changes(n)
}

#[test]
fn three_writers_on_one_document_get_gap_free_causal_seqs_and_readers_never_see_a_gap() {
    use automerge::ReadDoc;
    use tandem::relay::postgres::PgLog;
    use tandem::relay::storage::RelayStore;
    let pg = crate::pg::fresh();
    let doc = DocId::generate();
    const PUSHES: usize = 60;
    let logs: Vec<std::sync::Arc<PgLog>> = (0..3)
        .map(|_| std::sync::Arc::new(PgLog::connect(&pg).unwrap()))
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that follows the log as it grows: every page starts right after its cursor
    // and is contiguous, so a seq it has seen is never filled in below it later.
    let reader = {
        let log = logs[0].clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut cursor = 0u64;
            let mut hashes = Vec::new();
            for _ in 0..100_000 {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let page = log.pull(&doc, cursor, 1 << 20).unwrap();
                assert_eq!(page.from, cursor + 1);
                assert_eq!(page.to, cursor + page.changes.len() as u64);
                for c in &page.changes {
                    hashes.push(automerge::Change::from_bytes(c.clone()).unwrap().hash());
                }
                cursor = page.to;
                if finished && !page.more {
                    return hashes;
                }
            }
            panic!("the reader did not finish");
        })
    };
    let writers: Vec<_> = logs
        .iter()
        .map(|log| {
            let log = log.clone();
            std::thread::spawn(move || {
                let cs = chain(PUSHES);
                for c in cs.chunks(2) {
                    let p = log.append("notes", &doc, c).unwrap();
                    assert_eq!(p.seqs.len(), c.len());
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.join().unwrap();
    let page = logs[1].contents(&doc).unwrap();
    assert_eq!(page.changes.len(), 3 * PUSHES, "every change once");
    assert_eq!(
        seen.len(),
        3 * PUSHES,
        "the reader saw every change, none twice"
    );
    // Causal: the log applies in seq order, change by change.
    let mut am = automerge::Automerge::new();
    for c in &page.changes {
        let change = automerge::Change::from_bytes(c.clone()).unwrap();
        am.apply_changes([change]).unwrap();
        assert!(
            am.get_missing_deps(&[]).is_empty(),
            "a change came before its dependency"
        );
    }
    let (feed, _, _) = logs[2].feed("notes", 0, 10).unwrap();
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0].seq, 3 * PUSHES as u64);
}

#[test]
fn the_hot_cache_serves_committed_tails_and_a_flushed_or_stopped_redis_only_means_postgres() {
    use tandem::relay::postgres::PgLog;
    use tandem::relay::storage::RelayStore;
    let pg = crate::pg::fresh();
    let port = free_port();
    let mut redis = own_redis(port);
    let url = format!("redis://127.0.0.1:{port}");
    let cached = PgLog::connect(&pg).unwrap();
    cached.set_cache(&url);
    let plain = PgLog::connect(&pg).unwrap();
    let doc = DocId::generate();
    let cs = changes(10);
    for c in cs.chunks(3) {
        cached.append("notes", &doc, c).unwrap();
    }
    // The cache is written after the commit, off the ack's path: wait (bounded) for a hit.
    let mut hit = false;
    for _ in 0..2_000 {
        let before = cached.cache_hits();
        let page = cached.pull(&doc, 4, 1 << 20).unwrap();
        assert_eq!(page, plain.pull(&doc, 4, 1 << 20).unwrap(), "the same page");
        if cached.cache_hits() > before {
            hit = true;
            break;
        }
        std::thread::yield_now();
    }
    assert!(hit, "a catch-up pull was served from the cache");
    // A page bounded in bytes, from the cache, says how much remains.
    let small = cached.pull(&doc, 0, 1).unwrap();
    assert_eq!(small, plain.pull(&doc, 0, 1).unwrap());
    // Flushed: every read is right, from PostgreSQL.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(out.status.success());
    cached.append("notes", &doc, &changes(1)).unwrap();
    for after in [0, 5, 9, 10] {
        assert_eq!(
            cached.pull(&doc, after, 1 << 20).unwrap(),
            plain.pull(&doc, after, 1 << 20).unwrap()
        );
    }
    // Stopped: pushes and pulls go on.
    redis.stop();
    cached.append("notes", &doc, &changes(1)).unwrap();
    let page = cached.pull(&doc, 0, 1 << 20).unwrap();
    assert_eq!(page.changes.len(), 12);
    assert_eq!(page, plain.pull(&doc, 0, 1 << 20).unwrap());
}
