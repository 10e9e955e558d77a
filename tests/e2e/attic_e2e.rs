//! The Attic target end to end: the real Nix builds, narpost pushes through the Attic API to
//! the test server in `attic_server/` (which checks what a real Attic server checks), and a
//! fresh Nix store substitutes from what the server stored.

use crate::attic_server;
use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use attic_server::{AtticServer, CacheSpec, Form, PULL, PUSH, Upload};
use common::*;
use narpost::format::hash::Sha256;
use narpost::format::signing::PublicKey;
use narpost::format::store_path::StorePath;

/// What `nix path-info --json` says about a path.
struct NixInfo {
    nar_hash: Sha256,
    nar_size: u64,
    references: BTreeSet<String>,
    deriver: Option<String>,
    ca: Option<String>,
}

fn nix_path_info(paths: &[StorePath]) -> BTreeMap<StorePath, NixInfo> {
    let mut cmd = nix("nix");
    cmd.args(["path-info", "--json"]);
    for p in paths {
        cmd.arg(p.to_absolute());
    }
    let out = run(&mut cmd);
    // Nix before 2.19 prints a list of objects with a `path` field, later ones an object
    // keyed by store path.
    let rows: Vec<(String, serde_json::Value)> =
        match serde_json::from_slice(&out.stdout).expect("nix path-info --json prints JSON") {
            serde_json::Value::Array(list) => list
                .into_iter()
                .map(|v| (v["path"].as_str().expect("path").to_owned(), v))
                .collect(),
            serde_json::Value::Object(by_path) => by_path.into_iter().collect(),
            other => panic!("nix path-info --json printed neither a list nor an object: {other}"),
        };
    rows.into_iter()
        .map(|(path, v)| {
            let path = StorePath::from_absolute(&path).expect("path");
            let base = |s: &str| {
                StorePath::from_absolute(s)
                    .expect("a store path")
                    .base()
                    .to_string()
            };
            let info = NixInfo {
                nar_hash: Sha256::parse(v["narHash"].as_str().expect("narHash")).expect("hash"),
                nar_size: v["narSize"].as_u64().expect("narSize"),
                references: v["references"]
                    .as_array()
                    .expect("references")
                    .iter()
                    .map(|r| base(r.as_str().expect("a reference")))
                    .collect(),
                deriver: v["deriver"].as_str().map(base),
                ca: v["ca"].as_str().map(str::to_string),
            };
            (path, info)
        })
        .collect()
}

/// Nix's signature fingerprint, computed from Nix's own view of the path.
fn fingerprint(path: &StorePath, info: &NixInfo) -> String {
    let refs: Vec<String> = info
        .references
        .iter()
        .map(|r| format!("/nix/store/{r}"))
        .collect();
    format!(
        "1;{};{};{};{}",
        path.to_absolute(),
        info.nar_hash.to_nix_string(),
        info.nar_size,
        refs.join(",")
    )
}

fn write_secret(env: &Env, name: &str, text: &str) -> PathBuf {
    let file = env.path().join(name);
    fs::write(&file, text).expect("write a secret file");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    file
}

/// A path whose upload metadata is over 4 KiB: it refers to `top` and to 24 leaves with
/// long names, so the client must send the metadata as a body preamble.
fn build_wide(env: &Env, top: &StorePath) -> StorePath {
    let padding = "x".repeat(160);
    let expr = format!(
        r#"{prelude}let
  leaves = builtins.genList (i: mk "narpost-wide-leaf-${{toString i}}-{padding}" "echo ${{toString i}} > $out") 24;
in mk "narpost-wide" ''
  mkdir -p $out && echo ${{builtins.concatStringsSep " " (map toString leaves)}} ${{builtins.storePath "{top}"}} > $out/refs
''
"#,
        prelude = nix_prelude(&nonce()),
        top = top.to_absolute(),
    );
    let file = env.write_nix("wide.nix", &expr);
    let outs = nix_build(&file, &[], &["--max-jobs", "8"]);
    assert_eq!(outs.len(), 1, "{outs:?}");
    outs[0].clone()
}

/// Every upload's references (other than itself) were uploaded before it or were already
/// in the cache (`present`). Returns the problems.
fn order_problems(uploads: &[Upload], present: &BTreeSet<String>) -> Vec<String> {
    let mut seen: BTreeSet<String> = present.clone();
    let mut problems = Vec::new();
    for upload in uploads {
        let own = StorePath::from_absolute(&upload.info.store_path)
            .expect("a store path")
            .base()
            .to_string();
        for reference in &upload.info.references {
            if *reference != own && !seen.contains(reference) {
                problems.push(format!(
                    "{own} was uploaded before its reference {reference}"
                ));
            }
        }
        seen.insert(own);
    }
    problems
}

fn uploaded_paths(uploads: &[Upload]) -> Vec<StorePath> {
    uploads
        .iter()
        .map(|u| StorePath::from_absolute(&u.info.store_path).expect("a store path"))
        .collect()
}

#[test]
fn closure_is_uploaded_in_reference_order_with_the_metadata_nix_has() {
    let env = Env::new();
    let server = AtticServer::start(
        vec![CacheSpec::new("main")],
        &[("push-token", &[("main", PUSH)])],
    );
    let (top, outs) = build_rich_closure(&env);
    let wide = build_wide(&env, &top);
    let (key, public) = env.keygen("client-1");
    let token = write_secret(&env, "token", "push-token\n");
    let push = |path: &StorePath| {
        pushed(
            push_cmd(&env, &server.url("main"), &key, path)
                .arg("--token-file")
                .arg(&token),
        )
    };

    // What the cache has already is not uploaded again: `base` goes first, alone.
    let base = outs[3].clone();
    push(&base);
    assert_eq!(uploaded_paths(&server.uploads()), vec![base.clone()]);

    let text = push(&wide);
    let uploads = server.uploads();
    let closure = nix_closure(std::slice::from_ref(&wide));
    let got: Vec<StorePath> = uploaded_paths(&uploads);
    let unique: BTreeSet<StorePath> = got.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        got.len(),
        "a path was uploaded twice: {got:?}"
    );
    assert_eq!(
        unique,
        closure,
        "{text}\nrejected: {:?}",
        server.rejections()
    );
    assert!(
        server.rejections().is_empty(),
        "the server refused requests: {:?}",
        server.rejections()
    );
    let problems = order_problems(&uploads, &BTreeSet::new());
    assert!(
        problems.is_empty(),
        "upload order:\n{}",
        problems.join("\n")
    );
    assert!(
        server.count("/_api/v1/get-missing-paths", 200) >= 2,
        "{:?}",
        server.log()
    );

    // The metadata is what Nix itself records, and narpost's signature is over it.
    let nix_info = nix_path_info(&closure.iter().cloned().collect::<Vec<_>>());
    let client_key = PublicKey::parse(&public).expect("public key");
    for upload in &uploads {
        let u = &upload.info;
        let path = StorePath::from_absolute(&u.store_path).expect("store path");
        let want = &nix_info[&path];
        assert_eq!(u.cache, "main");
        assert_eq!(u.store_path_hash, path.hash_part());
        assert_eq!(u.nar_hash, want.nar_hash, "{path}");
        assert_eq!(u.nar_size, want.nar_size, "{path}");
        let refs: BTreeSet<String> = u.references.iter().cloned().collect();
        assert_eq!(refs, want.references, "{path}");
        assert_eq!(
            refs.len(),
            u.references.len(),
            "{path}: duplicate references"
        );
        assert_eq!(u.deriver, want.deriver, "{path}");
        assert!(want.deriver.is_some(), "{path}: built paths have a deriver");
        assert_eq!(u.ca, want.ca, "{path}");
        assert_eq!(u.system, None, "{path}");
        let fp = fingerprint(&path, want);
        assert!(
            u.sigs.iter().any(|s| client_key.verify(fp.as_bytes(), s)),
            "{path}: no valid client-1 signature in {:?}",
            u.sigs
        );
        assert_eq!(
            upload.content_encoding, None,
            "the NAR goes up uncompressed"
        );
        let big = upload.json.len() >= 4096;
        assert_eq!(
            upload.form,
            if big { Form::Preamble } else { Form::Header },
            "{path}: {} bytes of metadata",
            upload.json.len()
        );
    }
    let wide_upload = uploads
        .iter()
        .find(|u| u.info.store_path == wide.to_absolute())
        .expect("wide was uploaded");
    assert_eq!(
        wide_upload.form,
        Form::Preamble,
        "{} bytes",
        wide_upload.json.len()
    );

    // A fresh store substitutes everything, trusting only narpost's key; and, as from a
    // real Attic, trusting only the cache's own key.
    let mut all = outs.clone();
    all.push(wide.clone());
    assert_substitutes(&env, &server.substituter("main"), &public, &all);
    assert_substitutes(
        &env,
        &server.substituter("main"),
        &server.public_key("main"),
        std::slice::from_ref(&wide),
    );

    // Nothing new: nothing uploaded, and it says so.
    let before = server.uploads().len();
    let text = push(&wide);
    assert!(text.contains("already cached"), "{text}");
    assert_eq!(server.uploads().len(), before);
}

#[test]
fn bad_token_missing_permission_and_missing_cache_are_one_clear_line_each() {
    let env = Env::new();
    let server = AtticServer::start(
        vec![CacheSpec::new("secret").private(), CacheSpec::new("open")],
        &[
            ("good", &[("secret", PUSH)]),
            ("reader", &[("open", PULL)]),
            ("admin", &[("*", PUSH)]),
        ],
    );
    let (top, _) = build_rich_closure(&env);
    let (key, _) = env.keygen("client-2");
    let fail = |cache: &str, token: &str| {
        let file = write_secret(&env, &format!("token-{token}"), token);
        let out = push_cmd(&env, &server.url(cache), &key, &top)
            .arg("--token-file")
            .arg(&file)
            .output()
            .expect("run narpost");
        assert!(
            !out.status.success(),
            "push to {cache} with {token} succeeded"
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("hint:"))
            .collect();
        assert_eq!(lines.len(), 1, "one line, then a hint:\n{err}");
        assert!(err.contains("\nhint: "), "{err}");
        err
    };

    let err = fail("secret", "not-a-token");
    assert!(err.contains("bad or expired token"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{}", server.port)), "{err}");
    assert!(
        !err.contains("not-a-token"),
        "the token is never printed: {err}"
    );

    let err = fail("open", "reader");
    assert!(err.contains("no push permission on cache open"), "{err}");

    let err = fail("nope", "admin");
    assert!(err.contains("no such cache nope"), "{err}");

    assert!(server.uploads().is_empty());
    assert_eq!(server.count("/_api/v1/upload-path", 200), 0);
}

#[test]
fn service_unavailable_is_retried_until_the_upload_goes_through() {
    let env = Env::new();
    let server = AtticServer::start(vec![CacheSpec::new("main")], &[("t", &[("main", PUSH)])]);
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("client-3");
    let token = write_secret(&env, "token", "t");
    server.fail_next("get-missing-paths", 1);
    server.fail_next("upload-path", 3);

    let text = pushed(
        push_cmd(&env, &server.url("main"), &key, &top)
            .arg("--token-file")
            .arg(&token),
    );
    assert_eq!(server.count("/_api/v1/get-missing-paths", 503), 1, "{text}");
    assert_eq!(server.count("/_api/v1/upload-path", 503), 3, "{text}");
    let closure = nix_closure(std::slice::from_ref(&top));
    let got: BTreeSet<StorePath> = uploaded_paths(&server.uploads()).into_iter().collect();
    assert_eq!(got, closure, "{text}");
    assert!(order_problems(&server.uploads(), &BTreeSet::new()).is_empty());
    assert_substitutes(&env, &server.substituter("main"), &public, &outs);
}

#[test]
fn a_hung_upload_times_out_and_is_retried() {
    let env = Env::new();
    let server = AtticServer::start(vec![CacheSpec::new("main")], &[("t", &[("main", PUSH)])]);
    let (top, _) = build_rich_closure(&env);
    let (key, _) = env.keygen("client-5");
    let token = write_secret(&env, "token", "t");
    server.stall_next_uploads(1);

    let text = pushed(
        push_cmd(&env, &server.url("main"), &key, &top)
            .env("NARPOST_HTTP_TIMEOUT", "1")
            .arg("--token-file")
            .arg(&token),
    );
    assert!(text.contains("timed out while uploading"), "{text}");
    let got: BTreeSet<StorePath> = uploaded_paths(&server.uploads()).into_iter().collect();
    assert_eq!(got, nix_closure(&[top]), "{text}");
}

#[test]
fn paths_signed_by_an_upstream_key_are_skipped_and_api_endpoint_is_honoured() {
    let env = Env::new();
    let server = AtticServer::start_with_api_prefix(
        vec![CacheSpec::new("main").upstream(&["upstream-1"])],
        &[("t", &[("main", PUSH)])],
        "/api",
    );
    let (top, outs) = build_rich_closure(&env);
    let base = outs[3].clone();
    // `base` came from upstream: it carries the upstream cache's signature.
    let (upstream_key, _) = env.keygen("upstream-1");
    run(nix("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&upstream_key)
        .arg(base.to_absolute()));
    // `right` is signed by a key only narpost's own `upstream-keys` names: both lists apply.
    let right = outs[2].clone();
    let (ours_key, _) = env.keygen("ours-upstream-1");
    run(nix("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&ours_key)
        .arg(right.to_absolute()));
    let config = env.path().join("narpost.toml");
    fs::write(&config, "upstream-keys = [\"ours-upstream-1\"]\n").expect("write config");
    let (key, _) = env.keygen("client-4");
    let token = write_secret(&env, "token", "t");

    let text = pushed(
        push_cmd(&env, &server.url("main"), &key, &top)
            .arg("--token-file")
            .arg(&token)
            .arg("--config")
            .arg(&config),
    );
    assert!(text.contains("1 left to upstream"), "{text}");
    let got: BTreeSet<StorePath> = uploaded_paths(&server.uploads()).into_iter().collect();
    let want: BTreeSet<StorePath> = nix_closure(std::slice::from_ref(&top))
        .into_iter()
        .filter(|p| *p != base && *p != right)
        .collect();
    assert_eq!(got, want, "{text}");
    let present: BTreeSet<String> = [base.base().to_string(), right.base().to_string()].into();
    assert!(order_problems(&server.uploads(), &present).is_empty());
    // Every API call after cache-config went where cache-config said.
    for l in server.log() {
        if l.path.contains("get-missing-paths") || l.path.contains("upload-path") {
            assert!(l.path.starts_with("/api/_api/v1/"), "{l:?}");
            assert_eq!(l.status, 200, "{l:?}");
        }
    }
}

/// A config file naming the Attic cache, the token file and the key: nothing on the
/// command line.
fn attic_config(env: &Env, server: &AtticServer, token: &str) -> (PathBuf, String) {
    let token = write_secret(env, "token", token);
    let (key, public) = env.keygen("client-conf-1");
    let config = env.path().join("narpost.toml");
    fs::write(
        &config,
        format!(
            "cache = \"{}\"\ntoken-file = \"{}\"\nsecret-key-file = \"{}\"\n",
            server.url("main"),
            token.display(),
            key.display()
        ),
    )
    .expect("write the config file");
    (config, public)
}

#[test]
fn push_through_the_config_file_alone() {
    let env = Env::new();
    let server = AtticServer::start(vec![CacheSpec::new("main")], &[("conf", &[("main", PUSH)])]);
    let (config, public) = attic_config(&env, &server, "conf");
    let (top, outs) = build_rich_closure(&env);
    run(env
        .narpost()
        .arg("--config")
        .arg(&config)
        .arg("push")
        .arg(top.to_absolute()));
    assert_eq!(server.objects("main").len(), nix_closure(&[top]).len());
    assert_substitutes(&env, &server.substituter("main"), &public, &outs);
}

#[test]
fn daemon_drains_the_hook_queue_through_the_config_file_alone() {
    let env = Env::new();
    let server = AtticServer::start(vec![CacheSpec::new("main")], &[("conf", &[("main", PUSH)])]);
    let (config, public) = attic_config(&env, &server, "conf");
    let (top, outs) = build_rich_closure(&env);
    hook_with_config(&env, &config, &outs);

    let mut daemon = spawn_with_config(&env, &mut env.narpost(), &config, "daemon");
    let closure = nix_closure(&[top]);
    wait_until(
        "the daemon to upload the closure",
        Duration::from_secs(60),
        || {
            daemon.assert_running();
            server.objects("main").len() == closure.len() && queue_depth(&env, &config) == 0
        },
    );
    let (status, log) = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}: {log}");
    assert_substitutes(&env, &server.substituter("main"), &public, &outs);
}

#[test]
fn watch_store_pushes_new_builds_through_the_config_file_alone() {
    let env = Env::new();
    let server = AtticServer::start(vec![CacheSpec::new("main")], &[("conf", &[("main", PUSH)])]);
    let (config, public) = attic_config(&env, &server, "conf");
    // Other tests build in the same store meanwhile, and the watcher pushes their paths
    // too; a short drain timeout keeps SIGTERM from waiting for those.
    append_to_config(&config, "drain-timeout = 5\n");
    let mut watcher = spawn_with_config(&env, &mut env.narpost(), &config, "watch-store");
    watcher.wait_for_output("narpost: watching", Duration::from_secs(30));

    let (top, outs) = build_rich_closure(&env);
    wait_until(
        "watch-store to upload the new build",
        Duration::from_secs(60),
        || {
            watcher.assert_running();
            let objects = server.objects("main");
            outs.iter().all(|p| objects.contains_key(p.hash_part()))
        },
    );
    let (status, log) = watcher.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status}: {log}");
    assert_substitutes(&env, &server.substituter("main"), &public, &[top]);
}

/// One HTTP/1.1 request over a plain socket; returns the status and the body.
fn raw_request(port: u16, head: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let request = format!(
        "{head}\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    stream.write_all(body).expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The test server is only worth something if it refuses what Attic refuses.
#[test]
fn the_test_server_refuses_what_attic_refuses() {
    let server = AtticServer::start(
        vec![CacheSpec::new("main").private()],
        &[("t", &[("main", PUSH)])],
    );
    let nar = b"not really a NAR, but bytes with a hash".to_vec();
    let hash = Sha256::digest(&nar);
    let meta = |nar_hash: &str, nar_size: &str| {
        format!(
            r#"{{"cache":"main","store_path_hash":"{h}","store_path":"/nix/store/{h}-x","references":[],"system":null,"deriver":null,"sigs":[],"ca":null,"nar_hash":"{nar_hash}","nar_size":{nar_size}}}"#,
            h = "0123456789abcdfghijklmnpqrsvwxyz"
        )
    };
    let good = meta(&format!("sha256:{}", hash.to_hex()), &nar.len().to_string());
    let put = |headers: &str, body: &[u8]| {
        raw_request(
            server.port,
            &format!("PUT /_api/v1/upload-path HTTP/1.1\r\n{headers}"),
            body,
        )
    };
    let auth = "Authorization: bearer t";

    let (status, body) = put(&format!("X-Attic-Nar-Info: {good}"), &nar);
    assert_eq!(status, 401, "no token: {body}");
    assert!(body.contains(r#""error":"Unauthorized""#), "{body}");
    let (status, _) = put(
        &format!("Authorization: bearer wrong\r\nX-Attic-Nar-Info: {good}"),
        &nar,
    );
    assert_eq!(status, 401);
    let (status, body) = put(auth, &nar);
    assert_eq!(status, 400, "no metadata: {body}");
    let (status, body) = put(&format!("{auth}\r\nX-Attic-Nar-Info: {good}"), &nar[1..]);
    assert_eq!(status, 400, "short body: {body}");
    assert!(body.contains("Bad NAR Hash or Size"), "{body}");
    let other = meta(
        &format!("sha256:{}", Sha256::digest(b"x").to_hex()),
        &nar.len().to_string(),
    );
    let (status, body) = put(&format!("{auth}\r\nX-Attic-Nar-Info: {other}"), &nar);
    assert_eq!(status, 400, "wrong hash: {body}");
    let typed = meta(
        &format!("sha256:{}", hash.to_hex()),
        &format!("\"{}\"", nar.len()),
    );
    let (status, body) = put(&format!("{auth}\r\nX-Attic-Nar-Info: {typed}"), &nar);
    assert_eq!(status, 400, "nar_size as a string: {body}");
    let b64 = meta(
        &format!("sha256-{}", "A".repeat(43)),
        &nar.len().to_string(),
    );
    let (status, _) = put(&format!("{auth}\r\nX-Attic-Nar-Info: {b64}"), &nar);
    assert_eq!(status, 400, "SRI hash");
    let missing = good.replace(r#""sigs":[],"#, "");
    let (status, body) = put(&format!("{auth}\r\nX-Attic-Nar-Info: {missing}"), &nar);
    assert_eq!(status, 400, "no sigs field: {body}");
    let mut body = good.clone().into_bytes();
    body.extend_from_slice(&nar);
    let (status, answer) = put(
        &format!(
            "{auth}\r\nX-Attic-Nar-Info-Preamble-Size: {}",
            good.len() + 1
        ),
        &body,
    );
    assert_eq!(status, 400, "preamble size off by one: {answer}");
    assert!(server.uploads().is_empty(), "{:?}", server.uploads());

    // And it takes a correct upload, in either form.
    let (status, answer) = put(&format!("{auth}\r\nX-Attic-Nar-Info: {good}"), &nar);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""kind":"Uploaded""#), "{answer}");
    let (status, answer) = put(
        &format!("{auth}\r\nX-Attic-Nar-Info-Preamble-Size: {}", good.len()),
        &body,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""kind":"Deduplicated""#), "{answer}");
    let forms: Vec<Form> = server.uploads().iter().map(|u| u.form).collect();
    assert_eq!(forms, vec![Form::Header, Form::Preamble]);
}

/// `narpost check` reads an Attic cache back through the binary cache it serves: a pushed
/// closure is sound, a path never pushed is named, and without paths it says the cache
/// cannot be listed.
#[test]
fn check_reads_the_served_cache_back() {
    let env = Env::new();
    let server = AtticServer::start(vec![CacheSpec::new("main")], &[("conf", &[("main", PUSH)])]);
    let (config, _) = attic_config(&env, &server, "conf");
    let (top, _) = build_rich_closure(&env);
    let narpost = |args: &[&str]| {
        env.narpost()
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("run narpost")
    };
    let top_abs = top.to_absolute();
    assert!(narpost(&["push", &top_abs]).status.success());
    let sound = narpost(&["check", &top_abs]);
    assert!(
        sound.status.success(),
        "{}\n{}",
        stdout(&sound),
        stderr(&sound)
    );
    assert!(stderr(&sound).contains("all sound"), "{}", stderr(&sound));

    let expr = format!(
        "{}mk \"narpost-attic-unpushed\" \"echo x > $out\"\n",
        nix_prelude(&nonce())
    );
    let unpushed = nix_build(&env.write_nix("unpushed.nix", &expr), &[], &[]).remove(0);
    let missing = narpost(&["check", &unpushed.to_absolute()]);
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    assert!(
        stdout(&missing).contains(&format!("{}: not in the cache", unpushed.to_absolute())),
        "{}",
        stdout(&missing)
    );
    let unlisted = narpost(&["check"]);
    assert_eq!(unlisted.status.code(), Some(2), "{}", stderr(&unlisted));
    assert!(
        stderr(&unlisted).contains("cannot be listed"),
        "{}",
        stderr(&unlisted)
    );
}
