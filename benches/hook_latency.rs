//! What a build waits for after it finishes: `narpost hook` with 10,000 entries already queued
//! and the cache down, next to a post-build hook that runs `nix copy` to a cache that is up.
//!
//! `cargo bench --bench hook_latency` prints one table: p50, p99 and max over 1,000 hook runs
//! (each a new process, as Nix starts it, given an empty `OUT_PATHS` and the `.drv`, as Nix
//! 2.8 does), the same through the shipped sh wrapper, the cost of starting any process at
//! all, and `nix copy` per build (each build's output is new to the cache). Under
//! `cargo test` (no `--bench`) it runs a small version as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use narpost::queue::Queue;

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
    let gcroots = env.path().join("gcroots");

    // One build for the hook (its .drv is what the hook parses), `copies` for `nix copy`.
    let mut expr = nix_prelude(&nonce());
    expr.push_str("{\n  hooked = mk \"narpost-bench-hooked\" \"echo hooked > $out\";\n");
    for i in 0..sizes.copies {
        expr.push_str(&format!(
            "  c{i} = mk \"narpost-bench-copy{i}\" \"mkdir $out; head -c 65536 /dev/urandom > $out/data; echo {i} > $out/n\";\n"
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix("bench.nix", &expr);
    let hooked = nix_build(&file, &["hooked"], &[]).remove(0);
    let drv = stdout(&run(nix("nix-store")
        .args(["-q", "--deriver"])
        .arg(hooked.to_absolute())))
    .trim()
    .to_owned();
    assert!(drv.ends_with(".drv"), "{drv}");
    let copy_attrs: Vec<String> = (0..sizes.copies).map(|i| format!("c{i}")).collect();
    let copy_attrs: Vec<&str> = copy_attrs.iter().map(String::as_str).collect();
    let to_copy = nix_build(&file, &copy_attrs, &[]);

    // A deep queue: one real entry, copied under fresh names (the hook never reads them,
    // so their contents do not matter; their number in the directory does).
    let queue = Queue::open(&state).expect("open the queue");
    let first = queue
        .enqueue(std::slice::from_ref(&hooked), Some(&drv))
        .expect("enqueue");
    let bytes = fs::read(queue.queue_dir().join(first.as_str())).expect("read an entry");
    for i in 1..sizes.queued {
        let name = format!("{:020}-{:010}-{:016x}.entry", 1_000_000 + i, 1, i);
        fs::write(queue.queue_dir().join(name), &bytes).expect("write an entry");
    }
    assert_eq!(queue.depth().expect("depth"), sizes.queued);

    let dead_cache = format!("http://127.0.0.1:{}", free_port());
    let hook_cmd = || {
        let mut cmd = env.narpost();
        cmd.env("NARPOST_CACHE", &dead_cache)
            .env("OUT_PATHS", "")
            .env("DRV_PATH", &drv)
            .arg("hook");
        cmd
    };
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("hook/narpost-hook");
    let wrapper_cmd = || {
        let mut cmd = Command::new(&wrapper);
        cmd.env("NARPOST_BIN", env!("CARGO_BIN_EXE_narpost-hook"))
            .env("NARPOST_STATE_DIR", &state)
            .env("NARPOST_GC_ROOTS_DIR", &gcroots)
            .env("NARPOST_CACHE", &dead_cache)
            .env("OUT_PATHS", "")
            .env("DRV_PATH", &drv);
        cmd
    };

    // For scale: what any process costs to start, and what one fdatasync of a new small
    // file costs on the disk holding the state directory (the hook needs one, plus a
    // directory fsync, to keep its promise that the entry survives a power loss).
    let spawn = time_each(sizes.runs, true, |_| Command::new("/bin/true"));
    let sync = (0..sizes.runs)
        .map(|i| {
            let path = env.path().join(format!("sync-{i}"));
            let start = Instant::now();
            let mut f = fs::File::create(&path).expect("create a file");
            f.write_all(&bytes).expect("write");
            f.sync_data().expect("fdatasync");
            let took = start.elapsed();
            let _ = fs::remove_file(&path);
            took
        })
        .collect::<Vec<_>>();
    // The hook's own work in this process: no process start, the same disk writes.
    let in_process = (0..sizes.runs)
        .map(|_| {
            let cfg = narpost::hook::HookConfig {
                state_dir: state.clone(),
                gcroots_dir: gcroots.clone(),
            };
            let env = narpost::hook::HookEnv {
                out_paths: Some(String::new()),
                drv_path: Some(drv.clone()),
            };
            let mut said = Vec::new();
            let start = Instant::now();
            narpost::hook::run_to(&cfg, &env, &mut said);
            let took = start.elapsed();
            assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
            took
        })
        .collect::<Vec<_>>();
    let small_cmd = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_narpost-hook"));
        cmd.env("NARPOST_STATE_DIR", &state)
            .env("NARPOST_GC_ROOTS_DIR", &gcroots)
            .env("NARPOST_CACHE", &dead_cache)
            .env("OUT_PATHS", "")
            .env("DRV_PATH", &drv);
        cmd
    };
    let direct = time_each(sizes.runs, true, |_| hook_cmd());
    let small = time_each(sizes.runs, true, |_| small_cmd());
    let wrapped = time_each(sizes.runs, true, |_| wrapper_cmd());
    assert_eq!(
        queue.depth().expect("depth"),
        sizes.queued + 4 * sizes.runs,
        "every hook run queued one entry"
    );

    let nginx = Nginx::start(env.path());
    let file_cache = format!(
        "file://{}?compression=zstd",
        env.path().join("copy-cache").display()
    );
    let http_cache = format!("{}?compression=zstd", nginx.url());
    let half = to_copy.len() / 2;
    let file_copy = time_each(half.max(1), false, |i| {
        let mut cmd = nix("nix");
        cmd.args(["copy", "--to", &file_cache])
            .arg(to_copy[i].to_absolute());
        cmd
    });
    let http_copy = time_each(to_copy.len() - half.max(1), false, |i| {
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
    row("start a process (/bin/true), for scale", &spawn);
    row("fdatasync a new 200-byte file, for scale", &sync);
    row("the hook's work in-process (hook::run_to)", &in_process);
    row("narpost hook (DRV_PATH, empty OUT_PATHS)", &direct);
    row("narpost-hook (the small hook binary)", &small);
    row("hook/narpost-hook (sh wrapper + narpost-hook)", &wrapped);
    row("nix copy --to file://...?compression=zstd", &file_copy);
    row("nix copy --to http://nginx?compression=zstd", &http_copy);
}

/// Runs the command `make(i)` builds `n` times, one after another; each must succeed, and
/// say nothing when `quiet`.
fn time_each(n: usize, quiet: bool, mut make: impl FnMut(usize) -> Command) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = make(i);
        let start = Instant::now();
        let out = cmd.output().expect("run a benchmarked command");
        times.push(start.elapsed());
        assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
        assert!(!quiet || out.stderr.is_empty(), "{cmd:?}: {}", stderr(&out));
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
