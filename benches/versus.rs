//! tandem next to samod (the Rust automerge-repo, on the same Automerge 0.12), the same
//! workload through each relay in one run, and the machine's own limits measured in the same
//! run. Prints one markdown table; docs/performance.md ("Side by side with samod") holds the
//! figures and where tandem's time goes.
//!
//! Each relay runs as its own child process, so its CPU time (its process CPU clock) and RSS
//! (`/proc/<pid>/status`) are its own: tandem's is the real `tandem relay` binary (JWT auth,
//! fsync on, as in production); samod's is this same bench binary started again with
//! [`SAMOD_RELAY`] set, which serves samod's `Repo` over an axum WebSocket on loopback with
//! samod's filesystem storage (which does not fsync) and announcing turned off, like
//! automerge-repo's sync server. The devices are full clients of each library, in this process,
//! each over its own WebSocket: tandem `Repo`s in memory with the background sync task (one
//! namespace and token per device, so no device pulls another's documents) and samod `Repo`s
//! with in-memory storage. Not measured: TLS, a relay on another machine, the JS sync server.
//!
//! Sections (`TANDEM_BENCH_ONLY=create,alone,fanout,sustained,reconnect,cold,floors` picks
//! some):
//! - `create`: C = 4 devices create and sync D new documents (D = 500, 2,000 for both; 8,000
//!   for tandem only): wall time, relay CPU (and tandem's log flushes per document), relay
//!   RSS after; each tandem size runs 3 times (`TANDEM_VERSUS_REPEAT`), the sizes in turn,
//!   and gives medians;
//! - `alone` ("relay alone"): the same sizes pushed as pre-made notes (samod's kind) by 4 bare
//!   connections with 8 pushes in flight each, so the relay sets the pace at every size,
//!   and with the relay held to a core of its own (the last; this process, connections and
//!   all, to the others meanwhile), so that nothing else shares its caches: its CPU per
//!   document as the documents it holds grow, and nothing else (`scripts/cache-model.py`
//!   runs this section under cachegrind: instructions and cache misses per document, which
//!   a busy host does not blur);
//! - `fanout`: one small change to 20 and to 100 subscribers of one document: p50/p99 from
//!   the writer's change to each subscriber's change event;
//! - `sustained`: 8 devices, each change then wait for the relay to have it, at rising
//!   offered rates until p99 passes 50 ms (a step past it whose devices kept their pace runs
//!   once more before the ladder stops: one stall of the shared disk is not the limit);
//! - `reconnect`: a device holding 2,000 documents, 20 changed elsewhere: bytes on the wire
//!   and time until it has them;
//! - `cold`: a relay holding 10,000 documents starts; time until it has served one document;
//! - `floors`: sled insert + flush, an fsync'd 4 KiB append, Automerge's own
//!   apply/save/load of the same documents, loopback WebSocket echo of the same frame sizes.
//!
//! `cargo bench --bench versus` (full sizes, a few minutes on 2 cores);
//! `cargo test --bench versus -- --smoke` runs every section at 1% size in the test profile
//! (CI does: it checks the harness still runs, never a figure);
//! `TANDEM_BENCH_SCALE=0.1` for a quick look; `TANDEM_VERSUS_SAMOD_8000=1` also runs samod at
//! 8,000 documents (many minutes: a separate long run, e.g. with `TANDEM_BENCH_ONLY=create`);
//! `TANDEM_BENCH_SMAPS=<dir>` copies each relay's `/proc/<pid>/smaps` there when its RSS is
//! read (what is resident: heap, code, stacks); `TANDEM_VERSUS_RELAY_WRAP="valgrind
//! --tool=callgrind --trace-children=yes"` starts each tandem relay under that command (the
//! relay starts itself again once to set glibc's tunables, hence `--trace-children`, or set
//! them first as `scripts/hot-code.py` does, which finds the code a relay runs this way).
//! Every wait is bounded by [`WAIT`]: a stuck relay fails the
//! run, never hangs it.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ReadDoc, ROOT};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tandem::client::{connect, sync_once, SyncConfig, SyncHandle};
use tandem::relay::auth::{mint, Secret};
use tandem::transport::{codec, ClientMsg, RelayMsg, PROTOCOL_VERSION};
use tandem::{DocId, Event, Origin, Repo, Schema};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Set (to a data folder) in a child process: that process is the samod relay.
const SAMOD_RELAY: &str = "TANDEM_VERSUS_SAMOD_RELAY";
/// The samod relay's peer id, which the devices wait to be connected to.
const SAMOD_RELAY_PEER: &str = "relay";
const MAX_FRAME: usize = 16 << 20;
/// The longest any single wait may take.
const WAIT: Duration = Duration::from_secs(120);
const SECRET: &[u8] = b"versus-bench-secret-0123456789abcdef";
/// Devices that create documents.
const DEVICES: usize = 4;

/// `smoke` in the smoke run, else the environment variable `var` if it parses, else `default`.
fn knob<T: std::str::FromStr>(smoke: T, var: &str, default: T) -> T {
    if std::env::args().any(|a| a == "--smoke") {
        return smoke;
    }
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn scale() -> f64 {
    knob(0.01, "TANDEM_BENCH_SCALE", 1.0)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(1)
}

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// tandem's figure over samod's, for "lower is better" figures: how many times better tandem is.
fn times(samod: f64, tandem: f64) -> String {
    if tandem <= 0.0 || samod <= 0.0 {
        return "–".into();
    }
    format!("{:.1}×", samod / tandem)
}

fn row(name: &str, tandem: String, samod: String, ratio: String, note: &str) {
    println!("| {name} | {tandem} | {samod} | {ratio} | {note} |");
    let _ = std::io::stdout().flush();
}

/// A tokio runtime with two workers, like each relay's on this 2-core machine.
fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(", ")
}

fn note_schema() -> Schema {
    Schema::from_toml(
        r#"
        version = 1
        [types.note]
        title = "critical"
        body = "text"
        pinned = "lww"
        "#,
    )
    .expect("schema")
}

fn body() -> String {
    "milk, eggs, bread, coffee; call the plumber about the sink. ".repeat(4)
}

/// The same note as samod sees it: a title, a text body, a flag.
fn samod_note(i: usize) -> Automerge {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put(ROOT, "title", format!("note {i}")).expect("put");
    let text = tx.put_object(ROOT, "body", ObjType::Text).expect("text");
    tx.splice_text(&text, 0, 0, &body()).expect("splice");
    tx.put(ROOT, "pinned", false).expect("put");
    tx.commit();
    doc
}

fn token(sub: &str, read: &[&str], write: &[&str]) -> String {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    mint(
        &Secret::from_bytes(SECRET).expect("secret"),
        sub,
        &list(read),
        &list(write),
        Duration::from_secs(3600),
        SystemTime::now(),
    )
}

// ---------------------------------------------------------------------------------------------
// The relays, each a child process.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Tandem,
    Samod,
}

struct RelayProc {
    child: Child,
    addr: SocketAddr,
    /// From spawn to "listening on".
    started_in: Duration,
}

impl RelayProc {
    fn start(kind: Kind, data: &Path) -> RelayProc {
        RelayProc::start_on(kind, data, None)
    }

    /// [`start`](Self::start), with the relay (every thread it will have) held to `core`
    /// when given: then nothing else this bench runs shares that core's caches with it.
    fn start_on(kind: Kind, data: &Path, core: Option<usize>) -> RelayProc {
        let t0 = Instant::now();
        let mut cmd = match kind {
            Kind::Tandem => {
                let secret = data.with_extension("secret");
                std::fs::write(&secret, SECRET).expect("secret file");
                let wrap = std::env::var("TANDEM_VERSUS_RELAY_WRAP").unwrap_or_default();
                let mut wrap = wrap.split_whitespace();
                let mut c = match wrap.next() {
                    Some(program) => {
                        let mut c = Command::new(program);
                        c.args(wrap).arg(env!("CARGO_BIN_EXE_tandem"));
                        c
                    }
                    None => Command::new(env!("CARGO_BIN_EXE_tandem")),
                };
                c.arg("relay")
                    .arg("--jwt-secret-file")
                    .arg(&secret)
                    .args(["--listen", "127.0.0.1:0"])
                    .arg("--data")
                    .arg(data)
                    .args(["--idle-timeout", "3600"])
                    .args(["--handshake-timeout", "60"])
                    .env("TANDEM_LOG", "error");
                c
            }
            Kind::Samod => {
                let mut c = Command::new(std::env::current_exe().expect("this binary"));
                c.env(SAMOD_RELAY, data);
                c
            }
        };
        if let Some(core) = core {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only makes one system call on a
            // set on its own stack (async-signal-safe).
            unsafe {
                cmd.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(core, &mut set);
                    // A core the kernel refuses leaves the relay where it was: a figure, not
                    // a failure.
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the relay");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("relay output");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected {kind:?} relay output: {line:?}"));
        RelayProc {
            child,
            addr,
            started_in: t0.elapsed(),
        }
    }

    /// CPU time (user + system) the relay has used, in seconds: its process CPU clock
    /// (`clock_getcpuclockid` + `clock_gettime`, in nanoseconds, threads that ended included;
    /// a section of 500 documents takes well under a second, too little for the 10 ms ticks
    /// of `/proc/<pid>/stat`, which it falls back to if the clock cannot be read).
    fn cpu(&self) -> f64 {
        let pid = self.child.id();
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: both calls only write to the locals passed in.
        let read = unsafe {
            libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
                && libc::clock_gettime(clock, &mut ts) == 0
        };
        if read {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
        }
        // Fields 14 and 15 of /proc/<pid>/stat, in clock ticks (100 a second on Linux); the
        // name in field 2 is in parentheses and may hold spaces, so count from the closing one.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<f64> = after
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
    }

    /// Resident set size in bytes. With `TANDEM_BENCH_SMAPS=<dir>` set, the relay's
    /// `/proc/<pid>/smaps` at that moment is copied there too (to see what is resident).
    fn rss(&self) -> u64 {
        if let Some(dir) = std::env::var_os("TANDEM_BENCH_SMAPS") {
            let to = PathBuf::from(dir).join(format!("smaps.{}", self.child.id()));
            let _ = std::fs::copy(format!("/proc/{}/smaps", self.child.id()), to);
        }
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

    /// SIGTERM (tandem flushes and exits; samod's storage wrote as it went), then wait,
    /// bounded, then kill.
    fn stop(self) {
        self.stop_counting();
    }

    /// [`stop`](Self::stop), returning the CPU time the relay used in its whole life, its
    /// exit included (tandem flushes sled there: work the documents it took still owed), from
    /// the rusage of its exit (`wait4`, microseconds; threads that ended count too). `None`
    /// if it did not exit in time.
    fn stop_counting(mut self) -> Option<f64> {
        let pid = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 fills it in for our own child.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let reaped = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut usage) };
            if reaped == pid as i32 {
                let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                return Some(secs(usage.ru_utime) + secs(usage.ru_stime));
            }
            if reaped < 0
                && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The samod relay: samod's `Repo` with its filesystem storage, behind an axum WebSocket
/// route, as samod's docs set a sync server up. Runs until killed.
fn samod_relay(data: PathBuf) {
    let rt = runtime("samod-relay");
    rt.block_on(async move {
        let repo = samod::Repo::build_tokio()
            .with_storage(samod::storage::TokioFilesystemStorage::new(&data))
            .with_peer_id(samod::PeerId::from(SAMOD_RELAY_PEER))
            // A sync server does not push every document to every peer (automerge-repo's
            // sync server shares nothing unasked either); it answers requests and keeps
            // peers that asked in step.
            .with_share_policy(samod::ShareConfig::read_write().with_announce(false))
            .load()
            .await;
        let acceptor = repo
            .make_acceptor(samod::Url::parse("ws://127.0.0.1/").expect("url"))
            .expect("acceptor");
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move |ws: axum::extract::WebSocketUpgrade| {
                let acceptor = acceptor.clone();
                async move {
                    ws.on_upgrade(move |socket| async move {
                        let _ = acceptor.accept_axum(socket, None);
                    })
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!(
            "listening on {}",
            listener.local_addr().expect("local address")
        );
        let _ = std::io::stdout().flush();
        axum::serve(listener, app).await.expect("serve");
    });
}

// ---------------------------------------------------------------------------------------------
// The devices.

/// A samod dialer over tokio-tungstenite (without TLS), for loopback.
struct WsDialer {
    url: samod::Url,
}

impl samod::Dialer for WsDialer {
    type Error = std::convert::Infallible;

    fn url(&self) -> samod::Url {
        self.url.clone()
    }

    fn connect(
        &self,
    ) -> BoxFuture<'static, Result<samod::Transport, samod::DialError<Self::Error>>> {
        let url = self.url.to_string();
        Box::pin(async move {
            let req = url
                .into_client_request()
                .map_err(samod::DialError::transient)?;
            let (ws, _) =
                tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
                    .await
                    .map_err(samod::DialError::transient)?;
            let (sink, stream) = ws.split();
            let stream = stream
                .filter_map(|m| async move {
                    match m {
                        Ok(Message::Binary(b)) => Some(Ok(b.to_vec())),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    }
                })
                .boxed();
            let sink = Box::pin(
                sink.with(|b: Vec<u8>| async move { Ok::<_, WsError>(Message::Binary(b.into())) }),
            );
            Ok(samod::Transport::new(stream, sink))
        })
    }
}

/// The bench's own WebSockets (samod's devices, bare connections): the same 16 KiB read
/// buffer as tandem's client, rather than tungstenite's 128 KiB, which it zero-fills before
/// every read.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// A samod device with in-memory storage, connected to the relay at `addr`, and the id of
/// that connection (to ask "does the relay have our changes?").
async fn samod_device(
    name: &str,
    storage: samod::storage::InMemoryStorage,
    addr: SocketAddr,
) -> (samod::Repo, samod::ConnectionId) {
    let repo = samod::Repo::build_tokio()
        .with_storage(storage)
        .with_peer_id(samod::PeerId::from(name))
        .load()
        .await;
    let url = samod::Url::parse(&format!("ws://{addr}/")).expect("url");
    let dialer = repo
        .dial(samod::BackoffConfig::default(), Arc::new(WsDialer { url }))
        .expect("dial");
    tokio::time::timeout(WAIT, dialer.established())
        .await
        .expect("connected in time")
        .expect("connected");
    let conn = tokio::time::timeout(
        WAIT,
        repo.when_connected(samod::PeerId::from(SAMOD_RELAY_PEER)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    (repo, conn.id())
}

/// A tandem device in memory, syncing in the background with the relay at `addr`.
fn tandem_device(name: &str, addr: SocketAddr, token: &str) -> (Repo, SyncHandle) {
    let repo = Repo::in_memory(note_schema(), name).expect("repo");
    let sync = connect(&repo, SyncConfig::new(&format!("ws://{addr}")).token(token));
    (repo, sync)
}

/// Wait until the samod relay says it holds everything `doc` holds here.
async fn samod_synced(doc: &samod::DocHandle, conn: samod::ConnectionId) {
    tokio::time::timeout(WAIT, doc.they_have_our_changes(conn))
        .await
        .expect("the samod relay took the changes in time");
}

// ---------------------------------------------------------------------------------------------
// Section `create`.

#[derive(Clone, Copy)]
struct Run {
    wall: Duration,
    cpu: f64,
    /// CPU from the start of the workload to the relay's exit (its exit's flush included).
    cpu_to_exit: Option<f64>,
    rss: u64,
    /// Write-ahead log flushes (tandem's `/metrics`), `None` for samod.
    flushes: Option<u64>,
}

/// How many times each tandem size of `create` runs; its rows give the medians. A run of
/// 500 documents costs the relay a tenth of a second of CPU, which a busy host can move by
/// half (`TANDEM_VERSUS_REPEAT`, default 3).
fn repeats() -> usize {
    knob(1, "TANDEM_VERSUS_REPEAT", 3).max(1)
}

/// A note on `runs` runs of `docs` documents: the range of CPU per document, and the median
/// of the runs' log flushes per document.
fn spread(range: (f64, f64), runs: usize, median: &Run, docs: usize) -> String {
    format!(
        "{:.0}–{:.0} µs/doc in {}{}",
        range.0 * 1e6,
        range.1 * 1e6,
        plural(runs, "run"),
        median.flushes.map_or(String::new(), |f| format!(
            "; {:.2} log flushes/doc",
            f as f64 / docs as f64
        ))
    )
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The middle value (of an even count, the upper of the two middle ones).
fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Each figure's median over `runs` (not one run's figures), and the range of CPU per
/// document.
fn median_run(runs: &[Run], docs: usize) -> (Run, (f64, f64)) {
    let per_doc: Vec<f64> = runs.iter().map(|r| r.cpu / docs as f64).collect();
    let range = (
        per_doc.iter().copied().fold(f64::MAX, f64::min),
        per_doc.iter().copied().fold(0.0, f64::max),
    );
    let to_exit: Vec<f64> = runs.iter().filter_map(|r| r.cpu_to_exit).collect();
    let flushes: Vec<u64> = runs.iter().filter_map(|r| r.flushes).collect();
    let run = Run {
        wall: median(runs.iter().map(|r| r.wall).collect()),
        cpu: median(runs.iter().map(|r| r.cpu).collect()),
        cpu_to_exit: (to_exit.len() == runs.len()).then(|| median(to_exit)),
        rss: median(runs.iter().map(|r| r.rss).collect()),
        flushes: (!flushes.is_empty()).then(|| median(flushes)),
    };
    (run, range)
}

/// `runs` runs of each size, the sizes taken in turn (500, 2,000, 8,000, 500, ...) so that a
/// spell of load on the host falls on every size alike; the runs of each size, in `sizes`'
/// order.
fn interleaved(sizes: &[usize], runs: usize, mut run: impl FnMut(usize) -> Run) -> Vec<Vec<Run>> {
    let mut out = vec![Vec::with_capacity(runs); sizes.len()];
    for _ in 0..runs {
        for (i, &d) in sizes.iter().enumerate() {
            out[i].push(run(d));
        }
    }
    out
}

/// One counter of the tandem relay's `/metrics`.
async fn relay_metric(addr: SocketAddr, name: &str) -> Option<u64> {
    // A relay that cannot answer this in seconds has a problem the run will show elsewhere.
    let wait = Duration::from_secs(5);
    let mut tcp = tokio::time::timeout(wait, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(wait, tcp.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn create_sync(client: &Runtime, kind: Kind, docs: usize) -> Run {
    measured_run(client, kind, docs, None, |d, mine, addr| async move {
        let name = format!("dev{d}");
        match kind {
            Kind::Tandem => create_tandem(&name, addr, mine).await,
            Kind::Samod => create_samod(&name, addr, mine).await,
        }
    })
}

/// A new relay of `kind` (held to `core` when given), and [`DEVICES`] tasks, `device(index,
/// its share of docs, address)`, run to their end; the relay's figures for that.
fn measured_run<Fut>(
    client: &Runtime,
    kind: Kind,
    docs: usize,
    core: Option<usize>,
    mut device: impl FnMut(usize, usize, SocketAddr) -> Fut,
) -> Run
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProc::start_on(kind, &dir.path().join("relay"), core);
    let addr = relay.addr;
    let cpu0 = relay.cpu();
    let t0 = Instant::now();
    let devices: Vec<Fut> = (0..DEVICES)
        .map(|d| device(d, docs / DEVICES + usize::from(d < docs % DEVICES), addr))
        .collect();
    client.block_on(async {
        let tasks: Vec<_> = devices.into_iter().map(tokio::spawn).collect();
        for t in tasks {
            t.await.expect("device");
        }
    });
    let wall = t0.elapsed();
    finish_run(client, kind, relay, cpu0, wall)
}

/// A run's figures once its workload is done: CPU now, RSS a moment later, then the relay
/// stops.
fn finish_run(client: &Runtime, kind: Kind, relay: RelayProc, cpu0: f64, wall: Duration) -> Run {
    let cpu = relay.cpu() - cpu0;
    let flushes = match kind {
        Kind::Tandem => client.block_on(relay_metric(relay.addr, "tandem_relay_flushes_total")),
        Kind::Samod => None,
    };
    // Let tasks finish and the allocator hand back what it will before reading RSS.
    std::thread::sleep(Duration::from_millis(500));
    let rss = relay.rss();
    let cpu_to_exit = relay.stop_counting().map(|all| all - cpu0);
    Run {
        wall,
        cpu,
        cpu_to_exit,
        rss,
        flushes,
    }
}

async fn create_tandem(name: &str, addr: SocketAddr, docs: usize) {
    let (repo, sync) = tandem_device(name, addr, &token(name, &[], &[name]));
    let ns = name.to_string();
    let r = repo.clone();
    // Repo's local calls are synchronous (an app calls them from its UI thread).
    tokio::task::spawn_blocking(move || {
        for i in 0..docs {
            r.create_in(
                &ns,
                "note",
                json!({"title": format!("note {i}"), "body": body(), "pinned": false}),
            )
            .expect("create");
        }
    })
    .await
    .expect("creator");
    sync.wait_synced(WAIT).await.expect("synced");
    sync.stop().await;
}

async fn create_samod(name: &str, addr: SocketAddr, docs: usize) {
    let (repo, conn) = samod_device(name, Default::default(), addr).await;
    let mut handles = Vec::with_capacity(docs);
    for i in 0..docs {
        handles.push(repo.create(samod_note(i)).await.expect("create"));
    }
    // One deadline for the whole device, not one wait per document: at 8,000 documents the
    // samod relay takes minutes to answer for the first one.
    let deadline = tokio::time::Instant::now() + WAIT * (docs / 250).max(1) as u32;
    for h in &handles {
        tokio::time::timeout_at(deadline, h.they_have_our_changes(conn))
            .await
            .expect("the samod relay took every document in time");
    }
    repo.stop().await;
}

fn create_section(client: &Runtime) {
    let sizes = [scaled(500), scaled(2_000), scaled(8_000)];
    let runs = repeats();
    let mut per_doc = Vec::new();
    let mut owed: Vec<Option<f64>> = Vec::new();
    let tandem_runs = interleaved(&sizes, runs, |d| create_sync(client, Kind::Tandem, d));
    for (i, &d) in sizes.iter().enumerate() {
        let (t, range) = median_run(&tandem_runs[i], d);
        // samod at 8,000 runs for many minutes: a separate long run (TANDEM_VERSUS_SAMOD_8000=1).
        let s = (i < 2 || std::env::var("TANDEM_VERSUS_SAMOD_8000").is_ok())
            .then(|| create_sync(client, Kind::Samod, d));
        per_doc.push((d, t.cpu / d as f64, s.as_ref().map(|s| s.cpu / d as f64)));
        owed.push(t.cpu_to_exit.map(|c| c / d as f64));
        let rate = |r: &Run| d as f64 / r.wall.as_secs_f64();
        row(
            &format!("create + sync {d} docs from {DEVICES} devices: docs/s (wall)"),
            format!("{:.0}/s ({:.2} s)", rate(&t), t.wall.as_secs_f64()),
            s.as_ref().map_or("separate run".into(), |s| {
                format!("{:.0}/s ({:.2} s)", rate(s), s.wall.as_secs_f64())
            }),
            s.as_ref().map_or("–".into(), |s| {
                times(s.wall.as_secs_f64(), t.wall.as_secs_f64())
            }),
            &[
                (d == sizes[1]).then_some("target ≥ 3×"),
                (runs > 1).then_some("tandem: medians of its runs"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; "),
        );
        let to_exit = |r: &Run| {
            r.cpu_to_exit.map_or(String::new(), |c| {
                format!("; {:.0} µs/doc to its exit", c / d as f64 * 1e6)
            })
        };
        row(
            &format!("… relay CPU, {d} docs"),
            format!(
                "{:.2} s ({:.0} µs/doc{})",
                t.cpu,
                t.cpu / d as f64 * 1e6,
                to_exit(&t)
            ),
            s.as_ref().map_or("–".into(), |s| {
                format!(
                    "{:.2} s ({:.0} µs/doc{})",
                    s.cpu,
                    s.cpu / d as f64 * 1e6,
                    to_exit(s)
                )
            }),
            s.as_ref().map_or("–".into(), |s| times(s.cpu, t.cpu)),
            &format!("tandem {}", spread(range, runs, &t, d)),
        );
        row(
            &format!("… relay RSS after, {d} docs"),
            mib(t.rss),
            s.as_ref().map_or("–".into(), |s| mib(s.rss)),
            s.as_ref()
                .map_or("–".into(), |s| times(s.rss as f64, t.rss as f64)),
            if d == sizes[1] { "target ≥ 4×" } else { "" },
        );
    }
    let (first, last) = (per_doc[0], per_doc[per_doc.len() - 1]);
    row(
        &format!("relay CPU per doc, {} → {} docs", first.0, last.0),
        match (first.1 > 0.0, owed[0], owed[owed.len() - 1]) {
            (true, Some(a), Some(b)) if a > 0.0 => format!(
                "{:.2}× ({:.2}× to each relay's exit)",
                last.1 / first.1,
                b / a
            ),
            (true, _, _) => format!("{:.2}×", last.1 / first.1),
            _ => "–".into(),
        },
        // samod's widest span: 500 → 2,000, or → 8,000 in the long run.
        match (
            first.2,
            per_doc.iter().rev().find_map(|p| p.2.map(|c| (p.0, c))),
        ) {
            (Some(a), Some((d, b))) if a > 0.0 => {
                format!("{:.2}× ({} → {d} docs)", b / a, first.0)
            }
            _ => "–".into(),
        },
        "–".into(),
        "target: flat (≈ 1×)",
    );
}

/// The relay alone at the create section's sizes (see [`premade_rows`]).
fn alone_section(client: &Runtime) {
    let sizes = [scaled(500), scaled(2_000), scaled(8_000)];
    premade_rows(client, &sizes, repeats());
}

/// The first change of each of `n` new notes, made ahead of a run, with a new document id each.
fn premade_notes(n: usize) -> Vec<(DocId, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let doc = samod_note(i);
            let change = doc
                .get_last_local_change()
                .expect("a change")
                .raw_bytes()
                .to_vec();
            (DocId::generate(), change)
        })
        .collect()
}

/// Push `docs` over one connection of its own (namespace `ns`), [`PREMADE_WINDOW`] pushes in
/// flight, until every one is acknowledged.
async fn push_premade(addr: SocketAddr, ns: String, docs: Vec<(DocId, Vec<u8>)>) {
    let ws = tandem_raw(addr, &token(&ns, &[], &[&ns])).await;
    let (mut tx, mut rx) = ws.split();
    let total = docs.len();
    let mut next = docs.into_iter().enumerate();
    let (mut in_flight, mut acked) = (0usize, 0usize);
    // Every answer is an ack or something else the relay sends (ignored): bounded.
    for _ in 0..total * 4 + 64 {
        while in_flight < PREMADE_WINDOW {
            let Some((i, (doc, change))) = next.next() else {
                break;
            };
            let push = ClientMsg::Push {
                namespace: ns.clone(),
                doc,
                batch: i as u64,
                changes: vec![change],
            };
            raw_send(&mut tx, &push).await;
            in_flight += 1;
        }
        if acked == total {
            return;
        }
        match raw_recv(&mut rx).await {
            RelayMsg::Ack { .. } => {
                acked += 1;
                in_flight -= 1;
            }
            RelayMsg::Error { .. } | RelayMsg::NeedHistory { .. } => {
                panic!("the relay refused a pre-made push")
            }
            _ => {}
        }
    }
    panic!("{acked} of {total} pre-made pushes acknowledged");
}

/// Pushes each connection keeps in flight: what a device's sync does (its default
/// `max_pushes_in_flight`).
const PREMADE_WINDOW: usize = 8;

/// The relay alone: new notes (samod's devices' kind: one change of 377 B, without tandem's
/// bookkeeping keys), made ahead and pushed by [`DEVICES`] bare connections
/// that keep [`PREMADE_WINDOW`] pushes in flight, so the pace is the relay's at every size.
/// With full devices the pace is theirs, and it slows as their own stores grow: the relay
/// then gets fewer pushes per flush, which costs it CPU per document that is not the data it
/// holds.
fn premade_rows(client: &Runtime, sizes: &[usize], runs: usize) {
    let mut per_doc = Vec::new();
    // Made once: each run has a relay of its own, so the same documents are new to each.
    let made = premade_notes(sizes.iter().copied().max().unwrap_or(0));
    // The relay on a core of its own (the last), the bare connections elsewhere: with devices
    // sharing its cores, their growing stores crowd its caches, and every figure moves by
    // tenths from run to run.
    let core = std::thread::available_parallelism()
        .ok()
        .map(|n| n.get() - 1)
        .filter(|&last| last > 0);
    // This thread's cores now, to give back to every thread after.
    let before = core.map(|c| {
        let mut now = cpu_set(0..0);
        // SAFETY: sched_getaffinity writes the set passed in and nothing else.
        unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&now), &mut now) };
        set_all_threads(&cpu_set(0..c));
        now
    });
    let all = interleaved(sizes, runs, |d| {
        let mut notes = made[..d].to_vec();
        measured_run(client, Kind::Tandem, d, core, |dev, mine, addr| {
            let share: Vec<_> = notes.drain(..mine.min(notes.len())).collect();
            push_premade(addr, format!("raw{dev}"), share)
        })
    });
    if let Some(cores) = before {
        set_all_threads(&cores);
    }
    for (&d, runs_of_d) in sizes.iter().zip(&all) {
        let (t, range) = median_run(runs_of_d, d);
        per_doc.push((t.cpu / d as f64, t.cpu_to_exit.map(|c| c / d as f64)));
        row(
            &format!("… relay alone, {d} pre-made docs: relay CPU"),
            format!(
                "{:.0} µs/doc{} ({:.0}/s)",
                t.cpu / d as f64 * 1e6,
                t.cpu_to_exit.map_or(String::new(), |c| format!(
                    "; {:.0} µs/doc to its exit",
                    c / d as f64 * 1e6
                )),
                d as f64 / t.wall.as_secs_f64()
            ),
            "–".into(),
            "–".into(),
            &spread(range, runs, &t, d),
        );
    }
    row(
        &format!(
            "relay alone: CPU per doc, {} → {} docs",
            sizes[0],
            sizes[sizes.len() - 1]
        ),
        {
            let (first, last) = (per_doc[0], per_doc[per_doc.len() - 1]);
            let ratio = format!("{:.2}×", last.0 / first.0);
            match (first.1, last.1) {
                (Some(a), Some(b)) if a > 0.0 => {
                    format!("{ratio} ({:.2}× to each relay's exit)", b / a)
                }
                _ => ratio,
            }
        },
        "–".into(),
        "–".into(),
        &format!(
            "the devices' pace taken out{} (medians); target: flat (≈ 1×)",
            match core {
                Some(c) => format!(", the relay alone on core {c}"),
                None => String::new(),
            }
        ),
    );
}

/// A CPU set of `cores`.
fn cpu_set(cores: std::ops::Range<usize>) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cores {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Hold every thread of this process (the runtimes' included; threads they start later
/// inherit it) to `set`. Best effort: a thread that ended meanwhile is skipped.
fn set_all_threads(set: &libc::cpu_set_t) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for tid in tasks.flatten() {
        if let Some(tid) = tid.file_name().to_str().and_then(|t| t.parse().ok()) {
            // SAFETY: reads the set passed in; a tid that ended gets ESRCH.
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Section `fanout`.

fn fanout(client: &Runtime, kind: Kind, subs: usize, rounds: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProc::start(kind, &dir.path().join("relay"));
    let addr = relay.addr;
    let mut lat = client.block_on(async {
        match kind {
            Kind::Tandem => fanout_tandem(addr, subs, rounds).await,
            Kind::Samod => fanout_samod(addr, subs, rounds).await,
        }
    });
    relay.stop();
    (pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

/// Each round: one change at the writer, then every subscriber's arrival time from `arrivals`.
async fn collect_round(
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>,
    t0: Instant,
    subs: usize,
    lat: &mut Vec<Duration>,
) {
    for _ in 0..subs {
        let at = tokio::time::timeout(WAIT, arrivals.recv())
            .await
            .expect("every subscriber got the change in time")
            .expect("subscriber alive");
        lat.push(at.saturating_duration_since(t0));
    }
}

async fn fanout_tandem(addr: SocketAddr, subs: usize, rounds: usize) -> Vec<Duration> {
    let ns = "fan";
    let (writer, wsync) = tandem_device("writer", addr, &token("writer", &[], &[ns]));
    let doc = writer
        .create_in(
            ns,
            "note",
            json!({"title": "start", "body": "", "pinned": false}),
        )
        .expect("create");
    wsync.wait_synced(WAIT).await.expect("writer synced");
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for s in 0..subs {
        let name = format!("sub{s}");
        let (repo, sync) = tandem_device(&name, addr, &token(&name, &[ns], &[]));
        sync.wait_synced(WAIT).await.expect("subscriber synced");
        let mut events = repo.subscribe();
        let tx = tx.clone();
        let task = tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                if let Event::Changed {
                    doc: d,
                    origin: Origin::Remote,
                    ..
                } = ev
                {
                    if d == doc && tx.send(Instant::now()).is_err() {
                        return;
                    }
                }
            }
        });
        held.push((repo, sync, task));
    }
    let mut lat = Vec::with_capacity(subs * rounds);
    for r in 0..rounds {
        let t0 = Instant::now();
        let w = writer.clone();
        tokio::task::spawn_blocking(move || {
            w.change(&doc, |tx| tx.set("title", format!("round {r}")))
                .expect("change")
        })
        .await
        .expect("writer");
        collect_round(&mut arrivals, t0, subs, &mut lat).await;
    }
    for (_, sync, task) in held {
        task.abort();
        sync.stop().await;
    }
    wsync.stop().await;
    lat
}

async fn fanout_samod(addr: SocketAddr, subs: usize, rounds: usize) -> Vec<Duration> {
    let (writer, conn) = samod_device("writer", Default::default(), addr).await;
    let doc = writer.create(samod_note(0)).await.expect("create");
    samod_synced(&doc, conn).await;
    let id = doc.document_id().clone();
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for s in 0..subs {
        let (repo, _) = samod_device(&format!("sub{s}"), Default::default(), addr).await;
        let handle = tokio::time::timeout(WAIT, repo.find(id.clone()))
            .await
            .expect("found in time")
            .expect("repo running")
            .expect("the relay has the document");
        let mut changes = Box::pin(handle.changes());
        let tx = tx.clone();
        let task = tokio::spawn(async move {
            while changes.next().await.is_some() {
                if tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
        held.push((repo, handle, task));
    }
    let mut lat = Vec::with_capacity(subs * rounds);
    for r in 0..rounds {
        let t0 = Instant::now();
        doc.with_document(|d| {
            let mut tx = d.transaction();
            tx.put(ROOT, "title", format!("round {r}")).expect("put");
            tx.commit();
        });
        collect_round(&mut arrivals, t0, subs, &mut lat).await;
    }
    for (repo, _, task) in held {
        task.abort();
        repo.stop().await;
    }
    writer.stop().await;
    lat
}

fn fanout_section(client: &Runtime) {
    let rounds = scaled(50).max(5);
    for subs in [scaled(20).max(2), scaled(100).max(3)] {
        let t = fanout(client, Kind::Tandem, subs, rounds);
        let s = fanout(client, Kind::Samod, subs, rounds);
        row(
            &format!("fan-out of one small change to {subs} subscribers, p50 / p99"),
            format!("{} / {}", ms(t.0), ms(t.1)),
            format!("{} / {}", ms(s.0), ms(s.1)),
            format!(
                "{} / {}",
                times(s.0.as_secs_f64(), t.0.as_secs_f64()),
                times(s.1.as_secs_f64(), t.1.as_secs_f64())
            ),
            &format!(
                "{rounds} rounds, writer's change to each subscriber's change event{}",
                if subs >= 100 {
                    "; target p99 ≤ 20 ms"
                } else {
                    ""
                }
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Section `sustained`.

/// Offered rates (changes/s over all 8 devices), rising until p99 passes 50 ms.
const RATES: [u32; 7] = [100, 200, 400, 800, 1_600, 3_200, 6_400];
const SUSTAINED_DEVICES: usize = 8;

/// One device at `rate`/s for `secs`: change, then wait until the relay has it. Latency is
/// counted from when the change was due, so a device that falls behind its schedule shows it.
async fn paced<F, Fut>(rate: f64, secs: f64, mut one: F) -> Vec<Duration>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    for k in 0..1_000_000u64 {
        let due = start + interval * k as u32;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        one(k).await;
        lat.push(due.elapsed());
    }
    lat
}

/// (offered rate, achieved rate, p50, p99) per step (a step run twice is in it twice), up
/// to the first step past 50 ms that fell behind its pace or was past it twice.
fn sustained(client: &Runtime, kind: Kind) -> Vec<(u32, f64, Duration, Duration)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProc::start(kind, &dir.path().join("relay"));
    let addr = relay.addr;
    let secs = (3.0 * scale()).max(0.3);
    let steps = if scale() < 0.05 { 2 } else { RATES.len() };
    let out = client.block_on(async {
        let mut out = Vec::new();
        // The devices, each with one document, connected before the clock starts.
        let mut tandem = Vec::new();
        let mut samod = Vec::new();
        for d in 0..SUSTAINED_DEVICES {
            let name = format!("dev{d}");
            match kind {
                Kind::Tandem => {
                    let (repo, sync) = tandem_device(&name, addr, &token(&name, &[], &[&name]));
                    let doc = repo
                        .create_in(
                            &name,
                            "note",
                            json!({"title": "0", "body": "", "pinned": false}),
                        )
                        .expect("create");
                    sync.wait_synced(WAIT).await.expect("synced");
                    tandem.push((repo, Arc::new(sync), doc));
                }
                Kind::Samod => {
                    let (repo, conn) = samod_device(&name, Default::default(), addr).await;
                    let doc = repo.create(samod_note(d)).await.expect("create");
                    samod_synced(&doc, conn).await;
                    samod.push((repo, conn, doc));
                }
            }
        }
        // A step past 50 ms whose devices still kept their pace runs once more before the
        // ladder stops: one stall of the shared disk or of the host (a 100 ms `fdatasync` now
        // and then) must not pass for the limit.
        let (mut step_index, mut retried) = (0, false);
        while step_index < steps {
            let rate = RATES[step_index];
            let per_device = rate as f64 / SUSTAINED_DEVICES as f64;
            let step = Instant::now();
            let mut tasks = Vec::new();
            for (repo, sync, doc) in &tandem {
                let (repo, sync, doc) = (repo.clone(), sync.clone(), *doc);
                tasks.push(tokio::spawn(async move {
                    paced(per_device, secs, |k| {
                        let (repo, sync, doc) = (repo.clone(), sync.clone(), doc);
                        async move {
                            repo.change(&doc, |tx| tx.set("title", k.to_string()))
                                .expect("change");
                            sync.wait_synced(WAIT).await.expect("acked");
                        }
                    })
                    .await
                }));
            }
            for (_, conn, doc) in &samod {
                let (conn, doc) = (*conn, doc.clone());
                tasks.push(tokio::spawn(async move {
                    paced(per_device, secs, |k| {
                        let doc = doc.clone();
                        async move {
                            doc.with_document(|d| {
                                let mut tx = d.transaction();
                                tx.put(ROOT, "title", k.to_string()).expect("put");
                                tx.commit();
                            });
                            samod_synced(&doc, conn).await;
                        }
                    })
                    .await
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.expect("device"));
            }
            // Over the time the step really took: devices that fell behind finish late.
            let achieved = lat.len() as f64 / step.elapsed().as_secs_f64().max(secs);
            let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
            out.push((rate, achieved, p50, p99));
            // Devices that kept their pace and still saw a slow p99 met a stall: once more.
            let kept_pace = achieved >= 0.95 * rate as f64;
            if p99 <= Duration::from_millis(50) {
                (step_index, retried) = (step_index + 1, false);
            } else if kept_pace && !retried {
                retried = true;
            } else {
                break;
            }
        }
        for (_, sync, _) in tandem {
            if let Ok(sync) = Arc::try_unwrap(sync) {
                sync.stop().await;
            }
        }
        for (repo, _, _) in samod {
            repo.stop().await;
        }
        out
    });
    relay.stop();
    out
}

fn sustained_section(client: &Runtime) {
    let t = sustained(client, Kind::Tandem);
    let s = sustained(client, Kind::Samod);
    let best = |steps: &[(u32, f64, Duration, Duration)]| {
        steps
            .iter()
            .filter(|s| s.3 <= Duration::from_millis(50))
            .map(|s| s.1)
            .fold(0.0, f64::max)
    };
    let trace = |steps: &[(u32, f64, Duration, Duration)]| {
        steps
            .iter()
            .map(|(r, a, p50, p99)| format!("{r}/s → {a:.0}/s p50 {} p99 {}", ms(*p50), ms(*p99)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (bt, bs) = (best(&t), best(&s));
    row(
        &format!("sustained small changes/s from {SUSTAINED_DEVICES} devices, p99 ≤ 50 ms"),
        format!("{bt:.0}/s"),
        format!("{bs:.0}/s"),
        if bs > 0.0 { format!("{:.1}×", bt / bs) } else { "–".into() },
        &format!(
            "each device: change, wait until the relay has it, next when due. tandem: {}. samod: {}",
            trace(&t),
            trace(&s)
        ),
    );
    if let Some(low) = t.first() {
        LOW_LOAD_ACK.store(low.2.as_nanos() as u64, Ordering::SeqCst);
    }
}

/// tandem's p50 change-to-ack at the lowest sustained rate, for the floors section.
static LOW_LOAD_ACK: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------------------------
// Section `reconnect`.

/// A TCP proxy on loopback that counts the bytes going each way, WebSocket framing and the
/// HTTP upgrade included.
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
            for _ in 0..100 {
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

    fn total(&self) -> u64 {
        self.up.load(Ordering::SeqCst) + self.down.load(Ordering::SeqCst)
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

/// (bytes, time) for device A, holding `docs` documents, to get `changed` of them that
/// device B changed while A was away.
fn reconnect(client: &Runtime, kind: Kind, docs: usize, changed: usize) -> (u64, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProc::start(kind, &dir.path().join("relay"));
    let addr = relay.addr;
    let out = client.block_on(async {
        match kind {
            Kind::Tandem => reconnect_tandem(addr, docs, changed).await,
            Kind::Samod => reconnect_samod(addr, docs, changed).await,
        }
    });
    relay.stop();
    out
}

async fn reconnect_tandem(addr: SocketAddr, docs: usize, changed: usize) -> (u64, Duration) {
    let ns = "rc";
    let (ta, tb) = (token("ada", &[], &[ns]), token("bob", &[], &[ns]));
    let a = Repo::in_memory(note_schema(), "ada").expect("repo");
    let b = Repo::in_memory(note_schema(), "bob").expect("repo");
    let ids: Vec<DocId> = (0..docs)
        .map(|i| {
            a.create_in(
                ns,
                "note",
                json!({"title": format!("note {i}"), "body": body(), "pinned": false}),
            )
            .expect("create")
        })
        .collect();
    let direct = |t: &str| SyncConfig::new(&format!("ws://{addr}")).token(t);
    sync_once(&a, direct(&ta), WAIT).await.expect("a pushes");
    sync_once(&b, direct(&tb), WAIT).await.expect("b pulls");
    // Once more, so A's cursors have stepped over its own pushes: a steady state.
    sync_once(&a, direct(&ta), WAIT).await.expect("a again");
    for id in ids.iter().take(changed) {
        b.change(id, |tx| tx.set("title", "changed elsewhere"))
            .expect("change on b");
    }
    sync_once(&b, direct(&tb), WAIT).await.expect("b pushes");
    let proxy = CountingProxy::start(addr).await;
    let t0 = Instant::now();
    let report = sync_once(
        &a,
        SyncConfig::new(&format!("ws://{}", proxy.addr)).token(&ta),
        WAIT,
    )
    .await
    .expect("reconnect");
    let took = t0.elapsed();
    assert_eq!(
        report.changes_pulled as usize, changed,
        "pulled what changed"
    );
    for id in ids.iter().take(changed) {
        assert_eq!(a.get(id).unwrap().heads, b.get(id).unwrap().heads);
    }
    (settled_total(&proxy).await, took)
}

/// The proxy's pumps may lag the client by a moment: read the count once it stops moving.
async fn settled_total(proxy: &CountingProxy) -> u64 {
    let mut last = proxy.total();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = proxy.total();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

async fn reconnect_samod(addr: SocketAddr, docs: usize, changed: usize) -> (u64, Duration) {
    let storage_a = samod::storage::InMemoryStorage::new();
    let (a, conn) = samod_device("ada", storage_a.clone(), addr).await;
    let mut ids = Vec::with_capacity(docs);
    for i in 0..docs {
        let h = a.create(samod_note(i)).await.expect("create");
        samod_synced(&h, conn).await;
        ids.push(h.document_id().clone());
    }
    a.stop().await;
    let (b, bconn) = samod_device("bob", Default::default(), addr).await;
    let mut heads = Vec::new();
    for id in ids.iter().take(changed) {
        let h = tokio::time::timeout(WAIT, b.find(id.clone()))
            .await
            .expect("found in time")
            .expect("running")
            .expect("the relay has it");
        h.with_document(|d| {
            let mut tx = d.transaction();
            tx.put(ROOT, "title", "changed elsewhere").expect("put");
            tx.commit();
        });
        samod_synced(&h, bconn).await;
        heads.push(h.with_document(|d| d.get_heads()));
    }
    b.stop().await;
    // A comes back: samod syncs per document, so it opens every document it holds and syncs
    // each with the relay.
    let proxy = CountingProxy::start(addr).await;
    let t0 = Instant::now();
    let (a, conn) = samod_device("ada", storage_a, proxy.addr).await;
    let mut handles = Vec::with_capacity(docs);
    for id in &ids {
        handles.push(
            tokio::time::timeout(WAIT, a.find(id.clone()))
                .await
                .expect("found in time")
                .expect("running")
                .expect("held locally"),
        );
    }
    for h in &handles {
        tokio::time::timeout(WAIT, h.we_have_their_changes(conn))
            .await
            .expect("in step in time");
    }
    let took = t0.elapsed();
    for (h, want) in handles.iter().zip(&heads) {
        assert_eq!(&h.with_document(|d| d.get_heads()), want, "got B's change");
    }
    let bytes = settled_total(&proxy).await;
    a.stop().await;
    (bytes, took)
}

fn reconnect_section(client: &Runtime) {
    let (docs, changed) = (scaled(2_000), scaled(20));
    let t = reconnect(client, Kind::Tandem, docs, changed);
    let s = reconnect(client, Kind::Samod, docs, changed);
    row(
        &format!(
            "reconnect of a device holding {docs} docs, {changed} changed elsewhere: bytes / time"
        ),
        format!("{} / {}", kib(t.0), ms(t.1)),
        format!("{} / {}", kib(s.0), ms(s.1)),
        format!(
            "{} / {}",
            times(s.0 as f64, t.0 as f64),
            times(s.1.as_secs_f64(), t.1.as_secs_f64())
        ),
        "whole TCP exchange through a counting proxy; tandem: one `sync_once` (feed, pulls); \
         samod: open every held document and sync it with the relay",
    );
}

// ---------------------------------------------------------------------------------------------
// Section `cold`.

/// A WebSocket to the tandem relay with `token`, past the hello.
async fn tandem_raw(
    addr: SocketAddr,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let mut req = format!("ws://{addr}/v1")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true),
    )
    .await
    .expect("connected in time")
    .expect("connected");
    let hello = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        device: rand::random(),
        feeds: Vec::new(),
    };
    raw_send(&mut ws, &hello).await;
    match raw_recv(&mut ws).await {
        RelayMsg::Hello { .. } => {}
        other => panic!("expected the relay's hello, got {other:?}"),
    }
    ws
}

async fn raw_send<S>(ws: &mut S, msg: &ClientMsg)
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    let bytes = codec::encode(msg, MAX_FRAME).expect("encode");
    ws.send(Message::Binary(bytes.into())).await.expect("sent");
}

async fn raw_recv<S>(ws: &mut S) -> RelayMsg
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    for _ in 0..16 {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("answer in time")
        {
            Some(Ok(Message::Binary(b))) => return codec::decode(&b, MAX_FRAME).expect("decode"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("the relay closed or broke the connection: {other:?}"),
        }
    }
    panic!("the relay sent only control frames");
}

/// (until listening, until one document served) for a relay holding `docs` documents.
/// (listening, first document served) from spawning the relay; for tandem also how long the
/// clean stop before took (it checkpoints the storage for the start measured).
fn cold(client: &Runtime, kind: Kind, docs: usize) -> (Duration, Duration, Option<Duration>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    match kind {
        Kind::Tandem => {
            let relay = RelayProc::start(kind, &data);
            let addr = relay.addr;
            let first = client.block_on(async {
                let mut tasks = Vec::new();
                for d in 0..DEVICES {
                    let mine = docs / DEVICES + usize::from(d < docs % DEVICES);
                    tasks.push(tokio::spawn(async move {
                        let name = format!("dev{d}");
                        let (repo, sync) = tandem_device(&name, addr, &token(&name, &[], &[&name]));
                        let r = repo.clone();
                        let ids = tokio::task::spawn_blocking(move || {
                            (0..mine)
                                .map(|i| {
                                    r.create_in(
                                        &name,
                                        "note",
                                        json!({"title": format!("note {i}"), "body": body(), "pinned": false}),
                                    )
                                    .expect("create")
                                })
                                .collect::<Vec<_>>()
                        })
                        .await
                        .expect("creator");
                        sync.wait_synced(WAIT).await.expect("synced");
                        sync.stop().await;
                        ids
                    }));
                }
                let mut first = None;
                for t in tasks {
                    let ids = t.await.expect("device");
                    first = first.or(ids.first().cloned());
                }
                first.expect("a document")
            });
            let stopping = Instant::now();
            let clean = relay.stop_counting().is_some();
            let stop = clean.then(|| stopping.elapsed());
            let t0 = Instant::now();
            let relay = RelayProc::start(kind, &data);
            let listening = relay.started_in;
            client.block_on(async {
                let mut ws = tandem_raw(relay.addr, &token("reader", &["dev0"], &[])).await;
                raw_send(
                    &mut ws,
                    &ClientMsg::Pull {
                        doc: first,
                        after: 0,
                        max_bytes: 1 << 20,
                    },
                )
                .await;
                match raw_recv(&mut ws).await {
                    RelayMsg::Changes { changes, .. } if !changes.is_empty() => {}
                    other => panic!("expected the document's changes, got {other:?}"),
                }
            });
            let served = t0.elapsed();
            relay.stop();
            (listening, served, stop)
        }
        Kind::Samod => {
            // Filled in this process, straight into the folder the relay will serve (through
            // the relay it would take many minutes: see the `create` rows).
            let first = client.block_on(async {
                let repo = samod::Repo::build_tokio()
                    .with_storage(samod::storage::TokioFilesystemStorage::new(&data))
                    .with_peer_id(samod::PeerId::from(SAMOD_RELAY_PEER))
                    .load()
                    .await;
                let mut first = None;
                for i in 0..docs {
                    let h = repo.create(samod_note(i)).await.expect("create");
                    first = first.or(Some(h.document_id().clone()));
                }
                repo.stop().await;
                first.expect("a document")
            });
            let t0 = Instant::now();
            let relay = RelayProc::start(kind, &data);
            let listening = relay.started_in;
            client.block_on(async {
                let (repo, _) = samod_device("reader", Default::default(), relay.addr).await;
                tokio::time::timeout(WAIT, repo.find(first))
                    .await
                    .expect("found in time")
                    .expect("running")
                    .expect("the relay has it");
                repo.stop().await;
            });
            let served = t0.elapsed();
            relay.stop();
            (listening, served, None)
        }
    }
}

fn cold_section(client: &Runtime) {
    let docs = scaled(10_000);
    let t = cold(client, Kind::Tandem, docs);
    let s = cold(client, Kind::Samod, docs);
    row(
        &format!("cold start of a relay holding {docs} docs: first document served"),
        format!("{} (listening {})", ms(t.1), ms(t.0)),
        format!("{} (listening {})", ms(s.1), ms(s.0)),
        times(s.1.as_secs_f64(), t.1.as_secs_f64()),
        &format!(
            "from spawning the process to a new device holding one document: tandem a `Pull`, \
             samod a `find`. tandem's stop before it took {}: it checkpoints the storage for \
             the next start",
            t.2.map_or("too long (killed)".into(), ms)
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Section `floors`: the machine's limits, same run.

fn floor_row(name: &str, figure: String, note: &str) {
    row(name, figure, "".into(), "".into(), note);
}

fn floors(client: &Runtime) {
    let n = scaled(1_000).max(20);
    let dir = tempfile::tempdir().expect("tempdir");
    // sled insert + flush, 200 B.
    let db = sled::open(dir.path().join("sled")).expect("sled");
    let value = vec![7u8; 200];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        db.insert((i as u64).to_be_bytes(), value.as_slice())
            .expect("insert");
        db.flush().expect("flush");
        lat.push(t.elapsed());
    }
    floor_row(
        "floor: sled insert + flush, 200 B, p50 / p99",
        format!("{} / {}", us(pct(&mut lat, 0.5)), us(pct(&mut lat, 0.99))),
        &format!("{n} in a row"),
    );
    drop(db);
    // fsync'd 4 KiB append.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("log"))
        .expect("log file");
    let block = vec![1u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        file.write_all(&block).expect("append");
        file.sync_data().expect("fdatasync");
        lat.push(t.elapsed());
    }
    let fsync_p50 = pct(&mut lat, 0.5);
    floor_row(
        "floor: fsync'd 4 KiB append (write + fdatasync), p50 / p99",
        format!("{} / {}", us(fsync_p50), us(pct(&mut lat, 0.99))),
        "the floor for a durable ack",
    );
    // tandem's durable ack alone: one connection, one single-change push at a time, straight
    // on the protocol (no device store, no sync task).
    let relay_dir = dir.path().join("relay");
    let relay = RelayProc::start(Kind::Tandem, &relay_dir);
    let mut acks = client.block_on(raw_acks(relay.addr, n));
    relay.stop();
    let raw_p50 = pct(&mut acks, 0.5);
    row(
        "tandem durable ack at low load: one push of one change at a time, p50 / p99",
        format!(
            "{} / {} = {:.1}× the fsync floor",
            us(raw_p50),
            us(pct(&mut acks, 0.99)),
            raw_p50.as_secs_f64() / fsync_p50.as_secs_f64()
        ),
        "".into(),
        "".into(),
        "push → ack over loopback, the relay's write-ahead log fdatasync'd per group; target ≤ 2× floor",
    );
    let ack = Duration::from_nanos(LOW_LOAD_ACK.load(Ordering::SeqCst));
    if !ack.is_zero() {
        row(
            "tandem change-to-synced at low load through the client (p50, lowest sustained rate)",
            format!(
                "{} = {:.1}× the fsync floor",
                ms(ack),
                ack.as_secs_f64() / fsync_p50.as_secs_f64()
            ),
            "".into(),
            "".into(),
            "device change → synced through the device's sync task (its steps, the push, the ack, the feed); the ≤ 2× target is the relay's ack above",
        );
    }
    // Automerge's own apply, save and load of the same documents as `create`.
    let docs = scaled(2_000);
    let notes: Vec<Automerge> = (0..docs).map(samod_note).collect();
    let changes: Vec<Vec<u8>> = notes
        .iter()
        .map(|d| {
            d.get_changes(&[])
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .next()
                .expect("a change")
        })
        .collect();
    let t = Instant::now();
    let mut applied = Vec::with_capacity(docs);
    for c in &changes {
        let mut doc = Automerge::new();
        doc.apply_changes([automerge::Change::from_bytes(c.clone()).expect("change")])
            .expect("apply");
        applied.push(doc);
    }
    let apply = t.elapsed();
    let t = Instant::now();
    let saved: Vec<Vec<u8>> = applied.iter().map(|d| d.save()).collect();
    let save = t.elapsed();
    let t = Instant::now();
    for s in &saved {
        let d = Automerge::load(s).expect("load");
        assert!(d.get(ROOT, "title").expect("read").is_some());
    }
    let load = t.elapsed();
    let per = |d: Duration| us(d / docs as u32);
    floor_row(
        &format!("floor: Automerge apply / save / load of the same {docs} notes, per doc"),
        format!("{} / {} / {}", per(apply), per(save), per(load)),
        &format!(
            "one change of {} B per note (saved {} B); what a relay holding live documents pays at least",
            changes[0].len(),
            saved[0].len()
        ),
    );
    // Loopback WebSocket echo of the same frame sizes.
    for size in [changes[0].len() + 64, 4096] {
        let mut lat = client.block_on(ws_echo(size, n));
        floor_row(
            &format!("floor: loopback WebSocket echo, {size} B frame, p50 / p99"),
            format!("{} / {}", us(pct(&mut lat, 0.5)), us(pct(&mut lat, 0.99))),
            "a push frame of one note, and a 4 KiB frame",
        );
    }
}

/// `n` push → ack round trips, one change each, one after another.
async fn raw_acks(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let ns = "acks";
    let mut ws = tandem_raw(addr, &token("acker", &[], &[ns])).await;
    let doc = DocId::generate();
    let mut am = automerge::AutoCommit::new();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        am.put(ROOT, "title", format!("revision {i}")).expect("put");
        am.commit();
        let change = am
            .get_last_local_change()
            .expect("a change")
            .raw_bytes()
            .to_vec();
        let t = Instant::now();
        raw_send(
            &mut ws,
            &ClientMsg::Push {
                namespace: ns.into(),
                doc,
                batch: i as u64,
                changes: vec![change],
            },
        )
        .await;
        match raw_recv(&mut ws).await {
            RelayMsg::Ack { batch, .. } if batch == i as u64 => lat.push(t.elapsed()),
            other => panic!("expected the ack, got {other:?}"),
        }
    }
    lat
}

async fn ws_echo(size: usize, n: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if m.is_binary() && ws.send(m).await.is_err() {
                return;
            }
        }
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .expect("connect");
    let frame = vec![3u8; size];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        ws.send(Message::Binary(frame.clone().into()))
            .await
            .expect("send");
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo in time")
        {
            Some(Ok(Message::Binary(_))) => lat.push(t.elapsed()),
            other => panic!("no echo: {other:?}"),
        }
    }
    let _ = ws.close(None).await;
    server.abort();
    lat
}

fn main() {
    if let Some(data) = std::env::var_os(SAMOD_RELAY) {
        samod_relay(PathBuf::from(data));
        return;
    }
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then,
    // unless asked for the smoke run (`cargo test --bench versus -- --smoke`, in CI).
    if !std::env::args().any(|a| a == "--bench" || a == "--smoke") {
        return;
    }
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    let on = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
    let load_before = load_average();
    let started = Instant::now();
    let client = runtime("devices");
    println!("| measurement | tandem | samod | tandem better by | note |");
    println!("|---|---|---|---|---|");
    type Section = (&'static str, fn(&Runtime));
    let sections: [Section; 7] = [
        ("create", create_section),
        ("alone", alone_section),
        ("fanout", fanout_section),
        ("sustained", sustained_section),
        ("reconnect", reconnect_section),
        ("cold", cold_section),
        ("floors", floors),
    ];
    let mut took = Vec::new();
    for (name, section) in sections.into_iter().filter(|(name, _)| on(name)) {
        let t0 = Instant::now();
        section(&client);
        took.push(format!("{name} {:.0} s", t0.elapsed().as_secs_f64()));
    }
    println!(
        "\n{} cores; load average (1, 5, 15 min) at the start: {load_before}; at the end: {}; \
         {:.0} s in all ({})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        started.elapsed().as_secs_f64(),
        took.join(", ")
    );
}
