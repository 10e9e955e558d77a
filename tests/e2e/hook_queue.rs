//! The durable queue, the GC roots and the post-build hook, through the library API.
//!
//! Concurrency runs in real processes: this test binary re-executes itself with
//! `NARPOST_TEST_CHILD` set, and the `child_main` test then acts as the child. Tests that
//! need Nix (`nix-instantiate`, `nix-build`, `nix-store`) or `mount` panic when they are
//! missing. Everything runs as root: "unwritable" means a read-only or full filesystem.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use narpost::format::store_path::StorePath;
use narpost::hook::{self, HookConfig, HookEnv};
use narpost::queue::{Corruption, EntryOrCorrupt, GcRoots, Queue};

const CHILD_VAR: &str = "NARPOST_TEST_CHILD";
const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command";

fn sp(i: usize, name: &str) -> StorePath {
    // Any 32 nixbase32 digits make a valid digest; vary the first ones per index.
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut digest = String::new();
    let mut n = i;
    for _ in 0..4 {
        digest.push(alphabet[n % 32] as char);
        n /= 32;
    }
    digest.push_str(&"0".repeat(28));
    StorePath::from_base(&format!("{digest}-{name}")).unwrap()
}

fn valid(items: Vec<EntryOrCorrupt>) -> Vec<narpost::queue::Entry> {
    items
        .into_iter()
        .map(|i| match i {
            EntryOrCorrupt::Valid(e) => e,
            other => panic!("unexpected corrupt entry: {other:?}"),
        })
        .collect()
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn run_hook(cfg: &HookConfig, env: &HookEnv) -> (i32, Vec<String>) {
    let mut err = Vec::new();
    let code = hook::run_to(cfg, env, &mut err);
    let text = String::from_utf8(err).unwrap();
    (code, text.lines().map(str::to_owned).collect())
}

fn hook_config(root: &Path) -> HookConfig {
    HookConfig {
        state_dir: root.join("state"),
        gcroots_dir: root.join("gcroots"),
    }
}

fn out_paths(paths: &[StorePath]) -> HookEnv {
    HookEnv {
        out_paths: Some(
            paths
                .iter()
                .map(StorePath::to_absolute)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        drv_path: None,
    }
}

/// A tmpfs mounted for the lifetime of the value.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, options: &str) -> Mount {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount: cannot run it; these tests need mount(8) and root");
        assert!(
            out.status.success(),
            "mount -t tmpfs -o {options} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------------------
// Child processes

/// Does nothing in a normal run; when re-executed with `NARPOST_TEST_CHILD`, it is the child.
#[test]
fn child_main() {
    let Ok(mode) = std::env::var(CHILD_VAR) else {
        return;
    };
    let state = PathBuf::from(std::env::var("NARPOST_TEST_STATE").unwrap());
    match mode.as_str() {
        "enqueue" => {
            let worker: usize = std::env::var("NARPOST_TEST_WORKER")
                .unwrap()
                .parse()
                .unwrap();
            let count: usize = std::env::var("NARPOST_TEST_COUNT")
                .unwrap()
                .parse()
                .unwrap();
            // Wait for the go signal so that all children enqueue at the same time.
            let go = state.join("go");
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let queue = Queue::open(&state).unwrap();
            for n in 0..count {
                let p = sp(worker * 1000 + n, &format!("w{worker}-n{n}"));
                queue.enqueue(&[p], None).unwrap();
            }
            std::process::exit(0);
        }
        "hook" => {
            let cfg = HookConfig {
                state_dir: state,
                gcroots_dir: PathBuf::from(std::env::var("NARPOST_TEST_ROOTS").unwrap()),
            };
            std::process::exit(hook::run(cfg, HookEnv::from_env()));
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn child(mode: &str, envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "hook_queue::child_main",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_VAR, mode);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn eight_processes_enqueue_1600_entries_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    fs::create_dir(&state).unwrap();
    let state_s = state.to_str().unwrap();
    let children: Vec<_> = (0..8)
        .map(|w| {
            child(
                "enqueue",
                &[
                    ("NARPOST_TEST_STATE", state_s),
                    ("NARPOST_TEST_WORKER", &w.to_string()),
                    ("NARPOST_TEST_COUNT", "200"),
                ],
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    fs::write(state.join("go"), "").unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }

    let queue = Queue::open(&state).unwrap();
    let entries = valid(queue.list().unwrap());
    assert_eq!(entries.len(), 1600);
    assert_eq!(queue.depth().unwrap(), 1600);
    let names: BTreeSet<String> = entries
        .iter()
        .flat_map(|e| e.paths.iter().map(|p| p.name().to_owned()))
        .collect();
    let expected: BTreeSet<String> = (0..8)
        .flat_map(|w| (0..200).map(move |n| format!("w{w}-n{n}")))
        .collect();
    assert_eq!(names, expected);
    // Listed oldest first, and every worker's own entries in the order it wrote them.
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));
    assert!(
        entries
            .windows(2)
            .all(|w| w[0].id.queued_at() <= w[1].id.queued_at())
    );
    for w in 0..8 {
        let mine: Vec<usize> = entries
            .iter()
            .filter_map(|e| {
                let name = e.paths[0].name();
                let rest = name.strip_prefix(&format!("w{w}-n"))?;
                rest.parse().ok()
            })
            .collect();
        assert_eq!(mine, (0..200).collect::<Vec<_>>(), "worker {w}");
    }
    assert!(dir_names(&state.join("tmp")).is_empty());
    assert!(dir_names(&state.join("corrupt")).is_empty());
}

// ---------------------------------------------------------------------------------------
// The queue

#[test]
fn entries_round_trip_with_private_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::open(tmp.path()).unwrap();
    let before = SystemTime::now();
    let drv = sp(9, "x.drv").to_absolute();
    let id = queue
        .enqueue(&[sp(1, "x"), sp(2, "x-dev")], Some(&drv))
        .unwrap();
    let after = SystemTime::now();
    let entry = match queue.read(&id).unwrap() {
        Some(EntryOrCorrupt::Valid(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(entry.id, id);
    assert_eq!(entry.paths, [sp(1, "x"), sp(2, "x-dev")]);
    assert_eq!(entry.drv.as_deref(), Some(drv.as_str()));
    assert!(before <= entry.queued_at && entry.queued_at <= after);
    assert!(queue.enqueue(&[], None).is_err());

    for d in ["queue", "tmp", "corrupt", "failed"] {
        let mode = fs::metadata(tmp.path().join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{d}");
    }
    let file = queue.queue_dir().join(id.as_str());
    assert_eq!(
        fs::metadata(file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn list_except_reads_only_what_is_not_known_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::open(tmp.path()).unwrap();
    let a = queue.enqueue(&[sp(1, "a")], None).unwrap();
    let b = queue.enqueue(&[sp(2, "b")], None).unwrap();
    let known: std::collections::HashSet<_> = [a.clone(), b.clone()].into();
    assert!(queue.list_except(&known).unwrap().is_empty());
    let c = queue.enqueue(&[sp(3, "c")], None).unwrap();
    // A known entry is not even opened: garbage written over it goes unnoticed here.
    fs::write(queue.queue_dir().join(a.as_str()), b"garbage").unwrap();
    let fresh = valid(queue.list_except(&known).unwrap());
    assert_eq!(fresh.iter().map(|e| &e.id).collect::<Vec<_>>(), [&c]);
    assert_eq!(fresh[0].paths, [sp(3, "c")]);
    // The full listing still sees it, and sets it aside.
    let all = queue.list().unwrap();
    assert_eq!(all.len(), 3);
    assert!(matches!(&all[0], EntryOrCorrupt::Corrupt { .. }), "{all:?}");
}

#[test]
fn corrupt_files_are_quarantined_by_name_and_valid_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::open(tmp.path()).unwrap();
    let ids: Vec<_> = (0..3)
        .map(|i| queue.enqueue(&[sp(i, "ok")], None).unwrap())
        .collect();
    let good = fs::read(queue.queue_dir().join(ids[0].as_str())).unwrap();

    // Names between the valid ones, in time order, so listing must skip past each.
    let name = |t: u64| format!("{t:020}-42-00000000000000{t:02x}.entry");
    let qdir = queue.queue_dir().to_path_buf();
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let cases: Vec<(String, Vec<u8>)> = vec![
        (name(1), good[..good.len() / 2].to_vec()),
        (name(2), b"garbage, not a queue entry at all".to_vec()),
        (name(3), Vec::new()),
        (name(4), flipped),
        (name(5), [good.clone(), b"extra".to_vec()].concat()),
        ("notes.txt".to_owned(), b"left by someone".to_vec()),
    ];
    for (n, bytes) in &cases {
        fs::write(qdir.join(n), bytes).unwrap();
    }

    let listed = queue.list().unwrap();
    let mut corrupt = Vec::new();
    let mut ok = Vec::new();
    for item in listed {
        match item {
            EntryOrCorrupt::Valid(e) => ok.push(e.id),
            EntryOrCorrupt::Corrupt {
                file,
                reason,
                quarantined_to,
            } => {
                let to = quarantined_to.expect("quarantined");
                assert!(to.exists(), "{}", to.display());
                assert!(to.starts_with(tmp.path().join("corrupt")));
                let note = fs::read_to_string(format!("{}.reason", to.display())).unwrap();
                assert_eq!(note.trim(), reason.to_string());
                corrupt.push((file, reason));
            }
        }
    }
    assert_eq!(ok, ids);
    let by_name: std::collections::HashMap<_, _> = corrupt.into_iter().collect();
    assert_eq!(by_name.len(), cases.len(), "{by_name:?}");
    assert!(matches!(by_name[&name(1)], Corruption::Truncated { .. }));
    assert_eq!(by_name[&name(2)], Corruption::BadMagic);
    assert!(matches!(
        by_name[&name(3)],
        Corruption::Truncated { actual: 0, .. }
    ));
    assert!(matches!(by_name[&name(4)], Corruption::Checksum { .. }));
    assert!(matches!(
        by_name[&name(5)],
        Corruption::TrailingBytes { .. }
    ));
    assert_eq!(by_name["notes.txt"], Corruption::BadName);

    // Quarantined files are gone from the queue; the valid ones are untouched.
    assert_eq!(
        valid(queue.list().unwrap())
            .into_iter()
            .map(|e| e.id)
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(queue.depth().unwrap(), 3);
}

#[test]
fn read_reports_a_corrupt_entry_and_entries_skips_it() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::open(tmp.path()).unwrap();
    let id = queue.enqueue(&[sp(1, "a")], None).unwrap();
    let keep = queue.enqueue(&[sp(2, "b")], None).unwrap();
    let file = queue.queue_dir().join(id.as_str());
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
    match queue.read(&id).unwrap() {
        Some(EntryOrCorrupt::Corrupt { file, reason, .. }) => {
            assert_eq!(file, id.as_str());
            assert!(matches!(reason, Corruption::Truncated { .. }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(queue.read(&id).unwrap(), None);
    let entries = queue.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, keep);
}

#[test]
fn stale_temp_files_are_removed_at_open_and_fresh_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Queue::open(tmp.path()).unwrap());
    let tdir = tmp.path().join("tmp");
    let stale = tdir.join("00000000000000000001-7-0000000000000001.entry");
    let fresh = tdir.join("00000000000000000002-7-0000000000000002.entry");
    fs::write(&stale, b"NARPOSTQ half writ").unwrap();
    fs::write(&fresh, b"NARPOSTQ being writ").unwrap();
    let old = SystemTime::now() - Duration::from_secs(120);
    fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();

    let queue = Queue::open(tmp.path()).unwrap();
    assert!(
        !stale.exists(),
        "a temp file older than a minute is a crash leftover"
    );
    assert!(
        fresh.exists(),
        "a fresh temp file may belong to a running producer"
    );
    assert!(
        queue.list().unwrap().is_empty(),
        "temp files are never entries"
    );
}

#[test]
fn ack_fail_and_failed_records() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::open(tmp.path()).unwrap();
    assert_eq!(queue.oldest_age().unwrap(), None);
    let a = queue.enqueue(&[sp(1, "a")], Some("/nix/store/x")).unwrap();
    let b = queue.enqueue(&[sp(2, "b"), sp(3, "c")], None).unwrap();
    let age = queue.oldest_age().unwrap().unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");

    queue.fail(&b, "b: the cache refused it (403)").unwrap();
    let failed = queue.failed().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, b);
    assert_eq!(failed[0].paths, [sp(2, "b"), sp(3, "c")]);
    assert_eq!(failed[0].reason, "b: the cache refused it (403)");
    assert!(failed[0].failed_at >= failed[0].queued_at);
    assert!(queue.fail(&b, "again").is_err(), "b is no longer queued");

    let left = valid(queue.list().unwrap());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, a);
    queue.ack(&a).unwrap();
    queue.ack(&a).unwrap();
    assert_eq!(queue.depth().unwrap(), 0);
    assert_eq!(queue.oldest_age().unwrap(), None);
}

#[test]
fn a_fail_interrupted_before_removing_the_entry_is_finished_by_list() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = Queue::open(tmp.path()).unwrap();
    let id = queue.enqueue(&[sp(1, "a")], None).unwrap();
    let file = queue.queue_dir().join(id.as_str());
    let bytes = fs::read(&file).unwrap();
    queue.fail(&id, "permanent").unwrap();
    // The crash: the failure record is durable, the unlink did not happen.
    fs::write(&file, bytes).unwrap();
    assert!(queue.list().unwrap().is_empty());
    assert!(!file.exists());
    assert_eq!(queue.failed().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// GC roots in a temporary directory

#[test]
fn gc_roots_are_symlinks_created_idempotently_and_released() {
    let tmp = tempfile::tempdir().unwrap();
    let roots = GcRoots::new(tmp.path().join("roots"));
    let (a, b) = (sp(1, "a"), sp(2, "b"));
    roots.protect_all(&[a.clone(), b.clone()]).unwrap();
    roots.protect(&a).unwrap();
    let link = tmp.path().join("roots").join(a.base());
    assert_eq!(
        fs::read_link(&link).unwrap(),
        PathBuf::from(a.to_absolute())
    );
    assert_eq!(roots.list().unwrap(), [a.clone(), b.clone()]);

    // A link pointing elsewhere under the name is replaced, not trusted.
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/nix/store/elsewhere", &link).unwrap();
    roots.protect(&a).unwrap();
    assert_eq!(
        fs::read_link(&link).unwrap(),
        PathBuf::from(a.to_absolute())
    );
    assert_eq!(
        dir_names(&tmp.path().join("roots")).len(),
        2,
        "no temp links left"
    );

    roots.release(&a);
    roots.try_release(&a).unwrap();
    assert_eq!(roots.list().unwrap(), [b]);
}

// ---------------------------------------------------------------------------------------
// The hook

#[test]
fn hook_queues_valid_out_paths_roots_them_and_reports_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hook_config(tmp.path());
    let (a, b) = (sp(1, "a"), sp(2, "b-dev"));
    let env = HookEnv {
        out_paths: Some(format!(
            "{} relative/path {} /nix/store/tooshort {}/bin/sh",
            a.to_absolute(),
            b.to_absolute(),
            a.to_absolute()
        )),
        drv_path: Some(sp(3, "b.drv").to_absolute()),
    };
    let (code, lines) = run_hook(&cfg, &env);
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, bad) in lines.iter().zip([
        "relative/path".to_owned(),
        "/nix/store/tooshort".to_owned(),
        format!("{}/bin/sh", a.to_absolute()),
    ]) {
        assert!(line.starts_with("narpost hook: OUT_PATHS: "), "{line}");
        assert!(line.contains(&format!("{bad:?}")), "{line}");
    }

    let queue = Queue::open(&cfg.state_dir).unwrap();
    let entries = valid(queue.list().unwrap());
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].paths, [a.clone(), b.clone()]);
    assert_eq!(entries[0].drv, Some(sp(3, "b.drv").to_absolute()));
    assert_eq!(GcRoots::new(&cfg.gcroots_dir).list().unwrap(), [a, b]);
}

#[test]
fn hook_without_outputs_or_with_a_missing_drv_prints_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hook_config(tmp.path());
    // A store path that names no file, and a path outside the store that is never read.
    let missing = sp(4, "gone.drv").to_absolute();
    let outside = tmp.path().join("elsewhere.drv");
    fs::write(&outside, "Derive(").unwrap();
    let cases = [
        ("nothing set", HookEnv::default(), "OUT_PATHS and DRV_PATH"),
        (
            "drv missing",
            HookEnv {
                out_paths: Some(" ".into()),
                drv_path: Some(missing.clone()),
            },
            "cannot read the derivation",
        ),
        (
            "drv outside the store",
            HookEnv {
                out_paths: None,
                drv_path: Some(outside.to_str().unwrap().into()),
            },
            "not in /nix/store",
        ),
    ];
    for (name, env, expected) in cases {
        let (code, lines) = run_hook(&cfg, &env);
        assert_eq!(code, 0, "{name}");
        assert_eq!(lines.len(), 1, "{name}: {lines:?}");
        assert!(lines[0].starts_with("narpost hook: "), "{name}: {lines:?}");
        assert!(lines[0].contains(expected), "{name}: {lines:?}");
    }
    assert!(
        !cfg.state_dir.exists(),
        "nothing to queue, so nothing was created"
    );
}

#[test]
fn hook_on_read_only_state_dir_prints_one_line_and_creates_no_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("ro");
    fs::create_dir(&mnt).unwrap();
    let _mount = Mount::tmpfs(&mnt, "size=64k,ro");
    let cfg = HookConfig {
        state_dir: mnt.join("state"),
        gcroots_dir: tmp.path().join("gcroots"),
    };
    let (code, lines) = run_hook(&cfg, &out_paths(&[sp(1, "a")]));
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("narpost hook: "), "{lines:?}");
    assert!(lines[0].contains("Read-only file system"), "{lines:?}");
    assert!(
        lines[0].contains(&sp(1, "a").to_absolute()),
        "names what is lost: {lines:?}"
    );
    assert!(
        lines[0].contains("narpost push"),
        "says what to do: {lines:?}"
    );
    assert!(!cfg.gcroots_dir.exists());
}

#[test]
fn hook_process_with_unusable_state_dir_exits_0_with_one_stderr_line() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where a directory is needed: no permission bit stops root, this does.
    let blocker = tmp.path().join("file");
    fs::write(&blocker, "").unwrap();
    let state = blocker.join("state");
    let roots = tmp.path().join("roots");
    let out: Output = child(
        "hook",
        &[
            ("NARPOST_TEST_STATE", state.to_str().unwrap()),
            ("NARPOST_TEST_ROOTS", roots.to_str().unwrap()),
            ("OUT_PATHS", &sp(1, "a").to_absolute()),
            ("DRV_PATH", ""),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("narpost hook: "), "{stderr}");
    assert!(lines[0].contains("Not a directory"), "{stderr}");
}

#[test]
fn hook_on_full_disk_prints_one_line_and_keeps_earlier_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let _mount = Mount::tmpfs(&mnt, "size=64k");
    let cfg = HookConfig {
        state_dir: mnt.join("state"),
        gcroots_dir: tmp.path().join("gcroots"),
    };
    let queue = Queue::open(&cfg.state_dir).unwrap();
    let earlier: Vec<_> = (0..3)
        .map(|i| queue.enqueue(&[sp(i, "early")], None).unwrap())
        .collect();

    // Fill the filesystem until it refuses more.
    let mut filler = fs::File::create(mnt.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    let full = loop {
        if let Err(e) = std::io::Write::write_all(&mut filler, &chunk) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(28), "ENOSPC expected: {full}");
    drop(filler);

    let (code, lines) = run_hook(&cfg, &out_paths(&[sp(7, "late")]));
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("narpost hook: "), "{lines:?}");
    assert!(lines[0].contains("No space left on device"), "{lines:?}");
    assert!(lines[0].contains(&sp(7, "late").to_absolute()), "{lines:?}");

    let entries = valid(queue.list().unwrap());
    assert_eq!(
        entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        earlier
    );
    assert!(
        dir_names(&cfg.state_dir.join("tmp")).is_empty(),
        "no temp file left"
    );

    // Once there is room again, the hook works.
    fs::remove_file(mnt.join("filler")).unwrap();
    let (code, lines) = run_hook(&cfg, &out_paths(&[sp(7, "late")]));
    assert_eq!((code, lines.len()), (0, 0), "{lines:?}");
    assert_eq!(queue.depth().unwrap(), 4);
}

#[test]
fn wrapper_script_exits_0_when_narpost_is_missing_and_passes_its_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hook/narpost-hook");
    let out = Command::new(&script)
        .env("NARPOST_BIN", tmp.path().join("no-such-narpost"))
        .output()
        .expect("hook/narpost-hook: cannot run it");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("narpost hook: "), "{stderr}");

    // A stand-in that records its arguments and then dies.
    let fake = tmp.path().join("fake-narpost");
    let args_file = tmp.path().join("args");
    fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" > {}\nexit 3\n", args_file.display()),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let config = tmp.path().join("narpost.toml");
    fs::write(&config, "").unwrap();
    let out = Command::new(&script)
        .env("NARPOST_BIN", &fake)
        .env("NARPOST_CONFIG", &config)
        .env("NARPOST_STATE_DIR", tmp.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "a failing narpost never fails the build"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("status 3"), "{stderr}");
    assert_eq!(
        fs::read_to_string(&args_file).unwrap().trim(),
        format!(
            "--state-dir {} --config {} hook",
            tmp.path().join("state").display(),
            config.display()
        )
    );
}

// ---------------------------------------------------------------------------------------
// Real Nix

fn nix(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: cannot run it ({e}); these tests need Nix installed"))
}

fn nix_ok(cmd: &str, args: &[&str]) -> String {
    let out = nix(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn nonce() -> String {
    let t = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{t}-{}", std::process::id())
}

#[test]
fn hook_reads_outputs_from_a_real_drv_when_out_paths_is_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let expr = format!(
        r#"builtins.derivation {{
            name = "narpost-hook-drv-test";
            system = builtins.currentSystem;
            builder = "/bin/sh";
            PATH = "/bin:/usr/bin";
            outputs = [ "out" "dev" ];
            args = [ "-c" "echo {} > $out; echo dev > $dev" ];
        }}"#,
        nonce()
    );
    let drv = nix_ok("nix-instantiate", &["-E", &expr]);
    assert!(drv.ends_with(".drv"), "{drv}");
    let expected: BTreeSet<StorePath> = nix_ok("nix-store", &["-q", "--outputs", &drv])
        .lines()
        .map(|l| StorePath::from_absolute(l).unwrap())
        .collect();
    assert_eq!(expected.len(), 2);

    let cfg = hook_config(tmp.path());
    let env = HookEnv {
        out_paths: Some(String::new()),
        drv_path: Some(drv.clone()),
    };
    let (code, lines) = run_hook(&cfg, &env);
    assert_eq!((code, lines.len()), (0, 0), "{lines:?}");
    let entries = valid(Queue::open(&cfg.state_dir).unwrap().list().unwrap());
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].paths.iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );
    assert_eq!(entries[0].drv.as_deref(), Some(drv.as_str()));
    let rooted: BTreeSet<_> = GcRoots::new(&cfg.gcroots_dir)
        .list()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(rooted, expected);
}

/// Removes the roots directory even when an assertion fails.
struct RootsDir(PathBuf);

impl Drop for RootsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A root in Nix's real gcroots tree keeps a path through garbage collection. The collector
/// is asked which paths are dead (`--print-dead`, which deletes nothing) and to delete this
/// one path (`--delete`, which honours roots like `--gc` does); a full `nix-store --gc` would
/// also delete paths other tests on this machine built and have not rooted.
#[test]
fn gc_root_in_nix_gcroots_keeps_a_path_alive_until_released() {
    let tmp = tempfile::tempdir().unwrap();
    let nix_file = tmp.path().join("default.nix");
    fs::write(
        &nix_file,
        format!(
            r#"builtins.derivation {{
                name = "narpost-gcroot-test";
                system = builtins.currentSystem;
                builder = "/bin/sh";
                PATH = "/bin:/usr/bin";
                args = [ "-c" "echo {} > $out" ];
            }}"#,
            nonce()
        ),
    )
    .unwrap();
    let built = nix_ok("nix-build", &[nix_file.to_str().unwrap(), "--no-out-link"]);
    let path = StorePath::from_absolute(&built).unwrap();

    let dir = PathBuf::from(format!("/nix/var/nix/gcroots/narpost-test-{}", nonce()));
    let _cleanup = RootsDir(dir.clone());
    let roots = GcRoots::new(&dir);
    roots.protect(&path).unwrap();

    let dead = nix_ok("nix-store", &["--gc", "--print-dead"]);
    assert!(
        !dead.lines().any(|l| l == built),
        "rooted path listed as dead"
    );
    let refused = nix("nix-store", &["--delete", &built]);
    assert!(
        !refused.status.success(),
        "nix-store --delete removed a rooted path"
    );
    assert!(Path::new(&built).exists());

    roots.try_release(&path).unwrap();
    let dead = nix_ok("nix-store", &["--gc", "--print-dead"]);
    assert!(
        dead.lines().any(|l| l == built),
        "released path not dead: {built}"
    );
    nix_ok("nix-store", &["--delete", &built]);
    assert!(!Path::new(&built).exists());
}
