//! The note app on two stores exchanging changes without a network: field-level merge, text
//! interleaving, counters, critical-field conflicts and their resolution.

use serde_json::json;
use tandem::{DocStatus, Event};

use crate::support::{exchange, note_schema, open};

/// Whether `heard` tells of the conflict on `field` closing.
fn resolved(heard: &[Event], field: &str) -> bool {
    heard
        .iter()
        .any(|e| matches!(e, Event::ConflictResolved { field: f, .. } if f == field))
}

#[test]
fn two_stores_merge_notes_and_settle_a_critical_conflict() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), "alice", note_schema());
    let b = open(db.path(), "bob", note_schema());
    let mut events_b = b.subscribe();

    let id = a
        .create(
            "note",
            json!({"title": "Groceries", "body": "milk", "pinned": false}),
        )
        .unwrap();
    exchange(&a, &b, &id);
    assert_eq!(b.get(&id).unwrap().value["title"], "Groceries");

    // Concurrent edits: different fields, the same text, the counter, the merge map, and the
    // critical title.
    a.change(&id, |tx| {
        tx.set("pinned", true)?;
        tx.splice_text("body", 0, 0, "oat ")?;
        tx.increment("views", 2)?;
        tx.merge_put("labels", "home", true)?;
        tx.set("title", "Groceries (Sat)")
    })
    .unwrap();
    b.change(&id, |tx| {
        tx.splice_text("body", 4, 0, " and eggs")?;
        tx.increment("views", 3)?;
        tx.merge_put("labels", "urgent", true)?;
        tx.set("title", "Shopping")
    })
    .unwrap();
    exchange(&a, &b, &id);

    let ea = a.get(&id).unwrap();
    let eb = b.get(&id).unwrap();
    assert_eq!(ea.value, eb.value, "both stores converge");
    assert_eq!(ea.heads, eb.heads);
    assert_eq!(
        ea.value["pinned"], true,
        "an edit of another field survives"
    );
    assert_eq!(
        ea.value["body"], "oat milk and eggs",
        "text edits interleave"
    );
    assert_eq!(ea.value["views"], 5, "counters add");
    assert_eq!(
        ea.value["labels"],
        json!({"home": true, "urgent": true}),
        "merge keys merge"
    );

    // The critical title is in conflict, identically on both stores.
    assert_eq!(ea.conflicts, vec!["title".to_string()]);
    let ca = a.conflicts(&id, false).unwrap();
    let cb = b.conflicts(&id, false).unwrap();
    assert_eq!(ca, cb);
    assert_eq!(ca.len(), 1);
    let versions = &ca[0].versions;
    assert_eq!(versions.len(), 2);
    let mut values: Vec<_> = versions.iter().map(|v| v.value.clone()).collect();
    values.sort_by_key(|v| v.to_string());
    assert_eq!(values, vec![json!("Groceries (Sat)"), json!("Shopping")]);
    let mut authors: Vec<_> = versions.iter().map(|v| v.author.clone().unwrap()).collect();
    authors.sort();
    assert_eq!(authors, vec!["alice", "bob"]);
    assert!(versions.iter().all(|v| v.hash.len() == 64 && v.time > 0));
    assert!(
        matches!(b.status(&id).unwrap(), DocStatus::Conflict { ref fields } if fields == &["title"])
    );
    let saw_conflict = std::iter::from_fn(|| events_b.try_recv().ok())
        .any(|e| matches!(e, Event::ConflictOpened { ref field, .. } if field == "title"));
    assert!(saw_conflict, "bob's app heard of the conflict");

    // Bob decides; his app hears the conflict close at once, and after an exchange both show
    // the chosen value and no conflict.
    b.resolve(&id, "title", json!("Shopping (Sat)")).unwrap();
    let heard: Vec<Event> = std::iter::from_fn(|| events_b.try_recv().ok()).collect();
    assert!(resolved(&heard, "title"), "{heard:?}");
    assert!(
        heard.iter().any(|e| matches!(
            e,
            Event::Status {
                status: DocStatus::Pending { .. },
                ..
            }
        )),
        "{heard:?}"
    );
    assert!(matches!(b.status(&id).unwrap(), DocStatus::Pending { .. }));
    exchange(&a, &b, &id);
    for r in [&a, &b] {
        let e = r.get(&id).unwrap();
        assert_eq!(e.value["title"], "Shopping (Sat)");
        assert!(e.conflicts.is_empty());
        assert!(r.conflicts(&id, false).unwrap().is_empty());
    }
    let history = a.history(&id).unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.author.as_deref(), Some("bob"));
    assert!(
        last.message.as_deref().unwrap().contains("decided by bob"),
        "{last:?}"
    );
    assert!(last.fields.contains(&"title".to_string()));
}

/// Changes from elsewhere update a loaded document's conflicts without reading every field
/// again (debug builds compare with a fresh read after each): a third version joins an open
/// conflict, and a decision made elsewhere closes it. Each store joins last once (Automerge
/// orders concurrent versions by actor, so the joiner wins in one round at most).
#[test]
fn a_conflict_grows_and_closes_by_changes_from_elsewhere() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores = [
        open(dirs[0].path(), "alice", note_schema()),
        open(dirs[1].path(), "bob", note_schema()),
        open(dirs[2].path(), "carol", note_schema()),
    ];
    for round in 0..3 {
        let [x, y, z] = [0, 1, 2].map(|i| &stores[(i + round) % 3]);
        let id = x
            .create(
                "note",
                json!({"title": "Plan", "body": "", "pinned": false}),
            )
            .unwrap();
        exchange(x, y, &id);
        exchange(x, z, &id);
        for (r, title) in [(x, "Plan X"), (y, "Plan Y"), (z, "Plan Z")] {
            r.change(&id, |tx| tx.set("title", title)).unwrap();
        }
        exchange(x, y, &id);
        assert_eq!(x.conflicts(&id, false).unwrap()[0].versions.len(), 2);
        let mut events_x = x.subscribe();
        // z's version reaches x, and x's and y's reach z.
        exchange(x, z, &id);
        for r in [x, z] {
            assert_eq!(r.get(&id).unwrap().conflicts, vec!["title".to_string()]);
            assert_eq!(r.conflicts(&id, false).unwrap()[0].versions.len(), 3);
        }
        // y decides after seeing all three; x hears the conflict close.
        exchange(y, z, &id);
        y.resolve(&id, "title", json!("Plan D")).unwrap();
        exchange(x, y, &id);
        let heard: Vec<Event> = std::iter::from_fn(|| events_x.try_recv().ok()).collect();
        assert!(resolved(&heard, "title"), "{heard:?}");
        let e = x.get(&id).unwrap();
        assert_eq!(e.value["title"], "Plan D");
        assert!(e.conflicts.is_empty());
    }
}

#[test]
fn history_points_and_diffs() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), "alice", note_schema());
    let id = a
        .create("note", json!({"title": "t", "body": "hello world"}))
        .unwrap();
    let first = a.history(&id).unwrap()[0].hash.clone();
    a.change(&id, |tx| {
        tx.message("brave");
        tx.splice_text("body", 6, 0, "brave ")
    })
    .unwrap();
    let h = a.history(&id).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].message.as_deref(), Some("brave"));
    assert_eq!(h[1].deps, vec![first.clone()]);
    assert_eq!(
        a.get_at(&id, &first[..6]).unwrap().value["body"],
        "hello world"
    );
    let d = a.diff(&id, &first[..8], None).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].field, "body");
    let t = &d[0].text.as_ref().unwrap()[0];
    assert_eq!(
        (t.index, t.inserted.as_str(), t.deleted.as_str()),
        (6, "brave ", "")
    );
    assert!(
        a.get_at(&id, "zz").is_err(),
        "a too-short prefix is refused"
    );
    assert!(
        matches!(
            a.get_at(&id, "ffffffff"),
            Err(tandem::Error::ChangeNotFound { .. })
        ) || first.starts_with("ffffffff")
    );
}

#[test]
fn delete_is_a_tombstone_a_concurrent_edit_cannot_undo() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), "alice", note_schema());
    let b = open(db.path(), "bob", note_schema());
    let id = a
        .create("note", json!({"title": "x", "body": "abc"}))
        .unwrap();
    exchange(&a, &b, &id);
    a.delete(&id).unwrap();
    b.change(&id, |tx| tx.splice_text("body", 3, 0, "d"))
        .unwrap();
    exchange(&a, &b, &id);
    for r in [&a, &b] {
        let e = r.get(&id).unwrap();
        assert!(e.deleted, "still deleted after a concurrent edit");
        assert_eq!(e.value["body"], "abcd", "the concurrent edit is kept");
        assert!(r.list(Some("note"), false).unwrap().is_empty());
        assert_eq!(r.list(Some("note"), true).unwrap().len(), 1);
    }
    a.undelete(&id).unwrap();
    assert!(!a.get(&id).unwrap().deleted);
}

#[test]
fn pending_until_acknowledged_and_persisted_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let a = open(dir.path(), "alice", note_schema());
        id = a.create("note", json!({"title": "x"})).unwrap();
        a.change(&id, |tx| tx.increment("views", 1)).unwrap();
        match a.status(&id).unwrap() {
            DocStatus::Pending { changes, .. } => assert_eq!(changes, 2),
            s => panic!("expected pending, got {s:?}"),
        }
        let outbox = a.store().outbox(&id).unwrap();
        assert_eq!(outbox.len(), 2);
        let mut meta = a.meta(&id).unwrap();
        a.store().ack(&id, &mut meta, &[outbox[0].0]).unwrap();
    }
    let a = open(dir.path(), "alice", note_schema());
    assert_eq!(a.get(&id).unwrap().value["views"], 1);
    assert_eq!(
        a.store().outbox(&id).unwrap().len(),
        1,
        "the unacknowledged change is still pending"
    );
}

#[test]
fn export_and_import_between_stores_without_network() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), "alice", note_schema());
    let b = open(db.path(), "bob", note_schema());
    let id = a
        .create("note", json!({"title": "exported", "body": "text"}))
        .unwrap();
    let bytes = a.export(&id).unwrap();
    // Standard Automerge bytes: automerge itself loads them.
    automerge::Automerge::load(&bytes).unwrap();
    let applied = b.import(&id, &bytes).unwrap();
    assert_eq!(applied.applied, 1);
    assert_eq!(b.get(&id).unwrap().value["title"], "exported");
    assert_eq!(
        b.import(&id, &bytes).unwrap().applied,
        0,
        "import is idempotent"
    );
}

#[test]
fn compaction_keeps_every_change_and_the_blob_folder_stays_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = tandem::RepoOptions::new("alice").schema(note_schema());
    opts.compact_after_changes = 20;
    let id;
    {
        let a = tandem::Repo::open(dir.path(), opts.clone()).unwrap();
        id = a.create("note", json!({"title": "big"})).unwrap();
        // Large changes (> 4 KiB) must be chunked like everything else.
        let big = "x".repeat(20_000);
        for i in 0..50 {
            a.change(&id, |tx| {
                tx.splice_text("body", 0, 0, if i % 10 == 0 { &big } else { "y" })
            })
            .unwrap();
        }
        assert!(
            a.meta(&id).unwrap().snapshot_gen >= 2,
            "compacted at least twice"
        );
    }
    let a = tandem::Repo::open(dir.path(), opts).unwrap();
    let body = a.get(&id).unwrap().value["body"].as_str().unwrap().len();
    assert_eq!(body, 5 * 20_000 + 45);
    assert_eq!(a.history(&id).unwrap().len(), 51);
    assert_eq!(
        a.store().outbox(&id).unwrap().len(),
        51,
        "compaction never drops an unacked change"
    );
    let blobs = dir.path().join("blobs");
    let n = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "sled wrote blob files (never fsynced) in {blobs:?}");
}
