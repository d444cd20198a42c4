//! The write path under faults, against the real stores: a COMMIT whose answer is lost, a
//! writer that stalls holding the log's lock. Clients must get the true outcome, or 503 within
//! seconds, and never a duplicate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use quikapp_commands::store::contract::{self, append_to};
use quikapp_commands::store::postgres::WRITER_LOCK;
use quikapp_commands::store::{AppendError, AppendOutcome, EventStore, StoreError, StoreOptions};
use quikapp_commands::{Command, CommandContext, CommandService};
use quikapp_domain::Event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// What the proxy does to the next COMMIT a client sends.
const PASS: u8 = 0;
/// Let the server commit, then cut the connection before its answer reaches the client.
const CUT_AFTER_COMMIT: u8 = 1;
/// Cut the connection before the COMMIT reaches the server.
const CUT_BEFORE_COMMIT: u8 = 2;

/// A TCP proxy in front of PostgreSQL that can cut one connection at its next COMMIT.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let armed = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(relay(client, server, armed.clone()));
            }
        });
        Proxy { port, mode }
    }

    fn arm(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, server: TcpStream, mode: Arc<AtomicU8>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set just before a COMMIT is passed on: the server's next answer is swallowed, and the
    // connection cut once it came, so the server has committed but the client never hears so.
    let swallow = Arc::new(AtomicU8::new(0));
    let swallowing = swallow.clone();
    let answers = tokio::spawn(async move {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if swallowing.load(Ordering::SeqCst) == 1 || client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buffer[..n];
        // sqlx sends COMMIT as a simple query: 'Q', length, "COMMIT\0".
        let commit = chunk.windows(7).any(|w| w == b"COMMIT\0");
        let cut = if commit { mode.swap(PASS, Ordering::SeqCst) } else { PASS };
        if cut == CUT_BEFORE_COMMIT {
            break;
        }
        if cut == CUT_AFTER_COMMIT {
            swallow.store(1, Ordering::SeqCst);
        }
        if server_write.write_all(chunk).await.is_err() {
            break;
        }
        if cut == CUT_AFTER_COMMIT {
            let _ = (&mut *Box::new(answers)).await;
            return;
        }
    }
    answers.abort();
}

fn upstream_and_url(url: &str, port: u16) -> (String, String) {
    let after_at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    let host_port = after_at.split(['/', '?']).next().unwrap().to_owned();
    (host_port.clone(), url.replacen(&host_port, &format!("127.0.0.1:{port}"), 1))
}

/// A store whose connections all pass through a proxy, and the proxy.
async fn proxied_postgres() -> Option<(Arc<dyn EventStore>, Proxy)> {
    let url = contract::fresh_postgres_database().await?;
    let (upstream, _) = upstream_and_url(&url, 0);
    let proxy = Proxy::start(upstream).await;
    let (_, proxied) = upstream_and_url(&url, proxy.port);
    Some((contract::open_postgres(&proxied, StoreOptions::default()).await, proxy))
}

fn as_user(actor: Uuid) -> CommandContext {
    CommandContext { actor, correlation_id: Uuid::now_v7(), if_match: None, idempotency: None }
}

/// A workspace with a channel, created through `service`.
async fn channel_of(service: &CommandService, owner: Uuid) -> Uuid {
    let ws = service.execute(&as_user(owner), &Command::CreateWorkspace { name: "Acme".into() }).await.unwrap();
    let workspace_id = Uuid::parse_str(ws.ids["workspace_id"].as_str().unwrap()).unwrap();
    let create = Command::CreateChannel { workspace_id, name: "general".into(), private: false, topic: None };
    let channel = service.execute(&as_user(owner), &create).await.unwrap();
    Uuid::parse_str(channel.ids["channel_id"].as_str().unwrap()).unwrap()
}

async fn posted_messages(store: &dyn EventStore) -> usize {
    let all = store.read_all(0, 1_000).await.unwrap();
    all.iter().filter(|e| matches!(e.event, Event::MessagePosted(_))).count()
}

#[tokio::test]
async fn a_commit_whose_answer_is_lost_is_answered_as_the_success_it_was_and_appends_once() {
    let Some((store, proxy)) = proxied_postgres().await else { return };
    let service = CommandService::new(store.clone());
    let owner = Uuid::now_v7();
    let channel_id = channel_of(&service, owner).await;

    proxy.arm(CUT_AFTER_COMMIT);
    let post = Command::PostMessage { channel_id, text: "hello".into(), thread_root_id: None };
    let reply = service.execute(&as_user(owner), &post).await.expect("the commit happened: the answer is success");
    assert_eq!(proxy.mode.load(Ordering::SeqCst), PASS, "the proxy did cut a COMMIT");
    assert!(reply.created);
    assert_eq!(posted_messages(store.as_ref()).await, 1, "one message, not a retried second one");
    assert_eq!(store.head().await.unwrap(), reply.position);
}

#[tokio::test]
async fn a_commit_that_never_reached_the_server_is_answered_unavailable_and_leaves_nothing() {
    let Some((store, proxy)) = proxied_postgres().await else { return };
    let service = CommandService::new(store.clone());
    let owner = Uuid::now_v7();
    let channel_id = channel_of(&service, owner).await;
    let head = store.head().await.unwrap();

    proxy.arm(CUT_BEFORE_COMMIT);
    let post = Command::PostMessage { channel_id, text: "hello".into(), thread_root_id: None };
    let refused = service.execute(&as_user(owner), &post).await;
    assert_eq!(proxy.mode.load(Ordering::SeqCst), PASS, "the proxy did cut a COMMIT");
    assert!(matches!(refused, Err(quikapp_commands::CommandError::Store(StoreError::Unavailable(_)))), "{refused:?}");
    assert_eq!(store.head().await.unwrap(), head, "nothing was appended");
    assert_eq!(posted_messages(store.as_ref()).await, 0);
}

/// Within the lock timeout, with room for a slow machine; the point is that it does not hang.
const BOUND: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_writer_stalled_holding_the_log_lock_makes_appends_unavailable_within_seconds_postgres() {
    let Some(url) = contract::fresh_postgres_database().await else { return };
    let options = StoreOptions { lock_timeout: Duration::from_millis(300), ..StoreOptions::default() };
    let store = contract::open_postgres(&url, options).await;
    let mut stalled = sqlx::PgPool::connect(&url).await.unwrap().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITER_LOCK).execute(&mut *stalled).await.unwrap();

    let outcome = tokio::time::timeout(BOUND, store.append(append_to("s", 0, &["e"]))).await.expect("no hang");
    assert!(matches!(outcome, Err(AppendError::Store(StoreError::Unavailable(_)))), "{outcome:?}");
    stalled.rollback().await.unwrap();
    assert!(matches!(store.append(append_to("s", 0, &["e"])).await, Ok(AppendOutcome::Appended(_))));
}

#[tokio::test]
async fn a_writer_stalled_holding_the_file_lock_makes_appends_unavailable_within_seconds_sqlite() {
    let path = contract::scratch_dir().join("events.db");
    let options = StoreOptions { lock_timeout: Duration::from_millis(300), ..StoreOptions::default() };
    let store = contract::open_sqlite(&path, options).await;
    let other = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    let mut stalled = other.begin_with("BEGIN IMMEDIATE").await.unwrap();

    let outcome = tokio::time::timeout(BOUND, store.append(append_to("s", 0, &["e"]))).await.expect("no hang");
    assert!(matches!(outcome, Err(AppendError::Store(StoreError::Unavailable(_)))), "{outcome:?}");
    sqlx::query("SELECT 1").execute(&mut *stalled).await.unwrap();
    stalled.rollback().await.unwrap();
    assert!(matches!(store.append(append_to("s", 0, &["e"])).await, Ok(AppendOutcome::Appended(_))));
}
