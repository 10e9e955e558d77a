//! Build logs, the one artifact a target may store after a path's narinfo.
//!
//! A log goes up only once its path's narinfo is stored (never instead of it), and whatever
//! happens to it is reported and never fails or holds back the path. Targets with no place
//! for logs (Attic, `ssh://`) say so through [`crate::cache::Target::stores_logs`]; that is
//! said once per pipeline at debug level, not as an error.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use super::{Event, Pipeline};
use crate::buildlog::{self, LogError};
use crate::format::store_path::StorePath;

/// Whether and how build logs are uploaded.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub enabled: bool,
    /// Largest log uploaded (uncompressed bytes); larger ones are skipped and reported.
    pub max_size: u64,
    /// Nix's log directory (`$NIX_LOG_DIR`).
    pub dir: PathBuf,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            enabled: true,
            max_size: crate::buildlog::DEFAULT_MAX_LOG_SIZE,
            dir: buildlog::log_dir(),
        }
    }
}

/// What became of one derivation's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOutcome {
    Uploaded {
        bytes: u64,
    },
    /// Log uploads are off, the target has no place for logs, or this machine has no log.
    NotUploaded,
    /// Could not be read, was too large, or the cache refused it: the message says which.
    Failed {
        message: String,
        /// The cache failed (not the log): further logs of the same run are not tried.
        by_cache: bool,
    },
    /// Not tried: the cache failed an earlier log of the same run.
    Skipped,
}

impl Pipeline {
    pub fn log_options(&self) -> &LogOptions {
        &self.opts.logs
    }

    /// Uploads the build log of `drv` if this machine has one. Never fails: the outcome says
    /// what happened, and a failure is also sent as an event.
    pub async fn upload_log(&self, drv: &StorePath) -> LogOutcome {
        self.upload_log_unless(drv, None).await
    }

    /// [`Pipeline::upload_log`], skipped once `cache_failed` is set, and setting it when the
    /// cache fails this log.
    pub(super) async fn upload_log_unless(
        &self,
        drv: &StorePath,
        cache_failed: Option<&AtomicBool>,
    ) -> LogOutcome {
        let outcome = self.try_upload_log(drv, cache_failed).await;
        // Opening the cache failed (no slot was taken): later logs need not try either.
        if let (LogOutcome::Failed { by_cache: true, .. }, Some(flag)) = (&outcome, cache_failed) {
            flag.store(true, Ordering::Relaxed);
        }
        outcome
    }

    async fn try_upload_log(
        &self,
        drv: &StorePath,
        cache_failed: Option<&AtomicBool>,
    ) -> LogOutcome {
        let opts = &self.opts.logs;
        if !opts.enabled {
            return LogOutcome::NotUploaded;
        }
        if !self.target.stores_logs() {
            if !self.logs_unsupported_said.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    "{}: this cache has no place for build logs; not uploading them",
                    self.target.url()
                );
            }
            return LogOutcome::NotUploaded;
        }
        // A watcher may upload a failed build's log before anything else opened the cache.
        if let Err(e) = self.open_target().await {
            return self.log_failed(
                format!(
                    "{}: build log not uploaded: {}",
                    drv.to_absolute(),
                    e.message
                ),
                true,
            );
        }
        let Ok(_slot) = self.log_slots.acquire().await else {
            return LogOutcome::NotUploaded;
        };
        if cache_failed.is_some_and(|f| f.load(Ordering::Relaxed)) {
            return LogOutcome::Skipped;
        }
        let dir = opts.dir.clone();
        let limit = opts.max_size;
        let drv2 = drv.clone();
        let read = tokio::task::spawn_blocking(move || buildlog::read(&dir, &drv2, limit)).await;
        let log = match read {
            // Nothing to read (a quiet builder), and WebDAV servers such as nginx refuse
            // empty PUTs.
            Ok(Ok(Some(log))) if log.is_empty() => return LogOutcome::NotUploaded,
            Ok(Ok(Some(log))) => log,
            Ok(Ok(None)) => return LogOutcome::NotUploaded,
            Ok(Err(e @ LogError::Incomplete { .. })) => {
                // Another build of the same derivation is writing it right now.
                tracing::debug!("{e}");
                return LogOutcome::NotUploaded;
            }
            Ok(Err(e)) => return self.log_failed(e.to_string(), false),
            Err(e) => return self.log_failed(format!("{drv}: internal error: {e}"), false),
        };
        let bytes = log.len() as u64;
        let log = Bytes::from(log);
        // One retry at most: the path is published already, and a push should not wait
        // minutes on a cache that takes NARs but hangs on logs.
        match self
            .retry_times(
                self.opts.retry.retries.min(1),
                &format!("uploading the build log of {}", drv.to_absolute()),
                || self.target.put_log(drv, log.clone()),
            )
            .await
        {
            Ok(()) => LogOutcome::Uploaded { bytes },
            Err(e) => {
                // Set while this log's slot is still held, so that whoever takes the slot
                // next sees it.
                if let Some(flag) = cache_failed {
                    flag.store(true, Ordering::Relaxed);
                }
                self.log_failed(
                    format!(
                        "{}: build log not uploaded: {}",
                        drv.to_absolute(),
                        e.message
                    ),
                    true,
                )
            }
        }
    }

    fn log_failed(&self, message: String, by_cache: bool) -> LogOutcome {
        tracing::debug!("{message}");
        self.emit(Event::LogFailed {
            message: message.clone(),
        });
        LogOutcome::Failed { message, by_cache }
    }
}
