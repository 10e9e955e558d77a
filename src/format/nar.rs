//! A streaming NAR (Nix ARchive) writer.
//!
//! Every token of a NAR is a string: its length as a little-endian u64, its bytes, and zero
//! padding to a multiple of 8. The grammar:
//!
//! ```text
//! "nix-archive-1" node
//! node = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
//!                   | "symlink" "target" <target>
//!                   | "directory" { "entry" "(" "name" <name> "node" node ")" } ) ")"
//! ```
//!
//! The writer is a typestate: [`open`] gives the root [`Node`]; [`Node::file`],
//! [`Node::symlink`] and [`Node::directory`] consume it; a [`Directory`] hands out one child
//! node per [`Directory::entry`] and must be [`Directory::close`]d. Entry names are checked
//! (non-empty, not `.`/`..`, no `/` or NUL, strictly increasing as bytes) and file contents
//! must be exactly as long as declared. Those checks run in release builds too: an archive
//! that breaks them would hash differently from what Nix recorded, or not unpack at all.
//!
//! It writes to any `io::Write`, so hashing, counting and compressing writers plug in
//! directly. It issues many small writes; give it a buffered writer.

use std::io::{self, Read, Write};

/// The first token of every NAR.
pub const MAGIC: &[u8] = b"nix-archive-1";

/// Size of the copy buffer [`Node::file`] keeps on the stack.
const FILE_COPY_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("writing NAR: {0}")]
    Io(#[from] io::Error),
    #[error("reading file contents: {0}")]
    Read(#[source] io::Error),
    #[error("NAR entry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("NAR entry name {name:?} appears twice in one directory")]
    DuplicateName { name: String },
    #[error(
        "NAR entry name {name:?} comes after {previous:?}; directory entries must be sorted by their bytes"
    )]
    Unsorted { previous: String, name: String },
    #[error("NAR directory: the previous entry was not finished before the next one began")]
    EntryNotFinished,
    #[error(
        "NAR file contents: reader ended after {actual} of {declared} declared bytes (file shrank while being read?)"
    )]
    FileTooShort { declared: u64, actual: u64 },
    #[error(
        "NAR file contents: reader holds more than the {declared} declared bytes (file grew while being read?)"
    )]
    FileTooLong { declared: u64 },
    #[error("NAR symlink target {target:?}: {reason}")]
    InvalidSymlinkTarget {
        target: String,
        reason: &'static str,
    },
}

/// Starts a NAR on `out` and returns its root node.
pub fn open<W: Write>(out: &mut W) -> Result<Node<'_, W>, NarError> {
    write_token(out, MAGIC)?;
    Ok(Node {
        out,
        entry_open: None,
    })
}

/// A node still to be written: exactly one of `file`, `symlink` or `directory`.
#[must_use = "a NAR node must be written, or the archive is incomplete"]
pub struct Node<'a, W: Write> {
    out: &'a mut W,
    /// The parent directory's "child in progress" flag, cleared once this node and its entry
    /// are closed; `None` for the root.
    entry_open: Option<&'a mut bool>,
}

impl<'a, W: Write> Node<'a, W> {
    /// A regular file of `size` bytes read from `reader`, which must hold exactly that many.
    pub fn file<R: Read + ?Sized>(
        self,
        executable: bool,
        size: u64,
        reader: &mut R,
    ) -> Result<(), NarError> {
        let mut buf = [0u8; FILE_COPY_BUFFER];
        self.file_with_buffer(executable, size, reader, &mut buf)
    }

    /// Like [`Node::file`], copying through the caller's `buf` (reused across files, and
    /// larger reads mean fewer system calls for big files). An empty `buf` is replaced
    /// by a small stack buffer.
    pub fn file_with_buffer<R: Read + ?Sized>(
        self,
        executable: bool,
        size: u64,
        reader: &mut R,
        buf: &mut [u8],
    ) -> Result<(), NarError> {
        let mut fallback = [0u8; 4096];
        let buf = if buf.is_empty() {
            &mut fallback[..]
        } else {
            buf
        };
        write_token(self.out, b"(")?;
        write_token(self.out, b"type")?;
        write_token(self.out, b"regular")?;
        if executable {
            write_token(self.out, b"executable")?;
            write_token(self.out, b"")?;
        }
        write_token(self.out, b"contents")?;
        self.out.write_all(&size.to_le_bytes())?;
        let mut remaining = size;
        while remaining > 0 {
            let want = buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(NarError::FileTooShort {
                        declared: size,
                        actual: size - remaining,
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::Read(e)),
            };
            self.out.write_all(&buf[..n])?;
            remaining -= n as u64;
        }
        let mut probe = [0u8; 1];
        loop {
            match reader.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(NarError::FileTooLong { declared: size }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::Read(e)),
            }
        }
        write_padding(self.out, size)?;
        self.finish()
    }

    /// A symlink to `target` (any non-empty bytes without NUL; it is not resolved).
    pub fn symlink(self, target: &[u8]) -> Result<(), NarError> {
        let invalid = |reason| NarError::InvalidSymlinkTarget {
            target: String::from_utf8_lossy(target).into_owned(),
            reason,
        };
        if target.is_empty() {
            return Err(invalid("empty"));
        }
        if target.contains(&0) {
            return Err(invalid("contains a NUL byte"));
        }
        write_token(self.out, b"(")?;
        write_token(self.out, b"type")?;
        write_token(self.out, b"symlink")?;
        write_token(self.out, b"target")?;
        write_token(self.out, target)?;
        self.finish()
    }

    /// A directory; add its entries in byte order, then [`Directory::close`] it.
    pub fn directory(self) -> Result<Directory<'a, W>, NarError> {
        write_token(self.out, b"(")?;
        write_token(self.out, b"type")?;
        write_token(self.out, b"directory")?;
        Ok(Directory {
            out: self.out,
            child_open: false,
            previous: None,
            entry_open: self.entry_open,
        })
    }

    fn finish(self) -> Result<(), NarError> {
        close_node(self.out, self.entry_open)
    }
}

/// Writes the `)` ending a node, and the `)` ending its directory entry if it has one.
fn close_node<W: Write>(out: &mut W, entry_open: Option<&mut bool>) -> Result<(), NarError> {
    write_token(out, b")")?;
    if let Some(flag) = entry_open {
        write_token(out, b")")?;
        *flag = false;
    }
    Ok(())
}

/// A directory node being written.
#[must_use = "a NAR directory must be closed, or the archive is incomplete"]
pub struct Directory<'a, W: Write> {
    out: &'a mut W,
    /// Set while a child node handed out by `entry` has not been finished.
    child_open: bool,
    /// The last entry name, to enforce strictly increasing byte order.
    previous: Option<Vec<u8>>,
    /// As in [`Node`]: the parent's flag when this directory is itself an entry.
    entry_open: Option<&'a mut bool>,
}

impl<W: Write> Directory<'_, W> {
    /// Starts the entry `name` and returns its node, which must be written before the next
    /// entry or `close`.
    pub fn entry(&mut self, name: &[u8]) -> Result<Node<'_, W>, NarError> {
        if self.child_open {
            return Err(NarError::EntryNotFinished);
        }
        check_name(name)?;
        if let Some(previous) = &self.previous {
            match previous.as_slice().cmp(name) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => {
                    return Err(NarError::DuplicateName { name: lossy(name) });
                }
                std::cmp::Ordering::Greater => {
                    return Err(NarError::Unsorted {
                        previous: lossy(previous),
                        name: lossy(name),
                    });
                }
            }
        }
        let previous = self.previous.get_or_insert_with(Vec::new);
        previous.clear();
        previous.extend_from_slice(name);
        write_token(self.out, b"entry")?;
        write_token(self.out, b"(")?;
        write_token(self.out, b"name")?;
        write_token(self.out, name)?;
        write_token(self.out, b"node")?;
        self.child_open = true;
        Ok(Node {
            out: &mut *self.out,
            entry_open: Some(&mut self.child_open),
        })
    }

    /// Ends the directory.
    pub fn close(self) -> Result<(), NarError> {
        if self.child_open {
            return Err(NarError::EntryNotFinished);
        }
        close_node(self.out, self.entry_open)
    }
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn check_name(name: &[u8]) -> Result<(), NarError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "'.' and '..' are not entries"
    } else if name.contains(&b'/') {
        "contains '/'"
    } else if name.contains(&0) {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(NarError::InvalidName {
        name: lossy(name),
        reason,
    })
}

fn write_token<W: Write + ?Sized>(out: &mut W, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(bytes)?;
    write_padding(out, bytes.len() as u64)
}

fn write_padding<W: Write + ?Sized>(out: &mut W, len: u64) -> io::Result<()> {
    let pad = (8 - (len % 8) as usize) % 8;
    out.write_all(&[0u8; 8][..pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the expected bytes token by token, independently of the writer.
    fn tokens(list: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for t in list {
            v.extend_from_slice(&(t.len() as u64).to_le_bytes());
            v.extend_from_slice(t);
            v.resize(v.len().div_ceil(8) * 8, 0);
        }
        v
    }

    #[test]
    fn single_file() {
        let mut out = Vec::new();
        open(&mut out)
            .unwrap()
            .file(false, 5, &mut &b"hello"[..])
            .unwrap();
        assert_eq!(
            out,
            tokens(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"hello",
                b")"
            ])
        );
    }

    #[test]
    fn executable_empty_file() {
        let mut out = Vec::new();
        open(&mut out)
            .unwrap()
            .file(true, 0, &mut io::empty())
            .unwrap();
        assert_eq!(
            out,
            tokens(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"",
                b"contents",
                b"",
                b")"
            ])
        );
    }

    #[test]
    fn symlink_root() {
        let mut out = Vec::new();
        open(&mut out).unwrap().symlink(b"../x").unwrap();
        assert_eq!(
            out,
            tokens(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"symlink",
                b"target",
                b"../x",
                b")"
            ])
        );
    }

    #[test]
    fn nested_directories() {
        let mut out = Vec::new();
        {
            let mut root = open(&mut out).unwrap().directory().unwrap();
            let mut sub = root.entry(b"a").unwrap().directory().unwrap();
            sub.entry(b"f")
                .unwrap()
                .file(false, 1, &mut &b"x"[..])
                .unwrap();
            sub.close().unwrap();
            root.entry(b"b")
                .unwrap()
                .directory()
                .unwrap()
                .close()
                .unwrap();
            root.close().unwrap();
        }
        assert_eq!(
            out,
            tokens(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"a",
                b"node",
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"f",
                b"node",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"x",
                b")",
                b")",
                b")",
                b")",
                b"entry",
                b"(",
                b"name",
                b"b",
                b"node",
                b"(",
                b"type",
                b"directory",
                b")",
                b")",
                b")",
            ])
        );
    }

    #[test]
    fn entry_order_is_enforced() {
        let mut out = Vec::new();
        let mut dir = open(&mut out).unwrap().directory().unwrap();
        dir.entry(b"B").unwrap().symlink(b"t").unwrap();
        dir.entry(b"a").unwrap().symlink(b"t").unwrap();
        assert!(matches!(
            dir.entry(b"a"),
            Err(NarError::DuplicateName { .. })
        ));
        assert!(matches!(dir.entry(b"B"), Err(NarError::Unsorted { .. })));
        // UTF-8 "ä" (0xc3 0xa4) sorts after every ASCII name.
        dir.entry("ä".as_bytes()).unwrap().symlink(b"t").unwrap();
        assert!(matches!(dir.entry(b"z"), Err(NarError::Unsorted { .. })));
        dir.close().unwrap();
    }

    #[test]
    fn invalid_names() {
        for (case, name) in [
            ("empty", &b""[..]),
            ("dot", b"."),
            ("dotdot", b".."),
            ("slash", b"a/b"),
            ("nul", b"a\0b"),
        ] {
            let mut out = Vec::new();
            let mut dir = open(&mut out).unwrap().directory().unwrap();
            assert!(
                matches!(dir.entry(name), Err(NarError::InvalidName { .. })),
                "{case}"
            );
        }
    }

    #[test]
    fn unfinished_entry_is_refused() {
        let mut out = Vec::new();
        let mut dir = open(&mut out).unwrap().directory().unwrap();
        let child = dir.entry(b"a").unwrap();
        drop(child);
        assert!(matches!(dir.entry(b"b"), Err(NarError::EntryNotFinished)));
        assert!(matches!(dir.close(), Err(NarError::EntryNotFinished)));
    }

    #[test]
    fn unclosed_subdirectory_is_refused() {
        let mut out = Vec::new();
        let mut dir = open(&mut out).unwrap().directory().unwrap();
        {
            let sub = dir.entry(b"a").unwrap().directory().unwrap();
            drop(sub);
        }
        assert!(matches!(dir.close(), Err(NarError::EntryNotFinished)));
    }

    #[test]
    fn reader_length_must_match_declared_size() {
        let mut out = Vec::new();
        let err = open(&mut out)
            .unwrap()
            .file(false, 6, &mut &b"hello"[..])
            .unwrap_err();
        assert!(
            matches!(
                err,
                NarError::FileTooShort {
                    declared: 6,
                    actual: 5
                }
            ),
            "{err}"
        );
        let mut out = Vec::new();
        let err = open(&mut out)
            .unwrap()
            .file(false, 4, &mut &b"hello"[..])
            .unwrap_err();
        assert!(
            matches!(err, NarError::FileTooLong { declared: 4 }),
            "{err}"
        );
    }

    #[test]
    fn small_buffer_copies_everything() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut a = Vec::new();
        open(&mut a)
            .unwrap()
            .file_with_buffer(
                false,
                data.len() as u64,
                &mut data.as_slice(),
                &mut [0u8; 7],
            )
            .unwrap();
        let mut b = Vec::new();
        open(&mut b)
            .unwrap()
            .file(false, data.len() as u64, &mut data.as_slice())
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() % 8, 0);
    }

    #[test]
    fn bad_symlink_targets() {
        for target in [&b""[..], b"a\0b"] {
            let mut out = Vec::new();
            assert!(matches!(
                open(&mut out).unwrap().symlink(target),
                Err(NarError::InvalidSymlinkTarget { .. })
            ));
        }
    }
}
