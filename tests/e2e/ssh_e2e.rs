//! The `ssh://` target end to end: a real sshd on 127.0.0.1 whose authorized key's forced
//! command is `nix-store --serve --write` (as NixOS's `nix.sshServe` sets it up), the real
//! Nix on the far side, and a fresh Nix store that copies the pushed paths from there with
//! signatures required.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use narpost::format::store_path::StorePath;

/// A real OpenSSH server for one test, on its own port with its own host key.
struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// The key the server lets in.
    client_key: PathBuf,
}

const SSHD: &str = "/usr/sbin/sshd";

fn keygen(file: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "narpost-test", "-f"])
        .arg(file));
}

impl Sshd {
    /// `command` is the forced command of the one authorized key.
    fn start(scratch: &Path, name: &str, command: &str) -> Sshd {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is not installed: the ssh tests need the real sshd; run scripts/install-deps (as root)"
        );
        require("ssh");
        let dir = scratch.join(name);
        fs::create_dir_all(&dir).expect("create the sshd directory");
        keygen(&dir.join("host_key"));
        let client_key = dir.join("client_key");
        keygen(&client_key);
        let public = fs::read_to_string(dir.join("client_key.pub")).expect("client key");
        fs::write(
            dir.join("authorized_keys"),
            format!("command=\"{command}\",restrict {public}"),
        )
        .expect("write authorized_keys");
        let port = free_port();
        fs::write(
            dir.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1\nListenAddress [::1]\nPort {port}\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPidFile none\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nLogLevel ERROR\nMaxStartups 100\n",
                dir = dir.display()
            ),
        )
        .expect("write sshd_config");
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let mut sshd = Sshd {
            dir,
            port,
            child: None,
            client_key,
        };
        sshd.resume();
        sshd
    }

    fn resume(&mut self) {
        let log = fs::File::create(self.dir.join("sshd.log")).expect("sshd log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(self.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The host's public key line as `base64-ssh-public-host-key` wants it.
    fn host_key_b64(&self) -> String {
        public_key_b64(&self.dir.join("host_key.pub"))
    }

    fn url(&self) -> String {
        self.url_with(&self.client_key, &self.host_key_b64())
    }

    fn url_with(&self, key: &Path, host_key_b64: &str) -> String {
        format!(
            "ssh://root@127.0.0.1:{}?ssh-key={}&base64-ssh-public-host-key={}",
            self.port,
            key.display(),
            host_key_b64
        )
    }
}

/// A public key file's `TYPE BASE64` line, base64-encoded as `base64-ssh-public-host-key`
/// wants it.
fn public_key_b64(file: &Path) -> String {
    let line = fs::read_to_string(file).expect("read a public key");
    let line: Vec<&str> = line.split_whitespace().take(2).collect();
    base64::engine::general_purpose::STANDARD.encode(line.join(" "))
}

/// A host for one test: a chroot store behind its own sshd. Returns (the store, the sshd).
fn host(env: &Env) -> (String, Sshd) {
    let remote = env.path().join("remote").display().to_string();
    let sshd = Sshd::start(env.path(), "sshd", &serve_command(&remote));
    (remote, sshd)
}

/// One new path named `name`.
fn build_one(env: &Env, name: &str) -> StorePath {
    let expr = format!("{}mk \"{name}\" \"echo x > $out\"\n", nix_prelude(&nonce()));
    nix_build(&env.write_nix(&format!("{name}.nix"), &expr), &[], &[]).remove(0)
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A nix-daemon of the test's own, over a chroot store, that trusts no user (so the ssh
/// login, root here, counts as untrusted) and requires signatures by `trusted_key`.
struct NixDaemon {
    root: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl NixDaemon {
    fn start(scratch: &Path, trusted_key: &str) -> NixDaemon {
        require("nix-daemon");
        let root = scratch.join("daemon-store");
        let socket = scratch.join("daemon.socket");
        let log = fs::File::create(scratch.join("nix-daemon.log")).expect("daemon log");
        let child = Command::new("nix-daemon")
            .env(
                "NIX_CONFIG",
                format!(
                    "store = {}\nrequire-sigs = true\ntrusted-users = nobody\n\
                     trusted-public-keys = {trusted_key}\nbuild-users-group =\nsubstituters =\n",
                    root.display()
                ),
            )
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .env_remove("NIX_REMOTE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start nix-daemon");
        wait_until("the nix-daemon socket", Duration::from_secs(10), || {
            socket.exists()
        });
        NixDaemon {
            root,
            socket,
            child,
        }
    }

    fn store_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_command(store: &str) -> String {
    format!("nix-store --serve --write --store {store}")
}

/// The paths valid in `store`, among the closure of `root`.
fn valid_in(store: &str, root: &StorePath) -> Vec<StorePath> {
    let mut cmd = nix("nix-store");
    cmd.args(["--store", store, "--check-validity", "--print-invalid"]);
    let closure = nix_closure(std::slice::from_ref(root));
    for p in &closure {
        cmd.arg(p.to_absolute());
    }
    let out = run(&mut cmd);
    let invalid: Vec<StorePath> = parse_paths(&stdout(&out));
    closure
        .into_iter()
        .filter(|p| !invalid.contains(p))
        .collect()
}

/// `nix store verify`: contents match and every path carries a signature by `key`.
fn assert_verified(store: &str, key: &str, paths: &[StorePath]) {
    let mut cmd = nix("nix");
    cmd.args([
        "store",
        "verify",
        "--store",
        store,
        "-r",
        "--sigs-needed",
        "1",
    ])
    .args(["--option", "trusted-public-keys", key]);
    for p in paths {
        cmd.arg(p.to_absolute());
    }
    run(&mut cmd);
}

fn failed_push(env: &Env, url: &str, key: &Path, path: &StorePath) -> String {
    let mut cmd = push_cmd(env, url, key, path);
    // A host that is down is retried for retry-timeout: a few seconds of it here.
    cmd.env("NARPOST_RETRY_TIMEOUT", "5");
    let out = cmd.output().expect("run narpost");
    assert!(!out.status.success(), "expected failure: {cmd:?}");
    stderr(&out)
}

/// The line of `text` that says `needle`, which must be the only one that does (the
/// progress line and the closing summary may both show it).
fn one_line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(needle) && !l.contains("retrying in"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(lines.len(), 1, "one line with {needle:?} expected:\n{text}");
    lines[0]
}

#[test]
fn push_makes_the_closure_valid_and_signed_in_the_hosts_store() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("ssh-test-1");
    let (remote, sshd) = host(&env);

    let mut first = push_cmd(&env, &sshd.url(), &key, &top);
    let text = pushed(first.args(["--jobs", "4"]));
    let closure = nix_closure(std::slice::from_ref(&top));
    assert_eq!(valid_in(&remote, &top).len(), closure.len(), "{text}");
    assert_verified(&remote, &public, std::slice::from_ref(&top));
    // A fresh store copies the closure from the host's store, signatures required.
    assert_substitutes(&env, &remote, &public, &outs);

    let text = pushed(&mut push_cmd(&env, &sshd.url(), &key, &top));
    assert!(
        text.contains(&format!("all {} paths were already cached", closure.len())),
        "{text}"
    );
}

/// Without `secret-key-file` the host gets paths signed by the generated default key, as
/// every other cache does; and a host given as an IPv6 address is reached.
#[test]
fn with_no_key_configured_paths_arrive_signed_by_the_default_key_over_ipv6() {
    let env = Env::new();
    let path = build_one(&env, "narpost-ssh-nokey");
    let (remote, sshd) = host(&env);
    let url = format!(
        "ssh://root@[::1]:{}?ssh-key={}&base64-ssh-public-host-key={}",
        sshd.port,
        sshd.client_key.display(),
        sshd.host_key_b64()
    );
    let out = run(env
        .narpost()
        .args(["push", "--to", &url])
        .arg(path.to_absolute()));
    assert!(
        stderr(&out).contains("generated signing key"),
        "{}",
        stderr(&out)
    );
    let public = fs::read_to_string(env.state().join("signing.pub")).expect("default key");
    assert_eq!(valid_in(&remote, &path), vec![path.clone()]);
    assert_verified(&remote, public.trim(), std::slice::from_ref(&path));
}

#[test]
fn an_untrusted_login_through_a_daemon_needs_narposts_signature() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("ssh-trusted-1");
    let daemon = NixDaemon::start(env.path(), &public);
    let sshd = Sshd::start(env.path(), "sshd", &serve_command(&daemon.store_url()));

    pushed(&mut push_cmd(&env, &sshd.url(), &key, &top));
    let root = daemon.root.display().to_string();
    assert_eq!(
        valid_in(&root, &top).len(),
        nix_closure(std::slice::from_ref(&top)).len()
    );
    assert_substitutes(&env, &root, &public, &outs);

    // Paths signed by a key the host does not trust are refused, in one line with a hint.
    let other_path = build_one(&env, "narpost-ssh-untrusted");
    let (other_key, _) = env.keygen("ssh-untrusted-1");
    let err = failed_push(&env, &sshd.url(), &other_key, &other_path);
    let line = one_line_with(&err, "lacks a valid signature");
    assert!(line.contains("127.0.0.1"), "{line}");
    assert!(
        err.contains("hint: add narpost's public key to trusted-public-keys"),
        "{err}"
    );
    assert!(valid_in(&root, &other_path).is_empty());
}

#[test]
fn host_down_wrong_host_key_and_refused_key_are_one_line_each() {
    let env = Env::new();
    let path = build_one(&env, "narpost-ssh-fail");
    let (key, _) = env.keygen("ssh-fail-1");
    let (remote, mut sshd) = host(&env);

    // Another key pair: its public half as the "host key", its private half as the login.
    let stranger = env.path().join("stranger");
    keygen(&stranger);
    let wrong_host_key = public_key_b64(&stranger.with_extension("pub"));

    let err = failed_push(
        &env,
        &sshd.url_with(&sshd.client_key, &wrong_host_key),
        &key,
        &path,
    );
    one_line_with(&err, "the host's key is not the one expected");
    assert!(err.contains("hint: base64-ssh-public-host-key"), "{err}");

    let err = failed_push(
        &env,
        &sshd.url_with(&stranger, &sshd.host_key_b64()),
        &key,
        &path,
    );
    one_line_with(&err, "ssh login refused");
    assert!(err.contains("Permission denied"), "{err}");

    sshd.stop();
    let started = Instant::now();
    let err = failed_push(&env, &sshd.url(), &key, &path);
    one_line_with(&err, "cannot reach the host");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );

    // A remote without nix-store.
    sshd.resume();
    let mut broken = Sshd::start(
        env.path(),
        "sshd-broken",
        "no-such-nix-store --serve --write",
    );
    let err = failed_push(&env, &broken.url(), &key, &path);
    let line = one_line_with(&err, "not found");
    assert!(line.contains("no-such-nix-store"), "{line}");
    assert!(err.contains("remote-program"), "{err}");
    broken.stop();
    assert!(valid_in(&remote, &path).is_empty());
}

#[test]
fn hook_and_daemon_keep_paths_queued_while_the_host_is_down() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (key, public) = env.keygen("ssh-daemon-1");
    let (remote, mut sshd) = host(&env);
    sshd.stop();

    let config = env.path().join("narpost.toml");
    fs::write(
        &config,
        format!(
            "cache = \"{}\"\nsecret-key-file = \"{}\"\nhttp-timeout = 10\n",
            sshd.url(),
            key.display()
        ),
    )
    .expect("write the config");
    hook_with_config(&env, &config, std::slice::from_ref(&top));
    let mut daemon = spawn_with_config(&env, &mut env.narpost(), &config, "daemon");
    daemon.wait_for_output("cannot reach the host", Duration::from_secs(60));
    assert_eq!(queue_depth(&env, &config), 1);
    assert!(valid_in(&remote, &top).is_empty());

    sshd.resume();
    wait_until("the queue drains", Duration::from_secs(120), || {
        queue_depth(&env, &config) == 0
    });
    assert_eq!(
        valid_in(&remote, &top).len(),
        nix_closure(std::slice::from_ref(&top)).len()
    );
    assert_verified(&remote, &public, std::slice::from_ref(&top));
    assert_substitutes(&env, &remote, &public, &outs);
    let (status, output) = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{output}");
}

#[test]
fn kill_9_mid_push_leaves_only_complete_paths_and_the_next_push_finishes() {
    let env = Env::new();
    let top = build_with_big_path(&env);
    let (key, public) = env.keygen("ssh-kill-1");
    let (remote, sshd) = host(&env);

    let mut push = push_cmd(&env, &sshd.url(), &key, &top)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the push");
    // Kill it as soon as the first path is in, while the big one is on its way.
    wait_until(
        "the first path on the host",
        Duration::from_secs(120),
        || !valid_in(&remote, &top).is_empty(),
    );
    push.kill().expect("kill -9");
    let _ = push.wait();

    let valid = valid_in(&remote, &top);
    assert!(!valid.is_empty());
    assert!(
        valid.len() < 3,
        "the push finished before it was killed; nothing was interrupted"
    );
    // Whatever the host has is complete (contents match their hashes) and signed.
    assert_verified(&remote, &public, &valid);

    pushed(&mut push_cmd(&env, &sshd.url(), &key, &top));
    assert_eq!(valid_in(&remote, &top).len(), 3);
    assert_verified(&remote, &public, std::slice::from_ref(&top));
}

/// A host's store takes a path only once its references are valid there, so `upstream-keys`
/// leaves nothing out for ssh: a closure with an upstream-signed path arrives whole.
#[test]
fn upstream_signed_paths_still_reach_a_hosts_store() {
    let env = Env::new();
    let (top, outs) = build_rich_closure(&env);
    let (upstream_key, _) = env.keygen("ssh-upstream-1");
    // `base` is referred to by two paths of the closure.
    let base = outs.last().expect("base").clone();
    run(nix("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&upstream_key)
        .arg(base.to_absolute()));
    let (key, _) = env.keygen("ssh-test-1");
    let config = env.path().join("narpost.toml");
    std::fs::write(&config, "upstream-keys = [\"ssh-upstream-1\"]\n").expect("write config");
    let (remote, sshd) = host(&env);
    let text = pushed(
        push_cmd(&env, &sshd.url(), &key, &top)
            .arg("--config")
            .arg(&config),
    );
    let closure = nix_closure(std::slice::from_ref(&top));
    assert_eq!(valid_in(&remote, &top).len(), closure.len(), "{text}");
    assert!(text.contains("0 left to upstream"), "{text}");
}

/// A closure of a small path, a 150 MB one referring to it, and a top one; returns the top.
fn build_with_big_path(env: &Env) -> StorePath {
    let expr = format!(
        r#"{prelude}rec {{
  small = mk "narpost-ssh-small" "echo small > $out";
  big = mk "narpost-ssh-big" "mkdir $out && echo ${{small}} > $out/ref && head -c 150000000 /dev/urandom > $out/blob";
  top = mk "narpost-ssh-top" "echo ${{big}} > $out";
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    nix_build(&env.write_nix("big.nix", &expr), &["top"], &[]).remove(0)
}

/// The pids of the `nix-store --serve` processes the test's sshd runs for `remote`.
fn serve_processes(remote: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("--serve") && cmdline.contains(remote) && !cmdline.contains("sh -c") {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_connection_lost_mid_push_is_reopened_and_the_push_finishes() {
    let env = Env::new();
    let top = build_with_big_path(&env);
    let (key, public) = env.keygen("ssh-reconnect-1");
    let (remote, sshd) = host(&env);

    let log = env.path().join("push.log");
    let mut push = Background::spawn(
        &mut push_cmd(&env, &sshd.url(), &key, &top),
        &log,
        "narpost push",
    );
    // The remote end dies while the big NAR is on its way: once the host writes its blob
    // and before the path is valid. Waiting for the small path to be valid would not do:
    // the big one goes out right behind it and may be in by the time that is seen.
    let big = nix_closure(std::slice::from_ref(&top))
        .into_iter()
        .find(|p| p.name() == "narpost-ssh-big")
        .expect("the big path in the closure");
    let blob = Path::new(&remote)
        .join("nix/store")
        .join(big.base())
        .join("blob");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !blob.exists() {
        assert!(
            Instant::now() < deadline,
            "the host never started on the big path"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pids = serve_processes(&remote);
    assert!(!pids.is_empty(), "no nix-store --serve for {remote}");
    for pid in pids {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).expect("a pid"),
            rustix::process::Signal::KILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let (status, output) = loop {
        if let Some(done) = push.try_finish() {
            break done;
        }
        assert!(Instant::now() < deadline, "the push did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{output}");
    assert!(valid_in(&remote, &top).len() == 3, "{output}");
    assert!(
        output.contains("retrying in"),
        "the push finished before the connection was cut; nothing was retried:\n{output}"
    );
    assert_verified(&remote, &public, std::slice::from_ref(&top));
}

#[test]
fn watch_exec_pushes_what_the_command_builds_through_the_config_file() {
    let env = Env::new();
    let (key, public) = env.keygen("ssh-watch-1");
    let (remote, sshd) = host(&env);
    let config = env.path().join("narpost.toml");
    fs::write(
        &config,
        format!(
            "cache = \"{}\"\nsecret-key-file = \"{}\"\n",
            sshd.url(),
            key.display()
        ),
    )
    .expect("write the config");
    let expr = format!(
        "{}rec {{\n  base = mk \"narpost-ssh-w-base\" \"echo base > $out\";\n  top = mk \"narpost-ssh-w-top\" \"echo ${{base}} > $out\";\n}}\n",
        nix_prelude(&nonce())
    );
    let file = env.write_nix("watch.nix", &expr);
    let out = run(env
        .narpost()
        .arg("--config")
        .arg(&config)
        .args(["watch-exec", "--", "nix-build"])
        .arg(&file)
        .args(["-A", "top", "--no-out-link"]));
    let top = parse_paths(&stdout(&out)).remove(0);
    // watch-exec returns after the uploads.
    assert_eq!(valid_in(&remote, &top).len(), 2, "{}", stderr(&out));
    assert_verified(&remote, &public, std::slice::from_ref(&top));
}

#[test]
fn a_path_that_no_longer_matches_its_hash_never_becomes_valid_on_the_host() {
    let env = Env::new();
    let expr = format!(
        r#"{prelude}rec {{
  victim = mk "narpost-ssh-victim" "mkdir -p $out && echo original > $out/data";
  user = mk "narpost-ssh-user" "echo ${{victim}} > $out";
  bystander = mk "narpost-ssh-bystander" "echo fine > $out";
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let outs = nix_build(
        &env.write_nix("corrupt.nix", &expr),
        &["victim", "user", "bystander"],
        &[],
    );
    let (victim, user, bystander) = (&outs[0], &outs[1], &outs[2]);
    // Same length: only the hash can tell, after the last byte was read.
    corrupt_store_file(
        &Path::new(&victim.to_absolute()).join("data"),
        b"tampered\n",
    );
    let (key, _) = env.keygen("ssh-corrupt-1");
    let (remote, sshd) = host(&env);

    let out = push_cmd(&env, &sshd.url(), &key, user)
        .arg(bystander.to_absolute())
        .output()
        .expect("run narpost");
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    let line = one_line_with(&text, "does not match the store's record");
    assert!(line.contains(&victim.to_absolute()), "{line}");
    assert!(valid_in(&remote, victim).is_empty(), "{text}");
    assert!(valid_in(&remote, user).is_empty(), "{text}");
    assert_eq!(valid_in(&remote, bystander).len(), 1, "{text}");
}

#[test]
fn the_daemon_keeps_paths_queued_through_a_wrong_host_key_until_the_config_is_fixed() {
    let env = Env::new();
    let path = build_one(&env, "narpost-ssh-hostkey");
    let (key, public) = env.keygen("ssh-hostkey-1");
    let (remote, sshd) = host(&env);
    let wrong_host_key = public_key_b64(&sshd.client_key.with_extension("pub"));
    let config = env.path().join("narpost.toml");
    let write_config = |url: &str| {
        fs::write(
            &config,
            format!(
                "cache = \"{url}\"\nsecret-key-file = \"{}\"\n",
                key.display()
            ),
        )
        .expect("write the config")
    };
    write_config(&sshd.url_with(&sshd.client_key, &wrong_host_key));
    hook_with_config(&env, &config, std::slice::from_ref(&path));
    let mut daemon = spawn_with_config(&env, &mut env.narpost(), &config, "daemon");
    daemon.wait_for_output(
        "the host's key is not the one expected",
        Duration::from_secs(60),
    );
    let (status, output) = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{output}");
    assert_eq!(queue_depth(&env, &config), 1, "{output}");
    assert!(valid_in(&remote, &path).is_empty());

    write_config(&sshd.url());
    let daemon = spawn_with_config(&env, &mut env.narpost(), &config, "daemon");
    wait_until("the queue drains", Duration::from_secs(60), || {
        queue_depth(&env, &config) == 0
    });
    assert_verified(&remote, &public, std::slice::from_ref(&path));
    let (status, output) = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{output}");
}

/// A chain of `depth` paths, each referring to the one before; returns the last.
fn build_chain(env: &Env, depth: usize) -> StorePath {
    let mut expr = format!("{}rec {{\n", nix_prelude(&nonce()));
    expr.push_str("  l0 = mk \"narpost-chain-0\" \"echo 0 > $out\";\n");
    for i in 1..depth {
        expr.push_str(&format!(
            "  l{i} = mk \"narpost-chain-{i}\" \"echo ${{l{}}} > $out\";\n",
            i - 1
        ));
    }
    expr.push_str("}\n");
    let file = env.write_nix("chain.nix", &expr);
    nix_build(&file, &[&format!("l{}", depth - 1)], &[]).remove(0)
}

/// Each link goes out behind the one it refers to, before that one is answered: the host
/// must still get every link after its reference, and the whole chain valid and signed.
#[test]
fn a_deep_chain_arrives_whole_with_each_link_sent_behind_its_reference() {
    let env = Env::new();
    let depth = 40;
    let top = build_chain(&env, depth);
    let (key, public) = env.keygen("ssh-chain-1");
    let (remote, sshd) = host(&env);

    let text = pushed(push_cmd(&env, &sshd.url(), &key, &top).args(["--jobs", "4"]));
    assert_eq!(valid_in(&remote, &top).len(), depth, "{text}");
    assert!(!text.contains("retrying"), "{text}");
    assert_verified(&remote, &public, std::slice::from_ref(&top));

    let text = pushed(&mut push_cmd(&env, &sshd.url(), &key, &top));
    assert!(
        text.contains(&format!("all {depth} paths were already cached")),
        "{text}"
    );
}
