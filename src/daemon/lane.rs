//! Lanes: entries queued while a pass uploads go out beside it instead of after it.
//!
//! A pass pushes everything queued when it started as one plan, which with a backlog of
//! large paths takes minutes; a build that ends meanwhile would wait for all of it. So
//! while a pass's uploads run, a wake-up from the queue directory (or the poll interval)
//! starts a lane: it lists only the entries the pass does not know yet (reading the
//! directory, not the entries already known), plans their closures against the cache and
//! uploads them with a pipeline run of their own. One lane runs at a time, and its entries
//! are booked like the pass's own (acknowledged, failed or kept) when it finishes; the
//! next wake-up starts the next lane.
//!
//! A lane's plan asks the cache what is missing, like any pass, so the guarantee holds: a
//! narinfo is stored only after its references are in the cache. The pass and the lane are
//! two runs of one pipeline, which keeps one book of the paths in flight and one set of
//! slots for both (see `pipeline::book`): a reference the pass is still uploading is not
//! uploaded again, the lane's paths wait for it as for their own, the lane's paths get free
//! slots first, and spooled NARs stay within the bound of one run plus one slot. A lane
//! shares the pass's cancellation, so shutdown stops both alike.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::entries::{Loaded, load, union_of};
use crate::pipeline::{Pipeline, PipelineError, Plan, Report};
use crate::queue::{EntryId, GcRoots, Queue};

/// A lane under way.
pub(super) type Lane = Pin<Box<dyn Future<Output = anyhow::Result<LaneRun>> + Send>>;

/// What a lane read and, if it had anything to upload, how that went.
pub(super) struct LaneRun {
    pub loaded: Loaded,
    pub upload: Option<Result<(Plan, Report), PipelineError>>,
}

/// Reads the entries not in `known` and uploads their closures.
pub(super) async fn run(
    pipeline: Arc<Pipeline>,
    queue: Arc<Queue>,
    roots: Arc<GcRoots>,
    known: HashSet<EntryId>,
    cancel: CancellationToken,
) -> anyhow::Result<LaneRun> {
    let store = pipeline.store().clone();
    // Roots of the pass's entries are the pass's business: this lane starts from none.
    let loaded = tokio::task::spawn_blocking(move || {
        load(&queue, &roots, &store, None, HashSet::new(), &known)
    })
    .await??;
    if loaded.good.is_empty() {
        return Ok(LaneRun {
            loaded,
            upload: None,
        });
    }
    let upload = match pipeline.plan(&union_of(&loaded.good), true).await {
        Ok(plan) => {
            let report = pipeline.execute(&plan, &cancel).await;
            Ok((plan, report))
        }
        Err(e) => Err(e),
    };
    Ok(LaneRun {
        loaded,
        upload: Some(upload),
    })
}

/// How a pass's or a lane's entries fared.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// Some entry stays queued for a transient failure or a shutdown.
    pub transient: bool,
    /// The first failure that kept an entry queued, which says the cache is down.
    pub failure: Option<String>,
    /// The first failure that waits for a person (a refusing cache, credentials, an
    /// unreadable path), with its hint: `status` shows it until a pass goes through.
    pub attention: Option<String>,
}

impl Settled {
    pub fn add(&mut self, other: Settled) {
        self.transient |= other.transient;
        if self.failure.is_none() {
            self.failure = other.failure;
        }
        if self.attention.is_none() {
            self.attention = other.attention;
        }
    }
}
