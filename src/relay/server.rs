//! The relay's network shell: an axum router with the tandem/1 WebSocket on `/v1` and plain
//! HTTP `/healthz` and `/metrics` on the same port (tungstenite alone would refuse a request
//! without upgrade headers, so HTTP is routed first). One task per connection reads frames in
//! order and hands them to its [`RelaySession`] (the protocol logic, sans-IO, in `session.rs`)
//! on the blocking pool, since the session calls the sled-backed log; it then carries out the
//! session's effects: a writer task drains that connection's bounded outgoing queue, and
//! fan-out goes through the [`Hub`] of subscriptions. What stays here is what needs a socket,
//! a task or a clock: auth of the upgrade request, handshake and idle timeouts, the
//! connection limit, metrics and graceful shutdown.
//!
//! Fan-out never waits on a slow reader: a connection whose queue is full is closed (its device
//! catches up by cursor when it returns), never buffered without limit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use super::amrepo::{AmConfig, AmRelay};
use super::auth::{self, Secret};
use super::log::RelayLog;
use super::session::{Effect, Hub, RelaySession, SessionConfig};
use super::storage::RelayStore;
use crate::ids::DocId;
use crate::transport::{codec, ClientMsg, Limits, RelayMsg};

/// How connections prove who they are.
#[derive(Clone)]
pub enum Auth {
    /// HS256 JWTs signed with this secret.
    Jwt(Arc<Secret>),
    /// Everyone may read and write everything. Local development only.
    InsecureNoAuth,
}

/// Everything a relay needs to run. Every limit has a default (see docs/operations.md).
#[derive(Clone)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// The data folder; `None` keeps everything in memory (tests).
    pub data: Option<PathBuf>,
    pub auth: Auth,
    pub limits: Limits,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// Pull pages are at most this many bytes unless the client asks for fewer.
    pub page_bytes: u64,
    /// Feed entries per page.
    pub feed_page: usize,
    /// Frames queued for one connection before it counts as too slow and is closed.
    pub outgoing_queue: usize,
    /// Compact a log once this many changes sit after its snapshot.
    pub compact_after: u64,
    /// Presence messages one connection may send per second; the excess is dropped.
    pub presence_per_sec: u32,
    /// Presence messages one connection may send at once before the rate applies.
    pub presence_burst: u32,
    /// Keep the log and feeds in this PostgreSQL database instead of `data`, so that several
    /// relay nodes can share them (see docs/scaling.md).
    pub postgres: Option<String>,
    /// With `postgres`: the Redis that carries changes across nodes.
    pub redis: Option<String>,
    /// sled's page cache for the `data` folder, in bytes (see [`log::DEFAULT_CACHE_BYTES`]).
    ///
    /// [`log::DEFAULT_CACHE_BYTES`]: super::log::DEFAULT_CACHE_BYTES
    pub cache_bytes: u64,
    /// Return the allocator's free memory to the system when a burst of work ends
    /// ([`memory::trim_when_quiet`]). Process-wide, so off by default; `tandem relay` sets it.
    ///
    /// [`memory::trim_when_quiet`]: super::memory::trim_when_quiet
    pub trim_memory: bool,
}

impl RelayConfig {
    /// Defaults, listening on `listen`, storing in `data`.
    pub fn new(listen: SocketAddr, data: Option<PathBuf>, auth: Auth) -> RelayConfig {
        RelayConfig {
            listen,
            data,
            auth,
            limits: Limits {
                max_frame_bytes: 16 << 20,
                max_changes_per_push: 1000,
                max_change_bytes: 8 << 20,
                max_docs_per_connection: 10_000,
            },
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            page_bytes: 1 << 20,
            feed_page: 1000,
            outgoing_queue: 1024,
            compact_after: 10_000,
            presence_per_sec: 20,
            presence_burst: 40,
            postgres: None,
            redis: None,
            cache_bytes: super::log::DEFAULT_CACHE_BYTES,
            trim_memory: false,
        }
    }
}

/// Counters of the network side (storage counters live in the log).
#[derive(Default)]
struct NetStats {
    connections: AtomicU64,
    connections_total: AtomicU64,
    fanout_frames: AtomicU64,
    slow_closed: AtomicU64,
    refused: AtomicU64,
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    presence_frames: AtomicU64,
    presence_dropped: AtomicU64,
    presence_rate_limited: AtomicU64,
}

/// What the shell keeps per connection, in the hub.
struct Conn {
    tx: mpsc::Sender<Bytes>,
    /// Told when the connection is too slow for fan-out and must close.
    close: Arc<Notify>,
}

struct Shared {
    cfg: RelayConfig,
    log: Arc<dyn RelayStore>,
    conns: Mutex<Hub<Conn>>,
    permits: Arc<Semaphore>,
    stats: NetStats,
    shutdown: watch::Receiver<bool>,
    /// The `/automerge` endpoint's documents and peers.
    amrepo: Arc<AmRelay>,
    /// Cross-node fan-out (PostgreSQL mode only).
    bus: std::sync::OnceLock<super::bus::Bus>,
}

impl Shared {
    fn am_cfg(cfg: &RelayConfig) -> AmConfig {
        AmConfig {
            max_frame_bytes: cfg.limits.max_frame_bytes as usize,
            max_docs_per_connection: cfg.limits.max_docs_per_connection as usize,
            handshake_timeout: cfg.handshake_timeout,
            idle_timeout: cfg.idle_timeout,
            outgoing_queue: cfg.outgoing_queue,
            page_bytes: cfg.page_bytes.max(1 << 20),
            ..AmConfig::default()
        }
    }

    fn session_cfg(&self) -> SessionConfig {
        SessionConfig {
            limits: self.cfg.limits.clone(),
            page_bytes: self.cfg.page_bytes,
            feed_page: self.cfg.feed_page,
            presence_per_sec: self.cfg.presence_per_sec,
            presence_burst: self.cfg.presence_burst,
        }
    }
}

/// A running relay.
pub struct RelayHandle {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The relay's storage, for tests and tools.
    pub log: Arc<dyn RelayStore>,
    /// With PostgreSQL and Redis: whether this node's Redis subscription is up.
    pub bus_health: Option<watch::Receiver<bool>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RelayHandle {
    /// Stop accepting, let connections finish the message in hand, flush, and return.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Open the storage, bind, and serve in the background.
pub async fn start(
    cfg: RelayConfig,
) -> Result<RelayHandle, Box<dyn std::error::Error + Send + Sync>> {
    let (log, pg) = open_storage(&cfg).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    // Frames are small and written one by one (write buffer 0): without TCP_NODELAY, Nagle
    // holds each one back until the peer's delayed ACK, tens of milliseconds per round trip.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let (stop, shutdown) = watch::channel(false);
    let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
        let weak = weak.clone();
        // Changes stored from automerge-repo peers go to tandem/1 connections like a push's,
        // and to the other nodes when there are any.
        let fanout = Box::new(move |ns: &str, doc: DocId, msg: RelayMsg| {
            if let Some(shared) = weak.upgrade() {
                if let Some(frame) = encode(&shared, &msg) {
                    fan_out(&shared, ns, &doc, frame, 0);
                }
                if let Some(bus) = shared.bus.get() {
                    bus.announce(ns, &doc, &msg);
                }
            }
        });
        Shared {
            permits: Arc::new(Semaphore::new(cfg.max_connections)),
            amrepo: Arc::new(AmRelay::new(log.clone(), Shared::am_cfg(&cfg), fanout)),
            cfg,
            log: log.clone(),
            conns: Mutex::new(Hub::default()),
            stats: NetStats::default(),
            shutdown: shutdown.clone(),
            bus: std::sync::OnceLock::new(),
        }
    });
    if let Some(pg) = pg {
        // Changes committed by other nodes go to this node's subscribers, like local ones.
        let weak = Arc::downgrade(&shared);
        let deliver: super::bus::Deliver =
            Arc::new(move |ns: String, doc: DocId, msg: RelayMsg| {
                if let Some(shared) = weak.upgrade() {
                    if let Some(frame) = encode(&shared, &msg) {
                        fan_out(&shared, &ns, &doc, frame, 0);
                    }
                    // automerge-repo peers of this node hold the document too.
                    shared.amrepo.poke(&doc);
                }
            });
        let bus =
            super::bus::Bus::start(shared.cfg.redis.clone(), pg, deliver, shutdown.clone()).await;
        let _ = shared.bus.set(bus);
    }
    let bus_health = shared
        .bus
        .get()
        .filter(|_| shared.cfg.redis.is_some())
        .map(|b| b.health());
    if matches!(shared.cfg.auth, Auth::InsecureNoAuth) {
        tracing::warn!("INSECURE: --insecure-no-auth is on: anyone who can reach {addr} may read and write every namespace");
    }
    let app = Router::new()
        .route("/v1", get(upgrade))
        .route("/automerge", get(upgrade_automerge))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    if shared.cfg.trim_memory {
        let weak = Arc::downgrade(&shared);
        let activity = Arc::new(move || {
            weak.upgrade().map_or(0, |s| {
                s.stats.frames_in.load(Ordering::Relaxed)
                    + s.amrepo.stats.sync_in.load(Ordering::Relaxed)
            })
        });
        tokio::spawn(super::memory::trim_when_quiet(activity, shutdown.clone()));
    }
    let mut stopped = shutdown.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        let r = serve.await;
        // Connections notice the shutdown, finish the message in hand and release their
        // permit; wait for all of them (bounded), then make everything durable.
        let all = shared.cfg.max_connections as u32;
        let _ =
            tokio::time::timeout(Duration::from_secs(10), shared.permits.acquire_many(all)).await;
        let log = shared.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.durable()).await;
        tracing::info!("relay stopped");
        r
    });
    tracing::info!(%addr, relay_id = %hex::encode(log.relay_id()), "relay listening");
    Ok(RelayHandle {
        addr,
        log,
        bus_health,
        stop,
        task,
    })
}

/// The backend `cfg` names: PostgreSQL, a sled folder, or memory.
type Storage = (Arc<dyn RelayStore>, Option<Arc<super::postgres::PgLog>>);

async fn open_storage(
    cfg: &RelayConfig,
) -> Result<Storage, Box<dyn std::error::Error + Send + Sync>> {
    let compact_after = cfg.compact_after;
    if let Some(url) = cfg.postgres.clone() {
        let log = tokio::task::spawn_blocking(move || {
            super::postgres::PgLog::connect(&url).map(|mut l| {
                l.compact_after = compact_after;
                l
            })
        })
        .await??;
        if let Some(redis) = &cfg.redis {
            log.set_cache(redis);
        }
        let log = Arc::new(log);
        return Ok((log.clone(), Some(log)));
    }
    let mut log = match &cfg.data {
        Some(path) => {
            let (p, cache) = (path.clone(), cfg.cache_bytes);
            tokio::task::spawn_blocking(move || RelayLog::open_with_cache(p, cache)).await??
        }
        None => RelayLog::in_memory(),
    };
    log.compact_after = compact_after;
    Ok((Arc::new(log), None))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection slot (or 503 at the limit) and the `Authorization` header, for either endpoint.
// The error is the response itself, built once per refused upgrade: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn admit(
    shared: &Shared,
    headers: &HeaderMap,
) -> Result<(tokio::sync::OwnedSemaphorePermit, Option<String>), axum::response::Response> {
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "relay at its connection limit\n",
        )
            .into_response());
    };
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((permit, authorization))
}

async fn upgrade(
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    State(shared): State<Arc<Shared>>,
) -> axum::response::Response {
    let (permit, authorization) = match admit(&shared, &headers) {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    sized(ws, &shared).on_upgrade(move |socket| async move {
        let conn = connection(socket, shared.clone(), authorization, query);
        counted(&shared, permit, conn).await;
    })
}

/// The socket's buffers and limits, the same for both endpoints.
fn sized(ws: WebSocketUpgrade, shared: &Shared) -> WebSocketUpgrade {
    let max = shared.cfg.limits.max_frame_bytes as usize;
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        // One frame in flight at most: what a slow reader cannot take waits in the bounded
        // outgoing queue (and closes the connection when that fills), not in a socket buffer.
        .max_write_buffer_size(max + (64 << 10))
        .max_message_size(max)
        .max_frame_size(max)
}

/// Run a connection, counted in the metrics, holding its slot until it ends.
async fn counted(
    shared: &Shared,
    permit: tokio::sync::OwnedSemaphorePermit,
    conn: impl std::future::Future<Output = ()>,
) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    conn.await;
    shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
}

/// `/automerge`: automerge-repo's WebSocket protocol (see `amrepo`). Browsers cannot set
/// headers on a WebSocket, so the token comes as `?token=`; `?namespace=` picks the namespace
/// of documents this peer creates (default: the token's first writable one, or `default`).
async fn upgrade_automerge(
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    State(shared): State<Arc<Shared>>,
) -> axum::response::Response {
    let (permit, authorization) = match admit(&shared, &headers) {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let auth = match &shared.cfg.auth {
        Auth::InsecureNoAuth => Ok(None),
        Auth::Jwt(secret) => auth::authenticate(
            secret,
            authorization.as_deref(),
            query.as_deref(),
            SystemTime::now(),
        )
        .map(Some),
    };
    let namespace = query.as_deref().and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, v)| *k == "namespace" && !v.is_empty())
            .map(|(_, v)| v.to_string())
    });
    sized(ws, &shared).on_upgrade(move |socket| async move {
        let am = shared.amrepo.clone();
        let conn = super::amrepo::serve(am, socket, auth, namespace, shared.shutdown.clone());
        counted(&shared, permit, conn).await;
    })
}

fn encode(shared: &Shared, msg: &RelayMsg) -> Option<Bytes> {
    match codec::encode(msg, shared.cfg.limits.max_frame_bytes as usize) {
        Ok(b) => Some(Bytes::from(b)),
        Err(e) => {
            tracing::error!(error = %e, "could not encode a relay message");
            None
        }
    }
}

async fn connection(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    authorization: Option<String>,
    query: Option<String>,
) {
    // Handshake: the first frame must be a hello, within the handshake timeout.
    let first = tokio::time::timeout(shared.cfg.handshake_timeout, socket.next()).await;
    let limit = shared.cfg.limits.max_frame_bytes as usize;
    let hello = match first {
        Ok(Some(Ok(Message::Binary(b)))) => codec::decode::<ClientMsg>(&b, limit).ok(),
        _ => None,
    };
    let accepted = RelaySession::accept(shared.session_cfg(), hello, || match &shared.cfg.auth {
        Auth::InsecureNoAuth => Ok(None),
        Auth::Jwt(secret) => auth::authenticate(
            secret,
            authorization.as_deref(),
            query.as_deref(),
            SystemTime::now(),
        )
        .map(Some),
    });
    let session = match accepted {
        Ok(s) => s,
        Err(effects) => {
            // Refused: the effects are an error and a close, sent on the socket we still own.
            for e in effects {
                if let Effect::Send(msg) = e {
                    if let Some(b) = encode(&shared, &msg) {
                        let _ = socket.send(Message::Binary(b)).await;
                    }
                }
            }
            let _ = socket.close().await;
            return;
        }
    };
    tracing::debug!(device = %hex::encode(session.device()), "connection");

    let (tx, mut rx) = mpsc::channel::<Bytes>(shared.cfg.outgoing_queue);
    let close = Arc::new(Notify::new());
    // Register before building the feed pages (`greet`): a change landing during catch-up is
    // then in a page, delivered live, or both; never neither.
    let id = lock(&shared.conns).join(
        session.claims().cloned(),
        Conn {
            tx: tx.clone(),
            close: close.clone(),
        },
    );
    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.send(Message::Binary(frame)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // Effects are carried out in order by their own task, so that the reader can go on with the
    // next request while a push waits for its flush: pushes in flight share flushes, and the
    // answers still leave in request order.
    let (dispatch, mut effects_rx) = mpsc::channel::<Vec<Effect>>(DISPATCH_QUEUE);
    let ended = Arc::new(Notify::new());
    let dispatcher = {
        let out = Outbound {
            shared: shared.clone(),
            id,
            tx,
        };
        let ended = ended.clone();
        tokio::spawn(async move {
            while let Some(effects) = effects_rx.recv().await {
                if !out.carry_out(effects).await {
                    break;
                }
            }
            ended.notify_one();
        })
    };
    let mut conn = Connection {
        shared: shared.clone(),
        dispatch,
        session: Some(session),
        presence_rate_limited: 0,
    };
    let mut ok = conn.step(false, |s, log| s.greet(log)).await;
    let mut shutdown = shared.shutdown.clone();
    // A frame read ahead of its turn (see below).
    let mut ahead = None;
    while ok {
        let frame = match ahead.take() {
            // Frames arriving back to back skip the wait below: look for its other reasons to
            // stop here (both notifications are `notify_one`, so they wait as permits).
            Some(frame) => {
                if ended.notified().now_or_never().is_some() || *shutdown.borrow() {
                    break;
                }
                if close.notified().now_or_never().is_some() {
                    shared.stats.slow_closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                frame
            }
            None => tokio::select! {
                _ = ended.notified() => break,
                frame = tokio::time::timeout(shared.cfg.idle_timeout, stream.next()) => match frame {
                    Ok(frame) => frame,
                    // Idle past the timeout.
                    Err(_) => break,
                },
                _ = close.notified() => {
                    shared.stats.slow_closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
            },
        };
        match frame {
            Some(Ok(Message::Binary(b))) => {
                shared.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                shared
                    .stats
                    .bytes_in
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                // With no next frame waiting, a push is made durable in its own step: the
                // answer goes out without a hop through another blocking thread. With more
                // frames waiting, the dispatcher waits for durability while they are read,
                // so that this connection's pushes share a flush.
                ahead = stream.next().now_or_never();
                let inline = ahead.is_none();
                ok = conn
                    .step(inline, move |s, log| {
                        s.handle_frame(log, Instant::now(), &b)
                    })
                    .await;
            }
            Some(Ok(Message::Text(_))) => {
                ok = conn.step(false, |s, _| s.handle_text_frame()).await;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            // Closed or broken.
            _ => ok = false,
        }
    }
    // The others present in this connection's documents hear that it left.
    let gone = lock(&shared.conns).leave_presence(id);
    deliver_presence(&shared, gone);
    lock(&shared.conns).leave(id);
    // Accepted pushes still get their acks (and their fan-out) once durable.
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(10), dispatcher).await;
    // The writer ends once every sender is gone (the dispatcher's, and the registry's).
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Effect batches a connection may have waiting for the dispatcher (pushes in flight).
const DISPATCH_QUEUE: usize = 64;

/// One connection's shell: its [`RelaySession`] and the queue to its effect dispatcher.
struct Connection {
    shared: Arc<Shared>,
    dispatch: mpsc::Sender<Vec<Effect>>,
    /// Moved onto the blocking pool for each step and back; `None` only if a step panicked.
    session: Option<RelaySession>,
    /// The session's count of rate-limited presence updates, as last added to the metrics.
    presence_rate_limited: u64,
}

/// What carries out a connection's effects: its id in the hub and its outgoing queue.
struct Outbound {
    shared: Arc<Shared>,
    id: u64,
    tx: mpsc::Sender<Bytes>,
}

impl Connection {
    /// Run one session call on the blocking pool (the relay log blocks on sled), then queue its
    /// effects to the dispatcher. `false` ends the connection. With `durable`, a step that
    /// wrote also waits for the log to be durable (on the same blocking thread) and drops its
    /// [`Effect::AwaitDurable`]s: they are met. (If that fails they stay, and the dispatcher
    /// meets the failure as always.)
    async fn step(
        &mut self,
        durable: bool,
        f: impl FnOnce(&mut RelaySession, &dyn RelayStore) -> Vec<Effect> + Send + 'static,
    ) -> bool {
        let Some(mut session) = self.session.take() else {
            return false;
        };
        let log = self.shared.log.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut effects = f(&mut session, &*log);
            if durable
                && effects.iter().any(|e| matches!(e, Effect::AwaitDurable))
                && log.durable().is_ok()
            {
                effects.retain(|e| !matches!(e, Effect::AwaitDurable));
            }
            (session, effects)
        })
        .await;
        match done {
            Ok((session, effects)) => {
                let limited = session.presence_dropped();
                if limited > self.presence_rate_limited {
                    self.shared
                        .stats
                        .presence_rate_limited
                        .fetch_add(limited - self.presence_rate_limited, Ordering::Relaxed);
                    self.presence_rate_limited = limited;
                }
                self.session = Some(session);
                // Waits while the dispatcher is this many batches behind: backpressure.
                self.dispatch.send(effects).await.is_ok()
            }
            Err(e) => {
                tracing::error!(error = %e, "a relay session step failed; closing the connection");
                false
            }
        }
    }
}

impl Outbound {
    /// Carry out effects in order. Sends queue on this connection's writer (waiting while its
    /// queue is full: backpressure on our own reader is fine); fan-out never waits.
    async fn carry_out(&self, effects: Vec<Effect>) -> bool {
        let mut alive = true;
        for effect in effects {
            match effect {
                Effect::Send(msg) => {
                    if alive {
                        if let Some(b) = encode(&self.shared, &msg) {
                            alive = self.tx.send(b).await.is_ok();
                        }
                    }
                }
                Effect::Subscribe { namespaces, docs } => {
                    lock(&self.shared.conns).subscribe(self.id, namespaces, docs);
                }
                // Even when this connection just died: the changes are durable and the other
                // connections are owed them.
                Effect::FanOut {
                    namespace,
                    doc,
                    changes,
                } => {
                    if let Some(frame) = encode(&self.shared, &changes) {
                        fan_out(&self.shared, &namespace, &doc, frame, self.id);
                    }
                    if let Some(bus) = self.shared.bus.get() {
                        bus.announce(&namespace, &doc, &changes);
                    }
                    self.shared.amrepo.poke(&doc);
                }
                Effect::Compact(doc) => {
                    let log = self.shared.log.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = log.compact(&doc) {
                            tracing::error!(%doc, error = %e, "compaction failed");
                        }
                    });
                }
                Effect::AwaitDurable => {
                    let log = self.shared.log.clone();
                    match tokio::task::spawn_blocking(move || log.durable()).await {
                        Ok(Ok(())) => {}
                        failed => {
                            tracing::error!(
                                ?failed,
                                "the relay log could not be made durable; closing the connection"
                            );
                            return false;
                        }
                    }
                }
                Effect::Presence {
                    namespace,
                    doc,
                    state,
                } => {
                    let out = lock(&self.shared.conns).set_presence(self.id, namespace, doc, state);
                    deliver_presence(&self.shared, out);
                }
                Effect::Close => return false,
            }
        }
        alive
    }
}

/// Send `frame` to every connection subscribed to `doc` in `ns` but `except` (0: none).
fn fan_out(shared: &Shared, ns: &str, doc: &DocId, frame: Bytes, except: u64) {
    let conns = lock(&shared.conns);
    for (_, c) in conns.recipients(ns, doc, except) {
        match c.tx.try_send(frame.clone()) {
            Ok(()) => {
                shared.stats.fanout_frames.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => c.close.notify_one(),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Send presence messages to their recipients without ever waiting: presence is ephemeral,
/// so a recipient whose queue is full misses this one (the next update replaces it) rather
/// than being closed or slowing anyone's document sync.
fn deliver_presence(shared: &Shared, out: Vec<(u64, RelayMsg)>) {
    if out.is_empty() {
        return;
    }
    let conns = lock(&shared.conns);
    for (to, msg) in out {
        let Some(c) = conns.get(to) else { continue };
        let Some(frame) = encode(shared, &msg) else {
            continue;
        };
        match c.tx.try_send(frame) {
            Ok(()) => shared.stats.presence_frames.fetch_add(1, Ordering::Relaxed),
            Err(_) => shared
                .stats
                .presence_dropped
                .fetch_add(1, Ordering::Relaxed),
        };
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    let s = shared.log.stats();
    let n = &shared.stats;
    let (requests, flushes) = shared.log.flush_counts();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let am = &shared.amrepo.stats;
    let rows: [(&str, &str, u64); 28] = [
        (
            "tandem_relay_presence_rate_limited_total",
            "counter",
            g(&n.presence_rate_limited),
        ),
        (
            "tandem_relay_presence_frames_total",
            "counter",
            g(&n.presence_frames),
        ),
        (
            "tandem_relay_presence_dropped_total",
            "counter",
            g(&n.presence_dropped),
        ),
        ("tandem_relay_connections", "gauge", g(&n.connections)),
        (
            "tandem_relay_connections_total",
            "counter",
            g(&n.connections_total),
        ),
        (
            "tandem_relay_connections_refused_total",
            "counter",
            g(&n.refused),
        ),
        (
            "tandem_relay_slow_consumers_closed_total",
            "counter",
            g(&n.slow_closed),
        ),
        ("tandem_relay_frames_in_total", "counter", g(&n.frames_in)),
        ("tandem_relay_bytes_in_total", "counter", g(&n.bytes_in)),
        (
            "tandem_relay_fanout_frames_total",
            "counter",
            g(&n.fanout_frames),
        ),
        ("tandem_relay_pushes_total", "counter", g(&s.pushes)),
        (
            "tandem_relay_pushes_refused_total",
            "counter",
            g(&s.pushes_refused),
        ),
        (
            "tandem_relay_changes_accepted_total",
            "counter",
            g(&s.changes_accepted),
        ),
        (
            "tandem_relay_changes_duplicate_total",
            "counter",
            g(&s.changes_duplicate),
        ),
        ("tandem_relay_pulls_total", "counter", g(&s.pulls)),
        (
            "tandem_relay_pulled_changes_total",
            "counter",
            g(&s.pulled_changes),
        ),
        (
            "tandem_relay_pulled_bytes_total",
            "counter",
            g(&s.pulled_bytes),
        ),
        ("tandem_relay_feed_pages_total", "counter", g(&s.feed_pages)),
        (
            "tandem_relay_compactions_total",
            "counter",
            g(&s.compactions),
        ),
        ("tandem_relay_flush_requests_total", "counter", requests),
        ("tandem_relay_flushes_total", "counter", flushes),
        (
            "tandem_relay_automerge_connections",
            "gauge",
            g(&am.connections),
        ),
        (
            "tandem_relay_automerge_docs_in_memory",
            "gauge",
            g(&am.docs_loaded),
        ),
        (
            "tandem_relay_automerge_doc_actors",
            "gauge",
            shared.amrepo.actors() as u64,
        ),
        (
            "tandem_relay_automerge_frames_in_total",
            "counter",
            g(&am.sync_in),
        ),
        (
            "tandem_relay_automerge_changes_stored_total",
            "counter",
            g(&am.changes_stored),
        ),
        (
            "tandem_relay_automerge_refused_total",
            "counter",
            g(&am.refused),
        ),
        ("tandem_relay_up", "gauge", 1),
    ];
    let mut out = String::new();
    for (name, kind, v) in rows {
        out.push_str(&format!("# TYPE {name} {kind}\n{name} {v}\n"));
    }
    out
}
