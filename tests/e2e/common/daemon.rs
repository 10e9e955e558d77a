//! The daemon and the hook as child processes, and what the tests read of their state
//! directory: shared by the tests of draining, of faults and of the watchers.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use narpost::format::store_path::StorePath;
use narpost::queue::{EntryOrCorrupt, Queue};

use super::*;

pub fn clean_narpost_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NARPOST_") {
            cmd.env_remove(key);
        }
    }
}

/// Valid entries of a queue, failing on corrupt ones.
pub fn queued(state: &Path) -> Vec<narpost::queue::Entry> {
    Queue::open(state)
        .expect("open the queue")
        .list()
        .expect("list the queue")
        .into_iter()
        .map(|item| match item {
            EntryOrCorrupt::Valid(e) => e,
            other => panic!("corrupt queue entry: {other:?}"),
        })
        .collect()
}

pub fn queued_paths(state: &Path) -> BTreeSet<StorePath> {
    queued(state).into_iter().flat_map(|e| e.paths).collect()
}

pub fn depth(state: &Path) -> usize {
    Queue::open(state)
        .expect("open the queue")
        .depth()
        .expect("queue depth")
}

/// Paths with a GC root in `dir`.
pub fn rooted(dir: &Path) -> BTreeSet<StorePath> {
    narpost::queue::GcRoots::new(dir)
        .list()
        .expect("list GC roots")
        .into_iter()
        .collect()
}

/// `narpost status --json`.
pub fn status_json(env: &Env) -> serde_json::Value {
    let out = run(env.narpost().args(["status", "--json"]));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

pub fn status_text(env: &Env) -> String {
    stdout(&run(env.narpost().arg("status")))
}

/// `narpost daemon` as a child process, its stderr in a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(env: &Env, cache: &str, key: &Path, drain_timeout: u64) -> Daemon {
        Daemon::start_with(env, cache, key, drain_timeout, |_| {})
    }

    pub fn start_with(
        env: &Env,
        cache: &str,
        key: &Path,
        drain_timeout: u64,
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
        let log = env.path().join(format!("daemon-{}.log", nonce()));
        let file = fs::File::create(&log).expect("create the daemon log");
        let mut cmd = env.narpost();
        cmd.env("NARPOST_CACHE", cache)
            .env("NARPOST_KEY_FILE", key)
            .env("NARPOST_JOBS", "2")
            .args(["daemon", "--drain-timeout", &drain_timeout.to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup the log"))
            .stderr(file);
        configure(&mut cmd);
        let child = cmd.spawn().expect("start narpost daemon");
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("signal the daemon");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the daemon to exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the daemon") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {timeout:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for exit 0 within `timeout`; returns how long it took.
    pub fn stop(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        self.signal(rustix::process::Signal::TERM);
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "the daemon exited with {status} on SIGTERM; its log:\n{}",
            self.log()
        );
        start.elapsed()
    }

    /// CPU time (user + system) the drainer has used so far, in clock ticks (the process
    /// started may only supervise the one that drains, see narpost::priority).
    pub fn cpu_ticks(&self, env: &Env) -> u64 {
        let mut pid = None;
        wait_until(
            "the daemon to publish its drain state",
            Duration::from_secs(10),
            || {
                pid = drainer_pid(&env.state());
                pid.is_some()
            },
        );
        let pid = pid.expect("a drainer pid");
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
        // Fields after the command name (which is in parentheses and may contain spaces).
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 of the rest.
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Shown only for a failing test (the harness captures it otherwise).
        eprintln!("--- log of daemon {}:\n{}", self.pid(), self.log());
    }
}

/// Waits until the queue is empty, with the daemon's log in the panic message.
pub fn wait_drained(env: &Env, daemon: &Daemon, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while depth(&env.state()) > 0 {
        assert!(
            Instant::now() < deadline,
            "queue not drained after {timeout:?} ({} entries left); daemon log:\n{}",
            depth(&env.state()),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until no path is rooted in `gcroots`: the daemon acknowledges an entry first and
/// releases its roots right after, so an empty queue can briefly still have roots.
pub fn wait_unrooted(gcroots: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rooted(gcroots).is_empty() {
        assert!(
            Instant::now() < deadline,
            "roots still held after the drain: {:?}",
            rooted(gcroots)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_until`], with the daemon's log in the panic message.
pub fn wait_for(daemon: &Daemon, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; daemon log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mount for the lifetime of the value (tests run as root).
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn new(args: &[&str], dir: &Path) -> Mount {
        require("mount");
        run(Command::new("mount").args(args).arg(dir));
        Mount(dir.to_path_buf())
    }

    /// A tmpfs at `dir`, private like a state directory (a tmpfs root is 1777 by default,
    /// which narpost refuses as a state directory).
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        fs::create_dir_all(dir).expect("create the mount point");
        Mount::new(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ],
            dir,
        )
    }

    /// `dir` itself, read-only: as root, no permission bit keeps a process from writing,
    /// a read-only mount does.
    pub fn read_only(dir: &Path) -> Mount {
        let m = Mount::new(&["--bind", &dir.display().to_string()], dir);
        run(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir));
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `narpost hook` as Nix runs it: no arguments but the state directory, the build's
/// variables in the environment. Returns (exit code, stderr lines).
pub fn hook(state: &Path, gcroots: &Path, vars: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let mut cmd = Command::new(narpost_bin());
    clean_narpost_env(&mut cmd);
    cmd.env("NARPOST_GC_ROOTS_DIR", gcroots)
        .env_remove("OUT_PATHS")
        .env_remove("DRV_PATH")
        .arg("--state-dir")
        .arg(state)
        .arg("hook");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().expect("run narpost hook");
    assert_eq!(stdout(&out), "", "the hook prints nothing on stdout");
    (
        out.status.code(),
        stderr(&out).lines().map(str::to_owned).collect(),
    )
}

/// Asserts one `narpost hook: ` line per expected fragment, each containing it.
pub fn assert_lines(result: (Option<i32>, Vec<String>), fragments: &[&str]) {
    let (code, lines) = result;
    assert_eq!(code, Some(0), "the hook exits 0: {lines:?}");
    assert_eq!(lines.len(), fragments.len(), "{lines:?}");
    for (line, fragment) in lines.iter().zip(fragments) {
        assert!(line.starts_with("narpost hook: "), "{lines:?}");
        assert!(line.contains(fragment), "{fragment:?} in {lines:?}");
    }
}

pub fn simple_paths(env: &Env, names: &[&str]) -> Vec<StorePath> {
    let mut expr = nix_prelude(&nonce());
    expr.push_str("{\n");
    for n in names {
        expr.push_str(&format!(
            "  {n} = mk \"narpost-bad-{n}\" \"mkdir $out; echo {n} > $out/file\";\n"
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix(&format!("{}.nix", names.join("-")), &expr);
    let out = nix_build(&file, names, &[]);
    assert_eq!(out.len(), names.len());
    out
}

/// Asserts `path` is still queued and rooted, nothing was given up on, and the cache does
/// not have it.
pub fn assert_kept(env: &Env, daemon: &Daemon, gcroots: &Path, path: &StorePath, cache: &CacheDir) {
    let status = status_json(env);
    assert_eq!(
        status["failed"],
        serde_json::json!([]),
        "{status}\n{}",
        daemon.log()
    );
    assert_eq!(status["queue_depth"], 1, "{status}");
    assert_eq!(queued_paths(&env.state()), BTreeSet::from([path.clone()]));
    assert!(rooted(gcroots).contains(path), "the GC root is kept");
    assert!(!cache.has(path));
    cache.assert_complete();
}
