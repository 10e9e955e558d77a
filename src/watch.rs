//! Noticing store paths that become valid: `watch-store` (CI sidecar) and `watch-exec`.
//!
//! A filesystem event alone proves nothing: Nix creates an output directory long before it
//! registers the path as valid, and removes `<path>.lock` after registering it. So every
//! event under the store directory only names a *candidate*, and a candidate is queued once
//! the store database says it is valid. Two nets catch what events miss:
//!
//! - inotify can overflow under bursts (`IN_Q_OVERFLOW`, seen by `notify` as a rescan flag);
//! - a candidate may still be building when its event arrives.
//!
//! Both are covered by rescanning the database for paths registered since the last one seen
//! (`registrationTime`), on overflow and every few seconds. Paths valid before the watcher
//! started are recorded at start and never pushed (unless `--all`).
//!
//! Found paths go through the durable queue, so a watcher killed with SIGKILL and started
//! again still uploads what it had seen.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::{DrainLock, Drainer, spawn_signal_handler, watch_dir};
use crate::format::store_path::{STORE_DIR, StorePath};
use crate::queue::{GcRoots, Queue};
use crate::store::Store;

#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    pub all: bool,
    pub include_drv: bool,
}

const RESCAN: Duration = Duration::from_secs(3);

/// Tracks which valid paths have been seen, and queues new ones.
struct Finder {
    store: Arc<Store>,
    queue: Arc<Queue>,
    roots: Arc<GcRoots>,
    include_drv: bool,
    seen: HashSet<StorePath>,
    /// Registration time (seconds) of the newest path seen; rescans start there.
    since: i64,
}

impl Finder {
    fn new(
        store: Arc<Store>,
        queue: Arc<Queue>,
        roots: Arc<GcRoots>,
        opts: WatchOptions,
    ) -> anyhow::Result<Finder> {
        let existing = store.registered_since(0)?;
        let since = existing.iter().map(|(_, t)| *t).max().unwrap_or(0);
        let mut f = Finder {
            store,
            queue,
            roots,
            include_drv: opts.include_drv,
            seen: HashSet::new(),
            since,
        };
        if opts.all {
            let paths: Vec<StorePath> = existing.into_iter().map(|(p, _)| p).collect();
            f.enqueue(paths)?;
        } else {
            f.seen = existing.into_iter().map(|(p, _)| p).collect();
        }
        Ok(f)
    }

    fn wanted(&self, p: &StorePath) -> bool {
        self.include_drv || !p.is_derivation()
    }

    fn enqueue(&mut self, paths: Vec<StorePath>) -> anyhow::Result<usize> {
        let include_drv = self.include_drv;
        let new: Vec<StorePath> = paths
            .into_iter()
            .filter(|p| include_drv || !p.is_derivation())
            .filter(|p| self.seen.insert(p.clone()))
            .collect();
        if new.is_empty() {
            return Ok(0);
        }
        for p in &new {
            // Best effort: a path we cannot protect is still worth queueing.
            if let Err(e) = self.roots.protect(p) {
                tracing::warn!("{e}");
            }
        }
        self.queue.enqueue(&new, None)?;
        tracing::debug!("queued {} new paths", new.len());
        Ok(new.len())
    }

    /// Candidates from filesystem events: queue those that are valid now.
    fn check(&mut self, names: HashSet<String>) -> anyhow::Result<usize> {
        let mut valid = Vec::new();
        for name in names {
            let base = name.strip_suffix(".lock").unwrap_or(&name);
            let Ok(p) = StorePath::from_base(base) else {
                continue;
            };
            if self.seen.contains(&p) || !self.wanted(&p) {
                continue;
            }
            if self.store.is_valid(&p)? {
                valid.push(p);
            }
        }
        self.enqueue(valid)
    }

    /// Everything registered since the newest path seen.
    fn rescan(&mut self) -> anyhow::Result<usize> {
        let rows = self.store.registered_since(self.since)?;
        if let Some(t) = rows.iter().map(|(_, t)| *t).max() {
            self.since = self.since.max(t);
        }
        self.enqueue(rows.into_iter().map(|(p, _)| p).collect())
    }
}

/// Watches the store and feeds the queue until `stop` fires; a last rescan runs then, so
/// whatever a finished command built is queued before the caller drains.
async fn find_loop(finder: Arc<Mutex<Finder>>, stop: CancellationToken) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<String>>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) => {
                if ev.need_rescan() {
                    let _ = tx.send(None);
                }
                for p in ev.paths {
                    if let Some(name) = p.file_name() {
                        let _ = tx.send(Some(name.to_string_lossy().to_string()));
                    }
                }
            }
            // An error from the watcher means events may be lost: rescan.
            Err(_) => {
                let _ = tx.send(None);
            }
        }
    })
    .context("cannot start inotify watcher")?;
    watcher
        .watch(Path::new(STORE_DIR), notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("{STORE_DIR}: cannot watch the store"))?;

    let run_blocking = |f: Arc<Mutex<Finder>>, names: Option<HashSet<String>>| async move {
        tokio::task::spawn_blocking(move || {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            match names {
                Some(n) => f.check(n),
                None => f.rescan(),
            }
        })
        .await
        .context("watcher task failed")?
    };

    let mut tick = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => { run_blocking(finder.clone(), None).await?; }
            first = rx.recv() => {
                let Some(first) = first else { break };
                let mut names = HashSet::new();
                let mut rescan = first.is_none();
                names.extend(first);
                // Take the whole burst at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while let Ok(n) = rx.try_recv() {
                    match n {
                        Some(n) => { names.insert(n); }
                        None => rescan = true,
                    }
                }
                if rescan {
                    run_blocking(finder.clone(), None).await?;
                }
                run_blocking(finder.clone(), Some(names)).await?;
            }
        }
    }
    run_blocking(finder.clone(), None).await?;
    Ok(())
}

async fn setup(
    cfg: &Config,
    opts: WatchOptions,
) -> anyhow::Result<(DrainLock, Drainer, Arc<Mutex<Finder>>)> {
    let lock = DrainLock::acquire(&cfg.state_dir)?;
    let drainer = Drainer::new(cfg)?;
    let store = Arc::new(Store::open_default()?);
    let queue = drainer.queue().clone();
    let roots = drainer.roots().clone();
    let finder = tokio::task::spawn_blocking(move || Finder::new(store, queue, roots, opts))
        .await
        .context("watcher start-up failed")??;
    Ok((lock, drainer, Arc::new(Mutex::new(finder))))
}

pub async fn watch_store(cfg: Config, opts: WatchOptions) -> anyhow::Result<()> {
    let (_lock, mut drainer, finder) = setup(&cfg, opts).await?;
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone())?;
    let (_qwatch, wake) = watch_dir(drainer.queue().queue_dir())?;
    let finding = tokio::spawn(find_loop(finder, stop.clone()));
    eprintln!(
        "narpost: watching {STORE_DIR}; pushing new paths to {}",
        cfg.cache
    );
    let totals = drainer.run(stop.clone(), wake, false).await?;
    stop.cancel();
    finding.await.context("watcher task failed")??;
    eprintln!(
        "narpost: pushed {} paths, {} already cached, {} left queued",
        totals.pushed,
        totals.already_cached,
        drainer.queue().depth().unwrap_or(totals.left)
    );
    Ok(())
}

/// Runs `command`, pushes what it built, and returns its exit code (128 + signal when it
/// was killed), whatever happened to the uploads.
pub async fn watch_exec(
    cfg: Config,
    opts: WatchOptions,
    command: Vec<String>,
) -> anyhow::Result<u8> {
    let (_lock, mut drainer, finder) = setup(&cfg, opts).await?;
    let (program, args) = command
        .split_first()
        .context("watch-exec needs a command after --")?;
    let find_stop = CancellationToken::new();
    let finding = tokio::spawn(find_loop(finder, find_stop.clone()));
    let (_qwatch, wake) = watch_dir(drainer.queue().queue_dir())?;

    // Upload while the command runs, so a build that fails late still leaves its finished
    // dependencies cached.
    let drain_stop = CancellationToken::new();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("{program}: cannot run command"))?;
    let status = {
        let drain = drainer.run(drain_stop.clone(), wake, false);
        tokio::pin!(drain);
        let status = tokio::select! {
            s = child.wait() => s,
            r = &mut drain => {
                // The drainer only ends early on an error; report it and keep the command running.
                if let Err(e) = r { eprintln!("narpost: {e:#}"); }
                child.wait().await
            }
        };
        drain_stop.cancel();
        let _ = drain.await;
        status.with_context(|| format!("{program}: cannot wait for command"))?
    };
    let code = match status.code() {
        Some(c) => c.clamp(0, 255) as u8,
        None => {
            use std::os::unix::process::ExitStatusExt;
            128u8.saturating_add(status.signal().unwrap_or(0) as u8)
        }
    };

    // The command is done: one last scan, then drain what is queued, bounded by the timeout.
    find_stop.cancel();
    if let Err(e) = finding.await.context("watcher task failed").and_then(|r| r) {
        eprintln!("narpost: {e:#}");
    }
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone())?;
    let deadline = {
        let stop = stop.clone();
        let t = cfg.drain_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(t).await;
            stop.cancel();
        })
    };
    let (_tx, rx) = mpsc::channel(1);
    let totals = match drainer.run(stop, rx, true).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("narpost: {e:#}");
            Default::default()
        }
    };
    deadline.abort();
    let left = drainer.queue().depth().unwrap_or(totals.left);
    eprintln!(
        "narpost: pushed {} paths, {} already cached, {} left queued",
        totals.pushed, totals.already_cached, left
    );
    if left > 0 {
        eprintln!(
            "narpost: {left} queue entries were not uploaded in time; they stay in {}",
            drainer.queue().queue_dir().display()
        );
    }
    Ok(code)
}
