//! What tests need of a consumer that the runtime's loop does on its own: one record taken,
//! applied and stored as separate steps, so that a test can stop between them as a crash
//! would (feature `testing`).

use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;

use super::{Consumer, Handler, Outcome};

/// The next record, or `None` if `shutdown` came first.
pub async fn next<'c, H: Handler>(
    consumer: &'c Consumer<H>,
    shutdown: &CancellationToken,
) -> Option<BorrowedMessage<'c>> {
    consumer.next(shutdown).await
}

/// Applies one record as the loop's record-by-record path does (retries, dead letters); `None`
/// if `shutdown` came while it waited to retry. Its offset is not stored.
pub async fn apply<H: Handler>(
    consumer: &Consumer<H>,
    message: &BorrowedMessage<'_>,
    shutdown: &CancellationToken,
) -> Option<Outcome> {
    let (meta, span) = consumer.prepare(message);
    consumer.apply_one(message, &meta, &span, shutdown).await
}

/// Stores the record's offset for the next commit.
pub fn store<H: Handler>(
    consumer: &Consumer<H>,
    message: &BorrowedMessage<'_>,
) -> anyhow::Result<()> {
    consumer.store(message)
}
