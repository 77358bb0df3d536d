//! Deterministic data for tests, benchmarks and `ballast bench`: one pseudo-random generator,
//! so every caller's "seed 7" is the same data (and the golden chunk boundaries pinned on it
//! stay meaningful), one ustar archive builder, and a snapshot of a directory's files.

/// xorshift64: fast, deterministic, not for anything secret. The one copy of it.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator whose state is `state` (zero, which xorshift cannot leave, becomes one).
    pub fn new(state: u64) -> XorShift {
        XorShift(state.max(1))
    }

    /// The next state.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }
}

/// `len` pseudo-random bytes from `seed` (distinct seeds give distinct streams).
pub fn seeded(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A ustar header of a regular file (mode 0644, owner fields empty).
pub fn tar_header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(format!("{mtime:011o}").as_bytes());
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// A ustar archive of `files`, every header's mtime `mtime`, with its end-of-archive blocks.
pub fn tar<S: AsRef<str>>(files: &[(S, Vec<u8>)], mtime: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&tar_header(name.as_ref(), data.len() as u64, mtime));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Every file under `dir` (recursively) but a data directory's `LOCK`, with its bytes,
/// sorted by path: what tests compare to show that something changed no byte.
pub fn files_of(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list a directory") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with("LOCK") {
                let bytes = std::fs::read(&p).expect("read a file");
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}
