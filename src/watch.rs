//! Noticing store paths that become valid: `watch-store` (CI sidecar) and `watch-exec`.
//!
//! A filesystem event alone proves nothing: Nix creates an output directory long before it
//! registers the path as valid, and removes `<path>.lock` after registering it. So every
//! event under the store directory only names a *candidate*, and a candidate is queued once
//! the store database says it is valid. Two nets catch what events miss:
//!
//! - inotify can overflow under bursts (`IN_Q_OVERFLOW`, seen by `notify` as a rescan flag);
//! - a candidate may still be building when its event arrives.
//!
//! Both are covered by rescanning the database for paths registered since the last one seen
//! (`registrationTime`), on overflow, every few seconds, and once more when watching stops.
//! Paths valid before the watcher started are recorded at start and never pushed (unless
//! `--all`). A path is seen per registration: one deleted and built again while the watcher
//! runs is new again.
//!
//! Found paths go through the durable queue, so a watcher killed with SIGKILL and started
//! again still uploads what it had seen. Stopping (SIGTERM for `watch-store`, the command's
//! exit for `watch-exec`) queues what was found last and then drains the queue until it is
//! empty or the drain timeout passes; whatever is left stays queued for the next drainer.
//!
//! Builds that fail leave no path to push but a log worth reading: [`crate::failed_builds`]
//! uploads those while the watchers run, and decides what is left when they stop.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use notify::Watcher;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::{DrainLock, Drainer, Totals, watch_dir};
use crate::format::store_path::{STORE_DIR, StorePath};
use crate::metrics::Metrics;
use crate::progress::count;
use crate::queue::{GcRoots, Queue};
use crate::store::Store;

#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    pub all: bool,
    pub include_drv: bool,
}

/// How often the database is rescanned while inotify works.
const RESCAN: Duration = Duration::from_secs(3);
/// Without inotify the database is the only source, so it is polled more often.
const POLL_ONLY: Duration = Duration::from_secs(1);
/// Rescans reach back this many seconds before the newest registration time seen: Nix reads
/// the clock before its transaction commits, so a row can become visible after a row with a
/// later time. Re-reading a few seconds of rows costs only set lookups.
const RESCAN_OVERLAP: i64 = 2;
/// Paths per queue entry for `--all`. The drainer gives up on an entry whole when one path in
/// its closure cannot be uploaded (vanished from the store, corrupt), so paths found while
/// watching get an entry each; the store's whole contents are grouped to keep the queue short.
const ALL_ENTRY_PATHS: usize = 32;

/// Tracks which valid paths have been seen, and queues new ones.
struct Finder {
    store: Arc<Store>,
    queue: Arc<Queue>,
    roots: Arc<GcRoots>,
    include_drv: bool,
    /// Paths seen, with the registration time they had then: a path deleted and built
    /// again is registered anew, with a later time, and is then new again (if the first
    /// copy was deleted before its upload, the second one is what reaches the cache).
    seen: HashMap<StorePath, i64>,
    /// Registration time (seconds) of the newest path seen; rescans start there.
    since: i64,
    /// A roots directory that cannot be written fails for every path: say so once.
    roots_warned: bool,
}

impl Finder {
    fn new(
        store: Arc<Store>,
        queue: Arc<Queue>,
        roots: Arc<GcRoots>,
        opts: WatchOptions,
    ) -> anyhow::Result<Finder> {
        let existing = store.registered_since(0)?;
        let since = existing.iter().map(|(_, t)| *t).max().unwrap_or(0);
        let mut f = Finder {
            store,
            queue,
            roots,
            include_drv: opts.include_drv,
            seen: HashMap::new(),
            since,
            roots_warned: false,
        };
        if opts.all {
            f.enqueue(existing, ALL_ENTRY_PATHS)?;
        } else {
            f.seen = existing.into_iter().collect();
        }
        Ok(f)
    }

    fn wanted(&self, p: &StorePath) -> bool {
        self.include_drv || !p.is_derivation()
    }

    /// Whether `path`, registered at `time`, has not been seen in this registration.
    fn is_new(&self, path: &StorePath, time: i64) -> bool {
        self.seen.get(path).is_none_or(|&seen| seen < time)
    }

    /// Queues the wanted paths (with their registration times) not seen before in that
    /// registration, in the order given. A path counts as seen only once its queue entry is
    /// on disk, so a failure here leaves it to the next event or rescan.
    fn enqueue(&mut self, paths: Vec<(StorePath, i64)>, per_entry: usize) -> anyhow::Result<usize> {
        let mut fresh = HashSet::new();
        let new: Vec<(StorePath, i64)> = paths
            .into_iter()
            .filter(|(p, t)| self.wanted(p) && self.is_new(p, *t) && fresh.insert(p.clone()))
            .collect();
        let mut queued = 0;
        for chunk in new.chunks(per_entry.max(1)) {
            let paths: Vec<StorePath> = chunk.iter().map(|(p, _)| p.clone()).collect();
            // Root first, then confirm validity: a path still valid once its root exists
            // cannot be collected before it is uploaded. Rooting is best effort: a path we
            // cannot protect is still worth queueing.
            if let Err(e) = self.roots.protect_all(&paths)
                && !self.roots_warned
            {
                tracing::warn!(
                    "{e}; paths waiting for upload are not protected from garbage collection (set gc-roots-dir to a writable directory under /nix/var/nix/gcroots)"
                );
                self.roots_warned = true;
            }
            let valid = match self.still_valid(&paths) {
                Ok(v) => v,
                Err(e) => {
                    self.release(&paths);
                    return Err(e);
                }
            };
            let gone: Vec<StorePath> = paths
                .iter()
                .filter(|p| !valid.contains(p))
                .cloned()
                .collect();
            self.release(&gone);
            if valid.is_empty() {
                continue;
            }
            if let Err(e) = self.queue.enqueue(&valid, None) {
                self.release(&valid);
                return Err(e.into());
            }
            queued += valid.len();
            self.seen.extend(
                chunk
                    .iter()
                    .filter(|(p, _)| valid.contains(p))
                    .map(|(p, t)| (p.clone(), *t)),
            );
        }
        if queued > 0 {
            tracing::debug!("queued {}", count(queued as u64, "new path", "new paths"));
        }
        Ok(queued)
    }

    fn still_valid(&self, paths: &[StorePath]) -> anyhow::Result<Vec<StorePath>> {
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            if self.store.is_valid(p)? {
                out.push(p.clone());
            }
        }
        Ok(out)
    }

    fn release(&self, paths: &[StorePath]) {
        for p in paths {
            self.roots.release(p);
        }
    }

    /// Candidates from filesystem events: queue those that are valid now.
    fn check(&mut self, names: HashSet<String>) -> anyhow::Result<usize> {
        let mut valid = Vec::new();
        for name in names {
            let base = name.strip_suffix(".lock").unwrap_or(&name);
            let Ok(p) = StorePath::from_base(base) else {
                continue;
            };
            // A path seen before is left to the rescan, which knows whether it was
            // registered again.
            if self.seen.contains_key(&p) || !self.wanted(&p) {
                continue;
            }
            match self.store.query(std::slice::from_ref(&p)) {
                Ok(infos) => valid.extend(infos.into_iter().map(|i| (i.path, i.registration_time))),
                Err(crate::store::StoreError::NotValid { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.enqueue(valid, 1)
    }

    /// Everything registered since (shortly before) the newest path seen.
    fn rescan(&mut self) -> anyhow::Result<usize> {
        let rows = self
            .store
            .registered_since(self.since.saturating_sub(RESCAN_OVERLAP))?;
        let newest = rows.iter().map(|(_, t)| *t).max();
        let n = self.enqueue(rows, 1)?;
        // Only after everything was queued: a failed rescan is repeated from the same point.
        if let Some(t) = newest {
            self.since = self.since.max(t);
        }
        Ok(n)
    }
}

enum Job {
    Rescan,
    Check(HashSet<String>),
}

async fn run_job(finder: &Arc<Mutex<Finder>>, job: Job) -> anyhow::Result<usize> {
    let finder = finder.clone();
    tokio::task::spawn_blocking(move || {
        let mut f = finder.lock().unwrap_or_else(|e| e.into_inner());
        match job {
            Job::Rescan => f.rescan(),
            Job::Check(names) => f.check(names),
        }
    })
    .await
    .context("store watcher task failed")?
}

/// Store-directory events, as candidate names; `None` means events were lost (rescan).
fn store_events(
    tx: mpsc::UnboundedSender<Option<String>>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) => {
                if ev.need_rescan() {
                    let _ = tx.send(None);
                }
                // Reading the store (narpost's own NAR serialization among others) reports
                // an open per path; only writes can make a path new.
                use notify::event::{AccessKind, AccessMode, EventKind};
                if matches!(ev.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write)) {
                    return;
                }
                for p in ev.paths {
                    if let Some(name) = p.file_name() {
                        let _ = tx.send(Some(name.to_string_lossy().into_owned()));
                    }
                }
            }
            // An error from the watcher means events may be lost.
            Err(_) => {
                let _ = tx.send(None);
            }
        }
    })
    .context("cannot start inotify watcher")?;
    watcher
        .watch(Path::new(STORE_DIR), notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("{STORE_DIR}: cannot watch the store"))?;
    Ok(watcher)
}

/// Watches the store and feeds the queue until `stop` fires; a last rescan runs then, so
/// whatever was registered up to that moment is queued before the caller drains. Errors
/// while watching are logged and retried (nothing is marked seen until it is queued); only
/// a failure of the last rescan is returned.
async fn find_loop(finder: Arc<Mutex<Finder>>, stop: CancellationToken) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<String>>();
    let (watcher, period) = match store_events(tx) {
        Ok(w) => (Some(w), RESCAN),
        Err(e) => {
            tracing::warn!(
                "{e:#}; finding new paths by reading the store database every {}s instead",
                POLL_ONLY.as_secs()
            );
            (None, POLL_ONLY)
        }
    };
    let mut events = watcher.is_some();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let jobs = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => vec![Job::Rescan],
            first = rx.recv(), if events => {
                let Some(first) = first else {
                    events = false;
                    continue;
                };
                let mut names = HashSet::new();
                let mut rescan = first.is_none();
                names.extend(first);
                // Take a burst at once: one database transaction's worth of paths tends to
                // arrive as many events within milliseconds.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while let Ok(n) = rx.try_recv() {
                    match n {
                        Some(n) => {
                            names.insert(n);
                        }
                        None => rescan = true,
                    }
                }
                let mut jobs = Vec::new();
                if rescan {
                    tracing::debug!("store events were lost; rescanning the store database");
                    jobs.push(Job::Rescan);
                }
                jobs.push(Job::Check(names));
                jobs
            }
        };
        for job in jobs {
            match run_job(&finder, job).await {
                Ok(_) if failing => {
                    tracing::info!("reading the store database works again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    tracing::warn!(
                        "{e:#}; new paths are picked up at the next rescan once this works"
                    );
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
    run_job(&finder, Job::Rescan)
        .await
        .map(|_| ())
        .context("last rescan of the store database failed; recently built paths may not be queued")
}

async fn setup(
    cfg: &Config,
    opts: WatchOptions,
    lock: DrainLock,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(DrainLock, Drainer, Arc<Mutex<Finder>>)> {
    let drainer = Drainer::new(cfg, metrics)?;
    let store = Arc::new(Store::open_default()?);
    let queue = drainer.queue().clone();
    let roots = drainer.roots().clone();
    let finder = tokio::task::spawn_blocking(move || Finder::new(store, queue, roots, opts))
        .await
        .context("watcher start-up failed")??;
    Ok((lock, drainer, Arc::new(Mutex::new(finder))))
}

/// SIGTERM and SIGINT, as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn recv(&mut self) -> rustix::process::Signal {
        tokio::select! {
            _ = self.term.recv() => rustix::process::Signal::TERM,
            _ = self.int.recv() => rustix::process::Signal::INT,
        }
    }

    /// From now on a signal exits at once with `code`: the queue is on disk, so nothing is
    /// lost, and `first` (if given) is cancelled by the first signal instead.
    fn exit_on_next(mut self, first: Option<CancellationToken>, code: i32, queue_dir: String) {
        tokio::spawn(async move {
            if let Some(first) = first {
                self.recv().await;
                eprintln!("narpost: stopping uploads (signal again to exit now)");
                first.cancel();
            }
            self.recv().await;
            eprintln!("narpost: exiting now; paths not yet uploaded stay queued in {queue_dir}");
            std::process::exit(code);
        });
    }
}

/// Stops the finder (which queues what was registered last) and drains the queue until it is
/// empty or `deadline` passes. A signal cuts this short through `stop`.
async fn finish(
    drainer: &mut Drainer,
    find_stop: CancellationToken,
    finding: JoinHandle<anyhow::Result<()>>,
    stop: CancellationToken,
    deadline: Instant,
) -> Option<Totals> {
    find_stop.cancel();
    match finding.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("narpost: {e:#}"),
        Err(e) => eprintln!("narpost: store watcher task failed: {e}"),
    }
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            stop.cancel();
        })
    };
    // Nothing new is queued any more, so there is nothing to wake the drainer for.
    let (_tx, rx) = mpsc::channel(1);
    // `stop` fires at the deadline, which already includes the time for uploads under way.
    let totals = match drainer.run(stop, rx, true, Duration::ZERO).await {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("narpost: {e:#}");
            None
        }
    };
    timer.abort();
    totals
}

/// Prints "pushed N paths, M already cached, K left queued" and, when something was not
/// uploaded, why and where it stays.
fn print_summary(
    cfg: &Config,
    queue: &Queue,
    totals: Option<Totals>,
    failed_before: usize,
    failed_build_logs: u64,
) {
    // Like `status`: never through a link, never more than a status file's worth.
    let state = crate::drain_state::read(&cfg.state_dir);
    let (pushed, already_cached, upstream, logs) = match (totals, &state) {
        (Some(t), _) => (t.pushed, t.already_cached, t.left_upstream, t.logs_uploaded),
        (None, Some(s)) => (s.pushed, s.already_cached, s.left_upstream, s.logs_uploaded),
        (None, None) => (0, 0, 0, 0),
    };
    let logs = logs + failed_build_logs;
    let left = queue
        .depth()
        .unwrap_or_else(|_| totals.map_or(0, |t| t.left));
    eprintln!(
        "narpost: pushed {}, {already_cached} already cached, {left} left queued; {upstream} left to upstream, {}",
        count(pushed, "path", "paths"),
        count(logs, "build log uploaded", "build logs uploaded")
    );
    let failed = queue
        .failed()
        .map(|f| f.len().saturating_sub(failed_before))
        .unwrap_or(0);
    if left == 0 && failed == 0 {
        return;
    }
    if let Some(e) = state.and_then(|s| s.last_error) {
        eprintln!("narpost: upload failed: {e}");
    }
    if left > 0 {
        eprintln!(
            "narpost: {} not uploaded; {} in {} for the next `narpost daemon` or watcher with this state directory",
            count(left as u64, "queue entry was", "queue entries were"),
            if left == 1 { "it stays" } else { "they stay" },
            queue.queue_dir().display()
        );
    }
    if failed > 0 {
        eprintln!(
            "narpost: {} and will not be retried; `narpost status` shows why",
            count(failed as u64, "queue entry failed", "queue entries failed")
        );
    }
}

/// Starts uploading the logs of builds that fail while watching, where the cache takes logs.
fn watch_failed_builds(
    cfg: &Config,
    drainer: &Drainer,
    stop: CancellationToken,
) -> Option<JoinHandle<u64>> {
    let pipeline = drainer.pipeline();
    if !cfg.upload_logs || !pipeline.target().stores_logs() {
        return None;
    }
    let store = pipeline.store().clone();
    match crate::failed_builds::spawn(pipeline.clone(), store, crate::buildlog::log_dir(), stop) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("{e:#}; logs of failed builds are not uploaded");
            None
        }
    }
}

/// Stops the failed-build log watcher (it decides what is left first) and counts its
/// uploads; the drain deadline bounds it as it bounds the uploads of paths.
async fn failed_build_logs(
    stop: CancellationToken,
    handle: Option<JoinHandle<u64>>,
    deadline: Instant,
) -> u64 {
    stop.cancel();
    let Some(mut h) = handle else { return 0 };
    match tokio::time::timeout_at(deadline, &mut h).await {
        Ok(n) => n.unwrap_or(0),
        Err(_) => {
            h.abort();
            eprintln!(
                "narpost: drain timeout reached; logs of failed builds not uploaded by then are left out"
            );
            0
        }
    }
}

fn failed_count(queue: &Queue) -> usize {
    queue.failed().map(|f| f.len()).unwrap_or(0)
}

pub async fn watch_store(
    cfg: Config,
    opts: WatchOptions,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let lock = DrainLock::acquire(&cfg.state_dir).await?;
    let (_lock, mut drainer, finder) = setup(&cfg, opts, lock, metrics).await?;
    let failed_before = failed_count(drainer.queue());
    let find_stop = CancellationToken::new();
    let finding = tokio::spawn(find_loop(finder, find_stop.clone()));
    let (_qwatch, wake) = watch_dir(drainer.queue().queue_dir())?;
    let logs_stop = CancellationToken::new();
    let logs = watch_failed_builds(&cfg, &drainer, logs_stop.clone());
    // Said only once the store's contents at start are recorded: anything registered from
    // now on is pushed.
    eprintln!(
        "narpost: watching {STORE_DIR}; pushing new paths to {}",
        cfg.cache
    );

    let queue_dir = drainer.queue().queue_dir().display().to_string();
    let live_stop = CancellationToken::new();
    let deadline = {
        let grace = drainer.drain_timeout();
        let live = drainer.run(live_stop.clone(), wake, false, grace);
        tokio::pin!(live);
        let ended = tokio::select! {
            _ = signals.recv() => None,
            // The drain loop only ends by itself on an error.
            r = &mut live => Some(r),
        };
        if let Some(r) = ended {
            // Stop watching; what was found is in the durable queue for the next drainer.
            find_stop.cancel();
            let _ = finding.await;
            r?;
            anyhow::bail!("the drain loop ended unexpectedly");
        }
        // One deadline from the signal on, covering uploads under way and what is queued.
        let deadline = Instant::now() + cfg.drain_timeout;
        eprintln!(
            "narpost: stopping: pushing what is queued (up to {}s; signal again to exit now)",
            cfg.drain_timeout.as_secs()
        );
        signals.exit_on_next(None, 130, queue_dir);
        live_stop.cancel();
        if let Err(e) = live.await {
            eprintln!("narpost: {e:#}");
        }
        deadline
    };
    let stop = CancellationToken::new();
    logs_stop.cancel();
    let totals = finish(&mut drainer, find_stop, finding, stop, deadline).await;
    let failed_logs = failed_build_logs(logs_stop, logs, deadline).await;
    print_summary(&cfg, drainer.queue(), totals, failed_before, failed_logs);
    Ok(())
}

/// `watch-exec` on a machine whose daemon already drains this state directory (one wired
/// by `narpost setup`, a CI job run as root): the command runs as always, what it builds
/// is queued as always, and the daemon uploads it, with its own settings and deadline,
/// rather than this process refusing to run the command.
async fn beside_daemon(
    cfg: &Config,
    opts: WatchOptions,
    program: &str,
    args: &[String],
    mut signals: Signals,
) -> anyhow::Result<u8> {
    let queue = Arc::new(Queue::open(&cfg.state_dir).context("the command was not run")?);
    let roots = Arc::new(GcRoots::new(cfg.gc_roots_dir.clone()));
    roots.check().context("the command was not run")?;
    let store = Arc::new(Store::open_default().context("the command was not run")?);
    let finder = {
        let queue = queue.clone();
        tokio::task::spawn_blocking(move || Finder::new(store, queue, roots, opts))
            .await
            .context("watcher start-up failed")??
    };
    eprintln!(
        "narpost: a narpost daemon already drains {}; what this command builds is queued for it to upload",
        queue.queue_dir().display()
    );
    let find_stop = CancellationToken::new();
    let finding = tokio::spawn(find_loop(Arc::new(Mutex::new(finder)), find_stop.clone()));
    let mut child = match crate::priority::spawn_command(program, args).await {
        Ok(c) => c,
        Err(e) => {
            find_stop.cancel();
            let _ = finding.await;
            eprintln!("narpost: {program}: cannot run command: {e}");
            return Ok(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            sig = signals.recv() => child.signal(sig).await,
        }
    };
    // The last scan queues what the command registered up to its exit.
    find_stop.cancel();
    match finding.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("narpost: {e:#}"),
        Err(e) => eprintln!("narpost: the store watcher failed: {e}"),
    }
    let code = match status {
        Ok(s) => exit_code(s),
        Err(e) => {
            eprintln!("narpost: {program}: cannot wait for command: {e}");
            1
        }
    };
    eprintln!(
        "narpost: {} queued for the daemon",
        count(queue.depth().unwrap_or(0) as u64, "entry", "entries")
    );
    Ok(code)
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match status.code() {
        Some(c) => c.clamp(0, 255) as u8,
        None => 128u8.saturating_add(status.signal().unwrap_or(0).clamp(0, 127) as u8),
    }
}

/// Runs `command`, pushes what it built, and returns its exit code (128 + signal when it
/// was killed), whatever happened to the uploads. Only when the command cannot be started
/// at all (narpost's own set-up failed, or the program cannot be run) is an error returned.
pub async fn watch_exec(
    cfg: Config,
    opts: WatchOptions,
    command: Vec<String>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<u8> {
    let (program, args) = command
        .split_first()
        .context("watch-exec needs a command after --")?;
    let mut signals = Signals::new()?;
    let Some(lock) = DrainLock::try_acquire(&cfg.state_dir)
        .await
        .context("cannot watch the store; the command was not run")?
    else {
        return beside_daemon(&cfg, opts, program, args, signals).await;
    };
    let (_lock, mut drainer, finder) = setup(&cfg, opts, lock, metrics)
        .await
        .context("cannot watch the store; the command was not run")?;
    let failed_before = failed_count(drainer.queue());
    let find_stop = CancellationToken::new();
    let finding = tokio::spawn(find_loop(finder, find_stop.clone()));
    let (_qwatch, wake) = watch_dir(drainer.queue().queue_dir())?;
    let logs_stop = CancellationToken::new();
    let logs = watch_failed_builds(&cfg, &drainer, logs_stop.clone());

    let mut child = match crate::priority::spawn_command(program, args).await {
        Ok(c) => c,
        Err(e) => {
            find_stop.cancel();
            let _ = finding.await;
            // The shell's codes, so CI reads it as the command's failure.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            eprintln!("narpost: {program}: cannot run command: {e}");
            logs_stop.cancel();
            return Ok(code);
        }
    };

    // Upload while the command runs, so a build that fails late still leaves its finished
    // dependencies cached.
    let live_stop = CancellationToken::new();
    let (status, deadline) = {
        let grace = drainer.drain_timeout();
        let live = drainer.run(live_stop.clone(), wake, false, grace);
        tokio::pin!(live);
        let mut live_done = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                // The command decides how to stop; its exit code is the one returned.
                sig = signals.recv() => child.signal(sig).await,
                r = &mut live, if !live_done => {
                    live_done = true;
                    if let Err(e) = r {
                        eprintln!("narpost: uploads stopped: {e:#}; trying again when the command exits");
                    }
                }
            }
        };
        // One deadline from the command's exit on, covering uploads under way and what is
        // still queued.
        let deadline = Instant::now() + cfg.drain_timeout;
        // The caller now waits for the uploads, which are bounded by that deadline.
        let _ = tokio::task::spawn_blocking(crate::priority::restore).await;
        live_stop.cancel();
        if !live_done && let Err(e) = live.await {
            eprintln!("narpost: {e:#}");
        }
        (status, deadline)
    };
    let code = match status {
        Ok(s) => exit_code(s),
        Err(e) => {
            eprintln!("narpost: {program}: cannot wait for command: {e}");
            1
        }
    };

    // The command is done: one last scan, then drain what is queued, bounded by the timeout.
    let stop = CancellationToken::new();
    signals.exit_on_next(
        Some(stop.clone()),
        i32::from(code),
        drainer.queue().queue_dir().display().to_string(),
    );
    // The command's builds are over: what is left of the log watcher is decided now.
    logs_stop.cancel();
    let totals = finish(&mut drainer, find_stop, finding, stop, deadline).await;
    let failed_logs = failed_build_logs(logs_stop, logs, deadline).await;
    print_summary(&cfg, drainer.queue(), totals, failed_before, failed_logs);
    Ok(code)
}
