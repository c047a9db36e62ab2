//! Any text as a subscription pattern (with its semver requirement) and as an
//! event type and version: parsing and matching never panic, and what a pattern
//! selects agrees with what it covers and overlaps.
#![no_main]

use evmesh_store::{Pattern, validate_event_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let (pattern, ty, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let _ = evmesh_schema::parse_version(version);
    let _ = semver::VersionReq::parse(version);
    let typed = validate_event_type(ty).is_ok();
    let Ok(p) = Pattern::parse(pattern) else {
        return;
    };
    let matched = p.matches(ty, version);
    assert!(p.covers(&p), "{pattern} covers itself");
    assert!(p.overlaps(&p), "{pattern} overlaps itself");
    // Covering and overlapping are about types: the pattern without its version
    // requirement.
    let types = Pattern::parse(p.subject()).expect("the types part of a pattern parses");
    if let Ok(other) = Pattern::parse(ty) {
        // A valid type is also a pattern that selects exactly it.
        if typed {
            let selected = types.matches(ty, "");
            assert_eq!(p.covers(&other), selected, "{pattern} covers {ty}");
            assert_eq!(p.overlaps(&other), selected, "{pattern} overlaps {ty}");
            if matched {
                assert!(selected, "a version requirement only narrows");
            }
        }
        if p.covers(&other) {
            assert!(
                p.overlaps(&other),
                "{pattern} covers {ty} but does not overlap it"
            );
        }
    }
});
