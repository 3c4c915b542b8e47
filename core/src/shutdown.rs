//! The shutdown signal. `main` turns SIGTERM or Ctrl-C into a cancelled [`CancellationToken`];
//! services only ever see the token, so tests shut them down by cancelling their own.
//!
//! The first signal asks for a graceful shutdown: the service finishes what it has in progress,
//! which can take as long as a dependency keeps it waiting. A second signal exits at once with
//! [`FORCED_EXIT`]: whoever asks twice (an operator's second Ctrl-C, an orchestrator's repeated
//! SIGTERM) does not wait for that. What is in progress then is abandoned as a crash would
//! abandon it, which the services are built to survive (nothing is marked done before it is).

pub use tokio_util::sync::CancellationToken;

/// The exit code after a second signal (128 + SIGINT, as a shell reports an interrupted command).
pub const FORCED_EXIT: i32 = 130;

/// The process's SIGTERM and Ctrl-C listeners. Registered once and kept: a signal that arrives
/// while the previous one is handled is kept for the next [`Signals::recv`], not lost.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for {name}");
                None
            }
        };
        Self {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "Ctrl-C"),
        }
    }

    #[cfg(not(unix))]
    fn new() -> Self {
        Self {}
    }

    /// Resolves on the next SIGTERM or Ctrl-C.
    #[cfg(unix)]
    async fn recv(&mut self) {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let Self { term, interrupt } = self;
        tokio::select! {
            () = next(term) => {},
            () = next(interrupt) => {},
        }
    }

    /// Resolves on the next Ctrl-C.
    #[cfg(not(unix))]
    async fn recv(&mut self) {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "Cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves on the first SIGTERM or Ctrl-C.
pub async fn signal() {
    Signals::new().recv().await;
}

/// A token cancelled on the first SIGTERM or Ctrl-C; the second exits the process with
/// [`FORCED_EXIT`]. The listeners are in place when this returns. Their task is the one no
/// service awaits: it lives as long as the process, to hear the second signal.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("Shutdown requested");
        child.cancel();
        signals.recv().await;
        tracing::warn!("Second shutdown signal: exiting now");
        std::process::exit(FORCED_EXIT);
    });
    token
}
