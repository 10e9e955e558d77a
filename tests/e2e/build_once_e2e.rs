//! Building once across two machines: this host (Nix 2.8) and the Debian 13 chroot of
//! `scripts/test-nix-2.26` (Nix 2.26, its own store, the same network), each with its own
//! narpost daemon, key and local substituter, and one nginx cache between them. Each Nix
//! uses only its own substituter and trusts both keys.
//!
//! `scripts/test-nix-2.26` runs these once the chroot is ready and mounted, naming it in
//! `NARPOST_PEER_ROOT`; the main test run leaves them to it.

use crate::common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// How long the middle derivation takes to build.
const B_SECONDS: u64 = 20;
/// `claim-timeout` of both daemons, short so that the dead-machine case ends soon.
const CLAIM_TIMEOUT: u64 = 5;

/// Both Nix stores are shared by every test here; their databases do not like daemonless
/// writers at once.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn peer_root() -> PathBuf {
    let root = std::env::var_os("NARPOST_PEER_ROOT").map(PathBuf::from).expect(
        "NARPOST_PEER_ROOT is not set: scripts/test-nix-2.26 runs these tests, with its chroot as the second machine",
    );
    assert!(
        root.join("usr/bin/nix-build").exists(),
        "{}: no Nix 2.26 chroot here; run scripts/test-nix-2.26",
        root.display()
    );
    root
}

/// One machine: where its files are (as the host sees them and as the machine does), how
/// to run a command on it, and its daemon.
struct Machine {
    name: &'static str,
    /// The chroot, for the peer; `None` for this host.
    root: Option<PathBuf>,
    /// Its scratch directory, as the host sees it and as the machine sees it.
    outside: PathBuf,
    inside: PathBuf,
    port: u16,
    metrics_port: u16,
    public: String,
    /// The keys its Nix trusts: both machines'.
    trusted: Vec<String>,
    daemon: Option<Child>,
}

impl Machine {
    fn new(name: &'static str, root: Option<PathBuf>, env: &Env) -> Machine {
        let inside = match &root {
            Some(_) => PathBuf::from(format!("/tmp/narpost-peer-{}", nonce())),
            None => env.path().join(name),
        };
        let outside = match &root {
            Some(r) => r.join(inside.strip_prefix("/").expect("an absolute path")),
            None => inside.clone(),
        };
        fs::create_dir_all(&outside).expect("make the machine's directory");
        let out = run(env
            .narpost()
            .args(["keygen", &format!("{name}-1"), "--out"])
            .arg(&outside));
        assert!(out.status.success(), "{}", stderr(&out));
        let public = fs::read_to_string(outside.join(format!("{name}-1.pub")))
            .expect("read the public key")
            .trim()
            .to_owned();
        Machine {
            name,
            root,
            outside,
            inside,
            port: free_port(),
            metrics_port: free_port(),
            public,
            trusted: Vec::new(),
            daemon: None,
        }
    }

    /// A command run on this machine, with nothing of the test's environment but `vars`.
    fn command(&self, program: &str, vars: &[(&str, String)]) -> Command {
        let mut all: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
            ),
            ("HOME".into(), "/root".into()),
            (
                "NARPOST_STATE_DIR".into(),
                self.inside.join("state").display().to_string(),
            ),
            (
                "NARPOST_CONFIG".into(),
                self.inside.join("narpost.toml").display().to_string(),
            ),
        ];
        all.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        match &self.root {
            // `env -i` inside: what the chroot process is given would not get through.
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).args(["env", "-i"]);
                c.args(all.iter().map(|(k, v)| format!("{k}={v}")));
                c.arg(program);
                c
            }
            None => {
                let mut c = Command::new(program);
                c.env_clear().envs(all);
                c
            }
        }
    }

    fn start_daemon(&mut self, cache: &str) {
        fs::write(
            self.outside.join("narpost.toml"),
            format!(
                "cache = \"{cache}\"\nsecret-key-file = \"{key}\"\nsubstituter-listen = \"127.0.0.1:{port}\"\nmachine = \"{name}\"\nclaim-timeout = {CLAIM_TIMEOUT}\ngc-roots-dir = \"{roots}\"\nmetrics-listen = \"127.0.0.1:{metrics}\"\n",
                metrics = self.metrics_port,
                key = self.inside.join(format!("{}-1.sec", self.name)).display(),
                port = self.port,
                name = self.name,
                roots = self.inside.join("gcroots").display(),
            ),
        )
        .expect("write the config");
        let log = fs::File::create(self.outside.join("daemon.log")).expect("daemon log");
        let mut cmd = self.command(
            &narpost_bin().to_string_lossy(),
            &[("RUST_LOG", "narpost=info".to_owned())],
        );
        cmd.arg("daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        let mut daemon = cmd.spawn().expect("start the daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = daemon.try_wait().expect("check the daemon");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the {} daemon does not serve (exit {exited:?}):\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.daemon = Some(daemon);
    }

    fn log(&self) -> String {
        fs::read_to_string(self.outside.join("daemon.log")).unwrap_or_default()
    }

    /// What `narpost status --json` says of the claims on this machine.
    fn claims(&self) -> serde_json::Value {
        let out = run(self
            .command(&narpost_bin().to_string_lossy(), &[])
            .args(["status", "--json"]));
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
        status["claims"].clone()
    }

    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .expect("connect to /metrics");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("ask for /metrics");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    }

    fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// `nix-build` of `attr` of the expression, with the hook and this machine's own
    /// substituter only; started, not waited for.
    fn build(&self, expr: &str, attr: &str) -> Child {
        fs::write(self.outside.join("closure.nix"), expr).expect("write the expression");
        let hook = self.outside.join("hook");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\nexport NARPOST_STATE_DIR='{}' NARPOST_CONFIG='{}'\nexec '{}' hook\n",
                self.inside.join("state").display(),
                self.inside.join("narpost.toml").display(),
                narpost_bin().display()
            ),
        )
        .expect("write the hook");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod the hook");
        let nix_config = format!(
            "substituters = http://127.0.0.1:{port}\ntrusted-public-keys = {keys}\nrequire-sigs = true\nsandbox = false\npost-build-hook = {hook}\nexperimental-features = nix-command\n",
            port = self.port,
            keys = self.trusted.join(" "),
            hook = self.inside.join("hook").display()
        );
        let mut cmd = self.command("nix-build", &[("NIX_CONFIG", nix_config)]);
        cmd.arg(self.inside.join("closure.nix"))
            .args(["-A", attr, "--no-out-link"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                fs::File::create(self.outside.join(format!("build-{attr}.log")))
                    .expect("build log"),
            );
        cmd.process_group(0);
        cmd.spawn().expect("start nix-build")
    }
}

/// Two machines and the cache between them.
struct Fleet {
    env: Env,
    _nginx: Nginx,
    host: Machine,
    peer: Machine,
}

impl Fleet {
    fn start() -> Fleet {
        let root = peer_root();
        let env = Env::new();
        let nginx = Nginx::start(env.path());
        let mut host = Machine::new("host", None, &env);
        let mut peer = Machine::new("peer", Some(root), &env);
        let trusted = vec![host.public.clone(), peer.public.clone()];
        host.trusted = trusted.clone();
        peer.trusted = trusted;
        host.start_daemon(&nginx.url());
        peer.start_daemon(&nginx.url());
        Fleet {
            env,
            _nginx: nginx,
            host,
            peer,
        }
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for m in [&self.host, &self.peer] {
            text += &format!("--- {} daemon:\n{}", m.name, m.log());
            let build = fs::read_to_string(m.outside.join("build-c.log")).unwrap_or_default();
            text += &format!("--- {} nix-build:\n{build}", m.name);
        }
        text
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.host.kill_daemon();
        self.peer.kill_daemon();
        // The peer's files are in the chroot, outside the test's temporary directory.
        let _ = fs::remove_dir_all(&self.peer.outside);
        let _ = &self.env;
    }
}

/// a -> b -> c, where building b takes [`B_SECONDS`] and notes its start in
/// `/tmp/narpost-once-<nonce>` of the machine that builds it, and fails where
/// `/tmp/narpost-once-<nonce>-fail` exists. The same text on both machines: the same paths.
fn closure(nonce: &str) -> String {
    let marker = format!("/tmp/narpost-once-{nonce}");
    format!(
        r#"{prelude}rec {{
  a = mk "narpost-once-a" "echo a > $out";
  b = mk "narpost-once-b" "echo start $(date +%s.%N) >> {marker}; sleep {B_SECONDS}; if [ -e {marker}-fail ]; then exit 1; fi; echo ${{a}} > $out";
  c = mk "narpost-once-c" "echo ${{b}} > $out";
}}
"#,
        prelude = nix_prelude(nonce)
    )
}

/// When b's builds started, on either machine (seconds since the epoch).
fn b_starts(fleet: &Fleet, nonce: &str) -> Vec<f64> {
    let mut starts = Vec::new();
    for dir in [
        PathBuf::from("/tmp"),
        fleet.peer.root.clone().expect("a chroot").join("tmp"),
    ] {
        let text =
            fs::read_to_string(dir.join(format!("narpost-once-{nonce}"))).unwrap_or_default();
        starts.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("start "))
                .filter_map(|t| t.trim().parse::<f64>().ok()),
        );
        let _ = fs::remove_file(dir.join(format!("narpost-once-{nonce}")));
    }
    starts
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Waits for a build; its exit, its output path, and when it ended.
fn finish(mut child: Child, what: &str, fleet: &Fleet) -> (ExitStatus, String, Instant) {
    let deadline = Instant::now() + Duration::from_secs(4 * B_SECONDS + 60);
    loop {
        if let Some(status) = child.try_wait().expect("wait for nix-build") {
            let ended = Instant::now();
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                use std::io::Read;
                let _ = stdout.read_to_string(&mut out);
            }
            return (status, out.trim().to_owned(), ended);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end:\n{}", fleet.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn started_3_s_apart_b_is_built_once_and_the_second_machine_substitutes_everything() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = Fleet::start();
    let nonce = nonce();
    let expr = closure(&nonce);
    let first = fleet.host.build(&expr, "c");
    std::thread::sleep(Duration::from_secs(3));
    let second = fleet.peer.build(&expr, "c");
    // While b builds on the first machine, the second waits for it, and both say so.
    std::thread::sleep(Duration::from_secs(2));
    let (held, waiting) = (fleet.host.claims(), fleet.peer.claims());
    assert_eq!(held["machine"], "host", "{held}");
    // The second asks about c first, which the first holds (with b; a may be uploaded).
    let waited = waiting["waiting"].as_array().cloned().unwrap_or_default();
    assert_eq!(waited.len(), 1, "{waiting}");
    let holds = held["held"].as_array().cloned().unwrap_or_default();
    assert!(holds.contains(&waited[0]), "{held} {waiting}");
    let (s1, out1, t1) = finish(first, "the first machine's build", &fleet);
    let (s2, out2, t2) = finish(second, "the second machine's build", &fleet);
    assert!(s1.success() && s2.success(), "{}", fleet.logs());
    assert_eq!(out1, out2, "the same path on both");
    assert_eq!(
        b_starts(&fleet, &nonce).len(),
        1,
        "b built once:\n{}",
        fleet.logs()
    );
    let behind = t2.saturating_duration_since(t1);
    eprintln!("the second build ended {behind:?} after the first");
    assert!(
        behind < Duration::from_secs(10),
        "the second build ended {behind:?} after the first:\n{}",
        fleet.logs()
    );
    assert!(
        fleet.peer.log().contains("substituting it"),
        "{}",
        fleet.logs()
    );
    // Published within a watch period of the wait's end.
    wait_until(
        "the saved build in the metrics",
        Duration::from_secs(5),
        || {
            fleet
                .peer
                .metrics()
                .contains("narpost_builds_saved_total 1")
        },
    );
}

#[test]
fn started_at_the_same_moment_b_is_built_once_and_both_succeed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = Fleet::start();
    let nonce = nonce();
    let expr = closure(&nonce);
    let first = fleet.host.build(&expr, "c");
    let second = fleet.peer.build(&expr, "c");
    let (s1, out1, _) = finish(first, "the host's build", &fleet);
    let (s2, out2, _) = finish(second, "the peer's build", &fleet);
    assert!(s1.success() && s2.success(), "{}", fleet.logs());
    assert_eq!(out1, out2);
    assert_eq!(
        b_starts(&fleet, &nonce).len(),
        1,
        "b built once:\n{}",
        fleet.logs()
    );
}

#[test]
fn when_the_first_machines_build_fails_the_second_builds_at_once_and_succeeds() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = Fleet::start();
    let nonce = nonce();
    let expr = closure(&nonce);
    let fail = PathBuf::from(format!("/tmp/narpost-once-{nonce}-fail"));
    fs::write(&fail, "").expect("write the failure marker");
    let first = fleet.host.build(&expr, "c");
    std::thread::sleep(Duration::from_secs(3));
    let second = fleet.peer.build(&expr, "c");
    let (s1, _, _) = finish(first, "the failing build", &fleet);
    let failed_at = epoch_now();
    let _ = fs::remove_file(&fail);
    assert!(!s1.success(), "the first machine's build of b fails");
    let (s2, _, _) = finish(second, "the second machine's build", &fleet);
    assert!(s2.success(), "{}", fleet.logs());
    let starts = b_starts(&fleet, &nonce);
    assert_eq!(starts.len(), 2, "{starts:?}\n{}", fleet.logs());
    let took_over = starts[1] - failed_at;
    eprintln!("the second machine started b {took_over:.2} s after the first one's failed");
    assert!(
        took_over < 3.0,
        "the second machine started b {took_over:.1} s after the failure:\n{}",
        fleet.logs()
    );
}

#[test]
fn when_the_first_machine_dies_mid_build_the_second_builds_within_the_claim_timeout() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = Fleet::start();
    let nonce = nonce();
    let expr = closure(&nonce);
    let first = fleet.host.build(&expr, "c");
    std::thread::sleep(Duration::from_secs(3));
    let second = fleet.peer.build(&expr, "c");
    std::thread::sleep(Duration::from_secs(2));
    // The machine dies: its nix-build, the builder and the daemon, all at once.
    let group = rustix::process::Pid::from_raw(first.id() as i32).expect("a pid");
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    let _ = Command::new("pkill").args(["-9", "-f", &nonce]).status();
    fleet.host.kill_daemon();
    let killed = Instant::now();
    let (s2, _, t2) = finish(second, "the second machine's build", &fleet);
    assert!(s2.success(), "{}", fleet.logs());
    let took = t2.duration_since(killed);
    eprintln!("the second machine's build ended {took:?} after the first machine died");
    assert!(
        took < Duration::from_secs(CLAIM_TIMEOUT + B_SECONDS + 15),
        "the second machine took {took:?} after the first died:\n{}",
        fleet.logs()
    );
    drop(first);
    let starts = b_starts(&fleet, &nonce);
    assert_eq!(starts.len(), 2, "{starts:?}");
}
