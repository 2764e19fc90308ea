//! What an editor embedding tandem relies on: patches on every change event (local and
//! remote), stable text cursors across concurrent edits, rich-text marks that merge, and
//! presence through a real relay.

use serde_json::json;
use tandem::{Event, MarkSpan, Origin, Patch, PatchAction, PathElem, Repo, Style};

use crate::support::{exchange, note_schema};

fn repo(author: &str) -> Repo {
    Repo::in_memory(note_schema(), author).unwrap()
}

/// The patches of the next `Changed` event waiting in `rx`.
fn next_patches(rx: &mut tokio::sync::broadcast::Receiver<Event>, origin: Origin) -> Vec<Patch> {
    loop {
        match rx.try_recv().expect("a Changed event is waiting") {
            Event::Changed {
                origin: o, patches, ..
            } if o == origin => return patches.to_vec(),
            _ => continue,
        }
    }
}

/// One edit made inside a change.
type Edit = dyn Fn(&mut tandem::Tx) -> Result<(), tandem::crdt::EntityError>;

fn key(k: &str) -> PathElem {
    PathElem::Key(k.into())
}

#[test]
fn every_kind_of_edit_has_its_patch_locally_and_remotely() {
    let a = repo("ada");
    let b = repo("bob");
    let mut ea = a.subscribe();
    let id = a
        .create("note", json!({"title": "Plan", "body": "hello"}))
        .unwrap();
    let created = next_patches(&mut ea, Origin::Local);
    assert!(created.contains(&Patch {
        path: vec![],
        action: PatchAction::Put {
            prop: key("title"),
            value: json!("Plan"),
            conflict: false
        }
    }));
    assert!(
        created
            .iter()
            .all(|p| !matches!(&p.action, PatchAction::Put { prop: PathElem::Key(k), .. } if k.starts_with('_'))),
        "bookkeeping keys stay out of patches: {created:?}"
    );
    exchange(&a, &b, &id);
    let mut eb = b.subscribe();

    // Each kind of edit, one change each, on device a.
    let edits: Vec<(&str, Box<Edit>, Patch)> = vec![
        (
            "put",
            Box::new(|tx| tx.set("pinned", true)),
            Patch {
                path: vec![],
                action: PatchAction::Put {
                    prop: key("pinned"),
                    value: json!(true),
                    conflict: false,
                },
            },
        ),
        (
            "splice text",
            Box::new(|tx| tx.splice_text("body", 5, 0, " world")),
            Patch {
                path: vec![key("body")],
                action: PatchAction::SpliceText {
                    index: 5,
                    text: " world".into(),
                },
            },
        ),
        (
            "delete text",
            Box::new(|tx| tx.splice_text("body", 0, 1, "")),
            Patch {
                path: vec![key("body")],
                action: PatchAction::Delete {
                    prop: PathElem::Index(0),
                    length: 1,
                },
            },
        ),
        (
            "increment",
            Box::new(|tx| tx.increment("views", 3)),
            Patch {
                path: vec![],
                action: PatchAction::Increment {
                    prop: key("views"),
                    by: 3,
                },
            },
        ),
        (
            "put in a merge map",
            Box::new(|tx| tx.merge_put("labels", "home", true)),
            Patch {
                path: vec![key("labels")],
                action: PatchAction::Put {
                    prop: key("home"),
                    value: json!(true),
                    conflict: false,
                },
            },
        ),
        (
            "delete in a merge map",
            Box::new(|tx| tx.merge_put("labels", "home", serde_json::Value::Null)),
            Patch {
                path: vec![key("labels")],
                action: PatchAction::Delete {
                    prop: key("home"),
                    length: 1,
                },
            },
        ),
        (
            "mark",
            Box::new(|tx| tx.mark("body", 0, 4, &Style::Bold)),
            Patch {
                path: vec![key("body")],
                action: PatchAction::Mark {
                    marks: vec![MarkSpan {
                        start: 0,
                        end: 4,
                        name: "bold".into(),
                        value: json!(true),
                    }],
                },
            },
        ),
    ];
    for (what, edit, want) in &edits {
        a.change(&id, |tx| edit(tx)).unwrap();
        let local = next_patches(&mut ea, Origin::Local);
        assert_eq!(local, vec![want.clone()], "local patch of a {what}");
        exchange(&a, &b, &id);
        let remote = next_patches(&mut eb, Origin::Remote);
        assert_eq!(remote, vec![want.clone()], "remote patch of a {what}");
    }

    // Concurrent puts of the critical title: the device that merges sees a conflict.
    a.change(&id, |tx| tx.set("title", "Plan A")).unwrap();
    b.change(&id, |tx| tx.set("title", "Plan B")).unwrap();
    let _ = next_patches(&mut eb, Origin::Local);
    exchange(&a, &b, &id);
    let remote = next_patches(&mut eb, Origin::Remote);
    // Which value wins depends on the actors: Bob's own winning shows as a new conflict, Ada's
    // as a put flagged conflicted.
    assert!(
        remote.iter().any(|p| matches!(
            &p.action,
            PatchAction::Put { prop, conflict: true, .. } | PatchAction::Conflict { prop }
                if *prop == key("title")
        )),
        "a concurrent put arrives as a conflict: {remote:?}"
    );
}

#[test]
fn a_cursor_stays_on_its_character_across_concurrent_edits_before_it() {
    let a = repo("ada");
    let b = repo("bob");
    let id = a
        .create("note", json!({"body": "the quick brown fox"}))
        .unwrap();
    exchange(&a, &b, &id);
    // Ada's caret sits before "brown" (index 10).
    let caret = a.cursor(&id, "body", 10).unwrap();
    let end = a.cursor(&id, "body", 19).unwrap();
    // Bob inserts and deletes before it; Ada types elsewhere before it too, concurrently.
    b.change(&id, |tx| {
        tx.splice_text("body", 0, 4, "")?; // "quick brown fox"
        tx.splice_text("body", 0, 0, "a very ") // "a very quick brown fox"
    })
    .unwrap();
    a.change(&id, |tx| tx.splice_text("body", 4, 0, "really ")) // "the really quick brown fox"
        .unwrap();
    exchange(&a, &b, &id);
    let body = a.get(&id).unwrap().value["body"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(body, b.get(&id).unwrap().value["body"]);
    for r in [&a, &b] {
        // A cursor's string form travels (presence), and resolves on the other device too.
        let travelled = tandem::TextCursor::parse(caret.as_str()).unwrap();
        let pos = r.cursor_position(&id, "body", &travelled).unwrap();
        assert_eq!(
            &body.chars().skip(pos).collect::<String>()[..5],
            "brown",
            "in {body:?}"
        );
        assert_eq!(
            r.cursor_position(&id, "body", &end).unwrap(),
            body.chars().count()
        );
    }
    // Deleting the character under the cursor moves it to the next one still there.
    let pos = a.cursor_position(&id, "body", &caret).unwrap();
    b.change(&id, |tx| tx.splice_text("body", pos, 1, ""))
        .unwrap();
    exchange(&a, &b, &id);
    assert_eq!(a.cursor_position(&id, "body", &caret).unwrap(), pos);
    assert!(tandem::TextCursor::parse("not a cursor").is_none());
    assert!(
        a.cursor(&id, "title", 0).is_err(),
        "only text fields have cursors"
    );
}

#[test]
fn marks_merge_across_devices() {
    let a = repo("ada");
    let b = repo("bob");
    let id = a
        .create("note", json!({"body": "see the docs today"}))
        .unwrap();
    exchange(&a, &b, &id);
    a.change(&id, |tx| tx.mark("body", 0, 3, &Style::Bold))
        .unwrap();
    b.change(&id, |tx| {
        tx.mark(
            "body",
            8,
            12,
            &Style::Link("https://example.com/docs".into()),
        )?;
        tx.mark("body", 13, 18, &Style::Comment("which day?".into()))
    })
    .unwrap();
    exchange(&a, &b, &id);
    // Ada types after the bold word (it grows) and at the link's end (it does not).
    a.change(&id, |tx| {
        tx.splice_text("body", 12, 0, "!")?;
        tx.splice_text("body", 3, 0, "!")
    })
    .unwrap();
    exchange(&a, &b, &id);
    let ma = a.marks(&id, "body").unwrap();
    assert_eq!(ma, b.marks(&id, "body").unwrap(), "both devices agree");
    let styles: Vec<(usize, usize, Option<Style>)> =
        ma.iter().map(|m| (m.start, m.end, m.style())).collect();
    assert_eq!(
        styles,
        vec![
            (0, 4, Some(Style::Bold)),
            (9, 13, Some(Style::Link("https://example.com/docs".into()))),
            (15, 20, Some(Style::Comment("which day?".into()))),
        ],
        "in {:?}",
        a.get(&id).unwrap().value["body"]
    );
    a.change(&id, |tx| tx.unmark("body", 0, 4, "bold")).unwrap();
    exchange(&a, &b, &id);
    assert_eq!(b.marks(&id, "body").unwrap().len(), 2);
    assert!(a
        .change(&id, |tx| tx.mark("title", 0, 1, &Style::Italic))
        .is_err());
}

// ---- presence through a real relay ------------------------------------------------------

use std::time::{Duration, Instant};

use tandem::client::{connect, SyncConfig, SyncHandle};
use tandem::transport::{ClientMsg, RelayMsg};
use tandem::{DocId, Presence, Selection};

const LONG: Duration = Duration::from_secs(20);

/// The relay binary on a free loopback port, killed on drop.
struct RelayProc {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl RelayProc {
    fn start(extra: &[&str]) -> RelayProc {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("relay");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--insecure-no-auth".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let (child, addr) = crate::support::spawn_relay(&args);
        RelayProc {
            child,
            addr,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn data(&self) -> std::path::PathBuf {
        self._dir.path().join("relay")
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait (bounded) for an event matching `pred`; returns it.
async fn wait_for(
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Ok(e)) if pred(&e) => return e,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel closed while waiting for {what}: {e}"),
        }
    }
}

/// Wait (bounded) until `repo.presence(doc)` satisfies `pred`, woken by presence events.
async fn wait_presence(
    repo: &Repo,
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    doc: DocId,
    what: &str,
    pred: impl Fn(&[tandem::Peer]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !pred(&repo.presence(&doc)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("timed out waiting for {what}: {:?}", repo.presence(&doc)),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => panic!("closed"),
            Ok(_) => {}
        }
    }
}

fn cfg(url: &str, ttl: Duration) -> SyncConfig {
    let mut c = SyncConfig::new(url);
    c.presence_ttl = ttl;
    c
}

/// Two devices connected to `relay`, both holding a fresh note.
async fn two_devices(
    relay: &RelayProc,
    ttl: Duration,
) -> (Repo, Repo, SyncHandle, SyncHandle, DocId) {
    let a = repo("ada");
    let b = repo("bob");
    let id = a
        .create("note", json!({"title": "Plan", "body": "hello world"}))
        .unwrap();
    let sa = connect(&a, cfg(&relay.url(), ttl));
    sa.wait_synced(LONG).await.unwrap();
    let sb = connect(&b, cfg(&relay.url(), ttl));
    sb.wait_synced(LONG).await.unwrap();
    assert_eq!(b.get(&id).unwrap().value["body"], "hello world");
    (a, b, sa, sb, id)
}

fn caret(repo: &Repo, doc: &DocId, name: &str, pos: usize) -> Presence {
    let c = repo.cursor(doc, "body", pos).unwrap();
    Presence {
        name: name.into(),
        color: 0x3366ff,
        selection: Some(Selection {
            field: "body".into(),
            anchor: c.clone(),
            head: c,
        }),
    }
}

/// Every file under `dir`, read whole, contains `needle` nowhere.
fn nowhere_in(dir: &std::path::Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return false;
                }
            }
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_the_other_device_through_a_real_relay_and_is_never_stored() {
    let relay = RelayProc::start(&[]);
    let (a, b, sa, sb, id) = two_devices(&relay, Duration::from_secs(30)).await;
    let mut eb = b.subscribe();
    let mut ea = a.subscribe();
    const NAME: &str = "Ada-presence-7Qx9";
    a.set_presence(&id, Some(caret(&a, &id, NAME, 6)));
    b.set_presence(&id, Some(caret(&b, &id, "bob", 0)));
    wait_presence(&b, &mut eb, id, "ada's caret at bob's", |p| {
        p.iter().any(|p| p.presence.name == NAME)
    })
    .await;
    wait_presence(&a, &mut ea, id, "bob's caret at ada's", |p| {
        p.iter().any(|p| p.presence.name == "bob")
    })
    .await;
    // Bob resolves Ada's caret in his own copy, even after he typed before it.
    b.change(&id, |tx| tx.splice_text("body", 0, 0, ">> "))
        .unwrap();
    let peers = b.presence(&id);
    let sel = peers[0].presence.selection.as_ref().unwrap();
    let pos = b.cursor_position(&id, "body", &sel.head).unwrap();
    assert_eq!(pos, 9, "still before \"world\"");
    // Ada leaves the document: Bob sees nobody.
    a.set_presence(&id, None);
    wait_presence(&b, &mut eb, id, "ada gone", |p| p.is_empty()).await;
    sa.wait_synced(LONG).await.unwrap();
    sb.wait_synced(LONG).await.unwrap();
    sa.stop().await;
    sb.stop().await;
    // Never stored: not in the relay's folder (read with the relay stopped, so everything
    // it wrote is on disk). The author's name, which changes do carry, is there: the check
    // can see stored strings.
    let mut relay = relay;
    let _ = relay.child.kill();
    let _ = relay.child.wait();
    assert!(
        !nowhere_in(&relay.data(), b"ada"),
        "the check sees stored strings"
    );
    assert!(
        nowhere_in(&relay.data(), NAME.as_bytes()),
        "the relay stored presence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_silent_peer_expires_after_its_ttl() {
    let relay = RelayProc::start(&[]);
    let b = repo("bob");
    let id = b.create("note", json!({"body": "x"})).unwrap();
    let ttl = Duration::from_millis(1500);
    let sb = connect(&b, cfg(&relay.url(), ttl));
    sb.wait_synced(LONG).await.unwrap();
    let mut eb = b.subscribe();
    b.set_presence(&id, Some(caret(&b, &id, "bob", 0)));
    // A peer that announces itself once and then stays connected but silent.
    let mut ghost = crate::wire::Raw::connect(relay.addr, None).await;
    assert!(matches!(ghost.hello(vec![]).await, RelayMsg::Hello { .. }));
    let ns = b.meta(&id).unwrap().namespace;
    ghost
        .send(&ClientMsg::Presence {
            namespace: ns,
            doc: id,
            state: Some(Presence {
                name: "ghost".into(),
                color: 0,
                selection: None,
            }),
        })
        .await;
    wait_presence(&b, &mut eb, id, "the ghost", |p| p.len() == 1).await;
    let seen = Instant::now();
    wait_presence(&b, &mut eb, id, "the ghost expired", |p| p.is_empty()).await;
    let after = seen.elapsed();
    assert!(
        after >= ttl - Duration::from_millis(300),
        "dropped after {after:?}, before its TTL"
    );
    // The ghost's connection is still open: it was the TTL, not a leave.
    ghost.send(&ClientMsg::Ping { nonce: 1 }).await;
    assert!(matches!(
        ghost.recv().await,
        Some(RelayMsg::Presence { .. } | RelayMsg::Pong { .. })
    ));
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_flood_is_rate_limited_without_slowing_document_sync() {
    let relay = RelayProc::start(&["--presence-per-sec", "20", "--presence-burst", "40"]);
    let (a, b, sa, sb, id) = two_devices(&relay, Duration::from_secs(30)).await;
    b.set_presence(&id, Some(caret(&b, &id, "bob", 0)));
    let mut eb = b.subscribe();
    let ns = a.meta(&id).unwrap().namespace;
    // The flooder: as many presence updates as it can send, each different.
    let mut flooder = crate::wire::Raw::connect(relay.addr, None).await;
    assert!(matches!(
        flooder.hello(vec![]).await,
        RelayMsg::Hello { .. }
    ));
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        for i in 0..3000u32 {
            flooder
                .send(&ClientMsg::Presence {
                    namespace: ns.clone(),
                    doc: id,
                    state: Some(Presence {
                        name: "flood".into(),
                        color: i,
                        selection: None,
                    }),
                })
                .await;
        }
        flooder
    });
    // Meanwhile Ada types; each edit reaches Bob promptly.
    let mut worst = Duration::ZERO;
    let mut flood_updates = 0usize;
    for i in 0..5 {
        let t = Instant::now();
        a.change(&id, |tx| tx.splice_text("body", 0, 0, &i.to_string()))
            .unwrap();
        let want = a.get(&id).unwrap().heads;
        loop {
            let e = wait_for(&mut eb, "ada's edit", |_| true).await;
            match e {
                Event::Presence { .. } => flood_updates += 1,
                Event::Changed {
                    heads,
                    origin: Origin::Remote,
                    ..
                } if heads == want => break,
                _ => {}
            }
        }
        worst = worst.max(t.elapsed());
    }
    let mut flooder = flood.await.unwrap();
    // Drain what is left of the flood at Bob's (bounded: until a ping round trip of the
    // flooder's connection shows the relay has handled every frame before it).
    flooder.send(&ClientMsg::Ping { nonce: 9 }).await;
    while !matches!(flooder.recv().await, Some(RelayMsg::Pong { .. })) {}
    sb.wait_synced(LONG).await.unwrap();
    while let Ok(e) = eb.try_recv() {
        if matches!(e, Event::Presence { .. }) {
            flood_updates += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 40.0 + 20.0 * elapsed + 5.0;
    assert!(
        (flood_updates as f64) <= allowed,
        "{flood_updates} presence updates in {elapsed:.2}s got through (at most {allowed:.0})"
    );
    assert!(
        flood_updates >= 10,
        "the flood's first updates arrive ({flood_updates})"
    );
    assert!(
        worst < Duration::from_secs(2),
        "document sync slowed to {worst:?} during the flood"
    );
    sa.stop().await;
    sb.stop().await;
}
