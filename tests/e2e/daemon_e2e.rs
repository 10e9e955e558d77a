//! The post-build hook inside a real Nix and `narpost daemon` draining its queue into a real
//! nginx, end to end: what Nix builds gets queued, survives the cache being down, the daemon
//! being killed at any moment and stopped mid-upload, and ends up in a cache that a fresh
//! Nix store substitutes from with signatures required.
//!
//! Every test proves the cache with the completeness checker ([`CacheDir::assert_complete`]):
//! no narinfo without its NAR, none whose references are missing.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use narpost::format::store_path::StorePath;

// ---------------------------------------------------------------------------------------
// The hook inside Nix

/// One run of the post-build hook, as the shim in front of `hook/narpost-hook` saw it.
#[derive(Debug)]
struct HookCall {
    code: i32,
    out_paths: String,
    drv_path: String,
    stderr: String,
}

/// Nix configured with `post-build-hook` pointing at a shim in the scratch directory. The
/// shim runs the shipped wrapper `hook/narpost-hook` (settings through its variables and a
/// config file, as under nix-daemon), records what Nix passed and what the hook said, and
/// returns the wrapper's exit code, so a failing hook would fail the build.
struct HookedNix {
    shim: PathBuf,
    calls: PathBuf,
}

impl HookedNix {
    fn install(env: &Env, gcroots: &Path) -> HookedNix {
        let config = env.path().join("narpost.toml");
        fs::write(
            &config,
            format!("gc-roots-dir = \"{}\"\n", gcroots.display()),
        )
        .expect("write narpost.toml");
        let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("hook/narpost-hook");
        let calls = env.path().join("hook-calls");
        let shim = env.path().join("post-build-hook");
        fs::write(
            &shim,
            format!(
                r#"#!/bin/sh
export NARPOST_BIN='{bin}' NARPOST_STATE_DIR='{state}' NARPOST_CONFIG='{config}'
err=$(mktemp)
'{wrapper}' 2>"$err"
code=$?
printf '%s\t%s\t%s\t%s\n' "$code" "$OUT_PATHS" "$DRV_PATH" "$(tr '\n' '|' <"$err")" >>'{calls}'
cat "$err" >&2
rm -f "$err"
exit $code
"#,
                bin = narpost_bin().display(),
                state = env.state().display(),
                config = config.display(),
                wrapper = wrapper.display(),
                calls = calls.display(),
            ),
        )
        .expect("write the hook shim");
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).expect("chmod the shim");
        HookedNix { shim, calls }
    }

    /// `nix-build` with the hook; panics if the build fails.
    fn build(&self, file: &Path, attrs: &[&str]) -> Vec<StorePath> {
        let mut cmd = nix("nix-build");
        cmd.env(
            "NIX_CONFIG",
            format!("{NIX_CONFIG}post-build-hook = {}\n", self.shim.display()),
        );
        clean_narpost_env(&mut cmd);
        cmd.arg(file).arg("--no-out-link");
        for attr in attrs {
            cmd.args(["-A", attr]);
        }
        parse_paths(&stdout(&run(&mut cmd)))
    }

    fn calls(&self) -> Vec<HookCall> {
        let text = fs::read_to_string(&self.calls).unwrap_or_default();
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.splitn(4, '\t').collect();
                assert_eq!(f.len(), 4, "hook call record: {line:?}");
                HookCall {
                    code: f[0].parse().expect("exit code"),
                    out_paths: f[1].to_owned(),
                    drv_path: f[2].to_owned(),
                    stderr: f[3].to_owned(),
                }
            })
            .collect()
    }

    /// Asserts every hook run so far exited 0 and said nothing, and got what this Nix passes:
    /// Nix 2.8 an empty OUT_PATHS (so the outputs came from the `.drv`), later Nix every
    /// output of the `.drv` built. Returns the number of runs.
    fn assert_all_quiet(&self) -> usize {
        let calls = self.calls();
        for c in &calls {
            assert_eq!(c.code, 0, "{c:?}");
            assert_eq!(c.stderr, "", "{c:?}");
            assert!(c.drv_path.ends_with(".drv"), "{c:?}");
            if nix_fills_out_paths() {
                let passed: BTreeSet<StorePath> = parse_paths(&c.out_paths.replace(' ', "\n"))
                    .into_iter()
                    .collect();
                let outputs = run(nix("nix-store").args(["-q", "--outputs", &c.drv_path]));
                let want: BTreeSet<StorePath> =
                    parse_paths(&stdout(&outputs)).into_iter().collect();
                assert_eq!(
                    passed, want,
                    "OUT_PATHS is every output of the build: {c:?}"
                );
            } else {
                assert_eq!(c.out_paths, "", "Nix 2.8 leaves OUT_PATHS empty: {c:?}");
            }
        }
        calls.len()
    }
}

// ---------------------------------------------------------------------------------------
// The daemon

fn assert_in_cache(cache: &CacheDir, paths: &BTreeSet<StorePath>, daemon_log: &str) {
    let missing: Vec<_> = paths.iter().filter(|p| !cache.has(p)).collect();
    assert!(
        missing.is_empty(),
        "not in the cache: {missing:?}\ndaemon log:\n{daemon_log}"
    );
}

// ---------------------------------------------------------------------------------------
// A slow link to nginx

/// A TCP proxy in front of nginx that forwards what clients send at `rate` bytes per
/// second (answers come back at full speed), so that uploads take long enough to be
/// interrupted. `sent` counts the bytes forwarded upstream.
struct Throttle {
    port: u16,
    rate: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl Throttle {
    fn start(upstream: u16, rate: u64) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the throttle");
        let port = listener.local_addr().expect("throttle address").port();
        let rate = Arc::new(AtomicU64::new(rate));
        let sent = Arc::new(AtomicU64::new(0));
        let (r, s) = (rate.clone(), sent.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (r, s) = (r.clone(), s.clone());
                std::thread::spawn(move || relay(client, upstream, &r, &s));
            }
        });
        Throttle { port, rate, sent }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn relay(client: TcpStream, upstream: u16, rate: &AtomicU64, sent: &AtomicU64) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut server_r, mut client_w) = (server, client);
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_r, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match client_r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if server_w.write_all(&buf[..n]).is_err() {
            break;
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
        let per_sec = rate.load(Ordering::Relaxed).max(1);
        std::thread::sleep(Duration::from_secs_f64(n as f64 / per_sec as f64));
    }
    // A client that died mid-request leaves nginx a short body, which it discards.
    let _ = server_w.shutdown(Shutdown::Both);
    let _ = back.join();
}

/// Fresh randomness for kill timings.
fn random_u64() -> u64 {
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

// ---------------------------------------------------------------------------------------
// Tests

/// A fan-out: one base, eight leaves on it, a two-output derivation, and a top that refers
/// to all of them. Returns the expression.
fn fan_out_expr() -> String {
    let mut expr = nix_prelude(&nonce());
    expr.push_str(
        r#"rec {
  base = mk "narpost-fan-base" "mkdir $out; echo base > $out/file";
"#,
    );
    for i in 0..8 {
        expr.push_str(&format!(
            "  leaf{i} = mk \"narpost-fan-leaf{i}\" \"mkdir $out; echo ${{base}} {i} > $out/file\";\n"
        ));
    }
    expr.push_str(
        r#"  multi = builtins.derivation {
    inherit nonce; name = "narpost-fan-multi"; system = builtins.currentSystem;
    builder = "/bin/sh"; PATH = "/bin:/usr/bin"; outputs = [ "out" "dev" ];
    args = [ "-c" "echo ${base} > $out; mkdir $dev; echo dev > $dev/h" ];
  };
  top = mk "narpost-fan-top" "echo ${leaf0} ${leaf1} ${leaf2} ${leaf3} ${leaf4} ${leaf5} ${leaf6} ${leaf7} ${multi.dev} > $out";
}
"#,
    );
    expr
}

#[test]
fn nix_builds_are_queued_by_the_hook_and_the_daemon_pushes_them() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("daemon-e2e-1");
    let gcroots = env.path().join("gcroots");
    let hooked = HookedNix::install(&env, &gcroots);

    let file = env.write_nix("fan.nix", &fan_out_expr());
    let outs = hooked.build(&file, &["top", "multi.out"]);
    assert_eq!(outs.len(), 2, "{outs:?}");
    let built = nix_closure(&outs);
    assert_eq!(built.len(), 12, "eleven builds, twelve outputs: {built:?}");

    // Eleven builds ran the hook and each queued exactly its own outputs (read from its .drv
    // under Nix 2.8, which passes an empty OUT_PATHS): one entry per build, no path twice.
    assert_eq!(hooked.assert_all_quiet(), 11);
    let entries = queued(&env.state());
    assert_eq!(entries.len(), 11, "{entries:?}");
    let all: Vec<StorePath> = entries.iter().flat_map(|e| e.paths.clone()).collect();
    assert_eq!(all.len(), 12, "{entries:?}");
    assert_eq!(all.iter().cloned().collect::<BTreeSet<_>>(), built);
    let multi = entries
        .iter()
        .find(|e| e.paths.len() == 2)
        .expect("the two-output build is one entry");
    assert!(
        multi
            .drv
            .as_deref()
            .is_some_and(|d| d.ends_with("-narpost-fan-multi.drv")),
        "{multi:?}"
    );
    assert_eq!(rooted(&gcroots), built, "every queued path has a GC root");

    // `base` is in the cache already: the daemon must skip it, not upload it again.
    let base = built
        .iter()
        .find(|p| p.to_absolute().ends_with("-narpost-fan-base"))
        .expect("base")
        .clone();
    run(env
        .narpost()
        .args(["push", "--to", &nginx.url(), "--key"])
        .arg(&key)
        .arg(base.to_absolute()));

    let mut daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_drained(&env, &daemon, Duration::from_secs(60));
    let cache = nginx.cache();
    assert_in_cache(&cache, &built, &daemon.log());

    // A build right after a pass reaches the cache at once: the daemon watches the queue
    // directory rather than waiting for its next periodic scan, five seconds away.
    let one = env.write_nix(
        "one.nix",
        &format!(
            "{}mk \"narpost-prompt\" \"echo prompt > $out\"",
            nix_prelude(&nonce())
        ),
    );
    let queued_at = Instant::now();
    let late = hooked.build(&one, &[]);
    wait_for(
        &daemon,
        "the late build in the cache",
        Duration::from_secs(30),
        || cache.has(&late[0]),
    );
    let latency = queued_at.elapsed();
    eprintln!("queue-to-cache latency of an idle daemon: {latency:?}");
    assert!(
        latency < Duration::from_millis(2500),
        "{latency:?}: picked up by polling, not by watching the queue"
    );
    let mut built = built;
    built.insert(late[0].clone());
    wait_drained(&env, &daemon, Duration::from_secs(10));

    cache.assert_complete();
    assert!(upload_order_problems(&nginx.puts(), &cache).is_empty());
    // Thirteen narinfos, each PUT exactly once (base by `push`, the rest by the daemon).
    let narinfo_puts: Vec<String> = nginx
        .puts()
        .into_iter()
        .filter(|u| u.ends_with(".narinfo"))
        .collect();
    assert_eq!(
        narinfo_puts.len(),
        13,
        "each narinfo uploaded once: {narinfo_puts:?}"
    );
    assert_substitutes(&env, &nginx.url(), &public, &outs);
    wait_unrooted(&gcroots);

    let status = status_json(&env);
    assert_eq!(status["daemon_running"], true, "{status}");
    assert_eq!(status["queue_depth"], 0, "{status}");
    assert_eq!(status["pushed_since_start"], 12, "{status}");
    assert_eq!(status["cache"], nginx.url(), "{status}");
    assert_eq!(status["public_key"], public.as_str(), "{status}");
    assert_eq!(status["failed"], serde_json::json!([]), "{status}");

    let took = daemon.stop(Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(5),
        "idle daemon stopped in {took:?}"
    );
    let log = daemon.log();
    assert!(log.contains("pushed 12 paths"), "{log}");
    assert!(log.contains("0 entries left queued"), "{log}");
    cache.assert_complete();
}

/// The fastest set-up, which `hook/nix.conf.example` shows first: `post-build-hook` names the
/// small binary itself, no wrapper, settings from the environment Nix runs in.
#[test]
fn nix_runs_the_small_hook_binary_directly_and_the_daemon_pushes_what_it_queued() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("daemon-small-hook-1");
    let gcroots = env.path().join("gcroots");

    let file = env.write_nix("fan.nix", &fan_out_expr());
    let mut cmd = nix("nix-build");
    clean_narpost_env(&mut cmd);
    cmd.env(
        "NIX_CONFIG",
        format!(
            "{NIX_CONFIG}post-build-hook = {}\n",
            env!("CARGO_BIN_EXE_narpost-hook")
        ),
    )
    .env("NARPOST_STATE_DIR", env.state())
    .env("NARPOST_GC_ROOTS_DIR", &gcroots)
    .arg(&file)
    .args(["--no-out-link", "-A", "top", "-A", "multi.out"]);
    let out = run(&mut cmd);
    assert!(
        !stderr(&out).contains("narpost hook:"),
        "the hook complained: {}",
        stderr(&out)
    );
    let outs = parse_paths(&stdout(&out));
    let built = nix_closure(&outs);
    assert_eq!(built.len(), 12, "{built:?}");
    let entries = queued(&env.state());
    assert_eq!(entries.len(), 11, "one entry per build: {entries:?}");
    let all: Vec<StorePath> = entries.iter().flat_map(|e| e.paths.clone()).collect();
    assert_eq!(all.len(), 12, "{entries:?}");
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), built);
    assert_eq!(rooted(&gcroots), built);

    let daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_drained(&env, &daemon, Duration::from_secs(60));
    let cache = nginx.cache();
    assert_in_cache(&cache, &built, &daemon.log());
    cache.assert_complete();
    assert_substitutes(&env, &nginx.url(), &public, &outs);
    wait_unrooted(&gcroots);
}

#[test]
fn cache_down_builds_succeed_and_the_daemon_drains_when_it_is_back() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("daemon-down-1");
    let gcroots = env.path().join("gcroots");
    let hooked = HookedNix::install(&env, &gcroots);
    let mut expr = nix_prelude(&nonce());
    expr.push_str("{\n");
    for i in 0..50 {
        expr.push_str(&format!(
            "  d{i} = mk \"narpost-down-{i}\" \"mkdir $out; echo {i} > $out/n\";\n"
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix("down.nix", &expr);

    nginx.stop();
    let mut daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    let ticks_before = daemon.cpu_ticks(&env);
    let outage = Instant::now();
    // Fifty builds in five nix-build runs, every one succeeding while the cache is down.
    let mut built = BTreeSet::new();
    for batch in 0..5 {
        let attrs: Vec<String> = (batch * 10..batch * 10 + 10)
            .map(|i| format!("d{i}"))
            .collect();
        let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
        built.extend(hooked.build(&file, &attrs));
    }
    assert_eq!(built.len(), 50);
    assert_eq!(
        hooked.assert_all_quiet(),
        50,
        "every hook exited 0, silently"
    );
    assert_eq!(queued_paths(&env.state()), built, "nothing lost");
    assert_eq!(depth(&env.state()), 50);

    // Let the daemon find the cache down and retry a few times.
    wait_for(
        &daemon,
        "the daemon to notice the outage",
        Duration::from_secs(20),
        || status_json(&env)["cache_down_since"].is_u64(),
    );
    std::thread::sleep(Duration::from_secs(4));
    let status = status_json(&env);
    assert_eq!(status["daemon_running"], true, "{status}");
    assert_eq!(status["queue_depth"], 50, "{status}");
    let oldest = status["oldest_entry_age_secs"].as_u64().expect("an age");
    assert!(
        oldest >= 4 && oldest <= outage.elapsed().as_secs() + 1,
        "oldest entry {oldest}s old after an outage of {:?}: {status}",
        outage.elapsed()
    );
    let last_error = status["last_error"].as_str().expect("a last error");
    assert!(
        last_error.contains(&nginx.port.to_string()) || last_error.contains("onnect"),
        "{status}"
    );
    assert!(status["last_error_at"].is_u64(), "{status}");
    assert_eq!(status["pushed_since_start"], 0, "{status}");
    let text = status_text(&env);
    assert!(text.contains("50 entries"), "{text}");
    assert!(text.contains("last error:"), "{text}");
    assert!(text.contains("cache down:"), "{text}");

    // No hot loop, no log flood: one line for the outage, little CPU.
    let ticks = daemon.cpu_ticks(&env) - ticks_before;
    let log = daemon.log();
    assert_eq!(
        log.matches("fail: ").count(),
        1,
        "one line when the cache goes down:\n{log}"
    );
    assert!(log.lines().count() <= 3, "the log is flooded:\n{log}");
    assert!(
        ticks < 200,
        "the daemon used {ticks} ticks of CPU during an outage of {:?}",
        outage.elapsed()
    );

    nginx.resume();
    let resumed = Instant::now();
    let same_pid = daemon.pid();
    wait_drained(&env, &daemon, Duration::from_secs(90));
    eprintln!(
        "outage of {:?}: drained {:?} after the cache came back; daemon log:\n{}",
        resumed - outage,
        resumed.elapsed(),
        daemon.log()
    );
    assert_eq!(daemon.pid(), same_pid);
    assert!(
        daemon.child.try_wait().expect("poll").is_none(),
        "still running"
    );
    let cache = nginx.cache();
    assert_in_cache(&cache, &built, &daemon.log());
    cache.assert_complete();
    let log = daemon.log();
    assert_eq!(
        log.matches("work again").count(),
        1,
        "one line when it is back:\n{log}"
    );
    let built: Vec<StorePath> = built.into_iter().collect();
    assert_substitutes(&env, &nginx.url(), &public, &built);
    wait_unrooted(&gcroots);
    let status = status_json(&env);
    assert_eq!(status["queue_depth"], 0, "{status}");
    assert_eq!(status["pushed_since_start"], 50, "{status}");
    assert_eq!(
        status["cache_down_since"],
        serde_json::Value::Null,
        "{status}"
    );
    daemon.stop(Duration::from_secs(10));
}

/// How many times the crash test kills the daemon; `NARPOST_SOAK_KILLS` raises it for a
/// soak run (see README).
fn kills() -> usize {
    std::env::var("NARPOST_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[test]
fn killing_the_daemon_at_random_moments_loses_nothing_and_never_breaks_the_cache() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    // Uploads crawl through a slow link, so kills land before, during and after them.
    let rate = 2 << 20;
    let slow = Throttle::start(nginx.port, rate);
    let (key, public) = env.keygen("daemon-crash-1");
    let gcroots = env.path().join("gcroots");
    let hooked = HookedNix::install(&env, &gcroots);
    // Eight blobs of random bytes (zstd cannot shrink them) and a top that refers to all of
    // them, so a narinfo published too early would be caught. The largest takes longer to
    // upload than the longest wait before a kill, so every kill lands mid-drain, while the
    // smaller ones finish at varying moments in between.
    let sizes_kib = [256, 512, 1024, 1536, 2048, 3072, 4096, 6144];
    let longest_wait = Duration::from_millis(2500);
    assert!(Duration::from_secs_f64(6144.0 * 1024.0 / rate as f64) > longest_wait);
    let mut expr = nix_prelude(&nonce());
    expr.push_str("rec {\n");
    for (i, kib) in sizes_kib.iter().enumerate() {
        expr.push_str(&format!(
            "  blob{i} = mk \"narpost-crash-blob{i}\" \"head -c {kib}K /dev/urandom > $out\";\n"
        ));
    }
    expr.push_str(
        "  top = mk \"narpost-crash-top\" \"echo ${blob0} ${blob1} ${blob2} ${blob3} ${blob4} ${blob5} ${blob6} ${blob7} > $out\";\n}\n",
    );
    let file = env.write_nix("crash.nix", &expr);
    let top = hooked.build(&file, &["top"]);
    let queued_before = queued_paths(&env.state());
    assert_eq!(queued_before, nix_closure(&top));
    assert_eq!(queued_before.len(), 9);

    let cache = nginx.cache();
    let mut logs = String::new();
    let kills = kills();
    let mut in_cache_at_kill = Vec::new();
    for round in 0..kills {
        let mut daemon = Daemon::start(&env, &slow.url(), &key, 30);
        let delay =
            Duration::from_millis(50 + random_u64() % (longest_wait.as_millis() as u64 - 50));
        std::thread::sleep(delay);
        daemon.kill9();
        logs.push_str(&format!("--- round {round}, killed after {delay:?}\n"));
        logs.push_str(&daemon.log());
        // At every instant the cache is consistent and the queue intact.
        let problems = cache.problems();
        assert!(
            problems.is_empty(),
            "after kill {round}: {problems:?}\nlogs:\n{logs}"
        );
        let left = queued_paths(&env.state());
        let pushed: BTreeSet<StorePath> = queued_before
            .iter()
            .filter(|p| cache.has(p))
            .cloned()
            .collect();
        assert!(
            queued_before
                .iter()
                .all(|p| left.contains(p) || pushed.contains(p)),
            "after kill {round}, a path is neither queued nor in the cache\nlogs:\n{logs}"
        );
        assert!(
            queued_before
                .iter()
                .all(|p| !left.contains(p) || rooted(&gcroots).contains(p)),
            "after kill {round}, a queued path lost its GC root"
        );
        assert!(
            pushed.len() < queued_before.len(),
            "kill {round} landed after the drain"
        );
        in_cache_at_kill.push(pushed.len());
    }
    eprintln!("paths in the cache after each kill: {in_cache_at_kill:?}");
    assert!(
        in_cache_at_kill.iter().any(|&n| n > 0),
        "no kill landed after some paths were pushed: {in_cache_at_kill:?}"
    );

    slow.rate.store(64 << 20, Ordering::Relaxed);
    let mut daemon = Daemon::start(&env, &slow.url(), &key, 30);
    wait_drained(&env, &daemon, Duration::from_secs(60));
    assert_in_cache(&cache, &queued_before, &daemon.log());
    cache.assert_complete();
    let status = status_json(&env);
    assert_eq!(status["queue_depth"], 0, "{status}");
    assert_eq!(status["failed"], serde_json::json!([]), "{status}");
    assert_eq!(status["corrupt"], serde_json::json!([]), "{status}");
    assert!(status_text(&env).contains("queue:        empty"));
    wait_unrooted(&gcroots);
    daemon.stop(Duration::from_secs(10));
    // Nothing that a killed daemon was writing stays behind to fill the disk.
    let leftovers: Vec<_> = ["drain-spool", "spool", "tmp"]
        .iter()
        .flat_map(|d| fs::read_dir(env.state().join(d)).into_iter().flatten())
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert_substitutes(&env, &nginx.url(), &public, &top);
    assert!(slow.sent.load(Ordering::Relaxed) > 0);
}

#[test]
fn sigterm_mid_upload_exits_within_the_drain_timeout_and_keeps_the_path_queued() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    // 8 MiB at 512 KiB/s: a sixteen-second upload.
    let slow = Throttle::start(nginx.port, 512 << 10);
    let (key, public) = env.keygen("daemon-term-1");
    let hooked = HookedNix::install(&env, &env.path().join("gcroots"));
    let file = env.write_nix(
        "big.nix",
        &format!(
            "{}mk \"narpost-term-big\" \"head -c 8M /dev/urandom > $out\"",
            nix_prelude(&nonce())
        ),
    );
    let big = hooked.build(&file, &[]);
    assert_eq!(queued_paths(&env.state()), big.iter().cloned().collect());
    let cache = nginx.cache();

    // The default priority, idle.
    let mut daemon = Daemon::start_with(&env, &slow.url(), &key, 2, |c| {
        c.env_remove("NARPOST_PRIORITY");
    });
    wait_for(
        &daemon,
        "the upload to be under way",
        Duration::from_secs(20),
        || slow.sent.load(Ordering::Relaxed) > 1 << 20,
    );
    // Uploading at idle priority; on SIGTERM the upload under way goes on at the priority
    // the daemon was started with, so a busy machine cannot hold it past the deadline.
    let me = Sched::of(std::process::id());
    let drainer = drainer_pid(&env.state()).expect("the drainer's pid");
    Sched::of(drainer).assert_idle("the daemon uploading");
    let start = Instant::now();
    daemon.signal(rustix::process::Signal::TERM);
    wait_until(
        "the drainer back at normal priority",
        Duration::from_millis(1500),
        || {
            let now = Sched::of(drainer);
            (now.nice, now.autogroup_nice(), &now.io) == (me.nice, 0, &me.io)
        },
    );
    let status = daemon.wait(Duration::from_secs(10));
    let took = start.elapsed();
    let log = daemon.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        took < Duration::from_millis(4000),
        "SIGTERM with a drain timeout of 2 s took {took:?}:\n{log}"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "{took:?}: did not wait for the upload"
    );
    eprintln!("daemon stopped by SIGTERM mid-upload in {took:?}:\n{log}");
    assert!(log.contains("pushed 0 paths"), "{log}");
    assert!(log.contains("1 entry left queued"), "{log}");
    assert!(
        log.contains(&format!("still queued: {}", big[0])),
        "names what remains:\n{log}"
    );
    assert!(!cache.has(&big[0]));
    cache.assert_complete();
    assert_eq!(queued_paths(&env.state()), big.iter().cloned().collect());

    // A second signal ends a long drain at once; still nothing is lost.
    let sent = slow.sent.load(Ordering::Relaxed);
    let mut daemon = Daemon::start(&env, &slow.url(), &key, 60);
    wait_for(
        &daemon,
        "the upload to be under way",
        Duration::from_secs(20),
        || slow.sent.load(Ordering::Relaxed) > sent + (1 << 20),
    );
    let start = Instant::now();
    daemon.signal(rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(rustix::process::Signal::INT);
    daemon.wait(Duration::from_secs(5));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(!cache.has(&big[0]));
    cache.assert_complete();
    assert_eq!(queued_paths(&env.state()), big.iter().cloned().collect());

    // After a restart on a fast link, the interrupted path is pushed.
    slow.rate.store(256 << 20, Ordering::Relaxed);
    let mut daemon = Daemon::start(&env, &slow.url(), &key, 2);
    wait_drained(&env, &daemon, Duration::from_secs(60));
    assert!(cache.has(&big[0]));
    cache.assert_complete();
    daemon.stop(Duration::from_secs(10));
    assert!(daemon.log().contains("pushed 1 path,"), "{}", daemon.log());
    assert_substitutes(&env, &nginx.url(), &public, &big);
}

#[test]
fn bad_input_gives_one_line_and_exit_0_and_valid_entries_are_pushed() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, _) = env.keygen("daemon-bad-1");
    let gcroots = env.path().join("gcroots");
    let state = env.state();
    let p = simple_paths(&env, &["p1", "p2", "p3", "p4", "p5", "broken"]);
    let abs: Vec<String> = p.iter().map(StorePath::to_absolute).collect();
    let out = |i: usize| [("OUT_PATHS", abs[i].as_str()), ("DRV_PATH", "")];

    // Malformed OUT_PATHS entries: one line each, the valid path is queued.
    let bad_digest = "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x";
    let mixed = format!("relative/x /nix/store/short {} {bad_digest}", abs[0]);
    assert_lines(
        hook(&state, &gcroots, &[("OUT_PATHS", &mixed)]),
        &["relative/x", "/nix/store/short", bad_digest],
    );
    assert_eq!(queued_paths(&state), BTreeSet::from([p[0].clone()]));

    // A DRV_PATH that does not exist, or is not a derivation, with an empty OUT_PATHS.
    let gone = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-gone.drv";
    assert_lines(
        hook(&state, &gcroots, &[("OUT_PATHS", ""), ("DRV_PATH", gone)]),
        &[gone],
    );
    let not_drv = format!("{}/file", abs[1]);
    assert_lines(
        hook(
            &state,
            &gcroots,
            &[("OUT_PATHS", ""), ("DRV_PATH", &not_drv)],
        ),
        &[&not_drv],
    );
    assert_lines(hook(&state, &gcroots, &[]), &["DRV_PATH"]);
    assert_eq!(depth(&state), 1);

    // A broken config file: said in one line, and the path is queued and rooted anyway.
    let bad_config = env.path().join("broken.toml");
    fs::write(&bad_config, "cache = [\n").expect("write a broken config");
    let cfg = bad_config.display().to_string();
    assert_lines(
        hook(
            &state,
            &gcroots,
            &[("NARPOST_CONFIG", &cfg), out(1)[0], out(1)[1]],
        ),
        &[&cfg],
    );
    assert!(rooted(&gcroots).contains(&p[1]));

    // Garbage and a torn entry in the queue directory: the hook does not care.
    let queue_dir = state.join("queue");
    assert_lines(hook(&state, &gcroots, &out(4)), &[]);
    let torn = queued(&state)
        .into_iter()
        .find(|e| e.paths == [p[4].clone()])
        .expect("p5's entry")
        .id;
    let torn_file = queue_dir.join(torn.as_str());
    let len = fs::metadata(&torn_file).expect("entry").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&torn_file)
        .and_then(|f| f.set_len(len / 2))
        .expect("tear the entry");
    fs::write(queue_dir.join("junk"), "not an entry").expect("write junk");
    assert_lines(hook(&state, &gcroots, &out(2)), &[]);

    // An unwritable state directory: one line naming the problem and the path.
    {
        let _ro = Mount::read_only(&state);
        assert_lines(hook(&state, &gcroots, &out(3)), &["Read-only file system"]);
    }

    // A store path that no longer matches its NarHash fails for good, with its reason.
    assert_lines(hook(&state, &gcroots, &out(5)), &[]);
    // Same size as "broken\n": the contents differ, the recorded NarSize still fits.
    corrupt_store_file(&Path::new(&abs[5]).join("file"), b"BROKEN\n");

    let before = status_json(&env);
    assert_eq!(before["daemon_running"], false, "{before}");

    let mut daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_drained(&env, &daemon, Duration::from_secs(60));
    let cache = nginx.cache();
    // p4 was never queued (read-only state) and p5's entry was torn: both come back from
    // their GC roots.
    let good: BTreeSet<StorePath> = p[..5].iter().cloned().collect();
    assert_in_cache(&cache, &good, &daemon.log());
    assert!(!cache.has(&p[5]));
    cache.assert_complete();
    wait_unrooted(&gcroots);

    let log = daemon.log();
    assert!(log.contains(&torn_file.display().to_string()), "{log}");
    assert!(log.contains("junk"), "{log}");
    let status = status_json(&env);
    assert_eq!(status["queue_depth"], 0, "{status}");
    assert_eq!(status["daemon_running"], true, "{status}");
    let failed = status["failed"].as_array().expect("failed entries");
    assert_eq!(failed.len(), 1, "{status}");
    assert_eq!(failed[0]["paths"], serde_json::json!([abs[5]]), "{status}");
    let reason = failed[0]["reason"].as_str().expect("a reason");
    assert!(reason.contains("NarHash"), "{status}");
    let corrupt = status["corrupt"].as_array().expect("corrupt files");
    assert_eq!(corrupt.len(), 2, "{status}");
    let reasons: Vec<&str> = corrupt
        .iter()
        .map(|c| c["reason"].as_str().expect("a reason"))
        .collect();
    assert!(reasons.iter().any(|r| r.contains("truncated")), "{status}");
    assert!(reasons.iter().any(|r| r.contains("name")), "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("NarHash")),
        "{status}"
    );
    let text = status_text(&env);
    assert!(text.contains("failed:       1"), "{text}");
    assert!(text.contains(&abs[5]), "{text}");
    assert!(text.contains("corrupt:      2"), "{text}");
    daemon.stop(Duration::from_secs(10));
}

#[test]
fn a_full_state_disk_loses_no_build_and_the_daemon_recovers() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("daemon-full-1");
    let gcroots = env.path().join("gcroots");
    let state = env.state();
    let p = simple_paths(&env, &["early", "late"]);
    let abs: Vec<String> = p.iter().map(StorePath::to_absolute).collect();
    let _disk = Mount::tmpfs(&state, "1m");

    assert_lines(hook(&state, &gcroots, &[("OUT_PATHS", &abs[0])]), &[]);
    // The daemon runs when the disk fills up, as it would on a real machine; the cache is
    // not there yet, so the entry waits.
    let mut nginx = nginx;
    nginx.stop();
    let mut daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_for(
        &daemon,
        "the daemon to find the cache down",
        Duration::from_secs(30),
        || status_json(&env)["cache_down_since"].is_u64(),
    );
    let mut filler = fs::File::create(state.join("filler")).expect("create the filler");
    let full = loop {
        if let Err(e) = filler.write_all(&[0u8; 64 << 10]) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(28), "ENOSPC expected: {full}");
    drop(filler);
    assert_lines(
        hook(&state, &gcroots, &[("OUT_PATHS", &abs[1])]),
        &["No space left on device"],
    );
    assert_eq!(queued_paths(&state), BTreeSet::from([p[0].clone()]));
    assert!(
        fs::read_dir(state.join("tmp"))
            .expect("tmp")
            .next()
            .is_none(),
        "a failed enqueue leaves no temp file"
    );

    // The daemon cannot spool on a full disk: the entry stays queued (not failed), and the
    // reason is in the status.
    nginx.resume();
    wait_for(
        &daemon,
        "the daemon to report the full disk",
        Duration::from_secs(30),
        || {
            status_json(&env)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left"))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let status = status_json(&env);
    assert_eq!(
        status["failed"],
        serde_json::json!([]),
        "{status}\n{}",
        daemon.log()
    );
    assert_eq!(status["queue_depth"], 1, "{status}");
    assert!(!nginx.cache().has(&p[0]));
    nginx.cache().assert_complete();

    // Room again: the queued path is pushed without a restart; after one, the path whose
    // entry could not be written is found by its GC root and pushed too.
    fs::remove_file(state.join("filler")).expect("free the disk");
    wait_drained(&env, &daemon, Duration::from_secs(90));
    assert!(nginx.cache().has(&p[0]), "{}", daemon.log());
    daemon.stop(Duration::from_secs(10));
    let mut daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_for(
        &daemon,
        "the orphaned path in the cache",
        Duration::from_secs(30),
        || nginx.cache().has(&p[1]),
    );
    wait_drained(&env, &daemon, Duration::from_secs(30));
    nginx.cache().assert_complete();
    wait_unrooted(&gcroots);
    daemon.stop(Duration::from_secs(10));
    assert_substitutes(&env, &nginx.url(), &public, &p);
}

/// Removes a GC roots directory under Nix's gcroots even when an assertion fails.
struct RootsDirGuard(PathBuf);

impl Drop for RootsDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether the garbage collector would delete `path` now. `--print-dead` only lists; a full
/// `nix-store --gc` would also delete what other tests built and have not rooted.
fn dead(path: &StorePath) -> bool {
    let out = run(nix("nix-store").args(["--gc", "--print-dead"]));
    stdout(&out).lines().any(|l| l == path.to_absolute())
}

/// `nix-store --delete PATH`: honours GC roots like a collection does, for this path alone.
fn delete(path: &StorePath) -> Output {
    nix("nix-store")
        .args(["--delete", &path.to_absolute()])
        .output()
        .expect("run nix-store --delete")
}

/// When the queue empties while the cache is down (here: its only path was deleted from the
/// store, so the entry failed), the daemon asks the cache itself, and `status` stops saying
/// "down" once it is back, without waiting for a new entry.
#[test]
fn status_sees_the_cache_come_back_while_the_queue_is_empty() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    nginx.stop();
    let (key, _) = env.keygen("daemon-empty-1");
    let gcroots = env.path().join("gcroots");
    let path = simple_paths(&env, &["emptydown"]).remove(0);
    narpost::queue::Queue::open(&env.state())
        .expect("open the queue")
        .enqueue(std::slice::from_ref(&path), None)
        .expect("enqueue");

    let daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_for(
        &daemon,
        "the daemon to find the cache down",
        Duration::from_secs(30),
        || status_json(&env)["cache_down_since"].is_u64(),
    );
    // The daemon rooted the queued path; take the root away and delete the path.
    wait_for(&daemon, "the path's root", Duration::from_secs(10), || {
        rooted(&gcroots).contains(&path)
    });
    fs::remove_file(gcroots.join(path.base())).expect("remove the root");
    let out = delete(&path);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        &daemon,
        "the entry to fail as no longer valid",
        Duration::from_secs(60),
        || {
            status_json(&env)["failed"]
                .as_array()
                .is_some_and(|f| f.len() == 1)
        },
    );
    assert_eq!(status_json(&env)["queue_depth"], 0);
    assert!(status_json(&env)["cache_down_since"].is_u64());

    nginx.resume();
    wait_for(
        &daemon,
        "status to see the cache back",
        Duration::from_secs(90),
        || status_json(&env)["cache_down_since"].is_null(),
    );
    assert!(
        daemon.log().contains("work again"),
        "one line says so:\n{}",
        daemon.log()
    );
}

#[test]
fn queued_paths_survive_garbage_collection_until_they_are_uploaded() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    nginx.stop();
    let (key, public) = env.keygen("daemon-gc-1");
    let gcroots = PathBuf::from(format!("/nix/var/nix/gcroots/narpost-test-{}", nonce()));
    let _guard = RootsDirGuard(gcroots.clone());
    let hooked = HookedNix::install(&env, &gcroots);
    let file = env.write_nix(
        "gc.nix",
        &format!(
            r#"{}rec {{
  dep = mk "narpost-gc-dep" "mkdir $out; echo dep > $out/file";
  app = mk "narpost-gc-app" "mkdir $out; echo ${{dep}} > $out/uses";
}}"#,
            nix_prelude(&nonce())
        ),
    );
    let app = hooked.build(&file, &["app"]).remove(0);
    let paths = nix_closure(std::slice::from_ref(&app));
    assert_eq!(paths.len(), 2);
    assert_eq!(queued_paths(&env.state()), paths);
    assert_eq!(rooted(&gcroots), paths);

    // The hook leaves the roots' fsync to the daemon, so a power loss right after a build can
    // take the roots (as it can take Nix's own). Lose them: nothing protects the app now.
    // Starting, the daemon roots every queued path again.
    for p in &paths {
        fs::remove_file(gcroots.join(p.base())).expect("remove a root");
    }
    assert!(
        dead(&app),
        "{app} has no root, so the collector would delete it"
    );

    // Queued, the cache down: the collector keeps both, and refuses to delete them.
    let mut daemon = Daemon::start_with(&env, &nginx.url(), &key, 30, |cmd| {
        cmd.env("NARPOST_GC_ROOTS_DIR", &gcroots);
    });
    wait_for(
        &daemon,
        "the daemon to find the cache down",
        Duration::from_secs(30),
        || status_json(&env)["cache_down_since"].is_u64(),
    );
    assert_eq!(
        rooted(&gcroots),
        paths,
        "the daemon rooted the queued paths"
    );
    for p in &paths {
        assert!(!dead(p), "{p} is queued but the collector would delete it");
        let out = delete(p);
        assert!(
            !out.status.success(),
            "nix-store --delete removed queued {p}"
        );
        assert!(Path::new(&p.to_absolute()).exists());
    }

    // Uploaded: the roots are gone, and so is the protection.
    nginx.resume();
    wait_drained(&env, &daemon, Duration::from_secs(90));
    let cache = nginx.cache();
    assert_in_cache(&cache, &paths, &daemon.log());
    cache.assert_complete();
    wait_unrooted(&gcroots);
    let paths: Vec<StorePath> = paths.into_iter().collect();
    assert_substitutes(&env, &nginx.url(), &public, &paths);
    for p in &paths {
        assert!(dead(p), "{p} is uploaded but still rooted");
    }
    // The referrer first: the collector never deletes a path something still refers to.
    let mut order = paths.clone();
    order.sort_by_key(|p| *p != app);
    for p in &order {
        let out = delete(p);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!Path::new(&p.to_absolute()).exists());
    }
    daemon.stop(Duration::from_secs(10));
}

#[test]
fn a_build_that_ends_during_a_long_upload_is_in_the_cache_before_that_upload_ends() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    // 8 MiB at 512 KiB/s: a pass of sixteen seconds.
    let slow = Throttle::start(nginx.port, 512 << 10);
    let (key, public) = env.keygen("daemon-lane-1");
    let hooked = HookedNix::install(&env, &env.path().join("gcroots"));
    let nonce = nonce();
    let big_file = env.write_nix(
        "big.nix",
        &format!(
            "{}mk \"narpost-lane-big\" \"head -c 8M /dev/urandom > $out\"",
            nix_prelude(&nonce)
        ),
    );
    let big = hooked.build(&big_file, &[]);
    let cache = nginx.cache();
    let mut daemon = Daemon::start(&env, &slow.url(), &key, 30);
    wait_for(
        &daemon,
        "the big upload to be under way",
        Duration::from_secs(20),
        || slow.sent.load(Ordering::Relaxed) > 1 << 20,
    );

    let small_file = env.write_nix(
        "small.nix",
        &format!(
            "{}mk \"narpost-lane-small\" \"echo small > $out\"",
            nix_prelude(&nonce)
        ),
    );
    let small = hooked.build(&small_file, &[]);
    let built = Instant::now();
    wait_for(
        &daemon,
        "the small path in the cache",
        Duration::from_secs(10),
        || cache.has(&small[0]),
    );
    eprintln!(
        "small path in the cache {:?} after its build",
        built.elapsed()
    );
    assert!(
        !cache.has(&big[0]),
        "the big upload ended first, so this shows nothing:\n{}",
        daemon.log()
    );
    cache.assert_complete();
    assert_eq!(queued_paths(&env.state()), big.iter().cloned().collect());
    assert_substitutes(&env, &nginx.url(), &public, &small);

    // The pass under way goes on; both entries end up acknowledged.
    slow.rate.store(256 << 20, Ordering::Relaxed);
    wait_drained(&env, &daemon, Duration::from_secs(60));
    assert!(cache.has(&big[0]));
    cache.assert_complete();
    daemon.stop(Duration::from_secs(10));
    assert!(daemon.log().contains("pushed 2 paths,"), "{}", daemon.log());
    assert_substitutes(&env, &nginx.url(), &public, &big);
}

/// A base and `n` small leaves on it, per batch: `a` is built before the daemon starts,
/// `b` while it uploads the base.
fn shared_base_expr(n: usize) -> String {
    let mut expr = nix_prelude(&nonce());
    expr.push_str(
        "rec {\n  base = mk \"narpost-shared-base\" \"head -c 2M /dev/urandom > $out\";\n",
    );
    for batch in ["a", "b"] {
        let leaves: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "(mk \"narpost-shared-{batch}{i}\" \"(echo ${{base}}; head -c 32K /dev/urandom) > $out\")"
                )
            })
            .collect();
        expr.push_str(&format!("  {batch} = [ {} ];\n", leaves.join(" ")));
    }
    expr.push_str("}\n");
    expr
}

#[test]
fn a_reference_in_flight_is_uploaded_once_and_the_spool_stays_within_its_bound() {
    const JOBS: usize = 1;
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    // 2 MiB at 256 KiB/s per connection: the base is in flight for eight seconds, while
    // the leaves (32 KiB each) go up in an eighth of a second and wait for it.
    let slow = Throttle::start(nginx.port, 256 << 10);
    let (key, public) = env.keygen("daemon-shared-1");
    let hooked = HookedNix::install(&env, &env.path().join("gcroots"));
    let file = env.write_nix("shared.nix", &shared_base_expr(16));
    let base = hooked.build(&file, &["base"]);
    let a = hooked.build(&file, &["a"]);
    let cache = nginx.cache();

    let spool = env.state().join("drain-spool");
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (spool, sampling) = (spool.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while sampling.load(Ordering::Relaxed) {
                if let Ok(dir) = fs::read_dir(&spool) {
                    most = most.max(dir.count());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            most
        })
    };
    let mut daemon = Daemon::start_with(&env, &slow.url(), &key, 30, |cmd| {
        cmd.env("NARPOST_JOBS", JOBS.to_string());
    });
    wait_for(
        &daemon,
        "the base's upload to be under way",
        Duration::from_secs(20),
        || slow.sent.load(Ordering::Relaxed) > 512 << 10,
    );
    // Queued while the first run uploads the base: a second run, whose leaves refer to it.
    let b = hooked.build(&file, &["b"]);
    assert!(
        !cache.has(&base[0]),
        "the base was in the cache before the second batch was queued, so this shows nothing:\n{}",
        daemon.log()
    );
    wait_drained(&env, &daemon, Duration::from_secs(60));
    sampling.store(false, Ordering::Relaxed);
    let most = sampler.join().expect("the spool sampler");
    daemon.stop(Duration::from_secs(10));

    let puts: Vec<String> = nginx
        .puts()
        .into_iter()
        .filter(|u| u != "/nix-cache-info")
        .collect();
    let mut seen = BTreeSet::new();
    let twice: Vec<&String> = puts.iter().filter(|u| !seen.insert(*u)).collect();
    assert!(twice.is_empty(), "uploaded more than once: {twice:?}");
    let base_narinfo = format!("/{}.narinfo", base[0].hash_part());
    assert_eq!(
        puts.iter().filter(|u| **u == base_narinfo).count(),
        1,
        "{puts:?}"
    );
    assert_eq!(puts.len(), 2 * (1 + a.len() + b.len()), "{puts:?}");
    let problems = upload_order_problems(&puts, &cache);
    assert!(problems.is_empty(), "{problems:?}");
    cache.assert_complete();

    // Spooled NARs: those prepared (`jobs` worker slots, one more for the newest run, and
    // the small slots, as the leaves are small) and those uploading; a NAR that went up
    // leaves the spool while its path waits.
    let bound =
        JOBS + 1 + narpost::pipeline::small_slots(JOBS) + narpost::pipeline::upload_slots(JOBS);
    assert!(most <= bound, "{most} NARs spooled at once, bound {bound}");
    assert!(
        most >= narpost::pipeline::upload_slots(JOBS),
        "{most} NARs spooled at once: the uploads never filled their slots, so this shows nothing"
    );
    eprintln!("at most {most} NARs spooled at once (bound {bound})");
    assert_substitutes(&env, &nginx.url(), &public, &b);
}
