//! The drain loop (see the [module doc](super)): reads of the queue that start runs (see
//! `session`), backoff while uploads fail, and shutdown.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::entries::{Held, Loaded, load};
use super::session::{RunDone, Session, Settled};
use super::{DrainState, SPOOL_DIR, STATE_FILE, now};
use crate::claims::Claims;
use crate::config::Config;
use crate::format::store_path::StorePath;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineError, Plan, Report, RetryPolicy};
use crate::private_dir::PrivateDir;
use crate::progress::count;
use crate::queue::{Entry, EntryId, GcRoots, Queue};

/// Longest wait between attempts while the cache is down.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Rescan the queue this often even without inotify events.
const POLL: Duration = Duration::from_secs(5);

/// Look for orphaned GC roots this often after start-up.
const ADOPT_EVERY: Duration = Duration::from_secs(300);

/// A hook writes its entry milliseconds after its roots; a root this old without an entry
/// is an orphan.
const ADOPT_GRACE: Duration = Duration::from_secs(60);

/// The drain loop's moving parts.
pub struct Drainer {
    pipeline: Arc<Pipeline>,
    queue: Arc<Queue>,
    roots: Arc<GcRoots>,
    state_dir: PathBuf,
    drain_timeout: Duration,
    pub(super) state: DrainState,
    /// Set while the cache is unreachable, so the log says so once, not every attempt.
    down: bool,
    /// Problems of the drainer's own under way (see [`Drainer::problem`]).
    failing: BTreeSet<&'static str>,
    backoff: Duration,
    /// When to look for orphaned GC roots next; `None` before the first read.
    next_adoption: Option<Instant>,
    /// Entries whose roots this drainer has made durable (see [`make_roots_durable`]).
    rooted: HashSet<EntryId>,
    metrics: Arc<Metrics>,
    /// This machine's build claims, released as their paths reach the cache.
    claims: Option<Arc<Claims>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub pushed: u64,
    pub already_cached: u64,
    pub left_upstream: u64,
    pub logs_uploaded: u64,
    pub left: usize,
}

impl Drainer {
    /// The caller must hold the state directory's [`DrainLock`](super::DrainLock): a drainer
    /// takes over what a killed predecessor left behind (its spooled NARs are removed here).
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Drainer> {
        // The outer loop retries for as long as it takes; inner retries only smooth over blips.
        let retry = RetryPolicy {
            retries: 2,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(2),
            total: None,
        };
        // Checked before it is emptied: clearing a directory someone else had swapped for a
        // link would delete their choice of files.
        let spool = PrivateDir::open(&cfg.state_dir)?
            .subdir(SPOOL_DIR)?
            .path()
            .to_path_buf();
        clear_dir(&spool);
        let pipeline = Arc::new(
            crate::app::pipeline_spooling_in(cfg, retry, spool)?.with_events(metrics.events()),
        );
        let queue = Arc::new(Queue::open(&cfg.state_dir)?);
        let roots = Arc::new(GcRoots::new(cfg.gc_roots_dir.clone()));
        // Roots planted there would be adopted and uploaded: refuse a directory others control.
        roots.check()?;
        // The pipeline loaded (or generated) the key already; this only reads it again.
        let public_key = crate::app::signing_key(cfg, pipeline.target().signs_itself())
            .ok()
            .flatten()
            .map(|k| k.public().to_nix_string());
        let state = DrainState {
            pid: std::process::id(),
            started_at: now(),
            cache: pipeline.target().url(),
            public_key,
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
            failing: BTreeSet::new(),
            backoff: Duration::from_secs(1),
            next_adoption: None,
            rooted: HashSet::new(),
            metrics,
            claims: None,
        })
    }

    /// Ends this machine's claim on each path once the path is in the cache.
    pub fn set_claims(&mut self, claims: Arc<Claims>) {
        self.claims = Some(claims);
    }

    /// How long uploads under way may go on after a stop signal.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    pub fn roots(&self) -> &Arc<GcRoots> {
        &self.roots
    }

    /// Publishes the state for `status` (see [`crate::drain_state`]).
    fn write_state(&mut self) {
        let path = self.state_dir.join(STATE_FILE);
        let result = crate::drain_state::write(&self.state_dir, &self.state);
        match result {
            Ok(()) => self.resolved("state", "the status file is written again"),
            Err(e) => {
                self.problem(
                    "state",
                    &format!("{}: cannot write status: {e}", path.display()),
                );
            }
        }
    }

    /// Logs a problem of the drainer's own when it starts, not on every attempt while it
    /// lasts (the attempts go to the debug log). Returns whether it is new.
    fn problem(&mut self, what: &'static str, msg: &str) -> bool {
        if self.failing.insert(what) {
            tracing::error!("{msg}");
            true
        } else {
            tracing::debug!("{msg}");
            false
        }
    }

    /// Ends a problem [`Drainer::problem`] reported, with one line saying so.
    fn resolved(&mut self, what: &'static str, note: &str) {
        if self.failing.remove(what) {
            tracing::info!("{note}");
        }
    }

    fn record_error(&mut self, message: &str) {
        // What a cache answered may hold terminal escapes; `status` prints this.
        self.state.last_error = Some(crate::text::printable(message));
        self.state.last_error_at = Some(now());
    }

    /// Reads the entries no run holds and, if there are any, adds a run for them to the
    /// session. Returns whether to wait before the next read (the cache looked down).
    async fn start_run(
        &mut self,
        session: &mut Session,
        cancel: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let queue = self.queue.clone();
        let roots = self.roots.clone();
        let store = self.pipeline.store().clone();
        let adopt_before = match self.next_adoption {
            None => Some(SystemTime::now()),
            Some(at) if Instant::now() >= at => Some(SystemTime::now() - ADOPT_GRACE),
            Some(_) => None,
        };
        let rooted = std::mem::take(&mut self.rooted);
        let held = Held {
            ids: session.held_ids(),
            paths: session.held_paths(),
        };
        // Read the queue and check validity off the async threads: both touch the disk.
        let loaded = tokio::task::spawn_blocking(move || {
            load(&queue, &roots, &store, adopt_before, rooted, &held)
        })
        .await??;
        let entries = self.take_loaded(loaded)?;
        if !entries.is_empty() {
            session.add(self.pipeline.clone(), entries, cancel.clone());
            return Ok(false);
        }
        // Nothing to upload says nothing about the cache: while it counts as down and no
        // run would tell, ask it directly, so `status` does not go on saying "down" over an
        // empty queue.
        if !self.down || !session.is_empty() {
            return Ok(false);
        }
        match self.pipeline.target().open().await {
            Ok(()) => {
                self.cache_up();
                Ok(false)
            }
            Err(e) => {
                let msg = e.to_string();
                self.record_error(&msg);
                self.cache_down(&msg);
                Ok(true)
            }
        }
    }

    /// Books a run that ended: its entries are acknowledged, failed or left queued. Returns
    /// whether to wait before the next read (something stays queued for a transient cause).
    fn finish_run(&mut self, done: RunDone, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let (plan, report) = match done.upload {
            Ok(upload) => upload,
            Err(e) => {
                // Its entries stay queued, for the next read after the backoff.
                let msg = e.to_string();
                self.record_error(&msg);
                if let PipelineError::Target(t) = &e {
                    if !e.is_retryable() {
                        // Credentials or a refusing cache: keep everything queued and keep
                        // trying slowly; the user sees the error in the log and in `status`.
                        self.state.needs_attention = Some(with_hint(&msg, t.hint.as_deref()));
                    }
                } else if !e.is_retryable() {
                    return Err(e.into());
                }
                self.cache_down(&msg);
                return Ok(true);
            }
        };
        let settled = self.settle(&done.entries, &plan, &report)?;
        if let Some(claims) = &self.claims {
            for info in plan.paths.iter().filter(|i| report.is_done(&i.path)) {
                claims.release(info.path.hash_part());
            }
        }
        // Back to normal only when a whole run went through: a cache that answers the
        // planning queries but fails uploads, or a full spool disk, is still "down".
        if settled.attention.is_some() || settled.failure.is_none() {
            self.state.needs_attention = settled.attention;
        }
        match settled.failure {
            Some(msg) => {
                self.record_error(&msg);
                if !cancel.is_cancelled() {
                    self.cache_down(&msg);
                }
            }
            None if !cancel.is_cancelled() => self.cache_up(),
            None => {}
        }
        self.write_state();
        Ok(settled.transient && !cancel.is_cancelled())
    }

    /// Logs what reading the queue found (roots, adoption), fails the entries whose paths are
    /// gone from the store, and returns the rest, to upload.
    fn take_loaded(&mut self, loaded: Loaded) -> anyhow::Result<Vec<Entry>> {
        self.rooted.extend(loaded.rooted);
        match loaded.rooting {
            Ok(()) => self.resolved("roots", "GC roots can be written again"),
            Err(msg) => {
                // Tried again next read; said once.
                if self.problem(
                    "roots",
                    &format!("{msg}; queued paths may not be protected from garbage collection"),
                ) {
                    self.record_error(&msg);
                }
            }
        }
        match loaded.adopted {
            Some(Ok(())) => {
                self.resolved("adopt", "orphaned GC roots are queued again");
                self.next_adoption = Some(Instant::now() + ADOPT_EVERY);
            }
            Some(Err(msg)) => {
                // Tried again next read.
                self.record_error(&msg);
                self.problem(
                    "adopt",
                    &format!("cannot queue paths that have a GC root but no entry: {msg}"),
                );
            }
            None => {}
        }
        for (entry, path) in loaded.invalid {
            let reason = format!(
                "{}: no longer valid in the store (garbage-collected or deleted before upload)",
                path.to_absolute()
            );
            tracing::warn!("{reason}");
            self.record_error(&reason);
            self.queue.fail(&entry.id, &reason)?;
            self.release(&entry.paths);
        }
        Ok(loaded.good)
    }

    /// Acknowledges the entries whose closures are in the cache now, fails those with a
    /// permanently failing path, keeps the rest, and counts the report.
    fn settle(
        &mut self,
        entries: &[Entry],
        plan: &Plan,
        report: &Report,
    ) -> anyhow::Result<Settled> {
        self.metrics.record_report(report);
        self.state.pushed += report.pushed.len() as u64;
        self.state.already_cached += report.already_cached as u64;
        self.state.left_upstream += report.left_upstream as u64;
        self.state.logs_uploaded += report.logs_uploaded as u64;
        for message in &report.log_failures {
            // The path itself is in the cache; only `nix log` will lack this.
            tracing::warn!("{message}");
        }
        if report.logs_skipped > 0 {
            tracing::warn!(
                "{} more build logs not tried after the cache failed one",
                report.logs_skipped
            );
        }

        let failures: HashMap<&StorePath, &crate::pipeline::PathFailure> =
            report.failed.iter().map(|f| (&f.path, f)).collect();
        // Closure membership decides an entry's fate: a failing dependency blocks it too.
        let index: HashMap<&StorePath, &crate::store::PathInfo> =
            plan.paths.iter().map(|i| (&i.path, i)).collect();
        let mut transient = false;
        for entry in entries {
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
                self.record_error(&reason);
                self.queue.fail(&entry.id, &reason)?;
                self.release(&entry.paths);
            } else if pending {
                transient = true;
            } else {
                self.queue.ack(&entry.id)?;
                self.release(&entry.paths);
            }
        }
        Ok(Settled {
            transient,
            failure: report
                .failed
                .iter()
                .find(|f| !f.kind.is_permanent())
                .map(|f| f.message.clone()),
            attention: report
                .failed
                .iter()
                .find(|f| f.kind.needs_attention())
                .map(|f| with_hint(&f.message, f.hint.as_deref())),
        })
    }

    fn release(&self, paths: &[StorePath]) {
        for p in paths {
            // Releasing is best effort and reports its own problems.
            self.roots.release(p);
        }
    }

    fn cache_down(&mut self, msg: &str) {
        if !self.down {
            tracing::warn!(
                "uploads to {} fail: {msg}; everything stays queued, retrying for as long as it takes",
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

    /// A failure of the drainer itself (not of the cache): logged when it starts, kept for
    /// `status`, and retried with backoff.
    fn own_error(&mut self, msg: &str) {
        self.record_error(msg);
        if self.problem(
            "drain",
            &format!("{msg}; everything stays queued, retrying"),
        ) {
            self.backoff = Duration::from_secs(1);
        } else {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        self.write_state();
    }

    fn cache_up(&mut self) {
        if self.down {
            tracing::info!("uploads to {} work again", self.state.cache);
            self.down = false;
            self.state.cache_down_since = None;
            self.state.needs_attention = None;
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
    /// queue is empty (watch-exec). Uploads under way when `stop` fires get `grace` to
    /// finish: the drain timeout, or nothing when `stop` is itself the end of a deadline.
    pub async fn run(
        &mut self,
        stop: CancellationToken,
        mut wake: mpsc::Receiver<()>,
        until_empty: bool,
        grace: Duration,
    ) -> anyhow::Result<Totals> {
        self.write_state();
        let mut session = Session::default();
        // Whether wake-ups can still come (watch-exec's last drain has nobody to send any).
        let mut listening = true;
        // Whether to read the queue for new entries as soon as no backoff holds it back.
        let mut read = true;
        // While uploads fail: no read before this.
        let mut backoff_until: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            if read && backoff_until.is_none_or(|t| Instant::now() >= t) {
                read = false;
                backoff_until = None;
                match self.start_run(&mut session, &stop).await {
                    Ok(wait) => {
                        self.resolved("drain", "draining normally again");
                        if wait {
                            backoff_until = Some(Instant::now() + self.jittered_backoff());
                        }
                    }
                    Err(e) => {
                        self.own_error(&crate::error::chain(&e));
                        backoff_until = Some(Instant::now() + self.jittered_backoff());
                        read = true;
                    }
                }
            }
            if until_empty && session.is_empty() && self.queue.depth()? == 0 {
                break;
            }
            let tick = backoff_until.unwrap_or_else(|| Instant::now() + POLL);
            tokio::select! {
                _ = stop.cancelled() => break,
                done = session.next() => {
                    let wait = match self.finish_run(done, &stop) {
                        Ok(wait) => wait,
                        Err(e) => {
                            self.own_error(&crate::error::chain(&e));
                            true
                        }
                    };
                    if wait {
                        // What stays queued is read again after the backoff.
                        backoff_until = Some(Instant::now() + self.jittered_backoff());
                        read = true;
                    }
                }
                w = wake.recv(), if listening => {
                    // A closed channel answers at once, every time: without this the loop
                    // would never sleep again.
                    match w {
                        Some(()) => read = true,
                        None => listening = false,
                    }
                    // Coalesce a burst of wake-ups into one read.
                    while listening && wake.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep_until(tick.into()) => read = true,
            }
        }
        // The runs under way saw `stop` (nothing new starts); their uploads under way get
        // the grace period to finish.
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        while !session.is_empty() {
            tokio::select! {
                done = session.next() => {
                    if let Err(e) = self.finish_run(done, &stop) {
                        self.own_error(&crate::error::chain(&e));
                    }
                }
                _ = &mut deadline => {
                    tracing::warn!(
                        "drain timeout reached; {} under way were stopped and stay queued",
                        count(session.len() as u64, "upload run", "upload runs")
                    );
                    break;
                }
            }
        }
        self.write_state();
        Ok(Totals {
            pushed: self.state.pushed,
            already_cached: self.state.already_cached,
            left_upstream: self.state.left_upstream,
            logs_uploaded: self.state.logs_uploaded,
            left: self.queue.depth().unwrap_or(0),
        })
    }
}

/// `message`, and what to do about it when there is something.
fn with_hint(message: &str, hint: Option<&str>) -> String {
    match hint {
        Some(h) => format!("{message} ({h})"),
        None => message.to_owned(),
    }
}

/// Removes the files in `dir`, best effort: one that stays is tried again next start.
fn clear_dir(dir: &Path) {
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for item in items.flatten() {
        if let Err(e) = std::fs::remove_file(item.path()) {
            tracing::warn!("{}: cannot remove: {e}", item.path().display());
        }
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
