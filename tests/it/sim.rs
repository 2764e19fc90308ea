//! The seeded deterministic simulation, tandem's primary test (docs/testing.md).
//!
//! Per seed: 2–8 devices (a [`Repo`] with the note schema on a crashable in-memory disk, or
//! now and then on a real sled folder) and one relay ([`RelayLog`] on a crashable disk, a
//! [`RelaySession`] per connection, a [`Hub`] for fan-out), joined by an in-memory network that
//! carries *encoded* frames both ways (so the codec is exercised), under simulated time. One
//! `StdRng` seeded with the seed decides everything: random schema-valid edits, connects and
//! disconnects, the interleaving of frames across connections (never within one: a WebSocket
//! is ordered), frames lost only with their whole connection (the relay may or may not have
//! read what was in flight), replayed pushes on fresh connections, device and relay crashes
//! that lose exactly what was not flushed, power cuts in the middle of a write, and relay
//! wipes (new storage, new identity). Then everything heals — every device connected, frames
//! delivered until none move and every session `is_synced()` — and the run must have
//! converged: the same documents, heads, values and open conflicts everywhere; every change
//! ever acknowledged on every device; empty outboxes; a relay log that holds everything, in
//! causal order.
//!
//! Replaying: a failure prints its seed; `TANDEM_SEED=<n> cargo test --test it sim` runs that
//! seed alone and prints the tail of its event trace. Nothing here reads the wall clock or
//! thread-local randomness, and nothing iterates a `HashMap`: ids, actors, relay identities
//! and change times all derive from the seed (`Entropy::seeded`, `Store::from_backend_as`,
//! `RelayLog::with_backend_as`), so a seed replays exactly.
//!
//! Not here: real sockets and the tokio shells (tests/it/sync.rs, relay.rs), and the real
//! process being killed (crash.rs, relay_crash.rs).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::ReadDoc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use tandem::client::{ClientSession, SessionConfig as ClientConfig, SyncError};
use tandem::crdt::parse_change;
use tandem::relay::auth::Claims;
use tandem::relay::log::RelayLog;
use tandem::relay::session::{Effect, Hub, RelaySession, SessionConfig as RelayConfig};
use tandem::store::{Backend, Batch, Entries, SledBackend, Store, StoreError, StoreOptions};
use tandem::transport::{codec, ClientMsg, ErrorCode, Limits, RelayMsg};
use tandem::{DeviceId, DocId, Entropy, Repo, RepoOptions};

use crate::support::note_schema;

/// Seeds CI runs (override with `TANDEM_SIM_SEEDS`).
const DEFAULT_SEEDS: u64 = 1000;
/// Every change in a simulation is made at this time: change bytes include their time.
const CHANGE_TIME: i64 = 1_700_000_000;
/// Trace lines printed when a replayed seed fails (override with `TANDEM_SIM_TRACE`).
const TRACE_TAIL: usize = 400;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn simulation() {
    if let Some(seed) = env_u64("TANDEM_SEED") {
        replay(seed);
        return;
    }
    let first = env_u64("TANDEM_SIM_FIRST").unwrap_or(0);
    let count = env_u64("TANDEM_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    // Replaying must be exact: the same seed twice gives the same trace, event for event.
    let twice = catch_unwind(|| {
        let a = Sim::run(first, true).trace.unwrap_or_default();
        let b = Sim::run(first, true).trace.unwrap_or_default();
        (a, b)
    });
    let (a, b) = twice.unwrap_or_else(|panic| {
        panic!(
            "simulation seed {first} failed: {}\n\
             replay it with: TANDEM_SEED={first} cargo test --test it sim",
            panic_message(&panic)
        )
    });
    assert!(
        a == b,
        "seed {first} did not replay exactly (its two traces differ at line {})",
        a.iter().zip(&b).take_while(|(x, y)| x == y).count()
    );

    let started = Instant::now();
    let next = AtomicU64::new(first);
    let stop = AtomicBool::new(false);
    let failed: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let totals: Mutex<Stats> = Mutex::new(Stats::default());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // A failing seed's panic message is what we report; the default hook would print every
    // one of them (with backtraces) in the middle of the others' output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count || stop.load(Ordering::Relaxed) {
                    break;
                }
                match catch_unwind(|| Sim::run(seed, false)) {
                    Ok(outcome) => totals.lock().unwrap().add(&outcome.stats),
                    Err(panic) => {
                        stop.store(true, Ordering::Relaxed);
                        failed.lock().unwrap().push((seed, panic_message(&panic)));
                    }
                }
            });
        }
    });
    std::panic::set_hook(hook);
    let mut failed = failed.into_inner().unwrap();
    failed.sort();
    if let Some((seed, why)) = failed.first() {
        panic!(
            "simulation seed {seed} failed: {why}\n\
             replay it with: TANDEM_SEED={seed} cargo test --test it sim"
        );
    }
    let t = totals.into_inner().unwrap();
    eprintln!(
        "simulated seeds {first}..{} in {:.1?} on {threads} threads: {t}",
        first + count,
        started.elapsed()
    );
}

/// Run one seed with its trace; on failure print the trace's tail, then fail the same way.
fn replay(seed: u64) {
    let trace = Arc::new(Mutex::new(Vec::new()));
    let shared = trace.clone();
    let result = catch_unwind(AssertUnwindSafe(move || {
        // The trace goes where the panic cannot take it away.
        let mut sim = Sim::new(seed, false);
        sim.shared_trace = Some(shared);
        sim.play()
    }));
    match result {
        Ok(outcome) => eprintln!("seed {seed} passed: {}", outcome.stats),
        Err(panic) => {
            let lines = trace.lock().unwrap_or_else(|p| p.into_inner());
            let tail = env_u64("TANDEM_SIM_TRACE").map_or(TRACE_TAIL, |n| n as usize);
            eprintln!("--- the last {tail} events of seed {seed} ---");
            for l in lines.iter().skip(lines.len().saturating_sub(tail)) {
                eprintln!("{l}");
            }
            panic!("simulation seed {seed} failed: {}", panic_message(&panic));
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

// ---- a disk that loses what was not synced ---------------------------------------------------

/// A [`Backend`] in memory that behaves like a disk under power cuts: writes land in `live`
/// and reach `durable` only on `sync`; a reboot keeps only `durable`. A power cut can be armed
/// to hit at the n-th next sync, in the middle of whatever the store is doing: that sync fails,
/// and so does every access until the reboot.
#[derive(Default)]
struct DiskState {
    live: BTreeMap<Vec<u8>, Vec<u8>>,
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    unsynced: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    cut_at_sync: Option<u32>,
    dead: bool,
}

#[derive(Clone, Default)]
struct Disk(Arc<Mutex<DiskState>>);

impl Disk {
    fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cut the power at the `n`-th next sync (n ≥ 1).
    fn arm(&self, n: u32) {
        self.state().cut_at_sync = Some(n.max(1));
    }

    fn disarm(&self) {
        self.state().cut_at_sync = None;
    }

    fn is_dead(&self) -> bool {
        self.state().dead
    }

    /// Power back on: everything that was not synced is gone.
    fn reboot(&self) {
        let mut s = self.state();
        s.live = s.durable.clone();
        s.unsynced.clear();
        s.dead = false;
        s.cut_at_sync = None;
    }

    fn alive(&self) -> Result<std::sync::MutexGuard<'_, DiskState>, StoreError> {
        let s = self.state();
        if s.dead {
            return Err(StoreError::Io("the simulated disk lost power".into()));
        }
        Ok(s)
    }
}

impl Backend for Disk {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.alive()?.live.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        Ok(self
            .alive()?
            .live
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .alive()?
            .live
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, _)| k.clone()))
    }

    fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        Ok(self
            .alive()?
            .live
            .range(start.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let mut s = self.alive()?;
        for (k, v) in batch.into_ops() {
            match &v {
                Some(v) => s.live.insert(k.clone(), v.clone()),
                None => s.live.remove(&k),
            };
            s.unsynced.push((k, v));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let mut s = self.alive()?;
        if let Some(n) = s.cut_at_sync {
            if n <= 1 {
                s.dead = true;
                return Err(StoreError::Io("the simulated disk lost power".into()));
            }
            s.cut_at_sync = Some(n - 1);
        }
        let ops = std::mem::take(&mut s.unsynced);
        for (k, v) in ops {
            match v {
                Some(v) => s.durable.insert(k, v),
                None => s.durable.remove(&k),
            };
        }
        Ok(())
    }
}

// ---- the world --------------------------------------------------------------------------------

/// What a run did, summed over seeds for the report (and a hint of what the seeds covered).
#[derive(Default, Clone)]
struct Stats {
    seeds: u64,
    devices: u64,
    edits: u64,
    frames: u64,
    acks: u64,
    snapshots: u64,
    need_history: u64,
    device_crashes: u64,
    power_cuts: u64,
    relay_crashes: u64,
    relay_wipes: u64,
    replays: u64,
    compactions: u64,
    slow_closed: u64,
    heal_steps: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.devices += o.devices;
        self.edits += o.edits;
        self.frames += o.frames;
        self.acks += o.acks;
        self.snapshots += o.snapshots;
        self.need_history += o.need_history;
        self.device_crashes += o.device_crashes;
        self.power_cuts += o.power_cuts;
        self.relay_crashes += o.relay_crashes;
        self.relay_wipes += o.relay_wipes;
        self.replays += o.replays;
        self.compactions += o.compactions;
        self.slow_closed += o.slow_closed;
        self.heal_steps += o.heal_steps;
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} seeds, {} devices, {} edits, {} frames, {} acks, {} snapshot chunks, \
             {} NeedHistory, {} device crashes ({} power cuts), {} relay crashes, \
             {} relay wipes, {} replayed pushes, {} relay compactions, \
             {} slow consumers closed, {} heal steps",
            self.seeds,
            self.devices,
            self.edits,
            self.frames,
            self.acks,
            self.snapshots,
            self.need_history,
            self.device_crashes,
            self.power_cuts,
            self.relay_crashes,
            self.relay_wipes,
            self.replays,
            self.compactions,
            self.slow_closed,
            self.heal_steps
        )
    }
}

struct Outcome {
    stats: Stats,
    trace: Option<Vec<String>>,
}

enum DeviceStore {
    Memory(Disk),
    /// A real sled folder (no fsync: a simulated crash drops the process state, not the OS's).
    Sled(tempfile::TempDir),
}

struct Device {
    name: String,
    /// What its token allows (`None`: the relay runs without auth).
    claims: Option<Claims>,
    id: DeviceId,
    store: DeviceStore,
    /// `None` only while it is being reopened.
    repo: Option<Repo>,
    /// Reopens so far: each gets its own id seed (ids must not repeat across reopens).
    incarnation: u64,
    compact_after: u64,
    cfg: ClientConfig,
    conn: Option<u64>,
    /// Change events were lost since the last rescan.
    lagged: bool,
}

/// One WebSocket: two ordered queues of encoded frames and the two sessions at its ends.
struct Conn {
    device: usize,
    client: ClientSession,
    /// The relay's end: `None` until the client's hello was read.
    relay: Option<RelaySession>,
    hub_id: Option<u64>,
    to_relay: VecDeque<Vec<u8>>,
    to_client: VecDeque<Vec<u8>>,
    /// The relay has closed its end: it reads nothing more; the client gets what was queued,
    /// then sees the close.
    relay_closed: bool,
    /// Pushes in flight: batch -> (doc, change hashes), to know what an `Ack` acknowledges.
    pushes: BTreeMap<u64, (DocId, Vec<[u8; 32]>)>,
}

struct Relay {
    disk: Disk,
    log: RelayLog,
    hub: Hub<u64>,
    cfg: RelayConfig,
    compact_after: u64,
    /// Connections whose outgoing queue is this long are too slow for fan-out.
    queue_bound: usize,
    /// Bumped by every wipe: acknowledged seqs are only comparable within one identity.
    identity: u64,
    /// Compactions asked for and not yet run (the real relay runs them in the background).
    compactions: Vec<DocId>,
}

impl Relay {
    fn open(disk: &Disk, id: [u8; 16], compact_after: u64) -> RelayLog {
        let mut log = RelayLog::with_backend_as(Box::new(disk.clone()), id).expect("relay log");
        log.compact_after = compact_after;
        log
    }
}

struct Sim {
    seed: u64,
    rng: StdRng,
    base: Instant,
    now: Instant,
    namespaces: Vec<String>,
    devices: Vec<Device>,
    relay: Relay,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    docs_created: usize,
    max_docs: usize,
    /// Every change some `Ack` acknowledged: (doc, hash).
    acked: BTreeSet<(DocId, [u8; 32])>,
    /// The seq each acknowledged change got, per relay identity: a replay must get the same.
    seqs: BTreeMap<(u64, DocId, [u8; 32]), u64>,
    /// Push frames seen on the wire, for replaying on fresh connections.
    sent_pushes: VecDeque<Vec<u8>>,
    stats: Stats,
    trace: Option<Vec<String>>,
    shared_trace: Option<Arc<Mutex<Vec<String>>>>,
}

macro_rules! note {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.tracing() {
            let line = format!("{:>9.3}s {}", $sim.elapsed(), format!($($arg)*));
            $sim.record(line);
        }
    };
}

fn short(d: &DocId) -> String {
    d.to_string().chars().take(6).collect()
}

fn describe_client(m: &ClientMsg) -> String {
    match m {
        ClientMsg::Hello { feeds, .. } => format!("Hello feeds={}", feeds.len()),
        ClientMsg::Subscribe { .. } => "Subscribe".into(),
        ClientMsg::FeedMore { namespace, after } => format!("FeedMore {namespace} after={after}"),
        ClientMsg::Pull { doc, after, .. } => format!("Pull {} after={after}", short(doc)),
        ClientMsg::Push {
            doc,
            batch,
            changes,
            ..
        } => format!("Push {} batch={batch} n={}", short(doc), changes.len()),
        ClientMsg::Ping { nonce } => format!("Ping {nonce}"),
        ClientMsg::Pong { nonce } => format!("Pong {nonce}"),
        ClientMsg::Presence { doc, .. } => format!("Presence {}", short(doc)),
    }
}

fn describe_relay(m: &RelayMsg) -> String {
    match m {
        RelayMsg::Hello { relay_id, .. } => format!("Hello relay={}", hex::encode(&relay_id[..3])),
        RelayMsg::Feed {
            namespace,
            entries,
            next_cursor,
            more,
        } => format!(
            "Feed {namespace} n={} next={next_cursor} more={more}",
            entries.len()
        ),
        RelayMsg::Changes {
            doc,
            from,
            to,
            more,
            ..
        } => format!("Changes {} {from}..={to} more={more}", short(doc)),
        RelayMsg::Snapshot {
            doc,
            upto,
            chunk,
            chunks,
            ..
        } => format!("Snapshot {} upto={upto} {chunk}/{chunks}", short(doc)),
        RelayMsg::Ack { doc, batch, seqs } => {
            format!("Ack {} batch={batch} seqs={seqs:?}", short(doc))
        }
        RelayMsg::NeedHistory { doc, batch } => {
            format!("NeedHistory {} batch={batch}", short(doc))
        }
        RelayMsg::Error {
            code, message, doc, ..
        } => format!("Error {code:?} {:?}: {message}", doc.map(|d| short(&d))),
        RelayMsg::Ping { nonce } => format!("Ping {nonce}"),
        RelayMsg::Pong { nonce } => format!("Pong {nonce}"),
        RelayMsg::Presence { doc, peer, .. } => format!("Presence {} peer={peer}", short(doc)),
    }
}

fn hash_of(change: &[u8]) -> [u8; 32] {
    parse_change(change)
        .expect("a change the sim saw on the wire")
        .hash()
        .0
}

impl Sim {
    fn run(seed: u64, trace: bool) -> Outcome {
        Sim::new(seed, trace).play()
    }

    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let namespaces: Vec<String> = if rng.gen_bool(0.5) {
            vec!["default".into()]
        } else {
            vec!["default".into(), "work".into()]
        };
        // Now and then a relay without auth (`--insecure-no-auth`): everyone may do anything.
        let insecure = rng.gen_ratio(1, 5);
        let cfg = relay_config(&mut rng);
        let compact_after = *pick(&mut rng, &[3u64, 5, 8, 13, 10_000, 10_000]);
        let queue_bound = *pick(&mut rng, &[3usize, 8, 32, 1024]);
        let disk = Disk::default();
        let log = Relay::open(&disk, rng.gen(), compact_after);
        let n = rng.gen_range(2..=8);
        let sled_device = rng.gen_ratio(1, 25);
        let mut devices = Vec::with_capacity(n);
        for i in 0..n {
            let store = if sled_device && i == 0 {
                DeviceStore::Sled(tempfile::tempdir().expect("temp dir"))
            } else {
                DeviceStore::Memory(Disk::default())
            };
            let cfg = ClientConfig {
                max_pull_bytes: *pick(&mut rng, &[200u64, 1500, 1 << 20]),
                max_pushes_in_flight: rng.gen_range(1..=8),
                max_pulls_in_flight: rng.gen_range(1..=8),
                max_queued_pulls: *pick(&mut rng, &[1usize, 2, 4096]),
                ..ClientConfig::default()
            };
            // Device 0 may write everything; the others may be narrower: read-only, writing
            // only `default`, or seeing only `default`.
            let access = match rng.gen_range(0..10) {
                _ if insecure => None,
                _ if i == 0 => Some((namespaces.clone(), namespaces.clone())),
                0 => Some((namespaces.clone(), Vec::new())),
                1 => Some((namespaces.clone(), vec!["default".to_string()])),
                2 => Some((vec!["default".to_string()], vec!["default".to_string()])),
                _ => Some((namespaces.clone(), namespaces.clone())),
            };
            let claims = access.map(|(read, write)| Claims {
                sub: format!("d{i}"),
                exp: u64::MAX,
                read,
                write,
            });
            devices.push(Device {
                name: format!("d{i}"),
                claims,
                id: DeviceId(rng.gen()),
                store,
                repo: None,
                incarnation: 0,
                compact_after: *pick(&mut rng, &[2u64, 4, 7, 1000]),
                cfg,
                conn: None,
                lagged: false,
            });
        }
        let base = Instant::now();
        let mut sim = Sim {
            seed,
            max_docs: rng.gen_range(1..=6),
            rng,
            base,
            now: base,
            namespaces,
            devices,
            relay: Relay {
                disk,
                log,
                hub: Hub::default(),
                cfg,
                compact_after,
                queue_bound,
                identity: 0,
                compactions: Vec::new(),
            },
            conns: BTreeMap::new(),
            next_conn: 1,
            docs_created: 0,
            acked: BTreeSet::new(),
            seqs: BTreeMap::new(),
            sent_pushes: VecDeque::new(),
            stats: Stats {
                seeds: 1,
                devices: n as u64,
                ..Stats::default()
            },
            trace: trace.then(Vec::new),
            shared_trace: None,
        };
        for d in 0..n {
            sim.open_device(d);
        }
        sim
    }

    fn tracing(&self) -> bool {
        self.trace.is_some() || self.shared_trace.is_some()
    }

    fn elapsed(&self) -> f64 {
        (self.now - self.base).as_secs_f64()
    }

    fn record(&mut self, line: String) {
        if let Some(t) = &self.shared_trace {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.clone());
        }
        if let Some(t) = &mut self.trace {
            t.push(line);
        }
    }

    fn play(mut self) -> Outcome {
        note!(
            self,
            "seed {}: {} devices, namespaces {:?}, relay {:?}, compact after {}, queue bound {}",
            self.seed,
            self.devices.len(),
            self.namespaces,
            self.relay.cfg,
            self.relay.compact_after,
            self.relay.queue_bound
        );
        let steps = self.rng.gen_range(150..=450);
        for _ in 0..steps {
            self.step();
        }
        self.heal();
        self.check();
        Outcome {
            stats: self.stats,
            trace: self.trace,
        }
    }

    // ---- the random steps ------------------------------------------------------------------

    fn step(&mut self) {
        if self.relay.disk.is_dead() && self.rng.gen_bool(0.3) {
            self.relay_crash();
            return;
        }
        match self.rng.gen_range(0..1000) {
            0..=499 => self.deliver_random(),
            500..=679 => {
                let d = self.rng.gen_range(0..self.devices.len());
                self.edit(d);
            }
            680..=759 => self.advance_time(),
            760..=819 => {
                let d = self.rng.gen_range(0..self.devices.len());
                self.connect(d);
            }
            820..=859 => {
                let d = self.rng.gen_range(0..self.devices.len());
                if let Some(c) = self.devices[d].conn {
                    note!(self, "{} disconnects", self.devices[d].name);
                    self.drop_conn(c, true);
                }
            }
            860..=874 => {
                let d = self.rng.gen_range(0..self.devices.len());
                self.crash_device(d);
            }
            875..=884 => {
                let d = self.rng.gen_range(0..self.devices.len());
                if let DeviceStore::Memory(disk) = &self.devices[d].store {
                    let n = self.rng.gen_range(1..=12);
                    disk.arm(n);
                    note!(
                        self,
                        "{}: power cut armed at sync {n}",
                        self.devices[d].name
                    );
                }
            }
            885..=891 => self.relay_crash(),
            892..=894 => self.relay_wipe(),
            895..=899 => {
                let n = self.rng.gen_range(1..=12);
                self.relay.disk.arm(n);
                note!(self, "relay: power cut armed at sync {n}");
            }
            900..=939 => self.run_compaction(),
            940..=959 => self.replay_push(),
            960..=969 => {
                let d = self.rng.gen_range(0..self.devices.len());
                self.rescan(d);
            }
            _ => self.deliver_random(),
        }
    }

    fn advance_time(&mut self) {
        let dt = match self.rng.gen_range(0..100) {
            0..=79 => Duration::from_millis(self.rng.gen_range(0..=800)),
            80..=96 => Duration::from_millis(self.rng.gen_range(1_000..=20_000)),
            _ => Duration::from_millis(self.rng.gen_range(30_000..=70_000)),
        };
        self.now += dt;
        note!(self, "time +{dt:?}");
        self.timeouts();
    }

    /// Call `handle_timeout` on every session whose timer is due.
    fn timeouts(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for c in ids {
            let due = self
                .conns
                .get(&c)
                .and_then(|conn| conn.client.poll_timeout())
                .is_some_and(|t| t <= self.now);
            if due {
                self.client_call(c, ClientCall::Timeout);
            }
        }
    }

    // ---- devices -----------------------------------------------------------------------------

    fn open_device(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        let entropy = Entropy::seeded(
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((d as u64) << 32)
                .wrapping_add(dev.incarnation),
            CHANGE_TIME,
        );
        let mut opts = RepoOptions::new(dev.name.clone()).schema(note_schema());
        opts.entropy = entropy;
        opts.compact_after_changes = dev.compact_after;
        let store = match &dev.store {
            DeviceStore::Memory(disk) => {
                Store::from_backend_as(Box::new(disk.clone()), None, dev.id).expect("open store")
            }
            DeviceStore::Sled(dir) => {
                let sopts = StoreOptions {
                    fsync: false,
                    cache_bytes: 4 << 20,
                };
                let backend = SledBackend::open(dir.path(), &sopts).expect("open sled");
                Store::from_backend_as(Box::new(backend), Some(dir.path().to_path_buf()), dev.id)
                    .expect("open store")
            }
        };
        dev.repo = Some(Repo::with_store(store, opts));
    }

    fn repo(&self, d: usize) -> Repo {
        self.devices[d]
            .repo
            .clone()
            .expect("a device's repo is open between steps")
    }

    /// Whether device `d`'s token may write `ns` (a relay without auth lets everyone).
    fn may_write(&self, d: usize, ns: &str) -> bool {
        self.devices[d]
            .claims
            .as_ref()
            .is_none_or(|c| c.can_write(ns))
    }

    /// Whether device `d`'s token may read `ns`.
    fn may_read(&self, d: usize, ns: &str) -> bool {
        self.devices[d]
            .claims
            .as_ref()
            .is_none_or(|c| c.can_read(ns))
    }

    /// A device whose change events were lost rescans its outbox.
    fn rescan(&mut self, d: usize) {
        if let (true, Some(c)) = (self.devices[d].lagged, self.devices[d].conn) {
            self.devices[d].lagged = false;
            note!(self, "{} rescans its outbox", self.devices[d].name);
            self.client_call(c, ClientCall::Rescan);
        }
    }

    fn disk_dead(&self, d: usize) -> bool {
        match &self.devices[d].store {
            DeviceStore::Memory(disk) => disk.is_dead(),
            DeviceStore::Sled(_) => false,
        }
    }

    /// The process dies: its connection goes (the relay may have read some of what was in
    /// flight), its memory goes, and its disk keeps only what was synced.
    fn crash_device(&mut self, d: usize) {
        let power_cut = self.disk_dead(d);
        note!(
            self,
            "{} crashes{}",
            self.devices[d].name,
            if power_cut { " (power cut)" } else { "" }
        );
        self.stats.device_crashes += 1;
        self.stats.power_cuts += u64::from(power_cut);
        if let Some(c) = self.devices[d].conn {
            self.drop_conn(c, true);
        }
        let dev = &mut self.devices[d];
        dev.repo = None;
        if let DeviceStore::Memory(disk) = &dev.store {
            disk.reboot();
        }
        dev.incarnation += 1;
        self.open_device(d);
    }

    fn connect(&mut self, d: usize) {
        if self.devices[d].conn.is_some() {
            return;
        }
        let repo = self.repo(d);
        let client = match ClientSession::new(self.now, &repo, self.devices[d].cfg.clone()) {
            Ok(c) => c,
            Err(e) => {
                assert!(self.disk_dead(d), "a session could not start: {e}");
                self.crash_device(d);
                return;
            }
        };
        let c = self.next_conn;
        self.next_conn += 1;
        note!(self, "{} connects: c{c}", self.devices[d].name);
        self.conns.insert(
            c,
            Conn {
                device: d,
                client,
                relay: None,
                hub_id: None,
                to_relay: VecDeque::new(),
                to_client: VecDeque::new(),
                relay_closed: false,
                pushes: BTreeMap::new(),
            },
        );
        self.devices[d].conn = Some(c);
        // A new session looks at the whole outbox in its handshake.
        self.devices[d].lagged = false;
        self.drain_client(c);
    }

    /// A random schema-valid local change (or a creation), then tell the session.
    fn edit(&mut self, d: usize) {
        let repo = self.repo(d);
        let docs: Vec<DocId> = match repo.list(None, true) {
            Ok(l) => l
                .into_iter()
                .filter(|(_, m)| self.may_write(d, &m.namespace))
                .map(|(id, _)| id)
                .collect(),
            Err(e) => {
                assert!(self.disk_dead(d), "list failed: {e}");
                return self.crash_device(d);
            }
        };
        let writable: Vec<String> = self
            .namespaces
            .iter()
            .filter(|ns| self.may_write(d, ns))
            .cloned()
            .collect();
        let create =
            docs.is_empty() || (self.docs_created < self.max_docs && self.rng.gen_ratio(1, 8));
        let result = if create {
            if self.docs_created >= self.max_docs || writable.is_empty() {
                return;
            }
            let ns = pick(&mut self.rng, &writable).clone();
            let title = *pick(&mut self.rng, TITLES);
            let body = random_text(&mut self.rng, 0..=8);
            let r = repo.create_in(
                &ns,
                "note",
                json!({"title": title, "body": body, "pinned": false}),
            );
            match r {
                Ok(id) => {
                    self.docs_created += 1;
                    note!(
                        self,
                        "{} creates {} in {ns}",
                        self.devices[d].name,
                        short(&id)
                    );
                    Ok(id)
                }
                Err(e) => Err(e),
            }
        } else {
            let id = *pick(&mut self.rng, &docs);
            self.change(d, &repo, id).map(|()| id)
        };
        match result {
            Ok(id) => {
                self.stats.edits += 1;
                if let Some(c) = self.devices[d].conn {
                    if self.rng.gen_ratio(1, 10) {
                        // The change event was lost (the shell's channel lagged): the shell
                        // rescans the outbox later.
                        self.devices[d].lagged = true;
                    } else {
                        self.client_call(c, ClientCall::LocalChanged(id));
                    }
                }
            }
            Err(e) => {
                assert!(self.disk_dead(d), "a schema-valid edit failed: {e}");
                self.crash_device(d);
            }
        }
    }

    fn change(&mut self, d: usize, repo: &Repo, id: DocId) -> Result<(), tandem::Error> {
        let entity = repo.get(&id)?;
        let rng = &mut self.rng;
        let what = rng.gen_range(0..100);
        if what < 8 {
            let conflicts = repo.conflicts(&id, false)?;
            if let Some(c) = conflicts.first() {
                let v = pick(rng, &c.versions).value.clone();
                note!(
                    self,
                    "{} resolves {} {} = {v}",
                    self.devices[d].name,
                    short(&id),
                    c.field
                );
                repo.resolve(&id, &c.field, v)?;
                return Ok(());
            }
        }
        let mut body_len = entity.value["body"].as_str().map_or(0, str::len);
        let mut ops = Vec::new();
        for _ in 0..self.rng.gen_range(1..=3) {
            let op = random_op(&mut self.rng, body_len, entity.deleted);
            if let Op::Splice(_, del, text) = &op {
                body_len = body_len - del + text.len();
            }
            ops.push(op);
        }
        note!(
            self,
            "{} edits {}: {ops:?}",
            self.devices[d].name,
            short(&id)
        );
        repo.change(&id, |tx| {
            for op in &ops {
                match op {
                    Op::Splice(pos, del, text) => tx.splice_text("body", *pos, *del, text)?,
                    Op::Increment(by) => tx.increment("views", *by)?,
                    Op::Pin(b) => tx.set("pinned", *b)?,
                    Op::Label(k, v) => tx.merge_put("labels", k, v.clone())?,
                    Op::Title(t) => tx.set("title", *t)?,
                    Op::Deleted(b) => tx.set_deleted(*b)?,
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    // ---- the network ---------------------------------------------------------------------------

    /// Move one frame: a random direction of a random connection (across connections in any
    /// order; within one, in order).
    fn deliver_random(&mut self) {
        let mut ready: Vec<(u64, bool)> = Vec::new();
        for (id, c) in &self.conns {
            if !c.relay_closed
                && !c.to_relay.is_empty()
                && c.to_client.len() < self.relay.queue_bound
            {
                ready.push((*id, true));
            }
            if !c.to_client.is_empty() || c.relay_closed {
                ready.push((*id, false));
            }
        }
        if ready.is_empty() {
            self.now += Duration::from_millis(self.rng.gen_range(1..=300));
            self.timeouts();
            return;
        }
        let (c, to_relay) = *pick(&mut self.rng, &ready);
        if to_relay {
            self.relay_reads(c);
        } else {
            self.client_reads(c);
        }
    }

    fn frames_in_flight(&self) -> bool {
        self.conns.values().any(|c| {
            // A closed connection counts until its client has seen the close.
            !c.to_relay.is_empty() || !c.to_client.is_empty() || c.relay_closed
        })
    }

    /// The relay reads the next frame of connection `c` and carries out what its session says.
    fn relay_reads(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let Some(frame) = conn.to_relay.pop_front() else {
            return;
        };
        self.stats.frames += 1;
        let relay = &mut self.relay;
        let effects = match &mut conn.relay {
            Some(session) => session.handle_frame(&relay.log, self.now, &frame),
            None => {
                let limit = relay.cfg.limits.max_frame_bytes as usize;
                let first = codec::decode::<ClientMsg>(&frame, limit).ok();
                let claims = self.devices[conn.device].claims.clone();
                match RelaySession::accept(relay.cfg.clone(), first, || Ok(claims)) {
                    Ok(mut session) => {
                        conn.hub_id = Some(relay.hub.join(session.claims().cloned(), c));
                        let effects = session.greet(&relay.log);
                        conn.relay = Some(session);
                        effects
                    }
                    Err(effects) => effects,
                }
            }
        };
        if self.tracing() {
            let msg = codec::decode::<ClientMsg>(&frame, usize::MAX)
                .map_or_else(|e| format!("undecodable: {e}"), |m| describe_client(&m));
            let d = self.devices[self.conns[&c].device].name.clone();
            note!(self, "c{c} {d} -> relay: {msg}");
        }
        let hub_id = self.conns.get(&c).and_then(|conn| conn.hub_id);
        self.carry_out(Some(c), hub_id, effects, &mut Vec::new());
    }

    /// Carry out a relay session's effects for connection `c`, known to the hub as `hub_id`
    /// (`c` is `None` for a replayed push's throwaway connection, whose answers go to
    /// `answers`).
    fn carry_out(
        &mut self,
        c: Option<u64>,
        hub_id: Option<u64>,
        effects: Vec<Effect>,
        answers: &mut Vec<RelayMsg>,
    ) {
        let limit = self.relay.cfg.limits.max_frame_bytes as usize;
        for effect in effects {
            match effect {
                Effect::Send(msg) => {
                    let Some(c) = c else {
                        answers.push(msg);
                        continue;
                    };
                    let frame = codec::encode(&msg, limit)
                        .unwrap_or_else(|e| panic!("the relay made a frame it cannot send: {e}"));
                    if let Some(conn) = self.conns.get_mut(&c) {
                        if !conn.relay_closed {
                            conn.to_client.push_back(frame);
                        }
                    }
                }
                Effect::Subscribe { namespaces, docs } => {
                    if let Some(h) = hub_id {
                        self.relay.hub.subscribe(h, namespaces, docs);
                    }
                }
                Effect::FanOut {
                    namespace,
                    doc,
                    changes,
                } => {
                    let frame = codec::encode(&changes, limit)
                        .unwrap_or_else(|e| panic!("the relay made a frame it cannot send: {e}"));
                    let to: Vec<u64> = self
                        .relay
                        .hub
                        .recipients(&namespace, &doc, hub_id.unwrap_or(u64::MAX))
                        .map(|(_, c)| *c)
                        .collect();
                    for r in to {
                        let slow = self
                            .conns
                            .get(&r)
                            .is_some_and(|conn| conn.to_client.len() >= self.relay.queue_bound);
                        if slow {
                            note!(self, "c{r} is too slow for fan-out: the relay closes it");
                            self.stats.slow_closed += 1;
                            self.relay_closes(r);
                        } else if let Some(conn) = self.conns.get_mut(&r) {
                            conn.to_client.push_back(frame.clone());
                        }
                    }
                }
                // The simulated devices announce no presence.
                Effect::Presence { .. } => {}
                Effect::Compact(doc) => {
                    if !self.relay.compactions.contains(&doc) {
                        self.relay.compactions.push(doc);
                    }
                }
                Effect::AwaitDurable => {
                    if let Err(e) = self.relay.log.durable() {
                        note!(
                            self,
                            "the relay log is not durable ({e}): nothing more is sent"
                        );
                        if let Some(c) = c {
                            self.relay_closes(c);
                        }
                        return;
                    }
                }
                Effect::Close => {
                    if let Some(c) = c {
                        self.relay_closes(c);
                    }
                }
            }
        }
    }

    /// The relay ends its side of `c`: it leaves the hub and reads nothing more.
    fn relay_closes(&mut self, c: u64) {
        if let Some(conn) = self.conns.get_mut(&c) {
            if let Some(h) = conn.hub_id.take() {
                self.relay.hub.leave(h);
            }
            conn.relay = None;
            conn.relay_closed = true;
            conn.to_relay.clear();
        }
    }

    /// The client reads the next frame of `c` (or, once the relay closed and the queue is
    /// empty, sees the close).
    fn client_reads(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let Some(frame) = conn.to_client.pop_front() else {
            if conn.relay_closed {
                note!(self, "c{c}: the relay closed the connection");
                self.drop_conn(c, false);
            }
            return;
        };
        self.stats.frames += 1;
        let limit = conn.client.max_frame();
        let d = conn.device;
        let msg = codec::decode::<RelayMsg>(&frame, limit)
            .unwrap_or_else(|e| panic!("a relay frame the client cannot decode: {e}"));
        let acked = match &msg {
            RelayMsg::Ack { doc, batch, seqs } => {
                conn.pushes.remove(batch).map(|(pushed, hashes)| {
                    assert_eq!(*doc, pushed, "an ack names another document than its push");
                    (*doc, hashes, seqs.clone())
                })
            }
            _ => None,
        };
        note!(
            self,
            "c{c} relay -> {}: {}",
            self.devices[d].name,
            describe_relay(&msg)
        );
        match &msg {
            RelayMsg::Snapshot { .. } => self.stats.snapshots += 1,
            RelayMsg::NeedHistory { .. } => self.stats.need_history += 1,
            _ => {}
        }
        if let Some((doc, hashes, seqs)) = acked {
            self.stats.acks += 1;
            self.acknowledged(doc, &hashes, &seqs);
        }
        self.client_call(c, ClientCall::Message(msg));
    }

    /// `hashes` of `doc` were acknowledged with `seqs`: remember them, and check a change
    /// keeps its seq within one relay identity (dedupe, invariant 5).
    fn acknowledged(&mut self, doc: DocId, hashes: &[[u8; 32]], seqs: &[u64]) {
        assert_eq!(hashes.len(), seqs.len(), "an ack with a seq per change");
        for (h, s) in hashes.iter().zip(seqs) {
            self.acked.insert((doc, *h));
            let known = *self
                .seqs
                .entry((self.relay.identity, doc, *h))
                .or_insert(*s);
            assert_eq!(
                known, *s,
                "a change of {doc} was acknowledged with two seqs"
            );
        }
    }

    fn client_call(&mut self, c: u64, call: ClientCall) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let d = conn.device;
        let repo = self.devices[d]
            .repo
            .clone()
            .expect("a device's repo is open between steps");
        let now = self.now;
        let result = match call {
            ClientCall::Message(msg) => conn.client.handle_message(now, msg, &repo),
            ClientCall::Timeout => conn.client.handle_timeout(now, &repo),
            ClientCall::LocalChanged(doc) => conn.client.local_changed(now, doc, &repo),
            ClientCall::Rescan => conn.client.rescan_outbox(now, &repo),
        };
        match result {
            Ok(()) => self.drain_client(c),
            Err(e) => {
                if self.disk_dead(d) {
                    self.crash_device(d);
                    return;
                }
                match &e {
                    // The relay went quiet (time passed) or could not read its storage.
                    SyncError::Unreachable(_) => {}
                    _ => panic!("{}'s session failed: {e}", self.devices[d].name),
                }
                note!(self, "c{c} {}: session ends: {e}", self.devices[d].name);
                self.drop_conn(c, true);
            }
        }
    }

    /// Queue everything the client wants to send; fail on any issue it reports.
    fn drain_client(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if let Some(issue) = conn.client.poll_issue() {
            panic!(
                "{} reports an issue: {issue:?}",
                self.devices[conn.device].name
            );
        }
        let limit = conn.client.max_frame();
        while let Some(msg) = conn.client.poll_transmit() {
            if let ClientMsg::Push {
                doc,
                batch,
                changes,
                ..
            } = &msg
            {
                let hashes = changes.iter().map(|ch| hash_of(ch)).collect();
                conn.pushes.insert(*batch, (*doc, hashes));
            }
            let frame = codec::encode(&msg, limit)
                .unwrap_or_else(|e| panic!("the client made a frame it cannot send: {e}"));
            if matches!(msg, ClientMsg::Push { .. }) {
                if self.sent_pushes.len() >= 64 {
                    self.sent_pushes.pop_front();
                }
                self.sent_pushes.push_back(frame.clone());
            }
            if !conn.relay_closed {
                conn.to_relay.push_back(frame);
            }
        }
    }

    /// The connection is gone. When the client drops it, the relay may first read some of
    /// what was in flight (`relay_reads_some`): a push stored whose ack is lost.
    fn drop_conn(&mut self, c: u64, relay_reads_some: bool) {
        if relay_reads_some {
            let pending = self.conns.get(&c).map_or(0, |conn| {
                if conn.relay_closed {
                    0
                } else {
                    conn.to_relay.len()
                }
            });
            let k = if pending > 0 {
                self.rng.gen_range(0..=pending)
            } else {
                0
            };
            for _ in 0..k {
                self.relay_reads(c);
            }
        }
        self.relay_closes(c);
        if let Some(conn) = self.conns.remove(&c) {
            self.devices[conn.device].conn = None;
        }
    }

    /// A push seen earlier arrives again, on a fresh connection of its own.
    fn replay_push(&mut self) {
        if self.sent_pushes.is_empty() || self.relay.disk.is_dead() {
            return;
        }
        let i = self.rng.gen_range(0..self.sent_pushes.len());
        let frame = self.sent_pushes[i].clone();
        let Ok(ClientMsg::Push {
            doc,
            batch,
            changes,
            ..
        }) = codec::decode::<ClientMsg>(&frame, usize::MAX)
        else {
            return;
        };
        self.stats.replays += 1;
        note!(
            self,
            "a push of {} (batch {batch}) is replayed",
            short(&doc)
        );
        let hello = ClientMsg::Hello {
            version: tandem::transport::PROTOCOL_VERSION,
            device: [0xee; 16],
            feeds: Vec::new(),
        };
        // Whoever replays it may write everything (or the relay has no auth).
        let claims = self.devices[0].claims.clone();
        let Ok(mut session) =
            RelaySession::accept(self.relay.cfg.clone(), Some(hello), || Ok(claims))
        else {
            panic!("the relay refused a replaying connection");
        };
        let hub_id = self.relay.hub.join(session.claims().cloned(), u64::MAX);
        let _ = session.greet(&self.relay.log);
        let effects = session.handle_frame(&self.relay.log, self.now, &frame);
        let mut answers = Vec::new();
        self.carry_out(None, Some(hub_id), effects, &mut answers);
        self.relay.hub.leave(hub_id);
        for a in answers {
            note!(self, "replay answer: {}", describe_relay(&a));
            match a {
                RelayMsg::Ack { seqs, .. } => {
                    let hashes: Vec<[u8; 32]> = changes.iter().map(|c| hash_of(c)).collect();
                    self.acknowledged(doc, &hashes, &seqs);
                }
                // The relay was wiped since: it lacks the dependencies.
                RelayMsg::NeedHistory { .. } => {}
                // The relay's disk failed, or it restarted with smaller limits since.
                RelayMsg::Error {
                    code: ErrorCode::Internal | ErrorCode::TooLarge,
                    ..
                } => {}
                other => panic!("a replayed push got {other:?}"),
            }
        }
    }

    // ---- the relay ---------------------------------------------------------------------------

    fn drop_all_conns(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for c in ids {
            self.relay_closes(c);
            if let Some(conn) = self.conns.remove(&c) {
                self.devices[conn.device].conn = None;
            }
        }
        self.relay.hub = Hub::default();
        self.relay.compactions.clear();
    }

    /// The relay process dies and restarts on the same storage, which keeps what was synced.
    fn relay_crash(&mut self) {
        let power_cut = self.relay.disk.is_dead();
        note!(
            self,
            "the relay crashes{}",
            if power_cut { " (power cut)" } else { "" }
        );
        self.stats.relay_crashes += 1;
        self.drop_all_conns();
        self.relay.disk.reboot();
        if self.rng.gen_ratio(1, 3) {
            // Restarted with other limits: clients learn them from the next hello.
            self.relay.cfg = relay_config(&mut self.rng);
            note!(self, "the relay restarts with {:?}", self.relay.cfg);
        }
        self.relay.log = Relay::open(&self.relay.disk, [0; 16], self.relay.compact_after);
    }

    /// The relay's storage is replaced by an empty one: a new identity.
    fn relay_wipe(&mut self) {
        note!(self, "the relay is wiped");
        self.stats.relay_wipes += 1;
        self.drop_all_conns();
        self.relay.disk = Disk::default();
        self.relay.identity += 1;
        let id = self.rng.gen();
        self.relay.log = Relay::open(&self.relay.disk, id, self.relay.compact_after);
    }

    fn run_compaction(&mut self) {
        if self.relay.compactions.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.relay.compactions.len());
        let doc = self.relay.compactions.remove(i);
        match self.relay.log.compact(&doc) {
            Ok(()) => {
                self.stats.compactions += 1;
                note!(self, "the relay compacts {}", short(&doc));
            }
            Err(e) => {
                assert!(self.relay.disk.is_dead(), "compaction failed: {e}");
            }
        }
    }

    // ---- the end -----------------------------------------------------------------------------

    /// Power and network back for good: reboot what is dead, connect everyone, and move frames
    /// (and time, when nothing moves) until every session is synced and no frame is in flight.
    fn heal(&mut self) {
        note!(self, "--- heal ---");
        if self.relay.disk.is_dead() {
            self.relay_crash();
        }
        self.relay.disk.disarm();
        for d in 0..self.devices.len() {
            if self.disk_dead(d) {
                self.crash_device(d);
            }
            if let DeviceStore::Memory(disk) = &self.devices[d].store {
                disk.disarm();
            }
        }
        let mut idle_rounds = 0;
        for step in 0..200_000u64 {
            self.stats.heal_steps += 1;
            for d in 0..self.devices.len() {
                self.connect(d);
                self.rescan(d);
            }
            while !self.relay.compactions.is_empty() {
                self.run_compaction();
            }
            if self.frames_in_flight() {
                self.deliver_random();
                continue;
            }
            let synced = self.conns.values().all(|c| c.client.is_synced());
            if synced && self.conns.len() == self.devices.len() {
                note!(self, "healed after {step} steps");
                return;
            }
            idle_rounds += 1;
            assert!(
                idle_rounds < 500,
                "no progress: sessions not synced with nothing in flight"
            );
            let next = self
                .conns
                .values()
                .filter_map(|c| c.client.poll_timeout())
                .min()
                .unwrap_or(self.now);
            self.now = self.now.max(next);
            note!(self, "heal: time -> {:.3}s", self.elapsed());
            self.timeouts();
        }
        panic!("the simulation did not quiesce");
    }

    fn check(&mut self) {
        let n = self.devices.len();
        let repos: Vec<Repo> = (0..n).map(|d| self.repo(d)).collect();
        // Every document anyone holds, and its namespace.
        let mut all: BTreeMap<DocId, String> = BTreeMap::new();
        let mut held: Vec<BTreeSet<DocId>> = Vec::new();
        for r in &repos {
            let list = r.list(None, true).expect("list");
            held.push(list.iter().map(|(id, _)| *id).collect());
            for (id, meta) in list {
                let ns = all.entry(id).or_insert_with(|| meta.namespace.clone());
                assert_eq!(*ns, meta.namespace, "{id} is in two namespaces");
            }
        }
        for r in &repos {
            assert_eq!(
                r.outbox_docs().expect("outbox"),
                Vec::<DocId>::new(),
                "an outbox is not empty after healing"
            );
        }
        // Whoever may read a document's namespace holds it, in the same state; nobody else.
        let mut readers_of: BTreeMap<DocId, Vec<usize>> = BTreeMap::new();
        for (id, ns) in &all {
            let readers: Vec<usize> = (0..n).filter(|d| self.may_read(*d, ns)).collect();
            for (d, docs) in held.iter().enumerate() {
                assert_eq!(
                    docs.contains(id),
                    readers.contains(&d),
                    "{} {} {id} of namespace {ns}",
                    self.devices[d].name,
                    if docs.contains(id) { "holds" } else { "lacks" }
                );
            }
            let first = readers[0];
            let reference = repos[first].get(id).expect("get");
            let conflicts = format!(
                "{:?}",
                repos[first].conflicts(id, false).expect("conflicts")
            );
            for &d in &readers[1..] {
                let e = repos[d].get(id).expect("get");
                let who = &self.devices[d].name;
                assert_eq!(e.heads, reference.heads, "{who}: heads of {id}");
                assert_eq!(e.value, reference.value, "{who}: value of {id}");
                assert_eq!(e.deleted, reference.deleted, "{who}: deleted of {id}");
                assert_eq!(
                    format!("{:?}", repos[d].conflicts(id, false).expect("conflicts")),
                    conflicts,
                    "{who}: conflicts of {id}"
                );
            }
            readers_of.insert(*id, readers);
        }
        // Nothing acknowledged is lost (invariant 7).
        let mut changes: BTreeMap<(usize, DocId), BTreeSet<[u8; 32]>> = BTreeMap::new();
        for (doc, h) in &self.acked {
            let readers = readers_of
                .get(doc)
                .unwrap_or_else(|| panic!("nobody holds {doc}, which has acknowledged changes"));
            for &d in readers {
                let set = changes.entry((d, *doc)).or_insert_with(|| {
                    repos[d]
                        .all_changes(doc)
                        .unwrap_or_default()
                        .iter()
                        .map(|c| hash_of(c))
                        .collect()
                });
                assert!(
                    set.contains(h),
                    "{} lacks an acknowledged change of {doc}",
                    self.devices[d].name
                );
            }
        }
        // The relay holds every document whole, its log in causal order (invariant 3).
        let log = &self.relay.log;
        let relay_docs: BTreeSet<DocId> = log
            .documents()
            .expect("relay documents")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let everything: BTreeSet<DocId> = all.keys().copied().collect();
        assert_eq!(relay_docs, everything, "the relay holds other documents");
        for id in &relay_docs {
            let page = log.contents(id).expect("relay contents");
            let mut doc = match &page.snapshot {
                Some((_, bytes)) => automerge::Automerge::load(bytes).expect("relay snapshot"),
                None => automerge::Automerge::new(),
            };
            for (i, bytes) in page.changes.iter().enumerate() {
                let change = parse_change(bytes).expect("a logged change");
                for dep in change.deps() {
                    assert!(
                        doc.get_change_by_hash(dep).is_some(),
                        "seq {} of {id} comes before its dependency",
                        page.from + i as u64
                    );
                }
                doc.apply_changes([change]).expect("apply a logged change");
            }
            let heads: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
            let expected = repos[readers_of[id][0]].get(id).expect("get").heads;
            assert_eq!(heads, expected, "the relay's log of {id} ends elsewhere");
        }
    }
}

enum ClientCall {
    Message(RelayMsg),
    Timeout,
    LocalChanged(DocId),
    Rescan,
}

const TITLES: &[&str] = &["Trip", "Rome", "Oslo", "Lima"];

/// The relay's limits: small frames, pages, pushes and feed pages, to reach every path.
fn relay_config(rng: &mut StdRng) -> RelayConfig {
    let max_frame_bytes = *pick(rng, &[1024u64, 4096, 65536, 16 << 20]);
    RelayConfig {
        limits: Limits {
            max_frame_bytes,
            max_changes_per_push: *pick(rng, &[1u32, 2, 3, 5, 1000]),
            max_change_bytes: max_frame_bytes,
            max_docs_per_connection: 10_000,
        },
        page_bytes: *pick(rng, &[300u64, 2000, 1 << 20]),
        feed_page: *pick(rng, &[1usize, 2, 3, 1000]),
        presence_per_sec: 20,
        presence_burst: 40,
    }
}

#[derive(Debug)]
enum Op {
    Splice(usize, usize, String),
    Increment(i64),
    Pin(bool),
    Label(&'static str, serde_json::Value),
    Title(&'static str),
    Deleted(bool),
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn random_text(rng: &mut StdRng, len: std::ops::RangeInclusive<usize>) -> String {
    let n = rng.gen_range(len);
    (0..n).map(|_| rng.gen_range(b'a'..=b'z') as char).collect()
}

/// One schema-valid write to a note whose body is `body_len` characters long (ASCII, so
/// characters and bytes agree). The body is only ever spliced, so its length is known.
fn random_op(rng: &mut StdRng, body_len: usize, deleted: bool) -> Op {
    match rng.gen_range(0..100) {
        0..=39 => {
            let pos = rng.gen_range(0..=body_len);
            let del = rng.gen_range(0..=(body_len - pos).min(3));
            Op::Splice(pos, del, random_text(rng, 0..=4))
        }
        40..=54 => Op::Increment(rng.gen_range(-3..=5)),
        55..=64 => Op::Pin(rng.gen_bool(0.5)),
        65..=79 => {
            let k = *pick(rng, &["a", "b", "c"]);
            let v = if rng.gen_ratio(1, 4) {
                serde_json::Value::Null
            } else {
                json!(random_text(rng, 1..=3))
            };
            Op::Label(k, v)
        }
        80..=94 => Op::Title(TITLES[rng.gen_range(0..TITLES.len())]),
        _ => Op::Deleted(!deleted),
    }
}
