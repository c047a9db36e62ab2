//! Event types and the NATS-style patterns that select them.

use std::fmt;

/// Longest event type accepted, in bytes.
pub const MAX_TYPE_LEN: usize = 255;

/// Why an event type or a pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long, more than {MAX_TYPE_LEN}")]
    TooLong(usize),
    #[error("has an empty token")]
    EmptyToken,
    #[error("token {0:?} may hold only lowercase letters, digits, '_' and '-'")]
    BadToken(String),
    #[error("'>' may only be the last token")]
    TailNotLast,
    #[error("version requirement {req:?} is not valid semver: {reason}")]
    BadVersionReq { req: String, reason: String },
}

fn check_token(token: &str) -> Result<(), SubjectError> {
    if token.is_empty() {
        return Err(SubjectError::EmptyToken);
    }
    if token
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(SubjectError::BadToken(token.to_owned()))
    }
}

fn check_len(s: &str) -> Result<(), SubjectError> {
    match s.len() {
        0 => Err(SubjectError::Empty),
        n if n > MAX_TYPE_LEN => Err(SubjectError::TooLong(n)),
        _ => Ok(()),
    }
}

/// Checks an event type: dotted tokens of lowercase letters, digits, `_` and `-`,
/// with no wildcards, e.g. `shop.order.placed`.
pub fn validate_event_type(ty: &str) -> Result<(), SubjectError> {
    check_len(ty)?;
    ty.split('.').try_for_each(check_token)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more tokens, the rest of the type.
    Tail,
}

/// A subscription pattern: `shop.order.*`, `shop.>`, optionally with a semver
/// requirement on the event's schema version: `shop.order.placed@^1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    tokens: Vec<Token>,
    version: Option<semver::VersionReq>,
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Self, SubjectError> {
        let (subject, version) = match source.split_once('@') {
            Some((subject, req)) => {
                let parsed =
                    semver::VersionReq::parse(req).map_err(|e| SubjectError::BadVersionReq {
                        req: req.to_owned(),
                        reason: e.to_string(),
                    })?;
                (subject, Some(parsed))
            }
            None => (source, None),
        };
        check_len(subject)?;
        let parts: Vec<&str> = subject.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            tokens.push(match *part {
                "*" => Token::One,
                ">" if i + 1 == parts.len() => Token::Tail,
                ">" => return Err(SubjectError::TailNotLast),
                literal => {
                    check_token(literal)?;
                    Token::Literal(literal.to_owned())
                }
            });
        }
        Ok(Self {
            source: source.to_owned(),
            tokens,
            version,
        })
    }

    /// Whether an event of this type and schema version is selected. With a version
    /// requirement, an event whose version is empty or not semver is not selected.
    pub fn matches(&self, event_type: &str, schema_version: &str) -> bool {
        self.matches_type(event_type)
            && match &self.version {
                None => true,
                Some(req) => semver::Version::parse(schema_version)
                    .map(|v| req.matches(&v))
                    .unwrap_or(false),
            }
    }

    fn matches_type(&self, event_type: &str) -> bool {
        let mut parts = event_type.split('.');
        for token in &self.tokens {
            match token {
                Token::Tail => return parts.next().is_some(),
                Token::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern carries a semver requirement (`…@^1`).
    pub fn has_version_requirement(&self) -> bool {
        self.version.is_some()
    }

    /// Whether every type `other` selects, this one selects too (version
    /// requirements aside): `shop.>` covers `shop.order.*`, `shop.*` does not cover
    /// `shop.>`.
    pub fn covers(&self, other: &Pattern) -> bool {
        covers(self.subject(), other.subject())
    }

    /// Whether some type is selected by both (version requirements aside).
    pub fn overlaps(&self, other: &Pattern) -> bool {
        overlap(self.subject(), other.subject())
    }

    /// The types part, without a version requirement: `shop.>` of `shop.>@^1`.
    pub fn subject(&self) -> &str {
        self.source
            .split_once('@')
            .map_or(self.source.as_str(), |(subject, _)| subject)
    }
}

/// Whether every subject `narrow` selects, `wide` selects too: dotted tokens where
/// `*` is one token and a last `>` one or more (types and NATS subjects alike).
pub(crate) fn covers(wide: &str, narrow: &str) -> bool {
    let mut n = narrow.split('.');
    for w in wide.split('.') {
        match (w, n.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(t)) if t != ">" => {}
            (w, Some(t)) if w == t => {}
            _ => return false,
        }
    }
    n.next().is_none()
}

/// Whether some subject is selected by both.
pub(crate) fn overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => {}
            _ => return false,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(pattern: &str, ty: &str, version: &str, expect: bool) {
        let p = Pattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        assert_eq!(
            p.matches(ty, version),
            expect,
            "{pattern} vs {ty}@{version}"
        );
    }

    #[test]
    fn pattern_table() {
        check("shop.order.placed", "shop.order.placed", "", true);
        check("shop.order.placed", "shop.order.placed.v2", "", false);
        check("shop.order.placed", "shop.order", "", false);
        check("shop.order.*", "shop.order.placed", "", true);
        check("shop.order.*", "shop.order", "", false);
        check("shop.order.*", "shop.order.placed.late", "", false);
        check("shop.*.placed", "shop.order.placed", "", true);
        check("shop.*.placed", "shop.order.paid", "", false);
        check("*", "ping", "", true);
        check("*", "shop.order", "", false);
        check("shop.>", "shop.order", "", true);
        check("shop.>", "shop.order.placed", "", true);
        check("shop.>", "shop", "", false);
        check(">", "anything.at.all", "", true);
        check("*.>", "a.b", "", true);
        check("*.>", "a", "", false);
        check("shop.order.placed@^1", "shop.order.placed", "1.4.0", true);
        check("shop.order.placed@^1", "shop.order.placed", "2.0.0", false);
        check("shop.order.placed@^1", "shop.order.placed", "", false);
        check("shop.>@>=1.2, <2", "shop.order.placed", "1.3.1", true);
        check("shop.>@>=1.2, <2", "shop.order.placed", "1.1.0", false);
    }

    #[track_caller]
    fn relation(a: &str, b: &str, covers: bool, overlaps: bool) {
        let (pa, pb) = (Pattern::parse(a).unwrap(), Pattern::parse(b).unwrap());
        assert_eq!(pa.covers(&pb), covers, "{a} covers {b}");
        assert_eq!(pa.overlaps(&pb), overlaps, "{a} overlaps {b}");
        assert_eq!(pb.overlaps(&pa), overlaps, "{b} overlaps {a}");
    }

    #[test]
    fn pattern_relations() {
        relation("shop.>", "shop.>", true, true);
        relation("shop.>", "shop.order.*", true, true);
        relation("shop.>", "shop.order.placed", true, true);
        relation("shop.>", "shop", false, false);
        relation("shop.>", "shop.*", true, true);
        relation("shop.*", "shop.>", false, true);
        relation("shop.*", "shop.order", true, true);
        relation("shop.*", "shop.order.placed", false, false);
        relation(">", "anything.at.all", true, true);
        relation(">", ">", true, true);
        relation("*", ">", false, true);
        relation("*.>", ">", false, true);
        relation("shop.*.placed", "shop.order.placed", true, true);
        relation("shop.*.placed", "shop.*.paid", false, false);
        relation("shop.*.placed", "shop.order.*", false, true);
        relation("shop.order.placed", "shop.order.placed", true, true);
        relation("shop.order.placed", "shop.order.paid", false, false);
        relation("shop.payment.card.>", "shop.>", false, true);
        relation("billing.>", "shop.>", false, false);
        relation("a.*.c", "a.b.>", false, true);
    }

    /// Against every type of a small alphabet: `covers` and `overlaps` say exactly
    /// what matching each type says.
    #[test]
    fn pattern_relations_agree_with_matching() {
        let tokens = ["a", "b", "*", ">"];
        let mut patterns = Vec::new();
        for n in 1..=3 {
            let mut current = vec![String::new()];
            for i in 0..n {
                let mut next = Vec::new();
                for prefix in &current {
                    for t in tokens {
                        if t == ">" && i + 1 != n {
                            continue;
                        }
                        let sep = if prefix.is_empty() { "" } else { "." };
                        next.push(format!("{prefix}{sep}{t}"));
                    }
                }
                current = next;
            }
            patterns.extend(current);
        }
        let mut types = Vec::new();
        for n in 1..=4 {
            let mut current = vec![String::new()];
            for _ in 0..n {
                current = current
                    .iter()
                    .flat_map(|p| {
                        ["a", "b", "c"].map(|t| {
                            if p.is_empty() {
                                t.to_owned()
                            } else {
                                format!("{p}.{t}")
                            }
                        })
                    })
                    .collect();
            }
            types.extend(current);
        }
        for a in &patterns {
            let pa = Pattern::parse(a).unwrap();
            for b in &patterns {
                let pb = Pattern::parse(b).unwrap();
                let covered = types
                    .iter()
                    .all(|t| !pb.matches(t, "") || pa.matches(t, ""));
                let shared = types.iter().any(|t| pa.matches(t, "") && pb.matches(t, ""));
                assert_eq!(pa.covers(&pb), covered, "{a} covers {b}");
                assert_eq!(pa.overlaps(&pb), shared, "{a} overlaps {b}");
            }
        }
    }

    #[test]
    fn bad_patterns_and_types() {
        for (pattern, expect) in [
            ("", SubjectError::Empty),
            ("shop..order", SubjectError::EmptyToken),
            ("shop.>.order", SubjectError::TailNotLast),
            ("Shop.order", SubjectError::BadToken("Shop".into())),
            ("shop.or*der", SubjectError::BadToken("or*der".into())),
        ] {
            assert_eq!(Pattern::parse(pattern), Err(expect), "{pattern}");
        }
        assert!(matches!(
            Pattern::parse("shop.order@not-a-req"),
            Err(SubjectError::BadVersionReq { .. })
        ));
        assert_eq!(validate_event_type("shop.order.placed"), Ok(()));
        assert_eq!(validate_event_type("shop_2.order-x.placed"), Ok(()));
        assert_eq!(
            validate_event_type("shop.*"),
            Err(SubjectError::BadToken("*".into()))
        );
        assert_eq!(validate_event_type("shop."), Err(SubjectError::EmptyToken));
        assert_eq!(
            validate_event_type(&"a".repeat(256)),
            Err(SubjectError::TooLong(256))
        );
    }
}
