//! Error paths and ordering against a fake target; the proof that real caches accept the
//! result is in the end-to-end tests.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cache::{NarFormat, PreparedNar, Target, TargetError};
use crate::format::hash::Sha256;
use crate::format::narinfo::NarInfo;
use crate::format::signing::SigningKey;
use crate::store::{PathInfo, Store};

/// What the fake cache saw, in order: `nar <name>` and `narinfo <name>`.
#[derive(Default)]
struct Fake {
    log: Mutex<Vec<String>>,
    cached: BTreeSet<String>,
    /// Per path name: how put_nar answers, one error per attempt, then success.
    nar_errors: Mutex<HashMap<String, Vec<TargetError>>>,
    /// How put_log answers, one error per attempt, then success.
    log_errors: Mutex<Vec<TargetError>>,
    /// A cache with no place for logs (as Attic and ssh://).
    no_logs: bool,
    /// How long each NAR takes to store (2 ms when zero).
    nar_time: Duration,
    /// NAR uploads under way now, and the most there were at once.
    nars_now: std::sync::atomic::AtomicUsize,
    nars_most: std::sync::atomic::AtomicUsize,
}

impl Fake {
    /// How many build logs the fake cache stored.
    fn logs_stored(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("log "))
            .count()
    }
}

#[async_trait]
impl Target for Fake {
    fn url(&self) -> String {
        "fake://".into()
    }
    fn nar_format(&self) -> NarFormat {
        NarFormat::Raw
    }
    async fn open(&self) -> Result<(), TargetError> {
        Ok(())
    }
    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        Ok(paths
            .iter()
            .filter(|p| !self.cached.contains(p.path.name()))
            .map(|p| p.path.clone())
            .collect())
    }
    async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError> {
        use std::sync::atomic::Ordering::SeqCst;
        let name = nar.info.path.name().to_string();
        let now = self.nars_now.fetch_add(1, SeqCst) + 1;
        self.nars_most.fetch_max(now, SeqCst);
        // Let other tasks run, so that a wrong order has the chance to show.
        let time = if self.nar_time.is_zero() {
            Duration::from_millis(2)
        } else {
            self.nar_time
        };
        tokio::time::sleep(time).await;
        self.nars_now.fetch_sub(1, SeqCst);
        if let Some(errors) = self.nar_errors.lock().unwrap().get_mut(&name)
            && !errors.is_empty()
        {
            return Err(errors.remove(0));
        }
        self.log.lock().unwrap().push(format!("nar {name}"));
        Ok(format!("nar/{name}.nar"))
    }
    async fn put_narinfo(&self, narinfo: &NarInfo, _: &PreparedNar) -> Result<(), TargetError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("narinfo {}", narinfo.store_path.name()));
        Ok(())
    }
    fn stores_logs(&self) -> bool {
        !self.no_logs
    }
    async fn put_log(&self, drv: &StorePath, log: Bytes) -> Result<(), TargetError> {
        let mut errors = self.log_errors.lock().unwrap();
        if !errors.is_empty() {
            return Err(errors.remove(0));
        }
        self.log.lock().unwrap().push(format!(
            "log {} {}",
            drv.name(),
            String::from_utf8_lossy(&log)
        ));
        Ok(())
    }
}

/// Makes `deriver` the deriver of the named paths and writes its build log where Nix would,
/// bzip2-compressed, under the test pipeline's log directory.
fn built_by(dir: &Path, names: &[&str], deriver: &str, log: &[u8]) {
    use std::io::Write;
    let drv = path(deriver);
    let conn = rusqlite::Connection::open(dir.join("db.sqlite")).expect("open db");
    for name in names {
        conn.execute(
            "UPDATE ValidPaths SET deriver = ?1 WHERE path = ?2",
            rusqlite::params![drv.to_absolute(), path(name).to_absolute()],
        )
        .expect("set deriver");
    }
    let base = drv.base();
    let sub = dir.join("logs/drvs").join(&base[..2]);
    std::fs::create_dir_all(&sub).expect("log dir");
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(log).expect("compress");
    std::fs::write(
        sub.join(format!("{}.bz2", &base[2..])),
        e.finish().expect("finish"),
    )
    .expect("write log");
}

fn path(name: &str) -> StorePath {
    let digest = Sha256::digest(name.as_bytes());
    let hash = crate::format::nixbase32::encode(&digest.as_bytes()[..20]);
    StorePath::from_base(&format!("{hash}-{name}")).expect("valid test path")
}

/// A store database with Nix's schema holding `graph` (name, references).
fn store(dir: &Path, graph: &[(&str, &[&str])]) -> Arc<Store> {
    let db = dir.join("db.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("create db");
    conn.execute_batch(
        "CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null, \
         hash text not null, registrationTime integer not null, deriver text, narSize integer, \
         ultimate integer, sigs text, ca text);
         CREATE TABLE Refs (referrer integer not null, reference integer not null, primary key (referrer, reference));",
    )
    .expect("schema");
    for (i, (name, _)) in graph.iter().enumerate() {
        conn.execute(
            "INSERT INTO ValidPaths (id, path, hash, registrationTime, narSize) VALUES (?1, ?2, ?3, 1, 8)",
            rusqlite::params![
                i as i64 + 1,
                path(name).to_absolute(),
                format!("sha256:{}", Sha256::digest(name.as_bytes()).to_hex())
            ],
        )
        .expect("insert path");
    }
    let id = |n: &str| graph.iter().position(|(m, _)| *m == n).expect("known") as i64 + 1;
    for (name, refs) in graph {
        for r in *refs {
            conn.execute(
                "INSERT INTO Refs VALUES (?1, ?2)",
                rusqlite::params![id(name), id(r)],
            )
            .expect("insert ref");
        }
    }
    drop(conn);
    Arc::new(Store::open(&db).expect("open test db"))
}

fn pipeline(store: Arc<Store>, target: crate::cache::DynTarget, dir: &Path) -> Pipeline {
    Pipeline::new(
        store,
        target,
        Some(SigningKey::from_seed("test-1", [7; 32])),
        Options {
            jobs: 4,
            spool_dir: dir.to_path_buf(),
            retry: RetryPolicy {
                retries: 3,
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
                total: None,
            },
            upstream_keys: vec!["upstream-1".into()],
            logs: LogOptions {
                enabled: true,
                max_size: 1 << 20,
                dir: dir.join("logs"),
            },
        },
    )
}

const DIAMOND: &[(&str, &[&str])] = &[
    ("base", &[]),
    ("left", &["base"]),
    ("right", &["base"]),
    ("top", &["left", "right", "top"]),
    ("other", &[]),
];

/// Pushes the named paths of the test store and their closures, not cancelled.
async fn push_names(p: &Pipeline, names: &[&str]) -> Result<Report, PipelineError> {
    let roots: Vec<StorePath> = names.iter().map(|n| path(n)).collect();
    p.push(&roots, true, &CancellationToken::new()).await
}

/// Records a signature by `key` for the named path of the test store, as `nix store sign`
/// (or substituting from a cache) would.
fn sign(dir: &Path, name: &str, key: &str) {
    let conn = rusqlite::Connection::open(dir.join("db.sqlite")).expect("open db");
    conn.execute(
        "UPDATE ValidPaths SET sigs = ?1 WHERE path = ?2",
        rusqlite::params![format!("{key}:c2lnbmF0dXJl"), path(name).to_absolute()],
    )
    .expect("sign");
}

fn position(log: &[String], entry: &str) -> Option<usize> {
    log.iter().position(|l| l == entry)
}

#[tokio::test]
async fn narinfos_follow_their_nar_and_every_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
    let report = push_names(&p, &["top", "other"]).await.expect("push");
    assert_eq!(report.pushed.len(), 5, "{report:?}");
    assert!(report.failed.is_empty());
    let log = fake.log.lock().unwrap().clone();
    for (name, refs) in DIAMOND {
        let info = position(&log, &format!("narinfo {name}")).expect("narinfo stored");
        assert!(position(&log, &format!("nar {name}")).expect("nar stored") < info);
        for r in refs.iter().filter(|r| *r != name) {
            assert!(
                position(&log, &format!("narinfo {r}")).expect("ref stored") < info,
                "{name} before its reference {r}: {log:?}"
            );
        }
    }
}

#[tokio::test]
async fn upstream_signed_paths_are_left_out_but_their_references_are_pushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    // `left` is upstream, `right` is signed by a key that is not: `base` still goes up,
    // and `top` is published even though its reference `left` is not in the cache.
    let store = store(dir.path(), DIAMOND);
    sign(dir.path(), "left", "upstream-1");
    sign(dir.path(), "right", "someone-else-1");
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["top"]).await.expect("push");
    assert_eq!(report.left_upstream, 1, "{report:?}");
    assert_eq!(report.pushed.len(), 3, "{report:?}");
    assert!(report.is_done(&path("top")));
    let log = fake.log.lock().unwrap().clone();
    assert!(!log.iter().any(|l| l.ends_with(" left")), "{log:?}");
    for name in ["base", "right", "top"] {
        assert!(log.contains(&format!("narinfo {name}")), "{name}: {log:?}");
    }
}

#[tokio::test]
async fn no_upstream_keys_push_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let store = store(dir.path(), DIAMOND);
    sign(dir.path(), "left", "upstream-1");
    let mut p = pipeline(store, fake.clone(), dir.path());
    p.opts.upstream_keys.clear();
    let report = push_names(&p, &["top"]).await.expect("push");
    assert_eq!(
        (report.left_upstream, report.pushed.len()),
        (0, 4),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_build_log_follows_the_narinfo_once_per_derivation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let store = store(dir.path(), DIAMOND);
    // Two outputs of one derivation share its log.
    built_by(
        dir.path(),
        &["left", "right"],
        "lr.drv",
        b"building left and right\n",
    );
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["top"]).await.expect("push");
    assert_eq!(report.logs_uploaded, 1, "{report:?}");
    assert!(report.log_failures.is_empty(), "{report:?}");
    let log = fake.log.lock().unwrap().clone();
    let entry = "log lr.drv building left and right\n";
    let at = position(&log, entry).expect("log stored");
    assert_eq!(fake.logs_stored(), 1);
    assert!(
        ["narinfo left", "narinfo right"]
            .iter()
            .any(|n| position(&log, n).is_some_and(|i| i < at)),
        "log before any narinfo of its outputs: {log:?}"
    );
}

#[tokio::test]
async fn a_log_too_large_or_refused_is_reported_and_the_path_still_pushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let store = store(dir.path(), DIAMOND);
    built_by(dir.path(), &["base"], "base.drv", &vec![b'x'; 2 << 20]);
    built_by(dir.path(), &["other"], "other.drv", b"fine\n");
    fake.log_errors
        .lock()
        .unwrap()
        .push(TargetError::permanent("403 Forbidden"));
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["base"]).await.expect("push");
    assert!(report.complete() && report.pushed.len() == 1, "{report:?}");
    assert_eq!(report.logs_uploaded, 0);
    assert_eq!(report.log_failures.len(), 1, "{report:?}");
    assert!(
        report.log_failures[0].contains("max-log-size"),
        "{report:?}"
    );

    let report = push_names(&p, &["other"]).await.expect("push");
    assert!(report.complete() && report.pushed.len() == 1, "{report:?}");
    assert_eq!(report.log_failures.len(), 1, "{report:?}");
    assert!(report.log_failures[0].contains("403"), "{report:?}");
}

#[tokio::test]
async fn a_cache_without_a_place_for_logs_gets_none_and_no_complaint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake {
        no_logs: true,
        ..Default::default()
    });
    let store = store(dir.path(), DIAMOND);
    built_by(dir.path(), &["other"], "other.drv", b"fine\n");
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["other"]).await.expect("push");
    assert!(report.complete(), "{report:?}");
    assert_eq!((report.logs_uploaded, report.log_failures.len()), (0, 0));
    assert_eq!(fake.logs_stored(), 0);
}

#[tokio::test]
async fn once_the_cache_fails_a_log_the_rest_of_the_run_are_not_tried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let store = store(dir.path(), DIAMOND);
    for name in ["base", "left", "right", "top", "other"] {
        built_by(dir.path(), &[name], &format!("{name}.drv"), b"output\n");
    }
    // Fails every log it is asked for (permanently, so no retries).
    *fake.log_errors.lock().unwrap() = (0..5)
        .map(|_| TargetError::permanent("500 Internal Server Error"))
        .collect();
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["top", "other"]).await.expect("push");
    assert!(report.complete() && report.pushed.len() == 5, "{report:?}");
    let tried = report.log_failures.len();
    assert_eq!(tried + report.logs_skipped, 5, "{report:?}");
    // Only those already holding one of the two log slots when the first failed.
    assert!((1..=LOG_SLOTS).contains(&tried), "{report:?}");
    assert_eq!(fake.log_errors.lock().unwrap().len(), 5 - tried);
}

#[tokio::test]
async fn an_empty_log_is_not_uploaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let store = store(dir.path(), DIAMOND);
    built_by(dir.path(), &["other"], "other.drv", b"");
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["other"]).await.expect("push");
    assert_eq!((report.logs_uploaded, report.log_failures.len()), (0, 0));
    assert_eq!(fake.logs_stored(), 0);
}

#[tokio::test]
async fn a_failing_log_upload_is_retried_once_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let store = store(dir.path(), DIAMOND);
    built_by(dir.path(), &["other"], "other.drv", b"fine\n");
    *fake.log_errors.lock().unwrap() = (0..3)
        .map(|_| TargetError::transient("504 Gateway Timeout"))
        .collect();
    let p = pipeline(store, fake.clone(), dir.path());
    let report = push_names(&p, &["other"]).await.expect("push");
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.log_failures.len(), 1, "{report:?}");
    // Two attempts took two of the three errors.
    assert_eq!(fake.log_errors.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn cached_paths_are_counted_and_not_uploaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake {
        cached: ["base".to_string(), "left".to_string()].into(),
        ..Default::default()
    });
    let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
    let report = push_names(&p, &["top"]).await.expect("push");
    assert_eq!(report.already_cached, 2);
    assert_eq!(report.total, 4);
    let log = fake.log.lock().unwrap().clone();
    assert!(
        !log.iter()
            .any(|l| l.ends_with(" base") || l.ends_with(" left")),
        "{log:?}"
    );
    assert!(log.contains(&"narinfo top".to_string()));
}

#[tokio::test]
async fn transient_errors_are_retried_until_the_upload_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    fake.nar_errors.lock().unwrap().insert(
        "base".into(),
        vec![
            TargetError::transient("503 from the cache"),
            TargetError::transient("connection reset"),
        ],
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path()).with_events(tx);
    let report = push_names(&p, &["top"]).await.expect("push");
    assert_eq!(report.pushed.len(), 4, "{report:?}");
    let mut retries = 0;
    while let Ok(e) = rx.try_recv() {
        if matches!(e, Event::Retrying { .. }) {
            retries += 1;
        }
    }
    assert_eq!(retries, 2);
}

#[tokio::test]
async fn a_permanent_failure_withholds_every_referrer_but_not_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    fake.nar_errors
        .lock()
        .unwrap()
        .insert("left".into(), vec![TargetError::permanent("403 Forbidden")]);
    let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
    let report = push_names(&p, &["top", "other"]).await.expect("push");
    let failed: BTreeSet<&str> = report.failed.iter().map(|f| f.path.name()).collect();
    assert_eq!(failed, BTreeSet::from(["left", "top"]), "{report:?}");
    let top = report
        .failed
        .iter()
        .find(|f| f.path.name() == "top")
        .expect("top failed");
    assert!(top.message.contains("left"), "{}", top.message);
    let log = fake.log.lock().unwrap().clone();
    assert!(!log.contains(&"narinfo left".to_string()));
    assert!(!log.contains(&"narinfo top".to_string()));
    for ok in ["base", "right", "other"] {
        assert!(log.contains(&format!("narinfo {ok}")), "{ok}: {log:?}");
    }
}

#[tokio::test]
async fn exhausted_retries_fail_the_path_with_the_last_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    fake.nar_errors.lock().unwrap().insert(
        "other".into(),
        (0..10)
            .map(|_| TargetError::transient("502 Bad Gateway"))
            .collect(),
    );
    let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
    let report = push_names(&p, &["other"]).await.expect("push");
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0].message.contains("502"),
        "{:?}",
        report.failed
    );
    assert!(fake.log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_cancelled_push_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let p = pipeline(store(dir.path(), DIAMOND), fake.clone(), dir.path());
    let cancel = CancellationToken::new();
    cancel.cancel();
    let report = p.push(&[path("top")], true, &cancel).await.expect("push");
    assert_eq!(report.skipped.len(), 4, "{report:?}");
    assert!(fake.log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_path_missing_from_the_store_is_a_plan_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(Fake::default());
    let p = pipeline(store(dir.path(), DIAMOND), fake, dir.path());
    let err = push_names(&p, &["absent"])
        .await
        .expect_err("not in the store");
    assert!(
        err.to_string().contains(&path("absent").to_absolute()),
        "{err}"
    );
}

/// A host's store behind one ordered channel, as the ssh target is: commits are applied
/// in the order they were handed over, a path whose reference is not stored is refused,
/// and a refusal ends the channel, failing what was handed over behind it.
#[derive(Default)]
struct Channel {
    ordered: bool,
    /// Answers wait until this many commits were handed over (or a second passed).
    hold: usize,
    shared: Arc<ChannelShared>,
}

#[derive(Default)]
struct ChannelShared {
    /// Per path name: how its commit is refused, one error per attempt, then success.
    refuse: Mutex<HashMap<String, Vec<TargetError>>>,
    state: Mutex<ChannelState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct ChannelState {
    stored: HashSet<String>,
    /// Per commit handed over, in order: the path and how many answers had come before.
    handed: Vec<(String, usize)>,
    answered: usize,
    /// Commits queued, and the queued one to be answered next.
    queued: usize,
    next: usize,
    /// Queued commits before this one fail: the channel ended under them.
    broken_before: usize,
}

impl ChannelShared {
    /// Stores the path unless it is refused or a reference is not stored.
    fn apply(&self, state: &mut ChannelState, narinfo: &NarInfo) -> Result<(), TargetError> {
        let name = narinfo.store_path.name().to_string();
        if let Some(errors) = self.refuse.lock().unwrap().get_mut(&name)
            && !errors.is_empty()
        {
            return Err(errors.remove(0));
        }
        for r in narinfo
            .references
            .iter()
            .filter(|r| **r != narinfo.store_path)
        {
            if !state.stored.contains(r.name()) {
                return Err(TargetError::transient(format!(
                    "path {} is not valid",
                    r.to_absolute()
                )));
            }
        }
        state.stored.insert(name);
        Ok(())
    }

    /// Answers commit `seq` once every earlier one is answered and `hold` were handed over.
    async fn answer(&self, seq: usize, hold: usize, narinfo: NarInfo) -> Result<(), TargetError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock().unwrap();
                let held = state.queued < hold && tokio::time::Instant::now() < deadline;
                if state.next == seq && !held {
                    break;
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        let result = {
            let mut state = self.state.lock().unwrap();
            let result = if seq < state.broken_before {
                Err(TargetError::transient(
                    "the channel closed before the answer",
                ))
            } else {
                self.apply(&mut state, &narinfo)
            };
            if result.is_err() {
                state.broken_before = state.queued;
            }
            state.answered += 1;
            state.next += 1;
            result
        };
        self.changed.notify_waiters();
        result
    }
}

#[async_trait]
impl Target for Channel {
    fn url(&self) -> String {
        "channel://".into()
    }
    fn nar_format(&self) -> NarFormat {
        NarFormat::Raw
    }
    async fn open(&self) -> Result<(), TargetError> {
        Ok(())
    }
    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        Ok(paths.iter().map(|p| p.path.clone()).collect())
    }
    async fn put_nar(&self, _: &PreparedNar) -> Result<String, TargetError> {
        Ok(String::new())
    }
    async fn put_narinfo(&self, narinfo: &NarInfo, _: &PreparedNar) -> Result<(), TargetError> {
        let mut state = self.shared.state.lock().unwrap();
        let answered = state.answered;
        state
            .handed
            .push((narinfo.store_path.name().to_string(), answered));
        state.answered += 1;
        self.shared.apply(&mut state, narinfo)
    }
    fn ordered_commits(&self) -> bool {
        self.ordered
    }
    async fn hand_over_narinfo(
        &self,
        narinfo: &NarInfo,
        _: &PreparedNar,
    ) -> Result<crate::cache::Committing, TargetError> {
        let seq = {
            let mut state = self.shared.state.lock().unwrap();
            let answered = state.answered;
            state
                .handed
                .push((narinfo.store_path.name().to_string(), answered));
            state.queued += 1;
            state.queued - 1
        };
        self.shared.changed.notify_waiters();
        let shared = self.shared.clone();
        let (hold, narinfo) = (self.hold, narinfo.clone());
        Ok(Box::pin(
            async move { shared.answer(seq, hold, narinfo).await },
        ))
    }
}

const CHAIN: &[(&str, &[&str])] = &[("a", &[]), ("b", &["a"]), ("c", &["b", "c"])];

fn handed(channel: &Channel) -> Vec<(String, usize)> {
    channel.shared.state.lock().unwrap().handed.clone()
}

#[tokio::test]
async fn an_ordered_target_gets_a_chain_without_waiting_for_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let channel = Arc::new(Channel {
        ordered: true,
        hold: 3,
        ..Default::default()
    });
    let p = pipeline(store(dir.path(), CHAIN), channel.clone(), dir.path());
    let report = push_names(&p, &["c"]).await.expect("push");
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.pushed.len(), 3);
    // Every commit went out before any answer came back, references first.
    let expected: Vec<(String, usize)> =
        ["a", "b", "c"].iter().map(|n| (n.to_string(), 0)).collect();
    assert_eq!(handed(&channel), expected);
}

#[tokio::test]
async fn a_target_without_ordered_commits_still_waits_for_each_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let channel = Arc::new(Channel::default());
    let p = pipeline(store(dir.path(), CHAIN), channel.clone(), dir.path());
    let report = push_names(&p, &["c"]).await.expect("push");
    assert!(report.complete(), "{report:?}");
    let expected: Vec<(String, usize)> = [("a", 0), ("b", 1), ("c", 2)]
        .iter()
        .map(|(n, i)| (n.to_string(), *i))
        .collect();
    assert_eq!(handed(&channel), expected);
}

#[tokio::test]
async fn a_refused_first_link_fails_the_chain_behind_it_as_a_dependency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let channel = Arc::new(Channel {
        ordered: true,
        hold: 3,
        ..Default::default()
    });
    channel.shared.refuse.lock().unwrap().insert(
        "a".into(),
        vec![TargetError::auth(
            "cannot add path a because it lacks a valid signature",
        )],
    );
    let p = pipeline(store(dir.path(), CHAIN), channel.clone(), dir.path());
    let report = push_names(&p, &["c"]).await.expect("push");
    assert!(report.pushed.is_empty(), "{report:?}");
    let kinds: HashMap<&str, FailureKind> = report
        .failed
        .iter()
        .map(|f| (f.path.name(), f.kind))
        .collect();
    assert_eq!(kinds["a"], FailureKind::Auth, "{report:?}");
    assert_eq!(kinds["b"], FailureKind::Dependency, "{report:?}");
    assert_eq!(kinds["c"], FailureKind::Dependency, "{report:?}");
    assert!(channel.shared.state.lock().unwrap().stored.is_empty());
    // b and c were sent behind a, and not again once a was refused.
    let sent: Vec<String> = handed(&channel).into_iter().map(|(n, _)| n).collect();
    assert_eq!(sent, ["a", "b", "c"]);
}

#[tokio::test]
async fn a_channel_lost_under_a_chain_is_retried_until_the_whole_chain_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let channel = Arc::new(Channel {
        ordered: true,
        hold: 3,
        ..Default::default()
    });
    channel.shared.refuse.lock().unwrap().insert(
        "a".into(),
        vec![TargetError::transient("the connection closed")],
    );
    let p = pipeline(store(dir.path(), CHAIN), channel.clone(), dir.path());
    let report = push_names(&p, &["c"]).await.expect("push");
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.pushed.len(), 3);
    let stored = channel.shared.state.lock().unwrap().stored.clone();
    assert_eq!(stored, HashSet::from(["a", "b", "c"].map(String::from)));
    // Each was sent once behind a, and once more after its references were stored.
    let sent: Vec<String> = handed(&channel).into_iter().map(|(n, _)| n).collect();
    assert_eq!(sent, ["a", "b", "c", "a", "b", "c"], "{sent:?}");
}

/// Two runs of one pipeline at once (the daemon's pass and what was queued meanwhile):
/// a path both need is uploaded once, the later run's paths wait for it like for one of
/// their own, and the runs share the upload slots instead of each bringing its own.
#[tokio::test]
async fn runs_at_once_upload_a_shared_reference_once_and_share_their_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut graph: Vec<(String, Vec<String>)> = vec![("shared".into(), vec![])];
    for i in 0..40 {
        graph.push((format!("old{i}"), vec!["shared".into()]));
        graph.push((format!("new{i}"), vec!["shared".into()]));
    }
    let graph_refs: Vec<(&str, Vec<&str>)> = graph
        .iter()
        .map(|(n, r)| (n.as_str(), r.iter().map(String::as_str).collect()))
        .collect();
    let graph_slices: Vec<(&str, &[&str])> =
        graph_refs.iter().map(|(n, r)| (*n, r.as_slice())).collect();
    let fake = Arc::new(Fake {
        nar_time: Duration::from_millis(20),
        ..Fake::default()
    });
    let p = Arc::new(pipeline(
        store(dir.path(), &graph_slices),
        fake.clone(),
        dir.path(),
    ));
    let old: Vec<String> = (0..40).map(|i| format!("old{i}")).collect();
    let new: Vec<String> = (0..40).map(|i| format!("new{i}")).collect();
    let first = {
        let p = p.clone();
        let names = old.clone();
        tokio::spawn(async move {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            push_names(&p, &names).await
        })
    };
    // The second run starts while the first has `shared` in flight.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let names: Vec<&str> = new.iter().map(String::as_str).collect();
    let second = push_names(&p, &names).await.expect("second run");
    let first = first.await.expect("join").expect("first run");
    assert!(
        first.complete() && second.complete(),
        "{first:?}\n{second:?}"
    );

    let log = fake.log.lock().unwrap().clone();
    for name in std::iter::once("shared")
        .chain(old.iter().map(String::as_str))
        .chain(names.iter().copied())
    {
        let nars = log.iter().filter(|l| **l == format!("nar {name}")).count();
        assert_eq!(nars, 1, "{name} uploaded {nars} times:\n{log:?}");
    }
    let shared = position(&log, "narinfo shared").expect("shared stored");
    for name in old.iter().chain(new.iter()) {
        let at = position(&log, &format!("narinfo {name}")).expect("stored");
        assert!(at > shared, "{name} was published before its reference");
    }
    let most = fake.nars_most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most <= upload_slots(4),
        "{most} NARs stored at once, more than the {} upload slots both runs share",
        upload_slots(4)
    );
}

#[tokio::test]
async fn a_commit_that_waits_gives_its_upload_slot_back_so_the_next_ones_join_it() {
    // More independent paths than upload slots, each commit answered only once all of them
    // are handed over (as file:// commit rounds gather narinfos for one sync). Holding the
    // slot while waiting, at most `upload_slots` would ever be handed over, and every
    // answer would wait out the channel's deadline instead.
    let count = upload_slots(4) + 4;
    let names: Vec<String> = (0..count).map(|i| format!("p{i}")).collect();
    let graph: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), &[][..])).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let channel = Arc::new(Channel {
        ordered: false,
        hold: count,
        ..Default::default()
    });
    let p = pipeline(store(dir.path(), &graph), channel.clone(), dir.path());
    let started = std::time::Instant::now();
    let roots: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    let report = push_names(&p, &roots).await.expect("push");
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.pushed.len(), count);
    let handed = handed(&channel);
    assert_eq!(handed.len(), count);
    assert!(
        handed.iter().all(|(_, answered)| *answered == 0),
        "some commits were handed over only after answers: {handed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}
