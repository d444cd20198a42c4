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
    // ChannelTopicChanged v1 wrote a cleared topic as ""; v2 writes null.
    Step {
        event_type: "ChannelTopicChanged",
        from: 1,
        apply: |data| {
            if data.get("topic").and_then(Value::as_str) == Some("") {
                data["topic"] = Value::Null;
            }
        },
    },
];

/// Brings `data`, stored at `schema_version`, up to its type's current version, and answers the
/// version it is now at. Data from a newer writer than this code (a version above the current
/// one) and events of unknown types are left as they are.
pub fn upcast(event_type: &str, schema_version: u32, data: &mut Value) -> u32 {
    let Some(current) = schema_version_of(event_type) else { return schema_version };
    let mut version = schema_version;
    while version < current {
        for step in STEPS.iter().filter(|s| s.event_type == event_type && s.from == version) {
            (step.apply)(data);
        }
        version += 1;
    }
    version
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
    fn current_and_newer_versions_are_left_alone() {
        let mut data = json!({ "channel_id": uuid::Uuid::now_v7(), "topic": "" });
        let before = data.clone();
        assert_eq!(upcast("ChannelTopicChanged", 2, &mut data), 2);
        assert_eq!(upcast("ChannelTopicChanged", 3, &mut data), 3);
        assert_eq!(upcast("NotAType", 1, &mut data), 1);
        assert_eq!(data, before);
    }

    #[test]
    fn fields_a_newer_writer_added_are_ignored_when_decoding() {
        let channel_id = uuid::Uuid::now_v7();
        let data = json!({ "channel_id": channel_id, "topic": null, "set_by": "someone", "extra": [1, 2] });
        assert_eq!(decode("ChannelTopicChanged", data), ChannelTopicChanged { channel_id, topic: None }.into());
    }
}
