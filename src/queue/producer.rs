//! The producer: what the post-build hook needs to add one entry (see
//! [Concurrency](super#concurrency)).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::record::{Payload, encode_record};
use super::{EntryId, QueueError, new_entry_name, rename_noreplace, unix_nanos, write_synced};
use crate::format::store_path::StorePath;
use crate::private_dir::PrivateDir;

/// The producer's side of a queue: all a post-build hook needs to add an entry. Opening
/// it touches only `queue/` and `tmp/`, because every build waits for the hook; the
/// consumer's chores (stale temp files, the other directories) are left to
/// [`Queue::open`](super::Queue::open).
#[derive(Debug)]
pub struct Producer {
    /// Kept open so every enqueue and ack can fsync the directory without opening it.
    pub(super) queue: PrivateDir,
    pub(super) queue_dir: PathBuf,
    pub(super) tmp_dir: PathBuf,
}

impl Producer {
    /// Creates the state directory, `queue/` and `tmp/` if needed, and refuses them if
    /// someone else could write to them (see [`crate::private_dir`]). An open and an
    /// `fstat` per directory: the hook pays for this on every build.
    pub fn open(state_dir: &Path) -> Result<Producer, QueueError> {
        Producer::open_in(&PrivateDir::open(state_dir)?)
    }

    pub(super) fn open_in(state: &PrivateDir) -> Result<Producer, QueueError> {
        let queue = state.subdir("queue")?;
        let tmp = state.subdir("tmp")?;
        Ok(Producer {
            queue_dir: queue.path().to_path_buf(),
            tmp_dir: tmp.path().to_path_buf(),
            queue,
        })
    }

    /// Adds one entry, durably: when this returns, the entry survives a power loss.
    pub fn enqueue(&self, paths: &[StorePath], drv: Option<&str>) -> Result<EntryId, QueueError> {
        if paths.is_empty() {
            return Err(QueueError::NoPaths);
        }
        let nanos = unix_nanos(SystemTime::now());
        let payload = Payload {
            paths: paths.to_vec(),
            drv: drv.map(str::to_owned),
            queued_at_unix_ns: nanos,
        };
        let record = encode_record(&payload);
        // A collision is practically impossible (pid + 64 random bits); retrying with a new
        // name keeps even that case from failing or overwriting.
        let mut attempts = 0;
        loop {
            let id = EntryId(new_entry_name(nanos));
            let tmp = self.tmp_dir.join(id.as_str());
            let dest = self.queue_dir.join(id.as_str());
            write_synced(&tmp, &record)?;
            match rename_noreplace(&tmp, &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 3 => {
                    let _ = fs::remove_file(&tmp);
                    attempts += 1;
                    continue;
                }
                Err(source) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(QueueError::Write { path: dest, source });
                }
            }
            self.sync_queue_dir()?;
            return Ok(id);
        }
    }

    pub(super) fn sync_queue_dir(&self) -> Result<(), QueueError> {
        self.queue.sync().map_err(|source| QueueError::Sync {
            path: self.queue_dir.clone(),
            source,
        })
    }
}
