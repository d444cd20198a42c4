//! Validation of events against the checked-in schemas, shared by the domain tests.
#![allow(dead_code)]

use std::path::PathBuf;

use quikapp_domain::event::{Envelope, Event, timestamp};
use uuid::Uuid;

pub fn schema_dir() -> PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../schemas")
}

pub fn schema_path(type_name: &str) -> PathBuf {
    schema_dir().join(format!("{type_name}.json"))
}

/// An envelope around `event` with plausible metadata, as JSON.
pub fn envelope_of(event: Event) -> serde_json::Value {
    let envelope = Envelope {
        event_id: Uuid::now_v7(),
        schema_version: event.schema_version(),
        event,
        stream_id: "test-stream".into(),
        stream_version: 1,
        global_position: 1,
        workspace_id: Some(Uuid::now_v7()),
        channel_id: None,
        actor_id: Uuid::now_v7(),
        occurred_at: timestamp::now(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
    };
    serde_json::to_value(envelope).unwrap()
}

/// Validates an envelope against the checked-in schema of its `type`.
pub fn validate(envelope: &serde_json::Value) -> Result<(), String> {
    let type_name = envelope["type"].as_str().ok_or("no type")?;
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path(type_name)).map_err(|e| e.to_string())?).unwrap();
    let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
    let errors: Vec<String> =
        validator.iter_errors(envelope).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}
