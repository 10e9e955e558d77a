//! The release tarball (`scripts/release`), as a user gets it: its binaries are static and
//! stripped, and they work alone in a chroot that holds nothing but them, `/proc`, `/dev`,
//! the Nix store (`/nix`, bind-mounted) and an `/etc/hosts` naming the caches: no dynamic
//! loader, no shared library, no NSS module, no `resolv.conf`. There, a push by host name to
//! a real nginx and to a real S3 server succeeds and a fresh store on the host substitutes
//! it with signatures required, and `narpost-hook` queues a path.
//!
//! The tarball comes from `NARPOST_RELEASE_TARBALL` (scripts/test builds it and sets it);
//! without it every test here fails.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    Env, Nginx, assert_substitutes, free_port, nix_build, nix_prelude, nonce, run, stderr, stdout,
    wait_for_port,
};
use narpost::format::store_path::StorePath;
use narpost::queue::Queue;

/// Host names only the chroot's /etc/hosts knows.
const HTTP_HOST: &str = "cache.narpost-release.test";
const S3_HOST: &str = "s3.narpost-release.test";

fn tarball() -> PathBuf {
    let path = std::env::var_os("NARPOST_RELEASE_TARBALL").map(PathBuf::from);
    match path {
        Some(p) if p.is_file() => p,
        Some(p) => panic!(
            "NARPOST_RELEASE_TARBALL={}: no such file; run scripts/release",
            p.display()
        ),
        None => panic!(
            "NARPOST_RELEASE_TARBALL is not set: these tests check the release tarball; \
             run scripts/test, or scripts/release and set it to the tarball it prints"
        ),
    }
}

/// Unpacks the tarball into `scratch`; returns the one directory it holds.
fn unpack(scratch: &Path) -> PathBuf {
    let tarball = tarball();
    let into = scratch.join("unpacked");
    fs::create_dir_all(&into).expect("create the unpack directory");
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&into));
    let top: Vec<PathBuf> = fs::read_dir(&into)
        .expect("list the unpacked tarball")
        .map(|e| e.expect("read a directory entry").path())
        .collect();
    assert_eq!(top.len(), 1, "one top directory in the tarball: {top:?}");
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.gz"))
        .expect("the tarball is named <dir>.tar.gz");
    assert_eq!(top[0].file_name().and_then(|n| n.to_str()), Some(name));
    top[0].clone()
}

fn tool(program: &str, args: &[&str], file: &Path) -> String {
    common::require(program);
    let out = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    format!("{}{}", stdout(&out), stderr(&out))
}

#[test]
fn tarball_holds_static_stripped_binaries_and_what_an_install_needs() {
    let env = Env::new();
    let top = unpack(env.path());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        top.file_name().and_then(|n| n.to_str()),
        Some(format!("narpost-{version}-x86_64-linux").as_str())
    );
    for file in [
        "bin/narpost",
        "bin/narpost-hook",
        "systemd/narpost.service",
        "hook/narpost-hook",
        "hook/nix.conf.example",
        "README.md",
        "share/bash-completion/completions/narpost",
        "share/zsh/site-functions/_narpost",
        "share/fish/vendor_completions.d/narpost.fish",
        "share/man/man1/narpost.1",
        "share/man/man1/narpost-push.1",
    ] {
        assert!(
            top.join(file).is_file(),
            "{file} is missing from the tarball"
        );
    }

    let tarball = tarball();
    let dist = tarball.parent().expect("the tarball's directory");
    let sums = fs::read_to_string(dist.join("SHA256SUMS")).expect("SHA256SUMS beside the tarball");
    let out = run(Command::new("sha256sum")
        .arg("-c")
        .arg(dist.join("SHA256SUMS"))
        .current_dir(dist));
    assert!(stdout(&out).contains(": OK"), "{sums}\n{}", stdout(&out));

    const MIB: u64 = 1024 * 1024;
    for (bin, limit) in [("narpost", 20 * MIB), ("narpost-hook", 2 * MIB)] {
        let path = top.join("bin").join(bin);
        let described = tool("file", &[], &path);
        assert!(
            described.contains("statically linked") || described.contains("static-pie linked"),
            "{described}"
        );
        assert!(
            described.contains(", stripped") && !described.contains("not stripped"),
            "{described}"
        );
        let ldd = tool("ldd", &[], &path);
        assert!(
            ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
            "{ldd}"
        );
        let headers = tool("readelf", &["-lW"], &path);
        assert!(
            !headers.contains("INTERP"),
            "{bin} names a dynamic loader:\n{headers}"
        );
        let dynamic = tool("readelf", &["-dW"], &path);
        assert!(
            !dynamic.contains("(NEEDED)"),
            "{bin} needs shared libraries:\n{dynamic}"
        );
        let sections = tool("readelf", &["-SW"], &path);
        assert!(
            !sections.contains(".debug_") && !sections.contains(".symtab"),
            "{bin} carries debug info or symbols:\n{sections}"
        );
        let size = fs::metadata(&path).expect("stat the binary").len();
        assert!(
            size <= limit,
            "{bin} is {size} bytes, the goal is at most {limit}"
        );
    }

    let out = run(Command::new(top.join("bin/narpost")).arg("--version"));
    let printed = stdout(&out);
    let commit = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| stdout(&o).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        printed.trim(),
        format!("narpost {version} (commit {commit})"),
        "the tarball is stale: run scripts/release"
    );
}

/// A chroot holding only the release binaries, `/proc`, `/dev`, `/nix` and `/etc/hosts`.
/// Everything it mounts is unmounted when it is dropped, also when a test fails; its
/// directory is removed only once nothing is mounted below it any more.
struct Chroot {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Chroot {
    fn new(release: &Path, hosts: &str) -> Chroot {
        // Outside any test scratch directory, so that no other cleanup ever walks into a
        // bind mount of the store.
        let dir = tempfile::Builder::new()
            .prefix("narpost-chroot-")
            .tempdir()
            .expect("create the chroot directory");
        let root = dir.path().to_owned();
        let mut chroot = Chroot {
            dir: Some(dir),
            root,
            mounted: Vec::new(),
        };
        for sub in ["bin", "proc", "dev", "nix", "etc", "state"] {
            fs::create_dir(chroot.root.join(sub)).expect("create a chroot directory");
        }
        for bin in ["narpost", "narpost-hook"] {
            fs::copy(
                release.join("bin").join(bin),
                chroot.root.join("bin").join(bin),
            )
            .expect("copy a release binary into the chroot");
        }
        fs::write(chroot.root.join("etc/hosts"), hosts).expect("write the chroot's /etc/hosts");
        chroot.mount(&["-t", "proc", "proc"], "proc");
        chroot.mount(&["--bind", "/dev"], "dev");
        chroot.mount(&["--bind", "/nix"], "nix");
        chroot
    }

    fn mount(&mut self, how: &[&str], at: &str) {
        common::require("mount");
        let target = self.root.join(at);
        run(Command::new("mount").args(how).arg(&target));
        self.mounted.push(target);
    }

    /// A host path inside the chroot.
    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// `program` (a path inside the chroot) with an empty environment but `vars`, and GC
    /// roots kept inside the chroot (the store is the host's).
    fn command(&self, program: &str, vars: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(on_path("chroot"));
        cmd.arg(&self.root).arg(program).env_clear();
        cmd.env("PATH", "/bin")
            .env("NARPOST_GC_ROOTS_DIR", "/state/gcroots");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// Mount points at or below the root, from the kernel's own table.
    fn mounts_left(&self) -> Vec<String> {
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.root.to_string_lossy().into_owned();
        table
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| *m == root || m.starts_with(&format!("{root}/")))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        for target in self.mounted.iter().rev() {
            let ok = (0..20).any(|attempt| {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Command::new("umount")
                    .arg(target)
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !ok {
                // Detached at once; nothing can reach the store through it afterwards.
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
        let left = self.mounts_left();
        let emptied = left.is_empty()
            && ["proc", "dev", "nix"]
                .iter()
                .all(|m| fs::remove_dir(self.root.join(m)).is_ok());
        if !emptied {
            // Never delete through a mount that is still there (it could be the store).
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "release_e2e: {} still has mounts {left:?}; left in place, unmount it by hand",
                    kept.display()
                );
            }
        }
    }
}

/// Where `program` is on this process's PATH (the chroot's own PATH has only /bin).
fn on_path(program: &str) -> PathBuf {
    common::require(program);
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// Two derivations, one referring to the other; returns (top, both).
fn build_small_closure(env: &Env) -> (StorePath, Vec<StorePath>) {
    let expr = format!(
        r#"{prelude}rec {{
  lib = mk "narpost-release-lib" ''
    mkdir -p $out/bin && printf '#!/bin/sh\necho hi\n' > $out/bin/hi && chmod +x $out/bin/hi
  '';
  app = mk "narpost-release-app" ''
    mkdir -p $out && echo ${{lib}}/bin/hi > $out/uses
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let file = env.write_nix("release.nix", &expr);
    let outs = nix_build(&file, &["app", "lib"], &[]);
    assert_eq!(outs.len(), 2, "{outs:?}");
    (outs[0].clone(), outs)
}

fn hosts_file() -> String {
    format!("127.0.0.1 localhost\n127.0.0.1 {HTTP_HOST}\n127.0.0.1 {S3_HOST}\n")
}

fn check(out: Output, what: &str) -> String {
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn public_key(chroot: &Chroot) -> String {
    fs::read_to_string(chroot.path("/state/signing.pub"))
        .expect("push generated a key in the chroot's state directory")
        .trim()
        .to_owned()
}

#[test]
fn release_binary_pushes_by_host_name_to_nginx_from_an_empty_chroot() {
    let env = Env::new();
    let release = unpack(env.path());
    let (top, outs) = build_small_closure(&env);
    let nginx = Nginx::start(env.path());
    let chroot = Chroot::new(&release, &hosts_file());

    let url = format!("http://{HTTP_HOST}:{}", nginx.port);
    let out = chroot
        .command("/bin/narpost", &[])
        .args(["--state-dir", "/state", "push", "--to", &url])
        .arg(top.to_absolute())
        .output()
        .expect("run narpost in the chroot");
    let text = check(out, "narpost push by host name in the chroot");
    assert!(text.contains("pushed 2 paths"), "{text}");
    nginx.cache().assert_complete();
    assert_substitutes(&env, &nginx.url(), &public_key(&chroot), &outs);
}

#[test]
fn release_binary_pushes_by_host_name_to_s3_from_an_empty_chroot() {
    let env = Env::new();
    let release = unpack(env.path());
    let (top, outs) = build_small_closure(&env);
    let s3 = S3Server::start(env.path());
    let chroot = Chroot::new(&release, &hosts_file());

    let url = format!(
        "s3://{BUCKET}?region=us-east-1&endpoint=http://{S3_HOST}:{}",
        s3.port
    );
    let out = chroot
        .command(
            "/bin/narpost",
            &[
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                ("AWS_SHARED_CREDENTIALS_FILE", "/state/no-credentials"),
                ("AWS_CONFIG_FILE", "/state/no-config"),
                ("HOME", "/state"),
            ],
        )
        .args(["--state-dir", "/state", "push", "--to", &url])
        .arg(top.to_absolute())
        .output()
        .expect("run narpost in the chroot");
    let text = check(out, "narpost push to S3 by host name in the chroot");
    assert!(text.contains("pushed 2 paths"), "{text}");
    let bucket = s3.root.join(BUCKET);
    let file_url = format!("file://{}", bucket.display());
    assert_substitutes(&env, &file_url, &public_key(&chroot), &outs);
}

#[test]
fn release_hook_queues_a_path_from_an_empty_chroot() {
    let env = Env::new();
    let release = unpack(env.path());
    let (top, _) = build_small_closure(&env);
    let chroot = Chroot::new(&release, &hosts_file());

    let out = chroot
        .command("/bin/narpost-hook", &[("OUT_PATHS", &top.to_absolute())])
        .args(["--state-dir", "/state"])
        .output()
        .expect("run narpost-hook in the chroot");
    let text = check(out, "narpost-hook in the chroot");
    assert!(text.is_empty(), "the hook had something to say:\n{text}");
    let queue = Queue::open(&chroot.path("/state")).expect("open the queue the hook wrote");
    let entries = queue.entries().expect("list the queue");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].paths, vec![top.clone()]);
    let root = fs::read_link(chroot.path("/state/gcroots").join(top.base()))
        .expect("the hook made a GC root for the path");
    assert_eq!(root, PathBuf::from(top.to_absolute()));
}

const BUCKET: &str = "cache";
const ACCESS_KEY: &str = "narpost-release-ak";
const SECRET_KEY: &str = "narpost-release-secret-key";

/// s3s-fs (installed by scripts/install-s3s-fs) on 127.0.0.1, with one bucket.
struct S3Server {
    root: PathBuf,
    port: u16,
    child: std::process::Child,
}

impl S3Server {
    fn start(scratch: &Path) -> S3Server {
        let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs");
        let program = if installed.is_file() {
            installed
        } else {
            common::require("s3s-fs");
            PathBuf::from("s3s-fs")
        };
        let root = scratch.join("s3");
        fs::create_dir_all(root.join(BUCKET)).expect("create the bucket directory");
        let port = free_port();
        let log = fs::File::create(scratch.join("s3s-fs.log")).expect("create the s3s-fs log");
        let child = Command::new(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        let server = S3Server { root, port, child };
        wait_for_port(port, Duration::from_secs(10));
        server
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
