-- Who each membership event is about (EventStore::memberships): the realtime gateway reads a
-- user's memberships when a connection opens, to know what it may see.
CREATE INDEX IF NOT EXISTS events_membership
    ON events ((coalesce(data->>'user_id', data->>'owner_id')), global_position)
    WHERE event_type IN ('WorkspaceCreated', 'WorkspaceMemberAdded', 'ChannelMemberJoined', 'ChannelMemberLeft');
