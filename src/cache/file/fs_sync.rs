//! Narinfo commits in rounds of one `syncfs` each (see
//! [Which syncs, and why no more](super#which-syncs-and-why-no-more)).
//!
//! One `syncfs` makes everything written so far on the cache's filesystem durable, however
//! many files that is: a thousand tiny paths cost a few dozen calls instead of thousands of
//! `fdatasync`s and directory syncs, each of which is a journal commit of its own. One
//! thread, the committer, runs the rounds:
//!
//! ```text
//! take every commit handed in since the last round   (their NARs are in place)
//! write their narinfos to temporary files
//! syncfs                                             (makes the NARs and those files
//!                                                     durable, and the renames of the
//!                                                     round before)
//! report the round before's commits done
//! rename this round's narinfos into place            (made durable by the next round)
//! ```
//!
//! Writing the narinfos here, not on the caller's thread, spares each path a hand-off to
//! a blocking thread and back: on a small VM those thread switches cost more than the
//! writes.
//!
//! A round with nothing new still syncs when the round before renamed something, so a commit
//! is reported done at most two syncs after it was handed in, and while syncs run the next
//! round's commits gather: the busier the cache, the more each sync covers.
//!
//! The price is that `syncfs` also writes out whatever else is dirty on that filesystem,
//! which is a build's business, not ours; so rounds are used only while the whole machine has
//! little dirty data ([`DIRTY_LIMIT`]). Otherwise the caller syncs its own files one by one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// At most this much dirty or in-flight page cache, machine-wide, for rounds to be used.
/// Writing it out costs a slow disk a fraction of a second; past it, the dirty data is
/// someone else's (a build writing into the store) and forcing it out early would spend
/// their disk bandwidth on our durability.
pub(super) const DIRTY_LIMIT: u64 = 64 << 20;

/// How long an answer about the machine's dirty data stands.
const RECHECK: Duration = Duration::from_millis(100);

/// One narinfo to write and rename into place once the bytes behind it are durable.
pub(super) struct Commit {
    /// A name of its own for the temporary file, in `dest`'s directory.
    pub(super) tmp: PathBuf,
    pub(super) dest: PathBuf,
    pub(super) text: Vec<u8>,
    pub(super) done: oneshot::Sender<Outcome>,
}

/// How a commit ended: done, or the file that failed and why.
pub(super) type Outcome = Result<(), (PathBuf, io::Error)>;

pub(super) struct FsSync {
    dir: PathBuf,
    /// Started at the first commit (the cache directory may not exist before); `None` inside
    /// when the directory could not be opened, so every caller syncs its own files.
    committer: Mutex<Option<Option<mpsc::Sender<Commit>>>>,
    /// Bytes of dirty page cache machine-wide, or `None` when unknown.
    dirty: fn() -> Option<u64>,
    /// The last answer to whether rounds may be used, and when it was found: asked again
    /// only after [`RECHECK`], since reading `/proc/meminfo` costs a tiny path more than
    /// its own writes.
    allowed: Mutex<Option<(Instant, bool)>>,
    /// How many syncs ran: shows in tests that commits share them.
    pub(super) syncs: Arc<AtomicU64>,
}

impl FsSync {
    pub(super) fn new(dir: &Path) -> Self {
        Self::with_dirty(dir, machine_dirty_bytes)
    }

    pub(super) fn with_dirty(dir: &Path, dirty: fn() -> Option<u64>) -> Self {
        FsSync {
            dir: dir.to_path_buf(),
            committer: Mutex::new(None),
            dirty,
            allowed: Mutex::new(None),
            syncs: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Hands a commit to the committer; gives it back when this filesystem is not to be
    /// synced whole now, so the caller must sync its own files and rename it itself.
    pub(super) fn submit(&self, commit: Commit) -> Result<(), Commit> {
        if !self.allowed() {
            return Err(commit);
        }
        let mut slot = self.committer.lock().unwrap_or_else(|p| p.into_inner());
        let sender = slot.get_or_insert_with(|| self.start());
        match sender {
            Some(tx) => tx.send(commit).map_err(|mpsc::SendError(c)| c),
            None => Err(commit),
        }
    }

    fn allowed(&self) -> bool {
        let mut last = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, answer)) if at.elapsed() < RECHECK => answer,
            _ => {
                let answer = (self.dirty)().is_some_and(|d| d <= DIRTY_LIMIT);
                *last = Some((Instant::now(), answer));
                answer
            }
        }
    }

    fn start(&self) -> Option<mpsc::Sender<Commit>> {
        let root = File::open(&self.dir).ok()?;
        let (tx, rx) = mpsc::channel();
        let syncs = self.syncs.clone();
        // Ends when the target is dropped (the sender with it) and nothing is left to do.
        std::thread::Builder::new()
            .name("narpost-commit".into())
            .spawn(move || run(&root, &rx, &syncs))
            .ok()?;
        Some(tx)
    }
}

/// The committer's rounds (see the module doc).
fn run(root: &File, rx: &mpsc::Receiver<Commit>, syncs: &AtomicU64) {
    let mut renamed: Vec<Commit> = Vec::new();
    loop {
        let mut batch = Vec::new();
        if renamed.is_empty() {
            match rx.recv() {
                Ok(c) => batch.push(c),
                Err(mpsc::RecvError) => return,
            }
        }
        batch.extend(rx.try_iter());
        let batch: Vec<Commit> = batch
            .into_iter()
            .filter_map(
                |c| match write_new(&c.tmp, false, |f| f.write_all(&c.text)) {
                    Ok(()) => Some(c),
                    Err(e) => {
                        let _ = fs::remove_file(&c.tmp);
                        let _ = c.done.send(Err((c.dest.clone(), e)));
                        None
                    }
                },
            )
            .collect();
        let synced = rustix::fs::syncfs(root).map_err(io::Error::from);
        syncs.fetch_add(1, Ordering::Relaxed);
        // Every commit this sync was for fails with it (an io::Error is not Clone).
        let unsynced = |c: &Commit| {
            synced
                .as_ref()
                .map_err(|e| (c.dest.clone(), io::Error::new(e.kind(), e.to_string())))
                .copied()
        };
        for c in renamed.drain(..) {
            let result = unsynced(&c);
            let _ = c.done.send(result);
        }
        for c in batch {
            let result = unsynced(&c)
                .and_then(|()| fs::rename(&c.tmp, &c.dest).map_err(|e| (c.dest.clone(), e)));
            match result {
                Ok(()) => renamed.push(c),
                Err(e) => {
                    let _ = fs::remove_file(&c.tmp);
                    let _ = c.done.send(Err(e));
                }
            }
        }
    }
}

/// Files are readable by everyone, like the ones Nix writes, so a web server can serve them.
/// Set explicitly, not through a creation mode: the daemon's unit runs with UMask=0077.
pub(super) const FILE_MODE: u32 = 0o644;

/// Creates `path`, which must not exist, with [`FILE_MODE`], and fills it; its data synced
/// when `sync` is set.
pub(super) fn write_new(
    path: &Path,
    sync: bool,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    fill(&mut file)?;
    if sync {
        file.sync_data()?;
    }
    Ok(())
}

/// `Dirty` plus `Writeback` from `/proc/meminfo`, in bytes.
fn machine_dirty_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    dirty_in_meminfo(&text)
}

fn dirty_in_meminfo(text: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let rest = line[name.len()..].trim();
        let kib = rest.strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        kib.checked_mul(1024)
    };
    field("Dirty:")?.checked_add(field("Writeback:")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read() {
        let text = "MemTotal:        8000000 kB\nDirty:              1200 kB\nWriteback:            24 kB\nWritebackTmp:          0 kB\n";
        assert_eq!(dirty_in_meminfo(text), Some((1200 + 24) * 1024));
        assert_eq!(dirty_in_meminfo("Dirty: 12 kB\n"), None);
        assert_eq!(dirty_in_meminfo("Dirty: x kB\nWriteback: 0 kB\n"), None);
        // This machine's own file parses.
        assert!(machine_dirty_bytes().is_some());
    }

    fn commit(dir: &Path, name: &str) -> (Commit, oneshot::Receiver<Outcome>) {
        let (done, rx) = oneshot::channel();
        let c = Commit {
            tmp: dir.join(format!(".tmp-{name}")),
            dest: dir.join(name),
            text: name.as_bytes().to_vec(),
            done,
        };
        (c, rx)
    }

    #[test]
    fn commits_share_syncs_and_are_done_only_after_a_sync_that_follows_their_rename() {
        let dir = tempfile::tempdir().unwrap();
        let sync = FsSync::with_dirty(dir.path(), || Some(0));
        let mut waits = Vec::new();
        for i in 0..500 {
            let (c, rx) = commit(dir.path(), &format!("n{i}"));
            assert!(sync.submit(c).is_ok());
            waits.push(rx);
        }
        for (i, rx) in waits.into_iter().enumerate() {
            rx.blocking_recv().unwrap().unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join(format!("n{i}"))).unwrap(),
                format!("n{i}")
            );
        }
        let syncs = sync.syncs.load(Ordering::Relaxed);
        // At least one sync before the renames and one after; far fewer than one per commit.
        assert!((2..100).contains(&syncs), "{syncs} syncs for 500 commits");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_busy_machine_or_an_unknown_one_gets_its_commit_back() {
        let dir = tempfile::tempdir().unwrap();
        let busy = FsSync::with_dirty(dir.path(), || Some(DIRTY_LIMIT + 1));
        let (c, _rx) = commit(dir.path(), "a");
        assert!(busy.submit(c).is_err());
        let unknown = FsSync::with_dirty(dir.path(), || None);
        let (c, _rx) = commit(dir.path(), "b");
        assert!(unknown.submit(c).is_err());
        let gone = FsSync::with_dirty(&dir.path().join("missing"), || Some(0));
        let (c, _rx) = commit(dir.path(), "c");
        assert!(gone.submit(c).is_err());
        assert_eq!(
            busy.syncs.load(Ordering::Relaxed) + unknown.syncs.load(Ordering::Relaxed),
            0
        );
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn a_failed_rename_is_reported_and_its_temporary_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sync = FsSync::with_dirty(dir.path(), || Some(0));
        let (mut c, rx) = commit(dir.path(), "x");
        c.dest = dir.path().join("no-such-dir").join("x");
        let tmp = c.tmp.clone();
        assert!(sync.submit(c).is_ok());
        let (path, _) = rx.blocking_recv().unwrap().unwrap_err();
        assert!(path.ends_with("no-such-dir/x"));
        assert!(!tmp.exists());
    }
}
