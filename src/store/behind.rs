//! sled applied behind the write-ahead log. Every `apply_batch` makes sled roll its I/O buffer
//! twice, and each roll is a disk write that waits for the device
//! (`sync_file_range(WAIT_AFTER)`): two disk writes per batch, on the path of every durable
//! write and in the way of the log's own `fdatasync`. So a batch goes into the log and into
//! an in-memory overlay (the newest value of each key written since sled last caught up), and
//! a background thread applies everything the overlay holds to sled in one `apply_batch` a
//! few milliseconds later, with the newest lsn. Reads look in the overlay before sled.
//!
//! Why this is as safe as applying each batch: sled takes whole groups of batches, in lsn
//! order, each group atomically, and then the group's last lsn (a separate write, so a group
//! sled took only in part, when it fails, never carries an lsn that would make replay skip
//! it); after a crash it holds the batches up to some lsn, maybe more, and replay applies the
//! rest from the log again. A checkpoint first applies the overlay, so no log file is deleted
//! while sled lacks one of its records; when sled refuses a group, the log is poisoned (no
//! more writes, no file deleted) and the next open replays everything.
//!
//! Readers see whole batches: a batch enters the overlay under one lock, and a group's keys
//! stay in the overlay, masking sled, until sled has taken the group; they leave it only while
//! the applier holds `gate` for writing (readers hold it for reading across the overlay and
//! sled lookups of one call).

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use super::wal::{Op, LSN_KEY};
use super::StoreError;

/// How long a batch may wait in the overlay: enough to gather many batches into one
/// `apply_batch`, little next to a checkpoint.
const DELAY: Duration = Duration::from_millis(5);

/// Past this many bytes in the overlay, a writer applies it itself (backpressure).
const MAX_BYTES: usize = 32 << 20;

#[derive(Default)]
struct Overlay {
    /// Key → (lsn of its newest write, the value or a removal).
    ops: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// The newest lsn taken (its batch may have had no ops, or been overwritten since).
    lsn: u64,
    /// The lsn sled last recorded.
    applied: u64,
    bytes: usize,
    /// sled refused a group: no more writes.
    failed: Option<String>,
    stop: bool,
}

pub(crate) struct Behind {
    overlay: Mutex<Overlay>,
    wake: Condvar,
    /// Held for writing while keys leave the overlay, for reading across one read's lookups.
    gate: RwLock<()>,
    /// One group at a time.
    applying: Mutex<()>,
    tree: sled::Tree,
}

/// What an entry of the overlay counts for against [`MAX_BYTES`].
fn weight(k: &[u8], v: &Option<Vec<u8>>) -> usize {
    k.len() + v.as_ref().map_or(0, Vec::len) + 64
}

fn lock(m: &Mutex<Overlay>) -> MutexGuard<'_, Overlay> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one key reads as: from the overlay (a value, or removed), or not there (ask sled).
enum Seen {
    Over(Option<Vec<u8>>),
    Absent,
}

impl Behind {
    pub(crate) fn new(tree: sled::Tree) -> Behind {
        Behind {
            overlay: Mutex::new(Overlay::default()),
            wake: Condvar::new(),
            gate: RwLock::new(()),
            applying: Mutex::new(()),
            tree,
        }
    }

    /// Take a logged batch (called under the log's lock, so lsns arrive in order).
    pub(crate) fn put(&self, lsn: u64, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut o = lock(&self.overlay);
        if let Some(msg) = &o.failed {
            return Err(StoreError::Io(msg.clone()));
        }
        for (k, v) in ops {
            o.bytes += weight(&k, &v);
            if let Some((_, old)) = o.ops.insert(k.clone(), (lsn, v)) {
                o.bytes -= weight(&k, &old);
            }
        }
        o.lsn = lsn;
        self.wake.notify_one();
        Ok(())
    }

    /// Apply everything the overlay holds to sled, in one atomic batch, then record its newest
    /// lsn.
    pub(crate) fn apply(&self) -> Result<(), StoreError> {
        let _one = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let (lsn, batch) = {
            let o = lock(&self.overlay);
            if let Some(msg) = &o.failed {
                return Err(StoreError::Io(msg.clone()));
            }
            // Even a batch with no ops moves sled's lsn: a checkpoint after it must leave
            // replay no gap.
            if o.ops.is_empty() && o.lsn == o.applied {
                return Ok(());
            }
            let mut b = sled::Batch::default();
            for (k, (_, v)) in &o.ops {
                match v {
                    Some(v) => b.insert(k.as_slice(), v.as_slice()),
                    None => b.remove(k.as_slice()),
                }
            }
            (o.lsn, b)
        };
        // Readers meanwhile still find every key of the group in the overlay; batches that
        // arrive meanwhile carry newer lsns and stay there.
        let applied = self
            .tree
            .apply_batch(batch)
            .and_then(|()| self.tree.insert(LSN_KEY, &lsn.to_be_bytes()).map(drop));
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut o = lock(&self.overlay);
        if let Err(e) = applied {
            let msg = format!("sled refused a batch ({e}); reopen the store");
            o.failed = Some(msg.clone());
            return Err(StoreError::Io(msg));
        }
        o.ops.retain(|_, (l, _)| *l > lsn);
        o.applied = lsn;
        o.bytes = o.ops.iter().map(|(k, (_, v))| weight(k, v)).sum();
        Ok(())
    }

    /// Whether the overlay is past [`MAX_BYTES`] (a writer then applies it itself).
    pub(crate) fn full(&self) -> bool {
        lock(&self.overlay).bytes > MAX_BYTES
    }

    /// The applier's loop: wait for a batch, let more gather for [`DELAY`], apply. Returns
    /// after [`stop`](Self::stop) (the overlay is left for the closer to apply).
    pub(crate) fn run(&self, failed: impl Fn(&str)) {
        loop {
            {
                let mut o = lock(&self.overlay);
                while o.ops.is_empty() && !o.stop {
                    o = self.wake.wait(o).unwrap_or_else(|p| p.into_inner());
                }
                if o.stop {
                    return;
                }
            }
            std::thread::sleep(DELAY);
            if let Err(e) = self.apply() {
                tracing::error!("the store stops taking writes: {e}");
                failed(&e.to_string());
                return;
            }
        }
    }

    pub(crate) fn stop(&self) {
        lock(&self.overlay).stop = true;
        self.wake.notify_all();
    }

    fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self, key: &[u8]) -> Seen {
        match lock(&self.overlay).ops.get(key) {
            Some((_, v)) => Seen::Over(v.clone()),
            None => Seen::Absent,
        }
    }

    /// The overlay's writes to keys that start with `prefix` and are ≥ `start`, in key order,
    /// up to the `limit`-th that is not a removal (no later one can be read); values as `take`
    /// makes them.
    fn over_range<T>(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
        take: &impl Fn(&[u8]) -> T,
    ) -> Vec<(Vec<u8>, Option<T>)> {
        let o = lock(&self.overlay);
        let mut out = Vec::new();
        let mut values = 0;
        for (k, (_, v)) in o.ops.range(start.max(prefix).to_vec()..) {
            if !k.starts_with(prefix) || values == limit {
                break;
            }
            values += usize::from(v.is_some());
            out.push((k.clone(), v.as_deref().map(take)));
        }
        out
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let _r = self.read();
        match self.seen(key) {
            Seen::Over(v) => Ok(v),
            Seen::Absent => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Up to `limit` entries with keys starting with `prefix` and ≥ `start`, in key order.
    pub(crate) fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<super::backend::Entries, StoreError> {
        self.range(prefix, start, limit, <[u8]>::to_vec)
    }

    /// The keys starting with `prefix`, in order (values are not copied).
    pub(crate) fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let keys = self.range(prefix, prefix, usize::MAX, |_| ())?;
        Ok(keys.into_iter().map(|(k, ())| k).collect())
    }

    /// Up to `limit` entries with keys starting with `prefix` and ≥ `start`, in key order,
    /// overlay over sled; values as `take` makes them.
    fn range<T>(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
        take: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let _r = self.read();
        let over = self.over_range(prefix, start, limit, &take);
        let sled = self
            .tree
            .range(start.max(prefix).to_vec()..)
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)));
        let mut out = Vec::new();
        let mut over = over.into_iter().peekable();
        let mut sled = sled.peekable();
        while out.len() < limit {
            if let Some(Err(_)) = sled.peek() {
                if let Some(Err(e)) = sled.next() {
                    return Err(e.into());
                }
            }
            // Compared in place: a key is copied once, into the entry that is kept.
            let next_sled = sled.peek().and_then(|r| r.as_ref().ok()).map(|(k, _)| k);
            let (take_over, same) = match (over.peek(), next_sled) {
                (None, None) => break,
                (Some(_), None) => (true, false),
                (None, Some(_)) => (false, false),
                (Some((ok, _)), Some(sk)) => {
                    (ok.as_slice() <= sk.as_ref(), ok.as_slice() == sk.as_ref())
                }
            };
            if take_over {
                let (k, v) = over.next().expect("peeked");
                if same {
                    sled.next();
                }
                if let Some(v) = v {
                    out.push((k, v));
                }
            } else if let Some(Ok((k, v))) = sled.next() {
                out.push((k.to_vec(), take(&v)));
            }
        }
        Ok(out)
    }

    /// The greatest key starting with `prefix`.
    pub(crate) fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let _r = self.read();
        let over_last = {
            let o = lock(&self.overlay);
            o.ops
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, (_, v))| v.is_some())
                .map(|(k, _)| k.clone())
                .last()
        };
        // sled's greatest key the overlay has not removed.
        let mut sled_last = None;
        for r in self.tree.scan_prefix(prefix).rev() {
            let (k, _) = r?;
            if !matches!(self.seen(&k), Seen::Over(None)) {
                sled_last = Some(k.to_vec());
                break;
            }
        }
        Ok(over_last.max(sled_last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random writes, removals and catch-ups against a plain map: every read agrees.
    #[test]
    fn reads_through_the_overlay_match_a_plain_map() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let behind = Behind::new(db.open_tree("t").unwrap());
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let key = |n: u64| vec![b'k', (n / 10) as u8, (n % 10) as u8];
        for lsn in 1..=400u64 {
            let mut ops = Vec::new();
            for _ in 0..1 + next(4) {
                let k = key(next(40));
                if next(3) == 0 {
                    model.remove(&k);
                    ops.push((k, None));
                } else {
                    let v = lsn.to_be_bytes().to_vec();
                    model.insert(k.clone(), v.clone());
                    ops.push((k, Some(v)));
                }
            }
            behind.put(lsn, ops).unwrap();
            if next(7) == 0 {
                behind.apply().unwrap();
            }
            for n in [0, 7, 13, 39] {
                assert_eq!(behind.get(&key(n)).unwrap(), model.get(&key(n)).cloned());
            }
            for prefix in [&b"k"[..], &[b'k', 1][..], &[b'k', 3][..]] {
                let all: Vec<(Vec<u8>, Vec<u8>)> = model
                    .range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(behind.scan_from(prefix, prefix, usize::MAX).unwrap(), all);
                let keys: Vec<Vec<u8>> = all.iter().map(|(k, _)| k.clone()).collect();
                assert_eq!(behind.scan_keys(prefix).unwrap(), keys);
                // Keys with the prefix that are ≥ `start` (which may lie before the prefix).
                let start = key(15);
                let from: Vec<_> = all
                    .iter()
                    .filter(|(k, _)| *k >= start)
                    .take(3)
                    .cloned()
                    .collect();
                assert_eq!(behind.scan_from(prefix, &start, 3).unwrap(), from);
                assert_eq!(
                    behind.last(prefix).unwrap(),
                    all.last().map(|(k, _)| k.clone())
                );
            }
        }
        behind.apply().unwrap();
        assert!(lock(&behind.overlay).ops.is_empty());
        assert_eq!(
            behind.tree.get(LSN_KEY).unwrap().unwrap().as_ref(),
            &400u64.to_be_bytes()
        );
        // A batch with nothing in it still moves sled's lsn (replay must find no gap).
        behind.put(401, Vec::new()).unwrap();
        behind.apply().unwrap();
        assert_eq!(
            behind.tree.get(LSN_KEY).unwrap().unwrap().as_ref(),
            &401u64.to_be_bytes()
        );
    }
}
