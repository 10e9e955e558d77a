//! Every integration test in one binary: the real parts (Nix, nginx, s3s-fs, sshd, the
//! Attic-API server) driven from the outside, one module per area. One binary links once,
//! where twenty would each link the whole crate and its dependencies again.
//!
//! Run one area with a filter: `cargo test --test e2e daemon_e2e::`.

mod attic_server;
mod common;

mod attic_e2e;
mod build_once_e2e;
mod check_e2e;
mod cli_docs;
mod daemon_e2e;
mod file_cache_umask;
mod format_fixtures;
mod hook_queue;
mod hostile;
mod kept_queued;
mod logs_e2e;
mod metrics_e2e;
mod nixos_module;
mod priority_e2e;
mod push_e2e;
mod release_e2e;
mod s3_e2e;
mod s3_faults;
mod serve_wire;
mod setup;
mod ssh_e2e;
mod substituter_e2e;
mod watch_e2e;
