//! The book of one pipeline's paths in flight, shared by all its runs at once.
//!
//! The daemon starts a run for what is queued whenever it reads the queue, beside the runs
//! still uploading a backlog (see the daemon's `session` module). Two runs at once must not
//! upload the same path twice, and must not together hold more spooled NARs than one run
//! promises. So every run of a pipeline enters the paths it uploads here, and takes its
//! slots from here:
//!
//! - **In flight**: a path already being uploaded by another run is not started again; the
//!   run waits for that upload's outcome instead, and a path whose reference is in flight
//!   elsewhere waits on that reference's outcome as on one of its own. An entry leaves the
//!   book with its final outcome.
//! - **Slots, newest run first**: the worker slots (`jobs`, preparing NARs) and the upload
//!   slots are shared by every run, and a free slot goes to the newest run waiting for one,
//!   so a build that ends during a long backlog goes ahead of the backlog's waiting paths.
//!   When every worker slot is held by older runs, the newest run may take one more: it
//!   does not wait for a large NAR of the backlog to finish compressing.
//! - **Small paths in slots of their own**: a path whose NAR is at most
//!   [`SMALL_MAX`](crate::compress::SMALL_MAX) (1 MiB) is prepared in one of
//!   [`SMALL_PER_JOB`] small slots per job instead. Preparing it is a few file operations
//!   and microseconds of compression, mostly waiting on the filesystem, so `jobs` of them
//!   left the cores idle; four per job cost at most 4 MiB of spool each.
//!
//! Spooled NARs are bounded by `jobs + 1` worker slots, the small slots (of at most 1 MiB
//! each) and the upload slots together, whatever the number of runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, watch};

use crate::format::store_path::StorePath;

/// Small slots per job (see the module doc).
pub const SMALL_PER_JOB: usize = 4;

/// How many paths of at most [`SMALL_MAX`](crate::compress::SMALL_MAX) are prepared at once.
pub fn small_slots(jobs: usize) -> usize {
    jobs.max(1) * SMALL_PER_JOB
}

/// How far a path in flight has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Handed to a target with ordered commits and not answered yet: enough for referrers
    /// to be handed over behind it. Withdrawn (back to `None`) if that commit fails.
    HandedOver,
    Done,
    Failed,
    Skipped,
}

/// Path -> (the run uploading it, its outcome as it becomes known).
type InFlight = HashMap<StorePath, (u64, watch::Receiver<Option<Outcome>>)>;

/// The runs' shared state: see the module doc.
pub(super) struct Book {
    in_flight: Mutex<InFlight>,
    pub workers: Slots,
    /// For small paths (see the module doc).
    pub small_workers: Slots,
    pub uploads: Slots,
    runs: AtomicU64,
}

/// What a run gets for one of its missing paths.
pub(super) enum Entered {
    /// This run uploads it and reports its outcome on the sender.
    Ours(watch::Sender<Option<Outcome>>),
    /// Another run is uploading it: its outcome arrives here.
    Theirs(watch::Receiver<Option<Outcome>>),
}

impl Book {
    pub fn new(jobs: usize, upload_slots: usize) -> Book {
        Book {
            in_flight: Mutex::new(HashMap::new()),
            workers: Slots::new(jobs.max(1), true),
            small_workers: Slots::new(small_slots(jobs), true),
            uploads: Slots::new(upload_slots.max(1), false),
            runs: AtomicU64::new(0),
        }
    }

    /// A number for a new run, larger than every earlier run's.
    pub fn start_run(&self) -> u64 {
        self.runs.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn lock(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters `path` for `run`, unless another run has it in flight already.
    pub fn enter(&self, run: u64, path: &StorePath) -> (Entered, watch::Receiver<Option<Outcome>>) {
        let mut book = self.lock();
        if let Some((_, rx)) = book.get(path) {
            return (Entered::Theirs(rx.clone()), rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        book.insert(path.clone(), (run, rx.clone()));
        (Entered::Ours(tx), rx)
    }

    /// The path's upload by `run` has its final outcome: later runs start it afresh.
    pub fn leave(&self, run: u64, path: &StorePath) {
        let mut book = self.lock();
        if book.get(path).is_some_and(|(r, _)| *r == run) {
            book.remove(path);
        }
    }
}

/// A counted set of slots that goes to the newest run first (see the module doc). Clones
/// share the slots.
#[derive(Clone)]
pub(super) struct Slots {
    capacity: usize,
    /// Whether the newest run may take one slot beyond `capacity` while older runs hold all.
    express: bool,
    state: Arc<Mutex<SlotState>>,
}

#[derive(Default)]
struct SlotState {
    /// Slots held, by run.
    held: BTreeMap<u64, usize>,
    /// Waiting acquirers, newest run first, then in the order they came.
    waiting: BTreeMap<(Reverse<u64>, u64), oneshot::Sender<SlotPermit>>,
    next_ticket: u64,
}

impl SlotState {
    fn total(&self) -> usize {
        self.held.values().sum()
    }

    fn can_grant(&self, run: u64, capacity: usize, express: bool) -> bool {
        let total = self.total();
        total < capacity
            || (express
                && total == capacity
                && self
                    .held
                    .keys()
                    .next_back()
                    .is_some_and(|newest| *newest < run))
    }
}

/// One slot, given back when dropped.
pub(super) struct SlotPermit {
    run: u64,
    capacity: usize,
    express: bool,
    state: Arc<Mutex<SlotState>>,
}

impl Slots {
    fn new(capacity: usize, express: bool) -> Slots {
        Slots {
            capacity,
            express,
            state: Arc::new(Mutex::new(SlotState::default())),
        }
    }

    fn permit(&self, run: u64) -> SlotPermit {
        SlotPermit {
            run,
            capacity: self.capacity,
            express: self.express,
            state: self.state.clone(),
        }
    }

    /// Waits for a slot for `run`. Dropping the future gives back a slot granted meanwhile.
    pub async fn acquire(&self, run: u64) -> SlotPermit {
        let rx = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // Only a run newer than every waiter may go ahead of them.
            let first = s
                .waiting
                .keys()
                .next()
                .is_none_or(|(Reverse(r), _)| *r < run);
            if first && s.can_grant(run, self.capacity, self.express) {
                *s.held.entry(run).or_default() += 1;
                return self.permit(run);
            }
            let (tx, rx) = oneshot::channel();
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.waiting.insert((Reverse(run), ticket), tx);
            rx
        };
        match rx.await {
            Ok(permit) => permit,
            // The sender stays in `waiting` until a release uses it, so this does not
            // happen; asking again is still right if it ever did.
            Err(_) => Box::pin(self.acquire(run)).await,
        }
    }

    /// Slots held now, for tests.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total()
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let mut grants = Vec::new();
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = s.held.get_mut(&self.run) {
                *n -= 1;
                if *n == 0 {
                    s.held.remove(&self.run);
                }
            }
            while let Some((&(Reverse(run), ticket), _)) = s.waiting.iter().next() {
                if !s.can_grant(run, self.capacity, self.express) {
                    break;
                }
                let Some(tx) = s.waiting.remove(&(Reverse(run), ticket)) else {
                    break;
                };
                *s.held.entry(run).or_default() += 1;
                grants.push((
                    tx,
                    SlotPermit {
                        run,
                        capacity: self.capacity,
                        express: self.express,
                        state: self.state.clone(),
                    },
                ));
            }
        }
        // Outside the lock: a grant whose waiter is gone comes straight back here as a
        // dropped permit, and is passed on to the next waiter.
        for (tx, permit) in grants {
            let _ = tx.send(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `slots.acquire(run)` on a task of its own, so the test can go on while it waits.
    fn waiter(slots: &Slots, run: u64) -> tokio::task::JoinHandle<SlotPermit> {
        let slots = slots.clone();
        tokio::spawn(async move { slots.acquire(run).await })
    }

    #[tokio::test]
    async fn the_newest_run_gets_the_next_slot_and_one_beyond_when_older_runs_hold_all() {
        let slots = Slots::new(2, true);
        let a1 = slots.acquire(1).await;
        let a2 = slots.acquire(1).await;
        // Run 1 waits behind its own full slots; run 2 takes the extra slot at once.
        let waiting = waiter(&slots, 1);
        tokio::task::yield_now().await;
        let b1 = slots.acquire(2).await;
        assert_eq!(slots.held(), 3);
        // No second extra slot for run 2 while run 1 waits: released slots go newest first.
        let b2 = waiter(&slots, 2);
        tokio::task::yield_now().await;
        assert_eq!(slots.held(), 3);
        drop(a1);
        drop(a2);
        // Two slots came back while 3 were held: one for run 2's waiter, none left for run 1.
        let b2 = b2.await.unwrap();
        assert_eq!(slots.held(), 2);
        assert!(!waiting.is_finished());
        drop(b1);
        let a3 = waiting.await.unwrap();
        assert_eq!(slots.held(), 2);
        drop((a3, b2));
        assert_eq!(slots.held(), 0);
    }

    #[tokio::test]
    async fn a_slot_granted_to_a_waiter_that_left_goes_to_the_next() {
        let slots = Slots::new(1, false);
        let held = slots.acquire(1).await;
        let gone = waiter(&slots, 2);
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        let next = waiter(&slots, 1);
        tokio::task::yield_now().await;
        drop(held);
        let _next = next.await.unwrap();
        assert_eq!(slots.held(), 1);
    }

    #[test]
    fn a_path_in_flight_is_entered_once_and_leaves_with_its_run() {
        let book = Book::new(1, 1);
        let p = StorePath::from_base("00000000000000000000000000000000-x").unwrap();
        let (first, _) = book.enter(1, &p);
        assert!(matches!(first, Entered::Ours(_)));
        let (second, _) = book.enter(2, &p);
        assert!(matches!(second, Entered::Theirs(_)));
        book.leave(2, &p);
        assert!(matches!(book.enter(3, &p).0, Entered::Theirs(_)));
        book.leave(1, &p);
        assert!(matches!(book.enter(3, &p).0, Entered::Ours(_)));
    }
}
