//! The compliance suite, run on every projector: the directory on PostgreSQL and in memory,
//! the counters on Redis and in memory.

use std::sync::Arc;

use quikapp_commands::store::contract::{fresh_postgres_database, service_url};
use quikapp_domain::event::timestamp;
use quikapp_domain::{Envelope, Event};
use quikapp_projections::compliance::{self, Cast, scenario};
use quikapp_projections::counters::memory::MemoryKeyspace;
use quikapp_projections::counters::redis::RedisKeyspace;
use quikapp_projections::counters::{Counters, Keys};
use quikapp_projections::directory::memory::MemoryDirectory;
use quikapp_projections::directory::postgres::PostgresDirectory;
use quikapp_projections::directory::Directory;
use serde_json::{Value, json};
use uuid::Uuid;

// ------------------------------------------------------------------ the directory

async fn directory_snapshot(directory: &dyn Directory, c: &Cast) -> Value {
    let mut channels_seen = serde_json::Map::new();
    let mut roles = serde_json::Map::new();
    for (name, user) in [("ada", c.ada), ("bob", c.bob), ("cy", c.cy)] {
        let seen: Vec<String> =
            directory.channels(c.workspace, user).await.unwrap().into_iter().map(|ch| ch.name).collect();
        channels_seen.insert(name.into(), json!(seen));
        roles.insert(name.into(), json!(directory.role(c.workspace, user).await.unwrap()));
    }
    json!({
        "workspace": directory.workspace(c.workspace).await.unwrap(),
        "roles": roles,
        "channels_seen": channels_seen,
        "general": directory.channel(c.general).await.unwrap(),
        "secret": directory.channel(c.secret).await.unwrap(),
        "general_members": directory.members(c.general).await.unwrap(),
        "secret_members": directory.members(c.secret).await.unwrap(),
        "cy_in_secret": directory.is_member(c.secret, c.cy).await.unwrap(),
        "ada_in_secret": directory.is_member(c.secret, c.ada).await.unwrap(),
    })
}

fn joined_at(events: &[Envelope], channel: Uuid, user: Uuid) -> String {
    let joined = events.iter().rev().find(|e| {
        matches!(&e.event, Event::ChannelMemberJoined(j) if j.channel_id == channel && j.user_id == user)
    });
    timestamp::format(&joined.expect("a join").occurred_at)
}

fn expected_directory(c: &Cast, events: &[Envelope]) -> Value {
    json!({
        "workspace": { "workspace_id": c.workspace, "name": "acme", "owner_id": c.ada, "member_count": 3, "version": 3 },
        "roles": { "ada": "owner", "bob": "member", "cy": "admin" },
        "channels_seen": { "ada": ["secret", "town-square"], "bob": ["town-square"], "cy": ["town-square"] },
        "general": {
            "channel_id": c.general, "workspace_id": c.workspace, "name": "town-square", "topic": null,
            "private": false, "archived": false, "created_by": c.ada, "member_count": 2, "version": 4,
        },
        "secret": {
            "channel_id": c.secret, "workspace_id": c.workspace, "name": "secret", "topic": "plans",
            "private": true, "archived": true, "created_by": c.ada, "member_count": 1, "version": 6,
        },
        "general_members": [
            { "user_id": c.ada, "display_name": "Ada", "joined_at": joined_at(events, c.general, c.ada) },
            { "user_id": c.bob, "display_name": "Bob", "joined_at": joined_at(events, c.general, c.bob) },
        ],
        "secret_members": [
            { "user_id": c.ada, "display_name": "Ada", "joined_at": joined_at(events, c.secret, c.ada) },
        ],
        "cy_in_secret": false,
        "ada_in_secret": true,
    })
}

async fn postgres_directory() -> Option<PostgresDirectory> {
    let url = fresh_postgres_database().await?;
    let directory = PostgresDirectory::connect(&url).await.expect("connect");
    directory.migrate().await.expect("migrate");
    directory.migrate().await.expect("migrating again changes nothing");
    Some(directory)
}

#[tokio::test]
async fn directory_in_memory_complies() {
    for check in 0..3 {
        let (c, first) = (Cast::new(), Arc::new(MemoryDirectory::new()));
        let events = scenario(&c);
        let snapshot = || directory_snapshot(first.as_ref(), &c);
        let expected = expected_directory(&c, &events);
        match check {
            0 => compliance::the_same_batch_twice_changes_nothing(first.as_ref(), &events, snapshot, expected).await,
            1 => {
                let other = first.clone();
                compliance::redelivery_after_a_rebalance_is_refused(first.as_ref(), other.as_ref(), &events, snapshot, expected)
                    .await
            }
            _ => compliance::a_crash_while_applying_leaves_all_or_nothing(first.as_ref(), false, &events, snapshot, expected)
                .await,
        }
    }
}

#[tokio::test]
async fn directory_on_postgres_complies() {
    for check in 0..3 {
        let Some(first) = postgres_directory().await else { return };
        let c = Cast::new();
        let events = scenario(&c);
        let snapshot = || directory_snapshot(&first, &c);
        let expected = expected_directory(&c, &events);
        match check {
            0 => compliance::the_same_batch_twice_changes_nothing(&first, &events, snapshot, expected).await,
            1 => {
                // A second member: another process's pool on the same database.
                let second = PostgresDirectory::with_pool(
                    sqlx::postgres::PgPoolOptions::new().connect_with((*first.pool().connect_options()).clone()).await.unwrap(),
                );
                compliance::redelivery_after_a_rebalance_is_refused(&first, &second, &events, snapshot, expected).await
            }
            _ => compliance::a_crash_while_applying_leaves_all_or_nothing(&first, true, &events, snapshot, expected).await,
        }
    }
}

// ------------------------------------------------------------------ the counters

async fn counters_snapshot(counters: &Counters, c: &Cast) -> Value {
    json!({
        "general": counters.stats(c.general).await.unwrap(),
        "secret": counters.stats(c.secret).await.unwrap(),
        "ada": counters.unread(c.ada).await.unwrap(),
        "bob": counters.unread(c.bob).await.unwrap(),
        "cy": counters.unread(c.cy).await.unwrap(),
    })
}

fn posted_at(events: &[Envelope], message: Uuid) -> String {
    let posted =
        events.iter().find(|e| matches!(&e.event, Event::MessagePosted(p) if p.message_id == message)).expect("posted");
    timestamp::format(&posted.occurred_at)
}

fn expected_counters(c: &Cast, events: &[Envelope]) -> Value {
    let mut ada = vec![json!({ "channel_id": c.general, "unread": 0 }), json!({ "channel_id": c.secret, "unread": 0 })];
    ada.sort_by_key(|u| u["channel_id"].as_str().unwrap().to_owned());
    json!({
        "general": {
            "channel_id": c.general, "message_count": 3, "last_message_at": posted_at(events, c.m4),
            "last_message": { "message_id": c.m4, "author_id": c.ada, "preview": "final words" },
        },
        "secret": {
            "channel_id": c.secret, "message_count": 1, "last_message_at": posted_at(events, c.m5),
            "last_message": { "message_id": c.m5, "author_id": c.ada, "preview": "psst" },
        },
        "ada": ada,
        "bob": [{ "channel_id": c.general, "unread": 1 }],
        "cy": [],
    })
}

async fn redis_counters() -> Option<Counters> {
    let url = service_url("QUIKAPP_REDIS_URL")?;
    let keys = Keys { prefix: format!("test:{}:", Uuid::now_v7()) };
    let keyspace = RedisKeyspace::connect(&url, keys.clone()).await.expect("connect to Redis");
    Some(Counters::new(Arc::new(keyspace), keys))
}

#[tokio::test]
async fn counters_in_memory_comply() {
    for check in 0..3 {
        let c = Cast::new();
        let events = scenario(&c);
        let counters = Counters::new(Arc::new(MemoryKeyspace::new()), Keys::default());
        let snapshot = || counters_snapshot(&counters, &c);
        let expected = expected_counters(&c, &events);
        match check {
            0 => compliance::the_same_batch_twice_changes_nothing(&counters, &events, snapshot, expected).await,
            1 => {
                let other = counters.clone();
                compliance::redelivery_after_a_rebalance_is_refused(&counters, &other, &events, snapshot, expected).await
            }
            _ => compliance::a_crash_while_applying_leaves_all_or_nothing(&counters, false, &events, snapshot, expected)
                .await,
        }
    }
}

#[tokio::test]
async fn counters_on_redis_comply() {
    for check in 0..3 {
        let Some(counters) = redis_counters().await else { return };
        let c = Cast::new();
        let events = scenario(&c);
        let snapshot = || counters_snapshot(&counters, &c);
        let expected = expected_counters(&c, &events);
        match check {
            0 => compliance::the_same_batch_twice_changes_nothing(&counters, &events, snapshot, expected).await,
            1 => {
                // A second member: its own connection to the same keys.
                let url = service_url("QUIKAPP_REDIS_URL").unwrap();
                let keys = counters.keys().clone();
                let other = Counters::new(Arc::new(RedisKeyspace::connect(&url, keys.clone()).await.unwrap()), keys);
                compliance::redelivery_after_a_rebalance_is_refused(&counters, &other, &events, snapshot, expected).await
            }
            _ => compliance::a_crash_while_applying_leaves_all_or_nothing(&counters, true, &events, snapshot, expected).await,
        }
    }
}
