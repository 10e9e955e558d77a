//! narpost at idle priority: it yields in a session of its own (nice 19, its autogroup at
//! nice 19, the idle I/O class) while what it was started from, and `watch-exec`'s command,
//! stay exactly where they would be without it. Needs `ionice` and `bash` (util-linux and
//! bash, both in scripts/install-deps's base system).

use crate::common;

use std::fs;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Waits for `child` to exit; panics after `timeout` with `what`'s log.
fn wait_exit(child: &mut Child, timeout: Duration, log: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit within {timeout:?}; log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The drainer's pid once it has published its state.
fn wait_drainer(env: &Env, log: &Path) -> u32 {
    let mut pid = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid.is_none() {
        assert!(
            Instant::now() < deadline,
            "no drain state published; log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
        pid = drainer_pid(&env.state());
    }
    pid.expect("a pid")
}

fn this_process() -> Sched {
    Sched::of(std::process::id())
}

/// `narpost daemon` as its own process group's leader, as a shell with job control starts
/// it: `setsid()` cannot work for it.
fn daemon_as_job(env: &Env, cache: &Path, log: &Path) -> Child {
    env.narpost()
        .env_remove("NARPOST_PRIORITY")
        .args(["daemon", "--drain-timeout", "2", "--to", &file_url(cache)])
        .process_group(0)
        .stdin(Stdio::null())
        .stderr(fs::File::create(log).expect("create a log"))
        .spawn()
        .expect("start narpost daemon")
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("send a signal");
}

fn wait_state(pid: u32, what: &str, want: impl Fn(Option<char>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !want(Sched::state(pid)) {
        assert!(
            Instant::now() < deadline,
            "process {pid} is {:?}, expected it {what}",
            Sched::state(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_daemon_drains_at_idle_priority_while_the_process_started_stays_put() {
    require("ionice");
    let env = Env::new();
    let cache = env.path().join("cache");
    let log = env.path().join("daemon.log");
    let mut daemon = daemon_as_job(&env, &cache, &log);
    let started = daemon.id();
    let worker = wait_drainer(&env, &log);
    let me = this_process();

    // The process started is untouched: the caller's session, its own group, the caller's
    // priority and autogroup. The drainer is its child, lowered in a session of its own.
    assert_ne!(worker, started);
    let original = Sched::of(started);
    assert_eq!(
        (
            original.session,
            original.pgrp,
            original.nice,
            &original.autogroup,
            &original.io
        ),
        (me.session, started, me.nice, &me.autogroup, &me.io),
        "{original:?} vs this test {me:?}"
    );
    let drainer = Sched::of(worker);
    drainer.assert_idle("the drainer");
    assert_eq!(drainer.ppid, started);
    assert_ne!(drainer.autogroup, me.autogroup);

    // The drainer's exit code comes back through the process started.
    let second_log = env.path().join("second.log");
    let mut second = daemon_as_job(&env, &cache, &second_log);
    let status = wait_exit(&mut second, Duration::from_secs(20), &second_log);
    let text = fs::read_to_string(&second_log).unwrap_or_default();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("already draining"), "{text}");

    // Job control stops and continues both.
    signal(started, rustix::process::Signal::TSTP);
    wait_state(started, "stopped", |s| s == Some('T'));
    wait_state(worker, "stopped", |s| s == Some('T'));
    signal(started, rustix::process::Signal::CONT);
    wait_state(worker, "running again", |s| matches!(s, Some('S' | 'R')));
    wait_state(started, "running again", |s| matches!(s, Some('S' | 'R')));

    // SIGTERM reaches the drainer, which stops cleanly; exit 0 comes back.
    signal(started, rustix::process::Signal::TERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(20), &log);
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}:\n{text}");
    assert!(text.contains("entries left queued"), "{text}");
    wait_state(worker, "gone", |s| s.is_none() || s == Some('Z'));

    // A drainer killed by a signal: the process started dies of the same signal.
    let mut daemon = daemon_as_job(&env, &cache, &log);
    let worker = wait_drainer_new(&env, &log, worker);
    signal(worker, rustix::process::Signal::KILL);
    let status = wait_exit(&mut daemon, Duration::from_secs(20), &log);
    assert_eq!(status.signal(), Some(9), "{status}");

    // The process started killed outright takes the drainer with it, and a new daemon can
    // start at once.
    let mut daemon = daemon_as_job(&env, &cache, &log);
    let worker = wait_drainer_new(&env, &log, worker);
    let _ = daemon.kill();
    let _ = daemon.wait();
    wait_state(worker, "killed with the process started", |s| {
        s.is_none() || s == Some('Z')
    });
    let mut daemon = daemon_as_job(&env, &cache, &log);
    wait_drainer_new(&env, &log, worker);
    signal(daemon.id(), rustix::process::Signal::TERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(20), &log);
    assert!(status.success(), "{status}");
}

/// The drainer's pid once a drainer other than `old` has published its state.
fn wait_drainer_new(env: &Env, log: &Path, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid = wait_drainer(env, log);
        if pid != old {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no new drainer; log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `sh` probe that records where it runs (and, given a state directory, where
/// narpost's drainer and the probe's parent run) into files named after its first argument,
/// then exits 7.
fn write_probe(dir: &Path) -> PathBuf {
    let probe = dir.join("probe");
    fs::write(
        &probe,
        r#"#!/bin/sh
out=$1
where() { cat /proc/$1/stat; echo; cat /proc/$1/autogroup; ionice -p $1; }
where $$ > "$out"
# Builtins only: the shell blocks every signal while it forks and waits for a child.
while read -r k v; do case $k in SigBlk:|SigIgn:) echo "$k $v";; esac; done < /proc/$$/status > "$out.signals"
where $PPID > "$out.parent"
if [ -n "$PROBE_STATE" ]; then
  i=0
  while [ ! -s "$PROBE_STATE/drain-state.json" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
  w=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$PROBE_STATE/drain-state.json")
  where $w > "$out.drainer"
fi
exit 7
"#,
    )
    .expect("write the probe");
    run(Command::new("chmod").arg("+x").arg(&probe));
    probe
}

fn read_sched(file: &Path) -> Sched {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 3, "{}: {text}", file.display());
    Sched::parse(lines[0], lines[1], lines[2])
}

fn quote(s: &std::ffi::OsStr) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

#[test]
fn watch_exec_lowers_only_itself_and_its_command_keeps_session_terminal_and_priority() {
    require("ionice");
    require("bash");
    let env = Env::new();
    let probe = write_probe(env.path());
    let cache = env.path().join("cache");
    let direct = env.path().join("direct");
    let via = env.path().join("via");
    let normal = env.path().join("normal");
    let code = env.path().join("code");

    // An interactive shell's situation: bash with job control, leading a session whose
    // controlling terminal is a pty, starts the probe once by itself and once under narpost.
    let mut narpost = env.narpost();
    narpost.env_remove("NARPOST_PRIORITY");
    let mut line: Vec<String> = vec![quote(narpost.get_program())];
    line.extend(narpost.get_args().map(quote));
    line.extend(
        ["watch-exec", "--to", &file_url(&cache), "--", "env"]
            .iter()
            .map(|a| quote(a.as_ref())),
    );
    line.push(format!("PROBE_STATE={}", quote(env.state().as_os_str())));
    line.push(quote(probe.as_os_str()));
    let line = line.join(" ");
    // Without narpost, under narpost at normal priority (what the command would be without
    // narpost's lowering), and under narpost at idle priority (the default).
    let script = format!(
        "{probe} {direct}; NARPOST_PRIORITY=normal {line} {normal}; rm {state}/drain-state.json; {line} {via}; echo $? > {code}; true",
        state = quote(env.state().as_os_str()),
        probe = quote(probe.as_os_str()),
        direct = quote(direct.as_os_str()),
        normal = quote(normal.as_os_str()),
        via = quote(via.as_os_str()),
        code = quote(code.as_os_str())
    );

    use rustix::pty::OpenptFlags;
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    rustix::pty::grantpt(&master).expect("grantpt");
    rustix::pty::unlockpt(&master).expect("unlockpt");
    let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
    let slave = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_string_lossy().as_ref())
        .expect("open the pty");
    let mut shell = Command::new("bash");
    shell.args(["-m", "-c", &script]);
    for (k, v) in narpost.get_envs() {
        match v {
            Some(v) => shell.env(k, v),
            None => shell.env_remove(k),
        };
    }
    shell
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave);
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        shell.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(std::io::stdin())?;
            Ok(())
        });
    }
    let mut bash = shell.spawn().expect("start bash");
    // The pty reads end once no process holds its other side, this one included.
    drop(shell);
    let mut terminal = fs::File::from(master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last process holding the pty has exited.
        while let Ok(n) = terminal.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let log = env.path().join("none");
    let status = wait_exit(&mut bash, Duration::from_secs(60), &log);
    let output = reader.join().expect("terminal reader");
    assert!(status.success(), "{status}; terminal:\n{output}");
    assert_eq!(
        fs::read_to_string(&code).unwrap_or_default().trim(),
        "7",
        "watch-exec returns the command's code; terminal:\n{output}"
    );

    let d = read_sched(&direct);
    let n = read_sched(&normal);
    let v = read_sched(&via);
    let started = read_sched(&via.with_extension("parent"));
    let drainer = read_sched(&PathBuf::from(format!("{}.drainer", via.display())));
    eprintln!("direct {d:?}\nnormal {n:?}\nvia {v:?}\nnarpost {started:?}\ndrainer {drainer:?}");
    // The shell's session and terminal, in the foreground group, the same nice value,
    // autogroup and I/O class as without narpost.
    assert_ne!(d.tty, 0, "the probe has the pty as its terminal");
    for other in [&n, &v] {
        assert_eq!(
            (
                other.session,
                other.tty,
                other.nice,
                &other.autogroup,
                &other.io
            ),
            (d.session, d.tty, d.nice, &d.autogroup, &d.io)
        );
        assert_eq!(
            other.pgrp as i64, other.tpgid,
            "the command is in the foreground"
        );
        // Its group is the job bash started: narpost's.
        assert_eq!(other.pgrp, other.ppid);
    }
    assert_eq!(
        d.pgrp as i64, d.tpgid,
        "the probe alone is in the foreground"
    );
    assert_eq!(started.pid, v.ppid);
    // Signal mask and ignored signals as without narpost.
    let signals = |p: &Path| fs::read_to_string(p.with_extension("signals")).expect("signals");
    assert_eq!(signals(&via), signals(&direct));
    // narpost as started stays in the shell's session at its priority; the drainer is its
    // child, lowered in a session of its own.
    assert_eq!(
        (
            started.session,
            started.nice,
            &started.autogroup,
            &started.io
        ),
        (d.session, d.nice, &d.autogroup, &d.io)
    );
    drainer.assert_idle("watch-exec's drainer");
    assert_eq!(drainer.ppid, started.pid);
    // At normal priority narpost drains in the process started, not lowered.
    let normal_drainer = read_sched(&PathBuf::from(format!("{}.drainer", normal.display())));
    assert_eq!(
        (normal_drainer.pid, normal_drainer.nice, &normal_drainer.io),
        (n.ppid, d.nice, &d.io)
    );
}

#[test]
fn signals_to_watch_exec_at_idle_priority_reach_the_command_and_its_code_comes_back() {
    let env = Env::new();
    let cache = env.path().join("cache");
    let log = env.path().join("signal.log");
    let mut child = env
        .narpost()
        .env_remove("NARPOST_PRIORITY")
        .args(["watch-exec", "--drain-timeout", "1", "--to", &file_url(&cache), "--"])
        .args([
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; i=0; while [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done",
        ])
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).expect("create a log file"))
        .spawn()
        .expect("run narpost watch-exec");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("piped stdout")),
        &mut ready,
    )
    .expect("read the command's output");
    assert_eq!(ready.trim(), "ready");
    let worker = wait_drainer(&env, &log);
    assert_ne!(worker, child.id());
    signal(child.id(), rustix::process::Signal::TERM);
    let status = wait_exit(&mut child, Duration::from_secs(30), &log);
    assert_eq!(
        status.code(),
        Some(42),
        "{status}:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    wait_state(worker, "gone", |s| s.is_none() || s == Some('Z'));

    // A command that cannot be run gets the shell's code for it, through the process started.
    let out = env
        .narpost()
        .env_remove("NARPOST_PRIORITY")
        .args(["watch-exec", "--to", &file_url(&cache), "--"])
        .arg("/nonexistent/narpost-test-command")
        .output()
        .expect("run narpost watch-exec");
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot run command"),
        "{}",
        stderr(&out)
    );
}

/// The children of `pid`, from `/proc/PID/task/PID/children`.
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Waits until `pid` has a child, and returns the first.
fn wait_child(pid: u32, what: &str, log: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(&child) = children(pid).first() {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start; log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn in_a_pid_namespace_whose_session_leader_is_outside_the_daemon_still_lowers_itself() {
    // A container started without a session of its own: getsid() answers 0 there, since the
    // session's leader has no pid in the namespace.
    require("ionice");
    require("unshare");
    let env = Env::new();
    let cache = env.path().join("cache");
    let log = env.path().join("daemon.log");
    let narpost = env.narpost();
    let mut outer = Command::new("unshare");
    outer
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(narpost.get_program())
        .args(narpost.get_args())
        .args(["daemon", "--drain-timeout", "2", "--to", &file_url(&cache)])
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).expect("create a log"));
    for (key, value) in narpost.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    outer.env_remove("NARPOST_PRIORITY");
    let mut unshare = outer.spawn().expect("start unshare");
    let started = wait_child(unshare.id(), "narpost daemon", &log);
    let worker = wait_child(started, "the drainer", &log);
    wait_drainer(&env, &log);
    Sched::of(worker).assert_idle("the drainer in the namespace");

    signal(started, rustix::process::Signal::TERM);
    let status = wait_exit(&mut unshare, Duration::from_secs(20), &log);
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}:\n{text}");
    assert!(text.contains("entries left queued"), "{text}");
}
