//! The `nix-store --serve` wire protocol, the part a push needs: the handshake,
//! QueryValidPaths and AddToStoreNar (the protocol `nix copy --to ssh://` speaks).
//!
//! Everything is a little-endian u64 or a string (u64 length, the bytes, zero padding to a
//! multiple of 8); lists are a u64 count and that many strings. Writers append to any
//! [`io::Write`] (the caller buffers and sends); readers take any [`io::Read`] and refuse
//! what no honest remote sends: a string or a list over the caller's limit, non-zero
//! padding. A reader that runs out of bytes says [`ServeError::Truncated`], so a caller that
//! feeds it a growing buffer can read more and try again.

use std::io::{self, Read, Write};

/// What the client sends first.
pub const CLIENT_MAGIC: u64 = 0x390c_9deb;
/// What a `nix-store --serve` answers first.
pub const SERVER_MAGIC: u64 = 0x5452_eecb;
/// The version narpost speaks: 2.7, as Nix 2.4 to 2.34 do. AddToStoreNar needs 2.5.
pub const CLIENT_VERSION: u64 = 0x207;
/// The lowest server version that has AddToStoreNar (Nix 2.1 and later).
pub const MIN_SERVER_VERSION: u64 = 0x205;

/// Command numbers.
pub const CMD_QUERY_VALID_PATHS: u64 = 1;
pub const CMD_ADD_TO_STORE_NAR: u64 = 9;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The input ended inside a value.
    #[error("the answer ended early")]
    Truncated,
    #[error("the remote sent a {what} of {len}, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("the remote sent a string with non-zero padding")]
    BadPadding,
    #[error("the remote sent a string that is not UTF-8")]
    NotUtf8,
    /// The first bytes back were not the serve magic: usually text the remote printed.
    #[error("the remote is not a nix-store --serve (it answered {0:?})")]
    NotServe(String),
    #[error(
        "the remote speaks serve protocol {major}.{minor}; pushing needs 2.5 (Nix 2.1) or later"
    )]
    TooOld { major: u64, minor: u64 },
    /// A later major version than narpost speaks (a future Nix): it may change any
    /// message, so narpost does not guess.
    #[error(
        "the remote speaks serve protocol {major}.{minor}, a newer major version than the 2.x narpost speaks"
    )]
    TooNew { major: u64, minor: u64 },
    #[error("expected {expected}, the remote answered {found}")]
    Unexpected { expected: &'static str, found: u64 },
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for ServeError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ServeError::Truncated
        } else {
            ServeError::Io(e)
        }
    }
}

pub fn write_u64<W: Write>(w: &mut W, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

pub fn write_bytes<W: Write>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    write_u64(w, bytes.len() as u64)?;
    w.write_all(bytes)?;
    w.write_all(&[0u8; 8][..padding(bytes.len() as u64)])
}

pub fn write_strings<W: Write, S: AsRef<str>>(w: &mut W, items: &[S]) -> io::Result<()> {
    write_u64(w, items.len() as u64)?;
    for s in items {
        write_bytes(w, s.as_ref().as_bytes())?;
    }
    Ok(())
}

pub fn read_u64<R: Read>(r: &mut R) -> Result<u64, ServeError> {
    let mut buf = [0u8; 8];
    r.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// A string of at most `max` bytes.
pub fn read_string<R: Read>(r: &mut R, max: u64) -> Result<String, ServeError> {
    let len = read_u64(r)?;
    if len > max {
        return Err(ServeError::TooLong {
            what: "string",
            len,
            max,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes)?;
    let mut pad = [0u8; 8];
    let pad = &mut pad[..padding(len)];
    r.read_exact(pad)?;
    if pad.iter().any(|&b| b != 0) {
        return Err(ServeError::BadPadding);
    }
    String::from_utf8(bytes).map_err(|_| ServeError::NotUtf8)
}

/// A list of at most `max_count` strings of at most `max_len` bytes each.
pub fn read_strings<R: Read>(
    r: &mut R,
    max_count: u64,
    max_len: u64,
) -> Result<Vec<String>, ServeError> {
    let count = read_u64(r)?;
    if count > max_count {
        return Err(ServeError::TooLong {
            what: "list",
            len: count,
            max: max_count,
        });
    }
    (0..count).map(|_| read_string(r, max_len)).collect()
}

/// The client's greeting.
pub fn write_hello<W: Write>(w: &mut W) -> io::Result<()> {
    write_u64(w, CLIENT_MAGIC)?;
    write_u64(w, CLIENT_VERSION)
}

/// The server's greeting: its protocol version, checked to be new enough for a push.
pub fn read_hello<R: Read>(r: &mut R) -> Result<u64, ServeError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if u64::from_le_bytes(magic) != SERVER_MAGIC {
        return Err(ServeError::NotServe(
            String::from_utf8_lossy(&magic).into_owned(),
        ));
    }
    let version = read_u64(r)?;
    let (major, minor) = (version >> 8, version & 0xff);
    if major > 2 {
        return Err(ServeError::TooNew { major, minor });
    }
    if version < MIN_SERVER_VERSION {
        return Err(ServeError::TooOld { major, minor });
    }
    Ok(version)
}

/// QueryValidPaths: which of `paths` the remote has. `lock` makes the remote hold temporary
/// GC roots for the valid ones while the connection lives.
pub fn write_query_valid_paths<W: Write, S: AsRef<str>>(
    w: &mut W,
    lock: bool,
    substitute: bool,
    paths: &[S],
) -> io::Result<()> {
    write_u64(w, CMD_QUERY_VALID_PATHS)?;
    write_u64(w, lock as u64)?;
    write_u64(w, substitute as u64)?;
    write_strings(w, paths)
}

/// Everything AddToStoreNar sends before the NAR itself (which follows raw, `nar_size`
/// bytes, unframed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddToStoreNar {
    /// Full store paths throughout.
    pub path: String,
    /// `""` when unknown.
    pub deriver: String,
    /// sha256 of the NAR as 64 lowercase hex digits, without a `sha256:` prefix.
    pub nar_hash_hex: String,
    pub references: Vec<String>,
    /// Seconds since the epoch; 0 lets the remote take the time of import.
    pub registration_time: u64,
    pub nar_size: u64,
    /// Whether the path was built on the remote: never, for a pushed path.
    pub ultimate: bool,
    pub sigs: Vec<String>,
    /// `""` for input-addressed paths.
    pub ca: String,
}

pub fn write_add_to_store_nar<W: Write>(w: &mut W, req: &AddToStoreNar) -> io::Result<()> {
    write_u64(w, CMD_ADD_TO_STORE_NAR)?;
    write_bytes(w, req.path.as_bytes())?;
    write_bytes(w, req.deriver.as_bytes())?;
    write_bytes(w, req.nar_hash_hex.as_bytes())?;
    write_strings(w, &req.references)?;
    write_u64(w, req.registration_time)?;
    write_u64(w, req.nar_size)?;
    write_u64(w, req.ultimate as u64)?;
    write_strings(w, &req.sigs)?;
    write_bytes(w, req.ca.as_bytes())
}

/// The answer to AddToStoreNar once the remote has imported the path.
pub fn read_add_to_store_nar_reply<R: Read>(r: &mut R) -> Result<(), ServeError> {
    match read_u64(r)? {
        1 => Ok(()),
        found => Err(ServeError::Unexpected {
            expected: "1 after AddToStoreNar",
            found,
        }),
    }
}

/// Reads AddToStoreNar's fields after the command number (what the remote reads; used to
/// check requests byte for byte).
pub fn read_add_to_store_nar<R: Read>(r: &mut R, max: u64) -> Result<AddToStoreNar, ServeError> {
    Ok(AddToStoreNar {
        path: read_string(r, max)?,
        deriver: read_string(r, max)?,
        nar_hash_hex: read_string(r, max)?,
        references: read_strings(r, max, max)?,
        registration_time: read_u64(r)?,
        nar_size: read_u64(r)?,
        ultimate: read_u64(r)? != 0,
        sigs: read_strings(r, max, max)?,
        ca: read_string(r, max)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v).expect("writing to a Vec");
        v
    }

    #[test]
    fn strings_are_length_prefixed_and_zero_padded_to_eight() {
        assert_eq!(bytes(|w| write_bytes(w, b"")), [0u8; 8]);
        assert_eq!(
            bytes(|w| write_bytes(w, b"abc")),
            [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
        );
        let eight = bytes(|w| write_bytes(w, b"12345678"));
        assert_eq!(eight.len(), 16, "no padding block after a full word");
        assert_eq!(read_string(&mut eight.as_slice(), 8).unwrap(), "12345678");
    }

    #[test]
    fn hello_is_the_magic_and_version_2_7() {
        assert_eq!(
            bytes(write_hello),
            [
                0xeb, 0x9d, 0x0c, 0x39, 0, 0, 0, 0, 0x07, 0x02, 0, 0, 0, 0, 0, 0
            ]
        );
        let reply = bytes(|w| {
            write_u64(w, SERVER_MAGIC)?;
            write_u64(w, 0x207)
        });
        assert_eq!(read_hello(&mut reply.as_slice()).unwrap(), 0x207);
    }

    #[test]
    fn a_greeting_that_is_not_the_magic_is_shown_as_text() {
        match read_hello(&mut &b"bash: ni"[..]) {
            Err(ServeError::NotServe(text)) => assert_eq!(text, "bash: ni"),
            other => panic!("{other:?}"),
        }
        let old = bytes(|w| {
            write_u64(w, SERVER_MAGIC)?;
            write_u64(w, 0x204)
        });
        assert!(matches!(
            read_hello(&mut old.as_slice()),
            Err(ServeError::TooOld { major: 2, minor: 4 })
        ));
        let mut newer = SERVER_MAGIC.to_le_bytes().to_vec();
        newer.extend_from_slice(&0x301u64.to_le_bytes());
        let err = read_hello(&mut newer.as_slice()).unwrap_err();
        assert!(matches!(err, ServeError::TooNew { major: 3, minor: 1 }));
        assert!(err.to_string().contains("3.1, a newer major"), "{err}");
    }

    #[test]
    fn readers_refuse_oversized_and_badly_padded_input() {
        let long = bytes(|w| write_bytes(w, &[b'x'; 300]));
        assert!(matches!(
            read_string(&mut long.as_slice(), 256),
            Err(ServeError::TooLong { len: 300, .. })
        ));
        // A huge count is refused before anything is allocated for it.
        let many = bytes(|w| write_u64(w, u64::MAX));
        assert!(matches!(
            read_strings(&mut many.as_slice(), 10, 10),
            Err(ServeError::TooLong { what: "list", .. })
        ));
        let mut bad = bytes(|w| write_bytes(w, b"abc"));
        bad[12] = 1;
        assert!(matches!(
            read_string(&mut bad.as_slice(), 10),
            Err(ServeError::BadPadding)
        ));
    }

    #[test]
    fn every_prefix_of_an_answer_reads_as_truncated() {
        let set = bytes(|w| write_strings(w, &["/nix/store/a", "/nix/store/bb"]));
        for cut in 0..set.len() {
            assert!(
                matches!(
                    read_strings(&mut &set[..cut], 10, 100),
                    Err(ServeError::Truncated)
                ),
                "cut at {cut}"
            );
        }
        assert_eq!(
            read_strings(&mut set.as_slice(), 10, 100).unwrap(),
            ["/nix/store/a", "/nix/store/bb"]
        );
    }

    #[test]
    fn add_to_store_nar_reads_back_what_it_writes() {
        let req = AddToStoreNar {
            path: "/nix/store/00000000000000000000000000000000-x".into(),
            deriver: String::new(),
            nar_hash_hex: "ab".repeat(32),
            references: vec!["/nix/store/00000000000000000000000000000000-x".into()],
            registration_time: 0,
            nar_size: 112,
            ultimate: false,
            sigs: vec!["k-1:c2ln".into()],
            ca: String::new(),
        };
        let wire = bytes(|w| write_add_to_store_nar(w, &req));
        let mut r = wire.as_slice();
        assert_eq!(read_u64(&mut r).unwrap(), CMD_ADD_TO_STORE_NAR);
        assert_eq!(read_add_to_store_nar(&mut r, 1024).unwrap(), req);
        assert!(r.is_empty());
    }
}
