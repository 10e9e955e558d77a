//! The entry file format (see [Record format](super#record-format)) and the record of a
//! failed entry.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Corruption;
use crate::format::store_path::StorePath;

const MAGIC: &[u8; 8] = b"NARPOSTQ";
pub(super) const VERSION: u32 = 1;
const HEADER_LEN: usize = 20;
/// Entries hold the outputs of one build, a few hundred bytes; anything this large is not
/// one of ours, and reading it whole could exhaust memory.
const MAX_ENTRY_LEN: u64 = 16 << 20;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Payload {
    pub(super) paths: Vec<StorePath>,
    pub(super) drv: Option<String>,
    pub(super) queued_at_unix_ns: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct FailedRecord {
    pub(super) paths: Vec<StorePath>,
    pub(super) drv: Option<String>,
    pub(super) queued_at_unix_ns: u64,
    pub(super) failed_at_unix_ns: u64,
    pub(super) reason: String,
}

pub(super) fn encode_record(payload: &Payload) -> Vec<u8> {
    // Serializing plain strings and integers cannot fail.
    let json = serde_json::to_vec(payload).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

pub(super) fn decode_record(bytes: &[u8]) -> Result<Payload, Corruption> {
    let actual = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        // A short prefix of the magic is a torn write; anything else is not ours.
        if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Err(Corruption::BadMagic);
        }
        return Err(Corruption::Truncated {
            expected: HEADER_LEN as u64,
            actual,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(Corruption::UnsupportedVersion { version });
    }
    let expected = HEADER_LEN as u64 + u64::from(word(12));
    if actual < expected {
        return Err(Corruption::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(Corruption::TrailingBytes { expected, actual });
    }
    let payload = &bytes[HEADER_LEN..];
    let (stored, computed) = (word(16), crc32fast::hash(payload));
    if stored != computed {
        return Err(Corruption::Checksum {
            expected: stored,
            actual: computed,
        });
    }
    serde_json::from_slice(payload).map_err(|e| Corruption::Payload {
        message: e.to_string(),
    })
}

/// The file's bytes, or `Err(size)` inside `Ok` when it is too large to be an entry.
pub(super) fn read_limited(path: &Path) -> io::Result<Result<Vec<u8>, u64>> {
    // Never through a link, and never blocking on a FIFO someone left in the queue.
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let size = file.metadata()?.len();
    if size > MAX_ENTRY_LEN {
        return Ok(Err(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_ENTRY_LEN + 1).read_to_end(&mut bytes)?;
    Ok(Ok(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::from_base(&format!("2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-{name}")).unwrap()
    }

    #[test]
    fn record_round_trip_and_every_corruption() {
        let payload = Payload {
            paths: vec![sp("a"), sp("b")],
            drv: Some("/nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-a.drv".into()),
            queued_at_unix_ns: 7,
        };
        let rec = encode_record(&payload);
        let back = decode_record(&rec).unwrap();
        assert_eq!(back.paths, payload.paths);
        assert_eq!(back.drv, payload.drv);
        assert_eq!(back.queued_at_unix_ns, 7);

        let n = rec.len() as u64;
        assert_eq!(
            decode_record(&rec[..rec.len() - 1]).err(),
            Some(Corruption::Truncated {
                expected: n,
                actual: n - 1
            })
        );
        assert_eq!(
            decode_record(&rec[..3]).err(),
            Some(Corruption::Truncated {
                expected: 20,
                actual: 3
            })
        );
        assert_eq!(decode_record(b"hello").err(), Some(Corruption::BadMagic));
        let mut longer = rec.clone();
        longer.push(b'\n');
        assert_eq!(
            decode_record(&longer).err(),
            Some(Corruption::TrailingBytes {
                expected: n,
                actual: n + 1
            })
        );
        let mut flipped = rec.clone();
        *flipped.last_mut().unwrap() ^= 0x20;
        assert!(matches!(
            decode_record(&flipped),
            Err(Corruption::Checksum { .. })
        ));
        let mut version = rec.clone();
        version[8] = 9;
        assert_eq!(
            decode_record(&version).err(),
            Some(Corruption::UnsupportedVersion { version: 9 })
        );
        // A checksummed payload that names an invalid store path is still refused.
        let json = br#"{"paths":["/nix/store/nope"],"drv":null,"queued_at_unix_ns":1}"#;
        let mut bad = Vec::new();
        bad.extend_from_slice(MAGIC);
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bad.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
        bad.extend_from_slice(json);
        let err = decode_record(&bad).err().unwrap();
        assert!(
            matches!(&err, Corruption::Payload { message } if message.contains("/nix/store/nope")),
            "{err}"
        );
    }
}
