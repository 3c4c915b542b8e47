//! `keel` at shutdown, as an operator sees it: the real binary (`keel registry`, which needs
//! only PostgreSQL), signalled.
//!
//! - One SIGTERM: the registry answers what is in progress and exits 0 on its own.
//! - A second SIGTERM while a request holds the graceful shutdown up (it waits on a lock the test
//!   holds): the process exits at once with `keel_core::shutdown::FORCED_EXIT`, with the request
//!   still unanswered. Without the second-signal handling it would wait for the lock for ever.

use std::net::SocketAddr;
use std::time::Duration;

use keel_core::shutdown::FORCED_EXIT;
use keel_core::testkit::{Process, TestDb, eventually, free_port, wait_ready};

/// Start-up includes the registry's migrations on a fresh database, on a busy machine.
const START: Duration = Duration::from_secs(60);
/// A stop that takes longer than this is a stop that does not come.
const STOP: Duration = Duration::from_secs(20);

/// `keel registry` on `db` and a free port, ready.
struct Registry {
    process: Process,
    addr: SocketAddr,
}

impl Registry {
    async fn start(db: &TestDb) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port().expect("a free port")).into();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .arg("registry")
            .env("KEEL_DATABASE_URL", &db.url)
            .env("KEEL_REGISTRY_ADDR", addr.to_string())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        let process = Process::spawn("keel registry", command).expect("keel starts");
        wait_ready(
            &reqwest::Client::new(),
            "keel registry",
            &format!("http://{addr}/ready"),
            START,
            || process.exited(),
        )
        .await
        .expect("keel registry gets ready");
        Self { process, addr }
    }

    fn sigterm(&self) {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.process.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {}", self.process.pid());
    }

    async fn wait_exited(&self, what: &str) {
        eventually(
            what,
            STOP,
            || async move { self.process.exited().then_some(()) },
        )
        .await;
    }

    /// Whether it still accepts connections (it stops accepting when its shutdown begins).
    fn accepts(&self) -> bool {
        std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok()
    }
}

#[tokio::test]
async fn a_sigterm_stops_the_registry_which_exits_0_on_its_own() {
    let db = TestDb::new().await;
    let registry = Registry::start(&db).await;

    registry.sigterm();

    registry
        .wait_exited("keel registry to exit after one SIGTERM")
        .await;
    registry
        .process
        .terminate()
        .expect("keel registry exits 0 after SIGTERM");
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_while_a_request_holds_the_shutdown_up() {
    let db = TestDb::new().await;
    let registry = Registry::start(&db).await;
    // A request that cannot finish while the test holds this lock: the graceful shutdown
    // answers the requests in progress first, so the first SIGTERM cannot end the process.
    let pool = db.pool().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE registry.subject_versions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let request = tokio::spawn(reqwest::get(format!("http://{}/subjects", registry.addr)));
    let db_pool = &pool;
    eventually(
        "the registry's request to wait on the lock",
        STOP,
        || async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(db_pool)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;

    registry.sigterm();
    // The first signal was taken: the shutdown began (the listener is closed), and it waits for
    // the request.
    let shutting_down = &registry;
    eventually(
        "keel registry to stop accepting connections",
        STOP,
        || async move { (!shutting_down.accepts()).then_some(()) },
    )
    .await;
    assert!(
        !registry.process.exited(),
        "exited with a request in progress"
    );

    registry.sigterm();

    registry
        .wait_exited("keel registry to exit after a second SIGTERM")
        .await;
    let exit = registry
        .process
        .terminate()
        .expect_err("a forced exit is not a clean one");
    assert!(
        exit.to_string()
            .ends_with(&format!("exit status: {FORCED_EXIT}")),
        "{exit}"
    );
    let answered = request.await.unwrap();
    assert!(
        answered.is_err(),
        "the request was still in progress when the process exited: {answered:?}"
    );
    lock.rollback().await.unwrap();
}
