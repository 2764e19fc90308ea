//! [`DocSync`]: one document in memory and the Automerge sync state of each automerge-repo
//! peer that has it, sans-IO. The shell (`shell.rs`) feeds it the log's changes and the peers'
//! sync messages in batches, persists what it reports as new, and only then asks it for the
//! messages to send (so nothing is announced before it is durable).
//!
//! Peer input is checked here before Automerge sees it: a sync message must be version 1 (the
//! relay never advertises version 2, whose whole-document chunks are compressed and would
//! inflate without a bound), every change must be a raw, checksum-valid change chunk
//! ([`parse_change`]), and bloom filters must have sane parameters (their probe count is a
//! loop bound). Automerge calls on peer data run under `catch_unwind`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::sync::{self, BloomFilter, Capability, Have, MessageVersion, SyncDoc};
use automerge::{Automerge, ChangeHash};

use crate::crdt::parse_change;

/// The first byte of a version 1 sync message (version 2 is `0x43`).
const SYNC_V1: u8 = 0x42;

/// Bloom filter parameters automerge itself uses are 10 bits per entry and 7 probes.
const MAX_BLOOM_PARAM: u64 = 64;

/// A peer's sync message, checked: safe to hand to Automerge.
#[derive(Debug)]
pub struct CheckedSync {
    msg: sync::Message,
    /// Each change's hash and dependencies, in message order (known from the checks).
    graph: Vec<(ChangeHash, Vec<ChangeHash>)>,
    /// Each change's actor and seq, in message order.
    actor_seqs: Vec<(Vec<u8>, u64)>,
    /// Whether it carries changes (a write).
    pub has_changes: bool,
}

/// Decode and check a peer's sync message (see the module docs).
pub fn check_sync_message(data: &[u8]) -> Result<CheckedSync, String> {
    if data.first() != Some(&SYNC_V1) {
        return Err(
            "only version 1 Automerge sync messages are accepted (the relay does not advertise v2)"
                .into(),
        );
    }
    let msg = catch_unwind(|| sync::Message::decode(data))
        .map_err(|_| "automerge panicked decoding the sync message".to_string())?
        .map_err(|e| format!("not an Automerge sync message: {e}"))?;
    for have in &msg.have {
        check_bloom(&have.bloom.to_bytes())?;
    }
    let mut graph = Vec::with_capacity(msg.changes.len());
    let mut actor_seqs = Vec::with_capacity(msg.changes.len());
    for (i, chunk) in msg.changes.iter().enumerate() {
        let c = parse_change(chunk).map_err(|e| format!("change {i} of the sync message: {e}"))?;
        graph.push((c.hash(), c.deps().to_vec()));
        actor_seqs.push((c.actor_id().to_bytes().to_vec(), c.seq()));
    }
    let has_changes = !msg.changes.is_empty();
    Ok(CheckedSync {
        msg,
        graph,
        actor_seqs,
        has_changes,
    })
}

impl CheckedSync {
    /// Whether the sender has nothing of the document: no heads, needs nothing, sends nothing,
    /// and says it has nothing (no "have", or haves with no last sync and an empty bloom
    /// filter) — automerge-repo's `request`, or the first message of an empty document. Such a
    /// message reads nothing of the relay's copy, so [`DocSync::answer_empty_peer`] can answer
    /// it from the log without loading the document.
    pub fn from_empty_peer(&self) -> bool {
        let m = &self.msg;
        m.heads.is_empty()
            && m.need.is_empty()
            && m.changes.is_empty()
            && m.have
                .iter()
                .all(|h| h.last_sync.is_empty() && h.bloom.to_bytes().is_empty())
    }

    /// Whether the sender sends no changes and needs none, with heads: what a peer's
    /// acknowledgement of a reply looks like (see [`DocSync::acknowledges`]).
    pub fn is_quiet(&self) -> bool {
        let m = &self.msg;
        m.changes.is_empty() && m.need.is_empty() && !m.heads.is_empty()
    }
}

/// A document as the log holds it when it was never compacted: its raw changes in log
/// (causal) order, with their hashes and the heads they make, read without building an
/// Automerge document.
#[derive(Debug)]
pub struct LoggedChanges {
    changes: Vec<Vec<u8>>,
    hashes: Vec<ChangeHash>,
    heads: Vec<ChangeHash>,
}

impl LoggedChanges {
    /// Parse the changes (the log's own bytes, validated when they were logged; parsed under
    /// `catch_unwind` all the same). At least one change: an empty log has nothing to answer
    /// with.
    pub fn new(changes: Vec<Vec<u8>>) -> Result<LoggedChanges, String> {
        if changes.is_empty() {
            return Err("no changes".into());
        }
        let mut graph = Vec::with_capacity(changes.len());
        for c in &changes {
            let change = parse_change(c)?;
            graph.push((change.hash(), change.deps().to_vec()));
        }
        let heads = heads_of(&graph);
        let hashes = graph.into_iter().map(|(h, _)| h).collect();
        Ok(LoggedChanges {
            changes,
            hashes,
            heads,
        })
    }

    /// The heads these changes make.
    pub fn heads(&self) -> &[ChangeHash] {
        &self.heads
    }
}

/// The heads a set of changes (hash, dependencies) makes, as Automerge reports heads: the
/// changes nothing among them depends on, sorted.
fn heads_of(graph: &[(ChangeHash, Vec<ChangeHash>)]) -> Vec<ChangeHash> {
    let depended: HashSet<&ChangeHash> = graph.iter().flat_map(|(_, d)| d).collect();
    let mut heads: Vec<ChangeHash> = graph
        .iter()
        .map(|(h, _)| *h)
        .filter(|h| !depended.contains(h))
        .collect();
    heads.sort_unstable();
    heads.dedup();
    heads
}

fn leb128(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn check_bloom(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut b = bytes;
    let (Some(_entries), Some(bits), Some(probes)) =
        (leb128(&mut b), leb128(&mut b), leb128(&mut b))
    else {
        return Err("a malformed bloom filter".into());
    };
    if !(1..=MAX_BLOOM_PARAM).contains(&bits) || !(1..=MAX_BLOOM_PARAM).contains(&probes) {
        return Err(format!(
            "a bloom filter with {bits} bits per entry and {probes} probes (1 to {MAX_BLOOM_PARAM} accepted)"
        ));
    }
    Ok(())
}

/// A change a peer sent that the document did not have yet.
/// At most this many bytes of received changes are kept waiting for their dependencies.
const MAX_RECEIVED_BYTES: usize = 32 << 20;
/// ... and at most this many changes.
const MAX_RECEIVED_CHANGES: usize = 4096;

struct Received {
    hash: ChangeHash,
    deps: Vec<ChangeHash>,
    bytes: Vec<u8>,
}

/// A document taken whole from a peer ([`DocSync::take_new_document`]): its changes in causal
/// order, and the reply to send once they are durable.
pub type NewDocument = (Vec<Vec<u8>>, Vec<u8>);

/// One document and its peers' sync states. `P` identifies a peer (the shell's connection id).
pub struct DocSync<P> {
    doc: Automerge,
    peers: BTreeMap<P, sync::State>,
    /// Changes peers sent that the document lacked, until they are taken as new
    /// ([`take_new_changes`](Self::take_new_changes)) once applied; those whose dependencies
    /// have not arrived wait here as they wait in Automerge's queue, and go with the document.
    received: Vec<Received>,
    /// The bytes held in `received`.
    received_bytes: usize,
}

impl<P: Ord + Copy> Default for DocSync<P> {
    fn default() -> Self {
        DocSync {
            doc: Automerge::new(),
            peers: BTreeMap::new(),
            received: Vec::new(),
            received_bytes: 0,
        }
    }
}

impl<P: Ord + Copy> DocSync<P> {
    /// The document's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Whether the document has no changes.
    pub fn is_empty(&self) -> bool {
        self.doc.get_heads().is_empty()
    }

    /// Changes from the relay's own log (trusted: validated when they were logged), applied in
    /// one call; `snapshot` (a saved document) first when the log was compacted past what this
    /// copy has read.
    pub fn apply_log(
        &mut self,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
    ) -> Result<(), String> {
        let doc = &mut self.doc;
        catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            if let Some(s) = snapshot {
                doc.load_incremental(s).map_err(|e| e.to_string())?;
            }
            let mut parsed = Vec::with_capacity(changes.len());
            for c in changes {
                parsed.push(automerge::Change::from_bytes(c.clone()).map_err(|e| e.to_string())?);
            }
            doc.apply_changes(parsed).map_err(|e| e.to_string())
        }))
        .map_err(|_| "automerge panicked applying the log".to_string())?
    }

    /// A checked sync message from `peer`; `write` false drops its changes (a read-only token).
    pub fn receive(&mut self, peer: P, msg: CheckedSync, write: bool) -> Result<(), String> {
        let CheckedSync { mut msg, graph, .. } = msg;
        let mark = self.received.len();
        if !write {
            msg.changes = Vec::<Vec<u8>>::new().into();
        } else {
            for ((hash, deps), bytes) in graph.into_iter().zip(msg.changes.iter()) {
                if !self.has_change(&hash) && !self.received.iter().any(|r| r.hash == hash) {
                    self.received_bytes += bytes.len();
                    self.received.push(Received {
                        hash,
                        deps,
                        bytes: bytes.to_vec(),
                    });
                }
            }
        }
        let state = self.peers.entry(peer).or_default();
        let doc = &mut self.doc;
        let r = catch_unwind(AssertUnwindSafe(|| doc.receive_sync_message(state, msg)))
            .map_err(|_| "automerge panicked on the sync message".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if r.is_err() {
            // Keep only what the document took of a refused message.
            self.keep_applied(mark);
        }
        if self.received_bytes > MAX_RECEIVED_BYTES || self.received.len() > MAX_RECEIVED_CHANGES {
            // Changes waiting for dependencies that never come: forget their bytes (the
            // document keeps them queued; if they ever apply, `take_new_changes` finds heads
            // it cannot account for and asks Automerge for the changes instead).
            self.keep_applied(0);
        }
        r
    }

    /// Drop the received changes from index `from` on that the document has not applied.
    fn keep_applied(&mut self, from: usize) {
        let tail = self.received.split_off(from);
        let kept: Vec<Received> = tail
            .into_iter()
            .filter(|c| self.has_change(&c.hash))
            .collect();
        self.received.extend(kept);
        self.recount();
    }

    fn recount(&mut self) {
        self.received_bytes = self.received.iter().map(|c| c.bytes.len()).sum();
    }

    /// Answer a message [from an empty peer](CheckedSync::from_empty_peer) with the document as
    /// `logged` (everything the log holds of it), without the document in memory: the peer's
    /// sync state and the reply are the ones Automerge makes (heads, a bloom filter of every
    /// change, no need), except that a peer that takes version 2 messages gets the changes
    /// as stored, one after the other, where Automerge would send a saved document (both load
    /// the same way). The document stays as it is (typically unloaded).
    pub fn answer_empty_peer(
        &mut self,
        peer: P,
        msg: CheckedSync,
        logged: &LoggedChanges,
    ) -> Result<Vec<u8>, String> {
        debug_assert!(msg.from_empty_peer());
        let state = self.peers.entry(peer).or_default();
        // With no heads and no changes, receiving reads nothing of the document: the state
        // comes out the same whatever copy receives it (it forgets what was sent before).
        let doc = &mut self.doc;
        catch_unwind(AssertUnwindSafe(|| {
            doc.receive_sync_message(state, msg.msg)
        }))
        .map_err(|_| "automerge panicked on the sync message".to_string())?
        .map_err(|e| e.to_string())?;
        // What `generate_sync_message` does for this state (their heads `[]`, their need `[]`,
        // shared heads `[]`, nothing sent).
        let v2 = state
            .their_capabilities
            .as_ref()
            .is_some_and(|c| c.contains(&Capability::MessageV2));
        let send_all = !state.is_peer_read_only()
            && (v2 || state.their_have.as_ref().is_some_and(|h| !h.is_empty()));
        let (changes, version) = match (send_all, v2) {
            (false, false) => (Vec::new(), MessageVersion::V1),
            (false, true) => (Vec::new(), MessageVersion::V2),
            (true, false) => (logged.changes.clone(), MessageVersion::V1),
            (true, true) => (vec![logged.changes.concat()], MessageVersion::V2),
        };
        if send_all {
            state.sent_hashes.extend(logged.hashes.iter().copied());
        }
        state.have_responded = true;
        state.last_sent_heads = logged.heads.clone();
        state.in_flight = true;
        let reply = sync::Message {
            heads: logged.heads.clone(),
            need: Vec::new(),
            have: vec![Have {
                last_sync: Vec::new(),
                bloom: BloomFilter::from_hashes(logged.hashes.iter()),
            }],
            changes: changes.into(),
            // As in `outgoing`: no capability flags.
            flags: None,
            version,
        };
        Ok(reply.encode())
    }

    /// Whether `msg` is `peer`'s acknowledgement of the document as `logged`, with this copy
    /// unloaded: the peer was answered before (typically by
    /// [`answer_empty_peer`](Self::answer_empty_peer)), sends no changes, needs nothing, and
    /// says it has exactly the logged heads and has synced up to them. Automerge would answer
    /// such a message with nothing, so [`answer_ack`](Self::answer_ack) can take it without
    /// loading the document.
    pub fn acknowledges(&self, peer: P, msg: &CheckedSync, logged: &LoggedChanges) -> bool {
        let m = &msg.msg;
        let at_heads = |hashes: &[ChangeHash]| {
            let mut sorted = hashes.to_vec();
            sorted.sort_unstable();
            sorted == logged.heads
        };
        self.is_empty()
            && m.changes.is_empty()
            && m.need.is_empty()
            && m.heads == logged.heads
            && m.have.iter().all(|h| at_heads(&h.last_sync))
            && self.has_answered(peer)
    }

    /// Whether `peer` was sent a message (a quiet message from any other peer cannot be an
    /// [acknowledgement](Self::acknowledges)).
    pub fn has_answered(&self, peer: P) -> bool {
        self.peers.get(&peer).is_some_and(|s| s.have_responded)
    }

    /// Take a message that [`acknowledges`](Self::acknowledges) the logged document, leaving
    /// `peer`'s sync state as Automerge leaves it with the document loaded; there is nothing to
    /// send back. The document stays unloaded.
    pub fn answer_ack(
        &mut self,
        peer: P,
        msg: CheckedSync,
        logged: &LoggedChanges,
    ) -> Result<(), String> {
        debug_assert!(self.acknowledges(peer, &msg, logged));
        let Some(state) = self.peers.get_mut(&peer) else {
            return Err("no sync state for the peer".into());
        };
        // On the empty copy, receiving takes the message's flags, clears `in_flight` and keeps
        // the peer's heads, have and need, exactly as on the loaded one. What differs is what
        // depends on the document's changes, set below as the loaded copy sets it: every
        // change sent is an ancestor of the peer's heads (the logged heads), the heads are
        // ours (so they count as sent), and they are shared.
        let doc = &mut self.doc;
        catch_unwind(AssertUnwindSafe(|| {
            doc.receive_sync_message(state, msg.msg)
        }))
        .map_err(|_| "automerge panicked on the sync message".to_string())?
        .map_err(|e| e.to_string())?;
        state.sent_hashes.clear();
        state.last_sent_heads = logged.heads.clone();
        state.shared_heads = logged.heads.clone();
        Ok(())
    }

    /// Take a whole new document from `peer` while this copy is empty, without building it:
    /// the message carries every change of the document (each change's dependencies are among
    /// them), its heads are theirs, and it asks for nothing and lacks nothing this copy would
    /// then send. Leaves `peer`'s sync state as receiving the message and generating the reply
    /// would with the document loaded, and returns the changes in causal order with that reply
    /// (to send once the changes are durable). The copy stays empty: the caller stores the
    /// changes and reads them back from the log when it needs the document. `None`, with
    /// nothing changed, when the message is not such a one; then it goes the ordinary way.
    pub fn take_new_document(
        &mut self,
        peer: P,
        msg: &CheckedSync,
    ) -> Result<Option<NewDocument>, String> {
        let m = &msg.msg;
        // Other peers would be owed the new heads: the ordinary round tells them.
        if !self.is_empty()
            || !self.received.is_empty()
            || m.changes.is_empty()
            || self.peers.keys().any(|&p| p != peer)
        {
            return Ok(None);
        }
        let index: HashMap<ChangeHash, usize> = msg
            .graph
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, i))
            .collect();
        // Automerge would refuse one actor's seq used twice (the log would too): let it say so.
        let distinct_seqs =
            msg.actor_seqs.iter().collect::<HashSet<_>>().len() == msg.actor_seqs.len();
        let closed = distinct_seqs
            && index.len() == msg.graph.len()
            && msg
                .graph
                .iter()
                .all(|(_, deps)| deps.iter().all(|d| index.contains_key(d)));
        if !closed {
            return Ok(None);
        }
        // The heads the changes make (what the document's would be).
        let heads = heads_of(&msg.graph);
        let mut their_heads = m.heads.clone();
        their_heads.sort_unstable();
        if their_heads != heads || !m.need.is_empty() {
            return Ok(None);
        }
        // Nothing to send back: every change is behind their last sync or in their bloom
        // filter (and their last sync is known, else Automerge would ask for a reset).
        let mut synced: HashSet<ChangeHash> = HashSet::new();
        let mut stack: Vec<ChangeHash> = Vec::new();
        for have in &m.have {
            if !have.last_sync.iter().all(|h| index.contains_key(h)) {
                return Ok(None);
            }
            stack.extend(have.last_sync.iter().copied());
        }
        while let Some(h) = stack.pop() {
            if synced.insert(h) {
                stack.extend(msg.graph[index[&h]].1.iter().copied());
            }
        }
        let lacking = !m.have.is_empty()
            && msg.graph.iter().any(|(h, _)| {
                !synced.contains(h) && m.have.iter().all(|have| !have.bloom.contains_hash(h))
            });
        let ours = |s: &sync::State| s.read_only || s.needs_reset || s.last_sent_heads == heads;
        if lacking || self.peers.get(&peer).is_some_and(ours) {
            return Ok(None);
        }
        let state = self.peers.entry(peer).or_default();
        // Receive. On the empty copy, with the changes left out, Automerge takes the flags,
        // clears `in_flight` and keeps the peer's heads, have and need, as it would with the
        // changes applied; what depends on them is set below as the loaded copy sets it.
        let mut bare = m.clone();
        bare.changes = Vec::<Vec<u8>>::new().into();
        let doc = &mut self.doc;
        catch_unwind(AssertUnwindSafe(|| doc.receive_sync_message(state, bare)))
            .map_err(|_| "automerge panicked on the sync message".to_string())?
            .map_err(|e| e.to_string())?;
        // Their heads are all known now: they are shared, and what was sent is behind them.
        state.shared_heads = m.heads.clone();
        state.sent_hashes.retain(|h| !index.contains_key(h));
        // Generate: no need (their heads are ours), a have at the shared heads (nothing after
        // them), no changes; the heads moved, so a message goes out.
        let version = if state
            .their_capabilities
            .as_ref()
            .is_some_and(|c| c.contains(&Capability::MessageV2))
        {
            MessageVersion::V2
        } else {
            MessageVersion::V1
        };
        let reply = sync::Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: vec![Have {
                last_sync: state.shared_heads.clone(),
                bloom: BloomFilter::from_hashes(std::iter::empty::<ChangeHash>()),
            }],
            changes: Vec::<Vec<u8>>::new().into(),
            // As in `outgoing`: no capability flags.
            flags: None,
            version,
        };
        state.have_responded = true;
        state.last_sent_heads = heads;
        state.in_flight = true;
        let order = causal_order(&index, |i| &msg.graph[i].1);
        let chunks: Vec<_> = m.changes.iter().collect();
        let changes = order.into_iter().map(|i| chunks[i].to_vec()).collect();
        Ok(Some((changes, reply.encode())))
    }

    /// Whether the document has applied the change (not merely queued it). Asked one hash at
    /// a time: `get_missing_deps` would also count every change waiting in the queue.
    fn has_change(&self, hash: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(hash).is_some()
    }

    /// The changes peers sent that the document applied since `before` (its heads then), in
    /// causal order, as the peers sent them: what [`changes_since`](Self::changes_since)
    /// returns, without Automerge encoding every change again.
    pub fn take_new_changes(&mut self, before: &[ChangeHash]) -> Vec<Vec<u8>> {
        let (applied, waiting): (Vec<Received>, Vec<Received>) = std::mem::take(&mut self.received)
            .into_iter()
            .partition(|r| self.has_change(&r.hash));
        self.received = waiting;
        self.recount();
        let index: HashMap<ChangeHash, usize> = applied
            .iter()
            .enumerate()
            .map(|(i, r)| (r.hash, i))
            .collect();
        // Every head is an old one or one of these, else something else changed the document
        // (never expected): ask Automerge.
        if !self
            .doc
            .get_heads()
            .iter()
            .all(|h| before.contains(h) || index.contains_key(h))
        {
            tracing::warn!("document heads not accounted for by the changes received");
            return self.changes_since(before);
        }
        let order = causal_order(&index, |i| &applied[i].deps);
        let mut applied: Vec<Option<Received>> = applied.into_iter().map(Some).collect();
        order
            .into_iter()
            .filter_map(|i| applied[i].take().map(|r| r.bytes))
            .collect()
    }

    /// The changes made since `heads` (an earlier [`heads`](Self::heads)), in causal order.
    pub fn changes_since(&self, heads: &[ChangeHash]) -> Vec<Vec<u8>> {
        self.doc
            .get_changes(heads)
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// Whether `peer` syncs this document.
    pub fn has_peer(&self, peer: P) -> bool {
        self.peers.contains_key(&peer)
    }

    /// The peers that sync this document.
    pub fn peers(&self) -> impl Iterator<Item = P> + '_ {
        self.peers.keys().copied()
    }

    /// Forget `peer`.
    pub fn remove_peer(&mut self, peer: P) {
        self.peers.remove(&peer);
    }

    /// Start every peer's sync over (after this copy was rebuilt from the log).
    pub fn reset_peers(&mut self) {
        for s in self.peers.values_mut() {
            *s = sync::State::new();
        }
    }

    /// Drop the document from memory, keeping the peers' sync states: they stay valid, since
    /// the copy is rebuilt from the log, which holds everything it had.
    pub fn unload(&mut self) {
        self.doc = Automerge::new();
        self.received.clear();
        self.received_bytes = 0;
    }

    /// Replace the document (keeping the peers, whose states start over).
    pub fn reload(&mut self) {
        self.unload();
        self.reset_peers();
    }

    /// The heads `peer` last told us it has.
    pub fn their_heads(&self, peer: P) -> Option<&[ChangeHash]> {
        self.peers.get(&peer)?.their_heads.as_deref()
    }

    /// The next sync message for each peer that is owed one (encoded). Our messages carry no
    /// capability flags, so peers keep sending version 1 messages of raw changes.
    pub fn outgoing(&mut self) -> Vec<(P, Vec<u8>)> {
        let doc = &self.doc;
        let mut out = Vec::new();
        for (peer, state) in self.peers.iter_mut() {
            let msg = catch_unwind(AssertUnwindSafe(|| doc.generate_sync_message(state)));
            if let Ok(Some(mut m)) = msg {
                m.flags = None;
                out.push((*peer, m.encode()));
            }
        }
        out
    }
}

/// The changes `0..index.len()` (`index` maps each one's hash to its position) in causal
/// order: depth first, each after those of its dependencies that are among them. Iterative, so
/// a long chain cannot exhaust the stack.
fn causal_order<'a>(
    index: &HashMap<ChangeHash, usize>,
    deps: impl Fn(usize) -> &'a [ChangeHash],
) -> Vec<usize> {
    let n = index.len();
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    for start in 0..n {
        let mut stack = vec![(start, 0usize)];
        while let Some((i, next)) = stack.pop() {
            if done[i] {
                continue;
            }
            let dep = deps(i)[next..]
                .iter()
                .enumerate()
                .find_map(|(k, d)| index.get(d).filter(|&&j| !done[j]).map(|&j| (k, j)));
            match dep {
                Some((k, j)) => {
                    stack.push((i, next + k + 1));
                    stack.push((j, 0));
                }
                None => {
                    done[i] = true;
                    order.push(i);
                }
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    /// Run the sync protocol between a client document and `relay` until both are quiet.
    fn converge(client: &mut Automerge, relay: &mut DocSync<u8>, peer: u8) {
        let mut state = sync::State::new();
        for _ in 0..20 {
            let mut quiet = true;
            if let Some(m) = client.generate_sync_message(&mut state) {
                quiet = false;
                let checked = check_sync_message(&m.encode()).unwrap();
                relay.receive(peer, checked, true).unwrap();
            }
            for (p, bytes) in relay.outgoing() {
                assert_eq!(p, peer);
                quiet = false;
                let m = sync::Message::decode(&bytes).unwrap();
                // No capability flags: the client keeps sending v1 (checked on receipt above).
                assert_eq!(m.flags, None);
                client.receive_sync_message(&mut state, m).unwrap();
            }
            if quiet {
                return;
            }
        }
        panic!("sync did not settle");
    }

    #[test]
    fn a_client_document_reaches_the_relay_as_raw_changes() {
        let mut client = Automerge::new();
        let mut tx = client.transaction();
        tx.put(automerge::ROOT, "title", "hello").unwrap();
        tx.commit();
        let mut relay: DocSync<u8> = DocSync::default();
        let before = relay.heads();
        converge(&mut client, &mut relay, 1);
        assert_eq!(relay.heads(), client.get_heads());
        let new = relay.changes_since(&before);
        assert_eq!(new.len(), 1);
        assert!(parse_change(&new[0]).is_ok());
        // A second peer gets it from the relay.
        let mut other = Automerge::new();
        converge(&mut other, &mut relay, 2);
        assert_eq!(other.get_heads(), client.get_heads());
    }

    /// A document with concurrent heads, and its changes in log (causal) order.
    fn two_writers() -> (Automerge, Vec<Vec<u8>>) {
        let mut a = Automerge::new();
        let mut tx = a.transaction();
        tx.put(automerge::ROOT, "title", "hello").unwrap();
        tx.commit();
        let mut b = a.fork();
        let mut tx = b.transaction();
        tx.put(automerge::ROOT, "title", "from b").unwrap();
        tx.commit();
        let mut tx = a.transaction();
        tx.put(automerge::ROOT, "body", "from a").unwrap();
        tx.commit();
        a.merge(&mut b).unwrap();
        let changes = a
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        (a, changes)
    }

    /// What an empty peer may send first: automerge-repo's `request` as the JavaScript
    /// package encodes it (flags: version 2, sync reset), this crate's own, one without flags,
    /// and one with no "have" at all.
    /// Decode two replies and check they say the same but for their changes.
    fn same_reply(ours: &[u8], theirs: &[u8]) -> (sync::Message, sync::Message) {
        let (ours, theirs) = (
            sync::Message::decode(ours).unwrap(),
            sync::Message::decode(theirs).unwrap(),
        );
        assert_eq!(ours.heads, theirs.heads);
        assert_eq!(ours.need, theirs.need);
        assert_eq!(ours.have, theirs.have);
        assert_eq!(ours.version, theirs.version);
        assert_eq!(ours.flags, theirs.flags);
        (ours, theirs)
    }

    fn empty_peer_messages() -> Vec<Vec<u8>> {
        let js_request = hex::decode("42000001000000020284").unwrap();
        let ours = Automerge::new()
            .generate_sync_message(&mut sync::State::new())
            .unwrap()
            .encode();
        let bare = |have: Vec<Have>| {
            sync::Message {
                heads: vec![],
                need: vec![],
                have,
                changes: Vec::<Vec<u8>>::new().into(),
                flags: None,
                version: MessageVersion::V1,
            }
            .encode()
        };
        vec![js_request, ours, bare(vec![Have::default()]), bare(vec![])]
    }

    #[test]
    fn an_empty_peer_is_answered_from_the_log_as_automerge_would() {
        let (doc, changes) = two_writers();
        assert_eq!(doc.get_heads().len(), 2, "concurrent heads");
        let logged = LoggedChanges::new(changes.clone()).unwrap();
        assert_eq!(logged.heads(), doc.get_heads());
        for first in empty_peer_messages() {
            let checked = check_sync_message(&first).unwrap();
            assert!(checked.from_empty_peer());
            // Automerge with the document loaded.
            let mut loaded: DocSync<u8> = DocSync::default();
            loaded.apply_log(None, &changes).unwrap();
            loaded.receive(1, checked, true).unwrap();
            let (_, theirs) = loaded.outgoing().pop().unwrap();
            // From the log, with nothing loaded.
            let mut unloaded: DocSync<u8> = DocSync::default();
            let ours = unloaded
                .answer_empty_peer(1, check_sync_message(&first).unwrap(), &logged)
                .unwrap();
            assert!(unloaded.is_empty(), "nothing was loaded");
            assert_eq!(unloaded.peers[&1], loaded.peers[&1], "the same sync state");
            let (ours, theirs) = same_reply(&ours, &theirs);
            assert_eq!(ours.changes.is_empty(), theirs.changes.is_empty());
            // Either reply gives the peer the same document.
            let load = |m: &sync::Message| {
                let mut d = Automerge::new();
                for c in m.changes.iter() {
                    d.load_incremental(c).unwrap();
                }
                d.get_heads()
            };
            assert_eq!(load(&ours), load(&theirs));

            // The conversation goes on with the document loaded, from the state the answer
            // left, until both sides agree.
            let mut client = Automerge::new();
            let mut state = sync::State::new();
            client.receive_sync_message(&mut state, ours).unwrap();
            unloaded.apply_log(None, &changes).unwrap();
            for _ in 0..10 {
                let Some(m) = client.generate_sync_message(&mut state) else {
                    break;
                };
                let mut m = m;
                // The client speaks version 1 to the relay, which never advertises version 2.
                m.version = MessageVersion::V1;
                unloaded
                    .receive(1, check_sync_message(&m.encode()).unwrap(), true)
                    .unwrap();
                for (_, bytes) in unloaded.outgoing() {
                    let m = sync::Message::decode(&bytes).unwrap();
                    client.receive_sync_message(&mut state, m).unwrap();
                }
            }
            assert_eq!(client.get_heads(), doc.get_heads());
        }
    }

    #[test]
    fn the_acknowledgement_of_a_log_answer_is_taken_as_automerge_would() {
        let (doc, changes) = two_writers();
        let logged = LoggedChanges::new(changes.clone()).unwrap();
        let mut acked = 0;
        for first in empty_peer_messages() {
            let mut loaded: DocSync<u8> = DocSync::default();
            loaded.apply_log(None, &changes).unwrap();
            loaded
                .receive(1, check_sync_message(&first).unwrap(), true)
                .unwrap();
            loaded.outgoing();
            let mut unloaded: DocSync<u8> = DocSync::default();
            let reply = unloaded
                .answer_empty_peer(1, check_sync_message(&first).unwrap(), &logged)
                .unwrap();
            // The client takes the reply and acknowledges it.
            let mut client = Automerge::new();
            let mut state = sync::State::new();
            client
                .receive_sync_message(&mut state, sync::Message::decode(&reply).unwrap())
                .unwrap();
            let mut ack = client.generate_sync_message(&mut state).unwrap();
            ack.version = MessageVersion::V1;
            let ack = ack.encode();
            if client.get_heads() != doc.get_heads() {
                // A reply with no changes (a peer that said nothing of what it has): not an
                // acknowledgement of the document.
                assert!(!unloaded.acknowledges(1, &check_sync_message(&ack).unwrap(), &logged));
                continue;
            }
            let checked = check_sync_message(&ack).unwrap();
            assert!(unloaded.acknowledges(1, &checked, &logged));
            unloaded.answer_ack(1, checked, &logged).unwrap();
            acked += 1;
            loaded
                .receive(1, check_sync_message(&ack).unwrap(), true)
                .unwrap();
            assert!(loaded.outgoing().is_empty(), "automerge sends nothing back");
            assert!(unloaded.is_empty(), "nothing was loaded");
            assert_eq!(unloaded.peers[&1], loaded.peers[&1], "the same sync state");
            // Loaded later, the copy owes the peer nothing either.
            unloaded.apply_log(None, &changes).unwrap();
            assert!(unloaded.outgoing().is_empty());
        }
        assert!(acked >= 2, "{acked} acknowledgements");
        // A peer never answered, or one that is behind, is not acknowledging.
        let unloaded: DocSync<u8> = DocSync::default();
        let m = doc.generate_sync_message(&mut sync::State::new()).unwrap();
        assert!(!unloaded.acknowledges(1, &check_sync_message(&m.encode()).unwrap(), &logged));
    }

    /// A client's message, as it reaches the relay: version 1, with or without its flags.
    fn as_sent(mut m: sync::Message, flags: bool) -> CheckedSync {
        m.version = MessageVersion::V1;
        if !flags {
            m.flags = None;
        }
        check_sync_message(&m.encode()).unwrap()
    }

    #[test]
    fn a_new_document_is_taken_without_building_it_as_automerge_would() {
        let (concurrent, _) = two_writers();
        let mut chain = Automerge::new();
        for i in 0..3 {
            let mut tx = chain.transaction();
            tx.put(automerge::ROOT, "n", i).unwrap();
            tx.commit();
        }
        let mut taken = 0;
        for mut client in [concurrent, chain] {
            for flags in [false, true] {
                // The client's first message (its heads), answered the ordinary way by both
                // copies; then its changes.
                let mut state = sync::State::new();
                let first = client.generate_sync_message(&mut state).unwrap();
                let mut real: DocSync<u8> = DocSync::default();
                let mut fast: DocSync<u8> = DocSync::default();
                real.receive(1, as_sent(first.clone(), flags), true)
                    .unwrap();
                fast.receive(1, as_sent(first, flags), true).unwrap();
                let asked = real.outgoing().pop().unwrap().1;
                assert_eq!(fast.outgoing().pop().unwrap().1, asked);
                client
                    .receive_sync_message(&mut state, sync::Message::decode(&asked).unwrap())
                    .unwrap();
                let second = client.generate_sync_message(&mut state).unwrap();
                assert!(!second.changes.is_empty());

                let before = real.heads();
                real.receive(1, as_sent(second.clone(), flags), true)
                    .unwrap();
                let mut real_changes = real.take_new_changes(&before);
                let (_, real_reply) = real.outgoing().pop().unwrap();
                let (mut changes, reply) = fast
                    .take_new_document(1, &as_sent(second, flags))
                    .unwrap()
                    .expect("taken without the document");
                taken += 1;
                assert!(fast.is_empty(), "nothing was built");
                assert_eq!(fast.peers[&1], real.peers[&1], "the same sync state");
                let (ours, theirs) = same_reply(&reply, &real_reply);
                assert!(ours.changes.is_empty() && theirs.changes.is_empty());
                // The same changes, each after its dependencies.
                let mut d = Automerge::new();
                for c in &changes {
                    let c = automerge::Change::from_bytes(c.clone()).unwrap();
                    let h = c.hash();
                    d.apply_changes([c]).unwrap();
                    assert!(d.get_change_meta_by_hash(&h).is_some(), "applied in order");
                }
                assert_eq!(d.get_heads(), client.get_heads());
                changes.sort();
                real_changes.sort();
                assert_eq!(changes, real_changes);
            }
        }
        assert_eq!(taken, 4);
    }

    #[test]
    fn only_a_whole_new_document_is_taken_without_building_it() {
        let (doc, changes) = two_writers();
        let whole = doc.generate_sync_message(&mut sync::State::new()).unwrap();
        let with = |changes: &[Vec<u8>], need: Vec<ChangeHash>| {
            let mut m = whole.clone();
            m.changes = changes.to_vec().into();
            m.need = need;
            as_sent(m, false)
        };
        // Not every change (a dependency is missing), or a need, or a copy that has changes.
        let mut empty: DocSync<u8> = DocSync::default();
        assert!(empty
            .take_new_document(1, &with(&changes[1..], vec![]))
            .unwrap()
            .is_none());
        assert!(empty
            .take_new_document(1, &with(&changes, doc.get_heads()))
            .unwrap()
            .is_none());
        assert!(!empty.has_peer(1), "nothing changed");
        // One actor's seq used twice (two changes that are each a whole history).
        let first = automerge::Change::from_bytes(changes[0].clone()).unwrap();
        let mut twin = Automerge::new().with_actor(first.actor_id().clone());
        let mut tx = twin.transaction();
        tx.put(automerge::ROOT, "title", "another first change")
            .unwrap();
        tx.commit();
        let twin = twin.get_changes(&[])[0].raw_bytes().to_vec();
        let mut both = whole.clone();
        both.changes = vec![changes[0].clone(), twin].into();
        both.heads = Vec::new();
        let mut heads: Vec<ChangeHash> = both
            .changes
            .iter()
            .map(|c| automerge::Change::from_bytes(c.to_vec()).unwrap().hash())
            .collect();
        heads.sort();
        both.heads = heads;
        assert!(empty
            .take_new_document(1, &as_sent(both, false))
            .unwrap()
            .is_none());
        // The whole history alone is taken...
        assert!(DocSync::<u8>::default()
            .take_new_document(1, &with(&changes, vec![]))
            .unwrap()
            .is_some());
        // ... but not while another peer syncs the document: it is owed the new heads too.
        let mut watched: DocSync<u8> = DocSync::default();
        watched
            .receive(
                2,
                as_sent(
                    Automerge::new()
                        .generate_sync_message(&mut sync::State::new())
                        .unwrap(),
                    false,
                ),
                true,
            )
            .unwrap();
        assert!(watched
            .take_new_document(1, &with(&changes, vec![]))
            .unwrap()
            .is_none());
        let mut loaded: DocSync<u8> = DocSync::default();
        loaded.apply_log(None, &changes[..1]).unwrap();
        assert!(loaded
            .take_new_document(1, &with(&changes, vec![]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn only_a_peer_with_nothing_is_answered_from_the_log() {
        let (doc, _) = two_writers();
        // A peer that has the document.
        let m = doc.generate_sync_message(&mut sync::State::new()).unwrap();
        assert!(!check_sync_message(&m.encode()).unwrap().from_empty_peer());
        // One that claims to have changes (a bloom filter with entries), or needs some.
        let claims = sync::Message {
            heads: vec![],
            need: vec![],
            have: vec![Have {
                last_sync: vec![],
                bloom: BloomFilter::from_hashes(doc.get_heads().iter()),
            }],
            changes: Vec::<Vec<u8>>::new().into(),
            flags: None,
            version: MessageVersion::V1,
        };
        let mut needs = claims.clone();
        needs.have = vec![];
        needs.need = doc.get_heads();
        for m in [claims, needs] {
            assert!(!check_sync_message(&m.encode()).unwrap().from_empty_peer());
        }
        assert!(LoggedChanges::new(vec![]).is_err());
        assert!(LoggedChanges::new(vec![b"junk".to_vec()]).is_err());
    }

    #[test]
    fn new_changes_are_the_ones_peers_sent_in_causal_order() {
        // Three changes in a chain.
        let mut doc = Automerge::new();
        for v in ["one", "two", "three"] {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "title", v).unwrap();
            tx.commit();
        }
        let c: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let msg = |chunks: &[&Vec<u8>]| {
            let m = sync::Message {
                heads: doc.get_heads(),
                need: vec![],
                have: vec![],
                changes: chunks.iter().map(|c| c.to_vec()).collect::<Vec<_>>().into(),
                flags: None,
                version: MessageVersion::V1,
            };
            check_sync_message(&m.encode()).unwrap()
        };
        let mut relay: DocSync<u8> = DocSync::default();
        let before = relay.heads();
        relay.receive(1, msg(&[&c[0]]), true).unwrap();
        assert_eq!(relay.take_new_changes(&before), vec![c[0].clone()]);
        // The third before the second: it waits for it, then both are new, in causal order.
        let before = relay.heads();
        relay.receive(1, msg(&[&c[2]]), true).unwrap();
        assert!(relay.take_new_changes(&before).is_empty(), "still waiting");
        relay.receive(1, msg(&[&c[1]]), true).unwrap();
        assert_eq!(
            relay.take_new_changes(&before),
            vec![c[1].clone(), c[2].clone()]
        );
        assert_eq!(relay.heads(), doc.get_heads());
        // Nothing twice.
        let before = relay.heads();
        relay.receive(2, msg(&[&c[2], &c[1], &c[0]]), true).unwrap();
        assert!(relay.take_new_changes(&before).is_empty());
    }

    #[test]
    fn a_change_waiting_for_a_dependency_hides_no_other() {
        // A chain of two changes from one writer, and an unrelated change from another.
        let mut chain = Automerge::new();
        for v in ["one", "two"] {
            let mut tx = chain.transaction();
            tx.put(automerge::ROOT, "title", v).unwrap();
            tx.commit();
        }
        let c = chain.get_changes(&[]);
        let mut other = Automerge::new();
        let mut tx = other.transaction();
        tx.put(automerge::ROOT, "body", "x").unwrap();
        tx.commit();
        let lone = other.get_changes(&[])[0].raw_bytes().to_vec();
        let msg = |chunks: Vec<Vec<u8>>| {
            let m = sync::Message {
                heads: vec![],
                need: vec![],
                have: vec![],
                changes: chunks.into(),
                flags: None,
                version: MessageVersion::V1,
            };
            check_sync_message(&m.encode()).unwrap()
        };
        let mut relay: DocSync<u8> = DocSync::default();
        let before = relay.heads();
        // The second of the chain alone: it waits in the queue for the first.
        relay
            .receive(1, msg(vec![c[1].raw_bytes().to_vec()]), true)
            .unwrap();
        relay.receive(2, msg(vec![lone.clone()]), true).unwrap();
        assert_eq!(relay.take_new_changes(&before), vec![lone]);
        let before = relay.heads();
        relay
            .receive(1, msg(vec![c[0].raw_bytes().to_vec()]), true)
            .unwrap();
        assert_eq!(
            relay.take_new_changes(&before),
            vec![c[0].raw_bytes().to_vec(), c[1].raw_bytes().to_vec()]
        );
    }

    #[test]
    fn hostile_sync_messages_are_refused() {
        assert!(check_sync_message(&[]).is_err());
        assert!(
            check_sync_message(&[0x43, 0, 0, 0, 0]).is_err(),
            "v2 refused"
        );
        assert!(check_sync_message(&[0x42, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        // A v1 message whose one "change" is garbage.
        let mut m = vec![0x42, 0, 0, 0, 1, 5];
        m.extend_from_slice(b"hello");
        assert!(check_sync_message(&m).is_err());
        // A bloom filter with a billion probes.
        let mut m = vec![0x42, 0, 0, 1, 0];
        let bloom = [1u8, 10, 0x80, 0x94, 0xeb, 0xdc, 0x03, 0, 0];
        m.push(bloom.len() as u8);
        m.extend_from_slice(&bloom);
        m.push(0);
        assert!(check_sync_message(&m).unwrap_err().contains("probes"));
    }
}
