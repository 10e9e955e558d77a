//! The plan: the closure (or just the requested paths, with the references outside them
//! that the cache must already have), and one question to the cache about what it lacks.
//! Nothing is uploaded here.

use std::collections::HashSet;

use super::{Event, Pipeline, PipelineError};
use crate::format::store_path::StorePath;
use crate::store::{self, PathInfo, StoreError};
use crate::target::TargetError;

#[derive(Debug, Clone)]
pub struct Plan {
    /// Paths the caller asked for.
    pub requested: Vec<StorePath>,
    /// Every path considered, references before referrers.
    pub paths: Vec<PathInfo>,
    /// Which of `paths` the cache does not have.
    pub missing: HashSet<StorePath>,
    /// References outside `paths` that the cache lacks (only with `closure = false`):
    /// whatever refers to them cannot be published.
    pub unavailable: HashSet<StorePath>,
}

impl Plan {
    pub fn cached(&self) -> usize {
        self.paths.len() - self.missing.len()
    }
}

impl Pipeline {
    async fn open_target(&self) -> Result<(), TargetError> {
        self.opened
            .get_or_try_init(|| self.retry("opening the cache", || self.target.open()))
            .await
            .map(|_| ())
    }

    pub async fn plan(&self, roots: &[StorePath], closure: bool) -> Result<Plan, PipelineError> {
        let store = self.store.clone();
        let roots_owned = roots.to_vec();
        let (paths, context) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            if closure {
                return Ok((store.closure(&roots_owned)?, Vec::new()));
            }
            let mut seen = HashSet::new();
            let unique: Vec<StorePath> = roots_owned
                .into_iter()
                .filter(|p| seen.insert(p.clone()))
                .collect();
            let infos = store::topo_sort(store.query(&unique)?);
            let outside: Vec<StorePath> = infos
                .iter()
                .flat_map(|i| i.references.iter())
                .filter(|r| !seen.contains(*r))
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let context = store.query(&outside)?;
            Ok((infos, context))
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))??;

        self.open_target().await?;
        let mut ask = paths.clone();
        ask.extend(context.iter().cloned());
        let absent = self
            .retry("asking the cache which paths it has", || {
                self.target.missing(&ask)
            })
            .await?;
        let known: HashSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
        let (missing, unavailable): (HashSet<_>, HashSet<_>) =
            absent.into_iter().partition(|p| known.contains(p));
        let plan = Plan {
            requested: roots.to_vec(),
            missing,
            unavailable,
            paths,
        };
        self.emit(Event::Planned {
            total: plan.paths.len(),
            missing: plan.missing.len(),
            cached: plan.cached(),
            missing_bytes: plan
                .paths
                .iter()
                .filter(|p| plan.missing.contains(&p.path))
                .map(|p| p.nar_size)
                .sum(),
        });
        Ok(plan)
    }
}
