//! The tokio side of `/automerge`: one task per connection (handshake, decoding, routing) and
//! one actor per document in memory (a task owning a [`DocSync`] behind a bounded queue).
//!
//! A document actor works in rounds: it takes every input waiting (up to a batch), catches up
//! with the relay log when poked (a tandem/1 push landed), applies the peers' sync messages,
//! appends what is new to the log and waits for the group-commit flush, and only then
//! generates the sync messages to send — so no peer hears of heads the relay could still lose.
//! A round runs on the blocking pool (sled blocks, and Automerge on a large document takes
//! long), at most [`AmConfig::rounds`] at once.
//! The changes a round stored are fanned out to tandem/1 connections like any push. An actor
//! with no peers left ends after an idle period, dropping the document from memory.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use super::cbor::{DecodeLimits, Value};
use super::doc::{check_sync_message, CheckedSync, DocSync, LoggedChanges};
use super::wire::{self, AmMsg, WireError, PROTOCOL_VERSION};
use crate::ids::DocId;
use crate::relay::auth::{AuthError, Claims};
use crate::relay::log::valid_namespace;
use crate::relay::storage::RelayStore;
use crate::transport::RelayMsg;

/// Hands changes stored from automerge-repo peers to the tandem/1 fan-out:
/// (namespace, document, a `RelayMsg::Changes`).
pub type FanOut = Box<dyn Fn(&str, DocId, RelayMsg) + Send + Sync>;

/// Limits and timings of the endpoint.
#[derive(Clone, Debug)]
pub struct AmConfig {
    pub max_frame_bytes: usize,
    pub max_docs_per_connection: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// A WebSocket ping this often keeps idle browser tabs from hitting the idle timeout.
    pub ping_every: Duration,
    /// Frames queued for one connection before it counts as too slow and is closed.
    pub outgoing_queue: usize,
    /// Inputs queued for one document actor (senders wait when it is full).
    pub doc_queue: usize,
    /// Inputs one actor round takes at most.
    pub doc_batch: usize,
    /// A document nobody sent anything about for a while leaves memory (its peers' sync
    /// states stay; it is loaded again from the log when needed): after `unload_factor` times
    /// what loading it took, so reloads cost at most that share of the time, and within
    /// `unload_min..=unload_max`. An actor with no peers left ends then too.
    pub unload_factor: u32,
    pub unload_min: Duration,
    pub unload_max: Duration,
    /// Bytes per log page when loading a document.
    pub page_bytes: u64,
    /// Document rounds (log reads, Automerge, appends with their flush) running at once on the
    /// blocking pool. Each holds a thread; without a bound, thousands of documents busy at once
    /// grew the pool to ~200 threads and the RSS with them.
    pub rounds: usize,
    /// A peer that has nothing of a document not in memory (automerge-repo's `request`) is
    /// answered straight from the log, without loading the document, when the log holds it
    /// as at most this many raw changes (never compacted). Larger documents are loaded: a
    /// peer that takes version 2 messages then gets a compact saved document instead.
    pub answer_from_log_changes: usize,
}

impl Default for AmConfig {
    fn default() -> Self {
        AmConfig {
            max_frame_bytes: 16 << 20,
            max_docs_per_connection: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            ping_every: Duration::from_secs(30),
            outgoing_queue: 1024,
            doc_queue: 256,
            doc_batch: 256,
            unload_factor: 1000,
            unload_min: Duration::from_secs(1),
            unload_max: Duration::from_secs(60),
            page_bytes: 4 << 20,
            rounds: 32,
            answer_from_log_changes: 64,
        }
    }
}

/// Counters for /metrics.
#[derive(Default)]
pub struct AmStats {
    pub connections: AtomicU64,
    /// Documents loaded in memory now (a gauge).
    pub docs_loaded: AtomicU64,
    pub sync_in: AtomicU64,
    pub sync_out: AtomicU64,
    pub changes_stored: AtomicU64,
    pub refused: AtomicU64,
}

/// Most storage ids one peer may subscribe to.
const MAX_SUBSCRIPTIONS: usize = 1024;

/// Most frames written to a connection's socket per flush.
const WRITE_BATCH: usize = 64;

/// How a peer is reached.
#[derive(Clone)]
struct PeerOut {
    peer_id: String,
    tx: mpsc::Sender<Message>,
    close: Arc<Notify>,
}

impl PeerOut {
    /// Queue a frame; a full queue means a reader too slow to keep: close it.
    fn send(&self, frame: Vec<u8>) {
        match self.tx.try_send(Message::Binary(Bytes::from(frame))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.close.notify_one(),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// What a connection knows of its peer, shared with the actors of its documents.
struct PeerCtx {
    conn: u64,
    out: PeerOut,
    claims: Option<Claims>,
    /// Namespace for documents this peer creates.
    new_ns: String,
    /// The peer's storage id, when it has storage (not ephemeral): the relay tells peers who
    /// subscribed to it when that storage's heads of a document change.
    storage_id: Option<String>,
    /// Storage ids this peer subscribed to (`remote-subscription-change`).
    subscribed: Mutex<HashSet<String>>,
}

impl PeerCtx {
    fn can_read(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_read(ns))
    }
    fn can_write(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_write(ns))
    }
}

enum DocInput {
    Sync {
        peer: Arc<PeerCtx>,
        msg: CheckedSync,
        request: bool,
    },
    Ephemeral {
        conn: u64,
        raw: Value,
    },
    Gone {
        conn: u64,
    },
}

struct DocHandle {
    tx: mpsc::Sender<DocInput>,
    poke: Arc<Notify>,
}

/// The endpoint's shared state: the documents in memory and how to reach the log and the
/// tandem/1 side.
pub struct AmRelay {
    log: Arc<dyn RelayStore>,
    cfg: AmConfig,
    docs: Mutex<HashMap<DocId, DocHandle>>,
    fanout: FanOut,
    peer_id: String,
    storage_id: String,
    next_conn: AtomicU64,
    rounds: Semaphore,
    pub stats: AmStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The relay's storage id: its identity as a UUID, so it is stable while the data is and
/// changes when the data is wiped (clients then resync instead of trusting old sync state).
pub fn storage_id(relay_id: [u8; 16]) -> String {
    let h = hex::encode(relay_id);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl AmRelay {
    pub fn new(log: Arc<dyn RelayStore>, cfg: AmConfig, fanout: FanOut) -> AmRelay {
        let storage_id = storage_id(log.relay_id());
        AmRelay {
            peer_id: format!("tandem-relay-{}", &storage_id[..8]),
            storage_id,
            log,
            docs: Mutex::new(HashMap::new()),
            fanout,
            next_conn: AtomicU64::new(1),
            rounds: Semaphore::new(cfg.rounds.max(1)),
            cfg,
            stats: AmStats::default(),
        }
    }

    /// New changes of `doc` are durable in the log (a tandem/1 push): if the document is in
    /// memory, its actor catches up and syncs them to its peers. Never blocks.
    pub fn poke(&self, doc: &DocId) {
        if let Some(h) = lock(&self.docs).get(doc) {
            h.poke.notify_one();
        }
    }

    /// Document actors (each with its document loaded or not).
    pub fn actors(&self) -> usize {
        lock(&self.docs).len()
    }

    fn handle(self: &Arc<Self>, doc: DocId) -> mpsc::Sender<DocInput> {
        let mut docs = lock(&self.docs);
        if let Some(h) = docs.get(&doc) {
            return h.tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.cfg.doc_queue);
        let poke = Arc::new(Notify::new());
        docs.insert(
            doc,
            DocHandle {
                tx: tx.clone(),
                poke: poke.clone(),
            },
        );
        tokio::spawn(DocActor::new(self.clone(), doc).run(poke, rx));
        tx
    }

    /// Hand `input` to `doc`'s actor, starting one if needed (waits while its queue is full).
    async fn route(self: &Arc<Self>, doc: DocId, mut input: DocInput) {
        for _ in 0..3 {
            let tx = self.handle(doc);
            match tx.send(input).await {
                Ok(()) => return,
                // The actor ended just now: forget it and start another.
                Err(mpsc::error::SendError(back)) => {
                    input = back;
                    let mut docs = lock(&self.docs);
                    if docs.get(&doc).is_some_and(|h| h.tx.same_channel(&tx)) {
                        docs.remove(&doc);
                    }
                }
            }
        }
        tracing::error!(%doc, "could not reach a document actor");
    }

    /// Like [`route`](Self::route), but only to an actor that exists (ephemeral messages and
    /// goodbyes need no document loaded).
    async fn route_existing(&self, doc: DocId, input: DocInput) {
        let tx = lock(&self.docs).get(&doc).map(|h| h.tx.clone());
        if let Some(tx) = tx {
            let _ = tx.send(input).await;
        }
    }
}

/// One document's state in memory. Its async loop (`run`) only waits for inputs and timers;
/// every round of work (log reads, Automerge, the append and its flush) runs on the blocking
/// pool, so a large document never stalls the async workers that serve every connection.
struct DocActor {
    relay: Arc<AmRelay>,
    id: DocId,
    sync: DocSync<u64>,
    peers: HashMap<u64, Arc<PeerCtx>>,
    /// The document's namespace once known (from the log, or from the peer that created it).
    namespace: Option<String>,
    /// The log seq this copy has read up to.
    seen: u64,
    loaded: bool,
    /// What the last full load from the log took.
    load_cost: Duration,
}

impl DocActor {
    fn new(relay: Arc<AmRelay>, id: DocId) -> DocActor {
        DocActor {
            relay,
            id,
            sync: DocSync::default(),
            peers: HashMap::new(),
            namespace: None,
            seen: 0,
            loaded: false,
            load_cost: Duration::ZERO,
        }
    }

    async fn run(mut self, poke: Arc<Notify>, mut rx: mpsc::Receiver<DocInput>) {
        let cfg = self.relay.cfg.clone();
        loop {
            let wait = if self.loaded {
                (self.load_cost * cfg.unload_factor).clamp(cfg.unload_min, cfg.unload_max)
            } else {
                cfg.unload_min
            };
            let mut batch = Vec::new();
            let mut poked = false;
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => break,
                },
                _ = poke.notified() => poked = true,
                _ = tokio::time::sleep(wait) => {
                    if self.loaded {
                        self.sync.unload();
                        self.set_loaded(false);
                        self.seen = 0;
                    }
                    if self.peers.is_empty() && self.try_retire(&mut rx) {
                        return;
                    }
                    continue;
                }
            }
            while batch.len() < self.relay.cfg.doc_batch {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if batch.is_empty() && self.peers.is_empty() {
                // A poke for a document nobody here syncs any more: nothing to load for.
                continue;
            }
            let relay = self.relay.clone();
            let Ok(_permit) = relay.rounds.acquire().await else {
                break;
            };
            let mut me = self;
            match tokio::task::spawn_blocking(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    me.round(batch, poked)
                }));
                if r.is_err() {
                    tracing::error!(doc = %me.id, "a document round panicked; reloading it");
                    me.sync.reload();
                    me.set_loaded(false);
                    me.seen = 0;
                }
                me
            })
            .await
            {
                Ok(me) => self = me,
                // Cancelled with the runtime: the registry's sender fails next time and a new
                // actor takes over.
                Err(_) => return,
            }
        }
        // Every sender is gone, the registry's too: nothing can reach this actor any more.
        self.set_loaded(false);
    }

    fn set_loaded(&mut self, loaded: bool) {
        if loaded != self.loaded {
            let g = &self.relay.stats.docs_loaded;
            if loaded {
                g.fetch_add(1, Ordering::Relaxed);
            } else {
                g.fetch_sub(1, Ordering::Relaxed);
            }
            self.loaded = loaded;
        }
    }

    /// Leave memory if nothing is queued. Inputs that slip in between are handed to a new
    /// actor.
    fn try_retire(&mut self, rx: &mut mpsc::Receiver<DocInput>) -> bool {
        {
            let mut docs = lock(&self.relay.docs);
            if !rx.is_empty() {
                return false;
            }
            docs.remove(&self.id);
        }
        rx.close();
        let mut late = Vec::new();
        while let Ok(m) = rx.try_recv() {
            late.push(m);
        }
        if !late.is_empty() {
            let relay = self.relay.clone();
            let id = self.id;
            tokio::spawn(async move {
                for m in late {
                    relay.route(id, m).await;
                }
            });
        }
        true
    }

    /// Read the log after what this copy has seen and apply it in one go.
    fn catch_up(&mut self) -> Result<(), String> {
        let started = std::time::Instant::now();
        let full = self.seen == 0;
        let page = self.relay.cfg.page_bytes;
        // A document the log has never seen (a peer creating one, or asking for an unknown
        // one) has nothing to load: skip the pull, which would wait for the flush in flight.
        let known = self.seen > 0
            || self
                .relay
                .log
                .record(&self.id)
                .map_err(|e| e.to_string())?
                .is_some();
        // Bounded: a log has finitely many pages, and each moves `seen` forward.
        let max_pages = if known { 1_000_000 } else { 0 };
        for _ in 0..max_pages {
            let p = self
                .relay
                .log
                .pull(&self.id, self.seen, page)
                .map_err(|e| e.to_string())?;
            if !p.namespace.is_empty() {
                self.namespace = Some(p.namespace.clone());
            }
            if !p.changes.is_empty() || p.snapshot.is_some() {
                self.sync
                    .apply_log(p.snapshot.as_ref().map(|(_, s)| &s[..]), &p.changes)?;
            }
            self.seen = self.seen.max(p.to);
            if !p.more {
                break;
            }
        }
        self.set_loaded(true);
        if full {
            self.load_cost = started.elapsed();
        }
        Ok(())
    }

    fn error_to(&self, peer: &PeerCtx, message: &str) {
        self.relay.stats.refused.fetch_add(1, Ordering::Relaxed);
        peer.out.send(wire::error(
            &self.relay.peer_id,
            Some(&peer.out.peer_id),
            message,
        ));
    }

    /// Refuse a peer whose token cannot read `ns`: the error says why, and `doc-unavailable`
    /// lets the client's `find` end.
    fn refuse_read(&self, peer: &PeerCtx, ns: &str) {
        self.error_to(peer, &format!("this token cannot read namespace '{ns}'"));
        peer.out.send(wire::doc_unavailable(
            &self.relay.peer_id,
            &peer.out.peer_id,
            &self.id,
        ));
    }

    /// One round: `batch` is the inputs waiting, `poked` says the log grew since the last.
    fn round(&mut self, batch: Vec<DocInput>, poked: bool) {
        if !poked && !batch.iter().any(|i| matches!(i, DocInput::Sync { .. })) {
            // Ephemeral messages and peers leaving need no document.
            for input in batch {
                self.relay_other(input);
            }
            return;
        }
        let catch_up = poked || !self.loaded;
        let batch = match self.take_new_document(batch) {
            Ok(()) => return,
            Err(batch) => batch,
        };
        // After a poke the peers may be owed the log's new changes: that needs the document.
        let batch = if !poked && !self.loaded {
            match self.answer_from_log(batch) {
                Ok(()) => return,
                Err(batch) => batch,
            }
        } else {
            batch
        };
        if catch_up {
            if let Err(e) = self.catch_up() {
                tracing::error!(doc = %self.id, error = %e, "could not load a document for automerge-repo peers");
                for input in &batch {
                    if let DocInput::Sync { peer, .. } = input {
                        self.error_to(peer, "the relay could not load this document");
                    }
                }
                self.sync.reload();
                self.set_loaded(false);
                self.seen = 0;
                return;
            }
        }
        let before = self.sync.heads();
        let mut writers: Vec<Arc<PeerCtx>> = Vec::new();
        // Storage peers whose heads changed: (storage id, the peer's connection).
        let mut moved: Vec<(String, u64)> = Vec::new();
        let mut unavailable: Vec<Arc<PeerCtx>> = Vec::new();
        for input in batch {
            match input {
                DocInput::Sync { peer, msg, request } => {
                    let ns = self
                        .namespace
                        .clone()
                        .unwrap_or_else(|| peer.new_ns.clone());
                    if !peer.can_read(&ns) {
                        self.refuse_read(&peer, &ns);
                        continue;
                    }
                    let write = msg.has_changes && peer.can_write(&ns);
                    if msg.has_changes && !write {
                        self.error_to(
                            &peer,
                            &format!("this token cannot write namespace '{ns}'; changes ignored"),
                        );
                    }
                    if write {
                        // A new document belongs to its first writer's namespace: later
                        // writers in this round are checked against that one.
                        self.namespace.get_or_insert(ns);
                        writers.push(peer.clone());
                    }
                    let conn = peer.conn;
                    self.peers.insert(conn, peer.clone());
                    let their_before = self.sync.their_heads(conn).map(<[_]>::to_vec);
                    if let Err(e) = self.sync.receive(conn, msg, write) {
                        self.error_to(&peer, &format!("sync message refused: {e}"));
                        continue;
                    }
                    if let Some(sid) = &peer.storage_id {
                        if self.sync.their_heads(conn) != their_before.as_deref() {
                            moved.push((sid.clone(), conn));
                        }
                    }
                    if request && self.sync.is_empty() && !write {
                        unavailable.push(peer);
                    }
                }
                other => self.relay_other(other),
            }
        }
        // "Nobody has it": say so, and forget the asker until it asks again.
        if self.sync.is_empty() {
            for p in unavailable {
                self.peers.remove(&p.conn);
                self.sync.remove_peer(p.conn);
                p.out.send(wire::doc_unavailable(
                    &self.relay.peer_id,
                    &p.out.peer_id,
                    &self.id,
                ));
            }
        }
        let new = self.sync.take_new_changes(&before);
        if !new.is_empty() {
            let ns = self
                .namespace
                .clone()
                .unwrap_or_else(|| crate::repo::DEFAULT_NAMESPACE.to_string());
            if let Err(e) = self.persist(&ns, new) {
                tracing::warn!(doc = %self.id, error = %e, "changes from an automerge-repo peer were refused");
                for p in &writers {
                    self.error_to(p, &format!("changes refused: {e}"));
                }
                // The copy holds changes the log refused: rebuild it from the log (which
                // also says the namespace, if the document has one by now).
                self.sync.reload();
                self.seen = 0;
                self.namespace = None;
                if let Err(e) = self.catch_up() {
                    tracing::error!(doc = %self.id, error = %e, "could not reload a document");
                    self.set_loaded(false);
                    return;
                }
            }
        }
        self.gossip_heads(moved);
        self.send_outgoing();
    }

    /// Send each peer the sync message it is owed.
    fn send_outgoing(&mut self) {
        for (conn, data) in self.sync.outgoing() {
            if let Some(p) = self.peers.get(&conn) {
                self.send_sync(p, data);
            }
        }
    }

    /// Send `peer` a sync message of this document.
    fn send_sync(&self, peer: &PeerCtx, data: Vec<u8>) {
        self.relay.stats.sync_out.fetch_add(1, Ordering::Relaxed);
        peer.out.send(wire::sync(
            &self.relay.peer_id,
            &peer.out.peer_id,
            &self.id,
            data,
        ));
    }

    /// Store a document a peer sends whole while the log has nothing of it (its creation),
    /// without building it in memory: see [`DocSync::take_new_document`]. Only for a round
    /// of that one message from a peer that may write; otherwise the batch comes back for the
    /// ordinary round. The copy stays unloaded, so the next round reads the log.
    fn take_new_document(&mut self, batch: Vec<DocInput>) -> Result<(), Vec<DocInput>> {
        let [DocInput::Sync { peer, msg, .. }] = batch.as_slice() else {
            return Err(batch);
        };
        let ns = self
            .namespace
            .clone()
            .unwrap_or_else(|| peer.new_ns.clone());
        if !msg.has_changes
            || !self.sync.is_empty()
            || !peer.can_read(&ns)
            || !peer.can_write(&ns)
            || !matches!(self.relay.log.record(&self.id), Ok(None))
        {
            return Err(batch);
        }
        let conn = peer.conn;
        let their_before = self.sync.their_heads(conn).map(<[_]>::to_vec);
        let (changes, reply) = match self.sync.take_new_document(conn, msg) {
            Ok(Some(taken)) => taken,
            Ok(None) => return Err(batch),
            Err(e) => {
                self.error_to(peer, &format!("sync message refused: {e}"));
                return Ok(());
            }
        };
        let peer = peer.clone();
        self.peers.insert(conn, peer.clone());
        self.namespace = Some(ns.clone());
        let persisted = self.persist(&ns, changes);
        // The copy is empty and the log has the document: the next round reads it (into a
        // fresh document: nothing Automerge may have queued before stays).
        self.sync.unload();
        self.seen = 0;
        self.set_loaded(false);
        if let Err(e) = persisted {
            tracing::warn!(doc = %self.id, error = %e, "changes from an automerge-repo peer were refused");
            self.error_to(&peer, &format!("changes refused: {e}"));
            // As in the ordinary round: the peer's sync starts over.
            self.sync.reset_peers();
            self.namespace = None;
            self.send_outgoing();
            return Ok(());
        }
        if let Some(sid) = &peer.storage_id {
            if self.sync.their_heads(conn) != their_before.as_deref() {
                self.gossip_heads(vec![(sid.clone(), conn)]);
            }
        }
        self.send_sync(&peer, reply);
        Ok(())
    }

    /// Answer from the log, leaving the document unloaded, a round of peers that have nothing
    /// of it (the find of a document nobody has open) or that acknowledge having all of it
    /// (the find's second message): no Automerge document is built. Only when every input of
    /// the round is such a message (or an ephemeral message, or a peer leaving) and the log
    /// holds the document as a few raw changes; otherwise the batch comes back for the
    /// ordinary round.
    fn answer_from_log(&mut self, batch: Vec<DocInput>) -> Result<(), Vec<DocInput>> {
        let cheap = |i: &DocInput| match i {
            DocInput::Sync { msg, peer, .. } => {
                msg.from_empty_peer() || (msg.is_quiet() && self.sync.has_answered(peer.conn))
            }
            DocInput::Ephemeral { .. } | DocInput::Gone { .. } => true,
        };
        let syncs = batch
            .iter()
            .filter(|i| matches!(i, DocInput::Sync { .. }))
            .count();
        if syncs == 0 || !batch.iter().all(cheap) {
            return Err(batch);
        }
        let max = self.relay.cfg.answer_from_log_changes;
        // One page as large as the ordinary load's: a document that does not fit is loaded.
        let logged = match self.relay.log.pull(&self.id, 0, self.relay.cfg.page_bytes) {
            // Unknown documents (empty namespace) go the ordinary way, which says so.
            Ok(p)
                if !p.namespace.is_empty()
                    && p.snapshot.is_none()
                    && !p.more
                    && p.from == 1
                    && (1..=max).contains(&p.changes.len()) =>
            {
                match LoggedChanges::new(p.changes) {
                    Ok(l) => (p.namespace, l),
                    Err(_) => return Err(batch),
                }
            }
            _ => return Err(batch),
        };
        let (ns, logged) = logged;
        let answerable = |i: &DocInput| match i {
            DocInput::Sync { peer, msg, .. } => {
                msg.from_empty_peer() || self.sync.acknowledges(peer.conn, msg, &logged)
            }
            _ => true,
        };
        if !batch.iter().all(answerable) {
            return Err(batch);
        }
        self.namespace = Some(ns.clone());
        let mut moved: Vec<(String, u64)> = Vec::new();
        let mut replies: Vec<(u64, Vec<u8>)> = Vec::new();
        for input in batch {
            let (peer, msg) = match input {
                DocInput::Sync { peer, msg, .. } => (peer, msg),
                other => {
                    self.relay_other(other);
                    continue;
                }
            };
            if !peer.can_read(&ns) {
                self.refuse_read(&peer, &ns);
                continue;
            }
            let conn = peer.conn;
            self.peers.insert(conn, peer.clone());
            let their_before = self.sync.their_heads(conn).map(<[_]>::to_vec);
            let answered = if msg.from_empty_peer() {
                self.sync
                    .answer_empty_peer(conn, msg, &logged)
                    .map(|reply| replies.push((conn, reply)))
            } else {
                self.sync.answer_ack(conn, msg, &logged)
            };
            if let Err(e) = answered {
                self.error_to(&peer, &format!("sync message refused: {e}"));
                continue;
            }
            if let Some(sid) = &peer.storage_id {
                if self.sync.their_heads(conn) != their_before.as_deref() {
                    moved.push((sid.clone(), conn));
                }
            }
        }
        self.gossip_heads(moved);
        for (conn, data) in replies {
            if let Some(p) = self.peers.get(&conn) {
                self.send_sync(p, data);
            }
        }
        Ok(())
    }

    /// An input that needs no document: forward an ephemeral message to the document's other
    /// peers, or forget a peer that left.
    fn relay_other(&mut self, input: DocInput) {
        match input {
            DocInput::Ephemeral { conn, raw } => {
                for (c, p) in &self.peers {
                    if *c != conn {
                        p.out.send(wire::readdress(&raw, &p.out.peer_id));
                    }
                }
            }
            DocInput::Gone { conn } => {
                self.peers.remove(&conn);
                self.sync.remove_peer(conn);
            }
            DocInput::Sync { .. } => {}
        }
    }

    /// Tell the peers subscribed to a storage id that its heads of this document moved (what
    /// automerge-repo calls remote heads gossiping; peers opt in).
    fn gossip_heads(&self, moved: Vec<(String, u64)>) {
        if moved.is_empty() {
            return;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for (sid, from) in moved {
            let Some(heads) = self.sync.their_heads(from) else {
                continue;
            };
            for (conn, p) in &self.peers {
                if *conn != from && lock(&p.subscribed).contains(&sid) {
                    p.out.send(wire::remote_heads_changed(
                        &self.relay.peer_id,
                        &p.out.peer_id,
                        &self.id,
                        &sid,
                        heads,
                        now,
                    ));
                }
            }
        }
    }

    /// Append `changes` to the log and wait until they are durable; then fan them out to
    /// tandem/1 connections.
    fn persist(&mut self, ns: &str, changes: Vec<Vec<u8>>) -> Result<(), String> {
        if !valid_namespace(ns) {
            return Err(format!("'{ns}' is not a valid namespace"));
        }
        let log = &self.relay.log;
        let pushed = log
            .append(ns, &self.id, &changes)
            .map_err(|e| e.to_string())?;
        log.durable().map_err(|e| e.to_string())?;
        if pushed.new_changes.is_empty() {
            return Ok(());
        }
        let n = pushed.new_changes.len() as u64;
        self.relay
            .stats
            .changes_stored
            .fetch_add(n, Ordering::Relaxed);
        let to = pushed.new_from + n - 1;
        if pushed.new_from == self.seen + 1 {
            self.seen = to;
        }
        (self.relay.fanout)(
            ns,
            self.id,
            RelayMsg::Changes {
                doc: self.id,
                namespace: ns.to_string(),
                from: pushed.new_from,
                to,
                changes: pushed.new_changes,
                more: false,
                remaining_bytes: 0,
            },
        );
        if log.wants_compaction(&self.id) {
            let log = log.clone();
            let id = self.id;
            let compact = move || {
                if let Err(e) = log.compact(&id) {
                    tracing::error!(doc = %id, error = %e, "compaction failed");
                }
            };
            // Off this round's path (it loads the whole document again).
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(compact)),
                Err(_) => compact(),
            }
        }
        Ok(())
    }
}

/// Serve one upgraded `/automerge` connection. `auth` is the outcome of the token check of the
/// upgrade request; `ns` the namespace for documents this peer creates (from `?namespace=`).
pub async fn serve(
    relay: Arc<AmRelay>,
    socket: WebSocket,
    auth: Result<Option<Claims>, AuthError>,
    ns: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = relay.cfg.clone();
    let limits = DecodeLimits::default();
    let (mut sink, mut stream) = socket.split();
    let me = relay.peer_id.clone();
    let refuse = |target: Option<&str>, message: &str| {
        Message::Binary(Bytes::from(wire::error(&me, target, message)))
    };
    let claims = match auth {
        Ok(c) => c,
        Err(e) => {
            relay.stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = sink.send(refuse(None, &e.to_string())).await;
            let _ = sink.close().await;
            return;
        }
    };
    let new_ns = match (ns, &claims) {
        (Some(n), _) => n,
        (None, Some(c)) => c
            .write
            .first()
            .cloned()
            .unwrap_or_else(|| crate::repo::DEFAULT_NAMESPACE.to_string()),
        (None, None) => crate::repo::DEFAULT_NAMESPACE.to_string(),
    };
    // Handshake: a join within the timeout.
    let first = tokio::time::timeout(cfg.handshake_timeout, stream.next()).await;
    let (peer_id, versions, storage_id) = match first {
        Ok(Some(Ok(Message::Binary(b)))) => match wire::decode(&b, limits) {
            Ok(AmMsg::Join {
                sender,
                versions,
                storage_id,
                is_ephemeral,
            }) => (sender, versions, storage_id.filter(|_| !is_ephemeral)),
            Ok(_) => {
                let _ = sink.send(refuse(None, "expected a join first")).await;
                let _ = sink.close().await;
                return;
            }
            Err((e, sender)) => {
                let _ = sink.send(refuse(sender.as_deref(), &e.to_string())).await;
                let _ = sink.close().await;
                return;
            }
        },
        _ => {
            let _ = sink.close().await;
            return;
        }
    };
    if versions.is_some_and(|v| !v.iter().any(|v| v == PROTOCOL_VERSION)) {
        let _ = sink
            .send(refuse(Some(&peer_id), "unsupported protocol version"))
            .await;
        let _ = sink.close().await;
        return;
    }
    relay.stats.connections.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(cfg.outgoing_queue);
    let close = Arc::new(Notify::new());
    let ctx = Arc::new(PeerCtx {
        conn: relay.next_conn.fetch_add(1, Ordering::Relaxed),
        out: PeerOut {
            peer_id: peer_id.clone(),
            tx: tx.clone(),
            close: close.clone(),
        },
        claims,
        new_ns,
        storage_id,
        subscribed: Mutex::new(HashSet::new()),
    });
    ctx.out
        .send(wire::peer(&relay.peer_id, &peer_id, &relay.storage_id));
    let writer = tokio::spawn(async move {
        // Frames queued together go out with one flush (one write to the socket instead of
        // one per frame: a find of thousands of documents queues replies in bursts).
        'frames: while let Some(frame) = rx.recv().await {
            if sink.feed(frame).await.is_err() {
                break;
            }
            for _ in 1..WRITE_BATCH {
                let Ok(frame) = rx.try_recv() else { break };
                if sink.feed(frame).await.is_err() {
                    break 'frames;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut docs: HashSet<DocId> = HashSet::new();
    let mut ping = tokio::time::interval(cfg.ping_every);
    ping.reset();
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(cfg.idle_timeout, stream.next()) => f,
            _ = ping.tick() => {
                let _ = tx.try_send(Message::Ping(Bytes::new()));
                continue;
            }
            _ = close.notified() => break,
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
        };
        let bytes = match frame {
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(_)))) => {
                ctx.out.send(wire::error(
                    &relay.peer_id,
                    Some(&peer_id),
                    "text frames are not part of the protocol; send binary CBOR",
                ));
                break;
            }
            _ => break,
        };
        relay.stats.sync_in.fetch_add(1, Ordering::Relaxed);
        let msg = match wire::decode(&bytes, limits) {
            Ok(m) => m,
            Err((e, _)) => {
                relay.stats.refused.fetch_add(1, Ordering::Relaxed);
                ctx.out
                    .send(wire::error(&relay.peer_id, Some(&peer_id), &e.to_string()));
                // A frame that is not even a CBOR map says the peer speaks something else.
                if matches!(e, WireError::Cbor(_) | WireError::NotAMap) {
                    break;
                }
                continue;
            }
        };
        match msg {
            AmMsg::Join { sender, .. } if sender == peer_id => {
                ctx.out
                    .send(wire::peer(&relay.peer_id, &peer_id, &relay.storage_id));
            }
            AmMsg::Leave { .. } => break,
            // As automerge-repo's own server does: frames from another sender id are dropped.
            AmMsg::Sync { ref sender, .. } | AmMsg::Ephemeral { ref sender, .. }
                if *sender != peer_id => {}
            AmMsg::Sync {
                doc, data, request, ..
            } => {
                if !docs.contains(&doc) && docs.len() >= cfg.max_docs_per_connection {
                    ctx.out.send(wire::error(
                        &relay.peer_id,
                        Some(&peer_id),
                        &format!(
                            "a connection may sync at most {} documents",
                            cfg.max_docs_per_connection
                        ),
                    ));
                    continue;
                }
                match check_sync_message(&data) {
                    Ok(msg) => {
                        docs.insert(doc);
                        relay
                            .route(
                                doc,
                                DocInput::Sync {
                                    peer: ctx.clone(),
                                    msg,
                                    request,
                                },
                            )
                            .await;
                    }
                    Err(e) => {
                        relay.stats.refused.fetch_add(1, Ordering::Relaxed);
                        ctx.out
                            .send(wire::error(&relay.peer_id, Some(&peer_id), &e));
                    }
                }
            }
            AmMsg::Ephemeral { doc, raw, .. } => {
                relay
                    .route_existing(
                        doc,
                        DocInput::Ephemeral {
                            conn: ctx.conn,
                            raw,
                        },
                    )
                    .await;
            }
            AmMsg::RemoteSubscriptionChange { add, remove, .. } => {
                let mut subs = lock(&ctx.subscribed);
                for sid in remove {
                    subs.remove(&sid);
                }
                for sid in add {
                    if subs.len() < MAX_SUBSCRIPTIONS {
                        subs.insert(sid);
                    }
                }
            }
            AmMsg::Join { .. } | AmMsg::Ignored { .. } => {}
        }
    }
    for doc in docs {
        relay
            .route_existing(doc, DocInput::Gone { conn: ctx.conn })
            .await;
    }
    relay.stats.connections.fetch_sub(1, Ordering::Relaxed);
    drop(tx);
    drop(ctx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Backend, Batch, Entries, MemoryBackend, StoreError};
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use std::sync::atomic::AtomicBool;

    /// Memory, with flushes that fail while `failing` is set.
    #[derive(Default)]
    struct FlakyDisk {
        mem: MemoryBackend,
        failing: Arc<AtomicBool>,
    }

    impl Backend for FlakyDisk {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.mem.get(key)
        }
        fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
            self.mem.scan(prefix)
        }
        fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.mem.last(prefix)
        }
        fn scan_from(&self, p: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
            self.mem.scan_from(p, start, limit)
        }
        fn write(&self, batch: Batch) -> Result<(), StoreError> {
            self.mem.write(batch)
        }
        fn sync(&self) -> Result<(), StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Io("the disk is gone".into()));
            }
            self.mem.sync()
        }
    }

    async fn next_frame(rx: &mut mpsc::Receiver<Message>) -> Value {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a frame")
            .expect("the channel is open");
        let Message::Binary(b) = m else {
            panic!("expected a binary frame")
        };
        super::super::cbor::decode(&b, DecodeLimits::default()).unwrap()
    }

    fn sync_data(frame: &Value) -> sync::Message {
        assert_eq!(
            frame.get("type"),
            Some(&Value::Text("sync".into())),
            "{frame:?}"
        );
        let Some(Value::Bytes(data)) = frame.get("data") else {
            panic!("no data")
        };
        sync::Message::decode(data).unwrap()
    }

    use automerge::sync;

    fn test_peer(conn: u64, tx: mpsc::Sender<Message>) -> Arc<PeerCtx> {
        Arc::new(PeerCtx {
            conn,
            out: PeerOut {
                peer_id: format!("browser-{conn}"),
                tx,
                close: Arc::new(Notify::new()),
            },
            claims: None,
            new_ns: "default".into(),
            storage_id: None,
            subscribed: Mutex::new(HashSet::new()),
        })
    }

    #[tokio::test]
    async fn a_find_is_answered_from_the_log_without_loading_the_document() {
        let log: Arc<dyn RelayStore> = Arc::new(crate::relay::log::RelayLog::in_memory());
        let relay = Arc::new(AmRelay::new(
            log,
            AmConfig::default(),
            Box::new(|_, _, _| {}),
        ));
        // A document in the log (as a tandem/1 device or an earlier peer left it).
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "title", "stored").unwrap();
        doc.commit();
        doc.put(automerge::ROOT, "body", "two changes").unwrap();
        doc.commit();
        let changes: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let doc_id = DocId([5; 16]);
        relay.log.append("default", &doc_id, &changes).unwrap();
        relay.log.durable().unwrap();

        let (tx, mut rx) = mpsc::channel(64);
        let peer = test_peer(1, tx);
        let mut client = automerge::Automerge::new();
        let mut state = sync::State::new();
        let send = |m: sync::Message| DocInput::Sync {
            peer: peer.clone(),
            msg: check_sync_message(&m.encode()).unwrap(),
            request: true,
        };
        let request = client.generate_sync_message(&mut state).unwrap();
        relay.route(doc_id, send(request)).await;
        let reply = sync_data(&next_frame(&mut rx).await);
        assert_eq!(
            relay.stats.docs_loaded.load(Ordering::SeqCst),
            0,
            "answered without loading the document"
        );
        assert_eq!(reply.heads, doc.get_heads());
        client.receive_sync_message(&mut state, reply).unwrap();
        assert_eq!(client.get_heads(), doc.get_heads());
        // The client acknowledges; that is taken from the log too, with nothing to send back.
        // A second peer's find, answered after it, shows it was taken.
        let mut ack = client.generate_sync_message(&mut state).unwrap();
        ack.version = sync::MessageVersion::V1;
        relay.route(doc_id, send(ack)).await;
        let (tx2, mut rx2) = mpsc::channel(64);
        let other = DocInput::Sync {
            peer: test_peer(2, tx2),
            msg: check_sync_message(
                &automerge::Automerge::new()
                    .generate_sync_message(&mut sync::State::new())
                    .unwrap()
                    .encode(),
            )
            .unwrap(),
            request: true,
        };
        relay.route(doc_id, other).await;
        sync_data(&next_frame(&mut rx2).await);
        assert!(rx.try_recv().is_err(), "nothing for the acknowledgement");
        assert_eq!(
            relay.stats.docs_loaded.load(Ordering::SeqCst),
            0,
            "the acknowledgement was taken without loading the document"
        );

        // The peer edits and syncs: now the relay loads the document and carries on from the
        // state the answer left, until it reports the peer's new heads.
        let mut tx = client.transaction();
        tx.put(automerge::ROOT, "title", "edited").unwrap();
        tx.commit();
        for _ in 0..10 {
            let Some(mut m) = client.generate_sync_message(&mut state) else {
                break;
            };
            // Version 1, as peers speak to the relay (it never advertises version 2).
            m.version = sync::MessageVersion::V1;
            relay.route(doc_id, send(m)).await;
            let reply = sync_data(&next_frame(&mut rx).await);
            let done = reply.heads == client.get_heads();
            client.receive_sync_message(&mut state, reply).unwrap();
            if done {
                break;
            }
        }
        assert_eq!(
            state.shared_heads,
            client.get_heads(),
            "the relay has the edit"
        );
        assert_eq!(relay.stats.docs_loaded.load(Ordering::SeqCst), 1);
        assert_eq!(relay.stats.changes_stored.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn heads_are_reported_only_once_durable() {
        let disk = FlakyDisk::default();
        let failing = disk.failing.clone();
        let log: Arc<dyn RelayStore> =
            Arc::new(crate::relay::log::RelayLog::with_backend(Box::new(disk)).unwrap());
        let fanned = Arc::new(AtomicU64::new(0));
        let f = fanned.clone();
        let relay = Arc::new(AmRelay::new(
            log,
            AmConfig::default(),
            Box::new(move |_, _, _| {
                f.fetch_add(1, Ordering::SeqCst);
            }),
        ));
        let (tx, mut rx) = mpsc::channel(64);
        let peer = Arc::new(PeerCtx {
            conn: 1,
            out: PeerOut {
                peer_id: "browser".into(),
                tx,
                close: Arc::new(Notify::new()),
            },
            claims: None,
            new_ns: "default".into(),
            storage_id: None,
            subscribed: Mutex::new(HashSet::new()),
        });
        let doc_id = DocId([3; 16]);
        let mut client = automerge::Automerge::new();
        let mut t = client.transaction();
        t.put(automerge::ROOT, "title", "draft").unwrap();
        t.commit();
        let ours = client.get_heads();
        let mut state = sync::State::new();
        let send = |m: sync::Message| DocInput::Sync {
            peer: peer.clone(),
            msg: check_sync_message(&m.encode()).unwrap(),
            request: false,
        };

        // Heads first; the relay lacks them and says so.
        let first = client.generate_sync_message(&mut state).unwrap();
        relay.route(doc_id, send(first)).await;
        let reply = sync_data(&next_frame(&mut rx).await);
        assert!(reply.heads.is_empty());
        client.receive_sync_message(&mut state, reply).unwrap();
        let with_change = client.generate_sync_message(&mut state).unwrap();
        assert_eq!(with_change.changes.len(), 1);

        // The flush fails: an error, and no message that claims the change.
        failing.store(true, Ordering::SeqCst);
        relay.route(doc_id, send(with_change.clone())).await;
        let err = next_frame(&mut rx).await;
        assert_eq!(err.get("type"), Some(&Value::Text("error".into())));
        // The peer's sync starts over: the round ends with a fresh message, which must not
        // claim the change either (waited for, so that it is not taken for the next reply).
        let restart = sync_data(&next_frame(&mut rx).await);
        assert!(restart.heads.iter().all(|h| !ours.contains(h)));
        assert!(rx.try_recv().is_err(), "nothing else was sent");
        assert_eq!(fanned.load(Ordering::SeqCst), 0, "nothing fanned out");

        // The disk is back. A failed flush stays failed for what it covered (nothing written
        // before it may count as durable) until a later write's flush succeeds; then the
        // change is durable and the relay reports the heads.
        failing.store(false, Ordering::SeqCst);
        let mut other = automerge::AutoCommit::new();
        other.put(automerge::ROOT, "k", 1).unwrap();
        let bytes = other.get_changes(&[])[0].raw_bytes().to_vec();
        relay
            .log
            .append("default", &DocId([4; 16]), &[bytes])
            .unwrap();
        relay.log.durable().unwrap();
        relay.route(doc_id, send(with_change)).await;
        let reply = sync_data(&next_frame(&mut rx).await);
        assert_eq!(reply.heads, ours);
    }
}
