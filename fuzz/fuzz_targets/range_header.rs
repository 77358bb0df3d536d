//! `Range` and `Content-Range` parsing never panics, and every range it returns is inside
//! the representation.
#![no_main]
use ballast_server::body::{parse_content_range, parse_ranges, Ranges};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, size) = input;
    if let Ranges::Some(list) = parse_ranges(header, size) {
        for (a, b) in list {
            assert!(a < b && b <= size);
        }
    }
    if let Some((a, b)) = parse_content_range(header) {
        assert!(a <= b);
    }
});
