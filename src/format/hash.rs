//! SHA-256 digests and the three ways Nix writes them.
//!
//! Nix prints `sha256:<nixbase32>` in narinfos, keeps `sha256:<hex>` in its database and
//! shows SRI `sha256-<base64>` in `nix path-info --json`. [`Sha256`] holds the bytes and
//! reads all of them, so nothing else in narpost has to care which form it was given.

use std::fmt;
use std::io::{self, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::Digest as _;

use super::nixbase32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("hash {input:?}: only sha256 is supported (expected `sha256:...` or `sha256-...`)")]
    UnsupportedAlgorithm { input: String },
    #[error(
        "hash {input:?}: digest of {len} characters is neither nixbase32 (52), hex (64) nor base64 (44)"
    )]
    BadLength { input: String, len: usize },
    #[error("hash {input:?}: invalid {encoding} digest")]
    BadDigest {
        input: String,
        encoding: &'static str,
    },
}

/// A SHA-256 digest.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn digest(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `sha256:<nixbase32>`, the form narinfos use.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", nixbase32::encode(&self.0))
    }

    /// Lowercase hex, without prefix.
    pub fn to_hex(&self) -> String {
        use fmt::Write as _;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// `sha256-<base64>` (Subresource Integrity form).
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(self.0))
    }

    /// Reads `sha256:<nixbase32 | hex | base64>` and `sha256-<base64>`.
    pub fn parse(input: &str) -> Result<Self, HashError> {
        if let Some(b64) = input.strip_prefix("sha256-") {
            return Self::from_base64(input, b64);
        }
        let Some(digest) = input.strip_prefix("sha256:") else {
            return Err(HashError::UnsupportedAlgorithm {
                input: input.to_owned(),
            });
        };
        match digest.len() {
            52 => {
                let bytes = nixbase32::decode(digest).map_err(|_| HashError::BadDigest {
                    input: input.to_owned(),
                    encoding: "nixbase32",
                })?;
                Self::from_slice(input, &bytes, "nixbase32")
            }
            64 => Self::from_hex(input, digest),
            44 => Self::from_base64(input, digest),
            len => Err(HashError::BadLength {
                input: input.to_owned(),
                len,
            }),
        }
    }

    fn from_hex(input: &str, digest: &str) -> Result<Self, HashError> {
        let bad = || HashError::BadDigest {
            input: input.to_owned(),
            encoding: "hex",
        };
        if digest.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digest.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(bad)?;
            let lo = hex_value(pair[1]).ok_or_else(bad)?;
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }

    fn from_base64(input: &str, digest: &str) -> Result<Self, HashError> {
        let bytes = BASE64.decode(digest).map_err(|_| HashError::BadDigest {
            input: input.to_owned(),
            encoding: "base64",
        })?;
        Self::from_slice(input, &bytes, "base64")
    }

    fn from_slice(input: &str, bytes: &[u8], encoding: &'static str) -> Result<Self, HashError> {
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| HashError::BadDigest {
                input: input.to_owned(),
                encoding,
            })
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_nix_string())
    }
}

impl std::str::FromStr for Sha256 {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Incremental SHA-256 (sha2 picks SHA-NI or AVX code at run time).
#[derive(Clone, Default)]
pub struct Sha256Hasher(sha2::Sha256);

impl Sha256Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finalize(self) -> Sha256 {
        Sha256(self.0.finalize().into())
    }
}

impl fmt::Debug for Sha256Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256Hasher")
    }
}

/// Passes writes through to `inner` while hashing and counting exactly the bytes that
/// `inner` accepted.
#[derive(Debug)]
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256Hasher,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256Hasher::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Returns the inner writer, the digest and the number of bytes written.
    pub fn finish(self) -> (W, Sha256, u64) {
        (self.inner, self.hasher.finalize(), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // Hash only after the whole slice went through, so a failed write is not hashed.
        self.inner.write_all(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_B64: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn empty_digest_in_every_form() {
        let h = Sha256::digest(b"");
        assert_eq!(h.to_hex(), EMPTY_HEX);
        assert_eq!(h.to_nix_string(), format!("sha256:{EMPTY_NIX32}"));
        assert_eq!(h.to_sri(), format!("sha256-{EMPTY_B64}"));
        assert_eq!(h.to_string(), h.to_nix_string());
    }

    #[test]
    fn parses_all_forms() {
        let h = Sha256::digest(b"");
        for s in [
            format!("sha256:{EMPTY_NIX32}"),
            format!("sha256:{EMPTY_HEX}"),
            format!("sha256:{}", EMPTY_HEX.to_uppercase()),
            format!("sha256:{EMPTY_B64}"),
            format!("sha256-{EMPTY_B64}"),
        ] {
            assert_eq!(Sha256::parse(&s).unwrap(), h, "{s}");
        }
    }

    #[test]
    fn rejects_bad_hashes() {
        let cases = [
            ("md5", "md5:d41d8cd98f00b204e9800998ecf8427e"),
            ("no_prefix", EMPTY_HEX),
            ("short", "sha256:abc"),
            ("bad_hex", &format!("sha256:{}", "g".repeat(64))),
            ("bad_nix32", &format!("sha256:{}", "e".repeat(52))),
            ("bad_sri", "sha256-!!!"),
            ("sri_wrong_len", "sha256-AAAA"),
        ];
        for (name, input) in cases {
            let err = Sha256::parse(input).unwrap_err();
            assert!(err.to_string().contains(input), "{name}: {err}");
        }
    }

    #[test]
    fn hashing_writer_counts_and_hashes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        let (inner, hash, n) = w.finish();
        assert_eq!(inner, b"abc");
        assert_eq!(n, 3);
        assert_eq!(
            hash.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Sha256Hasher::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finalize(), hash);
    }
}
