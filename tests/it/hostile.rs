//! Hostile input against the real relay binary: for each attack, the relay answers with a typed
//! error or a close, its memory stays under a stated bound, a healthy device keeps syncing with
//! bounded latency, and nothing stored is damaged.

use std::process::Child;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use tandem::client::{sync_once, SyncConfig};
use tandem::transport::{ClientMsg, ErrorCode, RelayMsg};
use tandem::DocId;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{note_schema, open};
use crate::wire::{changes, token, Raw, SECRET};

/// The relay's resident memory must stay under this through every attack.
const RSS_BOUND_KB: u64 = 256 * 1024;
/// A healthy device's sync pass must finish within this after every attack.
const SYNC_BOUND: Duration = Duration::from_secs(10);

struct Relay {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Relay {
    fn start(dir: &std::path::Path) -> Relay {
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        let (secret, data) = (dir.join("secret"), dir.join("relay"));
        let args: Vec<&std::ffi::OsStr> = vec![
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--handshake-timeout".as_ref(),
            "1".as_ref(),
            "--max-change-bytes".as_ref(),
            "65536".as_ref(),
            "--jwt-secret-file".as_ref(),
            secret.as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
        ];
        let (child, addr) = crate::support::spawn_relay(&args);
        Relay { child, addr }
    }

    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn code(m: Option<RelayMsg>) -> Option<ErrorCode> {
    match m {
        Some(RelayMsg::Error { code, .. }) => Some(code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_typed_errors_and_leave_the_relay_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let addr = relay.addr;
    let t = token("eve", &[], &["notes"], Duration::from_secs(3600));
    let healthy_cfg = SyncConfig::new(&format!("ws://{addr}")).token(&token(
        "ok",
        &[],
        &["default"],
        Duration::from_secs(3600),
    ));
    let ddir = tempfile::tempdir().unwrap();
    let device = open(ddir.path(), "healthy", note_schema());
    let note = device.create("note", json!({"title": "kept"})).unwrap();
    let doc = DocId::generate();
    let cs = changes(3);
    let mut attacks: Vec<&str> = Vec::new();
    let mut check = |name: &'static str| {
        attacks.push(name);
        name
    };

    // Each attack, then the health check (below, after every one).
    macro_rules! healthy {
        ($name:expr) => {{
            let name = $name;
            let rss = relay.rss_kb();
            assert!(
                rss < RSS_BOUND_KB,
                "{name}: relay RSS {rss} KiB over {RSS_BOUND_KB} KiB"
            );
            eprintln!("after {name}: relay RSS {rss} KiB");
            device.change(&note, |tx| tx.increment("views", 1)).unwrap();
            let t0 = Instant::now();
            sync_once(&device, healthy_cfg.clone(), SYNC_BOUND)
                .await
                .unwrap_or_else(|e| panic!("{name}: healthy sync failed: {e}"));
            assert!(
                t0.elapsed() < SYNC_BOUND,
                "{name}: healthy sync took {:?}",
                t0.elapsed()
            );
        }};
    }

    // 1. Wrong protocol version.
    let mut r = Raw::connect(addr, Some(&t)).await;
    r.send(&ClientMsg::Hello {
        version: 2,
        device: [0; 16],
        feeds: vec![],
    })
    .await;
    assert_eq!(code(r.recv().await), Some(ErrorCode::UnsupportedVersion));
    healthy!(check("wrong version"));
    // 2. No token; 3. forged; 4. expired (a token replayed after its expiry).
    for (name, tok) in [
        ("no token", None),
        ("forged token", Some(format!("{t}x"))),
        (
            "expired token",
            Some(token("eve", &[], &["notes"], Duration::ZERO)),
        ),
    ] {
        let mut r = Raw::connect(addr, tok.as_deref()).await;
        assert_eq!(
            code(Some(r.hello(vec![]).await)),
            Some(ErrorCode::Unauthorized),
            "{name}"
        );
        healthy!(check(name));
    }
    // 5. Garbage instead of a hello.
    let mut r = Raw::connect(addr, Some(&t)).await;
    r.send_raw(vec![0xde, 0xad, 0xbe, 0xef]).await;
    assert_eq!(code(r.recv().await), Some(ErrorCode::BadFrame));
    healthy!(check("garbage hello"));
    // 6. Slow handshake: say nothing; the relay closes after its handshake timeout.
    let mut r = Raw::connect(addr, Some(&t)).await;
    assert!(
        matches!(r.recv().await, None | Some(RelayMsg::Error { .. })),
        "closed after the handshake timeout"
    );
    healthy!(check("slow handshake"));
    // 7. A text frame; 8. a second hello; 9. a bincode length bomb.
    let mut r = Raw::open(addr, &t).await;
    r.ws.send(Message::Text("hello?".into())).await.unwrap();
    assert_eq!(code(r.recv().await), Some(ErrorCode::BadFrame));
    healthy!(check("text frame"));
    let mut r = Raw::open(addr, &t).await;
    r.send(&ClientMsg::Hello {
        version: 1,
        device: [0; 16],
        feeds: vec![],
    })
    .await;
    assert_eq!(code(r.recv().await), Some(ErrorCode::BadFrame));
    healthy!(check("second hello"));
    let mut r = Raw::open(addr, &t).await;
    r.send_raw(vec![
        4, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ])
    .await;
    assert_eq!(code(r.recv().await), Some(ErrorCode::BadFrame));
    healthy!(check("length bomb"));
    // 10. A frame over the limit.
    let mut r = Raw::open(addr, &t).await;
    r.send_raw(vec![0u8; 17 << 20]).await;
    assert!(r.recv().await.is_none());
    healthy!(check("huge frame"));
    // 11. A frame flood: the first bad frame ends the connection.
    let mut r = Raw::open(addr, &t).await;
    for _ in 0..5000 {
        r.send_raw(vec![0xff; 64]).await;
    }
    assert_eq!(code(r.recv().await), Some(ErrorCode::BadFrame));
    healthy!(check("frame flood"));
    // 12. Invalid UTF-8 where the protocol has text (a namespace).
    let mut r = Raw::open(addr, &t).await;
    let mut bad = vec![4u8, 2, 0xc3, 0x28];
    bad.extend_from_slice(&[1; 16]);
    bad.extend_from_slice(&[1, 0]);
    r.send_raw(bad).await;
    assert_eq!(code(r.recv().await), Some(ErrorCode::BadFrame));
    healthy!(check("invalid utf-8"));
    // 13. A change with a wrong checksum; 14. a compressed change (a decompression bomb);
    // 15. not a change; 16. a change over the size limit; 17. too many changes.
    let mut r = Raw::open(addr, &t).await;
    let mut forged = cs[0].clone();
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(
        code(Some(r.push("notes", doc, 1, vec![forged]).await)),
        Some(ErrorCode::BadChange)
    );
    healthy!(check("wrong checksum"));
    let mut bomb = cs[0].clone();
    bomb[8] = 2;
    assert_eq!(
        code(Some(r.push("notes", doc, 2, vec![bomb]).await)),
        Some(ErrorCode::BadChange)
    );
    healthy!(check("decompression bomb"));
    assert_eq!(
        code(Some(r.push("notes", doc, 3, vec![vec![7; 100]]).await)),
        Some(ErrorCode::BadChange)
    );
    healthy!(check("not a change"));
    assert_eq!(
        code(Some(r.push("notes", doc, 4, vec![vec![1; 70_000]]).await)),
        Some(ErrorCode::TooLarge)
    );
    healthy!(check("oversized change"));
    assert_eq!(
        code(Some(
            r.push("notes", doc, 5, vec![cs[0].clone(); 1001]).await
        )),
        Some(ErrorCode::TooLarge)
    );
    healthy!(check("too many changes"));
    // 18. Reusing an (actor, seq) the log holds with other bytes.
    assert!(matches!(
        r.push("notes", doc, 6, cs.clone()).await,
        RelayMsg::Ack { .. }
    ));
    let actor = automerge::Change::from_bytes(cs[0].clone())
        .unwrap()
        .actor_id()
        .clone();
    let mut other = automerge::AutoCommit::new().with_actor(actor);
    automerge::transaction::Transactable::put(&mut other, automerge::ROOT, "x", 1).unwrap();
    other.commit();
    let reuse = other.get_changes(&[])[0].raw_bytes().to_vec();
    assert_eq!(
        code(Some(r.push("notes", doc, 7, vec![reuse]).await)),
        Some(ErrorCode::HashMismatch)
    );
    healthy!(check("reused actor seq"));
    // 18b. A deeply nested change (500 maps inside each other): stored like any other.
    let mut nested = automerge::AutoCommit::new();
    let mut obj = automerge::ROOT;
    for _ in 0..500 {
        obj = automerge::transaction::Transactable::put_object(
            &mut nested,
            &obj,
            "n",
            automerge::ObjType::Map,
        )
        .unwrap();
    }
    nested.commit();
    let deep = nested.get_changes(&[])[0].raw_bytes().to_vec();
    assert!(matches!(
        r.push("notes", DocId::generate(), 9, vec![deep]).await,
        RelayMsg::Ack { .. }
    ));
    healthy!(check("deeply nested change"));
    // 19. Writing outside the token's namespaces.
    assert_eq!(
        code(Some(r.push("default", doc, 8, cs.clone()).await)),
        Some(ErrorCode::Forbidden)
    );
    healthy!(check("forbidden namespace"));
    // 20. Thousands of subscriptions.
    r.send(&ClientMsg::Subscribe {
        namespaces: vec![],
        docs: (0..20_000).map(|i| DocId([(i % 251) as u8; 16])).collect(),
    })
    .await;
    assert_eq!(code(r.recv().await), Some(ErrorCode::TooLarge));
    healthy!(check("thousands of subscriptions"));
    // 21. Cursors at the end of the number range.
    r.send(&ClientMsg::Pull {
        doc,
        after: u64::MAX,
        max_bytes: u64::MAX,
    })
    .await;
    assert!(matches!(r.recv().await, Some(RelayMsg::Changes { .. })));
    r.send(&ClientMsg::FeedMore {
        namespace: "notes".into(),
        after: u64::MAX,
    })
    .await;
    assert!(matches!(r.recv().await, Some(RelayMsg::Feed { .. })));
    healthy!(check("extreme cursors"));
    // 22. A ping flood is answered, nothing more.
    for i in 0..2000 {
        r.send(&ClientMsg::Ping { nonce: i }).await;
    }
    for i in 0..2000 {
        assert_eq!(r.recv().await, Some(RelayMsg::Pong { nonce: i }));
    }
    healthy!(check("ping flood"));
    // 23. A consumer that never reads while another device pushes a lot: it is closed, the
    // relay's memory does not grow with what it would have had to buffer.
    let mut sink = Raw::open(addr, &t).await;
    let mut pusher = Raw::open(addr, &t).await;
    let big_doc = DocId::generate();
    let mut big = automerge::AutoCommit::new();
    let mut sent = 0;
    for i in 0..4000u64 {
        automerge::transaction::Transactable::put(
            &mut big,
            automerge::ROOT,
            "blob",
            "x".repeat(8000) + &i.to_string(),
        )
        .unwrap();
        big.commit();
        let c = big.get_last_local_change().unwrap().raw_bytes().to_vec();
        if !matches!(
            pusher.push("notes", big_doc, i, vec![c]).await,
            RelayMsg::Ack { .. }
        ) {
            break;
        }
        sent += 1;
    }
    assert_eq!(sent, 4000);
    let rss = relay.rss_kb();
    assert!(
        rss < RSS_BOUND_KB,
        "never-reading consumer: relay RSS {rss} KiB"
    );
    let metrics = crate::relay::reqwest_metrics(addr).await;
    let closed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tandem_relay_slow_consumers_closed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // The sink, and the earlier attacker connection that also stopped reading.
    assert!(
        closed >= 1,
        "the consumer that never reads was closed:\n{metrics}"
    );
    drop(sink.ws.close(None).await);
    healthy!(check("consumer that never reads"));
    // 24. Many idle connections.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(Raw::open(addr, &t).await);
    }
    healthy!(check("300 idle connections"));
    drop(idle);

    assert!(attacks.len() >= 20, "{} hostile inputs", attacks.len());
    // Nothing stored was damaged: the healthy device's note and the accepted document are intact.
    let fresh_dir = tempfile::tempdir().unwrap();
    let check_dev = open(fresh_dir.path(), "checker", note_schema());
    sync_once(&check_dev, healthy_cfg.clone(), SYNC_BOUND)
        .await
        .unwrap();
    assert_eq!(
        check_dev.get(&note).unwrap().heads,
        device.get(&note).unwrap().heads
    );
    let mut r = Raw::open(addr, &t).await;
    r.send(&ClientMsg::Pull {
        doc,
        after: 0,
        max_bytes: 0,
    })
    .await;
    assert!(matches!(
        r.recv().await,
        Some(RelayMsg::Changes { to: 3, .. })
    ));
}
