//! Reads at queue depth through io_uring (docs/unsafe.md, site 3): several byte ranges of
//! segment files are in flight at once, each into a buffer of its own, and are waited for
//! one at a time in the order the caller needs them.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::io::StorageFile;

/// One read in flight: the buffer the kernel writes into and the file it reads, kept open
/// until the read completes.
struct InFlight {
    buf: Vec<u8>,
    len: usize,
    file: Arc<dyn StorageFile>,
    offset: u64,
}

/// A ring and the reads it has in flight. Dropping it waits for every read still in flight
/// (the kernel writes into their buffers until then).
pub(crate) struct UringReads {
    ring: IoUring,
    depth: usize,
    next: u64,
    inflight: HashMap<u64, InFlight>,
    done: HashMap<u64, io::Result<Vec<u8>>>,
}

impl UringReads {
    /// A ring with room for `depth` reads in flight. Fails where io_uring is not available
    /// (an old kernel, or a sandbox that forbids it): callers then read without it.
    pub(crate) fn new(depth: u32) -> io::Result<Self> {
        Ok(UringReads {
            ring: IoUring::new(depth)?,
            depth: depth as usize,
            next: 0,
            inflight: HashMap::new(),
            done: HashMap::new(),
        })
    }

    /// Starts reading `len` bytes at `offset` of `file`; returns the token to wait on. A file
    /// without a descriptor (the simulated storage) is read at once, synchronously.
    pub(crate) fn start(
        &mut self,
        file: Arc<dyn StorageFile>,
        offset: u64,
        len: usize,
    ) -> io::Result<u64> {
        let token = self.next;
        self.next += 1;
        let Some(fd) = file.raw_fd() else {
            let mut buf = vec![0; len];
            let r = file.read_exact_at(&mut buf, offset).map(|()| buf);
            self.done.insert(token, r);
            return Ok(token);
        };
        while self.inflight.len() >= self.depth {
            self.reap(true)?;
        }
        // Not zeroed: the kernel fills it, and only what it reports written is ever read.
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("read too large"))?;
        let entry = opcode::Read::new(types::Fd(fd as RawFd), buf.as_mut_ptr(), len32)
            .offset(offset)
            .build()
            .user_data(token);
        // SAFETY: the entry points into `buf`, whose heap allocation is moved (not copied or
        // freed) into `self.inflight` below and stays there until the kernel reports the
        // read complete (`reap`); `Drop` waits for every read in flight before the buffers
        // can go. The descriptor belongs to `file`, kept open in the same entry.
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        if !pushed {
            // The submission queue is full: hand it to the kernel and push again.
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        self.inflight.insert(
            token,
            InFlight {
                buf,
                len,
                file,
                offset,
            },
        );
        self.ring.submit()?;
        Ok(token)
    }

    /// Waits for the read of `token` and returns its bytes. A short read is completed with
    /// an ordinary positional read.
    pub(crate) fn wait(&mut self, token: u64) -> io::Result<Vec<u8>> {
        loop {
            if let Some(r) = self.done.remove(&token) {
                return r;
            }
            if !self.inflight.contains_key(&token) {
                return Err(io::Error::other("no such read in flight"));
            }
            self.reap(true)?;
        }
    }

    /// Collects completions; with `block`, waits for at least one first.
    fn reap(&mut self, block: bool) -> io::Result<()> {
        if block {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, result) in finished {
            let Some(InFlight {
                mut buf,
                len: want,
                file,
                offset,
            }) = self.inflight.remove(&token)
            else {
                continue;
            };
            let r = if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else {
                let got = (result as usize).min(want);
                // SAFETY: the kernel reported `got` bytes written at the start of the
                // allocation (at most the `want` it was asked for, within the capacity):
                // they are initialized.
                unsafe { buf.set_len(got) };
                buf.resize(want, 0);
                let rest = &mut buf[got..];
                if rest.is_empty() {
                    Ok(())
                } else {
                    file.read_exact_at(rest, offset + got as u64)
                }
                .map(|()| buf)
            };
            self.done.insert(token, r);
        }
        Ok(())
    }
}

impl Drop for UringReads {
    fn drop(&mut self) {
        while !self.inflight.is_empty() {
            if self.reap(true).is_err() {
                // The kernel may still write into these buffers: never free them.
                for (_, f) in self.inflight.drain() {
                    std::mem::forget(f.buf);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{OpenMode, RealStorage, SimStorage, Storage};

    #[test]
    fn reads_in_flight_come_back_whole_in_any_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data = crate::testdata::seeded(3 << 20, 9);
        std::fs::write(&path, &data).expect("write");
        let file = RealStorage.open(&path, OpenMode::Read).expect("open");
        let Ok(mut reads) = UringReads::new(4) else {
            eprintln!("io_uring is not available here: nothing to test");
            return;
        };
        let ranges: Vec<(u64, usize)> = (0..12).map(|i| (i * 250_000 + 7, 200_000)).collect();
        let tokens: Vec<u64> = ranges
            .iter()
            .map(|&(o, l)| reads.start(file.clone(), o, l).expect("start"))
            .collect();
        for (i, t) in tokens.iter().enumerate().rev() {
            let (o, l) = ranges[i];
            let got = reads.wait(*t).expect("read");
            assert_eq!(got, &data[o as usize..o as usize + l]);
        }
        // Past the end: an error, not short data.
        let t = reads
            .start(file.clone(), data.len() as u64 - 10, 100)
            .expect("start");
        assert_eq!(
            reads.wait(t).expect_err("short").kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Reads still in flight when the ring goes are waited for.
        for i in 0..4 {
            reads.start(file.clone(), i * 4096, 4096).expect("start");
        }
        drop(reads);
    }

    #[test]
    fn a_file_without_a_descriptor_is_read_at_once() {
        let sim = SimStorage::new();
        let path = std::path::Path::new("/s/f");
        let f = sim.open(path, OpenMode::CreateNew).expect("create");
        f.write_all_at(b"hello world", 0).expect("write");
        let Ok(mut reads) = UringReads::new(2) else {
            return;
        };
        let t = reads.start(f, 6, 5).expect("start");
        assert_eq!(reads.wait(t).expect("read"), b"world");
    }
}
