//! The build logs of failed builds, for `watch-store` and `watch-exec`: when a CI job fails,
//! `nix log <drv>` on any machine with the cache as a substituter shows why.
//!
//! A successful build's log goes up with its outputs, through the pipeline. A failed build
//! has no outputs to push, so the watchers look at the logs themselves: every log file
//! written under Nix's log directory while they run is a candidate, and a candidate is
//! decided once its build is over:
//!
//! - its derivation's outputs are all valid: the build succeeded, nothing to do here;
//! - a `.bz2` log that does not decompress to its end is still being written: wait;
//! - otherwise, once the file has not changed for [`QUIET`] (a build that just ended may be
//!   registering its outputs), or when the watcher stops: the build failed, upload the log.
//!
//! This is best effort, like every log upload: nothing is queued on disk for it, and a
//! failure is reported on one line, never in the exit code.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use notify::Watcher;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::buildlog::{self, LogError};
use crate::format::drv;
use crate::format::store_path::StorePath;
use crate::pipeline::{LogOutcome, Pipeline};
use crate::store::Store;

/// How long a finished log must stay unchanged before its build counts as failed.
pub const QUIET: Duration = Duration::from_secs(3);
/// How often candidates are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Runs until `stop` fires, then decides what is left; returns the number of logs uploaded.
pub fn spawn(
    pipeline: Arc<Pipeline>,
    store: Arc<Store>,
    log_dir: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<u64>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let watcher = log_events(&log_dir, tx)?;
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        run(pipeline, store, rx, stop).await
    }))
}

fn log_events(
    log_dir: &Path,
    tx: mpsc::UnboundedSender<PathBuf>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let drvs = buildlog::drvs_dir(log_dir);
    // Nix creates it with the first build; creating it first lets it be watched now.
    std::fs::create_dir_all(&drvs)
        .with_context(|| format!("{}: cannot create the build log directory", drvs.display()))?;
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        use notify::event::{AccessKind, AccessMode, EventKind};
        let Ok(ev) = res else { return };
        // Writes only: reading a log (ours, `nix log`) must not make it a candidate again.
        let written = matches!(
            ev.kind,
            EventKind::Create(_)
                | EventKind::Modify(_)
                | EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        if written {
            for p in ev.paths {
                let _ = tx.send(p);
            }
        }
    })
    .context("cannot start inotify watcher")?;
    watcher
        .watch(&drvs, notify::RecursiveMode::Recursive)
        .with_context(|| format!("{}: cannot watch build logs", drvs.display()))?;
    Ok(watcher)
}

async fn run(
    pipeline: Arc<Pipeline>,
    store: Arc<Store>,
    mut rx: mpsc::UnboundedReceiver<PathBuf>,
    stop: CancellationToken,
) -> u64 {
    // With the modification time at which a log was last found to be an unfinished stream:
    // a log that has not changed since is not decompressed again.
    let mut candidates: HashMap<PathBuf, Option<SystemTime>> = HashMap::new();
    let mut uploaded: HashSet<StorePath> = HashSet::new();
    let mut count = 0;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
            p = rx.recv() => {
                match p {
                    Some(p) => { candidates.entry(p).or_insert(None); }
                    None => return count,
                }
                continue;
            }
        };
        while let Ok(p) = rx.try_recv() {
            candidates.entry(p).or_insert(None);
        }
        let todo = candidates.clone();
        let store = store.clone();
        let limit = pipeline.log_options().max_size;
        let decided = tokio::task::spawn_blocking(move || decide(&store, todo, last, limit)).await;
        let Ok(decided) = decided else { return count };
        for (file, verdict) in decided {
            match verdict {
                Verdict::Wait(unfinished) => {
                    candidates.insert(file, unfinished);
                    continue;
                }
                Verdict::Done => {}
                Verdict::Failed(drv) => {
                    if uploaded.insert(drv.clone()) {
                        match pipeline.upload_log(&drv).await {
                            LogOutcome::Uploaded { .. } => {
                                tracing::info!(
                                    "uploaded the build log of {}, which failed",
                                    drv.to_absolute()
                                );
                                count += 1;
                            }
                            LogOutcome::Failed { message, .. } => {
                                eprintln!("narpost: build log: {message}")
                            }
                            LogOutcome::NotUploaded | LogOutcome::Skipped => {}
                        }
                    }
                }
            }
            candidates.remove(&file);
        }
        if last {
            return count;
        }
    }
}

enum Verdict {
    /// Still being written, or just finished: look again later. With the modification
    /// time at which it was an unfinished stream.
    Wait(Option<SystemTime>),
    /// Not a log, or its build succeeded (the pipeline has it), or it cannot be read.
    Done,
    /// The build ended without its outputs.
    Failed(StorePath),
}

/// Blocking: reads logs, `.drv` files and the store database.
fn decide(
    store: &Store,
    candidates: HashMap<PathBuf, Option<SystemTime>>,
    last: bool,
    limit: u64,
) -> HashMap<PathBuf, Verdict> {
    let now = SystemTime::now();
    candidates
        .into_iter()
        .map(|(file, unfinished)| {
            let verdict = verdict(store, &file, unfinished, last, limit, now);
            (file, verdict)
        })
        .collect()
}

fn verdict(
    store: &Store,
    file: &Path,
    unfinished: Option<SystemTime>,
    last: bool,
    limit: u64,
    now: SystemTime,
) -> Verdict {
    let Some(drv) = buildlog::drv_of(file) else {
        return Verdict::Done;
    };
    let Ok(meta) = std::fs::metadata(file) else {
        return Verdict::Done;
    };
    if !meta.is_file() {
        return Verdict::Done;
    }
    if outputs_valid(store, &drv) {
        return Verdict::Done;
    }
    let modified = meta.modified().ok();
    if !last && unfinished.is_some() && unfinished == modified {
        return Verdict::Wait(unfinished);
    }
    let compressed = file.extension().is_some_and(|e| e == "bz2");
    if compressed {
        // Only whether the stream ends matters here; the upload reads it again, capped.
        match buildlog::read_file(file, true, limit) {
            Err(LogError::Incomplete { .. }) => {
                return if last {
                    Verdict::Done
                } else {
                    Verdict::Wait(modified)
                };
            }
            Err(LogError::Unreadable { .. }) => return Verdict::Done,
            _ => {}
        }
    }
    let quiet = modified
        .and_then(|m| now.duration_since(m).ok())
        .is_some_and(|age| age >= QUIET);
    if !quiet && !last {
        return Verdict::Wait(None);
    }
    // Registering outputs may have finished since the first look.
    if outputs_valid(store, &drv) {
        return Verdict::Done;
    }
    Verdict::Failed(drv)
}

/// Whether every output of `drv` is valid in the store. A `.drv` that cannot be read counts
/// as built: without its outputs nothing says the build failed.
fn outputs_valid(store: &Store, drv: &StorePath) -> bool {
    let Ok(text) = std::fs::read_to_string(buildlog::drv_file(drv)) else {
        return true;
    };
    let Ok(outputs) = drv::parse_outputs(&text) else {
        return true;
    };
    outputs
        .iter()
        .all(|(_, out)| store.is_valid(out).unwrap_or(true))
}
