//! Offline migrations: two devices migrate the same document independently and converge with no
//! duplicated container and no lost edit; a device still on the old version keeps working.

use serde_json::json;
use tandem::Schema;

use crate::support::{note_schema, open};

const NOTE_V2: &str = r#"
version = 2
[types.note]
heading  = "critical"
body     = "text"
pinned   = "lww"
labels   = "merge"
summary  = "text"
archived = { kind = "lww", default = false }

[[migrations]]
from = 1
steps = [
  { op = "rename", type = "note", from = "title", to = "heading" },
  { op = "add", type = "note", field = "summary", kind = "text" },
  { op = "add", type = "note", field = "archived", kind = "lww", default = false },
  { op = "remove", type = "note", field = "views" },
]
"#;

fn sync_all(repos: &[&tandem::Repo], id: &tandem::DocId) {
    for _ in 0..2 {
        for a in repos {
            for b in repos {
                if let Ok(changes) = a.all_changes(id) {
                    b.apply_remote(id, "default", &changes).unwrap();
                }
            }
        }
    }
}

#[test]
fn devices_migrating_offline_converge_and_an_old_device_keeps_working() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let v2 = Schema::from_toml(NOTE_V2).unwrap();
    let a = open(dirs[0].path(), "alice", v2.clone());
    let b = open(dirs[1].path(), "bob", v2.clone());
    let c = open(dirs[2].path(), "carol", note_schema());

    // Carol (version 1) creates the note; everyone receives it before going offline.
    let id = c
        .create(
            "note",
            json!({"title": "Plan", "body": "draft", "pinned": true}),
        )
        .unwrap();
    c.change(&id, |tx| tx.increment("views", 1)).unwrap();
    sync_all(&[&a, &b, &c], &id);

    // Reads never write: a version 2 reader sees the lensed view, the document stays at 1.
    let ea = a.get(&id).unwrap();
    assert_eq!(ea.value["heading"], "Plan");
    assert_eq!(ea.value["summary"], "");
    assert_eq!(
        ea.value["archived"], false,
        "absent scalar reads as its default"
    );
    assert!(ea.value.get("views").is_none(), "removed fields are hidden");
    assert_eq!(ea.schema, 1);
    let before = a.history(&id).unwrap().len();

    // Offline: alice and bob each write (and so migrate); carol edits on version 1.
    a.change(&id, |tx| tx.set("summary", "alpha")).unwrap();
    b.change(&id, |tx| tx.splice_text("summary", 0, 0, "beta "))
        .unwrap();
    b.change(&id, |tx| tx.splice_text("body", 5, 0, " v2"))
        .unwrap();
    c.change(&id, |tx| {
        tx.set("title", "Plan B")?;
        tx.increment("views", 1)
    })
    .unwrap();
    assert_eq!(a.get(&id).unwrap().schema, 2);

    sync_all(&[&a, &b, &c], &id);
    let (ea, eb, ec) = (
        a.get(&id).unwrap(),
        b.get(&id).unwrap(),
        c.get(&id).unwrap(),
    );
    assert_eq!(ea.heads, eb.heads);
    assert_eq!(ea.heads, ec.heads);
    assert_eq!(ea.value, eb.value, "the migrated devices agree");
    let summary = ea.value["summary"].as_str().unwrap();
    assert!(
        summary.contains("alpha") && summary.contains("beta "),
        "both edits survive in one text: {summary:?}"
    );
    assert_eq!(
        ea.value["heading"], "Plan B",
        "the old device's edit reaches the renamed field"
    );
    assert_eq!(ea.value["body"], "draft v2");

    // Exactly one migration change, though two devices made it.
    let history = a.history(&id).unwrap();
    let migrations: Vec<_> = history
        .iter()
        .filter(|c| c.time == 0 && c.author.is_none())
        .collect();
    assert_eq!(migrations.len(), 1, "{history:#?}");
    assert_eq!(history.len(), before + 1 + 4, "migration + 4 edits");

    // The old device: knows title/views, shows the newer fields it does not know, drops nothing.
    assert_eq!(ec.schema, 2);
    assert_eq!(ec.value["title"], "Plan B");
    assert_eq!(ec.value["views"], 2);
    assert_eq!(
        ec.value["summary"], summary,
        "unknown fields are kept and shown"
    );
    c.change(&id, |tx| tx.set("title", "Plan C")).unwrap();
    sync_all(&[&a, &b, &c], &id);
    let ea = a.get(&id).unwrap();
    assert_eq!(ea.value["heading"], "Plan C");
    assert_eq!(ea.value["summary"], summary);
    assert!(ea.conflicts.is_empty());
}

#[test]
fn migration_changes_are_byte_identical_across_devices() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v2 = Schema::from_toml(NOTE_V2).unwrap();
    let old = open(d1.path(), "old", note_schema());
    let id = old.create("note", json!({"title": "x"})).unwrap();
    let base = old.all_changes(&id).unwrap();
    drop(old);
    let a = open(d1.path(), "a", v2.clone());
    let b = open(d2.path(), "b", v2);
    b.apply_remote(&id, "default", &base).unwrap();
    a.change(&id, |tx| tx.set("archived", true)).unwrap();
    b.change(&id, |tx| tx.set("pinned", true)).unwrap();
    let ma = a.all_changes(&id).unwrap()[1].clone();
    let mb = b.all_changes(&id).unwrap()[1].clone();
    assert_eq!(
        ma, mb,
        "the migration change is the same bytes on both devices"
    );
}
