//! Replays the saved corpus of every fuzz target (fuzz/corpus/<target>/*) through the same
//! entry points the fuzzer calls, so CI catches a regression on any input a fuzzer once found
//! interesting — without a fuzzer. `TANDEM_WRITE_FUZZ_SEEDS=1` (re)writes the seed inputs.

use std::path::PathBuf;

use tandem::fuzzing;
use tandem::transport::{codec, ClientMsg, FeedCursor, RelayMsg};
use tandem::DocId;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("wire", fuzzing::wire),
    ("relay_ingest", fuzzing::relay_ingest),
    ("store_load", fuzzing::store_load),
    ("schema", fuzzing::schema),
    ("automerge_repo", fuzzing::automerge_repo),
];

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn framed(pieces: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let doc = DocId([3; 16]);
    let changes = crate::wire::changes(3);
    let msgs = [
        codec::encode(
            &ClientMsg::Hello {
                version: 1,
                device: [1; 16],
                feeds: vec![FeedCursor {
                    namespace: "n".into(),
                    cursor: 7,
                }],
            },
            1 << 20,
        )
        .unwrap(),
        codec::encode(
            &ClientMsg::Push {
                namespace: "n".into(),
                doc,
                batch: 1,
                changes: changes.clone(),
            },
            1 << 20,
        )
        .unwrap(),
        codec::encode(
            &RelayMsg::Ack {
                doc,
                batch: 1,
                seqs: vec![1, 2, 300],
            },
            1 << 20,
        )
        .unwrap(),
        vec![4, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    ];
    let mut out = Vec::new();
    for (i, m) in msgs.into_iter().enumerate() {
        out.push(("wire", format!("seed-{i}"), m));
    }
    out.push(("relay_ingest", "seed-chain".into(), framed(&changes)));
    let mut gap = changes.clone();
    gap.remove(1);
    out.push(("relay_ingest", "seed-gap".into(), framed(&gap)));
    let mut compressed = changes[0].clone();
    compressed[8] = 2;
    out.push((
        "relay_ingest",
        "seed-compressed".into(),
        framed(&[compressed]),
    ));
    out.push((
        "store_load",
        "seed-empty".into(),
        framed(&[vec![], vec![0x85, 0x6f, 0x4a, 0x83]]),
    ));
    out.push((
        "store_load",
        "seed-truncated".into(),
        framed(&[changes[0][..10].to_vec()]),
    ));
    out.push((
        "schema",
        "seed-note".into(),
        crate::support::NOTE_SCHEMA.as_bytes().to_vec(),
    ));
    // Frames captured from automerge-repo's JavaScript packages.
    let frames = include_str!("../data/automerge-repo-frames.jsonl");
    for (i, line) in frames.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let f: serde_json::Value = serde_json::from_str(line).unwrap();
        let bytes = hex::decode(f["hex"].as_str().unwrap()).unwrap();
        out.push(("automerge_repo", format!("seed-frame-{i}"), bytes));
    }
    out.push((
        "schema",
        "seed-bad".into(),
        b"version = 3\n[[migrations]]\nfrom = 1\nsteps = []\n".to_vec(),
    ));
    out
}

#[test]
fn every_saved_fuzz_input_is_handled() {
    if std::env::var_os("TANDEM_WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, bytes) in seeds() {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(corpus(target).join(name), bytes).unwrap();
        }
    }
    for (target, run) in TARGETS {
        let dir = corpus(target);
        let mut n = 0;
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| run(&bytes));
            assert!(
                r.is_ok(),
                "fuzz target {target} panicked on {}",
                f.display()
            );
            n += 1;
        }
        assert!(n > 0, "no saved inputs for {target}");
    }
}
