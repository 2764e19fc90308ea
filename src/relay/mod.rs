//! The relay server. So far only its authentication (JWT tokens and namespace scopes); the
//! change log, feed, fan-out and storage live in sibling modules as they are written.

pub mod auth;
