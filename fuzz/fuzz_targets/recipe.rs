//! The recipe decoder never panics; what it accepts re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = ballast_engine::recipe::Recipe::decode(std::path::Path::new("fuzz"), 0, data) {
        assert_eq!(r.encode(), data);
        assert_eq!(r.pieces.iter().map(|p| p.len()).sum::<u64>(), r.size);
    }
});
