//! The completion scripts and man pages `narpost completions` and `narpost man` generate,
//! loaded by the real shells and rendered by the real man.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{narpost_bin, require, run, stdout};

/// Every subcommand a user can type, straight from the parser, so a new one is checked too.
fn subcommands() -> Vec<String> {
    use clap::CommandFactory;
    narpost::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect()
}

fn script(shell: &str, dir: &Path) -> std::path::PathBuf {
    let out = run(Command::new(narpost_bin()).args(["completions", shell]));
    let file = dir.join(format!("narpost.{shell}"));
    std::fs::write(&file, &out.stdout).unwrap();
    file
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).collect()
}

/// Runs the bash completion function as bash's programmable completion would for `words`
/// (the last one being completed) and returns what it offers.
fn bash_complete(file: &Path, words: &[&str]) -> String {
    let line = words.join(" ");
    let program = format!(
        r#"source "$1" || exit 1
complete -p narpost >/dev/null || {{ echo "no completion registered for narpost" >&2; exit 1; }}
COMP_WORDS=({words})
COMP_CWORD={cword}
COMP_LINE='{line}'
COMP_POINT=${{#COMP_LINE}}
_narpost narpost "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
        words = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        cword = words.len() - 1,
    );
    stdout(&run(Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program, "bash"])
        .arg(file)))
}

#[test]
fn bash_completes_subcommands_and_their_flags() {
    require("bash");
    let dir = tempfile::tempdir().unwrap();
    let file = script("bash", dir.path());

    let offered = bash_complete(&file, &["narpost", ""]);
    for sub in subcommands() {
        assert!(
            lines(&offered).contains(&sub.as_str()),
            "{sub} not offered:\n{offered}"
        );
    }
    let offered = bash_complete(&file, &["narpost", "wat"]);
    assert_eq!(lines(&offered), ["watch-store", "watch-exec"], "{offered}");
    let offered = bash_complete(&file, &["narpost", "push", "--"]);
    for flag in ["--no-closure", "--to", "--key", "--jobs"] {
        assert!(
            lines(&offered).contains(&flag),
            "{flag} not offered:\n{offered}"
        );
    }
    let offered = bash_complete(&file, &["narpost", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(
            lines(&offered).contains(&shell),
            "{shell} not offered:\n{offered}"
        );
    }
}

#[test]
fn fish_completes_subcommands_and_their_flags() {
    require("fish");
    let dir = tempfile::tempdir().unwrap();
    let file = script("fish", dir.path());
    let complete = |line: &str| {
        let out = run(Command::new("fish")
            .args([
                "--no-config",
                "-c",
                "source $argv[1]; and complete -C $argv[2]",
            ])
            .arg(&file)
            .arg(line));
        stdout(&out)
    };
    // fish prints `candidate<TAB>description`.
    let firsts = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split('\t').next().unwrap_or("").to_string())
            .collect()
    };
    let offered = complete("narpost ");
    for sub in subcommands() {
        assert!(
            firsts(&offered).contains(&sub),
            "{sub} not offered:\n{offered}"
        );
    }
    let offered = complete("narpost daemon --");
    assert!(
        firsts(&offered).contains(&"--drain-timeout".to_string()),
        "{offered}"
    );
}

#[test]
fn zsh_loads_the_completion_and_binds_it_to_narpost() {
    require("zsh");
    let dir = tempfile::tempdir().unwrap();
    let file = script("zsh", dir.path());
    // zsh's completion system loads `_narpost` from fpath and binds it to the command; a
    // syntax error or a missing `#compdef` line shows up here.
    std::fs::rename(&file, dir.path().join("_narpost")).unwrap();
    let out = run(Command::new("zsh")
        .args([
            "-f",
            "-c",
            r#"fpath=("$1" $fpath); autoload -Uz compinit && compinit -u -d "$1/zcompdump" && print -r -- "$_comps[narpost]" && autoload -Uz +X _narpost && print loaded"#,
            "zsh",
        ])
        .arg(dir.path()));
    assert_eq!(lines(&stdout(&out)), ["_narpost", "loaded"]);
    let text = std::fs::read_to_string(dir.path().join("_narpost")).unwrap();
    for sub in subcommands() {
        assert!(
            text.contains(&format!("'{sub}:")),
            "{sub} missing from the zsh script"
        );
    }
}

/// The page as man shows it, rendered by man-db (through groff) without a pager.
fn render(page: &Path) -> String {
    require("man");
    let out = run(Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C.UTF-8"));
    let err = common::stderr(&out);
    // groff reports roff mistakes on stderr but still renders.
    assert!(err.trim().is_empty(), "man -l {page:?} warned:\n{err}");
    stdout(&out)
}

#[test]
fn man_page_renders_with_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("narpost.1");
    std::fs::write(&page, run(Command::new(narpost_bin()).arg("man")).stdout).unwrap();
    let text = render(&page);
    for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SUBCOMMANDS"] {
        assert!(
            text.lines().any(|l| l == section),
            "no {section} section:\n{text}"
        );
    }
    assert!(text.contains("--state-dir"), "{text}");
    for sub in subcommands() {
        assert!(
            text.contains(&format!("narpost-{sub}(1)")),
            "{sub} missing:\n{text}"
        );
    }
}

#[test]
fn man_out_writes_a_page_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    run(Command::new(narpost_bin())
        .arg("man")
        .arg("--out")
        .arg(&out));
    let push = render(&out.join("narpost-push.1"));
    assert!(push.contains("--no-closure"), "{push}");
    assert!(push.contains("narpost-push"), "{push}");
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected: Vec<_> = subcommands()
        .iter()
        .map(|s| format!("narpost-{s}.1"))
        .chain(["narpost.1".to_string()])
        .collect();
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn completions_for_an_unknown_shell_is_a_usage_error() {
    let out = Command::new(narpost_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}
