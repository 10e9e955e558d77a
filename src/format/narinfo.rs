//! `.narinfo` files: what a binary cache says about one store path.
//!
//! Parsing is one pass over `Key: value` lines. Printing follows Nix 2.8's
//! `NarInfo::to_string` field order, so a narinfo Nix wrote prints back byte for byte
//! (References is always printed, even when empty, as Nix does). Fields Nix 2.8 does not
//! know are kept and printed after the known ones, so a narinfo from a newer writer loses
//! nothing when narpost re-signs it.
//!
//! The signed message is the fingerprint
//! `1;<store path>;<NarHash>;<NarSize>;<references as full paths, comma-separated>`, with
//! NarHash in `sha256:<nixbase32>` form whatever form the file used.

use std::fmt;

use super::hash::{HashError, Sha256};
use super::signing::{PublicKey, SigningKey};
use super::store_path::{StorePath, StorePathError};

#[derive(Debug, thiserror::Error)]
pub enum NarInfoError {
    #[error("narinfo line {line}: expected `Key: value`, found {text:?}")]
    MalformedLine { line: usize, text: String },
    #[error("narinfo line {line}: field {field} appears twice")]
    DuplicateField { line: usize, field: &'static str },
    #[error("narinfo: required field {field} is missing")]
    MissingField { field: &'static str },
    #[error("narinfo line {line}: {field}: {source}")]
    StorePath {
        line: usize,
        field: &'static str,
        #[source]
        source: StorePathError,
    },
    #[error("narinfo line {line}: {field}: {source}")]
    Hash {
        line: usize,
        field: &'static str,
        #[source]
        source: HashError,
    },
    #[error("narinfo line {line}: {field}: {value:?} is not a non-negative integer")]
    Integer {
        line: usize,
        field: &'static str,
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the NAR is, relative to the cache root (e.g. `nar/<filehash>.nar.zst`).
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted, may include the path itself.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// `<key name>:<base64 signature>`, in file order.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

/// Fields Nix 2.8 does not know, in file order. They live outside [`NarInfo`] so that
/// `NarInfo` stays constructible with a struct literal from a store path's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExtraFields(pub Vec<(String, String)>);

impl NarInfo {
    /// Parses a narinfo. Unknown fields are ignored, as Nix does.
    pub fn parse(input: &str) -> Result<NarInfo, NarInfoError> {
        Self::parse_with_extra(input).map(|(info, _)| info)
    }

    /// Parses a narinfo and also returns the fields Nix 2.8 does not know, in file order.
    pub fn parse_with_extra(input: &str) -> Result<(NarInfo, ExtraFields), NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut extra = Vec::new();

        for (index, text) in input.lines().enumerate() {
            let line = index + 1;
            if text.is_empty() {
                continue;
            }
            let Some((key, value)) = text.split_once(':') else {
                return Err(NarInfoError::MalformedLine {
                    line,
                    text: text.to_owned(),
                });
            };
            // Nix writes `Key: value` and reads the value after the colon and one space.
            let value = value.strip_prefix(' ').unwrap_or(value);

            fn set<T>(
                slot: &mut Option<T>,
                line: usize,
                field: &'static str,
                value: T,
            ) -> Result<(), NarInfoError> {
                if slot.is_some() {
                    return Err(NarInfoError::DuplicateField { line, field });
                }
                *slot = Some(value);
                Ok(())
            }
            let path = |field: &'static str, v: &str| {
                StorePath::parse(v).map_err(|source| NarInfoError::StorePath {
                    line,
                    field,
                    source,
                })
            };
            let hash = |field: &'static str, v: &str| {
                Sha256::parse(v).map_err(|source| NarInfoError::Hash {
                    line,
                    field,
                    source,
                })
            };
            let int = |field: &'static str, v: &str| {
                // Only plain decimal digits: `+5` or ` 5` would not print back the same.
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(NarInfoError::Integer {
                        line,
                        field,
                        value: v.to_owned(),
                    });
                }
                v.parse::<u64>().map_err(|_| NarInfoError::Integer {
                    line,
                    field,
                    value: v.to_owned(),
                })
            };

            match key {
                "StorePath" => {
                    let p = StorePath::from_absolute(value).map_err(|source| {
                        NarInfoError::StorePath {
                            line,
                            field: "StorePath",
                            source,
                        }
                    })?;
                    set(&mut store_path, line, "StorePath", p)?;
                }
                "URL" => set(&mut url, line, "URL", value.to_owned())?,
                "Compression" => set(&mut compression, line, "Compression", value.to_owned())?,
                "FileHash" => set(&mut file_hash, line, "FileHash", hash("FileHash", value)?)?,
                "FileSize" => set(&mut file_size, line, "FileSize", int("FileSize", value)?)?,
                "NarHash" => set(&mut nar_hash, line, "NarHash", hash("NarHash", value)?)?,
                "NarSize" => set(&mut nar_size, line, "NarSize", int("NarSize", value)?)?,
                "References" => {
                    let refs = value
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(|s| path("References", s))
                        .collect::<Result<Vec<_>, _>>()?;
                    set(&mut references, line, "References", refs)?;
                }
                "Deriver" => {
                    // Nix reads "unknown-deriver" as no deriver.
                    if value != "unknown-deriver" {
                        set(&mut deriver, line, "Deriver", path("Deriver", value)?)?;
                    }
                }
                "System" => set(&mut system, line, "System", value.to_owned())?,
                "Sig" => sigs.push(value.to_owned()),
                "CA" => set(&mut ca, line, "CA", value.to_owned())?,
                _ => extra.push((key.to_owned(), value.to_owned())),
            }
        }

        let info = NarInfo {
            store_path: store_path.ok_or(NarInfoError::MissingField { field: "StorePath" })?,
            url: url.ok_or(NarInfoError::MissingField { field: "URL" })?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::MissingField { field: "NarHash" })?,
            nar_size: nar_size.ok_or(NarInfoError::MissingField { field: "NarSize" })?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
        };
        Ok((info, ExtraFields(extra)))
    }

    /// Prints the narinfo followed by `extra` fields (as returned by
    /// [`NarInfo::parse_with_extra`]).
    pub fn to_string_with_extra(&self, extra: &ExtraFields) -> String {
        let mut s = self.to_string();
        for (k, v) in &extra.0 {
            s.push_str(k);
            s.push_str(": ");
            s.push_str(v);
            s.push('\n');
        }
        s
    }

    /// The message a `Sig:` signs.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(StorePath::to_absolute).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// Adds this key's signature (once: signing is deterministic, so an existing identical
    /// `Sig` is kept rather than duplicated). Another signature by the same key name, made
    /// over different content, is replaced: Nix would try it first and it would not verify.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        let prefix = format!("{}:", key.name());
        self.sigs.retain(|s| s == &sig || !s.starts_with(&prefix));
        if !self.sigs.contains(&sig) {
            self.sigs.push(sig);
        }
    }

    /// Whether any `Sig` is a valid signature by `key`.
    pub fn verify(&self, key: &PublicKey) -> bool {
        let fingerprint = self.fingerprint();
        self.sigs
            .iter()
            .any(|sig| key.verify(fingerprint.as_bytes(), sig))
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        if let Some(c) = &self.compression {
            writeln!(f, "Compression: {c}")?;
        }
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {}", h.to_nix_string())?;
        }
        if let Some(n) = self.file_size {
            writeln!(f, "FileSize: {n}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash.to_nix_string())?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        f.write_str("References:")?;
        // Nix 2.8 writes "References: " plus the space-joined list, even when empty.
        f.write_str(" ")?;
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(r.base())?;
        }
        f.write_str("\n")?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {}", d.base())?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for sig in &self.sigs {
            writeln!(f, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Nix 2.8 (`nix copy --to file://...?compression=zstd` with a secret key).
    const REAL: &str = "StorePath: /nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b
URL: nar/1x061d55g2z887q3nk8zrpnmb8fplq5hdsvndl6p7wdpdk3y4d5h.nar.zst
Compression: zstd
FileHash: sha256:1x061d55g2z887q3nk8zrpnmb8fplq5hdsvndl6p7wdpdk3y4d5h
FileSize: 279
NarHash: sha256:18ffz7b8vacmd2916hrzirc1z6bj9gsxghqhjhg5d66iv85l18bf
NarSize: 928
References: ghv1lymwwcjag5ii34r2ac64lf1cxw89-t-a
Deriver: 91c2za11mf61rwg8ypjk82l4ia73346p-t-b.drv
Sig: test1:3eGzpxEcsW2n8VtLSDVo7nYAMv65I5toEotuvr8WneBMI7zJrn74aoJddWGzeUiGCVZGGM5+9kNcAJXwpS8YDA==
";

    #[test]
    fn parses_and_prints_back() {
        let info = NarInfo::parse(REAL).unwrap();
        assert_eq!(info.store_path.name(), "t-b");
        assert_eq!(info.compression.as_deref(), Some("zstd"));
        assert_eq!(info.file_size, Some(279));
        assert_eq!(info.nar_size, 928);
        assert_eq!(info.references.len(), 1);
        assert_eq!(
            info.references[0].base(),
            "ghv1lymwwcjag5ii34r2ac64lf1cxw89-t-a"
        );
        assert_eq!(
            info.deriver.as_ref().unwrap().base(),
            "91c2za11mf61rwg8ypjk82l4ia73346p-t-b.drv"
        );
        assert_eq!(info.sigs.len(), 1);
        assert_eq!(info.to_string(), REAL);
    }

    #[test]
    fn fingerprint_format() {
        let info = NarInfo::parse(REAL).unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b;\
             sha256:18ffz7b8vacmd2916hrzirc1z6bj9gsxghqhjhg5d66iv85l18bf;928;\
             /nix/store/ghv1lymwwcjag5ii34r2ac64lf1cxw89-t-a"
        );
    }

    #[test]
    fn empty_references_print_like_nix() {
        let text = REAL.replace(
            "References: ghv1lymwwcjag5ii34r2ac64lf1cxw89-t-a",
            "References: ",
        );
        let info = NarInfo::parse(&text).unwrap();
        assert!(info.references.is_empty());
        assert_eq!(info.to_string(), text);
        assert!(info.fingerprint().ends_with(";928;"));
    }

    #[test]
    fn sign_and_verify() {
        let key = SigningKey::from_seed("narpost-test-1", [3; 32]);
        let other = SigningKey::from_seed("narpost-test-1", [4; 32]);
        let mut info = NarInfo::parse(REAL).unwrap();
        info.sigs.clear();
        assert!(!info.verify(&key.public()));
        info.sign(&key);
        info.sign(&key);
        assert_eq!(info.sigs.len(), 1, "signing twice adds one Sig");
        assert!(info.verify(&key.public()));
        assert!(!info.verify(&other.public()));
        info.nar_size += 1;
        assert!(!info.verify(&key.public()), "signature covers NarSize");
        info.sign(&key);
        assert_eq!(info.sigs.len(), 1, "stale Sig by the same key is replaced");
        assert!(info.verify(&key.public()));
    }

    #[test]
    fn unknown_fields_are_kept_aside() {
        let text = format!("{REAL}Future: thing\n");
        let (info, extra) = NarInfo::parse_with_extra(&text).unwrap();
        assert_eq!(extra.0, vec![("Future".to_owned(), "thing".to_owned())]);
        assert_eq!(info.to_string_with_extra(&extra), text);
    }

    #[test]
    fn error_cases() {
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "missing_store_path",
                REAL.replace(
                    "StorePath: /nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b\n",
                    "",
                ),
                "StorePath is missing",
            ),
            (
                "missing_nar_hash",
                REAL.replace("NarHash", "Xarhash"),
                "NarHash is missing",
            ),
            (
                "duplicate",
                format!("{REAL}NarSize: 1\n"),
                "line 11: field NarSize appears twice",
            ),
            ("no_colon", format!("{REAL}garbage\n"), "line 11"),
            (
                "bad_size",
                REAL.replace("NarSize: 928", "NarSize: -1"),
                "\"-1\" is not",
            ),
            (
                "bad_hash",
                REAL.replace("NarHash: sha256:", "NarHash: md5:"),
                "NarHash",
            ),
            (
                "bad_ref",
                REAL.replace("References: ghv1", "References: ghvX"),
                "References",
            ),
        ];
        for (name, text, expected) in cases {
            let err = NarInfo::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }
}
