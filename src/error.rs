//! Turning library errors into what `main` prints: `narpost: <subject>: <what went wrong>`,
//! then a `hint:` line where there is something the user can do.

use crate::cache::TargetError;

pub fn from_target(e: TargetError) -> anyhow::Error {
    match &e.hint {
        Some(h) => anyhow::anyhow!("{}\nhint: {h}", e.message),
        None => anyhow::anyhow!("{}", e.message),
    }
}

/// An error and its causes on one line, leaving out a cause whose text the message already
/// includes (many errors here name their source in their own message).
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out.replace('\n', " ")
}
