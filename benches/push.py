#!/usr/bin/env python3
"""Push benchmark: narpost against `nix copy` and the raw `nix-store --dump | zstd` pipes.

Rows (every command at zstd level 3, every cache a fresh file:// directory, medians of
--runs runs, all in the same run so that ratios compare like with like):

  big closure   ~2 GiB of mixed real files copied out of the host into a closure of six
                store paths (the sandbox is off, so derivations can read /usr)
                - narpost push            (default --jobs: the number of cores)
                - nix copy                (file://...?compression=zstd)
                - raw pipe                (`nix-store --dump P | zstd -3` path by path)
                - 2-core limit            (`nix-store --dump` of every path into one `zstd -3 -T2`)
                - narpost push to S3      (s3s-fs on 127.0.0.1 via benches/s3-server, a fresh
                                           bucket per run)
                over ssh: a real sshd on 127.0.0.1, a fresh chroot store per run as the remote
                (`remote-store=`), NIX_SSHOPTS giving both the port, key and host key
                - narpost push            (ssh://root@127.0.0.1?remote-store=...)
                - nix copy --to ssh://    (the same URL; it signs nothing, narpost signs)
  tiny paths    1,000 store paths of one small file each
                - narpost push, nix copy  (each run's cache on a fresh ext4 of its own, on a
                                           loop device: see alternating())
                - over ssh: narpost push, nix copy --to ssh:// (as for the big closure), on
                  loopback and through benches/delay-proxy (--ssh-delay-ms each way, 5 by
                  default: a host 10 ms away; this kernel has no netem)
  chain         200 store paths of one small file each, each referring to the one before
                - over ssh only: narpost push, nix copy --to ssh:// (as for the big
                  closure); a host's store takes a path only after its reference, so this
                  is where waiting for each answer before the next path would show; on
                  loopback and 10 ms away

Peak RSS is each command's maximum resident set (of the process tree, from wait4).
Usage: benches/push.py [--runs N] [--narpost PATH] [--skip-big] [--skip-tiny] [--skip-s3]
       [--skip-ssh] [--ssh-only] [--skip-chain] [--chain-depth N] [--ssh-delay-ms MS]
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

NIX_ENV = dict(
    os.environ,
    NIX_CONFIG="substituters =\nexperimental-features = nix-command\nsandbox = false\n",
)

# Host directories copied into the big closure, in this order until about 2 GiB.
BIG_DIRS = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/share",
    "/usr/lib/jvm",
    "/usr/lib/llvm-14",
    "/usr/lib/gcc",
    "/usr/include",
    "/usr/bin",
    "/usr/lib",
]
BIG_TARGET = 2 * 1024**3


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, env=NIX_ENV, **kw)


def timed(argv, shell=False):
    """Runs a command; returns (seconds, peak RSS in KiB)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, shell=shell, env=NIX_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: command failed ({status}): {argv}")
    return elapsed, usage.ru_maxrss


def build_big(work, nonce):
    dirs, total = [], 0
    for d in BIG_DIRS:
        if total >= BIG_TARGET * 0.95 or not os.path.isdir(d):
            continue
        du = subprocess.run(["du", "-sb", "-l", d], capture_output=True, text=True)
        size = int(du.stdout.split()[0]) if du.stdout else 0
        dirs.append(d)
        total += size
    parts = []
    for i, d in enumerate(dirs):
        parts.append(
            f'p{i} = mk "narpost-bench-part{i}" "mkdir -p $out && cp -r --no-preserve=all {d} $out/ 2>/dev/null; true";'
        )
    refs = " ".join(f"${{p{i}}}" for i in range(len(dirs)))
    expr = f"""
let
  mk = name: script: builtins.derivation {{
    inherit name; nonce = "{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; args = [ "-c" script ];
  }};
in rec {{
  {' '.join(parts)}
  top = mk "narpost-bench-top" "mkdir -p $out && echo {refs} > $out/refs";
}}
"""
    path = os.path.join(work, "big.nix")
    with open(path, "w") as f:
        f.write(expr)
    out = sh(["nix-build", path, "-A", "top", "--no-out-link"], capture_output=True, text=True)
    return out.stdout.strip()


def build_tiny(work, nonce, count):
    src = os.path.join(work, "tiny")
    os.makedirs(src)
    files = []
    for i in range(count):
        p = os.path.join(src, f"narpost-bench-tiny-{i}")
        with open(p, "w") as f:
            f.write(f"tiny path {i} {nonce}\n")
        files.append(p)
    out = sh(["nix-store", "--add", *files], capture_output=True, text=True)
    return out.stdout.split()


def build_chain(work, nonce, depth):
    """`depth` one-file paths, each naming the one before (so referring to it); returns
    the last."""
    links = ['l0 = mk "narpost-bench-chain-0" "echo 0 > $out";']
    for i in range(1, depth):
        links.append(f'l{i} = mk "narpost-bench-chain-{i}" "echo ${{l{i - 1}}} > $out";')
    expr = f"""
let
  mk = name: script: builtins.derivation {{
    inherit name; nonce = "{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; args = [ "-c" script ];
  }};
in rec {{
  {' '.join(links)}
}}
"""
    path = os.path.join(work, "chain.nix")
    with open(path, "w") as f:
        f.write(expr)
    out = sh(["nix-build", path, "-A", f"l{depth - 1}", "--no-out-link"], capture_output=True, text=True)
    return out.stdout.strip()


def closure(paths):
    out = sh(["nix-store", "-qR", *paths], capture_output=True, text=True)
    return out.stdout.split()


def nar_size(paths):
    out = sh(["nix-store", "-q", "--size", *paths], capture_output=True, text=True)
    return sum(int(n) for n in out.stdout.split())


def human(n):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def median_run(runs, make_cmd, scratch):
    times, rss = [], []
    for _ in range(runs):
        dest = tempfile.mkdtemp(prefix="dest-", dir=scratch)
        argv, shell = make_cmd(dest)
        t, m = timed(argv, shell)
        times.append(t)
        rss.append(m)
        shutil.rmtree(dest, ignore_errors=True)
    return statistics.median(times), max(rss)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--narpost", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "narpost"))
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-ssh", action="store_true")
    ap.add_argument("--ssh-only", action="store_true", help="only the rows over ssh")
    ap.add_argument("--tiny-count", type=int, default=1000)
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--chain-depth", type=int, default=200)
    ap.add_argument("--ssh-delay-ms", type=float, default=5,
                    help="one-way delay of the far ssh rows (0: none of them)")
    args = ap.parse_args()
    narpost = os.path.abspath(args.narpost)
    for tool in ["nix-build", "nix-store", "nix", "zstd"]:
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found; run scripts/install-deps")
    if not os.access(narpost, os.X_OK):
        sys.exit(f"bench: {narpost}: not built; run cargo build --release")

    scratch = tempfile.mkdtemp(prefix="narpost-bench-")
    nonce = str(time.time_ns())
    keydir = os.path.join(scratch, "keys")
    sh([narpost, "keygen", "bench-1", "--out", keydir], capture_output=True)
    key = os.path.join(keydir, "bench-1.sec")
    state = os.path.join(scratch, "state")
    rows = []
    syncs = []

    def narpost_cmd(paths, extra=()):
        return lambda dest: (
            [narpost, "--state-dir", state, "push", "--to", f"file://{dest}", "--key", key, *extra, *paths],
            False,
        )

    def nix_copy_cmd(paths):
        return lambda dest: (
            ["nix", "copy", "--to", f"file://{dest}?compression=zstd&secret-key={key}", *paths],
            False,
        )

    try:
        if not args.skip_big:
            top = build_big(scratch, nonce)
            paths = closure([top])
            size = sum(nar_size([p]) for p in paths)
            quoted = " ".join(paths)
            group = f"big closure ({len(paths)} paths, {human(size)} NAR)"
            if not args.skip_ssh:
                ssh_group = f"big closure over ssh ({len(paths)} paths)"
                for name, t, m in ssh_runs(args.runs, narpost, state, key, [top], [], scratch):
                    rows.append((ssh_group, name, t, m, size))
        if not args.skip_big and not args.ssh_only:
            n_t, n_m = median_run(args.runs, narpost_cmd([top]), scratch)
            c_t, c_m = median_run(args.runs, nix_copy_cmd([top]), scratch)
            r_t, r_m = median_run(
                args.runs,
                lambda dest: (f"for p in {quoted}; do nix-store --dump $p | zstd -q -3 > {dest}/$(basename $p).nar.zst; done", True),
                scratch,
            )
            l_t, l_m = median_run(
                args.runs,
                lambda dest: (f"for p in {quoted}; do nix-store --dump $p; done | zstd -q -3 -T2 > {dest}/all.nar.zst", True),
                scratch,
            )
            rows.append((group, "narpost push", n_t, n_m, size))
            rows.append((group, "nix copy", c_t, c_m, size))
            rows.append((group, "nix-store --dump | zstd -3 (per path)", r_t, r_m, size))
            rows.append((group, "nix-store --dump | zstd -3 -T2 (2-core limit)", l_t, l_m, size))
            if not args.skip_s3:
                s_t, s_m = s3_run(args.runs, narpost, state, key, top, scratch)
                rows.append((group, "narpost push to S3 (s3s-fs, 127.0.0.1)", s_t, s_m, size))
        if not args.skip_tiny:
            tiny = build_tiny(scratch, nonce, args.tiny_count)
            size = sum(nar_size([p]) for p in tiny[:1]) * len(tiny)
            group = f"tiny paths ({len(tiny)} paths)"
            if not args.skip_ssh:
                ssh_group = f"tiny paths over ssh ({len(tiny)} paths)"
                for name, t, m in ssh_runs(args.runs, narpost, state, key, tiny, ["--no-closure"], scratch):
                    rows.append((ssh_group, name, t, m, size))
                if args.ssh_delay_ms:
                    # The proxy's own cost (Python, on these cores), for scale: no delay.
                    floor = f"tiny over ssh, proxy, 0 ms ({len(tiny)})"
                    for name, t, m in ssh_runs(args.runs, narpost, state, key, tiny, ["--no-closure"], scratch,
                                               0.001):
                        rows.append((floor, name, t, m, size))
                    far = f"tiny over ssh, {2 * args.ssh_delay_ms:g} ms away ({len(tiny)})"
                    for name, t, m in ssh_runs(args.runs, narpost, state, key, tiny, ["--no-closure"], scratch,
                                               args.ssh_delay_ms):
                        rows.append((far, name, t, m, size))
        if not args.skip_tiny and not args.ssh_only:
            # Each run's cache on an ext4 of its own, made for the run (with a journal, as
            # mkfs makes it): on a filesystem where thousands of files were just deleted
            # (every earlier run's cache), ext4 skips the recently freed inodes one by one
            # on each creation, and that, not either command, was most of the time. Taking
            # turns all the same.
            cmds = {"narpost push": narpost_cmd(tiny, ["--no-closure"]), "nix copy": nix_copy_cmd(tiny)}
            for name, (t, m) in alternating(args.runs, cmds, scratch, fresh_fs=True).items():
                rows.append((group, name, t, m, size))
            for name, make in cmds.items():
                syncs.append((name, sync_count(make, scratch) / len(tiny)))
        if not args.skip_chain and not args.skip_ssh:
            top = build_chain(scratch, nonce, args.chain_depth)
            size = nar_size(closure([top]))
            group = f"chain over ssh ({args.chain_depth} paths)"
            for name, t, m in ssh_runs(args.runs, narpost, state, key, [top], [], scratch):
                rows.append((group, name, t, m, size))
            if args.ssh_delay_ms:
                far = f"chain over ssh, {2 * args.ssh_delay_ms:g} ms away ({args.chain_depth})"
                for name, t, m in ssh_runs(args.runs, narpost, state, key, [top], [], scratch, args.ssh_delay_ms):
                    rows.append((far, name, t, m, size))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(rows)
    if syncs:
        print()
        print("tiny paths to file://: sync calls per path (fsync, fdatasync, syncfs, sync_file_range; one strace -f run each)")
        for name, per_path in syncs:
            print(f"  {name:<14} {per_path:.2f}")


def alternating(runs, cmds, scratch, fresh_fs=False):
    """Runs each of `cmds` (name -> make_cmd) once per round, in turn; returns name ->
    (median s, peak RSS). With `fresh_fs`, each run's cache is the root of a new ext4 on a
    loop device (made and removed outside the timing)."""
    results = {name: ([], []) for name in cmds}
    for _ in range(runs):
        for name, make_cmd in cmds.items():
            dest = tempfile.mkdtemp(prefix="dest-", dir=scratch)
            image = dest + ".img"
            if fresh_fs:
                with open(image, "wb") as f:
                    f.truncate(1 << 30)
                sh(["mkfs.ext4", "-q", "-F", image], capture_output=True)
                sh(["mount", "-o", "loop", image, dest], capture_output=True)
                os.sync()
            try:
                argv, shell = make_cmd(os.path.join(dest, "cache") if fresh_fs else dest)
                t, m = timed(argv, shell)
            finally:
                if fresh_fs:
                    sh(["umount", dest], capture_output=True)
                    os.remove(image)
            results[name][0].append(t)
            results[name][1].append(m)
            shutil.rmtree(dest, ignore_errors=True)
    return {name: (statistics.median(t), max(m)) for name, (t, m) in results.items()}


def sync_count(make_cmd, scratch):
    """How many sync calls one run of the command makes, counted by strace."""
    if shutil.which("strace") is None:
        sys.exit("bench: strace not found; run scripts/install-deps")
    dest = tempfile.mkdtemp(prefix="dest-", dir=scratch)
    out = os.path.join(scratch, "strace.txt")
    argv, _ = make_cmd(dest)
    sh(["strace", "-f", "-c", "-o", out, "-e", "trace=fsync,fdatasync,syncfs,sync,sync_file_range", *argv],
       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(dest, ignore_errors=True)
    total = 0
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync", "syncfs", "sync", "sync_file_range"):
                total += int(parts[3])
    return total


def s3_run(runs, narpost, state, key, top, scratch):
    """narpost into a fresh bucket of a local s3s-fs per run; returns (median s, peak RSS)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(scratch, "s3")
    os.makedirs(root)
    out = subprocess.run([os.path.join(here, "s3-server"), "start", root], check=True,
                         capture_output=True, text=True).stdout
    env = dict(NIX_ENV)
    for line in out.splitlines():
        line = line.removeprefix("export ")
        for item in line.split(" "):
            if "=" in item:
                k, v = item.split("=", 1)
                env[k] = v.strip("'")
    port = env["S3_CACHE"].rsplit(":", 1)[1]
    times, rss = [], []
    try:
        for i in range(runs):
            bucket = f"run-{i}"
            os.makedirs(os.path.join(root, bucket))
            url = f"s3://{bucket}?region=us-east-1&endpoint=http://127.0.0.1:{port}"
            start = time.monotonic()
            proc = subprocess.Popen(
                [narpost, "--state-dir", state, "push", "--to", url, "--key", key, top],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit("bench: narpost push to S3 failed")
            times.append(time.monotonic() - start)
            rss.append(usage.ru_maxrss)
            shutil.rmtree(os.path.join(root, bucket), ignore_errors=True)
    finally:
        subprocess.run([os.path.join(here, "s3-server"), "stop", root], capture_output=True)
    return statistics.median(times), max(rss)


def ssh_runs(runs, narpost, state, key, paths, extra, scratch, delay_ms=0):
    """narpost and nix copy into a host's store over a real sshd on 127.0.0.1, alternating,
    each run into a fresh chroot store; returns [(name, median s, peak RSS)]. With
    `delay_ms`, ssh reaches sshd through benches/delay-proxy, which holds every chunk that
    long in each direction: a host 2 * delay_ms away."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.access(sshd, os.X_OK) or shutil.which("ssh") is None:
        sys.exit("bench: sshd or ssh not found; run scripts/install-deps")
    # One directory per call: a run has an sshd for each workload.
    d = tempfile.mkdtemp(prefix="sshd-", dir=scratch)
    for name in ["host_key", "client_key"]:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)], check=True)
    with open(os.path.join(d, "client_key.pub")) as f:
        client_pub = f.read()
    with open(os.path.join(d, "authorized_keys"), "w") as f:
        f.write(f"restrict {client_pub}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(os.path.join(d, "sshd_config"), "w") as f:
        f.write(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
            "PidFile none\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nLogLevel ERROR\n"
        )
    with open(os.path.join(d, "host_key.pub")) as f:
        host_key = " ".join(f.read().split()[:2])
    with open(os.path.join(d, "known_hosts"), "w") as f:
        f.write(f"[127.0.0.1]:{port} {host_key}\n")
    os.makedirs("/run/sshd", exist_ok=True)
    server = subprocess.Popen([sshd, "-D", "-e", "-f", os.path.join(d, "sshd_config")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opts = f"-p {port} -i {d}/client_key -oUserKnownHostsFile={d}/known_hosts -oStrictHostKeyChecking=yes"
    if delay_ms:
        # NIX_SSHOPTS is split at whitespace (by Nix and narpost alike): one word for the proxy.
        proxy = os.path.join(d, "proxy")
        here = os.path.dirname(os.path.abspath(__file__))
        with open(proxy, "w") as f:
            f.write(f"#!/bin/sh\nexec python3 {here}/delay-proxy {delay_ms} 127.0.0.1 {port}\n")
        os.chmod(proxy, 0o755)
        opts += f" -oProxyCommand={proxy}"
    env = dict(NIX_ENV, NIX_SSHOPTS=opts)
    results = {"narpost push": ([], []), "nix copy --to ssh://": ([], [])}
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("bench: sshd did not start")
                time.sleep(0.05)
        for _ in range(runs):
            for name in results:
                dest = tempfile.mkdtemp(prefix="remote-", dir=scratch)
                url = f"ssh://root@127.0.0.1?remote-store={dest}"
                if name == "narpost push":
                    argv = [narpost, "--state-dir", state, "push", "--to", url, "--key", key, *extra, *paths]
                else:
                    argv = ["nix", "copy", "--to", url, *paths]
                start = time.monotonic()
                proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    sys.exit(f"bench: {name} over ssh failed: {argv}")
                results[name][0].append(time.monotonic() - start)
                results[name][1].append(usage.ru_maxrss)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        server.kill()
        server.wait()
    return [(name, statistics.median(t), max(m)) for name, (t, m) in results.items()]


def print_table(rows):
    print(f"{'workload':<34} {'command':<46} {'median s':>9} {'MB/s':>8} {'peak RSS':>10} {'vs narpost':>10}")
    base = {}
    for group, name, t, rss, size in rows:
        if name == "narpost push":
            base[group] = t
    for group, name, t, rss, size in rows:
        ratio = t / base[group] if group in base else float("nan")
        print(
            f"{group:<34} {name:<46} {t:>9.2f} {size / t / 1e6:>8.0f} {rss / 1024:>7.0f} MiB {ratio:>9.2f}x"
        )
    print("(vs narpost: the command's time divided by narpost's; above 1 means narpost is faster)")


if __name__ == "__main__":
    main()
