//! The wire side of sync: the `tandem/1` messages, their codec with size limits, and the
//! reconnect backoff schedule.
//!
//! Everything here is sans-IO: no sockets, no clocks, no tasks. Time and randomness are
//! parameters, so the client and relay sessions built on top can be driven by a seeded
//! simulation. The protocol itself is specified in `docs/protocol.md`; the types here are its
//! source of truth for field order.

pub mod backoff;
pub mod codec;
pub mod messages;

pub use backoff::{Backoff, BackoffConfig};
pub use codec::{decode, encode, CodecError, DEFAULT_MAX_FRAME};
pub use messages::{
    ClientMsg, ErrorCode, FeedCursor, FeedEntry, Limits, Presence, RelayMsg, Selection,
    ALL_NAMESPACES, PROTOCOL_VERSION,
};
