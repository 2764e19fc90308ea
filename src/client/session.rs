//! [`ClientSession`]: the client's protocol state for one connection to a relay, sans-IO.
//!
//! The shell feeds it what arrives (`handle_message`), the passing of time (`handle_timeout`)
//! and local edits (`local_changed`); it answers with messages to send (`poll_transmit`) and the
//! next instant it wants to be woken (`poll_timeout`). It owns no socket, no clock and no task:
//! `now` is always a parameter. It does call the blocking [`Repo`] (reading the outbox,
//! applying pages, persisting cursors), so the shell runs it on the blocking pool.
//!
//! Not here: sockets, timers, reconnecting (the shell), the wire encoding (`transport::codec`).
//!
//! What it persists, with `Store::sync_put`:
//! - [`RELAY_ID_KEY`] (`relay_id`, 16 bytes): the relay identity the document cursors belong to.
//!   Written on the first connection, and after a relay identity change only once every
//!   document's re-pushed history is acknowledged, so a crash midway repeats the re-push.
//! - [`feed_key`] (`feed/<relay id hex>/<namespace>`, u64 big-endian): the feed cursor. Keyed by
//!   relay identity, so a new identity starts every feed from 0 by construction. Written only
//!   once every document of the page (and of the pages before it) is pulled.
//!
//! Per-document cursors are the documents' `relay_seq` (`Repo::set_relay_seq`), always written
//! after the changes they cover are applied. So every write here is "apply, then cursor": a
//! crash at any point makes the client pull again, never skip.
//!
//! Bounds: at most `max_pulls_in_flight` pulls and `max_pushes_in_flight` push batches in flight
//! (one batch per document); the next feed page is asked for only while fewer than
//! `max_queued_pulls` documents wait to be pulled; snapshot reassembly holds at most
//! `max_snapshot_bytes`; every queue is deduplicated by document.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::ids::DocId;
use crate::repo::{Direction, Event, Repo};
use crate::store::StoreError;
use crate::transport::codec::MAX_FRAME_CEILING;
use crate::transport::{
    ClientMsg, ErrorCode, FeedCursor, FeedEntry, Limits, RelayMsg, ALL_NAMESPACES,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

use super::SyncError;

/// The sync key holding the relay identity the document cursors belong to.
pub const RELAY_ID_KEY: &str = "relay_id";

/// The sync key holding the feed cursor of `namespace` for the relay identity `relay`.
pub fn feed_key(relay: &[u8; 16], namespace: &str) -> String {
    format!("feed/{}/{namespace}", hex::encode(relay))
}

/// A push frame's bytes besides its changes, at most: variant, namespace length, document id,
/// batch number and change count (varints of up to 9 bytes).
const PUSH_OVERHEAD: usize = 1 + 9 + 16 + 9 + 9;
/// The most bytes a change's length prefix takes.
const VARINT_MAX: usize = 9;
/// A relay that announces frames smaller than this cannot carry a useful push.
const MIN_FRAME: u64 = 1024;
/// Messages waiting in `out` beyond which a relay's `Ping` is not answered: a relay that floods
/// pings must not grow our queue.
const MAX_OUT: usize = 4096;
/// Issues kept for [`ClientSession::poll_issue`]; older ones are dropped (parked documents
/// stay listed in [`ClientSession::parked`]).
const MAX_ISSUES: usize = 256;
/// Own acknowledged seqs remembered per document to step the cursor over; past this the
/// client just pulls its own changes back (harmless).
const MAX_OWN_SEQS: usize = 65_536;
/// Peers (over all documents) whose presence is kept; more are ignored.
const MAX_PEERS: usize = 4096;
/// The longest a retried request waits.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Tunables of a session. The defaults suit a phone or a laptop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// `max_bytes` of every pull (the relay may lower it).
    pub max_pull_bytes: u64,
    /// Send a `Ping` when nothing was sent or received for this long.
    pub ping_every: Duration,
    /// The connection is dead when nothing arrives this long after a `Ping` (or after
    /// connecting, for the relay's hello).
    pub dead_after: Duration,
    /// Push batches awaiting an answer, at most (one per document).
    pub max_pushes_in_flight: usize,
    /// Pulls awaiting their last page, at most.
    pub max_pulls_in_flight: usize,
    /// The next feed page is requested only while fewer documents than this wait to be pulled.
    pub max_queued_pulls: usize,
    /// Snapshot bytes being reassembled, at most, over all documents.
    pub max_snapshot_bytes: usize,
    /// First delay before retrying a request the relay answered `RateLimited` or `Internal`;
    /// it doubles per retry of the same document, up to a minute.
    pub retry_after: Duration,
    /// Another device's presence is dropped when nothing of it was heard for this long; this
    /// device repeats its own every third of it.
    pub presence_ttl: Duration,
    /// At most one presence update per document is sent per this interval (the latest wins).
    pub presence_interval: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_pull_bytes: 1 << 20,
            ping_every: Duration::from_secs(15),
            dead_after: Duration::from_secs(30),
            max_pushes_in_flight: 8,
            max_pulls_in_flight: 8,
            max_queued_pulls: 4096,
            max_snapshot_bytes: crate::repo::MAX_IMPORT_BYTES,
            retry_after: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(30),
            presence_interval: Duration::from_millis(50),
        }
    }
}

/// Something that went wrong with one document (or one request) without ending the session.
/// A document with an issue is *parked*: the session leaves it alone until the next connection,
/// so a refusal is never retried in a hot loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocIssue {
    /// The document, when the problem is about one.
    pub doc: Option<DocId>,
    /// Whether it happened while pushing (upload) or pulling (download).
    pub direction: Direction,
    /// The relay's error code, or `None` when the client itself gave up (a change too large
    /// for the relay's limits, bytes that do not apply, a local store problem).
    pub code: Option<ErrorCode>,
    /// For people and logs.
    pub message: String,
}

/// What a session has moved so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Documents with at least one acknowledged push batch.
    pub docs_pushed: u64,
    /// Documents that received at least one new change or snapshot.
    pub docs_pulled: u64,
    /// Changes acknowledged by the relay (duplicates included).
    pub changes_pushed: u64,
    /// Changes newly applied from the relay.
    pub changes_pulled: u64,
    /// Bytes of acknowledged changes.
    pub bytes_pushed: u64,
    /// Bytes of changes and snapshots received for pulls.
    pub bytes_pulled: u64,
    /// `Push` messages sent.
    pub pushes: u64,
    /// `Pull` messages sent.
    pub pulls: u64,
}

/// What the relay's hello told us.
struct RelayInfo {
    write: BTreeSet<String>,
    /// The hello's `write` held `*`: every namespace is writable, even one the relay has not
    /// seen yet.
    write_all: bool,
    limits: Limits,
    max_frame: usize,
}

impl RelayInfo {
    fn may_write(&self, ns: &str) -> bool {
        self.write_all || self.write.contains(ns)
    }
}

/// One namespace's catalog feed.
struct Feed {
    key: String,
    /// The cursor last persisted (or the one we started from).
    persisted: u64,
    /// A page is on its way.
    requested: bool,
    /// `more` was true: the position to ask from, once the pull queue has room.
    next: Option<u64>,
    /// The relay answers our hello's cursor for this namespace with a page that belongs to the
    /// old relay identity; it is dropped.
    discard_hello_page: bool,
    /// Pages whose cursor waits for their documents to be pulled, in feed order.
    pages: VecDeque<Page>,
    /// A document of a page was given up on: no cursor of this namespace is persisted for the
    /// rest of the connection, so the next one looks at it again.
    tainted: bool,
}

struct Page {
    cursor: u64,
    waiting: BTreeSet<DocId>,
}

#[derive(Default)]
struct Pulls {
    queue: VecDeque<DocId>,
    queued: HashSet<DocId>,
    /// The highest seq the relay is known to hold, per document being pulled.
    want: HashMap<DocId, u64>,
    in_flight: HashMap<DocId, PullInFlight>,
}

struct PullInFlight {
    /// The `after` of the request whose answer is awaited.
    after: u64,
    /// The cursor moved during this round of pages.
    progressed: bool,
    /// A higher `want` became known while this pull was running.
    again: bool,
    done: u64,
    total: u64,
    reported: bool,
}

enum BatchKind {
    /// Outbox entries, by journal seq.
    Outbox(Vec<u64>),
    /// History changes up to (not including) this index.
    History(usize),
}

struct Batch {
    doc: DocId,
    kind: BatchKind,
    count: usize,
    bytes: u64,
}

/// A document's whole history being pushed (after `NeedHistory` or a new relay identity).
struct History {
    changes: Vec<Vec<u8>>,
    /// Outbox entries when it started: all of them are in `changes`, so they are acknowledged
    /// when the last history batch is.
    covers: Vec<u64>,
    sent: usize,
}

#[derive(Default)]
struct Pushes {
    queue: VecDeque<DocId>,
    queued: HashSet<DocId>,
    in_flight: HashMap<u64, Batch>,
    busy: HashSet<DocId>,
    history_wanted: HashSet<DocId>,
    history: HashMap<DocId, History>,
    /// Per-document changes-per-push ceiling, lowered when the relay says `TooLarge`.
    cap: HashMap<DocId, usize>,
    next_batch: u64,
    /// Relay seqs of our own acknowledged changes above the document's cursor.
    own: HashMap<DocId, BTreeSet<u64>>,
}

struct Repush {
    relay_id: [u8; 16],
    remaining: HashSet<DocId>,
}

struct Assembly {
    namespace: String,
    upto: u64,
    chunks: u32,
    next: u32,
    bytes: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Push(DocId),
    Pull(DocId),
}

struct Heartbeat {
    last_sent: Instant,
    last_recv: Instant,
    ping: Option<Instant>,
    nonce: u64,
}

/// Bytes and changes done of a total, for `Event::Progress`; all only grow within one burst
/// of transfers.
#[derive(Default)]
struct Progress {
    done: u64,
    total: u64,
    changes_done: u64,
    changes_total: u64,
}

impl Progress {
    fn grow(&mut self, done: u64, total: u64) {
        self.done = self.done.saturating_add(done);
        self.total = self.total.saturating_add(total).max(self.done);
    }

    fn grow_changes(&mut self, done: u64, total: u64) {
        self.changes_done = self.changes_done.saturating_add(done);
        self.changes_total = self
            .changes_total
            .saturating_add(total)
            .max(self.changes_done);
    }

    fn event(&self, direction: Direction) -> Event {
        Event::Progress {
            direction,
            changes_done: self.changes_done,
            changes_total: self.changes_total,
            bytes_done: self.done,
            bytes_total: self.total,
        }
    }
}

/// The protocol state of one connection. See the module docs.
///
/// ```
/// use std::time::Instant;
/// use tandem::client::{ClientSession, SessionConfig};
/// use tandem::transport::ClientMsg;
/// use tandem::{Repo, Schema};
///
/// let repo = Repo::in_memory(Schema::from_toml("version = 1").unwrap(), "ada").unwrap();
/// let mut session = ClientSession::new(Instant::now(), &repo, SessionConfig::default()).unwrap();
/// // The first frame is always the hello.
/// assert!(matches!(session.poll_transmit(), Some(ClientMsg::Hello { .. })));
/// assert!(!session.is_synced());
/// ```
pub struct ClientSession {
    cfg: SessionConfig,
    now: Instant,
    started: Instant,
    closed: bool,
    stored_relay: Option<[u8; 16]>,
    hello_feeds: BTreeSet<String>,
    relay: Option<RelayInfo>,
    out: VecDeque<ClientMsg>,
    feeds: BTreeMap<String, Feed>,
    pulls: Pulls,
    pushes: Pushes,
    repush: Option<Repush>,
    snapshots: HashMap<DocId, Assembly>,
    snapshot_bytes: usize,
    parked: HashMap<DocId, DocIssue>,
    issues: VecDeque<DocIssue>,
    heartbeat: Heartbeat,
    retries: Vec<(Instant, Retry)>,
    retry_count: HashMap<DocId, u32>,
    /// Documents whose cursor was reset to 0 after changes missed their dependencies.
    repaired: HashSet<DocId>,
    download: Progress,
    upload: Progress,
    upload_counted: HashSet<DocId>,
    stats: SessionStats,
    pushed_docs: HashSet<DocId>,
    pulled_docs: HashSet<DocId>,
    presence: PresenceState,
}

/// The session's side of presence: what waits to be sent, and when each peer was last heard.
#[derive(Default)]
struct PresenceState {
    /// The next update to send per document (the latest replaces an unsent one).
    due: BTreeMap<DocId, Option<crate::transport::Presence>>,
    /// When an update of each document was last sent.
    sent: HashMap<DocId, Instant>,
    /// When everything this device announces is sent again; `None` until the hello.
    refresh_at: Option<Instant>,
    /// When each peer, per document, was last heard.
    heard: BTreeMap<(DocId, u64), Instant>,
}

impl ClientSession {
    /// A session for a connection opened at `now`. Queues the hello, with the feed cursors
    /// stored for the relay identity we last synced with.
    pub fn new(now: Instant, repo: &Repo, cfg: SessionConfig) -> Result<ClientSession, SyncError> {
        let stored_relay = repo
            .store()
            .sync_get(RELAY_ID_KEY)
            .map_err(Error::from)?
            .and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok());
        let mut feeds = Vec::new();
        if let Some(id) = &stored_relay {
            let namespaces: BTreeSet<String> = repo
                .list(None, true)?
                .into_iter()
                .map(|(_, m)| m.namespace)
                .collect();
            for ns in namespaces {
                if let Some(cursor) = read_cursor(repo, &feed_key(id, &ns))? {
                    feeds.push(FeedCursor {
                        namespace: ns,
                        cursor,
                    });
                }
            }
        }
        let hello_feeds = feeds.iter().map(|f| f.namespace.clone()).collect();
        let mut out = VecDeque::new();
        out.push_back(ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            device: repo.device().0,
            feeds,
        });
        Ok(ClientSession {
            cfg,
            now,
            started: now,
            closed: false,
            stored_relay,
            hello_feeds,
            relay: None,
            out,
            feeds: BTreeMap::new(),
            pulls: Pulls::default(),
            pushes: Pushes {
                next_batch: 1,
                ..Pushes::default()
            },
            repush: None,
            snapshots: HashMap::new(),
            snapshot_bytes: 0,
            parked: HashMap::new(),
            issues: VecDeque::new(),
            heartbeat: Heartbeat {
                last_sent: now,
                last_recv: now,
                ping: None,
                nonce: 1,
            },
            retries: Vec::new(),
            retry_count: HashMap::new(),
            repaired: HashSet::new(),
            download: Progress::default(),
            upload: Progress::default(),
            upload_counted: HashSet::new(),
            stats: SessionStats::default(),
            pushed_docs: HashSet::new(),
            pulled_docs: HashSet::new(),
            presence: PresenceState::default(),
        })
    }

    /// Handle one message from the relay. An `Err` ends the session (the shell closes the
    /// connection); anything a relay sends yields at worst an error, never a panic.
    pub fn handle_message(
        &mut self,
        now: Instant,
        msg: RelayMsg,
        repo: &Repo,
    ) -> Result<(), SyncError> {
        self.step(now, repo, |s, repo| {
            // Any frame is proof of life.
            s.heartbeat.last_recv = now;
            s.heartbeat.ping = None;
            s.dispatch(msg, repo).and_then(|()| s.pump(repo))
        })
    }

    /// Every input goes through here: nothing happens after the session ended, and an error
    /// ends it.
    fn step(
        &mut self,
        now: Instant,
        repo: &Repo,
        f: impl FnOnce(&mut Self, &Repo) -> Result<(), SyncError>,
    ) -> Result<(), SyncError> {
        if self.closed {
            return Ok(());
        }
        self.now = now;
        let result = f(self, repo);
        self.closed = result.is_err();
        result
    }

    /// Time passed: send a due ping, declare the connection dead, retry what waited. Call it
    /// when [`poll_timeout`](Self::poll_timeout) is reached (calling it early is harmless).
    pub fn handle_timeout(&mut self, now: Instant, repo: &Repo) -> Result<(), SyncError> {
        self.step(now, repo, |s, repo| {
            s.on_timeout().and_then(|()| s.pump(repo))
        })
    }

    /// A local change was made to `doc`: push it (now, or when the handshake is done).
    pub fn local_changed(
        &mut self,
        now: Instant,
        doc: DocId,
        repo: &Repo,
    ) -> Result<(), SyncError> {
        self.step(now, repo, |s, repo| {
            s.queue_push(doc);
            s.pump(repo)
        })
    }

    /// Look at every document with local changes again (after missing change events).
    pub fn rescan_outbox(&mut self, now: Instant, repo: &Repo) -> Result<(), SyncError> {
        self.step(now, repo, |s, repo| {
            for doc in repo.outbox_docs()? {
                s.queue_push(doc);
            }
            s.pump(repo)
        })
    }

    /// This device's presence changed ([`Repo::set_presence`]): send the updates (now, or once
    /// the per-document interval has passed).
    pub fn presence_changed(&mut self, now: Instant, repo: &Repo) -> Result<(), SyncError> {
        self.step(now, repo, |s, repo| {
            for (doc, state) in repo.take_presence_changes() {
                s.presence.due.insert(doc, state);
            }
            s.pump(repo)
        })
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<ClientMsg> {
        let msg = self.out.pop_front()?;
        self.heartbeat.last_sent = self.now;
        Some(msg)
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to be called; `None` once the
    /// session has ended.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let hb = &self.heartbeat;
        let mut at = if self.relay.is_none() {
            self.started + self.cfg.dead_after
        } else if let Some(sent) = hb.ping {
            sent + self.cfg.dead_after
        } else {
            hb.last_sent.min(hb.last_recv) + self.cfg.ping_every
        };
        for (due, _) in &self.retries {
            at = at.min(*due);
        }
        let p = &self.presence;
        if let Some(r) = p.refresh_at {
            at = at.min(r);
        }
        for doc in p.due.keys() {
            if let Some(sent) = p.sent.get(doc) {
                at = at.min(*sent + self.cfg.presence_interval);
            }
        }
        if let Some(heard) = p.heard.values().min() {
            at = at.min(*heard + self.cfg.presence_ttl);
        }
        Some(at)
    }

    /// Whether everything is in step: the handshake is done, nothing waits to be pushed or is
    /// in flight, every feed was read to its end (`more == false`) with its cursor persisted,
    /// and no pull is queued or running. Parked documents (see [`parked`](Self::parked)) are
    /// left out: they wait for the next connection.
    pub fn is_synced(&self) -> bool {
        let p = &self.pushes;
        !self.closed
            && self.relay.is_some()
            && p.queue.is_empty()
            && p.in_flight.is_empty()
            && p.history.is_empty()
            && p.history_wanted.is_empty()
            && self.pulls.queue.is_empty()
            && self.pulls.in_flight.is_empty()
            && self.snapshots.is_empty()
            && self.retries.is_empty()
            && self.repush.is_none()
            && self
                .feeds
                .values()
                .all(|f| !f.requested && f.next.is_none() && f.pages.is_empty())
    }

    /// Whether the relay's hello was accepted.
    pub fn is_ready(&self) -> bool {
        self.relay.is_some() && !self.closed
    }

    /// The largest frame either side may send on this connection.
    pub fn max_frame(&self) -> usize {
        self.relay
            .as_ref()
            .map_or(DEFAULT_MAX_FRAME, |r| r.max_frame)
    }

    /// The next issue to report (log, show), oldest first.
    pub fn poll_issue(&mut self) -> Option<DocIssue> {
        self.issues.pop_front()
    }

    /// Documents given up on for this connection, with why.
    pub fn parked(&self) -> impl Iterator<Item = &DocIssue> {
        self.parked.values()
    }

    /// When local changes could not be pushed because the token may not write them: the
    /// refusal to report (a one-shot sync fails with it, exit code 5).
    pub fn refusal(&self) -> Option<SyncError> {
        let refused: Vec<&DocIssue> = self
            .parked
            .values()
            .filter(|i| i.direction == Direction::Upload && i.code == Some(ErrorCode::Forbidden))
            .collect();
        let first = refused.first()?;
        Some(SyncError::Refused {
            code: ErrorCode::Forbidden,
            message: format!(
                "{} document(s) have local changes the relay refused to take (first: {})",
                refused.len(),
                first.message
            ),
        })
    }

    /// What moved so far.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            docs_pushed: self.pushed_docs.len() as u64,
            docs_pulled: self.pulled_docs.len() as u64,
            ..self.stats.clone()
        }
    }

    // ---- inputs -------------------------------------------------------------------------

    fn dispatch(&mut self, msg: RelayMsg, repo: &Repo) -> Result<(), SyncError> {
        match msg {
            RelayMsg::Hello {
                version,
                relay_id,
                subject,
                read,
                write,
                limits,
            } => self.on_hello(repo, version, relay_id, subject, read, write, limits),
            RelayMsg::Error {
                code,
                message,
                doc,
                batch,
            } => self.on_error(repo, code, message, doc, batch),
            RelayMsg::Ping { nonce } => {
                if self.out.len() < MAX_OUT {
                    self.out.push_back(ClientMsg::Pong { nonce });
                }
                Ok(())
            }
            RelayMsg::Pong { .. } => Ok(()),
            other if self.relay.is_none() => Err(SyncError::Protocol(format!(
                "the relay sent {} before its hello",
                msg_name(&other)
            ))),
            RelayMsg::Feed {
                namespace,
                entries,
                next_cursor,
                more,
            } => self.on_feed(repo, namespace, entries, next_cursor, more),
            RelayMsg::Changes {
                doc,
                namespace,
                from,
                to,
                changes,
                more,
                remaining_bytes,
            } => self.on_changes(
                repo,
                doc,
                &namespace,
                from,
                to,
                &changes,
                more,
                remaining_bytes,
            ),
            RelayMsg::Snapshot {
                doc,
                namespace,
                upto,
                chunk,
                chunks,
                bytes,
            } => self.on_snapshot(repo, doc, namespace, upto, chunk, chunks, bytes),
            RelayMsg::Ack { doc, batch, seqs } => self.on_ack(repo, doc, batch, &seqs),
            RelayMsg::NeedHistory { doc, batch } => self.on_need_history(repo, doc, batch),
            RelayMsg::Presence { doc, peer, state } => {
                let known = self.presence.heard.contains_key(&(doc, peer));
                if state.is_some() && !known && self.presence.heard.len() >= MAX_PEERS {
                    // A relay that names too many peers: the rest go unseen.
                    return Ok(());
                }
                match &state {
                    Some(_) => self.presence.heard.insert((doc, peer), self.now),
                    None => self.presence.heard.remove(&(doc, peer)),
                };
                repo.put_peer(&doc, peer, state);
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_hello(
        &mut self,
        repo: &Repo,
        version: u32,
        relay_id: [u8; 16],
        subject: String,
        read: Vec<String>,
        write: Vec<String>,
        limits: Limits,
    ) -> Result<(), SyncError> {
        if self.relay.is_some() {
            return Err(SyncError::Protocol("the relay sent a second hello".into()));
        }
        if version != PROTOCOL_VERSION {
            return Err(SyncError::Refused {
                code: ErrorCode::UnsupportedVersion,
                message: format!(
                    "the relay speaks tandem/{version}, this client tandem/{PROTOCOL_VERSION}; \
                     upgrade the older one"
                ),
            });
        }
        if limits.max_frame_bytes < MIN_FRAME
            || limits.max_changes_per_push == 0
            || limits.max_change_bytes == 0
        {
            return Err(SyncError::Protocol(format!(
                "the relay announced unusable limits {limits:?}"
            )));
        }
        if read.is_empty() && write.is_empty() {
            return Err(SyncError::Refused {
                code: ErrorCode::Forbidden,
                message: format!("the token (subject '{subject}') grants no namespace"),
            });
        }
        // Write implies read, whatever the relay listed. `*` is not a namespace with a feed:
        // the relay lists the ones it has next to it.
        let readable: BTreeSet<String> = read
            .into_iter()
            .chain(write.iter().cloned())
            .filter(|ns| ns != ALL_NAMESPACES)
            .collect();
        let max_frame = limits.max_frame_bytes.min(MAX_FRAME_CEILING as u64) as usize;
        let same = match self.stored_relay {
            None => {
                // The first relay this store talks to: nothing to reset.
                put(repo, RELAY_ID_KEY, &relay_id)?;
                self.stored_relay = Some(relay_id);
                true
            }
            Some(old) => old == relay_id,
        };
        self.relay = Some(RelayInfo {
            write_all: write.iter().any(|ns| ns == ALL_NAMESPACES),
            write: write.into_iter().collect(),
            limits,
            max_frame,
        });
        if !same {
            tracing::warn!(
                relay = %hex::encode(relay_id),
                "the relay's identity changed (its data was wiped or replaced): \
                 resetting cursors and pushing every document's history"
            );
            self.start_repush(repo, relay_id)?;
        }
        for ns in readable {
            let key = feed_key(&relay_id, &ns);
            let in_hello = self.hello_feeds.contains(&ns);
            let mut feed = Feed {
                key,
                persisted: 0,
                requested: true,
                next: None,
                discard_hello_page: in_hello && !same,
                pages: VecDeque::new(),
                tainted: false,
            };
            if same {
                feed.persisted = read_cursor(repo, &feed.key)?.unwrap_or(0);
            }
            if !(same && in_hello) {
                // Not answered by the relay's hello pages: ask, from the stored cursor (same
                // identity) or from the start (a new one).
                self.out.push_back(ClientMsg::FeedMore {
                    namespace: ns.clone(),
                    after: feed.persisted,
                });
            }
            self.feeds.insert(ns, feed);
        }
        for doc in repo.outbox_docs()? {
            self.queue_push(doc);
        }
        Ok(())
    }

    /// A new relay identity: every document cursor goes back to 0 and every document we may
    /// write is pushed whole (feed cursors are keyed by identity, so they start at 0 already).
    fn start_repush(&mut self, repo: &Repo, relay_id: [u8; 16]) -> Result<(), SyncError> {
        let mut remaining = HashSet::new();
        for (doc, meta) in repo.list(None, true)? {
            if meta.quarantined.is_some() {
                continue;
            }
            if meta.relay_seq != 0 {
                if let Err(e) = repo.set_relay_seq(&doc, 0) {
                    self.doc_failed(repo, doc, Direction::Download, e)?;
                    continue;
                }
            }
            // Documents of namespaces this token cannot write are left to a device that can.
            if self
                .relay
                .as_ref()
                .is_some_and(|r| r.may_write(&meta.namespace))
            {
                self.pushes.history_wanted.insert(doc);
                remaining.insert(doc);
                self.queue_push(doc);
            }
        }
        self.repush = Some(Repush {
            relay_id,
            remaining,
        });
        Ok(())
    }

    fn on_feed(
        &mut self,
        repo: &Repo,
        ns: String,
        entries: Vec<FeedEntry>,
        next_cursor: u64,
        more: bool,
    ) -> Result<(), SyncError> {
        let Some(feed) = self.feeds.get_mut(&ns) else {
            tracing::debug!(namespace = %ns, "ignoring a feed page nobody asked for");
            return Ok(());
        };
        if feed.discard_hello_page {
            feed.discard_hello_page = false;
            return Ok(());
        }
        feed.requested = false;
        let mut waiting = BTreeSet::new();
        let mut tainted = false;
        for FeedEntry { doc, seq } in entries {
            if self.parked.contains_key(&doc) {
                tainted = true;
                continue;
            }
            match self.cursor(repo, doc)? {
                Some(c) if seq > c => {
                    self.want_pull(doc, seq);
                    waiting.insert(doc);
                    // The feed tells how many changes are coming before any arrives.
                    self.download.grow_changes(0, seq - c);
                }
                Some(_) => {}
                None => tainted = true,
            }
        }
        if let Some(feed) = self.feeds.get_mut(&ns) {
            feed.tainted |= tainted;
            feed.pages.push_back(Page {
                cursor: next_cursor,
                waiting,
            });
            feed.next = more.then_some(next_cursor);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_changes(
        &mut self,
        repo: &Repo,
        doc: DocId,
        ns: &str,
        from: u64,
        to: u64,
        changes: &[Vec<u8>],
        more: bool,
        remaining: u64,
    ) -> Result<(), SyncError> {
        let n = changes.len() as u64;
        // `to = from + n - 1`, without trusting either to stay in range.
        if from == 0 || u128::from(from) + u128::from(n) != u128::from(to) + 1 {
            return Err(SyncError::Protocol(format!(
                "Changes {from}..={to} of {doc} carries {n} changes"
            )));
        }
        if self.parked.contains_key(&doc) {
            return Ok(());
        }
        let ours = self
            .pulls
            .in_flight
            .get(&doc)
            .is_some_and(|p| p.after.checked_add(1) == Some(from));
        let Some(c) = self.cursor(repo, doc)? else {
            return Ok(());
        };
        if from > c.saturating_add(1) {
            // A gap: a missed message, or our own changes the relay does not echo.
            self.want_pull(doc, to);
            return Ok(());
        }
        let bytes: u64 = changes.iter().map(|c| c.len() as u64).sum();
        let skip = usize::try_from(c.saturating_add(1) - from).unwrap_or(usize::MAX);
        let fresh = changes.get(skip..).unwrap_or(&[]);
        if !fresh.is_empty() {
            if ns.is_empty() {
                return Err(SyncError::Protocol(format!(
                    "Changes of {doc} with no namespace"
                )));
            }
            match repo.apply_remote(&doc, ns, fresh) {
                Ok(applied) if applied.missing_deps > 0 => {
                    return self.repair_cursor(repo, doc);
                }
                Ok(applied) => {
                    self.stats.changes_pulled += applied.applied as u64;
                    self.download.grow_changes(fresh.len() as u64, 0);
                    if applied.applied > 0 {
                        self.pulled_docs.insert(doc);
                    }
                }
                Err(e) => return self.doc_failed(repo, doc, Direction::Download, e),
            }
        }
        let mut cursor = c;
        if to > c {
            match self.advance_cursor(repo, doc, to)? {
                Some(now) => cursor = now,
                None => return Ok(()),
            }
        }
        if !ours {
            if more {
                self.want_pull(doc, to.saturating_add(1));
            }
            return Ok(());
        }
        self.stats.bytes_pulled += bytes;
        let Some(pull) = self.pulls.in_flight.get_mut(&doc) else {
            return Ok(());
        };
        pull.progressed |= cursor > pull.after;
        pull.done = pull.done.saturating_add(bytes);
        let total = pull
            .total
            .max(pull.done.saturating_add(if more { remaining } else { 0 }));
        self.download.grow(bytes, total - pull.total);
        pull.total = total;
        repo.emit(self.download.event(Direction::Download));
        if more {
            pull.reported = true;
            repo.set_progress(&doc, Some((pull.done, pull.total)));
            pull.after = cursor;
            self.out.push_back(ClientMsg::Pull {
                doc,
                after: cursor,
                max_bytes: self.cfg.max_pull_bytes,
            });
            self.stats.pulls += 1;
        } else {
            self.finish_pull(repo, doc, cursor);
        }
        Ok(())
    }

    /// A pull's last page arrived. Pull again if the relay is known to hold more and this
    /// round got somewhere (or learned of more); otherwise the pull is done.
    fn finish_pull(&mut self, repo: &Repo, doc: DocId, cursor: u64) {
        let want = self.pulls.want.get(&doc).copied().unwrap_or(0);
        if let Some(pull) = self.pulls.in_flight.get_mut(&doc) {
            if cursor < want && (pull.progressed || pull.again) {
                pull.progressed = false;
                pull.again = false;
                pull.after = cursor;
                self.out.push_back(ClientMsg::Pull {
                    doc,
                    after: cursor,
                    max_bytes: self.cfg.max_pull_bytes,
                });
                self.stats.pulls += 1;
                return;
            }
        }
        self.end_pull(repo, doc);
    }

    fn end_pull(&mut self, repo: &Repo, doc: DocId) {
        self.pulls.want.remove(&doc);
        if let Some(pull) = self.pulls.in_flight.remove(&doc) {
            if pull.reported {
                repo.set_progress(&doc, None);
            }
        }
        for feed in self.feeds.values_mut() {
            for page in &mut feed.pages {
                page.waiting.remove(&doc);
            }
        }
    }

    /// Changes of a page did not apply for want of their dependencies: the cursor says we
    /// hold what we do not (a local store restored from an old copy, say). Pull the document
    /// from the start, once per connection; a second time, give up on it.
    fn repair_cursor(&mut self, repo: &Repo, doc: DocId) -> Result<(), SyncError> {
        if !self.repaired.insert(doc) {
            self.park(
                repo,
                doc,
                Direction::Download,
                None,
                "changes from the relay still miss dependencies after pulling the whole document"
                    .into(),
            );
            return Ok(());
        }
        if let Err(e) = repo.set_relay_seq(&doc, 0) {
            return self.doc_failed(repo, doc, Direction::Download, e);
        }
        self.pushes.own.remove(&doc);
        self.snapshots_drop(doc);
        if let Some(pull) = self.pulls.in_flight.get_mut(&doc) {
            pull.after = 0;
            pull.progressed = false;
            pull.again = false;
            self.out.push_back(ClientMsg::Pull {
                doc,
                after: 0,
                max_bytes: self.cfg.max_pull_bytes,
            });
            self.stats.pulls += 1;
        } else if self.pulls.queued.insert(doc) {
            self.pulls.queue.push_back(doc);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_snapshot(
        &mut self,
        repo: &Repo,
        doc: DocId,
        namespace: String,
        upto: u64,
        chunk: u32,
        chunks: u32,
        bytes: Vec<u8>,
    ) -> Result<(), SyncError> {
        if chunks == 0 || chunk >= chunks {
            return Err(SyncError::Protocol(format!(
                "snapshot chunk {chunk} of {chunks} for {doc}"
            )));
        }
        // Snapshots only answer our pulls.
        if self.parked.contains_key(&doc) || !self.pulls.in_flight.contains_key(&doc) {
            return Ok(());
        }
        if chunk == 0 {
            self.snapshots_drop(doc);
            self.snapshots.insert(
                doc,
                Assembly {
                    namespace,
                    upto,
                    chunks,
                    next: 0,
                    bytes: Vec::new(),
                },
            );
        }
        let Some(a) = self.snapshots.get(&doc) else {
            // A chunk without its start: wait for a restart (or pull again on the gap).
            return Ok(());
        };
        if a.next != chunk || a.upto != upto || a.chunks != chunks {
            self.snapshots_drop(doc);
            return Ok(());
        }
        if self.snapshot_bytes.saturating_add(bytes.len()) > self.cfg.max_snapshot_bytes {
            self.park(
                repo,
                doc,
                Direction::Download,
                None,
                format!(
                    "the relay's snapshot is larger than the {} bytes this client reassembles",
                    self.cfg.max_snapshot_bytes
                ),
            );
            return Ok(());
        }
        self.snapshot_bytes += bytes.len();
        self.stats.bytes_pulled += bytes.len() as u64;
        self.download.grow(bytes.len() as u64, 0);
        let Some(a) = self.snapshots.get_mut(&doc) else {
            return Ok(());
        };
        a.bytes.extend_from_slice(&bytes);
        a.next += 1;
        if a.next < a.chunks {
            return Ok(());
        }
        let Some(a) = self.snapshots.remove(&doc) else {
            return Ok(());
        };
        self.snapshot_bytes -= a.bytes.len();
        match repo.apply_snapshot(&doc, &a.namespace, &a.bytes) {
            Ok(applied) => {
                self.stats.changes_pulled += applied.applied as u64;
                if applied.applied > 0 {
                    self.pulled_docs.insert(doc);
                }
            }
            Err(e) => return self.doc_failed(repo, doc, Direction::Download, e),
        }
        let Some(c) = self.cursor(repo, doc)? else {
            return Ok(());
        };
        let cursor = if a.upto > c {
            match self.advance_cursor(repo, doc, a.upto)? {
                Some(now) => now,
                None => return Ok(()),
            }
        } else {
            c
        };
        if let Some(pull) = self.pulls.in_flight.get_mut(&doc) {
            // The page that follows starts after the snapshot.
            pull.progressed |= cursor > pull.after;
            pull.after = pull.after.max(a.upto);
        }
        Ok(())
    }

    fn snapshots_drop(&mut self, doc: DocId) {
        if let Some(a) = self.snapshots.remove(&doc) {
            self.snapshot_bytes -= a.bytes.len();
        }
    }

    fn on_ack(
        &mut self,
        repo: &Repo,
        doc: DocId,
        batch: u64,
        seqs: &[u64],
    ) -> Result<(), SyncError> {
        let Some(b) = self.take_batch(doc, batch)? else {
            return Ok(());
        };
        if seqs.len() != b.count {
            return Err(SyncError::Protocol(format!(
                "the ack of batch {batch} has {} seqs for {} changes",
                seqs.len(),
                b.count
            )));
        }
        self.stats.changes_pushed += b.count as u64;
        self.stats.bytes_pushed += b.bytes;
        self.pushed_docs.insert(doc);
        self.retry_count.remove(&doc);
        self.upload.grow(b.bytes, 0);
        self.upload.grow_changes(b.count as u64, 0);
        repo.emit(self.upload.event(Direction::Upload));
        match b.kind {
            BatchKind::Outbox(journal) => {
                if let Err(e) = repo.ack(&doc, &journal) {
                    return self.doc_failed(repo, doc, Direction::Upload, e);
                }
            }
            BatchKind::History(end) => {
                let finished = self
                    .pushes
                    .history
                    .get(&doc)
                    .is_some_and(|h| end >= h.changes.len());
                if finished {
                    self.finish_history(repo, doc)?;
                }
            }
        }
        self.note_own_seqs(repo, doc, seqs)?;
        self.queue_push(doc);
        Ok(())
    }

    /// The relay will not echo our changes back: remember their seqs so the cursor can step
    /// over them instead of pulling them back.
    fn note_own_seqs(&mut self, repo: &Repo, doc: DocId, seqs: &[u64]) -> Result<(), SyncError> {
        let own = self.pushes.own.entry(doc).or_default();
        if own.len() + seqs.len() > MAX_OWN_SEQS {
            own.clear();
            return Ok(());
        }
        own.extend(seqs.iter().copied());
        let Some(c) = self.cursor(repo, doc)? else {
            return Ok(());
        };
        let next = c.checked_add(1);
        if self
            .pushes
            .own
            .get(&doc)
            .zip(next)
            .is_some_and(|(own, next)| own.contains(&next))
        {
            self.advance_cursor(repo, doc, c)?;
        }
        Ok(())
    }

    fn finish_history(&mut self, repo: &Repo, doc: DocId) -> Result<(), SyncError> {
        let Some(h) = self.pushes.history.remove(&doc) else {
            return Ok(());
        };
        if !h.covers.is_empty() {
            if let Err(e) = repo.ack(&doc, &h.covers) {
                return self.doc_failed(repo, doc, Direction::Upload, e);
            }
        }
        if let Some(r) = &mut self.repush {
            r.remaining.remove(&doc);
        }
        Ok(())
    }

    fn on_need_history(&mut self, repo: &Repo, doc: DocId, batch: u64) -> Result<(), SyncError> {
        let Some(b) = self.take_batch(doc, batch)? else {
            return Ok(());
        };
        match b.kind {
            BatchKind::History(_) => self.park(
                repo,
                doc,
                Direction::Upload,
                None,
                "the relay still lacks dependencies after the whole history was pushed".into(),
            ),
            BatchKind::Outbox(_) => {
                self.pushes.history_wanted.insert(doc);
                self.queue_push(doc);
            }
        }
        Ok(())
    }

    /// The in-flight batch an answer is about, checked against the document it names.
    fn take_batch(&mut self, doc: DocId, batch: u64) -> Result<Option<Batch>, SyncError> {
        let Some(b) = self.pushes.in_flight.remove(&batch) else {
            // An answer to a batch we gave up on (the document was parked): nothing to do.
            tracing::debug!(batch, "ignoring an answer to a batch not in flight");
            return Ok(None);
        };
        if b.doc != doc {
            return Err(SyncError::Protocol(format!(
                "the answer to batch {batch} names {doc}, the batch was for {}",
                b.doc
            )));
        }
        self.pushes.busy.remove(&doc);
        Ok(Some(b))
    }

    fn on_error(
        &mut self,
        repo: &Repo,
        code: ErrorCode,
        message: String,
        doc: Option<DocId>,
        batch: Option<u64>,
    ) -> Result<(), SyncError> {
        if code.is_fatal() {
            return Err(match code {
                ErrorCode::UnsupportedVersion | ErrorCode::Unauthorized => {
                    SyncError::Refused { code, message }
                }
                ErrorCode::Overloaded => {
                    SyncError::Unreachable(format!("the relay is overloaded: {message}"))
                }
                _ => SyncError::Protocol(format!("the relay reports {code:?}: {message}")),
            });
        }
        match (doc, batch) {
            (_, Some(batch)) => self.on_push_error(repo, code, message, batch),
            (Some(doc), None) => {
                if self.parked.contains_key(&doc) {
                    return Ok(());
                }
                // A pull (or its snapshot) was refused; the pull is over either way.
                self.snapshots_drop(doc);
                match code {
                    ErrorCode::RateLimited | ErrorCode::Internal => {
                        self.pulls.in_flight.remove(&doc);
                        self.retry_later(doc, Retry::Pull(doc));
                    }
                    _ => self.park(repo, doc, Direction::Download, Some(code), message),
                }
                Ok(())
            }
            (None, None) => match code {
                // A feed request we cannot tell apart from the others: start over later.
                ErrorCode::RateLimited | ErrorCode::Internal => Err(SyncError::Unreachable(
                    format!("the relay could not answer ({code:?}: {message}); retrying later"),
                )),
                // A namespace the token cannot read (a cursor kept from an older token):
                // nothing waits for it.
                _ => {
                    self.report(DocIssue {
                        doc: None,
                        direction: Direction::Download,
                        code: Some(code),
                        message,
                    });
                    Ok(())
                }
            },
        }
    }

    fn on_push_error(
        &mut self,
        repo: &Repo,
        code: ErrorCode,
        message: String,
        batch: u64,
    ) -> Result<(), SyncError> {
        let Some(b) = self.pushes.in_flight.remove(&batch) else {
            return Ok(());
        };
        let doc = b.doc;
        self.pushes.busy.remove(&doc);
        if let (BatchKind::History(end), Some(h)) = (&b.kind, self.pushes.history.get_mut(&doc)) {
            // Nothing of a refused batch is stored: send it again from its start.
            h.sent = end.saturating_sub(b.count);
        }
        match code {
            ErrorCode::TooLarge if b.count > 1 => {
                self.pushes.cap.insert(doc, (b.count / 2).max(1));
                self.queue_push(doc);
            }
            ErrorCode::RateLimited | ErrorCode::Internal => {
                self.retry_later(doc, Retry::Push(doc));
            }
            _ => self.park(repo, doc, Direction::Upload, Some(code), message),
        }
        Ok(())
    }

    fn on_timeout(&mut self) -> Result<(), SyncError> {
        let now = self.now;
        if self.relay.is_none() {
            if now >= self.started + self.cfg.dead_after {
                return Err(SyncError::Unreachable(format!(
                    "the relay sent no hello within {:?}",
                    self.cfg.dead_after
                )));
            }
            return Ok(());
        }
        let hb = &mut self.heartbeat;
        match hb.ping {
            Some(sent) if now >= sent + self.cfg.dead_after => {
                return Err(SyncError::Unreachable(format!(
                    "nothing from the relay for {:?} after a ping",
                    self.cfg.dead_after
                )));
            }
            Some(_) => {}
            None if now >= hb.last_sent.min(hb.last_recv) + self.cfg.ping_every => {
                self.out.push_back(ClientMsg::Ping { nonce: hb.nonce });
                hb.nonce = hb.nonce.wrapping_add(1);
                hb.ping = Some(now);
            }
            None => {}
        }
        let mut due = Vec::new();
        self.retries.retain(|(at, r)| {
            let ready = *at <= now;
            if ready {
                due.push(*r);
            }
            !ready
        });
        for r in due {
            match r {
                Retry::Push(doc) => self.queue_push(doc),
                Retry::Pull(doc) => {
                    let want = self.pulls.want.get(&doc).copied().unwrap_or(0);
                    self.want_pull(doc, want);
                }
            }
        }
        Ok(())
    }

    // ---- outputs ------------------------------------------------------------------------

    /// Presence: drop peers not heard within the TTL, repeat this device's announcements
    /// when due, and send the updates whose interval has passed.
    fn pump_presence(&mut self, repo: &Repo) {
        let now = self.now;
        let ttl = self.cfg.presence_ttl;
        let p = &mut self.presence;
        let expired: Vec<(DocId, u64)> = p
            .heard
            .iter()
            .filter(|(_, at)| **at + ttl <= now)
            .map(|(k, _)| *k)
            .collect();
        for (doc, peer) in expired {
            p.heard.remove(&(doc, peer));
            repo.put_peer(&doc, peer, None);
        }
        let local = repo.local_presence();
        if local.is_empty() {
            // Nothing to repeat: no timer.
            p.refresh_at = None;
        } else if p.refresh_at.is_none_or(|at| at <= now) {
            // The first time after the hello (a re-announce after reconnecting), then every
            // third of the TTL.
            for (doc, state) in local {
                p.due.entry(doc).or_insert(Some(state));
                // A repeat goes out now, whatever the interval says.
                p.sent.remove(&doc);
            }
            p.refresh_at = Some(now + ttl / 3);
        }
        let interval = self.cfg.presence_interval;
        let ready: Vec<DocId> = p
            .due
            .keys()
            .filter(|d| p.sent.get(d).is_none_or(|at| *at + interval <= now))
            .copied()
            .collect();
        let mut refused = Vec::new();
        for doc in ready {
            let Some(state) = p.due.remove(&doc) else {
                continue;
            };
            let Ok(meta) = repo.meta(&doc) else {
                continue;
            };
            if let Some(Err(m)) = state.as_ref().map(crate::transport::Presence::check) {
                // The relay would refuse it: say so here instead.
                refused.push(DocIssue {
                    doc: Some(doc),
                    direction: Direction::Upload,
                    code: None,
                    message: format!("presence not sent: {m}"),
                });
                continue;
            }
            p.sent.insert(doc, now);
            if self.out.len() < MAX_OUT {
                self.out.push_back(ClientMsg::Presence {
                    namespace: meta.namespace,
                    doc,
                    state,
                });
            }
        }
        for issue in refused {
            self.report(issue);
        }
    }

    /// Turn queued work into messages, within the in-flight bounds.
    fn pump(&mut self, repo: &Repo) -> Result<(), SyncError> {
        if self.relay.is_none() {
            return Ok(());
        }
        self.pump_presence(repo);
        if self.pulls.queue.len() < self.cfg.max_queued_pulls {
            for (ns, feed) in &mut self.feeds {
                if feed.requested {
                    continue;
                }
                if let Some(after) = feed.next.take() {
                    feed.requested = true;
                    self.out.push_back(ClientMsg::FeedMore {
                        namespace: ns.clone(),
                        after,
                    });
                }
            }
        }
        while self.pulls.in_flight.len() < self.cfg.max_pulls_in_flight {
            let Some(doc) = self.pulls.queue.pop_front() else {
                break;
            };
            self.pulls.queued.remove(&doc);
            if self.parked.contains_key(&doc) || self.pulls.in_flight.contains_key(&doc) {
                continue;
            }
            let Some(after) = self.cursor(repo, doc)? else {
                continue;
            };
            self.pulls.in_flight.insert(
                doc,
                PullInFlight {
                    after,
                    progressed: false,
                    again: false,
                    done: 0,
                    total: 0,
                    reported: false,
                },
            );
            self.out.push_back(ClientMsg::Pull {
                doc,
                after,
                max_bytes: self.cfg.max_pull_bytes,
            });
            self.stats.pulls += 1;
        }
        while self.pushes.in_flight.len() < self.cfg.max_pushes_in_flight {
            let Some(doc) = self.pushes.queue.pop_front() else {
                break;
            };
            self.pushes.queued.remove(&doc);
            // A busy document is queued again when its batch is answered.
            if self.parked.contains_key(&doc) || self.pushes.busy.contains(&doc) {
                continue;
            }
            self.push_next(repo, doc)?;
        }
        self.persist_feeds(repo)?;
        if let Some(r) = &self.repush {
            if r.remaining.is_empty() {
                let id = r.relay_id;
                put(repo, RELAY_ID_KEY, &id)?;
                self.stored_relay = Some(id);
                self.repush = None;
                tracing::info!(relay = %hex::encode(id), "every document's history is on the new relay");
            }
        }
        if self.pulls.queue.is_empty() && self.pulls.in_flight.is_empty() {
            finish_progress(repo, Direction::Download, &mut self.download);
        }
        if self.pushes.queue.is_empty() && self.pushes.in_flight.is_empty() {
            finish_progress(repo, Direction::Upload, &mut self.upload);
            self.upload_counted.clear();
        }
        Ok(())
    }

    /// Send the next batch of `doc`: of its history when one is being pushed, else of its
    /// outbox.
    fn push_next(&mut self, repo: &Repo, doc: DocId) -> Result<(), SyncError> {
        let meta = match repo.meta(&doc) {
            Ok(m) => m,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return self.doc_failed(repo, doc, Direction::Upload, e),
        };
        let Some(relay) = &self.relay else {
            return Ok(());
        };
        let ns = meta.namespace;
        if !relay.may_write(&ns) {
            if meta.pending > 0 || self.pushes.history_wanted.contains(&doc) {
                let message = format!(
                    "the token may not write namespace '{ns}'; {} local change(s) of {doc} stay pending",
                    meta.pending
                );
                self.park(
                    repo,
                    doc,
                    Direction::Upload,
                    Some(ErrorCode::Forbidden),
                    message,
                );
            }
            return Ok(());
        }
        let max_count = (relay.limits.max_changes_per_push as usize)
            .min(self.pushes.cap.get(&doc).copied().unwrap_or(usize::MAX));
        let limits = relay.limits.clone();
        let max_frame = relay.max_frame;
        if self.pushes.history_wanted.remove(&doc) {
            // The outbox first: a change made between the two reads is then in the history
            // pushed but not among the entries acked for it (it stays pending and is pushed
            // again), never the other way round (acked without being pushed).
            let covers = match repo.outbox(&doc) {
                Ok(o) => o.into_iter().map(|(s, _)| s).collect(),
                Err(e) => return self.doc_failed(repo, doc, Direction::Upload, e),
            };
            let changes = match repo.all_changes(&doc) {
                Ok(c) => c,
                Err(e) => return self.doc_failed(repo, doc, Direction::Upload, e),
            };
            if self.upload_counted.insert(doc) {
                let bytes = changes.iter().map(|c| c.len() as u64).sum();
                self.upload.grow(0, bytes);
                self.upload.grow_changes(0, changes.len() as u64);
            }
            self.pushes.history.insert(
                doc,
                History {
                    changes,
                    covers,
                    sent: 0,
                },
            );
        }
        let (kind, changes) = if let Some(h) = self.pushes.history.get_mut(&doc) {
            let rest = h.changes.get(h.sent..).unwrap_or(&[]);
            let n = match batch_len(
                rest.iter().map(|c| c.len()),
                max_count,
                &limits,
                max_frame,
                ns.len(),
            ) {
                Ok(n) => n,
                Err(why) => {
                    self.park(repo, doc, Direction::Upload, None, why);
                    return Ok(());
                }
            };
            if n == 0 {
                // Nothing (left) to send: an empty document.
                self.finish_history(repo, doc)?;
                self.queue_push(doc);
                return Ok(());
            }
            let batch = rest[..n].to_vec();
            h.sent += n;
            (BatchKind::History(h.sent), batch)
        } else {
            let outbox = match repo.outbox(&doc) {
                Ok(o) => o,
                Err(e) => return self.doc_failed(repo, doc, Direction::Upload, e),
            };
            if outbox.is_empty() {
                return Ok(());
            }
            if self.upload_counted.insert(doc) {
                let bytes = outbox.iter().map(|(_, c)| c.len() as u64).sum();
                self.upload.grow(0, bytes);
                self.upload.grow_changes(0, outbox.len() as u64);
            }
            let n = match batch_len(
                outbox.iter().map(|(_, c)| c.len()),
                max_count,
                &limits,
                max_frame,
                ns.len(),
            ) {
                Ok(n) => n,
                Err(why) => {
                    self.park(repo, doc, Direction::Upload, None, why);
                    return Ok(());
                }
            };
            let (journal, changes): (Vec<u64>, Vec<Vec<u8>>) = outbox.into_iter().take(n).unzip();
            (BatchKind::Outbox(journal), changes)
        };
        let batch = self.pushes.next_batch;
        self.pushes.next_batch += 1;
        self.pushes.in_flight.insert(
            batch,
            Batch {
                doc,
                kind,
                count: changes.len(),
                bytes: changes.iter().map(|c| c.len() as u64).sum(),
            },
        );
        self.pushes.busy.insert(doc);
        self.out.push_back(ClientMsg::Push {
            namespace: ns,
            doc,
            batch,
            changes,
        });
        self.stats.pushes += 1;
        Ok(())
    }

    /// Persist the cursor of every feed whose leading pages are fully pulled.
    fn persist_feeds(&mut self, repo: &Repo) -> Result<(), SyncError> {
        for feed in self.feeds.values_mut() {
            let mut upto = None;
            while feed.pages.front().is_some_and(|p| p.waiting.is_empty()) {
                if let Some(page) = feed.pages.pop_front() {
                    if !feed.tainted && page.cursor > feed.persisted {
                        upto = Some(page.cursor);
                    }
                }
            }
            if let Some(cursor) = upto {
                put(repo, &feed.key, &cursor.to_be_bytes())?;
                feed.persisted = cursor;
            }
        }
        Ok(())
    }

    // ---- helpers ------------------------------------------------------------------------

    /// The document's cursor (0 for a document we do not hold), or `None` when reading it
    /// failed and the document was parked.
    fn cursor(&mut self, repo: &Repo, doc: DocId) -> Result<Option<u64>, SyncError> {
        match repo.meta(&doc) {
            Ok(m) => Ok(Some(m.relay_seq)),
            Err(Error::NotFound(_)) => Ok(Some(0)),
            Err(e) => self
                .doc_failed(repo, doc, Direction::Download, e)
                .map(|()| None),
        }
    }

    /// Set the cursor to `to`, stepping over our own acknowledged seqs right after it.
    /// Returns the new cursor, or `None` when the document was parked.
    fn advance_cursor(
        &mut self,
        repo: &Repo,
        doc: DocId,
        to: u64,
    ) -> Result<Option<u64>, SyncError> {
        let mut cursor = to;
        if let Some(own) = self.pushes.own.get_mut(&doc) {
            while let Some(next) = cursor.checked_add(1).filter(|n| own.remove(n)) {
                cursor = next;
            }
            own.retain(|s| *s > cursor);
        }
        match repo.set_relay_seq(&doc, cursor) {
            Ok(()) => Ok(Some(cursor)),
            Err(e) => self
                .doc_failed(repo, doc, Direction::Download, e)
                .map(|()| None),
        }
    }

    fn want_pull(&mut self, doc: DocId, seq: u64) {
        if self.parked.contains_key(&doc) {
            return;
        }
        let want = self.pulls.want.entry(doc).or_insert(0);
        if seq > *want {
            *want = seq;
            if let Some(pull) = self.pulls.in_flight.get_mut(&doc) {
                pull.again = true;
            }
        }
        if !self.pulls.in_flight.contains_key(&doc) && self.pulls.queued.insert(doc) {
            self.pulls.queue.push_back(doc);
        }
    }

    fn queue_push(&mut self, doc: DocId) {
        if !self.parked.contains_key(&doc) && self.pushes.queued.insert(doc) {
            self.pushes.queue.push_back(doc);
        }
    }

    fn retry_later(&mut self, doc: DocId, what: Retry) {
        if self.retries.iter().any(|(_, r)| *r == what) {
            return;
        }
        let n = self.retry_count.entry(doc).or_insert(0);
        let delay = self
            .cfg
            .retry_after
            .saturating_mul(1 << (*n).min(6))
            .min(MAX_RETRY);
        *n += 1;
        self.retries.push((self.now + delay, what));
    }

    /// A repo error about one document: a failing disk ends the session, anything else
    /// (a quarantined document, bytes that do not apply) parks the document.
    fn doc_failed(
        &mut self,
        repo: &Repo,
        doc: DocId,
        direction: Direction,
        e: Error,
    ) -> Result<(), SyncError> {
        if matches!(e, Error::Store(StoreError::Io(_))) {
            return Err(SyncError::Repo(e));
        }
        self.park(repo, doc, direction, None, e.to_string());
        Ok(())
    }

    /// Give up on `doc` for this connection and report why.
    fn park(
        &mut self,
        repo: &Repo,
        doc: DocId,
        direction: Direction,
        code: Option<ErrorCode>,
        message: String,
    ) {
        tracing::warn!(%doc, ?direction, ?code, %message, "leaving a document alone until the next connection");
        let issue = DocIssue {
            doc: Some(doc),
            direction,
            code,
            message,
        };
        self.report(issue.clone());
        self.parked.entry(doc).or_insert(issue);
        self.pushes.queue.retain(|d| *d != doc);
        self.pushes.queued.remove(&doc);
        self.pushes.in_flight.retain(|_, b| b.doc != doc);
        self.pushes.busy.remove(&doc);
        self.pushes.history.remove(&doc);
        self.pushes.history_wanted.remove(&doc);
        self.pulls.queue.retain(|d| *d != doc);
        self.pulls.queued.remove(&doc);
        self.pulls.want.remove(&doc);
        if let Some(pull) = self.pulls.in_flight.remove(&doc) {
            if pull.reported {
                repo.set_progress(&doc, None);
            }
        }
        self.snapshots_drop(doc);
        self.retries
            .retain(|(_, r)| *r != Retry::Push(doc) && *r != Retry::Pull(doc));
        for feed in self.feeds.values_mut() {
            for page in &mut feed.pages {
                if page.waiting.remove(&doc) {
                    feed.tainted = true;
                }
            }
        }
        if let Some(r) = &mut self.repush {
            r.remaining.remove(&doc);
        }
    }

    fn report(&mut self, issue: DocIssue) {
        if self.issues.len() >= MAX_ISSUES {
            self.issues.pop_front();
        }
        self.issues.push_back(issue);
    }
}

/// How many of the next changes (by size) fit one push: at most `max_count`, each within the
/// relay's change limit, all within its frame limit. `Err` when the first one cannot be pushed
/// at all.
fn batch_len(
    sizes: impl Iterator<Item = usize>,
    max_count: usize,
    limits: &Limits,
    max_frame: usize,
    ns_len: usize,
) -> Result<usize, String> {
    let mut frame = PUSH_OVERHEAD + ns_len;
    let mut n = 0;
    for size in sizes.take(max_count.max(1)) {
        let fits_change = size as u64 <= limits.max_change_bytes;
        let fits_frame = frame + VARINT_MAX + size <= max_frame;
        if !fits_change || !fits_frame {
            if n > 0 {
                break;
            }
            return Err(if fits_change {
                format!("a change of {size} bytes does not fit the relay's {max_frame}-byte frames")
            } else {
                format!(
                    "a change of {size} bytes is over the relay's limit of {} bytes per change",
                    limits.max_change_bytes
                )
            });
        }
        frame += VARINT_MAX + size;
        n += 1;
    }
    Ok(n)
}

fn finish_progress(repo: &Repo, direction: Direction, p: &mut Progress) {
    if p.total == 0 && p.done == 0 && p.changes_total == 0 {
        return;
    }
    p.total = p.total.max(p.done);
    p.done = p.total;
    p.changes_total = p.changes_total.max(p.changes_done);
    p.changes_done = p.changes_total;
    repo.emit(p.event(direction));
    *p = Progress::default();
}

fn read_cursor(repo: &Repo, key: &str) -> Result<Option<u64>, SyncError> {
    Ok(repo
        .store()
        .sync_get(key)
        .map_err(Error::from)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes))
}

fn put(repo: &Repo, key: &str, value: &[u8]) -> Result<(), SyncError> {
    repo.store()
        .sync_put(key, value)
        .map_err(|e| SyncError::Repo(e.into()))
}

fn msg_name(msg: &RelayMsg) -> &'static str {
    match msg {
        RelayMsg::Hello { .. } => "Hello",
        RelayMsg::Feed { .. } => "Feed",
        RelayMsg::Changes { .. } => "Changes",
        RelayMsg::Snapshot { .. } => "Snapshot",
        RelayMsg::Ack { .. } => "Ack",
        RelayMsg::NeedHistory { .. } => "NeedHistory",
        RelayMsg::Error { .. } => "Error",
        RelayMsg::Ping { .. } => "Ping",
        RelayMsg::Pong { .. } => "Pong",
        RelayMsg::Presence { .. } => "Presence",
    }
}
