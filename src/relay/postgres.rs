//! [`PgLog`]: the relay's storage in PostgreSQL, so that several stateless relay nodes share
//! one change log and one set of feeds (docs/scaling.md). Same rules as the sled log
//! ([`RelayStore`]); what differs is how they are kept with several writers.
//!
//! - **Gap-free, causal seqs with many nodes.** A push is validated and appended inside one
//!   transaction that first locks its document's row (`SELECT ... FOR UPDATE`), and takes each
//!   namespace's feed positions from `UPDATE tandem_namespaces SET feed_seq = feed_seq + n
//!   ... RETURNING`, which locks that row. Two transactions that touch the same document (or
//!   namespace) therefore run one after the other, so commit order is seq order: a reader
//!   (READ COMMITTED) never sees seq 7 while seq 6 is still to commit, and the causal check
//!   (every dependency already in the log) is made against a log nobody else is writing.
//!   Locks are taken in one order everywhere (documents sorted, then namespaces sorted), so
//!   nodes cannot deadlock. The cost: a hot namespace's commits serialize across nodes;
//!   group commit amortizes it.
//! - **Group commit.** One committer task per node drains the pushes waiting (up to
//!   [`GROUP_MAX`]) into one transaction; each push is validated on its own (one refused push
//!   does not fail the others). A push is durable, and answered, when that transaction has
//!   committed (`synchronous_commit` on: the WAL is fsynced): [`RelayStore::durable`] has
//!   nothing left to do.
//! - **Failures.** A PostgreSQL that cannot be reached (or fails mid-transaction) makes the
//!   push fail with [`PushError::Storage`], which the session answers with the retryable
//!   `Internal` error, never an ack; the connection is made again on the next request.
//!
//! - **Hot cache.** With [`PgLog::set_cache`], the tail of busy documents' logs is kept in
//!   Redis (see `Cache`); a pull takes the head from PostgreSQL and the bytes from Redis
//!   when the tail has them.
//!
//! The calls block (the trait is synchronous, like sled): a private runtime owns the
//! connections, and a caller waits on a plain channel, so any thread may call, including
//! the simulation's and a test's.
//!
//! Schema: versioned migrations in `tandem_migrations`, applied on start under an advisory
//! lock (several nodes may start at once). Tables: `tandem_meta` (relay identity),
//! `tandem_docs` (one row per document: namespace, head, bytes, compaction point),
//! `tandem_changes` (doc, seq) -> hash, actor, actor seq, bytes (NULL once compacted; the row
//! stays for dedupe), cumulative bytes; `tandem_snapshots`; `tandem_namespaces` (feed
//! counter); `tandem_feed` (namespace, doc) -> position, seq (one entry per document, moved
//! forward on each change).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use automerge::{Automerge, Change};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use super::log::{DocRecord, LogStats, Page, PushError, Pushed};
use super::storage::RelayStore;
use crate::crdt::parse_change;
use crate::ids::DocId;
use crate::store::StoreError;
use crate::transport::FeedEntry;

/// Most pushes in one transaction.
pub const GROUP_MAX: usize = 256;
/// Pushes waiting for the committer before appends wait for room.
const QUEUE: usize = 1024;
/// Connections for reads (pulls, feeds); tokio-postgres pipelines queries on each.
const READERS: usize = 4;
/// How long a connection attempt may take before the request fails (retryable).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long any one call may wait for PostgreSQL.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The schema, one migration per version; never edit an applied one, add the next.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE tandem_meta (key text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE tandem_docs (
        doc bytea PRIMARY KEY,
        namespace text NOT NULL,
        head bigint NOT NULL DEFAULT 0,
        log_bytes bigint NOT NULL DEFAULT 0,
        compacted_upto bigint NOT NULL DEFAULT 0,
        snapshot_gen bigint NOT NULL DEFAULT 0);
     CREATE TABLE tandem_changes (
        doc bytea NOT NULL,
        seq bigint NOT NULL,
        hash bytea NOT NULL,
        actor bytea NOT NULL,
        actor_seq bigint NOT NULL,
        bytes bytea,
        cum_bytes bigint NOT NULL,
        PRIMARY KEY (doc, seq));
     CREATE UNIQUE INDEX tandem_changes_hash ON tandem_changes (doc, hash);
     CREATE UNIQUE INDEX tandem_changes_actor ON tandem_changes (doc, actor, actor_seq);
     CREATE TABLE tandem_snapshots (
        doc bytea NOT NULL,
        gen bigint NOT NULL,
        bytes bytea NOT NULL,
        PRIMARY KEY (doc, gen));
     CREATE TABLE tandem_namespaces (name text PRIMARY KEY, feed_seq bigint NOT NULL DEFAULT 0);
     CREATE TABLE tandem_feed (
        namespace text NOT NULL,
        doc bytea NOT NULL,
        pos bigint NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (namespace, doc));
     CREATE UNIQUE INDEX tandem_feed_pos ON tandem_feed (namespace, pos);",
)];

/// An arbitrary constant: the advisory lock that serializes migrations across nodes.
const MIGRATION_LOCK: i64 = 0x7461_6e64_656d;

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(format!("postgres: {e}"))
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// What the committer needs of one pushed change (parsed by the caller, off the committer).
struct Parsed {
    hash: [u8; 32],
    actor: Vec<u8>,
    seq: u64,
    deps: Vec<[u8; 32]>,
}

struct Job {
    namespace: String,
    doc: DocId,
    changes: Vec<Vec<u8>>,
    parsed: Vec<Parsed>,
    reply: oneshot::Sender<Result<Pushed, PushError>>,
}

struct Inner {
    config: tokio_postgres::Config,
    readers: Vec<tokio::sync::Mutex<Option<std::sync::Arc<Client>>>>,
    next: AtomicUsize,
    stats: LogStats,
    commits: AtomicU64,
    requests: AtomicU64,
    compact_after: AtomicU64,
    /// Documents whose logs grew past `compact_after` in a commit (cleared when asked).
    due: Mutex<HashSet<DocId>>,
    compacting: Mutex<HashSet<DocId>>,
    /// The hot tail of busy documents' logs in Redis (set with [`PgLog::set_cache`]).
    cache: std::sync::OnceLock<Cache>,
}

/// Changes kept per document in the hot cache, and the largest one kept.
const TAIL_LEN: usize = 64;
const TAIL_CHANGE_MAX: usize = 64 << 10;
/// How long an idle document's tail stays in Redis.
const TAIL_TTL_MS: u64 = 10 * 60 * 1000;

/// Appends a commit's changes to a document's cached tail, atomically. The tail is always a
/// run of consecutive seqs ending at the cached head: a commit that follows the head is
/// appended, a later one (the one between went missing) starts the run again, an older one
/// (a slower node) is dropped.
const TAIL_APPEND: &str = "
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
local first = tonumber(ARGV[1])
local new = tonumber(ARGV[2])
if new <= head then return 0 end
if first ~= head + 1 then redis.call('DEL', KEYS[1]) end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -64, -1)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1";

/// The hot cache: committed changes only, keyed by relay identity (a wiped or restored
/// database has another, so its seqs never meet the old ones' bytes). It serves bytes; the
/// head always comes from PostgreSQL, so a stale or flushed cache only means a read goes to
/// PostgreSQL.
struct Cache {
    addr: String,
    prefix: String,
    writer: tokio::sync::Mutex<Option<super::bus::Resp>>,
    reader: tokio::sync::Mutex<Option<super::bus::Resp>>,
    /// While Redis is down, skip it until then.
    down_until: Mutex<Option<std::time::Instant>>,
    hits: AtomicU64,
}

impl Cache {
    fn keys(&self, doc: &DocId) -> (String, String) {
        (
            format!("{}tail:{doc}", self.prefix),
            format!("{}head:{doc}", self.prefix),
        )
    }

    /// Run one command on `slot`'s connection (made if needed); `None` if Redis failed.
    async fn call(
        &self,
        slot: &tokio::sync::Mutex<Option<super::bus::Resp>>,
        args: &[&[u8]],
    ) -> Option<super::bus::Value> {
        if self
            .down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return None;
        }
        let mut conn = slot.lock().await;
        if conn.is_none() {
            *conn = super::bus::Resp::connect(&self.addr).await.ok();
        }
        let r = match conn.as_mut() {
            Some(c) => c.command(args).await.ok(),
            None => None,
        };
        if r.is_none() {
            *conn = None;
            *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now() + Duration::from_millis(500));
        }
        r
    }

    /// Add `changes` (seq, cumulative bytes, bytes; consecutive) to `doc`'s tail.
    async fn append(&self, doc: DocId, changes: Vec<(u64, u64, Vec<u8>)>) {
        let (Some(first), Some(last)) = (changes.first(), changes.last()) else {
            return;
        };
        let (tail, head) = self.keys(&doc);
        if changes.iter().any(|c| c.2.len() > TAIL_CHANGE_MAX) {
            self.call(&self.writer, &[b"DEL", tail.as_bytes(), head.as_bytes()])
                .await;
            return;
        }
        let (first, last) = (first.0.to_string(), last.0.to_string());
        let ttl = TAIL_TTL_MS.to_string();
        let entries: Vec<Vec<u8>> = changes
            .iter()
            .skip(changes.len().saturating_sub(TAIL_LEN))
            .map(|(seq, cum, bytes)| {
                let mut e = Vec::with_capacity(16 + bytes.len());
                e.extend_from_slice(&seq.to_be_bytes());
                e.extend_from_slice(&cum.to_be_bytes());
                e.extend_from_slice(bytes);
                e
            })
            .collect();
        // The first seq sent, once the batch is cut to the tail's length.
        let sent_first = if changes.len() > TAIL_LEN {
            changes[changes.len() - TAIL_LEN].0.to_string()
        } else {
            first
        };
        let mut args: Vec<&[u8]> = vec![
            b"EVAL",
            TAIL_APPEND.as_bytes(),
            b"2",
            tail.as_bytes(),
            head.as_bytes(),
            sent_first.as_bytes(),
            last.as_bytes(),
            ttl.as_bytes(),
        ];
        args.extend(entries.iter().map(Vec::as_slice));
        self.call(&self.writer, &args).await;
    }

    /// `doc`'s cached tail: consecutive (seq, cumulative bytes, bytes), or `None`.
    async fn tail(&self, doc: &DocId) -> Option<Vec<(u64, u64, Vec<u8>)>> {
        let (tail, _) = self.keys(doc);
        let super::bus::Value::Array(items) = self
            .call(&self.reader, &[b"LRANGE", tail.as_bytes(), b"0", b"-1"])
            .await?
        else {
            return None;
        };
        let mut out: Vec<(u64, u64, Vec<u8>)> = Vec::with_capacity(items.len());
        for item in items {
            let super::bus::Value::Bulk(b) = item else {
                return None;
            };
            let seq = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
            let cum = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
            if out.last().is_some_and(|l| l.0 + 1 != seq) {
                return None;
            }
            out.push((seq, cum, b[16..].to_vec()));
        }
        (!out.is_empty()).then_some(out)
    }
}

/// The relay's storage in PostgreSQL. See the module docs.
pub struct PgLog {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    inner: std::sync::Arc<Inner>,
    jobs: mpsc::Sender<Job>,
    relay_id: [u8; 16],
    /// Compact a document's log once this many changes sit after its snapshot.
    pub compact_after: u64,
}

impl Drop for PgLog {
    fn drop(&mut self) {
        // Dropping a runtime blocks; this may run inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, conn) = config.connect(NoTls).await.map_err(pg)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

impl PgLog {
    /// Connect to `url` (`postgres://user@host:port/db` or `host=... dbname=...`), apply the
    /// migrations this version has that the database lacks, and read (or make) the relay's
    /// identity. Blocks.
    pub fn connect(url: &str) -> Result<PgLog, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Io(format!("postgres URL: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("tandem-relay");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tandem-pg")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let inner = std::sync::Arc::new(Inner {
            config,
            readers: (0..READERS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            stats: LogStats::default(),
            commits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            compact_after: AtomicU64::new(10_000),
            due: Mutex::new(HashSet::new()),
            compacting: Mutex::new(HashSet::new()),
            cache: std::sync::OnceLock::new(),
        });
        let (jobs, rx) = mpsc::channel(QUEUE);
        let mut log = PgLog {
            rt: Some(rt),
            handle,
            inner: inner.clone(),
            jobs,
            relay_id: [0; 16],
            compact_after: 10_000,
        };
        log.relay_id = log.run(async move {
            let mut client = connect(&inner.config).await?;
            migrate(&mut client).await?;
            let fresh: [u8; 16] = rand::random();
            client
                .execute(
                    "INSERT INTO tandem_meta (key, value) VALUES ('relay_id', $1)
                     ON CONFLICT (key) DO NOTHING",
                    &[&fresh.as_slice()],
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_one("SELECT value FROM tandem_meta WHERE key = 'relay_id'", &[])
                .await
                .map_err(pg)?;
            let v: Vec<u8> = row.get(0);
            let id: [u8; 16] = v
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("relay id".into()))?;
            tokio::spawn(committer(inner, rx, Some(client)));
            Ok::<_, StoreError>(id)
        })??;
        Ok(log)
    }

    /// Run `fut` on the private runtime and wait for it here, whatever thread this is.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, fut).await);
        });
        match rx.recv() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(StoreError::Io("postgres: timed out".into())),
            Err(_) => Err(StoreError::Io(
                "postgres: the relay is shutting down".into(),
            )),
        }
    }

    /// Keep the hot tail of busy documents' logs in the Redis at `url`, so that catch-up
    /// pulls read their bytes there; the heads still come from PostgreSQL.
    pub fn set_cache(&self, url: &str) {
        let _ = self.inner.cache.set(Cache {
            addr: super::bus::redis_addr(url),
            prefix: format!("tandem:{}:", hex::encode(self.relay_id)),
            writer: tokio::sync::Mutex::new(None),
            reader: tokio::sync::Mutex::new(None),
            down_until: Mutex::new(None),
            hits: AtomicU64::new(0),
        });
    }

    /// Pulls served from the hot cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.inner
            .cache
            .get()
            .map_or(0, |c| c.hits.load(Ordering::Relaxed))
    }

    /// Give the relay a new identity (after restoring an older backup).
    pub fn new_identity(&mut self) -> Result<[u8; 16], StoreError> {
        let id: [u8; 16] = rand::random();
        let inner = self.inner.clone();
        self.run(async move {
            let c = inner.reader().await?;
            c.execute(
                "UPDATE tandem_meta SET value = $1 WHERE key = 'relay_id'",
                &[&id.as_slice()],
            )
            .await
            .map_err(pg)
        })??;
        self.relay_id = id;
        Ok(id)
    }

    /// Every namespace's feed head: (namespace, last position). For the cross-node poller.
    pub fn feed_heads(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let c = inner.reader().await?;
            let rows = c
                .query(
                    "SELECT name, feed_seq FROM tandem_namespaces ORDER BY name",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), u(r.get(1))))
                .collect())
        })?
    }

    /// The hashes of `doc`'s changes in seq order (compacted ones included): what
    /// `tandem migrate-relay` compares between the sled folder and the database.
    pub fn change_hashes(&self, doc: &DocId) -> Result<Vec<[u8; 32]>, StoreError> {
        let inner = self.inner.clone();
        let doc = *doc;
        self.run(async move {
            let c = inner.reader().await?;
            let rows = c
                .query(
                    "SELECT hash FROM tandem_changes WHERE doc = $1 ORDER BY seq",
                    &[&doc.as_bytes().as_slice()],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    r.get::<_, Vec<u8>>(0)
                        .as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("change hash".into()))
                })
                .collect()
        })?
    }
}

impl Inner {
    /// A reader connection, made again if it broke.
    async fn reader(&self) -> Result<std::sync::Arc<Client>, StoreError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let mut slot = self.readers[n].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = std::sync::Arc::new(connect(&self.config).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn record(&self, c: &Client, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        let row = c
            .query_opt(
                "SELECT namespace, head, log_bytes, compacted_upto, snapshot_gen
                 FROM tandem_docs WHERE doc = $1 AND head > 0",
                &[&doc.as_bytes().as_slice()],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| record_of(&r, 0)))
    }
}

fn record_of(r: &tokio_postgres::Row, at: usize) -> DocRecord {
    let gen = u(r.get(at + 4));
    DocRecord {
        namespace: r.get(at),
        head: u(r.get(at + 1)),
        log_bytes: u(r.get(at + 2)),
        compacted_upto: u(r.get(at + 3)),
        snapshot_gen: gen,
        snapshot_chunks: u32::from(gen > 0),
    }
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tandem_migrations (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg)?;
    let applied: HashSet<i32> = tx
        .query("SELECT version FROM tandem_migrations", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(v) = applied.iter().find(|v| **v > newest) {
        return Err(StoreError::NewerFormat {
            found: u32::try_from(*v).unwrap_or(0),
        });
    }
    for (version, sql) in MIGRATIONS {
        if !applied.contains(version) {
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO tandem_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(pg)?;
            tracing::info!(version, "applied a schema migration");
        }
    }
    tx.commit().await.map_err(pg)
}

/// The node's one writer: takes the pushes waiting, commits them in one transaction, answers.
async fn committer(
    inner: std::sync::Arc<Inner>,
    mut rx: mpsc::Receiver<Job>,
    mut client: Option<Client>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect(&inner.config).await.ok();
        }
        let outcome = match client.as_mut() {
            Some(c) => commit_group(&inner, c, &jobs).await,
            None => Err(StoreError::Io(
                "postgres is unreachable; nothing was stored, retry".into(),
            )),
        };
        match outcome {
            Ok((results, tails)) => {
                inner.commits.fetch_add(1, Ordering::Relaxed);
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
                // After the acks: the cache is for reads, it must not slow the writers.
                if inner.cache.get().is_some() {
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        if let Some(cache) = inner.cache.get() {
                            for (doc, changes) in tails {
                                cache.append(doc, changes).await;
                            }
                        }
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, pushes = jobs.len(), "a group commit failed");
                if client.as_ref().is_some_and(|c| c.is_closed()) {
                    client = None;
                }
                for job in jobs {
                    let _ = job.reply.send(Err(PushError::Storage(e.to_string())));
                }
            }
        }
    }
}

/// A group's outcome: each job's result, and per document the changes it committed (seq,
/// cumulative bytes, bytes) for the hot cache.
type GroupOutcome = (
    Vec<Result<Pushed, PushError>>,
    Vec<(DocId, Vec<(u64, u64, Vec<u8>)>)>,
);

/// Validate and append every job in one transaction. `Err` only when the transaction failed
/// (then nothing of any job was stored); a job refused by validation is its own `Err`.
async fn commit_group(
    inner: &Inner,
    client: &mut Client,
    jobs: &[Job],
) -> Result<GroupOutcome, StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    // Lock every document of the group, in one order on every node.
    let mut docs: Vec<Vec<u8>> = jobs.iter().map(|j| j.doc.as_bytes().to_vec()).collect();
    docs.sort();
    docs.dedup();
    tx.execute(
        "INSERT INTO tandem_docs (doc, namespace) SELECT d, '' FROM unnest($1::bytea[]) AS d
         ORDER BY d ON CONFLICT (doc) DO NOTHING",
        &[&docs],
    )
    .await
    .map_err(pg)?;
    let rows = tx
        .query(
            "SELECT doc, namespace, head, log_bytes, compacted_upto, snapshot_gen
             FROM tandem_docs WHERE doc = ANY($1) ORDER BY doc FOR UPDATE",
            &[&docs],
        )
        .await
        .map_err(pg)?;
    let mut recs: HashMap<Vec<u8>, DocRecord> = rows
        .iter()
        .map(|r| (r.get::<_, Vec<u8>>(0), record_of(r, 1)))
        .collect();
    let mut results = Vec::with_capacity(jobs.len());
    // namespace -> doc -> newest head, for the feed.
    let mut touched: BTreeMap<String, BTreeMap<Vec<u8>, u64>> = BTreeMap::new();
    let mut dirty: HashSet<Vec<u8>> = HashSet::new();
    for job in jobs {
        let key = job.doc.as_bytes().to_vec();
        let Some(rec) = recs.get_mut(&key) else {
            return Err(StoreError::Corrupt("a locked document row vanished".into()));
        };
        let r = append_one(inner, &tx, job, rec).await?;
        if let Ok(p) = &r {
            if !p.new_changes.is_empty() {
                touched
                    .entry(job.namespace.clone())
                    .or_default()
                    .insert(key.clone(), rec.head);
                dirty.insert(key);
            }
        }
        results.push(r);
    }
    for key in &dirty {
        let rec = &recs[key];
        tx.execute(
            "UPDATE tandem_docs SET namespace = $2, head = $3, log_bytes = $4 WHERE doc = $1",
            &[key, &rec.namespace, &i(rec.head), &i(rec.log_bytes)],
        )
        .await
        .map_err(pg)?;
    }
    // Feed positions: the namespace row lock orders commits, so positions commit in order.
    for (ns, entries) in &touched {
        tx.execute(
            "INSERT INTO tandem_namespaces (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            &[ns],
        )
        .await
        .map_err(pg)?;
        let end: i64 = tx
            .query_one(
                "UPDATE tandem_namespaces SET feed_seq = feed_seq + $2 WHERE name = $1
                 RETURNING feed_seq",
                &[ns, &i(entries.len() as u64)],
            )
            .await
            .map_err(pg)?
            .get(0);
        let first = end - entries.len() as i64 + 1;
        let docs: Vec<&Vec<u8>> = entries.keys().collect();
        let pos: Vec<i64> = (first..=end).collect();
        let seqs: Vec<i64> = entries.values().map(|s| i(*s)).collect();
        tx.execute(
            "INSERT INTO tandem_feed (namespace, doc, pos, seq)
             SELECT $1, d, p, s FROM unnest($2::bytea[], $3::int8[], $4::int8[]) AS t(d, p, s)
             ON CONFLICT (namespace, doc) DO UPDATE SET pos = excluded.pos, seq = excluded.seq",
            &[ns, &docs, &pos, &seqs],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    // What each document gained, in seq order, with cumulative bytes counted back from its
    // final total.
    let mut gained: BTreeMap<Vec<u8>, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    for (job, r) in jobs.iter().zip(&results) {
        if let Ok(p) = r {
            let g = gained.entry(job.doc.as_bytes().to_vec()).or_default();
            for (n, c) in p.new_changes.iter().enumerate() {
                g.push((p.new_from + n as u64, c.clone()));
            }
        }
    }
    let mut tails = Vec::new();
    if inner.cache.get().is_some() {
        for (key, changes) in gained {
            let Ok(id) = <[u8; 16]>::try_from(key.as_slice()) else {
                continue;
            };
            let mut cum = recs[&key].log_bytes;
            let mut out: Vec<(u64, u64, Vec<u8>)> = Vec::with_capacity(changes.len());
            for (seq, bytes) in changes.into_iter().rev() {
                let len = bytes.len() as u64;
                out.push((seq, cum, bytes));
                cum = cum.saturating_sub(len);
            }
            out.reverse();
            tails.push((DocId(id), out));
        }
    }
    let after = inner.compact_after.load(Ordering::Relaxed);
    let mut due = inner.due.lock().unwrap_or_else(|p| p.into_inner());
    for key in dirty {
        let rec = &recs[&key];
        if rec.head - rec.compacted_upto >= after {
            if let Ok(id) = <[u8; 16]>::try_from(key.as_slice()) {
                due.insert(DocId(id));
            }
        }
    }
    Ok((results, tails))
}

/// Validate one push against the (locked) document and insert its new changes.
async fn append_one(
    inner: &Inner,
    tx: &tokio_postgres::Transaction<'_>,
    job: &Job,
    rec: &mut DocRecord,
) -> Result<Result<Pushed, PushError>, StoreError> {
    if rec.head > 0 && rec.namespace != job.namespace {
        return Ok(Err(PushError::WrongNamespace(rec.namespace.clone())));
    }
    let doc = job.doc.as_bytes().as_slice();
    let mut ask: Vec<&[u8]> = Vec::new();
    for p in &job.parsed {
        ask.push(&p.hash);
        ask.extend(p.deps.iter().map(|d| d.as_slice()));
    }
    let known: HashMap<Vec<u8>, u64> = tx
        .query(
            "SELECT hash, seq FROM tandem_changes WHERE doc = $1 AND hash = ANY($2)",
            &[&doc, &ask],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), u(r.get(1))))
        .collect();
    let actors: Vec<&[u8]> = job.parsed.iter().map(|p| p.actor.as_slice()).collect();
    // An actor's seqs in a log are 1..=max with no gap (a gap is never let in), so the
    // highest one says which (actor, seq) pairs the log holds.
    let mut actor_max: HashMap<Vec<u8>, u64> = tx
        .query(
            "SELECT actor, max(actor_seq) FROM tandem_changes
             WHERE doc = $1 AND actor = ANY($2) GROUP BY actor",
            &[&doc, &actors],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), u(r.get(1))))
        .collect();
    let mut in_batch: HashMap<[u8; 32], u64> = HashMap::new();
    let mut seqs = Vec::with_capacity(job.parsed.len());
    let mut head = rec.head;
    let mut log_bytes = rec.log_bytes;
    let new_from = rec.head + 1;
    let mut new_changes = Vec::new();
    let (mut c_seq, mut c_hash, mut c_actor, mut c_aseq, mut c_bytes, mut c_cum) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut duplicates = 0u64;
    for (index, p) in job.parsed.iter().enumerate() {
        if let Some(seq) = in_batch.get(&p.hash) {
            seqs.push(*seq);
            continue;
        }
        if let Some(seq) = known.get(p.hash.as_slice()) {
            seqs.push(*seq);
            duplicates += 1;
            continue;
        }
        let max = actor_max.get(&p.actor).copied().unwrap_or(0);
        if p.seq <= max {
            return Ok(Err(PushError::HashMismatch {
                index,
                actor: hex::encode(&p.actor),
                seq: p.seq,
            }));
        }
        if p.seq > max + 1 {
            return Ok(Err(PushError::NeedHistory { index }));
        }
        if p.deps
            .iter()
            .any(|d| !in_batch.contains_key(d) && !known.contains_key(d.as_slice()))
        {
            return Ok(Err(PushError::NeedHistory { index }));
        }
        head += 1;
        let bytes = &job.changes[index];
        log_bytes += bytes.len() as u64;
        actor_max.insert(p.actor.clone(), p.seq);
        in_batch.insert(p.hash, head);
        seqs.push(head);
        new_changes.push(bytes.clone());
        c_seq.push(i(head));
        c_hash.push(p.hash.as_slice());
        c_actor.push(p.actor.as_slice());
        c_aseq.push(i(p.seq));
        c_bytes.push(bytes.as_slice());
        c_cum.push(i(log_bytes));
    }
    if !new_changes.is_empty() {
        tx.execute(
            "INSERT INTO tandem_changes (doc, seq, hash, actor, actor_seq, bytes, cum_bytes)
             SELECT $1, * FROM unnest($2::int8[], $3::bytea[], $4::bytea[], $5::int8[],
                                      $6::bytea[], $7::int8[])",
            &[&doc, &c_seq, &c_hash, &c_actor, &c_aseq, &c_bytes, &c_cum],
        )
        .await
        .map_err(pg)?;
        rec.namespace = job.namespace.clone();
        rec.head = head;
        rec.log_bytes = log_bytes;
        inner
            .stats
            .changes_accepted
            .fetch_add(new_changes.len() as u64, Ordering::Relaxed);
    }
    inner
        .stats
        .changes_duplicate
        .fetch_add(duplicates, Ordering::Relaxed);
    Ok(Ok(Pushed {
        seqs,
        new_from,
        new_changes,
    }))
}

impl RelayStore for PgLog {
    fn relay_id(&self) -> [u8; 16] {
        self.relay_id
    }

    fn append(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError> {
        let stats = &self.inner.stats;
        stats.pushes.fetch_add(1, Ordering::Relaxed);
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        self.inner
            .compact_after
            .store(self.compact_after, Ordering::Relaxed);
        let r = self.append_inner(namespace, doc, changes);
        if r.is_err() {
            stats.pushes_refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn durable(&self) -> Result<(), StoreError> {
        // Every append returned after its transaction committed.
        Ok(())
    }

    fn pull(&self, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError> {
        self.inner.stats.pulls.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let doc = *doc;
        let page = self.run(async move {
            match pull(&inner, &doc, after, max_bytes).await {
                // A compaction dropped bytes this pull's record pointed at: read again.
                Err(StoreError::Corrupt(_)) => pull(&inner, &doc, after, max_bytes).await,
                r => r,
            }
        })??;
        let stats = &self.inner.stats;
        stats
            .pulled_changes
            .fetch_add(page.changes.len() as u64, Ordering::Relaxed);
        stats.pulled_bytes.fetch_add(
            page.changes.iter().map(|c| c.len() as u64).sum(),
            Ordering::Relaxed,
        );
        Ok(page)
    }

    fn feed(
        &self,
        namespace: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<FeedEntry>, u64, bool), StoreError> {
        self.inner.stats.feed_pages.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let ns = namespace.to_string();
        self.run(async move {
            let c = inner.reader().await?;
            let rows = c
                .query(
                    "SELECT pos, doc, seq FROM tandem_feed WHERE namespace = $1 AND pos > $2
                     ORDER BY pos LIMIT $3",
                    &[&ns, &i(after), &i(limit as u64 + 1)],
                )
                .await
                .map_err(pg)?;
            let more = rows.len() > limit;
            let mut next = after;
            let mut entries = Vec::new();
            for r in rows.iter().take(limit) {
                let d: Vec<u8> = r.get(1);
                let d: [u8; 16] = d
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("feed entry".into()))?;
                entries.push(FeedEntry {
                    doc: DocId(d),
                    seq: u(r.get(2)),
                });
                next = u(r.get(0));
            }
            Ok((entries, next, more))
        })?
    }

    fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.feed_heads()?.into_iter().map(|(n, _)| n).collect())
    }

    fn record(&self, doc: &DocId) -> Result<Option<DocRecord>, StoreError> {
        let inner = self.inner.clone();
        let doc = *doc;
        self.run(async move {
            let c = inner.reader().await?;
            inner.record(&c, &doc).await
        })?
    }

    fn documents(&self) -> Result<Vec<(DocId, DocRecord)>, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let c = inner.reader().await?;
            let rows = c
                .query(
                    "SELECT doc, namespace, head, log_bytes, compacted_upto, snapshot_gen
                     FROM tandem_docs WHERE head > 0 ORDER BY doc",
                    &[],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    let d: Vec<u8> = r.get(0);
                    let d: [u8; 16] = d
                        .as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("document id".into()))?;
                    Ok((DocId(d), record_of(r, 1)))
                })
                .collect()
        })?
    }

    fn wants_compaction(&self, doc: &DocId) -> bool {
        self.inner
            .due
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(doc)
    }

    fn compact(&self, doc: &DocId) -> Result<(), StoreError> {
        if !self
            .inner
            .compacting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*doc)
        {
            return Ok(());
        }
        let r = self.compact_inner(doc);
        self.inner
            .compacting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(doc);
        if r.is_ok() {
            self.inner.stats.compactions.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn stats(&self) -> &LogStats {
        &self.inner.stats
    }

    fn flush_counts(&self) -> (u64, u64) {
        (
            self.inner.requests.load(Ordering::Relaxed),
            self.inner.commits.load(Ordering::Relaxed),
        )
    }
}

impl PgLog {
    fn append_inner(
        &self,
        namespace: &str,
        doc: &DocId,
        changes: &[Vec<u8>],
    ) -> Result<Pushed, PushError> {
        // Parse (and hash) here, on the caller's thread: it is the expensive part.
        let parsed: Vec<Parsed> = super::storage::parse_push(changes)?
            .into_iter()
            .map(|c| Parsed {
                hash: c.hash().0,
                actor: c.actor_id().to_bytes().to_vec(),
                seq: c.seq(),
                deps: c.deps().iter().map(|d| d.0).collect(),
            })
            .collect();
        if parsed.is_empty() {
            return Ok(Pushed {
                seqs: Vec::new(),
                new_from: 0,
                new_changes: Vec::new(),
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            namespace: namespace.to_string(),
            doc: *doc,
            changes: changes.to_vec(),
            parsed,
            reply,
        };
        let jobs = self.jobs.clone();
        self.run(async move {
            if jobs.send(job).await.is_err() {
                return Err(PushError::Storage("the committer stopped".into()));
            }
            answer
                .await
                .unwrap_or_else(|_| Err(PushError::Storage("the committer stopped".into())))
        })?
    }

    fn compact_inner(&self, doc: &DocId) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let doc = *doc;
        self.run(async move {
            let c = inner.reader().await?;
            let Some(rec) = inner.record(&c, &doc).await? else {
                return Ok(());
            };
            let upto = rec.head;
            if upto <= rec.compacted_upto {
                return Ok(());
            }
            let d = doc.as_bytes().as_slice();
            let snapshot = if rec.compacted_upto > 0 {
                let row = c
                    .query_one(
                        "SELECT bytes FROM tandem_snapshots WHERE doc = $1 AND gen = $2",
                        &[&d, &i(rec.snapshot_gen)],
                    )
                    .await
                    .map_err(pg)?;
                Some(row.get::<_, Vec<u8>>(0))
            } else {
                None
            };
            let rows = c
                .query(
                    "SELECT bytes FROM tandem_changes WHERE doc = $1 AND seq > $2 AND seq <= $3
                     ORDER BY seq",
                    &[&d, &i(rec.compacted_upto), &i(upto)],
                )
                .await
                .map_err(pg)?;
            let mut changes = Vec::with_capacity(rows.len());
            for r in &rows {
                let b: Option<Vec<u8>> = r.get(0);
                let b = b.ok_or_else(|| StoreError::Corrupt("compacted meanwhile".into()))?;
                changes
                    .push(Change::from_bytes(b).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            }
            // Automerge's work happens off the runtime's threads and must not take it down.
            let saved = tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut am = match snapshot {
                        Some(b) => Automerge::load(&b).map_err(|e| e.to_string())?,
                        None => Automerge::new(),
                    };
                    am.apply_changes(changes).map_err(|e| e.to_string())?;
                    // Uncompressed: a device loads this without a bound on inflation otherwise.
                    Ok::<_, String>(am.save_nocompress())
                }))
                .unwrap_or_else(|_| Err("automerge panicked".into()))
            })
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .map_err(|e| StoreError::Corrupt(format!("compacting {doc}: {e}")))?;
            // One transaction: the snapshot is durable exactly when the prefix is dropped.
            let mut w = connect(&inner.config).await?;
            let tx = w.transaction().await.map_err(pg)?;
            let gen: i64 = tx
                .query_one(
                    "SELECT snapshot_gen FROM tandem_docs WHERE doc = $1 FOR UPDATE",
                    &[&d],
                )
                .await
                .map_err(pg)?
                .get(0);
            let gen = gen + 1;
            tx.execute(
                "INSERT INTO tandem_snapshots (doc, gen, bytes) VALUES ($1, $2, $3)",
                &[&d, &gen, &saved],
            )
            .await
            .map_err(pg)?;
            tx.execute(
                "UPDATE tandem_docs SET compacted_upto = $2, snapshot_gen = $3 WHERE doc = $1",
                &[&d, &i(upto), &gen],
            )
            .await
            .map_err(pg)?;
            tx.execute(
                "UPDATE tandem_changes SET bytes = NULL WHERE doc = $1 AND seq <= $2
                 AND bytes IS NOT NULL",
                &[&d, &i(upto)],
            )
            .await
            .map_err(pg)?;
            tx.execute(
                "DELETE FROM tandem_snapshots WHERE doc = $1 AND gen < $2",
                &[&d, &gen],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })?
    }
}

async fn pull(inner: &Inner, doc: &DocId, after: u64, max_bytes: u64) -> Result<Page, StoreError> {
    let c = inner.reader().await?;
    let Some(rec) = inner.record(&c, doc).await? else {
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
    let d = doc.as_bytes().as_slice();
    let mut snapshot = None;
    let mut after = after.min(rec.head);
    if after < rec.compacted_upto {
        let row = c
            .query_opt(
                "SELECT bytes FROM tandem_snapshots WHERE doc = $1 AND gen = $2",
                &[&d, &i(rec.snapshot_gen)],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| StoreError::Corrupt(format!("snapshot of {doc} is missing")))?;
        snapshot = Some((rec.compacted_upto, row.get::<_, Vec<u8>>(0)));
        after = rec.compacted_upto;
    }
    let from = after.saturating_add(1);
    if let Some(page) = pull_cached(inner, doc, &rec, from, max_bytes, snapshot.clone()).await {
        return Ok(page);
    }
    let mut changes: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0u64;
    let mut cum_to = rec.log_bytes;
    let mut next = from;
    'pages: while next <= rec.head {
        // Bounded reads: at most this many rows per query, however big the page.
        let rows = c
            .query(
                "SELECT seq, bytes, cum_bytes FROM tandem_changes
                 WHERE doc = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT 256",
                &[&d, &i(next), &i(rec.head)],
            )
            .await
            .map_err(pg)?;
        if rows.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "log of {doc} lacks seq {next}"
            )));
        }
        for r in &rows {
            let seq = u(r.get(0));
            if seq != next {
                return Err(StoreError::Corrupt(format!(
                    "log of {doc} lacks seq {next}"
                )));
            }
            let b: Option<Vec<u8>> = r.get(1);
            let b = b.ok_or_else(|| StoreError::Corrupt("compacted meanwhile".into()))?;
            if !changes.is_empty() && bytes + b.len() as u64 > max_bytes {
                break 'pages;
            }
            bytes += b.len() as u64;
            cum_to = u(r.get(2));
            changes.push(b);
            next += 1;
        }
    }
    let to = from + changes.len() as u64 - 1;
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

/// One document as `tandem migrate-relay` moves it: its whole log, seqs 1..=n.
pub struct ImportDoc {
    pub doc: DocId,
    pub namespace: String,
    pub changes: Vec<Vec<u8>>,
}

impl PgLog {
    /// Whether the database holds no document yet (a migration's target must be empty).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let c = inner.reader().await?;
            let row = c
                .query_one("SELECT count(*) FROM tandem_docs WHERE head > 0", &[])
                .await
                .map_err(pg)?;
            Ok(row.get::<_, i64>(0) == 0)
        })?
    }

    /// Write one document's whole log with the seqs it had (one transaction). Feed entries
    /// and the identity come with [`import_finish`](Self::import_finish).
    pub fn import_doc(&self, d: ImportDoc) -> Result<(), StoreError> {
        let mut rows = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut cum = 0u64;
        for (n, bytes) in d.changes.iter().enumerate() {
            let c = parse_change(bytes)
                .map_err(|e| StoreError::Corrupt(format!("{} change {}: {e}", d.doc, n + 1)))?;
            cum += bytes.len() as u64;
            rows.0.push(n as i64 + 1);
            rows.1.push(c.hash().0.to_vec());
            rows.2.push(c.actor_id().to_bytes().to_vec());
            rows.3.push(i(c.seq()));
            rows.4.push(bytes.clone());
            rows.5.push(i(cum));
        }
        let inner = self.inner.clone();
        self.run(async move {
            let mut c = connect(&inner.config).await?;
            let tx = c.transaction().await.map_err(pg)?;
            let doc = d.doc.as_bytes().as_slice();
            tx.execute(
                "INSERT INTO tandem_docs (doc, namespace, head, log_bytes) VALUES ($1, $2, $3, $4)",
                &[&doc, &d.namespace, &i(d.changes.len() as u64), &i(cum)],
            )
            .await
            .map_err(pg)?;
            tx.execute(
                "INSERT INTO tandem_changes (doc, seq, hash, actor, actor_seq, bytes, cum_bytes)
                 SELECT $1, * FROM unnest($2::int8[], $3::bytea[], $4::bytea[], $5::int8[],
                                          $6::bytea[], $7::int8[])",
                &[&doc, &rows.0, &rows.1, &rows.2, &rows.3, &rows.4, &rows.5],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)
        })?
    }

    /// Finish a migration: the feed entries at their positions, every namespace's counter at
    /// `feed_pos` (so devices' feed cursors stay valid), and the old relay's identity (so
    /// devices keep their cursors rather than re-pushing everything).
    pub fn import_finish(
        &mut self,
        relay_id: [u8; 16],
        feed: Vec<(String, u64, DocId, u64)>,
        feed_pos: u64,
    ) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let mut c = connect(&inner.config).await?;
            let tx = c.transaction().await.map_err(pg)?;
            tx.execute(
                "UPDATE tandem_meta SET value = $1 WHERE key = 'relay_id'",
                &[&relay_id.as_slice()],
            )
            .await
            .map_err(pg)?;
            let mut names: Vec<&String> = feed.iter().map(|f| &f.0).collect();
            names.sort();
            names.dedup();
            for ns in names {
                tx.execute(
                    "INSERT INTO tandem_namespaces (name, feed_seq) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET feed_seq = excluded.feed_seq",
                    &[ns, &i(feed_pos)],
                )
                .await
                .map_err(pg)?;
            }
            for (ns, pos, doc, seq) in &feed {
                tx.execute(
                    "INSERT INTO tandem_feed (namespace, doc, pos, seq) VALUES ($1, $2, $3, $4)",
                    &[ns, &doc.as_bytes().as_slice(), &i(*pos), &i(*seq)],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })??;
        self.relay_id = relay_id;
        Ok(())
    }
}

/// A page served from the hot cache: the head is `rec`'s (read from PostgreSQL just now); the
/// bytes come from Redis when its tail holds seq `from` onward.
async fn pull_cached(
    inner: &Inner,
    doc: &DocId,
    rec: &DocRecord,
    from: u64,
    max_bytes: u64,
    snapshot: Option<(u64, Vec<u8>)>,
) -> Option<Page> {
    let cache = inner.cache.get()?;
    if from > rec.head {
        return None;
    }
    let tail = cache.tail(doc).await?;
    let start = tail.iter().position(|(seq, _, _)| *seq == from)?;
    let mut changes = Vec::new();
    let mut bytes = 0u64;
    let mut cum_to = 0;
    let mut full = false;
    for (seq, cum, b) in &tail[start..] {
        if *seq > rec.head {
            break;
        }
        if !changes.is_empty() && bytes + b.len() as u64 > max_bytes {
            full = true;
            break;
        }
        bytes += b.len() as u64;
        cum_to = *cum;
        changes.push(b.clone());
    }
    let to = from + changes.len() as u64 - 1;
    // The tail is written after the commit: one that lags the head would end the page early,
    // so such a page comes from PostgreSQL (the same page either way).
    if to < rec.head && !full {
        return None;
    }
    cache.hits.fetch_add(1, Ordering::Relaxed);
    Some(Page {
        namespace: rec.namespace.clone(),
        from,
        to,
        more: to < rec.head,
        remaining_bytes: rec.log_bytes.saturating_sub(cum_to),
        changes,
        snapshot,
    })
}
