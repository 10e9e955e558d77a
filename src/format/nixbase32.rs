//! Nix's base-32 encoding, used in store path digests and hash strings.
//!
//! It differs from RFC 4648 in two ways: the alphabet omits `e`, `o`, `u` and `t` (so no
//! encoded digest spells a word), and characters are produced from the *end* of the byte
//! string, so the first character holds the most significant bits of the last byte.

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Value of each ASCII byte as a digit, or 0xff when it is not one.
const DECODE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nixbase32Error {
    #[error("nixbase32 {input:?}: invalid character {found:?} at byte {position}")]
    InvalidCharacter {
        input: String,
        found: char,
        position: usize,
    },
    #[error("nixbase32 {input:?}: length {len} is not the encoding of any byte string")]
    InvalidLength { input: String, len: usize },
    #[error("nixbase32 {input:?}: non-zero padding bits in the first character")]
    NonZeroPadding { input: String },
}

/// Number of characters needed for `len` bytes: `ceil(len * 8 / 5)`.
pub const fn encoded_len(len: usize) -> usize {
    (len * 8).div_ceil(5)
}

/// Number of bytes encoded by `len` characters (the inverse of [`encoded_len`] where it
/// has one).
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = Vec::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        // The 5 bits may straddle two bytes; the high byte only exists inside the input.
        let low = u16::from(input[i]) >> j;
        let high = input.get(i + 1).map_or(0, |&h| u16::from(h) << (8 - j));
        out.push(ALPHABET[usize::from((low | high) & 0x1f)]);
    }
    // Every byte comes from ALPHABET, which is ASCII.
    out.into_iter().map(char::from).collect()
}

pub fn decode(input: &str) -> Result<Vec<u8>, Nixbase32Error> {
    let bytes = input.as_bytes();
    // Scan forwards first: the first bad byte is then always on a char boundary, and a
    // wrong character is a more useful report than the length it happens to produce.
    if let Some(position) = bytes.iter().position(|&c| DECODE[usize::from(c)] == 0xff) {
        let found = input[position..].chars().next().unwrap_or('\u{fffd}');
        return Err(Nixbase32Error::InvalidCharacter {
            input: input.to_owned(),
            found,
            position,
        });
    }
    let out_len = decoded_len(bytes.len());
    if encoded_len(out_len) != bytes.len() {
        return Err(Nixbase32Error::InvalidLength {
            input: input.to_owned(),
            len: bytes.len(),
        });
    }
    let mut out = vec![0u8; out_len];
    for (n, &c) in bytes.iter().rev().enumerate() {
        let digit = DECODE[usize::from(c)];
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = u16::from(digit) >> (8 - j);
        if let Some(next) = out.get_mut(i + 1) {
            *next |= carry as u8;
        } else if carry != 0 {
            return Err(Nixbase32Error::NonZeroPadding {
                input: input.to_owned(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors as printed by `nix-hash --type sha256 --to-base32` and store path digests.
    const CASES: &[(&str, &[u8])] = &[
        ("empty", b""),
        ("one_byte_zero", &[0x00]),
        ("one_byte_one", &[0x01]),
        ("one_byte_ff", &[0xff]),
        ("two_bytes", &[0x12, 0x34]),
        ("five_bytes", &[0xde, 0xad, 0xbe, 0xef, 0x42]),
    ];

    #[test]
    fn known_vectors() {
        // (bytes, nixbase32) pairs computed by Nix 2.8 (`nix hash to-base32`).
        let vectors: &[(&str, &str)] = &[
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            ),
            (
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            ),
        ];
        for (hex, b32) in vectors {
            let bytes = hex_decode(hex);
            assert_eq!(encode(&bytes), *b32, "encode {hex}");
            assert_eq!(decode(b32).unwrap(), bytes, "decode {b32}");
        }
        assert_eq!(encode(&[0x00]), "00");
        assert_eq!(encode(&[0x01]), "01");
        assert_eq!(encode(&[0xff]), "7z");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[0x20]), "10");
    }

    #[test]
    fn round_trip_named_cases() {
        for (name, bytes) in CASES {
            let s = encode(bytes);
            assert_eq!(s.len(), encoded_len(bytes.len()), "{name}");
            assert_eq!(decode(&s).unwrap(), *bytes, "{name}");
        }
        for len in 0..70usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&bytes)).unwrap(), bytes, "len {len}");
        }
    }

    #[test]
    fn encoded_lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(encoded_len(0), 0);
    }

    #[test]
    fn rejects_invalid_character_with_position() {
        let err = decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e").unwrap_err();
        assert_eq!(
            err,
            Nixbase32Error::InvalidCharacter {
                input: "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e".into(),
                found: 'e',
                position: 51
            }
        );
        assert!(err.to_string().contains("at byte 51"), "{err}");
        for bad in ["u0", "0o", "t0", "A0", "é0"] {
            assert!(
                matches!(decode(bad), Err(Nixbase32Error::InvalidCharacter { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_impossible_length() {
        // 1 character encodes no whole byte; 3 characters are never produced by encode.
        for bad in ["0", "000"] {
            assert!(
                matches!(decode(bad), Err(Nixbase32Error::InvalidLength { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_overflowing_first_character() {
        // "7z" is 0xff; "8z" would need a ninth bit.
        assert_eq!(decode("7z").unwrap(), vec![0xff]);
        assert!(matches!(
            decode("8z"),
            Err(Nixbase32Error::NonZeroPadding { .. })
        ));
    }

    fn hex_decode(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
