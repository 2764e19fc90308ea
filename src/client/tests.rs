//! Unit tests of [`ClientSession`], driven by a scripted fake relay: hand-written `RelayMsg`s
//! in, `ClientMsg`s out, synthetic `Instant`s, `Repo::in_memory`. No sockets, no sleeping.
//!
//! Real Automerge changes come from a second in-memory repo playing "another device".

use std::time::{Duration, Instant};

use serde_json::json;

use super::session::{feed_key, RELAY_ID_KEY};
use super::*;
use crate::ids::DocId;
use crate::repo::{Direction, DocStatus, Event, Repo};
use crate::transport::{ClientMsg, ErrorCode, FeedCursor, FeedEntry, Limits, RelayMsg};
use crate::Schema;

const NS: &str = "notes";

fn schema() -> Schema {
    Schema::from_toml(
        r#"
        version = 1
        [types.note]
        title = "lww"
        body = "text"
        "#,
    )
    .unwrap()
}

fn repo(author: &str) -> Repo {
    Repo::in_memory(schema(), author).unwrap()
}

fn limits() -> Limits {
    Limits {
        max_frame_bytes: 1 << 20,
        max_changes_per_push: 100,
        max_change_bytes: 1 << 20,
        max_docs_per_connection: 1000,
    }
}

fn hello_with(id: u8, read: &[&str], write: &[&str], limits: Limits) -> RelayMsg {
    RelayMsg::Hello {
        version: crate::transport::PROTOCOL_VERSION,
        relay_id: [id; 16],
        subject: "ada".into(),
        read: read.iter().map(|s| s.to_string()).collect(),
        write: write.iter().map(|s| s.to_string()).collect(),
        limits,
    }
}

fn hello(id: u8) -> RelayMsg {
    hello_with(id, &[NS], &[NS], limits())
}

/// A document made on another device: its id and its changes (creation first), `edits`
/// edits after the creation.
fn remote_doc(edits: usize) -> (DocId, Vec<Vec<u8>>) {
    let other = repo("bob");
    let doc = other
        .create_in(NS, "note", json!({"title": "t0", "body": ""}))
        .unwrap();
    for i in 0..edits {
        other
            .change(&doc, |tx| tx.set("title", format!("t{}", i + 1)))
            .unwrap();
    }
    (doc, other.all_changes(&doc).unwrap())
}

/// A document made on this device with `edits` edits after the creation (all in the outbox).
fn local_doc(repo: &Repo, edits: usize) -> DocId {
    let doc = repo
        .create_in(NS, "note", json!({"title": "mine", "body": ""}))
        .unwrap();
    for i in 0..edits {
        repo.change(&doc, |tx| tx.set("title", format!("mine {i}")))
            .unwrap();
    }
    doc
}

fn changes(doc: DocId, from: u64, list: &[Vec<u8>], more: bool, remaining: u64) -> RelayMsg {
    RelayMsg::Changes {
        doc,
        namespace: NS.into(),
        from,
        to: from + list.len() as u64 - 1,
        changes: list.to_vec(),
        more,
        remaining_bytes: remaining,
    }
}

fn feed(entries: &[(DocId, u64)], next_cursor: u64, more: bool) -> RelayMsg {
    RelayMsg::Feed {
        namespace: NS.into(),
        entries: entries
            .iter()
            .map(|(doc, seq)| FeedEntry {
                doc: *doc,
                seq: *seq,
            })
            .collect(),
        next_cursor,
        more,
    }
}

fn error(code: ErrorCode, doc: Option<DocId>, batch: Option<u64>) -> RelayMsg {
    RelayMsg::Error {
        code,
        message: code.hint().into(),
        doc,
        batch,
    }
}

/// A session under test with its clock.
struct Client {
    repo: Repo,
    session: ClientSession,
    t0: Instant,
    now: Instant,
}

impl Client {
    fn new(repo: &Repo) -> Client {
        Client::with_config(repo, SessionConfig::default())
    }

    fn with_config(repo: &Repo, cfg: SessionConfig) -> Client {
        let t0 = Instant::now();
        Client {
            repo: repo.clone(),
            session: ClientSession::new(t0, repo, cfg).unwrap(),
            t0,
            now: t0,
        }
    }

    /// A session that has sent its hello and got `hello` back.
    fn ready(repo: &Repo, hello: RelayMsg) -> (Client, Vec<ClientMsg>) {
        let mut c = Client::new(repo);
        assert!(matches!(c.sent()[..], [ClientMsg::Hello { .. }]));
        c.recv(hello).unwrap();
        let sent = c.sent();
        (c, sent)
    }

    fn recv(&mut self, msg: RelayMsg) -> Result<(), SyncError> {
        self.session.handle_message(self.now, msg, &self.repo)
    }

    fn sent(&mut self) -> Vec<ClientMsg> {
        std::iter::from_fn(|| self.session.poll_transmit()).collect()
    }

    fn at(&mut self, secs: u64) -> Result<(), SyncError> {
        self.now = self.t0 + Duration::from_secs(secs);
        self.session.handle_timeout(self.now, &self.repo)
    }

    fn cursor(&self, doc: &DocId) -> u64 {
        self.repo.meta(doc).unwrap().relay_seq
    }
}

fn pulls(msgs: &[ClientMsg]) -> Vec<(DocId, u64)> {
    msgs.iter()
        .filter_map(|m| match m {
            ClientMsg::Pull { doc, after, .. } => Some((*doc, *after)),
            _ => None,
        })
        .collect()
}

/// (doc, batch, changes) of every push in `msgs`.
fn pushes(msgs: &[ClientMsg]) -> Vec<(DocId, u64, Vec<Vec<u8>>)> {
    msgs.iter()
        .filter_map(|m| match m {
            ClientMsg::Push {
                doc,
                batch,
                changes,
                ..
            } => Some((*doc, *batch, changes.clone())),
            _ => None,
        })
        .collect()
}

fn ack(doc: DocId, batch: u64, first_seq: u64, n: usize) -> RelayMsg {
    RelayMsg::Ack {
        doc,
        batch,
        seqs: (first_seq..first_seq + n as u64).collect(),
    }
}

fn stored_feed_cursor(repo: &Repo, relay: u8) -> Option<u64> {
    repo.store()
        .sync_get(&feed_key(&[relay; 16], NS))
        .unwrap()
        .map(|v| u64::from_be_bytes(v.try_into().unwrap()))
}

fn stored_relay(repo: &Repo) -> Option<Vec<u8>> {
    repo.store().sync_get(RELAY_ID_KEY).unwrap()
}

/// Hold a remote document with its first `n` changes applied and the cursor at `n`.
fn hold(repo: &Repo, doc: DocId, all: &[Vec<u8>], n: usize) {
    repo.apply_remote(&doc, NS, &all[..n]).unwrap();
    repo.set_relay_seq(&doc, n as u64).unwrap();
}

#[test]
fn hello_carries_the_device_and_stored_cursors_and_unknown_namespaces_start_at_zero() {
    let repo = repo("ada");
    let (doc, all) = remote_doc(0);
    hold(&repo, doc, &all, 1);
    repo.store().sync_put(RELAY_ID_KEY, &[1; 16]).unwrap();
    repo.store()
        .sync_put(&feed_key(&[1; 16], NS), &7u64.to_be_bytes())
        .unwrap();

    let mut c = Client::new(&repo);
    assert_eq!(
        c.sent(),
        [ClientMsg::Hello {
            version: 1,
            device: repo.device().0,
            feeds: vec![FeedCursor {
                namespace: NS.into(),
                cursor: 7
            }],
        }]
    );
    assert!(!c.session.is_synced());
    c.recv(hello_with(1, &[NS, "tasks"], &[NS], limits()))
        .unwrap();
    // "notes" is answered by the relay's hello page; "tasks" has no cursor.
    assert_eq!(
        c.sent(),
        [ClientMsg::FeedMore {
            namespace: "tasks".into(),
            after: 0
        }]
    );
    assert!(c.session.is_ready());
}

#[test]
fn feed_entries_pull_only_documents_above_their_cursor_and_the_cursor_waits_for_the_pulls() {
    let repo = repo("ada");
    let (a, a_all) = remote_doc(2);
    let (b, b_all) = remote_doc(3);
    let (new, new_all) = remote_doc(1);
    hold(&repo, a, &a_all, 3);
    hold(&repo, b, &b_all, 2);

    let (mut c, sent) = Client::ready(&repo, hello(1));
    assert_eq!(
        sent,
        [ClientMsg::FeedMore {
            namespace: NS.into(),
            after: 0
        }]
    );
    c.recv(feed(&[(a, 3), (b, 4), (new, 2)], 12, false))
        .unwrap();
    let mut asked = pulls(&c.sent());
    asked.sort();
    let mut expected = vec![(b, 2), (new, 0)];
    expected.sort();
    assert_eq!(asked, expected, "a is at its feed seq already");
    assert_eq!(stored_feed_cursor(&repo, 1), None);

    c.recv(changes(new, 1, &new_all, false, 0)).unwrap();
    assert_eq!(c.cursor(&new), 2);
    assert_eq!(
        stored_feed_cursor(&repo, 1),
        None,
        "b is not pulled yet: the page's cursor must wait"
    );
    assert!(!c.session.is_synced());

    c.recv(changes(b, 3, &b_all[2..], false, 0)).unwrap();
    assert_eq!(c.cursor(&b), 4);
    assert_eq!(stored_feed_cursor(&repo, 1), Some(12));
    assert!(c.session.is_synced());
    assert_eq!(repo.get(&b).unwrap().value["title"], "t3");
}

#[test]
fn feed_pages_follow_more_and_persist_in_order() {
    let repo = repo("ada");
    let (a, a_all) = remote_doc(0);
    let (b, b_all) = remote_doc(0);
    let (mut c, _) = Client::ready(&repo, hello(1));

    c.recv(feed(&[(a, 1)], 5, true)).unwrap();
    let sent = c.sent();
    assert!(sent.contains(&ClientMsg::FeedMore {
        namespace: NS.into(),
        after: 5
    }));
    assert_eq!(pulls(&sent), [(a, 0)]);
    c.recv(feed(&[(b, 1)], 9, false)).unwrap();
    assert_eq!(pulls(&c.sent()), [(b, 0)]);

    // The second page's document arrives first: nothing may be persisted past page one.
    c.recv(changes(b, 1, &b_all, false, 0)).unwrap();
    assert_eq!(stored_feed_cursor(&repo, 1), None);
    c.recv(changes(a, 1, &a_all, false, 0)).unwrap();
    assert_eq!(stored_feed_cursor(&repo, 1), Some(9));
    assert!(c.session.is_synced());
}

#[test]
fn pull_pages_apply_in_order_and_advance_the_cursor() {
    let repo = repo("ada");
    let (doc, all) = remote_doc(4);
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[(doc, 5)], 1, false)).unwrap();
    assert_eq!(pulls(&c.sent()), [(doc, 0)]);

    c.recv(changes(doc, 1, &all[..2], true, 300)).unwrap();
    assert_eq!(c.cursor(&doc), 2);
    assert_eq!(pulls(&c.sent()), [(doc, 2)]);
    assert!(!c.session.is_synced());

    c.recv(changes(doc, 3, &all[2..], false, 0)).unwrap();
    assert_eq!(c.cursor(&doc), 5);
    assert!(c.sent().is_empty());
    assert_eq!(repo.get(&doc).unwrap().value["title"], "t4");
    assert_eq!(repo.get(&doc).unwrap().namespace, NS);
    assert!(c.session.is_synced());
    let stats = c.session.stats();
    assert_eq!((stats.docs_pulled, stats.changes_pulled), (1, 5));
}

#[test]
fn a_gap_pulls_and_a_contiguous_live_change_applies_directly() {
    let repo = repo("ada");
    let (doc, all) = remote_doc(4);
    hold(&repo, doc, &all, 2);
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    assert!(c.session.is_synced());

    // Seq 3 is contiguous: applied without a pull.
    c.recv(changes(doc, 3, &all[2..3], false, 0)).unwrap();
    assert_eq!(c.cursor(&doc), 3);
    assert!(c.sent().is_empty());

    // Seq 5 skips 4: a gap; the cursor stays, a pull asks from it.
    c.recv(changes(doc, 5, &all[4..5], false, 0)).unwrap();
    assert_eq!(c.cursor(&doc), 3);
    assert_eq!(pulls(&c.sent()), [(doc, 3)]);
    assert!(!c.session.is_synced());

    // A replayed page (seqs already applied) is harmless.
    c.recv(changes(doc, 1, &all[..3], false, 0)).unwrap();
    assert_eq!(c.cursor(&doc), 3);

    c.recv(changes(doc, 4, &all[3..], false, 0)).unwrap();
    assert_eq!(c.cursor(&doc), 5);
    assert!(c.session.is_synced());
}

#[test]
fn pushes_respect_the_limits_and_the_outbox_shrinks_only_on_ack() {
    let repo = repo("ada");
    let doc = local_doc(&repo, 4); // 5 changes in the outbox
    let small = Limits {
        max_changes_per_push: 2,
        ..limits()
    };
    let (mut c, sent) = Client::ready(&repo, hello_with(1, &[NS], &[NS], small.clone()));
    let first = pushes(&sent);
    assert_eq!(first.len(), 1, "one batch per document in flight");
    let (_, batch, list) = &first[0];
    assert_eq!(list.len(), 2);
    assert_eq!(repo.outbox(&doc).unwrap().len(), 5);
    c.recv(feed(&[], 0, false)).unwrap();
    assert!(!c.session.is_synced());

    c.recv(ack(doc, *batch, 1, 2)).unwrap();
    assert_eq!(repo.outbox(&doc).unwrap().len(), 3);
    let second = pushes(&c.sent());
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].2.len(), 2);

    // The connection drops before the second ack: the next one pushes the rest again.
    drop(c);
    assert_eq!(repo.outbox(&doc).unwrap().len(), 3);
    let (mut c, sent) = Client::ready(&repo, hello_with(1, &[NS], &[NS], small));
    let again = pushes(&sent);
    assert_eq!(again[0].2, second[0].2);
    c.recv(feed(&[], 0, false)).unwrap();
    c.recv(ack(doc, again[0].1, 3, 2)).unwrap();
    let last = pushes(&c.sent());
    assert_eq!(last[0].2.len(), 1);
    c.recv(ack(doc, last[0].1, 5, 1)).unwrap();
    assert!(repo.outbox(&doc).unwrap().is_empty());
    assert!(c.session.is_synced());
    // Our own acked seqs count as applied: the cursor stepped over them.
    assert_eq!(c.cursor(&doc), 5);
}

#[test]
fn push_batches_fit_the_frame_limit() {
    let repo = repo("ada");
    let doc = repo
        .create_in(NS, "note", json!({"title": "x", "body": ""}))
        .unwrap();
    for i in 0..6 {
        let text = format!("{i}{}", "y".repeat(300));
        repo.change(&doc, |tx| tx.set("title", text.clone()))
            .unwrap();
    }
    let tiny = Limits {
        max_frame_bytes: 1024,
        ..limits()
    };
    let (mut c, sent) = Client::ready(&repo, hello_with(1, &[NS], &[NS], tiny));
    c.recv(feed(&[], 0, false)).unwrap();
    let mut msgs = sent;
    let mut seq = 1;
    let mut batches = 0;
    while let Some((_, batch, list)) = pushes(&msgs).pop() {
        let frame = crate::transport::encode(
            &ClientMsg::Push {
                namespace: NS.into(),
                doc,
                batch,
                changes: list.clone(),
            },
            usize::MAX,
        )
        .unwrap();
        assert!(frame.len() <= 1024, "a push frame of {} bytes", frame.len());
        c.recv(ack(doc, batch, seq, list.len())).unwrap();
        seq += list.len() as u64;
        batches += 1;
        msgs = c.sent();
    }
    assert!(
        batches >= 3,
        "7 changes of ~300 bytes need several 1 KiB frames"
    );
    assert!(repo.outbox(&doc).unwrap().is_empty());
    assert!(c.session.is_synced());
}

#[test]
fn need_history_pushes_the_whole_history_in_order_then_acks_the_outbox() {
    let repo = repo("ada");
    let (doc, theirs) = remote_doc(2);
    hold(&repo, doc, &theirs, 3);
    repo.change(&doc, |tx| tx.set("title", "mine")).unwrap();
    let small = Limits {
        max_changes_per_push: 3,
        ..limits()
    };
    let (mut c, sent) = Client::ready(&repo, hello_with(1, &[NS], &[NS], small));
    c.recv(feed(&[], 0, false)).unwrap();
    let refused = pushes(&sent);
    assert_eq!(refused[0].2.len(), 1);
    c.recv(RelayMsg::NeedHistory {
        doc,
        batch: refused[0].1,
    })
    .unwrap();

    let history = repo.all_changes(&doc).unwrap();
    assert_eq!(history.len(), 4);
    let first = pushes(&c.sent());
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].2, history[..3]);
    c.recv(ack(doc, first[0].1, 1, 3)).unwrap();
    assert_eq!(
        repo.outbox(&doc).unwrap().len(),
        1,
        "the local change is in the second history batch, not acked yet"
    );
    let second = pushes(&c.sent());
    assert_eq!(second[0].2, history[3..]);
    c.recv(ack(doc, second[0].1, 4, 1)).unwrap();
    assert!(repo.outbox(&doc).unwrap().is_empty());
    assert!(c.sent().is_empty());
    assert!(c.session.is_synced());
}

#[test]
fn a_new_relay_identity_resets_cursors_and_repushes_everything_before_remembering_it() {
    let repo = repo("ada");
    let (theirs, their_changes) = remote_doc(3);
    hold(&repo, theirs, &their_changes, 4);
    let mine = local_doc(&repo, 1);
    repo.store().sync_put(RELAY_ID_KEY, &[1; 16]).unwrap();
    repo.store()
        .sync_put(&feed_key(&[1; 16], NS), &10u64.to_be_bytes())
        .unwrap();

    let mut c = Client::new(&repo);
    let hello_sent = c.sent();
    assert!(matches!(&hello_sent[0], ClientMsg::Hello { feeds, .. } if feeds[0].cursor == 10));
    c.recv(hello(2)).unwrap();
    assert_eq!(c.cursor(&theirs), 0, "cursors belong to the old identity");
    let sent = c.sent();
    assert!(sent.contains(&ClientMsg::FeedMore {
        namespace: NS.into(),
        after: 0
    }));
    let mut batches = pushes(&sent);
    batches.sort_by_key(|(doc, ..)| *doc);
    assert_eq!(batches.len(), 2);
    for (doc, _, list) in &batches {
        assert_eq!(list, &repo.all_changes(doc).unwrap(), "the whole history");
    }

    // The relay's answer to our hello cursor (10) is a page of the old identity: dropped.
    c.recv(feed(&[(theirs, 99)], 11, false)).unwrap();
    assert!(pulls(&c.sent()).is_empty());
    // The page from 0 is the real one.
    c.recv(feed(&[(theirs, 4)], 3, false)).unwrap();
    assert_eq!(pulls(&c.sent()), [(theirs, 0)]);

    let (d0, b0, l0) = &batches[0];
    c.recv(ack(*d0, *b0, 1, l0.len())).unwrap();
    assert_eq!(
        stored_relay(&repo),
        Some(vec![1; 16]),
        "not every history is acked"
    );
    let (d1, b1, l1) = &batches[1];
    c.recv(ack(*d1, *b1, 1, l1.len())).unwrap();
    assert_eq!(stored_relay(&repo), Some(vec![2; 16]));
    assert!(repo.outbox(&mine).unwrap().is_empty());

    c.recv(changes(theirs, 1, &their_changes, false, 0))
        .unwrap();
    assert_eq!(c.cursor(&theirs), 4);
    assert_eq!(stored_feed_cursor(&repo, 2), Some(3));
    assert_eq!(
        stored_feed_cursor(&repo, 1),
        Some(10),
        "the old identity's cursor is untouched"
    );
    assert!(c.session.is_synced());
}

#[test]
fn a_crash_during_the_repush_repeats_it() {
    let repo = repo("ada");
    let mine = local_doc(&repo, 0);
    repo.store().sync_put(RELAY_ID_KEY, &[1; 16]).unwrap();
    let (c, sent) = Client::ready(&repo, hello(2));
    assert_eq!(pushes(&sent).len(), 1);
    drop(c); // no ack
    assert_eq!(stored_relay(&repo), Some(vec![1; 16]));
    let (_, sent) = Client::ready(&repo, hello(2));
    let again = pushes(&sent);
    assert_eq!(again[0].2, repo.all_changes(&mine).unwrap());
}

#[test]
fn download_progress_only_grows_and_ends_at_the_total() {
    let repo = repo("ada");
    let (doc, all) = remote_doc(5);
    let mut events = repo.subscribe();
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[(doc, 6)], 1, false)).unwrap();
    c.sent();
    let size = |r: &[Vec<u8>]| r.iter().map(|c| c.len() as u64).sum::<u64>();
    c.recv(changes(doc, 1, &all[..2], true, size(&all[2..])))
        .unwrap();
    assert!(matches!(
        repo.status(&doc).unwrap(),
        DocStatus::Syncing { done, total } if done < total
    ));
    c.recv(changes(doc, 3, &all[2..4], true, size(&all[4..]) + 50))
        .unwrap();
    c.recv(changes(doc, 5, &all[4..], false, 0)).unwrap();
    assert_eq!(repo.status(&doc).unwrap(), DocStatus::Synced);

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Progress {
            direction: Direction::Download,
            bytes_done: done,
            bytes_total: total,
            ..
        } = e
        {
            seen.push((done, total));
        }
    }
    assert!(seen.len() >= 3, "{seen:?}");
    for w in seen.windows(2) {
        assert!(
            w[1].0 >= w[0].0 && w[1].1 >= w[0].1,
            "progress went back: {seen:?}"
        );
    }
    let (done, total) = *seen.last().unwrap();
    assert_eq!(done, total, "{seen:?}");
    assert!(total >= size(&all));
}

#[test]
fn pings_when_idle_answers_pings_and_declares_a_silent_relay_dead() {
    let repo = repo("ada");
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    let t0 = c.t0;
    assert_eq!(c.session.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    c.at(14).unwrap();
    assert!(c.sent().is_empty());
    c.at(15).unwrap();
    assert!(matches!(c.sent()[..], [ClientMsg::Ping { .. }]));
    assert_eq!(c.session.poll_timeout(), Some(t0 + Duration::from_secs(45)));

    // Any frame is proof of life, and a relay ping gets its pong.
    c.now = t0 + Duration::from_secs(20);
    c.recv(RelayMsg::Ping { nonce: 77 }).unwrap();
    assert_eq!(c.sent(), [ClientMsg::Pong { nonce: 77 }]);
    assert_eq!(c.session.poll_timeout(), Some(t0 + Duration::from_secs(35)));

    c.at(35).unwrap();
    assert!(matches!(c.sent()[..], [ClientMsg::Ping { .. }]));
    c.at(64).unwrap();
    assert!(matches!(c.at(65), Err(SyncError::Unreachable(_))));
    assert_eq!(c.session.poll_timeout(), None, "the session has ended");
}

#[test]
fn no_hello_within_dead_after_is_unreachable() {
    let repo = repo("ada");
    let mut c = Client::new(&repo);
    c.sent();
    assert_eq!(
        c.session.poll_timeout(),
        Some(c.t0 + Duration::from_secs(30))
    );
    c.at(29).unwrap();
    assert!(matches!(c.at(30), Err(SyncError::Unreachable(_))));
}

#[test]
fn fatal_errors_end_the_session_with_a_typed_error() {
    let repo = repo("ada");
    let fatal = |msg: RelayMsg| {
        let mut c = Client::new(&repo);
        c.sent();
        let err = c.recv(msg).unwrap_err();
        assert_eq!(c.session.poll_timeout(), None);
        err
    };
    assert!(matches!(
        fatal(error(ErrorCode::Unauthorized, None, None)),
        SyncError::Refused {
            code: ErrorCode::Unauthorized,
            ..
        }
    ));
    assert!(matches!(
        fatal(error(ErrorCode::UnsupportedVersion, None, None)),
        SyncError::Refused {
            code: ErrorCode::UnsupportedVersion,
            ..
        }
    ));
    assert!(matches!(
        fatal(error(ErrorCode::BadFrame, None, None)),
        SyncError::Protocol(_)
    ));
    assert!(matches!(
        fatal(error(ErrorCode::Overloaded, None, None)),
        SyncError::Unreachable(_)
    ));
    assert!(matches!(
        fatal(hello_with(1, &[], &[], limits())),
        SyncError::Refused {
            code: ErrorCode::Forbidden,
            ..
        }
    ));
    let (doc, _) = remote_doc(0);
    assert!(matches!(
        fatal(feed(&[(doc, 1)], 1, false)),
        SyncError::Protocol(_)
    ));
    let refused = fatal(error(ErrorCode::Unauthorized, None, None));
    assert_eq!(refused.exit_code(), 5);
    assert!(!refused.is_retryable());
}

#[test]
fn a_refused_push_parks_the_document_and_is_not_retried() {
    let repo = repo("ada");
    let doc = local_doc(&repo, 0);
    let (mut c, sent) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    let batch = pushes(&sent)[0].1;
    c.recv(error(ErrorCode::Forbidden, Some(doc), Some(batch)))
        .unwrap();
    assert!(c.sent().is_empty());
    let issue = c.session.poll_issue().unwrap();
    assert_eq!(
        (issue.doc, issue.code, issue.direction),
        (Some(doc), Some(ErrorCode::Forbidden), Direction::Upload)
    );

    // More local edits do not bring it back in this connection.
    repo.change(&doc, |tx| tx.set("title", "again")).unwrap();
    c.session.local_changed(c.now, doc, &repo).unwrap();
    assert!(c.sent().is_empty());
    assert_eq!(repo.outbox(&doc).unwrap().len(), 2);
    assert!(
        c.session.is_synced(),
        "parked documents do not hold up the rest"
    );
    assert!(matches!(
        c.session.refusal(),
        Some(SyncError::Refused {
            code: ErrorCode::Forbidden,
            ..
        })
    ));
}

#[test]
fn a_read_only_token_never_pushes_and_reports_the_pending_changes() {
    let repo = repo("ada");
    local_doc(&repo, 2);
    let (mut c, sent) = Client::ready(&repo, hello_with(1, &[NS], &[], limits()));
    assert!(pushes(&sent).is_empty());
    c.recv(feed(&[], 0, false)).unwrap();
    assert!(c.session.is_synced());
    let refusal = c.session.refusal().expect("local changes were refused");
    assert_eq!(refusal.exit_code(), 5);
}

#[test]
fn too_large_halves_the_batch_and_rate_limits_retry_after_a_delay() {
    let repo = repo("ada");
    let doc = local_doc(&repo, 3);
    let (mut c, sent) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    let (_, batch, list) = pushes(&sent).remove(0);
    assert_eq!(list.len(), 4);
    c.recv(error(ErrorCode::TooLarge, Some(doc), Some(batch)))
        .unwrap();
    let (_, batch, list) = pushes(&c.sent()).remove(0);
    assert_eq!(list.len(), 2);

    c.recv(error(ErrorCode::RateLimited, Some(doc), Some(batch)))
        .unwrap();
    assert!(c.sent().is_empty(), "no retry in a hot loop");
    assert!(!c.session.is_synced());
    let retry_at = c.session.poll_timeout().unwrap();
    assert_eq!(retry_at, c.now + SessionConfig::default().retry_after);
    c.now = retry_at;
    c.session.handle_timeout(retry_at, &repo).unwrap();
    let (_, batch, list) = pushes(&c.sent()).remove(0);
    assert_eq!(list.len(), 2);
    c.recv(ack(doc, batch, 1, 2)).unwrap();
    assert_eq!(repo.outbox(&doc).unwrap().len(), 2);
}

#[test]
fn snapshot_chunks_are_reassembled_then_the_tail_applies() {
    let other = repo("bob");
    let doc = other
        .create_in(NS, "note", json!({"title": "a", "body": "hello"}))
        .unwrap();
    other.change(&doc, |tx| tx.set("title", "b")).unwrap();
    other.change(&doc, |tx| tx.set("title", "c")).unwrap();
    let saved = other.export(&doc).unwrap();
    other.change(&doc, |tx| tx.set("title", "d")).unwrap();
    let tail = other.all_changes(&doc).unwrap()[3..].to_vec();

    let repo = repo("ada");
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[(doc, 4)], 1, false)).unwrap();
    assert_eq!(pulls(&c.sent()), [(doc, 0)]);
    let parts: Vec<Vec<u8>> = saved
        .chunks(saved.len() / 3 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    let chunks = parts.len() as u32;
    for (i, bytes) in parts.into_iter().enumerate() {
        c.recv(RelayMsg::Snapshot {
            doc,
            namespace: NS.into(),
            upto: 3,
            chunk: i as u32,
            chunks,
            bytes,
        })
        .unwrap();
    }
    assert_eq!(c.cursor(&doc), 3);
    c.recv(changes(doc, 4, &tail, false, 0)).unwrap();
    assert_eq!(c.cursor(&doc), 4);
    assert_eq!(repo.get(&doc).unwrap().value["title"], "d");
    assert_eq!(repo.get(&doc).unwrap().value["body"], "hello");
    assert!(c.session.is_synced());
}

#[test]
fn an_oversized_snapshot_is_refused_before_it_is_buffered() {
    let repo = repo("ada");
    let (doc, _) = remote_doc(0);
    let cfg = SessionConfig {
        max_snapshot_bytes: 100,
        ..SessionConfig::default()
    };
    let mut c = Client::with_config(&repo, cfg);
    c.sent();
    c.recv(hello(1)).unwrap();
    c.recv(feed(&[(doc, 4)], 1, false)).unwrap();
    c.sent();
    for chunk in 0..2 {
        c.recv(RelayMsg::Snapshot {
            doc,
            namespace: NS.into(),
            upto: 3,
            chunk,
            chunks: 2,
            bytes: vec![0; 60],
        })
        .unwrap();
    }
    assert_eq!(c.session.parked().count(), 1);
    assert!(c.session.is_synced());
    assert_eq!(
        stored_feed_cursor(&repo, 1),
        None,
        "a page with a parked document is looked at again next time"
    );
}

#[test]
fn garbage_from_the_relay_never_panics() {
    let repo = repo("ada");
    let (doc, all) = remote_doc(1);
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[(doc, 2)], 1, false)).unwrap();
    c.sent();

    // Bytes that are not a change: the document is parked, the session goes on.
    c.recv(changes(doc, 1, &[vec![1, 2, 3]], false, 0)).unwrap();
    assert_eq!(c.session.parked().count(), 1);
    assert!(c.session.is_synced());

    // Shapes that cannot be right end the session.
    let bad = [
        RelayMsg::Changes {
            doc,
            namespace: NS.into(),
            from: 1,
            to: 5,
            changes: all.clone(),
            more: false,
            remaining_bytes: 0,
        },
        RelayMsg::Changes {
            doc,
            namespace: NS.into(),
            from: 0,
            to: u64::MAX,
            changes: vec![],
            more: false,
            remaining_bytes: 0,
        },
        RelayMsg::Snapshot {
            doc,
            namespace: NS.into(),
            upto: 1,
            chunk: 3,
            chunks: 2,
            bytes: vec![],
        },
        hello(1),
    ];
    for msg in bad {
        let (mut c, _) = Client::ready(&repo, hello(1));
        assert!(matches!(c.recv(msg), Err(SyncError::Protocol(_))));
    }

    // An ack that does not match its batch.
    let mine = local_doc(&repo, 0);
    let (mut c, sent) = Client::ready(&repo, hello(1));
    let (_, batch, _) = pushes(&sent)
        .into_iter()
        .find(|(d, ..)| *d == mine)
        .unwrap();
    assert!(matches!(
        c.recv(ack(mine, batch, 1, 3)),
        Err(SyncError::Protocol(_))
    ));
    // Seqs at the very top of the range do not overflow.
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(RelayMsg::Changes {
        doc: mine,
        namespace: NS.into(),
        from: u64::MAX,
        to: u64::MAX,
        changes: all[..1].to_vec(),
        more: true,
        remaining_bytes: u64::MAX,
    })
    .unwrap();
}

#[test]
fn own_acked_changes_step_the_cursor_so_live_changes_apply_without_a_pull() {
    let repo = repo("ada");
    let (doc, theirs) = remote_doc(0);
    hold(&repo, doc, &theirs, 1);
    repo.change(&doc, |tx| tx.set("title", "mine")).unwrap();
    let (mut c, sent) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    let (_, batch, _) = pushes(&sent).remove(0);
    c.recv(ack(doc, batch, 2, 1)).unwrap();
    assert_eq!(c.cursor(&doc), 2);

    // Another device's change lands at seq 3, on top of ours.
    let bob = repo_with(&theirs, doc);
    let mine = repo.all_changes(&doc).unwrap()[1].clone();
    bob.apply_remote(&doc, NS, &[mine]).unwrap();
    bob.change(&doc, |tx| tx.set("title", "bob's")).unwrap();
    let next = bob.all_changes(&doc).unwrap()[2].clone();
    c.recv(changes(doc, 3, &[next], false, 0)).unwrap();
    assert!(c.sent().is_empty(), "no pull for our own seq 2");
    assert_eq!(c.cursor(&doc), 3);
    assert_eq!(repo.get(&doc).unwrap().value["title"], "bob's");
}

/// Another device holding `changes` of `doc`.
fn repo_with(changes: &[Vec<u8>], doc: DocId) -> Repo {
    let r = repo("bob");
    r.apply_remote(&doc, NS, changes).unwrap();
    r
}

#[test]
fn a_refused_pull_parks_the_document_and_a_rate_limited_one_retries() {
    let repo = repo("ada");
    let (a, _) = remote_doc(0);
    let (b, b_all) = remote_doc(0);
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[(a, 1), (b, 1)], 4, false)).unwrap();
    c.sent();
    c.recv(error(ErrorCode::Forbidden, Some(a), None)).unwrap();
    c.recv(error(ErrorCode::RateLimited, Some(b), None))
        .unwrap();
    assert!(c.sent().is_empty());
    let at = c.session.poll_timeout().unwrap();
    c.now = at;
    c.session.handle_timeout(at, &repo).unwrap();
    assert_eq!(pulls(&c.sent()), [(b, 0)]);
    c.recv(changes(b, 1, &b_all, false, 0)).unwrap();
    assert!(c.session.is_synced());
    assert_eq!(stored_feed_cursor(&repo, 1), None, "a was not pulled");
}

#[test]
fn local_changes_queue_a_push() {
    let repo = repo("ada");
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    assert!(c.session.is_synced());
    let doc = local_doc(&repo, 0);
    c.session.local_changed(c.now, doc, &repo).unwrap();
    assert!(!c.session.is_synced());
    let (_, batch, list) = pushes(&c.sent()).remove(0);
    c.recv(ack(doc, batch, 1, list.len())).unwrap();
    assert!(c.session.is_synced());
    assert_eq!(c.session.stats().docs_pushed, 1);
}

#[test]
fn relay_urls_get_the_protocol_path_only_when_they_have_none() {
    assert_eq!(relay_url("ws://h:7070"), "ws://h:7070/v1");
    assert_eq!(relay_url(" ws://h:7070/ "), "ws://h:7070/v1");
    assert_eq!(relay_url("ws://h:7070?token=x"), "ws://h:7070/v1?token=x");
    assert_eq!(relay_url("wss://h/custom/v1"), "wss://h/custom/v1");
    assert_eq!(
        SyncConfig::new("ws://a:1, ws://b:2,").relays,
        ["ws://a:1", "ws://b:2"]
    );
    let cfg = SyncConfig::new("ws://a:1").token("secret");
    assert!(!format!("{cfg:?}").contains("secret"));
}

fn presence_named(name: &str) -> crate::transport::Presence {
    crate::transport::Presence {
        name: name.into(),
        color: 0x112233,
        selection: None,
    }
}

fn presence_sent(sent: &[ClientMsg]) -> Vec<Option<String>> {
    sent.iter()
        .filter_map(|m| match m {
            ClientMsg::Presence { state, .. } => Some(state.as_ref().map(|p| p.name.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn presence_is_coalesced_repeated_and_expires_after_its_ttl() {
    let repo = repo("ada");
    let doc = local_doc(&repo, 0);
    let (mut c, _) = Client::ready(&repo, hello(1));
    c.recv(feed(&[], 0, false)).unwrap();
    c.sent();
    // Three caret moves at once: the first goes out, the latest follows after the interval.
    for name in ["a1", "a2", "a3"] {
        repo.set_presence(&doc, Some(presence_named(name)));
        c.session.presence_changed(c.now, &repo).unwrap();
    }
    assert_eq!(presence_sent(&c.sent()), [Some("a1".to_string())]);
    let next = c.now + Duration::from_millis(50);
    assert!(c.session.poll_timeout() <= Some(next));
    c.now = next;
    c.session.handle_timeout(c.now, &repo).unwrap();
    assert_eq!(presence_sent(&c.sent()), [Some("a3".to_string())]);

    // A peer is listed until nothing of it was heard for the TTL (30 s).
    c.now = c.t0 + Duration::from_secs(1);
    c.recv(RelayMsg::Presence {
        doc,
        peer: 9,
        state: Some(presence_named("bob")),
    })
    .unwrap();
    assert_eq!(repo.presence(&doc)[0].presence.name, "bob");
    // Our own is repeated every third of the TTL, so that it does not expire elsewhere.
    c.at(10).unwrap();
    assert_eq!(presence_sent(&c.sent()), [Some("a3".to_string())]);
    c.at(30).unwrap();
    assert_eq!(repo.presence(&doc).len(), 1, "heard 29 s ago");
    assert!(c.session.poll_timeout() <= Some(c.t0 + Duration::from_secs(31)));
    c.at(31).unwrap();
    assert!(repo.presence(&doc).is_empty(), "expired");
    assert_eq!(
        presence_sent(&c.sent()),
        [Some("a3".to_string())],
        "repeated at 20 s"
    );

    // Leaving is sent too, and ends the repeats.
    repo.set_presence(&doc, None);
    c.session.presence_changed(c.now, &repo).unwrap();
    assert_eq!(presence_sent(&c.sent()), [None]);
    c.at(45).unwrap();
    assert!(presence_sent(&c.sent()).is_empty(), "no repeat at 40 s");

    // A presence the relay would refuse is not sent; the document keeps syncing.
    repo.set_presence(&doc, Some(presence_named(&"x".repeat(100))));
    c.session.presence_changed(c.now, &repo).unwrap();
    assert!(presence_sent(&c.sent()).is_empty());
    let issue = c.session.poll_issue().unwrap();
    assert!(issue.message.contains("presence not sent"), "{issue:?}");
    assert_eq!(c.session.parked().count(), 0);
}
