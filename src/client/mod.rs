//! The device side of sync: a background task that keeps a [`Repo`](crate::Repo) in step with a
//! relay over `tandem/1` (see `docs/protocol.md`).
//!
//! Two layers, split the way quinn splits `quinn-proto` from `quinn`:
//! - [`session`]: [`ClientSession`], the protocol state of one connection. It is driven by calls
//!   (`handle_message`, `handle_timeout`, `local_changed`) and answers with messages to send
//!   (`poll_transmit`) and the next time it wants to be woken (`poll_timeout`). It owns no
//!   socket, no clock and no task, so tests drive it with hand-written relay messages and
//!   synthetic `Instant`s. It calls the blocking [`Repo`](crate::Repo) directly.
//! - [`shell`]: the tokio code that moves frames between a WebSocket and a session, runs the
//!   session's blocking calls on the blocking pool, reconnects with backoff, and reports
//!   connection state ([`connect`], [`sync_once`]).
//!
//! Not here: the wire types and codec (`transport`), the relay (`relay`), the CLI.
//!
//! What the client keeps durably (all through `Store::sync_put`, see [`session`] for the keys):
//! the relay identity its cursors belong to and one feed cursor per (relay identity, namespace).
//! Per-document cursors live in the document's metadata (`Repo::set_relay_seq`), the outbox in
//! the store. So the task survives the relay going away and the process being killed.

pub mod session;
pub mod shell;

#[cfg(test)]
mod tests;

pub use session::{ClientSession, DocIssue, SessionConfig, SessionStats};
pub use shell::{connect, relay_url, sync_once, SyncConfig, SyncCounters, SyncHandle, SyncReport};

use crate::transport::ErrorCode;

/// Why a sync (one pass, or the background task) stopped, typed by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No relay could be reached, or the connection died (closed, silent past `dead_after`,
    /// overloaded). Retrying later may help. The CLI exits with 6.
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The relay refused us: bad or expired token, a protocol version it does not speak, a
    /// token that grants nothing, or local changes the token may not push. Retrying with the
    /// same token will not help. The CLI exits with 5.
    #[error("refused by the relay ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    /// The relay broke the protocol (an undecodable frame, an answer that does not fit a
    /// request) or told us we did. A bug on one side; reconnecting starts clean.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The pass did not finish within the time given.
    #[error("sync did not finish in time")]
    Timeout,
    /// The local store failed.
    #[error(transparent)]
    Repo(#[from] crate::Error),
}

impl SyncError {
    /// The exit code the `tandem` CLI uses for this error (see docs/cli.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            SyncError::Unreachable(_) => 6,
            SyncError::Refused { .. } => 5,
            SyncError::Repo(e) => e.exit_code(),
            SyncError::Protocol(_) | SyncError::Timeout => 1,
        }
    }

    /// Whether reconnecting (with the same configuration) could help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SyncError::Refused { .. })
    }
}
