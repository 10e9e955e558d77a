//! `narpost check` against real caches (a file:// directory, nginx with WebDAV, s3s-fs)
//! broken the ways caches break: a NAR gone, a reference's narinfo gone, a signature that no
//! longer verifies, a NAR whose bytes changed. `check` names each, one line, and exits 1;
//! `--repair` pushes again from the local store, after which a fresh Nix substitutes the
//! whole closure with signatures required.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::s3::*;
use common::*;
use narpost::format::store_path::StorePath;

/// The rich closure pushed into `url`, then broken in the cache directory `root`: the NAR
/// of `right` deleted, the narinfo of `base` (which `left` and `right` refer to) deleted,
/// and the signature of `top` changed. Returns every output and the key's public line.
fn pushed_then_broken(
    env: &Env,
    url: &str,
    root: &Path,
    configure: impl Fn(&mut Command),
) -> (Vec<StorePath>, String, std::path::PathBuf) {
    let (key, public) = env.keygen("check-1");
    let (top, outs) = build_rich_closure(env);
    let mut push = push_cmd(env, url, &key, &top);
    configure(&mut push);
    run(&mut push);
    let cache = CacheDir::new(root);
    cache.assert_complete();
    let infos = cache.narinfos();
    let [top, left, right, base] = [&outs[0], &outs[1], &outs[2], &outs[3]];
    assert!(infos[left].references.contains(base) && infos[right].references.contains(base));
    fs::remove_file(root.join(&infos[right].url)).expect("delete a NAR");
    fs::remove_file(root.join(format!("{}.narinfo", base.hash_part()))).expect("delete a narinfo");
    let top_file = root.join(format!("{}.narinfo", top.hash_part()));
    let text = fs::read_to_string(&top_file).expect("read narinfo");
    let (head, sig) = text.split_once("Sig: ").expect("a signature");
    let (name, b64) = sig.split_once(':').expect("name:sig");
    // Another valid-looking signature by the same key name, for a different message.
    let flipped: String = b64
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 3 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    fs::write(&top_file, format!("{head}Sig: {name}:{flipped}")).expect("rewrite narinfo");
    (outs, public, key)
}

fn check(
    env: &Env,
    url: &str,
    key: &Path,
    args: &[&str],
    configure: impl Fn(&mut Command),
) -> Output {
    let mut cmd = env.narpost();
    cmd.args(["check", "--to", url, "--key"])
        .arg(key)
        .args(args);
    configure(&mut cmd);
    cmd.output().expect("run narpost check")
}

/// The problems `check` must report for [`pushed_then_broken`], one line each.
fn assert_finds_the_breakage(out: &Output, outs: &[StorePath], listed: bool) {
    let text = stdout(out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(out));
    let [top, left, right, base] = [&outs[0], &outs[1], &outs[2], &outs[3]];
    let mut want = vec![
        (top, "signature by check-1 does not verify".to_string()),
        (right, "its NAR nar/".to_string()),
        (
            right,
            format!("its reference {} has no narinfo", base.to_absolute()),
        ),
        (
            left,
            format!("its reference {} has no narinfo", base.to_absolute()),
        ),
    ];
    if !listed {
        want.push((base, "not in the cache (no narinfo)".to_string()));
    }
    for (path, what) in &want {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&path.to_absolute()) && l.contains(what.as_str())),
            "{path}: {what:?} in:\n{text}"
        );
    }
    assert_eq!(text.lines().count(), want.len(), "one line each:\n{text}");
}

fn repaired(
    env: &Env,
    url: &str,
    key: &Path,
    public: &str,
    outs: &[StorePath],
    sub: &str,
    configure: impl Fn(&mut Command),
) {
    let out = check(env, url, key, &["--repair"], &configure);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("repaired"), "{}", stderr(&out));
    let again = check(env, url, key, &[], &configure);
    assert!(
        again.status.success(),
        "{}\n{}",
        stdout(&again),
        stderr(&again)
    );
    assert!(stderr(&again).contains("all sound"), "{}", stderr(&again));
    assert_substitutes(env, sub, public, outs);
}

#[test]
fn check_finds_what_a_file_cache_lost_and_repair_makes_it_substitute_again() {
    let env = Env::new();
    let root = env.path().join("cache");
    let url = format!("file://{}", root.display());
    let (outs, public, key) = pushed_then_broken(&env, &url, &root, |_| {});
    assert_finds_the_breakage(&check(&env, &url, &key, &[], |_| {}), &outs, true);
    let top = outs[0].to_absolute();
    assert_finds_the_breakage(&check(&env, &url, &key, &[&top], |_| {}), &outs, false);
    repaired(&env, &url, &key, &public, &outs, &url, |_| {});
}

#[test]
fn check_lists_an_nginx_cache_over_webdav_and_repair_fixes_it() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (outs, public, key) = pushed_then_broken(&env, &nginx.url(), &nginx.root, |_| {});
    assert_finds_the_breakage(&check(&env, &nginx.url(), &key, &[], |_| {}), &outs, true);
    repaired(
        &env,
        &nginx.url(),
        &key,
        &public,
        &outs,
        &nginx.url(),
        |_| {},
    );
}

#[test]
fn check_lists_an_s3_bucket_and_repair_fixes_it() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let aws = |cmd: &mut Command| {
        aws_env(cmd, &env, ACCESS_KEY, SECRET_KEY);
    };
    let (outs, public, key) = pushed_then_broken(&env, &server.url(), &server.bucket_dir(), aws);
    assert_finds_the_breakage(&check(&env, &server.url(), &key, &[], aws), &outs, true);
    repaired(
        &env,
        &server.url(),
        &key,
        &public,
        &outs,
        &server.file_url(),
        aws,
    );
}

#[test]
fn only_a_deep_check_sees_a_nar_whose_bytes_changed_and_repair_writes_it_anew() {
    let env = Env::new();
    let root = env.path().join("cache");
    let url = format!("file://{}", root.display());
    let (key, public) = env.keygen("check-1");
    let (top, outs) = build_rich_closure(&env);
    run(&mut push_cmd(&env, &url, &key, &top));
    let cache = CacheDir::new(&root);
    let nar = root.join(&cache.narinfos()[&outs[3]].url);
    let mut bytes = fs::read(&nar).expect("read a NAR");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&nar, &bytes).expect("change a NAR in place");

    let shallow = check(&env, &url, &key, &[], |_| {});
    assert!(shallow.status.success(), "{}", stdout(&shallow));
    let deep = check(&env, &url, &key, &["--deep"], |_| {});
    assert_eq!(deep.status.code(), Some(1), "{}", stderr(&deep));
    let text = stdout(&deep);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with(&outs[3].to_absolute()) && text.contains("does not match its FileHash"),
        "{text}"
    );
    let fixed = check(&env, &url, &key, &["--deep", "--repair"], |_| {});
    assert!(
        fixed.status.success(),
        "{}\n{}",
        stdout(&fixed),
        stderr(&fixed)
    );
    cache.assert_complete();
    assert_substitutes(&env, &url, &public, &outs);
}
