//! Conversions between the wire types and the store's domain types, and the one
//! place where store errors become gRPC statuses.

use std::time::{Duration, SystemTime};

use evmesh_proto::v1 as pb;
use evmesh_store::{DeadLetter, GroupInfo, StartPosition, StoreError};
use tonic::Status;

pub(crate) fn status(error: StoreError) -> Status {
    if error.is_corruption() {
        tracing::error!(error = %error, "the log is damaged");
        return Status::data_loss(format!(
            "the log is damaged: {error}; restore evmesh.db from a backup"
        ));
    }
    match error {
        StoreError::NotFound(_) => Status::not_found(error.to_string()),
        StoreError::AlreadyExists(_) => Status::already_exists(error.to_string()),
        StoreError::InvalidArgument(_) => Status::invalid_argument(error.to_string()),
        StoreError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
        StoreError::Stale(_) => Status::aborted(error.to_string()),
        StoreError::ShuttingDown | StoreError::CommitFailed(_) | StoreError::Unavailable(_) => {
            Status::unavailable(error.to_string())
        }
        StoreError::Corrupt { .. } | StoreError::DataLoss(_) => {
            Status::data_loss(error.to_string())
        }
        StoreError::Backend(_) | StoreError::Io(_) => {
            tracing::error!(error = %error, "store error");
            Status::internal(error.to_string())
        }
    }
}

pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A wire duration that must not be negative; `field` names it in the error.
pub(crate) fn from_duration(d: &prost_types::Duration, field: &str) -> Result<Duration, Status> {
    Duration::try_from(*d)
        .map_err(|_| Status::invalid_argument(format!("{field} must be a non-negative duration")))
}

pub(crate) fn start_position(
    p: Option<&pb::StartPosition>,
    field: &str,
) -> Result<Option<StartPosition>, Status> {
    use pb::start_position::Position;
    let Some(position) = p.and_then(|p| p.position.as_ref()) else {
        return Ok(None);
    };
    Ok(Some(match position {
        Position::Earliest(()) => StartPosition::Earliest,
        Position::Latest(()) => StartPosition::Latest,
        Position::Sequence(seq) => StartPosition::Sequence(*seq),
        Position::Time(t) => StartPosition::Time(SystemTime::try_from(*t).map_err(|e| {
            Status::invalid_argument(format!("{field}.time is not a valid time: {e}"))
        })?),
    }))
}

pub(crate) fn group_info(g: GroupInfo) -> pb::GroupInfo {
    pb::GroupInfo {
        name: g.name,
        patterns: g.patterns,
        ack_floor: g.ack_floor,
        lag: g.lag,
        pending: g.pending,
        dead_letters: g.dead_letters,
        members: g.members,
        ack_timeout: Some(duration(g.ack_timeout)),
        max_deliveries: g.max_deliveries,
        head_sequence: g.head_sequence,
        skipped: g.counts.skipped,
        oldest_unacked_age: Some(duration(g.oldest_unacked)),
    }
}

pub(crate) fn dead_letter(d: DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        sequence: d.sequence,
        attempts: d.attempts,
        reason: d.reason,
        dead_at: Some(d.dead_at.into()),
        event_deleted: d.event.is_none(),
        event: d.event,
    }
}
