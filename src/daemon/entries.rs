//! Reading the queue for a new run: the entries no run holds, their paths checked against
//! the store, their GC roots made durable, and (when due) orphaned roots adopted.

use std::collections::{BTreeSet, HashSet};
use std::time::SystemTime;

use super::roots::{adopt_orphans, make_roots_durable};
use crate::format::store_path::StorePath;
use crate::queue::{Entry, EntryId, EntryOrCorrupt, GcRoots, Queue};
use crate::store::Store;

/// What [`load`] found; the drainer logs and books it (`Drainer::take_loaded`).
pub(super) struct Loaded {
    /// Entries whose paths are all valid: to upload.
    pub good: Vec<Entry>,
    /// Entries with a path gone from the store, and that path.
    pub invalid: Vec<(Entry, StorePath)>,
    /// Whether adopting orphaned roots worked, when it was tried.
    pub adopted: Option<Result<(), String>>,
    /// Entries whose roots are durable now.
    pub rooted: HashSet<EntryId>,
    pub rooting: Result<(), String>,
}

/// The entries runs under way hold: not read again, and their paths are no orphans.
pub(super) struct Held {
    pub ids: HashSet<EntryId>,
    pub paths: HashSet<StorePath>,
}

/// Reads the entries not `held`, adopting orphaned roots older than `adopt_before` if
/// given. `rooted` holds the entries whose roots were made durable before. Blocking.
pub(super) fn load(
    queue: &Queue,
    roots: &GcRoots,
    store: &Store,
    adopt_before: Option<SystemTime>,
    mut rooted: HashSet<EntryId>,
    held: &Held,
) -> anyhow::Result<Loaded> {
    let known = &held.ids;
    let mut entries = Vec::new();
    for item in queue.list_except(known)? {
        match item {
            EntryOrCorrupt::Valid(e) => entries.push(e),
            EntryOrCorrupt::Corrupt {
                file,
                reason,
                quarantined_to,
            } => {
                tracing::error!(
                    "{}: corrupt queue entry ({reason}); set aside as {}; the paths it held keep their GC roots and are queued again from those",
                    queue.queue_dir().join(&file).display(),
                    quarantined_to
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "nothing (could not move it)".into())
                );
            }
        }
    }
    // Failing to adopt (a full disk) must not stop the entries already queued.
    let adopted = adopt_before.map(|cutoff| {
        match adopt_orphans(queue, roots, store, &entries, &held.paths, cutoff) {
            Ok(Some(entry)) => {
                entries.push(entry);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(crate::error::chain(&e)),
        }
    });
    let mut invalid = Vec::new();
    let mut good = Vec::new();
    for e in entries {
        let mut bad = None;
        for p in &e.paths {
            if !store.is_valid(p)? {
                bad = Some(p.clone());
                break;
            }
        }
        match bad {
            Some(p) => invalid.push((e, p)),
            None => good.push(e),
        }
    }
    let rooting = make_roots_durable(roots, &good, &mut rooted);
    Ok(Loaded {
        good,
        invalid,
        adopted,
        rooted,
        rooting,
    })
}

/// Every path of `entries`, once each.
pub(super) fn union_of(entries: &[Entry]) -> Vec<StorePath> {
    entries
        .iter()
        .flat_map(|e| e.paths.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}
