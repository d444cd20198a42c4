//! Upcasting: stored events keep the layout they were written in; reading brings their data up
//! to the current version of their type, one version step at a time.
//!
//! To change a type's layout: bump its version in [`crate::event`] (`Name (schema_version = N) { … }`), add the
//! step from N-1 here, and regenerate `schemas/` (the drift test says when they differ).

use serde_json::Value;

use crate::event::schema_version_of;

/// One step: rewrites the data of `event_type` at version `from` into version `from + 1`.
struct Step {
    event_type: &'static str,
    from: u32,
    apply: fn(&mut Value),
}

const STEPS: &[Step] = &[
    // Version 1 of these wrote "no topic" as ""; version 2 writes null.
    Step { event_type: "ChannelTopicChanged", from: 1, apply: empty_topic_is_null },
    Step { event_type: "ChannelCreated", from: 1, apply: empty_topic_is_null },
];

fn empty_topic_is_null(data: &mut Value) {
    if data.get("topic").and_then(Value::as_str) == Some("") {
        data["topic"] = Value::Null;
    }
}

/// Brings `data`, stored at `schema_version`, up to its type's current version, and answers the
/// version it is to be read as: the current one. Data from a newer writer than this code is
/// left as it is and read as the current version (fields this code does not know are ignored),
/// which is why a deploy upgrades every reader before any writer emits a new version. Events
/// of unknown types keep their version.
pub fn upcast(event_type: &str, schema_version: u32, data: &mut Value) -> u32 {
    let Some(current) = schema_version_of(event_type) else { return schema_version };
    for from in schema_version..current {
        for step in STEPS.iter().filter(|s| s.event_type == event_type && s.from == from) {
            (step.apply)(data);
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::Event;
    use crate::event::ChannelTopicChanged;

    fn decode(event_type: &str, data: Value) -> Event {
        serde_json::from_value(json!({ "type": event_type, "data": data })).expect("decodes")
    }

    #[test]
    fn a_version_1_cleared_topic_reads_as_a_version_2_null_topic() {
        let channel_id = uuid::Uuid::now_v7();
        let mut data = json!({ "channel_id": channel_id, "topic": "" });
        assert_eq!(upcast("ChannelTopicChanged", 1, &mut data), 2);
        assert_eq!(decode("ChannelTopicChanged", data), ChannelTopicChanged { channel_id, topic: None }.into());

        let mut data = json!({ "channel_id": channel_id, "topic": "standups" });
        assert_eq!(upcast("ChannelTopicChanged", 1, &mut data), 2);
        let expected = ChannelTopicChanged { channel_id, topic: Some("standups".into()) };
        assert_eq!(decode("ChannelTopicChanged", data), expected.into());
    }

    #[test]
    fn current_and_newer_versions_are_left_alone_and_read_as_current() {
        let mut data = json!({ "channel_id": uuid::Uuid::now_v7(), "topic": "" });
        let before = data.clone();
        assert_eq!(upcast("ChannelTopicChanged", 2, &mut data), 2);
        assert_eq!(upcast("ChannelTopicChanged", 3, &mut data), 2, "decoded into the current layout");
        assert_eq!(upcast("NotAType", 1, &mut data), 1);
        assert_eq!(data, before);
    }

    #[test]
    fn a_version_1_channel_created_with_an_empty_topic_reads_as_no_topic() {
        let (channel_id, workspace_id, by) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let mut data = json!({ "channel_id": channel_id, "workspace_id": workspace_id, "name": "general",
            "topic": "", "private": false, "created_by": by });
        assert_eq!(upcast("ChannelCreated", 1, &mut data), 2);
        match decode("ChannelCreated", data) {
            Event::ChannelCreated(created) => assert_eq!(created.topic, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fields_a_newer_writer_added_are_ignored_when_decoding() {
        let channel_id = uuid::Uuid::now_v7();
        let data = json!({ "channel_id": channel_id, "topic": null, "set_by": "someone", "extra": [1, 2] });
        assert_eq!(decode("ChannelTopicChanged", data), ChannelTopicChanged { channel_id, topic: None }.into());
    }
}
