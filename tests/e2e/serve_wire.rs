//! The serve-protocol framing against the real Nix, byte for byte: what a real
//! `nix-store --serve --write` answers, and what a real `nix copy --to ssh://` sends.

use crate::common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use common::*;
use narpost::dump::dump_path;
use narpost::format::serve::{self, AddToStoreNar};
use narpost::format::store_path::StorePath;

/// Two paths, `b` referring to `a`, new to this store.
fn build_pair(env: &Env) -> (StorePath, StorePath) {
    let expr = format!(
        r#"{prelude}rec {{
  a = mk "narpost-serve-a" "mkdir -p $out/d && echo a > $out/d/f && ln -s d/f $out/l";
  b = mk "narpost-serve-b" "echo ${{a}} > $out";
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("pair.nix", &expr);
    let outs = nix_build(&file, &["a", "b"], &[]);
    (outs[0].clone(), outs[1].clone())
}

struct Meta {
    hash_hex: String,
    nar_size: u64,
    references: Vec<String>,
    deriver: String,
}

fn meta(path: &StorePath) -> Meta {
    let out = run(nix("nix").args(["path-info", "--json", &path.to_absolute()]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let v = &v[0];
    let hash = narpost::format::hash::Sha256::parse(v["narHash"].as_str().expect("narHash"))
        .expect("a hash");
    Meta {
        hash_hex: hash.to_hex(),
        nar_size: v["narSize"].as_u64().expect("narSize"),
        references: v["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(|r| r.as_str().expect("a path").to_string())
            .collect(),
        deriver: v["deriver"].as_str().unwrap_or("").to_string(),
    }
}

fn nar(path: &StorePath) -> Vec<u8> {
    dump_path(Path::new(&path.to_absolute()), Vec::new()).expect("serialize")
}

fn add_request(path: &StorePath, sigs: Vec<String>) -> AddToStoreNar {
    let m = meta(path);
    AddToStoreNar {
        path: path.to_absolute(),
        deriver: m.deriver,
        nar_hash_hex: m.hash_hex,
        references: m.references,
        registration_time: 0,
        nar_size: m.nar_size,
        ultimate: false,
        sigs,
        ca: String::new(),
    }
}

#[test]
fn a_real_nix_store_serve_answers_what_the_framing_reads_pipelined() {
    let env = Env::new();
    let (a, b) = build_pair(&env);
    let remote = env.path().join("remote");
    let mut child = nix("nix-store")
        .args(["--serve", "--write", "--store"])
        .arg(&remote)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nix-store --serve");

    // Everything in one go: greeting, a query, both imports (b after its reference a)
    // and a second query, without waiting for any answer.
    let mut sent = Vec::new();
    serve::write_hello(&mut sent).unwrap();
    let both = [a.to_absolute(), b.to_absolute()];
    serve::write_query_valid_paths(&mut sent, true, false, &both).unwrap();
    for p in [&a, &b] {
        serve::write_add_to_store_nar(&mut sent, &add_request(p, vec![])).unwrap();
        sent.extend(nar(p));
    }
    serve::write_query_valid_paths(&mut sent, false, false, &both).unwrap();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&sent).expect("send the requests");
    drop(stdin);
    let mut answer = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut answer)
        .expect("read the answers");
    let out = child.wait_with_output().expect("nix-store exits");
    assert!(out.status.success(), "{}", stderr(&out));

    // What narpost's writers make of the answers it expects is exactly what Nix sent.
    let mut expected = Vec::new();
    serve::write_u64(&mut expected, serve::SERVER_MAGIC).unwrap();
    serve::write_u64(&mut expected, 0x207).unwrap();
    serve::write_strings::<_, String>(&mut expected, &[]).unwrap();
    serve::write_u64(&mut expected, 1).unwrap();
    serve::write_u64(&mut expected, 1).unwrap();
    let mut sorted = both.to_vec();
    sorted.sort();
    serve::write_strings(&mut expected, &sorted).unwrap();
    assert_eq!(answer, expected);

    // And the readers read it.
    let mut r = answer.as_slice();
    assert_eq!(serve::read_hello(&mut r).unwrap(), 0x207);
    assert!(serve::read_strings(&mut r, 2, 1024).unwrap().is_empty());
    serve::read_add_to_store_nar_reply(&mut r).unwrap();
    serve::read_add_to_store_nar_reply(&mut r).unwrap();
    assert_eq!(serve::read_strings(&mut r, 2, 1024).unwrap(), sorted);
    assert!(r.is_empty());

    let valid = run(nix("nix-store")
        .arg("--store")
        .arg(&remote)
        .args(["--verify-path", &a.to_absolute()]));
    assert!(valid.status.success());
}

#[test]
fn requests_are_byte_for_byte_what_nix_copy_sends() {
    let env = Env::new();
    let (a, b) = build_pair(&env);
    // An `ssh` that runs the remote command here and keeps what the client sent.
    let bin = env.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let capture = env.path().join("client.bin");
    let shim = bin.join("ssh");
    fs::write(
        &shim,
        format!(
            "#!/bin/sh\nfor last; do :; done\ntee {} | sh -c \"$last\"\n",
            capture.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
    let remote = env.path().join("remote");
    let path_var = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(nix("nix")
        .env("PATH", path_var)
        .args(["copy", "--to"])
        .arg(format!("ssh://shim?remote-store={}", remote.display()))
        .arg(b.to_absolute()));

    let sent = fs::read(&capture).expect("the captured requests");
    let mut r = sent.as_slice();
    let mut hello = Vec::new();
    serve::write_hello(&mut hello).unwrap();
    assert_eq!(&sent[..16], hello.as_slice(), "greeting");
    r = &r[16..];

    // The query: narpost's encoding of the same paths is the same bytes.
    let before = r;
    assert_eq!(
        serve::read_u64(&mut r).unwrap(),
        serve::CMD_QUERY_VALID_PATHS
    );
    let lock = serve::read_u64(&mut r).unwrap() != 0;
    let substitute = serve::read_u64(&mut r).unwrap() != 0;
    let paths = serve::read_strings(&mut r, 10, 1024).unwrap();
    let mut ours = Vec::new();
    serve::write_query_valid_paths(&mut ours, lock, substitute, &paths).unwrap();
    assert_eq!(&before[..before.len() - r.len()], ours.as_slice());
    let mut want = vec![a.to_absolute(), b.to_absolute()];
    want.sort();
    let mut got = paths.clone();
    got.sort();
    assert_eq!(got, want);

    // Each import: the same header bytes from narpost's writer, then the NAR narpost makes.
    for p in [&a, &b] {
        let before = r;
        assert_eq!(
            serve::read_u64(&mut r).unwrap(),
            serve::CMD_ADD_TO_STORE_NAR
        );
        let req = serve::read_add_to_store_nar(&mut r, 1 << 16).unwrap();
        let mut ours = Vec::new();
        serve::write_add_to_store_nar(&mut ours, &req).unwrap();
        assert_eq!(&before[..before.len() - r.len()], ours.as_slice());
        let expected = add_request(p, vec![]);
        assert_eq!(
            AddToStoreNar {
                registration_time: 0,
                ultimate: false,
                ..req.clone()
            },
            expected,
            "{p}"
        );
        let body = nar(p);
        assert_eq!(&r[..body.len()], body.as_slice(), "{p}: the NAR");
        r = &r[body.len()..];
    }
    assert!(r.is_empty(), "{} bytes more than expected", r.len());
}
