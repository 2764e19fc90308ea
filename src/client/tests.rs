//! Unit tests of the client session, driven by a scripted fake relay (no sockets).
