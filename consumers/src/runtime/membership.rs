//! Membership watching: the partitions this instance owns (a gauge, and a warning when it owns
//! none for long). The lag comes from librdkafka's statistics ([`super::context`]).
//!
//! # Rebalances
//! On a rebalance librdkafka commits the offsets stored so far for the revoked partitions. A record
//! in progress at that moment may commit its transaction after losing its partition; its offset
//! can no longer be stored, so the new owner receives it again and the processed-events row makes
//! that a duplicate.

use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::Consumer;
use super::handler::Handler;

/// What [`Consumer::watch_membership`] remembers between checks.
#[derive(Default)]
pub(super) struct MembershipWatch {
    checked_at: Option<std::time::Instant>,
    unassigned_since: Option<std::time::Instant>,
    warned_at: Option<std::time::Instant>,
}

impl<H: Handler> Consumer<H> {
    /// Every few seconds: the partitions this instance owns, as a gauge, and a warning when it
    /// has owned none for two session timeouts (more instances than partitions, or a rebalance
    /// that does not complete: see docs/operations.md).
    pub(super) fn watch_membership(&self) {
        let Ok(mut watch) = self.membership.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if watch
            .checked_at
            .is_some_and(|at| now - at < Duration::from_secs(5))
        {
            return;
        }
        watch.checked_at = Some(now);
        let owned = self.consumer.assignment().map_or(0, |a| a.count());
        keel_core::metrics::metrics()
            .consumer_assigned
            .get_or_create(&keel_core::metrics::GroupLabels {
                group: self.group().to_owned(),
            })
            .set(owned as i64);
        if owned > 0 {
            watch.unassigned_since = None;
            return;
        }
        let since = *watch.unassigned_since.get_or_insert(now);
        let quiet_for = now - since;
        if quiet_for > 2 * self.config.session_timeout
            && watch
                .warned_at
                .is_none_or(|at| now - at > Duration::from_secs(300))
        {
            watch.warned_at = Some(now);
            tracing::warn!(
                group = self.group(),
                unassigned_secs = quiet_for.as_secs(),
                "No partitions assigned: more instances than partitions, or the group's rebalance does not complete (docs/operations.md)"
            );
        }
    }
}
