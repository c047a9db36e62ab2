//! How events and groups are shown: JSON lines for machines, tables and trees for
//! people.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use base64::Engine;
use evmesh_proto::v1 as pb;
use serde_json::{Value, json};

/// RFC 3339 to the millisecond. humantime formats only from 1970 to 9999, so a time
/// outside that (a node accepts years 0001 to 9999; an older node accepted anything)
/// is shown as seconds since the epoch instead of stopping the CLI.
pub(crate) fn time(t: Option<&prost_types::Timestamp>) -> Value {
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let Some(t) = t else {
        return Value::Null;
    };
    let formattable =
        (0..=MAX_SECONDS).contains(&t.seconds) && (0..1_000_000_000).contains(&t.nanos);
    match SystemTime::try_from(*t) {
        Ok(at) if formattable => Value::String(humantime::format_rfc3339_millis(at).to_string()),
        _ => Value::String(format!(
            "{}s {}ns since 1970-01-01T00:00:00Z",
            t.seconds, t.nanos
        )),
    }
}

/// The envelope as JSON. The payload is `payload` (its JSON through the registered
/// schema) when given, else its type and bytes in base64.
pub(crate) fn event_json(
    sequence: u64,
    attempt: Option<u32>,
    e: &pb::Event,
    payload: Option<Value>,
) -> Value {
    let mut v = json!({
        "sequence": sequence,
        "id": e.id,
        "type": e.r#type,
        "schema_version": e.schema_version,
        "occurred_at": time(e.occurred_at.as_ref()),
        "source": e.source,
        "aggregate_id": e.aggregate_id,
        "correlation_id": e.correlation_id,
        "causation_id": e.causation_id,
        "headers": e.headers,
        "payload": payload.or_else(|| e.payload.as_ref().map(|p| json!({
            "@type": p.type_url,
            "value_base64": base64::engine::general_purpose::STANDARD.encode(&p.value),
        }))),
    });
    if let (Some(attempt), Some(obj)) = (attempt, v.as_object_mut()) {
        obj.insert("attempt".into(), json!(attempt));
    }
    v
}

/// The chain as a causation tree: each event under the event that caused it.
/// Events whose cause is not in the chain are roots.
pub(crate) fn chain_tree(events: &[pb::ChainEvent]) -> String {
    let ids: HashSet<&str> = events
        .iter()
        .filter_map(|c| c.event.as_ref().map(|e| e.id.as_str()))
        .collect();
    let mut children: HashMap<&str, Vec<&pb::ChainEvent>> = HashMap::new();
    let mut roots = Vec::new();
    for c in events {
        let Some(e) = &c.event else { continue };
        if !e.causation_id.is_empty()
            && ids.contains(e.causation_id.as_str())
            && e.causation_id != e.id
        {
            children.entry(e.causation_id.as_str()).or_default().push(c);
        } else {
            roots.push(c);
        }
    }
    let mut out = String::new();
    let mut seen = HashSet::new();
    for root in roots {
        write_node(&mut out, root, &children, "", None, &mut seen);
    }
    out
}

fn write_node<'a>(
    out: &mut String,
    node: &'a pb::ChainEvent,
    children: &HashMap<&str, Vec<&'a pb::ChainEvent>>,
    prefix: &str,
    last: Option<bool>,
    seen: &mut HashSet<&'a str>,
) {
    let Some(e) = &node.event else { return };
    if !seen.insert(e.id.as_str()) {
        return; // a causation cycle: show each event once
    }
    let (branch, indent) = match last {
        None => ("", ""),
        Some(true) => ("└─ ", "   "),
        Some(false) => ("├─ ", "│  "),
    };
    let at = time(e.occurred_at.as_ref());
    let at = at.as_str().unwrap_or("-");
    let source = if e.source.is_empty() { "-" } else { &e.source };
    out.push_str(&format!(
        "{prefix}{branch}#{} {}  id={} source={source} at={at}\n",
        node.sequence, e.r#type, e.id
    ));
    let child_prefix = format!("{prefix}{indent}");
    if let Some(kids) = children.get(e.id.as_str()) {
        for (i, kid) in kids.iter().enumerate() {
            write_node(
                out,
                kid,
                children,
                &child_prefix,
                Some(i + 1 == kids.len()),
                seen,
            );
        }
    }
}

/// A plain left-aligned table.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, id: &str, ty: &str, cause: &str) -> pb::ChainEvent {
        pb::ChainEvent {
            sequence: seq,
            event: Some(pb::Event {
                id: id.into(),
                r#type: ty.into(),
                causation_id: cause.into(),
                source: "svc".into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn chain_tree_nests_by_causation() {
        let tree = chain_tree(&[
            ev(1, "a", "shop.order.placed", ""),
            ev(2, "b", "shop.payment.succeeded", "a"),
            ev(3, "c", "shop.inventory.reserved", "a"),
            ev(4, "d", "shop.shipment.scheduled", "b"),
        ]);
        let expected = "\
#1 shop.order.placed  id=a source=svc at=-
├─ #2 shop.payment.succeeded  id=b source=svc at=-
│  └─ #4 shop.shipment.scheduled  id=d source=svc at=-
└─ #3 shop.inventory.reserved  id=c source=svc at=-
";
        assert_eq!(tree, expected);
    }

    #[test]
    fn any_time_a_node_sends_is_shown() {
        let at = |seconds, nanos| time(Some(&prost_types::Timestamp { seconds, nanos }));
        assert_eq!(at(0, 0), json!("1970-01-01T00:00:00.000Z"));
        assert_eq!(at(253_402_300_799, 0), json!("9999-12-31T23:59:59.000Z"));
        for (seconds, nanos) in [
            (i64::MAX, 0),
            (i64::MIN, 0),
            (0, -1),
            (0, 2_000_000_000),
            (-1, 0),
        ] {
            let shown = at(seconds, nanos);
            assert_eq!(
                shown,
                json!(format!("{seconds}s {nanos}ns since 1970-01-01T00:00:00Z"))
            );
        }
    }
}
