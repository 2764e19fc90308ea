//! Frame codec: one message <-> one WebSocket binary frame, with bincode 2 (`standard()`
//! config: little endian, varint integers) and a byte limit on every decode.
//!
//! Everything a peer sends passes through [`decode`], so this is where hostile input is
//! stopped: a frame over the limit is refused before any parsing, a length prefix that claims
//! more than the frame can hold fails instead of allocating, and trailing bytes are an error
//! (a frame is exactly one message). Not here: what the messages mean (`messages`) and the
//! sockets (the session shells).
//!
//! ```
//! use tandem::transport::{codec, ClientMsg};
//!
//! let frame = codec::encode(&ClientMsg::Ping { nonce: 7 }, codec::DEFAULT_MAX_FRAME).unwrap();
//! let back: ClientMsg = codec::decode(&frame, codec::DEFAULT_MAX_FRAME).unwrap();
//! assert_eq!(back, ClientMsg::Ping { nonce: 7 });
//! ```

use bincode::error::DecodeError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The frame limit used when none is configured: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// The largest frame this codec decodes whatever limit it is given: 128 MiB. The decode
/// budget below is a multiple of the frame length and must stay a compile-time constant,
/// so it needs a ceiling.
pub const MAX_FRAME_CEILING: usize = 128 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The frame is larger than the limit; nothing of it was parsed.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    /// The bytes are not a message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A whole message decoded but bytes were left over; a frame carries exactly one message.
    #[error("frame has bytes after the end of its message")]
    TrailingBytes,
    /// The value cannot be represented by the codec: a bug on the sending side, not the peer.
    #[error("cannot encode message: {0}")]
    Unencodable(String),
}

/// Encodes one message as a frame, refusing a frame larger than `limit` (so a sender finds
/// out before the peer closes the connection over it).
pub fn encode<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .map_err(|e| CodecError::Unencodable(e.to_string()))?;
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Decodes one frame of at most `limit` bytes (capped at [`MAX_FRAME_CEILING`]).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    let limit = limit.min(MAX_FRAME_CEILING);
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    // bincode counts what it decodes by in-memory size, not wire size: a one-byte varint
    // counts as the 8 bytes of a u64, and nothing we decode counts more than 8 per wire
    // byte. So a budget of 8x the frame length never refuses an honest frame, while a length
    // prefix claiming more (the only way to make bincode allocate before reading) fails
    // before the allocation. bincode wants the budget as a const generic, so the frame
    // length picks the smallest of a few fixed tiers; the waste is at most 4x.
    let need = bytes.len() * CLAIM_PER_WIRE_BYTE;
    match need {
        n if n <= 1 << 12 => decode_within::<T, { 1 << 12 }>(bytes),
        n if n <= 1 << 14 => decode_within::<T, { 1 << 14 }>(bytes),
        n if n <= 1 << 16 => decode_within::<T, { 1 << 16 }>(bytes),
        n if n <= 1 << 18 => decode_within::<T, { 1 << 18 }>(bytes),
        n if n <= 1 << 20 => decode_within::<T, { 1 << 20 }>(bytes),
        n if n <= 1 << 22 => decode_within::<T, { 1 << 22 }>(bytes),
        n if n <= 1 << 24 => decode_within::<T, { 1 << 24 }>(bytes),
        n if n <= 1 << 26 => decode_within::<T, { 1 << 26 }>(bytes),
        n if n <= 1 << 28 => decode_within::<T, { 1 << 28 }>(bytes),
        _ => decode_within::<T, { MAX_FRAME_CEILING * CLAIM_PER_WIRE_BYTE }>(bytes),
    }
}

/// The most bytes bincode's limit counts per wire byte for our messages (a u64 or a length
/// in one varint byte).
const CLAIM_PER_WIRE_BYTE: usize = 8;

fn decode_within<T: DeserializeOwned, const BUDGET: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    let config = bincode::config::standard().with_limit::<BUDGET>();
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(bytes, config).map_err(malformed)?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes);
    }
    Ok(value)
}

fn malformed(e: DecodeError) -> CodecError {
    match e {
        DecodeError::LimitExceeded => {
            CodecError::Malformed("a length prefix claims more than the frame holds".into())
        }
        other => CodecError::Malformed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DocId;
    use crate::transport::messages::*;
    use proptest::prelude::*;

    fn doc(n: u8) -> DocId {
        DocId([n; 16])
    }

    fn limits() -> Limits {
        Limits {
            max_frame_bytes: DEFAULT_MAX_FRAME as u64,
            max_changes_per_push: 1000,
            max_change_bytes: 1 << 20,
            max_docs_per_connection: 10_000,
        }
    }

    fn every_client_msg() -> Vec<ClientMsg> {
        vec![
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                device: [9; 16],
                feeds: vec![
                    FeedCursor {
                        namespace: "notes".into(),
                        cursor: 0,
                    },
                    FeedCursor {
                        namespace: "tasks".into(),
                        cursor: u64::MAX,
                    },
                ],
            },
            ClientMsg::Subscribe {
                namespaces: vec!["notes".into()],
                docs: vec![doc(1), doc(2)],
            },
            ClientMsg::FeedMore {
                namespace: "notes".into(),
                after: 300,
            },
            ClientMsg::Pull {
                doc: doc(3),
                after: 70_000,
                max_bytes: 1 << 20,
            },
            ClientMsg::Push {
                namespace: "notes".into(),
                doc: doc(4),
                batch: 5,
                changes: vec![vec![], vec![1, 2, 3], vec![0xff; 300]],
            },
            ClientMsg::Ping { nonce: 1 },
            ClientMsg::Pong { nonce: u64::MAX },
            ClientMsg::Presence {
                namespace: "notes".into(),
                doc: doc(5),
                state: Some(sample_presence()),
            },
            ClientMsg::Presence {
                namespace: "notes".into(),
                doc: doc(5),
                state: None,
            },
        ]
    }

    fn sample_presence() -> Presence {
        let cursor: crate::crdt::editing::TextCursor =
            serde_json::from_value(serde_json::json!("7@a1b2c3")).unwrap();
        Presence {
            name: "Ada".into(),
            color: 0xff5555,
            selection: Some(Selection {
                field: "body".into(),
                anchor: cursor.clone(),
                head: cursor,
            }),
        }
    }

    fn every_relay_msg() -> Vec<RelayMsg> {
        let mut msgs = vec![
            RelayMsg::Hello {
                version: PROTOCOL_VERSION,
                relay_id: [7; 16],
                subject: "ada".into(),
                read: vec!["notes".into(), "tasks".into()],
                write: vec!["notes".into()],
                limits: limits(),
            },
            RelayMsg::Feed {
                namespace: "notes".into(),
                entries: vec![
                    FeedEntry {
                        doc: doc(1),
                        seq: 4,
                    },
                    FeedEntry {
                        doc: doc(2),
                        seq: 1 << 40,
                    },
                ],
                next_cursor: 12,
                more: true,
            },
            RelayMsg::Changes {
                doc: doc(1),
                namespace: "notes".into(),
                from: 5,
                to: 6,
                changes: vec![vec![1], vec![2, 2]],
                more: false,
                remaining_bytes: 0,
            },
            RelayMsg::Snapshot {
                doc: doc(1),
                namespace: "notes".into(),
                upto: 100,
                chunk: 0,
                chunks: 3,
                bytes: vec![0x85, 0x6f, 0x4a, 0x83],
            },
            RelayMsg::Ack {
                doc: doc(4),
                batch: 5,
                seqs: vec![1, 2, 1000],
            },
            RelayMsg::NeedHistory {
                doc: doc(4),
                batch: 6,
            },
            RelayMsg::Error {
                code: ErrorCode::HashMismatch,
                message: "change (a1, 3) differs".into(),
                doc: Some(doc(4)),
                batch: Some(7),
            },
            RelayMsg::Ping { nonce: 2 },
            RelayMsg::Pong { nonce: 3 },
            RelayMsg::Presence {
                doc: doc(5),
                peer: u64::MAX,
                state: Some(sample_presence()),
            },
        ];
        for code in ALL_CODES {
            msgs.push(RelayMsg::Error {
                code,
                message: code.hint().into(),
                doc: None,
                batch: None,
            });
        }
        msgs
    }

    const ALL_CODES: [ErrorCode; 11] = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::BadFrame,
        ErrorCode::TooLarge,
        ErrorCode::BadChange,
        ErrorCode::HashMismatch,
        ErrorCode::WrongNamespace,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ];

    #[test]
    fn every_message_round_trips() {
        for msg in every_client_msg() {
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decode::<ClientMsg>(&frame, DEFAULT_MAX_FRAME).unwrap(), msg);
        }
        for msg in every_relay_msg() {
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decode::<RelayMsg>(&frame, DEFAULT_MAX_FRAME).unwrap(), msg);
        }
    }

    /// The byte layouts promised in docs/protocol.md; a failure here means the docs (and
    /// every client written from them) are wrong.
    #[test]
    fn wire_layout_matches_the_protocol_doc() {
        let hello = ClientMsg::Hello {
            version: 1,
            device: [0x11; 16],
            feeds: vec![FeedCursor {
                namespace: "notes".into(),
                cursor: 42,
            }],
        };
        let mut expected = vec![0, 1];
        expected.extend([0x11; 16]);
        expected.extend([1, 5, b'n', b'o', b't', b'e', b's', 42]);
        assert_eq!(encode(&hello, 64).unwrap(), expected);

        let ack = RelayMsg::Ack {
            doc: doc(0x22),
            batch: 9,
            seqs: vec![7, 300],
        };
        let mut expected = vec![4];
        expected.extend([0x22; 16]);
        expected.extend([9, 2, 7, 251, 0x2c, 0x01]);
        assert_eq!(encode(&ack, 64).unwrap(), expected);

        let ping = encode(&ClientMsg::Ping { nonce: 300 }, 64).unwrap();
        assert_eq!(ping, [5, 251, 0x2c, 0x01]);

        // Presence: variant 7 of ClientMsg and 9 of RelayMsg, the state as an Option.
        let here = crate::transport::Presence {
            name: "al".into(),
            color: 0xff,
            selection: None,
        };
        let presence = ClientMsg::Presence {
            namespace: "n".into(),
            doc: doc(0x33),
            state: Some(here.clone()),
        };
        let mut expected = vec![7, 1, b'n'];
        expected.extend([0x33; 16]);
        expected.extend([1, 2, b'a', b'l', 251, 0xff, 0x00, 0]);
        assert_eq!(encode(&presence, 64).unwrap(), expected);
        let left = RelayMsg::Presence {
            doc: doc(0x33),
            peer: 4,
            state: None,
        };
        let mut expected = vec![9];
        expected.extend([0x33; 16]);
        expected.extend([4, 0]);
        assert_eq!(encode(&left, 64).unwrap(), expected);

        let pull = ClientMsg::Pull {
            doc: doc(0xaa),
            after: 7,
            max_bytes: 65_536,
        };
        let mut expected = vec![3];
        expected.extend([0xaa; 16]);
        expected.extend([7, 252, 0x00, 0x00, 0x01, 0x00]);
        assert_eq!(encode(&pull, 64).unwrap(), expected);

        let push = ClientMsg::Push {
            namespace: "ns".into(),
            doc: doc(1),
            batch: 9,
            changes: vec![vec![0xde, 0xad]],
        };
        let mut expected = vec![4, 2, b'n', b's'];
        expected.extend([1; 16]);
        expected.extend([9, 1, 2, 0xde, 0xad]);
        assert_eq!(encode(&push, 64).unwrap(), expected);

        let err = RelayMsg::Error {
            code: ErrorCode::Forbidden,
            message: "no".into(),
            doc: None,
            batch: Some(1),
        };
        assert_eq!(encode(&err, 64).unwrap(), [6, 2, 2, b'n', b'o', 0, 1, 1]);

        for (index, code) in ALL_CODES.iter().enumerate() {
            assert_eq!(encode(code, 64).unwrap(), [index as u8], "{code:?}");
        }
    }

    #[test]
    fn fatal_codes_are_the_four_that_close() {
        let fatal: Vec<_> = ALL_CODES.iter().filter(|c| c.is_fatal()).collect();
        assert_eq!(
            fatal,
            [
                &ErrorCode::UnsupportedVersion,
                &ErrorCode::Unauthorized,
                &ErrorCode::BadFrame,
                &ErrorCode::Overloaded
            ]
        );
    }

    #[test]
    fn oversize_frame_is_refused_before_parsing() {
        // Not a valid message at all: the size check must come first.
        let frame = vec![0xff; 101];
        assert_eq!(
            decode::<ClientMsg>(&frame, 100),
            Err(CodecError::TooLarge {
                len: 101,
                limit: 100
            })
        );
        let msg = ClientMsg::Push {
            namespace: "n".into(),
            doc: doc(1),
            batch: 1,
            changes: vec![vec![0; 200]],
        };
        assert!(matches!(
            encode(&msg, 100),
            Err(CodecError::TooLarge { limit: 100, .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = encode(&ClientMsg::Ping { nonce: 1 }, 64).unwrap();
        frame.push(0);
        assert_eq!(
            decode::<ClientMsg>(&frame, 64),
            Err(CodecError::TrailingBytes)
        );
    }

    /// A Push whose `changes` length prefix claims u64::MAX items: decoding must fail on the
    /// short frame, not try to reserve room for the claim.
    #[test]
    fn length_bomb_in_change_list_fails_fast() {
        let mut frame = vec![4, 1, b'n'];
        frame.extend([1; 16]);
        frame.push(0); // batch
        frame.push(253); // u64 follows
        frame.extend(u64::MAX.to_le_bytes());
        frame.extend([0, 0, 0]);
        assert!(matches!(
            decode::<ClientMsg>(&frame, DEFAULT_MAX_FRAME),
            Err(CodecError::Malformed(_))
        ));

        // One change claiming 2^60 bytes: bincode would reserve the whole claim before
        // reading, which aborts the process if the budget does not stop it first.
        let mut frame = vec![4, 1, b'n'];
        frame.extend([1; 16]);
        frame.extend([0, 1, 253]);
        frame.extend((1u64 << 60).to_le_bytes());
        frame.extend([0xab; 32]);
        assert_eq!(
            decode::<ClientMsg>(&frame, DEFAULT_MAX_FRAME),
            Err(CodecError::Malformed(
                "a length prefix claims more than the frame holds".into()
            ))
        );
    }

    #[test]
    fn length_bomb_in_string_fails_on_the_budget() {
        // FeedMore { namespace: <claims 1 GiB>, .. } in a 40-byte frame: refused by the
        // budget (about 8x the frame), so the 1 GiB buffer is never reserved.
        let mut frame = vec![2, 252];
        frame.extend((1u32 << 30).to_le_bytes());
        frame.extend([b'x'; 34]);
        assert_eq!(
            decode::<ClientMsg>(&frame, DEFAULT_MAX_FRAME),
            Err(CodecError::Malformed(
                "a length prefix claims more than the frame holds".into()
            ))
        );
    }

    /// Frames made mostly of one-byte varints count 8x their size against bincode's limit;
    /// they must still decode at every budget tier.
    #[test]
    fn varint_dense_frames_decode_at_every_tier() {
        for n in [0, 1, 500, 511, 512, 2048, 9000, 70_000, 300_000] {
            let msg = RelayMsg::Ack {
                doc: doc(1),
                batch: 1,
                seqs: vec![1; n],
            };
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decode::<RelayMsg>(&frame, DEFAULT_MAX_FRAME).unwrap(), msg);
        }
        for n in [0, 1, 600, 5000, 100_000] {
            let msg = ClientMsg::Push {
                namespace: String::new(),
                doc: doc(1),
                batch: 1,
                changes: vec![vec![]; n],
            };
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(decode::<ClientMsg>(&frame, DEFAULT_MAX_FRAME).unwrap(), msg);
        }
    }

    #[test]
    fn unknown_variant_is_malformed() {
        assert!(matches!(
            decode::<ClientMsg>(&[7, 0], 64),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode::<RelayMsg>(&[9, 0], 64),
            Err(CodecError::Malformed(_))
        ));
    }

    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..64)
    }

    fn arb_doc() -> impl Strategy<Value = DocId> {
        any::<[u8; 16]>().prop_map(DocId)
    }

    fn arb_client_msg() -> impl Strategy<Value = ClientMsg> {
        let names = || prop::collection::vec(".{0,12}", 0..4);
        prop_oneof![
            (
                any::<u32>(),
                any::<[u8; 16]>(),
                prop::collection::vec(
                    (".{0,12}", any::<u64>())
                        .prop_map(|(namespace, cursor)| FeedCursor { namespace, cursor }),
                    0..4
                )
            )
                .prop_map(|(version, device, feeds)| ClientMsg::Hello {
                    version,
                    device,
                    feeds
                }),
            (names(), prop::collection::vec(arb_doc(), 0..4))
                .prop_map(|(namespaces, docs)| ClientMsg::Subscribe { namespaces, docs }),
            (".{0,12}", any::<u64>())
                .prop_map(|(namespace, after)| ClientMsg::FeedMore { namespace, after }),
            (arb_doc(), any::<u64>(), any::<u64>()).prop_map(|(doc, after, max_bytes)| {
                ClientMsg::Pull {
                    doc,
                    after,
                    max_bytes,
                }
            }),
            (
                ".{0,12}",
                arb_doc(),
                any::<u64>(),
                prop::collection::vec(arb_bytes(), 0..6)
            )
                .prop_map(|(namespace, doc, batch, changes)| ClientMsg::Push {
                    namespace,
                    doc,
                    batch,
                    changes
                }),
            any::<u64>().prop_map(|nonce| ClientMsg::Ping { nonce }),
            any::<u64>().prop_map(|nonce| ClientMsg::Pong { nonce }),
            (".{0,12}", arb_doc(), prop::option::of(arb_presence())).prop_map(
                |(namespace, doc, state)| ClientMsg::Presence {
                    namespace,
                    doc,
                    state
                }
            ),
        ]
    }

    fn arb_presence() -> impl Strategy<Value = crate::transport::Presence> {
        // Cursors as a peer may send them: any string (they are checked only when resolved).
        let cursor = || {
            ".{0,20}".prop_map(|s| {
                serde_json::from_value::<crate::crdt::editing::TextCursor>(serde_json::json!(s))
                    .unwrap()
            })
        };
        (
            ".{0,12}",
            any::<u32>(),
            prop::option::of((".{0,8}", cursor(), cursor())),
        )
            .prop_map(|(name, color, sel)| crate::transport::Presence {
                name,
                color,
                selection: sel.map(|(field, anchor, head)| crate::transport::Selection {
                    field,
                    anchor,
                    head,
                }),
            })
    }

    fn arb_relay_msg() -> impl Strategy<Value = RelayMsg> {
        let names = || prop::collection::vec(".{0,12}", 0..4);
        let code = prop::sample::select(ALL_CODES.to_vec());
        prop_oneof![
            (
                any::<u32>(),
                any::<[u8; 16]>(),
                ".{0,12}",
                names(),
                names(),
                (any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>())
            )
                .prop_map(|(version, relay_id, subject, read, write, l)| {
                    RelayMsg::Hello {
                        version,
                        relay_id,
                        subject,
                        read,
                        write,
                        limits: Limits {
                            max_frame_bytes: l.0,
                            max_changes_per_push: l.1,
                            max_change_bytes: l.2,
                            max_docs_per_connection: l.3,
                        },
                    }
                }),
            (
                ".{0,12}",
                prop::collection::vec(
                    (arb_doc(), any::<u64>()).prop_map(|(doc, seq)| FeedEntry { doc, seq }),
                    0..4
                ),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(namespace, entries, next_cursor, more)| RelayMsg::Feed {
                    namespace,
                    entries,
                    next_cursor,
                    more
                }),
            (
                arb_doc(),
                ".{0,12}",
                (any::<u64>(), any::<u64>()),
                prop::collection::vec(arb_bytes(), 0..6),
                any::<bool>(),
                any::<u64>()
            )
                .prop_map(
                    |(doc, namespace, (from, to), changes, more, remaining_bytes)| {
                        RelayMsg::Changes {
                            doc,
                            namespace,
                            from,
                            to,
                            changes,
                            more,
                            remaining_bytes,
                        }
                    }
                ),
            (
                arb_doc(),
                ".{0,12}",
                any::<u64>(),
                (any::<u32>(), any::<u32>()),
                arb_bytes()
            )
                .prop_map(|(doc, namespace, upto, (chunk, chunks), bytes)| {
                    RelayMsg::Snapshot {
                        doc,
                        namespace,
                        upto,
                        chunk,
                        chunks,
                        bytes,
                    }
                }),
            (
                arb_doc(),
                any::<u64>(),
                prop::collection::vec(any::<u64>(), 0..8)
            )
                .prop_map(|(doc, batch, seqs)| RelayMsg::Ack { doc, batch, seqs }),
            (arb_doc(), any::<u64>()).prop_map(|(doc, batch)| RelayMsg::NeedHistory { doc, batch }),
            (
                code,
                ".{0,20}",
                prop::option::of(arb_doc()),
                prop::option::of(any::<u64>())
            )
                .prop_map(|(code, message, doc, batch)| RelayMsg::Error {
                    code,
                    message,
                    doc,
                    batch
                }),
            any::<u64>().prop_map(|nonce| RelayMsg::Ping { nonce }),
            any::<u64>().prop_map(|nonce| RelayMsg::Pong { nonce }),
            (arb_doc(), any::<u64>(), prop::option::of(arb_presence()))
                .prop_map(|(doc, peer, state)| RelayMsg::Presence { doc, peer, state }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            // Decoding either fails with a typed error or yields a value that re-encodes to
            // the same frame (bincode has one encoding per value, bar non-shortest varints).
            if let Ok(msg) = decode::<ClientMsg>(&bytes, 4096) {
                let again = encode(&msg, 4096).unwrap();
                prop_assert_eq!(decode::<ClientMsg>(&again, 4096).unwrap(), msg);
            }
            if let Ok(msg) = decode::<RelayMsg>(&bytes, 4096) {
                let again = encode(&msg, 4096).unwrap();
                prop_assert_eq!(decode::<RelayMsg>(&again, 4096).unwrap(), msg);
            }
        }

        #[test]
        fn arbitrary_prefixes_of_real_frames_never_panic(
            msg in arb_client_msg(),
            cut in any::<prop::sample::Index>(),
        ) {
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            let cut = cut.index(frame.len() + 1);
            let prefix = &frame[..cut];
            let decoded = decode::<ClientMsg>(prefix, DEFAULT_MAX_FRAME);
            if cut == frame.len() {
                prop_assert_eq!(decoded.unwrap(), msg);
            } else {
                prop_assert!(decoded.is_err());
            }
        }

        #[test]
        fn client_messages_round_trip(msg in arb_client_msg()) {
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            prop_assert_eq!(decode::<ClientMsg>(&frame, frame.len()).unwrap(), msg);
        }

        #[test]
        fn relay_messages_round_trip(msg in arb_relay_msg()) {
            let frame = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
            prop_assert_eq!(decode::<RelayMsg>(&frame, frame.len()).unwrap(), msg);
        }
    }
}
