//! The outputs of a `.drv` file.
//!
//! A derivation file is an ATerm: `Derive([("out","/nix/store/...-x","",""),...],...)`.
//! The first list holds (output name, output path, hash algorithm, hash). Only that list is
//! read: it is what the post-build hook needs when Nix 2.8 leaves `OUT_PATHS` empty, and
//! reading it costs microseconds instead of a `nix-store -q --outputs` process.

use super::store_path::{StorePath, StorePathError};

#[derive(Debug, thiserror::Error)]
pub enum DrvError {
    #[error("derivation: does not start with `Derive(`; is this a .drv file?")]
    NotADerivation,
    #[error("derivation: byte {position}: expected {expected}, found {found}")]
    Syntax {
        position: usize,
        expected: &'static str,
        found: String,
    },
    #[error(
        "derivation: output {output:?} has no path (a content-addressed derivation); ask Nix for it with `nix-store -q --outputs`"
    )]
    NoOutputPath { output: String },
    #[error("derivation: output {output:?}: {source}")]
    BadOutputPath {
        output: String,
        #[source]
        source: StorePathError,
    },
    #[error("derivation: lists no outputs")]
    NoOutputs,
}

/// (output name, output path) for every output, in file order (Nix sorts them by name).
pub fn parse_outputs(drv: &str) -> Result<Vec<(String, StorePath)>, DrvError> {
    let mut p = Parser {
        input: drv.as_bytes(),
        pos: 0,
    };
    if !drv.starts_with("Derive(") {
        return Err(DrvError::NotADerivation);
    }
    p.pos = "Derive(".len();
    p.expect(b'[', "'[' opening the output list")?;
    let mut outputs = Vec::new();
    if p.peek() == Some(b']') {
        return Err(DrvError::NoOutputs);
    }
    loop {
        p.expect(b'(', "'(' opening an output")?;
        let name = p.string()?;
        p.expect(b',', "','")?;
        let path = p.string()?;
        p.expect(b',', "','")?;
        let _hash_algo = p.string()?;
        p.expect(b',', "','")?;
        let _hash = p.string()?;
        p.expect(b')', "')' closing an output")?;
        if path.is_empty() {
            return Err(DrvError::NoOutputPath { output: name });
        }
        let path = StorePath::from_absolute(&path).map_err(|source| DrvError::BadOutputPath {
            output: name.clone(),
            source,
        })?;
        outputs.push((name, path));
        match p.next() {
            Some(b',') => continue,
            Some(b']') => break,
            other => return Err(p.syntax_error(other, "',' or ']' after an output")),
        }
    }
    p.expect(b',', "',' after the output list")?;
    Ok(outputs)
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn syntax_error(&self, found: Option<u8>, expected: &'static str) -> DrvError {
        DrvError::Syntax {
            position: self.pos.saturating_sub(1),
            expected,
            found: found.map_or_else(
                || "end of file".to_owned(),
                |c| format!("{:?}", char::from(c)),
            ),
        }
    }

    fn expect(&mut self, want: u8, expected: &'static str) -> Result<(), DrvError> {
        match self.next() {
            Some(c) if c == want => Ok(()),
            other => Err(self.syntax_error(other, expected)),
        }
    }

    /// A double-quoted string with Nix's escapes: `\n`, `\r`, `\t`, and `\x` for any
    /// other `x` (which covers `\"` and `\\`).
    fn string(&mut self) -> Result<String, DrvError> {
        self.expect(b'"', "'\"' opening a string")?;
        let mut out = Vec::new();
        loop {
            match self.next() {
                Some(b'"') => break,
                Some(b'\\') => match self.next() {
                    Some(b'n') => out.push(b'\n'),
                    Some(b'r') => out.push(b'\r'),
                    Some(b't') => out.push(b'\t'),
                    Some(c) => out.push(c),
                    None => return Err(self.syntax_error(None, "an escaped character")),
                },
                Some(c) => out.push(c),
                None => return Err(self.syntax_error(None, "'\"' closing a string")),
            }
        }
        // The input is a &str and escapes only ever drop ASCII backslashes, so this holds.
        String::from_utf8(out).map_err(|_| DrvError::Syntax {
            position: self.pos,
            expected: "UTF-8 text",
            found: "invalid UTF-8".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SINGLE: &str = r#"Derive([("out","/nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b","","")],[("/nix/store/91c2za11mf61rwg8ypjk82l4ia73346p-t-a.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo \"hi\" > $out\n"],[("builder","/bin/sh"),("name","t-b"),("out","/nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b"),("system","x86_64-linux")])"#;

    #[test]
    fn single_output() {
        let outs = parse_outputs(SINGLE).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].0, "out");
        assert_eq!(outs[0].1.base(), "2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b");
    }

    #[test]
    fn multiple_outputs_with_fixed_output_fields() {
        let drv = r#"Derive([("dev","/nix/store/0000000000000000000000000000000z-x-dev","",""),("out","/nix/store/1000000000000000000000000000000z-x","sha256","abc")],[],[],"s","b",[],[])"#;
        let outs = parse_outputs(drv).unwrap();
        let names: Vec<&str> = outs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["dev", "out"]);
        assert_eq!(outs[1].1.name(), "x");
    }

    #[test]
    fn escapes_in_strings() {
        let mut p = Parser {
            input: br#""a\"b\\c\nd\te\rf\zg""#,
            pos: 0,
        };
        assert_eq!(p.string().unwrap(), "a\"b\\c\nd\te\rfzg");
    }

    #[test]
    fn error_cases() {
        let cases: &[(&str, &str, &str)] = &[
            ("not_derive", "Fooo([])", "does not start with"),
            ("empty", "", "does not start with"),
            ("no_outputs", "Derive([],[])", "lists no outputs"),
            ("truncated", r#"Derive([("out","/nix/sto"#, "end of file"),
            (
                "ca_floating",
                r#"Derive([("out","","r:sha256","")],[])"#,
                "has no path",
            ),
            (
                "bad_path",
                r#"Derive([("out","/tmp/x","","")],[])"#,
                "\"out\"",
            ),
            (
                "missing_comma",
                r#"Derive([("out" "/nix/store/x","","")],[])"#,
                "byte 14",
            ),
        ];
        for (name, input, expected) in cases {
            let err = parse_outputs(input).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }
}
