//! `tandem migrate-relay`: move an embedded (sled) relay's data into PostgreSQL, verifiably.
//!
//! Everything a device relies on is kept as it was: each document's log with the same seqs
//! (compacted changes are taken back out of the snapshot, matched by hash), the feed entries
//! at the same positions, and the relay's identity — so devices keep their cursors and need
//! not re-push anything. Then both sides are read back and compared: per document the count
//! of changes and a SHA-256 over their hashes in seq order; the report sums them up.

use std::collections::HashMap;

use automerge::Automerge;
use sha2::{Digest, Sha256};

use super::log::RelayLog;
use super::postgres::{ImportDoc, PgLog};
use super::storage::RelayStore;
use crate::ids::DocId;
use crate::store::StoreError;

/// What a migration moved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub documents: u64,
    pub changes: u64,
    pub feed_entries: u64,
    /// SHA-256 over every document's (id, change hashes in seq order), documents in id order:
    /// the same on both sides.
    pub digest: String,
}

/// A document's change hashes in seq order, folded into the running digest.
fn fold(h: &mut Sha256, doc: &DocId, hashes: &[[u8; 32]]) {
    h.update(doc.as_bytes());
    h.update((hashes.len() as u64).to_be_bytes());
    for x in hashes {
        h.update(x);
    }
}

/// Copy `from` into the empty database behind `to`, then verify. Blocks.
pub fn sled_to_postgres(from: &RelayLog, to: &mut PgLog) -> Result<MigrationReport, StoreError> {
    if !to.is_empty()? {
        return Err(StoreError::Io(
            "the PostgreSQL database already holds relay data; migrate into an empty one".into(),
        ));
    }
    let docs = from.documents()?;
    let mut source = Sha256::new();
    let mut changes = 0u64;
    for (doc, rec) in &docs {
        let hashes = from.log_hashes(doc)?;
        let mut compacted: HashMap<[u8; 32], Vec<u8>> = HashMap::new();
        if let Some(snapshot) = from.snapshot_of(doc)? {
            let am = Automerge::load(&snapshot)
                .map_err(|e| StoreError::Corrupt(format!("snapshot of {doc}: {e}")))?;
            for c in am.get_changes(&[]) {
                compacted.insert(c.hash().0, c.raw_bytes().to_vec());
            }
        }
        let mut log = Vec::with_capacity(hashes.len());
        for (n, (seq, hash)) in hashes.iter().enumerate() {
            if *seq != n as u64 + 1 {
                return Err(StoreError::Corrupt(format!(
                    "log of {doc} lacks seq {}",
                    n + 1
                )));
            }
            let bytes = match from.log_entry(doc, *seq)? {
                Some(b) => b,
                None => compacted.remove(hash).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "change {seq} of {doc} is neither logged nor in its snapshot"
                    ))
                })?,
            };
            log.push(bytes);
        }
        if log.len() as u64 != rec.head {
            return Err(StoreError::Corrupt(format!(
                "{doc}: the record says {} changes, the index {}",
                rec.head,
                log.len()
            )));
        }
        changes += log.len() as u64;
        fold(
            &mut source,
            doc,
            &hashes.iter().map(|(_, h)| *h).collect::<Vec<_>>(),
        );
        to.import_doc(ImportDoc {
            doc: *doc,
            namespace: rec.namespace.clone(),
            changes: log,
        })?;
    }
    let mut feed = Vec::new();
    for ns in from.namespaces()? {
        let mut after = 0;
        loop {
            let (entries, next, more) = RelayLog::feed(from, &ns, after, 10_000)?;
            let positions = feed_positions(from, &ns, after, entries.len())?;
            for (e, pos) in entries.into_iter().zip(positions) {
                feed.push((ns.clone(), pos, e.doc, e.seq));
            }
            after = next;
            if !more {
                break;
            }
        }
    }
    let feed_entries = feed.len() as u64;
    to.import_finish(from.relay_id(), feed, from.feed_position())?;

    // Read both sides back.
    let mut target = Sha256::new();
    let migrated = to.documents()?;
    if migrated.len() != docs.len() {
        return Err(StoreError::Corrupt(format!(
            "{} documents in the sled relay, {} in PostgreSQL",
            docs.len(),
            migrated.len()
        )));
    }
    for ((doc, _), (pdoc, prec)) in docs.iter().zip(&migrated) {
        if doc != pdoc {
            return Err(StoreError::Corrupt(format!("document {doc} is missing")));
        }
        let hashes = to.change_hashes(pdoc)?;
        if hashes.len() as u64 != prec.head {
            return Err(StoreError::Corrupt(format!(
                "{doc}: a gap in the migrated log"
            )));
        }
        fold(&mut target, pdoc, &hashes);
    }
    let (a, b) = (
        hex::encode(source.finalize()),
        hex::encode(target.finalize()),
    );
    if a != b {
        return Err(StoreError::Corrupt(format!(
            "verification failed: sled digest {a}, PostgreSQL digest {b}"
        )));
    }
    for ns in from.namespaces()? {
        let (x, _, _) = RelayLog::feed(from, &ns, 0, 1_000_000)?;
        let (y, _, _) = RelayStore::feed(to, &ns, 0, 1_000_000)?;
        if x != y {
            return Err(StoreError::Corrupt(format!("the feed of '{ns}' differs")));
        }
    }
    Ok(MigrationReport {
        documents: docs.len() as u64,
        changes,
        feed_entries,
        digest: a,
    })
}

/// The positions of the `n` feed entries after `after` (the feed API gives only the last).
fn feed_positions(from: &RelayLog, ns: &str, after: u64, n: usize) -> Result<Vec<u64>, StoreError> {
    let mut out = Vec::with_capacity(n);
    let mut cursor = after;
    for _ in 0..n {
        let (_, next, _) = RelayLog::feed(from, ns, cursor, 1)?;
        out.push(next);
        cursor = next;
    }
    Ok(out)
}
