//! `narpost`: parses the command line and hands off to the library. The hook runs before any
//! async runtime exists, so a build never waits for one to start.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use narpost::cli::{Cli, Command};
use narpost::config::{Config, Overrides};
use narpost::pipeline::RetryPolicy;
use narpost::priority::Priority;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Hook = cli.command {
        // Whatever happens, the build goes on: the hook reports and exits 0.
        narpost::hook::main(cli.config.as_deref(), &cli.state_dir);
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("narpost: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "narpost=info",
        1 => "narpost=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NARPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a service's journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_file = cli.config.clone();
    let state_dir = cli.state_dir.clone();
    let load = |o: Overrides| -> anyhow::Result<Config> {
        Ok(Config::load(
            config_file.as_deref(),
            Some(state_dir.clone()),
            o,
        )?)
    };
    match cli.command {
        Command::Hook => Ok(ExitCode::SUCCESS),
        Command::Keygen { name, out } => {
            let (sec, public_file, public) = narpost::keys::keygen(&name, &out)?;
            eprintln!(
                "wrote {} (secret, mode 0600) and {}",
                sec.display(),
                public_file.display()
            );
            println!("{}", public.to_nix_string());
            Ok(ExitCode::SUCCESS)
        }
        Command::Push {
            target,
            no_closure,
            paths,
        } => {
            let cfg = load(target.overrides(None))?;
            let roots = paths
                .iter()
                .map(|p| narpost::app::resolve_store_path(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Someone waits for a push, so it yields only when configured to.
            narpost::priority::enter(cfg.priority.unwrap_or(Priority::Normal), None);
            runtime()?.block_on(push(cfg, roots, !no_closure))
        }
        Command::Daemon {
            target,
            drain_timeout,
        } => {
            let cfg = load(target.overrides(drain_timeout))?;
            narpost::priority::enter(cfg.priority.unwrap_or(Priority::Idle), None);
            let rt = runtime()?;
            let result = rt.block_on(async {
                narpost::priority::restore_on_stop_signal()?;
                let (metrics, _serving) = serve_metrics(&cfg).await?;
                narpost::daemon::run_daemon(cfg, metrics).await
            });
            // A NAR still being compressed on a blocking thread must not hold the exit past
            // the drain timeout; its spool file is removed at the next start.
            rt.shutdown_background();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::WatchStore {
            target,
            all,
            include_drv,
            drain_timeout,
        } => {
            let cfg = load(target.overrides(drain_timeout))?;
            let opts = narpost::watch::WatchOptions { all, include_drv };
            narpost::priority::enter(cfg.priority.unwrap_or(Priority::Idle), None);
            let rt = runtime()?;
            let result = rt.block_on(async {
                narpost::priority::restore_on_stop_signal()?;
                let (metrics, _serving) = serve_metrics(&cfg).await?;
                narpost::watch::watch_store(cfg, opts, metrics).await
            });
            // As for the daemon: a compression still running must not outlast the deadline.
            rt.shutdown_background();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::WatchExec {
            target,
            include_drv,
            drain_timeout,
            command,
        } => {
            let cfg = load(target.overrides(drain_timeout))?;
            let opts = narpost::watch::WatchOptions {
                all: false,
                include_drv,
            };
            // The command runs at the priority narpost was started with (see priority).
            narpost::priority::enter(cfg.priority.unwrap_or(Priority::Idle), Some(&command));
            let rt = runtime()?;
            let result = rt.block_on(async {
                let (metrics, _serving) = serve_metrics(&cfg)
                    .await
                    .context("the command was not run")?;
                narpost::watch::watch_exec(cfg, opts, command, metrics).await
            });
            rt.shutdown_background();
            Ok(ExitCode::from(result?))
        }
        Command::Setup(args) => {
            narpost::setup::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            target,
            deep,
            repair,
            paths,
        } => {
            let cfg = load(target.overrides(None))?;
            let paths = paths
                .iter()
                .map(|p| narpost::app::resolve_store_path(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let opts = narpost::check::CheckOptions {
                paths,
                deep,
                repair,
            };
            let sound = runtime()?.block_on(narpost::check::run(&cfg, opts))?;
            Ok(if sound {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Retry { paths } => {
            let cfg = load(Overrides::default())?;
            let only = paths
                .iter()
                .map(|p| narpost::app::resolve_store_path(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let requeued = narpost::queue::retry_failed(&cfg.state_dir, &cfg.gc_roots_dir, &only)?;
            eprintln!(
                "narpost: {} queued again",
                narpost::progress::count(requeued as u64, "entry", "entries")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let cfg = load(Overrides::default())?;
            narpost::status::print(&cfg, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            narpost::cli_docs::write_completions(shell, &mut std::io::stdout().lock())
                .context("cannot write the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out: None } => {
            narpost::cli_docs::write_man_page(&mut std::io::stdout().lock())
                .context("cannot write the man page")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out: Some(dir) } => {
            narpost::cli_docs::write_man_pages(&dir)
                .with_context(|| format!("{}: cannot write the man pages", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The drainer's metrics, and their server where `metrics-listen` says; the server stops
/// when the guard is dropped, with the drain.
async fn serve_metrics(
    cfg: &Config,
) -> anyhow::Result<(Arc<narpost::metrics::Metrics>, tokio_util::sync::DropGuard)> {
    let metrics = narpost::metrics::Metrics::new();
    let stop = CancellationToken::new();
    narpost::metrics::serve(cfg, metrics.clone(), stop.clone()).await?;
    Ok((metrics, stop.drop_guard()))
}

async fn push(
    cfg: Config,
    roots: Vec<narpost::format::store_path::StorePath>,
    closure: bool,
) -> anyhow::Result<ExitCode> {
    let (tx, rx) = mpsc::unbounded_channel();
    let pipeline =
        narpost::app::pipeline(&cfg, RetryPolicy::for_push(cfg.retry_timeout))?.with_events(tx);
    let printer = tokio::spawn(narpost::progress::render(rx));
    let cancel = CancellationToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("narpost: interrupted; finishing uploads already under way");
                cancel.cancel();
            }
        })
    };
    let pipeline = Arc::new(pipeline);
    let result = pipeline.push(&roots, closure, &cancel).await;
    ctrl_c.abort();
    drop(pipeline);
    let _ = printer.await;
    let report = result.map_err(|e| match e {
        narpost::pipeline::PipelineError::Target(t) => narpost::error::from_target(t),
        other => anyhow::Error::new(other),
    })?;
    eprint!("{}", narpost::progress::summary(&report));
    let missing: Vec<_> = report
        .requested
        .iter()
        .filter(|p| !report.is_done(p))
        .collect();
    if missing.is_empty() && report.complete() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}
