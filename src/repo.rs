//! [`Repo`]: the embedding API. It owns the store and the documents loaded in memory, runs
//! every local write as "commit the Automerge transaction, persist the change, meta and outbox
//! entry in one batch, flush, then announce", and applies remote changes the same way.
//!
//! Local operations are plain synchronous calls: they are fast, and an editor calls them from
//! its UI thread. Events arrive on a bounded broadcast channel ([`Repo::subscribe`]) that the
//! app can poll (`try_recv`), block on (`blocking_recv`) or await (`recv`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ChangeHash, PatchLog, ReadDoc, ROOT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::crdt::editing::{self, MarkSpan, Patch, Style, TextCursor};
use crate::crdt::history::{self, ChangeInfo, FieldDiff, FindChange};
use crate::crdt::schema::Schema;
use crate::crdt::{self, migrate, EntityError, FieldConflict, View, Writer};
use crate::error::Error;
use crate::ids::{DeviceId, DocId};
use crate::store::{DocMeta, Store, StoreError, StoreOptions};
use crate::transport::Presence;

/// The namespace of documents created without one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The largest Automerge file `import` accepts (Automerge inflates compressed data without a
/// bound of its own, so the input is bounded before it parses anything).
pub const MAX_IMPORT_BYTES: usize = 256 << 20;

/// How a [`Repo`] is opened.
#[derive(Clone, Debug)]
pub struct RepoOptions {
    /// The name recorded as the author of this device's changes.
    pub author: String,
    /// The schema; `None` reads and writes documents as they are (no lenses, no checks).
    pub schema: Option<Schema>,
    pub store: StoreOptions,
    /// Compact a document's journal into a snapshot after this many changes...
    pub compact_after_changes: u64,
    /// ...or this many bytes.
    pub compact_after_bytes: u64,
    /// How many documents stay loaded in memory when not in use (the least recently used
    /// leave first).
    pub cache_docs: usize,
    /// Where new document ids and change times come from.
    pub entropy: Entropy,
}

impl RepoOptions {
    pub fn new(author: impl Into<String>) -> Self {
        RepoOptions {
            author: author.into(),
            schema: None,
            store: StoreOptions::default(),
            compact_after_changes: 1000,
            compact_after_bytes: 8 << 20,
            cache_docs: 256,
            entropy: Entropy::system(),
        }
    }

    pub fn schema(mut self, schema: Schema) -> Self {
        self.schema = Some(schema);
        self
    }
}

/// Where a repo gets the two inputs it does not compute from its store: new document ids and
/// change times (wall-clock seconds, for display only, but part of a change's bytes and so of
/// its hash). [`Entropy::system`], the default, asks the operating system; [`Entropy::seeded`]
/// derives ids from a seed and stops the clock, so that a seeded simulation replays exactly
/// (design invariant 6).
#[derive(Clone, Default)]
pub struct Entropy {
    seeded: Option<Arc<Mutex<(StdRng, i64)>>>,
}

impl Entropy {
    /// Random ids and the wall clock.
    pub fn system() -> Entropy {
        Entropy { seeded: None }
    }

    /// Ids drawn from a generator seeded with `seed`, and every change made at `time`
    /// (seconds since the epoch). Two repos must not share a seed: their ids would collide.
    pub fn seeded(seed: u64, time: i64) -> Entropy {
        Entropy {
            seeded: Some(Arc::new(Mutex::new((StdRng::seed_from_u64(seed), time)))),
        }
    }

    fn doc_id(&self) -> DocId {
        match &self.seeded {
            Some(s) => DocId(lock(s).0.gen()),
            None => DocId::generate(),
        }
    }

    fn now_secs(&self) -> i64 {
        match &self.seeded {
            Some(s) => lock(s).1,
            None => now_secs(),
        }
    }
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.seeded.is_some() {
            "Entropy::seeded"
        } else {
            "Entropy::system"
        })
    }
}

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Local,
    Remote,
}

/// Something that happened in the repo. Sent only after it is durable.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A document changed; `heads` are its new heads (hex), `patches` what changed, in order
    /// (apply them to what a UI shows instead of reading the document again).
    Changed {
        doc: DocId,
        origin: Origin,
        heads: Vec<String>,
        patches: Arc<[Patch]>,
    },
    /// A field's concurrent values started to differ.
    ConflictOpened { doc: DocId, field: String },
    /// A field in conflict now has one value.
    ConflictResolved { doc: DocId, field: String },
    /// A document's status changed.
    Status { doc: DocId, status: DocStatus },
    /// The connection to the relay changed state.
    Connection(ConnState),
    /// Who else is in `doc`, or where their caret is, changed: read [`Repo::presence`].
    Presence { doc: DocId },
    /// Sync progress of the current burst of transfers, per direction. Change counts are
    /// known up front (from the relay's feed, or the outbox); byte totals grow as pages reveal
    /// what remains. Both `done` values only grow, and a burst ends with done == total.
    Progress {
        direction: Direction,
        changes_done: u64,
        changes_total: u64,
        bytes_done: u64,
        bytes_total: u64,
    },
}

/// The state of the connection to the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    /// Not connected; the sync task waits before retrying (or was never started).
    Offline,
    /// Connecting or handshaking.
    Connecting,
    /// Connected and synchronising.
    Online,
}

/// Which way data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Upload,
    Download,
}

/// The sync status of one document.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum DocStatus {
    /// Every local change is acknowledged by a relay and nothing is being transferred.
    Synced,
    /// A transfer is in flight: `done` of `total` bytes.
    Syncing { done: u64, total: u64 },
    /// Local changes no relay has acknowledged yet.
    Pending { changes: u64, oldest_age_ms: u64 },
    /// Critical fields whose concurrent values differ.
    Conflict { fields: Vec<String> },
}

impl DocStatus {
    /// The one-word form: conflict, syncing, pending or synced.
    pub fn word(&self) -> &'static str {
        match self {
            DocStatus::Synced => "synced",
            DocStatus::Syncing { .. } => "syncing",
            DocStatus::Pending { .. } => "pending",
            DocStatus::Conflict { .. } => "conflict",
        }
    }
}

/// An entity as read: its fields as JSON, with the fields in conflict flagged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entity {
    pub id: DocId,
    #[serde(rename = "type")]
    pub ty: String,
    pub namespace: String,
    /// Schema version the document is at.
    pub schema: u64,
    /// Fields by today's names; a conflicted register shows its provisional winner.
    pub value: serde_json::Value,
    /// Critical fields whose concurrent values differ.
    pub conflicts: Vec<String>,
    pub deleted: bool,
    /// Current heads (hex).
    pub heads: Vec<String>,
}

/// A local change in progress: the methods check each write against the schema; returning an
/// error from the closure given to [`Repo::change`] discards the whole change.
pub struct Tx<'t, 'd> {
    writer: Writer<'t, 'd>,
    message: Option<String>,
}

impl Tx<'_, '_> {
    /// Set a field (see [`Writer::set`] for the rules of each strategy).
    pub fn set(
        &mut self,
        field: &str,
        value: impl Into<serde_json::Value>,
    ) -> Result<(), EntityError> {
        self.writer.set(field, &value.into())
    }
    /// Delete `del` characters at `pos` of a text field and insert `text` there.
    pub fn splice_text(
        &mut self,
        field: &str,
        pos: usize,
        del: usize,
        text: &str,
    ) -> Result<(), EntityError> {
        self.writer.splice_text(field, pos, del, text)
    }
    /// Style characters `start..end` of a text field: bold, italic, a link, a comment.
    pub fn mark(
        &mut self,
        field: &str,
        start: usize,
        end: usize,
        style: &Style,
    ) -> Result<(), EntityError> {
        self.writer.mark(field, start, end, style)
    }
    /// Remove the mark called `mark` (`"bold"`, `"link"`, ...) from characters `start..end`.
    pub fn unmark(
        &mut self,
        field: &str,
        start: usize,
        end: usize,
        mark: &str,
    ) -> Result<(), EntityError> {
        self.writer.unmark(field, start, end, mark)
    }
    /// Add to a counter field.
    pub fn increment(&mut self, field: &str, by: i64) -> Result<(), EntityError> {
        self.writer.increment(field, by)
    }
    /// Put one key of a merge field (`null` removes it).
    pub fn merge_put(
        &mut self,
        field: &str,
        key: &str,
        value: impl Into<serde_json::Value>,
    ) -> Result<(), EntityError> {
        self.writer.merge_put(field, key, &value.into())
    }
    /// Mark the entity deleted (a tombstone that syncs; undo with `set_deleted(false)`).
    pub fn set_deleted(&mut self, deleted: bool) -> Result<(), EntityError> {
        self.writer.set_deleted(deleted)
    }
    /// The change's message (shown by history).
    pub fn message(&mut self, message: impl Into<String>) {
        self.message = Some(message.into());
    }
}

struct Loaded {
    doc: Automerge,
    meta: DocMeta,
    /// What reads of the document say about its fields, kept between local changes; `None`
    /// until needed, and again after anything else changed the document.
    shape: Option<Shape>,
}

impl Loaded {
    fn new(doc: Automerge, meta: DocMeta) -> Self {
        Loaded {
            doc,
            meta,
            shape: None,
        }
    }
}

/// A document's fields, open conflicts and bookkeeping as reads of it give them. In Automerge
/// every such read walks the history of the keys it passes (a title rewritten 2,500 times
/// costs thousands of steps per read), and a change needs a dozen: kept, it costs one read of
/// each critical field the change wrote.
#[derive(Debug, PartialEq)]
struct Shape {
    /// [`View::fields`]: the schema type's fields first (`typed` of them), then the others.
    fields: Vec<crdt::FieldRef>,
    typed: usize,
    /// Open conflicts on critical fields: stored key → (field name, number of versions). By
    /// key: a document written outside the schema may hold two fields of one name.
    conflicts: BTreeMap<String, (String, usize)>,
    /// No migration is pending.
    current: bool,
    /// The document's `_authors` names this device's author.
    authored: bool,
}

impl Shape {
    fn read(doc: &Automerge, schema: Option<&Schema>, actor: &ActorId, author: &str) -> Shape {
        let view = View::new(doc, schema);
        let fields = view.fields();
        let conflicts = fields
            .iter()
            .filter(|f| f.strategy == crate::Strategy::Critical)
            .filter_map(|f| {
                let c = view.field_conflict(f)?;
                Some((f.key.clone(), (f.name.clone(), c.versions.len())))
            })
            .collect();
        Shape {
            typed: view.typed_fields(),
            fields,
            conflicts,
            current: schema.is_none_or(|s| migrate::pending(doc, s).is_empty()),
            authored: view.author_of(actor).as_deref() == Some(author),
        }
    }

    /// Bring the shape up to date after a local change that wrote only `keys` (stored keys; a
    /// local change can open or close a conflict only on a key it writes).
    /// False if the change may have changed more than values and conflicts of the schema
    /// type's fields: then the shape must be read again.
    fn follow(&mut self, doc: &Automerge, schema: Option<&Schema>, keys: &[String]) -> bool {
        if !self.follow_keys(doc, schema, keys.iter().map(String::as_str)) {
            return false;
        }
        self.authored = true;
        true
    }

    /// Bring the shape up to date after changes from elsewhere whose patches are `patches`
    /// (what they made visible). False when the shape must be read again: a patch outside the
    /// schema type's fields, or on the authors (whether this device's author is named may
    /// have changed), or a critical field outside the type. A conflict's versions can change
    /// without a patch (the simulation found a third version joining one whose winner stayed),
    /// so every critical field's conflict is read again.
    fn follow_patches(
        &mut self,
        doc: &Automerge,
        schema: Option<&Schema>,
        patches: &[automerge::Patch],
    ) -> bool {
        let critical = |f: &&crdt::FieldRef| f.strategy == crate::Strategy::Critical;
        if self.fields[self.typed..].iter().any(|f| critical(&f)) {
            return false;
        }
        let mut keys: BTreeSet<String> = self.fields[..self.typed]
            .iter()
            .filter(critical)
            .map(|f| f.key.clone())
            .collect();
        for p in patches {
            let key = match (p.path.first(), &p.action) {
                (Some((_, automerge::Prop::Map(key))), _) => key,
                (None, automerge::PatchAction::PutMap { key, .. })
                | (None, automerge::PatchAction::DeleteMap { key })
                | (
                    None,
                    automerge::PatchAction::Conflict {
                        prop: automerge::Prop::Map(key),
                    },
                )
                | (
                    None,
                    automerge::PatchAction::Increment {
                        prop: automerge::Prop::Map(key),
                        ..
                    },
                ) if p.obj == ROOT => key,
                _ => return false,
            };
            if key == crdt::AUTHORS_KEY {
                return false;
            }
            keys.insert(key.clone());
        }
        self.follow_keys(doc, schema, keys.iter().map(String::as_str))
    }

    /// The conflicts of the schema type's critical fields among `keys`, read again; false if a
    /// key is not one of the type's fields (the bookkeeping `_authors` and `_deleted` aside).
    fn follow_keys<'k>(
        &mut self,
        doc: &Automerge,
        schema: Option<&Schema>,
        keys: impl Iterator<Item = &'k str>,
    ) -> bool {
        let view = View::new(doc, schema);
        let keys: BTreeSet<&str> = keys.collect();
        for key in keys {
            if key == crdt::AUTHORS_KEY || key == crdt::DELETED_KEY {
                continue;
            }
            let Some(f) = self.fields[..self.typed].iter().find(|f| f.key == key) else {
                // A bookkeeping key, or a field outside the type: the field list may change.
                return false;
            };
            if f.strategy != crate::Strategy::Critical {
                continue;
            }
            match view.field_conflict(f) {
                Some(c) => self
                    .conflicts
                    .insert(f.key.clone(), (f.name.clone(), c.versions.len())),
                None => self.conflicts.remove(&f.key),
            };
        }
        true
    }

    /// Conflicted fields in the order of the document's fields.
    fn conflicted(&self) -> Vec<String> {
        self.fields
            .iter()
            .filter(|f| self.conflicts.contains_key(&f.key))
            .map(|f| f.name.clone())
            .collect()
    }

    /// Open conflicts by field name, with their number of versions (for conflict events).
    fn conflict_names(&self) -> BTreeMap<String, usize> {
        self.conflicts.values().cloned().collect()
    }
}

/// Someone else present in a document: the relay's number for their connection, and what
/// they announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub peer: u64,
    pub presence: Presence,
}

/// Presence on this device: what it announces, and whom it sees. Ephemeral: never stored.
#[derive(Default)]
struct PresenceBook {
    /// What this device announces, per document it is in.
    local: HashMap<DocId, Presence>,
    /// Documents whose announcement changed since the sync task last looked.
    dirty: BTreeMap<DocId, Option<Presence>>,
    /// The others, per document, by peer number.
    peers: HashMap<DocId, BTreeMap<u64, Presence>>,
}

struct Inner {
    store: Store,
    presence: Mutex<PresenceBook>,
    /// Wakes the sync task when this device's presence changed.
    presence_changed: tokio::sync::Notify,
    opts: RepoOptions,
    actor: ActorId,
    docs: Mutex<Docs>,
    /// Held, per document (by stripe), while it is taken into the cache, and while its
    /// metadata is updated without loading it: the two never overlap.
    loading: Box<[Mutex<()>]>,
    events: broadcast::Sender<Event>,
    syncing: Mutex<HashMap<DocId, (u64, u64)>>,
}

/// Stripes of [`Inner::loading`]. A stripe is held through a document's load, which holds
/// back loads and metadata updates of the documents that share it (one in 64).
const LOADING_STRIPES: usize = 64;

/// The document cache.
#[derive(Default)]
struct Docs {
    /// Each with when it was last asked for (a tick of `uses`): the least recently used
    /// leave first.
    loaded: HashMap<DocId, (Arc<Mutex<Loaded>>, u64)>,
    uses: u64,
    /// Documents that left the cache with no open conflict and have not been loaded since:
    /// the `Repo` changes a document only through the cache, so their status follows from
    /// their metadata alone (writing changes through [`Repo::store`] bypasses this, as it
    /// bypasses every loaded copy). At most [`CLEAN_PER_CACHED`] × `cache_docs`; past that,
    /// any of them are forgotten.
    clean: HashSet<DocId>,
}

/// See [`Docs::clean`].
const CLEAN_PER_CACHED: usize = 16;

/// The embedding API: one store folder, its documents, and (with the sync layer) a relay.
#[derive(Clone)]
pub struct Repo {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

/// Automerge must never take the process down on bytes from disk or a peer.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("automerge panicked on these bytes".into()))
}

impl Repo {
    /// Open (or create) the store in `path`.
    pub fn open(path: impl AsRef<Path>, opts: RepoOptions) -> Result<Repo, Error> {
        let store = Store::open(path, opts.store.clone())?;
        Ok(Repo::with_store(store, opts))
    }

    /// Open a folder for reading only: a device store as it is, or a (stopped) relay's data
    /// folder, whose documents are loaded into memory. Nothing is written to the folder but
    /// the recovery any open does (a crashed store's write-ahead log is replayed into sled and
    /// made durable there); a folder that holds no store is an error rather than a new empty
    /// store.
    pub fn open_for_reading(path: impl AsRef<Path>, opts: RepoOptions) -> Result<Repo, Error> {
        let path = path.as_ref();
        if !path.join("db").exists() {
            return Err(StoreError::Io(format!("no store at {}", path.display())).into());
        }
        let mut sopts = opts.store.clone();
        sopts.fsync = false;
        let backend = crate::store::SledBackend::open(path, &sopts)?;
        if !crate::relay::log::RelayLog::is_relay_data(&backend)? {
            let store = Store::from_backend(Box::new(backend), Some(path.to_path_buf()))?;
            return Ok(Repo::with_store(store, opts));
        }
        if crate::relay::log::RelayLog::needs_upgrade(&backend)? {
            return Err(StoreError::Io(format!(
                "{} holds relay data in an older storage format: start the relay on it once \
                 (`tandem relay --data {}`), which upgrades it, then read it",
                path.display(),
                path.display()
            ))
            .into());
        }
        let log = crate::relay::log::RelayLog::with_backend(Box::new(backend))?;
        let repo = Repo::with_store(Store::in_memory(), opts);
        for (id, rec) in log.documents()? {
            let page = log.contents(&id)?;
            if let Some((_, bytes)) = &page.snapshot {
                repo.apply_snapshot(&id, &rec.namespace, bytes)?;
            }
            repo.apply_remote(&id, &rec.namespace, &page.changes)?;
        }
        Ok(repo)
    }

    /// A repo in memory (tests, examples): nothing survives the process.
    pub fn in_memory(schema: Schema, author: &str) -> Result<Repo, Error> {
        Ok(Repo::with_store(
            Store::in_memory(),
            RepoOptions::new(author).schema(schema),
        ))
    }

    /// A repo over an already opened store.
    pub fn with_store(store: Store, opts: RepoOptions) -> Repo {
        let (events, _) = broadcast::channel(1024);
        Repo {
            inner: Arc::new(Inner {
                actor: store.device().actor(),
                store,
                opts,
                docs: Mutex::new(Docs::default()),
                loading: (0..LOADING_STRIPES).map(|_| Mutex::new(())).collect(),
                presence: Mutex::new(PresenceBook::default()),
                presence_changed: tokio::sync::Notify::new(),
                events,
                syncing: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// This device's identity.
    pub fn device(&self) -> DeviceId {
        self.inner.store.device()
    }

    /// The author name recorded on this device's changes.
    pub fn author(&self) -> &str {
        &self.inner.opts.author
    }

    /// The schema in use, if any.
    pub fn schema(&self) -> Option<&Schema> {
        self.inner.opts.schema.as_ref()
    }

    /// The store underneath (for the sync layer and tools). Reads only, while the `Repo` is
    /// in use: changes or metadata written through it bypass the `Repo`'s loaded documents
    /// and what it knows of them (their status among it).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Events from now on. The channel is bounded: a receiver that falls more than 1,024 events
    /// behind gets `Lagged` and should re-read what it shows.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub(crate) fn emit(&self, e: Event) {
        // No receiver is fine: events are a convenience, the store is the truth.
        let _ = self.inner.events.send(e);
    }

    /// Create an entity of type `ty` in the default namespace with initial field values.
    pub fn create(&self, ty: &str, fields: serde_json::Value) -> Result<DocId, Error> {
        self.create_in(DEFAULT_NAMESPACE, ty, fields)
    }

    /// Create an entity in namespace `ns`.
    pub fn create_in(&self, ns: &str, ty: &str, fields: serde_json::Value) -> Result<DocId, Error> {
        check_name("namespace", ns)?;
        if ns == crate::transport::ALL_NAMESPACES {
            return Err(EntityError::InvalidValue {
                field: "namespace".into(),
                reason: format!("'{ns}' is reserved: in a relay's hello it means every namespace"),
            }
            .into());
        }
        check_name("type", ty)?;
        let fields = match fields {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            _ => {
                return Err(EntityError::InvalidValue {
                    field: "fields".into(),
                    reason: "initial fields must be a JSON object".into(),
                }
                .into())
            }
        };
        let id = self.inner.opts.entropy.doc_id();
        let mut doc = Automerge::new().with_actor(self.inner.actor.clone());
        let schema = self.schema();
        let mut tx = doc.transaction();
        crdt::init_entity(&mut tx, schema, ty, &fields)?;
        Writer::new(&mut tx, schema).record_author(&self.inner.actor, self.author())?;
        tx.commit_with(
            CommitOptions::default()
                .with_time(self.inner.opts.entropy.now_secs())
                .with_message(format!("create {ty}")),
        );
        let change = doc
            .get_last_local_change()
            .ok_or_else(|| Error::InvalidData("creation produced no change".into()))?;
        let mut meta = DocMeta {
            namespace: ns.to_string(),
            ..DocMeta::default()
        };
        refresh_meta(&mut meta, &doc, schema);
        let heads = hex_heads(&doc.get_heads());
        let patches = editing::patches(&doc, schema, &[], &doc.get_heads()).into();
        {
            // Stored and cached as one step: once stored, a relay may ack it (the sync task
            // scans the outbox), and an ack meeting it out of the cache writes the stored
            // metadata, which a later insert of this copy would then undo.
            let _loading = self.loading(&id);
            self.inner
                .store
                .append(&id, &mut meta, &[change.raw_bytes().to_vec()], true)?;
            self.cache(id, Loaded::new(doc, meta));
        }
        self.emit(Event::Changed {
            doc: id,
            origin: Origin::Local,
            heads,
            patches,
        });
        self.emit_status(&id);
        Ok(id)
    }

    /// Put a loaded document in the cache, unless another thread loaded it first: then that
    /// copy wins and is returned. Two copies of one document would each append at the same
    /// journal seq and overwrite each other's changes.
    fn cache(&self, id: DocId, loaded: Loaded) -> Arc<Mutex<Loaded>> {
        let cap = self.inner.opts.cache_docs;
        let mut docs = lock(&self.inner.docs);
        docs.uses += 1;
        let Docs {
            loaded: map,
            uses,
            clean,
        } = &mut *docs;
        clean.remove(&id);
        let entry = map
            .entry(id)
            .or_insert_with(|| (Arc::new(Mutex::new(loaded)), 0));
        entry.1 = *uses;
        let entry = entry.0.clone();
        if map.len() > cap {
            // Evict the least recently used of the documents nobody is using; a busy one
            // stays until it is idle.
            let mut idle: Vec<(u64, DocId)> = map
                .iter()
                .filter(|(k, (v, _))| **k != id && Arc::strong_count(v) == 1)
                .map(|(k, (_, used))| (*used, *k))
                .collect();
            let excess = (map.len() - cap).min(idle.len());
            if excess < idle.len() {
                idle.select_nth_unstable(excess);
            }
            idle.truncate(excess);
            for (_, k) in idle {
                // Idle: nobody else holds it, so its lock is free.
                let known_clean = map.remove(&k).is_some_and(|(v, _)| {
                    v.try_lock()
                        .ok()
                        .and_then(|l| l.shape.as_ref().map(|s| s.conflicts.is_empty()))
                        .unwrap_or(false)
                });
                if known_clean {
                    clean.insert(k);
                }
            }
            // Over its bound, forget some (any): their status is read the long way again.
            let bound = cap.saturating_mul(CLEAN_PER_CACHED);
            while clean.len() > bound {
                let Some(&k) = clean.iter().next() else { break };
                clean.remove(&k);
            }
        }
        entry
    }

    /// The loaded copy of `id`, if it is in the cache.
    fn cached(&self, id: &DocId) -> Option<Arc<Mutex<Loaded>>> {
        let mut docs = lock(&self.inner.docs);
        docs.uses += 1;
        let uses = docs.uses;
        docs.loaded.get_mut(id).map(|(e, used)| {
            *used = uses;
            e.clone()
        })
    }

    fn loading(&self, id: &DocId) -> MutexGuard<'_, ()> {
        // From the id's random part: its first bytes are the time it was made, which ids made
        // hours apart share (see `DocId::generate`).
        let stripe = u64::from_le_bytes(id.0[8..].try_into().unwrap_or_default());
        lock(&self.inner.loading[(stripe % LOADING_STRIPES as u64) as usize])
    }

    /// After a failed write, make the loaded copy what the store holds again (the caller holds
    /// the document's lock, so nobody sees the state in between).
    fn reload(&self, id: &DocId, l: &mut Loaded) {
        match self.inner.store.load(id) {
            Ok(Some(stored)) => match self.build(&stored) {
                Ok(doc) => {
                    l.doc = doc;
                    l.meta = stored.meta;
                    l.shape = None;
                }
                Err(reason) => {
                    tracing::error!(doc = %id, %reason, "could not reload after a failed write")
                }
            },
            Ok(None) => {
                l.doc = Automerge::new().with_actor(self.inner.actor.clone());
                l.shape = None;
                l.meta = DocMeta {
                    namespace: l.meta.namespace.clone(),
                    ..DocMeta::default()
                };
            }
            Err(e) => {
                tracing::error!(doc = %id, error = %e, "could not reload after a failed write")
            }
        }
    }

    /// A document from its stored snapshot and journal tail.
    fn build(&self, stored: &crate::store::Stored) -> Result<Automerge, String> {
        let actor = self.inner.actor.clone();
        guarded(|| {
            let mut doc = match &stored.snapshot {
                Some(bytes) => {
                    Automerge::load(bytes).map_err(|e| format!("snapshot does not load: {e}"))?
                }
                None => Automerge::new(),
            };
            let mut changes = Vec::with_capacity(stored.tail.len());
            for (seq, bytes) in &stored.tail {
                changes.push(
                    crdt::parse_change(bytes)
                        .map_err(|e| format!("journal entry {seq} is not a valid change: {e}"))?,
                );
            }
            doc.apply_changes(changes)
                .map_err(|e| format!("journal does not apply: {e}"))?;
            Ok(doc.with_actor(actor))
        })
    }

    /// The loaded document, loading it (snapshot + journal tail) if needed.
    fn entry(&self, id: &DocId) -> Result<Arc<Mutex<Loaded>>, Error> {
        if let Some(e) = self.cached(id) {
            return Ok(e);
        }
        let _loading = self.loading(id);
        if let Some(e) = self.cached(id) {
            return Ok(e);
        }
        let stored = self.inner.store.load(id)?.ok_or(Error::NotFound(*id))?;
        match self.build(&stored) {
            Ok(doc) => Ok(self.cache(*id, Loaded::new(doc, stored.meta))),
            Err(reason) => {
                tracing::error!(doc = %id, %reason, "quarantining a document whose stored bytes do not load");
                self.inner.store.quarantine(id, &reason)?;
                Err(StoreError::Quarantined { doc: *id, reason }.into())
            }
        }
    }

    /// [`entry`](Self::entry), or a new empty document in `namespace` if the store has none by
    /// that id. Under the stripe lock: another thread may have stored it meanwhile, and an
    /// empty copy cached over a stored document would append as if it were new.
    fn entry_or_new(&self, id: &DocId, namespace: &str) -> Result<Arc<Mutex<Loaded>>, Error> {
        match self.entry(id) {
            Err(Error::NotFound(_)) => {}
            found => return found,
        }
        let loading = self.loading(id);
        if let Some(e) = self.cached(id) {
            return Ok(e);
        }
        if self.inner.store.meta(id)?.is_some() {
            drop(loading);
            return self.entry(id);
        }
        let empty = Loaded::new(
            Automerge::new().with_actor(self.inner.actor.clone()),
            DocMeta {
                namespace: namespace.to_string(),
                ..DocMeta::default()
            },
        );
        Ok(self.cache(*id, empty))
    }

    /// Find a document by its id or a unique prefix of it.
    pub fn find(&self, prefix: &str) -> Result<DocId, Error> {
        if let Ok(id) = prefix.parse::<DocId>() {
            if self.inner.store.meta(&id)?.is_some() {
                return Ok(id);
            }
        }
        let matches: Vec<DocId> = self
            .inner
            .store
            .list()?
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| id.to_string().starts_with(prefix))
            .collect();
        match matches.len() {
            1 => Ok(matches[0]),
            0 => Err(Error::NoMatch(prefix.to_string())),
            _ => Err(Error::Ambiguous {
                prefix: prefix.to_string(),
                candidates: matches.iter().map(|d| d.to_string()).collect(),
            }),
        }
    }

    /// The fields a document shows (today's names, stored keys, strategies).
    pub fn fields(&self, id: &DocId) -> Result<Vec<crdt::FieldRef>, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        Ok(View::new(&l.doc, self.schema()).fields())
    }

    /// Read an entity (skipping nothing: a deleted entity reads with `deleted: true`).
    pub fn get(&self, id: &DocId) -> Result<Entity, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        Ok(entity(id, &l, self.schema()))
    }

    /// Run `f` as one local change of `id`, with `message` (optional) recorded on it. Returns
    /// the new change's hash (hex), or `None` if `f` wrote nothing. Durable on return.
    ///
    /// `f` runs while the document is locked: read what it needs before calling `change`, and
    /// do not call this `Repo` about the same document from inside it (that would deadlock).
    pub fn change<F>(&self, id: &DocId, f: F) -> Result<Option<String>, Error>
    where
        F: FnOnce(&mut Tx<'_, '_>) -> Result<(), EntityError>,
    {
        let entry = self.entry(id)?;
        let mut l = lock(&entry);
        let schema = self.schema();
        let mut shape = self.take_shape(&mut l);
        let before = shape.conflict_names();
        let before_heads = l.doc.get_heads();
        let mut changes: Vec<Change> = match schema {
            Some(s) if !shape.current => match migrate::migrate(&mut l.doc, id, s) {
                Ok(c) => c,
                Err(e) => {
                    // A migration may be applied in memory: back to what the store has.
                    self.reload(id, &mut l);
                    return Err(e.into());
                }
            },
            _ => Vec::new(),
        };
        // A migration changes the fields: then nothing of the shape carries over.
        let migrated = !changes.is_empty();
        let typed = if migrated {
            &[][..]
        } else {
            &shape.fields[..shape.typed]
        };
        // Patches are logged as the transaction runs: diffing afterwards would cost time in
        // proportion to the document's history on every keystroke.
        let mut tx = l
            .doc
            .transaction_log_patches(PatchLog::active())
            // Automerge refuses only a log already bound to another document; this one is new.
            .expect("a fresh patch log fits any document");
        let (result, touched) = {
            let mut t = Tx {
                writer: Writer {
                    tx: &mut tx,
                    schema,
                    typed,
                    touched: Vec::new(),
                },
                message: None,
            };
            let r = f(&mut t).map(|_| t.message.take());
            (r, t.writer.touched)
        };
        let message = match result {
            Ok(m) => m,
            Err(e) => {
                tx.rollback();
                // A refused write writes nothing, not even the migration it would have carried:
                // put the document back as the store has it.
                if migrated {
                    self.reload(id, &mut l);
                } else {
                    l.shape = Some(shape);
                }
                return Err(e.into());
            }
        };
        if tx.pending_ops() > 0 && (migrated || !shape.authored) {
            if let Err(e) =
                Writer::new(&mut tx, schema).record_author(&self.inner.actor, self.author())
            {
                tx.rollback();
                if migrated {
                    self.reload(id, &mut l);
                }
                return Err(e.into());
            }
        }
        let mut opts = CommitOptions::default().with_time(self.inner.opts.entropy.now_secs());
        if let Some(m) = message {
            opts = opts.with_message(m);
        }
        let (hash, mut log) = tx.commit_with(opts);
        if hash.is_some() {
            if let Some(c) = l.doc.get_last_local_change() {
                changes.push(c);
            }
        }
        if changes.is_empty() {
            l.shape = Some(shape);
            return Ok(None);
        }
        // A migration's changes came before the logged transaction (rare: once per schema
        // version per document): then the patches come from a diff.
        let logged = (!migrated).then(|| l.doc.make_patches(&mut log));
        let kept = !migrated && shape.follow(&l.doc, schema, &touched);
        let mut meta = l.meta.clone();
        if kept {
            meta.heads = l.doc.get_heads().iter().map(|h| h.0).collect();
            if touched.iter().any(|k| k == crdt::DELETED_KEY) {
                meta.deleted = View::new(&l.doc, schema).is_deleted();
            }
        } else {
            refresh_meta(&mut meta, &l.doc, schema);
        }
        self.persist_local(id, &mut l, &changes, meta)?;
        if !kept {
            shape = self.read_shape(&l.doc);
        }
        #[cfg(debug_assertions)]
        {
            // Every test run checks the kept shape against a fresh read.
            let fresh = self.read_shape(&l.doc);
            debug_assert_eq!(shape, fresh, "kept shape of {id}");
            let mut meta = l.meta.clone();
            refresh_meta(&mut meta, &l.doc, schema);
            debug_assert_eq!(l.meta, meta, "kept metadata of {id}");
        }
        let now = l.doc.get_heads();
        let patches = match logged {
            Some(p) => editing::convert_named(&shape.fields, p),
            None => editing::patches(&l.doc, schema, &before_heads, &now),
        }
        .into();
        let after = shape.conflict_names();
        let status = self.status_with(id, &l.meta, &shape);
        l.shape = Some(shape);
        drop(l);
        self.emit(Event::Changed {
            doc: *id,
            origin: Origin::Local,
            heads: hex_heads(&now),
            patches,
        });
        self.emit_conflicts(id, &before, &after);
        self.emit(Event::Status { doc: *id, status });
        self.maybe_compact(id, &entry);
        Ok(hash.map(|h| h.to_string()))
    }

    fn read_shape(&self, doc: &Automerge) -> Shape {
        Shape::read(doc, self.schema(), &self.inner.actor, self.author())
    }

    /// The loaded document's shape, read if it is not known; the caller puts it back.
    fn take_shape(&self, l: &mut Loaded) -> Shape {
        match l.shape.take() {
            Some(s) => s,
            None => self.read_shape(&l.doc),
        }
    }

    fn persist_local(
        &self,
        id: &DocId,
        l: &mut Loaded,
        changes: &[Change],
        mut meta: DocMeta,
    ) -> Result<(), Error> {
        let bytes: Vec<Vec<u8>> = changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
        match self.inner.store.append(id, &mut meta, &bytes, true) {
            Ok(_) => {
                l.meta = meta;
                Ok(())
            }
            Err(e) => {
                // The in-memory document holds a change the store failed to take: go back to
                // what the store has.
                self.reload(id, l);
                Err(e.into())
            }
        }
    }

    /// Compact when the journal tail is long. The write that triggered it is already durable
    /// and announced, so a failure here is logged, not returned (a caller that saw an error
    /// would retry a write that succeeded).
    fn maybe_compact(&self, id: &DocId, entry: &Arc<Mutex<Loaded>>) {
        let mut l = lock(entry);
        if l.meta.tail_changes < self.inner.opts.compact_after_changes
            && l.meta.tail_bytes < self.inner.opts.compact_after_bytes
        {
            return;
        }
        if let Err(e) = self.compact_loaded(id, &mut l) {
            tracing::warn!(doc = %id, error = %e, "compaction failed; the journal stays as it is");
        }
    }

    fn compact_loaded(&self, id: &DocId, l: &mut Loaded) -> Result<(), Error> {
        let bytes = l.doc.save();
        let covers = l.meta.next_seq;
        let mut meta = l.meta.clone();
        let r = self.inner.store.compact(id, &mut meta, &bytes, covers);
        // Once the new snapshot is durable the store points at it, even if cleaning up the old
        // one failed: adopt its metadata either way.
        if r.is_ok() || meta.snapshot_gen != l.meta.snapshot_gen {
            l.meta = meta;
        }
        Ok(r?)
    }

    /// Write a snapshot of `id` now and drop the journal it covers.
    pub fn compact(&self, id: &DocId) -> Result<(), Error> {
        let entry = self.entry(id)?;
        let mut l = lock(&entry);
        self.compact_loaded(id, &mut l)
    }

    /// Mark an entity deleted.
    pub fn delete(&self, id: &DocId) -> Result<(), Error> {
        self.change(id, |tx| {
            tx.message("delete");
            tx.set_deleted(true)
        })?;
        Ok(())
    }

    /// Undo a delete.
    pub fn undelete(&self, id: &DocId) -> Result<(), Error> {
        self.change(id, |tx| {
            tx.message("undelete");
            tx.set_deleted(false)
        })?;
        Ok(())
    }

    /// Documents in the store, optionally of one type; deleted ones only if asked.
    pub fn list(
        &self,
        ty: Option<&str>,
        include_deleted: bool,
    ) -> Result<Vec<(DocId, DocMeta)>, Error> {
        Ok(self
            .inner
            .store
            .list()?
            .into_iter()
            .filter(|(_, m)| ty.is_none_or(|t| m.ty == t))
            .filter(|(_, m)| include_deleted || !m.deleted)
            .collect())
    }

    /// Open conflicts of a document: critical fields only, or every field with concurrent
    /// distinct values when `any_field`.
    pub fn conflicts(&self, id: &DocId, any_field: bool) -> Result<Vec<FieldConflict>, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        Ok(View::new(&l.doc, self.schema()).conflicts(any_field))
    }

    /// Settle a field: write `value` so that it supersedes every concurrent value, with a
    /// message naming who decided.
    pub fn resolve(
        &self,
        id: &DocId,
        field: &str,
        value: serde_json::Value,
    ) -> Result<String, Error> {
        let who = self.author().to_string();
        let hash = self.change(id, |tx| {
            tx.message(format!(
                "resolve {field} = {} (decided by {who})",
                crdt::show(&value)
            ));
            tx.set(field, value.clone())
        })?;
        hash.ok_or_else(|| Error::InvalidData("resolve wrote no change".into()))
    }

    /// The history of a document, oldest first.
    pub fn history(&self, id: &DocId) -> Result<Vec<ChangeInfo>, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        Ok(history::changes(&l.doc, self.schema()))
    }

    fn find_change(&self, id: &DocId, doc: &Automerge, prefix: &str) -> Result<ChangeHash, Error> {
        history::find_change(doc, prefix).map_err(|e| match e {
            FindChange::TooShort => Error::Entity(EntityError::InvalidValue {
                field: "change".into(),
                reason: format!("'{prefix}' is too short: give at least 4 hex characters"),
            }),
            FindChange::NotFound => Error::ChangeNotFound {
                doc: *id,
                hash: prefix.to_string(),
            },
            FindChange::Ambiguous(c) => Error::Ambiguous {
                prefix: prefix.to_string(),
                candidates: c,
            },
        })
    }

    /// The entity as it was right after the change `at` (a hex prefix of ≥ 4 characters).
    pub fn get_at(&self, id: &DocId, at: &str) -> Result<Entity, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        let h = self.find_change(id, &l.doc, at)?;
        let view = View::at(&l.doc, self.schema(), vec![h]);
        Ok(Entity {
            id: *id,
            ty: view.entity_type().unwrap_or_default(),
            namespace: l.meta.namespace.clone(),
            schema: view.schema_version(),
            value: view.json(),
            conflicts: Vec::new(),
            deleted: view.is_deleted(),
            heads: vec![h.to_string()],
        })
    }

    /// Field-level differences between the points `from` and `to` (now when `None`).
    pub fn diff(&self, id: &DocId, from: &str, to: Option<&str>) -> Result<Vec<FieldDiff>, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        let a = self.find_change(id, &l.doc, from)?;
        let b = match to {
            Some(t) => vec![self.find_change(id, &l.doc, t)?],
            None => l.doc.get_heads(),
        };
        Ok(history::diff(&l.doc, self.schema(), &[a], &b))
    }

    /// The text object of text field `field`, and the document locked.
    fn with_text<T>(
        &self,
        id: &DocId,
        field: &str,
        f: impl FnOnce(&Automerge, &automerge::ObjId) -> Result<T, String>,
    ) -> Result<T, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        let view = View::new(&l.doc, self.schema());
        let fr = view.field(field)?;
        let invalid = |reason: String| {
            Error::Entity(EntityError::InvalidValue {
                field: field.to_string(),
                reason,
            })
        };
        if fr.strategy != crate::Strategy::Text {
            return Err(invalid(format!(
                "a {} field has no text positions",
                fr.strategy.name()
            )));
        }
        let obj = editing::text_obj(&l.doc, &fr.key)
            .ok_or_else(|| invalid("the document holds no text here yet".into()))?;
        f(&l.doc, &obj).map_err(invalid)
    }

    /// A stable cursor at character `pos` of text field `field` (`pos` may be the text's
    /// length: a cursor that stays at the end). Resolve it with [`Repo::cursor_position`]
    /// after any edits, local or remote.
    pub fn cursor(&self, id: &DocId, field: &str, pos: usize) -> Result<TextCursor, Error> {
        self.with_text(id, field, |doc, obj| editing::cursor_at(doc, obj, pos))
    }

    /// Where `cursor` points now in text field `field`. A cursor whose character was deleted
    /// moves to the next character still there.
    pub fn cursor_position(
        &self,
        id: &DocId,
        field: &str,
        cursor: &TextCursor,
    ) -> Result<usize, Error> {
        self.with_text(id, field, |doc, obj| {
            editing::cursor_position(doc, obj, cursor)
        })
    }

    /// The marks (bold, italic, links, comments...) on text field `field`, in text order.
    pub fn marks(&self, id: &DocId, field: &str) -> Result<Vec<MarkSpan>, Error> {
        self.with_text(id, field, |doc, obj| Ok(editing::marks(doc, obj)))
    }

    /// The sync status of a document.
    pub fn status(&self, id: &DocId) -> Result<DocStatus, Error> {
        let known_clean = {
            let docs = lock(&self.inner.docs);
            !docs.loaded.contains_key(id) && docs.clean.contains(id)
        };
        if known_clean {
            // Out of the cache with no open conflict: the metadata says the rest.
            if let Some(meta) = self.inner.store.meta(id)? {
                if meta.quarantined.is_none() {
                    return Ok(self.status_of(id, &meta, Vec::new()));
                }
            }
        }
        let entry = self.entry(id)?;
        let mut l = lock(&entry);
        let shape = self.take_shape(&mut l);
        let status = self.status_with(id, &l.meta, &shape);
        l.shape = Some(shape);
        Ok(status)
    }

    fn status_with(&self, id: &DocId, meta: &DocMeta, shape: &Shape) -> DocStatus {
        self.status_of(id, meta, shape.conflicted())
    }

    /// The status of a document with this metadata and these conflicted fields.
    fn status_of(&self, id: &DocId, meta: &DocMeta, fields: Vec<String>) -> DocStatus {
        if !fields.is_empty() {
            return DocStatus::Conflict { fields };
        }
        if let Some((done, total)) = lock(&self.inner.syncing).get(id) {
            return DocStatus::Syncing {
                done: *done,
                total: *total,
            };
        }
        if meta.pending > 0 {
            let age = meta
                .oldest_pending_ms
                .map(|t| (now_ms() - t).max(0) as u64)
                .unwrap_or(0);
            return DocStatus::Pending {
                changes: meta.pending,
                oldest_age_ms: age,
            };
        }
        DocStatus::Synced
    }

    fn emit_status(&self, id: &DocId) {
        if let Ok(s) = self.status(id) {
            self.emit(Event::Status {
                doc: *id,
                status: s,
            });
        }
    }

    fn emit_conflicts(
        &self,
        id: &DocId,
        before: &BTreeMap<String, usize>,
        after: &BTreeMap<String, usize>,
    ) {
        for f in after.keys().filter(|f| !before.contains_key(*f)) {
            self.emit(Event::ConflictOpened {
                doc: *id,
                field: f.clone(),
            });
        }
        for f in before.keys().filter(|f| !after.contains_key(*f)) {
            self.emit(Event::ConflictResolved {
                doc: *id,
                field: f.clone(),
            });
        }
    }

    /// Apply changes that came from elsewhere (a relay, another store). Idempotent: changes
    /// already present are skipped. Changes whose dependencies are missing are not applied and
    /// counted in the result. Durable before it returns and before any event.
    pub fn apply_remote(
        &self,
        id: &DocId,
        namespace: &str,
        changes: &[Vec<u8>],
    ) -> Result<Applied, Error> {
        self.apply_changes(id, namespace, changes, false)
    }

    fn apply_changes(
        &self,
        id: &DocId,
        namespace: &str,
        changes: &[Vec<u8>],
        local: bool,
    ) -> Result<Applied, Error> {
        let mut parsed = Vec::with_capacity(changes.len());
        for (i, bytes) in changes.iter().enumerate() {
            let c = crdt::parse_change(bytes)
                .map_err(|e| Error::InvalidData(format!("change {i}: {e}")))?;
            parsed.push(c);
        }
        let entry = self.entry_or_new(id, namespace)?;
        let mut l = lock(&entry);
        let schema = self.schema();
        let before_heads = l.doc.get_heads();
        let mut shape = self.take_shape(&mut l);
        let before = shape.conflict_names();
        let fresh: Vec<Change> = parsed
            .into_iter()
            .filter(|c| l.doc.get_change_by_hash(&c.hash()).is_none())
            .collect();
        if fresh.is_empty() {
            l.shape = Some(shape);
            return Ok(Applied::default());
        }
        let offered = fresh.len();
        // Changes from elsewhere may change anything: until their patches say what they
        // changed, the document has no shape.
        let mut log = PatchLog::active();
        let applied = guarded(|| {
            l.doc
                .apply_changes_log_patches(fresh, &mut log)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = applied {
            self.reload(id, &mut l);
            return Err(Error::InvalidData(e));
        }
        // Everything that became part of the document, including changes that waited in
        // Automerge's queue for these dependencies.
        let added: Vec<Vec<u8>> = l
            .doc
            .get_changes(&before_heads)
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        if added.is_empty() {
            // All of them wait for dependencies: the document is as it was.
            l.shape = Some(shape);
            return Ok(Applied {
                applied: 0,
                missing_deps: offered,
            });
        }
        let mut meta = l.meta.clone();
        refresh_meta(&mut meta, &l.doc, schema);
        if let Err(e) = self.inner.store.append(id, &mut meta, &added, local) {
            self.reload(id, &mut l);
            return Err(e.into());
        }
        l.meta = meta;
        let am_patches = l.doc.make_patches(&mut log);
        // Most changes from elsewhere write a few of the type's fields: then only those
        // fields' conflicts are read again, not every field's history.
        if !shape.follow_patches(&l.doc, schema, &am_patches) {
            shape = self.read_shape(&l.doc);
        }
        // Every test run checks the followed shape against a fresh read.
        #[cfg(debug_assertions)]
        debug_assert_eq!(shape, self.read_shape(&l.doc), "followed shape of {id}");
        let after = shape.conflict_names();
        let now = l.doc.get_heads();
        let patches = editing::convert_named(&shape.fields, am_patches).into();
        let status = self.status_with(id, &l.meta, &shape);
        l.shape = Some(shape);
        drop(l);
        self.emit(Event::Changed {
            doc: *id,
            origin: if local { Origin::Local } else { Origin::Remote },
            heads: hex_heads(&now),
            patches,
        });
        self.emit_conflicts(id, &before, &after);
        self.emit(Event::Status { doc: *id, status });
        self.maybe_compact(id, &entry);
        Ok(Applied {
            applied: added.len(),
            missing_deps: offered.saturating_sub(added.len()),
        })
    }

    /// The document as standard Automerge bytes (loadable by any Automerge implementation).
    pub fn export(&self, id: &DocId) -> Result<Vec<u8>, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        Ok(l.doc.save())
    }

    /// Merge standard Automerge bytes into document `id` (created if new). The imported
    /// changes this store did not have go to the outbox: this device is now their source.
    pub fn import(&self, id: &DocId, bytes: &[u8]) -> Result<Applied, Error> {
        if bytes.len() > MAX_IMPORT_BYTES {
            return Err(Error::InvalidData(format!(
                "{} bytes is more than the {MAX_IMPORT_BYTES} an import accepts",
                bytes.len()
            )));
        }
        let doc = guarded(|| Automerge::load(bytes).map_err(|e| e.to_string()))
            .map_err(|e| Error::InvalidData(format!("not an Automerge document: {e}")))?;
        if doc.get(ROOT, crdt::TYPE_KEY).ok().flatten().is_none() && doc.get_heads().is_empty() {
            return Err(Error::InvalidData(
                "the file holds an empty document".into(),
            ));
        }
        let changes: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let ns = self
            .inner
            .store
            .meta(id)?
            .map(|m| m.namespace)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        self.apply_changes(id, &ns, &changes, true)
    }

    /// Every change of `id` as raw bytes, in causal order (for re-pushing a whole history).
    pub fn all_changes(&self, id: &DocId) -> Result<Vec<Vec<u8>>, Error> {
        let entry = self.entry(id)?;
        let l = lock(&entry);
        Ok(l.doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect())
    }

    /// Announce this device's presence in `doc` (its name, colour and caret) to the others
    /// in it, through the relay while connected; `None` leaves the document. Cheap: call it on
    /// every caret move; the sync task sends at most one update per document every 50 ms, and
    /// repeats the latest while connected so that it does not expire elsewhere.
    pub fn set_presence(&self, doc: &DocId, presence: Option<Presence>) {
        {
            let mut book = lock(&self.inner.presence);
            match &presence {
                Some(p) => {
                    if book.local.get(doc) == Some(p) {
                        return;
                    }
                    book.local.insert(*doc, p.clone());
                }
                None => {
                    if book.local.remove(doc).is_none() {
                        return;
                    }
                }
            }
            book.dirty.insert(*doc, presence);
        }
        self.inner.presence_changed.notify_one();
    }

    /// The others present in `doc` right now, by peer number. Empty while offline: presence is
    /// only what the relay tells live.
    pub fn presence(&self, doc: &DocId) -> Vec<Peer> {
        lock(&self.inner.presence)
            .peers
            .get(doc)
            .map(|m| {
                m.iter()
                    .map(|(peer, p)| Peer {
                        peer: *peer,
                        presence: p.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What this device announces in each document it is in.
    pub(crate) fn local_presence(&self) -> Vec<(DocId, Presence)> {
        lock(&self.inner.presence)
            .local
            .iter()
            .map(|(d, p)| (*d, p.clone()))
            .collect()
    }

    /// The announcements changed since the last call.
    pub(crate) fn take_presence_changes(&self) -> Vec<(DocId, Option<Presence>)> {
        std::mem::take(&mut lock(&self.inner.presence).dirty)
            .into_iter()
            .collect()
    }

    /// Resolves when [`set_presence`](Self::set_presence) changed something (for the sync
    /// task).
    pub(crate) async fn presence_changed(&self) {
        self.inner.presence_changed.notified().await
    }

    /// What the relay said of peer `peer` in `doc` (`None`: gone).
    pub(crate) fn put_peer(&self, doc: &DocId, peer: u64, state: Option<Presence>) {
        let changed = {
            let mut book = lock(&self.inner.presence);
            match state {
                Some(p) => {
                    let peers = book.peers.entry(*doc).or_default();
                    peers.insert(peer, p.clone()) != Some(p)
                }
                None => {
                    let removed = book
                        .peers
                        .get_mut(doc)
                        .is_some_and(|m| m.remove(&peer).is_some());
                    if book.peers.get(doc).is_some_and(|m| m.is_empty()) {
                        book.peers.remove(doc);
                    }
                    removed
                }
            }
        };
        if changed {
            self.emit(Event::Presence { doc: *doc });
        }
    }

    /// The connection to the relay ended: nobody is known to be anywhere any more.
    pub(crate) fn clear_peers(&self) {
        let docs: Vec<DocId> = {
            let mut book = lock(&self.inner.presence);
            book.peers.drain().map(|(d, _)| d).collect()
        };
        for doc in docs {
            self.emit(Event::Presence { doc });
        }
    }

    /// Record sync progress for a document (the sync layer calls this); `None` clears it.
    pub fn set_progress(&self, id: &DocId, progress: Option<(u64, u64)>) {
        {
            let mut s = lock(&self.inner.syncing);
            match progress {
                Some(p) => s.insert(*id, p),
                None => s.remove(id),
            };
        }
        self.emit_status(id);
    }

    /// Start background sync with a relay (needs a tokio runtime): pushes the outbox, pulls
    /// what changed, follows live changes, reconnects with backoff. See [`crate::client`].
    pub fn connect(&self, cfg: crate::client::SyncConfig) -> crate::client::SyncHandle {
        crate::client::connect(self, cfg)
    }

    /// Documents with local changes no relay has acknowledged.
    pub fn outbox_docs(&self) -> Result<Vec<DocId>, Error> {
        Ok(self.inner.store.outbox_docs()?)
    }

    /// The unacknowledged local changes of a document: (journal seq, change bytes), in order.
    pub fn outbox(&self, id: &DocId) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        Ok(self.inner.store.outbox(id)?)
    }

    /// Update a document's metadata through `f` and persist it durably, keeping the loaded
    /// copy in step.
    fn update_meta<T>(
        &self,
        id: &DocId,
        f: impl FnOnce(&Store, &mut DocMeta) -> Result<T, StoreError>,
    ) -> Result<T, Error> {
        // Always under the document's lock, or with it out of the cache under its stripe lock
        // (which loading takes too): a read-modify-write of the metadata racing a local write
        // would put back an old `next_seq` (and the next write would reuse a seq).
        let entry = {
            let _loading = self.loading(id);
            match self.cached(id) {
                Some(e) => e,
                // Not loaded, and nobody loads it while `_loading` is held: the stored
                // metadata is the truth, and the document need not be read (a relay's acks
                // come for documents that may have left the cache long before).
                None => {
                    let mut meta = self.inner.store.meta(id)?.ok_or(Error::NotFound(*id))?;
                    if let Some(reason) = meta.quarantined.clone() {
                        return Err(StoreError::Quarantined { doc: *id, reason }.into());
                    }
                    return Ok(f(&self.inner.store, &mut meta)?);
                }
            }
        };
        let mut l = lock(&entry);
        let mut meta = l.meta.clone();
        let r = f(&self.inner.store, &mut meta)?;
        l.meta = meta;
        Ok(r)
    }

    /// A relay acknowledged these journal seqs of `id`: they leave the outbox (durably).
    pub fn ack(&self, id: &DocId, seqs: &[u64]) -> Result<(), Error> {
        self.update_meta(id, |store, meta| store.ack(id, meta, seqs))?;
        self.emit_status(id);
        Ok(())
    }

    /// Remember the last relay log seq applied to `id` (durable on return).
    pub fn set_relay_seq(&self, id: &DocId, seq: u64) -> Result<(), Error> {
        self.update_meta(id, |store, meta| {
            meta.relay_seq = seq;
            store.put_meta(id, meta)
        })
    }

    /// Apply a saved document (a relay's snapshot) as remote changes.
    pub fn apply_snapshot(
        &self,
        id: &DocId,
        namespace: &str,
        bytes: &[u8],
    ) -> Result<Applied, Error> {
        if bytes.len() > MAX_IMPORT_BYTES {
            return Err(Error::InvalidData(format!(
                "a snapshot of {} bytes is over the limit",
                bytes.len()
            )));
        }
        let doc = guarded(|| Automerge::load(bytes).map_err(|e| e.to_string()))
            .map_err(|e| Error::InvalidData(format!("snapshot: {e}")))?;
        let changes: Vec<Vec<u8>> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        self.apply_remote(id, namespace, &changes)
    }

    /// Metadata of a document (namespace, pending count, relay cursor...).
    pub fn meta(&self, id: &DocId) -> Result<DocMeta, Error> {
        if let Some(e) = self.cached(id) {
            return Ok(lock(&e).meta.clone());
        }
        self.inner.store.meta(id)?.ok_or(Error::NotFound(*id))
    }
}

/// What [`Repo::apply_remote`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes now part of the document (and durable).
    pub applied: usize,
    /// Changes that could not apply because changes they depend on are missing.
    pub missing_deps: usize,
}

fn check_name(what: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(EntityError::InvalidValue {
            field: what.into(),
            reason: format!("'{s}' is not a valid {what} name (1-128 printable characters)"),
        }
        .into());
    }
    Ok(())
}

/// The longest type name kept in metadata: `_type` comes from peers and files, and metadata
/// must stay within one 4 KiB value.
const MAX_META_TYPE: usize = 128;

fn refresh_meta(meta: &mut DocMeta, doc: &Automerge, schema: Option<&Schema>) {
    let view = View::new(doc, schema);
    meta.ty = view
        .entity_type()
        .unwrap_or_default()
        .chars()
        .take(MAX_META_TYPE)
        .collect();
    meta.schema = view.schema_version();
    meta.deleted = view.is_deleted();
    meta.heads = doc.get_heads().iter().map(|h| h.0).collect();
}

fn entity(id: &DocId, l: &Loaded, schema: Option<&Schema>) -> Entity {
    let view = View::new(&l.doc, schema);
    Entity {
        id: *id,
        ty: view.entity_type().unwrap_or_default(),
        namespace: l.meta.namespace.clone(),
        schema: view.schema_version(),
        value: view.json(),
        conflicts: view.conflicts(false).into_iter().map(|c| c.field).collect(),
        deleted: view.is_deleted(),
        heads: hex_heads(&l.doc.get_heads()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn repo(author: &str, cache_docs: usize) -> Repo {
        let schema = Schema::from_toml(
            r#"
            version = 1
            [types.note]
            title = "critical"
            body = "text"
            "#,
        )
        .unwrap();
        let mut opts = RepoOptions::new(author).schema(schema);
        opts.cache_docs = cache_docs;
        Repo::with_store(Store::in_memory(), opts)
    }

    fn note(r: &Repo, title: &str) -> DocId {
        r.create("note", json!({"title": title, "body": "b"}))
            .unwrap()
    }

    /// Without counting as a use, unlike [`Repo::cached`].
    fn is_cached(r: &Repo, id: &DocId) -> bool {
        lock(&r.inner.docs).loaded.contains_key(id)
    }

    fn ack_all(r: &Repo, id: &DocId) {
        let seqs: Vec<u64> = r.outbox(id).unwrap().iter().map(|(s, _)| *s).collect();
        r.ack(id, &seqs).unwrap();
    }

    #[test]
    fn an_ack_of_a_document_out_of_the_cache_does_not_load_it() {
        let r = repo("alice", 2);
        let ids: Vec<DocId> = (0..6).map(|i| note(&r, &format!("n{i}"))).collect();
        let first = ids[0];
        assert!(
            !is_cached(&r, &first),
            "the least recently used leave first"
        );
        assert!(matches!(
            r.status(&first).unwrap(),
            DocStatus::Pending { changes: 1, .. }
        ));
        ack_all(&r, &first);
        r.set_relay_seq(&first, 7).unwrap();
        assert!(!is_cached(&r, &first), "the ack loaded the document");
        assert_eq!(r.status(&first).unwrap(), DocStatus::Synced);
        assert!(!is_cached(&r, &first), "the status loaded the document");
        let meta = r.meta(&first).unwrap();
        assert_eq!((meta.pending, meta.relay_seq), (0, 7));
        assert!(r.outbox(&first).unwrap().is_empty());
        // Loaded again, it carries what was written without it.
        r.change(&first, |tx| tx.set("title", "again")).unwrap();
        let meta = r.meta(&first).unwrap();
        assert_eq!((meta.pending, meta.relay_seq), (1, 7));
        assert_eq!(r.outbox(&first).unwrap().len(), 1);
    }

    #[test]
    fn a_conflicted_document_out_of_the_cache_keeps_its_status() {
        let (a, b) = (repo("alice", 2), repo("bob", 2));
        let id = note(&a, "t");
        let sync = |from: &Repo, to: &Repo| {
            to.apply_remote(&id, "default", &from.all_changes(&id).unwrap())
                .unwrap();
        };
        sync(&a, &b);
        a.change(&id, |tx| tx.set("title", "A")).unwrap();
        b.change(&id, |tx| tx.set("title", "B")).unwrap();
        sync(&b, &a);
        let conflict = DocStatus::Conflict {
            fields: vec!["title".into()],
        };
        assert_eq!(a.status(&id).unwrap(), conflict);
        for i in 0..2 {
            note(&a, &format!("other {i}"));
        }
        assert!(!is_cached(&a, &id), "the least recently used leave first");
        ack_all(&a, &id);
        assert_eq!(a.status(&id).unwrap(), conflict);
    }

    /// Acks racing the creation of the documents they ack (a relay can ack a document as soon
    /// as it is stored), through a cache of one: no ack is undone.
    #[test]
    fn acks_racing_creation_lose_nothing() {
        let r = repo("alice", 1);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let creator = {
            let (r, done) = (r.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..100 {
                    note(&r, &format!("n{i}"));
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let ack_outbox = || {
            for id in r.outbox_docs().unwrap() {
                ack_all(&r, &id);
            }
        };
        // Acks while the creator runs and one pass after it ended (bounded), then one more
        // for what is left if the bound came first.
        for _ in 0..100_000 {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            ack_outbox();
            if finished {
                break;
            }
        }
        creator.join().unwrap();
        ack_outbox();
        let docs = r.store().list().unwrap();
        assert_eq!(docs.len(), 100);
        for (id, stored) in docs {
            assert_eq!(stored.pending, 0, "stored metadata of {id}");
            assert_eq!(r.meta(&id).unwrap().pending, 0, "the loaded copy of {id}");
            assert_eq!(r.status(&id).unwrap(), DocStatus::Synced);
        }
    }

    /// Acks racing local changes while the cache of one document turns over on every call:
    /// every change keeps its own journal seq and the pending count stays the outbox's size.
    #[test]
    fn acks_racing_local_changes_through_a_tiny_cache_lose_nothing() {
        let r = repo("alice", 1);
        let docs = [note(&r, "a"), note(&r, "b")];
        let writer = {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    r.change(&docs[i % 2], |tx| tx.set("title", format!("t{i}")))
                        .unwrap();
                }
            })
        };
        for i in 0..400 {
            ack_all(&r, &docs[i % 2]);
        }
        writer.join().unwrap();
        for id in &docs {
            let meta = r.meta(id).unwrap();
            assert_eq!(meta.pending as usize, r.outbox(id).unwrap().len());
            // Seqs count from 1: one create and 100 changes, each its own.
            assert_eq!(meta.next_seq, 102);
            assert_eq!(r.all_changes(id).unwrap().len(), 101);
        }
    }
}
