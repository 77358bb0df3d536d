//! The server's log sink: lines are gathered in memory and written to stderr by a thread of
//! their own, every [`FLUSH_INTERVAL`] or as soon as [`BUFFER_MAX`] bytes wait. A request
//! line then costs a lock and a copy, no system call and no thread wake-up (with a line per
//! request, a write per line was a tenth of the server's time on small requests).
//!
//! Lines still in memory when the process is killed are lost; the audit log, not this one, is
//! the durable record. A panic flushes what is buffered before the panic message.

use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Buffered bytes that wake the writer at once.
pub const BUFFER_MAX: usize = 256 << 10;
/// Past this many buffered bytes (stderr is not being read), new lines are dropped and
/// counted rather than held: a stuck log reader must not grow the server's memory.
pub const BUFFER_LIMIT: usize = 16 << 20;

struct Shared {
    buf: Mutex<Buffer>,
    wake: Condvar,
}

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// Lines dropped since the last write because the buffer was full.
    dropped: u64,
    stop: bool,
}

/// Makes writers that append to the shared buffer (a `MakeWriter` for tracing-subscriber).
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread after a last flush, when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn batched(out: impl Write + Send + 'static) -> (BatchedWriter, FlushGuard) {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Buffer::default()),
        wake: Condvar::new(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("ballast-log".into())
        .spawn(move || run(&s, out))
        .expect("start the log writer thread");
    let writer = BatchedWriter {
        shared: shared.clone(),
    };
    // A panic's own message goes straight to stderr: put what led up to it first.
    let on_panic = writer.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        on_panic.flush_now();
        previous(info);
    }));
    (
        writer,
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    )
}

fn run(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        let stop = {
            let mut buf = shared.buf.lock();
            if buf.bytes.len() < BUFFER_MAX && !buf.stop {
                shared.wake.wait_for(&mut buf, FLUSH_INTERVAL);
            }
            std::mem::swap(&mut buf.bytes, &mut spare);
            let dropped = std::mem::take(&mut buf.dropped);
            if dropped > 0 {
                spare.extend_from_slice(
                    format!(
                        "ballast: {dropped} log lines dropped: stderr was not read fast enough\n"
                    )
                    .as_bytes(),
                );
            }
            buf.stop
        };
        if !spare.is_empty() {
            // Nowhere to report a failed write to stderr; the lines are dropped.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
        }
        if stop {
            return;
        }
    }
}

impl BatchedWriter {
    /// Writes out what is buffered, on the calling thread.
    fn flush_now(&self) {
        let bytes = std::mem::take(&mut self.shared.buf.lock().bytes);
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&bytes).and_then(|()| err.flush());
    }
}

/// Where request lines go when the binary set up the log (see [`crate::reqlog`]).
static REQUEST_SINK: std::sync::OnceLock<BatchedWriter> = std::sync::OnceLock::new();

impl BatchedWriter {
    /// Makes this writer the one request lines are appended to directly, without going
    /// through tracing's formatting (the binary does this once, for the log it sets up).
    pub fn take_request_lines(&self) {
        let _ = REQUEST_SINK.set(self.clone());
    }
}

/// The writer request lines are appended to directly, if the binary set one.
pub fn request_sink() -> Option<&'static BatchedWriter> {
    REQUEST_SINK.get()
}

impl Write for BatchedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.shared.buf.lock();
        if buf.bytes.len() + data.len() > BUFFER_LIMIT {
            buf.dropped += 1;
        } else {
            buf.bytes.extend_from_slice(data);
        }
        if buf.bytes.len() >= BUFFER_MAX {
            self.shared.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;
    fn make_writer(&'a self) -> BatchedWriter {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.buf.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that blocks until released, as a stderr nobody reads.
    #[derive(Clone)]
    struct Stuck {
        inner: Sink,
        open: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Write for Stuck {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let mut open = self.open.0.lock();
            while !*open {
                self.open.1.wait(&mut open);
            }
            self.inner.write(data)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_reader_costs_bounded_memory_and_the_drops_are_reported() {
        let stuck = Stuck {
            inner: Sink::default(),
            open: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let (w, guard) = batched(stuck.clone());
        let mut lw = w.make_writer();
        // The writer thread takes a first line and blocks on it.
        lw.write_all(b"first\n").expect("write");
        while !w.shared.buf.lock().bytes.is_empty() {
            std::thread::sleep(FLUSH_INTERVAL / 10);
        }
        let line = [b'x'; 1023];
        let lines = 2 * BUFFER_LIMIT / 1024;
        for _ in 0..lines {
            lw.write_all(&line).expect("write");
            lw.write_all(b"\n").expect("write");
        }
        assert!(
            w.shared.buf.lock().bytes.len() <= BUFFER_LIMIT,
            "the buffer stays within its limit"
        );
        *stuck.open.0.lock() = true;
        stuck.open.1.notify_all();
        drop(guard);
        let text = String::from_utf8(stuck.inner.0.lock().clone()).expect("utf-8");
        assert!(text.starts_with("first\n"), "{}", &text[..20]);
        assert!(
            text.contains("log lines dropped: stderr was not read fast enough"),
            "the drops are reported"
        );
    }

    #[test]
    fn lines_arrive_in_order_within_the_interval_and_all_of_them_at_stop() {
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone());
        let mut a = w.make_writer();
        a.write_all(b"one\n").expect("write");
        let deadline = std::time::Instant::now() + FLUSH_INTERVAL * 20;
        while sink.0.lock().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "a line waited too long"
            );
            std::thread::sleep(FLUSH_INTERVAL / 4);
        }
        assert_eq!(&sink.0.lock()[..], b"one\n");

        let writers: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    let mut w = w.make_writer();
                    for i in 0..1000 {
                        w.write_all(format!("t{t} {i}\n").as_bytes())
                            .expect("write");
                    }
                })
            })
            .collect();
        for t in writers {
            t.join().expect("writer");
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().clone()).expect("utf-8");
        assert_eq!(
            text.lines().count(),
            4001,
            "every line is written by the stop"
        );
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} ")))
                .map(|n| n.parse().expect("number"))
                .collect();
            assert_eq!(
                mine,
                (0..1000).collect::<Vec<_>>(),
                "lines keep their order"
            );
        }
    }
}
