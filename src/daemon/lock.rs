//! One drainer per state directory: the exclusive lock on `drain.lock`.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::LOCK_FILE;
use crate::private_dir::PrivateDir;

/// How long [`DrainLock::acquire`] waits for a holder that is exiting.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Holds the state directory's drain lock for the life of the process.
pub struct DrainLock {
    _file: std::fs::File,
}

impl DrainLock {
    /// Creates the state directory if needed and refuses one someone else could write to
    /// (see [`crate::private_dir`]), before anything is written there.
    pub async fn acquire(state_dir: &Path) -> anyhow::Result<DrainLock> {
        match DrainLock::try_acquire(state_dir).await? {
            Some(lock) => Ok(lock),
            None => anyhow::bail!(
                "{}: another narpost daemon or watcher is already draining this queue\nhint: stop it, or give this one its own --state-dir",
                state_dir.display()
            ),
        }
    }

    /// [`DrainLock::acquire`], answering `None` when another process holds the lock.
    pub async fn try_acquire(state_dir: &Path) -> anyhow::Result<Option<DrainLock>> {
        let dir = PrivateDir::open(state_dir)?;
        let file = dir
            .open_or_create(LOCK_FILE)
            .with_context(|| format!("{}: cannot open lock file", dir.join(LOCK_FILE).display()))?;
        // A predecessor killed a moment ago (with its original process, see
        // crate::priority) may still be exiting: give it a moment to let go.
        let mut wait = LOCK_WAIT;
        let locked = loop {
            match rustix::fs::flock(
                file.as_fd(),
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            ) {
                Ok(()) => break true,
                Err(_) if !wait.is_zero() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    wait = wait.saturating_sub(Duration::from_millis(20));
                }
                Err(_) => break false,
            }
        };
        Ok(locked.then_some(DrainLock { _file: file }))
    }

    /// Whether some process holds the lock now (for `status`).
    pub fn is_held(state_dir: &Path) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
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
