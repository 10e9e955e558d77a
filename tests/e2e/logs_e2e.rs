//! Build logs in the cache, end to end with the real Nix: what narpost uploads, `nix log`
//! reads back, from a `file://` cache and from nginx; a failed build's log under
//! `watch-exec` too; a log past `max-log-size` is skipped and said so.

use crate::common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use narpost::format::store_path::StorePath;

/// Builds a derivation whose builder prints `marker` on stdout and stderr; returns
/// (output, derivation).
fn build_talkative(env: &Env, marker: &str) -> (StorePath, StorePath) {
    let expr = format!(
        r#"{prelude}{{
  talk = mk "narpost-log-talk" ''
    echo "stdout says {marker}"
    echo "stderr says {marker}" >&2
    echo done > $out
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("talk.nix", &expr);
    let out = nix_build(&file, &["talk"], &[]).remove(0);
    let drv = deriver(&out);
    (out, drv)
}

fn deriver(out: &StorePath) -> StorePath {
    let text = stdout(&run(nix("nix-store").args(["-qd", &out.to_absolute()])));
    StorePath::from_absolute(text.trim()).expect("a deriver")
}

/// `nix log --store STORE PATH`, which must succeed; what it printed on stdout.
fn nix_log(store: &str, path: &StorePath) -> String {
    stdout(&run(nix("nix")
        .args(["log", "--store", store])
        .arg(path.to_absolute())))
}

fn assert_has_log(text: &str, marker: &str) {
    for stream in ["stdout", "stderr"] {
        assert!(
            text.contains(&format!("{stream} says {marker}")),
            "the log lacks what the build printed on {stream}:\n{text}"
        );
    }
}

#[test]
fn nix_log_reads_what_the_build_printed_from_file_and_http_caches() {
    let env = Env::new();
    let marker = format!("marker-{}", nonce());
    let (out, drv) = build_talkative(&env, &marker);
    let (key, _) = env.keygen("test-logs-1");

    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());
    let text = pushed(&mut push_cmd(&env, &url, &key, &out));
    assert!(text.contains("1 build log uploaded"), "{text}");
    // Plain text, where Nix looks, named after the derivation.
    let stored = fs::read_to_string(cache.join("log").join(drv.base())).expect("log in cache");
    assert_has_log(&stored, &marker);
    // Through the narinfo's Deriver, as `nix log` finds it for an output.
    assert_has_log(&nix_log(&url, &out), &marker);
    CacheDir::new(&cache).assert_complete();

    let nginx = Nginx::start(env.path());
    let text = pushed(&mut push_cmd(&env, &nginx.url(), &key, &out));
    assert!(text.contains("1 build log uploaded"), "{text}");
    let puts = nginx.puts();
    let narinfo = puts
        .iter()
        .position(|p| p.ends_with(".narinfo"))
        .expect("narinfo PUT");
    let log = puts
        .iter()
        .position(|p| p.contains("/log/"))
        .unwrap_or_else(|| panic!("no log PUT: {puts:?}"));
    assert!(narinfo < log, "log before its narinfo: {puts:?}");
    assert_has_log(&nix_log(&nginx.url(), &out), &marker);
}

#[test]
fn a_log_past_max_log_size_is_skipped_and_reported() {
    let env = Env::new();
    let marker = format!("marker-{}", nonce());
    let (out, drv) = build_talkative(&env, &marker);
    let (key, _) = env.keygen("test-logs-1");
    let config = env.path().join("narpost.toml");
    fs::write(&config, "max-log-size = 20\n").expect("write config");
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());

    let text = pushed(
        push_cmd(&env, &url, &key, &out)
            .arg("--config")
            .arg(&config),
    );
    assert!(text.contains("max-log-size"), "{text}");
    assert!(
        text.contains("0 build logs uploaded, 1 not uploaded"),
        "{text}"
    );
    assert!(
        CacheDir::new(&cache).has(&out),
        "the path itself must be pushed"
    );
    assert!(!cache.join("log").join(drv.base()).exists());

    // `upload-logs = false` uploads none and says nothing about logs.
    fs::write(&config, "upload-logs = false\n").expect("write config");
    let other = env.path().join("other");
    let text = pushed(
        push_cmd(&env, &format!("file://{}", other.display()), &key, &out)
            .arg("--config")
            .arg(&config),
    );
    assert!(!text.contains("build log"), "{text}");
    assert!(!other.join("log").join(drv.base()).exists());
}

#[test]
fn a_failing_build_under_watch_exec_leaves_its_log_in_the_cache() {
    let env = Env::new();
    let marker = format!("why-{}", nonce());
    let expr = format!(
        r#"{prelude}{{
  bad = mk "narpost-log-bad" ''
    echo "compiling, then: {marker}"
    exit 3
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("bad.nix", &expr);
    let drv = StorePath::from_absolute(
        stdout(&run(nix("nix-instantiate").arg(&file).args(["-A", "bad"]))).trim(),
    )
    .expect("a derivation");
    let (key, _) = env.keygen("test-logs-1");
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());

    let out = env
        .narpost()
        .args(["watch-exec", "--to", &url, "--key"])
        .arg(&key)
        .args(["--", "nix-build", "--no-out-link"])
        .arg(&file)
        .args(["-A", "bad"])
        .output()
        .expect("run narpost watch-exec");
    let text = stdout(&out) + &stderr(&out);
    assert!(!out.status.success(), "the build must fail:\n{text}");
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("left queued"))
        .unwrap_or("");
    // Other tests' builds may be pushed (with their logs) by this watcher too.
    let logs: u64 = last
        .rsplit(", ")
        .next()
        .and_then(|s| {
            s.strip_suffix(" build logs uploaded")
                .or_else(|| s.strip_suffix(" build log uploaded"))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no build log count in the last line:\n{text}"));
    assert!(logs >= 1, "{text}");
    let stored = fs::read_to_string(cache.join("log").join(drv.base()))
        .unwrap_or_else(|e| panic!("no log of the failed build in the cache ({e}):\n{text}"));
    assert!(stored.contains(&marker), "{stored}");

    // Another machine: a store that holds the .drv, and the cache as substituter.
    let fresh = env.path().join("fresh");
    run(nix("nix")
        .args(["copy", "--derivation", "--to"])
        .arg(&fresh)
        .arg(drv.to_absolute()));
    let printed = stdout(&run(nix("nix")
        .args(["log", "--store"])
        .arg(&fresh)
        .args(["--option", "substituters", &url])
        .arg(drv.to_absolute())));
    assert!(printed.contains(&marker), "nix log printed:\n{printed}");
    assert_no_local_log(&fresh, &drv);
}

#[test]
fn watch_store_uploads_a_failed_builds_log_while_it_runs() {
    let env = Env::new();
    let marker = format!("why-{}", nonce());
    let expr = format!(
        r#"{prelude}{{
  bad = mk "narpost-log-bad-ws" ''
    echo "compiling for a while"
    sleep 5
    echo "linking, then: {marker}" >&2
    exit 1
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("bad.nix", &expr);
    let drv = StorePath::from_absolute(
        stdout(&run(nix("nix-instantiate").arg(&file).args(["-A", "bad"]))).trim(),
    )
    .expect("a derivation");
    let (key, _) = env.keygen("test-logs-1");
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());
    let mut watcher = Background::spawn(
        env.narpost()
            .args(["watch-store", "--to", &url, "--key"])
            .arg(&key),
        &env.path().join("watch-store.log"),
        "narpost watch-store",
    );
    watcher.wait_for_output("watching", Duration::from_secs(30));

    let out = nix("nix-build")
        .arg(&file)
        .args(["-A", "bad", "--no-out-link"])
        .output()
        .expect("run nix-build");
    assert!(!out.status.success(), "the build must fail");
    let log = cache.join("log").join(drv.base());
    wait_until(
        "the failed build's log in the cache",
        Duration::from_secs(30),
        || fs::read_to_string(&log).is_ok_and(|t| t.contains(&marker)),
    );
    // Not a log cut short while the build was quiet: the whole of it.
    let stored = fs::read_to_string(&log).expect("read the log");
    assert!(stored.contains("compiling for a while"), "{stored}");
    watcher.assert_running();
    let (status, text) = watcher.terminate(Duration::from_secs(30));
    assert!(status.success(), "{text}");
}

/// The fresh store must have got the log from the cache, not from a log directory of its own.
fn assert_no_local_log(fresh: &Path, drv: &StorePath) {
    let base = drv.base();
    let local = fresh
        .join("nix/var/log/nix/drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]));
    assert!(!local.exists(), "{} exists", local.display());
}
