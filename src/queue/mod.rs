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
//! built on the machine, which is nobody else's business. An existing state directory, or
//! one of these, that someone else owns or may write to is refused (see
//! [`crate::private_dir`]): whoever controls it could plant links that the root daemon
//! would write through, or entries it would upload.
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

mod consumer;
mod producer;
mod record;
mod roots;

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use consumer::Queue;
pub use producer::Producer;
pub use roots::{GcRootError, GcRoots};

use crate::format::store_path::StorePath;
use crate::private_dir::DirError;
use record::VERSION;

const ENTRY_SUFFIX: &str = ".entry";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Dir(#[from] DirError),
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

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Roots(#[from] GcRootError),
}

/// `narpost retry`: queues again the failed entries holding any of `only` (all when empty),
/// each path rooted first, as the hook does, so the collector cannot take it before the
/// drainer sees the entry. Returns how many entries were queued again.
pub fn retry_failed(
    state_dir: &Path,
    roots_dir: &Path,
    only: &[StorePath],
) -> Result<usize, RetryError> {
    let queue = Queue::open(state_dir)?;
    let roots = GcRoots::new(roots_dir);
    roots.check()?;
    let mut count = 0;
    for failed in queue.failed()? {
        let wanted = only.is_empty() || failed.paths.iter().any(|p| only.contains(p));
        // A record that could not be read has no paths to queue; status keeps showing it.
        if !wanted || failed.paths.is_empty() {
            continue;
        }
        roots.protect_all(&failed.paths)?;
        roots.sync()?;
        queue.requeue(&failed)?;
        count += 1;
    }
    Ok(count)
}

/// Name of an entry file; ordering is enqueue order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(pub(super) String);

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
pub(super) fn parse_entry_name(name: &str) -> Option<u64> {
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

pub(super) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(super) fn new_entry_name(nanos: u64) -> String {
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

/// Creates `path` (which must not exist), writes `data` and fsyncs it; removes it again on
/// any failure so a full disk leaves nothing behind.
pub(super) fn write_synced(path: &Path, data: &[u8]) -> Result<(), QueueError> {
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
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

pub(super) fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| QueueError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`. Falls back to a
/// plain rename on filesystems without `RENAME_NOREPLACE`, where unique names still hold.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
