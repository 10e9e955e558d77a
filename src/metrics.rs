//! Prometheus metrics of the drainer (`daemon`, `watch-store`, `watch-exec`), served at
//! `/metrics` where `metrics-listen` says (off by default), in the OpenMetrics text format
//! that Prometheus scrapes.
//!
//! - `narpost_queue_depth`, `narpost_queue_oldest_entry_age_seconds`, `narpost_cache_up`:
//!   read at each scrape from what `narpost status` reads (the queue directory and the
//!   published drain state), so the two always agree;
//! - `narpost_paths_pushed_total`, `narpost_pushed_bytes_total` (compressed bytes stored in
//!   the cache), `narpost_upload_retries_total`, `narpost_upload_duration_seconds` (per path,
//!   from its start to its narinfo): from the pipeline's events;
//! - `narpost_upload_failures_total{kind}`: each path that failed a pass, by kind.
//!
//! The server answers only `GET /metrics`; a request must arrive whole within a few seconds
//! and in a few KiB, and only a few connections are served at once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::{Event, Report};

/// How long a client may take to send its request, and to be served in all.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// The smallest read buffer hyper allows; a request's head must fit.
const MAX_REQUEST_BYTES: usize = 8192;
/// Connections served at once; a new one past this many closes the oldest.
const MAX_CONNECTIONS: usize = 8;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    queue_depth: Gauge,
    oldest_age: Gauge,
    cache_up: Gauge,
    paths_pushed: Counter,
    bytes_pushed: Counter,
    retries: Counter,
    failures: Family<Labels, Counter>,
    duration: Histogram,
    claims_held: Gauge,
    claim_waits: Counter,
    builds_saved: Counter,
}

impl Metrics {
    /// The drainer's metrics, counted whether or not anyone scrapes them; `main` makes one
    /// and hands it to the drainer and to the server.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::registered())
    }

    fn registered() -> Metrics {
        let mut registry = Registry::with_prefix("narpost");
        let m = Metrics {
            queue_depth: Gauge::default(),
            oldest_age: Gauge::default(),
            cache_up: Gauge::default(),
            paths_pushed: Counter::default(),
            bytes_pushed: Counter::default(),
            retries: Counter::default(),
            failures: Family::default(),
            // 10 ms to about 11 minutes.
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 17)),
            claims_held: Gauge::default(),
            claim_waits: Counter::default(),
            builds_saved: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_depth",
            "Queue entries waiting for upload",
            m.queue_depth.clone(),
        );
        registry.register_with_unit(
            "queue_oldest_entry_age",
            "Age of the oldest queue entry (0 with an empty queue)",
            Unit::Seconds,
            m.oldest_age.clone(),
        );
        registry.register(
            "cache_up",
            "1 while uploads to the cache work, 0 while it counts as down",
            m.cache_up.clone(),
        );
        registry.register(
            "paths_pushed",
            "Store paths uploaded since start",
            m.paths_pushed.clone(),
        );
        registry.register_with_unit(
            "pushed",
            "Compressed NAR bytes uploaded since start",
            Unit::Bytes,
            m.bytes_pushed.clone(),
        );
        registry.register(
            "upload_retries",
            "Requests to the cache tried again",
            m.retries.clone(),
        );
        registry.register(
            "upload_failures",
            "Store paths that failed an upload pass, by kind",
            m.failures.clone(),
        );
        registry.register_with_unit(
            "upload_duration",
            "Time from a path's upload start to its narinfo in the cache",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "claims_held",
            "Paths this machine claims to build, for the others to wait on",
            m.claims_held.clone(),
        );
        registry.register(
            "claim_waits",
            "Questions of this machine's Nix held while another machine built the path",
            m.claim_waits.clone(),
        );
        registry.register(
            "builds_saved",
            "Waits that ended with the path built elsewhere, substituted instead of built",
            m.builds_saved.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Per-kind failures of one pass.
    pub fn record_report(&self, report: &Report) {
        for f in &report.failed {
            let kind = format!("{:?}", f.kind).to_lowercase();
            self.failures
                .get_or_create(&vec![("kind".into(), kind)])
                .inc();
        }
    }

    /// Refreshes the gauges from what `status` reads (the queue directory and the drain
    /// state this process publishes), then encodes everything.
    fn render(&self, state_dir: &Path) -> anyhow::Result<String> {
        let queue = crate::queue::Queue::open(state_dir)?;
        self.queue_depth.set(queue.depth()? as i64);
        self.oldest_age
            .set(queue.oldest_age()?.map(|d| d.as_secs() as i64).unwrap_or(0));
        let down =
            crate::drain_state::read(state_dir).is_some_and(|s| s.cache_down_since.is_some());
        self.cache_up.set(i64::from(!down));
        if let Some(claims) = crate::drain_state::read_claims(state_dir) {
            self.claims_held.set(claims.held.len() as i64);
            // Counted by the claims; the counters catch up to what they published.
            for (counter, value) in [
                (&self.claim_waits, claims.waits),
                (&self.builds_saved, claims.builds_saved),
            ] {
                counter.inc_by(value.saturating_sub(counter.get()));
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// A sender for the drainer's pipeline events; they are counted by a task of their own,
    /// which ends when the sender is dropped. Call from within the runtime.
    pub fn events(self: &Arc<Self>) -> mpsc::UnboundedSender<Event> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let m = self.clone();
        tokio::spawn(async move {
            let mut started: HashMap<crate::format::store_path::StorePath, Instant> =
                HashMap::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Started { path, .. } => {
                        started.insert(path, Instant::now());
                    }
                    Event::Pushed {
                        path, file_size, ..
                    } => {
                        m.paths_pushed.inc();
                        m.bytes_pushed.inc_by(file_size);
                        if let Some(at) = started.remove(&path) {
                            m.duration.observe(at.elapsed().as_secs_f64());
                        }
                    }
                    Event::Failed { path, .. } => {
                        started.remove(&path);
                    }
                    Event::Retrying { .. } => {
                        m.retries.inc();
                    }
                    _ => {}
                }
            }
        });
        tx
    }
}

/// Starts serving `/metrics` if `metrics-listen` is set, until `stop` fires. Call from
/// within the runtime.
pub async fn serve(
    cfg: &Config,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = cfg.metrics_listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics-listen = {addr}: cannot listen"))?;
    tracing::info!("serving metrics at http://{addr}/metrics");
    let state_dir: Arc<Path> = Arc::from(cfg.state_dir.as_path());
    crate::accept::spawn(listener, MAX_CONNECTIONS, "metrics", stop, move |stream| {
        let (state_dir, metrics) = (state_dir.clone(), metrics.clone());
        async move {
            let service = hyper::service::service_fn(move |req| {
                let (state_dir, metrics) = (state_dir.clone(), metrics.clone());
                async move { Ok::<_, std::convert::Infallible>(respond(req, state_dir, metrics).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_DEADLINE)
                .max_buf_size(MAX_REQUEST_BYTES)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
        }
    });
    Ok(())
}

type Body = http_body_util::Full<bytes::Bytes>;

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    state_dir: Arc<Path>,
    metrics: Arc<Metrics>,
) -> hyper::Response<Body> {
    let reply = |status: u16, ctype: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Body::from(body))
            .unwrap_or_default()
    };
    if req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "only /metrics is served here\n".into());
    }
    if req.method() != hyper::Method::GET {
        return reply(405, "text/plain", "GET only\n".into());
    }
    // Reading the queue touches the disk.
    match tokio::task::spawn_blocking(move || metrics.render(&state_dir)).await {
        Ok(Ok(text)) => reply(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Ok(Err(e)) => reply(500, "text/plain", format!("{e:#}\n")),
        Err(e) => reply(500, "text/plain", format!("{e}\n")),
    }
}
