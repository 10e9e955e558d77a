//! Store paths: `/nix/store/<32 nixbase32 chars>-<name>`.
//!
//! A [`StorePath`] is validated once, when it is made, with Nix's rules: the digest is 32
//! nixbase32 characters (20 bytes), the name 1 to 211 bytes of `[A-Za-z0-9+-._?=]` not
//! starting with `.`. Anything else is refused with an error naming the input and the byte
//! at fault, because a path that Nix would refuse must never reach a cache.

use std::cmp::Ordering;
use std::fmt;

use super::nixbase32;

pub const STORE_DIR: &str = "/nix/store";

/// Length of the digest part in characters.
pub const HASH_PART_LEN: usize = 32;

/// Longest name Nix accepts (255-byte file names minus digest and dash).
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("store path {input:?}: not in {STORE_DIR}/")]
    NotInStore { input: String },
    #[error("store path {input:?}: too short to hold a 32-character digest, a dash and a name")]
    TooShort { input: String },
    #[error(
        "store path {input:?}: byte {position} ({found:?}) is not a nixbase32 digit (0-9, a-z without e o t u)"
    )]
    InvalidHashChar {
        input: String,
        position: usize,
        found: char,
    },
    #[error("store path {input:?}: expected '-' after the digest at byte {position}")]
    MissingDash { input: String, position: usize },
    #[error("store path {input:?}: name is empty")]
    EmptyName { input: String },
    #[error("store path {input:?}: name is {len} bytes long, at most {MAX_NAME_LEN} are allowed")]
    NameTooLong { input: String, len: usize },
    #[error("store path {input:?}: name starts with '.' at byte {position}")]
    NameStartsWithDot { input: String, position: usize },
    #[error(
        "store path {input:?}: byte {position} ({found:?}) is not allowed in a name (allowed: A-Z a-z 0-9 + - . _ ? =)"
    )]
    InvalidNameChar {
        input: String,
        position: usize,
        found: char,
    },
}

/// A valid store path, kept as its base name `<digest>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    base: String,
    digest: [u8; 20],
}

impl StorePath {
    /// Parses `/nix/store/<digest>-<name>` (one trailing slash tolerated). A path *below* a
    /// store path is refused.
    pub fn from_absolute(input: &str) -> Result<Self, StorePathError> {
        let rest = input
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                input: input.to_owned(),
            })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        Self::validate(input, rest, STORE_DIR.len() + 1)
    }

    /// Parses a base name `<digest>-<name>`.
    pub fn from_base(input: &str) -> Result<Self, StorePathError> {
        Self::validate(input, input, 0)
    }

    /// Parses either form: absolute when it starts with `/`, base name otherwise.
    pub fn parse(input: &str) -> Result<Self, StorePathError> {
        if input.starts_with('/') {
            Self::from_absolute(input)
        } else {
            Self::from_base(input)
        }
    }

    /// `base` is the part of `input` starting at byte `offset`; positions in errors are
    /// reported relative to `input` so they point at the byte the user wrote.
    fn validate(input: &str, base: &str, offset: usize) -> Result<Self, StorePathError> {
        let bytes = base.as_bytes();
        if bytes.len() < HASH_PART_LEN + 1 {
            // Point at a bad digest character if there is one: it is the more useful error.
            check_hash_chars(input, bytes, offset)?;
            return Err(StorePathError::TooShort {
                input: input.to_owned(),
            });
        }
        check_hash_chars(input, &bytes[..HASH_PART_LEN], offset)?;
        if bytes[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::MissingDash {
                input: input.to_owned(),
                position: offset + HASH_PART_LEN,
            });
        }
        let name = &bytes[HASH_PART_LEN + 1..];
        let name_offset = offset + HASH_PART_LEN + 1;
        if name.is_empty() {
            return Err(StorePathError::EmptyName {
                input: input.to_owned(),
            });
        }
        if name.len() > MAX_NAME_LEN {
            return Err(StorePathError::NameTooLong {
                input: input.to_owned(),
                len: name.len(),
            });
        }
        if name[0] == b'.' {
            return Err(StorePathError::NameStartsWithDot {
                input: input.to_owned(),
                position: name_offset,
            });
        }
        if let Some(i) = name.iter().position(|&c| !is_name_byte(c)) {
            return Err(StorePathError::InvalidNameChar {
                input: input.to_owned(),
                position: name_offset + i,
                found: char_at(input, name_offset + i),
            });
        }
        let decoded = nixbase32::decode(&base[..HASH_PART_LEN]).map_err(|_| {
            // 32 valid digits are exactly 160 bits, so decoding cannot fail after the
            // character check; report the first digit if it somehow does.
            StorePathError::InvalidHashChar {
                input: input.to_owned(),
                position: offset,
                found: char_at(input, offset),
            }
        })?;
        let mut digest = [0u8; 20];
        digest.copy_from_slice(&decoded);
        Ok(Self {
            base: base.to_owned(),
            digest,
        })
    }

    /// `<digest>-<name>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The 32 digest characters; a narinfo is named `<hash_part>.narinfo`.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }

    /// The 20 bytes the digest characters encode.
    pub fn digest(&self) -> [u8; 20] {
        self.digest
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

fn check_hash_chars(input: &str, digits: &[u8], offset: usize) -> Result<(), StorePathError> {
    let alphabet = nixbase32::ALPHABET;
    match digits
        .iter()
        .take(HASH_PART_LEN)
        .position(|c| !alphabet.contains(c))
    {
        Some(i) => Err(StorePathError::InvalidHashChar {
            input: input.to_owned(),
            position: offset + i,
            found: char_at(input, offset + i),
        }),
        None => Ok(()),
    }
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

/// The character containing byte `position` (for error messages on non-ASCII input).
fn char_at(input: &str, position: usize) -> char {
    input
        .char_indices()
        .take_while(|&(i, _)| i <= position)
        .last()
        .map_or('\u{fffd}', |(_, c)| c)
}

impl Ord for StorePath {
    /// Nix orders store paths by their base name, i.e. by digest first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.base.cmp(&other.base)
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({STORE_DIR}/{})", self.base)
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Self::from_absolute(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b";

    #[test]
    fn parses_absolute_base_and_trailing_slash() {
        let abs = format!("/nix/store/{BASE}");
        let p = StorePath::from_absolute(&abs).unwrap();
        assert_eq!(p.base(), BASE);
        assert_eq!(p.hash_part(), "2nm1z9vx9pf9ny6mxl4khv44ibbh5adr");
        assert_eq!(p.name(), "t-b");
        assert_eq!(p.to_absolute(), abs);
        assert_eq!(p.to_string(), abs);
        assert_eq!(StorePath::from_absolute(&format!("{abs}/")).unwrap(), p);
        assert_eq!(StorePath::from_base(BASE).unwrap(), p);
        assert_eq!(StorePath::parse(BASE).unwrap(), p);
        assert_eq!(StorePath::parse(&abs).unwrap(), p);
        assert!(!p.is_derivation());
        assert!(
            StorePath::from_base("91c2za11mf61rwg8ypjk82l4ia73346p-t-b.drv")
                .unwrap()
                .is_derivation()
        );
    }

    #[test]
    fn digest_matches_nixbase32() {
        let p = StorePath::from_base(BASE).unwrap();
        assert_eq!(nixbase32::encode(&p.digest()), p.hash_part());
    }

    #[test]
    fn accepts_every_allowed_name_byte_and_max_length() {
        let name = "aZ09+-._?=";
        StorePath::from_base(&format!("2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-{name}")).unwrap();
        let long = "a".repeat(MAX_NAME_LEN);
        StorePath::from_base(&format!("2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-{long}")).unwrap();
    }

    #[test]
    fn error_cases() {
        let h = "2nm1z9vx9pf9ny6mxl4khv44ibbh5adr";
        let cases: Vec<(&str, String, StorePathError)> = vec![
            (
                "other_dir",
                format!("/gnu/store/{h}-x"),
                StorePathError::NotInStore {
                    input: format!("/gnu/store/{h}-x"),
                },
            ),
            (
                "below_store_path",
                format!("/nix/store/{h}-x/bin/sh"),
                StorePathError::InvalidNameChar {
                    input: format!("/nix/store/{h}-x/bin/sh"),
                    position: 45,
                    found: '/',
                },
            ),
            (
                "short",
                "/nix/store/abc".to_owned(),
                StorePathError::TooShort {
                    input: "/nix/store/abc".to_owned(),
                },
            ),
            (
                "e_in_digest",
                format!("e{}-x", &h[1..]),
                StorePathError::InvalidHashChar {
                    input: format!("e{}-x", &h[1..]),
                    position: 0,
                    found: 'e',
                },
            ),
            (
                "uppercase_digest_absolute",
                format!("/nix/store/{}A-x", &h[..31]),
                StorePathError::InvalidHashChar {
                    input: format!("/nix/store/{}A-x", &h[..31]),
                    position: 42,
                    found: 'A',
                },
            ),
            (
                "no_dash",
                format!("{h}_x"),
                StorePathError::MissingDash {
                    input: format!("{h}_x"),
                    position: 32,
                },
            ),
            (
                "empty_name",
                format!("{h}-"),
                StorePathError::EmptyName {
                    input: format!("{h}-"),
                },
            ),
            (
                "dot_name",
                format!("{h}-.x"),
                StorePathError::NameStartsWithDot {
                    input: format!("{h}-.x"),
                    position: 33,
                },
            ),
            (
                "space_in_name",
                format!("{h}-a b"),
                StorePathError::InvalidNameChar {
                    input: format!("{h}-a b"),
                    position: 34,
                    found: ' ',
                },
            ),
            (
                "unicode_in_name",
                format!("{h}-aä"),
                StorePathError::InvalidNameChar {
                    input: format!("{h}-aä"),
                    position: 34,
                    found: 'ä',
                },
            ),
            (
                "name_too_long",
                format!("{h}-{}", "a".repeat(212)),
                StorePathError::NameTooLong {
                    input: format!("{h}-{}", "a".repeat(212)),
                    len: 212,
                },
            ),
        ];
        for (name, input, expected) in cases {
            let err = StorePath::parse(&input).unwrap_err();
            assert_eq!(err, expected, "{name}");
            assert!(
                err.to_string().contains(&format!("{input:?}")),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn orders_by_base_name() {
        let a = StorePath::from_base("0000000000000000000000000000000z-b").unwrap();
        let b = StorePath::from_base("1000000000000000000000000000000a-a").unwrap();
        assert!(a < b);
    }

    #[test]
    fn serde_as_absolute_string() {
        let p = StorePath::from_base(BASE).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"/nix/store/{BASE}\""));
        let back: StorePath = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<StorePath>("\"/nix/store/nope\"").is_err());
    }
}
