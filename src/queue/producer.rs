//! The producer: what the post-build hook needs to add one entry (see
//! [Concurrency](super#concurrency)).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::record::{Payload, encode_record};
use super::{
    EntryId, QueueError, create_private_dir, new_entry_name, rename_noreplace, unix_nanos,
    write_synced,
};
use crate::format::store_path::StorePath;

/// The producer's side of a queue: all a post-build hook needs to add an entry. Opening
/// it touches only `queue/` and `tmp/`, because every build waits for the hook; the
/// consumer's chores (stale temp files, the other directories) are left to
/// [`Queue::open`](super::Queue::open).
#[derive(Debug)]
pub struct Producer {
    pub(super) queue_dir: PathBuf,
    pub(super) tmp_dir: PathBuf,
    /// Kept open so every enqueue and ack can fsync the directory without opening it.
    queue_dir_handle: File,
}

impl Producer {
    /// Creates `queue/` and `tmp/` if needed.
    pub fn open(state_dir: &Path) -> Result<Producer, QueueError> {
        let queue_dir = state_dir.join("queue");
        let tmp_dir = state_dir.join("tmp");
        // The common case is that both exist; trying the open first saves two mkdirs and
        // two stats per build.
        let queue_dir_handle = match File::open(&queue_dir) {
            Ok(handle) => handle,
            Err(_) => {
                create_private_dir(&queue_dir)?;
                File::open(&queue_dir).map_err(|source| QueueError::List {
                    path: queue_dir.clone(),
                    source,
                })?
            }
        };
        if fs::symlink_metadata(&tmp_dir).is_err() {
            create_private_dir(&tmp_dir)?;
        }
        Ok(Producer {
            queue_dir,
            tmp_dir,
            queue_dir_handle,
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
        self.queue_dir_handle
            .sync_all()
            .map_err(|source| QueueError::Sync {
                path: self.queue_dir.clone(),
                source,
            })
    }
}
