//! Relay load generator. It starts a relay in-process on 127.0.0.1 (port 0, a real sled folder
//! in a tempdir, fsync on as in production) or, for memory, the real `tandem relay` binary as a
//! child process, and drives it over real loopback WebSockets on the same machine (so the load
//! generator and the relay share its cores). It prints a markdown table; the figures and where
//! their time goes are in docs/performance.md ("Relay").
//!
//! Sections (`TANDEM_BENCH_ONLY=acks,fanout,reconnect,memory` picks some):
//! - `acks`: durably acknowledged changes/s from N connections pushing pipelined batches;
//! - `fanout`: push-send to subscriber-receive latency, 100 subscribers, 1,000 changes/s;
//! - `reconnect`: bytes on the wire for a device with 1,000 documents, 10 changed elsewhere,
//!   next to what Automerge's own sync protocol exchanges for the same documents;
//! - `memory`: the relay binary's RSS per idle connection and with 10,000 idle documents.
//!
//! `cargo bench --bench relay` (full sizes, a few minutes on 2 cores);
//! `TANDEM_BENCH_TRACE=1` also prints the fan-out latency over time (to stderr);
//! `TANDEM_BENCH_SCALE=0.1 cargo bench --bench relay` for a quick look. Every loop is bounded
//! in count, and every wait in time ([`WAIT`]): a stuck relay fails the run, never hangs it.
//! Not measured here: TLS, other storage backends, a relay on another machine.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::json;
use tandem::client::{sync_once, SyncConfig};
use tandem::relay::auth::{mint, Secret};
use tandem::relay::storage::RelayStore;
use tandem::relay::{start, Auth, RelayConfig, RelayHandle};
use tandem::transport::{codec, ClientMsg, RelayMsg, PROTOCOL_VERSION};
use tandem::{DocId, Repo, RepoOptions, Schema};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const MAX_FRAME: usize = 16 << 20;
/// The longest any single wait may take.
const WAIT: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "bench";

fn scale() -> f64 {
    std::env::var("TANDEM_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(1)
}

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn row(name: &str, value: String, target: &str, note: &str) {
    println!("| {name} | {value} | {target} | {note} |");
}

/// A tokio runtime with two workers, like `tandem relay`'s on this 2-core machine.
fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A relay in this process, on its own runtime (the load generator runs on another one, as it
/// would in another process), storing in a real sled folder.
struct InProcess {
    rt: Runtime,
    handles: Vec<RelayHandle>,
    _dir: tempfile::TempDir,
}

/// Which relay a section measures.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Backend {
    /// One relay on a sled folder (the default).
    Sled,
    /// This many relay nodes sharing one PostgreSQL (a fresh schema) and the local Redis.
    Postgres(usize),
}

impl Backend {
    fn label(self) -> String {
        match self {
            Backend::Sled => "sled".into(),
            Backend::Postgres(1) => "PostgreSQL, 1 node".into(),
            Backend::Postgres(n) => format!("PostgreSQL, {n} nodes"),
        }
    }
}

/// A fresh schema in the benchmark database (`TANDEM_BENCH_POSTGRES`, default the local
/// `test` database), as a URL.
fn pg_schema() -> String {
    let base = std::env::var("TANDEM_BENCH_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let name = format!("tandem_bench_{:x}", rand::random::<u64>());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .expect("the PostgreSQL sections need a database (TANDEM_BENCH_POSTGRES)");
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {name}; COMMENT ON SCHEMA {name} IS 'tandem benchmark, droppable'"
            ))
            .await
            .expect("create schema");
    });
    format!("{base} options='-c search_path={name}'")
}

impl InProcess {
    fn start(auth: Auth) -> InProcess {
        InProcess::start_on(auth, Backend::Sled)
    }

    fn start_on(auth: Auth, backend: Backend) -> InProcess {
        let rt = runtime("relay");
        let dir = tempfile::tempdir().expect("tempdir");
        let (nodes, pg) = match backend {
            Backend::Sled => (1, None),
            Backend::Postgres(n) => (n, Some(pg_schema())),
        };
        let handles = (0..nodes)
            .map(|_| {
                let mut cfg = RelayConfig::new(
                    "127.0.0.1:0".parse().expect("address"),
                    Some(dir.path().join("relay")),
                    auth.clone(),
                );
                cfg.postgres = pg.clone();
                cfg.redis = pg.as_ref().map(|_| "redis://127.0.0.1:6379".to_string());
                rt.block_on(start(cfg)).expect("relay starts")
            })
            .collect();
        InProcess {
            rt,
            handles,
            _dir: dir,
        }
    }

    fn handle(&self) -> &RelayHandle {
        self.handles.first().expect("relay running")
    }

    fn addr(&self) -> SocketAddr {
        self.handle().addr
    }

    /// Every node's address (one for sled).
    fn addrs(&self) -> Vec<SocketAddr> {
        self.handles.iter().map(|h| h.addr).collect()
    }

    /// A storage counter summed over the nodes.
    fn sum(&self, f: impl Fn(&dyn RelayStore) -> u64) -> u64 {
        self.handles.iter().map(|h| f(&*h.log)).sum()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        for h in self.handles.drain(..) {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(WAIT, h.shutdown()).await });
        }
    }
}

/// Open a WebSocket to the relay. Buffers are small, as the relay sets its own: 10,000 client
/// sockets with tungstenite's defaults would cost this process over a GiB.
async fn dial(addr: SocketAddr, token: Option<&str>) -> Ws {
    let mut req = format!("ws://{addr}/v1")
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    let connecting = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true);
    let (ws, _) = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("connected in time")
        .expect("connected");
    ws
}

async fn send<S>(sink: &mut S, msg: &ClientMsg)
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    let bytes = codec::encode(msg, MAX_FRAME).expect("encode");
    sink.send(Message::Binary(bytes.into()))
        .await
        .expect("frame sent");
}

/// The next protocol message and when its frame arrived (before decoding it).
async fn recv<S>(stream: &mut S) -> (Instant, RelayMsg)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    for _ in 0..16 {
        let next = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("the relay answered in time");
        let at = Instant::now();
        match next {
            Some(Ok(Message::Binary(b))) => {
                return (at, codec::decode(&b, MAX_FRAME).expect("decode"))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("the relay closed or broke the connection: {other:?}"),
        }
    }
    panic!("the relay sent only control frames");
}

async fn handshake(ws: &mut Ws) {
    send(
        ws,
        &ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            device: rand::random(),
            feeds: Vec::new(),
        },
    )
    .await;
    match recv(ws).await.1 {
        RelayMsg::Hello { .. } => {}
        other => panic!("expected the relay's hello, got {}", brief(&other)),
    }
}

/// Subscribe to `namespaces` (nothing: no live changes at all) and wait until the relay has
/// taken it: it answers in order, so once the pong is here the subscription holds.
async fn subscribe(ws: &mut Ws, namespaces: &[&str]) {
    let namespaces = namespaces.iter().map(|n| n.to_string()).collect();
    send(
        ws,
        &ClientMsg::Subscribe {
            namespaces,
            docs: Vec::new(),
        },
    )
    .await;
    send(ws, &ClientMsg::Ping { nonce: 1 }).await;
    match recv(ws).await.1 {
        RelayMsg::Pong { .. } => {}
        other => panic!("expected a pong, got {}", brief(&other)),
    }
}

/// A message for a panic: its start, not kilobytes of change bytes.
fn brief(msg: &RelayMsg) -> String {
    let mut s = format!("{msg:?}");
    s.truncate(200);
    s
}

/// `n` changes of one fresh document in causal order, raw (uncompressed) as an outbox holds
/// them: a note's first change, then edits that each put a title and a small counter.
fn note_changes(n: usize, seed: usize) -> Vec<Vec<u8>> {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "_type", "note").expect("put");
    doc.put(automerge::ROOT, "_schema", 1u64).expect("put");
    doc.commit();
    for i in 1..n {
        doc.put(
            automerge::ROOT,
            "title",
            format!("note {seed}, revision {i}: groceries, then the library"),
        )
        .expect("put");
        doc.put(automerge::ROOT, "revision", i as u64).expect("put");
        doc.commit();
    }
    doc.get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// Push `pushes` on one connection, at most `window` unanswered at a time, as a device's outbox
/// does; returns each push's send-to-ack latency.
async fn push_all(ws: Ws, pushes: Vec<(DocId, Vec<Vec<u8>>)>, window: usize) -> Vec<Duration> {
    let (mut sink, mut stream) = ws.split();
    let n = pushes.len();
    let base = Instant::now();
    // Send times by batch number, as nanoseconds after `base`; stored before the frame goes
    // out, so the reader always finds it.
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let free = Arc::new(Semaphore::new(window));
    let writer = {
        let (sent, free) = (sent.clone(), free.clone());
        tokio::spawn(async move {
            for (i, (doc, changes)) in pushes.into_iter().enumerate() {
                free.acquire().await.expect("semaphore").forget();
                sent[i].store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let msg = ClientMsg::Push {
                    namespace: NAMESPACE.into(),
                    doc,
                    batch: i as u64,
                    changes,
                };
                send(&mut sink, &msg).await;
            }
            sink
        })
    };
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        match recv(&mut stream).await {
            (at, RelayMsg::Ack { batch, .. }) => {
                let t = sent[batch as usize].load(Ordering::Relaxed);
                latencies.push(at.duration_since(base) - Duration::from_nanos(t));
                free.add_permits(1);
            }
            (_, other) => panic!("expected an ack, got {}", brief(&other)),
        }
    }
    let sink = writer.await.expect("writer");
    if let Ok(mut ws) = sink.reunite(stream) {
        let _ = tokio::time::timeout(WAIT, ws.close(None)).await;
    }
    latencies
}

/// Section `acks`: N connections, each pushing its own document's changes in batches of 50,
/// pipelined, for a fixed count.
fn durable_acks(client: &Runtime, backend: Backend, conns: usize, total: usize) {
    const BATCH: usize = 50;
    const WINDOW: usize = 4;
    let per_conn = (total / conns / BATCH).max(1) * BATCH;
    let work: Vec<Vec<(DocId, Vec<Vec<u8>>)>> = (0..conns)
        .map(|c| {
            let doc = DocId::generate();
            note_changes(per_conn, c)
                .chunks(BATCH)
                .map(|b| (doc, b.to_vec()))
                .collect()
        })
        .collect();
    let bytes: usize = work
        .iter()
        .flatten()
        .flat_map(|(_, b)| b.iter().map(Vec::len))
        .sum();
    let changes = conns * per_conn;
    let relay = InProcess::start_on(Auth::InsecureNoAuth, backend);
    let addrs = relay.addrs();
    let flushes0 = relay.sum(|l| l.flush_counts().1);
    let (elapsed, mut latencies) = client.block_on(async move {
        let mut socks = Vec::with_capacity(conns);
        for c in 0..conns {
            // Connections spread over the nodes.
            let mut ws = dial(addrs[c % addrs.len()], None).await;
            handshake(&mut ws).await;
            // A pusher that follows only its own document: the others' changes would turn
            // this into a fan-out test.
            subscribe(&mut ws, &[]).await;
            socks.push(ws);
        }
        let t0 = Instant::now();
        let tasks: Vec<_> = socks
            .into_iter()
            .zip(work)
            .map(|(ws, pushes)| tokio::spawn(push_all(ws, pushes, WINDOW)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("pusher"));
        }
        (t0.elapsed(), all)
    });
    let flushes = relay.sum(|l| l.flush_counts().1);
    let pushes = relay.sum(|l| l.stats().pushes.load(Ordering::Relaxed));
    let accepted = relay.sum(|l| l.stats().changes_accepted.load(Ordering::Relaxed));
    assert_eq!(accepted, changes as u64, "every change stored once");
    row(
        &format!("durable acks, {conns} connections, {}", backend.label()),
        format!("{:.0} changes/s", changes as f64 / elapsed.as_secs_f64()),
        "≥ 20,000/s",
        &format!(
            "{changes} changes of {:.0} B avg, {BATCH} per push, ≤ {WINDOW} pushes in flight per connection, in {}; \
             ack latency p50 {} / p99 {}; {:.1} pushes per flush (or commit)",
            bytes as f64 / changes as f64,
            ms(elapsed),
            ms(pct(&mut latencies, 0.5)),
            ms(pct(&mut latencies, 0.99)),
            pushes as f64 / (flushes - flushes0).max(1) as f64
        ),
    );
}

fn nanos(base: Instant, t: Instant) -> u64 {
    t.duration_since(base).as_nanos() as u64
}

/// What the fan-out section talks to.
#[derive(Clone, Copy, PartialEq)]
enum FanOutServer {
    /// The relay, with its protocol, durability and subscriptions.
    Relay,
    /// The floor: a bare WebSocket broadcaster, no protocol, no storage.
    Bare,
}

/// The floor for fan-out on this machine: tokio-tungstenite with the relay's buffer sizes,
/// forwarding each binary frame one connection sends to every other connection, on its own
/// runtime. No protocol, no storage, no subscriptions: what is left is sockets and tasks.
struct Broadcaster {
    /// Owns every task of the broadcaster: dropping it ends them.
    _rt: Runtime,
    addr: SocketAddr,
}

impl Broadcaster {
    fn start() -> Broadcaster {
        let rt = runtime("bare");
        let addr = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let (tx, _) = tokio::sync::broadcast::channel::<(
                u64,
                tokio_tungstenite::tungstenite::Bytes,
            )>(4096);
            // Everything here ends with the runtime, or after this many connections.
            tokio::spawn(async move {
                for id in 0..10_000u64 {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let tx = tx.clone();
                    let mut rx = tx.subscribe();
                    tokio::spawn(async move {
                        let cfg = WebSocketConfig::default()
                            .read_buffer_size(4096)
                            .write_buffer_size(0);
                        let accepting = tokio_tungstenite::accept_async_with_config(tcp, Some(cfg));
                        let Ok(ws) = accepting.await else { return };
                        let (mut sink, mut stream) = ws.split();
                        let writer = tokio::spawn(async move {
                            while let Ok((from, frame)) = rx.recv().await {
                                if from != id && sink.send(Message::Binary(frame)).await.is_err() {
                                    break;
                                }
                            }
                        });
                        while let Some(Ok(m)) = stream.next().await {
                            if let Message::Binary(b) = m {
                                let _ = tx.send((id, b));
                            }
                        }
                        writer.abort();
                    });
                }
            });
            addr
        });
        Broadcaster { _rt: rt, addr }
    }
}

/// Section `fanout`: `subs` connections subscribed to one namespace; one pusher sends `rate`
/// changes/s to one document in it, one change per push, paced; every subscriber timestamps
/// each arrival.
fn fan_out(
    client: &Runtime,
    server: FanOutServer,
    backend: Backend,
    subs: usize,
    rate: u32,
    secs: f64,
) {
    let n = ((rate as f64 * secs) as usize).max(1);
    let changes = note_changes(n, 0);
    let size = changes.iter().map(Vec::len).sum::<usize>() / n;
    let doc = DocId::generate();
    // What goes out: a push to the relay; to the broadcaster, the frame the relay would send
    // on, so the subscribers' work is the same.
    let frames: Vec<Vec<u8>> = changes
        .into_iter()
        .enumerate()
        .map(|(i, change)| {
            let seq = i as u64 + 1;
            let bytes = match server {
                FanOutServer::Relay => codec::encode(
                    &ClientMsg::Push {
                        namespace: NAMESPACE.into(),
                        doc,
                        batch: i as u64,
                        changes: vec![change],
                    },
                    MAX_FRAME,
                ),
                FanOutServer::Bare => codec::encode(
                    &RelayMsg::Changes {
                        doc,
                        namespace: NAMESPACE.into(),
                        from: seq,
                        to: seq,
                        changes: vec![change],
                        more: false,
                        remaining_bytes: 0,
                    },
                    MAX_FRAME,
                ),
            };
            bytes.expect("encode")
        })
        .collect();
    let (relay, bare) = match server {
        FanOutServer::Relay => (
            Some(InProcess::start_on(Auth::InsecureNoAuth, backend)),
            None,
        ),
        FanOutServer::Bare => (None, Some(Broadcaster::start())),
    };
    let addrs = match (&relay, &bare) {
        (Some(r), _) => r.addrs(),
        (_, Some(b)) => vec![b.addr],
        _ => unreachable!("one server runs"),
    };
    // The pusher on the first node, the subscribers spread over all of them.
    let addr = addrs[0];
    let cpu0 = cpu_seconds();
    let wall0 = Instant::now();
    let (mut latencies, acked) = client.block_on(async move {
        let base = Instant::now();
        let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let mut listeners = Vec::with_capacity(subs);
        for s in 0..subs {
            let mut ws = dial(addrs[s % addrs.len()], None).await;
            if server == FanOutServer::Relay {
                handshake(&mut ws).await;
                subscribe(&mut ws, &[NAMESPACE]).await;
            }
            listeners.push(tokio::spawn(async move {
                let mut arrived = vec![0u64; n];
                let mut got = 0;
                // One deadline for the whole run rather than a timer per frame: 100,000 timer
                // registrations a second would cost this process more than the frames do.
                let all = async {
                    // Several nodes may deliver a change twice (pub/sub and the feed poll):
                    // the first arrival counts.
                    for _ in 0..2 * n + 16 {
                        if got == n {
                            break;
                        }
                        match ws.next().await {
                            Some(Ok(Message::Binary(b))) => {
                                let at = Instant::now();
                                match codec::decode(&b, MAX_FRAME).expect("decode") {
                                    RelayMsg::Changes { from, to, .. } => {
                                        for seq in from..=to {
                                            let slot = &mut arrived[seq as usize - 1];
                                            if *slot == 0 {
                                                *slot = nanos(base, at);
                                                got += 1;
                                            }
                                        }
                                    }
                                    other => panic!("expected live changes, got {}", brief(&other)),
                                }
                            }
                            other => panic!("the relay closed the subscription: {other:?}"),
                        }
                    }
                };
                let limit = WAIT + Duration::from_secs_f64(secs);
                tokio::time::timeout(limit, all)
                    .await
                    .expect("every change in time");
                assert_eq!(got, n, "every change reached every subscriber");
                let _ = tokio::time::timeout(WAIT, ws.close(None)).await;
                arrived
            }));
        }
        let mut ws = dial(addr, None).await;
        let acks = match server {
            FanOutServer::Relay => {
                handshake(&mut ws).await;
                subscribe(&mut ws, &[]).await;
                n
            }
            FanOutServer::Bare => {
                // The broadcaster subscribes a connection once its upgrade is done; give the
                // last ones a moment, as nothing answers to say so.
                tokio::time::sleep(Duration::from_millis(500)).await;
                0
            }
        };
        let (mut sink, mut stream) = ws.split();
        let acks = {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(acks);
                for _ in 0..acks {
                    match recv(&mut stream).await {
                        (at, RelayMsg::Ack { batch, .. }) => {
                            let t = sent[batch as usize].load(Ordering::Relaxed);
                            latencies.push(Duration::from_nanos(nanos(base, at).saturating_sub(t)));
                        }
                        (_, other) => panic!("expected an ack, got {}", brief(&other)),
                    }
                }
                (stream, latencies)
            })
        };
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let t0 = tokio::time::Instant::now();
        for (i, frame) in frames.into_iter().enumerate() {
            tokio::time::sleep_until(t0 + period * i as u32).await;
            sent[i].store(nanos(base, Instant::now()), Ordering::Relaxed);
            sink.send(Message::Binary(frame.into()))
                .await
                .expect("frame sent");
        }
        let (stream, mut ack_latencies) = acks.await.expect("acks");
        let mut latencies = Vec::with_capacity(n * subs);
        // The worst latency of every 100 changes, over time: a backlog grows, a stall spikes.
        let mut worst = vec![0u64; n.div_ceil(100)];
        for l in listeners {
            let arrived = l.await.expect("subscriber");
            for (i, a) in arrived.into_iter().enumerate() {
                let l = a.saturating_sub(sent[i].load(Ordering::Relaxed));
                worst[i / 100] = worst[i / 100].max(l);
                latencies.push(Duration::from_nanos(l));
            }
        }
        if std::env::var_os("TANDEM_BENCH_TRACE").is_some() {
            let ms: Vec<u64> = worst.iter().map(|w| w / 1_000_000).collect();
            eprintln!("fan-out: worst latency (ms) per 100 changes: {ms:?}");
        }
        if let Ok(mut ws) = sink.reunite(stream) {
            let _ = tokio::time::timeout(WAIT, ws.close(None)).await;
        }
        let acked = match ack_latencies.is_empty() {
            true => String::new(),
            false => format!(
                "; the pusher's acks (durable) p50 {} / p99 {}",
                ms(pct(&mut ack_latencies, 0.5)),
                ms(pct(&mut ack_latencies, 0.99))
            ),
        };
        (latencies, acked)
    });
    let cpu = (cpu_seconds() - cpu0) / wall0.elapsed().as_secs_f64();
    drop(relay);
    drop(bare);
    let max = *latencies.iter().max().expect("samples");
    let (name, target, what) = match server {
        FanOutServer::Relay => (
            format!(
                "fan-out, {subs} subscribers, {rate} changes/s, {}",
                backend.label()
            ),
            "p99 ≤ 20 ms",
            "push sent → subscriber received",
        ),
        FanOutServer::Bare => (
            format!("floor: bare WebSocket broadcast, {subs} subscribers, {rate} frames/s"),
            "",
            "frame sent → subscriber received, no protocol or storage",
        ),
    };
    row(
        &name,
        format!(
            "p50 {} / p99 {}",
            ms(pct(&mut latencies, 0.5)),
            ms(pct(&mut latencies, 0.99))
        ),
        target,
        &format!(
            "{what}; {n} changes of {size} B, one per frame, {} deliveries; max {}{acked}; \
             this process used {:.2} cores meanwhile",
            latencies.len(),
            ms(max),
            cpu
        ),
    );
}

/// A TCP proxy on loopback that counts the bytes going each way: what the reconnect costs on
/// the wire, WebSocket framing and the HTTP upgrade included.
struct CountingProxy {
    addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(target: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (u, d) = (up.clone(), down.clone());
        // Ends when the proxy is dropped (aborted), or after this many connections.
        let accept = tokio::spawn(async move {
            for _ in 0..1000 {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(relay) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = relay.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (rr, rw) = relay.into_split();
                tokio::spawn(pump(cr, rw, u.clone()));
                tokio::spawn(pump(rr, cw, d.clone()));
            }
        });
        CountingProxy {
            addr,
            up,
            down,
            accept,
        }
    }

    /// (client → relay, relay → client) bytes since the last call.
    fn take(&self) -> (u64, u64) {
        (
            self.up.swap(0, Ordering::SeqCst),
            self.down.swap(0, Ordering::SeqCst),
        )
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copy until either side closes (each read is bounded by the connection's life).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(Ok(k)) = tokio::time::timeout(WAIT, from.read(&mut buf)).await {
        if k == 0 {
            break;
        }
        count.fetch_add(k as u64, Ordering::SeqCst);
        if to.write_all(&buf[..k]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Bytes Automerge's own sync protocol exchanges to bring two copies of a document in step,
/// starting from fresh sync states (a device reconnecting without persisted sync state):
/// (bytes, messages). Message bodies only, no framing: the comparison favours Automerge.
fn automerge_sync(a: &[u8], b: &[u8]) -> (u64, u64) {
    let mut a = automerge::Automerge::load(a).expect("load a");
    let mut b = automerge::Automerge::load(b).expect("load b");
    let mut sa = automerge::sync::State::new();
    let mut sb = automerge::sync::State::new();
    let (mut bytes, mut messages) = (0u64, 0u64);
    for _ in 0..32 {
        let mut quiet = true;
        if let Some(m) = a.generate_sync_message(&mut sa) {
            let wire = m.encode();
            bytes += wire.len() as u64;
            messages += 1;
            let m = automerge::sync::Message::decode(&wire).expect("decode");
            b.receive_sync_message(&mut sb, m).expect("receive");
            quiet = false;
        }
        if let Some(m) = b.generate_sync_message(&mut sb) {
            let wire = m.encode();
            bytes += wire.len() as u64;
            messages += 1;
            let m = automerge::sync::Message::decode(&wire).expect("decode");
            a.receive_sync_message(&mut sa, m).expect("receive");
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    assert_eq!(a.get_heads(), b.get_heads(), "Automerge sync converged");
    (bytes, messages)
}

fn note_schema() -> Schema {
    Schema::from_toml(
        r#"
        version = 1
        [types.note]
        title = "critical"
        body = "text"
        views = "counter"
        pinned = "lww"
        "#,
    )
    .expect("schema")
}

fn device(dir: &Path, author: &str) -> Repo {
    let mut opts = RepoOptions::new(author).schema(note_schema());
    // The devices' own durability does not change a byte on the wire; it only slows the setup.
    opts.store.fsync = false;
    Repo::open(dir, opts).expect("open repo")
}

/// Section `reconnect`: device A holds `docs` documents, all synced; device B changes `changed`
/// of them and syncs; A reconnects. Bytes on the wire for A's `sync_once`, next to
/// Automerge's sync protocol between A's and B's copies of every document.
fn reconnect(client: &Runtime, docs: usize, changed: usize) {
    let secret = b"relay-bench-secret-0123456789abcdef";
    let relay = InProcess::start(Auth::Jwt(Arc::new(
        Secret::from_bytes(secret).expect("secret"),
    )));
    let token = mint(
        &Secret::from_bytes(secret).expect("secret"),
        "bench",
        &[],
        &[NAMESPACE.to_string()],
        Duration::from_secs(3600),
        SystemTime::now(),
    );
    let addr = relay.addr();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (device(dir_a.path(), "ada"), device(dir_b.path(), "bob"));
    let body: String = "milk, eggs, bread, coffee; call the plumber about the sink. ".repeat(4);
    let ids: Vec<DocId> = (0..docs)
        .map(|i| {
            let id = a
                .create_in(
                    NAMESPACE,
                    "note",
                    json!({"title": format!("note {i}"), "body": body, "pinned": false}),
                )
                .expect("create");
            for e in 0..4 {
                a.change(&id, |tx| {
                    tx.set("title", format!("note {i}, edit {e}"))?;
                    tx.splice_text("body", 0, 0, "- ")?;
                    tx.increment("views", 1)
                })
                .expect("change");
            }
            id
        })
        .collect();
    let direct = SyncConfig::new(&format!("ws://{addr}")).token(&token);
    client.block_on(async {
        let once = |r: Repo| {
            let cfg = direct.clone();
            async move { sync_once(&r, cfg, WAIT * 5).await.expect("sync pass") }
        };
        once(a.clone()).await;
        once(b.clone()).await;
        // Once more, so A's cursors have stepped over its own pushes: a steady state.
        once(a.clone()).await;
        for id in ids.iter().take(changed) {
            b.change(id, |tx| {
                tx.set("title", "changed elsewhere")?;
                tx.splice_text("body", 0, 0, "+ ")
            })
            .expect("change on b");
        }
        once(b.clone()).await;
    });
    let before: Vec<(Vec<u8>, Vec<u8>)> = ids
        .iter()
        .map(|id| (a.export(id).expect("export"), b.export(id).expect("export")))
        .collect();
    let (pass, quiet) = client.block_on(async {
        let proxy = CountingProxy::start(addr).await;
        let cfg = SyncConfig::new(&format!("ws://{}", proxy.addr)).token(&token);
        let report = sync_once(&a, cfg.clone(), WAIT).await.expect("reconnect");
        // The proxy's pumps may lag the client by a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pass = (report, proxy.take());
        let report = sync_once(&a, cfg, WAIT).await.expect("reconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        (pass, (report, proxy.take()))
    });
    for id in ids.iter().take(changed) {
        assert_eq!(a.get(id).unwrap().heads, b.get(id).unwrap().heads);
    }
    assert_eq!(
        pass.0.changes_pulled as usize, changed,
        "pulled what changed"
    );
    let (mut am_bytes, mut am_msgs) = (0, 0);
    let (mut idle_bytes, mut idle_msgs) = (0, 0);
    for (old, new) in &before {
        let (bytes, msgs) = automerge_sync(old, new);
        am_bytes += bytes;
        am_msgs += msgs;
        let (bytes, msgs) = automerge_sync(new, new);
        idle_bytes += bytes;
        idle_msgs += msgs;
    }
    let ((_, (up, down)), (_, (q_up, q_down))) = (pass, quiet);
    let total = up + down;
    row(
        &format!("reconnect, {docs} docs held, {changed} changed elsewhere"),
        format!(
            "tandem {} / Automerge sync {} ({:.2}%)",
            kib(total as f64),
            kib(am_bytes as f64),
            100.0 * total as f64 / am_bytes as f64
        ),
        "≤ 5%",
        &format!(
            "tandem: whole TCP exchange of one `sync_once` (upgrade with JWT, hello, feed, pulls), \
             {} up / {} down; Automerge: {am_msgs} sync messages, fresh State per document, \
             message bodies only",
            kib(up as f64),
            kib(down as f64)
        ),
    );
    row(
        &format!("reconnect, {docs} docs held, nothing changed"),
        format!(
            "tandem {} / Automerge sync {}",
            kib((q_up + q_down) as f64),
            kib(idle_bytes as f64)
        ),
        "",
        &format!(
            "same, every document already in step ({idle_msgs} Automerge messages, {:.0} B per document)",
            idle_bytes as f64 / docs as f64
        ),
    );
}

/// CPU time this process has used (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks (100 a second on Linux); the name in
    // field 2 is in parentheses and may hold spaces, so count from the closing one.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<f64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

/// The soft limit on open files of this process.
fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}

/// The real `tandem relay` binary, as an operator runs it, in a child process: its memory is
/// its own, not mixed with the load generator's.
struct ChildRelay {
    child: Child,
    addr: SocketAddr,
}

impl ChildRelay {
    fn start(data: &Path) -> ChildRelay {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("relay")
            .arg("--insecure-no-auth")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data")
            .arg(data)
            .args(["--max-connections", "20000"])
            .args(["--idle-timeout", "3600"])
            .args(["--handshake-timeout", "60"])
            .env("TANDEM_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tandem relay");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("relay output");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected relay output: {line:?}"));
        ChildRelay { child, addr }
    }

    /// Resident set size in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("relay status");
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    /// SIGTERM (a graceful stop that flushes), then wait, bounded.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Open `n` connections and finish their handshakes, `parallel` at a time.
async fn open_many(addr: SocketAddr, n: usize, parallel: usize) -> Vec<Ws> {
    futures_util::stream::iter(0..n)
        .map(|_| async move {
            let mut ws = dial(addr, None).await;
            handshake(&mut ws).await;
            ws
        })
        .buffer_unordered(parallel)
        .collect()
        .await
}

/// Let the relay settle (tasks finish, allocator returns what it will) before reading RSS.
fn settle() {
    std::thread::sleep(Duration::from_secs(2));
}

/// Section `memory`: RSS of the relay binary per idle connection, and with idle documents.
fn memory(client: &Runtime) {
    // Each connection costs this process one descriptor; keep some for everything else.
    let limit = fd_limit();
    let most = scaled(10_000).min(limit.saturating_sub(256));
    let steps: Vec<usize> = [scaled(1_000), most]
        .into_iter()
        .map(|n| n.min(most))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = ChildRelay::start(&dir.path().join("conns"));
    let addr = relay.addr;
    // One connection first, so lazily built state (the sled tree, runtime threads) is in the
    // baseline, not charged to connections.
    client.block_on(async {
        let warm = open_many(addr, 1, 1).await;
        drop(warm);
    });
    settle();
    let base = relay.rss();
    client.block_on(async {
        let mut held: Vec<Ws> = Vec::new();
        for &n in &steps {
            if n > held.len() {
                held.extend(open_many(addr, n - held.len(), 64).await);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss = relay.rss();
            row(
                &format!("relay RSS per idle connection, {n} connections"),
                kib((rss.saturating_sub(base)) as f64 / n as f64),
                "≤ 64 KiB",
                &format!(
                    "`tandem relay` child process: {:.1} MiB with {n} connections after hello, {:.1} MiB with none \
                     (fd limit {limit})",
                    rss as f64 / 1048576.0,
                    base as f64 / 1048576.0
                ),
            );
        }
        for mut ws in held {
            let _ = tokio::time::timeout(Duration::from_millis(100), ws.close(None)).await;
        }
    });
    relay.stop();

    let docs = scaled(10_000);
    let data = dir.path().join("docs");
    let relay = ChildRelay::start(&data);
    let addr = relay.addr;
    client.block_on(async {
        drop(open_many(addr, 1, 1).await);
    });
    settle();
    let empty = relay.rss();
    // A few changes per document, from 8 connections, one push per document.
    let conns = 8;
    let mut work: Vec<Vec<(DocId, Vec<Vec<u8>>)>> = vec![Vec::new(); conns];
    for i in 0..docs {
        work[i % conns].push((DocId::generate(), note_changes(3, i)));
    }
    client.block_on(async {
        let mut socks = open_many(addr, conns, conns).await;
        for ws in &mut socks {
            subscribe(ws, &[]).await;
        }
        let tasks: Vec<_> = socks
            .into_iter()
            .zip(work)
            .map(|(ws, pushes)| tokio::spawn(push_all(ws, pushes, 16)))
            .collect();
        for t in tasks {
            t.await.expect("pusher");
        }
    });
    settle();
    let live = relay.rss();
    relay.stop();
    let relay = ChildRelay::start(&data);
    client.block_on(async {
        drop(open_many(relay.addr, 1, 1).await);
    });
    settle();
    let restarted = relay.rss();
    relay.stop();
    row(
        &format!("relay RSS holding {docs} idle documents"),
        format!(
            "{:.1} MiB after pushing them, {:.1} MiB after a restart",
            live as f64 / 1048576.0,
            restarted as f64 / 1048576.0
        ),
        "",
        &format!(
            "empty relay {:.1} MiB; {:.0} B per document while live ({docs} docs × 3 changes, no connections left)",
            empty as f64 / 1048576.0,
            live.saturating_sub(empty) as f64 / docs as f64
        ),
    );
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    let on = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
    let load_before = load_average();
    let client = runtime("load");
    println!("| measurement | figure | target | note |");
    println!("|---|---|---|---|");
    if on("acks") {
        for conns in [8, 32] {
            durable_acks(&client, Backend::Sled, conns, scaled(64_000));
        }
    }
    if on("fanout") {
        for server in [FanOutServer::Relay, FanOutServer::Bare] {
            fan_out(&client, server, Backend::Sled, 100, 1000, 3.0 * scale());
        }
    }
    // Section `scale`: the same acks and fan-out on sled, then PostgreSQL with 1 and 3 nodes,
    // one after the other in one run (docs/scaling.md).
    if on("scale") {
        let backends = [Backend::Sled, Backend::Postgres(1), Backend::Postgres(3)];
        for backend in backends {
            durable_acks(&client, backend, 32, scaled(64_000));
        }
        for backend in backends {
            fan_out(
                &client,
                FanOutServer::Relay,
                backend,
                100,
                1000,
                3.0 * scale(),
            );
        }
    }
    if on("reconnect") {
        reconnect(&client, scaled(1000), scaled(10));
    }
    if on("memory") {
        memory(&client);
    }
    println!(
        "\n{} cores; load average (1, 5, 15 min) at the start: {load_before}; at the end: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
}

/// The machine is shared: how busy it was says whether two runs compare fairly.
fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(", ")
}
