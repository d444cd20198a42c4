//! Two command services over one store behave like two processes: each caches channel and
//! workspace state, and neither may decide wrongly on what the other changed.

use std::sync::Arc;

use quikapp_commands::store::EventStore;
use quikapp_commands::store::contract;
use quikapp_commands::{Command, CommandContext, CommandError, CommandService, Reply};
use quikapp_domain::DomainError;
use quikapp_domain::workspace::Role;
use uuid::Uuid;

fn as_user(actor: Uuid) -> CommandContext {
    CommandContext { actor, correlation_id: Uuid::now_v7(), if_match: None, idempotency: None }
}

async fn run(service: &CommandService, actor: Uuid, command: Command) -> Result<Reply, CommandError> {
    service.execute(&as_user(actor), &command).await
}

fn id(reply: &Reply, name: &str) -> Uuid {
    Uuid::parse_str(reply.ids[name].as_str().unwrap()).unwrap()
}

async fn another_process_changes_are_never_overtaken_by_a_cached_decision(store: Arc<dyn EventStore>) {
    let (here, there) = (CommandService::new(store.clone()), CommandService::new(store));
    let (owner, member) = (Uuid::now_v7(), Uuid::now_v7());
    let ws = id(&run(&here, owner, Command::CreateWorkspace { name: "Acme".into() }).await.unwrap(), "workspace_id");
    run(&here, owner, Command::AddWorkspaceMember { workspace_id: ws, user_id: member, role: Role::Member })
        .await
        .unwrap();
    let create = Command::CreateChannel { workspace_id: ws, name: "general".into(), private: false, topic: None };
    let channel_id = id(&run(&here, owner, create).await.unwrap(), "channel_id");
    // Both services now hold the channel in their caches.
    run(&here, owner, Command::PostMessage { channel_id, text: "one".into(), thread_root_id: None }).await.unwrap();
    run(&there, owner, Command::PostMessage { channel_id, text: "two".into(), thread_root_id: None }).await.unwrap();

    // A join seen only by `there`: `here` must not refuse the new member on its stale cache.
    run(&there, member, Command::JoinChannel { channel_id, user_id: member }).await.unwrap();
    run(&here, member, Command::PostMessage { channel_id, text: "i am in".into(), thread_root_id: None })
        .await
        .expect("a refusal is confirmed on fresh state");

    // A leave seen only by `there`: joining again through `here` is not the no-op its cache says.
    run(&there, member, Command::LeaveChannel { channel_id, user_id: member }).await.unwrap();
    let rejoined = run(&here, member, Command::JoinChannel { channel_id, user_id: member }).await.unwrap();
    assert_eq!(rejoined.version, 5, "the join was appended");

    // An archive seen only by `there`: `here` must not post into the archived channel.
    run(&there, owner, Command::ArchiveChannel { channel_id }).await.unwrap();
    let late =
        run(&here, owner, Command::PostMessage { channel_id, text: "too late".into(), thread_root_id: None }).await;
    assert_eq!(late, Err(CommandError::Rejected(DomainError::Conflict("the channel is archived"))));

    // If-Match against a version `here` has cached but `there` moved on from.
    let context = CommandContext { if_match: Some(5), ..as_user(member) };
    let leave = Command::LeaveChannel { channel_id, user_id: member };
    let current = here.execute(&context, &leave).await;
    assert!(matches!(current, Err(CommandError::PreconditionFailed { current: 6 })), "{current:?}");
}

#[tokio::test]
async fn on_sqlite() {
    another_process_changes_are_never_overtaken_by_a_cached_decision(contract::fresh_sqlite().await).await;
}

#[tokio::test]
async fn on_postgres() {
    let Some(store) = contract::fresh_postgres().await else { return };
    another_process_changes_are_never_overtaken_by_a_cached_decision(store).await;
}
