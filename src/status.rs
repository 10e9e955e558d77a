//! `narpost status`: the cache, the key, the queue and what the drainer last reported.
//! Reads files only; never contacts the cache, so it answers even when the cache is down.

use serde::Serialize;

use crate::config::Config;
use crate::daemon::{DrainLock, DrainState, STATE_FILE};
use crate::queue::Queue;

#[derive(Debug, Serialize)]
pub struct Status {
    pub cache: String,
    pub public_key: Option<String>,
    pub state_dir: String,
    pub daemon_running: bool,
    pub queue_depth: usize,
    pub oldest_entry_age_secs: Option<u64>,
    pub pushed_since_start: Option<u64>,
    pub failed: Vec<FailedStatus>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub cache_down_since: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct FailedStatus {
    pub paths: Vec<String>,
    pub reason: String,
}

pub fn collect(cfg: &Config) -> anyhow::Result<Status> {
    let queue = Queue::open(&cfg.state_dir)?;
    let public_key = match &cfg.key_file {
        Some(p) => crate::keys::load_signing_key(p)
            .ok()
            .map(|k| k.public().to_nix_string()),
        None => std::fs::read_to_string(cfg.state_dir.join("signing.pub"))
            .ok()
            .map(|s| s.trim().to_string()),
    };
    let running = DrainLock::is_held(&cfg.state_dir);
    let state: Option<DrainState> = std::fs::read(cfg.state_dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let failed = queue
        .failed()?
        .into_iter()
        .map(|f| FailedStatus {
            paths: f.paths.iter().map(|p| p.to_absolute()).collect(),
            reason: f.reason,
        })
        .collect();
    Ok(Status {
        cache: cfg.cache.clone(),
        public_key,
        state_dir: cfg.state_dir.display().to_string(),
        daemon_running: running,
        queue_depth: queue.depth()?,
        oldest_entry_age_secs: queue.oldest_age()?.map(|d| d.as_secs()),
        pushed_since_start: state.as_ref().filter(|_| running).map(|s| s.pushed),
        failed,
        last_error: state.as_ref().and_then(|s| s.last_error.clone()),
        last_error_at: state.as_ref().and_then(|s| s.last_error_at),
        cache_down_since: state.as_ref().and_then(|s| s.cache_down_since),
    })
}

pub fn print(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let s = collect(cfg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("cache:        {}", s.cache);
    println!(
        "public key:   {}",
        s.public_key.as_deref().unwrap_or("(none yet)")
    );
    println!("state dir:    {}", s.state_dir);
    println!(
        "daemon:       {}",
        if s.daemon_running {
            "running"
        } else {
            "not running"
        }
    );
    match s.oldest_entry_age_secs {
        Some(age) => println!("queue:        {} entries, oldest {age}s old", s.queue_depth),
        None => println!("queue:        empty"),
    }
    if let Some(p) = s.pushed_since_start {
        println!("pushed:       {p} paths since start");
    }
    if let Some(since) = s.cache_down_since {
        println!("cache down:   since {since} (unix time)");
    }
    if let Some(e) = &s.last_error {
        println!(
            "last error:   {e} (at {})",
            s.last_error_at.map(|t| t.to_string()).unwrap_or_default()
        );
    }
    if !s.failed.is_empty() {
        println!("failed:       {}", s.failed.len());
        for f in &s.failed {
            println!("  {}: {}", f.paths.join(" "), f.reason);
        }
    }
    Ok(())
}
