//! The tokio shell around [`ClientSession`]: WebSocket connections, frames through the codec,
//! timers, reconnecting with backoff, and the handle an application holds.
//!
//! The shell only moves bytes and time. Every session call that may touch the store
//! (`handle_message`, `handle_timeout`, `local_changed`, creating a session) runs on tokio's
//! blocking pool through [`Link::step`], never on an async worker thread: `Repo` and sled block.
//! The session sits behind a `std::sync::Mutex` that is only ever taken by one step at a time
//! (the connection loop awaits each step before the next), so the lock is never contended; the
//! cheap, pure calls (`poll_transmit`, `poll_timeout`, `is_synced`) take it on the async side.
//!
//! Not here: protocol decisions (the session), the wire format (`transport::codec`), the
//! backoff schedule itself (`transport::Backoff`, only driven from here).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::repo::{ConnState, Event, Origin, Repo};
use crate::transport::{codec, Backoff, BackoffConfig, ClientMsg, ErrorCode, RelayMsg};

use super::session::{ClientSession, DocIssue, SessionConfig};
use super::SyncError;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A `wait_synced` caller, answered once the session is in step.
type Waiter = oneshot::Sender<Result<(), SyncError>>;

/// Callers of `wait_synced` waiting at once, at most; more get an error.
const MAX_WAITERS: usize = 1024;
/// Issues a one-shot sync keeps for its report.
const MAX_REPORTED_ISSUES: usize = 256;
/// How long a graceful close may take before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The WebSocket's read buffer (see its use in `open`).
const READ_BUFFER: usize = 16 << 10;

/// How to reach the relay and how to behave on the way.
///
/// ```
/// use tandem::client::SyncConfig;
///
/// let cfg = SyncConfig::new("ws://127.0.0.1:7070, ws://10.0.0.2:7070").token("eyJ...");
/// assert_eq!(cfg.relays.len(), 2);
/// ```
#[derive(Clone)]
pub struct SyncConfig {
    /// Relay addresses, tried in turn when one fails: `ws://host:port` (the client adds
    /// `/v1`) or a full URL with its path.
    pub relays: Vec<String>,
    /// The JWT, sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The reconnect schedule (exponential, full jitter).
    pub backoff: BackoffConfig,
    /// `max_bytes` of every pull page.
    pub max_pull_bytes: u64,
    /// Ping when the connection was quiet this long.
    pub ping_every: Duration,
    /// Give up on a connection silent this long after a ping (also the connect timeout).
    pub dead_after: Duration,
    /// Others' presence is dropped when not heard of for this long (see
    /// [`Repo::set_presence`](crate::Repo::set_presence)).
    pub presence_ttl: Duration,
}

impl SyncConfig {
    /// A configuration for the relay(s) at `url` (comma-separated for several), no token,
    /// and the defaults: 1 MiB pulls, a ping every 15 s, dead after 30 s of silence.
    pub fn new(url: &str) -> SyncConfig {
        let session = SessionConfig::default();
        SyncConfig {
            relays: url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect(),
            token: None,
            backoff: BackoffConfig::default(),
            max_pull_bytes: session.max_pull_bytes,
            ping_every: session.ping_every,
            dead_after: session.dead_after,
            presence_ttl: session.presence_ttl,
        }
    }

    /// Add a relay to try after the others.
    pub fn relay(mut self, url: &str) -> SyncConfig {
        self.relays.push(url.trim().to_string());
        self
    }

    /// Authenticate with this token.
    pub fn token(mut self, token: &str) -> SyncConfig {
        self.token = Some(token.trim().to_string());
        self
    }

    fn session(&self) -> SessionConfig {
        SessionConfig {
            max_pull_bytes: self.max_pull_bytes,
            ping_every: self.ping_every,
            dead_after: self.dead_after,
            presence_ttl: self.presence_ttl,
            ..SessionConfig::default()
        }
    }
}

impl std::fmt::Debug for SyncConfig {
    // The token is a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("relays", &self.relays)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("backoff", &self.backoff)
            .field("max_pull_bytes", &self.max_pull_bytes)
            .field("ping_every", &self.ping_every)
            .field("dead_after", &self.dead_after)
            .field("presence_ttl", &self.presence_ttl)
            .finish()
    }
}

/// The URL to dial for a `--relay` value: `ws://host:port` (with or without a trailing `/`)
/// gets the protocol path `/v1`; a URL with another path is used as it is.
///
/// ```
/// use tandem::client::relay_url;
///
/// assert_eq!(relay_url("ws://127.0.0.1:7070"), "ws://127.0.0.1:7070/v1");
/// assert_eq!(relay_url("wss://relay.example/?token=abc"), "wss://relay.example/v1?token=abc");
/// assert_eq!(relay_url("ws://proxy.example/tandem/v1"), "ws://proxy.example/tandem/v1");
/// ```
pub fn relay_url(url: &str) -> String {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: the connector reports it in its own words.
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (path, suffix) = tail.split_at(tail.find(['?', '#']).unwrap_or(tail.len()));
    if path.is_empty() || path == "/" {
        format!("{scheme}://{authority}/v1{suffix}")
    } else {
        url.to_string()
    }
}

/// Traffic counters of a background sync task, over all its connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounters {
    pub connections: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `Pull` messages sent.
    pub pulls: u64,
    /// `Push` messages sent.
    pub pushes: u64,
}

/// State shared by the task and its handle.
struct Shared {
    state: Mutex<ConnState>,
    /// Why the task stopped for good: the relay's refusal code, or `None` when there was
    /// nothing to connect to; and the message.
    ended: Mutex<Option<(Option<ErrorCode>, String)>>,
    connections: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    pulls: AtomicU64,
    pushes: AtomicU64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            state: Mutex::new(ConnState::Offline),
            ended: Mutex::new(None),
            connections: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            pulls: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
        }
    }

    fn set_state(&self, repo: &Repo, state: ConnState) {
        let mut current = lock(&self.state);
        if *current != state {
            *current = state.clone();
            drop(current);
            repo.emit(Event::Connection(state));
        }
    }

    fn stopped(&self) -> SyncError {
        match lock(&self.ended).clone() {
            Some((Some(code), message)) => SyncError::Refused { code, message },
            Some((None, message)) => SyncError::Unreachable(message),
            None => SyncError::Protocol("the sync task has stopped".into()),
        }
    }

    /// The task stops for good: remember why, and tell every waiter.
    fn end(&self, code: Option<ErrorCode>, message: String, waiters: &mut Vec<Waiter>) {
        *lock(&self.ended) = Some((code, message));
        for w in waiters.drain(..) {
            let _ = w.send(Err(self.stopped()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the session half-updated in a way the store
    // would believe: every durable write is "apply, then cursor". Carry on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The application's handle on the background sync task started by [`connect`]. Dropping it
/// stops the task too (without waiting); [`stop`](Self::stop) waits for a clean close.
pub struct SyncHandle {
    shared: Arc<Shared>,
    control: mpsc::Sender<Waiter>,
    task: JoinHandle<()>,
}

impl SyncHandle {
    /// The connection state right now.
    pub fn state(&self) -> ConnState {
        lock(&self.shared.state).clone()
    }

    /// Traffic so far.
    pub fn counters(&self) -> SyncCounters {
        let s = &self.shared;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SyncCounters {
            connections: get(&s.connections),
            frames_sent: get(&s.frames_sent),
            frames_received: get(&s.frames_received),
            bytes_sent: get(&s.bytes_sent),
            bytes_received: get(&s.bytes_received),
            pulls: get(&s.pulls),
            pushes: get(&s.pushes),
        }
    }

    /// Wait until the task reports everything synced (pushed and acknowledged, pulled up to
    /// the feed heads) after every local change made before this call. Fails with `Timeout`,
    /// with `Refused` when the relay refused the token or refused local changes, or when the
    /// task has stopped.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), SyncError> {
        let (tx, rx) = oneshot::channel();
        let wait = async {
            if self.control.send(tx).await.is_err() {
                return Err(self.shared.stopped());
            }
            rx.await.unwrap_or_else(|_| Err(self.shared.stopped()))
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(SyncError::Timeout))
    }

    /// Stop the task: close the connection cleanly and wait for the task to end. Everything
    /// it learned is already in the store.
    pub async fn stop(self) {
        let SyncHandle { control, task, .. } = self;
        // Closing the control channel is the stop signal.
        drop(control);
        if let Err(e) = task.await {
            tracing::error!("the sync task failed: {e}");
        }
    }
}

/// Start the background sync task for `repo`. It connects (trying `cfg.relays` in turn),
/// pushes local changes as they are made, pulls what other devices push, and reconnects with
/// backoff when the connection drops, until stopped or refused (a bad token, a protocol
/// version the relay does not speak). Needs a tokio runtime.
///
/// ```no_run
/// # async fn demo(repo: tandem::Repo) -> Result<(), tandem::client::SyncError> {
/// use std::time::Duration;
/// use tandem::client::{connect, SyncConfig};
///
/// let sync = connect(&repo, SyncConfig::new("ws://127.0.0.1:7070").token("eyJ..."));
/// sync.wait_synced(Duration::from_secs(10)).await?;
/// sync.stop().await;
/// # Ok(()) }
/// ```
pub fn connect(repo: &Repo, cfg: SyncConfig) -> SyncHandle {
    let shared = Arc::new(Shared::new());
    let (control, control_rx) = mpsc::channel(64);
    // Subscribe before the task starts, so no local change made after `connect` returns is
    // missed.
    let events = repo.subscribe();
    let task = tokio::spawn(run(repo.clone(), cfg, shared.clone(), control_rx, events));
    SyncHandle {
        shared,
        control,
        task,
    }
}

/// What one [`sync_once`] pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The relay address that served the pass.
    pub relay: String,
    pub docs_pushed: u64,
    pub docs_pulled: u64,
    pub changes_pushed: u64,
    pub changes_pulled: u64,
    pub bytes_pushed: u64,
    pub bytes_pulled: u64,
    /// Documents or requests the pass gave up on, with why.
    pub issues: Vec<DocIssue>,
}

/// One pass: connect (each relay at most once, in turn), push everything pending, pull
/// everything up to the feed heads, close. `Refused` when the relay refused the token, or
/// refused local changes (a read-only token with changes pending); `Unreachable` when no
/// relay could be reached.
pub async fn sync_once(
    repo: &Repo,
    cfg: SyncConfig,
    timeout: Duration,
) -> Result<SyncReport, SyncError> {
    let shared = Arc::new(Shared::new());
    let pass = async {
        let mut last = None;
        for url in &cfg.relays {
            shared.set_state(repo, ConnState::Connecting);
            let ws = match open(url, &cfg, codec::DEFAULT_MAX_FRAME).await {
                Ok(ws) => ws,
                Err(e @ SyncError::Unreachable(_)) => {
                    tracing::warn!(relay = %url, "{e}");
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut events = Some(repo.subscribe());
            let mut link = Link::start(ws, repo, &cfg, shared.clone()).await?;
            // Nobody sends on this channel: a pass ends when synced, not when told.
            let (_keep, mut control) = mpsc::channel(1);
            let mut waiters = Vec::new();
            match drive(&mut link, &mut control, &mut waiters, &mut events, true).await {
                Ok(_) => {
                    let (stats, refusal) = {
                        let s = lock(&link.session);
                        (s.stats(), s.refusal())
                    };
                    link.close().await;
                    if let Some(refusal) = refusal {
                        return Err(refusal);
                    }
                    return Ok(SyncReport {
                        relay: url.clone(),
                        docs_pushed: stats.docs_pushed,
                        docs_pulled: stats.docs_pulled,
                        changes_pushed: stats.changes_pushed,
                        changes_pulled: stats.changes_pulled,
                        bytes_pushed: stats.bytes_pushed,
                        bytes_pulled: stats.bytes_pulled,
                        issues: link.issues,
                    });
                }
                Err(e @ SyncError::Unreachable(_)) => {
                    tracing::warn!(relay = %url, "{e}");
                    last = Some(e);
                }
                Err(e) => {
                    link.close().await;
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| SyncError::Unreachable("no relay address given".into())))
    };
    let result = tokio::time::timeout(timeout, pass)
        .await
        .unwrap_or(Err(SyncError::Timeout));
    shared.set_state(repo, ConnState::Offline);
    result
}

/// The background task: connect, drive, back off, repeat; until the handle is dropped or the
/// relay refuses us.
async fn run(
    repo: Repo,
    cfg: SyncConfig,
    shared: Arc<Shared>,
    mut control: mpsc::Receiver<Waiter>,
    events: broadcast::Receiver<Event>,
) {
    let mut events = Some(events);
    let mut waiters: Vec<Waiter> = Vec::new();
    if cfg.relays.is_empty() {
        tracing::error!("sync has no relay address to connect to");
        shared.end(None, "no relay address given".into(), &mut waiters);
        return;
    }
    let mut backoff = Backoff::new(cfg.backoff);
    // The relay that worked last is tried first.
    let mut preferred = 0;
    // Frames of the size the relay announced last time are accepted from the first frame on.
    let mut max_frame = codec::DEFAULT_MAX_FRAME;
    loop {
        let end = connect_round(
            &repo,
            &cfg,
            &shared,
            &mut control,
            &mut waiters,
            &mut events,
            &mut preferred,
            &mut max_frame,
            &mut backoff,
        )
        .await;
        shared.set_state(&repo, ConnState::Offline);
        match end {
            Ok(()) => return,
            Err(SyncError::Refused { code, message }) => {
                tracing::error!(
                    ?code,
                    "the relay refused this device, sync stops: {message}"
                );
                shared.end(Some(code), message, &mut waiters);
                return;
            }
            Err(e) => tracing::warn!("sync connection ended: {e}"),
        }
        let delay = {
            // Scoped: thread_rng is not Send and must not live across an await.
            let mut rng = rand::thread_rng();
            backoff.next_delay(&mut rng)
        };
        tracing::debug!(?delay, "reconnecting after a pause");
        let pause = tokio::time::sleep(delay);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                w = control.recv() => match w {
                    Some(w) => add_waiter(&mut waiters, w),
                    None => return,
                },
                // While offline, local changes need nothing: the next hello rescans the outbox.
                _ = next_event(&mut events) => {}
            }
        }
    }
}

/// One round of attempts: each relay once, starting with the preferred one, until one
/// connects; then drive that connection to its end. `Ok` means "stop".
#[allow(clippy::too_many_arguments)]
async fn connect_round(
    repo: &Repo,
    cfg: &SyncConfig,
    shared: &Arc<Shared>,
    control: &mut mpsc::Receiver<Waiter>,
    waiters: &mut Vec<Waiter>,
    events: &mut Option<broadcast::Receiver<Event>>,
    preferred: &mut usize,
    max_frame: &mut usize,
    backoff: &mut Backoff,
) -> Result<(), SyncError> {
    let n = cfg.relays.len();
    let mut last = None;
    for i in 0..n {
        let index = (*preferred + i) % n;
        let url = &cfg.relays[index];
        shared.set_state(repo, ConnState::Connecting);
        let opening = open(url, cfg, *max_frame);
        tokio::pin!(opening);
        let opened = loop {
            tokio::select! {
                r = &mut opening => break r,
                w = control.recv() => match w {
                    Some(w) => add_waiter(waiters, w),
                    None => return Ok(()),
                },
            }
        };
        let ws = match opened {
            Ok(ws) => ws,
            Err(e) if e.is_retryable() => {
                tracing::warn!(relay = %url, "{e}");
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        *preferred = index;
        let mut link = Link::start(ws, repo, cfg, shared.clone()).await?;
        let end = drive(&mut link, control, waiters, events, false).await;
        // Presence is what the relay tells live: with the connection gone, nobody is known to
        // be anywhere.
        repo.clear_peers();
        if let Some(at) = link.online_at {
            backoff.connected(at);
            *max_frame = lock(&link.session)
                .max_frame()
                .max(codec::DEFAULT_MAX_FRAME);
        }
        backoff.disconnected(Instant::now());
        return match end {
            Ok(_) => Ok(()),
            Err(e) => {
                if !matches!(e, SyncError::Unreachable(_)) {
                    link.close().await;
                }
                Err(e)
            }
        };
    }
    Err(last.unwrap_or_else(|| SyncError::Unreachable("no relay reachable".into())))
}

/// Open a WebSocket to the relay at `url` (with the protocol path added when it has none),
/// authenticating with the token on the upgrade request.
async fn open(url: &str, cfg: &SyncConfig, max_frame: usize) -> Result<Ws, SyncError> {
    let url = relay_url(url);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| SyncError::Unreachable(format!("{url}: {e}")))?;
    if let Some(token) = &cfg.token {
        let value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| SyncError::Refused {
                code: ErrorCode::Unauthorized,
                message: "the token holds characters an HTTP header cannot carry".into(),
            })?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    // tungstenite zero-fills its whole read buffer before every read from the socket: at its
    // default 128 KiB that is most of what receiving a small change costs (and it evicts the
    // caches). 16 KiB reads a large page in a few more reads.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(cfg.dead_after, connecting).await {
        Err(_) => Err(SyncError::Unreachable(format!(
            "{url}: no connection within {:?}",
            cfg.dead_after
        ))),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(response))) => {
            // A tandem relay answers a bad token inside the protocol; these come from a proxy
            // in front of it, and retrying will not change its mind.
            let status = response.status();
            let code = match status {
                StatusCode::UNAUTHORIZED => Some(ErrorCode::Unauthorized),
                StatusCode::FORBIDDEN => Some(ErrorCode::Forbidden),
                _ => None,
            };
            match code {
                Some(code) => Err(SyncError::Refused {
                    code,
                    message: format!("{url}: the upgrade was refused with HTTP {status}"),
                }),
                None => Err(SyncError::Unreachable(format!(
                    "{url}: the relay answered HTTP {status}"
                ))),
            }
        }
        Ok(Err(e)) => Err(SyncError::Unreachable(format!("{url}: {e}"))),
    }
}

/// One open connection and its session.
struct Link {
    ws: Ws,
    session: Arc<Mutex<ClientSession>>,
    repo: Repo,
    shared: Arc<Shared>,
    /// A send that does not complete in this time means the relay stopped reading.
    send_timeout: Duration,
    /// When the relay's hello was accepted.
    online_at: Option<Instant>,
    /// Issues seen, for a one-shot report (bounded).
    issues: Vec<DocIssue>,
}

impl Link {
    async fn start(
        ws: Ws,
        repo: &Repo,
        cfg: &SyncConfig,
        shared: Arc<Shared>,
    ) -> Result<Link, SyncError> {
        let session_cfg = cfg.session();
        let r = repo.clone();
        let session =
            blocking(move || ClientSession::new(Instant::now(), &r, session_cfg)).await??;
        shared.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Link {
            ws,
            session: Arc::new(Mutex::new(session)),
            repo: repo.clone(),
            shared,
            send_timeout: cfg.dead_after,
            online_at: None,
            issues: Vec::new(),
        })
    }

    /// Run one session call on the blocking pool.
    async fn step<F>(&self, f: F) -> Result<(), SyncError>
    where
        F: FnOnce(&mut ClientSession, &Repo) -> Result<(), SyncError> + Send + 'static,
    {
        let session = self.session.clone();
        let repo = self.repo.clone();
        blocking(move || f(&mut lock(&session), &repo)).await?
    }

    /// Send everything the session has queued, then flush.
    async fn flush(&mut self) -> Result<(), SyncError> {
        let mut sent = false;
        loop {
            let (msg, limit) = {
                let mut s = lock(&self.session);
                (s.poll_transmit(), s.max_frame())
            };
            let Some(msg) = msg else { break };
            let frame = codec::encode(&msg, limit)
                .map_err(|e| SyncError::Protocol(format!("cannot send a message: {e}")))?;
            let s = &self.shared;
            s.frames_sent.fetch_add(1, Ordering::Relaxed);
            s.bytes_sent
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            match msg {
                ClientMsg::Pull { .. } => s.pulls.fetch_add(1, Ordering::Relaxed),
                ClientMsg::Push { .. } => s.pushes.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            io(self.send_timeout, self.ws.feed(Message::binary(frame))).await?;
            sent = true;
        }
        if sent {
            io(self.send_timeout, self.ws.flush()).await?;
        }
        Ok(())
    }

    /// The message in a received frame; `None` for WebSocket-level control frames.
    fn decode(
        &self,
        frame: Option<Result<Message, WsError>>,
    ) -> Result<Option<RelayMsg>, SyncError> {
        match frame {
            None => Err(SyncError::Unreachable(
                "the relay closed the connection".into(),
            )),
            Some(Err(e)) => Err(SyncError::Unreachable(format!(
                "the connection failed: {e}"
            ))),
            Some(Ok(Message::Binary(bytes))) => {
                let s = &self.shared;
                s.frames_received.fetch_add(1, Ordering::Relaxed);
                s.bytes_received
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                let limit = lock(&self.session).max_frame();
                codec::decode(&bytes, limit).map(Some).map_err(|e| {
                    SyncError::Protocol(format!("an undecodable frame from the relay: {e}"))
                })
            }
            Some(Ok(Message::Text(_))) => {
                Err(SyncError::Protocol("the relay sent a text frame".into()))
            }
            Some(Ok(Message::Close(frame))) => Err(SyncError::Unreachable(match frame {
                Some(f) => format!("the relay closed the connection ({}: {})", f.code, f.reason),
                None => "the relay closed the connection".into(),
            })),
            Some(Ok(_)) => Ok(None),
        }
    }

    /// Close politely; give up after a short grace period.
    async fn close(&mut self) {
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if ws.close(None).await.is_ok() {
                // Read until the relay's close frame, which completes the handshake.
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }
}

/// A send that does not complete within `limit` means the relay stopped reading.
async fn io(
    limit: Duration,
    op: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), SyncError> {
    match tokio::time::timeout(limit, op).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SyncError::Unreachable(format!("sending failed: {e}"))),
        Err(_) => Err(SyncError::Unreachable(format!(
            "the relay took no frame for {limit:?}"
        ))),
    }
}

/// What woke the connection loop.
enum Input {
    Frame(Option<Result<Message, WsError>>),
    Timeout,
    Event(Option<Result<Event, RecvError>>),
    Control(Option<Waiter>),
    Presence,
}

/// How a connection loop ended without an error.
enum End {
    /// The handle asked to stop.
    Stopped,
    /// A one-shot pass is done.
    Synced,
}

/// The connection loop: send what the session queued, wait for a frame, a timer, a local
/// change or a control message, hand it to the session, repeat.
async fn drive(
    link: &mut Link,
    control: &mut mpsc::Receiver<Waiter>,
    waiters: &mut Vec<Waiter>,
    events: &mut Option<broadcast::Receiver<Event>>,
    once: bool,
) -> Result<End, SyncError> {
    loop {
        link.flush().await?;
        let (synced, ready, deadline) = {
            let mut s = lock(&link.session);
            while let Some(issue) = s.poll_issue() {
                tracing::warn!(doc = ?issue.doc, code = ?issue.code, "sync issue: {}", issue.message);
                if link.issues.len() < MAX_REPORTED_ISSUES {
                    link.issues.push(issue);
                }
            }
            (s.is_synced(), s.is_ready(), s.poll_timeout())
        };
        if ready && link.online_at.is_none() {
            link.online_at = Some(Instant::now());
            link.shared.set_state(&link.repo, ConnState::Online);
        }
        if synced {
            if once {
                return Ok(End::Synced);
            }
            if !waiters.is_empty() {
                let session = lock(&link.session);
                for w in waiters.drain(..) {
                    let _ = w.send(session.refusal().map_or(Ok(()), Err));
                }
            }
        }
        let input = tokio::select! {
            frame = link.ws.next() => Input::Frame(frame),
            () = sleep_until(deadline) => Input::Timeout,
            event = next_event(events) => Input::Event(event),
            waiter = control.recv() => Input::Control(waiter),
            () = link.repo.presence_changed() => Input::Presence,
        };
        match input {
            Input::Frame(frame) => {
                if let Some(msg) = link.decode(frame)? {
                    link.step(move |s, r| s.handle_message(Instant::now(), msg, r))
                        .await?;
                }
            }
            Input::Timeout => {
                link.step(|s, r| s.handle_timeout(Instant::now(), r))
                    .await?
            }
            Input::Event(event) => {
                let (docs, lagged) = local_changes(event, events);
                note_local_changes(link, docs, lagged).await?;
            }
            Input::Presence => {
                link.step(|s, r| s.presence_changed(Instant::now(), r))
                    .await?
            }
            Input::Control(None) => {
                link.close().await;
                return Ok(End::Stopped);
            }
            Input::Control(Some(waiter)) => {
                // Every local change made before `wait_synced` was called already sits in
                // the event channel: take them in before judging "synced".
                let (docs, lagged) = local_changes(None, events);
                note_local_changes(link, docs, lagged).await?;
                add_waiter(waiters, waiter);
            }
        }
    }
}

/// The documents changed locally according to `first` and whatever else is already waiting
/// in the channel, and whether events were lost (then the outbox is rescanned).
fn local_changes(
    first: Option<Result<Event, RecvError>>,
    events: &mut Option<broadcast::Receiver<Event>>,
) -> (Vec<crate::ids::DocId>, bool) {
    let mut docs = Vec::new();
    let mut lagged = false;
    let mut take = |e: Result<Event, RecvError>, events: &mut Option<_>| match e {
        Ok(Event::Changed {
            doc,
            origin: Origin::Local,
            ..
        }) => {
            if !docs.contains(&doc) {
                docs.push(doc);
            }
        }
        Ok(_) => {}
        Err(RecvError::Lagged(_)) => lagged = true,
        Err(RecvError::Closed) => *events = None,
    };
    if let Some(e) = first {
        take(e, events);
    }
    // The channel holds at most its capacity (1,024 events), so this loop is bounded.
    while let Some(rx) = events.as_mut() {
        match rx.try_recv() {
            Ok(e) => take(Ok(e), events),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                take(Err(RecvError::Lagged(n)), events)
            }
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(broadcast::error::TryRecvError::Closed) => take(Err(RecvError::Closed), events),
        }
    }
    (docs, lagged)
}

async fn note_local_changes(
    link: &Link,
    docs: Vec<crate::ids::DocId>,
    lagged: bool,
) -> Result<(), SyncError> {
    if docs.is_empty() && !lagged {
        return Ok(());
    }
    link.step(move |s, r| {
        let now = Instant::now();
        if lagged {
            return s.rescan_outbox(now, r);
        }
        for doc in docs {
            s.local_changed(now, doc, r)?;
        }
        Ok(())
    })
    .await
}

fn add_waiter(waiters: &mut Vec<Waiter>, waiter: Waiter) {
    waiters.retain(|w| !w.is_closed());
    if waiters.len() >= MAX_WAITERS {
        let _ = waiter.send(Err(SyncError::Protocol(format!(
            "more than {MAX_WAITERS} callers wait for sync at once"
        ))));
        return;
    }
    waiters.push(waiter);
}

async fn next_event(
    events: &mut Option<broadcast::Receiver<Event>>,
) -> Option<Result<Event, RecvError>> {
    match events {
        Some(rx) => Some(rx.recv().await),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Run blocking work (the store, Automerge) on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, SyncError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SyncError::Protocol(format!("a sync step failed: {e}")))
}
