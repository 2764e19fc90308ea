//! The write-ahead log in front of sled: what makes a batch durable.
//!
//! sled's `flush` costs more than a small append and grows with what it flushes, so a
//! durable write does not wait for it. Each batch is appended to a log file of our own and
//! handed to sled's overlay (`behind.rs`: sled takes it a few milliseconds later, many batches
//! at once); making writes durable is one `write` + `fdatasync` of that file, shared by every
//! batch of a group commit. sled catches up in the background: a log file that grew past
//! [`ROTATE_BYTES`] is closed, sled takes the overlay and is flushed (and its data file
//! fdatasynced), and then the closed file is deleted. On open, the files left are replayed.
//!
//! Replay must not take sled back in time. sled recovers a prefix of the groups of batches it
//! was given (each group atomic), possibly a longer one than the log made durable; after each
//! group sled records the group's last log sequence number under [`LSN_KEY`], and replay skips
//! the records up to it. (A group whose lsn did not make it is replayed again: the same writes
//! in the same order, so nothing changes.)
//!
//! A file is extended with zeros ahead of its records, a megabyte at a time; the first
//! all-zero record header ends it.
//!
//! Record: `len u32 | crc32 u32 | lsn u64 | ops`, where `len` counts what follows the crc and
//! ops are `count u32` then per op `kind u8 (1 put, 0 remove) | klen u32 | key | [vlen u32 |
//! value]`, all little-endian. A torn record can only be the last one of the newest file
//! (a failed append poisons the log, so nothing is ever written after one); anywhere else it
//! is corruption.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::StoreError;

/// The key (in the same sled tree, atomically with each batch) holding the last applied lsn.
/// No tag byte of the store or the relay log is 0, so no scan sees it.
pub(crate) const LSN_KEY: &[u8] = b"\x00wal-lsn";

/// A log file is closed and checkpointed once it holds this much.
pub(crate) const ROTATE_BYTES: u64 = 16 << 20;

/// A log file grows by this much of zeros at a time (see `State::allocated`).
const PREALLOCATE: u64 = 1 << 20;

/// One write: a put (`Some`) or a removal (`None`).
pub(crate) type Op = (Vec<u8>, Option<Vec<u8>>);

pub(crate) struct Wal {
    dir: PathBuf,
    fsync: bool,
    state: Mutex<State>,
    /// Wakes the checkpointer (a file was closed, or the log is shutting down).
    wake: Condvar,
    /// Held across one sync's write and fdatasync.
    syncing: Mutex<()>,
}

struct State {
    file: Arc<File>,
    index: u64,
    /// Records appended but not yet written to the file.
    buf: Vec<u8>,
    /// Where the next write goes (the file's records end here).
    file_bytes: u64,
    /// The file's length: zeros past `file_bytes`, written ahead so that an fdatasync after
    /// an append need not also commit a new file size (one disk write instead of several).
    allocated: u64,
    next_lsn: u64,
    /// Closed files whose records sled has applied but maybe not flushed.
    closed: Vec<u64>,
    /// A failed write or fdatasync: the file's tail is unknown, so nothing more is accepted.
    failed: Option<String>,
    /// A checkpoint failed: no log file may be deleted by this process any more.
    checkpoint_failed: bool,
    stop: bool,
}

/// What replay found.
pub(crate) struct Replayed {
    pub(crate) wal: Wal,
    /// Batches applied to sled from the log (sled lacked them).
    pub(crate) applied: u64,
}

fn file_name(index: u64) -> String {
    format!("wal-{index:016}.log")
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wal {
    /// Replay the log files in `dir` through `apply` (records past `sled_lsn` only), then
    /// start a fresh file. `sync_sled` makes what `apply` wrote durable before the replayed
    /// files are deleted.
    pub(crate) fn open(
        dir: &Path,
        fsync: bool,
        sled_lsn: u64,
        mut apply: impl FnMut(u64, Vec<Op>) -> Result<(), StoreError>,
        sync_sled: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<Replayed, StoreError> {
        let mut indexes: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            // Only names this log writes: 16 digits exactly.
            if let Some(n) = name
                .strip_prefix("wal-")
                .and_then(|s| s.strip_suffix(".log"))
                .filter(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
            {
                indexes.push(n);
            }
        }
        indexes.sort_unstable();
        let corrupt = |index: u64, what: String| {
            StoreError::Corrupt(format!("write-ahead log {}: {what}", file_name(index)))
        };
        let mut last_lsn = sled_lsn;
        let mut applied = 0;
        for (i, &index) in indexes.iter().enumerate() {
            let bytes = std::fs::read(dir.join(file_name(index)))?;
            let newest = i + 1 == indexes.len();
            let mut at = 0;
            while at < bytes.len() {
                // Zeros past the last record were written ahead of it (no record is empty).
                // A closed file was made durable whole, so there the zeros must run to its end.
                if bytes[at..].iter().take(8).all(|b| *b == 0) {
                    if !newest && bytes[at..].iter().any(|b| *b != 0) {
                        return Err(corrupt(index, format!("records after zeros at byte {at}")));
                    }
                    break;
                }
                match decode(&bytes[at..]) {
                    Some((lsn, ops, used)) => {
                        // Records follow one another: a gap or a step back is damage, and
                        // applying past it would put an older batch over a newer one.
                        if lsn > sled_lsn {
                            if lsn != last_lsn + 1 {
                                return Err(corrupt(
                                    index,
                                    format!("record {lsn} follows {last_lsn}"),
                                ));
                            }
                            apply(lsn, ops)?;
                            applied += 1;
                            last_lsn = lsn;
                        }
                        at += used;
                    }
                    // A torn tail: the write that was under way when the process died.
                    None if newest => break,
                    None => return Err(corrupt(index, format!("damaged at byte {at}"))),
                }
            }
        }
        // Whatever sled holds of these records may not be durable in sled yet (its flushes
        // since the last checkpoint were not fdatasynced): make it so before the log goes.
        if !indexes.is_empty() {
            sync_sled()?;
        }
        for index in &indexes {
            std::fs::remove_file(dir.join(file_name(*index)))?;
        }
        let index = indexes.last().map_or(0, |i| i + 1);
        let file = create(dir, index, fsync)?;
        Ok(Replayed {
            wal: Wal {
                dir: dir.to_path_buf(),
                fsync,
                state: Mutex::new(State {
                    file: Arc::new(file),
                    index,
                    buf: Vec::new(),
                    file_bytes: 0,
                    allocated: 0,
                    next_lsn: last_lsn + 1,
                    closed: Vec::new(),
                    failed: None,
                    checkpoint_failed: false,
                    stop: false,
                }),
                wake: Condvar::new(),
                syncing: Mutex::new(()),
            },
            applied,
        })
    }

    /// Take the next lsn, let `apply` hand the batch on (to sled's overlay) with it, then
    /// append the record. One lock around both keeps the log's order the order sled sees.
    pub(crate) fn append(
        &self,
        ops: Vec<Op>,
        apply: impl FnOnce(u64, Vec<Op>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        if let Some(msg) = &st.failed {
            return Err(StoreError::Io(msg.clone()));
        }
        let lsn = st.next_lsn;
        let mut record = Vec::new();
        encode(&mut record, lsn, &ops);
        if record.len() - 8 > u32::MAX as usize {
            return Err(StoreError::Corrupt("a batch over 4 GiB".into()));
        }
        if let Err(e) = apply(lsn, ops) {
            // sled may hold part of the batch in memory now (its batches are atomic only
            // across a crash): nothing more may be acknowledged from this state.
            let msg = format!("write-ahead log: sled refused a batch ({e}); reopen the store");
            st.failed = Some(msg.clone());
            return Err(StoreError::Io(msg));
        }
        st.buf.extend_from_slice(&record);
        st.next_lsn += 1;
        Ok(())
    }

    /// Make every appended record durable: one write and one fdatasync for all of them.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        // One sync at a time: an fdatasync error is reported to one caller only, so a second
        // caller's fdatasync could succeed over records the first one lost.
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let file = {
            let mut st = lock(&self.state);
            self.write_out(&mut st)?;
            st.file.clone()
        };
        if self.fsync {
            if let Err(e) = file.sync_data() {
                return Err(self.fail(&mut lock(&self.state), e));
            }
        }
        let mut st = lock(&self.state);
        if let Some(msg) = &st.failed {
            return Err(StoreError::Io(msg.clone()));
        }
        if st.file_bytes >= ROTATE_BYTES && Arc::ptr_eq(&st.file, &file) {
            self.rotate(&mut st)?;
        }
        Ok(())
    }

    fn write_out(&self, st: &mut State) -> Result<(), StoreError> {
        if let Some(msg) = &st.failed {
            return Err(StoreError::Io(msg.clone()));
        }
        if st.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut st.buf);
        let end = st.file_bytes + buf.len() as u64;
        let mut result = Ok(());
        if end > st.allocated {
            let grow = (end - st.allocated).div_ceil(PREALLOCATE) * PREALLOCATE;
            result = st
                .file
                .write_all_at(&vec![0; grow as usize], st.allocated)
                .and_then(|()| {
                    if self.fsync {
                        st.file.sync_data()
                    } else {
                        Ok(())
                    }
                });
            if result.is_ok() {
                st.allocated += grow;
            }
        }
        match result.and_then(|()| st.file.write_all_at(&buf, st.file_bytes)) {
            Ok(()) => {
                st.file_bytes += buf.len() as u64;
                st.buf = buf;
                st.buf.clear();
                Ok(())
            }
            Err(e) => Err(self.fail(st, e)),
        }
    }

    fn fail(&self, st: &mut State, e: std::io::Error) -> StoreError {
        let msg = format!("write-ahead log: {e}; reopen the store");
        st.failed = Some(msg.clone());
        StoreError::Io(msg)
    }

    /// Close the current file (everything in it durable) and start the next one; the
    /// checkpointer deletes the closed file once sled holds its records durably.
    fn rotate(&self, st: &mut State) -> Result<(), StoreError> {
        self.write_out(st)?;
        if self.fsync {
            if let Err(e) = st.file.sync_data() {
                return Err(self.fail(st, e));
            }
        }
        let next = st.index + 1;
        let file = create(&self.dir, next, self.fsync).map_err(|e| {
            let msg = format!("write-ahead log: {e}; reopen the store");
            st.failed = Some(msg.clone());
            StoreError::Io(msg)
        })?;
        st.closed.push(st.index);
        st.index = next;
        st.file = Arc::new(file);
        st.file_bytes = 0;
        st.allocated = 0;
        self.wake.notify_all();
        Ok(())
    }

    /// The checkpointer's loop: wait for closed files, run `flush_sled` (which makes every
    /// batch sled has applied durable), delete them. Returns when [`Wal::stop`] is called.
    pub(crate) fn checkpoint_loop(&self, flush_sled: impl Fn() -> Result<(), StoreError>) {
        loop {
            let closed = {
                let mut st = lock(&self.state);
                while st.closed.is_empty() && !st.stop {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop {
                    return;
                }
                std::mem::take(&mut st.closed)
            };
            // Every record of a closed file was handed on before it was closed, and the
            // flush first makes sled take everything handed on, so it covers them all.
            match flush_sled() {
                Ok(()) => {
                    for index in closed {
                        if let Err(e) = std::fs::remove_file(self.dir.join(file_name(index))) {
                            tracing::warn!(
                                "write-ahead log: could not delete a checkpointed file: {e}"
                            );
                        }
                    }
                }
                Err(e) => {
                    // A failed fdatasync is reported once; a retry could "succeed" over pages
                    // that never reached the disk. Keep every log file (the next open replays
                    // them) and accept no more writes.
                    tracing::error!(
                        "write-ahead log: checkpoint failed, the store stops taking writes: {e}"
                    );
                    let mut st = lock(&self.state);
                    st.failed = Some(format!(
                        "write-ahead log: checkpoint failed ({e}); reopen the store"
                    ));
                    st.checkpoint_failed = true;
                    return;
                }
            }
        }
    }

    /// sled could not take what the log holds: accept nothing more and delete no log file
    /// (the next open replays them).
    pub(crate) fn poison(&self, msg: &str) {
        let mut st = lock(&self.state);
        st.failed.get_or_insert_with(|| msg.to_string());
        st.checkpoint_failed = true;
    }

    pub(crate) fn stop(&self) {
        lock(&self.state).stop = true;
        self.wake.notify_all();
    }

    /// On a clean close, once sled is flushed: nothing in the log is needed any more.
    pub(crate) fn remove_all(&self) {
        let st = lock(&self.state);
        if st.failed.is_some() || st.checkpoint_failed || !st.buf.is_empty() {
            return;
        }
        for index in st.closed.iter().chain([&st.index]) {
            let _ = std::fs::remove_file(self.dir.join(file_name(*index)));
        }
    }

    /// Records still pending a write, for the clean close.
    pub(crate) fn write_pending(&self) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        self.write_out(&mut st)
    }
}

fn create(dir: &Path, index: u64, fsync: bool) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(dir.join(file_name(index)))?;
    if fsync {
        // The new name must survive a power cut along with what is written to it.
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn encode(out: &mut Vec<u8>, lsn: u64, ops: &[Op]) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&lsn.to_le_bytes());
    put_u32(out, ops.len());
    for (k, v) in ops {
        out.push(u8::from(v.is_some()));
        put_u32(out, k.len());
        out.extend_from_slice(k);
        if let Some(v) = v {
            put_u32(out, v.len());
            out.extend_from_slice(v);
        }
    }
    let len = out.len() - start - 8;
    let crc = crc32(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One record: (lsn, ops, bytes used), or `None` when it is torn or damaged.
fn decode(bytes: &[u8]) -> Option<(u64, Vec<Op>, usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let body = bytes.get(8..8usize.checked_add(len)?)?;
    if crc32(body) != crc {
        return None;
    }
    let mut r = Reader(body);
    let lsn = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let count = r.u32()?;
    let mut ops = Vec::with_capacity(count.min(body.len()));
    for _ in 0..count {
        let put = r.take(1)?[0] == 1;
        let klen = r.u32()?;
        let key = r.take(klen)?.to_vec();
        let value = if put {
            let vlen = r.u32()?;
            Some(r.take(vlen)?.to_vec())
        } else {
            None
        };
        ops.push((key, value));
    }
    Some((lsn, ops, 8 + len))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE), to tell a torn or damaged record from a whole one.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(n: u8) -> Vec<Op> {
        vec![(vec![b'k', n], Some(vec![n; 10])), (vec![b'r', n], None)]
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_refused() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, &ops(1));
        let first = buf.len();
        encode(&mut buf, 8, &ops(2));
        let (lsn, got, used) = decode(&buf).unwrap();
        assert_eq!((lsn, got, used), (7, ops(1), first));
        let (lsn, got, _) = decode(&buf[first..]).unwrap();
        assert_eq!((lsn, got), (8, ops(2)));
        for cut in 0..buf.len() - first {
            assert!(decode(&buf[first..first + cut]).is_none(), "cut at {cut}");
        }
        let mut flipped = buf.clone();
        flipped[first + 12] ^= 1;
        assert!(decode(&flipped[first..]).is_none());
    }

    #[test]
    fn replay_skips_what_sled_holds_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for lsn in 1..=5 {
            encode(&mut bytes, lsn, &ops(lsn as u8));
        }
        bytes.extend_from_slice(&[9, 0, 0]); // torn
        std::fs::write(dir.path().join(file_name(3)), &bytes).unwrap();
        let mut seen = Vec::new();
        let mut synced = false;
        let r = Wal::open(
            dir.path(),
            false,
            2,
            |lsn, _| {
                seen.push(lsn);
                Ok(())
            },
            || {
                synced = true;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, vec![3, 4, 5]);
        assert!(synced);
        assert_eq!(r.applied, 3);
        assert_eq!(lock(&r.wal.state).next_lsn, 6);
        assert_eq!(lock(&r.wal.state).index, 4);
        assert!(!dir.path().join(file_name(3)).exists());
    }

    #[test]
    fn appends_survive_a_reopen_and_zeros_end_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let open = |want: &mut Vec<u64>| {
            Wal::open(
                dir.path(),
                true,
                0,
                |lsn, _| {
                    want.push(lsn);
                    Ok(())
                },
                || Ok(()),
            )
            .unwrap()
            .wal
        };
        let wal = open(&mut Vec::new());
        for n in 1..=3u8 {
            wal.append(ops(n), |_, _| Ok(())).unwrap();
        }
        wal.sync().unwrap();
        rotate_now(&wal);
        wal.append(ops(4), |_, _| Ok(())).unwrap();
        wal.sync().unwrap();
        let len = std::fs::metadata(dir.path().join(file_name(0)))
            .unwrap()
            .len();
        assert_eq!(len, PREALLOCATE, "written ahead, zeros after the records");
        drop(wal);
        let mut replayed = Vec::new();
        let wal = open(&mut replayed);
        assert_eq!(replayed, vec![1, 2, 3, 4]);
        assert_eq!(lock(&wal.state).next_lsn, 5);
    }

    fn rotate_now(wal: &Wal) {
        let mut st = lock(&wal.state);
        wal.rotate(&mut st).unwrap();
    }

    #[test]
    fn a_gap_or_step_back_in_the_records_is_corruption() {
        for lsns in [[1u64, 3], [2, 1]] {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = Vec::new();
            for lsn in lsns {
                encode(&mut bytes, lsn, &ops(lsn as u8));
            }
            std::fs::write(dir.path().join(file_name(0)), &bytes).unwrap();
            let r = Wal::open(dir.path(), false, 0, |_, _| Ok(()), || Ok(()));
            assert!(matches!(r, Err(StoreError::Corrupt(_))), "{lsns:?}");
            assert!(dir.path().join(file_name(0)).exists(), "kept for a look");
        }
    }

    #[test]
    fn records_after_zeros_in_a_closed_file_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode(&mut bytes, 1, &ops(1));
        bytes.extend_from_slice(&[0; 16]);
        encode(&mut bytes, 2, &ops(2));
        std::fs::write(dir.path().join(file_name(0)), &bytes).unwrap();
        std::fs::write(dir.path().join(file_name(1)), []).unwrap();
        let r = Wal::open(dir.path(), false, 0, |_, _| Ok(()), || Ok(()));
        assert!(matches!(r, Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_refused_batch_poisons_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), false, 0, |_, _| Ok(()), || Ok(()))
            .unwrap()
            .wal;
        let e = wal.append(ops(1), |_, _| Err(StoreError::Io("disk".into())));
        assert!(e.is_err());
        assert!(wal.append(ops(2), |_, _| Ok(())).is_err());
        assert!(wal.sync().is_err());
    }

    #[test]
    fn damage_before_the_newest_file_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode(&mut bytes, 1, &ops(1));
        bytes.push(1);
        std::fs::write(dir.path().join(file_name(0)), &bytes).unwrap();
        std::fs::write(dir.path().join(file_name(1)), []).unwrap();
        let r = Wal::open(dir.path(), false, 0, |_, _| Ok(()), || Ok(()));
        assert!(matches!(r, Err(StoreError::Corrupt(_))));
    }
}
