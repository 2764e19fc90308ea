//! Persistence for a device: the change journal, chunked snapshots, per-document metadata, the
//! outbox of changes no relay has acknowledged yet, and sync metadata. The store knows nothing of
//! the network and nothing of Automerge's internals: it keeps bytes, in order, durably.
//!
//! Key spaces (one ordered keyspace, a one-byte tag in front, big-endian numbers so that a
//! prefix scan returns a document's entries in order):
//!
//! | tag | key | value |
//! |---|---|---|
//! | `c` | doc, seq, chunk | a chunk (≤ 4 KiB) of one raw Automerge change |
//! | `s` | doc, generation, chunk | a chunk of a saved document |
//! | `m` | doc | [`DocMeta`] (bincode) |
//! | `o` | doc, seq | outbox entry: the time the change was made |
//! | `y` | name | sync metadata: format version, device id, relay identity, feed cursors |
//!
//! All keyspaces live in one sled tree so that a write (change + meta + outbox) is one atomic
//! `apply_batch`. Every value is at most [`CHUNK`] bytes: sled writes a node bigger than ~128 KiB
//! to a blob file that it never fsyncs, so large values are split into chunks.
//!
//! A write is durable once it is in the write-ahead log (`wal.rs`), not when sled flushes:
//! sled catches up in the background and the log is replayed into it on open.

mod backend;
mod behind;
mod group_commit;
mod wal;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use backend::{Backend, Batch, Entries, MemoryBackend, SledBackend};
pub(crate) use group_commit::GroupCommit;

use crate::ids::{DeviceId, DocId};

/// The largest value the store writes.
pub const CHUNK: usize = 4096;

/// The store format this code writes; opening a newer one is refused.
pub const FORMAT_VERSION: u32 = 1;

/// The largest single change the store keeps (its chunk index is 2 bytes wide).
pub const MAX_CHANGE_BYTES: usize = CHUNK * 65_535;

/// Most heads kept in [`DocMeta`] (a cache: the document itself is the truth).
const MAX_META_HEADS: usize = 16;

/// Upper bound for a decoded metadata record.
const META_LIMIT: usize = CHUNK;

const T_CHANGE: u8 = b'c';
const T_SNAPSHOT: u8 = b's';
const T_META: u8 = b'm';
const T_OUTBOX: u8 = b'o';
const T_SYNC: u8 = b'y';

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process, or another live handle in this one, has the store open.
    #[error("store {path} is already open{}", pid.map(|p| format!(" (by pid {p})")).unwrap_or_default())]
    InUse { path: PathBuf, pid: Option<u32> },
    /// The store was written by a newer tandem.
    #[error("store format {found} is newer than this tandem understands ({FORMAT_VERSION}); upgrade tandem")]
    NewerFormat { found: u32 },
    /// Stored bytes are damaged.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// A document was quarantined because its stored bytes do not load.
    #[error("document {doc} is quarantined: {reason}")]
    Quarantined { doc: DocId, reason: String },
    /// The disk or sled failed.
    #[error("store I/O failed: {0}")]
    Io(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// What the store keeps about a document besides its bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DocMeta {
    /// The namespace the document belongs to (fixed by its first push).
    pub namespace: String,
    /// Entity type, as last seen.
    pub ty: String,
    /// Schema version, as last seen.
    pub schema: u64,
    /// Heads, as last seen (at most 16).
    pub heads: Vec<[u8; 32]>,
    /// Next journal sequence number.
    pub next_seq: u64,
    /// The generation of the current snapshot (0: none).
    pub snapshot_gen: u64,
    /// Number of snapshot chunks of the current generation.
    pub snapshot_chunks: u32,
    /// Journal entries with seq below this are contained in the snapshot.
    pub snapshot_covers: u64,
    /// Changes and bytes in the journal since the snapshot: drives compaction.
    pub tail_changes: u64,
    pub tail_bytes: u64,
    /// The last relay log seq applied to this document.
    pub relay_seq: u64,
    /// Local changes not yet acknowledged by a relay.
    pub pending: u64,
    /// When the oldest of those was made (ms since the epoch).
    pub oldest_pending_ms: Option<i64>,
    /// Whether the entity is deleted (a cache for listing).
    pub deleted: bool,
    /// Set when the stored bytes do not load: why.
    pub quarantined: Option<String>,
}

/// A document as stored: its snapshot (if any) and the journal tail after it.
pub struct Stored {
    pub meta: DocMeta,
    pub snapshot: Option<Vec<u8>>,
    pub tail: Vec<(u64, Vec<u8>)>,
}

/// Options for opening a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// fdatasync the write-ahead log at each (group) commit, and sled's data file at each
    /// checkpoint. Without it a commit only writes the log, which survives a process kill but
    /// not a power cut.
    pub fsync: bool,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            fsync: true,
            cache_bytes: 64 << 20,
        }
    }
}

/// The device store. Cheap to share behind an `Arc`; all methods block (call them from a
/// plain thread or `spawn_blocking`, never from an async task).
pub struct Store {
    backend: Box<dyn Backend>,
    commit: GroupCommit,
    path: Option<PathBuf>,
    device: DeviceId,
    /// Per document written since open, a seq above every journal entry it has: the
    /// journal's greatest key, read once, then moved past the seqs each append takes before
    /// it writes them (entries are only ever added that way, or removed below it by
    /// compaction). Reading that key on every append cost ~15% of a small write. ~40 bytes
    /// per document.
    next_seqs: Mutex<HashMap<DocId, u64>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn key(tag: u8, doc: &DocId, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 16 + 16);
    k.push(tag);
    k.extend_from_slice(doc.as_bytes());
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

fn sync_key(name: &str) -> Vec<u8> {
    let mut k = vec![T_SYNC];
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<META_LIMIT>()
}

fn encode_meta(meta: &DocMeta) -> Result<Vec<u8>, StoreError> {
    let mut m = meta.clone();
    m.heads.truncate(MAX_META_HEADS);
    let bytes = bincode::serde::encode_to_vec(&m, bincode_cfg())
        .map_err(|e| StoreError::Corrupt(format!("document metadata does not encode: {e}")))?;
    if bytes.len() > CHUNK {
        return Err(StoreError::Corrupt(format!(
            "document metadata of {} bytes exceeds {CHUNK}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn decode_meta(bytes: &[u8]) -> Result<DocMeta, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode_cfg())
        .map(|(m, _)| m)
        .map_err(|e| StoreError::Corrupt(format!("document metadata: {e}")))
}

/// A value stored in chunks under `prefix`, put back together; `None` when no chunk is there.
/// With `expected`, a different number of chunks is corruption (a torn or damaged write).
pub(crate) fn read_value(
    backend: &dyn Backend,
    prefix: &[u8],
    expected: Option<u32>,
) -> Result<Option<Vec<u8>>, StoreError> {
    let chunks = backend.scan(prefix)?;
    if let Some(n) = expected {
        if chunks.len() != n as usize {
            return Err(StoreError::Corrupt(format!(
                "a value has {} of its {n} chunks",
                chunks.len()
            )));
        }
    }
    if chunks.is_empty() {
        return Ok(None);
    }
    Ok(Some(chunks.into_iter().flat_map(|(_, v)| v).collect()))
}

/// Chunked values keyed by a big-endian u64 right after `prefix`: (number, bytes) in order.
pub(crate) fn read_values(
    backend: &dyn Backend,
    prefix: &[u8],
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (k, v) in backend.scan(prefix)? {
        let n = k
            .get(prefix.len()..)
            .and_then(be_u64)
            .ok_or_else(|| StoreError::Corrupt("a chunk key".into()))?;
        match out.last_mut() {
            Some((s, bytes)) if *s == n => bytes.extend_from_slice(&v),
            _ => out.push((n, v)),
        }
    }
    Ok(out)
}

/// Split `bytes` into ≤ 4 KiB chunks, keyed by `prefix` + chunk index.
pub(crate) fn put_chunks(
    batch: &mut Batch,
    prefix: Vec<u8>,
    bytes: &[u8],
    index_width: usize,
) -> u32 {
    let mut n = 0u32;
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        let mut k = prefix.clone();
        k.extend_from_slice(&(i as u64).to_be_bytes()[8 - index_width..]);
        batch.put(k, chunk.to_vec());
        n += 1;
    }
    if bytes.is_empty() {
        let mut k = prefix;
        k.extend_from_slice(&0u64.to_be_bytes()[8 - index_width..]);
        batch.put(k, Vec::new());
        n = 1;
    }
    n
}

impl Store {
    /// Open (or create) a store folder. A folder another process holds gives
    /// [`StoreError::InUse`] with that process's pid.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let backend = SledBackend::open(&path, &opts)?;
        let store = Store::with_backend(Box::new(backend), Some(path), None)?;
        Ok(store)
    }

    /// A device store over an already opened backend (see [`SledBackend::open`]).
    pub fn from_backend(
        backend: Box<dyn Backend>,
        path: Option<PathBuf>,
    ) -> Result<Store, StoreError> {
        Store::with_backend(backend, path, None)
    }

    /// Like [`from_backend`](Self::from_backend), but a new store gets the identity `device`
    /// instead of a random one (an existing store keeps its own). For simulations, whose runs
    /// must derive everything from their seed: the device id is also the Automerge actor, and
    /// actors decide ties.
    pub fn from_backend_as(
        backend: Box<dyn Backend>,
        path: Option<PathBuf>,
        device: DeviceId,
    ) -> Result<Store, StoreError> {
        Store::with_backend(backend, path, Some(device))
    }

    /// A store that lives in memory only (tests, simulations, ephemeral tools).
    pub fn in_memory() -> Store {
        Store::with_backend(Box::new(MemoryBackend::default()), None, None).expect("memory store")
    }

    fn with_backend(
        backend: Box<dyn Backend>,
        path: Option<PathBuf>,
        new_device: Option<DeviceId>,
    ) -> Result<Store, StoreError> {
        let format = backend.get(&sync_key("format"))?;
        let mut batch = Batch::default();
        match format {
            Some(v) => {
                let found = u32::from_be_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("format version".into()))?,
                );
                if found > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat { found });
                }
            }
            None => batch.put(sync_key("format"), FORMAT_VERSION.to_be_bytes().to_vec()),
        }
        let device = match backend.get(&sync_key("device"))? {
            Some(v) => DeviceId(
                v.as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("device id".into()))?,
            ),
            None => {
                let d = new_device.unwrap_or_else(DeviceId::random);
                batch.put(sync_key("device"), d.0.to_vec());
                d
            }
        };
        let store = Store {
            backend,
            commit: GroupCommit::default(),
            path,
            device,
            next_seqs: Mutex::new(HashMap::new()),
        };
        if !batch.is_empty() {
            store.commit.write(&*store.backend, batch)?;
            store.durable()?;
        }
        Ok(store)
    }

    /// The folder, for an on-disk store.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// This device's identity (made when the store was created).
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Make everything written so far durable. Concurrent callers share one flush.
    pub fn durable(&self) -> Result<(), StoreError> {
        self.commit.sync(&*self.backend)
    }

    /// (durability requests, flushes run) since open: their ratio is how well group commit
    /// batches.
    pub fn flush_counts(&self) -> (u64, u64) {
        self.commit.counts()
    }

    /// The metadata of one document.
    pub fn meta(&self, doc: &DocId) -> Result<Option<DocMeta>, StoreError> {
        self.backend
            .get(&key(T_META, doc, &[]))?
            .map(|b| decode_meta(&b))
            .transpose()
    }

    /// Every document with its metadata, in id order.
    pub fn list(&self) -> Result<Vec<(DocId, DocMeta)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.backend.scan(&[T_META])? {
            let id: [u8; 16] = k
                .get(1..17)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("metadata key".into()))?;
            out.push((DocId(id), decode_meta(&v)?));
        }
        Ok(out)
    }

    /// Read a document's snapshot and journal tail.
    pub fn load(&self, doc: &DocId) -> Result<Option<Stored>, StoreError> {
        let Some(meta) = self.meta(doc)? else {
            return Ok(None);
        };
        if let Some(reason) = &meta.quarantined {
            return Err(StoreError::Quarantined {
                doc: *doc,
                reason: reason.clone(),
            });
        }
        let snapshot = if meta.snapshot_gen > 0 {
            let prefix = key(T_SNAPSHOT, doc, &[&meta.snapshot_gen.to_be_bytes()]);
            read_value(&*self.backend, &prefix, Some(meta.snapshot_chunks))
                .map_err(|e| StoreError::Corrupt(format!("snapshot of {doc}: {e}")))?
        } else {
            None
        };
        Ok(Some(Stored {
            tail: self.journal(doc)?,
            meta,
            snapshot,
        }))
    }

    /// The journal entries of a document: (seq, change bytes), in seq order.
    fn journal(&self, doc: &DocId) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        read_values(&*self.backend, &key(T_CHANGE, doc, &[]))
    }

    /// Append changes to a document's journal and make them durable before returning. Local
    /// changes also go to the outbox. `meta` is updated (seqs, pending, tail) and written in the
    /// same atomic batch. Returns the journal seqs given to the changes.
    pub fn append(
        &self,
        doc: &DocId,
        meta: &mut DocMeta,
        changes: &[Vec<u8>],
        local: bool,
    ) -> Result<Vec<u64>, StoreError> {
        let mut batch = Batch::default();
        let now = now_ms();
        let mut seqs = Vec::with_capacity(changes.len());
        // The journal says which seqs are taken (read once per document, then kept in
        // `next_seqs`): a stale copy of the metadata must never make a write overwrite an
        // earlier one. The seqs are reserved before the batch is written, so a concurrent
        // append to the same document takes later ones.
        let journal = if self.next_seqs().contains_key(doc) {
            0
        } else {
            self.backend
                .last(&key(T_CHANGE, doc, &[]))?
                .and_then(|k| be_u64(k.get(17..)?))
                .map_or(0, |s| s + 1)
        };
        let mut next = {
            let mut reserved = self.next_seqs();
            let taken = reserved.entry(*doc).or_default();
            let first = meta
                .next_seq
                .max(meta.snapshot_covers)
                .max(journal)
                .max(*taken)
                .max(1);
            *taken = first + changes.len() as u64;
            first
        };
        for c in changes {
            if c.len() > MAX_CHANGE_BYTES {
                return Err(StoreError::Corrupt(format!(
                    "a change of {} bytes is over the {MAX_CHANGE_BYTES}-byte limit",
                    c.len()
                )));
            }
            let seq = next;
            next += 1;
            put_chunks(&mut batch, key(T_CHANGE, doc, &[&seq.to_be_bytes()]), c, 2);
            if local {
                batch.put(
                    key(T_OUTBOX, doc, &[&seq.to_be_bytes()]),
                    now.to_be_bytes().to_vec(),
                );
            }
            meta.tail_changes += 1;
            meta.tail_bytes += c.len() as u64;
            seqs.push(seq);
        }
        meta.next_seq = next;
        if local && !changes.is_empty() {
            meta.pending += changes.len() as u64;
            meta.oldest_pending_ms.get_or_insert(now);
        }
        batch.put(key(T_META, doc, &[]), encode_meta(meta)?);
        self.commit.write(&*self.backend, batch)?;
        self.durable()?;
        Ok(seqs)
    }

    fn next_seqs(&self) -> std::sync::MutexGuard<'_, HashMap<DocId, u64>> {
        self.next_seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write a document's metadata alone (durable on return).
    pub fn put_meta(&self, doc: &DocId, meta: &DocMeta) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.put(key(T_META, doc, &[]), encode_meta(meta)?);
        self.commit.write(&*self.backend, batch)?;
        self.durable()
    }

    /// The local changes of a document that no relay has acknowledged: (seq, bytes). Only what
    /// is durable is returned (a change pushed before its local flush could be acknowledged by a
    /// relay and then lost here, and its (actor, seq) reused).
    pub fn outbox(&self, doc: &DocId) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let pending: Vec<u64> = self
            .backend
            .scan_keys(&key(T_OUTBOX, doc, &[]))?
            .iter()
            .filter_map(|k| be_u64(&k[17..]))
            .collect();
        let mut out = Vec::with_capacity(pending.len());
        for seq in pending {
            let change = read_value(
                &*self.backend,
                &key(T_CHANGE, doc, &[&seq.to_be_bytes()]),
                None,
            )?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("outbox entry {seq} of {doc} has no journal entry"))
            })?;
            out.push((seq, change));
        }
        // After the read, so that a write applied while we read is durable too.
        self.durable()?;
        Ok(out)
    }

    /// Documents with outbox entries.
    pub fn outbox_docs(&self) -> Result<Vec<DocId>, StoreError> {
        self.durable()?;
        let mut out: Vec<DocId> = Vec::new();
        for k in self.backend.scan_keys(&[T_OUTBOX])? {
            let id = DocId(
                k.get(1..17)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| StoreError::Corrupt("outbox key".into()))?,
            );
            if out.last() != Some(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// A relay acknowledged these journal seqs: remove them from the outbox (durably).
    pub fn ack(&self, doc: &DocId, meta: &mut DocMeta, seqs: &[u64]) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for s in seqs {
            batch.remove(key(T_OUTBOX, doc, &[&s.to_be_bytes()]));
        }
        let remaining: backend::Entries = self
            .backend
            .scan(&key(T_OUTBOX, doc, &[]))?
            .into_iter()
            .filter(|(k, _)| be_u64(&k[17..]).is_some_and(|s| !seqs.contains(&s)))
            .collect();
        meta.pending = remaining.len() as u64;
        meta.oldest_pending_ms = remaining
            .iter()
            .filter_map(|(_, v)| Some(i64::from_be_bytes(v.as_slice().try_into().ok()?)))
            .min();
        batch.put(key(T_META, doc, &[]), encode_meta(meta)?);
        self.commit.write(&*self.backend, batch)?;
        self.durable()
    }

    /// Replace the journal up to `covers` with a snapshot. The snapshot (new generation) and the
    /// metadata pointing at it are made durable first; only then are the old generation and the
    /// covered journal entries deleted — and never an entry still in the outbox, which the push
    /// path reads from the journal.
    pub fn compact(
        &self,
        doc: &DocId,
        meta: &mut DocMeta,
        snapshot: &[u8],
        covers: u64,
    ) -> Result<(), StoreError> {
        let old_gen = meta.snapshot_gen;
        let gen = old_gen + 1;
        let mut batch = Batch::default();
        meta.snapshot_chunks = put_chunks(
            &mut batch,
            key(T_SNAPSHOT, doc, &[&gen.to_be_bytes()]),
            snapshot,
            4,
        );
        meta.snapshot_gen = gen;
        meta.snapshot_covers = covers;
        // What stays in the tail: the journal from `covers` on (read from there, not whole).
        let prefix = key(T_CHANGE, doc, &[]);
        let from = key(T_CHANGE, doc, &[&covers.to_be_bytes()]);
        let (mut changes, mut bytes, mut last) = (0u64, 0u64, None);
        for (k, v) in self.backend.scan_from(&prefix, &from, usize::MAX)? {
            let seq = k.get(prefix.len()..).and_then(be_u64);
            if seq != last {
                changes += 1;
                last = seq;
            }
            bytes += v.len() as u64;
        }
        meta.tail_changes = changes;
        meta.tail_bytes = bytes;
        batch.put(key(T_META, doc, &[]), encode_meta(meta)?);
        self.commit.write(&*self.backend, batch)?;
        self.durable()?;
        // The new snapshot is durable and the metadata points at it: from here on the cleanup
        // is best effort (what it misses is retried by the next compaction).
        if let Err(e) = self.drop_covered(doc, covers, gen) {
            tracing::warn!(%doc, error = %e, "could not delete a compacted journal prefix");
        }
        Ok(())
    }

    /// Delete journal entries below `covers` (except outbox entries) and every snapshot
    /// generation older than `gen`.
    fn drop_covered(&self, doc: &DocId, covers: u64, gen: u64) -> Result<(), StoreError> {
        let outbox: HashSet<u64> = self
            .backend
            .scan_keys(&key(T_OUTBOX, doc, &[]))?
            .iter()
            .filter_map(|k| be_u64(&k[17..]))
            .collect();
        let mut batch = Batch::default();
        for k in self.backend.scan_keys(&key(T_CHANGE, doc, &[]))? {
            if let Some(seq) = be_u64(&k[17..]) {
                if seq < covers && !outbox.contains(&seq) {
                    batch.remove(k);
                }
            }
        }
        for k in self.backend.scan_keys(&key(T_SNAPSHOT, doc, &[]))? {
            if be_u64(&k[17..]).is_some_and(|g| g < gen) {
                batch.remove(k);
            }
        }
        self.commit.write(&*self.backend, batch)?;
        self.durable()
    }

    /// Mark a document whose bytes do not load: it is set aside with the reason (its data stays
    /// in place for inspection) and reported instead of loaded.
    pub fn quarantine(&self, doc: &DocId, reason: &str) -> Result<(), StoreError> {
        let mut meta = self.meta(doc)?.unwrap_or_default();
        let reason: String = reason.chars().take(512).collect();
        meta.quarantined = Some(reason);
        self.put_meta(doc, &meta)
    }

    /// Clear a quarantine (after repairing or replacing the document's data).
    pub fn release(&self, doc: &DocId) -> Result<(), StoreError> {
        if let Some(mut meta) = self.meta(doc)? {
            meta.quarantined = None;
            self.put_meta(doc, &meta)?;
        }
        Ok(())
    }

    /// Read a sync metadata value.
    pub fn sync_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(&sync_key(name))
    }

    /// Write a sync metadata value (durable on return; at most 4 KiB).
    pub fn sync_put(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        if value.len() > CHUNK {
            return Err(StoreError::Io(format!(
                "sync value '{name}' exceeds {CHUNK} bytes"
            )));
        }
        let mut batch = Batch::default();
        batch.put(sync_key(name), value.to_vec());
        self.commit.write(&*self.backend, batch)?;
        self.durable()
    }

    /// Raw access for tests and tools that need to damage or inspect stored bytes.
    #[doc(hidden)]
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An append with an old copy of the metadata still takes fresh seqs: nothing in the journal
    /// is overwritten, whether the store knows the journal's end from this process or must read
    /// it (after a reopen), and after compaction dropped the entries below the snapshot.
    #[test]
    fn a_stale_metadata_copy_never_overwrites_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            fsync: false,
            ..StoreOptions::default()
        };
        let doc = DocId::generate();
        let change = |i: u8| vec![i; 10];
        let mut all = Vec::new();
        let stale_after_compaction;
        {
            let store = Store::open(dir.path(), opts.clone()).unwrap();
            let mut meta = DocMeta::default();
            let stale = meta.clone();
            all.extend(
                store
                    .append(&doc, &mut meta, &[change(1), change(2)], true)
                    .unwrap(),
            );
            all.extend(
                store
                    .append(&doc, &mut stale.clone(), &[change(3)], true)
                    .unwrap(),
            );
            // Compaction drops what the snapshot covers (the outbox keeps local changes, so
            // these are remote).
            let mut meta = store.meta(&doc).unwrap().unwrap();
            all.extend(store.append(&doc, &mut meta, &[change(4)], false).unwrap());
            let covers = meta.next_seq;
            store.compact(&doc, &mut meta, b"snapshot", covers).unwrap();
            stale_after_compaction = meta.clone();
            all.extend(store.append(&doc, &mut meta, &[change(5)], false).unwrap());
            let mut stale = stale_after_compaction.clone();
            all.extend(store.append(&doc, &mut stale, &[change(6)], false).unwrap());
        }
        let store = Store::open(dir.path(), opts).unwrap();
        let mut stale = stale_after_compaction.clone();
        all.extend(store.append(&doc, &mut stale, &[change(7)], false).unwrap());
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, all, "seqs given twice or out of order: {all:?}");
        let stored = store.load(&doc).unwrap().unwrap();
        assert_eq!(stored.snapshot.as_deref(), Some(&b"snapshot"[..]));
        let journal: Vec<Vec<u8>> = stored.tail.into_iter().map(|(_, c)| c).collect();
        // 1–3 are local (kept for the outbox), 4 is in the snapshot.
        for i in [1, 2, 3, 5, 6, 7] {
            assert!(journal.contains(&change(i)), "change {i} lost: {journal:?}");
        }
    }

    /// What a clean stop does, a close then `checkpoint_closed`, keeps every write and leaves
    /// no log file behind.
    #[test]
    fn a_checkpointed_folder_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = SledBackend::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = Batch::default();
            for i in 0..100u32 {
                batch.put(i.to_be_bytes().to_vec(), vec![i as u8; 100]);
            }
            b.write(batch).unwrap();
            b.sync().unwrap();
        }
        SledBackend::checkpoint_closed(dir.path()).unwrap();
        let logs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("wal-")
            })
            .count();
        assert_eq!(logs, 0);
        let b = SledBackend::open(dir.path(), &StoreOptions::default()).unwrap();
        let kept = b.scan(&[0, 0, 0]).unwrap();
        assert_eq!(kept.len(), 100);
        assert!(kept.iter().all(|(k, v)| v == &vec![k[3]; 100]));
    }

    /// Compaction counts the tail it leaves from the journal past `covers` (chunked changes
    /// once each) and drops below it only what the outbox does not hold.
    #[test]
    fn compaction_counts_the_tail_it_leaves_and_keeps_the_outbox() {
        let store = Store::in_memory();
        let doc = DocId::generate();
        let mut meta = DocMeta::default();
        let big = vec![9u8; CHUNK * 2 + 1];
        let local = store.append(&doc, &mut meta, &[vec![1; 10]], true).unwrap();
        let remote = store
            .append(&doc, &mut meta, &[vec![2; 20], vec![3; 30]], false)
            .unwrap();
        store
            .append(&doc, &mut meta, &[big.clone(), vec![4; 40]], false)
            .unwrap();
        store.compact(&doc, &mut meta, b"snap", remote[1]).unwrap();
        assert_eq!(meta.tail_changes, 3, "seqs {} onward", remote[1]);
        assert_eq!(meta.tail_bytes, 30 + big.len() as u64 + 40);
        let tail: Vec<u64> = store
            .load(&doc)
            .unwrap()
            .unwrap()
            .tail
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(
            tail,
            vec![local[0], remote[1], remote[1] + 1, remote[1] + 2]
        );
    }
}
