//! A real S3 server for the tests: s3s-fs, which checks SigV4 signatures, on 127.0.0.1
//! with its own access key and secret; each object is a plain file at
//! `<root>/<bucket>/<key>`, so the bucket directory is a binary cache a fresh Nix store
//! can substitute from with `file://`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;

use super::*;

pub const ACCESS_KEY: &str = "narpost-test-access";

pub const SECRET_KEY: &str = "narpost-test-secret-9f3c1e";

pub const BUCKET: &str = "cache";

/// The s3s-fs binary: on PATH (scripts/test puts target/tools/bin there) or where
/// scripts/install-s3s-fs puts it.
pub fn s3s_fs() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs");
    on_path
        .or_else(|| installed.is_file().then_some(installed))
        .unwrap_or_else(|| {
            panic!(
                "s3s-fs is not installed: the S3 tests need a real S3 server; run scripts/install-s3s-fs \
                 (it builds s3s-fs into target/tools/bin, which scripts/test puts on PATH)"
            )
        })
}

/// A real S3 server (s3s-fs) on 127.0.0.1 serving `root`, with one bucket, `cache`.
pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl S3Server {
    pub fn start(scratch: &Path) -> S3Server {
        let root = scratch.join("s3");
        fs::create_dir_all(root.join(BUCKET)).expect("create the bucket directory");
        let mut server = S3Server {
            root,
            port: free_port(),
            log: scratch.join("s3s-fs.log"),
            child: None,
        };
        server.resume();
        server
    }

    /// Starts the server (again) on the same port and directory.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the s3s-fs log");
        let err = log.try_clone().expect("clone the log handle");
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// SIGKILL: the server disappears mid-request, as in a crash or power loss.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        s3_url(BUCKET, &self.endpoint())
    }

    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }

    pub fn cache(&self) -> CacheDir {
        CacheDir::new(self.bucket_dir())
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.bucket_dir().display())
    }

    /// What s3s-fs recorded about an object of the bucket (`metadata` or `internal`).
    pub fn object_record(&self, key: &str, kind: &str) -> serde_json::Value {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let file = self.root.join(format!(
            ".bucket-{}.object-{}.{kind}.json",
            enc(BUCKET),
            enc(key)
        ));
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("no s3s-fs {kind} record for {key}: {e}"));
        serde_json::from_str(&text).expect("s3s-fs records are JSON")
    }

    /// Multipart parts that have fully arrived at the server (written and renamed).
    pub fn landed_parts(&self) -> usize {
        fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.starts_with(".upload_id-") && name.contains(".part-")
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn s3_url(bucket: &str, endpoint: &str) -> String {
    format!("s3://{bucket}?region=us-east-1&endpoint={endpoint}")
}

/// `cmd` with AWS credentials in the standard environment variables, and nothing else from
/// this machine's AWS setup.
pub fn aws_env<'a>(cmd: &'a mut Command, env: &Env, key: &str, secret: &str) -> &'a mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            env.path().join("no-aws-credentials"),
        )
        .env("AWS_CONFIG_FILE", env.path().join("no-aws-config"))
}

pub fn s3_config(env: &Env, server_url: &str, key: &Path) -> PathBuf {
    let config = env.path().join("narpost.toml");
    fs::write(
        &config,
        format!(
            "cache = \"{server_url}\"\nsecret-key-file = \"{}\"\n",
            key.display()
        ),
    )
    .expect("write the config file");
    config
}
