//! The JSON Schemas under schemas/ are generated from the Rust event types. This test fails when
//! the two drift apart; `QUIKAPP_BLESS_SCHEMAS=1 cargo test -p quikapp-domain --test schemas`
//! rewrites the files after a deliberate change.

mod schema_check;

use std::fs;

#[test]
fn checked_in_schemas_match_the_event_types() {
    let bless = std::env::var("QUIKAPP_BLESS_SCHEMAS").as_deref() == Ok("1");
    let generated = quikapp_domain::event::schemas();
    assert_eq!(generated.len(), 15, "API.md lists fifteen event types");
    for (type_name, schema) in generated {
        let path = schema_check::schema_path(type_name);
        let schema = sorted(schema);
        if bless {
            fs::write(&path, serde_json::to_string_pretty(&schema).unwrap() + "\n").unwrap();
        }
        let checked_in = fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} is missing", path.display()));
        let checked_in: serde_json::Value = serde_json::from_str(&checked_in).unwrap();
        assert!(
            checked_in == schema,
            "{} differs from the {type_name} type; re-bless it if the change is deliberate",
            path.display()
        );
    }
    let files = fs::read_dir(schema_check::schema_dir()).unwrap().count();
    assert_eq!(files, 15, "schemas/ holds a file for a type that no longer exists");
}

/// The same JSON with every object's keys in order, so the files do not depend on whether a
/// build unifies serde_json's `preserve_order` feature.
fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[test]
fn a_schema_rejects_an_event_with_the_wrong_data() {
    use quikapp_domain::event::{ChannelArchived, MessageEdited};
    let mut envelope = schema_check::envelope_of(ChannelArchived { channel_id: uuid::Uuid::now_v7() }.into());
    assert!(schema_check::validate(&envelope).is_ok());
    envelope["data"] = serde_json::json!({"channel": "not a uuid"});
    assert!(schema_check::validate(&envelope).is_err());
    let edited = schema_check::envelope_of(
        MessageEdited { message_id: uuid::Uuid::now_v7(), channel_id: uuid::Uuid::now_v7(), text: "x".into() }.into(),
    );
    let mut mislabeled = edited.clone();
    mislabeled["type"] = "MessagePosted".into();
    assert!(schema_check::validate(&mislabeled).is_err(), "MessageEdited data is not MessagePosted data");
}
