//! `/automerge` against the real JavaScript packages: the real relay binary, `node` running
//! `tests/js/peer.mjs` (automerge-repo 2.5 with its WebSocket client adapter), and tandem
//! devices over tandem/1. The packages are installed on first use (`npm ci` in tests/js).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tandem::client::{connect, sync_once, SyncConfig};
use tandem::relay::amrepo::cbor::{self, DecodeLimits, Value as Cbor};
use tandem::{DocId, Event, Origin};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Cli;
use crate::support::{note_schema, open, spawn_relay};
use crate::wire::{token, SECRET};

const LONG: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// The automerge-repo packages in tests/js: installed once (`npm ci`, exactly the lock file)
/// when missing, so that `cargo test` alone runs these tests on a fresh checkout.
fn js_packages() {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let ready = READY.get_or_init(|| {
        if js_dir()
            .join("node_modules/@automerge/automerge-repo")
            .exists()
        {
            return Ok(());
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(js_dir())
            .status()
            .map_err(|e| format!("could not run npm (Node.js 20 and npm are needed): {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`npm ci` in tests/js failed: {status}"))
        }
    });
    if let Err(e) = ready {
        panic!("the JavaScript packages for these tests are missing: {e}");
    }
}

/// One automerge-repo peer in a node process, driven by JSON commands.
struct JsPeer {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// The relay's storageId, from its `peer` message.
    relay_storage: Value,
}

impl JsPeer {
    fn start(url: &str, storage: Option<&Path>) -> JsPeer {
        JsPeer::start_with(url, storage, false)
    }

    /// `remote_heads`: with automerge-repo's remote heads gossiping on.
    fn start_with(url: &str, storage: Option<&Path>, remote_heads: bool) -> JsPeer {
        js_packages();
        let mut cmd = Command::new("node");
        cmd.arg(js_dir().join("peer.mjs")).arg(url);
        if let Some(dir) = storage {
            cmd.arg(dir);
        }
        if remote_heads {
            cmd.env("REMOTE_HEADS", "1");
        }
        let mut child = cmd
            .current_dir(js_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (Node.js 20) is needed for the automerge-repo interop tests");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = JsPeer {
            child,
            stdin,
            lines,
            relay_storage: Value::Null,
        };
        p.relay_storage = p.cmd(json!({"op": "ready"}))["storageId"].clone();
        p
    }

    /// Send a command, wait (bounded) for its answer; panics on an error answer.
    fn cmd(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let line = self
            .lines
            .recv_timeout(LONG)
            .unwrap_or_else(|_| panic!("no answer from the JS peer to {cmd}"));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(
            v.get("error").is_none(),
            "JS peer failed {cmd}: {}",
            v["error"]
        );
        v
    }

    fn exit(mut self) {
        self.cmd(json!({"op": "exit"}));
        let _ = self.child.wait();
    }
}

impl Drop for JsPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Relay {
    child: Child,
    addr: SocketAddr,
}

impl Relay {
    fn start(data: &Path, auth: Option<&Path>) -> Relay {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--data"),
            data.as_os_str(),
        ];
        match auth {
            Some(secret) => {
                args.push(OsStr::new("--jwt-secret-file"));
                args.push(secret.as_os_str());
            }
            None => args.push(OsStr::new("--insecure-no-auth")),
        }
        let (child, addr) = spawn_relay(&args);
        Relay { child, addr }
    }

    fn am(&self) -> String {
        format!("ws://{}/automerge", self.addr)
    }

    fn v1(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn heads_of(v: &Value) -> Vec<String> {
    let mut h: Vec<String> = v["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    h.sort();
    h
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_clients_share_a_document_through_the_relay_and_tandem_devices_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let relay = Relay::start(&dir.path().join("relay"), Some(&secret));
    let team = token("web", &[], &["team"], HOUR);
    let url = format!("{}?token={team}", relay.am());

    let mut a = blocking({
        let url = url.clone();
        move || JsPeer::start(&url, None)
    })
    .await;
    let created = a.cmd(json!({"op": "create", "value": {"title": "Groceries", "n": 1}}));
    let id = created["id"].as_str().unwrap().to_string();
    a.cmd(json!({"op": "acked", "id": id}));
    let mut b = JsPeer::start(&url, None);
    let found = b.cmd(json!({"op": "find", "id": id}));
    assert_eq!(found["value"]["title"], "Groceries");
    assert_eq!(heads_of(&found), heads_of(&created));

    // Live between JS peers, and ephemeral messages reach the other peer unchanged.
    a.cmd(json!({"op": "change", "id": id, "set": {"title": "Groceries!"}}));
    b.cmd(json!({"op": "waitField", "id": id, "field": "title", "value": "Groceries!"}));
    a.cmd(json!({"op": "broadcast", "id": id, "message": {"cursor": 42}}));
    let got = b.cmd(json!({"op": "waitEphemeral", "id": id}));
    assert_eq!(got["messages"][0]["message"], json!({"cursor": 42}));

    // The document is in the relay's log, namespace "team": a tandem device with a token for
    // that namespace gets it through the feed...
    let device_dir = tempfile::tempdir().unwrap();
    let device = open(device_dir.path(), "dora", note_schema());
    let cfg = SyncConfig::new(&relay.v1()).token(&token("dora", &[], &["team"], HOUR));
    sync_once(&device, cfg.clone(), LONG).await.unwrap();
    let doc: DocId = id.parse().unwrap();
    let e = device.get(&doc).unwrap();
    assert_eq!(e.value["title"], "Groceries!");
    assert_eq!(device.meta(&doc).unwrap().namespace, "team");
    // ...and a JS peer whose token cannot read it is told it is unavailable.
    let other = token("eve", &["elsewhere"], &[], HOUR);
    let mut eve = JsPeer::start(&format!("{}?token={other}", relay.am()), None);
    let denied = eve.cmd(json!({"op": "find", "id": id}));
    assert_eq!(denied["unavailable"], true);
    // A document nobody has is unavailable too.
    let unknown = DocId::generate().to_string();
    let missing = b.cmd(json!({"op": "find", "id": unknown}));
    assert_eq!(missing["unavailable"], true, "{missing}");
    for p in [a, b, eve] {
        p.exit();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_client_and_a_rust_device_edit_one_note_concurrently_and_converge() {
    let cli = Cli::new();
    let relay = Relay::start(&cli.path().join("relay"), None);
    let device = open(&cli.path().join("tandem-data"), "rusty", note_schema());
    let cfg = SyncConfig::new(&relay.v1());
    let id = device
        .create(
            "note",
            json!({"title": "Trip", "body": "pack", "pinned": false}),
        )
        .unwrap();
    sync_once(&device, cfg.clone(), LONG).await.unwrap();

    let mut js = JsPeer::start(&relay.am(), None);
    let found = js.cmd(json!({"op": "find", "id": id.to_string()}));
    assert_eq!(found["value"]["title"], "Trip", "{found}");
    assert_eq!(found["value"]["body"], "pack");

    // Concurrent edits of the critical title: the device offline, the JS client online.
    device
        .change(&id, |tx| tx.set("title", "Trip to Rome"))
        .unwrap();
    js.cmd(json!({"op": "change", "id": id.to_string(), "set": {"title": "Rome trip", "pinned": true}}));
    js.cmd(json!({"op": "acked", "id": id.to_string()}));

    // The device comes online: its edit reaches the JS client live, the JS edit reaches it.
    let handle = connect(&device, cfg.clone());
    handle.wait_synced(LONG).await.unwrap();
    let ours = device.get(&id).unwrap();
    let mut device_heads = ours.heads.clone();
    device_heads.sort();
    assert_eq!(device_heads.len(), 2, "two concurrent heads");
    let theirs = js.cmd(json!({"op": "waitHeads", "id": id.to_string(), "heads": device_heads}));
    assert_eq!(heads_of(&theirs), device_heads);
    assert_eq!(theirs["titleConflicts"], 2, "automerge sees both titles");
    assert_eq!(ours.value["pinned"], true);
    assert_eq!(
        theirs["value"]["title"], ours.value["title"],
        "the same provisional winner"
    );

    // Live the other way while connected: a JS edit arrives as a remote change.
    let mut rx = device.subscribe();
    js.cmd(json!({"op": "change", "id": id.to_string(), "set": {"pinned": false}}));
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("timed out waiting for the JS edit");
        if matches!(e, Ok(Event::Changed { doc, origin: Origin::Remote, .. }) if doc == id)
            && device.get(&id).unwrap().value["pinned"] == false
        {
            break;
        }
    }
    handle.stop().await;
    drop(device);
    js.exit();

    // The CLI shows the conflict, with both versions.
    let out = cli.ok(&["conflicts", &id.to_string(), "--json"]);
    let conflicts: Value = serde_json::from_str(&out).unwrap();
    let text = conflicts.to_string();
    assert!(
        text.contains("Trip to Rome") && text.contains("Rome trip"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_loses_nothing_a_js_client_saw_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let store = dir.path().join("js-a");
    let relay = Relay::start(&data, None);
    let mut a = JsPeer::start(&relay.am(), Some(&store));
    let id = a.cmd(json!({"op": "create", "value": {"title": "v0"}}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..=20 {
        a.cmd(json!({"op": "change", "id": id, "set": {"title": format!("v{i}"), "n": i}}));
    }
    // Acknowledged: the relay's heads in A's sync state for the relay's storageId.
    let acked = a.cmd(json!({"op": "acked", "id": id}));
    let storage = a.relay_storage.clone();
    a.exit();
    // kill -9: whatever the relay acknowledged must be on disk already.
    drop(relay);
    let relay = Relay::start(&data, None);
    let mut b = JsPeer::start(&relay.am(), None);
    // The same storage: the sync state clients keep for it stays valid across restarts.
    assert_eq!(b.relay_storage, storage);
    let found = b.cmd(json!({"op": "find", "id": id}));
    assert_eq!(heads_of(&found), heads_of(&acked));
    assert_eq!(found["value"]["title"], "v20");
    b.exit();
}

/// A raw WebSocket peer that joins and then sends whatever it is told to.
async fn raw_peer(
    relay: &Relay,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.am()).await.unwrap();
    let join = cbor::encode(&Cbor::map([
        ("type", Cbor::Text("join".into())),
        ("senderId", Cbor::Text("mallory".into())),
        (
            "peerMetadata",
            Cbor::map([("isEphemeral", Cbor::Bool(true))]),
        ),
        (
            "supportedProtocolVersions",
            Cbor::Array(vec![Cbor::Text("1".into())]),
        ),
    ]));
    ws.send(Message::Binary(join.into())).await.unwrap();
    let peer = next_cbor(&mut ws).await.expect("a peer message");
    assert_eq!(peer.get("type"), Some(&Cbor::Text("peer".into())));
    ws
}

/// The next binary frame, decoded; `None` when the relay closed the connection.
async fn next_cbor(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<Cbor> {
    loop {
        match tokio::time::timeout(LONG, ws.next())
            .await
            .expect("relay silent")
        {
            Some(Ok(Message::Binary(b))) => {
                return Some(cbor::decode(&b, DecodeLimits::default()).unwrap())
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return None,
        }
    }
}

fn is_error(v: &Option<Cbor>) -> bool {
    match v {
        None => true,
        Some(m) => m.get("type") == Some(&Cbor::Text("error".into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cbor_gets_an_error_or_a_close_and_other_peers_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), None);
    let mut a = JsPeer::start(&relay.am(), None);
    let id = a.cmd(json!({"op": "create", "value": {"title": "calm"}}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.cmd(json!({"op": "acked", "id": id}));

    let t = |s: &str| Cbor::Text(s.into());
    let doc = id.clone();
    let msg = |fields: Vec<(&str, Cbor)>| {
        let mut m = Cbor::map([("senderId", t("mallory")), ("targetId", t("relay"))]);
        for (k, v) in fields {
            m.set(k, v);
        }
        cbor::encode(&m)
    };
    // Frames that keep the connection (well-formed maps, wrong contents): each gets an error.
    let keep: Vec<Vec<u8>> = vec![
        msg(vec![
            ("type", t("sync")),
            ("documentId", t(&doc)),
            ("data", t("not bytes")),
        ]),
        msg(vec![("type", Cbor::Uint(7))]),
        msg(vec![
            ("type", t("sync")),
            ("documentId", t("nope")),
            ("data", Cbor::Bytes(vec![0x42])),
        ]),
        msg(vec![
            ("type", t("sync")),
            ("documentId", t(&doc)),
            ("data", Cbor::Bytes(vec![0x42, 0xff, 0xff])),
        ]),
        msg(vec![
            ("type", t("sync")),
            ("documentId", t(&doc)),
            ("data", Cbor::Bytes(vec![0x43, 0, 0, 0, 0])),
        ]),
        msg(vec![("type", t("launch-missiles"))]),
        msg(vec![
            ("type", t("ephemeral")),
            ("documentId", t(&doc)),
            ("data", Cbor::Uint(1)),
        ]),
    ];
    let mut ws = raw_peer(&relay).await;
    for frame in &keep {
        ws.send(Message::Binary(frame.clone().into()))
            .await
            .unwrap();
        let answer = next_cbor(&mut ws).await;
        assert!(
            matches!(&answer, Some(m) if m.get("type") == Some(&t("error"))),
            "expected an error for {}, got {answer:?}",
            hex::encode(frame)
        );
    }
    // Frames that end the connection: not CBOR maps at all.
    let mut deep = vec![0x81u8; 100_000];
    deep.push(0);
    let mut huge_map = vec![0xbb];
    huge_map.extend_from_slice(&u64::MAX.to_be_bytes());
    let fatal: Vec<Message> = vec![
        Message::Binary(vec![0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff].into()),
        Message::Binary(huge_map.into()),
        Message::Binary(deep.into()),
        Message::Binary(vec![0x9f; 50_000].into()),
        Message::Binary(vec![0x01].into()),
        Message::Binary(Vec::new().into()),
        Message::Text("{\"type\":\"join\"}".into()),
    ];
    for frame in fatal {
        let mut ws = raw_peer(&relay).await;
        ws.send(frame.clone()).await.unwrap();
        let answer = next_cbor(&mut ws).await;
        assert!(is_error(&answer), "{frame:?} got {answer:?}");
    }
    // A first frame that is not a join.
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.am()).await.unwrap();
    ws.send(Message::Binary(msg(vec![("type", t("sync"))]).into()))
        .await
        .unwrap();
    assert!(is_error(&next_cbor(&mut ws).await));

    // The relay is fine and so are the other peers.
    a.cmd(json!({"op": "change", "id": id, "set": {"title": "still calm"}}));
    a.cmd(json!({"op": "acked", "id": id}));
    let mut b = JsPeer::start(&relay.am(), None);
    let found = b.cmd(json!({"op": "find", "id": id}));
    assert_eq!(found["value"]["title"], "still calm");
    a.exit();
    b.exit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_hear_when_a_storage_peer_s_heads_move() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), None);
    let mut a = JsPeer::start_with(&relay.am(), None, true);
    let mut b = JsPeer::start_with(&relay.am(), Some(&dir.path().join("js-b")), true);
    let id = a.cmd(json!({"op": "create", "value": {"title": "watched"}}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.cmd(json!({"op": "acked", "id": id}));
    b.cmd(json!({"op": "find", "id": id}));
    let b_storage = b.cmd(json!({"op": "storageId"}))["storageId"].clone();
    assert!(b_storage.is_string());
    a.cmd(json!({"op": "subscribeRemotes", "storageIds": [b_storage]}));
    // A round trip on A's connection: the relay has taken the subscription once this is acked.
    a.cmd(json!({"op": "change", "id": id, "set": {"n": 1}}));
    a.cmd(json!({"op": "acked", "id": id}));
    b.cmd(json!({"op": "waitField", "id": id, "field": "n", "value": 1}));
    b.cmd(json!({"op": "change", "id": id, "set": {"title": "seen by B"}}));
    b.cmd(json!({"op": "acked", "id": id}));
    let heads = b.cmd(json!({"op": "encodedHeads", "id": id}))["heads"].clone();
    a.cmd(json!({"op": "waitRemoteHeads", "id": id, "storageId": b_storage, "heads": heads}));
    a.exit();
    b.exit();
}

/// One gauge of the relay's /metrics.
fn metric(addr: SocketAddr, name: &str) -> u64 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_document_leaves_memory_and_still_gets_live_changes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), None);
    let device = open(&dir.path().join("device"), "rusty", note_schema());
    let cfg = SyncConfig::new(&relay.v1());
    let id = device.create("note", json!({"title": "before"})).unwrap();
    sync_once(&device, cfg.clone(), LONG).await.unwrap();
    let mut js = JsPeer::start(&relay.am(), None);
    js.cmd(json!({"op": "find", "id": id.to_string()}));
    // The find is answered from the log; an edit from the peer loads the document.
    js.cmd(json!({"op": "change", "id": id.to_string(), "set": {"pinned": true}}));
    js.cmd(json!({"op": "acked", "id": id.to_string()}));
    assert_eq!(
        metric(relay.addr, "tandem_relay_automerge_docs_in_memory"),
        1
    );
    // Unloaded after a second of silence (a small document is cheap to load again); the
    // peer stays, and so does the document's actor.
    let deadline = tokio::time::Instant::now() + LONG;
    while metric(relay.addr, "tandem_relay_automerge_docs_in_memory") != 0 {
        assert!(tokio::time::Instant::now() < deadline, "never unloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(relay.addr, "tandem_relay_automerge_doc_actors"), 1);
    device.change(&id, |tx| tx.set("title", "after")).unwrap();
    sync_once(&device, cfg, LONG).await.unwrap();
    js.cmd(json!({"op": "waitField", "id": id.to_string(), "field": "title", "value": "after"}));
    js.exit();
}
