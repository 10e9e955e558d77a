//! The drainer's side of the GC roots: adopting orphaned roots and making the hook's roots
//! durable (see the [module doc](super)).

use std::collections::HashSet;
use std::time::SystemTime;

use crate::format::store_path::StorePath;
use crate::queue::{Entry, EntryId, GcRoots, Queue};
use crate::store::Store;

/// Queues, as one new entry, the valid paths that have a GC root created before `cutoff`
/// but are in none of `entries` and not `held` by a run under way; removes roots of paths gone from the store. Blocking.
pub(super) fn adopt_orphans(
    queue: &Queue,
    roots: &GcRoots,
    store: &Store,
    entries: &[Entry],
    held: &HashSet<StorePath>,
    cutoff: SystemTime,
) -> anyhow::Result<Option<Entry>> {
    let queued: HashSet<&StorePath> = entries
        .iter()
        .flat_map(|e| e.paths.iter())
        .chain(held)
        .collect();
    let mut adopt = Vec::new();
    for path in roots.list_created_before(Some(cutoff))? {
        if queued.contains(&path) {
            continue;
        }
        if store.is_valid(&path)? {
            adopt.push(path);
        } else {
            tracing::warn!(
                "{}: GC root for {} which is no longer in the store; removing it",
                roots.dir().join(path.base()).display(),
                path.to_absolute()
            );
            roots.release(&path);
        }
    }
    if adopt.is_empty() {
        return Ok(None);
    }
    let id = queue.enqueue(&adopt, None)?;
    tracing::info!(
        "queued {} path(s) that had a GC root in {} but no queue entry",
        adopt.len(),
        roots.dir().display()
    );
    Ok(Some(Entry {
        queued_at: id.queued_at(),
        id,
        paths: adopt,
        drv: None,
    }))
}

/// Creates again, and fsyncs, the roots of the entries in `entries` not in `rooted` yet: the
/// hook leaves the fsync to the drainer, and a power loss may have dropped roots the hook
/// made (see [`crate::queue`]'s GC roots). At start-up `rooted` is empty, so every queued
/// path gets its root back; later only new entries cost anything. Entries gone from the
/// queue are forgotten.
pub(super) fn make_roots_durable(
    roots: &GcRoots,
    entries: &[Entry],
    rooted: &mut HashSet<EntryId>,
) -> Result<(), String> {
    let queued: HashSet<&EntryId> = entries.iter().map(|e| &e.id).collect();
    rooted.retain(|id| queued.contains(id));
    let fresh: Vec<&Entry> = entries.iter().filter(|e| !rooted.contains(&e.id)).collect();
    if fresh.is_empty() {
        return Ok(());
    }
    let mut problem = None;
    let mut done = Vec::new();
    for entry in fresh {
        match roots.protect_all(&entry.paths) {
            Ok(()) => done.push(entry.id.clone()),
            Err(e) => {
                problem.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if !done.is_empty() {
        match roots.sync() {
            Ok(()) => rooted.extend(done),
            Err(e) => {
                problem.get_or_insert_with(|| e.to_string());
            }
        }
    }
    problem.map_or(Ok(()), Err)
}
