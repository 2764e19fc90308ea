//! The `tandem/1` wire messages: what a client and a relay say to each other, as plain data.
//!
//! Everything here is a struct or an externally tagged enum (serde's default), because the
//! codec is bincode, which is not self-describing: it cannot decode `#[serde(tag)]`,
//! `untagged`, `flatten`, `skip_serializing_if` or `serde_json::Value`. The order of variants
//! and fields *is* the wire format (`docs/protocol.md` has the tables), so reordering or
//! inserting anything is a protocol change and needs a new [`PROTOCOL_VERSION`].
//!
//! Not here: encoding and size limits (`codec`), and what either side does with a message
//! (the client and relay sessions).

use serde::{Deserialize, Serialize};

use crate::crdt::editing::{TextCursor, MAX_CURSOR_LEN};
use crate::ids::DocId;

/// The protocol version this build speaks, sent in both hellos.
pub const PROTOCOL_VERSION: u32 = 1;

/// In the `read` or `write` list of a relay's hello: every namespace, including ones nobody
/// has used yet (a relay without auth says this). Never a namespace's name.
pub const ALL_NAMESPACES: &str = "*";

/// A client's position in one namespace's catalog feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedCursor {
    /// The namespace whose feed this is.
    pub namespace: String,
    /// The last feed position the client has processed; 0 reads the feed from its start.
    pub cursor: u64,
}

/// One catalog entry: "document `doc` reached log seq `seq`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    /// The document that changed.
    pub doc: DocId,
    /// The highest seq of that document's log when the entry was written.
    pub seq: u64,
}

/// Messages from a client (a device) to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// The first frame of every connection. `feeds` asks for one catalog page per namespace.
    Hello {
        version: u32,
        device: [u8; 16],
        feeds: Vec<FeedCursor>,
    },
    /// Replaces the set of namespaces and documents whose new changes the relay pushes live.
    Subscribe {
        namespaces: Vec<String>,
        docs: Vec<DocId>,
    },
    /// The next catalog page of `namespace` after feed position `after`.
    FeedMore { namespace: String, after: u64 },
    /// The changes of `doc` with seq greater than `after`, in pages of about `max_bytes`.
    Pull {
        doc: DocId,
        after: u64,
        max_bytes: u64,
    },
    /// Changes of `doc` (Automerge change bytes, in causal order) for the relay to store.
    /// `batch` is chosen by the client and echoed in the answer.
    Push {
        namespace: String,
        doc: DocId,
        batch: u64,
        #[serde(with = "bytes_list")]
        changes: Vec<Vec<u8>>,
    },
    /// A heartbeat; the relay answers with `Pong` carrying the same nonce.
    Ping { nonce: u64 },
    /// The answer to the relay's `Ping`.
    Pong { nonce: u64 },
    /// This connection's presence in `doc` (of `namespace`, which the token must be able to
    /// read) is now `state`; `None` leaves the document. Ephemeral: the relay keeps it in
    /// memory while the connection lasts, forwards it to the other connections present in the
    /// same document, and stores nothing. Rate-limited: the excess is dropped.
    Presence {
        namespace: String,
        doc: DocId,
        state: Option<Presence>,
    },
}

/// Who someone is in a document and where their caret is, as presence messages carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The name to show.
    pub name: String,
    /// Their colour, `0xRRGGBB`.
    pub color: u32,
    /// Their caret or selection in a text field, if they have one.
    pub selection: Option<Selection>,
}

/// A caret (`anchor == head`) or a selection in a text field, as stable cursors that every
/// device resolves to its own positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// The text field (today's name).
    pub field: String,
    /// Where the selection started.
    pub anchor: TextCursor,
    /// Where it ends: the caret.
    pub head: TextCursor,
}

/// The longest name a presence may carry, in bytes.
pub const MAX_PRESENCE_NAME: usize = 64;
/// The longest field name a presence may carry, in bytes.
pub const MAX_PRESENCE_FIELD: usize = 128;

impl Presence {
    /// Whether every part is within its bound (a relay refuses a presence that is not).
    pub fn check(&self) -> Result<(), String> {
        if self.name.len() > MAX_PRESENCE_NAME {
            return Err(format!(
                "a presence name of {} bytes is over the {MAX_PRESENCE_NAME}-byte limit",
                self.name.len()
            ));
        }
        if let Some(sel) = &self.selection {
            if sel.field.len() > MAX_PRESENCE_FIELD {
                return Err(format!(
                    "a presence field name over {MAX_PRESENCE_FIELD} bytes"
                ));
            }
            if sel.anchor.as_str().len() > MAX_CURSOR_LEN
                || sel.head.as_str().len() > MAX_CURSOR_LEN
            {
                return Err(format!("a presence cursor over {MAX_CURSOR_LEN} bytes"));
            }
        }
        Ok(())
    }
}

/// The relay's limits, announced in its hello so a client can size its frames and batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The largest frame either side may send on this connection.
    pub max_frame_bytes: u64,
    /// The most changes one `Push` may carry.
    pub max_changes_per_push: u32,
    /// The largest single change the relay stores.
    pub max_change_bytes: u64,
    /// The most documents one connection may name in `Subscribe::docs`.
    pub max_docs_per_connection: u32,
}

/// Messages from the relay to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMsg {
    /// The answer to the client's hello: who the relay is, what the token allows, the limits.
    Hello {
        version: u32,
        /// Made when the relay's storage is created; a new value means its data was wiped.
        relay_id: [u8; 16],
        subject: String,
        /// Namespaces the token may read ([`ALL_NAMESPACES`] stands for all of them).
        read: Vec<String>,
        /// Namespaces the token may write ([`ALL_NAMESPACES`] stands for all of them).
        write: Vec<String>,
        limits: Limits,
    },
    /// One page of a namespace's catalog feed.
    Feed {
        namespace: String,
        entries: Vec<FeedEntry>,
        next_cursor: u64,
        more: bool,
    },
    /// Changes `from..=to` of `doc`'s log, as a pull page or a live update.
    Changes {
        doc: DocId,
        namespace: String,
        from: u64,
        to: u64,
        #[serde(with = "bytes_list")]
        changes: Vec<Vec<u8>>,
        more: bool,
        remaining_bytes: u64,
    },
    /// One chunk of a saved document that holds log seqs `1..=upto`.
    Snapshot {
        doc: DocId,
        namespace: String,
        upto: u64,
        chunk: u32,
        chunks: u32,
        #[serde(with = "bytes")]
        bytes: Vec<u8>,
    },
    /// The pushed batch is durable; `seqs[i]` is the log seq of the batch's change `i`.
    Ack {
        doc: DocId,
        batch: u64,
        seqs: Vec<u64>,
    },
    /// The batch depends on changes the relay lacks; push the document's whole history.
    NeedHistory { doc: DocId, batch: u64 },
    /// Something went wrong; `doc` and `batch` say which request, when it was one.
    Error {
        code: ErrorCode,
        message: String,
        doc: Option<DocId>,
        batch: Option<u64>,
    },
    /// A heartbeat; the client answers with `Pong` carrying the same nonce.
    Ping { nonce: u64 },
    /// The answer to the client's `Ping`.
    Pong { nonce: u64 },
    /// Connection `peer` (a number the relay gives each connection) is now present in `doc`
    /// as `state`, or has left it (`None`: it said so, or its connection ended).
    Presence {
        doc: DocId,
        peer: u64,
        state: Option<Presence>,
    },
}

/// What kind of error a [`RelayMsg::Error`] reports. The variant order is part of the wire
/// format; `UnsupportedVersion` must stay first so every future version can refuse an old
/// client in words it understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The client's hello names a protocol version the relay does not speak.
    UnsupportedVersion,
    /// No token, a malformed one, a bad signature, or an expired token.
    Unauthorized,
    /// The token does not allow this read or write.
    Forbidden,
    /// The frame did not decode, or came at the wrong time (e.g. anything before the hello).
    BadFrame,
    /// A limit was exceeded (frame, changes per push, change size, documents).
    TooLarge,
    /// A pushed change is not a valid Automerge change.
    BadChange,
    /// A pushed change's (actor, seq) is already in the log with another hash.
    HashMismatch,
    /// The document already belongs to another namespace than the push names.
    WrongNamespace,
    /// Too many requests; retry later.
    RateLimited,
    /// The relay is shedding load and closes the connection.
    Overloaded,
    /// The relay failed (e.g. its storage); nothing of the request was stored.
    Internal,
}

impl ErrorCode {
    /// Whether the relay closes the connection after sending this error.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ErrorCode::UnsupportedVersion
                | ErrorCode::Unauthorized
                | ErrorCode::BadFrame
                | ErrorCode::Overloaded
        )
    }

    /// A short hint for a person reading a log: what happened and what to do.
    pub fn hint(&self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => {
                "client and relay speak different protocol versions; upgrade the older one"
            }
            ErrorCode::Unauthorized => {
                "the token is missing, malformed, forged or expired; get a new one"
            }
            ErrorCode::Forbidden => {
                "the token does not grant this namespace; ask for a token that does"
            }
            ErrorCode::BadFrame => {
                "a frame did not decode or came out of order; this is a client bug"
            }
            ErrorCode::TooLarge => {
                "a request exceeds the relay's limits; split it (see the hello's limits)"
            }
            ErrorCode::BadChange => "a pushed change is not a valid Automerge change",
            ErrorCode::HashMismatch => {
                "a change reuses an (actor, seq) with different content; the device's store was \
                 restored or copied and must get a new device id"
            }
            ErrorCode::WrongNamespace => "the document already belongs to another namespace",
            ErrorCode::RateLimited => "too many requests; retry after a backoff",
            ErrorCode::Overloaded => "the relay is overloaded; reconnect after a backoff",
            ErrorCode::Internal => "the relay failed; nothing was stored, retry later",
        }
    }
}

/// Serde glue for one byte string: serialized as bytes rather than a sequence of `u8`.
/// On the wire both are a length and the raw bytes, but decoding bytes is one bounded copy
/// instead of one visitor call per byte.
mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Self-describing formats (JSON in logs and tests) write bytes as a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from the peer: cap the preallocation.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// Serde glue for a list of byte strings (Automerge changes), each as in [`bytes`].
mod bytes_list {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::{SerializeSeq, Serializer};
    use serde::{Deserialize, Serialize};
    use std::fmt;

    struct AsBytes<'a>(&'a [u8]);

    impl Serialize for AsBytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    struct OwnedBytes(Vec<u8>);

    impl<'de> Deserialize<'de> for OwnedBytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_byte_buf(super::bytes::BytesVisitor)
                .map(OwnedBytes)
        }
    }

    pub fn serialize<S: Serializer>(list: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for item in list {
            seq.serialize_element(&AsBytes(item))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        d.deserialize_seq(ListVisitor)
    }

    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of byte strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // The length prefix is the peer's claim, not a fact: a frame of n bytes holds at
            // most n items, so only a small preallocation is trusted.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(OwnedBytes(item)) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
}
