//! The storage seam of the relay: [`RelayStore`] is everything the protocol logic
//! ([`RelaySession`](super::session::RelaySession)) and the shell need of durable state —
//! append a validated push and make it durable, read a document's log from a seq, read a
//! namespace's feed from a cursor, compact, and the relay's identity. Two backends implement
//! it: the embedded sled log ([`RelayLog`], the default) and PostgreSQL
//! ([`PgLog`](super::postgres::PgLog)), which several relay nodes can share.
//!
//! The trait is synchronous on purpose: the session is sans-IO and runs on the blocking pool
//! (or, in the simulation, on one thread with no runtime at all). A backend that speaks to a
//! server over the network keeps its own runtime and blocks the caller until it answers.
//! Auth, subscriptions and fan-out are not here: they are the same over every backend.

use super::log::{DocRecord, LogStats, Page, PushError, Pushed, RelayLog};
use crate::crdt::parse_change;
use crate::ids::DocId;
use crate::store::StoreError;
use crate::transport::FeedEntry;

/// The relay's durable state, whatever holds it. See the module docs.
///
/// Rules every backend keeps (the relay tests run against each):
/// - per document, seqs are 1, 2, 3... with no gap, in causal order (a change is appended
///   only after all its dependencies), and a reader never sees a seq that a later commit
///   fills in below it; the same for each namespace's feed positions;
/// - a change is deduplicated by hash; an (actor, seq) held with another hash is refused;
/// - nothing is served by [`pull`](Self::pull) or [`feed`](Self::feed) that is not durable.
pub trait RelayStore: Send + Sync {
    /// Made when this storage was created; a client that sees another one re-pushes.
    fn relay_id(&self) -> [u8; 16];

    /// Validate and append a push. Nothing of it may be acknowledged or fanned out before
    /// [`durable`](Self::durable) has returned after it (a backend whose appends commit
    /// before returning makes that a no-op). All or nothing.
    fn append(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError>;

    /// Make everything appended so far durable (group commit).
    fn durable(&self) -> Result<(), StoreError>;

    /// One page of `doc`'s log after `after`, at most `max_bytes` (at least one change when
    /// any remain). A cursor before the compaction point gets the snapshot first.
    fn pull(&self, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError>;

    /// One page of `namespace`'s feed after position `after`: (entries, next cursor, more).
    fn feed(
        &self,
        namespace: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<FeedEntry>, u64, bool), StoreError>;

    /// Every namespace that has documents.
    fn namespaces(&self) -> Result<Vec<String>, StoreError>;

    /// A document's record (`None`: the relay holds nothing of it).
    fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError>;

    /// Every document: (id, record).
    fn documents(&self) -> Result<Vec<(DocId, DocRecord)>, StoreError>;

    /// Whether `doc`'s log is long enough to compact.
    fn wants_compaction(&self, doc: &DocId) -> bool;

    /// Fold `doc`'s log into a snapshot; the snapshot is durable before anything it covers is
    /// dropped, and the hash index stays (dedupe needs it forever).
    fn compact(&self, doc: &DocId) -> Result<(), StoreError>;

    /// Counters for /metrics.
    fn stats(&self) -> &LogStats;

    /// (durability requests, flushes or commits).
    fn flush_counts(&self) -> (u64, u64);

    /// Everything the relay holds of `doc`: its snapshot (if compacted) and the log after it,
    /// as one page.
    fn contents(&self, doc: &DocId) -> Result<Page, StoreError> {
        self.pull(doc, 0, u64::MAX)
    }
}

impl RelayStore for RelayLog {
    fn relay_id(&self) -> [u8; 16] {
        RelayLog::relay_id(self)
    }
    fn append(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError> {
        RelayLog::append(self, namespace, doc, changes)
    }
    fn durable(&self) -> Result<(), StoreError> {
        RelayLog::durable(self)
    }
    fn pull(&self, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError> {
        RelayLog::pull(self, doc, after, max_bytes)
    }
    fn feed(
        &self,
        namespace: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<FeedEntry>, u64, bool), StoreError> {
        RelayLog::feed(self, namespace, after, limit)
    }
    fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        RelayLog::namespaces(self)
    }
    fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        RelayLog::record(self, doc)
    }
    fn documents(&self) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        RelayLog::documents(self)
    }
    fn wants_compaction(&self, doc: &DocId) -> bool {
        RelayLog::wants_compaction(self, doc)
    }
    fn compact(&self, doc: &DocId) -> Result<(), StoreError> {
        RelayLog::compact(self, doc)
    }
    fn stats(&self) -> &LogStats {
        &self.stats
    }
    fn flush_counts(&self) -> (u64, u64) {
        RelayLog::flush_counts(self)
    }
}

/// Parse (and hash) the changes of a push, with the checks every backend makes: a valid,
/// uncompressed Automerge change, seq from 1, an actor id of at most 255 bytes. The
/// expensive part of a push, so backends call it before taking any lock.
pub(crate) fn parse_push(changes: &[Vec<u8>]) -> Result<Vec<automerge::Change>, PushError> {
    let mut parsed = Vec::with_capacity(changes.len());
    for (index, bytes) in changes.iter().enumerate() {
        let c = parse_change(bytes).map_err(|reason| PushError::BadChange { index, reason })?;
        let refuse = |reason: &str| PushError::BadChange {
            index,
            reason: reason.into(),
        };
        if c.actor_id().to_bytes().len() > 255 {
            return Err(refuse("actor ids longer than 255 bytes are not accepted"));
        }
        if c.seq() == 0 {
            return Err(refuse("a change's seq starts at 1"));
        }
        parsed.push(c);
    }
    Ok(parsed)
}
