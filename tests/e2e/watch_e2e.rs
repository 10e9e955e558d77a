//! `narpost watch-exec` and `narpost watch-store` end to end, with the real Nix, the real
//! /nix/store and a real nginx (or file://) cache: what a build finishes is in the cache,
//! signed, even when the build fails; nothing is missed under a burst; nothing that was
//! there before is pushed; a killed watcher loses nothing it had seen.
//!
//! The watchers see the whole store, where other tests build at the same time, so every
//! assertion is about this test's own derivations (unique nonces), never about totals.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use narpost::format::store_path::StorePath;
use narpost::queue::Queue;

/// nix-build arguments for many builds at once. Builds run as root instead of as one of the
/// ten `nixbld` users: with more jobs than free build users Nix polls for one slowly, which
/// turns a few seconds of building into minutes.
const MANY_JOBS: [&str; 5] = ["--max-jobs", "16", "--option", "build-users-group", ""];

/// `n` derivations `s1`..`sn`, each built after the one before. With `refs`, each output
/// names the previous one (a runtime reference: `sn`'s closure is the whole chain); without,
/// the previous output is only needed to build, and every closure is the path alone.
/// `fail_last`: the last one fails with exit code 3 after its dependencies were built.
fn chain_expr(nonce: &str, n: usize, refs: bool, fail_last: bool, sleep: &str) -> String {
    let mut text = format!("{}rec {{\n", nix_prelude(nonce));
    for i in 1..=n {
        let needs = if i == 1 {
            String::new()
        } else {
            format!("test -e ${{s{}}} && ", i - 1)
        };
        let body = if fail_last && i == n {
            "echo failing on purpose >&2; exit 3".to_string()
        } else if refs && i > 1 {
            format!("echo ${{s{}}} > $out", i - 1)
        } else {
            format!("echo {i} > $out")
        };
        text.push_str(&format!(
            "  s{i} = mk \"wchain-{i}\" ''\n    {needs}sleep {sleep}; {body}\n  '';\n"
        ));
    }
    text.push_str("}\n");
    text
}

fn attrs(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// The output paths of `attrs` without building them.
fn out_paths(file: &Path, attrs: &[String]) -> Vec<StorePath> {
    let mut inst = nix("nix-instantiate");
    inst.arg(file);
    for a in attrs {
        inst.args(["-A", a]);
    }
    let drvs = stdout(&run(&mut inst));
    let mut outs = nix("nix-store");
    outs.args(["-q", "--outputs"]);
    outs.args(drvs.lines().map(str::trim).filter(|l| !l.is_empty()));
    parse_paths(&stdout(&run(&mut outs)))
}

/// The derivation each path was built from.
fn derivers(paths: &[StorePath]) -> Vec<StorePath> {
    let mut cmd = nix("nix-store");
    cmd.args(["-q", "--deriver"]);
    for p in paths {
        cmd.arg(p.to_absolute());
    }
    parse_paths(&stdout(&run(&mut cmd)))
}

/// A fresh store, trusting only `trusted_key`, copies the derivation `drv` itself from the
/// cache (`nix copy` otherwise takes a `.drv` argument to mean its outputs).
fn assert_substitutes_derivation(env: &Env, url: &str, trusted_key: &str, drv: &StorePath) {
    let fresh = tempfile::Builder::new()
        .prefix("fresh-store-")
        .tempdir_in(env.path())
        .expect("create a fresh store directory");
    run(nix("nix")
        .args(["copy", "--derivation", "--from", url, "--to"])
        .arg(fresh.path())
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "trusted-public-keys", trusted_key])
        .arg(drv.to_absolute()));
    let out = run(nix("nix")
        .args(["path-info", "--derivation", "--store"])
        .arg(fresh.path())
        .arg(drv.to_absolute()));
    assert_eq!(parse_paths(&stdout(&out)), vec![drv.clone()]);
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Every store path named in `state`'s queue now.
fn queued_paths(state: &Path) -> BTreeSet<StorePath> {
    let queue = Queue::open(state).expect("open the queue");
    queue
        .entries()
        .expect("list the queue")
        .into_iter()
        .flat_map(|e| e.paths)
        .collect()
}

/// (pushed, already cached, left queued) from the summary line.
fn summary(text: &str) -> Option<(u64, u64, u64)> {
    let line = text.lines().rev().find(|l| l.contains(" left queued"))?;
    let rest = line.split("pushed ").nth(1)?;
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().ok());
    let pushed = numbers.next()??;
    let cached = numbers.next()??;
    let left = numbers.next()??;
    let noun = if pushed == 1 { "path" } else { "paths" };
    let expected = format!("pushed {pushed} {noun}, {cached} already cached, {left} left queued");
    line.contains(&expected).then_some((pushed, cached, left))
}

fn code_text(status: &ExitStatus) -> String {
    format!("{status}")
}

/// `narpost watch-store` running in the background; its stderr is collected.
struct Watcher {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Starts `watch-store` and waits until it says it is watching (from then on, every
    /// path that becomes valid is its to push).
    fn start(env: &Env, args: &[&str]) -> Watcher {
        let mut child = env
            .narpost()
            .arg("watch-store")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start narpost watch-store");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("narpost: watching") {
                        let _ = ready_tx.send(());
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let mut w = Watcher {
            child,
            log,
            reader: Some(reader),
        };
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let status = w.child.try_wait().ok().flatten();
            panic!(
                "watch-store did not start watching (exit: {status:?}):\n{}",
                w.log()
            );
        }
        w
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("signal watch-store");
    }

    /// Waits for the exit, then for the rest of stderr.
    fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for watch-store") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "watch-store still running {timeout:?} after the signal:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.log())
    }

    /// SIGTERM, then the exit status and everything it printed.
    fn terminate(&mut self) -> (ExitStatus, String) {
        self.signal(rustix::process::Signal::TERM);
        self.wait(Duration::from_secs(90))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts a clean stop: exit 0 and the summary line. Returns the summary's numbers.
fn assert_clean_stop(status: &ExitStatus, log: &str) -> (u64, u64, u64) {
    assert!(
        status.success(),
        "watch-store exited with {}:\n{log}",
        code_text(status)
    );
    summary(log).unwrap_or_else(|| {
        panic!("no \"pushed N paths, M already cached, K left queued\" line:\n{log}")
    })
}

#[test]
fn failing_build_leaves_every_finished_path_cached_and_keeps_the_exit_code() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("watch-fail-1");
    let file = env.write_nix("chain.nix", &chain_expr(&nonce(), 10, true, true, "0"));

    let out = env
        .narpost()
        .args(["watch-exec", "--to", &nginx.url(), "--key"])
        .arg(&key)
        .args(["--", "nix-build"])
        .arg(&file)
        .args(["-A", "s10", "--no-out-link"])
        .output()
        .expect("run narpost watch-exec");
    let text = stderr(&out);
    let cache = nginx.cache();
    // Checked at once: watch-exec returns only after the uploads.
    let finished = nix_build(
        &file,
        &attrs("s", 1..=9)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(finished.len(), 9);
    for p in &finished {
        assert!(
            cache.has(p),
            "{p} finished but is not in the cache:\n{text}"
        );
    }

    // The same build alone fails the same way: that code is the one CI must see.
    let alone = nix("nix-build")
        .arg(&file)
        .args(["-A", "s10", "--no-out-link"])
        .output()
        .expect("run nix-build");
    assert!(!alone.status.success(), "the last derivation must fail");
    assert_eq!(
        out.status.code(),
        alone.status.code(),
        "watch-exec must exit with nix-build's code:\n{text}"
    );
    assert!(summary(&text).is_some(), "no summary:\n{text}");

    cache.assert_complete();
    assert_substitutes(&env, &nginx.url(), &public, &finished);
}

#[test]
fn fan_out_of_fifty_is_all_cached_when_watch_exec_returns() {
    let env = Env::new();
    let (key, public) = env.keygen("watch-fan-1");
    let dir = env.path().join("cache");
    let url = file_url(&dir);
    let mut expr = format!(
        "{}rec {{\n  base = mk \"wfan-base\" \"echo base > $out\";\n",
        nix_prelude(&nonce())
    );
    for i in 1..=50 {
        expr.push_str(&format!(
            "  leaf{i} = mk \"wfan-{i}\" \"echo ${{base}} {i} > $out\";\n"
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix("fan.nix", &expr);

    let out = env
        .narpost()
        .args(["watch-exec", "--to", &url, "--key"])
        .arg(&key)
        .args(["--", "nix-build"])
        .arg(&file)
        .arg("--no-out-link")
        .args(MANY_JOBS)
        .output()
        .expect("run narpost watch-exec");
    let text = stderr(&out);
    assert!(out.status.success(), "{}:\n{text}", code_text(&out.status));
    // The command's stdout is passed through: nix-build's output paths.
    let outs = parse_paths(&stdout(&out));
    assert_eq!(outs.len(), 51, "{outs:?}");
    let cache = CacheDir::new(&dir);
    let missing: Vec<_> = outs.iter().filter(|p| !cache.has(p)).collect();
    assert!(
        missing.is_empty(),
        "not in the cache when watch-exec returned: {missing:?}\n{text}"
    );
    let (pushed, _, _) = summary(&text).unwrap_or_else(|| panic!("no summary:\n{text}"));
    assert!(pushed >= 51, "{text}");

    cache.assert_complete();
    assert_substitutes(&env, &url, &public, &outs);
}

#[test]
fn burst_of_two_hundred_is_all_pushed_by_watch_store() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("watch-burst-1");
    let key_arg = key.display().to_string();
    let mut expr = format!("{}{{\n", nix_prelude(&nonce()));
    for i in 0..200 {
        expr.push_str(&format!(
            "  b{i} = mk \"wburst-{i}\" \"echo {i} > $out\";\n"
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix("burst.nix", &expr);

    let mut watcher = Watcher::start(&env, &["--to", &nginx.url(), "--key", &key_arg]);
    let started = Instant::now();
    let outs = nix_build(&file, &[], &MANY_JOBS);
    let built = started.elapsed();
    assert_eq!(outs.len(), 200);
    let cache = nginx.cache();
    wait_until(
        "all 200 burst outputs in the cache",
        Duration::from_secs(120),
        || outs.iter().all(|p| cache.has(p)),
    );
    eprintln!(
        "burst: built in {built:?}, all cached {:?} after the build started",
        started.elapsed()
    );

    let (status, log) = watcher.terminate();
    let (pushed, _, _) = assert_clean_stop(&status, &log);
    assert!(pushed >= 200, "{log}");
    // The derivations were written to the store while watching, and are not pushed.
    for drv in derivers(&outs[..20]) {
        assert!(drv.is_derivation());
        assert!(!cache.has(&drv), "{drv} pushed without --include-drv");
    }
    cache.assert_complete();
    assert_substitutes(&env, &nginx.url(), &public, &outs);
}

/// A directory with a store path's name that Nix never registered, and its `.lock`.
struct FakeStorePath {
    dir: PathBuf,
    lock: PathBuf,
    path: StorePath,
}

impl FakeStorePath {
    fn create(tag: &str) -> FakeStorePath {
        let seed = narpost::format::hash::Sha256::digest(nonce().as_bytes());
        let hash = narpost::format::nixbase32::encode(&seed.as_bytes()[..20]);
        let path = StorePath::from_base(&format!("{hash}-wfake-{tag}")).expect("a store path");
        let dir = PathBuf::from(path.to_absolute());
        let lock = PathBuf::from(format!("{}.lock", path.to_absolute()));
        fs::write(&lock, b"").expect("create a lock file in the store");
        fs::create_dir(&dir).expect("create a directory in the store");
        fs::write(dir.join("file"), b"not registered").expect("write into it");
        FakeStorePath { dir, lock, path }
    }
}

impl Drop for FakeStorePath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn only_new_non_derivation_paths_unless_asked() {
    let env = Env::new();
    let (key, public) = env.keygen("watch-new-1");
    let key_arg = key.display().to_string();
    let file = env.write_nix(
        "paths.nix",
        &format!(
            "{}{{\n  pre = mk \"wnew-pre\" \"echo pre > $out\";\n  post = mk \"wnew-post\" \"echo post > $out\";\n  post2 = mk \"wnew-post2\" \"echo post2 > $out\";\n}}\n",
            nix_prelude(&nonce())
        ),
    );
    let pre = nix_build(&file, &["pre"], &[]).remove(0);
    let dir = env.path().join("cache");
    let url = file_url(&dir);
    let cache = CacheDir::new(&dir);

    let mut watcher = Watcher::start(&env, &["--to", &url, "--key", &key_arg]);
    // Filesystem events for a path Nix never registered must not be taken for a new path.
    let fake = FakeStorePath::create("watch-new");
    fs::remove_file(&fake.lock).expect("remove the fake lock");
    // `pre` is asked for again but was valid before the watcher started.
    let outs = nix_build(&file, &["pre", "post"], &[]);
    let post = outs[1].clone();
    wait_until("post in the cache", Duration::from_secs(60), || {
        cache.has(&post)
    });
    let (status, log) = watcher.terminate();
    assert_clean_stop(&status, &log);
    let fake_path = fake.path.clone();
    drop(fake);

    assert!(
        !cache.has(&pre),
        "a path valid before the watcher started was pushed"
    );
    for drv in derivers(&[pre.clone(), post.clone()]) {
        assert!(!cache.has(&drv), "{drv} pushed without --include-drv");
    }
    let failed = Queue::open(&env.state())
        .expect("open the queue")
        .failed()
        .expect("list failed entries");
    for f in &failed {
        assert!(
            !f.paths.contains(&fake_path),
            "an unregistered directory was queued: {f:?}"
        );
    }
    assert!(!queued_paths(&env.state()).contains(&fake_path));
    assert!(!cache.has(&fake_path));
    cache.assert_complete();
    assert_substitutes(&env, &url, &public, std::slice::from_ref(&post));

    // --include-drv: the derivation written while watching is pushed too.
    let out = env
        .narpost()
        .args(["watch-exec", "--include-drv", "--to", &url, "--key"])
        .arg(&key)
        .args(["--", "nix-build"])
        .arg(&file)
        .args(["-A", "post2", "--no-out-link"])
        .output()
        .expect("run narpost watch-exec");
    assert!(out.status.success(), "{}", stderr(&out));
    let post2 = parse_paths(&stdout(&out)).remove(0);
    let post2_drv = derivers(std::slice::from_ref(&post2)).remove(0);
    assert!(cache.has(&post2), "{}", stderr(&out));
    assert!(
        cache.has(&post2_drv),
        "--include-drv did not push {post2_drv}"
    );
    cache.assert_complete();
    assert_substitutes(&env, &url, &public, std::slice::from_ref(&post2));
    assert_substitutes_derivation(&env, &url, &public, &post2_drv);

    // --all: what was there before is queued too (derivations still left out). The cache is
    // down, so the check does not wait for the whole shared store to be uploaded; that what is
    // queued gets uploaded is what the other tests show.
    let all_env = Env::new();
    let down = format!("http://127.0.0.1:{}", free_port());
    let mut watcher = Watcher::start(
        &all_env,
        &[
            "--all",
            "--to",
            &down,
            "--key",
            &key_arg,
            "--drain-timeout",
            "1",
        ],
    );
    let queued = queued_paths(&all_env.state());
    assert!(queued.contains(&pre), "--all did not queue {pre}");
    assert!(queued.contains(&post) && queued.contains(&post2));
    assert!(
        !queued.iter().any(|p| p.is_derivation()),
        "--all queued derivations"
    );
    let (status, log) = watcher.terminate();
    let (_, _, left) = assert_clean_stop(&status, &log);
    assert!(left > 0, "{log}");
}

#[test]
fn killed_watcher_restarted_pushes_everything_it_had_queued() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("watch-kill-1");
    let key_arg = key.display().to_string();
    // No runtime references: a path is in the cache only if it was itself pushed, not
    // pulled in as part of a later path's closure.
    let file = env.write_nix("slow.nix", &chain_expr(&nonce(), 6, false, false, "1"));
    let chain = out_paths(&file, &attrs("s", 1..=6));
    let args = ["--to", &nginx.url(), "--key", &key_arg];

    let mut first = Watcher::start(&env, &args);
    // The cache is down, so what the watcher finds stays in its queue.
    nginx.stop();
    let mut build = nix("nix-build")
        .arg(&file)
        .args(["-A", "s6", "--no-out-link"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nix-build");
    wait_until(
        "two chain outputs in the queue",
        Duration::from_secs(60),
        || {
            queued_paths(&env.state())
                .iter()
                .filter(|p| chain.contains(p))
                .count()
                >= 2
        },
    );
    first.signal(rustix::process::Signal::KILL);
    let (status, _) = first.wait(Duration::from_secs(10));
    assert!(!status.success());
    let had: Vec<StorePath> = queued_paths(&env.state())
        .into_iter()
        .filter(|p| chain.contains(p))
        .collect();
    assert!(
        build.try_wait().expect("poll nix-build").is_none(),
        "the build must still be running when the watcher is killed"
    );

    nginx.resume();
    let mut second = Watcher::start(&env, &args);
    let built = build.wait().expect("wait for nix-build");
    assert!(built.success(), "the chain must build");
    let last = chain[5].clone();
    let cache = nginx.cache();
    wait_until(
        "the queued paths and the last one in the cache",
        Duration::from_secs(60),
        || had.iter().chain([&last]).all(|p| cache.has(p)),
    );
    let (status, log) = second.terminate();
    assert_clean_stop(&status, &log);

    cache.assert_complete();
    let mut expected = had.clone();
    expected.push(last);
    assert_substitutes(&env, &nginx.url(), &public, &expected);
}

#[test]
fn upload_failure_never_changes_the_exit_code() {
    let env = Env::new();
    let (key, public) = env.keygen("watch-down-1");
    let file = env.write_nix(
        "down.nix",
        &format!(
            "{}{{\n  a = mk \"wdown-a\" \"echo a > $out\";\n  b = mk \"wdown-b\" \"echo b > $out\";\n}}\n",
            nix_prelude(&nonce())
        ),
    );
    // Nothing listens there.
    let down = format!("http://127.0.0.1:{}", free_port());

    let started = Instant::now();
    let out = env
        .narpost()
        .args(["watch-exec", "--drain-timeout", "2", "--to", &down, "--key"])
        .arg(&key)
        .args(["--", "nix-build"])
        .arg(&file)
        .args(["-A", "a", "--no-out-link"])
        .output()
        .expect("run narpost watch-exec");
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let a = parse_paths(&stdout(&out)).remove(0);
    let (_, _, left) = summary(&text).unwrap_or_else(|| panic!("no summary:\n{text}"));
    assert!(left >= 1, "{text}");
    assert!(text.contains("upload failed"), "{text}");
    assert!(
        text.contains(&down[7..]),
        "the failure should name the cache:\n{text}"
    );
    assert!(queued_paths(&env.state()).contains(&a));

    // A command's own failure code passes through the same way.
    let script = format!("nix-build {} -A b --no-out-link && exit 7", file.display());
    let out = env
        .narpost()
        .args(["watch-exec", "--drain-timeout", "1", "--to", &down, "--key"])
        .arg(&key)
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("run narpost watch-exec");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let b = parse_paths(&stdout(&out)).remove(0);

    // What was left queued is pushed by the next run with this state directory.
    let nginx = Nginx::start(env.path());
    let out = env
        .narpost()
        .args(["watch-exec", "--to", &nginx.url(), "--key"])
        .arg(&key)
        .args(["--", "true"])
        .output()
        .expect("run narpost watch-exec");
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = nginx.cache();
    assert!(cache.has(&a) && cache.has(&b), "{}", stderr(&out));
    cache.assert_complete();
    assert_substitutes(&env, &nginx.url(), &public, &[a, b]);
}

/// `--drain-timeout` bounds the whole wait after the command, also for an upload under way
/// at the deadline: a cache that accepts connections and never answers holds narpost for
/// the timeout, not for the timeout again.
#[test]
fn a_hung_cache_holds_watch_exec_for_the_drain_timeout_only() {
    let env = Env::new();
    let (key, _) = env.keygen("watch-hung-1");
    let file = env.write_nix(
        "hung.nix",
        &format!(
            "{}mk \"whung\" \"echo hung > $out\"\n",
            nix_prelude(&nonce())
        ),
    );
    let hung = format!("http://127.0.0.1:{}", canned_server(b"", true));
    // The drain starts when the command ends, so the clock starts there too: the build's own
    // time varies with the machine's load and says nothing about the drain timeout.
    let ended = env.path().join("command-ended");
    let out = env
        .narpost()
        .args(["watch-exec", "--drain-timeout", "3", "--to", &hung, "--key"])
        .arg(&key)
        .args([
            "--",
            "sh",
            "-c",
            r#"nix-build "$1" --no-out-link; rc=$?; : > "$2"; exit $rc"#,
            "sh",
        ])
        .arg(&file)
        .arg(&ended)
        .output()
        .expect("run narpost watch-exec");
    let finished = SystemTime::now();
    let ended_at = fs::metadata(&ended)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: the command did not finish: {e}", ended.display()));
    let took = finished.duration_since(ended_at).unwrap_or_default();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        took >= Duration::from_secs(3),
        "{took:?}: returned before the drain timeout, so the cache was not really hung\n{text}"
    );
    assert!(
        took < Duration::from_millis(5500),
        "{took:?}: the drain timeout of 3 s was overrun\n{text}"
    );
    let built = parse_paths(&stdout(&out)).remove(0);
    assert!(queued_paths(&env.state()).contains(&built), "{text}");
}

#[test]
fn sigterm_pushes_what_is_still_queued_before_exiting() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("watch-term-1");
    let key_arg = key.display().to_string();
    let file = env.write_nix(
        "term.nix",
        &format!(
            "{}{{\n  t = mk \"wterm\" \"echo t > $out\";\n}}\n",
            nix_prelude(&nonce())
        ),
    );
    let mut watcher = Watcher::start(&env, &["--to", &nginx.url(), "--key", &key_arg]);
    // The cache goes down, so the path waits in the queue while the watcher backs off.
    nginx.stop();
    let t = nix_build(&file, &["t"], &[]).remove(0);
    wait_until("the path queued", Duration::from_secs(30), || {
        queued_paths(&env.state()).contains(&t)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!nginx.cache().has(&t));

    // Back up just as the CI job ends: the sidecar is stopped and must push first.
    nginx.resume();
    let (status, log) = watcher.terminate();
    assert_clean_stop(&status, &log);
    let cache = nginx.cache();
    assert!(cache.has(&t), "SIGTERM left a queued path behind:\n{log}");
    assert!(!queued_paths(&env.state()).contains(&t));
    cache.assert_complete();
    assert_substitutes(&env, &nginx.url(), &public, &[t]);
}

/// A path the watcher queued but that was deleted before its upload (the cache down, a
/// garbage collection in between), then built again, is registered anew: it is pushed.
#[test]
fn a_path_deleted_before_its_upload_and_built_again_is_pushed() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("watch-again-1");
    let key_arg = key.display().to_string();
    let file = env.write_nix(
        "again.nix",
        &format!(
            "{}{{\n  a = mk \"wagain\" \"echo again > $out\";\n}}\n",
            nix_prelude(&nonce())
        ),
    );
    let mut watcher = Watcher::start(&env, &["--to", &nginx.url(), "--key", &key_arg]);
    nginx.stop();
    let a = nix_build(&file, &["a"], &[]).remove(0);
    wait_until("the path queued", Duration::from_secs(30), || {
        queued_paths(&env.state()).contains(&a)
    });

    // Deleted before its upload. Until the drainer has seen the entry once it may put the
    // root back, so take the root away until the deletion goes through.
    let root = env.path().join("gcroots").join(a.base());
    wait_until("the path deleted", Duration::from_secs(30), || {
        let _ = fs::remove_file(&root);
        nix("nix-store")
            .args(["--delete", &a.to_absolute()])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    wait_until("the entry given up", Duration::from_secs(60), || {
        !queued_paths(&env.state()).contains(&a)
    });

    // Built again: the same path, registered anew (registration times are in seconds).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(nix_build(&file, &["a"], &[]).remove(0), a);
    nginx.resume();
    let cache = nginx.cache();
    wait_until(
        "the rebuilt path in the cache",
        Duration::from_secs(60),
        || cache.has(&a),
    );
    let (status, log) = watcher.terminate();
    assert_clean_stop(&status, &log);
    cache.assert_complete();
    assert_substitutes(&env, &nginx.url(), &public, &[a]);
}

#[test]
fn watch_exec_passes_signals_to_the_command_and_reports_unrunnable_ones() {
    let env = Env::new();
    let dir = env.path().join("cache");
    let url = file_url(&dir);

    // CI cancelling the job signals narpost; the command decides how to stop, and its code
    // is the one returned. The command ends by itself after 20 s, so a narpost that does not
    // pass the signal on cannot leave it behind for long.
    let log = env.path().join("signal.log");
    let mut child = env
        .narpost()
        .args(["watch-exec", "--drain-timeout", "1", "--to", &url, "--"])
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
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut ready)
        .expect("read the command's output");
    assert_eq!(ready.trim(), "ready");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("signal");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for watch-exec") {
            break status;
        }
        assert!(Instant::now() < deadline, "watch-exec did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(42), "{status}:\n{text}");

    // A command that cannot be run gets the shell's code for it.
    let out = env
        .narpost()
        .args([
            "watch-exec",
            "--to",
            &url,
            "--",
            "/nonexistent/narpost-test-command",
        ])
        .output()
        .expect("run narpost watch-exec");
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    CacheDir::new(&dir).assert_complete();
}
