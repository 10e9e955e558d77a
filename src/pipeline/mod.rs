//! The one upload pipeline, shared by `push`, the daemon and the store watchers.
//!
//! **Plan, then execute.** The plan reads the closure from the store, asks the target once
//! (it batches as it likes) which paths it is missing, and counts what is already cached,
//! before a single byte is uploaded. Execution then runs one task per missing path:
//!
//! 1. wait for a worker slot (`jobs` of them, and four small slots per job for paths of
//!    at most 1 MiB of NAR; tasks ask in dependency order, and the slots are fair, so
//!    references get their slots first);
//! 2. prepare the NAR as the target wants it ([`NarFormat`](crate::cache::NarFormat)): for plain caches, serialize the
//!    path from disk, hash it, compress it with zstd and hash the compressed bytes, all on a
//!    blocking thread into a spool file; a NarHash or NarSize that differs from the store's
//!    record stops the path here, before anything leaves the machine;
//! 3. take an upload slot and give the worker slot back, then store the NAR. Storing is
//!    bound by fsync or network latency, not CPU, so [`upload_slots`] of them (more than
//!    `jobs`) keep many small paths moving while the cores compress the next ones. Spooled
//!    NARs waiting for upload are bounded by the slot counts together (plus one worker
//!    slot for a newer run, below);
//! 4. wait until every reference that was missing has its narinfo in the cache, or, for a
//!    target that declares [`ordered_commits`](crate::cache::Target::ordered_commits),
//!    until each was handed over to it;
//! 5. sign the narinfo and store it: the commit point. On an ordered target the path goes
//!    out behind its references without waiting for their answers (one round trip per
//!    closure instead of one per level of its depth); if that commit fails, the path is
//!    sent again the careful way, once its references are stored, so a reference's
//!    failure surfaces as its own error and this path's is retried, never final;
//! 6. once referrers have been told, upload the derivation's build log where the target has
//!    a place for it (once per derivation; a failure is reported, never the path's).
//!
//! So a narinfo is written only after its NAR and its references' narinfos (on an ordered
//! target: applied after them, or not at all), and a path whose reference failed is never
//! published. The guarantee a cache gets from this: **every
//! reference of a narinfo in the cache is in the cache too, or is signed in the local store
//! by one of the `upstream-keys`** (a path substituted from upstream, which the plan leaves
//! there: machines that substitute from this cache fetch it from upstream). Transient target errors are retried with capped
//! exponential backoff and jitter; one failing path does not stop the others, and every path
//! gets an outcome in the [`Report`]. Progress is reported as [`Event`]s; printing is the
//! caller's business.
//!
//! Several runs of one pipeline may go at once (the daemon's run for a backlog, and one
//! for each read of what is queued while it uploads): they share one book of the paths in flight and one set of slots
//! (`book`), so a path is uploaded once however many runs need it, and a newer run's paths
//! get free slots first.
//!
//! # Layout
//!
//! - `book`: the paths in flight and the slots, shared by every run;
//! - `plan`: closure, the one question to the cache, and what is left to upload;
//! - `execute`: one task per missing path, slots, ordering and the commit point;
//! - `prepare`: turning a store path into the NAR a target wants (spooling for plain caches);
//! - `logs`: the build log of a pushed path, uploaded after its narinfo.

mod book;
pub use book::small_slots;
mod execute;
mod logs;
mod plan;
mod prepare;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::{DynTarget, TargetError};
use crate::format::signing::SigningKey;
use crate::format::store_path::StorePath;
use crate::store::{Store, StoreError};

pub use logs::{LogOptions, LogOutcome};
pub use plan::{Plan, signed_by_any};
pub use prepare::spool_zstd;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// The most time spent waiting between attempts at one operation; with it, `retries`
    /// is only an upper bound.
    pub total: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 4,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(15),
            total: None,
        }
    }
}

impl RetryPolicy {
    /// For `push`, which someone waits for: transient failures are retried with backoff for
    /// up to `retry_for` per operation (`retry-timeout`), then the push gives up on them.
    pub fn for_push(retry_for: Duration) -> RetryPolicy {
        RetryPolicy {
            retries: if retry_for.is_zero() { 0 } else { usize::MAX },
            total: Some(retry_for),
            ..RetryPolicy::default()
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
    /// Key names whose signature in the local store means upstream serves the path.
    pub upstream_keys: Vec<String>,
    pub logs: LogOptions,
}

/// Build logs read and uploaded at once.
const LOG_SLOTS: usize = 2;

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
        /// Paths signed by an upstream key, left to upstream.
        upstream: usize,
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
    /// A build log that could not be read or uploaded; its path is pushed all the same.
    LogFailed {
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
    /// A failure that queuing the path again cannot cure, and that a user would agree to
    /// give up on: the path's contents on disk are not what the store recorded. Everything
    /// else, a cache that refuses (a 413, a wrong URL, bad credentials) or a store path that
    /// cannot be read right now, is something a person fixes; the path stays queued until
    /// they have. (A path gone from the store is given up on before the pipeline sees it.)
    pub fn is_permanent(self) -> bool {
        matches!(self, FailureKind::Corrupt)
    }

    /// Whether the cache or this machine needs someone to act, rather than time to pass.
    pub fn needs_attention(self) -> bool {
        matches!(
            self,
            FailureKind::Auth | FailureKind::Permanent | FailureKind::Unreadable
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

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requested: Vec<StorePath>,
    pub total: usize,
    pub already_cached: usize,
    /// Paths signed by an upstream key, not uploaded.
    pub left_upstream: usize,
    pub pushed: Vec<StorePath>,
    pub failed: Vec<PathFailure>,
    /// Not started because of shutdown; still to do.
    pub skipped: Vec<StorePath>,
    /// Build logs stored in the cache.
    pub logs_uploaded: usize,
    /// Build logs that could not be read or uploaded, one line each.
    pub log_failures: Vec<String>,
    /// Build logs not tried because the cache had failed one already.
    pub logs_skipped: usize,
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

pub struct Pipeline {
    store: Arc<Store>,
    target: DynTarget,
    /// `None` for targets that sign themselves (Attic) when no key is configured.
    key: Option<Arc<SigningKey>>,
    opts: Options,
    events: Option<mpsc::UnboundedSender<Event>>,
    /// The target is opened once, on first use, and reused by later runs (the daemon).
    opened: tokio::sync::OnceCell<()>,
    /// A target without a place for logs is mentioned once, not per path.
    logs_unsupported_said: std::sync::atomic::AtomicBool,
    /// Logs are held in memory while they go up (up to `max-log-size` each): a few at once.
    log_slots: tokio::sync::Semaphore,
    /// Paths in flight and the slots, shared by every run at once (see `book`).
    book: book::Book,
}

impl Pipeline {
    pub fn new(
        store: Arc<Store>,
        target: DynTarget,
        key: Option<SigningKey>,
        opts: Options,
    ) -> Pipeline {
        let book = book::Book::new(opts.jobs, upload_slots(opts.jobs));
        Pipeline {
            store,
            target,
            key: key.map(Arc::new),
            opts,
            events: None,
            opened: tokio::sync::OnceCell::new(),
            logs_unsupported_said: std::sync::atomic::AtomicBool::new(false),
            log_slots: tokio::sync::Semaphore::new(LOG_SLOTS),
            book,
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

    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, TargetError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TargetError>>,
    {
        self.retry_times(self.opts.retry.retries, what, op).await
    }

    /// [`Pipeline::retry`] with at most `retries` retries.
    async fn retry_times<T, F, Fut>(
        &self,
        retries: usize,
        what: &str,
        op: F,
    ) -> Result<T, TargetError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TargetError>>,
    {
        let policy = &self.opts.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(retries)
            .with_total_delay(policy.total)
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
