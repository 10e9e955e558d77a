//! The plan: the closure (or just the requested paths, with the references outside them
//! that the cache must already have), and one question to the cache about what it lacks.
//! Nothing is uploaded here.
//!
//! Two filters decide what is left to upload: what the cache already has, and what upstream
//! serves. A path whose signatures in the local store include one of the `upstream-keys`
//! (by default `cache.nixos.org-1`) was substituted from that cache, which every machine
//! substituting from ours can reach too; pushing it again would copy most of a NixOS
//! closure for nothing. Such a path is not asked about and not uploaded, but its references
//! still are unless they are upstream-signed themselves, so the cache stays complete in
//! the sense the pipeline's module doc gives.

use std::collections::HashSet;

use super::{Event, Pipeline, PipelineError};
use crate::cache::TargetError;
use crate::format::store_path::StorePath;
use crate::store::{self, PathInfo, StoreError};

#[derive(Debug, Clone)]
pub struct Plan {
    /// Paths the caller asked for.
    pub requested: Vec<StorePath>,
    /// Every path considered, references before referrers.
    pub paths: Vec<PathInfo>,
    /// Which of `paths` the cache does not have (and upstream does not serve).
    pub missing: HashSet<StorePath>,
    /// Which of `paths` are signed by an upstream key: left to upstream, not uploaded.
    pub upstream: HashSet<StorePath>,
    /// References outside `paths` that the cache lacks (only with `closure = false`):
    /// whatever refers to them cannot be published.
    pub unavailable: HashSet<StorePath>,
}

impl Plan {
    pub fn cached(&self) -> usize {
        self.paths.len() - self.missing.len() - self.upstream.len()
    }
}

impl Pipeline {
    pub(super) async fn open_target(&self) -> Result<(), TargetError> {
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
        let keys: &[String] = if self.target.leaves_upstream_paths() {
            &self.opts.upstream_keys
        } else {
            &[]
        };
        let upstream: HashSet<StorePath> = paths
            .iter()
            .filter(|p| signed_by_any(p, keys))
            .map(|p| p.path.clone())
            .collect();
        // An upstream-signed reference outside the plan is as good as cached.
        let ask: Vec<PathInfo> = paths
            .iter()
            .chain(context.iter())
            .filter(|p| !signed_by_any(p, keys))
            .cloned()
            .collect();
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
            upstream,
            unavailable,
            paths,
        };
        self.emit(Event::Planned {
            total: plan.paths.len(),
            missing: plan.missing.len(),
            cached: plan.cached(),
            upstream: plan.upstream.len(),
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

/// Whether the store holds a signature of `info` by one of `keys` (by key name; the
/// signature itself was checked by Nix when the path was substituted).
pub fn signed_by_any(info: &PathInfo, keys: &[String]) -> bool {
    info.sigs.iter().any(|sig| {
        sig.split_once(':')
            .is_some_and(|(name, _)| keys.iter().any(|k| k == name))
    })
}
