//! The event store contract: one `pub async fn` per promise of [`EventStore`], each taking a
//! fresh store of any adapter. `tests/store_contract.rs` runs every case against every adapter;
//! a new adapter is done when it passes them all. Also here: fresh stores for tests.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use quikapp_domain::event::{MessagePosted, timestamp};
use uuid::Uuid;

use super::{
    AppendError, AppendOutcome, AppendRequest, Appended, EventStore, IdempotencyEntry, NewEvent, PostgresStore,
    SqliteStore, StoreError, StoreOptions, StreamCondition,
};

pub type Store = Arc<dyn EventStore>;

/// An event with recognizable content.
pub fn new_event(text: &str) -> NewEvent {
    let channel_id = Uuid::now_v7();
    NewEvent {
        event_id: Uuid::now_v7(),
        event: MessagePosted {
            message_id: Uuid::now_v7(),
            channel_id,
            author_id: Uuid::now_v7(),
            text: text.into(),
            thread_root_id: None,
        }
        .into(),
        workspace_id: Some(Uuid::now_v7()),
        channel_id: Some(channel_id),
        actor_id: Uuid::now_v7(),
        occurred_at: timestamp::now(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
    }
}

pub fn append_to(stream_id: &str, expected_version: u64, texts: &[&str]) -> AppendRequest {
    AppendRequest {
        stream_id: stream_id.into(),
        expected_version,
        events: texts.iter().map(|text| new_event(text)).collect(),
        ..Default::default()
    }
}

fn unique_stream() -> String {
    format!("test-{}", Uuid::now_v7())
}

#[track_caller]
fn appended(outcome: Result<AppendOutcome, AppendError>) -> Appended {
    match outcome {
        Ok(AppendOutcome::Appended(appended)) => appended,
        other => panic!("expected an append, got {other:?}"),
    }
}

pub async fn appends_and_reads_a_stream_in_order(store: Store) {
    let stream = unique_stream();
    let request = append_to(&stream, 0, &["one", "two", "three"]);
    let sent = request.events.clone();
    let result = appended(store.append(request).await);
    assert_eq!(result, Appended { first_position: 1, last_position: 3, stream_version: 3 });

    let read = store.read_stream(&stream, 0).await.unwrap();
    assert_eq!(read.len(), 3);
    for (i, (envelope, new)) in read.iter().zip(&sent).enumerate() {
        assert_eq!(envelope.stream_version, i as u64 + 1);
        assert_eq!(envelope.global_position, i as u64 + 1);
        assert_eq!(envelope.stream_id, stream);
        assert_eq!((envelope.event_id, &envelope.event, envelope.actor_id), (new.event_id, &new.event, new.actor_id));
        assert_eq!((envelope.workspace_id, envelope.channel_id), (new.workspace_id, new.channel_id));
        assert_eq!((envelope.correlation_id, envelope.causation_id), (new.correlation_id, new.causation_id));
        assert_eq!(envelope.occurred_at, new.occurred_at);
    }
    let tail = store.read_stream(&stream, 1).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.stream_version).collect::<Vec<_>>(), vec![2, 3]);
    appended(store.append(append_to(&stream, 3, &["four"])).await);
    assert_eq!(store.read_stream(&stream, 0).await.unwrap().len(), 4);
    assert!(store.read_stream(&unique_stream(), 0).await.unwrap().is_empty());
}

pub async fn a_second_append_at_the_same_version_is_a_conflict(store: Store) {
    let stream = unique_stream();
    let racers = (0..16).map(|i| {
        let store = store.clone();
        let request = append_to(&stream, 0, &[&format!("racer {i}")]);
        tokio::spawn(async move { store.append(request).await })
    });
    let outcomes: Vec<_> = futures::future::join_all(racers).await.into_iter().map(Result::unwrap).collect();
    let winners = outcomes.iter().filter(|o| matches!(o, Ok(AppendOutcome::Appended(_)))).count();
    let conflicts = outcomes
        .iter()
        .filter(|o| matches!(o, Err(AppendError::WrongExpectedVersion { expected: 0, actual: 1, .. })))
        .count();
    assert_eq!((winners, conflicts), (1, 15), "{outcomes:?}");
    assert_eq!(store.read_stream(&stream, 0).await.unwrap().len(), 1);
    assert_eq!(store.head().await.unwrap(), 1);
}

pub async fn an_append_to_an_existing_stream_at_version_zero_is_a_conflict(store: Store) {
    let stream = unique_stream();
    appended(store.append(append_to(&stream, 0, &["first"])).await);
    let again = store.append(append_to(&stream, 0, &["again"])).await;
    assert!(matches!(again, Err(AppendError::WrongExpectedVersion { expected: 0, actual: 1, .. })), "{again:?}");
    let ahead = store.append(append_to(&stream, 5, &["ahead"])).await;
    assert!(matches!(ahead, Err(AppendError::WrongExpectedVersion { expected: 5, actual: 1, .. })), "{ahead:?}");
}

pub async fn conditions_on_other_streams_guard_the_append(store: Store) {
    let (guard, target) = (unique_stream(), unique_stream());
    appended(store.append(append_to(&guard, 0, &["a", "b"])).await);
    let mut stale = append_to(&target, 0, &["decided on a stale guard"]);
    stale.conditions = vec![StreamCondition { stream_id: guard.clone(), version: 1 }];
    let refused = store.append(stale).await;
    assert!(matches!(refused, Err(AppendError::WrongExpectedVersion { expected: 1, actual: 2, .. })), "{refused:?}");
    assert!(store.read_stream(&target, 0).await.unwrap().is_empty());

    let mut fresh = append_to(&target, 0, &["decided on the current guard"]);
    fresh.conditions = vec![StreamCondition { stream_id: guard, version: 2 }];
    appended(store.append(fresh).await);
}

pub async fn an_idempotent_repeat_returns_the_first_reply_and_appends_nothing(store: Store) {
    let stream = unique_stream();
    let entry = IdempotencyEntry {
        key: format!("key-{}", Uuid::now_v7()),
        request_hash: "hash-a".into(),
        reply: serde_json::json!({"id": 7}),
    };
    let mut first = append_to(&stream, 0, &["once"]);
    first.idempotency = Some(entry.clone());
    let result = appended(store.append(first).await);

    let mut repeat = append_to(&stream, 0, &["once"]);
    repeat.idempotency = Some(entry.clone());
    match store.append(repeat).await {
        Ok(AppendOutcome::Replayed(stored)) => {
            assert_eq!(stored.reply, entry.reply);
            assert_eq!((stored.position, stored.stream_version), (result.last_position, result.stream_version));
        }
        other => panic!("expected the first reply again, got {other:?}"),
    }
    let stored = store.idempotent_reply(&entry.key).await.unwrap().expect("the key is remembered");
    assert_eq!(stored.request_hash, "hash-a");

    let mut reused = append_to(&unique_stream(), 0, &["other body"]);
    reused.idempotency = Some(IdempotencyEntry { request_hash: "hash-b".into(), ..entry });
    assert_eq!(store.append(reused).await, Err(AppendError::IdempotencyKeyReused));
    assert_eq!(store.head().await.unwrap(), 1, "neither the repeat nor the reuse appended");
}

pub async fn concurrent_repeats_of_one_idempotency_key_append_once(store: Store) {
    let key = format!("key-{}", Uuid::now_v7());
    let repeats = (0..8).map(|_| {
        let store = store.clone();
        let mut request = append_to(&unique_stream(), 0, &["same"]);
        request.idempotency =
            Some(IdempotencyEntry { key: key.clone(), request_hash: "h".into(), reply: serde_json::json!({}) });
        tokio::spawn(async move { store.append(request).await })
    });
    let outcomes: Vec<_> = futures::future::join_all(repeats).await.into_iter().map(Result::unwrap).collect();
    let appends = outcomes.iter().filter(|o| matches!(o, Ok(AppendOutcome::Appended(_)))).count();
    let replays = outcomes.iter().filter(|o| matches!(o, Ok(AppendOutcome::Replayed(_)))).count();
    assert_eq!((appends, replays), (1, 7), "{outcomes:?}");
    assert_eq!(store.head().await.unwrap(), 1);
}

pub async fn a_claim_is_exclusive_until_released(store: Store) {
    let (owner, rival) = (unique_stream(), unique_stream());
    let claim = format!("name-{}", Uuid::now_v7());
    let mut take = append_to(&owner, 0, &["take"]);
    take.claims = vec![claim.clone()];
    appended(store.append(take).await);

    let mut steal = append_to(&rival, 0, &["steal"]);
    steal.claims = vec![claim.clone()];
    assert_eq!(store.append(steal.clone()).await, Err(AppendError::ClaimTaken { claim: claim.clone() }));
    assert!(store.read_stream(&rival, 0).await.unwrap().is_empty());

    let mut keep = append_to(&owner, 1, &["the owner claims again"]);
    keep.claims = vec![claim.clone()];
    appended(store.append(keep).await);

    let mut release = append_to(&owner, 2, &["release"]);
    release.releases = vec![claim.clone()];
    appended(store.append(release).await);
    appended(store.append(steal).await);
}

pub async fn reading_all_from_a_position_pages_in_order(store: Store) {
    let streams: Vec<String> = (0..3).map(|_| unique_stream()).collect();
    for round in 0..4 {
        for stream in &streams {
            appended(store.append(append_to(stream, round, &["e"])).await);
        }
    }
    assert_eq!(store.head().await.unwrap(), 12);
    let page = store.read_all(5, 4).await.unwrap();
    assert_eq!(page.iter().map(|e| e.global_position).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
    let all = store.read_all(0, 100).await.unwrap();
    assert_eq!(all.len(), 12);
    assert!(all.windows(2).all(|w| w[1].global_position == w[0].global_position + 1));
    assert!(store.read_all(12, 10).await.unwrap().is_empty());
}

/// Joins, leaves and workspace memberships of one user, up to a position, and nothing else.
pub async fn memberships_are_the_events_that_begin_or_end_a_users_membership(store: Store) {
    use quikapp_domain::Event;
    use quikapp_domain::event::{ChannelMemberJoined, ChannelMemberLeft, WorkspaceCreated, WorkspaceMemberAdded};
    use quikapp_domain::workspace::Role;
    let (user, other, workspace, channel) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let events: Vec<Event> = vec![
        WorkspaceCreated { workspace_id: workspace, name: "w".into(), owner_id: other }.into(),
        WorkspaceMemberAdded { workspace_id: workspace, user_id: user, role: Role::Member, added_by: other }.into(),
        ChannelMemberJoined { channel_id: channel, user_id: other, added_by: other }.into(),
        ChannelMemberJoined { channel_id: channel, user_id: user, added_by: other }.into(),
        new_event("a message").event,
        ChannelMemberLeft { channel_id: channel, user_id: user, removed_by: user }.into(),
        WorkspaceCreated { workspace_id: Uuid::now_v7(), name: "v".into(), owner_id: user }.into(),
    ];
    let request = AppendRequest {
        stream_id: unique_stream(),
        expected_version: 0,
        events: events.into_iter().map(|event| NewEvent { event, ..new_event("") }).collect(),
        ..Default::default()
    };
    let first = appended(store.append(request).await).first_position;
    let positions =
        |events: Vec<quikapp_domain::Envelope>| events.iter().map(|e| e.global_position - first).collect::<Vec<_>>();
    assert_eq!(positions(store.memberships(user, first + 6).await.unwrap()), [1, 3, 5, 6]);
    assert_eq!(positions(store.memberships(user, first + 5).await.unwrap()), [1, 3, 5]);
    assert_eq!(positions(store.memberships(other, first + 6).await.unwrap()), [0, 2]);
    assert!(store.memberships(Uuid::now_v7(), first + 6).await.unwrap().is_empty());
}

pub async fn large_payloads_round_trip(store: Store) {
    let stream = unique_stream();
    let text = "é🎉\"\\\n\t".repeat(40_000 / 6) + "end";
    appended(store.append(append_to(&stream, 0, &[&text, &text])).await);
    let read = store.read_stream(&stream, 0).await.unwrap();
    for envelope in read {
        match envelope.event {
            quikapp_domain::Event::MessagePosted(posted) => assert_eq!(posted.text, text),
            other => panic!("unexpected {other:?}"),
        }
    }
}

pub async fn a_failed_append_leaves_nothing_behind(store: Store) {
    let (stream, guard) = (unique_stream(), unique_stream());
    let claim = format!("name-{}", Uuid::now_v7());
    let key = format!("key-{}", Uuid::now_v7());
    let mut doomed = append_to(&stream, 0, &["a", "b", "c"]);
    doomed.claims = vec![claim.clone()];
    doomed.conditions = vec![StreamCondition { stream_id: guard, version: 3 }];
    doomed.idempotency =
        Some(IdempotencyEntry { key: key.clone(), request_hash: "h".into(), reply: serde_json::json!({}) });
    assert!(matches!(store.append(doomed).await, Err(AppendError::WrongExpectedVersion { .. })));

    assert_eq!(store.head().await.unwrap(), 0);
    assert!(store.read_stream(&stream, 0).await.unwrap().is_empty());
    assert_eq!(store.idempotent_reply(&key).await.unwrap(), None, "a failed append is not remembered");
    let mut rival = append_to(&unique_stream(), 0, &["the claim is still free"]);
    rival.claims = vec![claim];
    appended(store.append(rival).await);

    let empty = append_to(&unique_stream(), 0, &[]);
    assert!(matches!(store.append(empty).await, Err(AppendError::Invalid(_))));
}

pub async fn a_refused_append_does_not_fail_the_appends_committed_with_it(store: Store) {
    let contested = unique_stream();
    appended(store.append(append_to(&contested, 0, &["taken"])).await);
    let tasks = (0..40).map(|i| {
        let store = store.clone();
        let request = match i % 2 {
            0 => append_to(&contested, 0, &["conflicts"]),
            _ => append_to(&unique_stream(), 0, &["fine"]),
        };
        tokio::spawn(async move { (i, store.append(request).await) })
    });
    for (i, outcome) in futures::future::join_all(tasks).await.into_iter().map(Result::unwrap) {
        match i % 2 {
            0 => assert!(matches!(outcome, Err(AppendError::WrongExpectedVersion { .. })), "{outcome:?}"),
            _ => assert!(matches!(outcome, Ok(AppendOutcome::Appended(_))), "{outcome:?}"),
        }
    }
    assert_eq!(store.head().await.unwrap(), 21);
}

/// Writers append concurrently while a follower polls `read_all` from the last position it saw.
/// It must see every position exactly once and in order: a store whose positions could commit
/// out of order would show the follower a later position first and make it skip the earlier.
pub async fn a_follower_never_skips_an_event_that_commits_late(store: Store) {
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = unique_stream();
                for version in 0..APPENDS as u64 {
                    appended(store.append(append_to(&stream, version, &["e"])).await);
                }
            })
        })
        .collect();
    let total = (WRITERS * APPENDS) as u64;
    let mut seen = HashSet::new();
    let mut last = 0;
    let follow = async {
        while last < total {
            for envelope in store.read_all(last, 7).await.unwrap() {
                assert_eq!(envelope.global_position, last + 1, "the follower skipped a position");
                assert!(seen.insert(envelope.event_id), "an event came twice");
                last = envelope.global_position;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), follow).await.expect("the follower caught up");
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(seen.len() as u64, total);
}

pub async fn a_keyed_no_op_is_remembered_on_the_versions_it_was_decided_on(store: Store) {
    let (stream, guard) = (unique_stream(), unique_stream());
    appended(store.append(append_to(&stream, 0, &["a", "b"])).await);
    appended(store.append(append_to(&guard, 0, &["g"])).await);
    let entry = |hash: &str| IdempotencyEntry {
        key: format!("key-{stream}"),
        request_hash: hash.into(),
        reply: serde_json::json!({"noop": true}),
    };
    let no_op = |guard_version, hash: &str| AppendRequest {
        stream_id: stream.clone(),
        expected_version: 2,
        conditions: vec![StreamCondition { stream_id: guard.clone(), version: guard_version }],
        idempotency: Some(entry(hash)),
        ..Default::default()
    };
    let stale = store.append(no_op(0, "h")).await;
    assert!(matches!(stale, Err(AppendError::WrongExpectedVersion { .. })), "{stale:?}");
    assert_eq!(store.idempotent_reply(&entry("h").key).await.unwrap(), None, "a refused no-op is not remembered");

    let recorded = appended(store.append(no_op(1, "h")).await);
    assert_eq!((recorded.last_position, recorded.stream_version), (3, 2), "the head, and the stream's version");
    appended(store.append(append_to(&stream, 2, &["c"])).await);
    match store.append(no_op(1, "h")).await {
        Ok(AppendOutcome::Replayed(stored)) => {
            assert_eq!((stored.position, stored.stream_version), (3, 2));
            assert_eq!(stored.reply, serde_json::json!({"noop": true}));
        }
        other => panic!("expected the first answer, got {other:?}"),
    }
    assert_eq!(store.append(no_op(1, "other")).await, Err(AppendError::IdempotencyKeyReused));
    assert_eq!(store.head().await.unwrap(), 4, "no-ops append no events");
}

/// Two instances over one database, as two processes: their appends to shared streams race,
/// and the store must still give every stream gap-free versions and the log gap-free positions.
pub async fn two_instances_append_under_contention(store: Store, twin: Store) {
    const WRITERS: u64 = 6;
    const ROUNDS: u64 = 15;
    let streams: Vec<String> = (0..3).map(|_| unique_stream()).collect();
    let writers = (0..WRITERS).map(|w| {
        let store = if w % 2 == 0 { store.clone() } else { twin.clone() };
        let streams = streams.clone();
        tokio::spawn(async move {
            let mut won = 0;
            for round in 0..ROUNDS {
                let stream = &streams[((w + round) % 3) as usize];
                loop {
                    let version = store.read_stream(stream, 0).await.unwrap().len() as u64;
                    match store.append(append_to(stream, version, &["e"])).await {
                        Ok(AppendOutcome::Appended(_)) => break,
                        Err(AppendError::WrongExpectedVersion { .. }) => continue,
                        Err(AppendError::Store(StoreError::Unavailable(why))) => panic!("unavailable: {why}"),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                won += 1;
            }
            won
        })
    });
    let won: u64 = futures::future::join_all(writers).await.into_iter().map(Result::unwrap).sum();
    assert_eq!(won, WRITERS * ROUNDS);
    let all = twin.read_all(0, 10_000).await.unwrap();
    assert_eq!(all.len() as u64, WRITERS * ROUNDS);
    assert!(all.iter().enumerate().all(|(i, e)| e.global_position == i as u64 + 1), "positions are gap-free");
    for stream in &streams {
        let versions: Vec<u64> = store.read_stream(stream, 0).await.unwrap().iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>(), "{stream} has gap-free versions");
    }
    let ids: HashSet<_> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), all.len(), "no event_id twice");
}

/// With a retention of zero every key has expired as soon as it is written: a repeat is a new
/// request, and the cleanup reclaims the old keys.
pub async fn idempotency_keys_expire_after_the_retention(store: Store, expired: Store) {
    let key = format!("key-{}", Uuid::now_v7());
    let keyed = |stream: &str| {
        let mut request = append_to(stream, 0, &["once"]);
        request.idempotency =
            Some(IdempotencyEntry { key: key.clone(), request_hash: "h".into(), reply: serde_json::json!({}) });
        request
    };
    appended(store.append(keyed(&unique_stream())).await);
    assert!(matches!(store.append(keyed(&unique_stream())).await, Ok(AppendOutcome::Replayed(_))));
    assert_eq!(store.forget_expired_idempotency_keys().await.unwrap(), 0, "within the retention");

    assert_eq!(expired.idempotent_reply(&key).await.unwrap(), None, "past the retention the key is forgotten");
    appended(expired.append(keyed(&unique_stream())).await);
    assert!(expired.forget_expired_idempotency_keys().await.unwrap() >= 1);
    assert_eq!(store.head().await.unwrap(), 2);
}

// ------------------------------------------------------------------- stores for tests

/// The URL of a real service from its `QUIKAPP_*` variable. When it is unset the test is skipped
/// with a note, unless `QUIKAPP_REQUIRE_SERVICES=1` (as `./test` and CI set it), where a missing
/// service is a failure rather than a silent pass.
pub fn service_url(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("QUIKAPP_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("{variable} is not set; run the suite with ./test, which starts the services")
        }
        _ => {
            eprintln!("skipped: {variable} is not set (./test starts the services and sets it)");
            None
        }
    }
}

/// An empty embedded store in a file of its own.
pub async fn fresh_sqlite() -> Arc<SqliteStore> {
    let path = std::env::temp_dir().join(format!("quikapp-test-{}.db", Uuid::now_v7()));
    open_sqlite(&path, StoreOptions::default()).await
}

pub async fn open_sqlite(path: &std::path::Path, options: StoreOptions) -> Arc<SqliteStore> {
    let store = SqliteStore::open_with(path, options).await.expect("open SQLite");
    store.migrate().await.expect("migrate SQLite");
    Arc::new(store)
}

/// An empty PostgreSQL store in a database of its own, on the server `QUIKAPP_POSTGRES_URL` names.
pub async fn fresh_postgres() -> Option<Arc<PostgresStore>> {
    let url = fresh_postgres_database().await?;
    Some(open_postgres(&url, StoreOptions::default()).await)
}

pub async fn open_postgres(url: &str, options: StoreOptions) -> Arc<PostgresStore> {
    let store = PostgresStore::connect_with(url, options).await.expect("connect to the test database");
    store.migrate().await.expect("migrate PostgreSQL");
    Arc::new(store)
}

/// Options under which every idempotency key has already expired.
pub fn no_retention() -> StoreOptions {
    StoreOptions { idempotency_retention: std::time::Duration::ZERO, ..StoreOptions::default() }
}

/// Creates an empty database for one test and answers its URL.
pub async fn fresh_postgres_database() -> Option<String> {
    let server = service_url("QUIKAPP_POSTGRES_URL")?;
    let name = format!("quikapp_test_{}", Uuid::now_v7().simple());
    let admin = sqlx::PgPool::connect(&server).await.expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create the test database");
    admin.close().await;
    Some(with_database(&server, &name))
}

fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// Where tests put files of their own.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quikapp-test-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("create a scratch folder");
    dir
}
