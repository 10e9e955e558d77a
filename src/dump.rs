//! Serializing a path on disk into a NAR.
//!
//! [`dump_path`] walks a file, directory or symlink with `symlink_metadata` (symlinks are
//! archived, never followed), sorts each directory's entries by the raw bytes of their
//! names, keeps only the owner-executable bit of regular files, and streams file contents
//! through one reused buffer, so memory stays constant whatever the size of the tree.
//!
//! [`NarSource`] is the same walk for a store path, delivered as an async stream of chunks
//! for targets that upload the raw NAR. It runs on a blocking thread, hands chunks over a
//! bounded channel (so a slow upload slows the walk instead of filling memory) and checks
//! the NAR against the hash and size the store recorded. On a mismatch the final chunk is
//! withheld and the stream ends with an error, so an upload of a corrupt path is aborted
//! rather than completed.

use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use crate::format::hash::{Sha256, Sha256Hasher};
use crate::format::nar::{self, NarError, Node};
use crate::format::store_path::StorePath;

/// Size of the buffer file contents are read through: large reads keep the walk at page
/// cache speed for big files.
const READ_BUFFER: usize = 256 * 1024;

/// Output buffer of [`dump_path`]: NAR framing is many tiny writes.
const WRITE_BUFFER: usize = 1024 * 1024;

/// Size of the chunks [`NarSource::stream`] yields.
const CHUNK: usize = 256 * 1024;

/// Chunks in flight between the walking thread and the consumer.
const CHANNEL_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Nar {
        path: PathBuf,
        #[source]
        source: NarError,
    },
    #[error("{path}: is a {kind}; a NAR holds only regular files, directories and symlinks")]
    Unsupported { path: PathBuf, kind: &'static str },
}

/// The action of a [`DumpError::Io`] that failed writing the NAR out, not reading the path.
pub const WRITE_NAR: &str = "write NAR";

/// Writes the NAR of `path` to `out` and returns `out` (flushed of narpost's buffer; its
/// own buffers are the caller's).
pub fn dump_path<W: Write>(path: &Path, out: W) -> Result<W, DumpError> {
    let mut buffered = BufWriter::with_capacity(WRITE_BUFFER, out);
    dump_into(path, &mut buffered)?;
    buffered.into_inner().map_err(|e| DumpError::Io {
        path: path.to_owned(),
        action: WRITE_NAR,
        source: e.into_error(),
    })
}

/// Writes the NAR of `path` to `out` without adding a buffer of its own.
fn dump_into<W: Write>(path: &Path, out: &mut W) -> Result<(), DumpError> {
    let meta = fs::symlink_metadata(path).map_err(io_err(path, "stat"))?;
    let root = nar::open(out).map_err(nar_err(path))?;
    let mut walker = Walker { buf: Vec::new() };
    walker.node(path, &meta, root)
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> DumpError + 'a {
    move |source| DumpError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

fn nar_err(path: &Path) -> impl FnOnce(NarError) -> DumpError + '_ {
    move |source| DumpError::Nar {
        path: path.to_owned(),
        source,
    }
}

struct Walker {
    /// The one buffer every file's contents pass through: as large as the largest file so
    /// far, up to [`READ_BUFFER`], since zeroing the whole of it cost a tiny path more than
    /// reading it.
    buf: Vec<u8>,
}

impl Walker {
    fn node<W: Write>(
        &mut self,
        path: &Path,
        meta: &Metadata,
        node: Node<'_, W>,
    ) -> Result<(), DumpError> {
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(io_err(path, "read symlink"))?;
            node.symlink(target.as_os_str().as_bytes())
                .map_err(nar_err(path))
        } else if ft.is_file() {
            // Nix keeps only the owner-executable bit.
            let executable = meta.permissions().mode() & 0o100 != 0;
            let mut file = File::open(path).map_err(io_err(path, "open"))?;
            let want = usize::try_from(meta.len()).map_or(READ_BUFFER, |n| n.min(READ_BUFFER));
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            node.file_with_buffer(executable, meta.len(), &mut file, &mut self.buf)
                .map_err(nar_err(path))
        } else if ft.is_dir() {
            let mut names = fs::read_dir(path)
                .and_then(|entries| {
                    entries
                        .map(|e| e.map(|e| e.file_name()))
                        .collect::<io::Result<Vec<OsString>>>()
                })
                .map_err(io_err(path, "read directory"))?;
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            let mut dir = node.directory().map_err(nar_err(path))?;
            for name in names {
                let child = path.join(&name);
                let child_meta = fs::symlink_metadata(&child).map_err(io_err(&child, "stat"))?;
                let child_node = dir.entry(name.as_bytes()).map_err(nar_err(&child))?;
                self.node(&child, &child_meta, child_node)?;
            }
            dir.close().map_err(nar_err(path))
        } else {
            use std::os::unix::fs::FileTypeExt as _;
            let kind = if ft.is_fifo() {
                "named pipe"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else {
                "file of unknown type"
            };
            Err(DumpError::Unsupported {
                path: path.to_owned(),
                kind,
            })
        }
    }
}

/// A store path's NAR, produced on demand and checked against what the store recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSource {
    pub path: StorePath,
    /// NarHash from the store database.
    pub nar_hash: Sha256,
    /// NarSize from the store database.
    pub nar_size: u64,
}

/// What the walking thread sends: the stream only ends cleanly after `Last`, so a thread
/// that dies without saying so can never pass for a complete NAR.
enum Message {
    Chunk(Bytes),
    Last(Bytes),
    Failed(io::Error),
}

impl NarSource {
    /// The NAR as chunks of about 256 KiB. Every call serializes the path again (so a retry
    /// gets a fresh stream). The last item is either the final chunk, after the hash and
    /// size matched, or an error naming the path; must be polled inside a tokio runtime.
    pub fn stream(&self) -> BoxStream<'static, io::Result<Bytes>> {
        self.stream_from(PathBuf::from(self.path.to_absolute()))
    }

    /// [`NarSource::stream`] reading the tree at `fs_path` instead of the store path.
    fn stream_from(&self, fs_path: PathBuf) -> BoxStream<'static, io::Result<Bytes>> {
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle,
            Err(_) => {
                let msg = format!(
                    "{}: cannot serialize outside a tokio runtime (narpost bug)",
                    self.path
                );
                return futures::stream::once(async move { Err(io::Error::other(msg)) }).boxed();
            }
        };
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let source = self.clone();
        handle.spawn_blocking(move || produce(&source, &fs_path, tx));
        let path = self.path.to_string();
        futures::stream::unfold(Some(rx), move |rx| {
            let path = path.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Some(Message::Chunk(b)) => Some((Ok(b), Some(rx))),
                    Some(Message::Last(b)) => Some((Ok(b), None)),
                    Some(Message::Failed(e)) => Some((Err(e), None)),
                    None => Some((
                        Err(io::Error::other(format!(
                            "{path}: NAR serialization stopped before the end (narpost bug)"
                        ))),
                        None,
                    )),
                }
            }
        })
        .boxed()
    }
}

/// Runs on a blocking thread: walks, hashes, sends, and decides how the stream ends.
fn produce(source: &NarSource, fs_path: &Path, tx: mpsc::Sender<Message>) {
    let mut sender = ChunkSender {
        buf: Vec::with_capacity(CHUNK),
        tx,
        hasher: Sha256Hasher::new(),
        size: 0,
        limit: source.nar_size,
    };
    let result = dump_into(fs_path, &mut sender);
    let ChunkSender {
        buf,
        tx,
        mut hasher,
        size,
        ..
    } = sender;
    if tx.is_closed() {
        return; // The consumer went away; nobody to tell.
    }
    hasher.update(&buf);
    let path = &source.path;
    let mismatch = |actual: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{path}: NAR does not match the store's record (recorded {} / {} bytes, serialized {actual}); \
                 the path may be corrupt, check it with `nix-store --verify-path {path}`",
                source.nar_hash, source.nar_size
            ),
        )
    };
    let last = if size > source.nar_size {
        Message::Failed(mismatch(format!("more than {} bytes", source.nar_size)))
    } else if let Err(e) = result {
        Message::Failed(io::Error::other(format!("{path}: cannot serialize: {e}")))
    } else {
        let hash = hasher.finalize();
        if hash == source.nar_hash && size == source.nar_size {
            Message::Last(Bytes::from(buf))
        } else {
            Message::Failed(mismatch(format!("{hash} / {size} bytes")))
        }
    };
    // A send error means the consumer dropped the stream: nothing left to do.
    let _ = tx.blocking_send(last);
}

/// Collects the NAR into chunks and sends a full chunk only once more data follows it, so
/// the final chunk is always still here when the hash is checked.
struct ChunkSender {
    buf: Vec<u8>,
    tx: mpsc::Sender<Message>,
    hasher: Sha256Hasher,
    /// Bytes written so far.
    size: u64,
    /// The recorded NarSize: going past it is already a mismatch, so the walk stops early.
    limit: u64,
}

impl ChunkSender {
    fn send_chunk(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.hasher.update(&chunk);
        self.tx
            .blocking_send(Message::Chunk(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR consumer went away"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        self.size += n as u64;
        if self.size > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "NAR is larger than recorded",
            ));
        }
        while !data.is_empty() {
            if self.buf.len() >= CHUNK {
                self.send_chunk()?;
            }
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::hash::HashingWriter;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("b"), b"bee").unwrap();
        fs::write(root.join("a"), b"").unwrap();
        fs::create_dir(root.join("d")).unwrap();
        symlink("../a", root.join("d/link")).unwrap();
        let big: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 253) as u8).collect();
        fs::write(root.join("big"), &big).unwrap();
        fs::set_permissions(root.join("b"), fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn expected(path: &Path) -> (Vec<u8>, Sha256) {
        let (nar, hash, size) = dump_path(path, HashingWriter::new(Vec::new()))
            .unwrap()
            .finish();
        assert_eq!(size, nar.len() as u64);
        (nar, hash)
    }

    #[test]
    fn dump_structure_with_hand_built_nar() {
        let dir = tree();
        let root = dir.path().join("root");
        fs::remove_file(root.join("big")).unwrap();
        let (got, _) = expected(&root);
        let mut want = Vec::new();
        {
            let mut d = nar::open(&mut want).unwrap().directory().unwrap();
            d.entry(b"a")
                .unwrap()
                .file(false, 0, &mut io::empty())
                .unwrap();
            d.entry(b"b")
                .unwrap()
                .file(true, 3, &mut &b"bee"[..])
                .unwrap();
            let mut sub = d.entry(b"d").unwrap().directory().unwrap();
            sub.entry(b"link").unwrap().symlink(b"../a").unwrap();
            sub.close().unwrap();
            d.close().unwrap();
        }
        assert_eq!(got, want);
    }

    #[test]
    fn unsupported_file_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("sock");
        let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
        let err = dump_path(dir.path(), Vec::new()).unwrap_err();
        assert!(err.to_string().contains("sock: is a socket"), "{err}");
    }

    #[test]
    fn missing_path_is_named() {
        let err = dump_path(Path::new("/nonexistent/narpost-x"), Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/narpost-x: cannot stat"),
            "{err}"
        );
    }

    fn source(hash: Sha256, size: u64) -> NarSource {
        NarSource {
            path: StorePath::from_base("2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b").unwrap(),
            nar_hash: hash,
            nar_size: size,
        }
    }

    async fn collect(
        stream: BoxStream<'static, io::Result<Bytes>>,
    ) -> (Vec<u8>, usize, Option<io::Error>) {
        let mut stream = stream;
        let mut data = Vec::new();
        let mut chunks = 0;
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => {
                    assert!(b.len() <= CHUNK);
                    chunks += 1;
                    data.extend_from_slice(&b);
                }
                Err(e) => {
                    assert!(stream.next().await.is_none(), "nothing after the error");
                    return (data, chunks, Some(e));
                }
            }
        }
        (data, chunks, None)
    }

    #[tokio::test]
    async fn stream_matches_dump_when_hash_is_right() {
        let dir = tree();
        let root = dir.path().join("root");
        let (nar, hash) = expected(&root);
        let src = source(hash, nar.len() as u64);
        let (data, chunks, err) = collect(src.stream_from(root)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(data, nar);
        assert_eq!(chunks, nar.len().div_ceil(CHUNK));
    }

    #[tokio::test]
    async fn stream_withholds_last_chunk_on_hash_mismatch() {
        let dir = tree();
        let root = dir.path().join("root");
        let (nar, _) = expected(&root);
        let src = source(Sha256::digest(b"not it"), nar.len() as u64);
        let (data, _, err) = collect(src.stream_from(root)).await;
        let err = err.expect("mismatch must end in an error");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(
            msg.contains("nix-store --verify-path /nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-t-b"),
            "{msg}"
        );
        assert!(data.len() < nar.len(), "the final chunk was withheld");
        assert_eq!(data, nar[..data.len()]);
    }

    #[tokio::test]
    async fn stream_stops_early_when_larger_than_recorded() {
        let dir = tree();
        let root = dir.path().join("root");
        let (nar, hash) = expected(&root);
        let src = source(hash, 1000);
        let (data, _, err) = collect(src.stream_from(root)).await;
        assert!(err.unwrap().to_string().contains("more than 1000 bytes"));
        assert!(data.len() < nar.len());
    }

    #[tokio::test]
    async fn stream_reports_size_mismatch_when_smaller() {
        let dir = tree();
        let root = dir.path().join("root");
        let (nar, hash) = expected(&root);
        let src = source(hash, nar.len() as u64 + 8);
        let (_, _, err) = collect(src.stream_from(root)).await;
        assert!(err.unwrap().to_string().contains("does not match"));
    }

    #[tokio::test]
    async fn stream_reports_unreadable_path() {
        let src = source(Sha256::digest(b""), 0);
        let (_, _, err) = collect(src.stream_from(PathBuf::from("/nonexistent/narpost-y"))).await;
        let msg = err.unwrap().to_string();
        assert!(msg.contains("/nonexistent/narpost-y: cannot stat"), "{msg}");
    }

    #[test]
    fn stream_outside_runtime_is_an_error_not_a_panic() {
        let src = source(Sha256::digest(b""), 0);
        let mut s = src.stream();
        let item = futures::executor::block_on(s.next());
        assert!(item.unwrap().is_err());
    }
}
