//! narpost: gets every Nix store path a machine builds into a binary cache.
//!
//! # Layout
//!
//! - [`text`]: text from elsewhere (a server's message, a file name) made safe to print.
//! - [`priority`]: yielding the CPU and the disk to builds (sessions, autogroups, nice, I/O
//!   class), and large compressions to newer small work; imports nothing of narpost's.
//! - [`format`]: pure Nix formats (nixbase32, store paths, hashes, NAR writer, narinfo,
//!   signing keys, `.drv` outputs); no filesystem, network or async.
//! - [`buildlog`]: where Nix keeps build logs on this machine, and reading one for a cache.
//! - [`dump`]: serializes a store path on disk into a NAR through [`format::nar`].
//! - [`store`]: path metadata and closures from the local Nix store's database.
//! - [`cache`]: the cache side: the [`cache::Target`] trait and its `file://`, HTTP, S3, Attic and ssh implementations.
//! - [`compress`]: zstd in frames whose worker count follows the other compressions running.
//! - [`pipeline`]: the one upload pipeline: plan (closure, missing, order), then execute.
//! - [`config`]: file < environment < flags, resolved into one [`config::Config`]; embedded defaults.
//! - [`keys`]: loading the signing key, generating the embedded default key.
//! - [`queue`]: the durable on-disk queue of paths waiting for upload.
//! - [`drain_state`]: what the drainer publishes for `status`, the metrics and the watchers.
//! - [`private_dir`]: the state directory and its files, refused when someone else could steer writes to them.
//! - [`accept`]: the accept loop of the small HTTP servers, with a bound on connections.
//! - [`claims`]: building once across machines: build claims in the cache, and waiting on another machine's.
//! - [`substituter`]: the daemon's local substituter: serves the cache to this machine's Nix.
//! - [`hook`]: the `post-build-hook`: records built paths in the queue; never fails a build.
//! - [`daemon`]: drains the queue (also behind `watch-store` and `watch-exec`).
//! - [`watch`]: notices store paths that become valid.
//! - [`failed_builds`]: uploads the build logs of failed builds for the watchers.
//! - [`metrics`]: Prometheus metrics of the drainer, served at `/metrics`.
//! - [`status`]: what `narpost status` reports.
//! - [`check`]: `narpost check`: reads the cache back, says what is broken, repairs it from the store.
//! - [`setup`]: `narpost setup`: wires a machine (binaries, nix.conf, config, unit), plan then apply.
//! - [`progress`]: turns pipeline events into progress bars or plain lines.
//! - [`cli`]: the command line; [`cli_docs`]: its completions and man pages; [`app`]: wiring configuration into a pipeline; [`error`]: how errors are printed.

pub mod accept;
pub mod app;
pub mod buildlog;
pub mod cache;
pub mod check;
pub mod claims;
pub mod cli;
pub mod cli_docs;
pub mod compress;
pub mod config;
pub mod daemon;
pub mod drain_state;
pub mod dump;
pub mod error;
pub mod failed_builds;
pub mod format;
pub mod hook;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod priority;
pub mod private_dir;
pub mod progress;
pub mod queue;
pub mod setup;
pub mod status;
pub mod store;
pub mod substituter;

pub mod text;
pub mod watch;
