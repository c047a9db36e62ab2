//! The semver policy of the registry: which version a new schema may take.
//!
//! Registering version V: its predecessor P is the greatest registered version below
//! V. The step from P to V must be at least what the checker requires; a MINOR or
//! PATCH step must also be compatible (no MAJOR change) with every version of its own
//! major line; and V's successor, when V goes in between, must still be a large
//! enough step from V. Identical content at an existing version is accepted again;
//! other content there is a conflict. With no version given, the registry takes the
//! smallest valid version above the latest (1.0.0 first).

use std::borrow::Cow;

use semver::Version;

use crate::{Bump, Schema, SchemaError, Verdict, compare};

/// A registered version.
#[derive(Debug, Clone, Copy)]
pub struct Registered<'a> {
    pub version: &'a Version,
    pub schema: Held<'a>,
}

impl<'a> Registered<'a> {
    pub fn compiled(version: &'a Version, schema: &'a Schema) -> Self {
        Self {
            version,
            schema: Held::Compiled(schema),
        }
    }
}

/// A registered version's schema: compiled, or as stored, which the policy compiles
/// only while it compares it, so that deciding on a type with many large versions
/// holds one of them at a time.
#[derive(Debug, Clone, Copy)]
pub enum Held<'a> {
    Compiled(&'a Schema),
    Stored {
        descriptor_set: &'a [u8],
        message_name: &'a str,
    },
}

impl<'a> Held<'a> {
    /// Whether this is `candidate`'s content, without compiling it.
    fn is(&self, candidate: &Schema) -> bool {
        match *self {
            Held::Compiled(schema) => schema == candidate,
            Held::Stored {
                descriptor_set,
                message_name,
            } => {
                candidate.message_name() == message_name.strip_prefix('.').unwrap_or(message_name)
                    && candidate.encoded() == descriptor_set
            }
        }
    }

    fn compiled(&self) -> Result<Cow<'a, Schema>, SchemaError> {
        match *self {
            Held::Compiled(schema) => Ok(Cow::Borrowed(schema)),
            Held::Stored {
                descriptor_set,
                message_name,
            } => Schema::stored(descriptor_set, message_name).map(Cow::Owned),
        }
    }
}

/// The changes from the older of `registered` and `candidate` to the newer. A stored
/// version that no longer compiles is one MAJOR change: nothing can be shown
/// compatible with it.
fn step(registered: &Registered<'_>, candidate: &Schema, candidate_is_newer: bool) -> Verdict {
    match registered.schema.compiled() {
        Ok(schema) if candidate_is_newer => compare(&schema, candidate),
        Ok(schema) => compare(candidate, &schema),
        Err(e) => Verdict {
            needs: Bump::Major,
            changes: vec![crate::Change {
                rule: "STORED_SCHEMA_UNREADABLE",
                path: String::new(),
                message: format!(
                    "registered version {} no longer compiles: {e}",
                    registered.version
                ),
                needs: Bump::Major,
            }],
        },
    }
}

/// A change that the version cannot carry, against one registered version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: String,
    pub path: String,
    pub message: String,
    pub needs: Bump,
    /// The registered version the change was found against.
    pub against: Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Can be registered.
    Accepted,
    /// Identical content is already registered at `version`.
    Existing,
    /// `version` is registered with other content.
    Conflict,
    /// The version is too small for the changes; see `violations`.
    Rejected,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub outcome: Outcome,
    /// The version asked for, or the one assigned.
    pub version: Version,
    pub predecessor: Option<Version>,
    /// Changes against the predecessor.
    pub verdict: Verdict,
    pub violations: Vec<Violation>,
    /// The smallest valid version above the latest: what registering with no
    /// version would assign.
    pub suggested: Version,
}

/// The bump that a step from `from` to `to` declares.
/// Longest schema version accepted, in bytes.
pub const MAX_VERSION_LEN: usize = 64;
/// Largest major, minor or patch number accepted: room to bump any of them.
pub const MAX_VERSION_PART: u64 = u32::MAX as u64;

/// Parses a schema version from the outside: semver, at most [`MAX_VERSION_LEN`]
/// bytes, each number at most [`MAX_VERSION_PART`]. The error quotes a short prefix.
pub fn parse_version(s: &str) -> Result<Version, String> {
    if s.len() > MAX_VERSION_LEN {
        return Err(format!(
            "{} is {} bytes long, at most {MAX_VERSION_LEN} allowed",
            crate::quoted(s),
            s.len()
        ));
    }
    let v = Version::parse(s).map_err(|e| format!("{} is not semver: {e}", crate::quoted(s)))?;
    if v.major.max(v.minor).max(v.patch) > MAX_VERSION_PART {
        return Err(format!(
            "{} has a number over {MAX_VERSION_PART}",
            crate::quoted(s)
        ));
    }
    Ok(v)
}

pub fn declared_bump(from: &Version, to: &Version) -> Bump {
    if from.major != to.major {
        Bump::Major
    } else if from.minor != to.minor {
        Bump::Minor
    } else if from != to {
        Bump::Patch
    } else {
        Bump::None
    }
}

fn bumped(v: &Version, bump: Bump) -> Version {
    match bump {
        Bump::Major => Version::new(v.major.saturating_add(1), 0, 0),
        Bump::Minor => Version::new(v.major, v.minor.saturating_add(1), 0),
        Bump::Patch | Bump::None => Version::new(v.major, v.minor, v.patch.saturating_add(1)),
    }
}

fn empty() -> Verdict {
    Verdict {
        needs: Bump::None,
        changes: Vec::new(),
    }
}

fn violations(verdict: &Verdict, allowed: Bump, against: &Version) -> Vec<Violation> {
    verdict
        .changes
        .iter()
        .filter(|c| !Verdict::allows(c, allowed))
        .map(|c| Violation {
            rule: c.rule.to_owned(),
            path: c.path.clone(),
            message: c.message.clone(),
            needs: c.needs,
            against: against.clone(),
        })
        .collect()
}

/// Breaking changes between `candidate` and the other versions of `major`.
fn major_line(
    existing: &[Registered<'_>],
    candidate: &Schema,
    version: &Version,
    skip: Option<&Version>,
) -> Vec<Violation> {
    let mut found = Vec::new();
    for r in existing
        .iter()
        .filter(|r| r.version.major == version.major && Some(r.version) != skip)
    {
        let verdict = step(r, candidate, r.version < version);
        found.extend(violations(&verdict, Bump::Minor, r.version));
    }
    found
}

fn suggest(
    existing: &[Registered<'_>],
    candidate: &Schema,
) -> (Version, Option<Version>, Verdict, bool) {
    let Some(latest) = existing.last() else {
        return (Version::new(1, 0, 0), None, empty(), false);
    };
    if latest.schema.is(candidate) {
        return (
            latest.version.clone(),
            Some(latest.version.clone()),
            empty(),
            true,
        );
    }
    let verdict = step(latest, candidate, true);
    let mut needs = verdict.needs;
    if needs < Bump::Major
        && !major_line(existing, candidate, latest.version, Some(latest.version)).is_empty()
    {
        needs = Bump::Major;
    }
    (
        bumped(latest.version, needs),
        Some(latest.version.clone()),
        verdict,
        false,
    )
}

/// Decides whether `candidate` may be registered at `requested` (or which version it
/// gets when none is requested), given the registered versions.
pub fn decide(
    existing: &[Registered<'_>],
    candidate: &Schema,
    requested: Option<&Version>,
) -> Decision {
    let mut existing = existing.to_vec();
    existing.sort_by(|a, b| a.version.cmp(b.version));
    let (suggested, latest, latest_verdict, same_as_latest) = suggest(&existing, candidate);
    let Some(version) = requested else {
        return Decision {
            outcome: if same_as_latest {
                Outcome::Existing
            } else {
                Outcome::Accepted
            },
            version: suggested.clone(),
            predecessor: latest,
            verdict: latest_verdict,
            violations: Vec::new(),
            suggested,
        };
    };
    if let Some(same) = existing.iter().find(|r| r.version == version) {
        let outcome = if same.schema.is(candidate) {
            Outcome::Existing
        } else {
            Outcome::Conflict
        };
        return Decision {
            outcome,
            version: version.clone(),
            predecessor: None,
            verdict: step(same, candidate, true),
            violations: Vec::new(),
            suggested,
        };
    }
    let predecessor = existing.iter().rev().find(|r| r.version < version).copied();
    let successor = existing.iter().find(|r| r.version > version).copied();
    let mut found = Vec::new();
    let verdict = match predecessor {
        Some(p) => {
            let verdict = step(&p, candidate, true);
            let declared = declared_bump(p.version, version);
            found.extend(violations(&verdict, declared, p.version));
            if declared < Bump::Major {
                found.extend(major_line(&existing, candidate, version, Some(p.version)));
            }
            verdict
        }
        None => empty(),
    };
    if let Some(s) = successor {
        let to_successor = step(&s, candidate, false);
        found.extend(violations(
            &to_successor,
            declared_bump(version, s.version),
            s.version,
        ));
    }
    let mut seen = std::collections::HashSet::new();
    found.retain(|v| seen.insert((v.rule.clone(), v.path.clone(), v.against.clone())));
    Decision {
        outcome: if found.is_empty() {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        },
        version: version.clone(),
        predecessor: predecessor.map(|p| p.version.clone()),
        verdict,
        violations: found,
        suggested,
    }
}
