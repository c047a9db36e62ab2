//! The registry's semver policy: predecessor, declared against required bump,
//! transitivity within a major line, idempotency, conflicts, auto-assignment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use evmesh_schema::{Held, Outcome, Registered, Schema, decide};
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

/// shop.v1.Root with the given body.
fn root(body: &str) -> Schema {
    common::schema(
        &[(
            "shop.proto",
            &format!("syntax = \"proto3\";\npackage shop.v1;\nmessage Root {{ {body} }}"),
        )],
        "shop.v1.Root",
    )
}

struct Registry(Vec<(Version, Schema)>);

impl Registry {
    fn with(versions: &[(&str, &str)]) -> Self {
        Self(
            versions
                .iter()
                .map(|(ver, body)| (v(ver), root(body)))
                .collect(),
        )
    }

    /// The decision with every version compiled; the same decision must come when
    /// the versions are held as stored, compiled only while compared.
    #[track_caller]
    fn decide(&self, body: &str, requested: Option<&str>) -> evmesh_schema::Decision {
        let existing: Vec<Registered<'_>> = self
            .0
            .iter()
            .map(|(version, schema)| Registered::compiled(version, schema))
            .collect();
        let decision = decide(&existing, &root(body), requested.map(v).as_ref());
        let stored: Vec<Registered<'_>> = self
            .0
            .iter()
            .map(|(version, schema)| Registered {
                version,
                schema: Held::Stored {
                    descriptor_set: schema.encoded(),
                    message_name: schema.message_name(),
                },
            })
            .collect();
        let again = decide(&stored, &root(body), requested.map(v).as_ref());
        assert_eq!(
            (decision.outcome, &decision.version, &decision.violations),
            (again.outcome, &again.version, &again.violations)
        );
        assert_eq!(decision.suggested, again.suggested);
        decision
    }
}

const A: &str = "string id = 1;";
const A_B: &str = "string id = 1; int32 qty = 2;";
const A_B_C: &str = "string id = 1; int32 qty = 2; string note = 3;";
const B_ONLY: &str = "int32 qty = 2;";

#[test]
fn auto_assignment() {
    let empty = Registry::with(&[]);
    let d = empty.decide(A, None);
    assert_eq!(
        (d.outcome, d.version.to_string()),
        (Outcome::Accepted, "1.0.0".into())
    );

    let one = Registry::with(&[("1.0.0", A)]);
    assert_eq!(one.decide(A, None).outcome, Outcome::Existing);
    assert_eq!(one.decide(A, None).version, v("1.0.0"));
    assert_eq!(one.decide(A_B, None).version, v("1.1.0"));
    assert_eq!(
        one.decide("/* why */ string id = 1;", None).version,
        v("1.0.1"),
        "a comment is a PATCH"
    );
    assert_eq!(one.decide(B_ONLY, None).version, v("2.0.0"));
}

#[test]
fn declared_versions_must_cover_the_changes() {
    let reg = Registry::with(&[("1.0.0", A)]);
    assert_eq!(reg.decide(A_B, Some("1.1.0")).outcome, Outcome::Accepted);
    assert_eq!(
        reg.decide(A_B, Some("2.0.0")).outcome,
        Outcome::Accepted,
        "a larger bump than needed is fine"
    );
    let d = reg.decide(A_B, Some("1.0.1"));
    assert_eq!(d.outcome, Outcome::Rejected);
    assert_eq!(d.violations.len(), 1);
    assert_eq!(d.violations[0].rule, "FIELD_ADDED");
    assert_eq!(d.violations[0].path, "shop.v1.Root.qty");
    assert_eq!(d.violations[0].against, v("1.0.0"));
    assert_eq!(d.suggested, v("1.1.0"));
    let d = reg.decide(B_ONLY, Some("1.1.0"));
    assert_eq!(d.outcome, Outcome::Rejected);
    assert_eq!(d.violations[0].rule, "FIELD_NO_DELETE");
    assert_eq!(d.suggested, v("2.0.0"));
    assert_eq!(reg.decide(B_ONLY, Some("2.0.0")).outcome, Outcome::Accepted);
}

#[test]
fn idempotent_and_conflicts() {
    let reg = Registry::with(&[("1.0.0", A), ("1.1.0", A_B)]);
    assert_eq!(reg.decide(A, Some("1.0.0")).outcome, Outcome::Existing);
    assert_eq!(reg.decide(A_B, Some("1.1.0")).outcome, Outcome::Existing);
    assert_eq!(reg.decide(A_B_C, Some("1.1.0")).outcome, Outcome::Conflict);
}

#[test]
fn transitive_within_a_major_line() {
    // 1.1.0 added qty; 1.2.0 deleting it again is MAJOR against 1.1.0 already, but
    // the sneaky path is 1.1.0 → 1.2.0 dropping qty and adding note: MAJOR.
    let reg = Registry::with(&[("1.0.0", A), ("1.1.0", A_B)]);
    let d = reg.decide("string id = 1; string note = 3;", Some("1.2.0"));
    assert_eq!(d.outcome, Outcome::Rejected);
    assert!(
        d.violations
            .iter()
            .any(|x| x.rule == "FIELD_NO_DELETE" && x.against == v("1.1.0"))
    );
    // Going in between: 1.0.5 must be compatible with 1.1.0 above it too.
    let d = reg.decide("string id = 1; bytes qty = 2;", Some("1.0.5"));
    assert_eq!(d.outcome, Outcome::Rejected);
    assert!(
        d.violations
            .iter()
            .any(|x| x.against == v("1.1.0") && x.rule == "FIELD_SAME_TYPE"),
        "{:?}",
        d.violations
    );
    // A MINOR step that is compatible with its predecessor but not with an older
    // version of the line: 1.0.0 had qty as int32; 1.1.0 removed it (wrongly, yet
    // registered); 1.2.0 re-adds it as string.
    let reg = Registry::with(&[
        ("1.0.0", A_B),
        ("1.1.0", "string id = 1; int32 qty = 2; int32 x = 4;"),
    ]);
    let d = reg.decide("string id = 1; string qty = 2; int32 x = 4;", Some("1.2.0"));
    assert_eq!(d.outcome, Outcome::Rejected);
    // A new major line starts fresh.
    let d = reg.decide(B_ONLY, Some("2.0.0"));
    assert_eq!(d.outcome, Outcome::Accepted);
}

#[test]
fn successor_must_stay_a_valid_step() {
    let reg = Registry::with(&[("1.0.0", A), ("1.2.0", A_B_C)]);
    // 1.1.0 in between adds qty: 1.1.0 → 1.2.0 adds note: MINOR, declared MINOR. Fine.
    assert_eq!(reg.decide(A_B, Some("1.1.0")).outcome, Outcome::Accepted);
    // 1.1.5 in between with qty and note is identical to 1.2.0: the step 1.1.5 → 1.2.0
    // declares MINOR and needs nothing. Fine. But 1.1.5 with only qty makes 1.1.5 →
    // 1.2.0 a MINOR change declared... MINOR. Fine too. 1.2.0 → 1.2.1 then.
    let reg = Registry::with(&[("1.0.0", A), ("1.0.2", A_B)]);
    let d = reg.decide(A, Some("1.0.1"));
    assert_eq!(
        d.outcome,
        Outcome::Rejected,
        "1.0.1 → 1.0.2 would add a field in a PATCH"
    );
    assert!(
        d.violations
            .iter()
            .any(|x| x.against == v("1.0.2") && x.rule == "FIELD_ADDED")
    );
}

#[test]
fn a_stored_version_that_no_longer_compiles_blocks_its_major_line() {
    let (one, two) = (v("1.0.0"), v("1.1.0"));
    let a = root(A);
    let existing = [
        Registered::compiled(&one, &a),
        Registered {
            version: &two,
            schema: Held::Stored {
                descriptor_set: b"\x0a\x03not a file set",
                message_name: "shop.v1.Root",
            },
        },
    ];
    let d = decide(&existing, &root(A_B_C), Some(&v("1.2.0")));
    assert_eq!(d.outcome, Outcome::Rejected);
    assert!(
        d.violations
            .iter()
            .any(|x| x.against == two && x.rule == "STORED_SCHEMA_UNREADABLE"),
        "{:?}",
        d.violations
    );
    // A new major line does not compare against it.
    let d = decide(&existing, &root(A_B_C), Some(&v("2.0.0")));
    assert_eq!(d.outcome, Outcome::Accepted);
}
