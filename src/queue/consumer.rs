//! The consumer's side: listing, acknowledging and failing entries, and what `status`
//! reads (see [What a crash leaves behind](super#what-a-crash-leaves-behind-step-by-step)).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::record::{FailedRecord, decode_record, read_limited};
use super::{
    CorruptFile, Corruption, Entry, EntryId, EntryOrCorrupt, FailedEntry, Producer, QueueError,
    parse_entry_name, sync_dir, unix_nanos, write_synced,
};
use crate::format::store_path::StorePath;
use crate::private_dir::PrivateDir;

/// Temp files younger than this may belong to a producer that is still writing.
const TEMP_GRACE: Duration = Duration::from_secs(60);
/// Failure records and reasons are a few kilobytes; a larger file is not one of ours.
const MAX_RECORD_LEN: u64 = 1 << 20;

/// Handle on a state directory's queue, for its consumer (the drainer) and for `status`.
/// `Send + Sync`; its methods block (call them from `spawn_blocking` in async code).
#[derive(Debug)]
pub struct Queue {
    producer: Producer,
    corrupt: PrivateDir,
    failed: PrivateDir,
}

impl Queue {
    /// Creates the directories if needed, refuses them if someone else could write to
    /// them (see [`crate::private_dir`]), and removes temp files left by a crash.
    pub fn open(state_dir: &Path) -> Result<Queue, QueueError> {
        let state = PrivateDir::open(state_dir)?;
        let corrupt = state.subdir("corrupt")?;
        let failed = state.subdir("failed")?;
        let queue = Queue {
            producer: Producer::open_in(&state)?,
            corrupt,
            failed,
        };
        queue.remove_stale_temps();
        Ok(queue)
    }

    /// The directory to watch for new entries; they arrive only by rename (`IN_MOVED_TO`).
    pub fn queue_dir(&self) -> &Path {
        &self.producer.queue_dir
    }

    /// Best effort: a temp file that cannot be removed now is tried again next start.
    fn remove_stale_temps(&self) {
        let Ok(dir) = fs::read_dir(&self.producer.tmp_dir) else {
            return;
        };
        let now = SystemTime::now();
        for item in dir.flatten() {
            let stale = item
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= TEMP_GRACE)
                .unwrap_or(false);
            if stale {
                let _ = fs::remove_file(item.path());
            }
        }
    }

    /// Adds one entry, durably: see [`Producer::enqueue`].
    pub fn enqueue(&self, paths: &[StorePath], drv: Option<&str>) -> Result<EntryId, QueueError> {
        self.producer.enqueue(paths, drv)
    }

    fn sync_queue_dir(&self) -> Result<(), QueueError> {
        self.producer.sync_queue_dir()
    }

    /// Names of entry files, oldest first, without opening them.
    fn names(&self) -> Result<Vec<String>, QueueError> {
        let list_err = |source| QueueError::List {
            path: self.producer.queue_dir.clone(),
            source,
        };
        let mut names = Vec::new();
        for item in fs::read_dir(&self.producer.queue_dir).map_err(list_err)? {
            let item = item.map_err(list_err)?;
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(name) = item.file_name().to_str().map(str::to_owned) else {
                // Not ours either; reported by `list` under its lossy name.
                names.push(item.file_name().to_string_lossy().into_owned());
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Every entry, oldest first. Corrupt files are moved to `corrupt/` and reported in
    /// place; entries that vanish during the listing (acknowledged meanwhile) are left out.
    pub fn list(&self) -> Result<Vec<EntryOrCorrupt>, QueueError> {
        self.list_except(&HashSet::new())
    }

    /// [`Queue::list`] without the entries in `known`, which are not even opened: what
    /// arrived since a listing, for the price of reading the directory.
    pub fn list_except(&self, known: &HashSet<EntryId>) -> Result<Vec<EntryOrCorrupt>, QueueError> {
        let failed = self.failed_names();
        let mut out = Vec::new();
        for name in self.names()? {
            if known.contains(&EntryId(name.clone())) {
                continue;
            }
            if EntryId::parse(&name).is_err() {
                out.push(self.quarantine(&name, Corruption::BadName));
                continue;
            }
            if failed.contains(&name) {
                // A crash interrupted `fail` after the failure was recorded: finish it.
                let _ = fs::remove_file(self.producer.queue_dir.join(&name));
                continue;
            }
            if let Some(item) = self.read_name(&name)? {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// The valid entries, oldest first: [`Queue::list`] for a consumer that only acts on
    /// valid ones. Corrupt files are still moved to `corrupt/`, and logged as warnings.
    pub fn entries(&self) -> Result<Vec<Entry>, QueueError> {
        let mut out = Vec::new();
        for item in self.list()? {
            match item {
                EntryOrCorrupt::Valid(entry) => out.push(entry),
                EntryOrCorrupt::Corrupt {
                    file,
                    reason,
                    quarantined_to,
                } => match quarantined_to {
                    Some(to) => tracing::warn!(
                        "{}: corrupt queue entry ({reason}); moved to {}",
                        self.producer.queue_dir.join(&file).display(),
                        to.display()
                    ),
                    None => tracing::warn!(
                        "{}: corrupt queue entry ({reason}); could not move it to {}",
                        self.producer.queue_dir.join(&file).display(),
                        self.corrupt.path().display()
                    ),
                },
            }
        }
        Ok(out)
    }

    /// Reads one entry; `None` if it does not exist (any more). A corrupt entry is moved to
    /// `corrupt/` and reported, like in [`Queue::list`].
    pub fn read(&self, id: &EntryId) -> Result<Option<EntryOrCorrupt>, QueueError> {
        self.read_name(id.as_str())
    }

    fn read_name(&self, name: &str) -> Result<Option<EntryOrCorrupt>, QueueError> {
        let path = self.producer.queue_dir.join(name);
        let bytes = match read_limited(&path) {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(size)) => return Ok(Some(self.quarantine(name, Corruption::TooLarge { size }))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                let reason = Corruption::Unreadable {
                    message: e.to_string(),
                };
                return Ok(Some(self.quarantine(name, reason)));
            }
        };
        Ok(Some(match decode_record(&bytes) {
            Ok(payload) => EntryOrCorrupt::Valid(Entry {
                id: EntryId(name.to_owned()),
                paths: payload.paths,
                drv: payload.drv,
                queued_at: UNIX_EPOCH + Duration::from_nanos(payload.queued_at_unix_ns),
            }),
            Err(reason) => self.quarantine(name, reason),
        }))
    }

    /// Moves a refused file out of the way, with its reason beside it for whoever looks.
    fn quarantine(&self, name: &str, reason: Corruption) -> EntryOrCorrupt {
        let src = self.producer.queue_dir.join(name);
        let mut dest = self.corrupt.path().join(name);
        let mut n = 1;
        while dest.exists() && n < 1000 {
            dest = self.corrupt.path().join(format!("{name}.{n}"));
            n += 1;
        }
        let quarantined_to = match fs::rename(&src, &dest) {
            Ok(()) => {
                self.write_reason(&dest, &reason);
                Some(dest)
            }
            Err(_) => None,
        };
        EntryOrCorrupt::Corrupt {
            file: name.to_owned(),
            reason,
            quarantined_to,
        }
    }

    /// Best effort: the `.reason` beside a quarantined file, never written through a link.
    fn write_reason(&self, dest: &Path, reason: &Corruption) {
        let Some(name) = dest.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        let note = format!("{name}.reason");
        // A stale note of an earlier file by the same name is replaced, not appended to.
        let _ = self.corrupt.remove(&note);
        if let Ok(mut file) = self.corrupt.create_new(&note) {
            let _ = io::Write::write_all(&mut file, format!("{reason}\n").as_bytes());
        }
    }

    /// Deletes an entry whose paths are all in the cache. Acknowledging an entry that is
    /// already gone is not an error: the work it stood for is done either way.
    pub fn ack(&self, id: &EntryId) -> Result<(), QueueError> {
        let path = self.producer.queue_dir.join(id.as_str());
        match fs::remove_file(&path) {
            Ok(()) => self.sync_queue_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(QueueError::Remove { path, source }),
        }
    }

    /// Gives up on an entry: records it with `reason` in `failed/`, then removes it.
    pub fn fail(&self, id: &EntryId, reason: &str) -> Result<(), QueueError> {
        let entry = match self.read(id)? {
            Some(EntryOrCorrupt::Valid(entry)) => entry,
            Some(EntryOrCorrupt::Corrupt { reason, .. }) => {
                return Err(QueueError::FailCorrupt {
                    id: id.clone(),
                    reason,
                });
            }
            None => return Err(QueueError::NotFound { id: id.clone() }),
        };
        let record = FailedRecord {
            paths: entry.paths,
            drv: entry.drv,
            queued_at_unix_ns: unix_nanos(entry.queued_at),
            failed_at_unix_ns: unix_nanos(SystemTime::now()),
            reason: reason.to_owned(),
        };
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let file_name = format!("{}.json", id.as_str());
        let tmp = self.producer.tmp_dir.join(&file_name);
        let dest = self.failed.path().join(&file_name);
        write_synced(&tmp, &json)?;
        if let Err(source) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(QueueError::Write { path: dest, source });
        }
        sync_dir(self.failed.path())?;
        self.ack(id)
    }

    /// Puts an entry given up on back in the queue (as a new entry with the same paths
    /// and derivation), then removes its failure record: a crash between the two leaves
    /// the paths queued and still listed as failed, never neither. Returns the new entry.
    pub fn requeue(&self, failed: &FailedEntry) -> Result<EntryId, QueueError> {
        let id = self
            .producer
            .enqueue(&failed.paths, failed.drv.as_deref())?;
        let name = format!("{}.json", failed.id.as_str());
        let path = self.failed.path().join(&name);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(self.failed.path())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(QueueError::Remove { path, source }),
        }
        Ok(id)
    }

    fn failed_names(&self) -> HashSet<String> {
        let Ok(dir) = fs::read_dir(self.failed.path()) else {
            return HashSet::new();
        };
        dir.flatten()
            .filter_map(|item| {
                let name = item.file_name();
                name.to_str()?.strip_suffix(".json").map(str::to_owned)
            })
            .collect()
    }

    /// Entries given up on, oldest first. A record that cannot be read is still listed,
    /// with no paths and the problem as its reason, so it is not silently invisible.
    pub fn failed(&self) -> Result<Vec<FailedEntry>, QueueError> {
        let list_err = |source| QueueError::List {
            path: self.failed.path().to_path_buf(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(self.failed.path()).map_err(list_err)? {
            let item = item.map_err(list_err)?;
            let file_name = item.file_name();
            let Some(id) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| EntryId::parse(n).ok())
            else {
                continue;
            };
            let parsed = self
                .failed
                .read(&file_name.to_string_lossy(), MAX_RECORD_LEN)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<FailedRecord>(&b).map_err(|e| e.to_string())
                });
            out.push(match parsed {
                Ok(r) => FailedEntry {
                    id,
                    paths: r.paths,
                    drv: r.drv,
                    queued_at: UNIX_EPOCH + Duration::from_nanos(r.queued_at_unix_ns),
                    failed_at: UNIX_EPOCH + Duration::from_nanos(r.failed_at_unix_ns),
                    reason: r.reason,
                },
                Err(message) => FailedEntry {
                    queued_at: id.queued_at(),
                    failed_at: id.queued_at(),
                    id,
                    paths: Vec::new(),
                    drv: None,
                    reason: format!("unreadable failure record: {message}"),
                },
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Files set aside in `corrupt/`, oldest name first, each with the reason recorded
    /// beside it (or why that could not be read).
    pub fn corrupt(&self) -> Result<Vec<CorruptFile>, QueueError> {
        let list_err = |source| QueueError::List {
            path: self.corrupt.path().to_path_buf(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(self.corrupt.path()).map_err(list_err)? {
            let item = item.map_err(list_err)?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".reason") {
                continue;
            }
            let reason = self
                .corrupt
                .read(&format!("{name}.reason"), MAX_RECORD_LEN)
                .map(|r| String::from_utf8_lossy(&r).trim().to_owned())
                .unwrap_or_else(|e| format!("reason not recorded: {e}"));
            out.push(CorruptFile {
                file: item.path(),
                reason,
            });
        }
        out.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(out)
    }

    /// Number of entries waiting, without reading them.
    pub fn depth(&self) -> Result<usize, QueueError> {
        Ok(self
            .names()?
            .iter()
            .filter(|n| parse_entry_name(n).is_some())
            .count())
    }

    /// Age of the oldest waiting entry, from its name; `None` when the queue is empty.
    pub fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        let oldest = self.names()?.iter().find_map(|n| EntryId::parse(n).ok());
        Ok(oldest.map(|id| {
            SystemTime::now()
                .duration_since(id.queued_at())
                .unwrap_or_default()
        }))
    }
}
