//! Shared harness for the end-to-end tests: the real Nix (builds and fresh-store
//! substitution), a real nginx with WebDAV PUT, and a checker for cache completeness.
//!
//! Every part the tests need must be installed (`scripts/install-deps`); a missing one is a
//! loud failure, never a skip.
#![allow(dead_code)]

pub mod daemon;
pub mod s3;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use narpost::format::hash::Sha256;
use narpost::format::narinfo::NarInfo;
use narpost::format::store_path::StorePath;

/// Panics with a clear message when `program` is not installed.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: the end-to-end tests need the real part; run scripts/install-deps (as root)"
    );
}

/// Nix settings for every Nix command the tests run: no substituters (so builds happen
/// locally and fresh stores get paths only from the cache under test).
pub const NIX_CONFIG: &str =
    "substituters =\nexperimental-features = nix-command\nsandbox = false\n";

/// A `Command` for a Nix program with the tests' settings.
pub fn nix(program: &str) -> Command {
    require(program);
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", NIX_CONFIG);
    cmd.env_remove("NIX_REMOTE");
    cmd
}

/// Runs `cmd`, panicking with its output if it fails.
///
/// A Nix command that finds the store's SQLite database busy is run again: tests run two at
/// a time against one store without a nix-daemon, so two Nix processes write the database
/// at once, and Nix (seen with 2.26) gives up at once where that happens outside the
/// transactions it retries itself. What the tests check is narpost, not that race.
pub fn run(cmd: &mut Command) -> Output {
    let mut out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    for _ in 0..5 {
        let busy = String::from_utf8_lossy(&out.stderr).contains("' is busy");
        if out.status.success() || !busy {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    }
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A string that differs on every call, so every test builds derivations nobody built before.
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        now,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The narpost binary under test, with no narpost settings inherited from the environment.
pub fn narpost_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_narpost"))
}

/// The narpost binary with no `NARPOST_*` settings from the test's environment.
pub fn narpost_command() -> Command {
    let mut cmd = Command::new(narpost_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NARPOST_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A scratch directory with a narpost state directory in it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("narpost-e2e-")
            .tempdir()
            .expect("create a scratch directory");
        Env { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `narpost --state-dir <state>` with a clean environment and the tests' Nix settings.
    pub fn narpost(&self) -> Command {
        let mut cmd = narpost_command();
        cmd.env("NIX_CONFIG", NIX_CONFIG);
        cmd.env("NARPOST_GC_ROOTS_DIR", self.path().join("gcroots"));
        // At idle priority narpost waits for a free CPU, and a test machine running other
        // builds may have none for seconds: tests that time narpost run it at normal
        // priority, and the priority tests ask for the default by removing this.
        cmd.env("NARPOST_PRIORITY", "normal");
        cmd.arg("--state-dir").arg(self.state());
        cmd
    }

    /// Generates a key with `narpost keygen` and returns (secret file, public key line).
    pub fn keygen(&self, name: &str) -> (PathBuf, String) {
        let dir = self.path().join("keys");
        run(self.narpost().args(["keygen", name, "--out"]).arg(&dir));
        let public = fs::read_to_string(dir.join(format!("{name}.pub"))).expect("read public key");
        (dir.join(format!("{name}.sec")), public.trim().to_owned())
    }

    /// Writes a Nix expression file and returns its path.
    pub fn write_nix(&self, name: &str, text: &str) -> PathBuf {
        let file = self.path().join(name);
        fs::write(&file, text).expect("write a Nix expression");
        file
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

/// The `mk` helper every test expression starts with: a derivation built by /bin/sh from
/// a script, without nixpkgs. `nonce` makes every derivation new to this store.
pub fn nix_prelude(nonce: &str) -> String {
    format!(
        r#"let
  nonce = "{nonce}";
  mk = name: script: builtins.derivation {{
    inherit name nonce; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; args = [ "-c" script ];
  }};
in
"#
    )
}

/// A new path holding `bytes` random (so incompressible) bytes; above the S3 multipart
/// threshold (16 MiB) it goes up in parts.
pub fn random_path(env: &Env, name: &str, bytes: u64) -> StorePath {
    let expr = format!(
        "{}mk \"narpost-{name}\" \"head -c {bytes} /dev/urandom > $out\"\n",
        nix_prelude(&nonce())
    );
    let file = env.write_nix(&format!("{name}.nix"), &expr);
    nix_build(&file, &[], &[]).remove(0)
}

/// Builds `attrs` of `file` (all of it when empty) and returns the output paths.
pub fn nix_build(file: &Path, attrs: &[&str], extra: &[&str]) -> Vec<StorePath> {
    let mut cmd = nix("nix-build");
    cmd.arg(file).arg("--no-out-link").args(extra);
    for attr in attrs {
        cmd.args(["-A", attr]);
    }
    parse_paths(&stdout(&run(&mut cmd)))
}

pub fn parse_paths(text: &str) -> Vec<StorePath> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| StorePath::from_absolute(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A closure of four derivations covering every NAR node type (regular and executable
/// files, empty and large files, symlinks with relative and absolute targets, nested and
/// empty directories), with a diamond of references. Returns (top, every output).
pub fn build_rich_closure(env: &Env) -> (StorePath, Vec<StorePath>) {
    let expr = format!(
        r#"{prelude}rec {{
  base = mk "narpost-t-base" ''
    mkdir -p $out/bin $out/share/empty $out/lib/deep/er
    printf '#!/bin/sh\necho base\n' > $out/bin/tool && chmod +x $out/bin/tool
    : > $out/share/empty-file
    printf 'exactly8' > $out/share/eight
    printf 'seven77' > $out/share/seven
    head -c 1200000 /dev/urandom > $out/lib/deep/er/blob
    ln -s ../bin/tool $out/share/relative-link
    ln -s /bin/sh $out/share/absolute-link
    for n in B a _ Z 0; do echo $n > $out/lib/$n; done
  '';
  left = mk "narpost-t-left" ''
    mkdir -p $out && echo ${{base}}/bin/tool > $out/uses-base
  '';
  right = mk "narpost-t-right" ''
    echo ${{base}} > $out
  '';
  top = mk "narpost-t-top" ''
    mkdir -p $out/bin && echo ${{left}} ${{right}} > $out/refs
    ln -s ${{left}}/uses-base $out/bin/link-into-left
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("rich.nix", &expr);
    let outs = nix_build(&file, &["top", "left", "right", "base"], &[]);
    assert_eq!(outs.len(), 4, "four outputs: {outs:?}");
    let top = outs[0].clone();
    (top, outs)
}

/// The closure of `paths`, as the real Nix reports it.
pub fn nix_closure(paths: &[StorePath]) -> BTreeSet<StorePath> {
    let mut cmd = nix("nix-store");
    cmd.args(["-qR"]);
    for p in paths {
        cmd.arg(p.to_absolute());
    }
    parse_paths(&stdout(&run(&mut cmd))).into_iter().collect()
}

/// Copies `paths` from `cache_url` into a new chroot store with signatures required and
/// only `trusted_key` trusted. Ok when Nix accepted every path (and reports them valid).
pub fn substitute(
    scratch: &Path,
    cache_url: &str,
    trusted_key: &str,
    paths: &[StorePath],
) -> Result<(), String> {
    let fresh = tempfile::Builder::new()
        .prefix("fresh-store-")
        .tempdir_in(scratch)
        .map_err(|e| e.to_string())?;
    let mut cmd = nix("nix");
    cmd.args(["copy", "--from", cache_url, "--to"])
        .arg(fresh.path())
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "trusted-public-keys", trusted_key]);
    for p in paths {
        cmd.arg(p.to_absolute());
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("nix copy failed: {}", stderr(&out)));
    }
    // Nix reports validity only for what it actually has, and its closure.
    let mut check = nix("nix");
    check.args(["path-info", "-r", "--store"]).arg(fresh.path());
    for p in paths {
        check.arg(p.to_absolute());
    }
    let out = check.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "nix path-info in the fresh store failed: {}",
            stderr(&out)
        ));
    }
    let got: BTreeSet<StorePath> = parse_paths(&stdout(&out)).into_iter().collect();
    let want = nix_closure(paths);
    if got != want {
        return Err(format!(
            "the fresh store holds {} paths, expected the closure's {}",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

/// Panics unless a fresh store substitutes the closure of `paths` from `cache_url`.
pub fn assert_substitutes(env: &Env, cache_url: &str, trusted_key: &str, paths: &[StorePath]) {
    if let Err(e) = substitute(env.path(), cache_url, trusted_key, paths) {
        panic!(
            "a fresh store did not substitute {} path(s) from {cache_url}: {e}",
            paths.len()
        );
    }
}

/// What a binary-cache directory (file://, the nginx root, an S3 bucket's files) holds.
pub struct CacheDir {
    pub root: PathBuf,
    /// Key names of upstream caches: a reference signed by one of them in the local store
    /// may be missing from the cache (narpost's default list unless set).
    pub upstream: Vec<String>,
}

impl CacheDir {
    pub fn new(root: impl Into<PathBuf>) -> CacheDir {
        CacheDir {
            root: root.into(),
            upstream: narpost::config::DEFAULT_UPSTREAM_KEYS
                .iter()
                .map(|k| k.to_string())
                .collect(),
        }
    }

    /// The same cache checked against another upstream list (the one narpost pushed with).
    pub fn with_upstream(mut self, keys: &[&str]) -> CacheDir {
        self.upstream = keys.iter().map(|k| k.to_string()).collect();
        self
    }

    /// Whether the local store holds a signature of `path` by one of the upstream keys.
    fn upstream_signed(&self, path: &StorePath) -> bool {
        let Ok(store) = narpost::store::Store::open_default() else {
            return false;
        };
        store.query(std::slice::from_ref(path)).is_ok_and(|infos| {
            infos
                .iter()
                .any(|i| narpost::pipeline::signed_by_any(i, &self.upstream))
        })
    }

    /// Every narinfo, by store path.
    pub fn narinfos(&self) -> BTreeMap<StorePath, NarInfo> {
        let mut out = BTreeMap::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".narinfo") || name.starts_with('.') {
                continue;
            }
            let text = fs::read_to_string(entry.path()).expect("read narinfo");
            let info = NarInfo::parse(&text).unwrap_or_else(|e| {
                panic!("{}: not a narinfo: {e}\n{text}", entry.path().display())
            });
            out.insert(info.store_path.clone(), info);
        }
        out
    }

    pub fn has(&self, path: &StorePath) -> bool {
        self.root
            .join(format!("{}.narinfo", path.hash_part()))
            .is_file()
    }

    /// The number of NAR files.
    pub fn nar_count(&self) -> usize {
        fs::read_dir(self.root.join("nar"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The completeness check every end-to-end test runs: each narinfo parses, names a NAR
    /// that exists with the recorded FileSize and FileHash, and each of its references has
    /// a narinfo too or is signed by an upstream key in the local store. Returns the
    /// problems found, one line each.
    pub fn problems(&self) -> Vec<String> {
        let infos = self.narinfos();
        let mut problems = Vec::new();
        for (path, info) in &infos {
            let nar = self.root.join(&info.url);
            match fs::File::open(&nar) {
                Err(e) => problems.push(format!("{path}: NAR {} missing: {e}", info.url)),
                Ok(mut file) => {
                    let mut data = Vec::new();
                    if let Err(e) = file.read_to_end(&mut data) {
                        problems.push(format!("{path}: NAR {} unreadable: {e}", info.url));
                        continue;
                    }
                    if info.file_size.is_some_and(|s| s != data.len() as u64) {
                        problems.push(format!(
                            "{path}: NAR {} is {} bytes, narinfo says {:?}",
                            info.url,
                            data.len(),
                            info.file_size
                        ));
                    }
                    if info.file_hash.is_some_and(|h| h != Sha256::digest(&data)) {
                        problems.push(format!("{path}: NAR {} has the wrong FileHash", info.url));
                    }
                }
            }
            for reference in &info.references {
                if reference != path
                    && !infos.contains_key(reference)
                    && !self.upstream_signed(reference)
                {
                    problems.push(format!("{path}: reference {reference} has no narinfo"));
                }
            }
        }
        problems
    }

    pub fn assert_complete(&self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "cache {} is not complete:\n{}",
            self.root.display(),
            problems.join("\n")
        );
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
}

/// A real nginx serving `root` as an HTTP binary cache with WebDAV PUT, on 127.0.0.1.
/// Its access log records `METHOD URI STATUS` per request, in order.
pub struct Nginx {
    pub root: PathBuf,
    pub port: u16,
    prefix: PathBuf,
    child: Option<Child>,
    /// `client_max_body_size`: `0` (no limit) unless a test sets one.
    max_body: String,
}

impl Nginx {
    pub fn start(scratch: &Path) -> Nginx {
        require("nginx");
        let prefix = scratch.join("nginx");
        let root = prefix.join("cache");
        fs::create_dir_all(&root).expect("create the nginx root");
        fs::create_dir_all(prefix.join("tmp")).expect("create the nginx temp dir");
        let mut nginx = Nginx {
            root,
            port: free_port(),
            prefix,
            child: None,
            max_body: "0".into(),
        };
        nginx.write_config(None);
        nginx.resume();
        nginx
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cache(&self) -> CacheDir {
        CacheDir::new(&self.root)
    }

    fn write_config(&self, auth: Option<&str>) {
        let mut conf = String::new();
        let p = self.prefix.display();
        let auth_block = auth
            .map(|token| {
                format!("if ($http_authorization != \"Bearer {token}\") {{ return 401; }}\n")
            })
            .unwrap_or_default();
        writeln!(
            conf,
            r#"load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;
daemon off;
master_process off;
user root;
error_log {p}/error.log warn;
pid {p}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  log_format narpost '$request_method $uri $status';
  access_log {p}/access.log narpost;
  client_body_temp_path {p}/tmp;
  proxy_temp_path {p}/tmp;
  fastcgi_temp_path {p}/tmp;
  uwsgi_temp_path {p}/tmp;
  scgi_temp_path {p}/tmp;
  client_max_body_size {max_body};
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{
      {auth_block}
      dav_methods PUT DELETE;
      # PROPFIND lists the cache, as `narpost check` asks.
      dav_ext_methods PROPFIND OPTIONS;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
  }}
}}"#,
            port = self.port,
            root = self.root.display(),
            max_body = self.max_body,
        )
        .expect("format");
        fs::write(self.prefix.join("nginx.conf"), conf).expect("write nginx.conf");
    }

    /// Requires `Authorization: Bearer <token>` from now on (takes effect on restart).
    pub fn require_token(&mut self, token: &str) {
        self.write_config(Some(token));
        self.stop();
        self.resume();
    }

    /// Sets `client_max_body_size` (nginx's default is `1m`; `0` is no limit) and restarts:
    /// a larger upload is answered 413, as a server left at its defaults does.
    pub fn set_max_body(&mut self, size: &str) {
        self.max_body = size.to_owned();
        self.write_config(None);
        self.stop();
        self.resume();
    }

    /// Starts nginx again on the same port after [`Nginx::stop`].
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "nginx is already running");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(self.prefix.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// Stops nginx: the cache is down until [`Nginx::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Requests so far, as (method, uri, status).
    pub fn log(&self) -> Vec<(String, String, u16)> {
        let text = fs::read_to_string(self.prefix.join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                let method = parts.next()?.to_owned();
                let uri = parts.next()?.to_owned();
                let status = parts.next()?.parse().ok()?;
                Some((method, uri, status))
            })
            .collect()
    }

    /// Successful PUTs so far, in order.
    pub fn puts(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|(m, _, s)| m == "PUT" && (200..300).contains(s))
            .map(|(_, uri, _)| uri)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Checks the order of uploads in `puts` (URIs of successful PUTs): each path's NAR before
/// its narinfo, and each reference's narinfo before its referrer's. Returns the problems.
pub fn upload_order_problems(puts: &[String], cache: &CacheDir) -> Vec<String> {
    let position: BTreeMap<&str, usize> = puts
        .iter()
        .enumerate()
        .map(|(i, uri)| (uri.trim_start_matches('/'), i))
        .collect();
    let mut problems = Vec::new();
    for (path, info) in cache.narinfos() {
        let own = format!("{}.narinfo", path.hash_part());
        let Some(&at) = position.get(own.as_str()) else {
            problems.push(format!("{path}: its narinfo was not uploaded by PUT"));
            continue;
        };
        match position.get(info.url.as_str()) {
            Some(&nar) if nar < at => {}
            Some(_) => problems.push(format!("{path}: narinfo uploaded before its NAR")),
            None => problems.push(format!("{path}: NAR {} was not uploaded by PUT", info.url)),
        }
        for reference in info.references.iter().filter(|r| **r != path) {
            let theirs = format!("{}.narinfo", reference.hash_part());
            match position.get(theirs.as_str()) {
                Some(&r) if r < at => {}
                _ => problems.push(format!(
                    "{path}: narinfo uploaded before its reference {reference}'s"
                )),
            }
        }
    }
    problems
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Makes a store path's file writable and changes it behind Nix's back (needs root).
pub fn corrupt_store_file(file: &Path, new_contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let parent = file.parent().expect("a file inside a store path");
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).expect("make writable");
    fs::set_permissions(file, fs::Permissions::from_mode(0o644)).expect("make writable");
    fs::write(file, new_contents).expect("overwrite a store file");
    fs::set_permissions(file, fs::Permissions::from_mode(0o444)).expect("restore mode");
    fs::set_permissions(parent, fs::Permissions::from_mode(0o555)).expect("restore mode");
}

// ---------------------------------------------------------------------------------------
// Long-running narpost processes (`daemon`, `watch-store`): started in the background with
// their output in a file, stopped with SIGTERM as systemd or a CI runner would stop them.

/// A process running in the background; killed if the test ends without stopping it.
pub struct Background {
    child: Option<Child>,
    log: PathBuf,
    what: String,
}

impl Background {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(cmd: &mut Command, log: &Path, what: &str) -> Background {
        let out = fs::File::create(log).expect("create a log file");
        let err = out.try_clone().expect("clone the log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Background {
            child: Some(child),
            log: log.to_path_buf(),
            what: what.to_string(),
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its output contains `needle`; panics (with the output) if it exits first
    /// or `timeout` passes.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output().contains(needle) {
                return;
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not print {needle:?} within {timeout:?}; output:\n{}",
            self.what,
            self.output()
        );
    }

    /// Panics with its output if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "{} exited early ({status}); output:\n{}",
                self.what,
                self.output()
            );
        }
    }

    /// Its exit status and output if it has exited (then it is no longer running).
    pub fn try_finish(&mut self) -> Option<(std::process::ExitStatus, String)> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some((status, self.output()))
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit; returns its exit status and
    /// output. Panics (after killing it) if it does not exit in time.
    pub fn terminate(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("the process is running");
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return (status, self.output());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM; output:\n{}",
                    self.what,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The queue depth `narpost status --json` reports for `env`'s state directory.
/// `narpost push --to URL --key KEY PATH`, to run as it is or with more arguments and
/// settings (a token file, a second path).
pub fn push_cmd(env: &Env, url: &str, key: &Path, path: &StorePath) -> Command {
    let mut cmd = env.narpost();
    cmd.args(["push", "--to", url, "--key"])
        .arg(key)
        .arg(path.to_absolute());
    cmd
}

/// Runs a push that must succeed; returns all it printed, stdout then stderr.
pub fn pushed(cmd: &mut Command) -> String {
    let out = run(cmd);
    stdout(&out) + &stderr(&out)
}

/// Queues `outs` as one entry, the way Nix runs the hook after a build, through
/// `narpost --config CONFIG hook`, and checks the entry is there.
pub fn hook_with_config(env: &Env, config: &Path, outs: &[StorePath]) {
    let out_paths: Vec<String> = outs.iter().map(StorePath::to_absolute).collect();
    run(env
        .narpost()
        .arg("--config")
        .arg(config)
        .arg("hook")
        .env("OUT_PATHS", out_paths.join(" ")));
    assert_eq!(queue_depth(env, config), 1);
}

/// Starts `cmd --config CONFIG SUBCOMMAND` (`daemon`, `watch-store`) in the background, its
/// output in `<env>/<subcommand>.log`.
pub fn spawn_with_config(env: &Env, cmd: &mut Command, config: &Path, sub: &str) -> Background {
    Background::spawn(
        cmd.arg("--config").arg(config).arg(sub),
        &env.path().join(format!("{sub}.log")),
        &format!("narpost {sub}"),
    )
}

/// Adds `text` to the end of a config file.
pub fn append_to_config(file: &Path, text: &str) {
    let mut old = fs::read_to_string(file).expect("read the config file");
    old.push_str(text);
    fs::write(file, old).expect("write the config file");
}

pub fn queue_depth(env: &Env, config: &Path) -> u64 {
    let out = run(env
        .narpost()
        .arg("--config")
        .arg(config)
        .args(["status", "--json"]));
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    status["queue_depth"]
        .as_u64()
        .unwrap_or_else(|| panic!("no queue_depth in {status}"))
}

/// One HTTP/1.1 request as a test server reads it.
pub struct Request {
    pub method: String,
    pub target: String,
    /// The request line and headers, up to the blank line.
    pub head: String,
    pub body: Vec<u8>,
}

/// Reads the next request off `stream`: its head, then a body of its `Content-Length` (the
/// clients tested here always send one). `buf` keeps what was read past it, for the next
/// request on the connection. `None` once the client closes or goes quiet.
pub fn read_request(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 16384];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let target = words.next().unwrap_or("").to_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    buf.drain(..head_end);
    while buf.len() < length {
        let mut chunk = vec![0u8; 256 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf.drain(..length).collect();
    Some(Request {
        method,
        target,
        head,
        body,
    })
}

/// A server that answers every request with the same canned response, recording nothing.
pub fn canned_server(response: &'static [u8], hang: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = stream.read(&mut buf);
                if hang {
                    std::thread::sleep(Duration::from_secs(60));
                    return;
                }
                let _ = std::io::Write::write_all(&mut stream, response);
            });
        }
    });
    port
}

// ---------------------------------------------------------------------------------------
// A store reachable only through nix-daemon, as for a user who cannot read the database.

/// A real `nix-daemon` serving this machine's store on a socket of its own, so clients can
/// be given a state directory without the store database and still reach the store.
pub struct NixDaemon {
    pub socket: PathBuf,
    _process: Background,
}

impl NixDaemon {
    pub fn start(scratch: &Path) -> NixDaemon {
        let socket = scratch.join("nix-daemon.socket");
        let mut cmd = nix("nix-daemon");
        cmd.env("NIX_DAEMON_SOCKET_PATH", &socket);
        let process = Background::spawn(&mut cmd, &scratch.join("nix-daemon.log"), "nix-daemon");
        let mut daemon = NixDaemon {
            socket,
            _process: process,
        };
        wait_until("nix-daemon to listen", Duration::from_secs(20), || {
            daemon._process.assert_running();
            daemon.socket.exists()
        });
        daemon
    }

    /// Makes `cmd` a client of this daemon (see [`nix_daemon_client`]).
    pub fn client(&self, cmd: &mut Command, state_dir: &Path) {
        nix_daemon_client(cmd, state_dir, &self.socket);
    }
}

/// Makes `cmd` a client of the nix-daemon on `socket` whose Nix state directory is
/// `state_dir`, where no store database is: Nix commands it runs go through the daemon.
pub fn nix_daemon_client(cmd: &mut Command, state_dir: &Path, socket: &Path) {
    fs::create_dir_all(state_dir).expect("create a state directory");
    cmd.env("NIX_STATE_DIR", state_dir)
        .env("NIX_REMOTE", "daemon")
        .env("NIX_DAEMON_SOCKET_PATH", socket);
}

// ---------------------------------------------------------------------------------------
// Which Nix runs the tests: Debian 12's 2.8 or, in scripts/test-nix-2.26, Debian 13's 2.26.
// Only what really differs between them asks.

/// The (major, minor) version of the `nix` on PATH.
pub fn nix_version() -> (u32, u32) {
    static VERSION: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let text = stdout(&run(nix("nix").arg("--version")));
        let number = text.split_whitespace().last().unwrap_or_default();
        let mut parts = number.split('.').map(|n| n.parse::<u32>());
        match (parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
            _ => panic!("cannot read the version in `nix --version`: {text:?}"),
        }
    })
}

/// Whether Nix passes the built outputs to `post-build-hook` in OUT_PATHS: Nix 2.8 leaves
/// it empty (so the hook reads them from the `.drv`); Nix 2.26 fills it.
pub fn nix_fills_out_paths() -> bool {
    nix_version() > (2, 8)
}

/// The pid of the process draining `state` (the one that publishes the drain state); a
/// narpost that lowered its priority drains in a process of its own.
pub fn drainer_pid(state: &Path) -> Option<u32> {
    let text = fs::read_to_string(state.join("drain-state.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["pid"].as_u64().map(|p| p as u32)
}

/// How a process is scheduled and where it sits, from /proc and `ionice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sched {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
    pub session: u32,
    pub tty: u64,
    /// The terminal's foreground process group.
    pub tpgid: i64,
    pub nice: i32,
    /// `/proc/PID/autogroup`: `/autogroup-N nice M`.
    pub autogroup: String,
    /// `ionice -p PID`: `none: prio 0`, `idle`, ...
    pub io: String,
}

impl Sched {
    /// The process `pid` as it is now.
    pub fn of(pid: u32) -> Sched {
        let read = |f: &str| {
            fs::read_to_string(format!("/proc/{pid}/{f}"))
                .unwrap_or_else(|e| panic!("read /proc/{pid}/{f}: {e}"))
        };
        let io = stdout(&run(Command::new("ionice").args(["-p", &pid.to_string()])));
        Sched::parse(&read("stat"), &read("autogroup"), &io)
    }

    /// From a `/proc/PID/stat` line, `/proc/PID/autogroup` and `ionice -p PID`.
    pub fn parse(stat: &str, autogroup: &str, io: &str) -> Sched {
        // Fields after the command name (in parentheses, which may contain spaces); the
        // first of them is field 3, the state.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f[n - 3];
        Sched {
            pid: stat
                .split(' ')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("pid"),
            ppid: field(4).parse().expect("ppid"),
            pgrp: field(5).parse().expect("pgrp"),
            session: field(6).parse().expect("session"),
            tty: field(7).parse().expect("tty_nr"),
            tpgid: field(8).parse().expect("tpgid"),
            nice: field(19).parse().expect("nice"),
            autogroup: autogroup.trim().to_string(),
            io: io.trim().to_string(),
        }
    }

    /// The process state letter (`S`, `R`, `T` stopped, `Z` zombie), or `None` once gone.
    pub fn state(pid: u32) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].chars().next()
    }

    pub fn autogroup_nice(&self) -> i32 {
        self.autogroup
            .rsplit_once("nice ")
            .and_then(|(_, n)| n.parse().ok())
            .expect("autogroup nice")
    }

    /// Lowered as narpost lowers its uploads: its own session, nice 19 for it and its
    /// autogroup, the idle I/O class.
    pub fn assert_idle(&self, what: &str) {
        assert!(
            self.session == self.pid
                && self.nice == 19
                && self.autogroup_nice() == 19
                && self.io == "idle",
            "{what} is not at idle priority in a session of its own: {self:?}"
        );
    }
}
