//! The durable queue of store paths waiting for upload, and the GC roots that keep those
//! paths alive until they are in the cache.
//!
//! The post-build hook is the producer: one short-lived process per build, often many at
//! once, each adding one entry (the outputs of one build) and exiting. The daemon is the
//! consumer: it lists entries, uploads their closures, and acknowledges an entry once every
//! path in it is in the cache. No process keeps queue state in memory that another one
//! needs: the directory *is* the queue.
//!
//! # On-disk layout
//!
//! ```text
//! <state-dir>/
//!   queue/    one file per entry: <unix-nanos:020>-<pid:010>-<random:016x>.entry
//!   tmp/      entries and failure records being written; never read as entries
//!   corrupt/  files that failed their checks, each with `<name>.reason` beside it
//!   failed/   entries that failed permanently: `<name>.json` with the paths and the reason
//! ```
//!
//! (The drainer keeps its lock, its status file and its spool beside these; see
//! [`crate::daemon`].)
//!
//! Directories are created with mode 0700 and files with 0600: entries name what was
//! built on the machine, which is nobody else's business.
//!
//! Names sort by enqueue time, so name order is oldest first, and the oldest entry's age
//! comes from a name without opening the file. The pid and 64 random bits keep names
//! unique between processes enqueuing in the same nanosecond; the final rename also refuses
//! to replace an existing file (`RENAME_NOREPLACE`), so a collision could never lose an
//! entry anyway.
//!
//! Temporary files live in `tmp/`, not in `queue/` as dot-files: a listing of `queue/`
//! then never meets a half-written file, an inotify watch on `queue/` sees entries arrive
//! only complete (as `IN_MOVED_TO`), and start-up cleanup reads a directory that is almost
//! always empty instead of one holding thousands of entries.
//!
//! # Record format
//!
//! Each entry file holds exactly one record:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "NARPOSTQ"
//! 8       4     format version, u32 little-endian (1)
//! 12      4     payload length in bytes, u32 little-endian
//! 16      4     CRC-32 (IEEE) of the payload, u32 little-endian
//! 20      len   payload: JSON {"paths": ["/nix/store/..."], "drv": "/nix/store/...drv" | null,
//!               "queued_at_unix_ns": 1700000000000000000}
//! ```
//!
//! A file shorter or longer than its header says is torn. Store paths in the payload are
//! validated when read, like every other field: a record is used only after all checks pass.
//!
//! # Invariants
//!
//! 1. A file in `queue/` is complete: it arrived by rename, after its data was fsynced.
//! 2. Nothing from a record is used before its magic, version, length, checksum and payload
//!    (including every store path) have been checked. A record that fails is reported as a
//!    value ([`EntryOrCorrupt::Corrupt`]) naming the file, moved to `corrupt/`, and never
//!    stops the other entries.
//! 3. An entry is deleted only when every path in it is in the cache ([`Queue::ack`]) or
//!    after it has been recorded durably in `failed/` ([`Queue::fail`]).
//! 4. Every path in an entry has had a GC root since before the entry existed (unless
//!    creating it failed, which the hook reports), and keeps it until the path is in the
//!    cache (see [GC roots](#gc-roots), also for what a power loss can do to a root).
//!
//! # What a crash leaves behind, step by step
//!
//! Enqueue is: write `tmp/<name>`, fsync it, rename it to `queue/<name>`, fsync `queue/`.
//!
//! - During the write, or after the fsync but before the rename: a temp file, and no
//!   entry. [`Queue::open`] removes temp files older than a minute (younger ones may belong
//!   to a producer that is still running). The build's outputs are then not queued, but
//!   their GC roots exist, so the daemon finds them (see below).
//! - After the rename, before the directory fsync: after a power loss the rename is either
//!   lost (as above) or kept, and then the entry is complete, because its data was on disk
//!   before the rename. Never a torn entry.
//! - After the directory fsync: the entry is durable, and `enqueue` returns.
//!
//! Ack is: unlink, fsync `queue/`, then the daemon releases the entry's roots. If a crash
//! undoes the unlink, the entry comes back and is processed again; uploads are idempotent
//! (the daemon asks the cache what is missing first), so this costs a query, not a
//! duplicate. A crash after the unlink but before the release leaves roots without an
//! entry: the daemon queues them again (see [GC roots](#gc-roots)), finds the paths in the
//! cache, and releases them.
//!
//! Fail is: write `failed/<name>.json` (temp, fsync, rename, fsync `failed/`), then ack. A
//! crash in between leaves the entry in both places; [`Queue::list`] sees the failure
//! record and finishes the move instead of retrying a path already judged hopeless.
//!
//! Quarantine is a rename into `corrupt/`; if a crash undoes it, the file is found corrupt
//! again on the next listing and moved again. The paths a corrupt entry held cannot be read
//! from it, but they still have their roots, through which the daemon queues them again.
//!
//! Torn or damaged files can still appear (a disk error, a filesystem that ignores fsync,
//! a person editing the directory); that is what the checks are for.
//!
//! # Concurrency
//!
//! Producers need no lock: each writes its own uniquely named file, and the rename makes it
//! appear whole. [`Queue::enqueue`] never lists a directory, so its cost does not grow with
//! the depth of the queue. There is one consumer, the daemon (which holds its own lock); a
//! listing tolerates entries vanishing under it (acknowledged meanwhile) and misses nothing
//! that arrives during it for long: such entries show up in the next listing, or at once
//! through an inotify watch on [`Queue::queue_dir`].
//!
//! # GC roots
//!
//! Between the build and the upload, the only thing keeping a freshly built path from
//! `nix-store --gc` is a GC root. [`GcRoots`] keeps one symlink per store path,
//! `<roots-dir>/<base name>` pointing at the absolute store path, in a directory below
//! Nix's `gcroots` (by default `/nix/var/nix/gcroots/narpost`). A root also keeps the
//! path's whole closure alive, so dependencies need no roots of their own.
//!
//! The hook creates the roots *before* it enqueues: a queued path is then always
//! protected, and the worst a crash between the two steps, or a failed enqueue (disk full,
//! read-only state directory), leaves is a root without an entry. Such an orphan only
//! delays garbage collection, and since its path was built and meant for the cache, the
//! daemon adopts it: at start-up it queues every rooted path that no valid entry holds
//! ([`GcRoots::list_created_before`] now), and every few minutes those whose root is older
//! than a minute (younger ones may belong to a hook about to enqueue; adopting one anyway
//! would only make a duplicate entry). A root whose path is gone from the store is removed.
//!
//! So a roots directory belongs to one state directory: the daemon releases, and adopts,
//! every root in it. Two queues sharing one would push each other's paths and unprotect
//! them before the other had uploaded them.
//!
//! The hook does not fsync the roots directory; the drainer does, for every entry it has
//! not seen before, on its next pass (within moments of the hook, since it watches the
//! queue), and at start-up it creates again the roots of every queued path that is still
//! valid. So a kill -9 or crash of any process at any instant leaves invariant 4 intact;
//! only a power loss in the moments between a hook and the drainer's next pass can drop a
//! root, and start-up puts it back. This is the durability Nix gives its own roots (it makes
//! `result` links and `gcroots/auto` entries with a symlink and a rename, no fsync), and the
//! build's output files are not fsynced by Nix either, so an fsync of the root alone would
//! not keep a power loss from losing the path; the entry, which is fsynced, still records it,
//! and the drainer reports such a path in the failed list rather than losing track of it.
//! The fsync the hook saves is a third of its disk flushes, and Nix waits for the hook after
//! every build.
//!
//! One root serves every entry holding the path, and releasing it when *one* entry is done
//! is safe even if another entry holds the same path: the daemon releases a root only after
//! the path is in the cache. If the garbage collector then deletes the path, the other
//! entry's upload asks the cache what is missing, finds the path present, and skips it; the
//! store copy is not needed any more. The same reasoning covers a hook that finds the root
//! already there just before the daemon releases it.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::format::store_path::StorePath;

const MAGIC: &[u8; 8] = b"NARPOSTQ";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 20;
/// Entries hold the outputs of one build, a few hundred bytes; anything this large is not
/// one of ours, and reading it whole could exhaust memory.
const MAX_ENTRY_LEN: u64 = 16 << 20;
const ENTRY_SUFFIX: &str = ".entry";
/// Temp files younger than this may belong to a producer that is still writing.
const TEMP_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: cannot create queue directory: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path}: cannot write queue entry: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: cannot make queue change durable (fsync failed): {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read queue directory: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("{path}: cannot remove queue entry: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot enqueue an empty list of store paths")]
    NoPaths,
    #[error("{name:?}: not a queue entry name (expected <20 digits>-<pid>-<16 hex digits>.entry)")]
    InvalidId { name: String },
    #[error("{id}: no such queue entry (already acknowledged?)")]
    NotFound { id: EntryId },
    #[error("{id}: cannot record failure of a corrupt entry: {reason}")]
    FailCorrupt { id: EntryId, reason: Corruption },
}

/// Name of an entry file; ordering is enqueue order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(String);

impl EntryId {
    /// Accepts exactly the names [`Queue::enqueue`] makes, so that an id can never point
    /// outside `queue/`.
    pub fn parse(name: &str) -> Result<EntryId, QueueError> {
        if parse_entry_name(name).is_some() {
            Ok(EntryId(name.to_owned()))
        } else {
            Err(QueueError::InvalidId {
                name: name.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the entry was enqueued, from its name.
    pub fn queued_at(&self) -> SystemTime {
        let nanos = parse_entry_name(&self.0).unwrap_or(0);
        UNIX_EPOCH + Duration::from_nanos(nanos)
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Returns the timestamp of a well-formed entry name.
fn parse_entry_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(ENTRY_SUFFIX)?;
    let mut parts = stem.split('-');
    let (time, pid, random) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none()
        && time.len() == 20
        && time.bytes().all(|b| b.is_ascii_digit())
        && !pid.is_empty()
        && pid.len() <= 10
        && pid.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random.bytes().all(|b| b.is_ascii_hexdigit());
    if ok { time.parse().ok() } else { None }
}

/// One valid entry: the outputs of one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub paths: Vec<StorePath>,
    /// The derivation that was built, when the hook knew it (for status and logs only).
    pub drv: Option<String>,
    pub queued_at: SystemTime,
}

/// Why a queue file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("not a queue entry file name")]
    BadName,
    #[error("{size} bytes is too large for a queue entry")]
    TooLarge { size: u64 },
    #[error("truncated: {actual} bytes, expected {expected}")]
    Truncated { expected: u64, actual: u64 },
    #[error("{actual} bytes, expected {expected}: trailing garbage")]
    TrailingBytes { expected: u64, actual: u64 },
    #[error("bad magic: not a narpost queue entry")]
    BadMagic,
    #[error("format version {version} is not supported (this narpost reads version {VERSION})")]
    UnsupportedVersion { version: u32 },
    #[error("checksum mismatch: header says {expected:08x}, payload has {actual:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("invalid payload: {message}")]
    Payload { message: String },
    #[error("unreadable: {message}")]
    Unreadable { message: String },
}

/// What a listing yields per file: corruption is a value, not an error of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryOrCorrupt {
    Valid(Entry),
    Corrupt {
        /// The file's name in `queue/`.
        file: String,
        reason: Corruption,
        /// Where the file was moved, `None` if moving it failed (it is then reported again
        /// by the next listing).
        quarantined_to: Option<PathBuf>,
    },
}

/// An entry given up on, as recorded in `failed/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEntry {
    pub id: EntryId,
    pub paths: Vec<StorePath>,
    pub drv: Option<String>,
    pub queued_at: SystemTime,
    pub failed_at: SystemTime,
    pub reason: String,
}

/// A file that failed its checks, as set aside in `corrupt/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptFile {
    pub file: PathBuf,
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    paths: Vec<StorePath>,
    drv: Option<String>,
    queued_at_unix_ns: u64,
}

#[derive(Serialize, Deserialize)]
struct FailedRecord {
    paths: Vec<StorePath>,
    drv: Option<String>,
    queued_at_unix_ns: u64,
    failed_at_unix_ns: u64,
    reason: String,
}

/// The producer's side of a queue: all a post-build hook needs to add an entry. Opening
/// it touches only `queue/` and `tmp/`, because every build waits for the hook; the
/// consumer's chores (stale temp files, the other directories) are left to [`Queue::open`].
#[derive(Debug)]
pub struct Producer {
    queue_dir: PathBuf,
    tmp_dir: PathBuf,
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

    fn sync_queue_dir(&self) -> Result<(), QueueError> {
        self.queue_dir_handle
            .sync_all()
            .map_err(|source| QueueError::Sync {
                path: self.queue_dir.clone(),
                source,
            })
    }
}

/// Handle on a state directory's queue, for its consumer (the drainer) and for `status`.
/// `Send + Sync`; its methods block (call them from `spawn_blocking` in async code).
#[derive(Debug)]
pub struct Queue {
    producer: Producer,
    corrupt_dir: PathBuf,
    failed_dir: PathBuf,
}

impl Queue {
    /// Creates the directories if needed and removes temp files left by a crash.
    pub fn open(state_dir: &Path) -> Result<Queue, QueueError> {
        let dir = |name: &str| -> Result<PathBuf, QueueError> {
            let path = state_dir.join(name);
            create_private_dir(&path)?;
            Ok(path)
        };
        let queue = Queue {
            producer: Producer::open(state_dir)?,
            corrupt_dir: dir("corrupt")?,
            failed_dir: dir("failed")?,
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
        let failed = self.failed_names();
        let mut out = Vec::new();
        for name in self.names()? {
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
                        self.corrupt_dir.display()
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
        let mut dest = self.corrupt_dir.join(name);
        let mut n = 1;
        while dest.exists() && n < 1000 {
            dest = self.corrupt_dir.join(format!("{name}.{n}"));
            n += 1;
        }
        let quarantined_to = match fs::rename(&src, &dest) {
            Ok(()) => {
                let mut note = dest.clone().into_os_string();
                note.push(".reason");
                let _ = fs::write(PathBuf::from(note), format!("{reason}\n"));
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
        let dest = self.failed_dir.join(&file_name);
        write_synced(&tmp, &json)?;
        if let Err(source) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(QueueError::Write { path: dest, source });
        }
        sync_dir(&self.failed_dir)?;
        self.ack(id)
    }

    fn failed_names(&self) -> HashSet<String> {
        let Ok(dir) = fs::read_dir(&self.failed_dir) else {
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
            path: self.failed_dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(&self.failed_dir).map_err(list_err)? {
            let item = item.map_err(list_err)?;
            let file_name = item.file_name();
            let Some(id) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| EntryId::parse(n).ok())
            else {
                continue;
            };
            let parsed = fs::read(item.path())
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
            path: self.corrupt_dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(&self.corrupt_dir).map_err(list_err)? {
            let item = item.map_err(list_err)?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".reason") {
                continue;
            }
            let reason = fs::read_to_string(self.corrupt_dir.join(format!("{name}.reason")))
                .map(|r| r.trim().to_owned())
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

fn create_private_dir(path: &Path) -> Result<(), QueueError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| QueueError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn new_entry_name(nanos: u64) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // `RandomState` is seeded from the OS's randomness once per process; hashing a counter
    // through it gives fresh unpredictable bits per call without a dependency.
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u64(nanos);
    format!(
        "{nanos:020}-{:010}-{:016x}{ENTRY_SUFFIX}",
        std::process::id(),
        hasher.finish()
    )
}

fn encode_record(payload: &Payload) -> Vec<u8> {
    // Serializing plain strings and integers cannot fail.
    let json = serde_json::to_vec(payload).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

fn decode_record(bytes: &[u8]) -> Result<Payload, Corruption> {
    let actual = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        // A short prefix of the magic is a torn write; anything else is not ours.
        if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Err(Corruption::BadMagic);
        }
        return Err(Corruption::Truncated {
            expected: HEADER_LEN as u64,
            actual,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(Corruption::UnsupportedVersion { version });
    }
    let expected = HEADER_LEN as u64 + u64::from(word(12));
    if actual < expected {
        return Err(Corruption::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(Corruption::TrailingBytes { expected, actual });
    }
    let payload = &bytes[HEADER_LEN..];
    let (stored, computed) = (word(16), crc32fast::hash(payload));
    if stored != computed {
        return Err(Corruption::Checksum {
            expected: stored,
            actual: computed,
        });
    }
    serde_json::from_slice(payload).map_err(|e| Corruption::Payload {
        message: e.to_string(),
    })
}

/// The file's bytes, or `Err(size)` inside `Ok` when it is too large to be an entry.
fn read_limited(path: &Path) -> io::Result<Result<Vec<u8>, u64>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size > MAX_ENTRY_LEN {
        return Ok(Err(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_ENTRY_LEN + 1).read_to_end(&mut bytes)?;
    Ok(Ok(bytes))
}

/// Creates `path` (which must not exist), writes `data` and fsyncs it; removes it again on
/// any failure so a full disk leaves nothing behind.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), QueueError> {
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let written = file.write_all(data).and_then(|()| file.sync_data());
        if written.is_err() {
            let _ = fs::remove_file(path);
        }
        written
    })();
    result.map_err(|source| QueueError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| QueueError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`. Falls back to a
/// plain rename on filesystems without `RENAME_NOREPLACE`, where unique names still hold.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------
// GC roots

#[derive(Debug, thiserror::Error)]
pub enum GcRootError {
    #[error("{path}: cannot create GC root directory: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path}: cannot create GC root: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path}: cannot make GC roots durable (fsync failed): {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("{path}: cannot remove GC root: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read GC root directory: {source}")]
    List { path: PathBuf, source: io::Error },
}

/// One symlink per protected store path in a directory below Nix's `gcroots`.
#[derive(Debug, Clone)]
pub struct GcRoots {
    dir: PathBuf,
}

impl GcRoots {
    pub fn new(dir: impl Into<PathBuf>) -> GcRoots {
        GcRoots { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Protects one path; see [`GcRoots::protect_all`].
    pub fn protect(&self, path: &StorePath) -> Result<(), GcRootError> {
        self.protect_all(std::slice::from_ref(path))
    }

    /// Creates a root for each path. The garbage collector sees a root the moment it exists,
    /// and it outlives any process; it is on disk only after [`GcRoots::sync`] or the
    /// kernel's writeback (see [GC roots](self#gc-roots) for why the hook does not wait).
    pub fn protect_all(&self, paths: &[StorePath]) -> Result<(), GcRootError> {
        for path in paths {
            self.link(path)?;
        }
        Ok(())
    }

    /// Makes the roots created so far survive a power loss (fsync of the directory).
    pub fn sync(&self) -> Result<(), GcRootError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| GcRootError::Sync {
                path: self.dir.clone(),
                source,
            })
    }

    fn link(&self, path: &StorePath) -> Result<(), GcRootError> {
        let link = self.dir.join(path.base());
        let target = path.to_absolute();
        let create_err = |source| GcRootError::Create {
            path: link.clone(),
            source,
        };
        match std::os::unix::fs::symlink(&target, &link) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&self.dir)
                    .map_err(|source| GcRootError::CreateDir {
                        path: self.dir.clone(),
                        source,
                    })?;
                match std::os::unix::fs::symlink(&target, &link) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(create_err(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(create_err(e)),
        }
        if fs::read_link(&link).is_ok_and(|t| t.as_os_str() == OsStr::new(&target)) {
            return Ok(());
        }
        // Something else has the name (a stale file, a link elsewhere): replace it
        // atomically, so there is no moment without a root.
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), new_entry_name(0)));
        std::os::unix::fs::symlink(&target, &tmp).map_err(create_err)?;
        fs::rename(&tmp, &link).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            create_err(e)
        })
    }

    /// Removes a path's root. Call only once the path is in the cache (see the module doc).
    /// A root that cannot be removed only delays garbage collection, so the failure is logged
    /// as a warning rather than returned; [`GcRoots::try_release`] returns it.
    pub fn release(&self, path: &StorePath) {
        if let Err(e) = self.try_release(path) {
            tracing::warn!("{e}");
        }
    }

    /// [`GcRoots::release`], returning the failure. A root that is already gone is not one.
    pub fn try_release(&self, path: &StorePath) -> Result<(), GcRootError> {
        let link = self.dir.join(path.base());
        match fs::remove_file(&link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(GcRootError::Remove { path: link, source }),
        }
    }

    /// Paths that have a root here, sorted; other files in the directory are ignored. An
    /// absent directory has no roots.
    pub fn list(&self) -> Result<Vec<StorePath>, GcRootError> {
        self.list_created_before(None)
    }

    /// [`GcRoots::list`], keeping only roots created before `cutoff` (all when `None`): a
    /// younger root may belong to a hook that has not written its queue entry yet.
    pub fn list_created_before(
        &self,
        cutoff: Option<SystemTime>,
    ) -> Result<Vec<StorePath>, GcRootError> {
        let list_err = |source| GcRootError::List {
            path: self.dir.clone(),
            source,
        };
        let dir = match fs::read_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list_err(e)),
        };
        let mut out = Vec::new();
        for item in dir {
            let item = item.map_err(list_err)?;
            let Some(path) = item
                .file_name()
                .to_str()
                .and_then(|n| StorePath::from_base(n).ok())
            else {
                continue;
            };
            if let Some(cutoff) = cutoff {
                let created = fs::symlink_metadata(item.path()).and_then(|m| m.modified());
                if !created.is_ok_and(|t| t < cutoff) {
                    continue;
                }
            }
            if fs::read_link(item.path())
                .is_ok_and(|t| t.as_os_str() == OsStr::new(&path.to_absolute()))
            {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::from_base(&format!("2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-{name}")).unwrap()
    }

    #[test]
    fn entry_names_parse_and_sort_by_time() {
        let a = new_entry_name(5);
        let b = new_entry_name(40);
        assert!(a < b, "{a} < {b}");
        let id = EntryId::parse(&a).unwrap();
        assert_eq!(id.queued_at(), UNIX_EPOCH + Duration::from_nanos(5));
        for bad in [
            "x.entry",
            "../00000000000000000005-1-0123456789abcdef.entry",
            "00000000000000000005-1-0123456789abcdef",
            "00000000000000000005-1-0123456789abcdeg.entry",
            "0000000000000000005-1-0123456789abcdef.entry",
            "00000000000000000005--0123456789abcdef.entry",
        ] {
            assert!(EntryId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn record_round_trip_and_every_corruption() {
        let payload = Payload {
            paths: vec![sp("a"), sp("b")],
            drv: Some("/nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-a.drv".into()),
            queued_at_unix_ns: 7,
        };
        let rec = encode_record(&payload);
        let back = decode_record(&rec).unwrap();
        assert_eq!(back.paths, payload.paths);
        assert_eq!(back.drv, payload.drv);
        assert_eq!(back.queued_at_unix_ns, 7);

        let n = rec.len() as u64;
        assert_eq!(
            decode_record(&rec[..rec.len() - 1]).err(),
            Some(Corruption::Truncated {
                expected: n,
                actual: n - 1
            })
        );
        assert_eq!(
            decode_record(&rec[..3]).err(),
            Some(Corruption::Truncated {
                expected: 20,
                actual: 3
            })
        );
        assert_eq!(decode_record(b"hello").err(), Some(Corruption::BadMagic));
        let mut longer = rec.clone();
        longer.push(b'\n');
        assert_eq!(
            decode_record(&longer).err(),
            Some(Corruption::TrailingBytes {
                expected: n,
                actual: n + 1
            })
        );
        let mut flipped = rec.clone();
        *flipped.last_mut().unwrap() ^= 0x20;
        assert!(matches!(
            decode_record(&flipped),
            Err(Corruption::Checksum { .. })
        ));
        let mut version = rec.clone();
        version[8] = 9;
        assert_eq!(
            decode_record(&version).err(),
            Some(Corruption::UnsupportedVersion { version: 9 })
        );
        // A checksummed payload that names an invalid store path is still refused.
        let json = br#"{"paths":["/nix/store/nope"],"drv":null,"queued_at_unix_ns":1}"#;
        let mut bad = Vec::new();
        bad.extend_from_slice(MAGIC);
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bad.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
        bad.extend_from_slice(json);
        let err = decode_record(&bad).err().unwrap();
        assert!(
            matches!(&err, Corruption::Payload { message } if message.contains("/nix/store/nope")),
            "{err}"
        );
    }
}
