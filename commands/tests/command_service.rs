//! The command service's promises about repeats and re-decisions, over a real (embedded) store
//! wrapped to hold requests at the moments that matter or to record what is read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use quikapp_commands::store::contract;
use quikapp_commands::store::{
    AppendError, AppendOutcome, AppendRequest, EventStore, ReplayProgress, StoreError, StoredReply,
};
use quikapp_commands::{Command, CommandContext, CommandError, CommandService, Idempotency, Reply};
use quikapp_domain::workspace::Role;
use quikapp_domain::{DomainError, Envelope};
use tokio::sync::watch;
use uuid::Uuid;

/// A store that records the stream reads, and holds the second idempotency look-up's answer
/// back until an append has committed: the window in which a repeat is checked before its first
/// try commits, and decided after.
struct Observed {
    inner: Arc<dyn EventStore>,
    reads: Mutex<Vec<(String, u64)>>,
    conditions: Mutex<Vec<quikapp_commands::store::StreamCondition>>,
    lookups: AtomicUsize,
    hold_second_lookup: bool,
    appended: watch::Sender<bool>,
}

impl Observed {
    fn new(hold_second_lookup: bool) -> impl std::future::Future<Output = Arc<Self>> {
        async move {
            Arc::new(Observed {
                inner: contract::fresh_sqlite().await,
                reads: Mutex::new(vec![]),
                conditions: Mutex::new(vec![]),
                lookups: AtomicUsize::new(0),
                hold_second_lookup,
                appended: watch::channel(false).0,
            })
        }
    }

    fn take_reads(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.reads.lock().unwrap())
    }
}

#[async_trait]
impl EventStore for Observed {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        *self.conditions.lock().unwrap() = request.conditions.clone();
        let outcome = self.inner.append(request).await;
        self.appended.send_replace(true);
        outcome
    }

    async fn read_stream(&self, stream_id: &str, after_version: u64) -> Result<Vec<Envelope>, StoreError> {
        self.reads.lock().unwrap().push((stream_id.to_owned(), after_version));
        self.inner.read_stream(stream_id, after_version).await
    }

    async fn read_all(&self, after_position: u64, limit: u32) -> Result<Vec<Envelope>, StoreError> {
        self.inner.read_all(after_position, limit).await
    }

    async fn head(&self) -> Result<u64, StoreError> {
        self.inner.head().await
    }

    async fn memberships(&self, user: Uuid, through: u64) -> Result<Vec<Envelope>, StoreError> {
        self.inner.memberships(user, through).await
    }

    async fn idempotent_reply(&self, key: &str) -> Result<Option<StoredReply>, StoreError> {
        let answer = self.inner.idempotent_reply(key).await?;
        if self.hold_second_lookup && self.lookups.fetch_add(1, Ordering::SeqCst) == 1 {
            let mut appended = self.appended.subscribe();
            appended.wait_for(|done| *done).await.unwrap();
        }
        Ok(answer)
    }

    async fn forget_expired_idempotency_keys(&self) -> Result<u64, StoreError> {
        self.inner.forget_expired_idempotency_keys().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn record_replay(&self, model: &str, progress: ReplayProgress) -> Result<(), StoreError> {
        self.inner.record_replay(model, progress).await
    }

    async fn end_replay(&self, model: &str) -> Result<(), StoreError> {
        self.inner.end_replay(model).await
    }

    async fn replays(&self) -> Result<Vec<(String, ReplayProgress, chrono::DateTime<chrono::Utc>)>, StoreError> {
        self.inner.replays().await
    }
}

fn as_user(actor: Uuid) -> CommandContext {
    CommandContext { actor, correlation_id: Uuid::now_v7(), if_match: None, idempotency: None }
}

fn keyed(actor: Uuid, key: &str) -> CommandContext {
    let idempotency = Some(Idempotency { key: format!("{actor}:{key}"), request_hash: "same".into() });
    CommandContext { idempotency, ..as_user(actor) }
}

fn id(reply: &Reply, name: &str) -> Uuid {
    Uuid::parse_str(reply.ids[name].as_str().unwrap()).unwrap()
}

/// A workspace and a public channel of `owner`'s.
async fn channel(service: &CommandService, owner: Uuid) -> Uuid {
    let ws = service.execute(&as_user(owner), &Command::CreateWorkspace { name: "Acme".into() }).await.unwrap();
    let create = Command::CreateChannel {
        workspace_id: id(&ws, "workspace_id"),
        name: "general".into(),
        private: false,
        topic: None,
    };
    id(&service.execute(&as_user(owner), &create).await.unwrap(), "channel_id")
}

/// Two tries of one keyed command; `processes` services share the store. The second try's key
/// look-up answers "not yet" but is held back until the first try has appended.
async fn repeat_while_the_first_is_in_flight(processes: usize) {
    let store = Observed::new(true).await;
    let services: Vec<_> = (0..processes).map(|_| Arc::new(CommandService::new(store.clone()))).collect();
    let owner = Uuid::now_v7();
    let channel_id = channel(&services[0], owner).await;
    store.lookups.store(0, Ordering::SeqCst);
    store.appended.send_replace(false);

    let archive = Command::ArchiveChannel { channel_id };
    let tries = (0..2).map(|i| {
        let (service, archive) = (services[i % processes].clone(), archive.clone());
        tokio::spawn(async move { service.execute(&keyed(owner, "archive-once"), &archive).await })
    });
    let answers: Vec<_> = futures::future::join_all(tries).await.into_iter().map(Result::unwrap).collect();
    let (first, second) = (answers[0].clone(), answers[1].clone());
    let winner = first.clone().or(second.clone()).expect("one try archives");
    assert_eq!((first, second), (Ok(winner.clone()), Ok(winner)), "both answer as the first did, not 409 archived");
}

#[tokio::test]
async fn a_repeat_in_the_same_process_waits_for_the_first_answer() {
    repeat_while_the_first_is_in_flight(1).await;
}

#[tokio::test]
async fn a_repeat_in_another_process_refused_on_new_state_gets_the_first_answer() {
    repeat_while_the_first_is_in_flight(2).await;
}

#[tokio::test]
async fn a_refusal_that_depends_on_state_is_confirmed_on_fresh_state() {
    let store = Observed::new(false).await;
    let (here, there) = (CommandService::new(store.clone()), CommandService::new(store.clone()));
    let (owner, newcomer) = (Uuid::now_v7(), Uuid::now_v7());
    let ws = here.execute(&as_user(owner), &Command::CreateWorkspace { name: "Acme".into() }).await.unwrap();
    let workspace_id = id(&ws, "workspace_id");
    let create = Command::CreateChannel { workspace_id, name: "general".into(), private: false, topic: None };
    let channel_id = id(&here.execute(&as_user(owner), &create).await.unwrap(), "channel_id");
    // `here` has the workspace cached without the newcomer; `there` adds them.
    let add = Command::AddWorkspaceMember { workspace_id, user_id: newcomer, role: Role::Member };
    there.execute(&as_user(owner), &add).await.unwrap();
    let invite = Command::JoinChannel { channel_id, user_id: newcomer };
    here.execute(&as_user(owner), &invite).await.expect("not 422 from the stale cached workspace");
}

#[tokio::test]
async fn a_keyed_no_op_is_remembered_with_its_position() {
    let store = Observed::new(false).await;
    let service = CommandService::new(store.clone());
    let owner = Uuid::now_v7();
    let channel_id = channel(&service, owner).await;
    let post = Command::PostMessage { channel_id, text: "hi".into(), thread_root_id: None };
    let message_id = id(&service.execute(&as_user(owner), &post).await.unwrap(), "message_id");
    let react = Command::AddReaction { channel_id, message_id, emoji: "tada".into() };
    service.execute(&as_user(owner), &react).await.unwrap();

    let no_op = service.execute(&keyed(owner, "react"), &react).await.unwrap();
    service.execute(&as_user(owner), &post).await.unwrap(); // the head moves on
    let repeat = service.execute(&keyed(owner, "react"), &react).await.unwrap();
    assert_eq!(repeat, no_op, "the repeat answers the no-op's position, not the new head");
}

#[tokio::test]
async fn an_invalid_field_is_refused_without_reading_the_store_again() {
    let store = Observed::new(false).await;
    let service = CommandService::new(store.clone());
    let owner = Uuid::now_v7();
    let channel_id = channel(&service, owner).await;
    let post = Command::PostMessage { channel_id, text: "warm the cache".into(), thread_root_id: None };
    service.execute(&as_user(owner), &post).await.unwrap();
    store.take_reads();

    let blank = Command::PostMessage { channel_id, text: "   ".into(), thread_root_id: None };
    let refused = service.execute(&as_user(owner), &blank).await;
    assert!(matches!(refused, Err(CommandError::Rejected(DomainError::Invalid { field: "text", .. }))), "{refused:?}");
    assert_eq!(store.take_reads(), vec![], "decided once, on the cached state");
}

#[tokio::test]
async fn a_stale_cached_state_catches_up_by_reading_only_what_it_missed() {
    let store = Observed::new(false).await;
    let (here, there) = (CommandService::new(store.clone()), CommandService::new(store.clone()));
    let owner = Uuid::now_v7();
    let channel_id = channel(&here, owner).await;
    let post = Command::PostMessage { channel_id, text: "cached".into(), thread_root_id: None };
    here.execute(&as_user(owner), &post).await.unwrap();
    let channel_stream = quikapp_domain::stream::channel(channel_id);
    let cached_version = store.read_stream(&channel_stream, 0).await.unwrap().len() as u64;

    // `there` archives the channel; `here` still holds the older state, is refused by the
    // store's version check, and must catch up from the version it holds.
    there.execute(&as_user(owner), &Command::ArchiveChannel { channel_id }).await.unwrap();
    store.take_reads();
    let refused = here.execute(&as_user(owner), &post).await;
    assert!(matches!(refused, Err(CommandError::Rejected(DomainError::Conflict(_)))), "{refused:?}");
    let channel_reads: Vec<u64> =
        store.take_reads().into_iter().filter(|(s, _)| *s == channel_stream).map(|(_, after)| after).collect();
    assert!(!channel_reads.is_empty());
    assert!(channel_reads.iter().all(|after| *after >= cached_version), "never the whole stream: {channel_reads:?}");
}

#[tokio::test]
async fn a_reply_holds_only_while_its_thread_root_is_unchanged() {
    let store = Observed::new(false).await;
    let service = CommandService::new(store.clone());
    let owner = Uuid::now_v7();
    let channel_id = channel(&service, owner).await;
    let post = Command::PostMessage { channel_id, text: "root".into(), thread_root_id: None };
    let root = id(&service.execute(&as_user(owner), &post).await.unwrap(), "message_id");
    let reply = Command::PostMessage { channel_id, text: "reply".into(), thread_root_id: Some(root) };
    service.execute(&as_user(owner), &reply).await.unwrap();
    let root_condition =
        quikapp_commands::store::StreamCondition { stream_id: quikapp_domain::stream::message(root), version: 1 };
    assert!(store.conditions.lock().unwrap().contains(&root_condition), "a root deleted meanwhile refuses the reply");
}
