//! The segment record decoder never panics, and accepts only what its CRC vouches for.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.seg");
    if let Ok((header, payload)) = ballast_engine::segment::decode_record(path, 0, data) {
        assert_eq!(payload.len(), header.len as usize);
        assert!(header.check(data, payload));
    }
});
