//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz). Each takes arbitrary bytes and
//! must neither panic nor allocate beyond its limits; the same functions replay the saved
//! corpora as ordinary tests (`tests/it/fuzz_corpus.rs`), so CI runs them without a fuzzer.
//! Not part of the embedding API.

use crate::relay::log::RelayLog;
use crate::store::{Batch, MemoryBackend, Store};
use crate::transport::{codec, ClientMsg, RelayMsg};
use crate::{DocId, Repo, RepoOptions, Schema};

/// The frame limit the wire target decodes with.
const LIMIT: usize = 1 << 20;

/// The wire decoder: both message directions; whatever decodes re-encodes to something that
/// decodes to the same message.
pub fn wire(data: &[u8]) {
    if let Ok(m) = codec::decode::<ClientMsg>(data, LIMIT) {
        let again = codec::encode(&m, LIMIT).expect("a decoded message encodes");
        assert_eq!(codec::decode::<ClientMsg>(&again, LIMIT).ok(), Some(m));
    }
    if let Ok(m) = codec::decode::<RelayMsg>(data, LIMIT) {
        let again = codec::encode(&m, LIMIT).expect("a decoded message encodes");
        assert_eq!(codec::decode::<RelayMsg>(&again, LIMIT).ok(), Some(m));
    }
}

/// Split fuzz input into pieces: each piece is a 2-byte big-endian length and that many bytes.
fn pieces(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 64 {
        let n = u16::from_be_bytes([data[0], data[1]]) as usize;
        let end = (2 + n).min(data.len());
        out.push(data[2..end].to_vec());
        data = &data[end..];
    }
    out
}

/// Relay change ingest: pieces pushed as changes of one document, then pulled back.
pub fn relay_ingest(data: &[u8]) {
    let log = RelayLog::in_memory();
    let doc = DocId([1; 16]);
    for batch in pieces(data).chunks(4) {
        let _ = log.push("fuzz", &doc, batch);
    }
    if let Ok(page) = log.pull(&doc, 0, u64::MAX) {
        assert_eq!(page.changes.len() as u64, page.to + 1 - page.from);
    }
}

/// Store loading of corrupt data: a real document's journal and snapshot with bytes of the
/// input written over them; loading must give the document or a typed error, never a panic.
pub fn store_load(data: &[u8]) {
    let disk = std::sync::Arc::new(MemoryBackend::default());
    let open = || {
        Store::from_backend(Box::new(disk.clone()), None)
            .map(|s| Repo::with_store(s, RepoOptions::new("fuzz")))
    };
    let Ok(repo) = open() else { return };
    let Ok(id) = repo.create("note", serde_json::json!({"title": "t", "body": "x"})) else {
        return;
    };
    let _ = repo.change(&id, |tx| tx.set("title", "u"));
    let _ = repo.compact(&id);
    let _ = repo.change(&id, |tx| tx.set("title", "v"));
    let backend = repo.store().backend();
    let mut prefix_c = vec![b'c'];
    prefix_c.extend_from_slice(id.as_bytes());
    let mut prefix_s = vec![b's'];
    prefix_s.extend_from_slice(id.as_bytes());
    let mut batch = Batch::default();
    let mut parts = pieces(data).into_iter();
    for prefix in [prefix_c, prefix_s] {
        for (k, _) in backend.scan(&prefix).unwrap_or_default() {
            if let Some(p) = parts.next() {
                batch.put(k, p);
            }
        }
    }
    let _ = backend.write(batch);
    drop(repo);
    // A fresh repo over the same bytes loads from the damaged data.
    let Ok(fresh) = open() else { return };
    let _ = fresh.get(&id);
    let _ = fresh.history(&id);
}

/// The schema file parser.
pub fn schema(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Schema::from_toml(text);
    }
}

/// The `/automerge` decoders: the CBOR codec (what decodes re-encodes stably), the message
/// decoder, and for a sync message the checks and Automerge's sync protocol on the relay's
/// side (a fresh document syncing with whatever the bytes say).
pub fn automerge_repo(data: &[u8]) {
    use crate::relay::amrepo::{cbor, doc, wire};
    let limits = cbor::DecodeLimits::default();
    if let Ok(v) = cbor::decode(data, limits) {
        let once = cbor::encode(&v);
        let again = cbor::decode(&once, limits).expect("an encoded value decodes");
        assert_eq!(cbor::encode(&again), once);
    }
    if let Ok(wire::AmMsg::Sync { data, .. }) = wire::decode(data, limits) {
        fuzz_sync(&data);
    }
    // The raw bytes as a sync message too: most fuzz inputs never form a valid CBOR frame.
    fuzz_sync(data);

    fn fuzz_sync(data: &[u8]) {
        if let Ok(msg) = doc::check_sync_message(data) {
            let mut d: doc::DocSync<u8> = doc::DocSync::default();
            let before = d.heads();
            let _ = d.receive(1, msg, true);
            let _ = d.changes_since(&before);
            let _ = d.outgoing();
        }
    }
}
