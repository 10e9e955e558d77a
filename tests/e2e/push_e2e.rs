//! `narpost push` end to end, with the real Nix and a real nginx WebDAV cache: what narpost
//! uploads, a fresh Nix store substitutes with signatures required.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use narpost::format::store_path::StorePath;

#[test]
fn file_cache_closure_substitutes_with_signatures_required() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("test-cache-1");
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());

    let text = pushed(&mut push_cmd(&env, &url, &key, &top));
    let closure = nix_closure(std::slice::from_ref(&top));
    assert!(closure.len() >= 4, "closure: {closure:?}");
    let dir = CacheDir::new(&cache);
    for p in &closure {
        assert!(dir.has(p), "{p} not in the cache; narpost said:\n{text}");
    }
    assert_eq!(dir.narinfos().len(), closure.len(), "{text}");
    dir.assert_complete();
    assert!(cache.join("nix-cache-info").is_file());
    // No temporary files left under any name (the temporary directory itself may stay).
    for entry in walk(&cache) {
        let name = entry
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        assert!(
            !name.starts_with('.') || entry.is_dir(),
            "leftover {}",
            entry.display()
        );
        assert!(
            !entry.parent().is_some_and(|p| p.ends_with(".narpost-tmp")),
            "leftover {}",
            entry.display()
        );
    }

    assert_substitutes(&env, &url, &public, &outs);

    // A store trusting another key refuses everything.
    let (_, other) = env.keygen("other-cache-1");
    let err = substitute(env.path(), &url, &other, std::slice::from_ref(&top))
        .expect_err("a fresh store trusting another key must refuse the paths");
    assert!(
        err.contains("signature") || err.contains("lacks a valid"),
        "{err}"
    );

    // Second push: nothing new, and it says so.
    let nars_before = dir.nar_count();
    let text = pushed(&mut push_cmd(&env, &url, &key, &top));
    assert!(
        text.contains(&format!("all {} paths were already cached", closure.len())),
        "{text}"
    );
    assert_eq!(dir.nar_count(), nars_before);
}

/// Every `.narinfo` in a cache directory, by file name.
fn narinfo_texts(cache: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    fs::read_dir(cache)
        .expect("read the cache directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        .map(|e| {
            let text = fs::read_to_string(e.path()).expect("read a narinfo");
            (e.file_name().to_string_lossy().into_owned(), text)
        })
        .collect()
}

/// A user who cannot open the store database gets the paths' metadata from `nix path-info`
/// through nix-daemon (whichever JSON shape this Nix prints): the cache gets the same
/// narinfos, byte for byte, as from the database.
#[test]
fn store_reached_only_through_nix_daemon_gives_the_same_cache() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("test-daemon-1");
    let from_db = env.path().join("cache-db");
    let from_daemon = env.path().join("cache-daemon");
    let url = |dir: &std::path::Path| format!("file://{}", dir.display());
    pushed(&mut push_cmd(&env, &url(&from_db), &key, &top));

    let no_db = env.path().join("nix-state-without-db");
    let daemon = NixDaemon::start(env.path());
    let mut cmd = push_cmd(&env, &url(&from_daemon), &key, &top);
    daemon.client(&mut cmd, &no_db);
    let text = pushed(&mut cmd);
    assert!(!no_db.join("db").exists(), "the push made a store database");

    let want = narinfo_texts(&from_db);
    assert_eq!(want.len(), nix_closure(std::slice::from_ref(&top)).len());
    assert_eq!(narinfo_texts(&from_daemon), want, "{text}");
    CacheDir::new(&from_daemon).assert_complete();
    assert_substitutes(&env, &url(&from_daemon), &public, &outs);

    // With neither the database nor the daemon, the error names the database.
    let socket = daemon.socket.clone();
    drop(daemon);
    let mut cmd = push_cmd(&env, &url(&from_daemon), &key, &top);
    nix_daemon_client(&mut cmd, &no_db, &socket);
    let out = cmd.output().expect("run narpost push");
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}: cannot read the Nix store database",
            no_db.join("db/db.sqlite").display()
        )),
        "{err}"
    );
}

#[test]
fn http_cache_gets_nars_before_narinfos_and_references_first() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("test-http-1");
    let nginx = Nginx::start(env.path());

    let out = run(env
        .narpost()
        .args(["push", "--jobs", "4", "--to", &nginx.url(), "--key"])
        .arg(&key)
        .arg(top.to_absolute()));
    let text = stdout(&out) + &stderr(&out);
    let closure = nix_closure(std::slice::from_ref(&top));
    let cache = nginx.cache();
    assert_eq!(cache.narinfos().len(), closure.len(), "{text}");
    cache.assert_complete();
    let problems = upload_order_problems(&nginx.puts(), &cache);
    assert!(
        problems.is_empty(),
        "upload order:\n{}",
        problems.join("\n")
    );

    assert_substitutes(&env, &nginx.url(), &public, &outs);
    let (_, other) = env.keygen("other-http-1");
    assert!(substitute(env.path(), &nginx.url(), &other, std::slice::from_ref(&top)).is_err());

    let puts_before = nginx.puts().len();
    let text = pushed(&mut push_cmd(&env, &nginx.url(), &key, &top));
    assert!(text.contains("already cached"), "{text}");
    assert_eq!(
        nginx.puts().len(),
        puts_before,
        "a second push uploaded something"
    );
}

#[test]
fn http_cache_with_bearer_token_from_a_file() {
    let env = Env::new();
    let (top, _) = build_rich_closure(&env);
    let (key, public) = env.keygen("token-1");
    let mut nginx = Nginx::start(env.path());
    nginx.require_token("s3cret-token");

    // Without the token: refused as an authentication problem, and nothing stored.
    let out = push_cmd(&env, &nginx.url(), &key, &top)
        .output()
        .expect("run narpost");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("401"), "{err}");
    assert!(
        err.contains("token"),
        "the hint names the token setting: {err}"
    );
    assert!(nginx.cache().narinfos().is_empty());

    let token = env.path().join("token");
    fs::write(&token, "s3cret-token\n").expect("write token");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("chmod");
    run(push_cmd(&env, &nginx.url(), &key, &top).env("NARPOST_TOKEN_FILE", &token));
    nginx.cache().assert_complete();
    // Nix itself cannot send the token; the files are what count.
    let copy = env.path().join("copy");
    copy_dir(&nginx.root, &copy);
    assert_substitutes(&env, &format!("file://{}", copy.display()), &public, &[top]);
}

#[test]
fn embedded_default_generates_a_key_and_pushes_to_the_state_dir() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let out = run(env.narpost().args(["push"]).arg(top.to_absolute()));
    let text = stdout(&out) + &stderr(&out);
    let state = env.state();
    let sec = state.join("signing.sec");
    let public = fs::read_to_string(state.join("signing.pub")).expect("public key written");
    let public = public.trim();
    assert_eq!(
        fs::metadata(&sec)
            .expect("secret key written")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(text.contains(public), "the public key is printed: {text}");
    let host = public.split(':').next().unwrap_or_default();
    assert!(host.ends_with("-1"), "{public}");
    let url = format!("file://{}", state.join("cache").display());
    CacheDir::new(state.join("cache")).assert_complete();
    assert_substitutes(&env, &url, public, &outs);

    // The key is reused, not regenerated.
    let before = fs::read(&sec).expect("read key");
    run(env.narpost().args(["push"]).arg(top.to_absolute()));
    assert_eq!(fs::read(&sec).expect("read key"), before);
}

#[test]
fn corrupted_store_path_is_refused_with_its_referrers() {
    let env = Env::new();
    let expr = format!(
        r#"{prelude}rec {{
  victim = mk "narpost-t-victim" ''
    mkdir -p $out && echo original > $out/data
  '';
  user = mk "narpost-t-user" ''
    mkdir -p $out && echo ${{victim}} > $out/ref
  '';
  bystander = mk "narpost-t-bystander" ''
    echo fine > $out
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("corrupt.nix", &expr);
    let outs = nix_build(&file, &["victim", "user", "bystander"], &[]);
    let (victim, user, bystander) = (&outs[0], &outs[1], &outs[2]);
    corrupt_store_file(
        &std::path::Path::new(&victim.to_absolute()).join("data"),
        b"tampered, and longer than before\n",
    );

    let (key, _) = env.keygen("corrupt-1");
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());
    let out = push_cmd(&env, &url, &key, user)
        .arg(bystander.to_absolute())
        .output()
        .expect("run narpost");
    let text = stdout(&out) + &stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&victim.to_absolute()), "{text}");
    assert!(
        text.contains("NarHash") || text.contains("does not match"),
        "{text}"
    );
    assert!(text.contains("nix-store --verify-path"), "{text}");
    let dir = CacheDir::new(&cache);
    assert!(!dir.has(victim), "the corrupt path was published");
    assert!(
        !dir.has(user),
        "a path referencing the corrupt one was published"
    );
    assert!(
        dir.has(bystander),
        "an unrelated path was not pushed: {text}"
    );
    dir.assert_complete();
}

/// `narpost push --to URL --key KEY PATH` (with `http-timeout` when given), expecting it to
/// fail; returns stderr.
fn failed_push(
    env: &Env,
    url: &str,
    key: &std::path::Path,
    path: impl AsRef<std::ffi::OsStr>,
    http_timeout: Option<&str>,
) -> String {
    let mut cmd = env.narpost();
    if let Some(seconds) = http_timeout {
        // A hung or failing cache is retried for retry-timeout: a few seconds of it here.
        cmd.env("NARPOST_HTTP_TIMEOUT", seconds)
            .env("NARPOST_RETRY_TIMEOUT", "4");
    }
    cmd.args(["push", "--to", url, "--key"]).arg(key).arg(path);
    let out = cmd.output().expect("run narpost");
    assert!(!out.status.success(), "expected failure: {cmd:?}");
    stderr(&out)
}

#[test]
fn bad_input_gives_one_clear_line() {
    let env = Env::new();
    let (top, _) = build_rich_closure(&env);
    let cache = format!("file://{}", env.path().join("cache").display());
    let top_abs = top.to_absolute();

    // Missing key file.
    let missing = env.path().join("nope.sec");
    let err = failed_push(&env, &cache, &missing, &top_abs, None);
    assert!(err.starts_with("narpost: "), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("keygen"), "hint says how to make one: {err}");

    // A key readable by others.
    let (key, _) = env.keygen("loose-1");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = failed_push(&env, &cache, &key, &top_abs, None);
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(
        err.contains("chmod 600") || err.contains("chmod 0600"),
        "{err}"
    );

    // A malformed key.
    let bad = env.path().join("bad.sec");
    fs::write(&bad, "not a key\n").expect("write");
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).expect("chmod");
    let err = failed_push(&env, &cache, &bad, &top_abs, None);
    assert!(err.contains(&bad.display().to_string()), "{err}");

    let (key, _) = env.keygen("good-1");
    // A path that is not in the store, and one that is not a store path at all.
    let absent = "/nix/store/00000000000000000000000000000000-narpost-absent";
    let err = failed_push(&env, &cache, &key, absent, None);
    assert!(err.contains(absent), "{err}");
    assert!(err.contains("not"), "{err}");
    let err = failed_push(&env, &cache, &key, "/nix/store/short-name", None);
    assert!(err.contains("/nix/store/short-name"), "{err}");

    // Nothing listens: unreachable, named, and nothing hangs.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let err = failed_push(&env, &url, &key, &top_abs, Some("3"));
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    {
        let e = &err;
        assert!(
            e.lines().filter(|l| l.starts_with("narpost: ")).count() == 1,
            "one error line: {e}"
        );
    }

    // An unsupported URL.
    let err = failed_push(&env, "ftp://cache", &key, &top_abs, None);
    assert!(err.contains("ftp://cache"), "{err}");
}

#[test]
fn a_cache_answering_garbage_is_refused_and_gets_nothing() {
    let env = Env::new();
    let (top, _) = build_rich_closure(&env);
    let (key, _) = env.keygen("garbage-1");

    // 200 with an HTML page for everything: not a binary cache.
    let html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 27\r\nConnection: close\r\n\r\n<html>Welcome! Login</html>";
    let port = canned_server(html, false);
    let url = format!("http://127.0.0.1:{port}");
    let err = failed_push(&env, &url, &key, top.to_absolute(), Some("3"));
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("binary cache"), "{err}");

    // A hung server: an error after the timeout, not a stuck push.
    let port = canned_server(b"", true);
    let url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let err = failed_push(&env, &url, &key, top.to_absolute(), Some("2"));
    assert!(started.elapsed() < Duration::from_secs(50), "push hung");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        err.contains("timed out") || err.contains("no answer"),
        "{err}"
    );

    // A real cache root that answers 200 to HEAD for every narinfo would make narpost skip
    // uploads; it is refused before anything is skipped.
    let all_ok = b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\nConnection: close\r\n\r\nStoreDir: /nix/store\n\n\n\n\n";
    let port = canned_server(all_ok, false);
    let url = format!("http://127.0.0.1:{port}");
    let err = failed_push(&env, &url, &key, top.to_absolute(), Some("3"));
    assert!(err.contains("200"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir").flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).expect("copy");
        }
    }
}

/// A chain `low <- mid <- high` whose middle path is signed by a test "upstream" key in the
/// local store, as a path substituted from cache.nixos.org is. Returns (low, mid, high).
fn build_chain_with_upstream_middle(env: &Env, upstream_key: &std::path::Path) -> [StorePath; 3] {
    let expr = format!(
        r#"{prelude}rec {{
  low = mk "narpost-up-low" "echo low > $out";
  mid = mk "narpost-up-mid" "echo ${{low}} > $out";
  high = mk "narpost-up-high" "echo building high >&2; echo ${{mid}} > $out";
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("chain.nix", &expr);
    let outs = nix_build(&file, &["low", "mid", "high"], &[]);
    run(nix("nix")
        .args(["store", "sign", "--key-file"])
        .arg(upstream_key)
        .arg(outs[1].to_absolute()));
    [outs[0].clone(), outs[1].clone(), outs[2].clone()]
}

#[test]
fn upstream_signed_paths_are_left_upstream_and_the_closure_still_substitutes() {
    let env = Env::new();
    let (upstream_key, upstream_public) = env.keygen("test-upstream-1");
    let [low, mid, high] = build_chain_with_upstream_middle(&env, &upstream_key);
    let (key, public) = env.keygen("test-cache-1");
    let config = env.path().join("narpost.toml");
    fs::write(&config, "upstream-keys = [\"test-upstream-1\"]\n").expect("write config");
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());

    let text = pushed(
        push_cmd(&env, &url, &key, &high)
            .arg("--config")
            .arg(&config),
    );
    assert!(
        text.contains("pushed 2 paths, 0 already cached, 1 left to upstream"),
        "{text}"
    );
    let dir = CacheDir::new(&cache).with_upstream(&["test-upstream-1"]);
    assert!(dir.has(&high) && dir.has(&low), "{text}");
    assert!(
        !dir.has(&mid),
        "the upstream-signed path was pushed:\n{text}"
    );
    dir.assert_complete();
    // Against an upstream list without the key, the cache is rightly incomplete.
    assert!(
        !CacheDir::new(&cache)
            .with_upstream(&[])
            .problems()
            .is_empty()
    );

    // "Upstream": a second cache holding just the upstream-signed path, with its signature.
    let up = env.path().join("upstream");
    let up_url = format!("file://{}", up.display());
    run(nix("nix")
        .args(["copy", "--to", &up_url])
        .arg(mid.to_absolute()));
    for narinfo in fs::read_dir(&up)
        .expect("read the upstream cache")
        .flatten()
    {
        let name = narinfo.file_name().to_string_lossy().into_owned();
        if name.ends_with(".narinfo") && !name.starts_with(mid.hash_part()) {
            fs::remove_file(narinfo.path()).expect("remove a narinfo");
        }
    }
    let fresh = env.path().join("fresh");
    run(nix("nix-store")
        .arg("--store")
        .arg(&fresh)
        .args(["--realise", &high.to_absolute()])
        .args(["--option", "substituters", &format!("{url} {up_url}")])
        .args(["--option", "require-sigs", "true"])
        .args([
            "--option",
            "trusted-public-keys",
            &format!("{public} {upstream_public}"),
        ]));
    let got = parse_paths(&stdout(&run(nix("nix")
        .args(["path-info", "-r", "--store"])
        .arg(&fresh)
        .arg(high.to_absolute()))));
    assert_eq!(got.len(), 3, "{got:?}");

    // The daemon counts what it left to upstream, and `status` says so while it runs.
    let daemon_cache = env.path().join("daemon-cache");
    fs::write(
        &config,
        format!(
            "cache = \"file://{}\"\nsecret-key-file = \"{}\"\nupstream-keys = [\"test-upstream-1\"]\n",
            daemon_cache.display(),
            key.display()
        ),
    )
    .expect("write config");
    hook_with_config(&env, &config, std::slice::from_ref(&high));
    let daemon = spawn_with_config(&env, &mut env.narpost(), &config, "daemon");
    let daemon_dir = CacheDir::new(&daemon_cache).with_upstream(&["test-upstream-1"]);
    let status = || {
        stdout(&run(env
            .narpost()
            .arg("--config")
            .arg(&config)
            .arg("status")))
    };
    // The counts are published after the pass that pushed the chain.
    wait_until(
        "status saying what the daemon left to upstream",
        Duration::from_secs(30),
        || {
            daemon_dir.has(&high)
                && status().contains("upstream:     1 path left to upstream since start")
        },
    );
    assert_eq!(queue_depth(&env, &config), 0);
    assert!(!daemon_dir.has(&mid));
    // The daemon takes build logs along too.
    let drv = stdout(&run(nix("nix-store").args(["-qd", &high.to_absolute()])));
    let drv = StorePath::from_absolute(drv.trim()).expect("a deriver");
    assert!(daemon_cache.join("log").join(drv.base()).is_file());
    daemon_dir.assert_complete();
    daemon.terminate(Duration::from_secs(30));

    // `upstream-keys = []` pushes everything.
    fs::write(&config, "upstream-keys = []\n").expect("write config");
    let all = env.path().join("all");
    let all_url = format!("file://{}", all.display());
    let text = pushed(
        push_cmd(&env, &all_url, &key, &high)
            .arg("--config")
            .arg(&config),
    );
    assert!(text.contains("pushed 3 paths"), "{text}");
    let all = CacheDir::new(&all).with_upstream(&[]);
    assert!(all.has(&mid));
    all.assert_complete();
}

/// A path's compressed bytes depend on its NAR and the level alone: pushes with different
/// `jobs` write the same NAR files, and pushes racing into one cache leave one NAR per path,
/// not one per way it happened to be compressed.
#[test]
fn nar_files_are_the_same_whatever_the_concurrency() {
    let env = Env::new();
    let (key, _) = env.keygen("same-bytes-1");
    // Two paths big enough for zstd's workers (4 MiB and up), and the rich closure.
    let expr = format!(
        r#"{}rec {{
  a = mk "narpost-same-a" "mkdir $out; head -c 9000000 /dev/urandom | od -An -tx1 > $out/a";
  b = mk "narpost-same-b" "mkdir $out; head -c 3000000 /dev/urandom | od -An -tx1 > $out/b; echo ${{a}} > $out/ref";
}}
"#,
        nix_prelude(&nonce())
    );
    let file = env.write_nix("same.nix", &expr);
    let top = nix_build(&file, &["b"], &[]).remove(0);
    let closure = nix_closure(std::slice::from_ref(&top));
    let nar_names = |dir: &std::path::Path| -> std::collections::BTreeSet<String> {
        fs::read_dir(dir.join("nar"))
            .expect("nar/")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    let push = |cache: &std::path::Path, jobs: &str| {
        let url = format!("file://{}", cache.display());
        push_cmd(&env, &url, &key, &top)
            .args(["--jobs", jobs])
            .spawn()
            .expect("start push")
    };
    let one = env.path().join("one");
    let four = env.path().join("four");
    for (dir, jobs) in [(&one, "1"), (&four, "4")] {
        let status = push(dir, jobs).wait().expect("wait for push");
        assert!(status.success());
    }
    assert_eq!(nar_names(&one), nar_names(&four));
    assert_eq!(nar_names(&one).len(), closure.len());

    // Three pushes at once into one cache.
    let shared = env.path().join("shared");
    let racing: Vec<_> = ["1", "2", "4"].iter().map(|j| push(&shared, j)).collect();
    for mut p in racing {
        assert!(p.wait().expect("wait for push").success());
    }
    assert_eq!(nar_names(&shared), nar_names(&one));
    CacheDir::new(&shared).assert_complete();
}
