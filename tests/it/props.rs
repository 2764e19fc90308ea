//! Property tests of the merge rules: whatever edits two devices make concurrently, exchanging
//! them in either order gives the same document (commutative), applying them again changes
//! nothing (idempotent), and every replica shows the same conflicts.

use proptest::prelude::*;
use serde_json::json;
use tandem::{DocId, Repo};

use crate::support::note_schema;

#[derive(Clone, Debug)]
enum Op {
    Title(String),
    Pinned(bool),
    Splice { at: usize, del: usize, text: String },
    Views(i64),
    Label(String, Option<bool>),
    Delete(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        "[a-c]{1,3}".prop_map(Op::Title),
        any::<bool>().prop_map(Op::Pinned),
        (0usize..20, 0usize..3, "[a-z ]{0,4}").prop_map(|(at, del, text)| Op::Splice {
            at,
            del,
            text
        }),
        (-5i64..5).prop_map(Op::Views),
        ("[xyz]", proptest::option::of(any::<bool>())).prop_map(|(k, v)| Op::Label(k, v)),
        any::<bool>().prop_map(Op::Delete),
    ]
}

fn apply(repo: &Repo, id: &DocId, ops: &[Op]) {
    for op in ops {
        // Read before the change: the closure runs under the document's lock.
        let len = repo
            .get(id)
            .map(|e| e.value["body"].as_str().unwrap_or("").chars().count())
            .unwrap_or(0);
        repo.change(id, |tx| match op {
            Op::Title(t) => tx.set("title", t.as_str()),
            Op::Pinned(b) => tx.set("pinned", *b),
            Op::Splice { at, del, text } => {
                let at = (*at).min(len);
                let del = (*del).min(len - at);
                tx.splice_text("body", at, del, text)
            }
            Op::Views(n) => tx.increment("views", *n),
            Op::Label(k, v) => tx.merge_put(
                "labels",
                k,
                v.map(serde_json::Value::Bool)
                    .unwrap_or(serde_json::Value::Null),
            ),
            Op::Delete(d) => tx.set_deleted(*d),
        })
        .unwrap();
    }
}

fn state(
    r: &Repo,
    id: &DocId,
) -> (
    serde_json::Value,
    bool,
    Vec<String>,
    Vec<tandem::FieldConflict>,
) {
    let e = r.get(id).unwrap();
    (e.value, e.deleted, e.heads, r.conflicts(id, true).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn concurrent_edits_merge_commutatively_and_idempotently(
        a_ops in proptest::collection::vec(op(), 0..6),
        b_ops in proptest::collection::vec(op(), 0..6),
    ) {
        let origin = Repo::in_memory(note_schema(), "origin").unwrap();
        let id = origin.create("note", json!({"title": "t", "body": "hello"})).unwrap();
        let base = origin.all_changes(&id).unwrap();
        let a = Repo::in_memory(note_schema(), "a").unwrap();
        let b = Repo::in_memory(note_schema(), "b").unwrap();
        a.apply_remote(&id, "default", &base).unwrap();
        b.apply_remote(&id, "default", &base).unwrap();
        apply(&a, &id, &a_ops);
        apply(&b, &id, &b_ops);
        let from_a = a.all_changes(&id).unwrap();
        let from_b = b.all_changes(&id).unwrap();

        // Two fresh replicas receive the two histories in opposite orders.
        let x = Repo::in_memory(note_schema(), "x").unwrap();
        let y = Repo::in_memory(note_schema(), "y").unwrap();
        x.apply_remote(&id, "default", &from_a).unwrap();
        x.apply_remote(&id, "default", &from_b).unwrap();
        y.apply_remote(&id, "default", &from_b).unwrap();
        y.apply_remote(&id, "default", &from_a).unwrap();
        let sx = state(&x, &id);
        prop_assert_eq!(&sx, &state(&y, &id));
        // Idempotent: replaying everything changes nothing.
        let again = x.apply_remote(&id, "default", &from_a).unwrap();
        prop_assert_eq!(again.applied, 0);
        x.apply_remote(&id, "default", &from_b).unwrap();
        prop_assert_eq!(&sx, &state(&x, &id));
        // Counters add, whatever the order.
        let views: i64 = a_ops.iter().chain(&b_ops).map(|o| if let Op::Views(n) = o { *n } else { 0 }).sum();
        prop_assert_eq!(sx.0["views"].as_i64().unwrap(), views);
        // The devices themselves converge to the same state after exchanging.
        a.apply_remote(&id, "default", &from_b).unwrap();
        b.apply_remote(&id, "default", &from_a).unwrap();
        prop_assert_eq!(&state(&a, &id), &sx);
        prop_assert_eq!(&state(&b, &id), &sx);
    }
}

/// The frames automerge-repo's JavaScript packages send (tests/data).
fn amrepo_frames() -> Vec<Vec<u8>> {
    include_str!("../data/automerge-repo-frames.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: serde_json::Value = serde_json::from_str(l).unwrap();
            hex::decode(f["hex"].as_str().unwrap()).unwrap()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Real frames with bytes overwritten, inserted or cut off go through the `/automerge`
    /// decoders and the relay's side of the sync protocol without a panic.
    #[test]
    fn mutated_automerge_repo_frames_never_panic(
        frame in 0usize..100,
        edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..8),
        cut in proptest::option::of(any::<u16>()),
    ) {
        let frames = amrepo_frames();
        let mut bytes = frames[frame % frames.len()].clone();
        for (at, b, kind) in edits {
            let at = at as usize % (bytes.len() + 1);
            match kind {
                0 if at < bytes.len() => bytes[at] = b,
                1 => bytes.insert(at, b),
                _ => {
                    if at < bytes.len() {
                        bytes.remove(at);
                    }
                }
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c as usize % (bytes.len() + 1));
        }
        tandem::fuzzing::automerge_repo(&bytes);
    }
}
