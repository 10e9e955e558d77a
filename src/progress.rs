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
                    "{} in closure: {cached} already cached, {upstream} left to upstream, {missing} to push ({})",
                    count(total as u64, "path", "paths"),
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

/// `n` with the noun in the number it calls for: "1 path", "2 paths", "0 paths".
pub fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The closing summary of a push, and one line per failed path.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    let secs = report.elapsed.as_secs_f64();
    if report.pushed.is_empty() && report.failed.is_empty() && report.skipped.is_empty() {
        if report.left_upstream == 0 {
            let line = match report.total {
                1 => "1 path was already cached; nothing to push\n".to_owned(),
                n => format!("all {n} paths were already cached; nothing to push\n"),
            };
            out.push_str(&line);
        } else {
            out.push_str(&format!(
                "nothing to push: {} already cached, {} left to upstream\n",
                count(report.already_cached as u64, "path", "paths"),
                report.left_upstream
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
        "pushed {}, {} already cached, {} left to upstream, {} failed, {} not started; {} -> {} ({ratio:.0}%) in {secs:.1}s\n",
        count(report.pushed.len() as u64, "path", "paths"),
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
            "{} uploaded, {not_uploaded} not uploaded\n",
            count(report.logs_uploaded as u64, "build log", "build logs")
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

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_take_the_singular_only_for_one() {
        assert_eq!(count(0, "path", "paths"), "0 paths");
        assert_eq!(count(1, "path", "paths"), "1 path");
        assert_eq!(count(2, "entry", "entries"), "2 entries");
    }
}
