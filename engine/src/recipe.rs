//! Blob recipes: how a blob is put back together from chunks and inline pieces
//! (docs/format.md, "Recipe record").

use std::path::Path;

use crate::digest::{Algorithm, ChunkId, Digest};
use crate::error::{Error, Result};

/// One piece of a blob, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipePiece {
    /// A stored chunk and its raw length.
    Chunk { id: ChunkId, len: u32 },
    /// Bytes kept in the recipe itself (tar headers).
    Inline(Vec<u8>),
}

impl RecipePiece {
    /// The piece's length in the blob.
    pub fn len(&self) -> u64 {
        match self {
            RecipePiece::Chunk { len, .. } => u64::from(*len),
            RecipePiece::Inline(b) => b.len() as u64,
        }
    }
    /// True for an empty piece (never produced by the chunker).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A committed blob: its digest, its size and its pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipe {
    /// The OCI digest of the whole byte stream.
    pub digest: Digest,
    /// Total length in bytes.
    pub size: u64,
    /// Pieces in blob order; their lengths add up to `size`.
    pub pieces: Vec<RecipePiece>,
}

const TAG_CHUNK: u8 = 0;
const TAG_INLINE: u8 = 1;
/// Largest inline piece.
pub const INLINE_LEN_MAX: usize = u16::MAX as usize;

impl Recipe {
    /// Encodes the recipe as a record payload.
    pub fn encode(&self) -> Vec<u8> {
        let inline: usize = self
            .pieces
            .iter()
            .map(|p| {
                if let RecipePiece::Inline(b) = p {
                    b.len()
                } else {
                    0
                }
            })
            .sum();
        let mut out = Vec::with_capacity(1 + 64 + 12 + self.pieces.len() * 37 + inline);
        out.push(self.digest.algorithm().code());
        out.extend_from_slice(self.digest.as_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        encode_pieces(&self.pieces, &mut out);
        out
    }

    /// Decodes a recipe payload; `file` and `offset` name it in errors. Never panics.
    pub fn decode(file: &Path, offset: u64, bytes: &[u8]) -> Result<Recipe> {
        let bad = |reason: &str| Error::corrupted(file, offset, format!("recipe: {reason}"));
        let mut r = Reader { bytes, pos: 0 };
        let algorithm = Algorithm::from_code(r.u8().ok_or_else(|| bad("truncated"))?)
            .ok_or_else(|| bad("unknown digest algorithm"))?;
        let digest = Digest::from_parts(
            algorithm,
            r.take(algorithm.len())
                .ok_or_else(|| bad("truncated digest"))?,
        );
        let size = r.u64().ok_or_else(|| bad("truncated size"))?;
        let (pieces, total) = decode_pieces(&mut r, &bad)?;
        if r.pos != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        if total != size {
            return Err(bad("piece lengths do not add up to the blob size"));
        }
        Ok(Recipe {
            digest,
            size,
            pieces,
        })
    }

    /// Encodes the recipe as a record payload and its flags: compressed (segment format 3,
    /// [`crate::segment::FLAG_ZSTD`]: the encoding's length, u32 little-endian, then one zstd
    /// frame of it) when that saves an eighth or more, as it does for the tar headers a
    /// layer's recipe holds inline.
    pub fn encode_record(&self, level: i32) -> (u8, Vec<u8>) {
        let raw = self.encode();
        match compress(&raw, level) {
            Some(z) => (crate::segment::FLAG_ZSTD, z),
            None => (0, raw),
        }
    }

    /// Decodes a recipe record's payload written with `flags` (see [`Recipe::encode_record`]).
    /// Never panics.
    pub fn decode_record(file: &Path, offset: u64, flags: u8, payload: &[u8]) -> Result<Recipe> {
        if flags & crate::segment::FLAG_ZSTD == 0 {
            return Self::decode(file, offset, payload);
        }
        let bad = |reason: String| Error::corrupted(file, offset, format!("recipe: {reason}"));
        let len = payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| bad("truncated length".into()))? as usize;
        if len > crate::segment::RECORD_PAYLOAD_MAX {
            return Err(bad(format!("claims {len} bytes, more than a record holds")));
        }
        let raw =
            zstd::bulk::decompress(&payload[4..], len).map_err(|e| bad(format!("zstd: {e}")))?;
        if raw.len() != len {
            return Err(bad("length differs from its header".into()));
        }
        Self::decode(file, offset, &raw)
    }

    /// Offsets in the blob where each piece starts, plus the total size at the end.
    pub fn starts(&self) -> Vec<u64> {
        let mut starts = Vec::with_capacity(self.pieces.len() + 1);
        let mut at = 0;
        for p in &self.pieces {
            starts.push(at);
            at += p.len();
        }
        starts.push(at);
        starts
    }
}

/// A recipe record's encoding compressed (its length, u32 little-endian, then one zstd frame),
/// when that saves an eighth or more.
pub fn compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    if raw.len() < 256 {
        return None;
    }
    let z = zstd::bulk::compress(raw, level).ok()?;
    ((z.len() + 4) * 8 <= raw.len() * 7).then(|| {
        let mut out = Vec::with_capacity(4 + z.len());
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&z);
        out
    })
}

/// The pieces of a blob as delta replication sends them (docs/replication.md): the blob's size
/// (u64 little-endian), then the pieces as a recipe record holds them.
pub fn encode_wire(size: u64, pieces: &[RecipePiece]) -> Vec<u8> {
    let mut out = size.to_le_bytes().to_vec();
    encode_pieces(pieces, &mut out);
    out
}

/// Reads what [`encode_wire`] wrote: the size and the pieces, whose lengths must add up to
/// it. Never panics; the error says what is wrong.
pub fn decode_wire(bytes: &[u8]) -> std::result::Result<(u64, Vec<RecipePiece>), String> {
    let bad = |why: &str| Error::Internal(why.to_owned());
    let mut r = Reader::new(bytes);
    let size = r.u64().ok_or("truncated size")?;
    let (pieces, total) = decode_pieces(&mut r, &bad).map_err(|e| e.to_string())?;
    if r.pos != bytes.len() {
        return Err("trailing bytes".into());
    }
    if total != size {
        return Err(format!(
            "the pieces' lengths add up to {total} bytes, not the size {size}"
        ));
    }
    Ok((size, pieces))
}

/// Appends a piece count and the pieces (the encoding of a recipe's piece list, also used by
/// upload session logs).
pub(crate) fn encode_pieces(pieces: &[RecipePiece], out: &mut Vec<u8>) {
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for p in pieces {
        match p {
            RecipePiece::Chunk { id, len } => {
                out.push(TAG_CHUNK);
                out.extend_from_slice(&id.0);
                out.extend_from_slice(&len.to_le_bytes());
            }
            RecipePiece::Inline(bytes) => {
                assert!(bytes.len() <= INLINE_LEN_MAX, "inline piece too long");
                out.push(TAG_INLINE);
                out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// Reads what [`encode_pieces`] wrote: the pieces and the sum of their lengths. Never panics.
pub(crate) fn decode_pieces(
    r: &mut Reader<'_>,
    bad: &dyn Fn(&str) -> Error,
) -> Result<(Vec<RecipePiece>, u64)> {
    let count = r.u32().ok_or_else(|| bad("truncated count"))? as usize;
    // Each piece takes at least 3 bytes: bound the allocation by what is there.
    if count > r.bytes.len() / 3 {
        return Err(bad("piece count larger than the record"));
    }
    let mut pieces = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for _ in 0..count {
        let piece = match r.u8().ok_or_else(|| bad("truncated piece"))? {
            TAG_CHUNK => {
                let id: [u8; 32] = r
                    .take(32)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad("truncated chunk id"))?;
                let len = r.u32().ok_or_else(|| bad("truncated chunk length"))?;
                RecipePiece::Chunk {
                    id: ChunkId(id),
                    len,
                }
            }
            TAG_INLINE => {
                let len = usize::from(r.u16().ok_or_else(|| bad("truncated inline length"))?);
                RecipePiece::Inline(
                    r.take(len)
                        .ok_or_else(|| bad("truncated inline bytes"))?
                        .to_vec(),
                )
            }
            _ => return Err(bad("unknown piece tag")),
        };
        total = total
            .checked_add(piece.len())
            .ok_or_else(|| bad("size overflow"))?;
        pieces.push(piece);
    }
    Ok((pieces, total))
}

/// A cursor over a record payload.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }
    /// What is left after the cursor.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        s
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn piece() -> impl Strategy<Value = RecipePiece> {
        prop_oneof![
            (any::<[u8; 32]>(), 1u32..300_000).prop_map(|(id, len)| RecipePiece::Chunk {
                id: ChunkId(id),
                len
            }),
            proptest::collection::vec(any::<u8>(), 1..600).prop_map(RecipePiece::Inline),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(pieces in proptest::collection::vec(piece(), 0..40), sha512 in any::<bool>()) {
            let algo = if sha512 { Algorithm::Sha512 } else { Algorithm::Sha256 };
            let size = pieces.iter().map(RecipePiece::len).sum();
            let r = Recipe { digest: Digest::of(algo, b"x"), size, pieces };
            let enc = r.encode();
            prop_assert_eq!(Recipe::decode(Path::new("t"), 0, &enc).ok(), Some(r));
        }

        /// Damaged recipes (a valid encoding with bytes changed, cut short, or grown) never
        /// panic the decoder, and whatever it accepts is a consistent recipe: its size is the
        /// sum of its pieces and it encodes back to exactly the bytes it came from.
        #[test]
        fn damaged_recipes_decode_to_errors_or_consistent_recipes(
            pieces in proptest::collection::vec(piece(), 0..12),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            extra in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let size = pieces.iter().map(RecipePiece::len).sum();
            let r = Recipe { digest: Digest::of(Algorithm::Sha256, b"x"), size, pieces };
            let mut bytes = r.encode();
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len() + 1));
            }
            bytes.extend_from_slice(&extra);
            if let Ok(d) = Recipe::decode(Path::new("t"), 0, &bytes) {
                prop_assert_eq!(d.size, d.pieces.iter().map(RecipePiece::len).sum::<u64>());
                prop_assert_eq!(d.encode(), bytes);
            }
        }
    }

    /// A layer's recipe (tar headers inline) is stored compressed in a segment of format 3,
    /// reads back the same, and `inspect` counts it; a damaged compressed payload is an
    /// error, never a panic.
    #[test]
    fn recipes_with_tar_headers_are_stored_compressed() {
        let files: Vec<(String, Vec<u8>)> = (0..200)
            .map(|i| (format!("usr/lib/file-{i}.py"), vec![b'x'; 600 + i]))
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        let tar = crate::chunker::tests::test_tar(&refs);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::Store::open(dir.path(), crate::Options::default()).expect("open");
        let recipe = store.put_blob(&tar, None).expect("put").recipe;
        assert!(recipe
            .pieces
            .iter()
            .any(|p| matches!(p, RecipePiece::Inline(_))));
        let (flags, payload) = recipe.encode_record(3);
        assert_eq!(flags, crate::segment::FLAG_ZSTD);
        assert!(
            payload.len() * 2 < recipe.encode().len(),
            "{} bytes",
            payload.len()
        );
        let back = Recipe::decode_record(Path::new("x"), 0, flags, &payload).expect("decode");
        assert_eq!(&back, &*recipe);
        for cut in [0, 3, 10, payload.len() - 1] {
            assert!(Recipe::decode_record(Path::new("x"), 0, flags, &payload[..cut]).is_err());
        }
        let mut lying = payload.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Recipe::decode_record(Path::new("x"), 0, flags, &lying).is_err());
        drop(store);
        let store = crate::Store::open(dir.path(), crate::Options::default()).expect("reopen");
        assert_eq!(store.read_blob(&recipe.digest).expect("read"), tar);
        let i = crate::inspect::inspect(&store).expect("inspect");
        assert_eq!((i.recipes, i.recipes_compressed), (1, 1));
        let report = crate::verify::fsck(&store, &|_, _, _| {});
        assert!(report.is_clean(), "{:?}", report.findings);
    }
}
