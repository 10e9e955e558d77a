//! Draining the durable queue into the cache: `narpost daemon`, and the upload half of
//! `watch-store` and `watch-exec`.
//!
//! One drainer per state directory, enforced by an exclusive lock on `<state>/drain.lock`,
//! so two processes never upload the same entries. The loop:
//!
//! - reads every queued entry, drops paths that are no longer valid in the store (such an
//!   entry moves to the failed list with its reason), and pushes the union of the rest, with
//!   their closures, through the one pipeline (which skips what the cache has);
//! - acknowledges an entry (deletes it, releases its GC roots) only when every one of its
//!   paths is in the cache; an entry with a permanently failing path (NarHash mismatch) moves
//!   to the failed list; anything transient stays queued;
//! - while the cache is down, waits with capped exponential backoff and jitter, logging one
//!   line when it goes down and one when it is back;
//! - wakes up on inotify events in the queue directory (new entries), or every few seconds.
//!
//! Shutdown: the first SIGTERM/SIGINT stops new work; uploads under way get `drain-timeout`
//! to finish, then are dropped (nothing half-written becomes visible: NARs and narinfos are
//! committed atomically by the targets); what is left stays queued. A second signal exits at
//! once, which loses nothing either, since the queue is on disk.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::format::store_path::StorePath;
use crate::pipeline::{Pipeline, PipelineError, RetryPolicy};
use crate::queue::{GcRoots, Queue};

/// Longest wait between attempts while the cache is down.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Rescan the queue this often even without inotify events.
const POLL: Duration = Duration::from_secs(5);

/// What the drainer publishes for `narpost status`, rewritten atomically after each batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainState {
    pub pid: u32,
    pub started_at: u64,
    pub cache: String,
    pub pushed: u64,
    pub already_cached: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub cache_down_since: Option<u64>,
}

pub const STATE_FILE: &str = "drain-state.json";
pub const LOCK_FILE: &str = "drain.lock";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Holds the state directory's drain lock for the life of the process.
pub struct DrainLock {
    _file: std::fs::File,
}

impl DrainLock {
    pub fn acquire(state_dir: &Path) -> anyhow::Result<DrainLock> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("{}: cannot create state directory", state_dir.display()))?;
        let path = state_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open lock file", path.display()))?;
        match rustix::fs::flock(
            file.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        ) {
            Ok(()) => Ok(DrainLock { _file: file }),
            Err(_) => anyhow::bail!(
                "{}: another narpost daemon or watcher is already draining this queue\nhint: stop it, or give this one its own --state-dir",
                state_dir.display()
            ),
        }
    }

    /// Whether some process holds the lock now (for `status`).
    pub fn is_held(state_dir: &Path) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .open(state_dir.join(LOCK_FILE))
        else {
            return false;
        };
        match rustix::fs::flock(
            file.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockShared,
        ) {
            Ok(()) => false,
            Err(_) => true,
        }
    }
}

/// The drain loop's moving parts.
pub struct Drainer {
    pipeline: Arc<Pipeline>,
    queue: Arc<Queue>,
    roots: Arc<GcRoots>,
    state_dir: PathBuf,
    drain_timeout: Duration,
    state: DrainState,
    /// Set while the cache is unreachable, so the log says so once, not every attempt.
    down: bool,
    backoff: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub pushed: u64,
    pub already_cached: u64,
    pub left: usize,
}

impl Drainer {
    pub fn new(cfg: &Config) -> anyhow::Result<Drainer> {
        // The outer loop retries for as long as it takes; inner retries only smooth over blips.
        let retry = RetryPolicy {
            retries: 2,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(2),
        };
        let pipeline = Arc::new(crate::app::pipeline(cfg, retry)?);
        let queue = Arc::new(Queue::open(&cfg.state_dir)?);
        let roots = Arc::new(GcRoots::new(cfg.gc_roots_dir.clone()));
        let state = DrainState {
            pid: std::process::id(),
            started_at: now(),
            cache: pipeline.target().url(),
            ..Default::default()
        };
        Ok(Drainer {
            pipeline,
            queue,
            roots,
            state_dir: cfg.state_dir.clone(),
            drain_timeout: cfg.drain_timeout,
            state,
            down: false,
            backoff: Duration::from_secs(1),
        })
    }

    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    pub fn roots(&self) -> &Arc<GcRoots> {
        &self.roots
    }

    fn write_state(&self) {
        let path = self.state_dir.join(STATE_FILE);
        let tmp = self.state_dir.join(format!(".{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&self.state).unwrap_or_default())?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!("{}: cannot write status: {e}", path.display());
        }
    }

    fn record_error(&mut self, message: &str) {
        self.state.last_error = Some(message.to_string());
        self.state.last_error_at = Some(now());
    }

    /// One pass over the queue. Returns whether the cache looked down (so the caller waits).
    async fn drain_once(&mut self, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let queue = self.queue.clone();
        let store = self.pipeline.store().clone();
        // Read the queue and check validity off the async threads: both touch the disk.
        let (entries, invalid) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut entries = Vec::new();
            for item in queue.list()? {
                match item {
                    crate::queue::EntryOrCorrupt::Valid(e) => entries.push(e),
                    crate::queue::EntryOrCorrupt::Corrupt {
                        file,
                        reason,
                        quarantined_to,
                    } => {
                        tracing::error!(
                            "queue entry {file}: {reason}; set aside in {}",
                            quarantined_to
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "place (could not move it)".into())
                        );
                    }
                }
            }
            let mut invalid = Vec::new();
            let mut good = Vec::new();
            for e in entries {
                let mut bad = None;
                for p in &e.paths {
                    if !store.is_valid(p)? {
                        bad = Some(p.clone());
                        break;
                    }
                }
                match bad {
                    Some(p) => invalid.push((e, p)),
                    None => good.push(e),
                }
            }
            Ok((good, invalid))
        })
        .await??;

        for (entry, path) in invalid {
            let reason = format!(
                "{}: no longer valid in the store (garbage-collected or deleted before upload)",
                path.to_absolute()
            );
            tracing::warn!("{reason}");
            self.queue.fail(&entry.id, &reason)?;
            self.release(&entry.paths);
        }
        if entries.is_empty() {
            return Ok(false);
        }

        let roots: Vec<StorePath> = entries
            .iter()
            .flat_map(|e| e.paths.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let plan = match self.pipeline.plan(&roots, true).await {
            Ok(p) => p,
            Err(e) => {
                let msg = e.to_string();
                self.record_error(&msg);
                if e.is_retryable() {
                    self.cache_down(&msg);
                    return Ok(true);
                }
                if let PipelineError::Target(_) = e {
                    // Credentials or a refusing cache: keep everything queued and keep trying
                    // slowly; the user sees the error in the log and in `status`.
                    self.cache_down(&msg);
                    return Ok(true);
                }
                return Err(e.into());
            }
        };
        self.cache_up();
        let report = self.pipeline.execute(&plan, cancel).await;
        self.state.pushed += report.pushed.len() as u64;
        self.state.already_cached += report.already_cached as u64;

        let failures: HashMap<&StorePath, &crate::pipeline::PathFailure> =
            report.failed.iter().map(|f| (&f.path, f)).collect();
        // Closure membership decides an entry's fate: a failing dependency blocks it too.
        let index: HashMap<&StorePath, &crate::store::PathInfo> =
            plan.paths.iter().map(|i| (&i.path, i)).collect();
        let mut transient = false;
        for entry in &entries {
            let mut permanent: Option<String> = None;
            let mut pending = false;
            for p in &entry.paths {
                for q in closure_of(&index, p) {
                    if let Some(f) = failures.get(q) {
                        if f.kind.is_permanent() {
                            permanent.get_or_insert_with(|| f.message.clone());
                        } else {
                            pending = true;
                        }
                    } else if report.skipped.contains(q) {
                        pending = true;
                    }
                }
            }
            if let Some(reason) = permanent {
                tracing::error!("{reason}");
                self.queue.fail(&entry.id, &reason)?;
                self.release(&entry.paths);
            } else if pending {
                transient = true;
            } else {
                self.queue.ack(&entry.id)?;
                self.release(&entry.paths);
            }
        }
        if let Some(f) = report.failed.iter().find(|f| !f.kind.is_permanent()) {
            self.record_error(&f.message);
            if !cancel.is_cancelled() {
                self.cache_down(&f.message);
            }
        }
        self.write_state();
        Ok(transient && !cancel.is_cancelled())
    }

    fn release(&self, paths: &[StorePath]) {
        for p in paths {
            // Releasing is best effort and reports its own problems.
            let _ = self.roots.release(p);
        }
    }

    fn cache_down(&mut self, msg: &str) {
        if !self.down {
            tracing::warn!(
                "cache {} unavailable: {msg}; everything stays queued, retrying for as long as it takes",
                self.state.cache
            );
            self.down = true;
            self.state.cache_down_since = Some(now());
            self.backoff = Duration::from_secs(1);
        } else {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        self.write_state();
    }

    fn cache_up(&mut self) {
        if self.down {
            tracing::info!("cache {} is back; draining the queue", self.state.cache);
            self.down = false;
            self.state.cache_down_since = None;
            self.backoff = Duration::from_secs(1);
            self.write_state();
        }
    }

    fn jittered_backoff(&self) -> Duration {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Up to a quarter more, so a fleet coming back does not probe in lockstep.
        let extra = self.backoff.as_millis() as u64 / 4 * (nanos as u64 % 1000) / 1000;
        self.backoff + Duration::from_millis(extra)
    }

    /// Drains until `stop` fires (daemon, watch-store) or, with `until_empty`, until the
    /// queue is empty (watch-exec). Uploads under way when `stop` fires get the drain
    /// timeout to finish.
    pub async fn run(
        &mut self,
        stop: CancellationToken,
        mut wake: mpsc::Receiver<()>,
        until_empty: bool,
    ) -> anyhow::Result<Totals> {
        self.write_state();
        loop {
            if stop.is_cancelled() {
                break;
            }
            // In-flight work may outlive `stop` only by the drain timeout.
            let inner = stop.child_token();
            let deadline = {
                let stop = stop.clone();
                let inner = inner.clone();
                let timeout = self.drain_timeout;
                async move {
                    stop.cancelled().await;
                    inner.cancel();
                    tokio::time::sleep(timeout).await;
                }
            };
            let wait = tokio::select! {
                r = self.drain_once(&inner) => r?,
                _ = deadline => {
                    tracing::warn!("drain timeout reached; uploads under way were stopped and stay queued");
                    break;
                }
            };
            if until_empty && self.queue.depth()? == 0 {
                break;
            }
            let delay = if wait { self.jittered_backoff() } else { POLL };
            let waited = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => true,
                w = wake.recv(), if !wait => w.is_some(),
            };
            let _ = waited;
            // Coalesce a burst of wake-ups into one pass.
            while wake.try_recv().is_ok() {}
        }
        self.write_state();
        Ok(Totals {
            pushed: self.state.pushed,
            already_cached: self.state.already_cached,
            left: self.queue.depth().unwrap_or(0),
        })
    }
}

/// `root` and everything it refers to, directly or not, within the plan.
fn closure_of<'a>(
    index: &HashMap<&'a StorePath, &'a crate::store::PathInfo>,
    root: &'a StorePath,
) -> Vec<&'a StorePath> {
    let mut out = vec![root];
    let mut seen: BTreeSet<&StorePath> = BTreeSet::from([root]);
    let mut i = 0;
    while i < out.len() {
        if let Some(info) = index.get(out[i]) {
            for r in &info.references {
                if seen.insert(r) {
                    out.push(r);
                }
            }
        }
        i += 1;
    }
    out
}

/// Sends a wake-up whenever something changes in `dir` (new queue entries).
pub fn watch_dir(dir: &Path) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .context("cannot start inotify watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("{}: cannot watch directory", dir.display()))?;
    Ok((watcher, rx))
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

pub async fn run_daemon(cfg: Config) -> anyhow::Result<()> {
    let _lock = DrainLock::acquire(&cfg.state_dir)?;
    let mut drainer = Drainer::new(&cfg)?;
    let (_watcher, wake) = watch_dir(drainer.queue().queue_dir())?;
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone())?;
    tracing::info!(
        "draining {} into {}",
        drainer.queue().queue_dir().display(),
        drainer.state.cache
    );
    let totals = drainer.run(stop, wake, false).await?;
    eprintln!(
        "narpost: pushed {} paths, {} already cached, {} entries left queued",
        totals.pushed, totals.already_cached, totals.left
    );
    Ok(())
}
