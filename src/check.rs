//! `narpost check [--deep] [--repair] [PATH...]`: reads the cache back as a substituting Nix
//! would, and says what is broken, one line each.
//!
//! A push skips every path whose narinfo the cache has, so a cache that lost a NAR (a server
//! that answered 200 and stored nothing, a bucket lifecycle rule, a disk replaced) would stay
//! broken forever without this. For each narinfo checked:
//!
//! - it parses, and names the store path it is stored under;
//! - its NAR exists with the `FileSize` it states (with `--deep`: its bytes hash to its
//!   `FileHash`, which reads every NAR whole);
//! - every reference has a narinfo too, or is left to upstream (signed in this machine's
//!   store by one of the `upstream-keys`, as the pipeline leaves such paths);
//! - it carries a valid signature by the configured key (except on a cache that signs
//!   itself, Attic, whose key is its own).
//!
//! Which narinfos: those of the closures of the given paths (upstream-signed ones left out),
//! or every narinfo the cache lists (file://, S3, HTTP with WebDAV listing).
//!
//! `--repair` pushes again, from this machine's store, every broken path it holds, with
//! its closure: a broken path counts as missing whatever its narinfo says, a missing
//! reference is missing anyway. Then it checks those paths again. Paths this machine does
//! not have are reported as not repairable here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::cache::{DynTarget, MAX_NARINFO, TargetError, object_key};
use crate::config::Config;
use crate::format::narinfo::NarInfo;
use crate::format::signing::PublicKey;
use crate::format::store_path::StorePath;
use crate::pipeline::{Pipeline, RetryPolicy, signed_by_any};
use crate::progress::count;
use crate::store::PathInfo;
use crate::text::printable;

/// Narinfos checked at once: reads are latency-bound, the servers small.
const CONCURRENCY: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Check the closures of these; empty: every narinfo the cache lists.
    pub paths: Vec<StorePath>,
    /// Read every NAR and compare its hash with `FileHash`.
    pub deep: bool,
    /// Push broken paths again from the local store.
    pub repair: bool,
}

/// One thing wrong with one narinfo.
#[derive(Debug, Clone)]
struct Problem {
    /// The hash part the narinfo is stored under.
    hash: String,
    /// The store path, when known (from the narinfo, or the path asked about).
    path: Option<StorePath>,
    what: String,
    /// A NAR whose bytes are wrong: removed before a repair stores it again.
    corrupt_nar: Option<String>,
}

impl Problem {
    fn line(&self) -> String {
        let name = match &self.path {
            Some(p) => p.to_absolute(),
            None => format!("{}.narinfo", self.hash),
        };
        printable(&format!("{name}: {}", self.what))
    }
}

/// What the checks share: the cache, the key, and which narinfos exist (a listing, or what
/// was asked so far).
struct Checker {
    target: DynTarget,
    key: Option<PublicKey>,
    deep: bool,
    /// Local paths signed by an upstream key, by hash part: a reference to one of them
    /// needs no narinfo in this cache.
    upstream: HashSet<String>,
    upstream_keys: Vec<String>,
    store: Arc<crate::store::Store>,
    exists: Mutex<HashMap<String, bool>>,
}

impl Checker {
    async fn has_narinfo(&self, hash: &str) -> Result<bool, TargetError> {
        if let Some(&known) = self.lock().get(hash) {
            return Ok(known);
        }
        let found = self
            .target
            .object_size(&format!("{hash}.narinfo"))
            .await?
            .is_some();
        self.lock().insert(hash.to_owned(), found);
        Ok(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.exists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this machine's store has `path`, signed by an upstream key.
    async fn left_upstream(&self, path: &StorePath) -> bool {
        if self.upstream.contains(path.hash_part()) {
            return true;
        }
        let store = self.store.clone();
        let path = path.clone();
        let keys = self.upstream_keys.clone();
        tokio::task::spawn_blocking(move || {
            store
                .query(std::slice::from_ref(&path))
                .ok()
                .and_then(|infos| infos.into_iter().next())
                .is_some_and(|info| signed_by_any(&info, &keys))
        })
        .await
        .unwrap_or(false)
    }

    /// The problems of one narinfo; `expected` is the path asked about, if any. An error is
    /// the cache failing to answer, not a finding.
    async fn check(
        &self,
        hash: &str,
        expected: Option<&StorePath>,
    ) -> Result<Vec<Problem>, TargetError> {
        let mut problems = Vec::new();
        let mut corrupt_nar = None;
        let mut say = |path: Option<&StorePath>, what: String| {
            problems.push(Problem {
                hash: hash.to_owned(),
                path: path.cloned(),
                what,
                corrupt_nar: None,
            })
        };
        let Some(bytes) = self
            .target
            .read_small(&format!("{hash}.narinfo"), MAX_NARINFO)
            .await?
        else {
            if expected.is_some() {
                say(expected, "not in the cache (no narinfo)".into());
            }
            return Ok(problems);
        };
        let narinfo = match NarInfo::parse(&String::from_utf8_lossy(&bytes)) {
            Ok(n) => n,
            Err(e) => {
                say(expected, format!("unreadable narinfo: {e}"));
                return Ok(problems);
            }
        };
        let path = narinfo.store_path.clone();
        if path.hash_part() != hash {
            say(
                Some(&path),
                format!("stored as {hash}.narinfo, which names another path"),
            );
            return Ok(problems);
        }
        match object_key(&narinfo.url) {
            Err(e) => say(Some(&path), format!("its URL {}", e.message)),
            Ok(url) => {
                // FileSize when given; an uncompressed NAR is NarSize bytes.
                let stated = narinfo.file_size.or_else(|| {
                    (narinfo.compression.as_deref() == Some("none")).then_some(narinfo.nar_size)
                });
                match (self.target.object_size(url).await?, stated) {
                    (None, _) => say(Some(&path), format!("its NAR {url} is missing")),
                    (Some(size), Some(want)) if size != want => say(
                        Some(&path),
                        format!("its NAR {url} is {size} bytes, the narinfo says {want}"),
                    ),
                    (Some(_), _) if self.deep => {
                        if let (Some(want), Some((got, _))) =
                            (narinfo.file_hash, self.target.object_sha256(url).await?)
                            && got != want
                        {
                            say(
                                Some(&path),
                                format!(
                                    "its NAR {url} does not match its FileHash ({} found)",
                                    got.to_nix_string()
                                ),
                            );
                            corrupt_nar = Some(url.to_owned());
                        }
                    }
                    (Some(_), _) => {}
                }
            }
        }
        for r in &narinfo.references {
            if r == &path || self.has_narinfo(r.hash_part()).await? {
                continue;
            }
            if !self.left_upstream(r).await {
                say(
                    Some(&path),
                    format!("its reference {} has no narinfo", r.to_absolute()),
                );
            }
        }
        if let Some(key) = &self.key {
            let by_key = narinfo.sigs.iter().any(|s| {
                s.split_once(':')
                    .is_some_and(|(name, _)| name == key.name())
            });
            if !by_key {
                say(Some(&path), format!("not signed by {}", key.name()));
            } else if !narinfo.verify(key) {
                say(
                    Some(&path),
                    format!("its signature by {} does not verify", key.name()),
                );
            }
        }
        if let Some(nar) = corrupt_nar
            && let Some(first) = problems.first_mut()
        {
            first.corrupt_nar = Some(nar);
        }
        Ok(problems)
    }

    /// Checks every `(hash, expected path)`, with a progress bar on a terminal.
    async fn check_all(
        &self,
        todo: Vec<(String, Option<StorePath>)>,
    ) -> Result<Vec<Problem>, TargetError> {
        let bar = progress_bar(todo.len() as u64);
        let mut results = futures::stream::iter(todo)
            .map(|(hash, expected)| async move { self.check(&hash, expected.as_ref()).await })
            .buffer_unordered(CONCURRENCY);
        let mut problems = Vec::new();
        while let Some(found) = results.next().await {
            let found = found?;
            if let Some(bar) = &bar {
                bar.inc(1);
                for p in &found {
                    bar.println(p.line());
                }
            }
            problems.extend(found);
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        problems.sort_by(|a, b| a.hash.cmp(&b.hash));
        Ok(problems)
    }
}

fn progress_bar(len: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("checking {bar:30} {pos}/{len} narinfos {eta}")
    {
        bar.set_style(style);
    }
    Some(bar)
}

/// Runs the check (and repair); returns whether the cache is sound at the end.
pub async fn run(cfg: &Config, opts: CheckOptions) -> anyhow::Result<bool> {
    let pipeline = Arc::new(crate::app::pipeline(
        cfg,
        RetryPolicy::for_push(cfg.retry_timeout),
    )?);
    let target = pipeline.target().clone();
    target.open().await.map_err(crate::error::from_target)?;
    let key = if target.signs_itself() {
        None
    } else {
        crate::app::signing_key(cfg, false)?.map(|k| k.public())
    };
    let store = pipeline.store().clone();
    // As the pipeline decides it: a host's store over ssh takes no path without its
    // references, so nothing there is left to upstream.
    let upstream_keys = if target.leaves_upstream_paths() {
        cfg.upstream_keys.clone()
    } else {
        Vec::new()
    };

    let (todo, upstream, listed) = if opts.paths.is_empty() {
        let hashes = target
            .list_narinfos()
            .await
            .map_err(crate::error::from_target)?
            .with_context(|| {
                format!(
                    "{}: this cache cannot be listed; name the paths to check: narpost check PATH...",
                    target.url()
                )
            })?;
        let todo: Vec<(String, Option<StorePath>)> =
            hashes.iter().map(|h| (h.clone(), None)).collect();
        (todo, HashSet::new(), Some(hashes))
    } else {
        let roots = opts.paths.clone();
        let store2 = store.clone();
        let infos: Vec<PathInfo> =
            tokio::task::spawn_blocking(move || store2.closure(&roots)).await??;
        let (up, own): (Vec<&PathInfo>, Vec<&PathInfo>) =
            infos.iter().partition(|i| signed_by_any(i, &upstream_keys));
        let todo = own
            .iter()
            .map(|i| (i.path.hash_part().to_owned(), Some(i.path.clone())))
            .collect();
        let upstream = up.iter().map(|i| i.path.hash_part().to_owned()).collect();
        (todo, upstream, None)
    };
    let exists = listed
        .map(|l| l.into_iter().map(|h| (h, true)).collect())
        .unwrap_or_default();
    let checker = Checker {
        target: target.clone(),
        key,
        deep: opts.deep,
        upstream,
        upstream_keys,
        store: store.clone(),
        exists: Mutex::new(exists),
    };
    let checked = todo.len();
    let problems = checker
        .check_all(todo)
        .await
        .map_err(crate::error::from_target)?;
    report(&problems);
    let broken = broken_paths(&problems);
    eprintln!(
        "narpost: checked {}: {}",
        count(checked as u64, "narinfo", "narinfos"),
        if problems.is_empty() {
            "all sound".to_string()
        } else {
            format!(
                "{} in {}",
                count(problems.len() as u64, "problem", "problems"),
                count(broken.len() as u64, "path", "paths")
            )
        }
    );
    if problems.is_empty() {
        return Ok(true);
    }
    if !opts.repair {
        eprintln!("narpost: `narpost check --repair` pushes again what this machine's store has");
        return Ok(false);
    }
    repair(&pipeline, &checker, broken, &problems).await
}

fn report(problems: &[Problem]) {
    for p in problems {
        println!("{}", p.line());
    }
}

/// The store paths behind the problems, by hash part (one narinfo may have several).
fn broken_paths(problems: &[Problem]) -> BTreeMap<String, Option<StorePath>> {
    let mut out: BTreeMap<String, Option<StorePath>> = BTreeMap::new();
    for p in problems {
        let slot = out.entry(p.hash.clone()).or_default();
        if slot.is_none() {
            *slot = p.path.clone();
        }
    }
    out
}

async fn repair(
    pipeline: &Arc<Pipeline>,
    checker: &Checker,
    broken: BTreeMap<String, Option<StorePath>>,
    problems: &[Problem],
) -> anyhow::Result<bool> {
    let store = pipeline.store().clone();
    let candidates: Vec<StorePath> = broken.values().flatten().cloned().collect();
    let local: Vec<StorePath> = tokio::task::spawn_blocking(move || {
        candidates
            .into_iter()
            .filter(|p| store.is_valid(p).unwrap_or(false))
            .collect()
    })
    .await?;
    let not_here = broken.len() - local.len();
    let mut sound = true;
    if not_here > 0 {
        sound = false;
        eprintln!(
            "narpost: {} cannot be repaired from here: not in this machine's store",
            count(not_here as u64, "path", "paths")
        );
    }
    if local.is_empty() {
        return Ok(sound);
    }
    let mut plan = pipeline.plan(&local, true).await.map_err(|e| match e {
        crate::pipeline::PipelineError::Target(t) => crate::error::from_target(t),
        other => anyhow::Error::new(other),
    })?;
    let in_plan: HashSet<StorePath> = plan.paths.iter().map(|i| i.path.clone()).collect();
    for p in &local {
        if in_plan.contains(p) && !plan.upstream.contains(p) {
            plan.missing.insert(p.clone());
        }
    }
    // Only NARs this machine can store again: one it cannot is better corrupt than gone.
    let corrupt = problems
        .iter()
        .filter_map(|p| match (&p.path, &p.corrupt_nar) {
            (Some(path), Some(nar)) if local.contains(path) => Some(nar),
            _ => None,
        });
    for nar in corrupt {
        pipeline
            .target()
            .remove(nar)
            .await
            .map_err(crate::error::from_target)?;
    }
    let report = pipeline.execute(&plan, &CancellationToken::new()).await;
    eprint!("{}", crate::progress::summary(&report));
    // What the cache now answers, for the paths that were broken.
    checker.lock().clear();
    let again: Vec<(String, Option<StorePath>)> = local
        .iter()
        .map(|p| (p.hash_part().to_owned(), Some(p.clone())))
        .collect();
    let left = checker
        .check_all(again)
        .await
        .map_err(crate::error::from_target)?;
    report_left(&left, local.len());
    Ok(sound && left.is_empty())
}

fn report_left(left: &[Problem], tried: usize) {
    if left.is_empty() {
        eprintln!("narpost: repaired {}", count(tried as u64, "path", "paths"));
    } else {
        eprintln!("narpost: still broken after the repair:");
        report(left);
    }
}
