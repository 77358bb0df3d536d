//! Plain-TCP connections that send raw chunks of sealed segments with `sendfile`.
//!
//! A blob's raw chunks reach hyper as slices of their segment's map (no copy). Written with
//! `writev`, each would be copied from the map into the socket; the kernel can instead hand
//! the socket the page cache's own pages (`sendfile`). hyper writes bodies through this
//! stream: a slice the engine says lies in a map of a named file (`origin_of`) is sent
//! from that file, at the same offset, and everything else (headers, copies, decompressed
//! chunks) is written as before.
//!
//! The guarantee that no byte is sent before its chunk is verified holds unchanged: the map
//! is a shared map of the same file, so the pages `sendfile` reads are the pages the chunk
//! was verified from (a sealed segment is never written again). The file is reopened by path
//! and used only when its device and inode are the map's; otherwise (a collection removed
//! it, something replaced it) the slice is written from the map, as without this stream.
//! TLS connections never come here: their bytes are encrypted in user space.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ballast_engine::storage::{origin_of, Origin};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Slices shorter than this are written: a `sendfile` costs more than copying a few pages.
const SENDFILE_MIN: usize = 16 << 10;
/// Files kept open per connection while it sends (a pull reads a few segments at a time);
/// a connection waiting for its next request keeps none, so idle keep-alive connections
/// hold no descriptors.
const FILES_KEPT: usize = 4;

/// A TCP stream whose writes of mapped segment bytes go out with `sendfile`.
pub struct SendfileStream {
    tcp: TcpStream,
    /// Files opened for maps, newest last: (map, the file, or none when it could not be used).
    files: Vec<(u64, Option<File>)>,
    /// Bytes sent with `sendfile` (`ballast_http_sendfile_bytes_total`).
    sent: Counter,
    /// Off after a `sendfile` failed in a way that says this kernel or file system cannot.
    enabled: bool,
}

impl SendfileStream {
    /// Wraps `tcp`; with `enabled` false it only writes (the `sendfile = false` setting).
    pub fn new(tcp: TcpStream, enabled: bool, sent: Counter) -> SendfileStream {
        SendfileStream {
            tcp,
            files: Vec::new(),
            sent,
            enabled,
        }
    }

    /// The open file of `origin`, when it is still the mapped file (same device and inode).
    fn file_of(&mut self, origin: &Origin) -> Option<usize> {
        if let Some(i) = self.files.iter().position(|(m, _)| *m == origin.map) {
            return self.files[i].1.as_ref().map(|_| i);
        }
        let file = File::open(&origin.path).ok().filter(|f| {
            f.metadata()
                .is_ok_and(|m| m.dev() == origin.dev && m.ino() == origin.ino)
        });
        if self.files.len() >= FILES_KEPT {
            self.files.remove(0);
        }
        let usable = file.is_some();
        self.files.push((origin.map, file));
        usable.then(|| self.files.len() - 1)
    }

    /// Writes the first slices of `bufs` (a partial write is a write: hyper goes on from
    /// where it ended).
    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let bufs = &bufs[first..];
        if !self.enabled {
            return Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        }
        // The slices before the first one that can go from a file are written together.
        let mut upto = bufs.len();
        for (i, b) in bufs.iter().enumerate() {
            if b.len() < SENDFILE_MIN {
                continue;
            }
            let Some((origin, offset)) = origin_of(b) else {
                continue;
            };
            if i > 0 {
                upto = i;
                break;
            }
            if let Some(k) = self.file_of(&origin) {
                return self.poll_sendfile(cx, k, offset, b.len(), b);
            }
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..upto])
    }

    /// Sends `len` bytes of open file `k` from `offset` (falling back to writing `bytes`).
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        k: usize,
        offset: u64,
        len: usize,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let Some(file) = self.files[k].1.as_ref() else {
                return Pin::new(&mut self.tcp).poll_write(cx, bytes);
            };
            let tcp = &self.tcp;
            let sent = tcp.try_io(Interest::WRITABLE, || {
                let mut at = offset;
                rustix::fs::sendfile(tcp, file, Some(&mut at), len).map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    // The file ends before the map does: it is not the file the map shows.
                    self.files[k].1 = None;
                }
                Ok(n) => {
                    self.sent.inc_by(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if unsupported(&e) => {
                    tracing::warn!(error = %e, "sendfile is not available here; writing instead");
                    self.enabled = false;
                    return Pin::new(&mut self.tcp).poll_write(cx, bytes);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if read.is_pending() {
            // Nothing to read: between requests (or a body still coming). Files are opened
            // again when needed.
            self.files.clear();
        }
        read
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, &[IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Whether a `sendfile` error says it cannot work here (the file system or kernel lacks it),
/// rather than that the connection failed.
fn unsupported(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}
