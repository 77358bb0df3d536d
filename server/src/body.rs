//! Request and response bodies: reading with an idle timeout, streaming responses from a
//! channel, and HTTP byte ranges.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;

use crate::error::ApiError;

/// The response body type.
pub type ResBody = BoxBody<Bytes, std::io::Error>;

/// A request's body: what the connection received, or nothing (a request the console makes
/// on its signed-in user's behalf, which goes through the same endpoint table, checks and
/// audit as one from the wire).
#[derive(Debug)]
pub enum ReqBody {
    /// The body the client sends.
    Wire(Incoming),
    /// No body.
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Wire(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Wire(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Wire(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// An empty body.
pub fn empty() -> ResBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body from bytes in memory.
pub fn full(bytes: impl Into<Bytes>) -> ResBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// How slowly a request body may arrive: a stall longer than `idle` ends it, and so does a
/// window of `window` in which fewer than `min_rate` bytes a second arrived (a body trickled
/// a byte at a time would otherwise hold its request, and what it holds, for ever).
#[derive(Clone, Debug)]
pub struct Pace {
    idle: Duration,
    min_rate: u64,
    window: Duration,
    window_start: std::time::Instant,
    window_bytes: u64,
    /// Where arriving bytes are counted too (the metrics' received bytes).
    received: Option<prometheus_client::metrics::counter::Counter>,
}

impl Pace {
    /// `min_rate` 0 checks only for stalls.
    pub fn new(idle: Duration, min_rate: u64, window: Duration) -> Pace {
        Pace {
            idle,
            min_rate,
            window,
            window_start: std::time::Instant::now(),
            window_bytes: 0,
            received: None,
        }
    }

    /// Also counts arriving bytes in `c`.
    pub fn counting(mut self, c: Option<prometheus_client::metrics::counter::Counter>) -> Pace {
        self.received = c;
        self
    }

    /// Counts `n` bytes that arrived; fails when the window that just ended was too slow.
    fn arrived(&mut self, n: usize) -> Result<(), ApiError> {
        self.window_bytes += n as u64;
        if let Some(c) = &self.received {
            c.inc_by(n as u64);
        }
        let elapsed = self.window_start.elapsed();
        if self.min_rate == 0 || elapsed < self.window {
            return Ok(());
        }
        let rate = self.window_bytes as f64 / elapsed.as_secs_f64();
        if rate < self.min_rate as f64 {
            return Err(ApiError::Timeout(format!(
                "the request body arrived at {rate:.0} bytes/s over the last {} s, less than the \
                 {} bytes/s this registry requires (body_min_bytes_per_sec); what arrived of an \
                 upload is kept, resume it from its status",
                elapsed.as_secs(),
                self.min_rate
            )));
        }
        self.window_start = std::time::Instant::now();
        self.window_bytes = 0;
        Ok(())
    }
}

/// Reads the next data frame of a request body; `None` at its end. A body that stalls or
/// trickles (see [`Pace`]) fails with a timeout, so a slow client cannot hold a request
/// forever.
pub async fn next_data(body: &mut ReqBody, pace: &mut Pace) -> Result<Option<Bytes>, ApiError> {
    loop {
        match tokio::time::timeout(pace.idle, body.frame()).await {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "no request body bytes for {} s",
                    pace.idle.as_secs()
                )))
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => {
                return Err(ApiError::BlobUploadInvalid(format!(
                    "reading the request body failed: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        pace.arrived(data.len())?;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// Reads a whole body of at most `max` bytes.
pub async fn read_limited(
    body: &mut ReqBody,
    max: usize,
    mut pace: Pace,
) -> Result<Option<Bytes>, ApiError> {
    let mut out = Vec::new();
    while let Some(data) = next_data(body, &mut pace).await? {
        if out.len() + data.len() > max {
            return Ok(None);
        }
        out.extend_from_slice(&data);
    }
    Ok(Some(Bytes::from(out)))
}

/// Bytes a [`BodySender`] gathers before handing them over: a pull of 64 KiB chunks then
/// costs one hand-over between threads (and one wake-up of the connection's task) per
/// megabyte, not per chunk (the wake-ups were a fifth of a pull's CPU).
const BATCH_BYTES: usize = 1 << 20;

type Batch = Result<Vec<Bytes>, std::io::Error>;

/// A response body fed by a producer on a blocking thread through a bounded channel.
pub struct ChannelBody {
    rx: mpsc::Receiver<Batch>,
    /// What the last batch still holds.
    ready: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

/// The producer's end of a [`ChannelBody`]: bytes go over in batches. It must be used from
/// a blocking thread (`spawn_blocking`); what it holds when dropped is sent then.
pub struct BodySender {
    tx: mpsc::Sender<Batch>,
    batch: Vec<Bytes>,
    bytes: usize,
}

impl BodySender {
    /// Adds bytes to the body; false when the client is gone (stop producing).
    pub fn send(&mut self, data: Bytes) -> bool {
        self.bytes += data.len();
        self.batch.push(data);
        self.bytes < BATCH_BYTES || self.flush()
    }

    /// Hands over what is gathered now (before waiting for more to produce); false when
    /// the client is gone.
    pub fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        self.bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        self.tx.blocking_send(Ok(batch)).is_ok()
    }

    /// Ends the body with an error after what was gathered: the client sees a cut body,
    /// never bad bytes.
    pub fn fail(mut self, e: std::io::Error) {
        if self.flush() {
            let _ = self.tx.blocking_send(Err(e));
        }
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        self.flush();
    }
}

impl ChannelBody {
    /// A body of exactly `len` bytes and the sender that produces them.
    pub fn new(len: u64) -> (BodySender, ChannelBody) {
        let (tx, rx) = mpsc::channel(8);
        let sender = BodySender {
            tx,
            batch: Vec::new(),
            bytes: 0,
        };
        let body = ChannelBody {
            rx,
            ready: Vec::new().into_iter(),
            remaining: len,
        };
        (sender, body)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            if let Some(b) = self.ready.next() {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => self.ready = batch.into_iter(),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Most ranges accepted in one `Range` header (podman's partial pulls send about a thousand).
pub const RANGES_MAX: usize = 4096;

/// What a `Range` header asks of a representation of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ranges {
    /// No usable range: serve the whole representation.
    Whole,
    /// These `[start, end)` ranges, in the order asked.
    Some(Vec<(u64, u64)>),
    /// Nothing of it can be served (416).
    Unsatisfiable,
}

/// Parses a `Range` header (RFC 9110 section 14.2). A header that is not a byte-range set is
/// ignored, as the RFC allows; one whose ranges all start past the end, or with a range whose
/// last byte comes before its first, is unsatisfiable.
pub fn parse_ranges(header: &str, size: u64) -> Ranges {
    let Some(set) = header.trim().strip_prefix("bytes=") else {
        return Ranges::Whole;
    };
    let mut out = Vec::new();
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        if out.len() >= RANGES_MAX {
            return Ranges::Whole;
        }
        let Some((a, b)) = spec.split_once('-') else {
            return Ranges::Whole;
        };
        let range = if a.is_empty() {
            let Ok(n) = b.parse::<u64>() else {
                return Ranges::Whole;
            };
            // A suffix of an empty representation is nothing (found by fuzzing: it gave an
            // empty range and a 206 with an empty part instead of a 416).
            if n == 0 || size == 0 {
                continue;
            }
            Some((size.saturating_sub(n), size))
        } else {
            let Ok(start) = a.parse::<u64>() else {
                return Ranges::Whole;
            };
            let end = if b.is_empty() {
                size
            } else {
                let Ok(last) = b.parse::<u64>() else {
                    return Ranges::Whole;
                };
                // `bytes=500-0` is invalid: answered 416 as Distribution does and as current
                // conformance tooling expects (RFC 9110 would also allow ignoring it).
                if last < start {
                    return Ranges::Unsatisfiable;
                }
                last.saturating_add(1).min(size)
            };
            (start < size).then_some((start, end))
        };
        if let Some(r) = range {
            out.push(r);
        }
    }
    if out.is_empty() {
        Ranges::Unsatisfiable
    } else {
        Ranges::Some(out)
    }
}

/// Parses a PATCH `Content-Range` (`<start>-<end>`, also `bytes <start>-<end>[/<total>]`) into
/// an inclusive pair.
pub fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let v = value.trim();
    let v = v
        .strip_prefix("bytes ")
        .or_else(|| v.strip_prefix("bytes="))
        .unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        // Regression (fuzz/range_header): a suffix range of an empty blob.
        assert_eq!(parse_ranges("bytes=-5", 0), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("bytes=-5,0-", 0), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("bytes=0-9", 100), Ranges::Some(vec![(0, 10)]));
        assert_eq!(
            parse_ranges("bytes=90-", 100),
            Ranges::Some(vec![(90, 100)])
        );
        assert_eq!(
            parse_ranges("bytes=-10", 100),
            Ranges::Some(vec![(90, 100)])
        );
        assert_eq!(
            parse_ranges("bytes=-1000", 100),
            Ranges::Some(vec![(0, 100)])
        );
        assert_eq!(
            parse_ranges("bytes=95-200", 100),
            Ranges::Some(vec![(95, 100)])
        );
        assert_eq!(
            parse_ranges("bytes=0-0, 5-6", 100),
            Ranges::Some(vec![(0, 1), (5, 7)])
        );
        assert_eq!(parse_ranges("bytes=100-", 100), Ranges::Unsatisfiable);
        assert_eq!(
            parse_ranges("bytes=100-200,300-", 100),
            Ranges::Unsatisfiable
        );
        // Last before first: 416, alone or among valid ranges (issue #13).
        assert_eq!(parse_ranges("bytes=500-0", 1000), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("bytes=5-1", 100), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("bytes=0-1,5-1", 100), Ranges::Unsatisfiable);
        assert_eq!(parse_ranges("items=0-1", 100), Ranges::Whole);
        assert_eq!(parse_ranges("bytes=x-1", 100), Ranges::Whole);
        assert_eq!(
            parse_ranges("bytes=0-18446744073709551615", 100),
            Ranges::Some(vec![(0, 100)])
        );
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 10-19/100"), Some((10, 19)));
        assert_eq!(parse_content_range("9-1"), None);
        assert_eq!(parse_content_range("a-b"), None);
    }
}
