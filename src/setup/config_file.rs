//! The edit of `narpost.toml`, a pure function from the old text to the new one.
//!
//! Setup owns four keys of the file, `cache`, `secret-key-file`, `token-file` and
//! `substituter-listen`, and sets only those it was given; whatever else is there (the admin's `jobs`, comments, a
//! `basic-auth-file`) stays byte for byte. Every key of narpost's config file is a top-level
//! one-line value, so a key is replaced by replacing its line; the result is parsed back,
//! and an old line this cannot replace cleanly (a value spread over several lines) is
//! reported rather than guessed at.

/// What a new file starts with.
pub const HEADER: &str = "# Written by `narpost setup`, which sets cache, secret-key-file, token-file and\n# substituter-listen here and leaves every other line alone. Other settings: see the\n# README's Configuration section.\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EditError {
    #[error("is not valid TOML ({0}); fix or remove it and run setup again")]
    Invalid(String),
    #[error("cannot set `{0}` in place (its value spans several lines); set it by hand")]
    Unplaceable(String),
}

/// Sets each `(key, value)` to a string value in `old` (`None`: no file yet). Returns the
/// new text, equal to `old` when every key already had its value.
pub fn set_strings(old: Option<&str>, settings: &[(&str, String)]) -> Result<String, EditError> {
    let mut text = match old {
        Some(t) => {
            parse(t)?;
            t.to_string()
        }
        None => HEADER.to_string(),
    };
    for (key, value) in settings {
        let table = parse(&text)?;
        if table.get(*key).and_then(|v| v.as_str()) == Some(value.as_str()) {
            continue;
        }
        let line = format!("{key} = {}", toml::Value::String(value.clone()));
        text = match find_key_line(&text, key) {
            Some((start, end)) => format!("{}{line}{}", &text[..start], &text[end..]),
            None => {
                let mut t = text;
                if !t.is_empty() && !t.ends_with('\n') {
                    t.push('\n');
                }
                t.push_str(&line);
                t.push('\n');
                t
            }
        };
        let check = parse(&text).map_err(|_| EditError::Unplaceable(key.to_string()))?;
        if check.get(*key).and_then(|v| v.as_str()) != Some(value.as_str()) {
            return Err(EditError::Unplaceable(key.to_string()));
        }
    }
    Ok(text)
}

fn parse(text: &str) -> Result<toml::Table, EditError> {
    text.parse::<toml::Table>()
        .map_err(|e| EditError::Invalid(e.message().to_string()))
}

/// The byte range of the line that assigns `key` at top level (before any `[table]`),
/// without its line ending.
fn find_key_line(text: &str, key: &str) -> Option<(usize, usize)> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            return None;
        }
        let Some(rest) = trimmed.strip_prefix(key) else {
            continue;
        };
        if rest.trim_start().starts_with('=') {
            let body = line.trim_end_matches(['\r', '\n']);
            return Some((start, start + body.len()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(old: Option<&str>, pairs: &[(&str, &str)]) -> Result<String, EditError> {
        let pairs: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        set_strings(old, &pairs)
    }

    #[test]
    fn a_new_file_has_the_header_and_the_keys() {
        let text = set(
            None,
            &[
                ("cache", "s3://bucket?region=eu-west-1"),
                ("secret-key-file", "/etc/narpost/host-1.sec"),
            ],
        )
        .unwrap();
        assert_eq!(
            text,
            format!(
                "{HEADER}cache = \"s3://bucket?region=eu-west-1\"\nsecret-key-file = \"/etc/narpost/host-1.sec\"\n"
            )
        );
    }

    #[test]
    fn same_values_change_nothing() {
        let old = "jobs = 4 # mine\ncache = 'https://c.example'\nsecret-key-file=\"/k\"";
        let text = set(
            Some(old),
            &[("cache", "https://c.example"), ("secret-key-file", "/k")],
        )
        .unwrap();
        assert_eq!(text, old);
    }

    #[test]
    fn other_lines_stay_and_changed_keys_are_replaced_in_place() {
        let old =
            "# my settings\njobs = 4\ncache = \"file:///old\"   # was local\r\nhttp-timeout = 90\n";
        let text = set(
            Some(old),
            &[
                ("cache", "https://new.example"),
                ("token-file", "/etc/narpost/token"),
            ],
        )
        .unwrap();
        assert_eq!(
            text,
            "# my settings\njobs = 4\ncache = \"https://new.example\"\r\nhttp-timeout = 90\ntoken-file = \"/etc/narpost/token\"\n"
        );
    }

    #[test]
    fn keys_sharing_a_prefix_are_not_confused() {
        let old = "cache-dir-note = \"x\"\n";
        let text = set(Some(old), &[("cache", "file:///c")]).unwrap();
        assert_eq!(text, "cache-dir-note = \"x\"\ncache = \"file:///c\"\n");
    }

    #[test]
    fn values_that_need_escaping_round_trip() {
        let text = set(None, &[("cache", "file:///srv/a \"b\"\\c")]).unwrap();
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table["cache"].as_str(), Some("file:///srv/a \"b\"\\c"));
    }

    #[test]
    fn broken_and_multiline_files_are_reported() {
        assert!(matches!(
            set(Some("cache = "), &[("cache", "x")]),
            Err(EditError::Invalid(_))
        ));
        assert_eq!(
            set(Some("cache = \"\"\"\nfile:///a\"\"\"\n"), &[("cache", "x")]),
            Err(EditError::Unplaceable("cache".into()))
        );
    }
}
