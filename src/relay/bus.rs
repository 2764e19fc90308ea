//! Cross-node fan-out for relay nodes that share one PostgreSQL: a change accepted by node A
//! reaches the devices connected to node B.
//!
//! - **Redis pub/sub is the fast path.** After a push commits, its node publishes a [`Note`]
//!   (document, namespace, seq range and, when small, the change bytes) on the channel
//!   `tandem:doc:<doc id>`; every node pattern-subscribes to `tandem:doc:*` and hands it to its
//!   own subscribers. A note too big to carry its changes makes the receiver read them from
//!   PostgreSQL.
//! - **PostgreSQL is the truth, and the safety net.** Pub/sub may drop a message (Redis
//!   restarted, a node's subscription broke): nothing is lost, because every node also follows
//!   the namespaces' feeds ([`PgLog::feed_heads`], one query) and sends what it has not seen
//!   delivered yet, one poll after it reads it (a change this node committed itself has
//!   normally been fanned out by then, so it is not sent twice); and a device that sees a seq
//!   gap in live changes pulls the missing ones (the client does that anyway). With Redis
//!   down, the feed poll runs every [`POLL_DEGRADED`] instead of every [`POLL_HEALTHY`]:
//!   devices keep syncing, slower, and the node goes back to pub/sub as soon as Redis answers
//!   again.
//!
//! Only committed changes are ever published or read back, so a device never sees a change
//! that a crash could take back. The Redis client is a few lines of RESP (the commands used
//! are PUBLISH and PSUBSCRIBE here, EVAL, LRANGE and DEL for the hot cache in `postgres.rs`), with
//! every reply bounded in size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::postgres::PgLog;
use super::storage::RelayStore;
use crate::ids::DocId;
use crate::transport::RelayMsg;

/// Feed poll period while Redis works (catches what pub/sub dropped).
pub const POLL_HEALTHY: Duration = Duration::from_secs(1);
/// Feed poll period while Redis is unreachable (the only way changes cross nodes then).
pub const POLL_DEGRADED: Duration = Duration::from_millis(200);
/// Changes up to this many bytes ride in the note; bigger ones are read from PostgreSQL.
const INLINE_BYTES: usize = 256 << 10;
/// Largest reply the Redis client accepts.
const MAX_BULK: usize = 1 << 20;
/// Most items in one reply array (the hot cache's tail is the longest).
const MAX_ITEMS: i64 = 1024;
/// Notes waiting to be published before new ones are dropped (the feed poll covers them).
const PUBLISH_QUEUE: usize = 4096;
/// Documents whose last delivered seq a node remembers.
const SEEN_MAX: usize = 100_000;
/// Bytes of changes a node reads from PostgreSQL per document per delivery.
const PAGE_BYTES: u64 = 1 << 20;

/// What a node tells the others about a commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Note {
    pub node: [u8; 16],
    pub namespace: String,
    pub doc: DocId,
    pub from: u64,
    pub to: u64,
    /// The changes `from..=to`, or empty when they were too big to carry.
    pub changes: Vec<Vec<u8>>,
}

fn cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ INLINE_BYTES + (64 << 10) }>()
}

/// Hands changes to this node's own subscribers (the server's hub).
pub type Deliver = Arc<dyn Fn(String, DocId, RelayMsg) + Send + Sync>;

/// One node's side of the bus. See the module docs.
pub struct Bus {
    node: [u8; 16],
    publish: mpsc::Sender<Note>,
    seen: Arc<Mutex<HashMap<DocId, u64>>>,
    healthy: Arc<watch::Sender<bool>>,
}

impl Bus {
    /// Start publishing, subscribing (when `redis` is given) and following the feeds from
    /// where they are now (call it before the node accepts connections).
    pub async fn start(
        redis: Option<String>,
        store: Arc<PgLog>,
        deliver: Deliver,
        shutdown: watch::Receiver<bool>,
    ) -> Bus {
        let node: [u8; 16] = rand::random();
        let (publish, rx) = mpsc::channel(PUBLISH_QUEUE);
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let healthy = Arc::new(watch::Sender::new(false));
        let shared = Arc::new(Node {
            node,
            store,
            deliver,
            seen: seen.clone(),
            healthy: healthy.clone(),
        });
        if let Some(url) = redis {
            let addr = redis_addr(&url);
            tokio::spawn(publisher(addr.clone(), rx, shutdown.clone()));
            tokio::spawn(subscriber(addr, shared.clone(), shutdown.clone()));
        }
        let store = shared.store.clone();
        let heads = tokio::task::spawn_blocking(move || store.feed_heads())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        tokio::spawn(poller(shared, heads.into_iter().collect(), shutdown));
        Bus {
            node,
            publish,
            seen,
            healthy,
        }
    }

    /// Whether the Redis subscription is up, now and as it changes.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    /// Changes committed on this node and fanned out to its own subscribers: tell the others.
    /// Never waits: a full queue drops the note (the feed poll covers it).
    pub fn announce(&self, namespace: &str, doc: &DocId, changes: &RelayMsg) {
        let RelayMsg::Changes {
            from, to, changes, ..
        } = changes
        else {
            return;
        };
        saw(&self.seen, doc, *to);
        let size: usize = changes.iter().map(Vec::len).sum();
        let note = Note {
            node: self.node,
            namespace: namespace.to_string(),
            doc: *doc,
            from: *from,
            to: *to,
            changes: if size <= INLINE_BYTES {
                changes.clone()
            } else {
                Vec::new()
            },
        };
        let _ = self.publish.try_send(note);
    }
}

/// Record that `doc` was delivered up to `to`; whether that is news.
fn saw(seen: &Mutex<HashMap<DocId, u64>>, doc: &DocId, to: u64) -> bool {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() >= SEEN_MAX && !seen.contains_key(doc) {
        seen.clear();
    }
    let e = seen.entry(*doc).or_insert(0);
    if to > *e {
        *e = to;
        true
    } else {
        false
    }
}

struct Node {
    node: [u8; 16],
    store: Arc<PgLog>,
    deliver: Deliver,
    seen: Arc<Mutex<HashMap<DocId, u64>>>,
    healthy: Arc<watch::Sender<bool>>,
}

impl Node {
    fn last_seen(&self, doc: &DocId) -> Option<u64> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(doc)
            .copied()
    }

    /// Deliver `doc`'s committed changes after `after` (one bounded page) from PostgreSQL.
    /// `false` if they could not be read.
    async fn deliver_from_store(&self, doc: DocId, after: u64) -> bool {
        let store = self.store.clone();
        let page = tokio::task::spawn_blocking(move || store.pull(&doc, after, PAGE_BYTES)).await;
        let Ok(Ok(page)) = page else { return false };
        if page.changes.is_empty() || page.namespace.is_empty() {
            return true;
        }
        saw(&self.seen, &doc, page.to);
        let msg = RelayMsg::Changes {
            doc,
            namespace: page.namespace.clone(),
            from: page.from,
            to: page.to,
            changes: page.changes,
            more: page.more,
            remaining_bytes: page.remaining_bytes,
        };
        (self.deliver)(page.namespace, doc, msg);
        true
    }

    async fn on_note(&self, note: Note) {
        if note.node == self.node || note.from == 0 || note.to < note.from {
            return;
        }
        if self.last_seen(&note.doc).is_some_and(|s| s >= note.to) {
            return;
        }
        let inline = note.changes.len() as u64 == note.to - note.from + 1;
        if !inline {
            self.deliver_from_store(note.doc, note.from - 1).await;
            return;
        }
        saw(&self.seen, &note.doc, note.to);
        let msg = RelayMsg::Changes {
            doc: note.doc,
            namespace: note.namespace.clone(),
            from: note.from,
            to: note.to,
            changes: note.changes,
            more: false,
            remaining_bytes: 0,
        };
        (self.deliver)(note.namespace, note.doc, msg);
    }
}

/// Follow every namespace's feed in PostgreSQL and deliver what pub/sub did not, from
/// `cursors` (the feeds' heads when the node started: what was there before was delivered by
/// someone else, or is read by the devices through their own feed cursors; a namespace that
/// appears later is followed from its start).
async fn poller(
    node: Arc<Node>,
    mut cursors: HashMap<String, u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    // What the last round found undelivered: delivered a round later if still so. The poll
    // cannot tell who committed what it reads, and a change this node committed is fanned out
    // (and marked delivered) by the connection that pushed it just after its commit; read in
    // between and delivered at once, it went to every subscriber here again, the pusher too.
    // Each document once, with the highest seq seen.
    let mut found: HashMap<DocId, u64> = HashMap::new();
    loop {
        let period = if *node.healthy.borrow() {
            POLL_HEALTHY
        } else {
            POLL_DEGRADED
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // PostgreSQL failing: what was not delivered waits for the next round (the cursors
        // have moved past it), and this round reads no further.
        let mut due = std::mem::take(&mut found).into_iter();
        let mut failed = false;
        for (doc, seq) in due.by_ref() {
            let after = match node.last_seen(&doc) {
                Some(s) if s >= seq => continue,
                Some(s) => s,
                None => seq - 1,
            };
            if !node.deliver_from_store(doc, after).await {
                found.insert(doc, seq);
                failed = true;
                break;
            }
        }
        if failed {
            found.extend(due);
            continue;
        }
        let store = node.store.clone();
        let Ok(Ok(heads)) = tokio::task::spawn_blocking(move || store.feed_heads()).await else {
            continue;
        };
        for (ns, head) in heads {
            let cursor = cursors.entry(ns.clone()).or_insert(0);
            // Bounded: a few pages per namespace per round.
            for _ in 0..8 {
                if *cursor >= head {
                    break;
                }
                let store = node.store.clone();
                let (n, after) = (ns.clone(), *cursor);
                let Ok(Ok((entries, next, more))) =
                    tokio::task::spawn_blocking(move || store.feed(&n, after, 1000)).await
                else {
                    break;
                };
                for e in entries {
                    if node.last_seen(&e.doc).is_none_or(|s| s < e.seq) {
                        let seq = found.entry(e.doc).or_insert(e.seq);
                        *seq = (*seq).max(e.seq);
                    }
                }
                *cursor = next;
                if !more {
                    break;
                }
            }
        }
    }
}

/// `redis://host:port[/db]` (or plain `host:port`) -> `host:port`.
pub(crate) fn redis_addr(url: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or(rest);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:6379")
    }
}

async fn publisher(
    addr: String,
    mut rx: mpsc::Receiver<Note>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<Resp> = None;
    let mut down_until: Option<tokio::time::Instant> = None;
    loop {
        let note = tokio::select! {
            n = rx.recv() => match n { Some(n) => n, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        // While Redis is down, notes are dropped at once; the feed poll carries them.
        if down_until.is_some_and(|t| tokio::time::Instant::now() < t) {
            continue;
        }
        if conn.is_none() {
            match Resp::connect(&addr).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    down_until = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                    continue;
                }
            }
        }
        let Ok(payload) = bincode::serde::encode_to_vec(&note, cfg()) else {
            continue;
        };
        let channel = format!("tandem:doc:{}", note.doc);
        let ok = match conn.as_mut() {
            Some(c) => c
                .command(&[b"PUBLISH", channel.as_bytes(), &payload])
                .await
                .is_ok_and(|v| !matches!(v, Value::Error(_))),
            None => false,
        };
        if !ok {
            conn = None;
            down_until = Some(tokio::time::Instant::now() + Duration::from_millis(500));
        }
    }
}

async fn subscriber(addr: String, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(mut c) = Resp::connect(&addr).await {
            if c.send(&[b"PSUBSCRIBE", b"tandem:doc:*"]).await.is_ok() {
                loop {
                    let v = tokio::select! {
                        v = c.read() => v,
                        _ = shutdown.wait_for(|s| *s) => return,
                    };
                    let Ok(Value::Array(parts)) = v else { break };
                    match parts.as_slice() {
                        [Value::Bulk(kind), ..] if kind == b"psubscribe" => {
                            node.healthy.send_replace(true);
                            backoff = Duration::from_millis(100);
                            tracing::info!("cross-node bus: subscribed to Redis");
                        }
                        [Value::Bulk(kind), _, _, Value::Bulk(payload)] if kind == b"pmessage" => {
                            if let Ok((note, _)) =
                                bincode::serde::decode_from_slice::<Note, _>(payload, cfg())
                            {
                                node.on_note(note).await;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        if node.healthy.send_replace(false) {
            tracing::warn!("cross-node bus: Redis lost; following the feeds in PostgreSQL");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A RESP reply (nested arrays are not needed by the commands used, so not accepted).
#[derive(Debug, PartialEq)]
pub(crate) enum Value {
    Simple(Vec<u8>),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

/// One connection to Redis speaking RESP2.
pub(crate) struct Resp {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

fn bad(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("redis: {m}"))
}

impl Resp {
    pub(crate) async fn connect(addr: &str) -> std::io::Result<Resp> {
        let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "redis: connect"))??;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Resp {
            r: BufReader::new(r),
            w,
        })
    }

    async fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out).await
    }

    pub(crate) async fn command(&mut self, args: &[&[u8]]) -> std::io::Result<Value> {
        self.send(args).await?;
        tokio::time::timeout(Duration::from_secs(2), self.read())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "redis: reply"))?
    }

    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        let mut line = Vec::new();
        let n = (&mut self.r)
            .take(64 << 10)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !line.ends_with(b"\r\n") {
            return Err(bad("line too long or unterminated"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn number(b: &[u8]) -> std::io::Result<i64> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("not a number"))
    }

    async fn scalar(&mut self, line: Vec<u8>) -> std::io::Result<Value> {
        let (kind, rest) = line.split_first().ok_or_else(|| bad("empty line"))?;
        match kind {
            b'+' => Ok(Value::Simple(rest.to_vec())),
            b'-' => Ok(Value::Error(String::from_utf8_lossy(rest).into_owned())),
            b':' => Ok(Value::Int(Self::number(rest)?)),
            b'$' => {
                let n = Self::number(rest)?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let n = usize::try_from(n).map_err(|_| bad("length"))?;
                if n > MAX_BULK {
                    return Err(bad("reply too large"));
                }
                let mut b = vec![0; n + 2];
                self.r.read_exact(&mut b).await?;
                b.truncate(n);
                Ok(Value::Bulk(b))
            }
            _ => Err(bad("unexpected reply type")),
        }
    }

    async fn read(&mut self) -> std::io::Result<Value> {
        let line = self.line().await?;
        if line.first() != Some(&b'*') {
            return self.scalar(line).await;
        }
        let n = Self::number(&line[1..])?;
        if n < 0 {
            return Ok(Value::Nil);
        }
        if n > MAX_ITEMS {
            return Err(bad("array too long"));
        }
        let mut items = Vec::new();
        for _ in 0..n {
            let l = self.line().await?;
            items.push(self.scalar(l).await?);
        }
        Ok(Value::Array(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_become_addresses() {
        assert_eq!(redis_addr("redis://127.0.0.1:6380"), "127.0.0.1:6380");
        assert_eq!(redis_addr("redis://:pw@cache:7000/2"), "cache:7000");
        assert_eq!(redis_addr("cache"), "cache:6379");
    }

    #[test]
    fn a_note_round_trips_and_oversized_ones_are_refused() {
        let note = Note {
            node: [1; 16],
            namespace: "notes".into(),
            doc: DocId([2; 16]),
            from: 3,
            to: 3,
            changes: vec![vec![7; 100]],
        };
        let b = bincode::serde::encode_to_vec(&note, cfg()).unwrap();
        let (back, _): (Note, _) = bincode::serde::decode_from_slice(&b, cfg()).unwrap();
        assert_eq!((back.from, back.changes), (3, vec![vec![7; 100]]));
        let mut huge = note.clone();
        huge.changes = vec![vec![0; INLINE_BYTES + (128 << 10)]];
        let b = bincode::serde::encode_to_vec(&huge, bincode::config::standard()).unwrap();
        assert!(bincode::serde::decode_from_slice::<Note, _>(&b, cfg()).is_err());
    }
}
