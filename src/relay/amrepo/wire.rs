//! automerge-repo's messages (protocol "1") over the CBOR codec: what a peer may send, decoded
//! leniently into [`AmMsg`], and the frames the relay sends, encoded exactly. No I/O, no sync
//! logic; field names and shapes follow docs/automerge-repo.md.

use super::cbor::{self, DecodeError, DecodeLimits, Value};
use crate::ids::DocId;

/// The only protocol version automerge-repo's WebSocket adapters speak today.
pub const PROTOCOL_VERSION: &str = "1";

/// Longest peer id, storage id or session id accepted (they are map keys on the relay).
pub const MAX_ID_LEN: usize = 256;

/// A message from an automerge-repo peer.
#[derive(Clone, Debug, PartialEq)]
pub enum AmMsg {
    Join {
        sender: String,
        storage_id: Option<String>,
        is_ephemeral: bool,
        /// `None`: the peer did not say (the JavaScript server assumes "1").
        versions: Option<Vec<String>>,
    },
    Leave {
        sender: String,
    },
    /// `request` (the peer lacks the document) or `sync`: an Automerge sync message.
    Sync {
        sender: String,
        target: String,
        doc: DocId,
        data: Vec<u8>,
        request: bool,
    },
    /// Forwarded to the document's other peers with only `targetId` changed, so the whole map
    /// is kept.
    Ephemeral {
        sender: String,
        target: String,
        doc: DocId,
        raw: Value,
    },
    RemoteSubscriptionChange {
        sender: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// Messages a relay has nothing to do with when a client sends them (`peer`,
    /// `doc-unavailable`, `error`, `remote-heads-changed`).
    Ignored {
        sender: String,
        kind: String,
    },
}

/// Why a frame is not a message the relay accepts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("not CBOR: {0}")]
    Cbor(#[from] DecodeError),
    #[error("a message must be a CBOR map")]
    NotAMap,
    #[error("the message lacks '{0}'")]
    Missing(&'static str),
    #[error("'{0}' has the wrong type")]
    WrongType(&'static str),
    #[error("'{0}' is longer than {MAX_ID_LEN} bytes")]
    TooLong(&'static str),
    #[error("'{0}' is not a document id (base58check of 16 bytes)")]
    BadDocId(String),
    #[error("unknown message type '{0}'")]
    UnknownType(String),
}

fn text<'a>(m: &'a Value, key: &'static str) -> Result<&'a str, WireError> {
    match m.field(key) {
        Some(Value::Text(t)) if t.len() <= MAX_ID_LEN || key == "message" => Ok(t),
        Some(Value::Text(_)) => Err(WireError::TooLong(key)),
        Some(_) => Err(WireError::WrongType(key)),
        None => Err(WireError::Missing(key)),
    }
}

fn opt_text(m: &Value, key: &'static str) -> Result<Option<String>, WireError> {
    match m.field(key) {
        None => Ok(None),
        Some(_) => text(m, key).map(|t| Some(t.to_string())),
    }
}

fn texts(m: &Value, key: &'static str) -> Result<Option<Vec<String>>, WireError> {
    match m.field(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::Text(t) if t.len() <= MAX_ID_LEN => Ok(t.clone()),
                Value::Text(_) => Err(WireError::TooLong(key)),
                _ => Err(WireError::WrongType(key)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(WireError::WrongType(key)),
    }
}

fn doc_id(m: &Value) -> Result<DocId, WireError> {
    let s = text(m, "documentId")?;
    // automerge-repo writes bare ids; accept an `automerge:` URL too (without heads).
    let bare = s.strip_prefix("automerge:").unwrap_or(s);
    let bare = bare.split('#').next().unwrap_or(bare);
    bare.parse().map_err(|_| WireError::BadDocId(s.to_string()))
}

fn bytes(m: &Value, key: &'static str) -> Result<Vec<u8>, WireError> {
    match m.field(key) {
        Some(Value::Bytes(b)) => Ok(b.clone()),
        Some(_) => Err(WireError::WrongType(key)),
        None => Err(WireError::Missing(key)),
    }
}

/// The peer id a frame says it is from, if it is a map with a text `senderId` (to address an
/// error about a frame that did not otherwise decode).
pub fn sender_of(frame: &Value) -> Option<&str> {
    match frame.field("senderId") {
        Some(Value::Text(t)) if t.len() <= MAX_ID_LEN => Some(t),
        _ => None,
    }
}

/// Decode one frame: CBOR within `limits`, then the message's shape.
pub fn decode(frame: &[u8], limits: DecodeLimits) -> Result<AmMsg, (WireError, Option<String>)> {
    let v = cbor::decode(frame, limits).map_err(|e| (WireError::from(e), None))?;
    let sender = sender_of(&v).map(str::to_string);
    decode_value(v).map_err(|e| (e, sender))
}

fn decode_value(m: Value) -> Result<AmMsg, WireError> {
    if !matches!(m, Value::Map(_)) {
        return Err(WireError::NotAMap);
    }
    let kind = text(&m, "type")?.to_string();
    let sender = text(&m, "senderId")?.to_string();
    Ok(match kind.as_str() {
        "join" => {
            let meta = m.field("peerMetadata");
            let (storage_id, is_ephemeral) = match meta {
                None => (None, true),
                Some(meta @ Value::Map(_)) => (
                    opt_text(meta, "storageId")?,
                    match meta.field("isEphemeral") {
                        None => true,
                        Some(Value::Bool(b)) => *b,
                        Some(_) => return Err(WireError::WrongType("isEphemeral")),
                    },
                ),
                Some(_) => return Err(WireError::WrongType("peerMetadata")),
            };
            AmMsg::Join {
                sender,
                storage_id,
                is_ephemeral,
                versions: texts(&m, "supportedProtocolVersions")?,
            }
        }
        "leave" => AmMsg::Leave { sender },
        "request" | "sync" => AmMsg::Sync {
            target: text(&m, "targetId")?.to_string(),
            doc: doc_id(&m)?,
            data: bytes(&m, "data")?,
            request: kind == "request",
            sender,
        },
        "ephemeral" => {
            bytes(&m, "data")?;
            AmMsg::Ephemeral {
                target: text(&m, "targetId")?.to_string(),
                doc: doc_id(&m)?,
                raw: m,
                sender,
            }
        }
        "remote-subscription-change" => AmMsg::RemoteSubscriptionChange {
            add: texts(&m, "add")?.unwrap_or_default(),
            remove: texts(&m, "remove")?.unwrap_or_default(),
            sender,
        },
        "peer" | "doc-unavailable" | "error" | "remote-heads-changed" => {
            AmMsg::Ignored { sender, kind }
        }
        _ => return Err(WireError::UnknownType(kind)),
    })
}

fn t(s: &str) -> Value {
    Value::Text(s.to_string())
}

/// The answer to a `join`.
pub fn peer(sender: &str, target: &str, storage_id: &str) -> Vec<u8> {
    cbor::encode(&Value::map([
        ("type", t("peer")),
        ("senderId", t(sender)),
        ("targetId", t(target)),
        (
            "peerMetadata",
            Value::map([
                ("storageId", t(storage_id)),
                ("isEphemeral", Value::Bool(false)),
            ]),
        ),
        ("selectedProtocolVersion", t(PROTOCOL_VERSION)),
    ]))
}

/// An Automerge sync message about `doc`.
pub fn sync(sender: &str, target: &str, doc: &DocId, data: Vec<u8>) -> Vec<u8> {
    cbor::encode(&Value::map([
        ("type", t("sync")),
        ("senderId", t(sender)),
        ("targetId", t(target)),
        ("documentId", t(&doc.to_string())),
        ("data", Value::Bytes(data)),
    ]))
}

/// "Neither the relay nor anyone it knows has `doc`."
pub fn doc_unavailable(sender: &str, target: &str, doc: &DocId) -> Vec<u8> {
    cbor::encode(&Value::map([
        ("type", t("doc-unavailable")),
        ("senderId", t(sender)),
        ("targetId", t(target)),
        ("documentId", t(&doc.to_string())),
    ]))
}

/// An error for the peer (`target` may be unknown when the frame did not say who sent it).
pub fn error(sender: &str, target: Option<&str>, message: &str) -> Vec<u8> {
    let mut m = Value::map([("type", t("error")), ("senderId", t(sender))]);
    if let Some(target) = target {
        m.set("targetId", t(target));
    }
    m.set("message", t(message));
    cbor::encode(&m)
}

/// An ephemeral message as received, readdressed to `target`.
pub fn readdress(raw: &Value, target: &str) -> Vec<u8> {
    let mut m = raw.clone();
    m.set("targetId", t(target));
    cbor::encode(&m)
}

/// `remote-heads-changed`: the relay's sync state with storage `storage_id` reached `heads`
/// (bs58check-encoded change hashes) at `timestamp_ms`.
pub fn remote_heads_changed(
    sender: &str,
    target: &str,
    doc: &DocId,
    storage_id: &str,
    heads: &[automerge::ChangeHash],
    timestamp_ms: u64,
) -> Vec<u8> {
    let heads = heads
        .iter()
        .map(|h| t(&bs58::encode(h.0).with_check().into_string()))
        .collect();
    cbor::encode(&Value::map([
        ("type", t("remote-heads-changed")),
        ("senderId", t(sender)),
        ("targetId", t(target)),
        ("documentId", t(&doc.to_string())),
        (
            "newHeads",
            Value::Map(vec![(
                t(storage_id),
                Value::map([
                    ("heads", Value::Array(heads)),
                    ("timestamp", Value::Uint(timestamp_ms)),
                ]),
            )]),
        ),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The captured frames in tests/data/automerge-repo-frames.jsonl (the golden vectors):
    /// every client frame decodes, every server frame of a kind we send is what we encode.
    const FRAMES: &str = include_str!("../../../tests/data/automerge-repo-frames.jsonl");

    fn frames() -> Vec<serde_json::Value> {
        FRAMES
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn hex_of(f: &serde_json::Value) -> Vec<u8> {
        hex::decode(f["hex"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn captured_frames_decode() {
        let mut kinds = Vec::new();
        for f in frames() {
            let m = decode(&hex_of(&f), DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{f}: {e:?}"));
            let kind = f["msg"]["type"].as_str().unwrap().to_string();
            match (&*kind, &m) {
                (
                    "join",
                    AmMsg::Join {
                        sender,
                        storage_id,
                        is_ephemeral,
                        versions,
                    },
                ) => {
                    assert_eq!(sender, "peer-gu6by52cq");
                    assert_eq!(*storage_id, None, "undefined is absent");
                    assert!(is_ephemeral);
                    assert_eq!(versions.as_deref(), Some(&["1".to_string()][..]));
                }
                (
                    "sync" | "request",
                    AmMsg::Sync {
                        doc, request, data, ..
                    },
                ) => {
                    assert_eq!(doc.to_string(), f["msg"]["documentId"].as_str().unwrap());
                    assert_eq!(*request, kind == "request");
                    assert!(automerge::sync::Message::decode(data).is_ok());
                }
                ("ephemeral", AmMsg::Ephemeral { raw, .. }) => {
                    assert_eq!(raw.field("count"), Some(&Value::Uint(1)));
                }
                (
                    "remote-subscription-change",
                    AmMsg::RemoteSubscriptionChange { add, remove, .. },
                ) => {
                    assert_eq!(add.len(), 1);
                    assert!(remove.is_empty());
                }
                ("peer" | "doc-unavailable" | "remote-heads-changed", AmMsg::Ignored { .. }) => {}
                other => panic!("unexpected decoding {other:?}"),
            }
            kinds.push(kind);
        }
        assert!(kinds.len() >= 10);
    }

    #[test]
    fn frames_we_send_match_the_captured_shapes() {
        for f in frames() {
            let captured = cbor::decode(&hex_of(&f), DecodeLimits::default()).unwrap();
            let s = |k: &str| {
                captured.field(k).and_then(|v| match v {
                    Value::Text(t) => Some(t.clone()),
                    _ => None,
                })
            };
            let ours = match f["msg"]["type"].as_str().unwrap() {
                "peer" => {
                    let storage = match captured
                        .get("peerMetadata")
                        .and_then(|m| m.field("storageId"))
                    {
                        Some(Value::Text(t)) => t.clone(),
                        _ => panic!(),
                    };
                    peer(&s("senderId").unwrap(), &s("targetId").unwrap(), &storage)
                }
                "doc-unavailable" => doc_unavailable(
                    &s("senderId").unwrap(),
                    &s("targetId").unwrap(),
                    &s("documentId").unwrap().parse().unwrap(),
                ),
                "sync" if f["dir"] == "s->c" => sync(
                    &s("senderId").unwrap(),
                    &s("targetId").unwrap(),
                    &s("documentId").unwrap().parse().unwrap(),
                    match captured.field("data") {
                        Some(Value::Bytes(b)) => b.clone(),
                        _ => panic!(),
                    },
                ),
                "ephemeral" if f["dir"] == "s->c" => readdress(&captured, &s("targetId").unwrap()),
                _ => continue,
            };
            // Same entries (key order is free), shortest-form encoding.
            let ours_v = cbor::decode(&ours, DecodeLimits::default()).unwrap();
            let (Value::Map(mut a), Value::Map(mut b)) = (ours_v, captured.clone()) else {
                panic!()
            };
            let key = |e: &(Value, Value)| format!("{:?}", e.0);
            a.sort_by_key(key);
            b.sort_by_key(key);
            assert_eq!(a, b, "{}", f["msg"]["type"]);
            assert_eq!(
                cbor::encode(&cbor::decode(&ours, DecodeLimits::default()).unwrap()),
                ours
            );
        }
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        let limits = DecodeLimits::default();
        let enc = |v: Value| cbor::encode(&v);
        assert_eq!(
            decode(&enc(Value::Uint(1)), limits).unwrap_err().0,
            WireError::NotAMap
        );
        let no_type = enc(Value::map([("senderId", t("a"))]));
        assert_eq!(
            decode(&no_type, limits).unwrap_err(),
            (WireError::Missing("type"), Some("a".into()))
        );
        let bad_doc = enc(Value::map([
            ("type", t("sync")),
            ("senderId", t("a")),
            ("targetId", t("b")),
            ("documentId", t("nope")),
            ("data", Value::Bytes(vec![])),
        ]));
        assert!(matches!(
            decode(&bad_doc, limits).unwrap_err().0,
            WireError::BadDocId(_)
        ));
        let wrong = enc(Value::map([
            ("type", t("sync")),
            ("senderId", t("a")),
            ("targetId", t("b")),
            ("documentId", t(&DocId([1; 16]).to_string())),
            ("data", t("not bytes")),
        ]));
        assert_eq!(
            decode(&wrong, limits).unwrap_err().0,
            WireError::WrongType("data")
        );
        let unknown = enc(Value::map([("type", t("gossip")), ("senderId", t("a"))]));
        assert_eq!(
            decode(&unknown, limits).unwrap_err().0,
            WireError::UnknownType("gossip".into())
        );
        let long = enc(Value::map([
            ("type", t("join")),
            ("senderId", t(&"x".repeat(300))),
        ]));
        assert_eq!(
            decode(&long, limits).unwrap_err().0,
            WireError::TooLong("senderId")
        );
    }
}
