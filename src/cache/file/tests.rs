use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::cache::{ErrorKind, SpooledNar};
use crate::format::hash::Sha256;
use crate::format::nixbase32;

/// A store path named `name` with a hash part derived from it.
pub(crate) fn store_path(name: &str) -> StorePath {
    let digest = Sha256::digest(name.as_bytes());
    let base = format!("{}-{name}", nixbase32::encode(&digest.as_bytes()[..20]));
    StorePath::from_base(&base).unwrap()
}

pub(crate) fn path_info(name: &str) -> PathInfo {
    PathInfo {
        path: store_path(name),
        nar_hash: Sha256::digest(format!("nar of {name}").as_bytes()),
        nar_size: 128,
        references: BTreeSet::new(),
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        registration_time: 0,
    }
}

/// Writes `contents` as a spooled NAR in `dir` and describes it as the pipeline would.
pub(crate) fn spooled(dir: &Path, name: &str, contents: &[u8]) -> PreparedNar {
    fs::create_dir_all(dir).unwrap();
    let file = dir.join(format!(".narpost-{name}.nar.zst"));
    fs::write(&file, contents).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    PreparedNar {
        info: path_info(name),
        body: NarBody::Spooled(SpooledNar {
            file,
            compression: "zstd",
            file_hash: Sha256::digest(contents),
            file_size: contents.len() as u64,
        }),
    }
}

pub(crate) fn narinfo_for(nar: &PreparedNar, url: &str) -> NarInfo {
    let NarBody::Spooled(s) = &nar.body else {
        panic!("test NARs are spooled")
    };
    NarInfo {
        store_path: nar.info.path.clone(),
        url: url.to_string(),
        compression: Some("zstd".into()),
        file_hash: Some(s.file_hash),
        file_size: Some(s.file_size),
        nar_hash: nar.info.nar_hash,
        nar_size: nar.info.nar_size,
        references: Vec::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
    }
}

/// Temporary files left anywhere in the cache.
fn tmp_entries(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = ["", "nar", "log"]
        .iter()
        .flat_map(|sub| fs::read_dir(cache.join(sub)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(TMP_PREFIX))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn open_creates_nix_layout() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let target = FileTarget::new(cache.clone(), 3);
    target.open().await.unwrap();

    assert_eq!(
        fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        "StoreDir: /nix/store\n"
    );
    for dir in ["nar", "log", "realisations"] {
        assert!(cache.join(dir).is_dir(), "{dir} missing");
    }
    assert!(!cache.join(OLD_TMP_DIR).exists());
    assert_eq!(target.spool_dir(), Some(cache.join("nar")));
    assert_eq!(target.url(), format!("file://{}", cache.display()));
    assert_eq!(target.nar_format(), NarFormat::Zstd { level: 3 });
    assert!(tmp_entries(&cache).is_empty());

    // Opening again keeps an existing cache info.
    fs::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nPriority: 10\n",
    )
    .unwrap();
    target.open().await.unwrap();
    assert_eq!(
        fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        "StoreDir: /nix/store\nPriority: 10\n"
    );
}

#[tokio::test]
async fn open_refuses_a_cache_for_another_store() {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("nix-cache-info"), "StoreDir: /gnu/store\n").unwrap();
    let err = FileTarget::new(root.path().to_path_buf(), 3)
        .open()
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert!(err.message.contains("/gnu/store"), "{}", err.message);
}

#[tokio::test]
async fn open_reports_a_file_in_the_way() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    fs::write(&cache, "not a directory").unwrap();
    let err = FileTarget::new(cache.clone(), 3).open().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert!(
        err.message.starts_with(&cache.display().to_string()),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn open_removes_only_stale_temporary_files() {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    target.open().await.unwrap();
    let legacy = root.path().join(OLD_TMP_DIR);
    fs::create_dir(&legacy).unwrap();
    let at = |dir: &str, name: &str| root.path().join(dir).join(name);
    let old = [
        at("nar", ".narpost-old.nar.zst"),
        at("", ".narpost-old.narinfo.1-0.tmp"),
        at(OLD_TMP_DIR, ".narpost-old.nar.zst"),
    ];
    let fresh = at("nar", ".narpost-fresh.nar.zst");
    // Old, but not a temporary of ours: a reader's file is never touched.
    let foreign = at("", ".old-but-foreign");
    let two_days_ago = SystemTime::now() - Duration::from_secs(48 * 3600);
    for file in old.iter().chain([&foreign]) {
        fs::write(file, "x").unwrap();
        File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
    }
    fs::write(&fresh, "y").unwrap();
    target.open().await.unwrap();
    for file in &old {
        assert!(!file.exists(), "{}", file.display());
    }
    assert!(fresh.exists());
    assert!(foreign.exists());
}

#[tokio::test]
async fn put_nar_moves_the_spool_into_nar() {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    target.open().await.unwrap();
    let nar = spooled(&target.spool_dir().unwrap(), "a", b"compressed bytes of a");
    let NarBody::Spooled(s) = &nar.body else {
        unreachable!()
    };

    let key = target.put_nar(&nar).await.unwrap();
    assert_eq!(key, s.cache_key());
    assert!(
        key.starts_with("nar/") && key.ends_with(".nar.zst"),
        "{key}"
    );
    let stored = root.path().join(&key);
    assert_eq!(fs::read(&stored).unwrap(), b"compressed bytes of a");
    assert_eq!(fs::metadata(&stored).unwrap().mode() & 0o777, 0o644);
    assert!(!s.file.exists(), "the spool file was renamed away");
    assert!(tmp_entries(root.path()).is_empty());
}

#[tokio::test]
async fn put_nar_keeps_an_existing_nar() {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    target.open().await.unwrap();
    let first = spooled(&target.spool_dir().unwrap(), "a", b"same bytes");
    let key = target.put_nar(&first).await.unwrap();
    let inode = fs::metadata(root.path().join(&key)).unwrap().ino();

    // Another path with identical contents shares the NAR file; it must stay the same file.
    let second = spooled(&target.spool_dir().unwrap(), "b", b"same bytes");
    assert_eq!(target.put_nar(&second).await.unwrap(), key);
    assert_eq!(fs::metadata(root.path().join(&key)).unwrap().ino(), inode);

    // A truncated leftover under the same name is replaced.
    fs::write(root.path().join(&key), b"same").unwrap();
    let third = spooled(&target.spool_dir().unwrap(), "c", b"same bytes");
    target.put_nar(&third).await.unwrap();
    assert_eq!(fs::read(root.path().join(&key)).unwrap(), b"same bytes");

    // So is one of the right size whose bytes never reached the disk before a crash (a
    // NAR is renamed into place before it is synced): its name is not its hash.
    fs::write(root.path().join(&key), [0u8; 10]).unwrap();
    let fourth = spooled(&target.spool_dir().unwrap(), "d", b"same bytes");
    target.put_nar(&fourth).await.unwrap();
    assert_eq!(fs::read(root.path().join(&key)).unwrap(), b"same bytes");
}

#[tokio::test]
async fn put_nar_refuses_a_spool_of_the_wrong_size() {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    target.open().await.unwrap();
    let mut nar = spooled(&target.spool_dir().unwrap(), "a", b"12345");
    if let NarBody::Spooled(s) = &mut nar.body {
        s.file_size = 4;
    }
    let err = target.put_nar(&nar).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    // Only the spool file itself (the pipeline removes it) is in nar/: nothing stored.
    assert!(fs::read_dir(root.path().join("nar")).unwrap().all(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(TMP_PREFIX)
    }));
}

#[tokio::test]
async fn put_nar_copies_across_filesystems() {
    // tmpfs is a different filesystem from the temporary directory's disk.
    let other_fs = Path::new("/dev/shm");
    assert!(other_fs.is_dir(), "this test needs /dev/shm (a tmpfs)");
    let spool = tempfile::tempdir_in(other_fs).unwrap();
    let root = tempfile::tempdir().unwrap();
    assert_ne!(
        fs::metadata(spool.path()).unwrap().dev(),
        fs::metadata(root.path()).unwrap().dev(),
        "the temporary directory is on tmpfs too, so this test cannot cross filesystems"
    );
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    target.open().await.unwrap();
    let nar = spooled(spool.path(), "a", b"from another filesystem");
    let key = target.put_nar(&nar).await.unwrap();
    assert_eq!(
        fs::read(root.path().join(&key)).unwrap(),
        b"from another filesystem"
    );
    assert!(tmp_entries(root.path()).is_empty());
}

#[tokio::test]
async fn put_nar_refuses_raw_nars() {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    let info = path_info("a");
    let nar = PreparedNar {
        body: NarBody::Raw(crate::dump::NarSource {
            path: info.path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
        }),
        info,
    };
    let err = target.put_nar(&nar).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
}

#[tokio::test]
async fn narinfo_commit_and_missing() {
    // In commit rounds (a quiet machine) and alone (much else dirty): the same outcome.
    for dirty in [0, fs_sync::DIRTY_LIMIT + 1] {
        narinfo_commit_and_missing_with(dirty).await;
    }
}

async fn narinfo_commit_and_missing_with(dirty: u64) {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::with_dirty_probe(root.path().to_path_buf(), 3, dirty);
    target.open().await.unwrap();
    let a = spooled(&target.spool_dir().unwrap(), "a", b"aaa");
    let b = path_info("b");

    let all = vec![a.info.clone(), b.clone()];
    let missing = target.missing(&all).await.unwrap();
    assert_eq!(
        missing,
        HashSet::from([a.info.path.clone(), b.path.clone()])
    );

    let url = target.put_nar(&a).await.unwrap();
    // A NAR alone does not make the path present: the narinfo is the commit point.
    assert_eq!(target.missing(&all).await.unwrap().len(), 2);

    let narinfo = narinfo_for(&a, &url);
    target.put_narinfo(&narinfo, &a).await.unwrap();
    let written = root
        .path()
        .join(format!("{}.narinfo", a.info.path.hash_part()));
    assert_eq!(fs::read_to_string(&written).unwrap(), narinfo.to_string());
    assert_eq!(fs::metadata(&written).unwrap().mode() & 0o777, 0o644);
    assert_eq!(
        target.missing(&all).await.unwrap(),
        HashSet::from([b.path.clone()])
    );
    assert!(tmp_entries(root.path()).is_empty());
    assert!(target.missing(&[]).await.unwrap().is_empty());
    let rounds = target.inner.fs.syncs.load(Ordering::Relaxed);
    let alone = target.inner.root_dir.syncs.load(Ordering::Relaxed);
    if dirty == 0 {
        assert!(
            rounds >= 2 && alone == 1,
            "{rounds} rounds, {alone} root syncs"
        );
    } else {
        // The one root sync before is `open`'s, for nix-cache-info.
        assert!(
            rounds == 0 && alone == 2,
            "{rounds} rounds, {alone} root syncs"
        );
    }
}

#[tokio::test]
async fn a_failed_write_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let target = FileTarget::new(root.path().to_path_buf(), 3);
    target.open().await.unwrap();
    let err = target
        .inner
        .write_atomically_with("x.narinfo", true, |out| {
            out.write_all(b"half a narinfo")?;
            Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NOSPC.raw_os_error(),
            ))
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient);
    assert!(err.hint.is_some());
    assert!(!root.path().join("x.narinfo").exists());
    assert!(tmp_entries(root.path()).is_empty());
}

/// How long the target's own work takes for many tiny paths, committed the way the
/// pipeline does (two NARs stored at a time, narinfos as soon as their NAR is stored).
/// `cargo test --release --lib cache::file -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing measurement"]
async fn thousand_tiny_paths() {
    let root = tempfile::tempdir().unwrap();
    let target = Arc::new(FileTarget::new(root.path().to_path_buf(), 3));
    target.open().await.unwrap();
    let spool = target.spool_dir().unwrap();
    let nars: Vec<PreparedNar> = (0..1000)
        .map(|i| spooled(&spool, &format!("p{i}"), format!("nar {i}").as_bytes()))
        .collect();
    let slots = Arc::new(tokio::sync::Semaphore::new(2));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = nars
        .into_iter()
        .map(|nar| {
            let target = target.clone();
            let slots = slots.clone();
            tokio::spawn(async move {
                let permit = slots.acquire_owned().await.unwrap();
                let url = target.put_nar(&nar).await.unwrap();
                drop(permit);
                target
                    .put_narinfo(&narinfo_for(&nar, &url), &nar)
                    .await
                    .unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let inner = &target.inner;
    eprintln!(
        "1000 paths in {elapsed:?}; nar/ syncs: {}, root syncs: {}",
        inner.nar_dir.syncs.load(Ordering::Relaxed),
        inner.root_dir.syncs.load(Ordering::Relaxed)
    );
    let narinfos = fs::read_dir(root.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".narinfo")
        })
        .count();
    assert_eq!(narinfos, 1000);
}
