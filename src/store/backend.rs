//! The ordered key-value backends under [`super::Store`]: sled on disk, a BTreeMap in memory.
//! A backend applies a batch atomically and makes it durable on `sync`; it knows nothing of
//! documents.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::behind::Behind;
use super::wal::{Op, Wal, LSN_KEY};
use super::{StoreError, StoreOptions};

/// One atomic write.
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.ops.push((k, Some(v)));
    }
    pub fn remove(&mut self, k: Vec<u8>) {
        self.ops.push((k, None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// The writes in order, each a put (`Some`) or a removal (`None`): what a [`Backend`]
    /// written outside this module applies (the simulation's crashable disk, for one).
    pub fn into_ops(self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.ops
    }
}

/// Key-value pairs in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key-value store.
pub trait Backend: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError>;
    /// The greatest key starting with `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries whose key starts with `prefix` and is ≥ `start`, in key order.
    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError>;
    /// The keys starting with `prefix`, in order (a scan that need not copy the values).
    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.scan(prefix)?.into_iter().map(|(k, _)| k).collect())
    }
    /// Apply a batch atomically (not yet durable).
    fn write(&self, batch: Batch) -> Result<(), StoreError>;
    /// Make every applied batch durable.
    fn sync(&self) -> Result<(), StoreError>;
}

/// sled behind a write-ahead log of our own (what makes a batch durable, see `wal.rs`),
/// plus a pid file beside sled's lock so that "in use" can name the holder. Checkpoints
/// flush sled and fdatasync its data file, where sled's own flush stops short of one.
pub struct SledBackend {
    db: sled::Db,
    data_file: Arc<File>,
    wal: Arc<Wal>,
    /// What the log holds and sled does not yet (see `behind.rs`).
    behind: Arc<Behind>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    applier: Option<std::thread::JoinHandle<()>>,
    /// Declared last: leaves `OPEN_HERE` after sled's handles are dropped.
    _held: HeldFolder,
}

/// The folders a live [`SledBackend`] of this process holds (canonical paths).
static OPEN_HERE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// A folder's entry in [`OPEN_HERE`], removed on drop.
struct HeldFolder(PathBuf);

impl Drop for HeldFolder {
    fn drop(&mut self) {
        OPEN_HERE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

const PID_FILE: &str = "tandem.pid";

/// How long a reopen waits for sled's threads to release a folder this process closed.
const SELF_RELEASE_WAIT: Duration = Duration::from_secs(5);

impl SledBackend {
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<SledBackend, StoreError> {
        std::fs::create_dir_all(path)?;
        let key = path.canonicalize()?;
        if !OPEN_HERE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return Err(StoreError::InUse {
                path: path.to_path_buf(),
                pid: Some(std::process::id()),
            });
        }
        let held = HeldFolder(key);
        // sled lets go of its lock only when its last background thread does, a moment
        // after the `Db` is dropped. A folder this very process just closed is therefore
        // retried for a bounded while; one held by another process fails at once.
        let mut delay = Duration::from_millis(1);
        let deadline = Instant::now() + SELF_RELEASE_WAIT;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(opts.cache_bytes)
                // The write-ahead log makes writes durable; sled is flushed at checkpoints
                // only, so its flushes do not compete with the log's for the disk.
                .flush_every_ms(None)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    let pid: Option<u32> = std::fs::read_to_string(path.join(PID_FILE))
                        .ok()
                        .and_then(|s| s.trim().parse().ok());
                    // Not open here (`OPEN_HERE` says so), yet our pid: sled's threads linger.
                    if pid == Some(std::process::id()) && Instant::now() < deadline {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_millis(50));
                        continue;
                    }
                    return Err(StoreError::InUse {
                        path: path.to_path_buf(),
                        pid,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        };
        // We hold sled's lock now, so the pid file is ours to write.
        let mut f = File::create(path.join(PID_FILE))?;
        writeln!(f, "{}", std::process::id())?;
        let tree = db.open_tree("tandem")?;
        // Checkpoints, replay and the clean close always fdatasync sled's data file: they are
        // what lets log files go, whatever `opts.fsync` says about each commit.
        let data_file = Arc::new(File::open(data_path(path))?);
        let sled_lsn = match tree.get(LSN_KEY)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("bad write-ahead log position".into()))?,
            ),
            None => 0,
        };
        let replayed = Wal::open(
            path,
            opts.fsync,
            sled_lsn,
            |lsn, ops| apply_ops(&tree, lsn, ops),
            || flush_sled(&db, &data_file),
        )?;
        if replayed.applied > 0 {
            tracing::info!(
                "replayed {} batches from the write-ahead log",
                replayed.applied
            );
        }
        let wal = Arc::new(replayed.wal);
        let behind = Arc::new(Behind::new(tree));
        let checkpointer = {
            let (wal, db, data_file) = (wal.clone(), db.clone(), data_file.clone());
            let behind = behind.clone();
            std::thread::Builder::new()
                .name("tandem-checkpoint".into())
                .spawn(move || {
                    // sled takes what the overlay holds first: then it has every record of
                    // the closed files.
                    wal.checkpoint_loop(|| {
                        behind.apply()?;
                        flush_sled(&db, &data_file)
                    })
                })?
        };
        let applier = {
            let (behind, wal) = (behind.clone(), wal.clone());
            std::thread::Builder::new()
                .name("tandem-apply".into())
                .spawn(move || behind.run(|msg| wal.poison(msg)))
        };
        let applier = match applier {
            Ok(t) => t,
            Err(e) => {
                wal.stop();
                let _ = checkpointer.join();
                return Err(e.into());
            }
        };
        Ok(SledBackend {
            db,
            data_file,
            wal,
            behind,
            checkpointer: Some(checkpointer),
            applier: Some(applier),
            _held: held,
        })
    }

    /// Open a closed folder and close it again, so that the next open is quick. sled writes
    /// its snapshot (its page table) when it opens, and only then; every open reads the
    /// segments written since the last snapshot, so after a long run the next open reads all
    /// that the run wrote. A clean stop calls this to pay that read itself, as a database's
    /// shutdown checkpoint does: a start after a clean stop then reads the snapshot alone,
    /// while a start after a crash still replays.
    pub fn checkpoint_closed(path: &Path) -> Result<(), StoreError> {
        // Never an empty new store in place of a folder that went away meanwhile.
        if !data_path(path).exists() {
            return Err(StoreError::Io(format!("no store at {}", path.display())));
        }
        let opts = StoreOptions {
            // Nothing is read through the cache: keep what the open allocates small.
            cache_bytes: 1 << 20,
            ..StoreOptions::default()
        };
        drop(SledBackend::open(path, &opts)?);
        Ok(())
    }
}

fn data_path(path: &Path) -> PathBuf {
    path.join("db")
}

/// Apply one logged batch to sled, with its lsn, atomically.
fn apply_ops(tree: &sled::Tree, lsn: u64, ops: Vec<Op>) -> Result<(), StoreError> {
    let mut b = sled::Batch::default();
    for (k, v) in ops {
        match v {
            Some(v) => b.insert(k, v),
            None => b.remove(k),
        }
    }
    b.insert(LSN_KEY, &lsn.to_be_bytes());
    tree.apply_batch(b)?;
    Ok(())
}

/// Make everything sled has applied durable in sled itself (a checkpoint of the log).
fn flush_sled(db: &sled::Db, data_file: &File) -> Result<(), StoreError> {
    db.flush()?;
    data_file.sync_data()?;
    Ok(())
}

impl Drop for SledBackend {
    /// A clean close: sled takes in everything, and the log is no longer needed.
    fn drop(&mut self) {
        self.wal.stop();
        self.behind.stop();
        for t in [self.checkpointer.take(), self.applier.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
        if self.wal.write_pending().is_ok()
            && self
                .behind
                .apply()
                .inspect_err(|e| self.wal.poison(&e.to_string()))
                .is_ok()
            && flush_sled(&self.db, &self.data_file).is_ok()
        {
            self.wal.remove_all();
        }
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.behind.get(key)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.behind.scan_from(prefix, prefix, usize::MAX)
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.behind.last(prefix)
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.behind.scan_from(prefix, start, limit)
    }

    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.behind.scan_keys(prefix)
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.wal
            .append(batch.ops, |lsn, ops| self.behind.put(lsn, ops))?;
        if self.behind.full() {
            // sled is far behind: catch it up here rather than let the overlay grow. The
            // batch is written either way; a failure shows on the next write or sync.
            if let Err(e) = self.behind.apply() {
                tracing::error!("the store stops taking writes: {e}");
                self.wal.poison(&e.to_string());
            }
        }
        Ok(())
    }

    /// Durable once the write-ahead log is: sled catches up behind it (a group sled refuses
    /// poisons the log, so later syncs fail there).
    fn sync(&self) -> Result<(), StoreError> {
        self.wal.sync()
    }
}

/// One backend under several owners (tests and fuzzing reopen stores over the same memory).
impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(key)
    }
    fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        (**self).scan(prefix)
    }
    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).last(prefix)
    }
    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        (**self).scan_from(prefix, start, limit)
    }
    fn scan_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        (**self).scan_keys(prefix)
    }
    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        (**self).write(batch)
    }
    fn sync(&self) -> Result<(), StoreError> {
        (**self).sync()
    }
}

/// An in-memory backend: the same semantics, nothing survives the process.
#[derive(Default)]
pub struct MemoryBackend {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Backend for MemoryBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, _)| k.clone()))
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range(start.max(prefix).to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in batch.ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
