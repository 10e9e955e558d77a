//! zstd compression that shares the cores with the other compressions running at once.
//!
//! A NAR is compressed as a sequence of zstd frames of [`FRAME_BYTES`] of input each (every
//! zstd decoder, Nix's included, reads concatenated frames as one stream). Each frame picks
//! its worker count when it starts: all cores when it is the only compression running, one
//! when others are. So a closure of many paths compresses them side by side, one thread
//! each, and its last big path still gets every core once the others are done, without a
//! worker per core per path piling up buffers. Workers run 1 MiB jobs: zstd's default (four
//! windows per worker, plus as many queued) costs tens of MiB per encoder for no measurable
//! gain in ratio.
//!
//! The bytes depend only on the NAR and the level, never on how many compressions run at
//! once: a frame of 4 MiB or more is always compressed in zstd's
//! multithreaded mode (with one worker when the cores are taken), whose output is the same
//! for any number of workers at a fixed job size; a smaller frame always in-thread, and a
//! NAR of at most [`SMALL_MAX`] in one call on a context its thread keeps. So any
//! number of machines pushing one closure into one bucket write the same objects under the
//! same `FileHash` names, instead of one NAR file per way it happened to be compressed.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Uncompressed bytes per frame: large enough that frame headers and the lost history at
/// each boundary cost nothing measurable, small enough to rebalance workers every second
/// or so.
pub const FRAME_BYTES: u64 = 64 << 20;

/// Below this, a frame is compressed on the calling thread: starting workers would cost
/// more than it saves.
const MULTITHREAD_MIN: u64 = 4 << 20;

const JOB_SIZE: u32 = 1 << 20;

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Up to this much input (by the NAR's recorded size, and in fact), a NAR is compressed in
/// one call on a context the thread keeps: setting up a fresh zstd context costs a tiny
/// path more than compressing it.
pub const SMALL_MAX: u64 = 1 << 20;

/// Whether a NAR of `nar_size` bytes (as recorded) counts as small: prepared in the
/// pipeline's small slots, never behind newer work, and (when its size is known) compressed
/// in one call.
pub fn is_small(nar_size: u64) -> bool {
    nar_size <= SMALL_MAX
}

/// A zstd writer producing one frame per [`FRAME_BYTES`] of input.
pub struct FramedZstd<W: Write> {
    state: State<W>,
    level: i32,
    /// Input bytes still expected (from the NAR size), to skip workers for small tails.
    remaining: u64,
    in_frame: u64,
    cores: usize,
}

enum State<W: Write> {
    /// Input gathered for one call at the end (see [`SMALL_MAX`]).
    Small {
        inner: W,
        input: Vec<u8>,
    },
    Streaming(zstd::Encoder<'static, W>),
    /// After an error, or while switching.
    Broken,
}

impl<W: Write> FramedZstd<W> {
    /// `expected_len`: the uncompressed size, if known (0 if not).
    pub fn new(inner: W, level: i32, expected_len: u64) -> io::Result<Self> {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        // Asked once: the answer reads cgroup files, which costs a tiny path more than its
        // compression.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cores = *CORES.get_or_init(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let mut this = FramedZstd {
            state: State::Broken,
            level,
            remaining: expected_len,
            in_frame: 0,
            cores,
        };
        this.state = if expected_len > 0 && is_small(expected_len) {
            State::Small {
                inner,
                input: Vec::with_capacity(expected_len as usize),
            }
        } else {
            State::Streaming(this.start_frame(inner)?)
        };
        Ok(this)
    }

    fn start_frame(&self, inner: W) -> io::Result<zstd::Encoder<'static, W>> {
        let active = ACTIVE.load(Ordering::SeqCst).max(1);
        let workers = (self.cores / active).max(1);
        frame_encoder(inner, self.level, self.remaining, workers)
    }

    fn encoder(&mut self) -> io::Result<&mut zstd::Encoder<'static, W>> {
        match &mut self.state {
            State::Streaming(e) => Ok(e),
            _ => Err(broken()),
        }
    }

    /// Ends the last frame and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        match std::mem::replace(&mut self.state, State::Broken) {
            State::Small { mut inner, input } => {
                inner.write_all(&compress_small(&input, self.level)?)?;
                Ok(inner)
            }
            State::Streaming(encoder) => encoder.finish(),
            State::Broken => Err(broken()),
        }
    }
}

fn broken() -> io::Error {
    io::Error::other("zstd writer used after an error")
}

/// One frame for `input`, on this thread's context for `level`. The bytes are the same on
/// a fresh context: every call starts a new frame from the same parameters.
fn compress_small(input: &[u8], level: i32) -> io::Result<Vec<u8>> {
    use std::cell::RefCell;
    thread_local! {
        static CONTEXT: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(None) };
    }
    CONTEXT.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let mut c = zstd::bulk::Compressor::new(level)?;
            c.include_checksum(false)?;
            *slot = Some((level, c));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress(input),
            None => Err(broken()),
        }
    })
}

/// The encoder for the next frame, `remaining` bytes of input still expected (0: unknown)
/// and `workers` threads to spare. Only the frame's size decides the mode (see the module
/// doc); `workers` changes the speed, never the bytes.
fn frame_encoder<W: Write>(
    inner: W,
    level: i32,
    remaining: u64,
    workers: usize,
) -> io::Result<zstd::Encoder<'static, W>> {
    let mut encoder = zstd::Encoder::new(inner, level)?;
    encoder.include_checksum(false)?;
    let frame = remaining.min(FRAME_BYTES);
    // An unknown size counts as a large frame, so the mode still depends on the input alone.
    if remaining == 0 || frame >= MULTITHREAD_MIN {
        // Without worker support in the library every frame is compressed in-thread, which
        // is deterministic too.
        if encoder.multithread(workers as u32).is_ok() {
            encoder.set_parameter(zstd::zstd_safe::CParameter::JobSize(JOB_SIZE))?;
        }
    }
    // A hint, not a pledge: with a pledge a store path whose size changed since Nix
    // recorded it would fail inside zstd, before the NarHash check can name the problem.
    if remaining > 0 {
        let hint = u32::try_from(frame).unwrap_or(u32::MAX);
        encoder.set_parameter(zstd::zstd_safe::CParameter::SrcSizeHint(hint))?;
    }
    Ok(encoder)
}

impl<W: Write> Write for FramedZstd<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let State::Small { input, .. } = &mut self.state {
            if (input.len() + buf.len()) as u64 <= SMALL_MAX {
                input.extend_from_slice(buf);
                self.in_frame += buf.len() as u64;
                self.remaining = self.remaining.saturating_sub(buf.len() as u64);
                return Ok(buf.len());
            }
            // Larger than its recorded size said: streamed like any large NAR, from the
            // start, so the bytes still depend on the input alone.
            let State::Small { inner, input } = std::mem::replace(&mut self.state, State::Broken)
            else {
                return Err(broken());
            };
            let mut encoder = self.start_frame(inner)?;
            encoder.write_all(&input)?;
            self.state = State::Streaming(encoder);
        }
        if self.in_frame >= FRAME_BYTES {
            let State::Streaming(encoder) = std::mem::replace(&mut self.state, State::Broken)
            else {
                return Err(broken());
            };
            let inner = encoder.finish()?;
            self.in_frame = 0;
            self.state = State::Streaming(self.start_frame(inner)?);
        }
        let room = (FRAME_BYTES - self.in_frame).min(buf.len() as u64) as usize;
        let n = self.encoder()?.write(&buf[..room])?;
        self.in_frame += n as u64;
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.state {
            State::Small { inner, .. } => inner.flush(),
            State::Streaming(e) => e.flush(),
            State::Broken => Err(broken()),
        }
    }
}

impl<W: Write> Drop for FramedZstd<W> {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivially: a counter mixed into text.
        let mut out = Vec::with_capacity(len);
        let mut i: u64 = 0;
        while out.len() < len {
            out.extend_from_slice(
                format!("line {i} of the sample {}\n", i * 7919 % 1013).as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    fn compress(data: &[u8], expected: u64) -> Vec<u8> {
        let mut w = FramedZstd::new(Vec::new(), 3, expected).expect("encoder");
        for chunk in data.chunks(100_003) {
            w.write_all(chunk).expect("write");
        }
        w.finish().expect("finish")
    }

    #[test]
    fn the_bytes_do_not_depend_on_the_number_of_workers() {
        let data = sample(9 << 20);
        let with = |workers: usize| {
            let mut e = frame_encoder(Vec::new(), 3, data.len() as u64, workers).expect("encoder");
            for chunk in data.chunks(65_537) {
                e.write_all(chunk).expect("write");
            }
            e.finish().expect("finish")
        };
        let one = with(1);
        assert_eq!(one, with(2));
        assert_eq!(one, with(7));
        // And whatever else compresses at the same time.
        let busy = FramedZstd::new(Vec::new(), 3, 1).expect("another compression");
        assert_eq!(compress(&data, data.len() as u64), one);
        drop(busy);
        assert_eq!(compress(&data, data.len() as u64), one);
    }

    #[test]
    fn several_frames_decode_as_one_stream() {
        let data = sample(FRAME_BYTES as usize * 2 + 12345);
        let packed = compress(&data, data.len() as u64);
        // Three frames: two full ones and the tail.
        let mut frames = 0;
        let mut rest = &packed[..];
        while !rest.is_empty() {
            let size = zstd::zstd_safe::find_frame_compressed_size(rest).expect("a frame");
            rest = &rest[size..];
            frames += 1;
        }
        assert_eq!(frames, 3);
        assert_eq!(zstd::decode_all(&packed[..]).expect("decode"), data);
    }

    #[test]
    fn a_wrong_expected_size_still_round_trips() {
        // The NarHash check, not zstd, decides about a store path whose size changed.
        let data = sample(6 << 20);
        for expected in [1u64, 5 << 20, 7 << 20] {
            assert_eq!(
                zstd::decode_all(&compress(&data, expected)[..]).expect("decode"),
                data
            );
        }
    }

    #[test]
    fn a_small_nar_compresses_to_the_same_bytes_on_a_used_context_and_a_fresh_one() {
        let a = sample(300);
        let b = sample(700 << 10);
        let first = compress(&a, a.len() as u64);
        assert_eq!(zstd::decode_all(&first[..]).expect("decode"), a);
        let other = compress(&b, b.len() as u64);
        assert_eq!(zstd::decode_all(&other[..]).expect("decode"), b);
        // The same thread's context again, after other input and another level.
        let mut w = FramedZstd::new(Vec::new(), 9, a.len() as u64).expect("encoder");
        w.write_all(&a).expect("write");
        w.finish().expect("finish");
        assert_eq!(compress(&a, a.len() as u64), first);
        let fresh = std::thread::spawn(move || compress(&a, a.len() as u64));
        assert_eq!(fresh.join().expect("thread"), first);
    }

    #[test]
    fn a_nar_larger_than_recorded_is_streamed_and_round_trips() {
        let data = sample((SMALL_MAX as usize) * 3 / 2);
        let packed = compress(&data, 100);
        assert_eq!(zstd::decode_all(&packed[..]).expect("decode"), data);
        assert_eq!(compress(&data, 100), packed);
    }

    #[test]
    fn unknown_size_and_empty_input_round_trip() {
        let data = sample(5 << 20);
        assert_eq!(
            zstd::decode_all(&compress(&data, 0)[..]).expect("decode"),
            data
        );
        assert!(
            zstd::decode_all(&compress(&[], 0)[..])
                .expect("decode")
                .is_empty()
        );
    }
}
