//! Turning library errors into what `main` prints: `narpost: <subject>: <what went wrong>`,
//! then a `hint:` line where there is something the user can do.

use crate::target::TargetError;

pub fn from_target(e: TargetError) -> anyhow::Error {
    match &e.hint {
        Some(h) => anyhow::anyhow!("{}\nhint: {h}", e.message),
        None => anyhow::anyhow!("{}", e.message),
    }
}
