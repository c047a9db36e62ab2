//! Where each event lives in JetStream: one subject per event,
//! `evmesh.e.<correlation>.<part>.<type tokens…>.<id>`, so that the id can be made
//! unique for the whole retention (the subject's last sequence must be 0) and a
//! chain is one subject filter. Patterns map to filter subjects exactly.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use evmesh_proto::v1::Event;

use crate::Pattern;
use crate::subject::{covers, overlap};

/// The events stream's subjects.
pub(crate) const EVENTS_PREFIX: &str = "evmesh.e";
/// Partitions an aggregate id hashes into (`_` without one): unused by dispatch
/// today, recorded in the stream's metadata so that partitioned consumers can come
/// later without rewriting subjects.
pub(crate) const PARTITIONS: u64 = 64;

/// Longest string kept verbatim in a token.
const VERBATIM_MAX: usize = 128;

/// One subject token for any string: verbatim when it is 1 to 128 of
/// `[A-Za-z0-9_-]`, else `~` and the unpadded base64url of its bytes (reversible,
/// and free of `.`, `*`, `>` and spaces).
pub(crate) fn token(s: &str) -> Cow<'_, str> {
    let verbatim = !s.is_empty()
        && s.len() <= VERBATIM_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if verbatim {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("~{}", URL_SAFE_NO_PAD.encode(s.as_bytes())))
    }
}

/// The string a [`token`] stands for.
#[cfg(test)]
pub(crate) fn untoken(t: &str) -> Option<String> {
    match t.strip_prefix('~') {
        Some(encoded) => String::from_utf8(URL_SAFE_NO_PAD.decode(encoded).ok()?).ok(),
        None => Some(t.to_owned()),
    }
}

/// FNV-1a: a hash that stays the same across builds and platforms, as a partition
/// stored in subjects must.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn partition(aggregate_id: &str) -> Cow<'static, str> {
    if aggregate_id.is_empty() {
        Cow::Borrowed("_")
    } else {
        Cow::Owned((fnv1a(aggregate_id.as_bytes()) % PARTITIONS).to_string())
    }
}

/// The subject of one event (its type is a valid event type, its id and
/// correlation id filled in).
pub(crate) fn event_subject(event: &Event) -> String {
    // `join`, not `format!`: one allocation of the exact size, on every publish.
    [
        EVENTS_PREFIX,
        &token(&event.correlation_id),
        &partition(&event.aggregate_id),
        &event.r#type,
        &token(&event.id),
    ]
    .join(".")
}

/// Every event of one correlation id.
pub(crate) fn chain_filter(correlation_id: &str) -> String {
    format!("{EVENTS_PREFIX}.{}.>", token(correlation_id))
}

/// The filter subject of a pattern's types: `shop.order.*` selects
/// `evmesh.e.*.*.shop.order.*.*` (the last `*` is the id); a trailing `>` becomes
/// `*.>`, so that `shop.>` does not select the one-token type `shop`. A version
/// requirement cannot be filtered by the server; the node settles what it does not
/// select.
pub(crate) fn type_filter(pattern: &Pattern) -> String {
    let types = pattern.subject();
    match types.strip_suffix('>') {
        Some(head) => format!("{EVENTS_PREFIX}.*.*.{head}*.>"),
        None => format!("{EVENTS_PREFIX}.*.*.{types}.*"),
    }
}

/// The filter subjects of a group's patterns: each pattern's, without those another
/// one covers, in the patterns' order. The server refuses filters that overlap;
/// when two overlap and neither covers the other (`shop.*.placed` and
/// `shop.order.*`), the group filters every event, and the node settles what its
/// patterns do not select, as it does for version requirements.
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the filters of group consumers, which come next")
)]
pub(crate) fn filter_subjects(patterns: &[Pattern]) -> Vec<String> {
    let filters: Vec<String> = patterns.iter().map(type_filter).collect();
    let mut kept: Vec<String> = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let covered = filters
            .iter()
            .enumerate()
            .any(|(j, other)| j != i && covers(other, f) && (!covers(f, other) || j < i));
        if !covered && !kept.contains(f) {
            kept.push(f.clone());
        }
    }
    let crossed = kept
        .iter()
        .enumerate()
        .any(|(i, a)| kept[i + 1..].iter().any(|b| overlap(a, b)));
    if crossed {
        return vec![format!("{EVENTS_PREFIX}.>")];
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn tokens_are_verbatim_or_reversibly_encoded() {
        for s in ["o-1", "A_b-9", &"x".repeat(128)] {
            assert_eq!(token(s), s);
        }
        for s in [
            "",
            "a.b",
            "a b",
            "*",
            ">",
            "ünï",
            "~",
            &"x".repeat(129),
            "a/b+c==",
        ] {
            let t = token(s);
            assert!(t.starts_with('~'), "{s:?} → {t}");
            assert!(
                t[1..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{t}"
            );
            assert_eq!(untoken(&t).as_deref(), Some(s));
        }
    }

    #[test]
    fn an_event_subject_names_its_chain_partition_type_and_id() {
        let event = Event {
            id: "e.1".into(),
            r#type: "shop.order.placed".into(),
            correlation_id: "c-1".into(),
            aggregate_id: "order-7".into(),
            ..Default::default()
        };
        let subject = event_subject(&event);
        let part = fnv1a(b"order-7") % PARTITIONS;
        assert_eq!(
            subject,
            format!("evmesh.e.c-1.{part}.shop.order.placed.~ZS4x")
        );
        assert!(covers(&chain_filter("c-1"), &subject));
        assert!(!covers(&chain_filter("c-2"), &subject));
        let loose = Event {
            aggregate_id: String::new(),
            ..event
        };
        assert_eq!(
            event_subject(&loose),
            "evmesh.e.c-1._.shop.order.placed.~ZS4x"
        );
    }

    #[test]
    fn patterns_select_the_same_subjects_as_types() {
        let subject = |ty: &str| format!("evmesh.e.c.7.{ty}.id");
        for (p, ty, selected) in [
            ("shop.order.placed", "shop.order.placed", true),
            ("shop.order.placed", "shop.order.placed.v2", false),
            ("shop.*.placed", "shop.order.placed", true),
            ("shop.>", "shop.order", true),
            ("shop.>", "shop.order.placed", true),
            ("shop.>", "shop", false),
            ("shop.*", "shop", false),
            ("shop.*", "shop.order.placed", false),
            ("*.order.>", "billing.order.paid", true),
        ] {
            let pattern = pattern(p);
            assert_eq!(pattern.matches(ty, ""), selected, "{p} {ty}");
            assert_eq!(
                covers(&type_filter(&pattern), &subject(ty)),
                selected,
                "{p} {ty}: {}",
                type_filter(&pattern)
            );
        }
    }

    #[test]
    fn covered_patterns_are_dropped() {
        let filters =
            |ps: &[&str]| filter_subjects(&ps.iter().map(|p| pattern(p)).collect::<Vec<_>>());
        assert_eq!(
            filters(&["shop.order.placed", "shop.>", "billing.*"]),
            ["evmesh.e.*.*.shop.*.>", "evmesh.e.*.*.billing.*.*"]
        );
        // The same types with two version requirements: one filter.
        assert_eq!(
            filters(&["shop.order@^1", "shop.order@^2"]),
            ["evmesh.e.*.*.shop.order.*"]
        );
        // Overlapping, neither covering the other: every event, settled by the node.
        assert_eq!(filters(&["shop.*.placed", "shop.order.*"]), ["evmesh.e.>"]);
        assert_eq!(
            filters(&["shop.*.placed", "shop.order.paid"]),
            [
                "evmesh.e.*.*.shop.*.placed.*",
                "evmesh.e.*.*.shop.order.paid.*"
            ]
        );
    }
}
