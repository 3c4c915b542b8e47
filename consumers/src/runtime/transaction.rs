//! The transaction: the dedupe rows of the records taken in one go and the effects of the new
//! ones, committed together or not at all. What it promises: an event's effect commits at most
//! once per group, because its `(group, event_id)` row commits with it.

use std::collections::HashSet;

use keel_schemas::Event;
use sqlx::PgPool;

use super::handler::{Handler, HandlerError, Meta};

/// The dedupe rows of `records` and the effects of those that are new, in one transaction:
/// what the runtime does with the records it took from Kafka in one go (one record or many).
/// Outcomes come in the order of `records`; an event twice in `records` is applied once. If
/// anything fails, nothing commits and the error says why.
pub async fn transact<H: Handler>(
    pool: &PgPool,
    group: &str,
    handler: &H,
    records: &[(Event, Meta)],
) -> Result<Vec<Outcome>, HandlerError> {
    let wants: Vec<bool> = records.iter().map(|(e, _)| handler.wants(e)).collect();
    let mut outcomes: Vec<Outcome> = records
        .iter()
        .map(|(e, _)| Outcome::Ignored(e.name().to_owned()))
        .collect();
    let wanted: Vec<&(Event, Meta)> = records
        .iter()
        .zip(&wants)
        .filter_map(|(r, &w)| w.then_some(r))
        .collect();
    if wanted.is_empty() {
        return Ok(outcomes);
    }
    let mut tx = pool.begin().await?;
    let new: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO consumers.processed_events (group_id, event_id, topic, kafka_partition, kafka_offset)
         SELECT $1, * FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[])
         ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(group)
    .bind(wanted.iter().map(|(e, _)| e.event_id()).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, m)| m.topic.as_str()).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, m)| m.partition).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, m)| m.offset).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut new: HashSet<uuid::Uuid> = new.into_iter().collect();
    let mut fresh = Vec::with_capacity(new.len());
    for ((outcome, (event, meta)), _) in outcomes
        .iter_mut()
        .zip(records)
        .zip(&wants)
        .filter(|(_, w)| **w)
    {
        if new.remove(&event.event_id()) {
            *outcome = Outcome::Applied;
            fresh.push((event, meta));
        } else {
            *outcome = Outcome::Duplicate;
        }
    }
    if fresh.is_empty() {
        tx.rollback().await?;
        return Ok(outcomes);
    }
    handler.handle_batch(&mut tx, &fresh).await?;
    tx.commit().await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let end_to_end = keel_core::metrics::metrics()
        .consumer_end_to_end
        .get_or_create(&keel_core::metrics::GroupLabels {
            group: group.to_owned(),
        })
        .clone();
    for (event, _) in fresh {
        end_to_end.observe((now_ms - event.occurred_at()).max(0) as f64 / 1000.0);
    }
    Ok(outcomes)
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect committed now.
    Applied,
    /// The effect had committed before (redelivery).
    Duplicate,
    /// The group does not handle this event type (named), or this build does not know it.
    Ignored(String),
    /// The record can never be applied; it is now on the dead-letter topic.
    DeadLettered { class: &'static str, reason: String },
}

impl Outcome {
    /// The outcome as spans and metrics name it.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored(_) => "ignored",
            Outcome::DeadLettered { .. } => "dead_lettered",
        }
    }
}

/// How many of `outcomes` there are of each kind, in the order each kind first appears: a
/// batch's records counted with one labelled-counter lookup per kind, not one per record.
pub(super) fn tally<'a>(
    outcomes: impl IntoIterator<Item = &'a Outcome>,
) -> Vec<(&'static str, u64)> {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    for outcome in outcomes {
        match counts.iter_mut().find(|(name, _)| *name == outcome.name()) {
            Some((_, n)) => *n += 1,
            None => counts.push((outcome.name(), 1)),
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_by_kind_in_order_of_first_appearance() {
        let dead = Outcome::DeadLettered {
            class: "permanent",
            reason: "cannot decode".into(),
        };
        let outcomes = [
            Outcome::Duplicate,
            Outcome::Applied,
            dead.clone(),
            Outcome::Applied,
            Outcome::Duplicate,
            Outcome::Applied,
            dead,
        ];
        assert_eq!(
            tally(&outcomes),
            vec![("duplicate", 2), ("applied", 3), ("dead_lettered", 2)]
        );
        assert_eq!(tally(&[]), Vec::<(&str, u64)>::new());
        assert_eq!(
            Outcome::Ignored("keel.orders.OrderRefunded".into()).name(),
            "ignored"
        );
    }
}
