//! What a queued path survives: faults a person fixes (a full disk, a server left at its
//! default upload limit, a corrupt store path repaired later) keep it queued with its GC
//! root until they are fixed, and then it lands in a cache a fresh Nix substitutes from.
//! Also: an idle daemon costs no CPU, and `watch-exec` works beside a running daemon.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

/// User plus system CPU time of the processes behind a daemon: the one started and the
/// drainer it forks (see narpost::priority), threads included.
fn daemon_cpu(env: &Env, daemon: &Daemon) -> Duration {
    let mut pids = BTreeSet::from([daemon.pid()]);
    pids.extend(drainer_pid(&env.state()));
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = pids
        .iter()
        .map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}; daemon log:\n{}", daemon.log()));
            let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
        })
        .sum();
    Duration::from_millis(ticks * 1000 / ticks_per_sec)
}

/// Asserts the daemon uses at most 0.1 s of CPU in 10 s of nothing to do.
fn assert_idle(env: &Env, daemon: &Daemon, when: &str) {
    let before = daemon_cpu(env, daemon);
    std::thread::sleep(Duration::from_secs(10));
    let used = daemon_cpu(env, daemon) - before;
    assert!(
        used <= Duration::from_millis(100),
        "an idle daemon ({when}) used {used:?} of CPU in 10 s; its log:\n{}",
        daemon.log()
    );
}

#[test]
fn an_idle_daemon_costs_no_cpu_with_an_empty_queue_and_after_a_drain() {
    let env = Env::new();
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());
    let (key, public) = env.keygen("idle-1");
    let gcroots = env.path().join("gcroots");
    let daemon = Daemon::start(&env, &url, &key, 30);
    wait_for(&daemon, "the drain state", Duration::from_secs(10), || {
        drainer_pid(&env.state()).is_some()
    });
    // Past start-up (the first pass, adopting roots).
    std::thread::sleep(Duration::from_secs(1));
    assert_idle(&env, &daemon, "empty queue");

    let p = simple_paths(&env, &["idle"]);
    assert_lines(
        hook(
            &env.state(),
            &gcroots,
            &[("OUT_PATHS", &p[0].to_absolute())],
        ),
        &[],
    );
    wait_drained(&env, &daemon, Duration::from_secs(30));
    wait_unrooted(&gcroots);
    std::thread::sleep(Duration::from_secs(1));
    assert_idle(&env, &daemon, "after a drain");
    assert_substitutes(&env, &url, &public, &p);
}

#[test]
fn a_cache_filesystem_that_fills_up_mid_nar_keeps_the_path_queued_until_there_is_room() {
    let env = Env::new();
    let cache_dir = env.path().join("cache");
    let disk = Mount::tmpfs(&cache_dir, "4m");
    let url = format!("file://{}", cache_dir.display());
    let (key, public) = env.keygen("enospc-1");
    let gcroots = env.path().join("gcroots");
    // 48 MB of random bytes: the spool file in the cache filesystem runs out of room while
    // the NAR is being written, not at its final flush.
    let big = random_path(&env, "enospc", 48_000_000);
    assert_lines(
        hook(&env.state(), &gcroots, &[("OUT_PATHS", &big.to_absolute())]),
        &[],
    );
    let daemon = Daemon::start(&env, &url, &key, 30);
    wait_for(
        &daemon,
        "the daemon to report the full disk",
        Duration::from_secs(60),
        || {
            status_json(&env)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left"))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let cache = CacheDir::new(&cache_dir);
    assert_kept(&env, &daemon, &gcroots, &big, &cache);

    run(Command::new("mount")
        .args(["-o", "remount,size=200m"])
        .arg(&disk.0));
    wait_drained(&env, &daemon, Duration::from_secs(120));
    wait_unrooted(&gcroots);
    assert!(cache.has(&big), "{}", daemon.log());
    cache.assert_complete();
    assert_substitutes(&env, &url, &public, std::slice::from_ref(&big));
}

#[test]
fn an_http_413_keeps_the_path_queued_with_a_hint_until_the_admin_raises_the_limit() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    nginx.set_max_body("1k");
    let (key, public) = env.keygen("too-large-1");
    let gcroots = env.path().join("gcroots");
    let path = random_path(&env, "too-large", 200_000);
    assert_lines(
        hook(
            &env.state(),
            &gcroots,
            &[("OUT_PATHS", &path.to_absolute())],
        ),
        &[],
    );
    let daemon = Daemon::start(&env, &nginx.url(), &key, 30);
    wait_for(
        &daemon,
        "status to say the cache needs attention",
        Duration::from_secs(60),
        || {
            status_json(&env)["needs_attention"]
                .as_str()
                .is_some_and(|a| a.contains("413"))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_kept(&env, &daemon, &gcroots, &path, &nginx.cache());
    let text = status_text(&env);
    assert!(
        text.contains("attention:") && text.contains("client_max_body_size"),
        "status names the fix:\n{text}"
    );

    nginx.set_max_body("0");
    wait_drained(&env, &daemon, Duration::from_secs(120));
    wait_unrooted(&gcroots);
    nginx.cache().assert_complete();
    assert!(
        status_json(&env)["needs_attention"].is_null(),
        "attention ends with the fix"
    );
    assert_substitutes(&env, &nginx.url(), &public, std::slice::from_ref(&path));
}

#[test]
fn a_corrupt_path_is_given_up_on_and_retry_queues_it_again_once_repaired() {
    let env = Env::new();
    let cache_dir = env.path().join("cache");
    let url = format!("file://{}", cache_dir.display());
    let (key, public) = env.keygen("retry-1");
    let gcroots = env.path().join("gcroots");
    let p = simple_paths(&env, &["mended"]);
    let file = Path::new(&p[0].to_absolute()).join("file");
    let original = fs::read(&file).expect("read the store file");
    corrupt_store_file(&file, b"BROKEN\n");
    assert_lines(
        hook(
            &env.state(),
            &gcroots,
            &[("OUT_PATHS", &p[0].to_absolute())],
        ),
        &[],
    );
    let daemon = Daemon::start(&env, &url, &key, 30);
    wait_for(
        &daemon,
        "the entry to be given up on",
        Duration::from_secs(60),
        || {
            status_json(&env)["failed"]
                .as_array()
                .is_some_and(|f| f.len() == 1)
        },
    );
    let text = status_text(&env);
    assert!(
        text.contains("failed:       1 given up on (`narpost retry` queues them again)")
            && text.contains("do not match the store's NarHash"),
        "{text}"
    );

    corrupt_store_file(&file, &original);
    let out = run(env.narpost().arg("retry"));
    assert!(
        stderr(&out).contains("1 entry queued again"),
        "{}",
        stderr(&out)
    );
    wait_for(
        &daemon,
        "the repaired path in the cache",
        Duration::from_secs(30),
        || CacheDir::new(&cache_dir).has(&p[0]),
    );
    wait_drained(&env, &daemon, Duration::from_secs(30));
    wait_unrooted(&gcroots);
    assert_eq!(status_json(&env)["failed"], serde_json::json!([]));
    let again = run(env.narpost().arg("retry"));
    assert!(
        stderr(&again).contains("0 entries queued again"),
        "{}",
        stderr(&again)
    );
    assert_substitutes(&env, &url, &public, &p);
}

#[test]
fn watch_exec_beside_a_running_daemon_runs_the_command_and_leaves_the_uploads_to_it() {
    let env = Env::new();
    let cache_dir = env.path().join("cache");
    let url = format!("file://{}", cache_dir.display());
    let (key, public) = env.keygen("beside-1");
    let daemon = Daemon::start(&env, &url, &key, 30);
    wait_for(&daemon, "the drain state", Duration::from_secs(10), || {
        drainer_pid(&env.state()).is_some()
    });
    let expr = format!(
        "{}mk \"narpost-beside\" \"echo beside > $out\"\n",
        nix_prelude(&nonce())
    );
    let file = env.write_nix("beside.nix", &expr);
    let started = Instant::now();
    let out = env
        .narpost()
        .env("NARPOST_CACHE", &url)
        .env("NARPOST_KEY_FILE", &key)
        .args(["watch-exec", "--", "nix-build", "--no-out-link"])
        .arg(&file)
        .output()
        .expect("run watch-exec");
    let err = stderr(&out);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert!(err.contains("already drains"), "one line says so: {err}");
    let built = parse_paths(&stdout(&out));
    assert_eq!(built.len(), 1, "{}", stdout(&out));
    wait_for(
        &daemon,
        "the daemon to upload the build",
        Duration::from_secs(30),
        || CacheDir::new(&cache_dir).has(&built[0]),
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_substitutes(&env, &url, &public, &built);
}
