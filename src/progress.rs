//! Turns pipeline [`Event`]s into what a person sees: progress bars on a terminal, one plain
//! line per path otherwise (CI logs, journald), and the closing summary.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

use crate::pipeline::{Event, Report};

/// Prints events until the sender side is dropped.
pub async fn render(mut rx: mpsc::UnboundedReceiver<Event>) {
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Planned {
                total,
                missing,
                cached,
                upstream,
                missing_bytes,
            } => {
                eprintln!(
                    "{total} paths in closure: {cached} already cached, {upstream} left to upstream, {missing} to push ({})",
                    HumanBytes(missing_bytes)
                );
                if tty && missing > 0 {
                    let b = ProgressBar::with_draw_target(
                        Some(missing_bytes),
                        ProgressDrawTarget::stderr(),
                    );
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b.enable_steady_tick(Duration::from_millis(200));
                    bar = Some(b);
                }
            }
            Event::Started { path, .. } => {
                if let Some(b) = &bar {
                    b.set_message(path.name().to_string());
                }
            }
            Event::Pushed {
                path,
                nar_size,
                file_size,
            } => match &bar {
                Some(b) => b.inc(nar_size),
                None => eprintln!(
                    "pushed {} ({} -> {})",
                    path,
                    HumanBytes(nar_size),
                    HumanBytes(file_size)
                ),
            },
            Event::Failed { message, .. } => match &bar {
                Some(b) => b.println(format!("failed: {message}")),
                None => eprintln!("failed: {message}"),
            },
            Event::LogFailed { message } => match &bar {
                Some(b) => b.println(format!("build log: {message}")),
                None => eprintln!("build log: {message}"),
            },
            Event::Retrying { what, delay, error } => {
                let line = format!("{what}: {error}; retrying in {:.1}s", delay.as_secs_f64());
                match &bar {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// The closing summary of a push, and one line per failed path.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    let secs = report.elapsed.as_secs_f64();
    if report.pushed.is_empty() && report.failed.is_empty() && report.skipped.is_empty() {
        if report.left_upstream == 0 {
            out.push_str(&format!(
                "all {} paths were already cached; nothing to push\n",
                report.total
            ));
        } else {
            out.push_str(&format!(
                "nothing to push: {} paths already cached, {} left to upstream\n",
                report.already_cached, report.left_upstream
            ));
        }
        return out;
    }
    let ratio = if report.nar_bytes > 0 {
        report.file_bytes as f64 / report.nar_bytes as f64 * 100.0
    } else {
        100.0
    };
    out.push_str(&format!(
        "pushed {} paths, {} already cached, {} left to upstream, {} failed, {} not started; {} -> {} ({ratio:.0}%) in {secs:.1}s\n",
        report.pushed.len(),
        report.already_cached,
        report.left_upstream,
        report.failed.len(),
        report.skipped.len(),
        HumanBytes(report.nar_bytes),
        HumanBytes(report.file_bytes),
    ));
    let not_uploaded = report.log_failures.len() + report.logs_skipped;
    if report.logs_uploaded > 0 || not_uploaded > 0 {
        out.push_str(&format!(
            "{} build logs uploaded, {not_uploaded} not uploaded\n",
            report.logs_uploaded
        ));
    }
    for f in &report.failed {
        out.push_str(&format!("failed: {}\n", f.message));
        if let Some(h) = &f.hint {
            out.push_str(&format!("  hint: {h}\n"));
        }
    }
    out
}
