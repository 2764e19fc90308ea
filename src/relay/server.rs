//! The relay's network shell: an axum router with the tandem/1 WebSocket on `/v1` and plain
//! HTTP `/healthz` and `/metrics` on the same port (tungstenite alone would refuse a request
//! without upgrade headers, so HTTP is routed first). One task per connection reads frames in
//! order and answers them; a writer task drains that connection's bounded outgoing queue.
//! Storage calls run on the blocking pool: sled blocks.
//!
//! Fan-out never waits on a slow reader: a connection whose queue is full is closed (its device
//! catches up by cursor when it returns), never buffered without limit.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use super::auth::{self, Claims, Secret};
use super::log::{valid_namespace, PushError, RelayLog};
use crate::ids::DocId;
use crate::transport::{
    codec, ClientMsg, ErrorCode, FeedCursor, Limits, RelayMsg, PROTOCOL_VERSION,
};

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
}

struct Conn {
    tx: mpsc::Sender<Bytes>,
    claims: Option<Claims>,
    /// `None`: every namespace the token can read (the default until `Subscribe`).
    namespaces: Option<HashSet<String>>,
    docs: HashSet<DocId>,
    close: Arc<Notify>,
}

impl Conn {
    fn can_read(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_read(ns))
    }

    fn wants(&self, ns: &str, doc: &DocId) -> bool {
        self.can_read(ns)
            && (self.namespaces.as_ref().is_none_or(|n| n.contains(ns)) || self.docs.contains(doc))
    }
}

struct Shared {
    cfg: RelayConfig,
    log: Arc<RelayLog>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    permits: Arc<Semaphore>,
    stats: NetStats,
    shutdown: watch::Receiver<bool>,
}

/// A running relay.
pub struct RelayHandle {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The relay's storage, for tests and tools.
    pub log: Arc<RelayLog>,
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
    let mut log = match &cfg.data {
        Some(path) => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || RelayLog::open(p)).await??
        }
        None => RelayLog::in_memory(),
    };
    log.compact_after = cfg.compact_after;
    let log = Arc::new(log);
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let shared = Arc::new(Shared {
        permits: Arc::new(Semaphore::new(cfg.max_connections)),
        cfg,
        log: log.clone(),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        stats: NetStats::default(),
        shutdown: shutdown.clone(),
    });
    if matches!(shared.cfg.auth, Auth::InsecureNoAuth) {
        tracing::warn!("INSECURE: --insecure-no-auth is on: anyone who can reach {addr} may read and write every namespace");
    }
    let app = Router::new()
        .route("/v1", get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
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
        stop,
        task,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn upgrade(
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    State(shared): State<Arc<Shared>>,
) -> axum::response::Response {
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "relay at its connection limit\n",
        )
            .into_response();
    };
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let max = shared.cfg.limits.max_frame_bytes as usize;
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max * 2)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .connections_total
                .fetch_add(1, Ordering::Relaxed);
            connection(socket, shared.clone(), authorization, query).await;
            shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
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

fn error_msg(
    code: ErrorCode,
    message: impl Into<String>,
    doc: Option<DocId>,
    batch: Option<u64>,
) -> RelayMsg {
    RelayMsg::Error {
        code,
        message: message.into(),
        doc,
        batch,
    }
}

/// Send one message on a socket we still own (before the writer task exists).
async fn send_direct(socket: &mut WebSocket, shared: &Shared, msg: &RelayMsg) {
    if let Some(b) = encode(shared, msg) {
        let _ = socket.send(Message::Binary(b)).await;
    }
}

async fn connection(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    authorization: Option<String>,
    query: Option<String>,
) {
    let limit = shared.cfg.limits.max_frame_bytes as usize;
    // Handshake: the first frame must be a hello, within the handshake timeout.
    let first = tokio::time::timeout(shared.cfg.handshake_timeout, socket.next()).await;
    let hello = match first {
        Ok(Some(Ok(Message::Binary(b)))) => codec::decode::<ClientMsg>(&b, limit).ok(),
        _ => None,
    };
    let Some(ClientMsg::Hello {
        version,
        device,
        feeds,
    }) = hello
    else {
        send_direct(
            &mut socket,
            &shared,
            &error_msg(ErrorCode::BadFrame, "expected a hello first", None, None),
        )
        .await;
        let _ = socket.close().await;
        return;
    };
    if version != PROTOCOL_VERSION {
        let m = format!("this relay speaks tandem/{PROTOCOL_VERSION}, not tandem/{version}");
        send_direct(
            &mut socket,
            &shared,
            &error_msg(ErrorCode::UnsupportedVersion, m, None, None),
        )
        .await;
        let _ = socket.close().await;
        return;
    }
    let claims = match &shared.cfg.auth {
        Auth::InsecureNoAuth => None,
        Auth::Jwt(secret) => match auth::authenticate(
            secret,
            authorization.as_deref(),
            query.as_deref(),
            SystemTime::now(),
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                send_direct(
                    &mut socket,
                    &shared,
                    &error_msg(e.code(), e.to_string(), None, None),
                )
                .await;
                let _ = socket.close().await;
                return;
            }
        },
    };
    let (read, write) = match &claims {
        Some(c) => (c.readable(), c.write.clone()),
        None => {
            let log = shared.log.clone();
            let mut all = tokio::task::spawn_blocking(move || log.namespaces().unwrap_or_default())
                .await
                .unwrap_or_default();
            if !all.iter().any(|n| n == crate::repo::DEFAULT_NAMESPACE) {
                all.push(crate::repo::DEFAULT_NAMESPACE.to_string());
            }
            (all.clone(), all)
        }
    };
    let subject = claims
        .as_ref()
        .map(|c| c.sub.clone())
        .unwrap_or_else(|| "anonymous".into());
    tracing::debug!(device = %hex::encode(device), %subject, "connection");

    let (tx, mut rx) = mpsc::channel::<Bytes>(shared.cfg.outgoing_queue);
    let close = Arc::new(Notify::new());
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    // Register before building the feed pages: a change landing during catch-up is then in a
    // page, delivered live, or both; never neither.
    lock(&shared.conns).insert(
        id,
        Conn {
            tx: tx.clone(),
            claims: claims.clone(),
            namespaces: None,
            docs: HashSet::new(),
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
    let mut session = Session {
        shared: shared.clone(),
        id,
        tx,
        claims,
    };
    let hello = RelayMsg::Hello {
        version: PROTOCOL_VERSION,
        relay_id: shared.log.relay_id(),
        subject,
        read,
        write,
        limits: shared.cfg.limits.clone(),
    };
    let mut ok = session.send(&hello).await;
    for FeedCursor { namespace, cursor } in feeds {
        if !ok {
            break;
        }
        ok = session.feed(namespace, cursor).await;
    }
    let mut shutdown = shared.shutdown.clone();
    while ok {
        tokio::select! {
            frame = tokio::time::timeout(shared.cfg.idle_timeout, stream.next()) => {
                match frame {
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        shared.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                        shared.stats.bytes_in.fetch_add(b.len() as u64, Ordering::Relaxed);
                        ok = match codec::decode::<ClientMsg>(&b, limit) {
                            Ok(msg) => session.handle(msg).await,
                            Err(e) => {
                                session.send(&error_msg(ErrorCode::BadFrame, e.to_string(), None, None)).await;
                                false
                            }
                        };
                    }
                    Ok(Some(Ok(Message::Text(_)))) => {
                        session.send(&error_msg(ErrorCode::BadFrame, "text frames are not part of tandem/1", None, None)).await;
                        ok = false;
                    }
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                    // Closed, broken, or idle past the timeout.
                    _ => ok = false,
                }
            }
            _ = close.notified() => {
                shared.stats.slow_closed.fetch_add(1, Ordering::Relaxed);
                ok = false;
            }
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => ok = false,
        }
    }
    lock(&shared.conns).remove(&id);
    drop(session);
    // The writer ends once every sender is gone (ours, and the registry's).
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    tx: mpsc::Sender<Bytes>,
    claims: Option<Claims>,
}

impl Session {
    fn can_read(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_read(ns))
    }

    fn can_write(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_write(ns))
    }

    /// Queue a frame for this connection (waits while its queue is full: backpressure on our
    /// own reader is fine; fan-out from others never waits).
    async fn send(&self, msg: &RelayMsg) -> bool {
        match encode(&self.shared, msg) {
            Some(b) => self.tx.send(b).await.is_ok(),
            None => true,
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RelayLog) -> T + Send + 'static,
    ) -> Option<T> {
        let log = self.shared.log.clone();
        tokio::task::spawn_blocking(move || f(&log)).await.ok()
    }

    async fn feed(&self, namespace: String, after: u64) -> bool {
        if !self.can_read(&namespace) {
            let m = format!("this token cannot read namespace '{namespace}'");
            return self
                .send(&error_msg(ErrorCode::Forbidden, m, None, None))
                .await;
        }
        let limit = self.shared.cfg.feed_page;
        let ns = namespace.clone();
        match self.blocking(move |log| log.feed(&ns, after, limit)).await {
            Some(Ok((entries, next_cursor, more))) => {
                self.send(&RelayMsg::Feed {
                    namespace,
                    entries,
                    next_cursor,
                    more,
                })
                .await
            }
            _ => {
                self.send(&error_msg(
                    ErrorCode::Internal,
                    "could not read the feed",
                    None,
                    None,
                ))
                .await
            }
        }
    }

    /// Handle one message; `false` ends the connection.
    async fn handle(&mut self, msg: ClientMsg) -> bool {
        match msg {
            ClientMsg::Hello { .. } => {
                self.send(&error_msg(
                    ErrorCode::BadFrame,
                    "a second hello",
                    None,
                    None,
                ))
                .await;
                false
            }
            ClientMsg::Ping { nonce } => self.send(&RelayMsg::Pong { nonce }).await,
            ClientMsg::Pong { .. } => true,
            ClientMsg::FeedMore { namespace, after } => self.feed(namespace, after).await,
            ClientMsg::Subscribe { namespaces, docs } => self.subscribe(namespaces, docs).await,
            ClientMsg::Pull {
                doc,
                after,
                max_bytes,
            } => self.pull(doc, after, max_bytes).await,
            ClientMsg::Push {
                namespace,
                doc,
                batch,
                changes,
            } => self.push(namespace, doc, batch, changes).await,
        }
    }

    async fn subscribe(&self, namespaces: Vec<String>, docs: Vec<DocId>) -> bool {
        let max = self.shared.cfg.limits.max_docs_per_connection as usize;
        if docs.len() > max {
            let m = format!(
                "{} documents is more than the {max} a connection may subscribe to",
                docs.len()
            );
            return self
                .send(&error_msg(ErrorCode::TooLarge, m, None, None))
                .await;
        }
        let (ok, refused): (Vec<String>, Vec<String>) =
            namespaces.into_iter().partition(|n| self.can_read(n));
        if let Some(c) = lock(&self.shared.conns).get_mut(&self.id) {
            c.namespaces = Some(ok.into_iter().collect());
            c.docs = docs.into_iter().collect();
        }
        for ns in refused {
            let m = format!("this token cannot read namespace '{ns}'");
            if !self
                .send(&error_msg(ErrorCode::Forbidden, m, None, None))
                .await
            {
                return false;
            }
        }
        true
    }

    async fn pull(&self, doc: DocId, after: u64, max_bytes: u64) -> bool {
        let page_bytes = match max_bytes {
            0 => self.shared.cfg.page_bytes,
            n => n.min(self.shared.cfg.page_bytes),
        };
        let page = match self
            .blocking(move |log| log.pull(&doc, after, page_bytes))
            .await
        {
            Some(Ok(p)) => p,
            _ => {
                return self
                    .send(&error_msg(
                        ErrorCode::Internal,
                        "could not read the log",
                        Some(doc),
                        None,
                    ))
                    .await
            }
        };
        if !page.namespace.is_empty() && !self.can_read(&page.namespace) {
            let m = format!("this token cannot read namespace '{}'", page.namespace);
            return self
                .send(&error_msg(ErrorCode::Forbidden, m, Some(doc), None))
                .await;
        }
        if let Some((upto, bytes)) = &page.snapshot {
            // Chunks well under the frame limit, leaving room for the message around them.
            let size = (self.shared.cfg.limits.max_frame_bytes as usize / 2).max(1024);
            let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
            let n = chunks.len().max(1) as u32;
            for (i, c) in chunks.iter().enumerate() {
                let m = RelayMsg::Snapshot {
                    doc,
                    namespace: page.namespace.clone(),
                    upto: *upto,
                    chunk: i as u32,
                    chunks: n,
                    bytes: c.to_vec(),
                };
                if !self.send(&m).await {
                    return false;
                }
            }
        }
        self.send(&RelayMsg::Changes {
            doc,
            namespace: page.namespace,
            from: page.from,
            to: page.to,
            changes: page.changes,
            more: page.more,
            remaining_bytes: page.remaining_bytes,
        })
        .await
    }

    async fn push(&self, namespace: String, doc: DocId, batch: u64, changes: Vec<Vec<u8>>) -> bool {
        let err = |code, m: String| error_msg(code, m, Some(doc), Some(batch));
        if !valid_namespace(&namespace) {
            return self
                .send(&err(
                    ErrorCode::BadFrame,
                    format!("'{namespace}' is not a valid namespace"),
                ))
                .await;
        }
        if !self.can_write(&namespace) {
            return self
                .send(&err(
                    ErrorCode::Forbidden,
                    format!("this token cannot write namespace '{namespace}'"),
                ))
                .await;
        }
        let limits = &self.shared.cfg.limits;
        if changes.len() > limits.max_changes_per_push as usize {
            let m = format!(
                "{} changes is more than the {} a push may carry",
                changes.len(),
                limits.max_changes_per_push
            );
            return self.send(&err(ErrorCode::TooLarge, m)).await;
        }
        if let Some(big) = changes
            .iter()
            .find(|c| c.len() as u64 > limits.max_change_bytes)
        {
            let m = format!(
                "a change of {} bytes is over the {}-byte limit",
                big.len(),
                limits.max_change_bytes
            );
            return self.send(&err(ErrorCode::TooLarge, m)).await;
        }
        let ns = namespace.clone();
        let result = self
            .blocking(move |log| log.push(&ns, &doc, &changes))
            .await;
        let pushed = match result {
            Some(Ok(p)) => p,
            Some(Err(PushError::NeedHistory { .. })) => {
                return self.send(&RelayMsg::NeedHistory { doc, batch }).await
            }
            Some(Err(e)) => {
                let code = match &e {
                    PushError::BadChange { .. } => ErrorCode::BadChange,
                    PushError::HashMismatch { .. } => ErrorCode::HashMismatch,
                    PushError::WrongNamespace(_) => ErrorCode::WrongNamespace,
                    _ => ErrorCode::Internal,
                };
                return self.send(&err(code, e.to_string())).await;
            }
            None => {
                return self
                    .send(&err(ErrorCode::Internal, "the push failed".into()))
                    .await
            }
        };
        // Durable: acknowledge, then fan out.
        let ok = self
            .send(&RelayMsg::Ack {
                doc,
                batch,
                seqs: pushed.seqs,
            })
            .await;
        if !pushed.new_changes.is_empty() {
            let to = pushed.new_from + pushed.new_changes.len() as u64 - 1;
            let live = RelayMsg::Changes {
                doc,
                namespace: namespace.clone(),
                from: pushed.new_from,
                to,
                changes: pushed.new_changes,
                more: false,
                remaining_bytes: 0,
            };
            if let Some(frame) = encode(&self.shared, &live) {
                self.fan_out(&namespace, &doc, frame);
            }
            if self.shared.log.wants_compaction(&doc) {
                let log = self.shared.log.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = log.compact(&doc) {
                        tracing::error!(%doc, error = %e, "compaction failed");
                    }
                });
            }
        }
        ok
    }

    fn fan_out(&self, ns: &str, doc: &DocId, frame: Bytes) {
        let conns = lock(&self.shared.conns);
        for (id, c) in conns.iter() {
            if *id == self.id || !c.wants(ns, doc) {
                continue;
            }
            match c.tx.try_send(frame.clone()) {
                Ok(()) => {
                    self.shared
                        .stats
                        .fanout_frames
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => c.close.notify_one(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    let s = &shared.log.stats;
    let n = &shared.stats;
    let (requests, flushes) = shared.log.flush_counts();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rows: [(&str, &str, u64); 19] = [
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
        ("tandem_relay_up", "gauge", 1),
    ];
    let mut out = String::new();
    for (name, kind, v) in rows {
        out.push_str(&format!("# TYPE {name} {kind}\n{name} {v}\n"));
    }
    out
}
