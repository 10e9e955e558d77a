//! Ed25519 keys and signatures in Nix's formats.
//!
//! A secret key file (`nix-store --generate-binary-cache-key`) holds one line
//! `<name>:<base64 of seed (32) || public key (32)>`, libsodium's layout; the public key
//! file holds `<name>:<base64 of the public key>`, which is exactly what goes into
//! `trusted-public-keys`. A signature is written `<name>:<base64 of 64 bytes>`; Nix picks
//! the key to check it with by that name.

use std::fmt;
use std::io::Read;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;

/// Errors name the key only once its name has passed [`check_name`]: what comes before the
/// ':' of a malformed file may be part of the secret itself (a line break in the wrong
/// place, two keys pasted together), so a rejected name is described, never shown.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{what}: expected `<name>:<base64>`, found no ':'")]
    MissingColon { what: &'static str },
    #[error("{what}: the key name before ':' is empty")]
    EmptyName { what: &'static str },
    #[error("{what}: the key name {problem}; a key name is printable ASCII without ':' or spaces")]
    InvalidName {
        what: &'static str,
        problem: &'static str,
    },
    #[error("{what} {name:?}: key material is not valid base64")]
    BadBase64 { what: &'static str, name: String },
    #[error("{what} {name:?}: key material is {len} bytes, expected {expected}")]
    BadLength {
        what: &'static str,
        name: String,
        len: usize,
        expected: usize,
    },
    #[error(
        "secret key {name:?}: its public half does not belong to its seed; the key file is corrupt, generate a new one"
    )]
    PublicKeyMismatch { name: String },
    #[error("public key {name:?}: not a valid ed25519 point")]
    InvalidPoint { name: String },
    #[error("generating key {name:?}: cannot read random bytes from /dev/urandom: {source}")]
    Random {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Secret key with its name, as in Nix's secret key file.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

/// Public key with its name, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

/// Splits `<name>:<base64>`, checks the name and decodes the base64 part.
fn split_key(what: &'static str, input: &str) -> Result<(String, Vec<u8>), SigningError> {
    let input = input.trim();
    let Some((name, b64)) = input.split_once(':') else {
        return Err(SigningError::MissingColon { what });
    };
    check_name(what, name)?;
    let bytes = BASE64.decode(b64).map_err(|_| SigningError::BadBase64 {
        what,
        name: name.to_owned(),
    })?;
    Ok((name.to_owned(), bytes))
}

/// The name goes into every signature (`<name>:<sig>`) and every substituter looks the key
/// up by it in `trusted-public-keys`; an invisible byte in it (a byte order mark an editor
/// added) makes signatures nobody trusts, and a line break would put a line of its own
/// into every narinfo. So names are printable ASCII, for generated and loaded keys alike.
fn check_name(what: &'static str, name: &str) -> Result<(), SigningError> {
    let problem = if name.is_empty() {
        return Err(SigningError::EmptyName { what });
    } else if name.starts_with('\u{feff}') {
        "starts with a byte order mark (U+FEFF, added by some editors); save the file without it"
    } else if name.contains(['\n', '\r']) {
        "spans more than one line"
    } else if name.chars().any(char::is_whitespace) {
        "contains whitespace"
    } else if name.chars().any(|c| c.is_control()) {
        "contains control characters"
    } else if !name.is_ascii() {
        "contains characters outside ASCII"
    } else if name.contains(':') {
        "contains ':'"
    } else {
        return Ok(());
    };
    Err(SigningError::InvalidName { what, problem })
}

impl SigningKey {
    /// Parses the content of a Nix secret key file (surrounding whitespace ignored).
    pub fn parse(input: &str) -> Result<Self, SigningError> {
        const WHAT: &str = "secret key";
        let (name, bytes) = split_key(WHAT, input)?;
        let keypair: [u8; 64] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| SigningError::BadLength {
                    what: WHAT,
                    name: name.clone(),
                    len: bytes.len(),
                    expected: 64,
                })?;
        // libsodium signs with the stored public half, so a mismatched one would make
        // signatures that verify against no published key; refuse it up front.
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&keypair)
            .map_err(|_| SigningError::PublicKeyMismatch { name: name.clone() })?;
        Ok(Self { name, key })
    }

    /// A fresh key from the kernel's random source.
    pub fn generate(name: &str) -> Result<Self, SigningError> {
        check_name("secret key", name)?;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|source| SigningError::Random {
                name: name.to_owned(),
                source,
            })?;
        Ok(Self::from_seed(name, seed))
    }

    /// The key for a given 32-byte ed25519 seed (deterministic; for tests and imports).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret key file content, `<name>:<base64 of seed || public key>` (no newline,
    /// like Nix writes it).
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `msg`, giving `<name>:<base64 signature>` as it goes into a `Sig:` line.
    pub fn sign(&self, msg: &[u8]) -> String {
        let sig = self.key.sign(msg);
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field("public", &self.public().to_nix_string())
            .finish()
    }
}

impl PublicKey {
    /// Parses `<name>:<base64 of 32 bytes>` (surrounding whitespace ignored).
    pub fn parse(input: &str) -> Result<Self, SigningError> {
        const WHAT: &str = "public key";
        let (name, bytes) = split_key(WHAT, input)?;
        let raw: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SigningError::BadLength {
                what: WHAT,
                name: name.clone(),
                len: bytes.len(),
                expected: 32,
            })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| SigningError::InvalidPoint { name: name.clone() })?;
        Ok(Self { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }

    /// Whether `sig` (`<name>:<base64>`) is this key's valid signature of `msg`. A
    /// signature made under another key name is not ours, whatever its bytes.
    pub fn verify(&self, msg: &[u8], sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = BASE64.decode(b64) else {
            return false;
        };
        let Ok(raw) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&raw);
        self.key.verify_strict(msg, &sig).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_nix_string())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips() {
        let key = SigningKey::generate("cache.example.org-1").unwrap();
        let again = SigningKey::parse(&format!("{}\n", key.to_nix_string())).unwrap();
        assert_eq!(again.name(), "cache.example.org-1");
        assert_eq!(again.public(), key.public());
        let public = PublicKey::parse(&key.public().to_nix_string()).unwrap();
        assert_eq!(public, key.public());
        let sig = key.sign(b"hello");
        assert!(sig.starts_with("cache.example.org-1:"));
        assert!(public.verify(b"hello", &sig));
        assert!(!public.verify(b"hellO", &sig));
    }

    #[test]
    fn two_generated_keys_differ() {
        let a = SigningKey::generate("k").unwrap();
        let b = SigningKey::generate("k").unwrap();
        assert_ne!(a.public(), b.public());
        assert!(!b.public().verify(b"m", &a.sign(b"m")));
    }

    #[test]
    fn verify_requires_matching_name() {
        let key = SigningKey::from_seed("a", [7; 32]);
        let sig = key.sign(b"m");
        let renamed =
            PublicKey::parse(&key.public().to_nix_string().replacen('a', "b", 1)).unwrap();
        assert!(key.public().verify(b"m", &sig));
        assert!(!renamed.verify(b"m", &sig));
        assert!(!key.public().verify(b"m", "a:notbase64!"));
        assert!(!key.public().verify(b"m", "a:AAAA"));
        assert!(!key.public().verify(b"m", "no-colon"));
    }

    #[test]
    fn rejects_malformed_keys() {
        let good = SigningKey::from_seed("k", [1; 32]);
        let good_str = good.to_nix_string();
        let (_, b64) = good_str.split_once(':').unwrap();
        let mut bytes = BASE64.decode(b64).unwrap();
        bytes[40] ^= 1;
        let mismatched = format!("k:{}", BASE64.encode(&bytes));
        let cases: &[(&str, &str)] = &[
            ("no_colon", "kAAAA"),
            ("empty_name", ":AAAA"),
            ("bad_base64", "k:@@@"),
            ("short", "k:AAAA"),
            ("mismatched_public_half", &mismatched),
        ];
        for (name, input) in cases {
            assert!(SigningKey::parse(input).is_err(), "{name}");
        }
        assert!(PublicKey::parse("k:AAAA").is_err());
        assert!(
            PublicKey::parse(&good_str).is_err(),
            "secret key as public key"
        );
        assert!(SigningKey::generate("bad:name").is_err());
        assert!(SigningKey::generate("").is_err());
        assert!(SigningKey::generate("\u{feff}k").is_err());
    }

    #[test]
    fn loaded_names_are_checked_like_generated_ones_and_never_echoed() {
        let good = SigningKey::from_seed("k", [1; 32]).to_nix_string();
        let (_, b64) = good.split_once(':').unwrap();
        for (input, problem) in [
            (format!("\u{feff}k:{b64}"), "byte order mark"),
            (format!("TOPSECRET{b64}\nother:{b64}"), "more than one line"),
            (format!("a b:{b64}"), "whitespace"),
            (format!("a\u{7}b:{b64}"), "control"),
            (format!("caf\u{e9}:{b64}"), "outside ASCII"),
        ] {
            let err = SigningKey::parse(&input).expect_err(problem).to_string();
            assert!(err.contains(problem), "{err}");
            assert!(!err.contains("TOPSECRET"), "{err}");
            assert!(!err.contains(&b64[..16]), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        // The name of a key whose name is fine may be named.
        let err = SigningKey::parse("k:AAAA").unwrap_err().to_string();
        assert!(err.contains("\"k\""), "{err}");
    }

    #[test]
    fn debug_hides_secret() {
        let key = SigningKey::from_seed("k", [9; 32]);
        let debug = format!("{key:?}");
        let (_, secret) = key
            .to_nix_string()
            .split_once(':')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .unwrap();
        assert!(!debug.contains(&secret[..20]), "{debug}");
    }
}
