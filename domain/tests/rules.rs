//! Every rule of the write API table as a given/when/then case: given the events of a stream,
//! when a command is decided, then these events, or this refusal. Every event a rule produces is
//! also checked against its checked-in JSON Schema.

mod schema_check;

use quikapp_domain::channel::{Channel, ChannelChanges, Claims, name_claims};
use quikapp_domain::event::*;
use quikapp_domain::message::{Message, ReadMark};
use quikapp_domain::user::User;
use quikapp_domain::workspace::{Role, Workspace};
use quikapp_domain::{Aggregate, DomainError, Event};
use uuid::Uuid;

/// Folds a stream's events into its state.
fn given<A: Aggregate>(events: impl IntoIterator<Item = Event>) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(&event);
    }
    state
}

#[track_caller]
fn then(decided: Result<Vec<Event>, DomainError>, expected: impl IntoIterator<Item = Event>) {
    let expected: Vec<Event> = expected.into_iter().collect();
    assert_eq!(decided, Ok(expected.clone()));
    for event in expected {
        let envelope = schema_check::envelope_of(event);
        if let Err(errors) = schema_check::validate(&envelope) {
            panic!("{envelope} does not match its schema: {errors}");
        }
    }
}

#[track_caller]
fn then_nothing(decided: Result<Vec<Event>, DomainError>) {
    assert_eq!(decided, Ok(vec![]), "a command that changes nothing appends nothing");
}

#[track_caller]
fn then_refused(decided: Result<Vec<Event>, DomainError>, expected: DomainError) {
    assert_eq!(decided, Err(expected));
}

#[track_caller]
fn then_invalid(decided: Result<Vec<Event>, DomainError>, field: &str) {
    match decided {
        Err(DomainError::Invalid { field: named, .. } | DomainError::InvalidReference { field: named, .. }) => {
            assert_eq!(named, field)
        }
        other => panic!("expected {field} to be refused as invalid, got {other:?}"),
    }
}

/// A workspace with an owner, an admin, two members and an outsider, a public channel that
/// `member` created, a private channel that `owner` created, and a message `member` posted.
struct World {
    ws: Uuid,
    owner: Uuid,
    admin: Uuid,
    member: Uuid,
    other: Uuid,
    outsider: Uuid,
    general: Uuid,
    secret: Uuid,
    message: Uuid,
}

impl World {
    fn new() -> Self {
        let id = Uuid::now_v7;
        World {
            ws: id(),
            owner: id(),
            admin: id(),
            member: id(),
            other: id(),
            outsider: id(),
            general: id(),
            secret: id(),
            message: id(),
        }
    }

    fn workspace(&self) -> Workspace {
        let added =
            |user_id, role| WorkspaceMemberAdded { workspace_id: self.ws, user_id, role, added_by: self.owner }.into();
        given([
            WorkspaceCreated { workspace_id: self.ws, name: "Acme".into(), owner_id: self.owner }.into(),
            added(self.admin, Role::Admin),
            added(self.member, Role::Member),
            added(self.other, Role::Member),
        ])
    }

    fn channel_events(&self, channel_id: Uuid, name: &str, private: bool, creator: Uuid) -> Vec<Event> {
        vec![
            ChannelCreated {
                channel_id,
                workspace_id: self.ws,
                name: name.into(),
                topic: None,
                private,
                created_by: creator,
            }
            .into(),
            ChannelMemberJoined { channel_id, user_id: creator, added_by: creator }.into(),
        ]
    }

    fn general(&self) -> Channel {
        given(self.channel_events(self.general, "general", false, self.member))
    }

    fn general_with(&self, more: impl IntoIterator<Item = Event>) -> Channel {
        given(self.channel_events(self.general, "general", false, self.member).into_iter().chain(more))
    }

    fn secret(&self) -> Channel {
        given(self.channel_events(self.secret, "secret", true, self.owner))
    }

    fn posted(&self) -> Event {
        MessagePosted {
            message_id: self.message,
            channel_id: self.general,
            author_id: self.member,
            text: "hello".into(),
            thread_root_id: None,
        }
        .into()
    }

    fn message(&self) -> Message {
        given([self.posted()])
    }

    fn archived(&self) -> Event {
        ChannelArchived { channel_id: self.general }.into()
    }

    fn joined(&self, user_id: Uuid) -> Event {
        ChannelMemberJoined { channel_id: self.general, user_id, added_by: user_id }.into()
    }
}

// ---------------------------------------------------------------------------------- users

#[test]
fn a_user_sets_a_display_name() {
    let user = Uuid::now_v7();
    then(
        User::default().update_profile(user, "Ada"),
        [UserProfileUpdated { user_id: user, display_name: "Ada".into() }.into()],
    );
}

#[test]
fn setting_the_same_display_name_again_changes_nothing() {
    let user = Uuid::now_v7();
    let profile: User = given([UserProfileUpdated { user_id: user, display_name: "Ada".into() }.into()]);
    then_nothing(profile.update_profile(user, "Ada"));
}

#[test]
fn a_blank_display_name_is_invalid() {
    then_invalid(User::default().update_profile(Uuid::now_v7(), "   "), "display_name");
}

#[test]
fn no_free_text_may_hold_a_nul_character() {
    let w = World::new();
    then_invalid(User::default().update_profile(Uuid::now_v7(), "A\u{0}da"), "display_name");
    then_invalid(Workspace::create(Uuid::now_v7(), "Ac\u{0}me", w.owner), "name");
    then_invalid(
        w.general().change(&w.workspace(), w.member, ChannelChanges { name: None, topic: Some("\u{0}") }),
        "topic",
    );
}

// ----------------------------------------------------------------------------- workspaces

#[test]
fn creating_a_workspace_makes_the_caller_its_owner() {
    let (ws, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let created = Workspace::create(ws, "Acme", owner).unwrap();
    assert_eq!(created, vec![WorkspaceCreated { workspace_id: ws, name: "Acme".into(), owner_id: owner }.into()]);
    assert_eq!(given::<Workspace>(created).role_of(owner), Some(Role::Owner));
}

#[test]
fn a_workspace_needs_a_name() {
    then_invalid(Workspace::create(Uuid::now_v7(), "", Uuid::now_v7()), "name");
}

#[test]
fn an_admin_adds_a_member() {
    let w = World::new();
    let newcomer = Uuid::now_v7();
    then(
        w.workspace().add_member(w.admin, newcomer, Role::Member),
        [WorkspaceMemberAdded { workspace_id: w.ws, user_id: newcomer, role: Role::Member, added_by: w.admin }.into()],
    );
}

#[test]
fn a_plain_member_may_not_add_members() {
    let w = World::new();
    then_refused(
        w.workspace().add_member(w.member, Uuid::now_v7(), Role::Member),
        DomainError::Forbidden("only the workspace owner or an admin may add members"),
    );
}

#[test]
fn an_outsider_cannot_see_the_workspace() {
    let w = World::new();
    then_refused(w.workspace().add_member(w.outsider, w.outsider, Role::Member), DomainError::NotFound("workspace"));
}

#[test]
fn adding_a_member_twice_changes_nothing_but_a_new_role_is_recorded() {
    let w = World::new();
    then_nothing(w.workspace().add_member(w.owner, w.member, Role::Member));
    then(
        w.workspace().add_member(w.owner, w.member, Role::Admin),
        [WorkspaceMemberAdded { workspace_id: w.ws, user_id: w.member, role: Role::Admin, added_by: w.owner }.into()],
    );
}

#[test]
fn nobody_is_made_owner_by_adding() {
    let w = World::new();
    then_invalid(w.workspace().add_member(w.owner, w.member, Role::Owner), "role");
}

// ------------------------------------------------------------------------------- channels

#[test]
fn a_workspace_member_creates_a_channel_and_joins_it() {
    let w = World::new();
    let id = Uuid::now_v7();
    then(
        Channel::create(&w.workspace(), w.member, id, "random", false, Some("anything")),
        [
            ChannelCreated {
                channel_id: id,
                workspace_id: w.ws,
                name: "random".into(),
                topic: Some("anything".into()),
                private: false,
                created_by: w.member,
            }
            .into(),
            ChannelMemberJoined { channel_id: id, user_id: w.member, added_by: w.member }.into(),
        ],
    );
}

#[test]
fn an_outsider_cannot_create_a_channel() {
    let w = World::new();
    then_refused(
        Channel::create(&w.workspace(), w.outsider, Uuid::now_v7(), "x", false, None),
        DomainError::NotFound("workspace"),
    );
}

#[test]
fn channel_names_are_lowercase_letters_digits_dashes_and_underscores() {
    let w = World::new();
    for bad in ["", "General", "has space", "émoji", &"x".repeat(81)] {
        then_invalid(Channel::create(&w.workspace(), w.member, Uuid::now_v7(), bad, false, None), "name");
    }
    for good in ["a", "dev-ops_2", &"x".repeat(80)] {
        assert!(Channel::create(&w.workspace(), w.member, Uuid::now_v7(), good, false, None).is_ok(), "{good}");
    }
}

/// The claims of every event a decision produced.
fn claims_of(workspace_id: Uuid, decided: Result<Vec<Event>, DomainError>) -> Claims {
    let mut all = Claims::default();
    for event in decided.expect("the command is accepted") {
        let claims = name_claims(workspace_id, &event);
        all.take.extend(claims.take);
        all.release.extend(claims.release);
    }
    all
}

#[test]
fn a_new_channel_claims_its_name_in_its_workspace_only() {
    let w = World::new();
    let claims = claims_of(w.ws, Channel::create(&w.workspace(), w.member, Uuid::now_v7(), "general", false, None));
    assert_eq!(claims, Claims { take: vec![format!("channel-name/{}/general", w.ws)], release: vec![] });
    let elsewhere =
        claims_of(Uuid::now_v7(), Channel::create(&w.workspace(), w.member, Uuid::now_v7(), "general", false, None));
    assert_ne!(claims.take, elsewhere.take, "the same name in another workspace is another claim");
}

#[test]
fn a_rename_moves_the_claim_and_a_topic_change_claims_nothing() {
    let w = World::new();
    let renamed = claims_of(
        w.ws,
        w.general().change(&w.workspace(), w.member, ChannelChanges { name: Some("lobby"), topic: None }),
    );
    assert_eq!(
        renamed,
        Claims {
            take: vec![format!("channel-name/{}/lobby", w.ws)],
            release: vec![format!("channel-name/{}/general", w.ws)]
        }
    );
    let topic =
        claims_of(w.ws, w.general().change(&w.workspace(), w.member, ChannelChanges { name: None, topic: Some("t") }));
    assert_eq!(topic, Claims::default());
}

#[test]
fn a_member_renames_the_channel_and_changes_its_topic() {
    let w = World::new();
    then(
        w.general().change(&w.workspace(), w.member, ChannelChanges { name: Some("lobby"), topic: Some("hi") }),
        [
            ChannelRenamed { channel_id: w.general, name: "lobby".into(), previous_name: "general".into() }.into(),
            ChannelTopicChanged { channel_id: w.general, topic: Some("hi".into()) }.into(),
        ],
    );
}

#[test]
fn a_non_member_may_not_change_a_public_channel() {
    let w = World::new();
    then_refused(
        w.general().change(&w.workspace(), w.other, ChannelChanges { name: Some("lobby"), topic: None }),
        DomainError::Forbidden("only channel members may do this"),
    );
}

#[test]
fn a_change_must_name_something_to_change() {
    let w = World::new();
    then_invalid(w.general().change(&w.workspace(), w.member, ChannelChanges::default()), "name");
}

#[test]
fn renaming_to_the_current_name_changes_nothing() {
    let w = World::new();
    then_nothing(w.general().change(&w.workspace(), w.member, ChannelChanges { name: Some("general"), topic: None }));
}

#[test]
fn the_creator_or_an_admin_archives_a_channel_but_not_another_member() {
    let w = World::new();
    let archived = [w.archived()];
    then(w.general().archive(&w.workspace(), w.member), archived.clone());
    then(w.general().archive(&w.workspace(), w.admin), archived);
    then_refused(
        w.general_with([w.joined(w.other)]).archive(&w.workspace(), w.other),
        DomainError::Forbidden("only the channel's creator or a workspace admin may archive it"),
    );
}

#[test]
fn an_archived_channel_refuses_every_command_but_leaving() {
    let w = World::new();
    let ws = w.workspace();
    let channel = w.general_with([w.archived()]);
    let archived = DomainError::Conflict("the channel is archived");
    then_refused(channel.archive(&ws, w.member), archived.clone());
    then_refused(channel.change(&ws, w.member, ChannelChanges { name: Some("x"), topic: None }), archived.clone());
    then_refused(channel.join(&ws, w.other, w.other), archived.clone());
    then_refused(Message::post(&channel, &ws, w.member, Uuid::now_v7(), "hi", None), archived.clone());
    then_refused(w.message().edit(&channel, &ws, w.member, "edited"), archived.clone());
    then_refused(w.message().delete(&channel, &ws, w.member), archived.clone());
    then_refused(w.message().add_reaction(&channel, &ws, w.member, "tada"), archived.clone());
    then_refused(ReadMark::default().mark(&channel, &ws, w.member, &w.message(), 9), archived);
    then(
        channel.leave(&ws, w.member, w.member),
        [ChannelMemberLeft { channel_id: w.general, user_id: w.member, removed_by: w.member }.into()],
    );
}

#[test]
fn a_workspace_member_joins_a_public_channel() {
    let w = World::new();
    then(w.general().join(&w.workspace(), w.other, w.other), [w.joined(w.other)]);
}

#[test]
fn joining_twice_changes_nothing() {
    let w = World::new();
    then_nothing(w.general().join(&w.workspace(), w.member, w.member));
}

#[test]
fn an_outsider_cannot_join() {
    let w = World::new();
    then_refused(w.general().join(&w.workspace(), w.outsider, w.outsider), DomainError::NotFound("channel"));
}

#[test]
fn joining_a_private_channel_uninvited_is_as_if_it_did_not_exist() {
    let w = World::new();
    then_refused(w.secret().join(&w.workspace(), w.member, w.member), DomainError::NotFound("channel"));
}

#[test]
fn a_member_of_a_private_channel_invites_a_workspace_member() {
    let w = World::new();
    then(
        w.secret().join(&w.workspace(), w.owner, w.member),
        [ChannelMemberJoined { channel_id: w.secret, user_id: w.member, added_by: w.owner }.into()],
    );
}

#[test]
fn only_workspace_members_can_be_added_to_a_channel() {
    let w = World::new();
    then_invalid(w.general().join(&w.workspace(), w.member, w.outsider), "user_id");
}

#[test]
fn a_member_leaves_and_an_admin_removes_but_a_member_cannot_remove_another() {
    let w = World::new();
    let channel = w.general_with([w.joined(w.other)]);
    let ws = w.workspace();
    then(
        channel.leave(&ws, w.other, w.other),
        [ChannelMemberLeft { channel_id: w.general, user_id: w.other, removed_by: w.other }.into()],
    );
    then(
        channel.leave(&ws, w.admin, w.other),
        [ChannelMemberLeft { channel_id: w.general, user_id: w.other, removed_by: w.admin }.into()],
    );
    then_refused(
        channel.leave(&ws, w.member, w.other),
        DomainError::Forbidden("only workspace admins may remove other members"),
    );
}

#[test]
fn leaving_a_channel_one_is_not_in_changes_nothing() {
    let w = World::new();
    then_nothing(w.general().leave(&w.workspace(), w.other, w.other));
}

// ------------------------------------------------------------------------------- messages

#[test]
fn a_member_posts_a_message() {
    let w = World::new();
    then(Message::post(&w.general(), &w.workspace(), w.member, w.message, "hello", None), [w.posted()]);
}

#[test]
fn a_non_member_may_not_post() {
    let w = World::new();
    then_refused(
        Message::post(&w.general(), &w.workspace(), w.other, Uuid::now_v7(), "hi", None),
        DomainError::Forbidden("only channel members may do this"),
    );
}

#[test]
fn a_non_member_cannot_see_a_private_channel_to_post_in() {
    let w = World::new();
    then_refused(
        Message::post(&w.secret(), &w.workspace(), w.member, Uuid::now_v7(), "hi", None),
        DomainError::NotFound("channel"),
    );
}

#[test]
fn message_text_is_one_to_forty_thousand_characters() {
    let w = World::new();
    let (channel, ws) = (w.general(), w.workspace());
    for bad in [String::new(), " \n ".into(), "é".repeat(40_001), "nul \u{0} inside".into()] {
        then_invalid(Message::post(&channel, &ws, w.member, Uuid::now_v7(), &bad, None), "text");
    }
    assert!(Message::post(&channel, &ws, w.member, Uuid::now_v7(), &"é".repeat(40_000), None).is_ok());
}

#[test]
fn a_reply_names_a_top_level_message_of_the_same_channel() {
    let w = World::new();
    let (channel, ws, root) = (w.general(), w.workspace(), w.message());
    let reply = Uuid::now_v7();
    then(
        Message::post(&channel, &ws, w.member, reply, "re", Some(&root)),
        [MessagePosted {
            message_id: reply,
            channel_id: w.general,
            author_id: w.member,
            text: "re".into(),
            thread_root_id: Some(w.message),
        }
        .into()],
    );
    let reply_message: Message = given([MessagePosted {
        message_id: reply,
        channel_id: w.general,
        author_id: w.member,
        text: "re".into(),
        thread_root_id: Some(w.message),
    }
    .into()]);
    then_invalid(
        Message::post(&channel, &ws, w.member, Uuid::now_v7(), "re re", Some(&reply_message)),
        "thread_root_id",
    );
    then_invalid(
        Message::post(&channel, &ws, w.member, Uuid::now_v7(), "re", Some(&Message::default())),
        "thread_root_id",
    );
}

#[test]
fn the_author_edits_a_message_and_nobody_else_may() {
    let w = World::new();
    let (channel, ws) = (w.general_with([w.joined(w.other)]), w.workspace());
    then(
        w.message().edit(&channel, &ws, w.member, "hello!"),
        [MessageEdited { message_id: w.message, channel_id: w.general, text: "hello!".into() }.into()],
    );
    then_refused(
        w.message().edit(&channel, &ws, w.other, "mine now"),
        DomainError::Forbidden("only the author may edit a message"),
    );
    then_refused(
        w.message().edit(&channel, &ws, w.admin, "admin edit"),
        DomainError::Forbidden("only the author may edit a message"),
    );
}

#[test]
fn the_author_or_a_workspace_admin_deletes_a_message_but_no_other_member() {
    let w = World::new();
    let (channel, ws) = (w.general_with([w.joined(w.other)]), w.workspace());
    let deleted =
        [MessageDeleted { message_id: w.message, channel_id: w.general, author_id: w.member, thread_root_id: None }
            .into()];
    then(w.message().delete(&channel, &ws, w.member), deleted.clone());
    then(w.message().delete(&channel, &ws, w.admin), deleted);
    then_refused(
        w.message().delete(&channel, &ws, w.other),
        DomainError::Forbidden("only the author or a workspace admin may delete a message"),
    );
}

#[test]
fn a_deleted_message_is_gone_for_every_command() {
    let w = World::new();
    let (channel, ws) = (w.general(), w.workspace());
    let gone: Message = given([
        w.posted(),
        MessageDeleted { message_id: w.message, channel_id: w.general, author_id: w.member, thread_root_id: None }
            .into(),
    ]);
    then_refused(gone.edit(&channel, &ws, w.member, "x"), DomainError::NotFound("message"));
    then_refused(gone.delete(&channel, &ws, w.member), DomainError::NotFound("message"));
    then_refused(gone.add_reaction(&channel, &ws, w.member, "x"), DomainError::NotFound("message"));
}

#[test]
fn a_message_of_another_channel_is_not_found_here() {
    let w = World::new();
    then_refused(w.message().edit(&w.secret(), &w.workspace(), w.owner, "x"), DomainError::NotFound("message"));
}

#[test]
fn a_reaction_added_twice_is_a_no_op_and_removing_an_absent_one_too() {
    let w = World::new();
    let (channel, ws) = (w.general(), w.workspace());
    let added = ReactionAdded { message_id: w.message, channel_id: w.general, user_id: w.member, emoji: "tada".into() };
    then(w.message().add_reaction(&channel, &ws, w.member, "tada"), [added.clone().into()]);
    let reacted: Message = given([w.posted(), added.into()]);
    then_nothing(reacted.add_reaction(&channel, &ws, w.member, "tada"));
    then(
        reacted.remove_reaction(&channel, &ws, w.member, "tada"),
        [ReactionRemoved { message_id: w.message, channel_id: w.general, user_id: w.member, emoji: "tada".into() }
            .into()],
    );
    then_nothing(w.message().remove_reaction(&channel, &ws, w.member, "tada"));
}

#[test]
fn only_channel_members_react_and_emoji_have_no_blanks() {
    let w = World::new();
    let (channel, ws) = (w.general(), w.workspace());
    then_refused(
        w.message().add_reaction(&channel, &ws, w.other, "tada"),
        DomainError::Forbidden("only channel members may do this"),
    );
    then_invalid(w.message().add_reaction(&channel, &ws, w.member, "two words"), "emoji");
}

#[test]
fn a_member_marks_a_channel_read_up_to_a_message_once() {
    let w = World::new();
    let (channel, ws) = (w.general(), w.workspace());
    let marked =
        ChannelReadMarked { channel_id: w.general, user_id: w.member, message_id: w.message, message_position: 7 };
    then(ReadMark::default().mark(&channel, &ws, w.member, &w.message(), 7), [marked.clone().into()]);
    let mark: ReadMark = given([marked.into()]);
    then_nothing(mark.mark(&channel, &ws, w.member, &w.message(), 7));
    then_refused(
        ReadMark::default().mark(&channel, &ws, w.other, &w.message(), 7),
        DomainError::Forbidden("only channel members may do this"),
    );
    then_invalid(ReadMark::default().mark(&channel, &ws, w.member, &Message::default(), 7), "message_id");
}

// ------------------------------------------------- admins manage private channels unseen

/// `secret` with `member` invited and a message of theirs in it; the admin is not a member.
fn secret_with_a_post(w: &World) -> (Channel, Message) {
    let joined = ChannelMemberJoined { channel_id: w.secret, user_id: w.member, added_by: w.owner };
    let channel: Channel =
        given(w.channel_events(w.secret, "secret", true, w.owner).into_iter().chain([joined.into()]));
    let posted = MessagePosted {
        message_id: w.message,
        channel_id: w.secret,
        author_id: w.member,
        text: "psst".into(),
        thread_root_id: None,
    };
    (channel, given([posted.into()]))
}

#[test]
fn a_workspace_admin_archives_a_private_channel_they_are_not_in() {
    let w = World::new();
    let (channel, _) = secret_with_a_post(&w);
    then(channel.archive(&w.workspace(), w.admin), [ChannelArchived { channel_id: w.secret }.into()]);
}

#[test]
fn a_workspace_admin_removes_a_member_of_a_private_channel_they_are_not_in() {
    let w = World::new();
    let (channel, _) = secret_with_a_post(&w);
    then(
        channel.leave(&w.workspace(), w.admin, w.member),
        [ChannelMemberLeft { channel_id: w.secret, user_id: w.member, removed_by: w.admin }.into()],
    );
}

#[test]
fn a_workspace_admin_deletes_a_message_in_a_private_channel_they_are_not_in() {
    let w = World::new();
    let (channel, message) = secret_with_a_post(&w);
    then(
        message.delete(&channel, &w.workspace(), w.admin),
        [MessageDeleted { message_id: w.message, channel_id: w.secret, author_id: w.member, thread_root_id: None }
            .into()],
    );
}

#[test]
fn managing_a_private_channel_stays_invisible_to_members_and_outsiders() {
    let w = World::new();
    let (channel, message) = secret_with_a_post(&w);
    let ws = w.workspace();
    for (who, expected) in [(w.other, "channel"), (w.outsider, "channel")] {
        then_refused(channel.archive(&ws, who), DomainError::NotFound(expected));
        then_refused(channel.leave(&ws, who, w.member), DomainError::NotFound(expected));
        then_refused(message.delete(&channel, &ws, who), DomainError::NotFound(expected));
    }
    // An admin of another workspace is an outsider here.
    let elsewhere: Workspace =
        given([WorkspaceCreated { workspace_id: Uuid::now_v7(), name: "B".into(), owner_id: w.admin }.into()]);
    then_refused(channel.archive(&elsewhere, w.admin), DomainError::NotFound("channel"));
}

#[test]
fn an_admin_leaving_a_private_channel_they_are_not_in_changes_nothing() {
    let w = World::new();
    let (channel, _) = secret_with_a_post(&w);
    then_nothing(channel.leave(&w.workspace(), w.admin, w.admin));
}

#[test]
fn an_empty_topic_clears_the_topic() {
    let w = World::new();
    let with_topic = w.general_with([ChannelTopicChanged { channel_id: w.general, topic: Some("t".into()) }.into()]);
    then(
        with_topic.change(&w.workspace(), w.member, ChannelChanges { name: None, topic: Some("") }),
        [ChannelTopicChanged { channel_id: w.general, topic: None }.into()],
    );
    then_nothing(w.general().change(&w.workspace(), w.member, ChannelChanges { name: None, topic: Some("") }));
}

#[test]
fn leaving_a_private_channel_one_has_left_changes_nothing() {
    let w = World::new();
    then_nothing(w.secret().leave(&w.workspace(), w.member, w.member));
    then_refused(w.secret().leave(&w.workspace(), w.outsider, w.outsider), DomainError::NotFound("channel"));
}
