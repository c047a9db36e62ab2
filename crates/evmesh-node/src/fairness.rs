//! What one principal may hold at once (subscriptions, publish streams) and how
//! fast it may publish, on top of the connection-level bounds: a principal that
//! floods the node waits for its own rate, and cannot take what others need.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;

use crate::auth::{Holdings, Principal};

pub(crate) type RateLimiter = governor::DefaultDirectRateLimiter;

/// How long a stream over its principal's cap waits for its refusal: a flooder
/// that opens again at once costs the node a few refusals a second, not a core.
const REFUSAL_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// `refused` after [`REFUSAL_DELAY`] when it is a cap's refusal, else at once.
pub(crate) async fn refusal(refused: Status) -> Status {
    if refused.code() == tonic::Code::ResourceExhausted {
        tokio::time::sleep(REFUSAL_DELAY).await;
    }
    refused
}

/// What a counted stream holds, given back when it ends.
pub(crate) struct Held {
    holdings: Arc<Holdings>,
    kind: Kind,
}

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Subscription,
    PublishStream,
}

impl Kind {
    fn counter(self, holdings: &Holdings) -> &AtomicUsize {
        match self {
            Kind::Subscription => &holdings.subscriptions,
            Kind::PublishStream => &holdings.publish_streams,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.kind
            .counter(&self.holdings)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one more stream of `kind` for `principal`, or RESOURCE_EXHAUSTED at its cap.
pub(crate) fn take(
    holdings: Arc<Holdings>,
    principal: &Principal,
    kind: Kind,
) -> Result<Held, Status> {
    let (cap, what, key) = match kind {
        Kind::Subscription => (
            principal.limits.max_subscriptions,
            "subscriptions",
            "max_subscriptions",
        ),
        Kind::PublishStream => (
            principal.limits.max_publish_streams,
            "publish streams",
            "max_publish_streams",
        ),
    };
    let before = kind.counter(&holdings).fetch_add(1, Ordering::AcqRel);
    let held = Held { holdings, kind };
    if let Some(cap) = cap
        && before >= cap
    {
        drop(held);
        return Err(Status::resource_exhausted(format!(
            "principal {:?} has {before} {what} open, its {key} in the auth file",
            principal.name
        )));
    }
    Ok(held)
}

/// The principal's publish rate limiter, when it has a rate; one per principal,
/// made again when its rate changes.
pub(crate) fn limiter(holdings: &Holdings, principal: &Principal) -> Option<Arc<RateLimiter>> {
    let rate = principal.limits.publish_rate?;
    let mut held = holdings.limiter.lock().unwrap_or_else(|e| e.into_inner());
    match &*held {
        Some((r, limiter)) if *r == rate => Some(limiter.clone()),
        _ => {
            let per_second = NonZeroU32::new(rate)?;
            let limiter = Arc::new(RateLimiter::direct(governor::Quota::per_second(per_second)));
            *held = Some((rate, limiter.clone()));
            Some(limiter)
        }
    }
}

/// Waits until `limiter` lets `n` more events through: a batch larger than the
/// burst goes through in burst-sized steps.
pub(crate) async fn admit(limiter: &RateLimiter, burst: u32, mut n: usize) {
    while n > 0 {
        let step = n.min(burst.max(1) as usize);
        let Some(step_nz) = NonZeroU32::new(step as u32) else {
            return;
        };
        // The step is within the burst, so it is always admitted in time.
        let _ = limiter.until_n_ready(step_nz).await;
        n -= step;
    }
}
