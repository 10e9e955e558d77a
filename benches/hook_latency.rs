//! What a build waits for after it finishes: `narpost hook` with 10,000 entries already queued
//! and the cache down, next to a post-build hook that runs `nix copy` to a cache that is up.
//!
//! `cargo bench --bench hook_latency` prints one table: p50, p99 and max over 1,000 runs of
//! each way to run the hook. Each run is a new process, as Nix starts it, given an empty
//! `OUT_PATHS` and the `.drv` of a derivation of its own, as Nix 2.8 gives after a build, so
//! every run makes a new GC root and a new entry. The ways take turns, one run each, so a
//! noisy moment on the machine lands on all of them alike. For scale: starting any process
//! (`/bin/true`), one fdatasync, the hook's work without a process, and `nix copy` per
//! build (each build's output new to the cache). Under `cargo test` (no `--bench`) it runs
//! a small version as a smoke test.

#[path = "../tests/e2e/common/mod.rs"]
mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use narpost::queue::Queue;

/// One timed run of a row, given the run's number.
type Measure<'a> = Box<dyn Fn(usize) -> Duration + 'a>;

struct Sizes {
    queued: usize,
    runs: usize,
    copies: usize,
}

fn main() {
    let sizes = if std::env::args().any(|a| a == "--bench") {
        Sizes {
            queued: 10_000,
            runs: 1_000,
            copies: 20,
        }
    } else {
        Sizes {
            queued: 200,
            runs: 20,
            copies: 2,
        }
    };
    let env = Env::new();
    let state = env.state();

    // The hook parses a build's .drv and roots its outputs. Every real build has new outputs,
    // so each run gets a derivation of its own: `runs` of them, instantiated, not built (the
    // hook never looks at the outputs themselves). One is built, to have a real entry to copy
    // into the deep queue. `copies` builds for `nix copy`.
    let mut expr = nix_prelude(&nonce());
    expr.push_str(&format!(
        "{{\n  hooked = builtins.genList (i: mk \"narpost-bench-hooked${{toString i}}\" \"echo $out > $out\") {};\n",
        sizes.runs
    ));
    for i in 0..sizes.copies {
        expr.push_str(&format!(
            "  c{i} = mk \"narpost-bench-copy{i}\" \"mkdir $out; head -c 65536 /dev/urandom > $out/data; echo {i} > $out/n\";\n"
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix("bench.nix", &expr);
    let drvs: Vec<String> = stdout(&run(nix("nix-instantiate")
        .arg(&file)
        .args(["-A", "hooked"])))
    .lines()
    .map(|l| l.trim().to_owned())
    .collect();
    assert_eq!(drvs.len(), sizes.runs, "one derivation per run");
    assert!(drvs.iter().all(|d| d.ends_with(".drv")), "{drvs:?}");
    let copy_attrs: Vec<String> = (0..sizes.copies).map(|i| format!("c{i}")).collect();
    let copy_attrs: Vec<&str> = copy_attrs.iter().map(String::as_str).collect();
    let to_copy = nix_build(&file, &copy_attrs, &[]);

    // A deep queue: one real entry, copied under fresh names (the hook never reads them,
    // so their contents do not matter; their number in the directory does).
    let queue = Queue::open(&state).expect("open the queue");
    let first = queue
        .enqueue(std::slice::from_ref(&to_copy[0]), None)
        .expect("enqueue");
    let bytes = fs::read(queue.queue_dir().join(first.as_str())).expect("read an entry");
    for i in 1..sizes.queued {
        let name = format!("{:020}-{:010}-{:016x}.entry", 1_000_000 + i, 1, i);
        fs::write(queue.queue_dir().join(name), &bytes).expect("write an entry");
    }
    assert_eq!(queue.depth().expect("depth"), sizes.queued);

    let dead_cache = format!("http://127.0.0.1:{}", free_port());
    // Each way of running the hook roots the same outputs, so each gets its own roots
    // directory: every run then creates a new root, as after a real build.
    let roots = |variant: &str| env.path().join(format!("gcroots-{variant}"));
    let hook_cmd = |i: usize| {
        let mut cmd = env.narpost();
        cmd.env("NARPOST_GC_ROOTS_DIR", roots("narpost"))
            .env("NARPOST_CACHE", &dead_cache)
            .env("OUT_PATHS", "")
            .env("DRV_PATH", &drvs[i])
            .arg("hook");
        cmd
    };
    let small_cmd = |program: &Path, variant: &str, i: usize| {
        let mut cmd = Command::new(program);
        cmd.env("NARPOST_BIN", env!("CARGO_BIN_EXE_narpost-hook"))
            .env("NARPOST_STATE_DIR", &state)
            .env("NARPOST_GC_ROOTS_DIR", roots(variant))
            .env("NARPOST_CACHE", &dead_cache)
            .env("OUT_PATHS", "")
            .env("DRV_PATH", &drvs[i]);
        cmd
    };
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("hook/narpost-hook");
    let small = Path::new(env!("CARGO_BIN_EXE_narpost-hook"));

    let in_process = |i: usize| {
        let cfg = narpost::hook::HookConfig {
            state_dir: state.clone(),
            gcroots_dir: roots("in-process"),
        };
        let env = narpost::hook::HookEnv {
            out_paths: Some(String::new()),
            drv_path: Some(drvs[i].clone()),
        };
        let mut said = Vec::new();
        let start = Instant::now();
        narpost::hook::run_to(&cfg, &env, &mut said);
        let took = start.elapsed();
        assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
        took
    };
    let sync_file = |i: usize| {
        let path = env.path().join(format!("sync-{i}"));
        let start = Instant::now();
        let mut f = fs::File::create(&path).expect("create a file");
        f.write_all(&bytes).expect("write");
        f.sync_data().expect("fdatasync");
        // Kept, not removed: on ext4 without a journal, a freshly deleted inode makes every
        // file created for the next 30 seconds search past it, which would slow the other rows.
        start.elapsed()
    };

    // Rows, in table order. They take turns, one run each, so a noisy moment on the machine
    // lands on every row alike rather than on whichever row happened to be running.
    let rows: Vec<(&str, Measure)> = vec![
        // For scale: what starting any process costs, and one fdatasync of a new small file
        // on the disk holding the state directory.
        (
            "start a process (/bin/true), for scale",
            Box::new(|_| time_one(Command::new("/bin/true"))),
        ),
        (
            "fdatasync a new 200-byte file, for scale",
            Box::new(sync_file),
        ),
        // The hook's own work without starting a process.
        (
            "the hook's work in-process (hook::run_to)",
            Box::new(in_process),
        ),
        (
            "narpost hook (DRV_PATH, empty OUT_PATHS)",
            Box::new(|i| time_one(hook_cmd(i))),
        ),
        (
            "narpost-hook (the small hook binary)",
            Box::new(|i| time_one(small_cmd(small, "small", i))),
        ),
        (
            "hook/narpost-hook (sh wrapper + narpost-hook)",
            Box::new(|i| time_one(small_cmd(&wrapper, "wrapper", i))),
        ),
    ];
    // The deep queue was written just now; on a real machine it built up over hours and is
    // long on disk. Write it back first, so the runs do not compete with its writeback.
    run(&mut Command::new("sync"));
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(sizes.runs); rows.len()];
    for i in 0..sizes.runs {
        for (k, (_, measure)) in rows.iter().enumerate() {
            times[k].push(measure(i));
        }
    }
    assert_eq!(
        queue.depth().expect("depth"),
        sizes.queued + 4 * sizes.runs,
        "every hook run queued one entry"
    );
    for variant in ["in-process", "narpost", "small", "wrapper"] {
        let rooted = fs::read_dir(roots(variant)).expect("list roots").count();
        assert_eq!(
            rooted, sizes.runs,
            "every {variant} hook run rooted its output"
        );
    }

    let nginx = Nginx::start(env.path());
    let file_cache = format!(
        "file://{}?compression=zstd",
        env.path().join("copy-cache").display()
    );
    let http_cache = format!("{}?compression=zstd", nginx.url());
    let half = to_copy.len() / 2;
    let file_copy = time_each(half.max(1), |i| {
        let mut cmd = nix("nix");
        cmd.args(["copy", "--to", &file_cache])
            .arg(to_copy[i].to_absolute());
        cmd
    });
    let http_copy = time_each(to_copy.len() - half.max(1), |i| {
        let mut cmd = nix("nix");
        cmd.args(["copy", "--to", &http_cache])
            .arg(to_copy[half.max(1) + i].to_absolute());
        cmd
    });

    println!(
        "hook latency: {} runs each, {} entries queued at the start, cache down",
        sizes.runs, sizes.queued
    );
    println!(
        "{:<46} {:>6} {:>9} {:>9} {:>9}",
        "what a build waits for", "runs", "p50", "p99", "max"
    );
    for ((what, _), times) in rows.iter().zip(&times) {
        row(what, times);
    }
    row("nix copy --to file://...?compression=zstd", &file_copy);
    row("nix copy --to http://nginx?compression=zstd", &http_copy);
}

/// Runs a command once; it must succeed and say nothing.
fn time_one(mut cmd: Command) -> Duration {
    let start = Instant::now();
    let out = cmd.output().expect("run a benchmarked command");
    let took = start.elapsed();
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    assert!(out.stderr.is_empty(), "{cmd:?}: {}", stderr(&out));
    took
}

/// Runs the command `make(i)` builds `n` times, one after another; each must succeed
/// (`nix copy` may print progress, so unlike [`time_one`] its output is not checked).
fn time_each(n: usize, make: impl Fn(usize) -> Command) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = make(i);
        let start = Instant::now();
        let out = cmd.output().expect("run a benchmarked command");
        times.push(start.elapsed());
        assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    }
    times
}

fn row(what: &str, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let at =
        |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    let ms = |d: Duration| format!("{:.2}ms", d.as_secs_f64() * 1e3);
    println!(
        "{what:<46} {:>6} {:>9} {:>9} {:>9}",
        sorted.len(),
        ms(at(0.50)),
        ms(at(0.99)),
        ms(sorted[sorted.len() - 1])
    );
}
