//! The notification mailer on real PostgreSQL: delivery after commit, the resend after a crash
//! between send and mark, and SMTP.

use std::time::Duration;

use keel_consumers::notification::{self, Delivery, Mailer, Transport};
use keel_core::testkit::{TestDb, unique};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

const FROM: &str = "keel orders <orders@keel.invalid>";

async fn database() -> (TestDb, PgPool) {
    let db = TestDb::new().await;
    keel_core::db::migrate(&db.url, notification::DB_SCHEMA, &notification::MIGRATOR)
        .await
        .unwrap();
    let pool = db.pool().await;
    (db, pool)
}

async fn message(pool: &PgPool, recipient: Option<&str>) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO notification.messages (event_id, order_id, customer_id, recipient, kind, subject, body)
         VALUES ($1, $2, 'c-1', $3, 'order-confirmation', 'Your order is confirmed', 'Thank you.')",
    )
    .bind(id)
    .bind(Uuid::new_v4())
    .bind(recipient)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn delivered(pool: &PgPool, id: Uuid) -> bool {
    sqlx::query_scalar(
        "SELECT delivered_at IS NOT NULL FROM notification.messages WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A mailer sending through the SMTP server on `port` of loopback.
fn smtp_mailer(pool: &PgPool, port: u16) -> Mailer {
    let transport = Transport::from_settings(&keel_core::settings::MailSettings {
        smtp_url: Some(format!("smtp://127.0.0.1:{port}")),
        dir: std::env::temp_dir(),
        from: FROM.into(),
    })
    .unwrap();
    Mailer::new(pool.clone(), transport, FROM).unwrap()
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_resend_after_a_crash_between_send_and_mark_leaves_one_file_with_the_same_message_id() {
    let (_db, pool) = database().await;
    let dir = TempDir(std::env::temp_dir().join(unique("keel-mail")));
    let mailer = Mailer::new(pool.clone(), Transport::Files(dir.0.clone()), FROM).unwrap();
    let unaddressed = message(&pool, None).await;
    let id = message(&pool, Some("ada@example.com")).await;

    assert_eq!(mailer.step().await.unwrap(), Delivery::Sent(id));
    assert!(delivered(&pool, id).await);
    assert_eq!(
        mailer.step().await.unwrap(),
        Delivery::Idle,
        "an unaddressed message waits"
    );
    assert!(!delivered(&pool, unaddressed).await);
    let path = dir.0.join(format!("{id}.eml"));
    let first = std::fs::read_to_string(&path).unwrap();
    assert!(
        first.contains(&format!("Message-ID: <{id}@keel>")),
        "{first}"
    );
    assert!(first.contains("To: ada@example.com"), "{first}");

    // The process died after writing the file but before its mark committed: the mark is gone.
    sqlx::query("UPDATE notification.messages SET delivered_at = NULL WHERE event_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(mailer.step().await.unwrap(), Delivery::Sent(id));
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        1,
        "still one file"
    );
    let again = std::fs::read_to_string(&path).unwrap();
    assert!(again.contains(&format!("Message-ID: <{id}@keel>")));

    // An address the mail library refuses is set aside, not retried forever.
    let bad = message(&pool, Some("not an address")).await;
    assert_eq!(mailer.step().await.unwrap(), Delivery::Refused(bad));
    assert_eq!(mailer.step().await.unwrap(), Delivery::Idle);
}

/// A minimal SMTP server: accepts every message and hands each DATA section to the test.
async fn smtp_sink() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    smtp_sink_delaying_first(Duration::ZERO).await
}

/// [`smtp_sink`] that takes the first message in full and answers it only after `delay`, as a
/// server (or the network) slow after DATA does.
async fn smtp_sink_delaying_first(
    delay: Duration,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let tx = tx.clone();
            let first = first.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await?;
                let mut data: Option<String> = None;
                while let Some(line) = lines.next_line().await? {
                    if let Some(body) = data.as_mut() {
                        if line == "." {
                            let _ = tx.send(data.take().unwrap_or_default());
                            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                                tokio::time::sleep(delay).await;
                            }
                            write.write_all(b"250 queued\r\n").await?;
                        } else {
                            body.push_str(&line);
                            body.push('\n');
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            write.write_all(b"221 bye\r\n").await?;
                            break;
                        }
                        _ => b"250 ok\r\n",
                    };
                    write.write_all(reply).await?;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn smtp_delivery_carries_the_event_id_as_message_id_and_a_dead_server_is_retried_later() {
    let (_db, pool) = database().await;
    let (port, mut received) = smtp_sink().await;
    let id = message(&pool, Some("ada@example.com")).await;

    // Nothing listens on the port any more: the send fails and is scheduled for later.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = closed.local_addr().unwrap().port();
    drop(closed);
    let dead = smtp_mailer(&pool, dead_port);
    assert_eq!(dead.step().await.unwrap(), Delivery::Failed(id));
    let (attempts, later): (i32, bool) = sqlx::query_as(
        "SELECT attempts, next_attempt_at > now() FROM notification.messages WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((attempts, later), (1, true));
    assert_eq!(
        dead.step().await.unwrap(),
        Delivery::Idle,
        "not before its time"
    );

    sqlx::query("UPDATE notification.messages SET next_attempt_at = now() WHERE event_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let live = smtp_mailer(&pool, port);
    assert_eq!(live.step().await.unwrap(), Delivery::Sent(id));
    let data = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(data.contains(&format!("Message-ID: <{id}@keel>")), "{data}");
    assert!(data.contains("Subject: Your order is confirmed"), "{data}");
    assert!(delivered(&pool, id).await);
}

#[test]
fn a_malformed_smtp_url_names_its_key() {
    let err = Transport::from_settings(&keel_core::settings::MailSettings {
        smtp_url: Some("mail.example.com:25".into()),
        dir: std::env::temp_dir(),
        from: FROM.into(),
    })
    .err()
    .unwrap();
    assert!(err.to_string().starts_with("KEEL_SMTP_URL:"), "{err}");
}

// A mail server that takes the connection and never answers: the send is given up after 30 s,
// well before PostgreSQL would end the transaction that holds the row (60 s idle), and the
// message is scheduled again with the reason.
#[tokio::test]
async fn a_mail_server_that_never_answers_is_given_up_in_time_and_retried_later() {
    let (_db, pool) = database().await;
    let id = message(&pool, Some("ada@example.com")).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket); // accepted, never answered
        }
    });
    let mailer = smtp_mailer(&pool, port);
    let step = tokio::time::timeout(Duration::from_secs(55), mailer.step())
        .await
        .expect("the step ends before PostgreSQL's 60 s idle limit");
    assert_eq!(step.unwrap(), Delivery::Failed(id));
    let (attempts, error): (i32, Option<String>) = sqlx::query_as(
        "SELECT attempts, last_error FROM notification.messages WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("did not answer")),
        "{error:?}"
    );
    held.abort();
}

// The promise is at-least-once with a stable Message-ID: a server that took the whole message
// but whose final reply did not come in time may have queued it, and the mailer sends it again
// (there is no way to ask an SMTP server whether it did). The copy carries the same Message-ID,
// by which mail stores and clients drop it.
#[tokio::test]
async fn a_message_whose_final_reply_came_too_late_is_sent_again_with_the_same_message_id() {
    let (_db, pool) = database().await;
    let (port, mut received) = smtp_sink_delaying_first(Duration::from_secs(40)).await;
    let id = message(&pool, Some("ada@example.com")).await;
    let mailer = smtp_mailer(&pool, port);
    assert_eq!(mailer.step().await.unwrap(), Delivery::Failed(id));
    sqlx::query("UPDATE notification.messages SET next_attempt_at = now() WHERE event_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(mailer.step().await.unwrap(), Delivery::Sent(id));
    let mut copies = Vec::new();
    for _ in 0..2 {
        copies.push(
            tokio::time::timeout(Duration::from_secs(10), received.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for copy in &copies {
        assert!(copy.contains(&format!("Message-ID: <{id}@keel>")), "{copy}");
    }
    assert!(delivered(&pool, id).await);
}
