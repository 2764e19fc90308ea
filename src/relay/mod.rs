//! The relay server: it makes each change durable in a per-document log, gives it a logical
//! cursor (its seq), announces it in its namespace's feed, and fans it out to the connections
//! subscribed to it. It never holds documents in memory on the tandem/1 path.
//!
//! - [`auth`]: JWT tokens and namespace scopes.
//! - [`log`]: the durable state (logs, hash index, feeds, snapshots), socket-free.
//! - [`session`]: the protocol logic of one connection ([`session::RelaySession`]) and the
//!   subscriptions that decide fan-out ([`session::Hub`]), sans-IO: effects are data.
//! - [`amrepo`]: the `/automerge` endpoint, automerge-repo's WebSocket protocol; the one place
//!   the relay holds documents in memory (automerge-repo peers need Automerge's sync protocol).
//! - [`storage`]: the seam between the protocol and durable state ([`storage::RelayStore`]),
//!   with the sled log and [`postgres`] (shared by several relay nodes) behind it.
//! - [`server`]: the tokio/axum shell: `/v1` WebSocket, `/healthz`, `/metrics`, connection
//!   limits, timeouts, graceful shutdown; it carries out the sessions' effects.

pub mod amrepo;
pub mod auth;
pub mod bus;
pub mod log;
pub mod memory;
pub mod migrate;
pub mod postgres;
pub mod server;
pub mod session;
pub mod storage;

pub use server::{start, Auth, RelayConfig, RelayHandle};
pub use session::{Effect, Hub, RelaySession};
