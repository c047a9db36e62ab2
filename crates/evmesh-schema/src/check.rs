//! The compatibility checker: every difference between two versions of a schema
//! over the types reachable from the payload message, each with what it needs.

use std::collections::{HashSet, VecDeque};
use std::fmt;

use prost_reflect::{Cardinality, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};
use prost_types::descriptor_proto::ReservedRange;
use prost_types::enum_descriptor_proto::EnumReservedRange;
use prost_types::{DescriptorProto, EnumDescriptorProto};

use crate::Schema;

/// How big a version step a change needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bump {
    None,
    Patch,
    Minor,
    Major,
}

impl fmt::Display for Bump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bump::None => "NONE",
            Bump::Patch => "PATCH",
            Bump::Minor => "MINOR",
            Bump::Major => "MAJOR",
        })
    }
}

/// One difference between two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Stable rule name, e.g. `FIELD_SAME_TYPE`.
    pub rule: &'static str,
    /// Where: `shop.v1.OrderPlaced.total_cents`.
    pub path: String,
    pub message: String,
    pub needs: Bump,
}

/// Every change, and the bump the whole step needs (the largest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub needs: Bump,
    pub changes: Vec<Change>,
}

impl Verdict {
    /// Whether a version step that declares `declared` may carry every change.
    pub fn allowed_by(&self, declared: Bump) -> bool {
        self.changes.iter().all(|c| Self::allows(c, declared))
    }

    /// Whether a version step that declares `declared` may carry `change`.
    pub(crate) fn allows(change: &Change, declared: Bump) -> bool {
        change.needs <= declared
    }
}

/// Compares `old` to `new` over every type reachable from the payload message.
pub fn compare(old: &Schema, new: &Schema) -> Verdict {
    let mut checker = Checker::default();
    let (o, n) = (old.message(), new.message());
    if o.full_name() != n.full_name() {
        checker.add(
            Bump::Major,
            "MESSAGE_SAME_NAME",
            o.full_name(),
            format!(
                "payload message renamed or moved from {} to {}",
                o.full_name(),
                n.full_name()
            ),
        );
    }
    checker.todo.push_back(Pair::Messages(o.clone(), n.clone()));
    // A queue, not recursion: a chain of thousands of nested types must not grow the
    // stack.
    while let Some(pair) = checker.todo.pop_front() {
        match pair {
            Pair::Messages(o, n) => checker.message(&o, &n),
            Pair::Enums(o, n) => checker.enumeration(&o, &n),
        }
    }
    for added in new
        .pool()
        .all_messages()
        .filter(|m| old.pool().get_message_by_name(m.full_name()).is_none())
    {
        if !added.is_map_entry() {
            checker.add(
                Bump::Minor,
                "MESSAGE_ADDED",
                added.full_name(),
                format!("message {} added", added.full_name()),
            );
        }
    }
    for added in new
        .pool()
        .all_enums()
        .filter(|e| old.pool().get_enum_by_name(e.full_name()).is_none())
    {
        checker.add(
            Bump::Minor,
            "ENUM_ADDED",
            added.full_name(),
            format!("enum {} added", added.full_name()),
        );
    }
    if checker.changes.is_empty() && old.encoded() != new.encoded() {
        checker.add(
            Bump::Patch,
            "DESCRIPTOR_CHANGED",
            o.full_name(),
            "comments, options, declaration order or file layout changed; nothing on the wire or in JSON".into(),
        );
    }
    let needs = checker
        .changes
        .iter()
        .map(|c| c.needs)
        .max()
        .unwrap_or(Bump::None);
    Verdict {
        needs,
        changes: checker.changes,
    }
}

/// Two versions of one type, still to compare.
enum Pair {
    Messages(MessageDescriptor, MessageDescriptor),
    Enums(EnumDescriptor, EnumDescriptor),
}

#[derive(Default)]
struct Checker {
    changes: Vec<Change>,
    seen: HashSet<(String, String)>,
    todo: VecDeque<Pair>,
}

pub(crate) fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn cardinality(f: &FieldDescriptor) -> &'static str {
    if f.is_map() {
        "map"
    } else if f.is_list() {
        "repeated"
    } else if f.cardinality() == Cardinality::Required {
        "required"
    } else {
        "singular"
    }
}

fn real_oneof(f: &FieldDescriptor) -> Option<String> {
    f.containing_oneof()
        .filter(|o| !o.is_synthetic())
        .map(|o| o.name().to_owned())
}

/// Reserved numbers and names of one type. Membership and coverage are binary
/// searches over the merged ranges, so a type with many ranges costs n log n to
/// compare, not n².
struct Reserved<'a> {
    /// Half-open, as declared.
    ranges: Vec<(i64, i64)>,
    /// Sorted, disjoint and not adjacent.
    merged: Vec<(i64, i64)>,
    names: &'a [String],
    name_set: HashSet<&'a str>,
}

impl<'a> Reserved<'a> {
    fn new(ranges: Vec<(i64, i64)>, names: &'a [String]) -> Self {
        let mut sorted: Vec<(i64, i64)> = ranges.iter().copied().filter(|(s, e)| s < e).collect();
        sorted.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(sorted.len());
        for (start, end) in sorted {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Self {
            ranges,
            merged,
            names,
            name_set: names.iter().map(String::as_str).collect(),
        }
    }

    fn of_message(m: &'a DescriptorProto) -> Self {
        let ranges = m
            .reserved_range
            .iter()
            .map(|r: &ReservedRange| (i64::from(r.start()), i64::from(r.end())))
            .collect();
        Self::new(ranges, &m.reserved_name)
    }

    fn of_enum(e: &'a EnumDescriptorProto) -> Self {
        // Enum reserved ranges are inclusive; make them half-open like messages'.
        let ranges = e
            .reserved_range
            .iter()
            .map(|r: &EnumReservedRange| (i64::from(r.start()), i64::from(r.end()) + 1))
            .collect();
        Self::new(ranges, &e.reserved_name)
    }

    fn covers(&self, start: i64, end: i64) -> bool {
        let i = self.merged.partition_point(|&(s, _)| s <= start);
        i > 0 && self.merged[i - 1].1 >= end
    }

    fn holds(&self, number: i64, name: &str) -> bool {
        self.covers(number, number + 1) || self.name_set.contains(name)
    }

    /// What this version reserves that `new` no longer does, said in a sentence.
    fn lost_in(&self, new: &Reserved<'_>) -> Option<String> {
        let numbers: Vec<String> = self
            .ranges
            .iter()
            .filter(|&&(start, end)| start < end && !new.covers(start, end))
            .map(|&(start, end)| {
                if end == start + 1 {
                    start.to_string()
                } else {
                    format!("{start} to {}", end - 1)
                }
            })
            .collect();
        let names: Vec<&str> = self
            .names
            .iter()
            .map(String::as_str)
            .filter(|name| !new.name_set.contains(name))
            .collect();
        if numbers.is_empty() && names.is_empty() {
            return None;
        }
        Some(format!(
            "reserved numbers [{}] and names [{}] are no longer reserved",
            few(&numbers),
            few(&names)
        ))
    }
}

/// At most eight items, then how many more: a message stays short whatever the
/// schema holds.
fn few<T: AsRef<str>>(items: &[T]) -> String {
    const SHOWN: usize = 8;
    let mut out: Vec<&str> = items.iter().take(SHOWN).map(AsRef::as_ref).collect();
    let more;
    if items.len() > SHOWN {
        more = format!("and {} more", items.len() - SHOWN);
        out.push(&more);
    }
    out.join(", ")
}

impl Checker {
    fn add(&mut self, needs: Bump, rule: &'static str, path: &str, message: String) {
        self.changes.push(Change {
            rule,
            path: path.to_owned(),
            message,
            needs,
        });
    }

    fn message(&mut self, o: &MessageDescriptor, n: &MessageDescriptor) {
        if !self
            .seen
            .insert((o.full_name().to_owned(), n.full_name().to_owned()))
        {
            return;
        }
        let base = o.full_name();
        if o.descriptor_proto()
            .options
            .as_ref()
            .and_then(|x| x.message_set_wire_format)
            != n.descriptor_proto()
                .options
                .as_ref()
                .and_then(|x| x.message_set_wire_format)
        {
            self.add(
                Bump::Major,
                "MESSAGE_SAME_MESSAGE_SET_WIRE_FORMAT",
                base,
                "message_set_wire_format changed".into(),
            );
        }
        for fo in o.fields() {
            let path = format!("{base}.{}", fo.name());
            match n.get_field(fo.number()) {
                None => self.add(
                    Bump::Major,
                    "FIELD_NO_DELETE",
                    &path,
                    format!(
                        "field {} = {} was deleted; old data and JSON still carry it",
                        fo.name(),
                        fo.number()
                    ),
                ),
                Some(fn_) => self.field(&path, &fo, &fn_),
            }
        }
        let reserved = Reserved::of_message(o.descriptor_proto());
        for fn_ in n.fields().filter(|f| o.get_field(f.number()).is_none()) {
            let path = format!("{base}.{}", fn_.name());
            if reserved.holds(i64::from(fn_.number()), fn_.name()) {
                self.add(
                    Bump::Major,
                    "FIELD_NO_REUSE_RESERVED",
                    &path,
                    format!(
                        "field {} = {} reuses a reserved name or number",
                        fn_.name(),
                        fn_.number()
                    ),
                );
            } else if let Some(old) = o.get_field_by_name(fn_.name()) {
                self.add(
                    Bump::Major,
                    "FIELD_SAME_NUMBER",
                    &path,
                    format!(
                        "field {} moved from number {} to {}",
                        fn_.name(),
                        old.number(),
                        fn_.number()
                    ),
                );
            } else if fn_.cardinality() == Cardinality::Required {
                self.add(
                    Bump::Major,
                    "FIELD_NEW_REQUIRED",
                    &path,
                    format!(
                        "new field {} is required; data from older writers lacks it",
                        fn_.name()
                    ),
                );
            } else {
                self.add(
                    Bump::Minor,
                    "FIELD_ADDED",
                    &path,
                    format!("field {} = {} added", fn_.name(), fn_.number()),
                );
            }
        }
        if let Some(lost) = reserved.lost_in(&Reserved::of_message(n.descriptor_proto())) {
            self.add(Bump::Major, "RESERVED_MESSAGE_NO_DELETE", base, lost);
        }
        let new_oneofs: HashSet<String> = n
            .oneofs()
            .filter(|x| !x.is_synthetic())
            .map(|x| x.name().to_owned())
            .collect();
        for oneof in o.oneofs().filter(|x| !x.is_synthetic()) {
            if !new_oneofs.contains(oneof.name()) {
                self.add(
                    Bump::Major,
                    "ONEOF_NO_DELETE",
                    &format!("{base}.{}", oneof.name()),
                    format!("oneof {} was deleted", oneof.name()),
                );
            }
        }
    }

    fn field(&mut self, path: &str, o: &FieldDescriptor, n: &FieldDescriptor) {
        if o.name() != n.name() {
            self.add(
                Bump::Major,
                "FIELD_SAME_NAME",
                path,
                format!(
                    "field {} = {} renamed to {}; JSON uses the name",
                    o.name(),
                    o.number(),
                    n.name()
                ),
            );
        }
        if o.json_name() != n.json_name() {
            self.add(
                Bump::Major,
                "FIELD_SAME_JSON_NAME",
                path,
                format!(
                    "json_name changed from {} to {}",
                    o.json_name(),
                    n.json_name()
                ),
            );
        }
        let (oo, no) = (real_oneof(o), real_oneof(n));
        if cardinality(o) != cardinality(n) {
            self.add(
                Bump::Major,
                "FIELD_SAME_CARDINALITY",
                path,
                format!(
                    "cardinality changed from {} to {}",
                    cardinality(o),
                    cardinality(n)
                ),
            );
        } else if oo == no
            && kind_name(&o.kind()) == kind_name(&n.kind())
            && !o.is_list()
            && !o.is_map()
            && o.supports_presence() != n.supports_presence()
        {
            // Moving into or out of a oneof, or to a message type, changes presence too;
            // that is reported as the move or the type change.
            let presence = |f: &FieldDescriptor| {
                if f.supports_presence() {
                    "explicit"
                } else {
                    "implicit"
                }
            };
            self.add(
                Bump::Major,
                "FIELD_SAME_PRESENCE",
                path,
                format!("presence changed from {} to {}", presence(o), presence(n)),
            );
        }
        if oo != no {
            let show = |x: &Option<String>| {
                x.as_deref()
                    .map_or("no oneof".to_owned(), |x| format!("oneof {x}"))
            };
            self.add(
                Bump::Major,
                "FIELD_SAME_ONEOF",
                path,
                format!("field moved from {} to {}", show(&oo), show(&no)),
            );
        }
        if o.is_group() != n.is_group() {
            self.add(
                Bump::Major,
                "FIELD_SAME_TYPE",
                path,
                "field changed between group and message".into(),
            );
        }
        let (od, nd) = (
            o.field_descriptor_proto().default_value.as_deref(),
            n.field_descriptor_proto().default_value.as_deref(),
        );
        if od != nd {
            self.add(
                Bump::Major,
                "FIELD_SAME_DEFAULT",
                path,
                format!("default changed from {od:?} to {nd:?}"),
            );
        }
        if o.is_map() && n.is_map() {
            if let (Kind::Message(om), Kind::Message(nm)) = (o.kind(), n.kind()) {
                for (side, number) in [("key", 1), ("value", 2)] {
                    if let (Some(of), Some(nf)) = (om.get_field(number), nm.get_field(number)) {
                        self.kind(&format!("{path}.{side}"), &of.kind(), &nf.kind());
                    }
                }
            }
        } else {
            self.kind(path, &o.kind(), &n.kind());
        }
    }

    fn kind(&mut self, path: &str, o: &Kind, n: &Kind) {
        match (o, n) {
            (Kind::Message(om), Kind::Message(nm)) if om.full_name() == nm.full_name() => {
                self.todo.push_back(Pair::Messages(om.clone(), nm.clone()))
            }
            (Kind::Enum(oe), Kind::Enum(ne)) if oe.full_name() == ne.full_name() => {
                self.todo.push_back(Pair::Enums(oe.clone(), ne.clone()))
            }
            (o, n) if kind_name(o) == kind_name(n) => {}
            (o, n) => self.add(
                Bump::Major,
                "FIELD_SAME_TYPE",
                path,
                format!("type changed from {} to {}", kind_name(o), kind_name(n)),
            ),
        }
    }

    fn enumeration(&mut self, o: &EnumDescriptor, n: &EnumDescriptor) {
        if !self
            .seen
            .insert((o.full_name().to_owned(), n.full_name().to_owned()))
        {
            return;
        }
        let base = o.full_name();
        let reserved = Reserved::of_enum(o.enum_descriptor_proto());
        for vo in o.values() {
            let path = format!("{base}.{}", vo.name());
            match n.get_value(vo.number()) {
                None => self.add(
                    Bump::Major,
                    "ENUM_VALUE_NO_DELETE",
                    &path,
                    format!("enum value {} = {} was deleted", vo.name(), vo.number()),
                ),
                Some(vn) if vn.name() != vo.name() => self.add(
                    Bump::Major,
                    "ENUM_VALUE_SAME_NAME",
                    &path,
                    format!(
                        "enum value {} = {} renamed to {}; JSON uses the name",
                        vo.name(),
                        vo.number(),
                        vn.name()
                    ),
                ),
                Some(_) => {}
            }
        }
        for vn in n.values().filter(|v| o.get_value(v.number()).is_none()) {
            let path = format!("{base}.{}", vn.name());
            match o.get_value_by_name(vn.name()) {
                Some(old) => self.add(
                    Bump::Major,
                    "ENUM_VALUE_SAME_NUMBER",
                    &path,
                    format!(
                        "enum value {} renumbered from {} to {}",
                        vn.name(),
                        old.number(),
                        vn.number()
                    ),
                ),
                None if reserved.holds(i64::from(vn.number()), vn.name()) => {
                    self.add(
                        Bump::Major,
                        "ENUM_VALUE_NO_REUSE_RESERVED",
                        &path,
                        format!(
                            "enum value {} = {} reuses a reserved name or number",
                            vn.name(),
                            vn.number()
                        ),
                    );
                }
                None => self.add(
                    Bump::Minor,
                    "ENUM_VALUE_ADDED",
                    &path,
                    format!("enum value {} = {} added", vn.name(), vn.number()),
                ),
            }
        }
        if let Some(lost) = reserved.lost_in(&Reserved::of_enum(n.enum_descriptor_proto())) {
            self.add(Bump::Major, "RESERVED_ENUM_NO_DELETE", base, lost);
        }
    }
}
