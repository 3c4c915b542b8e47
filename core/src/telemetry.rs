//! Logs and trace context.
//!
//! Every service calls [`init`] once. Logs are JSON when stderr is not a terminal, plain text
//! otherwise; the level comes from `RUST_LOG` (default `info`). Trace context follows W3C Trace
//! Context: [`headers_for_current`] produces the `traceparent`/`tracestate` pair that keel
//! stores in outbox rows and carries in Kafka headers.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// W3C trace-context headers, as stored in the outbox and sent as Kafka headers.
pub type TraceHeaders = BTreeMap<String, String>;

/// Installs the global subscriber and propagator. Safe to call more than once (tests do).
pub fn init(service: &'static str) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer(service);
    opentelemetry::global::set_tracer_provider(provider);
    // PostgreSQL NOTICEs ("already exists, skipping") are not news at INFO.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let fmt = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
}

/// The remote context carried by `traceparent`/`tracestate` in `get`.
pub fn extract(get: impl Fn(&str) -> Option<String>) -> opentelemetry::Context {
    struct Getter<F>(BTreeMap<&'static str, String>, std::marker::PhantomData<F>);
    impl<F> opentelemetry::propagation::Extractor for Getter<F> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().copied().collect()
        }
    }
    let mut found = BTreeMap::new();
    for key in ["traceparent", "tracestate"] {
        if let Some(v) = get(key) {
            found.insert(key, v);
        }
    }
    TraceContextPropagator::new().extract(&Getter::<()>(found, std::marker::PhantomData))
}

/// The trace headers to hand downstream from here: the current span's context when tracing is
/// active, otherwise `fallback` (the caller's context, forwarded unchanged as W3C asks of a
/// participant that records nothing).
pub fn headers_for_current(fallback: &opentelemetry::Context) -> TraceHeaders {
    let current = tracing::Span::current().context();
    let cx = if current.span().span_context().is_valid() {
        &current
    } else {
        fallback
    };
    let mut headers = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut headers);
    headers.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_context_is_forwarded_when_nothing_is_recorded() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = extract(|k| (k == "traceparent").then(|| tp.to_owned()));
        assert!(cx.span().span_context().is_valid());
        let headers = headers_for_current(&cx);
        assert_eq!(headers.get("traceparent").map(String::as_str), Some(tp));
    }

    #[test]
    fn a_malformed_traceparent_yields_no_context() {
        let cx = extract(|k| (k == "traceparent").then(|| "garbage".to_owned()));
        assert!(!cx.span().span_context().is_valid());
        assert!(headers_for_current(&cx).is_empty());
    }
}
