//! The one upload pipeline, shared by `push`, the daemon and the store watchers.
//!
//! **Plan, then execute.** The plan reads the closure from the store, asks the target once
//! (it batches as it likes) which paths it is missing, and counts what is already cached,
//! before a single byte is uploaded. Execution then runs one task per missing path:
//!
//! 1. wait for a worker slot (`jobs` of them; tasks ask in dependency order, and the
//!    semaphore is fair, so references get their slots first);
//! 2. prepare the NAR as the target wants it ([`NarFormat`]): for plain caches, serialize the
//!    path from disk, hash it, compress it with zstd and hash the compressed bytes, all on a
//!    blocking thread into a spool file; a NarHash or NarSize that differs from the store's
//!    record stops the path here, before anything leaves the machine;
//! 3. take an upload slot and give the worker slot back, then store the NAR. Storing is
//!    bound by fsync or network latency, not CPU, so [`upload_slots`] of them (more than
//!    `jobs`) keep many small paths moving while the cores compress the next ones, and a
//!    file cache shares one directory fsync among all renames in flight. Spooled NARs
//!    waiting for upload are bounded by the two slot counts together;
//! 4. wait until every reference that was missing has its narinfo in the cache;
//! 5. sign the narinfo and store it: the commit point.
//!
//! So a narinfo is written only after its NAR and its references' narinfos, and a path whose
//! reference failed is never published. Transient target errors are retried with capped
//! exponential backoff and jitter; one failing path does not stop the others, and every path
//! gets an outcome in the [`Report`]. Progress is reported as [`Event`]s; printing is the
//! caller's business.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::compress::FramedZstd;
use crate::dump::{self, NarSource};
use crate::format::hash::HashingWriter;
use crate::format::narinfo::NarInfo;
use crate::format::signing::SigningKey;
use crate::format::store_path::StorePath;
use crate::store::{self, PathInfo, Store, StoreError};
use crate::target::{
    DynTarget, ErrorKind, NarBody, NarFormat, PreparedNar, SpooledNar, TargetError,
};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 4,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Paths prepared and uploaded at once.
    pub jobs: usize,
    /// Where compressed NARs wait for upload when the target has no spool directory of its own.
    pub spool_dir: PathBuf,
    pub retry: RetryPolicy,
}

/// Uploads in flight at once: storing a NAR waits on fsync or the network, so several per
/// core keep the cores busy; bounded so that spooled NARs never pile up on disk.
pub fn upload_slots(jobs: usize) -> usize {
    (jobs.max(1) * 4).clamp(8, 32)
}

/// What happens, as it happens, for progress bars, logs and the daemon's status.
#[derive(Debug, Clone)]
pub enum Event {
    Planned {
        total: usize,
        missing: usize,
        cached: usize,
        /// Uncompressed bytes of the missing paths.
        missing_bytes: u64,
    },
    Started {
        path: StorePath,
        nar_size: u64,
    },
    Pushed {
        path: StorePath,
        nar_size: u64,
        file_size: u64,
    },
    Failed {
        path: StorePath,
        message: String,
    },
    Retrying {
        what: String,
        delay: Duration,
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl PipelineError {
    /// Whether running the same plan later can succeed without the user doing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PipelineError::Target(e) if e.is_retryable())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The cache was unreachable or failing; the same path can be pushed later.
    Transient,
    /// Credentials or permissions; the user must act.
    Auth,
    /// The cache refused it for good.
    Permanent,
    /// The path's contents on disk do not match the store's NarHash.
    Corrupt,
    /// The store path could not be read.
    Unreadable,
    /// A reference was not uploaded, so this path must not be published.
    Dependency,
}

impl FailureKind {
    /// A failure that will not go away by trying again later.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            FailureKind::Corrupt | FailureKind::Unreadable | FailureKind::Permanent
        )
    }
}

#[derive(Debug, Clone)]
pub struct PathFailure {
    pub path: StorePath,
    pub kind: FailureKind,
    pub message: String,
    pub hint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// Paths the caller asked for.
    pub requested: Vec<StorePath>,
    /// Every path considered, references before referrers.
    pub paths: Vec<PathInfo>,
    /// Which of `paths` the cache does not have.
    pub missing: HashSet<StorePath>,
    /// References outside `paths` that the cache lacks (only with `closure = false`):
    /// whatever refers to them cannot be published.
    pub unavailable: HashSet<StorePath>,
}

impl Plan {
    pub fn cached(&self) -> usize {
        self.paths.len() - self.missing.len()
    }
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requested: Vec<StorePath>,
    pub total: usize,
    pub already_cached: usize,
    pub pushed: Vec<StorePath>,
    pub failed: Vec<PathFailure>,
    /// Not started because of shutdown; still to do.
    pub skipped: Vec<StorePath>,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    pub elapsed: Duration,
}

impl Report {
    /// Every path of the plan is in the cache now.
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.skipped.is_empty()
    }

    /// Whether `path` (one of the plan's) is in the cache after this run.
    pub fn is_done(&self, path: &StorePath) -> bool {
        !self.failed.iter().any(|f| &f.path == path) && !self.skipped.contains(path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
    Skipped,
}

pub struct Pipeline {
    store: Arc<Store>,
    target: DynTarget,
    /// `None` for targets that sign themselves (Attic) when no key is configured.
    key: Option<Arc<SigningKey>>,
    opts: Options,
    events: Option<mpsc::UnboundedSender<Event>>,
    /// The target is opened once, on first use, and reused by later runs (the daemon).
    opened: tokio::sync::OnceCell<()>,
}

impl Pipeline {
    pub fn new(
        store: Arc<Store>,
        target: DynTarget,
        key: Option<SigningKey>,
        opts: Options,
    ) -> Pipeline {
        Pipeline {
            store,
            target,
            key: key.map(Arc::new),
            opts,
            events: None,
            opened: tokio::sync::OnceCell::new(),
        }
    }

    pub fn with_events(mut self, tx: mpsc::UnboundedSender<Event>) -> Pipeline {
        self.events = Some(tx);
        self
    }

    pub fn target(&self) -> &DynTarget {
        &self.target
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn emit(&self, e: Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    /// Plans and executes; the common case.
    pub async fn push(
        &self,
        roots: &[StorePath],
        closure: bool,
        cancel: &CancellationToken,
    ) -> Result<Report, PipelineError> {
        let plan = self.plan(roots, closure).await?;
        Ok(self.execute(&plan, cancel).await)
    }

    async fn open_target(&self) -> Result<(), TargetError> {
        self.opened
            .get_or_try_init(|| self.retry("opening the cache", || self.target.open()))
            .await
            .map(|_| ())
    }

    pub async fn plan(&self, roots: &[StorePath], closure: bool) -> Result<Plan, PipelineError> {
        let store = self.store.clone();
        let roots_owned = roots.to_vec();
        let (paths, context) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            if closure {
                return Ok((store.closure(&roots_owned)?, Vec::new()));
            }
            let mut seen = HashSet::new();
            let unique: Vec<StorePath> = roots_owned
                .into_iter()
                .filter(|p| seen.insert(p.clone()))
                .collect();
            let infos = store::topo_sort(store.query(&unique)?);
            let outside: Vec<StorePath> = infos
                .iter()
                .flat_map(|i| i.references.iter())
                .filter(|r| !seen.contains(*r))
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let context = store.query(&outside)?;
            Ok((infos, context))
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))??;

        self.open_target().await?;
        let mut ask = paths.clone();
        ask.extend(context.iter().cloned());
        let absent = self
            .retry("asking the cache which paths it has", || {
                self.target.missing(&ask)
            })
            .await?;
        let known: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
        let (missing, unavailable): (HashSet<_>, HashSet<_>) =
            absent.into_iter().partition(|p| known.contains(p));
        let plan = Plan {
            requested: roots.to_vec(),
            missing,
            unavailable,
            paths,
        };
        self.emit(Event::Planned {
            total: plan.paths.len(),
            missing: plan.missing.len(),
            cached: plan.cached(),
            missing_bytes: plan
                .paths
                .iter()
                .filter(|p| plan.missing.contains(&p.path))
                .map(|p| p.nar_size)
                .sum(),
        });
        Ok(plan)
    }

    /// Uploads the plan's missing paths. Paths not started when `cancel` fires are reported
    /// as skipped; paths already under way finish (the caller bounds that with a deadline).
    pub async fn execute(&self, plan: &Plan, cancel: &CancellationToken) -> Report {
        let started = Instant::now();
        let semaphore = Arc::new(Semaphore::new(self.opts.jobs.max(1)));
        let uploads = Arc::new(Semaphore::new(upload_slots(self.opts.jobs)));
        let mut senders: HashMap<StorePath, watch::Sender<Option<Outcome>>> = HashMap::new();
        let mut receivers: HashMap<StorePath, watch::Receiver<Option<Outcome>>> = HashMap::new();
        for info in plan.paths.iter().filter(|p| plan.missing.contains(&p.path)) {
            let (tx, rx) = watch::channel(None);
            senders.insert(info.path.clone(), tx);
            receivers.insert(info.path.clone(), rx);
        }

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
                (semaphore.clone(), uploads.clone()),
                cancel.clone(),
                done_tx,
            ));
        }
        let results = futures::future::join_all(tasks).await;

        let mut report = Report {
            requested: plan.requested.clone(),
            total: plan.paths.len(),
            already_cached: plan.cached(),
            ..Default::default()
        };
        for r in results {
            match r {
                PathResult::Pushed {
                    path,
                    nar_size,
                    file_size,
                } => {
                    report.nar_bytes += nar_size;
                    report.file_bytes += file_size;
                    report.pushed.push(path);
                }
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
        slots: (Arc<Semaphore>, Arc<Semaphore>),
        cancel: CancellationToken,
        done: watch::Sender<Option<Outcome>>,
    ) -> PathResult {
        let result = self.push_one_inner(&info, deps, &slots, &cancel).await;
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
        let _ = done.send(Some(outcome));
        result
    }

    async fn push_one_inner(
        &self,
        info: &PathInfo,
        deps: Vec<(StorePath, Option<watch::Receiver<Option<Outcome>>>)>,
        (semaphore, uploads): &(Arc<Semaphore>, Arc<Semaphore>),
        cancel: &CancellationToken,
    ) -> PathResult {
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

        let permit = tokio::select! {
            p = semaphore.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return PathResult::Skipped(path),
            },
            _ = cancel.cancelled() => return PathResult::Skipped(path),
        };
        if cancel.is_cancelled() {
            return PathResult::Skipped(path);
        }
        self.emit(Event::Started {
            path: path.clone(),
            nar_size: info.nar_size,
        });

        let prepared = match self.prepare(info).await {
            Ok(p) => p,
            Err(f) => return PathResult::Failed(f),
        };
        let guard = SpoolGuard(spool_file(&prepared));
        // Waiting here (not cancellable) keeps the NAR's slot order; a cancelled push still
        // finishes the uploads that are already prepared.
        let upload_permit = match uploads.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return PathResult::Skipped(path),
        };
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
        drop(upload_permit);

        for (dep, rx) in deps {
            let Some(mut rx) = rx else { continue };
            let outcome = match rx.wait_for(|o| o.is_some()).await {
                Ok(o) => *o,
                Err(_) => None,
            };
            match outcome {
                Some(Outcome::Done) => {}
                Some(Outcome::Skipped) => return PathResult::Skipped(path),
                _ => {
                    return fail(
                        FailureKind::Dependency,
                        format!(
                            "{}: not published because its reference {} failed",
                            path.to_absolute(),
                            dep.to_absolute()
                        ),
                        None,
                    );
                }
            }
        }

        let narinfo = self.narinfo(&prepared, url);
        let _upload_permit = match uploads.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return PathResult::Skipped(path),
        };
        if let Err(e) = self
            .retry(
                &format!("uploading the narinfo of {}", path.to_absolute()),
                || self.target.put_narinfo(&narinfo, &prepared),
            )
            .await
        {
            return PathResult::Failed(target_failure(&path, e));
        }
        drop(guard);
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
        }
    }

    async fn prepare(&self, info: &PathInfo) -> Result<PreparedNar, PathFailure> {
        match self.target.nar_format() {
            NarFormat::Raw => Ok(PreparedNar {
                info: info.clone(),
                body: NarBody::Raw(NarSource {
                    path: info.path.clone(),
                    nar_hash: info.nar_hash,
                    nar_size: info.nar_size,
                }),
            }),
            NarFormat::Zstd { level } => {
                let dir = self
                    .target
                    .spool_dir()
                    .unwrap_or_else(|| self.opts.spool_dir.clone());
                let info2 = info.clone();
                let spooled = tokio::task::spawn_blocking(move || spool_zstd(&info2, &dir, level))
                    .await
                    .map_err(|e| PathFailure {
                        path: info.path.clone(),
                        kind: FailureKind::Unreadable,
                        message: format!("{}: internal error: {e}", info.path.to_absolute()),
                        hint: None,
                    })??;
                Ok(PreparedNar {
                    info: info.clone(),
                    body: NarBody::Spooled(spooled),
                })
            }
        }
    }

    fn narinfo(&self, nar: &PreparedNar, url: String) -> NarInfo {
        let info = &nar.info;
        let (compression, file_hash, file_size) = match &nar.body {
            NarBody::Spooled(s) => (s.compression, Some(s.file_hash), Some(s.file_size)),
            NarBody::Raw(_) => ("none", None, None),
        };
        let mut narinfo = NarInfo {
            store_path: info.path.clone(),
            url,
            compression: Some(compression.to_string()),
            file_hash,
            file_size,
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.iter().cloned().collect(),
            deriver: info.deriver.clone(),
            system: None,
            sigs: Vec::new(),
            ca: info.ca.clone(),
        };
        // Signatures the store already holds (e.g. from the upstream cache) stay valid:
        // they sign the same fingerprint.
        let own = self.key.as_ref().map(|k| format!("{}:", k.name()));
        narinfo.sigs = info
            .sigs
            .iter()
            .filter(|s| own.as_deref().is_none_or(|o| !s.starts_with(o)))
            .cloned()
            .collect();
        if let Some(key) = &self.key {
            narinfo.sign(key);
        }
        narinfo
    }

    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, TargetError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TargetError>>,
    {
        let policy = &self.opts.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.retries)
            .with_jitter();
        op.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &TargetError| e.is_retryable())
            .notify(|e: &TargetError, delay| {
                tracing::debug!("{what}: {e}; retrying in {delay:?}");
                self.emit(Event::Retrying {
                    what: what.to_string(),
                    delay,
                    error: e.message.clone(),
                })
            })
            .await
    }
}

enum PathResult {
    Pushed {
        path: StorePath,
        nar_size: u64,
        file_size: u64,
    },
    Failed(PathFailure),
    Skipped(StorePath),
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
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serializes, hashes and compresses one path into a spool file, checking the result
/// against the store's record. Blocking.
pub fn spool_zstd(info: &PathInfo, dir: &Path, level: i32) -> Result<SpooledNar, PathFailure> {
    let abs = info.path.to_absolute();
    let fail = |kind, message: String, hint: Option<String>| PathFailure {
        path: info.path.clone(),
        kind,
        message,
        hint,
    };
    let spool_err = |e: std::io::Error| {
        fail(
            FailureKind::Transient,
            format!("{}: cannot write spool file: {e}", dir.display()),
            Some("check free space and permissions of the state directory".into()),
        )
    };
    std::fs::create_dir_all(dir).map_err(spool_err)?;
    let tmp = tempfile::Builder::new()
        .prefix(".narpost-")
        .suffix(".nar.zst")
        .tempfile_in(dir)
        .map_err(spool_err)?;
    let file = tmp.reopen().map_err(spool_err)?;

    let compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let encoder = FramedZstd::new(compressed, level, info.nar_size).map_err(spool_err)?;
    let nar = HashingWriter::new(encoder);
    let nar = dump::dump_path(Path::new(&abs), nar).map_err(|e| {
        fail(
            FailureKind::Unreadable,
            format!("{abs}: cannot serialize: {e}"),
            Some(format!(
                "check the path with `nix-store --verify-path {abs}`"
            )),
        )
    })?;
    let (encoder, nar_hash, nar_size) = nar.finish();
    if nar_hash != info.nar_hash || nar_size != info.nar_size {
        return Err(fail(
            FailureKind::Corrupt,
            format!(
                "{abs}: contents do not match the store's NarHash (recorded {} / {} bytes, found {} / {} bytes); not uploading it or anything that refers to it",
                info.nar_hash, info.nar_size, nar_hash, nar_size
            ),
            Some(format!(
                "run `nix-store --verify-path {abs}` and repair it with `nix-store --repair-path {abs}`"
            )),
        ));
    }
    let compressed = encoder.finish().map_err(spool_err)?;
    let (buf, file_hash, file_size) = compressed.finish();
    let mut file = buf.into_inner().map_err(|e| spool_err(e.into_error()))?;
    file.flush().map_err(spool_err)?;
    let (_, path) = tmp.keep().map_err(|e| spool_err(e.error))?;
    Ok(SpooledNar {
        file: path,
        compression: "zstd",
        file_hash,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    //! Error paths and ordering against a fake target; the proof that real caches accept the
    //! result is in the end-to-end tests.

    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::format::hash::Sha256;
    use crate::target::{NarFormat, PreparedNar, Target, TargetError};

    /// What the fake cache saw, in order: `nar <name>` and `narinfo <name>`.
    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<String>>,
        cached: BTreeSet<String>,
        /// Per path name: how put_nar answers, one error per attempt, then success.
        nar_errors: Mutex<HashMap<String, Vec<TargetError>>>,
    }

    #[async_trait]
    impl Target for Fake {
        fn url(&self) -> String {
            "fake://".into()
        }
        fn nar_format(&self) -> NarFormat {
            NarFormat::Raw
        }
        async fn open(&self) -> Result<(), TargetError> {
            Ok(())
        }
        async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
            Ok(paths
                .iter()
                .filter(|p| !self.cached.contains(p.path.name()))
                .map(|p| p.path.clone())
                .collect())
        }
        async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError> {
            let name = nar.info.path.name().to_string();
            // Let other tasks run, so that a wrong order has the chance to show.
            tokio::time::sleep(Duration::from_millis(2)).await;
            if let Some(errors) = self.nar_errors.lock().unwrap().get_mut(&name)
                && !errors.is_empty()
            {
                return Err(errors.remove(0));
            }
            self.log.lock().unwrap().push(format!("nar {name}"));
            Ok(format!("nar/{name}.nar"))
        }
        async fn put_narinfo(&self, narinfo: &NarInfo, _: &PreparedNar) -> Result<(), TargetError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("narinfo {}", narinfo.store_path.name()));
            Ok(())
        }
    }

    fn path(name: &str) -> StorePath {
        let digest = Sha256::digest(name.as_bytes());
        let hash = crate::format::nixbase32::encode(&digest.as_bytes()[..20]);
        StorePath::from_base(&format!("{hash}-{name}")).expect("valid test path")
    }

    /// A store database with Nix's schema holding `graph` (name, references).
    fn store(dir: &Path, graph: &[(&str, &[&str])]) -> Arc<Store> {
        let db = dir.join("db.sqlite");
        let conn = rusqlite::Connection::open(&db).expect("create db");
        conn.execute_batch(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null, \
             hash text not null, registrationTime integer not null, deriver text, narSize integer, \
             ultimate integer, sigs text, ca text);
             CREATE TABLE Refs (referrer integer not null, reference integer not null, primary key (referrer, reference));",
        )
        .expect("schema");
        for (i, (name, _)) in graph.iter().enumerate() {
            conn.execute(
                "INSERT INTO ValidPaths (id, path, hash, registrationTime, narSize) VALUES (?1, ?2, ?3, 1, 8)",
                rusqlite::params![
                    i as i64 + 1,
                    path(name).to_absolute(),
                    format!("sha256:{}", Sha256::digest(name.as_bytes()).to_hex())
                ],
            )
            .expect("insert path");
        }
        let id = |n: &str| graph.iter().position(|(m, _)| *m == n).expect("known") as i64 + 1;
        for (name, refs) in graph {
            for r in *refs {
                conn.execute(
                    "INSERT INTO Refs VALUES (?1, ?2)",
                    rusqlite::params![id(name), id(r)],
                )
                .expect("insert ref");
            }
        }
        drop(conn);
        Arc::new(Store::open(&db).expect("open test db"))
    }

    fn pipeline(store: Arc<Store>, fake: Arc<Fake>, dir: &Path) -> Pipeline {
        Pipeline::new(
            store,
            fake,
            Some(SigningKey::from_seed("test-1", [7; 32])),
            Options {
                jobs: 4,
                spool_dir: dir.to_path_buf(),
                retry: RetryPolicy {
                    retries: 3,
                    min_delay: Duration::from_millis(1),
                    max_delay: Duration::from_millis(5),
                },
            },
        )
    }

    const DIAMOND: &[(&str, &[&str])] = &[
        ("base", &[]),
        ("left", &["base"]),
        ("right", &["base"]),
        ("top", &["left", "right", "top"]),
        ("other", &[]),
    ];

    /// Pushes the named paths of the test store and their closures, not cancelled.
    async fn push_names(p: &Pipeline, names: &[&str]) -> Result<Report, PipelineError> {
        let roots: Vec<StorePath> = names.iter().map(|n| path(n)).collect();
        p.push(&roots, true, &CancellationToken::new()).await
    }

    fn position(log: &[String], entry: &str) -> Option<usize> {
        log.iter().position(|l| l == entry)
    }

    #[tokio::test]
    async fn narinfos_follow_their_nar_and_every_reference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
        let report = push_names(&p, &["top", "other"]).await.expect("push");
        assert_eq!(report.pushed.len(), 5, "{report:?}");
        assert!(report.failed.is_empty());
        let log = fake.log.lock().unwrap().clone();
        for (name, refs) in DIAMOND {
            let info = position(&log, &format!("narinfo {name}")).expect("narinfo stored");
            assert!(position(&log, &format!("nar {name}")).expect("nar stored") < info);
            for r in refs.iter().filter(|r| *r != name) {
                assert!(
                    position(&log, &format!("narinfo {r}")).expect("ref stored") < info,
                    "{name} before its reference {r}: {log:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn cached_paths_are_counted_and_not_uploaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake {
            cached: ["base".to_string(), "left".to_string()].into(),
            ..Default::default()
        });
        let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
        let report = push_names(&p, &["top"]).await.expect("push");
        assert_eq!(report.already_cached, 2);
        assert_eq!(report.total, 4);
        let log = fake.log.lock().unwrap().clone();
        assert!(
            !log.iter()
                .any(|l| l.ends_with(" base") || l.ends_with(" left")),
            "{log:?}"
        );
        assert!(log.contains(&"narinfo top".to_string()));
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_the_upload_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        fake.nar_errors.lock().unwrap().insert(
            "base".into(),
            vec![
                TargetError::transient("503 from the cache"),
                TargetError::transient("connection reset"),
            ],
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path()).with_events(tx);
        let report = push_names(&p, &["top"]).await.expect("push");
        assert_eq!(report.pushed.len(), 4, "{report:?}");
        let mut retries = 0;
        while let Ok(e) = rx.try_recv() {
            if matches!(e, Event::Retrying { .. }) {
                retries += 1;
            }
        }
        assert_eq!(retries, 2);
    }

    #[tokio::test]
    async fn a_permanent_failure_withholds_every_referrer_but_not_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        fake.nar_errors
            .lock()
            .unwrap()
            .insert("left".into(), vec![TargetError::permanent("403 Forbidden")]);
        let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
        let report = push_names(&p, &["top", "other"]).await.expect("push");
        let failed: BTreeSet<&str> = report.failed.iter().map(|f| f.path.name()).collect();
        assert_eq!(failed, BTreeSet::from(["left", "top"]), "{report:?}");
        let top = report
            .failed
            .iter()
            .find(|f| f.path.name() == "top")
            .expect("top failed");
        assert!(top.message.contains("left"), "{}", top.message);
        let log = fake.log.lock().unwrap().clone();
        assert!(!log.contains(&"narinfo left".to_string()));
        assert!(!log.contains(&"narinfo top".to_string()));
        for ok in ["base", "right", "other"] {
            assert!(log.contains(&format!("narinfo {ok}")), "{ok}: {log:?}");
        }
    }

    #[tokio::test]
    async fn exhausted_retries_fail_the_path_with_the_last_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        fake.nar_errors.lock().unwrap().insert(
            "other".into(),
            (0..10)
                .map(|_| TargetError::transient("502 Bad Gateway"))
                .collect(),
        );
        let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
        let report = push_names(&p, &["other"]).await.expect("push");
        assert_eq!(report.failed.len(), 1);
        assert!(
            report.failed[0].message.contains("502"),
            "{:?}",
            report.failed
        );
        assert!(fake.log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_push_starts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
        let cancel = CancellationToken::new();
        cancel.cancel();
        let report = p.push(&[path("top")], true, &cancel).await.expect("push");
        assert_eq!(report.skipped.len(), 4, "{report:?}");
        assert!(fake.log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_path_missing_from_the_store_is_a_plan_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        let p = pipeline(store(dir.path(), DIAMOND), fake, dir.path());
        let err = push_names(&p, &["absent"])
            .await
            .expect_err("not in the store");
        assert!(
            err.to_string().contains(&path("absent").to_absolute()),
            "{err}"
        );
    }
}
