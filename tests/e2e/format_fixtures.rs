//! The format code checked against real Nix 2.8: committed fixtures made by Nix (see
//! `tests/fixtures/format/README.md`) and live runs of `nix-store`, `nix-build` and
//! `nix copy`. Nix must be installed; every test that needs it panics when it is not.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures::StreamExt as _;
use narpost::dump::{NarSource, dump_path};
use narpost::format::drv::parse_outputs;
use narpost::format::hash::{HashingWriter, Sha256};
use narpost::format::narinfo::NarInfo;
use narpost::format::nixbase32;
use narpost::format::signing::{PublicKey, SigningKey};
use narpost::format::store_path::StorePath;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/format")
        .join(rel)
}

fn read_fixture(rel: &str) -> String {
    fs::read_to_string(fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// A Nix command with a private configuration: no substituters (no network here) and the
/// `nix` command enabled.
fn nix(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env(
        "NIX_CONFIG",
        "experimental-features = nix-command\nsubstituters =\n",
    );
    cmd
}

/// Runs `cmd`, panicking with its stderr unless it succeeds; returns stdout.
fn run(cmd: &mut Command) -> Vec<u8> {
    let out = match cmd.stderr(Stdio::piped()).stdout(Stdio::piped()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "{:?} is not installed; these tests compare against real Nix 2.8 (apt-get install nix-bin)",
            cmd.get_program()
        ),
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run_text(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd)).unwrap().trim().to_owned()
}

fn live_nix_dump(path: &Path) -> Vec<u8> {
    run(nix("nix-store").arg("--dump").arg(path))
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The same trees `tests/fixtures/format/make_trees.py` makes.
fn make_trees(root: &Path) {
    let t = root.join("tree");
    fs::create_dir_all(t.join("a/nested")).unwrap();
    fs::create_dir_all(t.join("empty-dir")).unwrap();
    write(
        &t.join("B"),
        b"upper-case B sorts before _ and a as bytes\n",
        0o644,
    );
    write(&t.join("_"), b"underscore\n", 0o644);
    write(&t.join("a/nested/deep"), b"deep\n", 0o644);
    write(
        &t.join("ä"),
        b"a-umlaut sorts after every ASCII name\n",
        0o644,
    );
    write(&t.join("empty-file"), b"", 0o644);
    write(&t.join("eight"), b"12345678", 0o644);
    write(&t.join("nine"), b"123456789", 0o644);
    write(&t.join("exec"), b"#!/bin/sh\necho hi\n", 0o755);
    write(&t.join("group-exec"), b"not executable in a NAR\n", 0o655);
    symlink("a/nested/deep", t.join("link-rel")).unwrap();
    symlink("a/nested", t.join("link-dir")).unwrap();
    symlink(
        "/nix/store/00000000000000000000000000000000-absent",
        t.join("link-abs"),
    )
    .unwrap();

    write(&root.join("file"), b"hello\n", 0o644);
    write(&root.join("exec-file"), b"#!/bin/sh\nexit 0\n", 0o755);
    symlink("../some/target", root.join("symlink")).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();

    let b = root.join("big");
    fs::create_dir(&b).unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 3)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    write(&b.join("big"), &big, 0o644);
    write(&b.join("small"), b"small\n", 0o644);
}

const SMALL_TREES: &[&str] = &["tree", "file", "exec-file", "symlink", "empty-dir"];

#[test]
fn nar_of_small_trees_matches_fixture_and_live_nix() {
    let dir = tempfile::tempdir().unwrap();
    make_trees(dir.path());
    for name in SMALL_TREES {
        let path = dir.path().join(name);
        let ours = dump_path(&path, Vec::new()).unwrap();
        let committed = fs::read(fixture(&format!("nar/{name}.nar"))).unwrap();
        assert!(
            ours == committed,
            "{name}: dump_path differs from the committed NAR ({} vs {} bytes)",
            ours.len(),
            committed.len()
        );
        assert!(
            ours == live_nix_dump(&path),
            "{name}: dump_path differs from a live `nix-store --dump`"
        );
    }
}

#[test]
fn tree_fixture_orders_names_by_bytes() {
    // Guard the fixture itself: the entry names appear in byte order "B" < "_" < "a" < "ä".
    let nar = fs::read(fixture("nar/tree.nar")).unwrap();
    let pos = |name: &[u8]| {
        let mut token = (name.len() as u64).to_le_bytes().to_vec();
        token.extend_from_slice(name);
        nar.windows(token.len())
            .position(|w| w == token.as_slice())
            .unwrap_or_else(|| panic!("{:?} not in tree.nar", String::from_utf8_lossy(name)))
    };
    let order = [pos(b"B"), pos(b"_"), pos(b"a"), pos("ä".as_bytes())];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
}

#[test]
fn nar_of_big_tree_matches_recorded_hash_and_live_nix() {
    let dir = tempfile::tempdir().unwrap();
    make_trees(dir.path());
    let path = dir.path().join("big");
    let (_, hash, size) = dump_path(&path, HashingWriter::new(io::sink()))
        .unwrap()
        .finish();

    let recorded = read_fixture("nar/big.nar.hash");
    let field = |key: &str| {
        recorded
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("big.nar.hash lacks {key}"))
            .to_owned()
    };
    assert_eq!(hash, Sha256::parse(&field("NarHash: ")).unwrap());
    assert_eq!(size, field("NarSize: ").parse::<u64>().unwrap());
    assert!(size > 3 * 1024 * 1024);

    let live = live_nix_dump(&path);
    assert_eq!(Sha256::digest(&live), hash, "live nix-store --dump");
    assert_eq!(live.len() as u64, size);
}

const NARINFOS: &[&str] = &[
    "narpost-fixture-leaf",
    "narpost-fixture-selfref",
    "narpost-fixture-multi",
    "narpost-fixture-added",
];

#[test]
fn narinfo_fixtures_print_back_byte_for_byte() {
    for name in NARINFOS {
        let text = read_fixture(&format!("narinfo/{name}.narinfo"));
        let info = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.to_string(), text, "{name}");
        assert_eq!(info.store_path.name(), *name);
    }
}

#[test]
fn narinfo_fixtures_have_the_expected_fields() {
    let parse =
        |name: &str| NarInfo::parse(&read_fixture(&format!("narinfo/{name}.narinfo"))).unwrap();
    let leaf = parse("narpost-fixture-leaf");
    let selfref = parse("narpost-fixture-selfref");
    let added = parse("narpost-fixture-added");

    assert!(leaf.references.is_empty());
    assert!(leaf.deriver.as_ref().unwrap().is_derivation());
    assert_eq!(leaf.compression.as_deref(), Some("zstd"));
    assert_eq!(
        leaf.url,
        format!(
            "nar/{}.nar.zst",
            nixbase32::encode(leaf.file_hash.unwrap().as_bytes())
        )
    );

    let refs: BTreeSet<&StorePath> = selfref.references.iter().collect();
    assert!(refs.contains(&selfref.store_path), "self-reference");
    assert!(refs.contains(&leaf.store_path), "reference to leaf");
    assert_eq!(selfref.sigs.len(), 2);
    let mut sorted = selfref.references.clone();
    sorted.sort();
    assert_eq!(sorted, selfref.references, "Nix writes references sorted");

    assert!(added.deriver.is_none());
    assert!(added.sigs.is_empty());
    assert!(added.ca.as_deref().unwrap().starts_with("fixed:r:sha256:"));
}

#[test]
fn nix_signatures_verify_with_narpost() {
    let key1 = PublicKey::parse(&read_fixture("keys/nix-1.public")).unwrap();
    let key2 = PublicKey::parse(&read_fixture("keys/nix-2.public")).unwrap();
    for name in [
        "narpost-fixture-leaf",
        "narpost-fixture-selfref",
        "narpost-fixture-multi",
    ] {
        let info = NarInfo::parse(&read_fixture(&format!("narinfo/{name}.narinfo"))).unwrap();
        assert!(info.verify(&key1), "{name}: Nix's signature by key 1");
        let mut tampered = info.clone();
        tampered.nar_size += 8;
        assert!(
            !tampered.verify(&key1),
            "{name}: tampered NarSize must not verify"
        );
        let mut tampered = info.clone();
        tampered.references.clear();
        if !info.references.is_empty() {
            assert!(
                !tampered.verify(&key1),
                "{name}: dropped references must not verify"
            );
        }
    }
    let selfref = NarInfo::parse(&read_fixture("narinfo/narpost-fixture-selfref.narinfo")).unwrap();
    assert!(selfref.verify(&key2), "second signature on selfref");
    let leaf = NarInfo::parse(&read_fixture("narinfo/narpost-fixture-leaf.narinfo")).unwrap();
    assert!(!leaf.verify(&key2), "leaf was never signed by key 2");
}

#[test]
fn nix_key_files_parse_with_narpost_and_sign_identically() {
    for n in [1, 2] {
        let secret = SigningKey::parse(&read_fixture(&format!("keys/nix-{n}.secret"))).unwrap();
        let public_text = read_fixture(&format!("keys/nix-{n}.public"));
        assert_eq!(secret.public().to_nix_string(), public_text.trim());
        assert_eq!(secret.name(), format!("narpost-fixture-{n}"));
        assert_eq!(
            secret.to_nix_string(),
            read_fixture(&format!("keys/nix-{n}.secret")).trim()
        );
    }
    // Ed25519 is deterministic: narpost signing the same fingerprint with Nix's key must
    // reproduce Nix's Sig lines exactly.
    let key1 = SigningKey::parse(&read_fixture("keys/nix-1.secret")).unwrap();
    let key2 = SigningKey::parse(&read_fixture("keys/nix-2.secret")).unwrap();
    let nix_signed =
        NarInfo::parse(&read_fixture("narinfo/narpost-fixture-selfref.narinfo")).unwrap();
    let mut ours = nix_signed.clone();
    ours.sigs.clear();
    ours.sign(&key1);
    ours.sign(&key2);
    assert_eq!(ours.sigs, nix_signed.sigs);
    assert_eq!(ours.to_string(), nix_signed.to_string());
}

#[test]
fn drv_fixtures_list_nix_outputs() {
    for (drv, names) in [
        ("narpost-fixture-selfref.drv", &["out"][..]),
        ("narpost-fixture-multi.drv", &["dev", "out"][..]),
    ] {
        let outputs = parse_outputs(&read_fixture(&format!("drv/{drv}"))).unwrap();
        let got_names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got_names, names, "{drv}");
        let got_paths: BTreeSet<String> = outputs.iter().map(|(_, p)| p.to_absolute()).collect();
        let want_paths: BTreeSet<String> = read_fixture(&format!("drv/{drv}.outputs"))
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(got_paths, want_paths, "{drv}");
    }
    let multi = parse_outputs(&read_fixture("drv/narpost-fixture-multi.drv")).unwrap();
    assert!(multi[0].1.name().ends_with("-dev"));
}

/// A fresh store path made by `nix-store --add` (no deriver, no references).
fn add_to_store(dir: &Path, tag: &str) -> StorePath {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let src = dir.join(format!("narpost-test-{tag}"));
    fs::create_dir(&src).unwrap();
    write(
        &src.join("data"),
        format!("{tag} {nonce}\n").as_bytes(),
        0o644,
    );
    write(&src.join("run"), b"#!/bin/sh\n", 0o755);
    symlink("data", src.join("link")).unwrap();
    let out = run_text(nix("nix-store").arg("--add").arg(&src));
    StorePath::from_absolute(&out).unwrap()
}

fn cache_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[test]
fn narpost_key_files_work_with_nix() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate("narpost-live-1").unwrap();
    let key_file = dir.path().join("narpost.secret");
    fs::write(&key_file, key.to_nix_string()).unwrap();

    let path = add_to_store(dir.path(), "sign");
    let cache = dir.path().join("cache");
    run(nix("nix")
        .args(["copy", "--to"])
        .arg(format!("{}?compression=zstd", cache_url(&cache)))
        .arg(path.to_absolute()));
    // Nix reads narpost's secret key file and signs the narinfo in the cache with it.
    run(nix("nix")
        .args(["store", "sign", "--store"])
        .arg(cache_url(&cache))
        .arg("--key-file")
        .arg(&key_file)
        .arg(path.to_absolute()));
    let narinfo_file = cache.join(format!("{}.narinfo", path.hash_part()));
    let info = NarInfo::parse(&fs::read_to_string(&narinfo_file).unwrap()).unwrap();
    assert!(
        info.verify(&key.public()),
        "Nix's signature with narpost's key"
    );
    let expected = key.sign(info.fingerprint().as_bytes());
    assert_eq!(
        info.sigs,
        vec![expected],
        "Nix and narpost sign identically"
    );
}

#[test]
fn narpost_signed_narinfo_and_nar_are_accepted_by_nix() {
    let dir = tempfile::tempdir().unwrap();
    let nonce = format!(
        "live-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let built = run_text(nix("nix-build").arg(fixture("derivations.nix")).args([
        "--argstr",
        "nonce",
        &nonce,
        "--no-out-link",
        "-A",
        "selfref",
    ]));
    let top = StorePath::from_absolute(&built).unwrap();
    let closure: Vec<StorePath> = run_text(nix("nix-store").arg("-qR").arg(&built))
        .lines()
        .map(|l| StorePath::from_absolute(l).unwrap())
        .collect();
    assert_eq!(closure.len(), 2, "selfref and leaf: {closure:?}");

    let key = SigningKey::generate("narpost-live-2").unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir_all(cache.join("nar")).unwrap();
    fs::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();

    for path in &closure {
        let abs = path.to_absolute();
        let (nar, nar_hash, nar_size) = dump_path(Path::new(&abs), HashingWriter::new(Vec::new()))
            .unwrap()
            .finish();
        let recorded =
            Sha256::parse(&run_text(nix("nix-store").args(["-q", "--hash", &abs]))).unwrap();
        assert_eq!(
            nar_hash, recorded,
            "{abs}: dump_path hash vs the store's NarHash"
        );
        let file_hash = Sha256::digest(&nar);
        let url = format!("nar/{}.nar", nixbase32::encode(file_hash.as_bytes()));
        fs::write(cache.join(&url), &nar).unwrap();

        let mut references: Vec<StorePath> =
            run_text(nix("nix-store").args(["-q", "--references", &abs]))
                .lines()
                .map(|l| StorePath::from_absolute(l).unwrap())
                .collect();
        references.sort();
        let deriver =
            StorePath::from_absolute(&run_text(nix("nix-store").args(["-q", "--deriver", &abs])))
                .unwrap();
        let mut info = NarInfo {
            store_path: path.clone(),
            url,
            compression: Some("none".to_owned()),
            file_hash: Some(file_hash),
            file_size: Some(nar_size),
            nar_hash,
            nar_size,
            references,
            deriver: Some(deriver),
            system: None,
            sigs: Vec::new(),
            ca: None,
        };
        info.sign(&key);
        let mut f = fs::File::create(cache.join(format!("{}.narinfo", path.hash_part()))).unwrap();
        f.write_all(info.to_string().as_bytes()).unwrap();
    }

    let copy = |public: &PublicKey, store: &Path| {
        nix("nix")
            .args(["copy", "--from"])
            .arg(cache_url(&cache))
            .arg("--to")
            .arg(store)
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "trusted-public-keys"])
            .arg(public.to_nix_string())
            .arg(top.to_absolute())
            .output()
            .expect("nix copy")
    };

    // Negative control first: another key must be refused.
    let wrong = SigningKey::generate("narpost-live-2").unwrap().public();
    let refused = copy(&wrong, &dir.path().join("store-wrong"));
    assert!(
        !refused.status.success(),
        "Nix accepted a signature by the wrong key"
    );
    // Nix 2.8 says "lacks a valid signature", Nix 2.26 "lacks a signature by a trusted key".
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("lacks a valid signature")
            || why.contains("lacks a signature by a trusted key"),
        "{why}"
    );

    let store = dir.path().join("store");
    let accepted = copy(&key.public(), &store);
    assert!(
        accepted.status.success(),
        "nix copy refused narpost's cache:\n{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let self_file = store
        .join(top.to_absolute().trim_start_matches('/'))
        .join("self");
    assert_eq!(
        fs::read_to_string(&self_file).unwrap().trim(),
        top.to_absolute(),
        "the substituted path has its contents"
    );
}

#[tokio::test]
async fn nar_source_streams_a_real_store_path_and_catches_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = add_to_store(dir.path(), "stream");
    let abs = path.to_absolute();
    let nar_hash = Sha256::parse(&run_text(nix("nix-store").args(["-q", "--hash", &abs]))).unwrap();
    let nar_size: u64 = run_text(nix("nix-store").args(["-q", "--size", &abs]))
        .parse()
        .unwrap();
    let live = live_nix_dump(Path::new(&abs));

    let good = NarSource {
        path: path.clone(),
        nar_hash,
        nar_size,
    };
    let mut got = Vec::new();
    let mut stream = good.stream();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, live);

    let bad = NarSource {
        nar_hash: Sha256::digest(b"something else"),
        ..good
    };
    let mut stream = bad.stream();
    let mut got = Vec::new();
    let mut error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => got.extend_from_slice(&b),
            Err(e) => error = Some(e),
        }
    }
    let error = error.expect("a hash mismatch ends the stream with an error");
    assert!(
        error
            .to_string()
            .contains(&format!("nix-store --verify-path {abs}")),
        "{error}"
    );
    assert!(got.len() < live.len(), "the final chunk is withheld");
}
