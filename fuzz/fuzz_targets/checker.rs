//! Any two descriptor sets (the first's length in two bytes, big-endian, the
//! first, then the second) as an old
//! and a new schema: the compatibility checker never panics, finds nothing to
//! change between a schema and itself, and says the same twice.
#![no_main]

use evmesh_schema::{Bump, Schema, compare};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn first_message(bytes: &[u8]) -> Option<String> {
    let set = prost_types::FileDescriptorSet::decode(bytes).ok()?;
    let file = set.file.last()?;
    let message = file.message_type.first()?;
    Some(match file.package() {
        "" => message.name().to_owned(),
        package => format!("{package}.{}", message.name()),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (old, new) = rest.split_at(split);
    let load = |bytes: &[u8]| {
        let name = first_message(bytes)?;
        Schema::new(bytes, &name).ok()
    };
    let (Some(old), Some(new)) = (load(old), load(new)) else {
        return;
    };
    let same = compare(&old, &old);
    assert_eq!(
        same.needs,
        Bump::None,
        "a schema against itself: {:?}",
        same.changes
    );
    let verdict = compare(&old, &new);
    let again = compare(&old, &new);
    assert_eq!(verdict.needs, again.needs);
    assert_eq!(verdict.changes.len(), again.changes.len());
});
