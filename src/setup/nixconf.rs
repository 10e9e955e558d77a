//! The edit of `nix.conf`, as pure functions from the old text to the new one.
//!
//! Lines are read the way Nix reads them: everything from `#` on is a comment, the rest is
//! split on spaces, tabs and carriage returns, so `name = value words` sets `name` to
//! `value words`; a later line overrides an earlier one; `include FILE` and `!include FILE`
//! read another file at that point. A line Nix would reject (`name=value`) sets nothing here
//! either: fixing it is the admin's business, and Nix already says where it is.
//!
//! Only lines that set `post-build-hook` are ever touched (and, with `--substituter`, the one
//! `extra-substituters` line setup adds for the local substituter); every other byte stays. What is
//! added goes at the end (after every include, so it is what Nix ends up with), in the file's
//! own line ending, after a comment line that says who added it. When the file did not end
//! with a newline, neither does the added line, so that taking it out again restores the file
//! exactly.

/// The comment line placed above the hook line setup adds.
pub const MARK: &str = "# Added by `narpost setup`; `narpost setup --undo` takes it out again.";

/// The prefix `--force` puts in front of another hook's line; `--undo` takes it off again.
pub const DISABLED: &str = "# Disabled by `narpost setup --force`: ";

const SETTING: &str = "post-build-hook";

/// What one line of nix.conf means to Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `name = value`: `value` is the words after `=` joined by single spaces.
    Setting { name: String, value: String },
    /// `include PATH` (`optional`: `!include`, which a missing file does not fail).
    Include { path: String, optional: bool },
    /// Blank, comment, or something Nix rejects.
    Other,
}

/// Parses one line (with or without its line ending).
pub fn parse_line(line: &str) -> Line {
    let code = line.split('#').next().unwrap_or("");
    let tokens: Vec<&str> = code
        .split([' ', '\t', '\r', '\n'])
        .filter(|t| !t.is_empty())
        .collect();
    match tokens.as_slice() {
        ["include", path] => Line::Include {
            path: path.to_string(),
            optional: false,
        },
        ["!include", path] => Line::Include {
            path: path.to_string(),
            optional: true,
        },
        [name, "=", value @ ..] => Line::Setting {
            name: name.to_string(),
            value: value.join(" "),
        },
        _ => Line::Other,
    }
}

/// The `post-build-hook` the text sets (the last line setting it), with its 1-based line
/// number. An empty value (`post-build-hook =`) is Nix's way of saying "no hook".
pub fn hook_setting(text: &str) -> Option<(usize, String)> {
    lines(text)
        .enumerate()
        .filter_map(|(i, l)| match parse_line(l) {
            Line::Setting { name, value } if name == SETTING => Some((i + 1, value)),
            _ => None,
        })
        .last()
}

/// The files the text includes, in order, as written (relative to the file's directory).
pub fn includes(text: &str) -> Vec<(String, bool)> {
    lines(text)
        .filter_map(|l| match parse_line(l) {
            Line::Include { path, optional } => Some((path, optional)),
            _ => None,
        })
        .collect()
}

/// Every line with its line ending.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n')
}

/// `\r\n` when the file's first line ends that way, else `\n`.
fn line_ending(text: &str) -> &'static str {
    match text.find('\n') {
        Some(i) if i > 0 && text.as_bytes()[i - 1] == b'\r' => "\r\n",
        _ => "\n",
    }
}

fn hook_line(hook: &str) -> String {
    format!("{SETTING} = {hook}")
}

/// What adding the hook comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// Nix already runs this hook (the last setting names it): nothing to write.
    Unchanged,
    /// The new text, and the lines (as they were) that were commented out.
    Changed { text: String, disabled: Vec<String> },
    /// Another hook is set, and `force` was not given: nothing changes.
    Foreign { line: usize, hook: String },
}

/// Makes `hook` the `post-build-hook` of the text. Another hook is refused, or with `force`
/// each line setting one is commented out (with [`DISABLED`], so `--undo` can put it back).
pub fn add_hook(text: &str, hook: &str, force: bool) -> Added {
    match hook_setting(text) {
        Some((_, value)) if value == hook => return Added::Unchanged,
        Some((line, value)) if !value.is_empty() && !force => {
            return Added::Foreign { line, hook: value };
        }
        _ => {}
    }
    let eol = line_ending(text);
    let mut out = String::with_capacity(text.len() + 128);
    let mut disabled = Vec::new();
    for line in lines(text) {
        match parse_line(line) {
            Line::Setting { name, value } if name == SETTING && !value.is_empty() => {
                disabled.push(line.trim_end_matches(['\r', '\n']).to_string());
                out.push_str(DISABLED);
            }
            _ => {}
        }
        out.push_str(line);
    }
    let ends_open = !out.is_empty() && !out.ends_with('\n');
    if ends_open {
        out.push_str(eol);
    }
    out.push_str(MARK);
    out.push_str(eol);
    out.push_str(&hook_line(hook));
    if !ends_open {
        out.push_str(eol);
    }
    Added::Changed {
        text: out,
        disabled,
    }
}

/// What taking the hook out comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// `None`: the text names neither the hook nor a line `--force` disabled.
    pub text: Option<String>,
    /// How many lines setting `hook` were taken out.
    pub removed: usize,
    /// The lines `--force` had disabled, now back as they were.
    pub restored: Vec<String>,
}

/// Takes out every line that sets `post-build-hook` to `hook` (a binary that is about to be
/// removed must not stay named, or Nix fails every build), the [`MARK`] line above each, and
/// gives lines [`DISABLED`] by `--force` back. Undoes [`add_hook`] byte for byte.
pub fn remove_hook(text: &str, hook: &str) -> Removed {
    let all: Vec<&str> = lines(text).collect();
    let mut keep: Vec<String> = Vec::with_capacity(all.len());
    let mut removed = 0;
    let mut restored = Vec::new();
    let mut dropped_last = false;
    for (i, line) in all.iter().enumerate() {
        let is_ours = matches!(
            parse_line(line),
            Line::Setting { ref name, ref value } if name == SETTING && value == hook
        );
        let marks_ours = line.trim_end_matches(['\r', '\n']) == MARK
            && all.get(i + 1).is_some_and(|next| {
                matches!(
                    parse_line(next),
                    Line::Setting { ref name, ref value } if name == SETTING && value == hook
                )
            });
        if is_ours || marks_ours {
            removed += usize::from(is_ours);
            dropped_last = i + 1 == all.len();
            continue;
        }
        if let Some(original) = line.strip_prefix(DISABLED) {
            restored.push(original.trim_end_matches(['\r', '\n']).to_string());
            keep.push(original.to_string());
        } else {
            keep.push(line.to_string());
        }
    }
    if removed == 0 && restored.is_empty() {
        return Removed {
            text: None,
            removed,
            restored,
        };
    }
    // The added line had no line ending when the file had none: give that back too.
    if dropped_last
        && !text.ends_with('\n')
        && let Some(last) = keep.last_mut()
    {
        let trimmed = last.trim_end_matches('\n').trim_end_matches('\r').len();
        last.truncate(trimmed);
    }
    Removed {
        text: Some(keep.concat()),
        removed,
        restored,
    }
}

/// Adds the setting `name = value` at the end, under a [`MARK`] line, unless a line sets
/// exactly that already (`None`). Taken out again by [`remove_line`], byte for byte.
pub fn add_line(text: &str, name: &str, value: &str) -> Option<String> {
    let set = lines(text).any(|l| {
        matches!(parse_line(l), Line::Setting { name: ref n, value: ref v } if n == name && v == value)
    });
    if set {
        return None;
    }
    let eol = line_ending(text);
    let mut out = text.to_string();
    let ends_open = !out.is_empty() && !out.ends_with('\n');
    if ends_open {
        out.push_str(eol);
    }
    out.push_str(MARK);
    out.push_str(eol);
    out.push_str(&format!("{name} = {value}"));
    if !ends_open {
        out.push_str(eol);
    }
    Some(out)
}

/// Takes out the lines setting exactly `name = value` that have the [`MARK`] line above
/// them, with that line: what [`add_line`] added, and nothing the admin wrote. `None` when
/// there is none.
pub fn remove_line(text: &str, name: &str, value: &str) -> Option<String> {
    let all: Vec<&str> = lines(text).collect();
    let ours = |line: &str| matches!(parse_line(line), Line::Setting { name: ref n, value: ref v } if n == name && v == value);
    let mut drop = vec![false; all.len()];
    for i in 1..all.len() {
        if ours(all[i]) && all[i - 1].trim_end_matches(['\r', '\n']) == MARK {
            drop[i] = true;
            drop[i - 1] = true;
        }
    }
    if !drop.contains(&true) {
        return None;
    }
    let dropped_last = drop.last() == Some(&true);
    let mut keep: Vec<String> = all
        .iter()
        .zip(&drop)
        .filter(|(_, d)| !**d)
        .map(|(l, _)| l.to_string())
        .collect();
    // The added line had no line ending when the file had none: give that back too.
    if dropped_last
        && !text.ends_with('\n')
        && let Some(last) = keep.last_mut()
    {
        let trimmed = last.trim_end_matches('\n').trim_end_matches('\r').len();
        last.truncate(trimmed);
    }
    Some(keep.concat())
}

/// Whether the text names `hook` at all (on any line setting `post-build-hook`).
pub fn names_hook(text: &str, hook: &str) -> bool {
    lines(text).any(|l| {
        matches!(
            parse_line(l),
            Line::Setting { ref name, ref value } if name == SETTING && value == hook
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_line_goes_in_once_and_comes_out_byte_for_byte() {
        let (name, value) = ("extra-substituters", "http://127.0.0.1:37515");
        for original in [
            "",
            "sandbox = false",
            "sandbox = false\n",
            "a = b\r\nc = d\r\n",
            "extra-substituters = https://other\n# mine\n",
        ] {
            let added = add_line(original, name, value).expect("added");
            assert!(
                added.ends_with(&format!(
                    "{MARK}{}{name} = {value}{}",
                    line_ending(original),
                    if original.is_empty() || original.ends_with('\n') {
                        line_ending(original)
                    } else {
                        ""
                    }
                )),
                "{added:?}"
            );
            assert_eq!(add_line(&added, name, value), None, "once: {added:?}");
            assert_eq!(remove_line(&added, name, value).as_deref(), Some(original));
        }
        // A line the admin wrote, without the mark, is theirs: never taken out.
        let theirs = format!("{name} = {value}\n");
        assert_eq!(add_line(&theirs, name, value), None);
        assert_eq!(remove_line(&theirs, name, value), None);
    }

    const HOOK: &str = "/usr/local/bin/narpost-hook";

    fn changed(text: &str, force: bool) -> (String, Vec<String>) {
        match add_hook(text, HOOK, force) {
            Added::Changed { text, disabled } => (text, disabled),
            other => panic!("expected a change for {text:?}, got {other:?}"),
        }
    }

    /// Adding then removing gives the original back, byte for byte, and the added text ends
    /// with Nix running the hook.
    fn round_trip(original: &str) -> String {
        let (new, _) = changed(original, false);
        assert_eq!(
            hook_setting(&new).map(|(_, v)| v).as_deref(),
            Some(HOOK),
            "{new:?}"
        );
        assert!(new.starts_with(original.trim_end_matches(['\r', '\n'])));
        assert_eq!(add_hook(&new, HOOK, false), Added::Unchanged);
        let removed = remove_hook(&new, HOOK);
        assert_eq!(removed.removed, 1);
        assert_eq!(removed.text.as_deref(), Some(original), "from {new:?}");
        new
    }

    #[test]
    fn lines_are_read_as_nix_reads_them() {
        let setting = |name: &str, value: &str| Line::Setting {
            name: name.into(),
            value: value.into(),
        };
        assert_eq!(parse_line("a = b"), setting("a", "b"));
        assert_eq!(
            parse_line("  a\t=   b   c  # note\r\n"),
            setting("a", "b c")
        );
        assert_eq!(parse_line("a ="), setting("a", ""));
        assert_eq!(parse_line("a = b#c"), setting("a", "b"));
        assert_eq!(parse_line("a=b"), Line::Other);
        assert_eq!(parse_line("# a = b"), Line::Other);
        assert_eq!(parse_line("\r\n"), Line::Other);
        assert_eq!(
            parse_line("include extra.conf"),
            Line::Include {
                path: "extra.conf".into(),
                optional: false
            }
        );
        assert_eq!(
            parse_line("!include /etc/nix/local.conf\n"),
            Line::Include {
                path: "/etc/nix/local.conf".into(),
                optional: true
            }
        );
    }

    #[test]
    fn a_missing_or_empty_file_gets_the_hook() {
        assert_eq!(
            round_trip(""),
            format!("{MARK}\npost-build-hook = {HOOK}\n")
        );
        round_trip("\n");
    }

    #[test]
    fn a_typical_installer_file_keeps_every_line() {
        let original = "# Generated by the Nix installer\n\nbuild-users-group = nixbld\nexperimental-features = nix-command flakes\ntrusted-users = root @wheel\n";
        let new = round_trip(original);
        assert_eq!(new, format!("{original}{MARK}\npost-build-hook = {HOOK}\n"));
    }

    #[test]
    fn no_trailing_newline_is_kept_as_it_was() {
        let new = round_trip("sandbox = false");
        assert_eq!(
            new,
            format!("sandbox = false\n{MARK}\npost-build-hook = {HOOK}")
        );
        round_trip("a = b\n\n\nc = d");
    }

    #[test]
    fn crlf_files_get_crlf_lines() {
        let new = round_trip("sandbox = false\r\nmax-jobs = 4\r\n");
        assert_eq!(
            new,
            format!("sandbox = false\r\nmax-jobs = 4\r\n{MARK}\r\npost-build-hook = {HOOK}\r\n")
        );
        round_trip("sandbox = false\r\nmax-jobs = 4");
    }

    #[test]
    fn includes_comments_and_odd_lines_stay() {
        let original = "include /etc/nix/machine.conf\n!include nix.custom.conf\n# post-build-hook = /old/commented\n  substituters = https://cache.nixos.org # main\nbroken=line\n\t\n";
        round_trip(original);
        assert_eq!(
            includes(original),
            vec![
                ("/etc/nix/machine.conf".to_string(), false),
                ("nix.custom.conf".to_string(), true)
            ]
        );
    }

    #[test]
    fn the_same_hook_in_any_spacing_is_left_alone() {
        for text in [
            format!("post-build-hook = {HOOK}\n"),
            format!("post-build-hook   =\t{HOOK}   \n"),
            format!("  post-build-hook = {HOOK} # uploads\r\n"),
            format!("post-build-hook = {HOOK}"),
            format!("post-build-hook = /other\npost-build-hook = {HOOK}\n"),
        ] {
            assert_eq!(add_hook(&text, HOOK, false), Added::Unchanged, "{text:?}");
            assert_eq!(add_hook(&text, HOOK, true), Added::Unchanged, "{text:?}");
        }
    }

    #[test]
    fn an_empty_hook_setting_counts_as_none() {
        let (new, disabled) = changed("post-build-hook =\nsandbox = true\n", false);
        assert!(disabled.is_empty());
        assert!(new.starts_with("post-build-hook =\nsandbox = true\n"));
        round_trip("post-build-hook =\nsandbox = true\n");
        round_trip("post-build-hook =   # none for now");
    }

    #[test]
    fn another_hook_is_refused_with_its_line() {
        let text = "sandbox = true\npost-build-hook = /etc/nix/upload.sh   # ours\n";
        assert_eq!(
            add_hook(text, HOOK, false),
            Added::Foreign {
                line: 2,
                hook: "/etc/nix/upload.sh".into()
            }
        );
        // The one Nix ends up with is what counts: the last.
        let text = format!("post-build-hook = {HOOK}\npost-build-hook = /x /y\n");
        assert_eq!(
            add_hook(&text, HOOK, false),
            Added::Foreign {
                line: 2,
                hook: "/x /y".into()
            }
        );
    }

    #[test]
    fn force_disables_other_hooks_and_undo_restores_them() {
        let original = "sandbox = true\npost-build-hook = /etc/nix/upload.sh\r\nmax-jobs = 2\n  post-build-hook = /b # two\n";
        let (new, disabled) = changed(original, true);
        assert_eq!(
            disabled,
            vec![
                "post-build-hook = /etc/nix/upload.sh".to_string(),
                "  post-build-hook = /b # two".to_string()
            ]
        );
        assert_eq!(
            new,
            format!(
                "sandbox = true\n{DISABLED}post-build-hook = /etc/nix/upload.sh\r\nmax-jobs = 2\n{DISABLED}  post-build-hook = /b # two\n{MARK}\npost-build-hook = {HOOK}\n"
            )
        );
        assert_eq!(hook_setting(&new).unwrap().1, HOOK);
        assert_eq!(add_hook(&new, HOOK, false), Added::Unchanged);
        let removed = remove_hook(&new, HOOK);
        assert_eq!(removed.text.as_deref(), Some(original));
        assert_eq!(removed.restored, disabled);
    }

    #[test]
    fn undo_takes_out_hand_written_lines_naming_the_hook_too() {
        let text = format!("a = b\npost-build-hook = {HOOK}\nc = d\n# {HOOK}\n");
        let removed = remove_hook(&text, HOOK);
        assert_eq!(removed.removed, 1);
        assert_eq!(
            removed.text.as_deref(),
            Some(format!("a = b\nc = d\n# {HOOK}\n").as_str())
        );
        assert!(!names_hook(removed.text.as_deref().unwrap(), HOOK));
    }

    #[test]
    fn undo_leaves_a_file_without_the_hook_alone() {
        for text in [
            "",
            "a = b",
            "post-build-hook = /other\n",
            &format!("{MARK}\n"),
        ] {
            let removed = remove_hook(text, HOOK);
            assert_eq!(removed.text, None, "{text:?}");
            assert_eq!(removed.removed, 0);
        }
        // A stray MARK not followed by the hook is not ours to take.
        let text = format!("{MARK}\na = b\npost-build-hook = {HOOK}\n");
        assert_eq!(
            remove_hook(&text, HOOK).text.as_deref(),
            Some(format!("{MARK}\na = b\n").as_str())
        );
    }
}
