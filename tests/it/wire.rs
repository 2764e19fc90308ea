//! A raw tandem/1 client for relay tests: frames in, frames out, nothing clever.

use std::net::SocketAddr;
use std::time::Duration;

use automerge::transaction::Transactable;
use futures_util::{SinkExt, StreamExt};
use tandem::relay::auth::{mint, Secret};
use tandem::relay::{start, Auth, RelayConfig, RelayHandle};
use tandem::transport::{codec, ClientMsg, FeedCursor, RelayMsg, PROTOCOL_VERSION};
use tandem::DocId;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &[u8] = b"relay-test-secret-0123456789abcdef";

pub fn secret() -> Secret {
    Secret::from_bytes(SECRET).unwrap()
}

pub fn token(sub: &str, read: &[&str], write: &[&str], ttl: Duration) -> String {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    mint(
        &secret(),
        sub,
        &v(read),
        &v(write),
        ttl,
        std::time::SystemTime::now(),
    )
}

/// A relay on a free loopback port with JWT auth, storing in `data` (memory when `None`), or
/// in a PostgreSQL schema of its own when `TANDEM_TEST_BACKEND=postgres` (see `pg.rs`).
pub async fn relay(data: Option<std::path::PathBuf>) -> RelayHandle {
    relay_with(data, |_| {}).await
}

pub async fn relay_with(
    data: Option<std::path::PathBuf>,
    f: impl FnOnce(&mut RelayConfig),
) -> RelayHandle {
    let mut cfg = RelayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        data,
        Auth::Jwt(std::sync::Arc::new(secret())),
    );
    if crate::pg::enabled() {
        cfg.postgres = Some(match &cfg.data {
            Some(path) => crate::pg::for_path(path),
            None => crate::pg::fresh(),
        });
    }
    f(&mut cfg);
    start(cfg).await.unwrap()
}

pub struct Raw {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr, token: Option<&str>) -> Raw {
        let mut req = format!("ws://{addr}/v1").into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        Raw { ws }
    }

    pub async fn send(&mut self, msg: &ClientMsg) {
        let b = codec::encode(msg, 64 << 20).unwrap();
        self.send_raw(b).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.ws.send(Message::Binary(bytes.into())).await;
    }

    /// The next protocol message, or `None` when the relay closed (waits at most 10 s).
    pub async fn recv(&mut self) -> Option<RelayMsg> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("the relay answered within 10 s");
            match next {
                Some(Ok(Message::Binary(b))) => return Some(codec::decode(&b, 64 << 20).unwrap()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Hello with the given feed cursors; returns the relay's answer.
    pub async fn hello(&mut self, feeds: Vec<(&str, u64)>) -> RelayMsg {
        let feeds = feeds
            .into_iter()
            .map(|(n, c)| FeedCursor {
                namespace: n.to_string(),
                cursor: c,
            })
            .collect();
        self.send(&ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            device: [7; 16],
            feeds,
        })
        .await;
        self.recv().await.expect("a hello back")
    }

    /// Connect and handshake.
    pub async fn open(addr: SocketAddr, token: &str) -> Raw {
        let mut r = Raw::connect(addr, Some(token)).await;
        assert!(matches!(r.hello(vec![]).await, RelayMsg::Hello { .. }));
        r
    }

    pub async fn push(
        &mut self,
        ns: &str,
        doc: DocId,
        batch: u64,
        changes: Vec<Vec<u8>>,
    ) -> RelayMsg {
        self.send(&ClientMsg::Push {
            namespace: ns.into(),
            doc,
            batch,
            changes,
        })
        .await;
        self.recv().await.expect("an answer to the push")
    }
}

/// `n` small changes of one fresh document, in causal order (raw, uncompressed bytes).
pub fn changes(n: usize) -> Vec<Vec<u8>> {
    let mut doc = automerge::AutoCommit::new();
    for i in 0..n {
        doc.put(automerge::ROOT, "k", i as i64).unwrap();
        doc.commit();
    }
    doc.get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}
