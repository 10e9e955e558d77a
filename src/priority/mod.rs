//! Yielding the CPU and the disk to builds: how narpost lowers its own priority on Linux,
//! and raises it again for a deadline.
//!
//! # Why nice alone does nothing
//!
//! With autogroup scheduling (`kernel.sched_autogroup_enabled = 1`, the default on desktop
//! and server kernels alike) the scheduler first shares the CPU between *sessions*, each
//! session's autogroup weighted by the autogroup's own nice value (`/proc/<pid>/autogroup`),
//! and only then between the threads of a session by their nice values. Nix runs every
//! builder in a session of its own, so a nice-19 uploader in any other session still gets a
//! whole autogroup's share against each builder. What reaches past the grouping:
//!
//! - a session of narpost's own (`setsid`), whose autogroup is then set to nice 19;
//! - nice 19 on every thread, for kernels without autogroups (and inside a cgroup);
//! - the idle I/O class (`ioprio_set`), so the disk serves builds first;
//! - under systemd, the unit's cgroup settings (`CPUWeight=idle`, `IOWeight=`): a task in a
//!   non-root CPU cgroup is scheduled by its cgroup's weight, and autogroups do not apply.
//!
//! # The session
//!
//! `setsid()` fails for a process-group leader, and narpost started from an interactive
//! shell is one (the shell gives each job its own group). Even where it would succeed,
//! leaving the caller's process group would stop signals sent to the group (a CI runner
//! cancelling a job, `kill -- -PGID`) from reaching narpost. And writing
//! `/proc/self/autogroup` changes the autogroup of the whole session, so it must never be
//! done while narpost shares a session with the user's shell or with `watch-exec`'s command.
//!
//! So, before any thread exists (nice and the I/O class are per thread on Linux, and a new
//! thread inherits its creator's), narpost forks (see [`supervisor`]): the original process
//! stays where its caller put it, at its priority, and only waits, forwarding signals to
//! the worker and exiting with the worker's exit code (or dying of the same signal). The
//! worker is the real narpost: it starts its own session, lowers its autogroup, its nice
//! value and its I/O class, and dies with the original process if that is killed outright
//! (`PR_SET_PDEATHSIG`), just as a single process would. A narpost that already leads its
//! own session (a systemd service: systemd starts every service in a session of its own;
//! `setsid narpost daemon`) lowers itself in place and does not fork.
//!
//! `watch-exec` always forks when lowering: the command it runs must keep narpost's
//! session, process group, controlling terminal, priority and signals, so the original
//! process starts it (when the worker says it is ready to watch) and reports its exit to the
//! worker; see [`spawn_command`].
//!
//! # Back to normal for a deadline
//!
//! On SIGTERM (and when `watch-exec`'s command has exited, since the caller now waits for
//! the uploads) [`restore`] gives every thread its nice value and I/O class back and sets the
//! autogroup's nice value back, so a busy machine cannot stretch the drain past
//! `drain-timeout` and systemd's stop timeout. Raising a thread's nice value needs
//! `CAP_SYS_NICE`; without it the threads stay at nice 19, which costs nothing, because
//! they are alone in narpost's autogroup and the autogroup's nice value (which anyone may
//! lower back to 0) decides its share; the I/O class may always go back. Under systemd the
//! unit's cgroup weights stay as the unit says; the drain timeout still bounds the stop.

mod supervisor;

use std::io;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;

pub use supervisor::{Child, spawn_command};

/// How much narpost yields: `idle` (the default for the daemon and the watchers) or
/// `normal` (the default for `push`, which someone waits for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    Idle,
    Normal,
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Priority, String> {
        match s {
            "idle" => Ok(Priority::Idle),
            "normal" => Ok(Priority::Normal),
            _ => Err("expected `idle` or `normal`".into()),
        }
    }
}

/// The lowest nice value, and the I/O class that only gets the disk when nobody else wants it.
const NICE_IDLE: i32 = 19;
const IOPRIO_CLASS_SHIFT: u32 = 13;
const IOPRIO_CLASS_IDLE: i32 = 3;
const IOPRIO_WHO_PROCESS: i32 = 1;
const AUTOGROUP: &str = "/proc/self/autogroup";

/// What [`restore`] goes back to.
#[derive(Debug)]
struct Saved {
    nice: i32,
    ioprio: i32,
    /// The autogroup's nice value, when this process set it.
    autogroup: Option<i32>,
}

static SAVED: OnceLock<Saved> = OnceLock::new();

/// Set by [`restore`]: from then on nothing of narpost's runs behind anything.
static RESTORED: AtomicBool = AtomicBool::new(false);

/// Runs `work` (blocking, CPU-bound: compressing a large NAR) behind this process's other
/// threads: on a thread of its own at the scheduler's idle policy, whose helpers (zstd's
/// workers) inherit it. All of narpost already yields to builds ([`enter`]); this orders
/// narpost's own work, so the small path of a build that just ended is prepared at once
/// instead of sharing the cores with a backlog's compression. Only while this process runs
/// at idle priority and [`restore`] has not run: at normal priority, or draining on the way
/// out, it would slow the drain. A thread of its own, because an unprivileged thread cannot
/// leave the idle policy again, and the blocking pool's threads are reused.
pub fn behind_newer_work<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    if SAVED.get().is_none() || RESTORED.load(Ordering::SeqCst) {
        return work();
    }
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            set_idle_policy();
            work()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The idle scheduling policy for the calling thread; logged, never fatal.
fn set_idle_policy() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the one sched_param we pass, for this thread (0).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!(
            "cannot run behind newer work: {}",
            io::Error::last_os_error()
        );
    }
}

/// Puts this process at `priority` before any runtime or thread starts. For `idle`, it may
/// fork (see the module documentation): then this call returns only in the worker, and the
/// original process supervises it and exits with its code. `command` is `watch-exec`'s
/// command, which the original process runs when [`spawn_command`] asks for it.
/// Failing to lower is logged, never fatal: the work runs at normal priority then.
pub fn enter(priority: Priority, command: Option<&[String]>) {
    if priority == Priority::Normal {
        return;
    }
    if leads_own_session() && command.is_none() {
        if under_systemd() {
            tracing::debug!(
                "running as a systemd service: the unit's CPUWeight= and IOWeight= decide; lowering nice and the I/O class as well"
            );
        }
        lower(true);
        return;
    }
    if !single_threaded() {
        // Forking a process with threads would leave the worker with locks held by
        // threads that do not exist in it; lowering in place still helps without autogroups.
        tracing::warn!(
            "cannot start a session of narpost's own (threads are running); lowering nice and the I/O class only"
        );
        lower(false);
        return;
    }
    if let Err(e) = supervisor::fork_worker(command) {
        tracing::warn!(
            "cannot start a process of narpost's own to lower: {e}; uploading at normal priority"
        );
        return;
    }
    // In the worker: a session of its own, whose autogroup it may lower.
    match rustix::process::setsid() {
        Ok(_) => lower(true),
        Err(e) => {
            tracing::warn!(
                "cannot start a session of narpost's own: {e}; lowering nice and the I/O class only"
            );
            lower(false);
        }
    }
}

/// Whether this process is the leader of its session. `getsid` answers 0 when the session's
/// leader lives outside this PID namespace (a container started without a session of its
/// own), which rustix's `Pid` cannot hold, so this asks libc: such a process leads nothing.
fn leads_own_session() -> bool {
    // SAFETY: getsid(0) only reads the calling process's session id.
    let sid = unsafe { libc::getsid(0) };
    sid > 0 && sid == rustix::process::getpid().as_raw_nonzero().get()
}

/// Raises this process back to the priority it had before [`enter`], every thread of it.
/// Does nothing if it was never lowered. Blocking (reads `/proc`), but brief.
pub fn restore() {
    let Some(saved) = SAVED.get() else {
        return;
    };
    if let Some(nice) = saved.autogroup
        && let Err(e) = std::fs::write(AUTOGROUP, nice.to_string())
    {
        tracing::debug!("{AUTOGROUP}: cannot set nice {nice}: {e}");
    }
    RESTORED.store(true, Ordering::SeqCst);
    // Twice: a thread started during the first pass by a thread not yet restored inherits
    // the low priority.
    for _ in 0..2 {
        for tid in threads() {
            set_thread(tid, saved.nice, saved.ioprio);
            set_normal_policy(tid);
        }
    }
    tracing::debug!("back to normal priority for the rest of the drain");
}

/// Raises the priority back when the first SIGTERM or SIGINT arrives (the daemon and
/// `watch-store` stop on it). Call from within the runtime.
pub fn restore_on_stop_signal() -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    if SAVED.get().is_none() {
        return Ok(());
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        let _ = tokio::task::spawn_blocking(restore).await;
    });
    Ok(())
}

/// Lowers nice and the I/O class of this (still only) thread, and with `autogroup` the
/// autogroup of the session this process leads alone.
fn lower(autogroup: bool) {
    let nice = rustix::process::getpriority_process(None).unwrap_or(0);
    let ioprio = ioprio_get().unwrap_or(0);
    let mut saved_autogroup = None;
    if autogroup {
        match autogroup_nice() {
            Ok(before) => match std::fs::write(AUTOGROUP, NICE_IDLE.to_string()) {
                Ok(()) => saved_autogroup = Some(before),
                Err(e) => tracing::debug!("{AUTOGROUP}: cannot set nice {NICE_IDLE}: {e}"),
            },
            // Kernels built without autogroups, or with them off: nice is what counts.
            Err(e) => tracing::debug!("{AUTOGROUP}: {e}"),
        }
    }
    set_thread(
        rustix::thread::gettid(),
        NICE_IDLE,
        IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
    );
    let _ = SAVED.set(Saved {
        nice,
        ioprio,
        autogroup: saved_autogroup,
    });
}

fn set_thread(tid: rustix::process::Pid, nice: i32, ioprio: i32) {
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::debug!("thread {tid:?}: cannot set nice {nice}: {e}");
    }
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid.as_raw_nonzero().get(),
            ioprio,
        )
    };
    if r != 0 {
        tracing::debug!(
            "thread {tid:?}: cannot set I/O priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// Takes a thread that runs behind newer work ([`behind_newer_work`]) back to the normal
/// policy; needs `CAP_SYS_NICE`, and does nothing to a thread at the normal policy.
fn set_normal_policy(tid: rustix::process::Pid) {
    let tid = tid.as_raw_nonzero().get();
    // SAFETY: sched_getscheduler takes a thread id and touches no memory of ours.
    if unsafe { libc::sched_getscheduler(tid) } != libc::SCHED_IDLE {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the one sched_param we pass.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) } != 0 {
        tracing::debug!(
            "thread {tid}: cannot leave the idle policy: {}",
            io::Error::last_os_error()
        );
    }
}

fn ioprio_get() -> io::Result<i32> {
    // SAFETY: as for ioprio_set.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

/// The autogroup's nice value: the file reads `/autogroup-123 nice 0`.
fn autogroup_nice() -> io::Result<i32> {
    let text = std::fs::read_to_string(AUTOGROUP)?;
    text.rsplit_once("nice ")
        .and_then(|(_, n)| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected contents {text:?}")))
}

fn threads() -> Vec<rustix::process::Pid> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return vec![rustix::thread::gettid()];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(rustix::process::Pid::from_raw)
        .collect()
}

fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

/// systemd sets INVOCATION_ID for every unit it starts; the cgroup names the service.
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
        || std::fs::read_to_string(Path::new("/proc/self/cgroup"))
            .is_ok_and(|c| c.lines().any(|l| l.trim_end().ends_with(".service")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_names_parse_and_others_are_refused() {
        assert_eq!("idle".parse::<Priority>(), Ok(Priority::Idle));
        assert_eq!("normal".parse::<Priority>(), Ok(Priority::Normal));
        assert!("low".parse::<Priority>().is_err());
    }

    #[test]
    fn large_work_runs_behind_newer_work_only_while_lowered() {
        // SAFETY: sched_getscheduler(0) asks about the calling thread.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        // Never lowered (no other test lowers this process): the work runs as it is.
        assert_eq!(behind_newer_work(policy), libc::SCHED_OTHER);

        // Lowered as `enter` does, to the values this process has now, so that `restore`
        // below changes nothing else of the test process.
        let _ = SAVED.set(Saved {
            nice: rustix::process::getpriority_process(None).unwrap_or(0),
            ioprio: ioprio_get().unwrap_or(0),
            autogroup: None,
        });
        assert_eq!(behind_newer_work(policy), libc::SCHED_IDLE);
        assert_eq!(
            policy(),
            libc::SCHED_OTHER,
            "the caller itself stays as it was"
        );

        restore();
        assert_eq!(behind_newer_work(policy), libc::SCHED_OTHER);
    }
}
