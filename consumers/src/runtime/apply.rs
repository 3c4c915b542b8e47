//! The apply loop: a batch in one transaction when it can, else record by record with the retry
//! classes.
//!
//! # Batches
//! The records librdkafka has already fetched (up to `KEEL_CONSUMER_BATCH_SIZE`; the runtime
//! never waits to fill a batch, so a quiet stream gets batches of one) are applied in one
//! transaction: their dedupe rows in one statement, the effects of the new ones in order, one
//! commit ([`super::transact`]). A backlog is then worth one commit per batch instead of one per
//! record. If the batch fails for any reason, none of it committed, and its records go one by one
//! through the path below, so a poison record is dead-lettered alone and an outage is waited out
//! record by record.
//!
//! # Failures
//! - **Unavailable** (PostgreSQL, Redis, SMTP or the registry cannot be reached): not the record's
//!   fault, and every other record would fail the same way, so the record is retried with
//!   exponential backoff and jitter until the dependency is back. The partition waits; nothing is
//!   dead-lettered because of an outage.
//! - **Transient** (a deadlock, a serialization failure, a timeout, a schema id the registry
//!   does not know, which a lagging replica answers too): retried the same way, at most
//!   `max_attempts` times in all, then dead-lettered.
//! - **Permanent** (bytes not in the wire format, a body that does not fit its schema, an event
//!   that breaks an invariant): dead-lettered at once.
//! - A record of a type this build has no contract for (a newer producer's event) is not a
//!   failure: it is skipped and counted (`keel_consumer_ignored_records_total`), as are types the
//!   group does not handle.
//!
//! A poison record holds its partition for at most the retry budget and is never dropped
//! silently ([`super::dead_letter`]).

use std::time::Duration;

use keel_core::backoff::Backoff;
use keel_schemas::{DecodeError, Event};
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Consumer;
use super::handler::{Handler, HandlerError, Meta};
use super::transaction::{Outcome, transact};

impl<H: Handler> Consumer<H> {
    /// Decodes each record of `batch`, in order.
    pub(super) async fn decode_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
    ) -> Vec<Result<Decoded, HandlerError>> {
        let mut events = Vec::with_capacity(batch.len());
        for (i, message) in batch.iter().enumerate() {
            // Decoding is CPU work; run concurrently with a transaction (see `run`), it lets the
            // transaction's replies in every few records rather than after the whole batch.
            if i % 32 == 31 {
                tokio::task::yield_now().await;
            }
            events.push(self.decode(message).await);
        }
        events
    }

    /// Applies `batch` (records taken from the consumer in one go, in order, already decoded by
    /// [`Consumer::decode_batch`]) in one transaction when it can. If that fails (a record that
    /// does not decode, an effect that fails, an outage), nothing of it committed and its records
    /// are applied one by one as [`Consumer::apply_one`] does, with its retries and dead-lettering.
    /// Outcomes come in the records' order; fewer than the records if `shutdown` came first (the
    /// rest are not done). Does not store offsets.
    pub(super) async fn apply_decoded(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: Vec<Result<Decoded, HandlerError>>,
        shutdown: &CancellationToken,
    ) -> Vec<Outcome> {
        let prepared: Vec<(Meta, tracing::Span)> = batch.iter().map(|m| self.prepare(m)).collect();
        if batch.len() > 1 {
            match self.try_batch(decoded, &prepared).await {
                Ok(outcomes) => {
                    for ((_, span), outcome) in prepared.iter().zip(&outcomes) {
                        span.record("keel.outcome", outcome.name());
                    }
                    return outcomes;
                }
                Err(e) => tracing::debug!(
                    group = self.group(), records = batch.len(), error = %e,
                    "Cannot apply the batch in one transaction; applying its records one by one"
                ),
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for (message, (meta, span)) in batch.iter().zip(&prepared) {
            match self.apply_one(message, meta, span, shutdown).await {
                Some(outcome) => outcomes.push(outcome),
                None => break,
            }
        }
        outcomes
    }

    async fn try_batch(
        &self,
        decoded: Vec<Result<Decoded, HandlerError>>,
        prepared: &[(Meta, tracing::Span)],
    ) -> Result<Vec<Outcome>, HandlerError> {
        let mut records = Vec::with_capacity(decoded.len());
        let mut unknown = Vec::new();
        for (i, (decoded, (meta, _))) in decoded.into_iter().zip(prepared).enumerate() {
            match decoded? {
                Decoded::Known(event) => records.push((event, meta.clone())),
                Decoded::Unknown(event_type) => unknown.push((i, Outcome::Ignored(event_type))),
            }
        }
        let mut outcomes = transact(&self.pool, self.group(), &self.handler, &records).await?;
        // In ascending order, each lands at its record's place.
        for (i, ignored) in unknown {
            outcomes.insert(i, ignored);
        }
        Ok(outcomes)
    }

    /// Applies one record, retrying as its error class says (see the module doc), and
    /// dead-letters it if it can never be applied. `None` if `shutdown` came while waiting to
    /// retry: the record is not done and its offset must not be stored.
    pub(super) async fn apply_one(
        &self,
        message: &BorrowedMessage<'_>,
        meta: &Meta,
        span: &tracing::Span,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_retry_backoff);
        let mut attempts = 0u32;
        // Attempts that count against the budget: an outage's do not, however many there were.
        let mut spent = 0u32;
        loop {
            attempts += 1;
            let error = match self.try_apply(message, meta).instrument(span.clone()).await {
                Ok(outcome) => {
                    span.record("keel.outcome", outcome.name());
                    return Some(outcome);
                }
                Err(e) => e,
            };
            span.record("keel.attempts", attempts);
            if !matches!(error, HandlerError::Unavailable(_)) {
                spent += 1;
            }
            if budget_spent(&error, spent, self.config.max_attempts) {
                let outcome = Outcome::DeadLettered {
                    class: error.class(),
                    reason: error.to_string(),
                };
                // The dead-letter write is retried like any unavailable dependency: the record
                // is never dropped, and its partition waits.
                if !self
                    .dead_letter_until_written(message, meta, &error, attempts, shutdown)
                    .await
                {
                    return None;
                }
                span.record("keel.outcome", "dead_lettered");
                return Some(outcome);
            }
            keel_core::metrics::metrics()
                .consumer_retries
                .get_or_create(&keel_core::metrics::RetryLabels {
                    group: self.group().to_owned(),
                    class: error.class().to_owned(),
                })
                .inc();
            keel_core::health::beat(&self.health_loop);
            let delay = backoff.next_delay();
            tracing::warn!(
                group = self.group(), topic = %meta.topic, partition = meta.partition, offset = meta.offset,
                attempt = attempts, class = error.class(), retry_in_ms = delay.as_millis() as u64, error = %error,
                "Cannot apply the record yet; retrying"
            );
            // Waiting in the group: an outage longer than max.poll.interval.ms must not throw
            // this instance out of it (`in_group_while`, in source.rs).
            if !self.sleep_in_group(delay, shutdown).await {
                return None;
            }
        }
    }

    /// One attempt: decode, dedupe, handle, commit.
    async fn try_apply(
        &self,
        message: &BorrowedMessage<'_>,
        meta: &Meta,
    ) -> Result<Outcome, HandlerError> {
        let event = match self.decode(message).await? {
            Decoded::Known(event) => event,
            Decoded::Unknown(event_type) => return Ok(Outcome::Ignored(event_type)),
        };
        let outcomes = transact(
            &self.pool,
            self.group(),
            &self.handler,
            &[(event, meta.clone())],
        )
        .await?;
        outcomes.into_iter().next().ok_or_else(|| {
            HandlerError::Transient(anyhow::anyhow!("the transaction returned no outcome"))
        })
    }

    async fn decode(&self, message: &BorrowedMessage<'_>) -> Result<Decoded, HandlerError> {
        match self.decoder.decode(message.payload()).await {
            Ok(event) => Ok(Decoded::Known(event)),
            // A newer producer's event: skipped, never dead-lettered (it is not poison, and a
            // build that knows it applies it after `keel replay`).
            Err(DecodeError::UnknownType(event_type)) => Ok(Decoded::Unknown(event_type)),
            Err(DecodeError::Transient(e)) => Err(HandlerError::Unavailable(anyhow::anyhow!(e))),
            // Retried up to the attempt budget: a lagging registry replica catches up in that
            // time, a wrong id does not.
            Err(e @ DecodeError::UnknownSchema(_)) => Err(HandlerError::Transient(
                anyhow::anyhow!("cannot decode: {e}"),
            )),
            Err(DecodeError::Permanent(reason)) => {
                Err(HandlerError::Permanent(format!("cannot decode: {reason}")))
            }
        }
    }
}

/// A record's value, decoded: an event this build knows, or the name of a type it does not.
pub(super) enum Decoded {
    Known(Event),
    Unknown(String),
}

/// Whether a record whose `attempts`-th attempt that counts (an outage's do not) failed with
/// `error` goes to the dead-letter topic now (else it is retried): never for an outage, after
/// `max_attempts` for a transient error, at once for a permanent one.
fn budget_spent(error: &HandlerError, attempts: u32, max_attempts: u32) -> bool {
    match error {
        HandlerError::Unavailable(_) => false,
        HandlerError::Transient(_) => attempts >= max_attempts,
        HandlerError::Permanent(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_waited_out_however_long_it_lasts() {
        let down = HandlerError::Unavailable(anyhow::anyhow!("connection refused"));
        assert!(!budget_spent(&down, 1, 3));
        assert!(!budget_spent(&down, 10_000, 3));
    }

    #[test]
    fn a_transient_error_is_retried_up_to_the_budget_then_dead_lettered() {
        let deadlock = HandlerError::Transient(anyhow::anyhow!("deadlock detected"));
        assert!(!budget_spent(&deadlock, 1, 3));
        assert!(!budget_spent(&deadlock, 2, 3));
        assert!(budget_spent(&deadlock, 3, 3));
        assert!(
            budget_spent(&deadlock, 1, 1),
            "a budget of one attempt retries nothing"
        );
    }

    #[test]
    fn a_permanent_error_is_dead_lettered_at_once() {
        let poison = HandlerError::Permanent("cannot decode".into());
        assert!(budget_spent(&poison, 1, 8));
    }
}
