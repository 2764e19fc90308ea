//! Bad input to the local engine: each case is a clear, typed error; nothing is lost and other
//! documents keep working.

use serde_json::json;
use tandem::store::StoreError;
use tandem::Error;

use crate::support::{note_schema, open};

type WriteFn = dyn Fn(&mut tandem::Tx) -> Result<(), tandem::crdt::EntityError>;

#[test]
fn wrong_kind_and_unknown_field_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), "alice", note_schema());
    let id = a
        .create("note", json!({"title": "t", "body": "b"}))
        .unwrap();
    let heads = a.get(&id).unwrap().heads;
    let cases: Vec<(&str, Box<WriteFn>)> = vec![
        ("counter put", Box::new(|tx| tx.set("views", 3))),
        ("text gets a number", Box::new(|tx| tx.set("body", 3))),
        ("merge gets a string", Box::new(|tx| tx.set("labels", "x"))),
        (
            "lww gets an object",
            Box::new(|tx| tx.set("pinned", json!({"a": 1}))),
        ),
        ("increment a text", Box::new(|tx| tx.increment("body", 1))),
        ("unknown field", Box::new(|tx| tx.set("colour", "red"))),
        ("reserved key", Box::new(|tx| tx.set("_type", "task"))),
        (
            "splice past the end",
            Box::new(|tx| tx.splice_text("body", 99, 0, "x")),
        ),
        // A good write followed by a bad one: the whole change is discarded.
        (
            "partial",
            Box::new(|tx| {
                tx.set("pinned", true)?;
                tx.set("views", 1)
            }),
        ),
    ];
    for (name, f) in cases {
        let err = a.change(&id, |tx| f(tx)).unwrap_err();
        assert!(matches!(err, Error::Entity(_)), "{name}: {err}");
        assert!(!err.to_string().is_empty());
        assert_eq!(a.get(&id).unwrap().heads, heads, "{name} wrote something");
    }
    let e = a.change(&id, |tx| tx.set("colour", "red")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "type 'note' has no field 'colour' (its fields: title, body, pinned, views, labels)"
    );
    assert_eq!(e.exit_code(), 3);
    let e = a.change(&id, |tx| tx.set("views", 1)).unwrap_err();
    assert!(e.to_string().contains("counter"), "{e}");
    assert!(matches!(a.create("task", json!({})), Err(Error::Entity(_))));
}

#[test]
fn a_second_process_gets_store_in_use_with_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let _a = open(dir.path(), "alice", note_schema());
    match tandem::Repo::open(dir.path(), tandem::RepoOptions::new("again")) {
        Err(Error::Store(StoreError::InUse { pid, .. })) => {
            assert_eq!(pid, Some(std::process::id()))
        }
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("a second open succeeded"),
    }
}

#[test]
fn a_corrupt_change_quarantines_that_document_only() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad);
    {
        let a = open(dir.path(), "alice", note_schema());
        good = a.create("note", json!({"title": "good"})).unwrap();
        bad = a.create("note", json!({"title": "bad"})).unwrap();
        a.change(&bad, |tx| tx.set("pinned", true)).unwrap();
        // Flip bytes in the middle of the bad document's second journal entry.
        let backend = a.store().backend();
        let mut prefix = vec![b'c'];
        prefix.extend_from_slice(bad.as_bytes());
        let entries = backend.scan(&prefix).unwrap();
        let (k, mut v) = entries.last().unwrap().clone();
        let mid = v.len() / 2;
        v[mid] ^= 0xff;
        v[mid + 1] ^= 0xff;
        let mut batch = tandem::store::Batch::default();
        batch.put(k, v);
        backend.write(batch).unwrap();
        backend.sync().unwrap();
    }
    let a = open(dir.path(), "alice", note_schema());
    let err = a.get(&bad).unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Quarantined { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("quarantined"), "{err}");
    // Still quarantined after reopening, with the reason kept.
    assert!(a.meta(&bad).unwrap().quarantined.is_some());
    assert_eq!(a.get(&good).unwrap().value["title"], "good");
    a.change(&good, |tx| tx.set("pinned", true)).unwrap();
}

#[test]
fn a_corrupt_snapshot_chunk_quarantines_that_document_only() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad);
    {
        let a = open(dir.path(), "alice", note_schema());
        good = a.create("note", json!({"title": "good"})).unwrap();
        bad = a
            .create("note", json!({"title": "bad", "body": "some text"}))
            .unwrap();
        a.compact(&bad).unwrap();
        let backend = a.store().backend();
        let mut prefix = vec![b's'];
        prefix.extend_from_slice(bad.as_bytes());
        let (k, mut v) = backend.scan(&prefix).unwrap()[0].clone();
        let n = v.len();
        v.truncate(n - 5);
        let mut batch = tandem::store::Batch::default();
        batch.put(k, v);
        backend.write(batch).unwrap();
        backend.sync().unwrap();
    }
    let a = open(dir.path(), "alice", note_schema());
    assert!(matches!(
        a.get(&bad),
        Err(Error::Store(StoreError::Quarantined { .. }))
    ));
    assert_eq!(a.get(&good).unwrap().value["title"], "good");
}

#[test]
fn a_truncated_import_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), "alice", note_schema());
    let id = a
        .create("note", json!({"title": "t", "body": "some body text"}))
        .unwrap();
    let bytes = a.export(&id).unwrap();
    let other = tandem::DocId::generate();
    for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
        let err = a.import(&other, &bytes[..cut]).unwrap_err();
        assert!(matches!(err, Error::InvalidData(_)), "cut at {cut}: {err}");
        assert!(matches!(a.get(&other), Err(Error::NotFound(_))));
    }
    let garbage = vec![0x85u8, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 5, 6, 7];
    assert!(a.import(&other, &garbage).is_err());
    assert_eq!(a.get(&id).unwrap().value["body"], "some body text");
}

#[test]
fn remote_garbage_is_refused() {
    let a = tandem::Repo::in_memory(note_schema(), "alice").unwrap();
    let id = tandem::DocId::generate();
    let err = a
        .apply_remote(&id, "default", &[vec![1, 2, 3]])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidData(_)), "{err}");
    assert!(matches!(a.get(&id), Err(Error::NotFound(_))));
}
