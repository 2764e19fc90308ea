//! The relay over real loopback sockets with a raw client: push/ack/dedupe, pull pages, feed,
//! live fan-out, repair, auth, and hostile input.

use std::time::Duration;

use tandem::transport::{ClientMsg, ErrorCode, RelayMsg};
use tandem::DocId;

use crate::wire::{changes, relay, token, Raw};

const HOUR: Duration = Duration::from_secs(3600);

fn code_of(m: &RelayMsg) -> Option<ErrorCode> {
    match m {
        RelayMsg::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn push_ack_dedupe_pull_feed_and_live_fan_out() {
    let relay = relay(None).await;
    let t = token("ada", &[], &["notes"], HOUR);
    let mut a = Raw::open(relay.addr, &t).await;
    let mut b = Raw::open(relay.addr, &t).await;
    let doc = DocId::generate();
    let cs = changes(5);

    let ack = a.push("notes", doc, 1, cs[..3].to_vec()).await;
    assert_eq!(
        ack,
        RelayMsg::Ack {
            doc,
            batch: 1,
            seqs: vec![1, 2, 3]
        }
    );
    // The other connection gets them live; the pusher does not.
    match b.recv().await.unwrap() {
        RelayMsg::Changes {
            from, to, changes, ..
        } => {
            assert_eq!((from, to), (1, 3));
            assert_eq!(changes, cs[..3].to_vec());
        }
        m => panic!("expected live changes, got {m:?}"),
    }
    // Replaying is harmless: duplicates keep their seqs, new ones are appended.
    let ack = a.push("notes", doc, 2, cs.clone()).await;
    assert_eq!(
        ack,
        RelayMsg::Ack {
            doc,
            batch: 2,
            seqs: vec![1, 2, 3, 4, 5]
        }
    );
    assert!(matches!(
        b.recv().await.unwrap(),
        RelayMsg::Changes { from: 4, to: 5, .. }
    ));

    // Pull pages bounded by bytes, with remaining bytes for progress.
    let one = cs[0].len() as u64;
    b.send(&ClientMsg::Pull {
        doc,
        after: 0,
        max_bytes: one,
    })
    .await;
    match b.recv().await.unwrap() {
        RelayMsg::Changes {
            from,
            to,
            more,
            remaining_bytes,
            namespace,
            ..
        } => {
            assert_eq!((from, to, more, namespace.as_str()), (1, 1, true, "notes"));
            let rest: u64 = cs[1..].iter().map(|c| c.len() as u64).sum();
            assert_eq!(remaining_bytes, rest);
        }
        m => panic!("{m:?}"),
    }
    b.send(&ClientMsg::Pull {
        doc,
        after: 1,
        max_bytes: 0,
    })
    .await;
    assert!(matches!(
        b.recv().await.unwrap(),
        RelayMsg::Changes {
            from: 2,
            to: 5,
            more: false,
            remaining_bytes: 0,
            ..
        }
    ));

    // The feed says the document reached seq 5.
    let mut c = Raw::connect(relay.addr, Some(&t)).await;
    assert!(matches!(
        c.hello(vec![("notes", 0)]).await,
        RelayMsg::Hello { .. }
    ));
    match c.recv().await.unwrap() {
        RelayMsg::Feed {
            entries,
            more,
            next_cursor,
            ..
        } => {
            assert_eq!(entries.len(), 1);
            assert_eq!((entries[0].doc, entries[0].seq), (doc, 5));
            assert!(!more);
            // Nothing after the cursor.
            c.send(&ClientMsg::FeedMore {
                namespace: "notes".into(),
                after: next_cursor,
            })
            .await;
            assert!(
                matches!(c.recv().await.unwrap(), RelayMsg::Feed { ref entries, .. } if entries.is_empty())
            );
        }
        m => panic!("{m:?}"),
    }
    // Ping is answered.
    c.send(&ClientMsg::Ping { nonce: 9 }).await;
    assert_eq!(c.recv().await.unwrap(), RelayMsg::Pong { nonce: 9 });
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn missing_history_and_reused_actor_seq_are_refused_and_store_nothing() {
    let relay = relay(None).await;
    let t = token("ada", &[], &["notes"], HOUR);
    let mut a = Raw::open(relay.addr, &t).await;
    let doc = DocId::generate();
    let cs = changes(3);
    // Change 2 without change 1: the relay asks for the history.
    assert_eq!(
        a.push("notes", doc, 1, vec![cs[1].clone()]).await,
        RelayMsg::NeedHistory { doc, batch: 1 }
    );
    assert_eq!(
        a.push("notes", doc, 2, cs[..1].to_vec()).await,
        RelayMsg::Ack {
            doc,
            batch: 2,
            seqs: vec![1]
        }
    );
    // Another document history whose first change has the same (actor, seq) but other bytes.
    let mut other = automerge::AutoCommit::new().with_actor(
        automerge::Change::from_bytes(cs[0].clone())
            .unwrap()
            .actor_id()
            .clone(),
    );
    automerge::transaction::Transactable::put(&mut other, automerge::ROOT, "x", "different")
        .unwrap();
    other.commit();
    let forged = other.get_changes(&[])[0].raw_bytes().to_vec();
    let m = a.push("notes", doc, 3, vec![forged.clone()]).await;
    assert_eq!(code_of(&m), Some(ErrorCode::HashMismatch), "{m:?}");
    // Both in one push, to a new document: refused as well.
    let m = a
        .push("notes", DocId::generate(), 5, vec![cs[0].clone(), forged])
        .await;
    assert_eq!(code_of(&m), Some(ErrorCode::HashMismatch), "{m:?}");
    // A document's namespace is fixed by its first push.
    let t2 = token("ada", &[], &["notes", "other"], HOUR);
    let mut b = Raw::open(relay.addr, &t2).await;
    let m = b.push("other", doc, 4, cs[1..2].to_vec()).await;
    assert_eq!(code_of(&m), Some(ErrorCode::WrongNamespace));
    assert_eq!(
        relay.log.record(&doc).unwrap().unwrap().head,
        1,
        "nothing else was stored"
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_failures_are_typed_and_store_nothing() {
    let relay = relay(None).await;
    let doc = DocId::generate();
    let cs = changes(1);

    // No token.
    let mut r = Raw::connect(relay.addr, None).await;
    let m = r.hello(vec![]).await;
    assert_eq!(code_of(&m), Some(ErrorCode::Unauthorized), "{m:?}");
    assert!(r.recv().await.is_none(), "closed after the error");

    // A token signed with another secret.
    let other =
        tandem::relay::auth::Secret::from_bytes(b"another-secret-entirely-0000000").unwrap();
    let forged = tandem::relay::auth::mint(
        &other,
        "eve",
        &[],
        &["notes".into()],
        HOUR,
        std::time::SystemTime::now(),
    );
    let mut r = Raw::connect(relay.addr, Some(&forged)).await;
    assert_eq!(
        code_of(&r.hello(vec![]).await),
        Some(ErrorCode::Unauthorized)
    );

    // Expired.
    let expired = token("ada", &[], &["notes"], Duration::ZERO);
    let mut r = Raw::connect(relay.addr, Some(&expired)).await;
    let m = r.hello(vec![]).await;
    assert_eq!(code_of(&m), Some(ErrorCode::Unauthorized));
    assert!(
        matches!(m, RelayMsg::Error { ref message, .. } if message.contains("expired")),
        "{m:?}"
    );

    // Read-only token pushing; a token for another namespace.
    let ro = token("ada", &["notes"], &[], HOUR);
    let mut r = Raw::open(relay.addr, &ro).await;
    assert_eq!(
        code_of(&r.push("notes", doc, 1, cs.clone()).await),
        Some(ErrorCode::Forbidden)
    );
    let elsewhere = token("ada", &[], &["work"], HOUR);
    let mut r2 = Raw::open(relay.addr, &elsewhere).await;
    assert_eq!(
        code_of(&r2.push("notes", doc, 1, cs.clone()).await),
        Some(ErrorCode::Forbidden)
    );
    // Forbidden is not fatal: the connection still works.
    r.send(&ClientMsg::Ping { nonce: 1 }).await;
    assert_eq!(r.recv().await.unwrap(), RelayMsg::Pong { nonce: 1 });
    // Reading another namespace's document or feed is refused too.
    let w = token("ada", &[], &["notes"], HOUR);
    let mut ok = Raw::open(relay.addr, &w).await;
    assert!(matches!(
        ok.push("notes", doc, 1, cs.clone()).await,
        RelayMsg::Ack { .. }
    ));
    r2.send(&ClientMsg::Pull {
        doc,
        after: 0,
        max_bytes: 0,
    })
    .await;
    assert_eq!(
        code_of(&r2.recv().await.unwrap()),
        Some(ErrorCode::Forbidden)
    );
    r2.send(&ClientMsg::FeedMore {
        namespace: "notes".into(),
        after: 0,
    })
    .await;
    assert_eq!(
        code_of(&r2.recv().await.unwrap()),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(relay.log.record(&doc).unwrap().unwrap().head, 1);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn hostile_frames_get_errors_and_a_healthy_device_keeps_syncing() {
    let relay = relay(None).await;
    let t = token("ada", &[], &["notes"], HOUR);
    let doc = DocId::generate();
    let cs = changes(2);
    let mut healthy = Raw::open(relay.addr, &t).await;

    // Wrong protocol version.
    let mut r = Raw::connect(relay.addr, Some(&t)).await;
    r.send(&ClientMsg::Hello {
        version: 99,
        device: [0; 16],
        feeds: vec![],
    })
    .await;
    assert_eq!(
        code_of(&r.recv().await.unwrap()),
        Some(ErrorCode::UnsupportedVersion)
    );

    // Garbage instead of a hello, garbage after it, a text frame.
    let mut r = Raw::connect(relay.addr, Some(&t)).await;
    r.send_raw(vec![0xff, 0xfe, 0xfd]).await;
    assert_eq!(code_of(&r.recv().await.unwrap()), Some(ErrorCode::BadFrame));
    let mut r = Raw::open(relay.addr, &t).await;
    r.send_raw(vec![
        4, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ])
    .await; // length bomb
    assert_eq!(code_of(&r.recv().await.unwrap()), Some(ErrorCode::BadFrame));
    assert!(r.recv().await.is_none());
    let mut r = Raw::open(relay.addr, &t).await;
    futures_util::SinkExt::send(
        &mut r.ws,
        tokio_tungstenite::tungstenite::Message::Text("hi".into()),
    )
    .await
    .unwrap();
    assert_eq!(code_of(&r.recv().await.unwrap()), Some(ErrorCode::BadFrame));

    // A frame over the limit is refused by the WebSocket layer (connection closed).
    let mut r = Raw::open(relay.addr, &t).await;
    r.send_raw(vec![0u8; 17 << 20]).await;
    assert!(r.recv().await.is_none());

    // A change whose bytes were altered (its checksum no longer matches).
    let mut r = Raw::open(relay.addr, &t).await;
    let mut bad = cs[0].clone();
    let n = bad.len();
    bad[n - 2] ^= 0x55;
    assert_eq!(
        code_of(&r.push("notes", doc, 1, vec![bad]).await),
        Some(ErrorCode::BadChange)
    );
    // A compressed change (what a decompression bomb would be) is refused before inflating.
    let mut compressed = cs[0].clone();
    compressed[8] = 2;
    assert_eq!(
        code_of(&r.push("notes", doc, 2, vec![compressed]).await),
        Some(ErrorCode::BadChange)
    );
    // Not a change at all.
    assert_eq!(
        code_of(&r.push("notes", doc, 3, vec![vec![1, 2, 3]]).await),
        Some(ErrorCode::BadChange)
    );

    // The healthy device is unaffected.
    assert_eq!(
        healthy.push("notes", doc, 1, cs.clone()).await,
        RelayMsg::Ack {
            doc,
            batch: 1,
            seqs: vec![1, 2]
        }
    );
    let metrics = reqwest_metrics(relay.addr).await;
    assert!(
        metrics.contains("tandem_relay_pushes_refused_total 3"),
        "{metrics}"
    );
    relay.shutdown().await.unwrap();
}

/// GET /metrics with a bare HTTP/1.1 request (no HTTP client dependency needed).
pub async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_compacted_log_is_served_as_snapshot_then_tail() {
    let relay = crate::wire::relay_with(None, |c| c.compact_after = 1_000_000).await;
    let t = token("ada", &[], &["notes"], HOUR);
    let mut a = Raw::open(relay.addr, &t).await;
    let doc = DocId::generate();
    let cs = changes(6);
    assert!(matches!(
        a.push("notes", doc, 1, cs[..4].to_vec()).await,
        RelayMsg::Ack { .. }
    ));
    relay.log.compact(&doc).unwrap();
    assert!(matches!(
        a.push("notes", doc, 2, cs[4..].to_vec()).await,
        RelayMsg::Ack { .. }
    ));
    a.send(&ClientMsg::Pull {
        doc,
        after: 1,
        max_bytes: 0,
    })
    .await;
    let mut snapshot = Vec::new();
    loop {
        match a.recv().await.unwrap() {
            RelayMsg::Snapshot {
                upto,
                bytes,
                chunk,
                chunks,
                ..
            } => {
                assert_eq!(upto, 4);
                snapshot.extend(bytes);
                assert!(chunk < chunks);
            }
            RelayMsg::Changes { from, to, .. } => {
                assert_eq!((from, to), (5, 6));
                break;
            }
            m => panic!("{m:?}"),
        }
    }
    let doc_at_4 = automerge::Automerge::load(&snapshot).unwrap();
    assert_eq!(doc_at_4.get_changes(&[]).len(), 4);
    // Pushing an old change again is still deduplicated (the hash index outlives the log).
    assert_eq!(
        a.push("notes", doc, 3, cs[..1].to_vec()).await,
        RelayMsg::Ack {
            doc,
            batch: 3,
            seqs: vec![1]
        }
    );
    relay.shutdown().await.unwrap();
}

/// A device flooding the relay with pushes (the next frame often already waiting, so the
/// connection reads ahead) still lets the relay shut down promptly.
#[tokio::test]
async fn a_connection_pushing_back_to_back_still_stops_on_shutdown() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let relay = relay(None).await;
    let t = token("ada", &[], &["notes"], HOUR);
    let raw = Raw::open(relay.addr, &t).await;
    // New documents of 20 changes each (real appends), sent without waiting for the acks.
    let cs = changes(20);
    let frames: Vec<Vec<u8>> = (0..2_000)
        .map(|i| {
            tandem::transport::codec::encode(
                &ClientMsg::Push {
                    namespace: "notes".into(),
                    doc: DocId::generate(),
                    batch: i,
                    changes: cs.clone(),
                },
                1 << 20,
            )
            .unwrap()
        })
        .collect();
    let (mut tx, mut rx) = raw.ws.split();
    let sender = tokio::spawn(async move {
        for frame in frames {
            if tx.send(Message::Binary(frame.into())).await.is_err() {
                break;
            }
        }
    });
    // The relay is busy with them once some acks are back.
    for _ in 0..50 {
        let next = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("acks within 10 s");
        assert!(matches!(next, Some(Ok(Message::Binary(_)))), "{next:?}");
    }
    let acks = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(Ok(_)) = rx.next().await {
            n += 1;
        }
        n
    });
    tokio::time::timeout(Duration::from_secs(5), relay.shutdown())
        .await
        .expect("shut down within 5 s while frames kept coming")
        .unwrap();
    sender.abort();
    // The connection ends (its remaining acks, if any, come first).
    tokio::time::timeout(Duration::from_secs(10), acks)
        .await
        .expect("the connection closed")
        .unwrap();
}
