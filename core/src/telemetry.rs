//! Logs, traces and trace context.
//!
//! Every service calls [`init`] once. Logs are JSON when stderr is not a terminal, plain text
//! otherwise; the level comes from `RUST_LOG` (default `info`). A log line inside a traced span
//! carries the span list, whose root (HTTP request, relay publish, consumer process) holds
//! `trace_id` and `span_id`.
//!
//! Traces are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, configured by the standard `OTEL_*` variables
//! (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, ...); otherwise nothing is recorded and
//! each hop forwards the caller's context unchanged. Trace context follows W3C Trace Context:
//! [`headers_for_current`] produces the `traceparent`/`tracestate` pair that keel stores in
//! outbox rows and carries in Kafka headers.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

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

static RECORDING: AtomicBool = AtomicBool::new(false);
static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// Whether spans are recorded and exported (an exporter is configured). Hot paths create their
/// spans only then.
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Installs the global subscriber and propagator; spans go to OTLP when an endpoint is set.
/// Safe to call more than once (tests do): the first call wins.
pub fn init(service: &str) {
    let endpoint_set = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
    if !endpoint_set {
        install(service, None);
        return;
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => {
            let provider = SdkTracerProvider::builder()
                .with_resource(resource(service))
                .with_batch_exporter(exporter)
                .build();
            install(service, Some(provider));
        }
        Err(e) => {
            install(service, None);
            tracing::error!(error = %e, "OTEL_EXPORTER_OTLP_ENDPOINT: cannot export traces; tracing is off");
        }
    }
}

/// Like [`init`], exporting every span to `exporter` as it ends (tests use an in-memory one).
pub fn init_with_exporter<E>(service: &str, exporter: E)
where
    E: opentelemetry_sdk::trace::SpanExporter + 'static,
{
    let provider = SdkTracerProvider::builder()
        .with_resource(resource(service))
        .with_simple_exporter(exporter)
        .build();
    install(service, Some(provider));
}

fn resource(service: &str) -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, when set, names the service (the builder reads it).
    if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty()) {
        builder.build()
    } else {
        builder.with_service_name(service.to_owned()).build()
    }
}

fn install(service: &str, provider: Option<SdkTracerProvider>) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // PostgreSQL NOTICEs ("already exists, skipping") are not news at INFO.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let fmt = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    let otel = provider.map(|provider| {
        let tracer = provider.tracer(service.to_owned());
        let _ = PROVIDER.set(provider.clone());
        opentelemetry::global::set_tracer_provider(provider);
        // keel's own spans, whatever RUST_LOG says about log lines.
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(EnvFilter::new("keel=info,keel_core=info,keel_producers=info,keel_outbox=info,keel_consumers=info,tower_http=info"))
    });
    let recording = otel.is_some();
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok()
    {
        RECORDING.store(recording, Ordering::Relaxed);
    }
}

/// Makes `span` (not yet entered) a child of the context in `headers` (`traceparent`,
/// `tracestate`) and records its ids; a span without such headers starts a trace of its own.
pub fn continue_trace(span: &tracing::Span, headers: &TraceHeaders) {
    let parent = extract(|k| headers.get(k).cloned());
    // Fails only when tracing is off or the span was filtered out: nothing to record then.
    let _ = span.set_parent(parent);
    record_ids(span);
}

/// Records the span's trace and span ids in its `trace_id` and `span_id` fields (declared
/// `Empty`), so the log lines inside it can be joined to the trace.
pub fn record_ids(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", sc.trace_id().to_string());
        span.record("span_id", sc.span_id().to_string());
    }
}

/// Shuts the tracer provider down, exporting what is buffered. Call before a process exits.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "Exporting the last spans failed");
    }
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
