//! What integration tests share. Each test gets its own database and its own topics, so tests run
//! in parallel and leave nothing behind; the real PostgreSQL and broker are found through
//! `TEST_DATABASE_URL` and `TEST_KAFKA_BROKERS` (set by `make test`; `mock`: librdkafka's
//! three-broker mock cluster, made in the test process, see [`cluster`]).

pub mod cluster;

use std::future::Future;
use std::time::{Duration, Instant};

use crate::kafka::{self, TopicSpec};

/// The PostgreSQL server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The broker tests use. `make test` starts a dedicated one.
pub fn brokers() -> String {
    if cluster::enabled() {
        return cluster::bootstrap_servers();
    }
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// [`brokers`], as keel's Kafka functions take it.
pub fn kafka() -> kafka::Kafka {
    kafka::Kafka::new(brokers())
}

/// The quirks of the broker tests run against: `KEEL_BROKER_QUIRKS` as `make test` sets it
/// (`tansu` for the broker it starts; unset, Apache Kafka's semantics, for one given in
/// `TEST_KAFKA_BROKERS`).
pub fn broker_quirks() -> crate::settings::BrokerQuirks {
    if cluster::enabled() {
        return crate::settings::BrokerQuirks::None;
    }
    match std::env::var("KEEL_BROKER_QUIRKS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("KEEL_BROKER_QUIRKS={v:?}: {e}")),
        Err(_) => Default::default(),
    }
}

/// The Redis tests use (keys are per-order UUIDs, so tests never collide).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A port nothing listens on, for a service a test or tool starts (and may restart on the same
/// port).
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below the kernel's ephemeral range (32768 and up by default): a port the kernel hands out
    // for an outgoing connection (a stack makes hundreds) could be taken between this check
    // and the service's bind, or while a killed instance is down before it binds its port again
    // (seen in chaos: "KEEL_ADMIN_ADDR: cannot listen on 127.0.0.1:37717: Address already in
    // use"). Each process starts at its own place in the range, so parallel ones rarely meet.
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let port = u16::try_from(FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {FIRST}..{}", FIRST + COUNT)
}

/// The sum of the samples of counter or gauge `name` in a `/metrics` page (Prometheus' text
/// format) whose labels contain `label`, e.g. `outcome="duplicate"` (`""`: every sample).
pub fn metric_sum(page: &str, name: &str, label: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Runs cleanup from `Drop`, which may be inside a runtime and cannot await: on a thread of its
/// own with its own runtime, waiting for it to finish. Failures are ignored (best effort).
fn block_on_thread<F>(cleanup: F)
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(cleanup))
    })
    .join();
}

/// A fresh database, dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let url = format!(
            "{}/{}",
            server_url().trim_end_matches('/'),
            unique("keel_test")
        );
        crate::db::ensure_database(&url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {} is not usable ({e}); is it running?",
                server_url()
            )
        });
        Self { url }
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        crate::db::pool(&self.url, 10)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let url = self.url.clone();
        block_on_thread(async move { crate::db::drop_database(&url).await });
    }
}

/// A topic with a unique name, deleted when dropped.
pub struct TestTopic {
    pub name: String,
}

impl TestTopic {
    /// Takes charge of a topic something else created (e.g. a dead-letter topic), so that it is
    /// deleted when the test ends.
    pub fn adopt(name: String) -> Self {
        Self { name }
    }

    pub async fn new(prefix: &str, partitions: i32) -> Self {
        Self::declare(TopicSpec::new(unique(prefix), partitions)).await
    }

    /// Creates `spec` as `keel topics create` would (a topic of a given name: a dead-letter
    /// topic), if it does not exist yet.
    pub async fn declare(spec: TopicSpec) -> Self {
        let name = spec.name.clone();
        if cluster::enabled() {
            cluster::create_topic(&name, spec.partitions)
                .unwrap_or_else(|e| panic!("create topic on the mock cluster: {e}"));
            return Self { name };
        }
        kafka::create_topics(&kafka(), &[spec])
            .await
            .unwrap_or_else(|e| panic!("create topic {name} on {} ({e}); is the broker running? `make test` starts one", brokers()));
        Self { name }
    }
}

impl Drop for TestTopic {
    fn drop(&mut self) {
        if cluster::enabled() {
            return; // the mock cluster ends with the test process
        }
        if broker_quirks() == crate::settings::BrokerQuirks::Tansu {
            // tansu answers a fetch of a deleted topic with a leader hint and a zero topic id,
            // on which librdkafka crashes the process of a consumer still reading it (one whose
            // test is ending): the topics stay, the broker goes at the end of the run (README,
            // "Brokers").
            return;
        }
        let name = self.name.clone();
        block_on_thread(async move { kafka::delete_topics(&kafka(), &[&name]).await });
    }
}

/// The one polling loop of tests, chaos and the bench: calls `check` every 50 ms until it gives
/// `Some`, or fails naming `what` after `timeout`. An error from `check` ends the wait at once
/// (the thing waited for cannot come: a process exited).
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`poll`] for a test: `check` gives `Some` when the condition holds; panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polled = poll(what, timeout, || {
        let checked = check();
        async move { Ok(checked.await) }
    })
    .await;
    polled.unwrap_or_else(|e| panic!("{e}"))
}

/// [`poll`] for a harness: `check` says whether the condition holds.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    poll(what, timeout, || {
        let checked = check();
        async move { Ok(checked.await?.then_some(())) }
    })
    .await
}

/// Waits until `url` (a service's `/ready`) answers 200, and returns its body. `exited` is asked
/// at every attempt: a process that exited will never be ready, and the wait fails at once.
pub async fn wait_ready(
    http: &reqwest::Client,
    what: &str,
    url: &str,
    timeout: Duration,
    exited: impl Fn() -> bool,
) -> anyhow::Result<String> {
    poll(&format!("{what} to be ready"), timeout, || {
        let request = http.get(url).send();
        let gone = exited();
        async move {
            anyhow::ensure!(!gone, "{what} exited (see its log)");
            Ok(match request.await {
                Ok(r) if r.status().is_success() => r.text().await.ok(),
                _ => None,
            })
        }
    })
    .await
}

/// Reads `topic` from the beginning with a throwaway group until `until` says the records read
/// so far are enough, or panics after `timeout`.
pub async fn read_topic(
    topic: &str,
    timeout: Duration,
    until: impl Fn(&[rdkafka::message::OwnedMessage]) -> bool,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = kafka::consumer_config(&kafka(), &unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut read = Vec::new();
    while !until(&read) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out after {timeout:?} reading {topic}; read {} records",
            read.len()
        );
        if let Ok(Ok(m)) =
            tokio::time::timeout(left.min(Duration::from_millis(500)), consumer.recv()).await
        {
            read.push(m.detach());
        }
    }
    read
}

/// A TCP forwarder to a real server that a test can take down and bring back, to see what a
/// service does while a dependency is unreachable. Down: open connections are cut and new ones
/// are closed at once. Stopped when dropped.
pub struct Outage {
    pub addr: std::net::SocketAddr,
    down: tokio::sync::watch::Sender<bool>,
    frozen: tokio::sync::watch::Sender<bool>,
    answer: tokio::sync::watch::Sender<Option<String>>,
    /// Bumped by [`Outage::cut_open`]: every connection open then is closed.
    cuts: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// How many complete RESP commands (arrays of bulk strings, as every client sends them) `buf`
/// starts with, and the bytes they take.
fn resp_commands(buf: &[u8]) -> (usize, usize) {
    fn line(buf: &[u8], at: usize) -> Option<(i64, usize)> {
        let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(buf.get(at + 1..end)?)
            .ok()?
            .parse()
            .ok()?;
        Some((n, end + 2))
    }
    fn command(buf: &[u8], at: usize) -> Option<usize> {
        if buf.get(at) != Some(&b'*') {
            return None;
        }
        let (parts, mut at) = line(buf, at)?;
        for _ in 0..parts {
            if buf.get(at) != Some(&b'$') {
                return None;
            }
            let (len, body) = line(buf, at)?;
            at = body + usize::try_from(len).ok()? + 2;
            if at > buf.len() {
                return None;
            }
        }
        Some(at)
    }
    let (mut count, mut at) = (0, 0);
    while let Some(next) = command(buf, at) {
        count += 1;
        at = next;
    }
    (count, at)
}

/// Answers every command on `inbound` with the RESP error `answer` holds, until it clears.
async fn answer_with(
    mut inbound: tokio::net::TcpStream,
    mut answer: tokio::sync::watch::Receiver<Option<String>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = tokio::select! {
            read = inbound.read(&mut chunk) => read,
            _ = answer.wait_for(Option::is_none) => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let (commands, used) = resp_commands(&buf);
        buf.drain(..used);
        let Some(error) = answer.borrow().clone() else {
            return;
        };
        let reply = format!("-{error}\r\n").repeat(commands);
        if inbound.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

impl Outage {
    /// Forwards a local port to `target` (`host:port`).
    pub async fn forward(target: &str) -> Self {
        use tokio::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (down, watch) = tokio::sync::watch::channel(false);
        let (frozen, cold) = tokio::sync::watch::channel(false);
        let (answer, answering) = tokio::sync::watch::channel(None::<String>);
        let (cuts, cut) = tokio::sync::watch::channel(0u64);
        let target = target.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watch.borrow() {
                    continue; // dropped: closed at once
                }
                if answering.borrow().is_some() {
                    tokio::spawn(answer_with(inbound, answering.clone()));
                    continue;
                }
                let target = target.clone();
                let mut watch = watch.clone();
                let mut cold = cold.clone();
                let mut answering = answering.clone();
                let mut cut = cut.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let frozen_already = *cold.borrow();
                    if frozen_already {
                        // Accepted and never answered, as by a host that froze.
                        let _ = watch.wait_for(|down| *down).await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let froze = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                        _ = watch.wait_for(|down| *down) => false,
                        _ = answering.wait_for(Option::is_some) => false,
                        _ = cut.changed() => false,
                        _ = cold.wait_for(|frozen| *frozen) => true,
                    };
                    if froze {
                        // Both sockets stay open and silent: no FIN, no RST.
                        let _ = watch.wait_for(|down| *down).await;
                    }
                });
            }
        });
        Self {
            addr,
            down,
            frozen,
            answer,
            cuts,
            task,
        }
    }

    /// Closes every connection open now (new ones are forwarded as before): what a failover
    /// does to the sessions of the server it demotes.
    pub fn cut_open(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn set_down(&self, down: bool) {
        let _ = self.down.send(down);
    }

    /// For a Redis behind the forwarder: with `Some(error)`, open connections are cut and every
    /// command on a new one is answered with the RESP error `error` (`LOADING Redis is loading
    /// the dataset in memory`, as a restarted Redis with persistence answers), which a real
    /// Redis cannot be made to answer on demand; `None` forwards again.
    pub fn answer_redis_error(&self, error: Option<&str>) {
        let _ = self.answer.send(error.map(str::to_owned));
    }

    /// Freezes every connection, open and new: bytes stop flowing both ways and nothing is
    /// closed, as when the host at the other end stops (a VM paused, a process stopped with
    /// SIGSTOP) or the network drops packets without a reset. Lasts until [`Outage::set_down`]
    /// or the drop.
    pub fn freeze(&self) {
        let _ = self.frozen.send(true);
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.set_down(true);
        self.task.abort();
    }
}

/// A child process a test or harness started: SIGKILLed when dropped, whatever happens.
pub struct Process {
    pub name: String,
    child: std::process::Child,
}

impl Process {
    pub fn spawn(name: &str, mut command: std::process::Command) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name} ({command:?}): {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// Whether it has exited, without reaping it (no `&mut`, so a polling closure can ask): its
    /// `/proc` entry is gone or says zombie.
    pub fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state is the first field after the command name's closing parenthesis.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state == "Z" || state == "X"),
            Err(_) => true,
        }
    }

    /// SIGTERM, then waits: an error unless it exited 0.
    pub fn terminate(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "{} exited with {status}", self.name);
        Ok(())
    }

    /// Waits until it exits by itself (poll [`Process::exited`] first: this blocks): how.
    pub fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// SIGKILL (no chance to clean up), then waits.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::{Process, metric_sum, resp_commands};

    #[test]
    fn resp_commands_counts_the_complete_commands_a_buffer_starts_with() {
        let ping = b"*1\r\n$4\r\nPING\r\n";
        let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let both = [&ping[..], &get[..]].concat();
        assert_eq!(resp_commands(&both), (2, both.len()));
        // A command cut anywhere is not counted until the rest arrives.
        for cut in 1..get.len() {
            let partial = [&ping[..], &get[..cut]].concat();
            assert_eq!(resp_commands(&partial), (1, ping.len()), "cut at {cut}");
        }
        assert_eq!(resp_commands(b""), (0, 0));
    }

    #[test]
    fn exited_tells_a_finished_child_from_a_running_one() {
        let running = Process::spawn("sleep", {
            let mut c = std::process::Command::new("sleep");
            c.arg("30");
            c
        })
        .unwrap();
        let finished = Process::spawn("true", std::process::Command::new("true")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !finished.exited() {
            assert!(
                std::time::Instant::now() < deadline,
                "`true` still running after 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!running.exited(), "`sleep 30` reported as exited");
        running.kill9();
    }

    #[test]
    fn metric_sum_adds_the_named_samples_with_the_label() {
        let page = "# HELP keel_consumer_records_total Records.\n\
            # TYPE keel_consumer_records_total counter\n\
            keel_consumer_records_total{group=\"a\",outcome=\"applied\"} 7\n\
            keel_consumer_records_total{group=\"a\",outcome=\"duplicate\"} 2\n\
            keel_consumer_records_total_other{outcome=\"duplicate\"} 100\n\
            keel_consumer_records{outcome=\"duplicate\"} 1000\n";
        assert_eq!(metric_sum(page, "keel_consumer_records_total", ""), 9.0);
        assert_eq!(
            metric_sum(page, "keel_consumer_records_total", "outcome=\"duplicate\""),
            2.0
        );
        assert_eq!(metric_sum(page, "keel_missing_total", ""), 0.0);
    }
}

/// A certificate authority made for one test, and a server certificate it signed for
/// `localhost` and `127.0.0.1`: what a TLS listener of the test presents, and the PEM file a
/// client is told to trust (`SSL_CERT_FILE`, `sslrootcert`). Nothing on the machine trusts it
/// otherwise, so a client that does not take the file refuses the listener. The file is
/// removed when dropped.
pub struct TestCa {
    /// The CA's certificate, PEM.
    pub ca_pem: std::path::PathBuf,
    dir: std::path::PathBuf,
    identity: native_tls::Identity,
}

impl TestCa {
    pub fn new() -> Self {
        Self::make().unwrap_or_else(|e| panic!("making a test certificate authority: {e}"))
    }

    fn make() -> anyhow::Result<Self> {
        use openssl::asn1::Asn1Time;
        use openssl::bn::{BigNum, MsbOption};
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::{PKey, Private};
        use openssl::x509::extension::{
            AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage,
            SubjectAlternativeName, SubjectKeyIdentifier,
        };
        use openssl::x509::{X509, X509NameBuilder};

        let key = || -> anyhow::Result<PKey<Private>> {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
            Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
        };
        let name = |cn: &str| -> anyhow::Result<openssl::x509::X509Name> {
            let mut name = X509NameBuilder::new()?;
            name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
            Ok(name.build())
        };
        let serial = || -> anyhow::Result<openssl::asn1::Asn1Integer> {
            let mut bn = BigNum::new()?;
            bn.rand(63, MsbOption::MAYBE_ZERO, false)?;
            Ok(bn.to_asn1_integer()?)
        };

        let (not_before, not_after) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(2)?);
        let ca_key = key()?;
        let mut ca = X509::builder()?;
        ca.set_version(2)?;
        let ca_serial = serial()?;
        ca.set_serial_number(&ca_serial)?;
        let ca_name = name(&unique("keel test CA"))?;
        ca.set_subject_name(&ca_name)?;
        ca.set_issuer_name(&ca_name)?;
        ca.set_pubkey(&ca_key)?;
        ca.set_not_before(&not_before)?;
        ca.set_not_after(&not_after)?;
        ca.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        ca.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&ca.x509v3_context(None, None))?;
        ca.append_extension(ski)?;
        ca.sign(&ca_key, MessageDigest::sha256())?;
        let ca = ca.build();

        let server_key = key()?;
        let mut server = X509::builder()?;
        server.set_version(2)?;
        let server_serial = serial()?;
        server.set_serial_number(&server_serial)?;
        let server_name = name("localhost")?;
        server.set_subject_name(&server_name)?;
        server.set_issuer_name(ca.subject_name())?;
        server.set_pubkey(&server_key)?;
        server.set_not_before(&not_before)?;
        server.set_not_after(&not_after)?;
        server.append_extension(BasicConstraints::new().build()?)?;
        server.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()?,
        )?;
        server.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&server.x509v3_context(Some(&ca), None))?;
        server.append_extension(san)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(false)
            .build(&server.x509v3_context(Some(&ca), None))?;
        server.append_extension(aki)?;
        server.sign(&ca_key, MessageDigest::sha256())?;
        let server = server.build();

        let dir = std::env::temp_dir().join(unique("keel-ca"));
        std::fs::create_dir_all(&dir)?;
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca.to_pem()?)?;
        let mut chain = server.to_pem()?;
        chain.extend(ca.to_pem()?);
        let identity =
            native_tls::Identity::from_pkcs8(&chain, &server_key.private_key_to_pem_pkcs8()?)?;
        Ok(Self {
            ca_pem,
            dir,
            identity,
        })
    }

    /// A TLS acceptor presenting the server certificate.
    pub fn acceptor(&self) -> tokio_native_tls::TlsAcceptor {
        let acceptor = native_tls::TlsAcceptor::new(self.identity.clone())
            .unwrap_or_else(|e| panic!("TLS acceptor: {e}"));
        tokio_native_tls::TlsAcceptor::from(acceptor)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a client says before its TLS handshake, which [`TlsProxy`] answers as the server would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preamble {
    /// TLS from the first byte (rediss, https, smtps).
    None,
    /// PostgreSQL's SSLRequest (8 bytes: length 8, code 80877103), answered `S`.
    Postgres,
}

/// A TLS-terminating proxy in front of a plain server: accepts TLS with a [`TestCa`]'s
/// certificate on a local port and forwards the decrypted bytes to `target`. It counts the
/// handshakes that completed and those that failed (a client that refused the certificate).
/// Stopped, with every connection it holds, when dropped.
pub struct TlsProxy {
    pub addr: std::net::SocketAddr,
    handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(ca: &TestCa, target: &str, preamble: Preamble) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = ca.acceptor();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (done, bad) = (handshakes.clone(), failed.clone());
        let target = target.to_owned();
        let task = tokio::spawn(async move {
            // Dropped with the accept loop when the proxy is: every connection ends with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (acceptor, target) = (acceptor.clone(), target.clone());
                let (done, bad) = (done.clone(), bad.clone());
                connections.spawn(async move {
                    if preamble == Preamble::Postgres {
                        let mut request = [0u8; 8];
                        if inbound.read_exact(&mut request).await.is_err()
                            || request != SSL_REQUEST
                            || inbound.write_all(b"S").await.is_err()
                        {
                            bad.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        bad.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
                });
                // Reap finished connections so the set does not grow.
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            handshakes,
            failed,
            task,
        }
    }

    /// TLS handshakes that completed.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections that ended before a handshake completed: the client refused the certificate
    /// (or did not ask for TLS).
    pub fn failed_handshakes(&self) -> usize {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
