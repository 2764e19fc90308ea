//! The crate's public error type. Each layer has its own error enum (typed by whose fault it
//! is); [`Error`] wraps them for the embedding API, and maps every variant to the CLI's exit
//! code in one place ([`Error::exit_code`]).

use crate::crdt::EntityError;
use crate::ids::DocId;
use crate::store::StoreError;

/// Everything that can go wrong in a [`crate::Repo`] call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The document is not in this store.
    #[error("document {0} not found")]
    NotFound(DocId),
    /// No document id starts with this prefix.
    #[error("no document matches '{0}'")]
    NoMatch(String),
    /// A change hash (or prefix) names no change of the document.
    #[error("no change of document {doc} matches '{hash}'")]
    ChangeNotFound { doc: DocId, hash: String },
    /// A prefix matched more than one id or hash.
    #[error("'{prefix}' is ambiguous; it matches: {}", candidates.join(", "))]
    Ambiguous {
        prefix: String,
        candidates: Vec<String>,
    },
    /// The caller asked for something the schema or the document does not allow
    /// (wrong kind, unknown field, unknown type). Nothing was written.
    #[error(transparent)]
    Entity(#[from] EntityError),
    /// The local store failed or refused (in use, corrupt, I/O).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bytes handed to import or apply were not valid Automerge data.
    #[error("invalid Automerge data: {0}")]
    InvalidData(String),
}

impl Error {
    /// The exit code the `tandem` CLI uses for this error (see docs/cli.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound(_) | Error::NoMatch(_) | Error::ChangeNotFound { .. } => 3,
            Error::Entity(EntityError::UnknownField { .. }) => 3,
            Error::Store(StoreError::InUse { .. }) => 4,
            Error::Ambiguous { .. } => 2,
            _ => 1,
        }
    }
}

impl From<automerge::AutomergeError> for Error {
    fn from(e: automerge::AutomergeError) -> Self {
        Error::InvalidData(e.to_string())
    }
}
