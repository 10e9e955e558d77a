//! The drainer's session: every run of the pipeline under way, and the entries each holds.
//!
//! The drainer does not work in passes that each wait for the last. Whenever it reads the
//! queue (at start-up, on a wake-up from the queue directory, on the poll interval, after a
//! backoff) it takes only the entries no run under way holds, plans their closures against
//! the cache and adds that run here; runs go on side by side and are booked one by one as
//! they end. So a build that ends during a backlog of large paths is planned and uploaded
//! the moment its entry lands, not when the backlog is in.
//!
//! Runs share what makes this safe, through the one pipeline: its book of paths in flight
//! and its slots (`pipeline::book`). A path a run plans as missing while another run uploads
//! it is not uploaded again: the later run waits for that upload's outcome, and its own
//! paths that refer to it wait as they would on a reference of their own, so a narinfo is
//! still stored only after its references. A newer run's paths get free slots first, and
//! spooled NARs stay within the bound of one run plus one worker slot, however many runs
//! there are. Every run shares the drainer's cancellation, so shutdown stops all alike.
//!
//! An entry belongs to at most one run at a time: it is in the session from the read that
//! found it until its run is booked (acknowledged, failed, or left queued; one left queued
//! is read again by the next read after the backoff). Orphaned GC roots are checked against
//! the entries the session holds too, so a path under way is never adopted a second time.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use super::entries::union_of;
use crate::format::store_path::StorePath;
use crate::pipeline::{Pipeline, PipelineError, Plan, Report};
use crate::queue::{Entry, EntryId};

/// A run that ended: its entries, and its plan and report (or why it could not plan).
pub(super) struct RunDone {
    pub entries: Vec<Entry>,
    pub upload: Result<(Plan, Report), PipelineError>,
}

type Run = Pin<Box<dyn Future<Output = RunDone> + Send>>;

/// The runs under way; see the module doc.
#[derive(Default)]
pub(super) struct Session {
    runs: FuturesUnordered<Run>,
    /// The entries the runs hold, with their paths.
    held: HashMap<EntryId, Vec<StorePath>>,
}

impl Session {
    /// Starts a run that plans and uploads the closures of `entries`.
    pub fn add(&mut self, pipeline: Arc<Pipeline>, entries: Vec<Entry>, cancel: CancellationToken) {
        for e in &entries {
            self.held.insert(e.id.clone(), e.paths.clone());
        }
        self.runs.push(Box::pin(async move {
            let upload = match pipeline.plan(&union_of(&entries), true).await {
                Ok(plan) => {
                    let report = pipeline.execute(&plan, &cancel).await;
                    Ok((plan, report))
                }
                Err(e) => Err(e),
            };
            RunDone { entries, upload }
        }));
    }

    /// The next run to end; its entries leave the session. Pending while none is under way.
    pub async fn next(&mut self) -> RunDone {
        match self.runs.next().await {
            Some(done) => {
                for e in &done.entries {
                    self.held.remove(&e.id);
                }
                done
            }
            None => std::future::pending().await,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Runs under way.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// The entries held, which a read of the queue skips.
    pub fn held_ids(&self) -> HashSet<EntryId> {
        self.held.keys().cloned().collect()
    }

    /// The paths of the entries held, which are queued and so no orphans.
    pub fn held_paths(&self) -> HashSet<StorePath> {
        self.held.values().flatten().cloned().collect()
    }
}

/// How a run's entries fared.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// Some entry stays queued for a transient failure or a shutdown.
    pub transient: bool,
    /// The first failure that kept an entry queued, which says the cache is down.
    pub failure: Option<String>,
    /// The first failure that waits for a person (a refusing cache, credentials, an
    /// unreadable path), with its hint: `status` shows it until a run goes through.
    pub attention: Option<String>,
}
