//! The stall watchdog shared by the HTTP and Attic targets: a long upload is fine, a silent
//! one is not.
//!
//! The request body reports each chunk the connection takes ([`Progress::touch`]) and its
//! end ([`Progress::finish`]); [`watch`] fails the request when no chunk was taken for the
//! timeout, or when, after the last byte, no answer comes within [`ANSWER_TIMEOUT_FACTOR`]
//! times it (the socket buffers may still hold megabytes that a slow link has to drain).
//!
//! The answer's body is read by [`read_answer`], with the same timeout as a whole and a size
//! limit: a server that sends headers and then nothing, or an endless body, ends in an error
//! rather than a stuck upload or an exhausted memory.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many timeouts the answer to a completely sent upload may take.
pub const ANSWER_TIMEOUT_FACTOR: u32 = 5;

/// When an upload last made progress, and whether its body is complete.
pub struct Progress {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    finished: AtomicBool,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        }
    }

    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.touch();
        self.finished.store(true, Ordering::Relaxed);
    }

    fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// A stalled upload: how long nothing happened, and whether the body had been sent.
#[derive(Debug)]
pub struct Stall {
    pub waited: Duration,
    pub body_sent: bool,
}

impl Stall {
    /// What stalled, in words, for the target's error message.
    pub fn what(&self) -> &'static str {
        if self.body_sent {
            "the whole NAR was sent, but no answer came"
        } else {
            "the server stopped taking the NAR"
        }
    }
}

/// Drives `send` to its end, or until `progress` stalls for `timeout`.
pub async fn watch<T>(
    send: impl Future<Output = T>,
    progress: &Progress,
    timeout: Duration,
) -> Result<T, Stall> {
    tokio::pin!(send);
    loop {
        let limit = if progress.finished() {
            timeout * ANSWER_TIMEOUT_FACTOR
        } else {
            timeout
        };
        let deadline = progress.last() + limit;
        tokio::select! {
            result = &mut send => return Ok(result),
            () = tokio::time::sleep_until(deadline.into()) => {
                if progress.last() + limit > Instant::now() {
                    continue;
                }
                return Err(Stall { waited: limit, body_sent: progress.finished() });
            }
        }
    }
}

/// An answer's body, at most the limit it was read with.
pub struct Answer {
    pub body: Vec<u8>,
    /// The server sent more than the limit; `body` holds the first part.
    pub truncated: bool,
}

/// Why an answer's body could not be read.
#[derive(Debug)]
pub enum AnswerError {
    /// Not complete within the timeout.
    TimedOut(Duration),
    Transport(reqwest::Error),
}

/// Reads `response`'s body, keeping at most `limit` bytes (the rest is not read: the
/// connection is dropped instead of being reused), all within `timeout`.
pub async fn read_answer(
    response: reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Answer, AnswerError> {
    use futures::StreamExt;
    let read = async {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(AnswerError::Transport)?;
            let room = limit - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                return Ok(Answer {
                    body,
                    truncated: true,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            body,
            truncated: false,
        })
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(AnswerError::TimedOut(timeout)))
}

/// An answer's body as a stream, each chunk within `stall` of the one before (or of the
/// headers); `error` names what failed for the target's message.
pub fn answer_stream(
    response: reqwest::Response,
    stall: Duration,
    error: impl Fn(AnswerError) -> crate::cache::TargetError + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<bytes::Bytes, crate::cache::TargetError>> {
    use futures::StreamExt;
    let body = response.bytes_stream().boxed();
    futures::stream::unfold(Some((body, error)), move |state| async move {
        let (mut body, error) = state?;
        match tokio::time::timeout(stall, body.next()).await {
            Err(_) => Some((Err(error(AnswerError::TimedOut(stall))), None)),
            Ok(None) => None,
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some((body, error)))),
            Ok(Some(Err(e))) => Some((Err(error(AnswerError::Transport(e))), None)),
        }
    })
    .boxed()
}

/// An error and its causes on one line, each cause once (many messages include their
/// source's text already).
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn progress_keeps_a_slow_upload_alive_and_silence_ends_it() {
        let progress = std::sync::Arc::new(Progress::new());
        let ticker = progress.clone();
        // Eight ticks 50 ms apart, 400 ms in all, against a 200 ms timeout: never stalls.
        let slow = async move {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ticker.touch();
            }
            "done"
        };
        let timeout = Duration::from_millis(200);
        assert_eq!(watch(slow, &progress, timeout).await.ok(), Some("done"));

        let silent = Progress::new();
        let stall = watch(std::future::pending::<()>(), &silent, timeout)
            .await
            .expect_err("stalls");
        assert!(!stall.body_sent);
        assert_eq!(stall.waited, timeout);

        let sent = Progress::new();
        sent.finish();
        let stall = watch(std::future::pending::<()>(), &sent, timeout)
            .await
            .expect_err("no answer");
        assert!(stall.body_sent);
        assert_eq!(stall.waited, timeout * ANSWER_TIMEOUT_FACTOR);
    }
}
