//! The `/automerge` endpoint: the relay speaks automerge-repo's WebSocket protocol ("1"), so a
//! browser app using `@automerge/automerge-repo` with its WebSocket adapter syncs with the same
//! documents, log and feeds as tandem/1 devices (docs/automerge-repo.md).
//!
//! Unlike tandem/1, this protocol needs the documents: automerge-repo peers run Automerge's sync
//! protocol, so the relay keeps each document such a peer uses in memory while it is in use.
//!
//! - [`cbor`]: a bounded, lenient CBOR decoder and an exact encoder.
//! - [`wire`]: the protocol's messages over it.
//! - [`doc`]: one document and its peers' sync states, sans-IO, with the checks that keep peer
//!   bytes from reaching Automerge unbounded.
//! - [`shell`]: the connection tasks and document actors (tokio).

pub mod cbor;
pub mod doc;
pub mod shell;
pub mod wire;

pub use shell::{serve, AmConfig, AmRelay};
