//! Group commit of directory syncs (see
//! [Which syncs, and why no more](super#which-syncs-and-why-no-more)).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Group commit for one directory's entries: a sync covers every rename that finished before
/// it started, so concurrent committers share one `fsync`.
pub(super) struct DirSync {
    pub(super) dir: PathBuf,
    /// Counts renames into `dir` that have finished; a count is a ticket.
    renamed: AtomicU64,
    /// The highest ticket known to be durable. Held while syncing, so that late callers wait
    /// for the running sync and then find their ticket already covered.
    synced: Mutex<u64>,
    /// How many syncs actually ran: shows in tests that committers share them.
    pub(super) syncs: AtomicU64,
}

impl DirSync {
    pub(super) fn new(dir: PathBuf) -> Self {
        DirSync {
            dir,
            renamed: AtomicU64::new(0),
            synced: Mutex::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// Call after a rename into the directory; the ticket to wait for.
    pub(super) fn note_rename(&self) -> u64 {
        self.renamed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The ticket covering every rename so far.
    pub(super) fn current(&self) -> u64 {
        self.renamed.load(Ordering::SeqCst)
    }

    /// Returns once every rename up to `ticket` is durable.
    pub(super) fn sync_through(&self, ticket: u64) -> io::Result<()> {
        // A panic elsewhere cannot leave the number wrong: it is written only after a sync.
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= ticket {
            return Ok(());
        }
        let covers = self.renamed.load(Ordering::SeqCst);
        sync_dir(&self.dir)?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        *synced = covers.max(*synced);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn directory_syncs_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let sync = DirSync::new(dir.path().to_path_buf());
        // Nothing renamed yet: nothing to sync.
        sync.sync_through(sync.current()).unwrap();
        assert_eq!(sync.syncs.load(Ordering::Relaxed), 0);

        let first = sync.note_rename();
        let second = sync.note_rename();
        sync.sync_through(first).unwrap();
        assert_eq!(sync.syncs.load(Ordering::Relaxed), 1);
        // The sync for the first rename started after the second one: it covers both.
        sync.sync_through(second).unwrap();
        assert_eq!(sync.syncs.load(Ordering::Relaxed), 1);

        let third = sync.note_rename();
        sync.sync_through(third).unwrap();
        assert_eq!(sync.syncs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn concurrent_committers_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(DirSync::new(dir.path().to_path_buf()));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let sync = sync.clone();
                std::thread::spawn(move || {
                    for _ in 0..8 {
                        let ticket = sync.note_rename();
                        sync.sync_through(ticket).unwrap();
                        assert!(*sync.synced.lock().unwrap() >= ticket);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let syncs = sync.syncs.load(Ordering::Relaxed);
        assert!((1..512).contains(&syncs), "{syncs} syncs for 512 commits");
    }
}
