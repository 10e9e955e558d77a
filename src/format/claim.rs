//! A build claim: the small object `claims/<hash part>/<machine>` a machine keeps in the
//! cache while it builds (or is about to build) a path, so that the others wait for it
//! instead of building it too (see [`crate::claims`]).
//!
//! ```text
//! Machine: builder-3
//! Session: 1764633600123
//! Beat: 7
//! ```
//!
//! `Session` is when the machine's current claiming session began (milliseconds since the
//! epoch, on its own clock); with the machine name it is the claim's [`ClaimKey`], by which
//! every machine orders claims alike. `Beat` counts the claim's rewrites: a claim whose
//! beat stops changing belongs to a machine that stopped. A claim that opens a session is
//! first written with `Pending: yes` and a `Session` that is only a lower bound of the key
//! it gets when it is rewritten a moment later (see [`crate::claims`] for why).

use std::fmt;

/// The longest machine name; names are `[A-Za-z0-9._-]`, not starting with a dot.
pub const MAX_MACHINE_LEN: usize = 64;

/// A claim object larger than this is not one.
pub const MAX_CLAIM_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub machine: String,
    pub session: u64,
    pub beat: u64,
    /// The session's key is not read yet; `session` is a lower bound of it.
    pub pending: bool,
}

/// The order of claims: the older session first, the machine name breaking ties. Waits go
/// only from a larger key to a smaller one, so no two machines ever wait on each other.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimKey {
    pub session: u64,
    pub machine: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    #[error("a claim is at most {MAX_CLAIM_LEN} bytes")]
    TooLong,
    #[error("line {0:?} is not `Name: value`")]
    BadLine(String),
    #[error("{0} is not a number")]
    BadNumber(&'static str),
    #[error(
        "machine name {0:?}: use 1 to {MAX_MACHINE_LEN} of A-Z a-z 0-9 . _ -, not starting with a dot"
    )]
    BadMachine(String),
    #[error("Pending is {0:?}, not yes or no")]
    BadPending(String),
    #[error("no {0} line")]
    Missing(&'static str),
}

/// Whether `name` can name a machine (and so a claim object).
pub fn valid_machine(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MACHINE_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Claim {
    pub fn key(&self) -> ClaimKey {
        ClaimKey {
            session: self.session,
            machine: self.machine.clone(),
        }
    }

    pub fn parse(text: &[u8]) -> Result<Claim, ClaimError> {
        if text.len() > MAX_CLAIM_LEN {
            return Err(ClaimError::TooLong);
        }
        let text = String::from_utf8_lossy(text);
        let (mut machine, mut session, mut beat, mut pending) = (None, None, None, false);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(": ") else {
                return Err(ClaimError::BadLine(line.to_owned()));
            };
            let number = |what| {
                value
                    .parse::<u64>()
                    .map_err(|_| ClaimError::BadNumber(what))
            };
            match name {
                "Machine" => {
                    if !valid_machine(value) {
                        return Err(ClaimError::BadMachine(value.to_owned()));
                    }
                    machine = Some(value.to_owned());
                }
                "Session" => session = Some(number("Session")?),
                "Beat" => beat = Some(number("Beat")?),
                "Pending" => {
                    pending = match value {
                        "yes" => true,
                        "no" => false,
                        _ => return Err(ClaimError::BadPending(value.to_owned())),
                    }
                }
                // Later versions may say more.
                _ => {}
            }
        }
        Ok(Claim {
            machine: machine.ok_or(ClaimError::Missing("Machine"))?,
            session: session.ok_or(ClaimError::Missing("Session"))?,
            beat: beat.ok_or(ClaimError::Missing("Beat"))?,
            pending,
        })
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Machine: {}\nSession: {}\nBeat: {}\n",
            self.machine, self.session, self.beat
        )?;
        if self.pending {
            f.write_str("Pending: yes\n")?;
        }
        Ok(())
    }
}

/// Where `machine`'s claim on the path with hash part `hash` lives, relative to the cache root.
pub fn claim_key(hash: &str, machine: &str) -> String {
    format!("{}{machine}", claims_prefix(hash))
}

/// The folder of every machine's claim on the path with hash part `hash`.
pub fn claims_prefix(hash: &str) -> String {
    format!("claims/{hash}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_reads_back_what_it_prints_and_orders_by_session_then_machine() {
        let c = Claim {
            machine: "builder-3".into(),
            session: 1_764_633_600_123,
            beat: 7,
            pending: false,
        };
        let text = c.to_string();
        assert_eq!(
            text,
            "Machine: builder-3\nSession: 1764633600123\nBeat: 7\n"
        );
        assert_eq!(Claim::parse(text.as_bytes()), Ok(c.clone()));
        assert_eq!(
            Claim::parse(format!("{text}Later: field\n").as_bytes()),
            Ok(c.clone())
        );
        let pending = Claim {
            pending: true,
            ..c.clone()
        };
        let text = pending.to_string();
        assert_eq!(
            text,
            "Machine: builder-3\nSession: 1764633600123\nBeat: 7\nPending: yes\n"
        );
        assert_eq!(Claim::parse(text.as_bytes()), Ok(pending));
        assert_eq!(
            Claim::parse(format!("{}Pending: no\n", c).as_bytes()),
            Ok(c.clone())
        );
        let older = ClaimKey {
            session: 5,
            machine: "z".into(),
        };
        let tie_a = ClaimKey {
            session: 6,
            machine: "a".into(),
        };
        let tie_b = ClaimKey {
            session: 6,
            machine: "b".into(),
        };
        assert!(older < tie_a && tie_a < tie_b);
        assert_eq!(claim_key("abc", "m1"), "claims/abc/m1");
    }

    #[test]
    fn a_bad_claim_is_refused() {
        for (text, err) in [
            ("Machine: a\nSession: 1\n", ClaimError::Missing("Beat")),
            (
                "Machine: a\nSession: x\nBeat: 1\n",
                ClaimError::BadNumber("Session"),
            ),
            (
                "Machine: ../up\nSession: 1\nBeat: 1\n",
                ClaimError::BadMachine("../up".into()),
            ),
            ("garbage\n", ClaimError::BadLine("garbage".into())),
            (
                "Machine: a\nSession: 1\nBeat: 1\nPending: maybe\n",
                ClaimError::BadPending("maybe".into()),
            ),
        ] {
            assert_eq!(Claim::parse(text.as_bytes()), Err(err), "{text:?}");
        }
        assert_eq!(
            Claim::parse(&vec![b'a'; MAX_CLAIM_LEN + 1]),
            Err(ClaimError::TooLong)
        );
        assert!(!valid_machine(".hidden"));
        assert!(!valid_machine(&"m".repeat(MAX_MACHINE_LEN + 1)));
        assert!(valid_machine("ci-runner_2.example"));
    }
}
