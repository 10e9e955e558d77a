//! `narpost status`: the cache, the key, the queue and what the drainer last reported.
//! Reads files only; never contacts the cache, so it answers even when the cache is down.
//!
//! The cache and key shown are the ones the drainer last published (`drain-state.json`):
//! the daemon usually gets its settings from a service manager's environment, which the
//! shell running `status` does not have. Without a drainer so far, they come from this
//! command's own configuration.

use serde::Serialize;

use crate::config::Config;
use crate::daemon::DrainLock;
use crate::drain_state::DrainState;
use crate::progress::count;
use crate::queue::Queue;
use crate::text::printable;

#[derive(Debug, Serialize)]
pub struct Status {
    pub cache: String,
    pub public_key: Option<String>,
    pub state_dir: String,
    pub daemon_running: bool,
    pub queue_depth: usize,
    pub oldest_entry_age_secs: Option<u64>,
    pub pushed_since_start: Option<u64>,
    /// Paths signed by an upstream key that the drainer left to upstream since it started.
    pub left_upstream_since_start: Option<u64>,
    /// Build logs the drainer uploaded since it started.
    pub logs_uploaded_since_start: Option<u64>,
    pub failed: Vec<FailedStatus>,
    /// Queue files that failed their checks and were set aside.
    pub corrupt: Vec<CorruptStatus>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub cache_down_since: Option<u64>,
    /// What the cache or this machine needs someone to do before queued paths can go.
    pub needs_attention: Option<String>,
    /// The daemon's build claims, while it runs with them on.
    pub claims: Option<crate::drain_state::ClaimsState>,
}

#[derive(Debug, Serialize)]
pub struct FailedStatus {
    pub paths: Vec<String>,
    pub reason: String,
    /// Unix time the entry was given up on.
    pub failed_at: u64,
}

#[derive(Debug, Serialize)]
pub struct CorruptStatus {
    pub file: String,
    pub reason: String,
}

pub fn collect(cfg: &Config) -> anyhow::Result<Status> {
    let queue = Queue::open(&cfg.state_dir)?;
    // Read without following links and with a bound, like everything in the state directory.
    let dir = crate::private_dir::PrivateDir::open(&cfg.state_dir)?;
    let state: Option<DrainState> = crate::drain_state::read(&cfg.state_dir);
    let configured_key = || match &cfg.key_file {
        Some(p) => crate::keys::load_signing_key(p)
            .ok()
            .map(|k| k.public().to_nix_string()),
        None => dir
            .read("signing.pub", 64 * 1024)
            .ok()
            .map(|s| String::from_utf8_lossy(&s).trim().to_string()),
    };
    let (cache, public_key) = match &state {
        Some(s) => (s.cache.clone(), s.public_key.clone()),
        // The drainer publishes the URL without credentials; the configured one may hold a
        // password (`http://user:secret@host`).
        None => (cfg.cache.redacted(), configured_key()),
    };
    let running = DrainLock::is_held(&cfg.state_dir);
    let failed = queue
        .failed()?
        .into_iter()
        .map(|f| FailedStatus {
            paths: f.paths.iter().map(|p| p.to_absolute()).collect(),
            reason: f.reason,
            failed_at: f
                .failed_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
        .collect();
    let corrupt = queue
        .corrupt()?
        .into_iter()
        .map(|c| CorruptStatus {
            file: c.file.display().to_string(),
            reason: c.reason,
        })
        .collect();
    Ok(Status {
        cache,
        public_key,
        state_dir: cfg.state_dir.display().to_string(),
        daemon_running: running,
        queue_depth: queue.depth()?,
        oldest_entry_age_secs: queue.oldest_age()?.map(|d| d.as_secs()),
        pushed_since_start: state.as_ref().filter(|_| running).map(|s| s.pushed),
        left_upstream_since_start: state.as_ref().filter(|_| running).map(|s| s.left_upstream),
        logs_uploaded_since_start: state.as_ref().filter(|_| running).map(|s| s.logs_uploaded),
        failed,
        corrupt,
        last_error: state.as_ref().and_then(|s| s.last_error.clone()),
        last_error_at: state.as_ref().and_then(|s| s.last_error_at),
        // Only a running drainer knows whether the cache is down now.
        cache_down_since: state
            .as_ref()
            .filter(|_| running)
            .and_then(|s| s.cache_down_since),
        needs_attention: state
            .as_ref()
            .filter(|_| running)
            .and_then(|s| s.needs_attention.clone()),
        claims: crate::drain_state::read_claims(&cfg.state_dir).filter(|_| running),
    })
}

pub fn print(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let s = collect(cfg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("cache:        {}", printable(&s.cache));
    println!(
        "public key:   {}",
        s.public_key.as_deref().unwrap_or("(none yet)")
    );
    println!("state dir:    {}", printable(&s.state_dir));
    println!(
        "daemon:       {}",
        if s.daemon_running {
            "running"
        } else {
            "not running"
        }
    );
    match s.oldest_entry_age_secs {
        Some(age) => println!(
            "queue:        {}, oldest {age}s old",
            count(s.queue_depth as u64, "entry", "entries")
        ),
        None => println!("queue:        empty"),
    }
    if let Some(p) = s.pushed_since_start {
        println!("pushed:       {} since start", count(p, "path", "paths"));
    }
    if let Some(u) = s.left_upstream_since_start {
        println!(
            "upstream:     {} left to upstream since start",
            count(u, "path", "paths")
        );
    }
    if let Some(l) = s.logs_uploaded_since_start {
        println!("build logs:   {l} uploaded since start");
    }
    if let Some(since) = s.cache_down_since {
        println!("cache down:   for {}", ago(since));
    }
    if let Some(a) = &s.needs_attention {
        println!(
            "attention:    queued paths wait for a fix: {}",
            printable(a)
        );
    }
    if let Some(c) = &s.claims {
        println!(
            "claims:       as {}: building {}, waiting for {}; {} of {} waits ended with the path built elsewhere",
            printable(&c.machine),
            count(c.held.len() as u64, "claimed path", "claimed paths"),
            count(c.waiting.len() as u64, "path", "paths"),
            c.builds_saved,
            c.waits
        );
        for h in &c.held {
            println!("  building {}", printable(h));
        }
        for h in &c.waiting {
            println!("  waiting for {}", printable(h));
        }
    }
    if let Some(e) = &s.last_error {
        match s.last_error_at {
            Some(at) => println!("last error:   {} ago: {}", ago(at), printable(e)),
            None => println!("last error:   {}", printable(e)),
        }
    }
    if !s.failed.is_empty() {
        println!(
            "failed:       {} given up on (`narpost retry` queues them again)",
            s.failed.len()
        );
        for f in &s.failed {
            println!(
                "  {} ago: {}: {}",
                ago(f.failed_at),
                f.paths.join(" "),
                printable(&f.reason)
            );
        }
    }
    if !s.corrupt.is_empty() {
        println!("corrupt:      {} queue files set aside", s.corrupt.len());
        for c in &s.corrupt {
            println!("  {}: {}", printable(&c.file), printable(&c.reason));
        }
    }
    Ok(())
}

/// How long ago a unix time was, as `<n>s`.
fn ago(unix_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}s", now.saturating_sub(unix_secs))
}
