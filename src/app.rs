//! Wiring shared by the commands: configuration in, a ready [`Pipeline`] out.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::cache::{CacheOptions, NarFormat};
use crate::config::Config;
use crate::format::signing::SigningKey;
use crate::format::store_path::{STORE_DIR, StorePath};
use crate::pipeline::{Options, Pipeline, RetryPolicy};
use crate::store::Store;

/// The signing key the configuration names, or the embedded default (created on first use,
/// announced on stderr). A cache that signs itself (Attic) needs none.
pub fn signing_key(cfg: &Config, cache_signs_itself: bool) -> anyhow::Result<Option<SigningKey>> {
    if let Some(p) = &cfg.key_file {
        return Ok(Some(crate::keys::load_signing_key(p)?));
    }
    if cache_signs_itself {
        return Ok(None);
    }
    let (key, created) = crate::keys::default_key(&cfg.state_dir)?;
    if let Some(public) = created {
        eprintln!(
            "narpost: generated signing key {}; add this to trusted-public-keys on machines that substitute from the cache:\n{}",
            cfg.state_dir.join("signing.sec").display(),
            public.to_nix_string()
        );
    }
    Ok(Some(key))
}

pub fn pipeline(cfg: &Config, retry: RetryPolicy) -> anyhow::Result<Pipeline> {
    pipeline_spooling_in(cfg, retry, cfg.state_dir.join("spool"))
}

/// [`pipeline`] with compressed NARs waiting for upload in `spool_dir` (the daemon keeps its
/// own, so it can clear what a killed predecessor left without touching a running `push`'s).
pub fn pipeline_spooling_in(
    cfg: &Config,
    retry: RetryPolicy,
    spool_dir: PathBuf,
) -> anyhow::Result<Pipeline> {
    let target = cfg
        .cache
        .open(&cache_options(cfg)?)
        .map_err(crate::error::from_target)?;
    let key = signing_key(cfg, target.signs_itself())?;
    if matches!(target.nar_format(), NarFormat::Zstd { .. }) && target.spool_dir().is_none() {
        check_spool_dir(&spool_dir)?;
    }
    let store = Arc::new(Store::open_default()?);
    Ok(Pipeline::new(
        store,
        target,
        key,
        Options {
            jobs: cfg.jobs,
            spool_dir,
            retry,
            upstream_keys: cfg.upstream_keys.clone(),
            logs: crate::pipeline::LogOptions {
                enabled: cfg.upload_logs,
                max_size: cfg.max_log_size,
                dir: crate::buildlog::log_dir(),
            },
        },
    ))
}

/// What the cache needs of the configuration, secrets read.
pub fn cache_options(cfg: &Config) -> anyhow::Result<CacheOptions> {
    Ok(CacheOptions {
        compression_level: cfg.compression_level,
        token: cfg.token()?,
        basic_auth: cfg.basic_auth()?,
        io_timeout: cfg.io_timeout,
        jobs: cfg.jobs,
    })
}

/// The pipeline's own spool lives in a state directory: it is refused up front (one line)
/// if someone else controls that directory, and made 0700, before any NAR is spooled there.
fn check_spool_dir(spool_dir: &Path) -> anyhow::Result<()> {
    let (Some(parent), Some(name)) = (
        spool_dir.parent(),
        spool_dir.file_name().and_then(|n| n.to_str()),
    ) else {
        return Ok(());
    };
    crate::private_dir::PrivateDir::open(parent)?.subdir(name)?;
    Ok(())
}

/// Accepts a store path, or anything that resolves into one (`./result`, a file inside a
/// store path), and names the store path it belongs to.
pub fn resolve_store_path(arg: &Path) -> anyhow::Result<StorePath> {
    let s = arg.to_string_lossy();
    if let Ok(p) = StorePath::from_absolute(&s) {
        return Ok(p);
    }
    let resolved = std::fs::canonicalize(arg)
        .with_context(|| format!("{}: not a store path and cannot be resolved", arg.display()))?;
    let rel = resolved.strip_prefix(STORE_DIR).map_err(|_| {
        anyhow::anyhow!(
            "{}: not in the Nix store (resolves to {})",
            arg.display(),
            resolved.display()
        )
    })?;
    let first = match rel.components().next() {
        Some(Component::Normal(c)) => c.to_string_lossy().to_string(),
        _ => anyhow::bail!(
            "{}: is the store directory itself, not a store path",
            arg.display()
        ),
    };
    Ok(StorePath::from_base(&first)?)
}
