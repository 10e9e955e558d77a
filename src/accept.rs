//! The accept loop of narpost's small HTTP servers (`/metrics`, the local substituter).
//!
//! Every connection is accepted at once: a scrape or a Nix must get through even while
//! clients that never finish their request hold every place. At the bound, the oldest
//! connection goes; a real request is served in milliseconds (or streams a NAR that a
//! client with more connections than the bound has long given up on), so the oldest is one
//! that stalls.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Accepts connections on `listener` until `stop` fires, each served by `serve` on a task
/// of its own, at most `max` at once (see the module doc); `what` names the server in logs.
pub fn spawn<F, Fut>(
    listener: TcpListener,
    max: usize,
    what: &'static str,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut open: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!("{what}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            open.retain(|c| !c.is_finished());
            while open.len() >= max {
                if let Some(oldest) = open.pop_front() {
                    oldest.abort();
                }
            }
            open.push_back(tokio::spawn(serve(stream)).abort_handle());
        }
        for connection in open {
            connection.abort();
        }
    });
}
