//! The relay's durable state: per-document change logs with a hash index, a catalog feed per
//! namespace, compacted snapshots, and the relay's identity. Socket-free and synchronous (it
//! blocks on sled: call it from `spawn_blocking`), so the relay's rules are tested without a
//! network.
//!
//! The relay never holds documents in memory on the push path: whether a change is new, a
//! duplicate, a reuse of an (actor, seq) with other bytes, or missing a dependency is decided
//! from the hash index alone. It loads a document only to compact its log.
//!
//! Key spaces (one sled tree, a tag byte in front, big-endian numbers). A document's own keys
//! sit together under `d` and its id, so that a push touches one place in the tree, not one
//! per index:
//!
//! | key | value |
//! |---|---|
//! | `d`, doc, 0 | the document's [`DocRecord`] and the position of its latest feed entry |
//! | `d`, doc, `L`, seq, chunk | a chunk (≤ 4 KiB) of: total log bytes up to and including seq (8 bytes, for `remaining_bytes`), then the change with that log seq |
//! | `d`, doc, `H`, hash | seq of the change with that hash |
//! | `d`, doc, `A`, actor len, actor, actor seq | hash of that (actor, seq) |
//! | `d`, doc, `S`, generation, chunk | a chunk of a compacted snapshot |
//! | `F`, namespace, 0, position | feed entry: doc, seq (one per document: older ones are dropped) |
//! | `R`, name | relay metadata: identity (and after it, the storage format), feed position counter |
//!
//! Format 1 (whose identity is the bare id) kept each index under its own tag in front of the
//! document id; [`RelayLog::with_backend`] rewrites such data into this layout once (see
//! `upgrade`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use automerge::{Automerge, Change, ChangeHash};
use serde::{Deserialize, Serialize};

use crate::ids::DocId;
use crate::store::{
    be_u64, key, put_chunks, read_value, read_values, Backend, Batch, GroupCommit, MemoryBackend,
    SledBackend, StoreError, StoreOptions, CHUNK,
};
use crate::transport::FeedEntry;

/// A document's keys.
const T_DOCS: u8 = b'd';
const T_FEED: u8 = b'F';
const T_META: u8 = b'R';
/// Within a document's keys: its record first, so that [`RelayLog::documents`] finds each
/// document's record as the first of its keys.
const D_RECORD: u8 = 0;
const D_ACTOR: u8 = b'A';
const D_HASH: u8 = b'H';
const D_LOG: u8 = b'L';
const D_SNAP: u8 = b'S';
/// Where the part of a document key after its sub-tag starts: `d`, 16 bytes of id, sub-tag.
const D_REST: usize = 18;
/// The storage layout this code writes (`R format`).
const FORMAT: u8 = 2;

/// The relay's default page cache (see [`RelayLog::open_with_cache`]). A push reads only the
/// pushed document's record and hash index and writes its log tail, and a pull mostly reads
/// what was pushed moments ago, so the hot set is the documents in use right now, not every
/// document held; a relay with more busy documents than fit raises it with `--cache-mb`.
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 20;

/// What the relay keeps about a document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DocRecord {
    pub namespace: String,
    /// The last log seq.
    pub head: u64,
    /// Total bytes of all changes ever logged.
    pub log_bytes: u64,
    /// Seqs up to this one are only in the snapshot (0: never compacted).
    pub compacted_upto: u64,
    pub snapshot_gen: u64,
    pub snapshot_chunks: u32,
}

/// Why a push was refused (nothing of it was stored).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PushError {
    #[error("change {index} is not a valid Automerge change: {reason}")]
    BadChange { index: usize, reason: String },
    #[error("change {index}: ({actor}, {seq}) is already in the log with another hash")]
    HashMismatch {
        index: usize,
        actor: String,
        seq: u64,
    },
    #[error("document belongs to namespace '{0}'")]
    WrongNamespace(String),
    #[error("change {index} depends on changes the relay does not have")]
    NeedHistory { index: usize },
    #[error("storage failed: {0}")]
    Storage(String),
}

impl From<StoreError> for PushError {
    fn from(e: StoreError) -> Self {
        PushError::Storage(e.to_string())
    }
}

/// An accepted push.
#[derive(Clone, Debug, PartialEq)]
pub struct Pushed {
    /// The log seq of each pushed change, in push order (a duplicate keeps its seq).
    pub seqs: Vec<u64>,
    /// The changes that were new: (first seq, bytes in seq order). Empty when all were known.
    pub new_from: u64,
    pub new_changes: Vec<Vec<u8>>,
}

/// One page of a pull.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub namespace: String,
    pub from: u64,
    pub to: u64,
    pub changes: Vec<Vec<u8>>,
    pub more: bool,
    pub remaining_bytes: u64,
    /// Present when the cursor was older than the compaction point: the saved document with
    /// seqs 1..=upto, sent before the page.
    pub snapshot: Option<(u64, Vec<u8>)>,
}

/// Counters the relay exports on /metrics.
#[derive(Default)]
pub struct LogStats {
    pub pushes: AtomicU64,
    pub changes_accepted: AtomicU64,
    pub changes_duplicate: AtomicU64,
    pub pushes_refused: AtomicU64,
    pub pulls: AtomicU64,
    pub pulled_changes: AtomicU64,
    pub pulled_bytes: AtomicU64,
    pub feed_pages: AtomicU64,
    pub compactions: AtomicU64,
}

/// The relay's storage.
pub struct RelayLog {
    backend: Box<dyn Backend>,
    commit: GroupCommit,
    /// Serialises validate-and-append (microseconds: parsing happens before, the flush after),
    /// so seqs and feed positions are gap-free and the hash index is consistent.
    append: Mutex<()>,
    feed_pos: AtomicU64,
    relay_id: [u8; 16],
    pub stats: LogStats,
    /// Compact a document's log once this many changes sit after its snapshot.
    pub compact_after: u64,
    compacting: Mutex<HashSet<DocId>>,
}

fn ns_key(tag: u8, ns: &str, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + ns.len() + 24);
    k.push(tag);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

/// The stored identity: the id, then the storage format (format 1 stored the id alone, so a
/// tandem from before format 2 refuses this value as a damaged id instead of reading a layout
/// it does not know as an empty relay).
fn id_value(id: &[u8; 16]) -> Vec<u8> {
    let mut v = id.to_vec();
    v.push(FORMAT);
    v
}

/// (relay id, storage format) from the stored identity.
fn stored_id(v: &[u8]) -> Result<([u8; 16], u8), StoreError> {
    let id = v
        .get(..16)
        .and_then(|id| id.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("relay id".into()))?;
    match v.len() {
        16 => Ok((id, 1)),
        17 => Ok((id, v[16])),
        _ => Err(StoreError::Corrupt("relay id".into())),
    }
}

/// A key among `doc`'s own.
fn doc_key(sub: u8, doc: &DocId, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(D_REST + 48);
    k.push(T_DOCS);
    k.extend_from_slice(doc.as_bytes());
    k.push(sub);
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut k = vec![T_META];
    k.extend_from_slice(name.as_bytes());
    k
}

fn cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<CHUNK>()
}

/// A document's record as stored: with the position of its latest feed entry (0: none).
fn encode_record(r: &DocRecord, feed_pos: u64) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec((r, feed_pos), cfg()).map_err(|e| StoreError::Io(e.to_string()))
}

fn decode_record(b: &[u8]) -> Result<(DocRecord, u64), StoreError> {
    bincode::serde::decode_from_slice(b, cfg())
        .map(|(r, _)| r)
        .map_err(|e| StoreError::Corrupt(format!("document record: {e}")))
}

/// A log entry as stored: the log's total bytes up to and including it, then the change.
fn log_value(cum: u64, change: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + change.len());
    v.extend_from_slice(&cum.to_be_bytes());
    v.extend_from_slice(change);
    v
}

/// (total log bytes up to and including it, the change) of a stored log entry.
fn split_log_value(mut v: Vec<u8>) -> Result<(u64, Vec<u8>), StoreError> {
    let cum = be_u64(&v).ok_or_else(|| StoreError::Corrupt("log entry".into()))?;
    v.drain(..8);
    Ok((cum, v))
}

/// A namespace name the relay accepts: it is part of keys, so no NUL, and bounded; and not
/// `*`, which in a hello stands for every namespace.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 128
        && !ns.chars().any(|c| c.is_control())
        && ns != crate::transport::ALL_NAMESPACES
}

impl RelayLog {
    /// Open (or create) the relay's folder, with sled's page cache at
    /// [`DEFAULT_CACHE_BYTES`].
    pub fn open(path: impl AsRef<Path>) -> Result<RelayLog, StoreError> {
        RelayLog::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) the relay's folder with a page cache of at most `cache_bytes` (as
    /// sled counts them: the pages' stored size; the memory they take is about twice that).
    pub fn open_with_cache(
        path: impl AsRef<Path>,
        cache_bytes: u64,
    ) -> Result<RelayLog, StoreError> {
        let opts = StoreOptions {
            cache_bytes,
            ..StoreOptions::default()
        };
        let backend = SledBackend::open(path.as_ref(), &opts)?;
        RelayLog::with_backend(Box::new(backend))
    }

    /// A relay log in memory (tests).
    pub fn in_memory() -> RelayLog {
        RelayLog::with_backend(Box::new(MemoryBackend::default())).expect("memory relay log")
    }

    /// Whether `backend` holds a relay's data (rather than a device store's).
    pub fn is_relay_data(backend: &dyn Backend) -> Result<bool, StoreError> {
        Ok(backend.get(&meta_key("id"))?.is_some())
    }

    /// A relay log over an already opened backend.
    pub fn with_backend(backend: Box<dyn Backend>) -> Result<RelayLog, StoreError> {
        RelayLog::with_backend_as(backend, rand::random())
    }

    /// Like [`with_backend`](Self::with_backend), but new storage gets the identity
    /// `relay_id` instead of a random one (existing storage keeps its own). For simulations,
    /// whose runs must derive everything from their seed.
    pub fn with_backend_as(
        backend: Box<dyn Backend>,
        relay_id: [u8; 16],
    ) -> Result<RelayLog, StoreError> {
        let mut batch = Batch::default();
        let (relay_id, format) = match backend.get(&meta_key("id"))? {
            Some(v) => stored_id(&v)?,
            None => {
                batch.put(meta_key("id"), id_value(&relay_id));
                (relay_id, FORMAT)
            }
        };
        if format != 1 && format != FORMAT {
            return Err(StoreError::Corrupt(format!(
                "relay data in storage format {format}: this tandem reads format {FORMAT} (and \
                 upgrades format 1); a newer tandem wrote it"
            )));
        }
        let feed_pos = match backend.get(&meta_key("feedpos"))? {
            Some(v) => be_u64(&v).ok_or_else(|| StoreError::Corrupt("feed position".into()))?,
            None => 0,
        };
        let log = RelayLog {
            backend,
            commit: GroupCommit::default(),
            append: Mutex::new(()),
            feed_pos: AtomicU64::new(feed_pos),
            relay_id,
            stats: LogStats::default(),
            compact_after: 10_000,
            compacting: Mutex::new(HashSet::new()),
        };
        if !batch.is_empty() {
            log.commit.write(&*log.backend, batch)?;
            log.durable()?;
        }
        if format == 1 {
            log.upgrade()?;
        }
        Ok(log)
    }

    /// Whether `backend` holds relay data in an older storage format, which opening it as a
    /// [`RelayLog`] rewrites.
    pub fn needs_upgrade(backend: &dyn Backend) -> Result<bool, StoreError> {
        match backend.get(&meta_key("id"))? {
            Some(v) => Ok(stored_id(&v)?.1 < FORMAT),
            None => Ok(false),
        }
    }

    /// Give the relay a new identity (after restoring an older backup): devices then reset
    /// their cursors and re-push everything, so nothing newer than the backup is lost.
    pub fn new_identity(&mut self) -> Result<[u8; 16], StoreError> {
        let id: [u8; 16] = rand::random();
        let mut batch = Batch::default();
        batch.put(meta_key("id"), id_value(&id));
        self.commit.write(&*self.backend, batch)?;
        self.durable()?;
        self.relay_id = id;
        Ok(id)
    }

    /// Made when this storage was created; a client that sees another one re-pushes.
    pub fn relay_id(&self) -> [u8; 16] {
        self.relay_id
    }

    /// Rewrite format-1 data into this layout, document by document, in batches of bounded
    /// size (a log or an index may be long): each batch writes entries in the new layout and
    /// removes their old keys, and a document's record moves last. A crash part way leaves
    /// the document's old record in place, and the next open goes on with what is left of it
    /// (every moved entry is gone from the old layout). The identity, rewritten with the new
    /// format, comes after every document.
    fn upgrade(&self) -> Result<(), StoreError> {
        const V1_DOC: u8 = b'D';
        const V1_LOG: u8 = b'L';
        const V1_CUM: u8 = b'I';
        const V1_FEEDPOS: u8 = b'P';
        // Moved with their key's tail and value; the running totals left after the log moved
        // (those of compacted seqs) are dropped.
        const V1_MOVED: [(u8, Option<u8>); 4] = [
            (b'H', Some(D_HASH)),
            (b'A', Some(D_ACTOR)),
            (b'S', Some(D_SNAP)),
            (V1_CUM, None),
        ];
        const BATCH_KEYS: usize = 256;
        const BATCH_BYTES: usize = 1 << 20;
        let mut upgraded = 0u64;
        while let Some((k, v)) = self.backend.scan_from(&[V1_DOC], &[V1_DOC], 1)?.pop() {
            let doc = DocId(
                k.get(1..)
                    .and_then(|id| id.try_into().ok())
                    .ok_or_else(|| StoreError::Corrupt("format-1 document key".into()))?,
            );
            let damaged = |what: String| {
                StoreError::Corrupt(format!(
                    "upgrading relay data: {what} of document {doc} is damaged; the documents \
                     before it are upgraded, it and those after are not. Restore the folder \
                     from a backup, or start the relay on an empty folder with a new identity \
                     so that devices push their documents again"
                ))
            };
            let rec: DocRecord = bincode::serde::decode_from_slice(&v, cfg())
                .map(|(r, _)| r)
                .map_err(|e| damaged(format!("the record ({e})")))?;
            // The log, a change at a time with the running total written beside it.
            let log_prefix = key(V1_LOG, &doc, &[]);
            let mut from = 0u64;
            loop {
                let (mut batch, mut moved, mut bytes) = (Batch::default(), 0, 0);
                while moved < BATCH_KEYS && bytes < BATCH_BYTES {
                    let start = key(V1_LOG, &doc, &[&from.to_be_bytes()]);
                    let Some((first, _)) = self.backend.scan_from(&log_prefix, &start, 1)?.pop()
                    else {
                        break;
                    };
                    let seq = be_u64(&first[17..]).ok_or_else(|| damaged("a log key".into()))?;
                    let chunks = self
                        .backend
                        .scan(&key(V1_LOG, &doc, &[&seq.to_be_bytes()]))?;
                    let change: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.clone()).collect();
                    let cum_key = key(V1_CUM, &doc, &[&seq.to_be_bytes()]);
                    let cum = self
                        .backend
                        .get(&cum_key)?
                        .and_then(|v| be_u64(&v))
                        .ok_or_else(|| damaged(format!("the running total of seq {seq}")))?;
                    put_chunks(
                        &mut batch,
                        doc_key(D_LOG, &doc, &[&seq.to_be_bytes()]),
                        &log_value(cum, &change),
                        2,
                    );
                    for (k, _) in chunks {
                        batch.remove(k);
                    }
                    batch.remove(cum_key);
                    (moved, bytes, from) = (moved + 1, bytes + change.len(), seq + 1);
                }
                if moved == 0 {
                    break;
                }
                self.commit.write(&*self.backend, batch)?;
            }
            for (old, new) in V1_MOVED {
                let prefix = key(old, &doc, &[]);
                loop {
                    let page = self.backend.scan_from(&prefix, &prefix, BATCH_KEYS)?;
                    if page.is_empty() {
                        break;
                    }
                    let mut batch = Batch::default();
                    for (k, v) in page {
                        if let Some(new) = new {
                            batch.put(doc_key(new, &doc, &[&k[17..]]), v);
                        }
                        batch.remove(k);
                    }
                    self.commit.write(&*self.backend, batch)?;
                }
            }
            let mut batch = Batch::default();
            let pos_key = ns_key(V1_FEEDPOS, &rec.namespace, &[doc.as_bytes()]);
            let feed_pos = match self.backend.get(&pos_key)? {
                Some(p) => be_u64(&p).ok_or_else(|| damaged("the feed position".into()))?,
                None => 0,
            };
            batch.remove(pos_key);
            batch.put(doc_key(D_RECORD, &doc, &[]), encode_record(&rec, feed_pos)?);
            batch.remove(k);
            self.commit.write(&*self.backend, batch)?;
            upgraded += 1;
        }
        let mut batch = Batch::default();
        batch.put(meta_key("id"), id_value(&self.relay_id));
        self.commit.write(&*self.backend, batch)?;
        self.durable()?;
        tracing::info!(
            documents = upgraded,
            "relay data upgraded to storage format {FORMAT}"
        );
        Ok(())
    }

    /// Make everything applied so far durable (group commit).
    pub fn durable(&self) -> Result<(), StoreError> {
        self.commit.sync(&*self.backend)
    }

    /// (durability requests, flushes).
    pub fn flush_counts(&self) -> (u64, u64) {
        self.commit.counts()
    }

    /// A document's record.
    pub fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        Ok(self.stored_record(doc)?.map(|(r, _)| r))
    }

    /// A document's record and the position of its latest feed entry.
    fn stored_record(&self, doc: &DocId) -> Result<Option<(DocRecord, u64)>, StoreError> {
        self.backend
            .get(&doc_key(D_RECORD, doc, &[]))?
            .map(|b| decode_record(&b))
            .transpose()
    }

    /// Every namespace that has documents (for the hello of an unauthenticated relay).
    pub fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        let mut start = vec![T_FEED];
        loop {
            let found = self.backend.scan_from(&[T_FEED], &start, 1)?;
            let Some((k, _)) = found.first() else { break };
            let end = k[1..]
                .iter()
                .position(|b| *b == 0)
                .map(|p| p + 1)
                .unwrap_or(k.len());
            let ns = String::from_utf8_lossy(&k[1..end]).to_string();
            // Jump past every key of this namespace.
            start = vec![T_FEED];
            start.extend_from_slice(ns.as_bytes());
            start.push(1);
            out.push(ns);
        }
        Ok(out)
    }

    /// Validate and append a push; durable on return. All or nothing.
    pub fn push(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError> {
        let pushed = self.append(namespace, doc, changes)?;
        self.durable()?;
        Ok(pushed)
    }

    /// Validate and apply a push *without* waiting for the flush, so that one connection can
    /// have several pushes in flight and share flushes with them. Nothing of it may be
    /// acknowledged or fanned out before [`RelayLog::durable`] has returned.
    pub fn append(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError> {
        self.stats.pushes.fetch_add(1, Ordering::Relaxed);
        let r = self.push_inner(namespace, doc, changes);
        if r.is_err() {
            self.stats.pushes_refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn push_inner(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError> {
        // Parse (and hash) outside the lock: it is the expensive part.
        let parsed = super::storage::parse_push(changes)?;
        if parsed.is_empty() {
            return Ok(Pushed {
                seqs: Vec::new(),
                new_from: 0,
                new_changes: Vec::new(),
            });
        }
        let guard = self.append.lock().unwrap_or_else(|p| p.into_inner());
        let (mut rec, old_pos) = match self.stored_record(doc)? {
            Some((r, _)) if r.namespace != namespace => {
                return Err(PushError::WrongNamespace(r.namespace))
            }
            Some(r) => r,
            None => (
                DocRecord {
                    namespace: namespace.to_string(),
                    ..DocRecord::default()
                },
                0,
            ),
        };
        let mut batch = Batch::default();
        let mut in_batch: HashMap<ChangeHash, u64> = HashMap::new();
        let mut in_batch_actor: HashSet<(Vec<u8>, u64)> = HashSet::new();
        let mut seqs = Vec::with_capacity(parsed.len());
        let new_from = rec.head + 1;
        let mut new_changes = Vec::new();
        for (index, c) in parsed.iter().enumerate() {
            let hash = c.hash();
            if let Some(seq) = in_batch.get(&hash) {
                seqs.push(*seq);
                continue;
            }
            if let Some(v) = self.backend.get(&doc_key(D_HASH, doc, &[&hash.0]))? {
                seqs.push(be_u64(&v).ok_or_else(|| StoreError::Corrupt("hash index".into()))?);
                self.stats.changes_duplicate.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let actor = c.actor_id().to_bytes();
            let Ok(actor_len) = u8::try_from(actor.len()) else {
                return Err(PushError::BadChange {
                    index,
                    reason: "actor ids longer than 255 bytes are not accepted".into(),
                });
            };
            let actor_key_at =
                |seq: u64| doc_key(D_ACTOR, doc, &[&[actor_len], actor, &seq.to_be_bytes()]);
            let actor_key = actor_key_at(c.seq());
            if in_batch_actor.contains(&(actor.to_vec(), c.seq()))
                || self.backend.get(&actor_key)?.is_some()
            {
                return Err(PushError::HashMismatch {
                    index,
                    actor: hex::encode(actor),
                    seq: c.seq(),
                });
            }
            // An actor's changes are numbered 1, 2, 3... with no gap: Automerge refuses a
            // document whose actor seqs skip, so a gap must never enter the log.
            match c.seq() {
                0 => {
                    return Err(PushError::BadChange {
                        index,
                        reason: "a change's seq starts at 1".into(),
                    })
                }
                1 => {}
                n => {
                    if !in_batch_actor.contains(&(actor.to_vec(), n - 1))
                        && self.backend.get(&actor_key_at(n - 1))?.is_none()
                    {
                        return Err(PushError::NeedHistory { index });
                    }
                }
            }
            for dep in c.deps() {
                if !in_batch.contains_key(dep)
                    && self
                        .backend
                        .get(&doc_key(D_HASH, doc, &[&dep.0]))?
                        .is_none()
                {
                    return Err(PushError::NeedHistory { index });
                }
            }
            rec.head += 1;
            let seq = rec.head;
            let bytes = &changes[index];
            rec.log_bytes += bytes.len() as u64;
            put_chunks(
                &mut batch,
                doc_key(D_LOG, doc, &[&seq.to_be_bytes()]),
                &log_value(rec.log_bytes, bytes),
                2,
            );
            batch.put(doc_key(D_HASH, doc, &[&hash.0]), seq.to_be_bytes().to_vec());
            batch.put(actor_key, hash.0.to_vec());
            in_batch.insert(hash, seq);
            in_batch_actor.insert((actor.to_vec(), c.seq()));
            seqs.push(seq);
            new_changes.push(bytes.clone());
        }
        if !new_changes.is_empty() {
            // One feed entry per document: the newest supersedes the older one.
            if old_pos > 0 {
                batch.remove(ns_key(T_FEED, namespace, &[&old_pos.to_be_bytes()]));
            }
            let pos = self.feed_pos.fetch_add(1, Ordering::SeqCst) + 1;
            let mut entry = doc.as_bytes().to_vec();
            entry.extend_from_slice(&rec.head.to_be_bytes());
            batch.put(ns_key(T_FEED, namespace, &[&pos.to_be_bytes()]), entry);
            batch.put(meta_key("feedpos"), pos.to_be_bytes().to_vec());
            batch.put(doc_key(D_RECORD, doc, &[]), encode_record(&rec, pos)?);
            self.commit.write(&*self.backend, batch)?;
            self.stats
                .changes_accepted
                .fetch_add(new_changes.len() as u64, Ordering::Relaxed);
        }
        drop(guard);
        // The caller waits for durability before acknowledging anything, duplicates too: the
        // change they duplicate may belong to a push whose flush has not finished yet.
        Ok(Pushed {
            seqs,
            new_from,
            new_changes,
        })
    }

    /// One page of `doc`'s log after `after`, at most `max_bytes` (at least one change when any
    /// remain). A cursor before the compaction point gets the snapshot first.
    pub fn pull(&self, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError> {
        self.stats.pulls.fetch_add(1, Ordering::Relaxed);
        match self.pull_once(doc, after, max_bytes) {
            // A compaction may have deleted what this pull's record pointed at: read again.
            Err(StoreError::Corrupt(_)) => self.pull_once(doc, after, max_bytes),
            r => r,
        }
    }

    fn pull_once(&self, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError> {
        let page = self.pull_read(doc, after, max_bytes)?;
        // Serve only what is durable: a device that saw seq N and persisted that cursor must
        // never meet another change numbered N after a crash. After the read, so that a push
        // applied while we read is covered too.
        self.durable()?;
        Ok(page)
    }

    fn pull_read(&self, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError> {
        let Some(rec) = self.record(doc)? else {
            return Ok(Page {
                namespace: String::new(),
                from: after.saturating_add(1),
                to: after,
                changes: Vec::new(),
                more: false,
                remaining_bytes: 0,
                snapshot: None,
            });
        };
        let mut snapshot = None;
        let mut after = after.min(rec.head);
        if after < rec.compacted_upto {
            let bytes = self.snapshot(doc, &rec)?;
            snapshot = Some((rec.compacted_upto, bytes));
            after = rec.compacted_upto;
        }
        let from = after.saturating_add(1);
        let mut changes: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0u64;
        // The log's total bytes up to the last change in the page: all of it when none is.
        let mut cum_to = rec.log_bytes;
        let mut seq = from;
        while seq <= rec.head {
            let (cum, change) = self
                .log_value(doc, seq)?
                .ok_or_else(|| StoreError::Corrupt(format!("log of {doc} lacks seq {seq}")))?;
            if !changes.is_empty() && bytes + change.len() as u64 > max_bytes {
                break;
            }
            bytes += change.len() as u64;
            changes.push(change);
            cum_to = cum;
            seq += 1;
        }
        let to = from + changes.len() as u64 - 1;
        self.stats
            .pulled_changes
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        self.stats.pulled_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(Page {
            namespace: rec.namespace,
            from,
            to,
            more: to < rec.head,
            remaining_bytes: rec.log_bytes.saturating_sub(cum_to),
            changes,
            snapshot,
        })
    }

    /// One page of `namespace`'s feed after position `after`.
    pub fn feed(
        &self,
        namespace: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<FeedEntry>, u64, bool), StoreError> {
        self.stats.feed_pages.fetch_add(1, Ordering::Relaxed);
        let prefix = ns_key(T_FEED, namespace, &[]);
        let start = ns_key(T_FEED, namespace, &[&after.saturating_add(1).to_be_bytes()]);
        let found = self.backend.scan_from(&prefix, &start, limit + 1)?;
        let more = found.len() > limit;
        let mut next = after;
        let mut entries = Vec::new();
        for (k, v) in found.into_iter().take(limit) {
            let pos =
                be_u64(&k[prefix.len()..]).ok_or_else(|| StoreError::Corrupt("feed key".into()))?;
            let doc: [u8; 16] = v
                .get(..16)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("feed entry".into()))?;
            let seq = be_u64(&v[16..]).ok_or_else(|| StoreError::Corrupt("feed entry".into()))?;
            entries.push(FeedEntry {
                doc: DocId(doc),
                seq,
            });
            next = pos;
        }
        // Only durable entries are served (see `pull_once`): after the read, so that what a
        // concurrent push added to what we read is covered.
        self.durable()?;
        Ok((entries, next, more))
    }

    /// Every document: (id, record).
    pub fn documents(&self) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        let mut out = Vec::new();
        let mut start = vec![T_DOCS];
        // A document's record is the first of its keys: read it, then jump past the rest.
        while let Some((k, v)) = self.backend.scan_from(&[T_DOCS], &start, 1)?.pop() {
            let id: [u8; 16] = k
                .get(1..17)
                .and_then(|id| id.try_into().ok())
                .filter(|_| k.get(17) == Some(&D_RECORD))
                .ok_or_else(|| StoreError::Corrupt("a document without its record".into()))?;
            out.push((DocId(id), decode_record(&v)?.0));
            start = doc_key(u8::MAX, &DocId(id), &[]);
        }
        Ok(out)
    }

    /// Every change `doc`'s log ever held, in seq order: (seq, hash), compacted ones too
    /// (from the hash index). For `tandem migrate-relay`.
    pub fn log_hashes(&self, doc: &DocId) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.backend.scan(&doc_key(D_HASH, doc, &[]))? {
            let hash: [u8; 32] = k
                .get(D_REST..)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("hash index key".into()))?;
            let seq = be_u64(&v).ok_or_else(|| StoreError::Corrupt("hash index".into()))?;
            out.push((seq, hash));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The log entry with seq `seq`, if not compacted away.
    pub fn log_entry(&self, doc: &DocId, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.log_value(doc, seq)?.map(|(_, change)| change))
    }

    /// (total log bytes up to and including it, the change) of the log entry with seq `seq`.
    fn log_value(&self, doc: &DocId, seq: u64) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        read_value(
            &*self.backend,
            &doc_key(D_LOG, doc, &[&seq.to_be_bytes()]),
            None,
        )?
        .map(split_log_value)
        .transpose()
    }

    /// The snapshot of a compacted document (`None` if never compacted).
    pub fn snapshot_of(&self, doc: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        match self.record(doc)? {
            Some(rec) if rec.compacted_upto > 0 => self.snapshot(doc, &rec).map(Some),
            _ => Ok(None),
        }
    }

    /// The last feed position handed out (positions are counted across namespaces).
    pub fn feed_position(&self) -> u64 {
        self.feed_pos.load(Ordering::SeqCst)
    }

    /// Everything the relay holds of `doc`: its snapshot (if compacted) and the log after it,
    /// as one page.
    pub fn contents(&self, doc: &DocId) -> Result<Page, StoreError> {
        self.pull(doc, 0, u64::MAX)
    }

    /// The snapshot `rec` points at, all its chunks or an error.
    fn snapshot(&self, doc: &DocId, rec: &DocRecord) -> Result<Vec<u8>, StoreError> {
        let prefix = doc_key(D_SNAP, doc, &[&rec.snapshot_gen.to_be_bytes()]);
        read_value(&*self.backend, &prefix, Some(rec.snapshot_chunks))
            .map_err(|e| StoreError::Corrupt(format!("snapshot of {doc}: {e}")))?
            .ok_or_else(|| StoreError::Corrupt(format!("snapshot of {doc} is missing")))
    }

    /// Whether `doc`'s log is long enough to compact.
    pub fn wants_compaction(&self, doc: &DocId) -> bool {
        match self.record(doc) {
            Ok(Some(r)) => r.head - r.compacted_upto >= self.compact_after,
            _ => false,
        }
    }

    /// Fold `doc`'s whole log into a snapshot and drop the log prefix it covers. The snapshot
    /// and the record pointing at it are durable before anything is deleted; the hash and actor
    /// indexes stay (dedupe needs them forever).
    pub fn compact(&self, doc: &DocId) -> Result<(), StoreError> {
        if !self
            .compacting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*doc)
        {
            return Ok(());
        }
        // Automerge must not take the relay down, and the doc must leave `compacting` whatever
        // happens.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compact_inner(doc)))
            .unwrap_or_else(|_| {
                Err(StoreError::Corrupt(format!(
                    "automerge panicked compacting {doc}"
                )))
            });
        self.compacting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(doc);
        r
    }

    fn compact_inner(&self, doc: &DocId) -> Result<(), StoreError> {
        let Some(rec) = self.record(doc)? else {
            return Ok(());
        };
        let upto = rec.head;
        if upto <= rec.compacted_upto {
            return Ok(());
        }
        let mut am = Automerge::new();
        if rec.compacted_upto > 0 {
            let bytes = self.snapshot(doc, &rec)?;
            am = Automerge::load(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("snapshot of {doc}: {e}")))?;
        }
        let mut changes = Vec::new();
        for (seq, value) in read_values(&*self.backend, &doc_key(D_LOG, doc, &[]))? {
            if seq > upto {
                break;
            }
            let (_, bytes) = split_log_value(value)?;
            changes
                .push(Change::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        am.apply_changes(changes)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // Uncompressed: a device loads this without a bound on inflation otherwise.
        let saved = am.save_nocompress();
        let gen = rec.snapshot_gen + 1;
        let mut batch = Batch::default();
        let chunks = put_chunks(
            &mut batch,
            doc_key(D_SNAP, doc, &[&gen.to_be_bytes()]),
            &saved,
            4,
        );
        {
            let _g = self.append.lock().unwrap_or_else(|p| p.into_inner());
            let (mut now, feed_pos) = self
                .stored_record(doc)?
                .ok_or_else(|| StoreError::Corrupt(format!("record of {doc} vanished")))?;
            now.compacted_upto = upto;
            now.snapshot_gen = gen;
            now.snapshot_chunks = chunks;
            batch.put(doc_key(D_RECORD, doc, &[]), encode_record(&now, feed_pos)?);
            self.commit.write(&*self.backend, batch)?;
        }
        self.durable()?;
        let mut batch = Batch::default();
        for k in self.backend.scan_keys(&doc_key(D_LOG, doc, &[]))? {
            if be_u64(&k[D_REST..]).is_some_and(|s| s <= upto) {
                batch.remove(k);
            }
        }
        if rec.snapshot_gen > 0 {
            let old = doc_key(D_SNAP, doc, &[&rec.snapshot_gen.to_be_bytes()]);
            for k in self.backend.scan_keys(&old)? {
                batch.remove(k);
            }
        }
        self.commit.write(&*self.backend, batch)?;
        self.durable()?;
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use automerge::transaction::Transactable;
    use automerge::{ActorId, ROOT};

    use super::*;

    /// `n` changes by `actor`, each setting `title` to a value of `len` bytes.
    fn changes(actor: u8, n: usize, len: usize) -> Vec<Vec<u8>> {
        let mut doc = Automerge::new().with_actor(ActorId::from(vec![actor; 16]));
        (0..n)
            .map(|i| {
                let mut tx = doc.transaction();
                tx.put(ROOT, "title", format!("{i}").repeat(len.max(1)))
                    .unwrap();
                tx.commit();
                doc.get_last_local_change().unwrap().raw_bytes().to_vec()
            })
            .collect()
    }

    /// Rewrite this layout into format 1, as a relay from before `R format` left its data.
    fn downgrade(log: &RelayLog, mem: &MemoryBackend) {
        let mut batch = Batch::default();
        for (doc, rec) in log.documents().unwrap() {
            let (_, feed_pos) = log.stored_record(&doc).unwrap().unwrap();
            batch.put(
                key(b'D', &doc, &[]),
                bincode::serde::encode_to_vec(&rec, cfg()).unwrap(),
            );
            if feed_pos > 0 {
                batch.put(
                    ns_key(b'P', &rec.namespace, &[doc.as_bytes()]),
                    feed_pos.to_be_bytes().to_vec(),
                );
            }
            for (seq, value) in read_values(mem, &doc_key(D_LOG, &doc, &[])).unwrap() {
                let (cum, change) = split_log_value(value).unwrap();
                put_chunks(
                    &mut batch,
                    key(b'L', &doc, &[&seq.to_be_bytes()]),
                    &change,
                    2,
                );
                batch.put(
                    key(b'I', &doc, &[&seq.to_be_bytes()]),
                    cum.to_be_bytes().to_vec(),
                );
            }
            // Format 1's compaction left the running totals of the seqs it dropped.
            for seq in 1..=rec.compacted_upto {
                batch.put(key(b'I', &doc, &[&seq.to_be_bytes()]), vec![0; 8]);
            }
            for (k, v) in mem.scan(&doc_key(D_HASH, &doc, &[])).unwrap() {
                batch.put(key(b'H', &doc, &[&k[D_REST..]]), v);
            }
            for (k, v) in mem.scan(&doc_key(D_ACTOR, &doc, &[])).unwrap() {
                batch.put(key(b'A', &doc, &[&k[D_REST..]]), v);
            }
            for (k, v) in mem.scan(&doc_key(D_SNAP, &doc, &[])).unwrap() {
                batch.put(key(b'S', &doc, &[&k[D_REST..]]), v);
            }
        }
        for k in mem.scan_keys(&[T_DOCS]).unwrap() {
            batch.remove(k);
        }
        batch.put(meta_key("id"), log.relay_id().to_vec());
        mem.write(batch).unwrap();
    }

    #[test]
    fn format_1_data_is_upgraded_to_exactly_what_this_layout_writes() {
        let mem = Arc::new(MemoryBackend::default());
        let mut log = RelayLog::with_backend(Box::new(mem.clone())).unwrap();
        log.compact_after = 3;
        let (a, b) = (DocId([1; 16]), DocId([2; 16]));
        let ada = changes(1, 4, 1);
        let bob = changes(2, 2, 6_000); // past one chunk
        log.push("n1", &a, &ada[..2]).unwrap();
        log.push("n1", &a, &ada[2..3]).unwrap();
        log.compact(&a).unwrap();
        log.push("n1", &a, &ada[3..]).unwrap();
        log.push("n2", &b, &bob).unwrap();
        // Longer than one batch of the upgrade.
        let c = DocId([3; 16]);
        log.push("n1", &c, &changes(4, 300, 1)).unwrap();
        assert_eq!(log.record(&a).unwrap().unwrap().compacted_upto, 3);
        let written = mem.scan(&[]).unwrap();
        let pages = |log: &RelayLog| [log.pull(&a, 1, 10).unwrap(), log.pull(&b, 0, 1).unwrap()];
        let served = pages(&log);
        assert_eq!(served[1].remaining_bytes, bob[1].len() as u64);

        downgrade(&log, &mem);
        drop(log);
        assert!(RelayLog::needs_upgrade(&*mem).unwrap());
        assert!(mem.scan(&[T_DOCS]).unwrap().is_empty());
        let log = RelayLog::with_backend(Box::new(mem.clone())).unwrap();
        assert!(!RelayLog::needs_upgrade(&*mem).unwrap());
        assert_eq!(
            mem.scan(&[]).unwrap(),
            written,
            "every key and value as pushed"
        );
        assert_eq!(pages(&log), served);
        assert_eq!(log.namespaces().unwrap(), ["n1", "n2"]);
        // And it goes on: a duplicate is known, a new change takes the next seq.
        assert_eq!(log.push("n2", &b, &bob[1..]).unwrap().seqs, [2]);
        assert_eq!(log.push("n2", &b, &changes(3, 1, 1)).unwrap().seqs, [3]);
    }

    #[test]
    fn a_newer_format_is_refused() {
        let mem = Arc::new(MemoryBackend::default());
        drop(RelayLog::with_backend(Box::new(mem.clone())).unwrap());
        let mut batch = Batch::default();
        let mut id = [9; 17];
        id[16] = FORMAT + 1;
        batch.put(meta_key("id"), id.to_vec());
        mem.write(batch).unwrap();
        let err = RelayLog::with_backend(Box::new(mem)).err().unwrap();
        assert!(err.to_string().contains("storage format 3:"), "{err}");
    }
}
