//! tandem: an offline-first sync engine.
//!
//! Every entity (a note, a task) is one [Automerge](https://automerge.org) document, persisted
//! on the device in sled. Reads and writes work with no network at all; a background task
//! exchanges changes with a relay when one is reachable.
//!
//! The embedding API is [`Repo`]:
//!
//! ```
//! use tandem::{Repo, Schema};
//! use serde_json::json;
//!
//! let schema = Schema::from_toml(r#"
//!     version = 1
//!     [types.note]
//!     title = "critical"
//!     body = "text"
//!     views = "counter"
//! "#).unwrap();
//! let repo = Repo::in_memory(schema, "ada").unwrap();
//! let id = repo.create("note", json!({"title": "Groceries", "body": "milk"})).unwrap();
//! repo.change(&id, |tx| {
//!     tx.increment("views", 1)?;
//!     tx.splice_text("body", 4, 0, ", eggs")
//! }).unwrap();
//! assert_eq!(repo.get(&id).unwrap().value["body"], "milk, eggs");
//! ```
//!
//! Layers, each described by what it may not do:
//! - [`crdt`]: the Automerge-facing rules (schema, merge strategies, conflicts, migrations,
//!   history). No I/O.
//! - [`store`]: persistence (journal, chunked snapshots, outbox). Knows nothing of the network.
//! - [`repo`]: ties the two together behind [`Repo`]; the only layer that owns documents in
//!   memory on a device.
//! - [`client`]: the device's background sync task: a sans-IO session per connection and
//!   the tokio shell around it ([`client::connect`], [`client::sync_once`]).
//!
//! See `docs/architecture.md` for the whole picture.

/// The example in `docs/embedding.md` runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../docs/embedding.md")]
pub struct EmbeddingGuide;

pub mod client;
pub mod crdt;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod relay;
pub mod repo;
pub mod store;
pub mod transport;

pub use crdt::editing::{MarkSpan, Patch, PatchAction, PathElem, Style, TextCursor};
pub use crdt::history::{ChangeInfo, FieldDiff};
pub use crdt::schema::{Schema, Strategy};
pub use crdt::{ConflictVersion, FieldConflict};
pub use error::Error;
pub use ids::{DeviceId, DocId};
pub use repo::{
    Applied, ConnState, Direction, DocStatus, Entity, Entropy, Event, Origin, Peer, Repo,
    RepoOptions, Tx,
};
pub use transport::{Presence, Selection};
