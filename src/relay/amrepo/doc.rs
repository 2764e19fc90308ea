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

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::sync::{self, SyncDoc};
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
    for (i, chunk) in msg.changes.iter().enumerate() {
        parse_change(chunk).map_err(|e| format!("change {i} of the sync message: {e}"))?;
    }
    let has_changes = !msg.changes.is_empty();
    Ok(CheckedSync { msg, has_changes })
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

/// One document and its peers' sync states. `P` identifies a peer (the shell's connection id).
pub struct DocSync<P> {
    doc: Automerge,
    peers: BTreeMap<P, sync::State>,
}

impl<P: Ord + Copy> Default for DocSync<P> {
    fn default() -> Self {
        DocSync {
            doc: Automerge::new(),
            peers: BTreeMap::new(),
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
        let mut msg = msg.msg;
        if !write {
            msg.changes = Vec::<Vec<u8>>::new().into();
        }
        let state = self.peers.entry(peer).or_default();
        let doc = &mut self.doc;
        catch_unwind(AssertUnwindSafe(|| doc.receive_sync_message(state, msg)))
            .map_err(|_| "automerge panicked on the sync message".to_string())?
            .map_err(|e| e.to_string())
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
    }

    /// Replace the document (keeping the peers, whose states start over).
    pub fn reload(&mut self) {
        self.doc = Automerge::new();
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
