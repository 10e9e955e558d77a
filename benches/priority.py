#!/usr/bin/env python3
"""Priority benchmark: does uploading slow a build down?

The build: two CPU-bound derivations (an awk loop of about --awk-seconds each, calibrated on
this machine) built with `nix-build -j 2`, fresh every run. Rows, all in the same run:

  build alone                    the build with nothing else running
  daemon draining, idle          `narpost daemon` (default priority) draining a backlog of
                                 at least --backlog-gib of real files to a file:// cache
  daemon draining, normal        the same with priority = "normal", for comparison
  watch-exec uploading           `narpost watch-exec -- sh -c 'STEP1; STEP2'`: step 1 builds a
                                 fresh backlog, step 2 is the build, timed inside the command
                                 while watch-exec uploads step 1's paths

  backlog drain, idle / normal   the daemon's drain time for the backlog with nothing else
                                 running, at each priority
  build end -> narinfo           over --latency-builds small builds with narpost-hook as the
                                 post-build-hook: from nix-build's return to the narinfo in
                                 the cache (0 when it was there first), p50 and max, with the
                                 daemon idle and with it draining the backlog

Usage: benches/priority.py [--runs N] [--narpost DIR] [--backlog-gib G] [--awk-seconds S]
                           [--latency-builds N] [--skip-latency | --only-latency]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

NIX_ENV = dict(
    os.environ,
    NIX_CONFIG="substituters =\nexperimental-features = nix-command\nsandbox = false\n",
)
for k in list(NIX_ENV):
    if k.startswith("NARPOST_"):
        del NIX_ENV[k]

# Real files, so zstd, SHA-256 and the NAR writer have real work to do.
BACKLOG_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/include", "/usr/bin", "/usr/lib/jvm", "/usr/lib/gcc"]

PRELUDE = """let
  mk = name: script: builtins.derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; args = [ "-c" script ];
  };
in
"""


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, env=kw.pop("env", NIX_ENV), **kw)


def nix_build(expr_file, attrs=(), extra=(), env=None):
    cmd = ["nix-build", expr_file, "--no-out-link", *extra]
    for a in attrs:
        cmd += ["-A", a]
    out = sh(cmd, capture_output=True, text=True, env=env or NIX_ENV)
    return [l for l in out.stdout.split() if l.startswith("/nix/store/")]


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="narpost-bench-prio-")
        self.bin = os.path.abspath(args.narpost)
        self.narpost = os.path.join(self.bin, "narpost")
        self.hook = os.path.join(self.bin, "narpost-hook")
        self.count = 0
        self.roots = "/nix/var/nix/gcroots/narpost-bench-priority"
        self.config = os.path.join(self.work, "narpost.toml")
        with open(self.config, "w") as f:
            f.write(f'gc-roots-dir = "{self.roots}"\ndrain-timeout = 1\n')
        self.garbage = []

    def nonce(self):
        self.count += 1
        return f"{os.getpid()}-{time.time_ns()}-{self.count}"

    def write(self, name, text):
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    # -- the CPU-bound build ----------------------------------------------------------------

    def calibrate(self):
        n = 2_000_000
        script = "BEGIN { s = 0; for (i = 0; i < %d; i++) s += i %% 7; print s }"
        while True:
            start = time.monotonic()
            sh(["awk", script % n], capture_output=True)
            took = time.monotonic() - start
            if took > 1.0:
                break
            n *= 4
        self.loop = int(n * self.args.awk_seconds / took)
        self.awk = script % self.loop

    def cpu_expr(self):
        nonce = self.nonce()
        body = "".join(
            f'  {x} = mk "narpost-bench-cpu-{x}-{nonce}" "awk \'{self.awk}\' > $out";\n' for x in "ab"
        )
        return self.write(f"cpu-{nonce}.nix", PRELUDE + "{\n" + body + "}\n")

    def timed_build(self):
        expr = self.cpu_expr()
        start = time.monotonic()
        paths = nix_build(expr, ["a", "b"], ["-j", "2"])
        took = time.monotonic() - start
        self.garbage += paths
        return took

    # -- the backlog ------------------------------------------------------------------------

    def backlog_expr(self):
        nonce = self.nonce()
        target = self.args.backlog_gib * 1024**3
        parts, total = [], 0
        for i, d in enumerate(BACKLOG_DIRS):
            if total >= target or not os.path.isdir(d):
                continue
            du = subprocess.run(["du", "-sb", d], capture_output=True, text=True)
            size = int(du.stdout.split()[0]) if du.stdout else 0
            # Not far past the target: every row copies and uploads it again.
            if total and total + size > target * 1.5:
                continue
            total += size
            parts.append(
                f'  p{i} = mk "narpost-bench-backlog{i}-{nonce}" "mkdir -p $out && cp -r --no-preserve=all {d} $out/ 2>/dev/null; true";'
            )
        return self.write(f"backlog-{nonce}.nix", PRELUDE + "{\n" + "\n".join(parts) + "\n}\n"), total

    def build_backlog(self):
        expr, _ = self.backlog_expr()
        paths = nix_build(expr)
        self.garbage += paths
        size = sum(int(sh(["du", "-sb", p], capture_output=True, text=True).stdout.split()[0]) for p in paths)
        if size < self.args.backlog_gib * 1024**3 * 0.95:
            sys.exit(f"bench: the backlog is only {size / 1024**3:.2f} GiB; not enough files under /usr")
        return paths, size

    # -- narpost ----------------------------------------------------------------------------

    def state(self):
        d = os.path.join(self.work, "state-" + self.nonce())
        os.makedirs(d)
        return d

    def cache(self):
        return os.path.join(self.work, "cache-" + self.nonce())

    def env(self, state, cache, priority=None):
        env = dict(NIX_ENV, NARPOST_STATE_DIR=state, NARPOST_CONFIG=self.config, NARPOST_CACHE="file://" + cache)
        if priority:
            env["NARPOST_PRIORITY"] = priority
        return env

    def queue(self, env, paths):
        sh([self.hook], env=dict(env, OUT_PATHS=" ".join(paths), DRV_PATH=""))

    def depth(self, env):
        out = sh([self.narpost, "status", "--json"], capture_output=True, text=True, env=env)
        return json.loads(out.stdout)["queue_depth"]

    def daemon(self, env):
        return subprocess.Popen(
            [self.narpost, "daemon"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "daemon.log"), "a"),
        )

    def stop(self, proc):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def wait_uploading(self, cache, timeout=60):
        """Until the drain writes into the cache (and a moment more), so the build starts
        mid-drain."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(files for _, _, files in os.walk(cache)):
                break
            time.sleep(0.05)
        time.sleep(1)

    def drained(self, env, timeout=1800):
        deadline = time.monotonic() + timeout
        while self.depth(env) > 0:
            if time.monotonic() > deadline:
                sys.exit("bench: the backlog did not drain")
            time.sleep(0.2)

    # -- rows -------------------------------------------------------------------------------

    def build_while_draining(self, backlog, priority):
        state, cache = self.state(), self.cache()
        env = self.env(state, cache, priority)
        self.queue(env, backlog)
        d = self.daemon(env)
        self.wait_uploading(cache)
        took = self.timed_build()
        left = self.depth(env)
        self.stop(d)
        shutil.rmtree(cache, ignore_errors=True)
        return took, left

    def build_under_watch_exec(self):
        state, cache = self.state(), self.cache()
        env = self.env(state, cache)
        step1, _ = self.backlog_expr()
        step2 = self.cpu_expr()
        timing = os.path.join(self.work, "step2-" + self.nonce())
        script = (
            f"nix-build {step1} --no-out-link > {timing}.paths && "
            f"start=$(date +%s.%N) && nix-build {step2} -A a -A b -j 2 --no-out-link >> {timing}.paths && "
            f"end=$(date +%s.%N) && echo $start $end > {timing}"
        )
        sh([self.narpost, "watch-exec", "--drain-timeout", "1", "--", "sh", "-c", script],
           env=env, stderr=subprocess.DEVNULL)
        start, end = map(float, open(timing).read().split())
        self.garbage += open(timing + ".paths").read().split()
        shutil.rmtree(cache, ignore_errors=True)
        return end - start

    def drain_time(self, backlog, priority):
        state, cache = self.state(), self.cache()
        env = self.env(state, cache, priority)
        self.queue(env, backlog)
        start = time.monotonic()
        d = self.daemon(env)
        self.drained(env)
        took = time.monotonic() - start
        self.stop(d)
        shutil.rmtree(cache, ignore_errors=True)
        return took

    def latency(self, backlog, draining):
        state, cache = self.state(), self.cache()
        env = self.env(state, cache)
        hook = self.write(
            "hook-" + self.nonce(),
            f"#!/bin/sh\nexport NARPOST_STATE_DIR='{state}' NARPOST_CONFIG='{self.config}'\nexec '{self.hook}'\n",
        )
        os.chmod(hook, 0o755)
        nix_env = dict(NIX_ENV, NIX_CONFIG=NIX_ENV["NIX_CONFIG"] + f"post-build-hook = {hook}\n")
        if draining:
            self.queue(env, backlog)
        d = self.daemon(env)
        if draining:
            self.wait_uploading(cache)
        else:
            while not os.path.exists(os.path.join(state, "drain-state.json")):
                time.sleep(0.05)
        pending, seen, lock = {}, {}, threading.Lock()
        done = threading.Event()

        def watch():
            while not done.is_set() or pending:
                with lock:
                    items = list(pending.items())
                for path, returned in items:
                    f = os.path.join(cache, os.path.basename(path)[:32] + ".narinfo")
                    try:
                        mtime = os.stat(f).st_mtime
                    except FileNotFoundError:
                        continue
                    with lock:
                        seen[path] = max(0.0, min(time.time(), mtime) - returned)
                        del pending[path]
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        nonce = self.nonce()
        expr = self.write(
            f"small-{nonce}.nix",
            PRELUDE + "{ n }: mk \"narpost-bench-small-" + nonce + "-${n}\" \"echo ${n} > $out\"\n",
        )
        backlog_infos = [os.path.join(cache, os.path.basename(p)[:32] + ".narinfo") for p in backlog]
        during = 0
        for i in range(self.args.latency_builds):
            paths = nix_build(expr, extra=["--argstr", "n", str(i)], env=nix_env)
            returned = time.time()
            if draining and not all(os.path.exists(f) for f in backlog_infos):
                during += 1
            with lock:
                for p in paths:
                    pending[p] = returned
            self.garbage += paths
        deadline = time.monotonic() + 1800
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        watcher.join(timeout=5)
        self.stop(d)
        shutil.rmtree(cache, ignore_errors=True)
        values = sorted(seen.values())
        if len(values) < self.args.latency_builds:
            sys.exit("bench: some narinfos never appeared")
        return statistics.median(values), values[-1], during

    def cleanup(self):
        shutil.rmtree(self.roots, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        for i in range(0, len(self.garbage), 200):
            subprocess.run(["nix-store", "--delete", *self.garbage[i : i + 200]], env=NIX_ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--narpost", default="target/release")
    p.add_argument("--backlog-gib", type=float, default=1.5)
    p.add_argument("--awk-seconds", type=float, default=8.0)
    p.add_argument("--latency-builds", type=int, default=50)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--only-latency", action="store_true", help="only the build end -> narinfo rows")
    args = p.parse_args()
    b = Bench(args)
    try:
        b.calibrate()
        backlog, size = b.build_backlog()
        print(f"build: 2 derivations, awk loop of {b.loop:,} iterations (~{args.awk_seconds:.0f} s each), nix-build -j 2")
        print(f"backlog: {len(backlog)} paths, {size / 1024**3:.2f} GiB of files from /usr, to a fresh file:// cache")
        print(f"load average at start: {os.getloadavg()[0]:.2f} (other work on the machine makes every row noisier)")
        if args.only_latency:
            latency_rows(b, args, backlog)
            return
        rows = {"alone": [], "idle": [], "normal": [], "watch": []}
        lefts = {"idle": [], "normal": []}
        for _ in range(args.runs):
            rows["alone"].append(b.timed_build())
            for prio in ["idle", "normal"]:
                took, left = b.build_while_draining(backlog, None if prio == "idle" else "normal")
                rows[prio].append(took)
                lefts[prio].append(left)
            rows["watch"].append(b.build_under_watch_exec())
        alone = statistics.median(rows["alone"])
        print()
        print("| build (-j 2, two CPU-bound derivations) | median s | vs alone |")
        print("| --- | --- | --- |")
        label = {
            "alone": "alone",
            "idle": "daemon draining the backlog (default: idle)",
            "normal": "daemon draining the backlog, priority = normal",
            "watch": "under watch-exec uploading an earlier step (idle)",
        }
        for k in ["alone", "idle", "normal", "watch"]:
            m = statistics.median(rows[k])
            extra = ""
            if k in lefts:
                extra = f" (queue entries left when the build ended: {statistics.median(lefts[k]):.0f})"
            print(f"| {label[k]}{extra} | {m:.2f} | {m / alone:.2f}x |")

        # Taking turns, each after a sync: a drain that starts while the page cache is still
        # writing back the previous rows' caches pays for their fsyncs, whichever goes first.
        # At idle priority on a machine that is not idle this takes as long as the other work
        # leaves no CPU, so the load average before each is printed too.
        drains = {"normal": [], "idle": []}
        loads = {"normal": [], "idle": []}
        for i in range(max(2, args.runs)):
            for prio in (["normal", "idle"] if i % 2 == 0 else ["idle", "normal"]):
                os.sync()
                time.sleep(2)
                loads[prio].append(os.getloadavg()[0])
                drains[prio].append(b.drain_time(backlog, None if prio == "idle" else prio))
        normal = statistics.median(drains["normal"])
        idle = statistics.median(drains["idle"])
        n = len(drains["normal"])
        print()
        print(f"| backlog drain, no build of this benchmark running ({size / 1024**3:.2f} GiB, median of {n}) | s | vs normal | load average before |")
        print("| --- | --- | --- | --- |")
        print(f"| priority = normal | {normal:.2f} | 1.00x | {max(loads['normal']):.2f} |")
        print(f"| default (idle) | {idle:.2f} | {idle / normal:.2f}x | {max(loads['idle']):.2f} |")

        if not args.skip_latency:
            latency_rows(b, args, backlog)
    finally:
        b.cleanup()


def latency_rows(b, args, backlog):
    print()
    print(f"| build end -> narinfo in the cache ({args.latency_builds} builds each) | p50 ms | max ms |")
    print("| --- | --- | --- |")
    for draining in [False, True]:
        p50, top, during = b.latency(backlog, draining)
        what = "daemon with an empty queue"
        if draining:
            what = f"daemon draining the backlog (builds that ended before the backlog was in: {during})"
        print(f"| {what} | {p50 * 1000:.0f} | {top * 1000:.0f} |")


if __name__ == "__main__":
    main()
