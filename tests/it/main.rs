//! tandem's integration tests: one binary, one module per area.

mod amrepo;
mod bad_input;
mod cli;
mod cluster;
mod crash;
mod editors;
mod fuzz_corpus;
mod hostile;
mod local;
mod migration;
mod notes_app;
mod pg;
mod props;
mod quickstart;
mod relay;
mod relay_crash;
mod sim;
mod support;
mod sync;
mod wire;
