//! The command line. Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `narpost --version`: the release and the commit it was built from (see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NARPOST_BUILD_COMMIT"),
    ")"
);

/// Gets every Nix store path this machine builds into a binary cache: signed, in dependency
/// order, without slowing down or failing a build.
#[derive(Debug, Parser)]
#[command(name = "narpost", version = VERSION, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/narpost/narpost.toml if it exists.
    #[arg(long, global = true, env = "NARPOST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where the queue, spool, default key and default cache live.
    #[arg(
        long,
        global = true,
        env = "NARPOST_STATE_DIR",
        value_name = "DIR",
        default_value = crate::config::DEFAULT_STATE_DIR
    )]
    pub state_dir: PathBuf,

    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Where to push and how to sign; shared by every command that uploads.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Cache URL: file:///dir, http(s)://host/path, s3://bucket[/prefix]?region=..&endpoint=..,
    /// attic+http(s)://host[:port]/CACHE, or ssh://[user@]host[:port]. Default: the config
    /// file, NARPOST_CACHE, or file://<state-dir>/cache.
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,

    /// Nix secret key file to sign narinfos with (`nix-store --generate-binary-cache-key`
    /// format). Default: NARPOST_KEY_FILE, the config file, or <state-dir>/signing.sec
    /// (generated on first use).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// File holding a bearer token for HTTP caches and Attic (or set NARPOST_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Paths prepared and uploaded at once. Default: number of cores.
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Push store paths and their closures to the cache, with progress.
    Push {
        #[command(flatten)]
        target: TargetArgs,

        /// Push only the named paths; fail those whose references the cache lacks.
        #[arg(long)]
        no_closure: bool,

        /// Store paths, or symlinks to them such as ./result.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },

    /// Generate a signing key pair in Nix's format: DIR/NAME.sec (0600) and DIR/NAME.pub.
    Keygen {
        /// Key name, conventionally the cache's host name and a number: cache.example.org-1.
        name: String,

        /// Directory to write the key files to.
        #[arg(long, default_value = ".", value_name = "DIR")]
        out: PathBuf,
    },

    /// The post-build-hook: queue what Nix just built and return at once. Reads OUT_PATHS and
    /// DRV_PATH; always exits 0, so an upload problem never fails a build.
    Hook,

    /// Drain the queue into the cache (the systemd service).
    Daemon {
        #[command(flatten)]
        target: TargetArgs,

        /// Seconds in-flight uploads may take to finish after SIGTERM.
        #[arg(long, value_name = "SECONDS")]
        drain_timeout: Option<u64>,
    },

    /// Push every store path that becomes valid while this runs (CI sidecar).
    WatchStore {
        #[command(flatten)]
        target: TargetArgs,

        /// Also push the whole valid store at start.
        #[arg(long)]
        all: bool,

        /// Push .drv files too.
        #[arg(long)]
        include_drv: bool,

        /// Seconds to keep uploading after SIGTERM.
        #[arg(long, value_name = "SECONDS")]
        drain_timeout: Option<u64>,
    },

    /// Run a command, push everything it builds, wait for the uploads, and exit with the
    /// command's exit code.
    WatchExec {
        #[command(flatten)]
        target: TargetArgs,

        /// Push .drv files too.
        #[arg(long)]
        include_drv: bool,

        /// Seconds to wait for uploads after the command exits.
        #[arg(long, value_name = "SECONDS")]
        drain_timeout: Option<u64>,

        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<String>,
    },

    /// Wire this machine (not NixOS): install narpost and narpost-hook in /usr/local/bin,
    /// write /etc/narpost/narpost.toml, add the post-build-hook to /etc/nix/nix.conf, install
    /// and start the systemd unit; then print the lines the machines that fetch need.
    Setup(crate::setup::SetupArgs),

    /// Read the cache back and say what is broken, one line each: narinfos whose NAR is
    /// missing or of the wrong size, references without a narinfo, signatures that do not
    /// verify with the configured key. Exits 1 when something is broken.
    Check {
        #[command(flatten)]
        target: TargetArgs,

        /// Also read every NAR and compare it with its FileHash.
        #[arg(long)]
        deep: bool,

        /// Push again from this machine's store whatever is broken, then check it again.
        #[arg(long)]
        repair: bool,

        /// Check the closures of these store paths (or ./result links); default: every
        /// narinfo the cache lists (file://, S3, HTTP with WebDAV listing).
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
    },

    /// Queue again the entries given up on (their paths' contents did not match the
    /// store's NarHash, or the paths were gone), all of them or those holding PATH, once
    /// the store is repaired.
    Retry {
        /// Store paths (or symlinks to them) whose entries to queue again; default: all.
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
    },

    /// Show the cache, the key, the queue and the daemon's state.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },

    /// Print the completion script for SHELL, e.g. `narpost completions bash >
    /// /usr/share/bash-completion/completions/narpost`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print the man page; with --out, write it and one page per subcommand to DIR.
    Man {
        /// Directory for narpost.1, narpost-push.1 and the others.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

impl TargetArgs {
    pub fn overrides(&self, drain_timeout: Option<u64>) -> crate::config::Overrides {
        crate::config::Overrides {
            cache: self.to.clone(),
            key_file: self.key.clone(),
            jobs: self.jobs,
            token_file: self.token_file.clone(),
            drain_timeout,
        }
    }
}
