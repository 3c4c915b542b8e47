//! Fatal client errors. librdkafka calls an error fatal when the client it came from can never
//! recover: a static group member fenced by another instance with its `group.instance.id`, an
//! idempotent producer whose sequence it cannot repair without risking a duplicate or a
//! reordering. Every later call on that client fails; retrying would spin forever while the
//! process looks healthy.
//!
//! So a fatal error is raised on the process's [`Fatal`]: `/health` answers 503 naming it
//! ([`crate::health`]), the service's loop stops as on SIGTERM (what is in progress finishes or
//! rolls back; nothing is marked done that was not), and the process exits non-zero so that the
//! orchestrator starts it again, with new clients.

use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

/// Where a fatal error is raised and seen: the process's ([`Fatal::process`]) in services, a
/// test's own where a test needs one.
#[derive(Clone, Default)]
pub struct Fatal(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// The first fatal error: which client, and librdkafka's reason.
    reason: Mutex<Option<String>>,
    raised: CancellationToken,
}

impl Fatal {
    /// A fresh one, raised by nobody yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's: what the Kafka clients of services raise and `/health` reports.
    pub fn process() -> Self {
        static PROCESS: OnceLock<Fatal> = OnceLock::new();
        PROCESS.get_or_init(Fatal::new).clone()
    }

    /// `client` (e.g. `consumer inventory`) failed fatally for `reason`. The first one is kept
    /// (later ones are consequences) and logged; the process is then shutting down.
    pub fn raise(&self, client: &str, reason: &str) {
        let Ok(mut kept) = self.0.reason.lock() else {
            return;
        };
        if kept.is_some() {
            return;
        }
        let said = format!("{client}: {reason}");
        tracing::error!(
            client,
            reason,
            "Kafka client failed fatally; shutting down so that the process is restarted with new clients"
        );
        *kept = Some(said);
        self.0.raised.cancel();
    }

    /// The first fatal error, if one was raised.
    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Cancelled once a fatal error is raised.
    pub fn token(&self) -> CancellationToken {
        self.0.raised.clone()
    }

    /// `Err` naming the fatal error if one was raised: what a service returns after stopping.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.reason() {
            None => Ok(()),
            Some(reason) => Err(anyhow::anyhow!(
                "a Kafka client failed fatally ({reason}); restart the process"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fatal_error_is_kept_and_cancels_the_token() {
        let fatal = Fatal::new();
        assert!(fatal.reason().is_none());
        assert!(fatal.check().is_ok());
        fatal.raise("consumer inventory", "Fatal consumer error: fenced");
        fatal.raise("producer relay", "a consequence");
        assert!(fatal.token().is_cancelled());
        assert_eq!(
            fatal.reason().as_deref(),
            Some("consumer inventory: Fatal consumer error: fenced")
        );
        let said = fatal.check().unwrap_err().to_string();
        assert!(
            said.contains("fenced") && said.contains("restart"),
            "{said}"
        );
    }
}
