//! Manifest validation never panics on any bytes and content type; what it accepts is JSON
//! and is recognised as one of the media types a registry stores.
#![no_main]
use ballast_server::validate_manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], Option<&str>)| {
    let (bytes, content_type) = input;
    if let Ok(media_type) = validate_manifest(bytes, content_type) {
        assert!(serde_json::from_slice::<serde_json::Value>(bytes).is_ok());
        assert!(!media_type.is_empty());
    }
});
