//! Name, tag, digest and route parsing never panics; accepted names hold no path tricks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if ballast_engine::names::validate_repo(s).is_ok() {
        assert!(!s.contains("..") && !s.starts_with('/') && !s.contains("//"));
    }
    let _ = ballast_engine::names::validate_tag(s);
    let _ = s.parse::<ballast_engine::Digest>();
    let _ = ballast_server::routes::route(s);
    let _ = ballast_engine::uploads::validate_id(s);
});
