//! Execution: one task per missing path, in dependency order, bounded by worker and
//! upload slots; a narinfo is stored only after its NAR and every missing reference's narinfo.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::book::{self, Outcome};
use super::{Event, FailureKind, LogOutcome, PathFailure, Pipeline, Plan, Report};
use crate::cache::{ErrorKind, NarBody, PreparedNar, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

/// Build logs during one run: whose are taken, and whether the cache failed one.
#[derive(Default)]
struct LogRun {
    claimed: Mutex<HashSet<StorePath>>,
    cache_failed: AtomicBool,
}

impl Pipeline {
    /// Uploads the plan's missing paths. Paths not started when `cancel` fires are reported
    /// as skipped; paths already under way finish (the caller bounds that with a deadline).
    pub async fn execute(&self, plan: &Plan, cancel: &CancellationToken) -> Report {
        let started = Instant::now();
        let run = self.book.start_run();
        let mut senders: HashMap<StorePath, watch::Sender<Option<Outcome>>> = HashMap::new();
        let mut receivers: HashMap<StorePath, watch::Receiver<Option<Outcome>>> = HashMap::new();
        // Paths another run is uploading: this run waits for their outcome instead.
        let mut theirs: Vec<(StorePath, watch::Receiver<Option<Outcome>>)> = Vec::new();
        for info in plan.paths.iter().filter(|p| plan.missing.contains(&p.path)) {
            let (entered, rx) = self.book.enter(run, &info.path);
            match entered {
                book::Entered::Ours(tx) => {
                    senders.insert(info.path.clone(), tx);
                }
                book::Entered::Theirs(rx) => theirs.push((info.path.clone(), rx)),
            }
            receivers.insert(info.path.clone(), rx);
        }

        // A derivation with several outputs has one log: the first output pushed takes it.
        // Once the cache fails one log, the others of this run are not tried: whatever is
        // wrong with it would cost every path a timeout while its entry waits.
        let logs = Arc::new(LogRun::default());
        let mut tasks = Vec::new();
        for info in plan.paths.iter().filter(|p| plan.missing.contains(&p.path)) {
            let deps: Vec<(StorePath, Option<watch::Receiver<Option<Outcome>>>)> = info
                .references
                .iter()
                .filter(|r| *r != &info.path)
                .filter_map(|r| {
                    if let Some(rx) = receivers.get(r) {
                        Some((r.clone(), Some(rx.clone())))
                    } else if plan.unavailable.contains(r) {
                        Some((r.clone(), None))
                    } else {
                        None
                    }
                })
                .collect();
            let Some(done_tx) = senders.remove(&info.path) else {
                continue;
            };
            tasks.push(self.push_one(
                info.clone(),
                deps,
                run,
                cancel.clone(),
                done_tx,
                logs.clone(),
            ));
        }
        let theirs = futures::future::join_all(
            theirs
                .into_iter()
                .map(|(path, rx)| uploaded_elsewhere(path, rx)),
        );
        let (results, theirs) =
            futures::future::join(futures::future::join_all(tasks), theirs).await;

        let mut report = Report {
            requested: plan.requested.clone(),
            total: plan.paths.len(),
            already_cached: plan.cached(),
            left_upstream: plan.upstream.len(),
            ..Default::default()
        };
        for r in results {
            match r {
                PathResult::Pushed {
                    path,
                    nar_size,
                    file_size,
                    log,
                } => {
                    report.nar_bytes += nar_size;
                    report.file_bytes += file_size;
                    report.pushed.push(path);
                    match log {
                        LogOutcome::Uploaded { .. } => report.logs_uploaded += 1,
                        LogOutcome::Failed { message, .. } => report.log_failures.push(message),
                        LogOutcome::Skipped => report.logs_skipped += 1,
                        LogOutcome::NotUploaded => {}
                    }
                }
                PathResult::Failed(f) => report.failed.push(f),
                PathResult::Skipped(p) => report.skipped.push(p),
            }
        }
        for r in theirs {
            match r {
                // Stored by the other run: in the cache, as if it had been there already.
                PathResult::Pushed { .. } => report.already_cached += 1,
                PathResult::Failed(f) => report.failed.push(f),
                PathResult::Skipped(p) => report.skipped.push(p),
            }
        }
        report.elapsed = started.elapsed();
        report
    }

    async fn push_one(
        &self,
        info: PathInfo,
        deps: Vec<(StorePath, Option<watch::Receiver<Option<Outcome>>>)>,
        run: u64,
        cancel: CancellationToken,
        done: watch::Sender<Option<Outcome>>,
        logs: Arc<LogRun>,
    ) -> PathResult {
        let mut result = self.push_one_inner(&info, deps, run, &cancel, &done).await;
        let outcome = match &result {
            PathResult::Pushed { .. } => Outcome::Done,
            PathResult::Failed(f) => {
                self.emit(Event::Failed {
                    path: f.path.clone(),
                    message: f.message.clone(),
                });
                Outcome::Failed
            }
            PathResult::Skipped(_) => Outcome::Skipped,
        };
        done.send_replace(Some(outcome));
        self.book.leave(run, &info.path);
        // After the narinfo, and after telling referrers: a log never holds anything back.
        if let (PathResult::Pushed { log, .. }, Some(drv)) = (&mut result, &info.deriver) {
            let first = logs
                .claimed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(drv.clone());
            if first {
                *log = self.upload_log_unless(drv, Some(&logs.cache_failed)).await;
            }
        }
        result
    }

    async fn push_one_inner(
        &self,
        info: &PathInfo,
        deps: Vec<(StorePath, Option<watch::Receiver<Option<Outcome>>>)>,
        run: u64,
        cancel: &CancellationToken,
        done: &watch::Sender<Option<Outcome>>,
    ) -> PathResult {
        let (workers, uploads) = (&self.book.workers, &self.book.uploads);
        let path = info.path.clone();
        let fail = |kind, message: String, hint: Option<String>| {
            PathResult::Failed(PathFailure {
                path: path.clone(),
                kind,
                message,
                hint,
            })
        };

        // A reference already known to be lost makes the work pointless.
        for (dep, rx) in &deps {
            if rx.is_none() {
                return fail(
                    FailureKind::Dependency,
                    format!(
                        "{}: its reference {} is not in the cache",
                        path.to_absolute(),
                        dep.to_absolute()
                    ),
                    Some("push without --no-closure to upload references too".into()),
                );
            }
        }

        let slots = if crate::compress::is_small(info.nar_size) {
            &self.book.small_workers
        } else {
            workers
        };
        let permit = tokio::select! {
            p = slots.acquire(run) => p,
            _ = cancel.cancelled() => return PathResult::Skipped(path),
        };
        if cancel.is_cancelled() {
            return PathResult::Skipped(path);
        }
        self.emit(Event::Started {
            path: path.clone(),
            nar_size: info.nar_size,
        });

        let (prepared, unsent) = match self.prepare(info).await {
            Ok(p) => p,
            Err(f) => return PathResult::Failed(f),
        };
        let guard = SpoolGuard(spool_file(&prepared));
        // Waiting here (not cancellable) keeps the NAR's slot order; a cancelled push still
        // finishes the uploads that are already prepared.
        let upload_permit = uploads.acquire(run).await;
        drop(permit);
        let url = match self
            .retry(
                &format!("uploading the NAR of {}", path.to_absolute()),
                || self.target.put_nar(&prepared),
            )
            .await
        {
            Ok(u) => u,
            Err(e) => return PathResult::Failed(target_failure(&path, e)),
        };
        // The NAR is stored: a spooled copy is not needed again (targets that read the NAR
        // when the narinfo goes, ssh and Attic, take it raw from the store), and a path
        // waiting for its references must not hold spool space the slots do not count.
        drop(guard);
        drop(upload_permit);

        // With ordered commits a reference handed over is as good as stored: this path
        // goes out behind it on the same channel.
        let ordered = self.target.ordered_commits();
        let mut behind_handed_over = false;
        for (dep, rx) in &deps {
            let Some(rx) = rx else { continue };
            match wait_for_reference(rx.clone(), ordered).await {
                Some(Outcome::Done) => {}
                Some(Outcome::HandedOver) => behind_handed_over = true,
                Some(Outcome::Skipped) => return PathResult::Skipped(path),
                _ => return fail_dependency(&path, dep),
            }
        }

        let narinfo = NarInfo { url, ..unsent };
        let what = format!("uploading the narinfo of {}", path.to_absolute());
        let upload_permit = uploads.acquire(run).await;
        let committed = if ordered {
            let mut upload_permit = Some(upload_permit);
            let first = match self.target.hand_over_narinfo(&narinfo, &prepared).await {
                Ok(committing) => {
                    done.send_replace(Some(Outcome::HandedOver));
                    // Handed over, the request is the target's to bound (an ordered target
                    // keeps requests in flight on the wire, many more than the slots, by
                    // bytes and count); the slot goes to the next path meanwhile.
                    upload_permit = None;
                    let answer = committing.await;
                    if answer.is_err() {
                        done.send_replace(None);
                    }
                    answer
                }
                Err(e) => Err(e),
            };
            match first {
                Ok(()) => Ok(()),
                Err(e)
                    if !behind_handed_over
                        && (!e.is_retryable() || self.opts.retry.retries == 0) =>
                {
                    Err(e)
                }
                Err(e) if !behind_handed_over => {
                    // The path's own error: the first attempt counts as one of the tries.
                    let _upload_permit = match upload_permit {
                        Some(p) => p,
                        None => uploads.acquire(run).await,
                    };
                    self.emit(Event::Retrying {
                        what: what.clone(),
                        delay: std::time::Duration::ZERO,
                        error: e.message.clone(),
                    });
                    let retries = self.opts.retry.retries.saturating_sub(1);
                    self.retry_times(retries, &what, || {
                        self.target.put_narinfo(&narinfo, &prepared)
                    })
                    .await
                }
                Err(e) => {
                    // Sent behind a reference that was not stored yet, or lost with its
                    // connection: whatever the error, it may be the reference's. Try again
                    // the careful way, once every reference is stored.
                    tracing::debug!("{what}: {e}; retrying after its references");
                    drop(upload_permit);
                    for (dep, rx) in &deps {
                        let Some(rx) = rx else { continue };
                        match wait_for_reference(rx.clone(), false).await {
                            Some(Outcome::Done) => {}
                            Some(Outcome::Skipped) => return PathResult::Skipped(path),
                            _ => return fail_dependency(&path, dep),
                        }
                    }
                    let _upload_permit = uploads.acquire(run).await;
                    // Only now, when it is sent again: had a reference failed, this path
                    // would be withheld, not retried. A lost connection is seen this way.
                    self.emit(Event::Retrying {
                        what: what.clone(),
                        delay: std::time::Duration::ZERO,
                        error: e.message.clone(),
                    });
                    self.retry(&what, || self.target.put_narinfo(&narinfo, &prepared))
                        .await
                }
            }
        } else {
            // A commit that ends in waiting (file://'s commit rounds) gives the slot back
            // while it waits, so the next paths reach the same round.
            let mut first_permit = Some(upload_permit);
            self.retry(&what, || {
                let held = first_permit.take();
                async {
                    let permit = match held {
                        Some(p) => p,
                        None => uploads.acquire(run).await,
                    };
                    let committing = self.target.hand_over_narinfo(&narinfo, &prepared).await?;
                    drop(permit);
                    committing.await
                }
            })
            .await
        };
        if let Err(e) = committed {
            return PathResult::Failed(target_failure(&path, e));
        }
        let file_size = match &prepared.body {
            NarBody::Spooled(s) => s.file_size,
            NarBody::Raw(_) => info.nar_size,
        };
        self.emit(Event::Pushed {
            path: path.clone(),
            nar_size: info.nar_size,
            file_size,
        });
        PathResult::Pushed {
            path,
            nar_size: info.nar_size,
            file_size,
            log: LogOutcome::NotUploaded,
        }
    }
}

enum PathResult {
    Pushed {
        path: StorePath,
        nar_size: u64,
        file_size: u64,
        log: LogOutcome,
    },
    Failed(PathFailure),
    Skipped(StorePath),
}

/// Waits until the reference behind `rx` is stored, failed or skipped, or (with `handed_over`)
/// handed over to an ordered target.
async fn wait_for_reference(
    mut rx: watch::Receiver<Option<Outcome>>,
    handed_over: bool,
) -> Option<Outcome> {
    let ready = |o: &Option<Outcome>| match o {
        Some(Outcome::HandedOver) => handed_over,
        Some(_) => true,
        None => false,
    };
    match rx.wait_for(ready).await {
        Ok(o) => *o,
        Err(_) => None,
    }
}

/// The outcome of a path another run of the pipeline uploads (see `book`).
async fn uploaded_elsewhere(path: StorePath, rx: watch::Receiver<Option<Outcome>>) -> PathResult {
    match wait_for_reference(rx, false).await {
        Some(Outcome::Done) => PathResult::Pushed {
            path,
            nar_size: 0,
            file_size: 0,
            log: LogOutcome::NotUploaded,
        },
        Some(Outcome::Failed) => PathResult::Failed(PathFailure {
            message: format!(
                "{}: its upload, begun by another pass, failed; it is tried again",
                path.to_absolute()
            ),
            path,
            kind: FailureKind::Transient,
            hint: None,
        }),
        _ => PathResult::Skipped(path),
    }
}

fn fail_dependency(path: &StorePath, dep: &StorePath) -> PathResult {
    PathResult::Failed(PathFailure {
        path: path.clone(),
        kind: FailureKind::Dependency,
        message: format!(
            "{}: not published because its reference {} failed",
            path.to_absolute(),
            dep.to_absolute()
        ),
        hint: None,
    })
}

fn target_failure(path: &StorePath, e: TargetError) -> PathFailure {
    PathFailure {
        path: path.clone(),
        kind: match e.kind {
            ErrorKind::Transient => FailureKind::Transient,
            ErrorKind::Auth => FailureKind::Auth,
            ErrorKind::Permanent => FailureKind::Permanent,
        },
        message: e.message,
        hint: e.hint,
    }
}

fn spool_file(p: &PreparedNar) -> Option<PathBuf> {
    match &p.body {
        NarBody::Spooled(s) => Some(s.file.clone()),
        NarBody::Raw(_) => None,
    }
}

/// Removes a spooled NAR whatever way the upload ends; targets that renamed it away leave
/// nothing to remove.
struct SpoolGuard(Option<PathBuf>);

impl Drop for SpoolGuard {
    fn drop(&mut self) {
        // Most targets renamed the file away. Looking first spares the unlink, which takes
        // the directory's lock even to find nothing.
        if let Some(p) = &self.0
            && p.symlink_metadata().is_ok()
        {
            let _ = std::fs::remove_file(p);
        }
    }
}
