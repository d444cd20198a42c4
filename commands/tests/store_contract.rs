//! Every case of the event store contract against every adapter, each on a fresh store. Cases
//! that take two stores get a second instance over the same database: as a second process
//! (`twin`), or with every idempotency key expired (`expired`).

use quikapp_commands::store::contract::{self, Store};

macro_rules! contract_suite {
    (one: [$($case:ident),* $(,)?], two: [$(($pair:ident, $options:expr)),* $(,)?]) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let store: Store = contract::fresh_sqlite().await;
                    contract::$case(store).await;
                }
            )*
            $(
                #[tokio::test]
                async fn $pair() {
                    let path = contract::scratch_dir().join("events.db");
                    let store: Store = contract::open_sqlite(&path, Default::default()).await;
                    let second: Store = contract::open_sqlite(&path, $options).await;
                    contract::$pair(store, second).await;
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(store) = contract::fresh_postgres().await else { return };
                    let store: Store = store;
                    contract::$case(store).await;
                }
            )*
            $(
                #[tokio::test]
                async fn $pair() {
                    let Some(url) = contract::fresh_postgres_database().await else { return };
                    let store: Store = contract::open_postgres(&url, Default::default()).await;
                    let second: Store = contract::open_postgres(&url, $options).await;
                    contract::$pair(store, second).await;
                }
            )*
        }
    };
}

contract_suite!(
    one: [
        appends_and_reads_a_stream_in_order,
        a_second_append_at_the_same_version_is_a_conflict,
        an_append_to_an_existing_stream_at_version_zero_is_a_conflict,
        conditions_on_other_streams_guard_the_append,
        an_idempotent_repeat_returns_the_first_reply_and_appends_nothing,
        concurrent_repeats_of_one_idempotency_key_append_once,
        a_keyed_no_op_is_remembered_on_the_versions_it_was_decided_on,
        a_claim_is_exclusive_until_released,
        reading_all_from_a_position_pages_in_order,
        memberships_are_the_events_that_begin_or_end_a_users_membership,
        large_payloads_round_trip,
        a_failed_append_leaves_nothing_behind,
        a_refused_append_does_not_fail_the_appends_committed_with_it,
        a_follower_never_skips_an_event_that_commits_late,
    ],
    two: [
        (two_instances_append_under_contention, Default::default()),
        (idempotency_keys_expire_after_the_retention, contract::no_retention()),
    ]
);
