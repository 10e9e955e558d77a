#!/usr/bin/env python3
"""Local substituter benchmark: what asking the cache through the daemon costs against
asking nginx directly, in the same run.

Rows:
  narinfo miss  --misses GETs of narinfos nobody has, one keep-alive connection as Nix
                keeps one: nginx directly, and the daemon's substituter, which on a miss
                also lists the path's claims, writes its own, and lists again (build claims
                are on: the cache is nginx with WebDAV)
  1 GB path     `nix copy --from` into a fresh store, of one path of --gib GiB of random
                bytes (so zstd cannot shrink it): from nginx directly and through the
                substituter, taking turns, --runs each

Usage: benches/substituter.py [--narpost PATH] [--misses N] [--gib G] [--runs N]
"""

import argparse
import http.client
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"bench: nothing listens on {port}")
            time.sleep(0.05)


def start_nginx(work):
    prefix = os.path.join(work, "nginx")
    root = os.path.join(prefix, "cache")
    os.makedirs(root)
    os.makedirs(os.path.join(prefix, "tmp"))
    port = free_port()
    with open(os.path.join(prefix, "nginx.conf"), "w") as f:
        f.write(f"""load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;
daemon off;
master_process off;
user root;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp;
  client_max_body_size 0;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{
      dav_methods PUT DELETE;
      dav_ext_methods PROPFIND OPTIONS;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", prefix, "-c", os.path.join(prefix, "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def misses(port, n, salt):
    """Latencies (ms) of n narinfo GETs nobody can answer, on one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    out = []
    for i in range(n):
        digits = ""
        x = i * 7919 + salt
        for _ in range(32):
            digits += alphabet[x % 32]
            x //= 32
        start = time.perf_counter()
        conn.request("GET", f"/{digits}.narinfo")
        resp = conn.getresponse()
        resp.read()
        out.append((time.perf_counter() - start) * 1000)
        if resp.status != 404:
            sys.exit(f"bench: a miss answered {resp.status}")
    conn.close()
    return out


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--narpost", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "narpost"))
    ap.add_argument("--misses", type=int, default=1000)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    narpost = os.path.abspath(args.narpost)
    for tool in ["nginx", "nix-build", "nix"]:
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found; run scripts/install-deps")
    if not os.access(narpost, os.X_OK):
        sys.exit(f"bench: {narpost}: not built; run cargo build --release")

    work = tempfile.mkdtemp(prefix="narpost-subst-")
    nginx, nport = start_nginx(work)
    daemon = None
    try:
        keydir = os.path.join(work, "keys")
        subprocess.run([narpost, "keygen", "bench-subst-1", "--out", keydir], check=True, capture_output=True)
        key = os.path.join(keydir, "bench-subst-1.sec")
        with open(os.path.join(keydir, "bench-subst-1.pub")) as f:
            public = f.read().strip()
        cache = f"http://127.0.0.1:{nport}"

        nbytes = int(args.gib * 1024**3)
        expr = os.path.join(work, "big.nix")
        with open(expr, "w") as f:
            f.write(f"""builtins.derivation {{
  name = "narpost-bench-subst"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/bin:/usr/bin"; nonce = "{time.time_ns()}";
  args = [ "-c" "head -c {nbytes} /dev/urandom > $out" ];
}}
""")
        big = subprocess.run(["nix-build", expr, "--no-out-link"], env=NIX_ENV, check=True,
                             capture_output=True, text=True).stdout.strip()
        state = os.path.join(work, "state")
        subprocess.run([narpost, "--state-dir", state, "push", "--to", cache, "--key", key, big],
                       env=NIX_ENV, check=True, capture_output=True)

        sport = free_port()
        denv = dict(NIX_ENV, NARPOST_CACHE=cache, NARPOST_KEY_FILE=key,
                    NARPOST_SUBSTITUTER_LISTEN=f"127.0.0.1:{sport}", NARPOST_MACHINE="bench")
        daemon = subprocess.Popen([narpost, "--state-dir", state, "daemon"], env=denv,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(sport)

        direct = misses(nport, args.misses, 1)
        through = misses(sport, args.misses, 2)

        times = {"nginx directly": [], "through the substituter": []}
        for _ in range(args.runs):
            for name, port in [("nginx directly", nport), ("through the substituter", sport)]:
                dest = tempfile.mkdtemp(prefix="store-", dir=work)
                start = time.monotonic()
                subprocess.run(["nix", "copy", "--from", f"http://127.0.0.1:{port}", "--to", dest,
                                "--option", "trusted-public-keys", public, big],
                               env=NIX_ENV, check=True, capture_output=True)
                times[name].append(time.monotonic() - start)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"| narinfo miss ({args.misses}, one connection) | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- |")
    for name, lat in [("nginx directly", direct), ("through the substituter (claims on)", through)]:
        print(f"| {name} | {pct(lat, 0.5):.2f} | {pct(lat, 0.99):.2f} | {max(lat):.2f} |")
    print()
    gib = nbytes / 1024**3
    print(f"| nix copy --from, one {gib:g} GiB path (median of {args.runs}) | s | GiB/s | speed vs direct |")
    print("| --- | --- | --- | --- |")
    base = statistics.median(times["nginx directly"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m:.2f} | {gib / m:.2f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
