//! Tracing: each record's consumer span in the producer's trace (OpenTelemetry messaging
//! conventions), and the trace context a handler passes on when it publishes.

use keel_core::telemetry::TraceHeaders;
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};

use super::Consumer;
use super::handler::{Handler, Meta};

impl<H: Handler> Consumer<H> {
    /// The record's metadata and its consumer span (disabled unless traces are recorded).
    pub(super) fn prepare(&self, message: &BorrowedMessage<'_>) -> (Meta, tracing::Span) {
        let received = trace_headers(message);
        // With tracing on, a consumer span in the producer's trace; handlers pass its context on.
        let span = if keel_core::telemetry::recording() {
            let span = process_span(message, self.group());
            keel_core::telemetry::continue_trace(&span, &received);
            span
        } else {
            tracing::Span::none()
        };
        let trace = if span.is_none() {
            received
        } else {
            let caller = keel_core::telemetry::extract(|k| received.get(k).cloned());
            span.in_scope(|| keel_core::telemetry::headers_for_current(&caller))
        };
        let transaction = if span.is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                parent: &span,
                "transaction",
                otel.name = "BEGIN consumers",
                otel.kind = "client",
                db.system.name = "postgresql",
            )
        };
        let meta = Meta {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            trace,
            span: transaction,
        };
        (meta, span)
    }
}

/// The consumer span of one record (OpenTelemetry messaging conventions).
fn process_span(message: &BorrowedMessage<'_>, group: &str) -> tracing::Span {
    use tracing::field::Empty;
    let event_id = message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == "keel-event-id")
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    tracing::info_span!(
        "process",
        otel.name = format!("process {}", message.topic()),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = message.topic(),
        messaging.destination.partition.id = message.partition().to_string(),
        messaging.kafka.offset = message.offset(),
        messaging.consumer.group.name = group,
        messaging.message.id = event_id,
        messaging.kafka.message.key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        keel.outcome = Empty,
        keel.attempts = Empty,
        trace_id = Empty,
        span_id = Empty,
    )
}

/// The W3C trace context carried in the record's headers.
fn trace_headers(message: &BorrowedMessage<'_>) -> TraceHeaders {
    let mut trace = TraceHeaders::new();
    if let Some(headers) = message.headers() {
        for h in headers.iter() {
            if matches!(h.key, "traceparent" | "tracestate")
                && let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok())
            {
                trace.insert(h.key.to_owned(), v.to_owned());
            }
        }
    }
    trace
}
