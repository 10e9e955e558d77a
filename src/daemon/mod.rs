//! Draining the durable queue into the cache: `narpost daemon`, and the upload half of
//! `watch-store` and `watch-exec`.
//!
//! One drainer per state directory, enforced by an exclusive lock on `<state>/drain.lock`,
//! so two processes never upload the same entries. Beside the queue it keeps
//! `<state>/drain-state.json` (what `status` shows, rewritten atomically) and
//! `<state>/drain-spool/` (NARs compressed for uploads under way; emptied at start-up, since
//! a predecessor killed mid-upload leaves its files there). The loop:
//!
//! - reads the queued entries (after adopting orphaned GC roots, see below), drops paths
//!   that are no longer valid in the store (such an entry moves to the failed list with its
//!   reason), and pushes the union of the rest, with their closures, through the one
//!   pipeline (which skips what the cache has); it reads again on every wake-up while
//!   uploads are under way and starts a run beside them for what it had not seen (see the
//!   `session` module), so a new build never waits for a backlog;
//! - acknowledges an entry (deletes it, releases its GC roots) only when every one of its
//!   paths is in the cache; an entry with a permanently failing path (NarHash mismatch) moves
//!   to the failed list; anything transient stays queued;
//! - while uploads fail (the cache down, or the spool disk full), waits with capped
//!   exponential backoff and jitter, logging one line when they start failing and one when a
//!   whole run goes through again;
//! - wakes up on inotify events in the queue directory (new entries), or every few seconds;
//! - an error of its own (the state directory full or unreadable, the store database busy)
//!   is logged once, shown by `status`, and retried with the same backoff; it never ends
//!   the daemon, since nothing but the daemon would upload what the hooks keep queuing.
//!
//! Orphaned GC roots: a root with no queue entry holding its path is left by a hook that
//! could not write its entry (disk full, state directory unwritable), by a corrupt entry set
//! aside, or by a crash between two steps (see [`crate::queue`]). Every such path was built
//! and meant for the cache, so the drainer queues it: at start-up all of them, later (every
//! few minutes) those whose root is old enough that no hook can still be about to write the
//! entry. A root whose path is gone from the store is removed.
//!
//! Shutdown: the first SIGTERM/SIGINT stops new work; uploads under way get `drain-timeout`
//! to finish, then are dropped (nothing half-written becomes visible: NARs and narinfos are
//! committed atomically by the targets); what is left stays queued. A second signal exits at
//! once, which loses nothing either, since the queue is on disk.

mod drainer;
mod entries;
mod lock;
mod roots;
mod session;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use drainer::{Drainer, Totals};
pub use lock::DrainLock;

use std::sync::Arc;

use crate::claims::{ClaimOptions, Claims};
use crate::config::Config;
use crate::format::store_path::StorePath;
use crate::metrics::Metrics;
use crate::progress::count;
use crate::queue::Queue;

pub use crate::drain_state::{DrainState, STATE_FILE};

pub const LOCK_FILE: &str = "drain.lock";

/// Compressed NARs of the drainer's uploads under way; only the lock holder writes here.
pub const SPOOL_DIR: &str = "drain-spool";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends a wake-up whenever an entry may have arrived in `dir`.
///
/// Only arrivals count: inotify also reports every open and read of the directory, and the
/// drainer itself opens it on each read (listing it, syncing it after an acknowledgement),
/// so waking on those would make each read start the next one and an idle daemon spin.
pub fn watch_dir(dir: &Path) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.as_ref().map_or(true, is_arrival) {
            let _ = tx.try_send(());
        }
    })
    .context("cannot start inotify watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("{}: cannot watch directory", dir.display()))?;
    Ok((watcher, rx))
}

/// Whether an inotify event can mean a new entry: entries are renamed into the queue
/// directory (a hook on another kernel's filesystem may show up as a plain create); a
/// queue overflow asks for a rescan.
fn is_arrival(event: &notify::Event) -> bool {
    use notify::event::{EventKind, ModifyKind};
    match event.kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_)) => true,
        EventKind::Access(_) | EventKind::Remove(_) | EventKind::Modify(_) => false,
        EventKind::Any | EventKind::Other => event.need_rescan() || event.paths.is_empty(),
    }
}

/// Names what stays queued (a few paths; `narpost status` shows the rest).
pub fn print_remaining(queue: &Queue) {
    const SHOWN: usize = 10;
    let paths: Vec<String> = match queue.entries() {
        Ok(entries) => entries
            .iter()
            .flat_map(|e| e.paths.iter().map(StorePath::to_absolute))
            .collect(),
        Err(e) => {
            eprintln!("narpost: {e}");
            return;
        }
    };
    for p in paths.iter().take(SHOWN) {
        eprintln!("narpost: still queued: {p}");
    }
    if paths.len() > SHOWN {
        eprintln!(
            "narpost: ... and {} more paths still queued",
            paths.len() - SHOWN
        );
    }
}

/// First signal: cancel `stop`. Second: exit at once (the queue is on disk, nothing is lost).
pub fn spawn_signal_handler(stop: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("narpost: stopping: finishing uploads under way (signal again to exit now)");
        stop.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("narpost: exiting now; unfinished paths stay queued");
        std::process::exit(130);
    });
    Ok(())
}

pub async fn run_daemon(cfg: Config, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let _lock = DrainLock::acquire(&cfg.state_dir).await?;
    let mut drainer = Drainer::new(&cfg, metrics)?;
    let (_watcher, wake) = watch_dir(drainer.queue().queue_dir())?;
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone())?;
    // Serves while the daemon drains; stops with the drain (the guard), not at the stop
    // signal: a Nix substituting meanwhile finishes its transfer.
    let serving = CancellationToken::new();
    let _serving = serving.clone().drop_guard();
    if let Some(addr) = cfg.substituter_listen {
        let target = drainer.pipeline().target().clone();
        let claims = match target.list("claims/").await {
            Ok(Some(_)) => {
                let claims = Arc::new(Claims::new(
                    target.clone(),
                    ClaimOptions {
                        machine: cfg.machine.clone(),
                        timeout: cfg.claim_timeout,
                    },
                ));
                let store = drainer.pipeline().store().clone();
                tokio::spawn(
                    claims
                        .clone()
                        .run(store, cfg.state_dir.clone(), serving.clone()),
                );
                drainer.set_claims(claims.clone());
                tracing::info!(
                    "build claims on, as machine {}: a path another machine builds is waited for",
                    cfg.machine
                );
                Some(claims)
            }
            Ok(None) => {
                tracing::info!(
                    "{}: cannot be listed, so no build claims: the substituter only forwards",
                    target.url()
                );
                None
            }
            Err(e) => {
                tracing::warn!("no build claims: {}", e.message);
                None
            }
        };
        crate::substituter::serve(addr, target, claims, cfg.max_log_size, serving.clone()).await?;
    }
    tracing::info!(
        "draining {} into {}",
        drainer.queue().queue_dir().display(),
        drainer.state.cache
    );
    let grace = drainer.drain_timeout();
    let totals = drainer.run(stop, wake, false, grace).await?;
    eprintln!(
        "narpost: pushed {}, {} already cached, {} left queued; {} left to upstream, {}",
        count(totals.pushed, "path", "paths"),
        totals.already_cached,
        count(totals.left as u64, "entry", "entries"),
        totals.left_upstream,
        count(
            totals.logs_uploaded,
            "build log uploaded",
            "build logs uploaded"
        )
    );
    print_remaining(drainer.queue());
    Ok(())
}
