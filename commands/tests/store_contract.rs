//! Every case of the event store contract against every adapter, each on a fresh store.

use quikapp_commands::store::contract::{self, Store};

macro_rules! contract_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let store: Store = contract::fresh_sqlite().await;
                    contract::$case(store).await;
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
        }
    };
}

contract_suite!(
    appends_and_reads_a_stream_in_order,
    a_second_append_at_the_same_version_is_a_conflict,
    an_append_to_an_existing_stream_at_version_zero_is_a_conflict,
    conditions_on_other_streams_guard_the_append,
    an_idempotent_repeat_returns_the_first_reply_and_appends_nothing,
    concurrent_repeats_of_one_idempotency_key_append_once,
    a_claim_is_exclusive_until_released,
    reading_all_from_a_position_pages_in_order,
    large_payloads_round_trip,
    a_failed_append_leaves_nothing_behind,
    a_refused_append_does_not_fail_the_appends_committed_with_it,
    a_follower_never_skips_an_event_that_commits_late,
);
