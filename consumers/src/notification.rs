//! The notification group: one message per customer-facing event (order confirmation, payment
//! receipt, cancellation, out-of-stock notice), stored once; delivered at least once, every copy
//! with the same `Message-ID`.
//!
//! # What is promised
//! 1. The consumer's transaction inserts the message into `notification.messages`, keyed by the
//!    event id, together with the processed-events row. A redelivered event changes nothing:
//!    one message per event, exactly.
//! 2. After the commit, the [`Mailer`] (running in the same process) locks one undelivered
//!    message (`FOR UPDATE SKIP LOCKED`, so several mailers never send the same one at once),
//!    sends it, and sets `delivered_at` in that same transaction.
//! 3. Every message carries `Message-ID: <event_id@keel>`.
//!
//! Delivery to the mail server is **at least once**: a message is sent again when the mailer
//! cannot know it was taken, and SMTP gives no way to ask. That is: a crash between sending and
//! marking (the mark rolls back); a server that took the whole message but whose final reply
//! did not come within 30 s (`a_message_whose_final_reply_came_too_late_is_sent_again_with_the_same_message_id`
//! in `consumers/tests/mailer.rs`); and a mailer whose database session died mid-send, so that
//! the row's lock went and another mailer took it. Every copy carries the same Message-ID; mail
//! stores and clients that deduplicate on it show one, and anything downstream can recognise a
//! resend by it. With the file backend a resend overwrites the same file (`<event_id>.eml`), so
//! the mail directory holds exactly one copy.
//!
//! # The recipient
//! Each order's messages go to the address its own `OrderCreated` carries
//! (`notification.recipients`, keyed by order id), never to an address learnt from another
//! order of the same customer id: a shared guest id, a changed address or someone else's id
//! sends a later order's mail elsewhere, never an earlier order's. An event can overtake its
//! order's creation (a payment redriven, an inventory outcome on another topic), so a message
//! may be stored without a recipient; the creation fills it in, and the mailer sends only
//! addressed messages.
//!
//! Failed sends are retried with backoff (`next_attempt_at`); consuming goes on meanwhile, so a
//! mail server outage delays mail but not the group's offsets.

use std::path::PathBuf;
use std::time::Duration;

use keel_core::backoff::Backoff;
use keel_schemas::Event;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long one delivery may take, inside the transaction that holds its row.
const SEND_LIMIT: Duration = Duration::from_secs(30);

use crate::runtime::{Handler, HandlerError, Meta};
use crate::{Group, ORDER_EVENTS};
use keel_schemas::InventoryRejected;
use keel_schemas::events::Contract;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/notification");
pub const DB_SCHEMA: &str = "notification";

/// The notification group's entry in [`crate::GROUPS`]: its consumer and, beside it, the
/// [`Mailer`].
pub static GROUP: Group = Group {
    name: "notification",
    topics: |t| vec![t.orders.clone(), t.inventory.clone()],
    applies: |t| {
        vec![
            (t.orders.clone(), ORDER_EVENTS.to_vec()),
            (t.inventory.clone(), vec![InventoryRejected::NAME]),
        ]
    },
    migrations: Some((DB_SCHEMA, &MIGRATOR)),
    run: |s, shutdown| Box::pin(async move { run(&s, shutdown).await }),
};

/// The consumer and the mailer, until `shutdown` (or until either fails).
async fn run(s: &keel_core::Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let transport = Transport::from_settings(&s.mail)?;
    let pool = keel_core::db::pool(&s.database_url, 2).await?;
    let mailer = Mailer::new(pool, transport, &s.mail.from)?;
    let (consumed, mailed) = tokio::join!(
        crate::serve(&GROUP, Notification, s, shutdown.clone()),
        mailer.run(shutdown.clone())
    );
    consumed.and(mailed)
}

/// The notification group's effect: one message per customer-facing event.
pub struct Notification;

/// How a customer sees an order id: its last 8 hex digits (order ids are UUIDv7, whose leading
/// digits are a timestamp and alike for orders placed together).
fn short(order_id: Uuid) -> String {
    let hex = order_id.simple().to_string();
    hex[hex.len() - 8..].to_owned()
}

fn money(minor: i64, currency: &str) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let minor = minor.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", minor / 100, minor % 100)
}

/// Kind, subject and body of the message for `event`, if the customer hears about it.
fn compose(event: &Event) -> Option<(&'static str, String, String)> {
    Some(match event {
        Event::OrderCreated(e) => {
            let mut body = format!(
                "Hello {},\n\nthank you for your order {}. You ordered:\n\n",
                e.customer.name,
                short(e.order_id)
            );
            for l in &e.lines {
                body.push_str(&format!(
                    "  {} x {} at {}\n",
                    l.quantity,
                    l.sku,
                    money(l.unit_price_minor, &e.currency)
                ));
            }
            body.push_str(&format!("\nTotal: {}\n", money(e.total_minor, &e.currency)));
            (
                "order-confirmation",
                format!("Your order {} is confirmed", short(e.order_id)),
                body,
            )
        }
        Event::OrderPaid(e) => (
            "payment-receipt",
            format!("Payment received for order {}", short(e.order_id)),
            format!(
                "We received {} for order {} (reference {}).\n",
                money(e.amount_minor, &e.currency),
                short(e.order_id),
                e.payment_reference
            ),
        ),
        Event::OrderCancelled(e) => (
            "cancellation",
            format!("Your order {} was cancelled", short(e.order_id)),
            format!(
                "Order {} was cancelled{}.\n",
                short(e.order_id),
                e.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        ),
        Event::InventoryRejected(e) => {
            let mut body = format!(
                "We are sorry: some items of order {} are out of stock.\n\n",
                short(e.order_id)
            );
            for s in &e.shortages {
                body.push_str(&format!(
                    "  {}: you asked for {}, we have {}\n",
                    s.sku, s.requested, s.available
                ));
            }
            (
                "out-of-stock",
                format!("Items of order {} are out of stock", short(e.order_id)),
                body,
            )
        }
        Event::InventoryReserved(_) => return None,
    })
}

fn customer_of(event: &Event) -> &str {
    match event {
        Event::OrderCreated(e) => &e.customer.id,
        Event::OrderPaid(e) => &e.customer_id,
        Event::OrderCancelled(e) => &e.customer_id,
        Event::InventoryReserved(e) => &e.customer_id,
        Event::InventoryRejected(e) => &e.customer_id,
    }
}

impl Handler for Notification {
    fn wants(&self, event: &Event) -> bool {
        compose(event).is_some()
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        let Some((kind, subject, body)) = compose(event) else {
            return Ok(());
        };
        let customer = customer_of(event);
        if let Event::OrderCreated(e) = event {
            // An order's address never changes: its creation is its one source.
            sqlx::query(
                "INSERT INTO notification.recipients (order_id, email, name) VALUES ($1, $2, $3)
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(e.order_id)
            .bind(&e.customer.email)
            .bind(&e.customer.name)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE notification.messages SET recipient = $2 WHERE order_id = $1 AND recipient IS NULL")
                .bind(e.order_id)
                .bind(&e.customer.email)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO notification.messages (event_id, order_id, customer_id, recipient, kind, subject, body)
             VALUES ($1, $2, $3, (SELECT email FROM notification.recipients WHERE order_id = $2), $4, $5, $6)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.event_id())
        .bind(event.aggregate_id())
        .bind(customer)
        .bind(kind)
        .bind(subject)
        .bind(body)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Where messages go.
pub enum Transport {
    /// One `<event_id>.eml` file per message in the directory, as a file mail backend does.
    Files(PathBuf),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

impl Transport {
    /// SMTP when `smtp_url` (`KEEL_SMTP_URL`) is set, otherwise files in `dir`. The URL:
    /// - `smtp://host[:port]`: plain (port 25), for a relay inside the network;
    /// - `smtp://host[:port]?tls=required`: STARTTLS, and nothing is sent if the server does not
    ///   offer it (port 587);
    /// - `smtps://host[:port]`: TLS from the first byte (port 465).
    ///
    /// `user:password@` before the host logs in (AUTH) with them, percent-decoded; refused over
    /// plain `smtp://`, where they would cross the network in clear. TLS trusts the system's CAs
    /// and `SSL_CERT_FILE`, and checks the certificate names the host. No error shows the
    /// password.
    pub fn from_settings(mail: &keel_core::settings::MailSettings) -> anyhow::Result<Self> {
        let Some(url) = &mail.smtp_url else {
            return Ok(Transport::Files(mail.dir.clone()));
        };
        let shown = keel_core::settings::redact(url);
        const FORMS: &str = "expected smtp://host[:port], smtp://host[:port]?tls=required (STARTTLS) or smtps://host[:port], with user:password@ before the host to log in";
        let parsed = url::Url::parse(url)
            .map_err(|e| anyhow::anyhow!("KEEL_SMTP_URL: {e}; {FORMS} (got {shown:?})"))?;
        let mut tls = None;
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "tls" if tls.is_none() => tls = Some(value.into_owned()),
                _ => anyhow::bail!(
                    "KEEL_SMTP_URL: unknown or repeated parameter {key:?}; {FORMS} (got {shown:?})"
                ),
            }
        }
        let encrypted = match (parsed.scheme(), tls.as_deref()) {
            ("smtp", None) => false,
            ("smtp", Some("required")) | ("smtps", None) => true,
            _ => anyhow::bail!("KEEL_SMTP_URL: {FORMS} (got {shown:?})"),
        };
        let credentials = !parsed.username().is_empty() || parsed.password().is_some();
        if credentials && !encrypted {
            anyhow::bail!(
                "KEEL_SMTP_URL: credentials over plain smtp:// would cross the network in clear; use smtps:// or smtp://...?tls=required (got {shown:?})"
            );
        }
        let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| anyhow::anyhow!("KEEL_SMTP_URL: {e} (got {shown:?})"))?;
        Ok(Transport::Smtp(
            builder.timeout(Some(Duration::from_secs(10))).build(),
        ))
    }

    async fn send(&self, event_id: Uuid, message: &Message) -> anyhow::Result<()> {
        match self {
            Transport::Files(dir) => {
                tokio::fs::create_dir_all(dir).await?;
                let path = dir.join(format!("{event_id}.eml"));
                let tmp = dir.join(format!(".{event_id}.eml.tmp"));
                tokio::fs::write(&tmp, message.formatted()).await?;
                tokio::fs::rename(&tmp, &path).await?;
            }
            Transport::Smtp(smtp) => {
                smtp.send(message.clone()).await?;
            }
        }
        Ok(())
    }
}

/// Delivers committed messages; see the module doc.
pub struct Mailer {
    pool: PgPool,
    transport: Transport,
    from: lettre::message::Mailbox,
    poll_interval: Duration,
}

/// What one delivery step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Sent(Uuid),
    /// Will be retried later.
    Failed(Uuid),
    /// Can never be sent (e.g. a malformed address); set aside.
    Refused(Uuid),
    Idle,
}

impl Mailer {
    pub fn new(pool: PgPool, transport: Transport, from: &str) -> anyhow::Result<Self> {
        let from = from
            .parse()
            .map_err(|e| anyhow::anyhow!("KEEL_MAIL_FROM: {e} (got {from:?})"))?;
        Ok(Self {
            pool,
            transport,
            from,
            poll_interval: Duration::from_millis(250),
        })
    }

    /// Sends the oldest due message, if any.
    pub async fn step(&self) -> Result<Delivery, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT event_id, recipient, subject, body, created_at, attempts FROM notification.messages
              WHERE delivered_at IS NULL AND failed_at IS NULL AND recipient IS NOT NULL AND next_attempt_at <= now()
              ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(Delivery::Idle);
        };
        let event_id: Uuid = row.try_get("event_id")?;
        let attempts: i32 = row.try_get("attempts")?;
        let message = self.build(
            event_id,
            row.try_get("recipient")?,
            row.try_get("subject")?,
            row.try_get("body")?,
            row.try_get("created_at")?,
        );
        let message = match message {
            Ok(m) => m,
            Err(reason) => {
                tracing::error!(%event_id, reason, "Notification can never be sent; set aside");
                sqlx::query("UPDATE notification.messages SET failed_at = now(), last_error = $2 WHERE event_id = $1")
                    .bind(event_id)
                    .bind(&reason)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(Delivery::Refused(event_id));
            }
        };
        // The row stays locked in this transaction while the server answers; PostgreSQL ends a
        // transaction idle for 60 s (keel_core::db::SESSION), which would lose the delivery mark
        // of a mail that went out. A send not answered in time is retried later (same Message-ID).
        let sent =
            match tokio::time::timeout(SEND_LIMIT, self.transport.send(event_id, &message)).await {
                Ok(sent) => sent,
                Err(_) => Err(anyhow::anyhow!(
                    "the mail server did not answer within {} s",
                    SEND_LIMIT.as_secs()
                )),
            };
        match sent {
            Ok(()) => {
                sqlx::query("UPDATE notification.messages SET delivered_at = now(), attempts = attempts + 1, last_error = NULL WHERE event_id = $1")
                    .bind(event_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Delivery::Sent(event_id))
            }
            Err(e) => {
                let delay = Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
                    .delay_for_attempt(attempts.max(0) as u32);
                tracing::warn!(%event_id, attempt = attempts + 1, retry_in_ms = delay.as_millis() as u64, error = %e, "Cannot send a notification; will retry");
                sqlx::query(
                    "UPDATE notification.messages SET attempts = attempts + 1, last_error = $2,
                         next_attempt_at = now() + make_interval(secs => $3) WHERE event_id = $1",
                )
                .bind(event_id)
                .bind(e.to_string())
                .bind(delay.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Delivery::Failed(event_id))
            }
        }
    }

    fn build(
        &self,
        event_id: Uuid,
        recipient: String,
        subject: String,
        body: String,
        created_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Message, String> {
        let to = recipient
            .parse()
            .map_err(|e| format!("recipient {recipient:?}: {e}"))?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{event_id}@keel>")))
            .date(created_at.into())
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| e.to_string())
    }

    /// Delivers until `shutdown`. A database error is logged and retried with backoff.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        while !shutdown.is_cancelled() {
            let wait = match self.step().await {
                Ok(Delivery::Idle) => self.poll_interval,
                Ok(_) => {
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Mailer cannot reach PostgreSQL");
                    delay
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        Ok(())
    }
}
