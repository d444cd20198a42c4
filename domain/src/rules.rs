//! Value rules of the write API table, shared by the aggregates.

use crate::DomainError;

pub const MAX_MESSAGE_CHARS: usize = 40_000;
pub const MAX_NAME_CHARS: usize = 80;
pub const MAX_TOPIC_CHARS: usize = 250;
pub const MAX_EMOJI_CHARS: usize = 64;

/// Channel names: 1-80 characters of lowercase letters, digits, `-` and `_`.
pub fn channel_name(name: &str) -> Result<(), DomainError> {
    let valid_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || !valid_chars {
        return Err(DomainError::invalid("name", "must be 1-80 characters of a-z, 0-9, - and _"));
    }
    Ok(())
}

/// No free text may hold U+0000: PostgreSQL cannot store it in JSON, and no client means it.
fn no_nul(field: &'static str, text: &str) -> Result<(), DomainError> {
    if text.contains('\0') {
        return Err(DomainError::invalid(field, "must not contain the NUL character (U+0000)"));
    }
    Ok(())
}

/// Free-text names (workspaces, display names): 1-80 characters, not only blanks.
pub fn display_text(field: &'static str, text: &str) -> Result<(), DomainError> {
    if text.trim().is_empty() || text.chars().count() > MAX_NAME_CHARS {
        return Err(DomainError::invalid(field, "must be 1-80 characters and not blank"));
    }
    no_nul(field, text)
}

pub fn topic(topic: &str) -> Result<(), DomainError> {
    if topic.chars().count() > MAX_TOPIC_CHARS {
        return Err(DomainError::invalid("topic", format!("must be at most {MAX_TOPIC_CHARS} characters")));
    }
    no_nul("topic", topic)
}

/// An empty topic is no topic.
pub fn optional_topic(topic: &str) -> Option<String> {
    (!topic.is_empty()).then(|| topic.to_owned())
}

/// Message text: 1-40,000 characters, not only blanks.
pub fn message_text(text: &str) -> Result<(), DomainError> {
    if text.trim().is_empty() || text.chars().count() > MAX_MESSAGE_CHARS {
        return Err(DomainError::invalid("text", format!("must be 1-{MAX_MESSAGE_CHARS} characters and not blank")));
    }
    no_nul("text", text)
}

/// Emoji are names such as `thumbsup` or a single emoji character: no blanks, no slashes.
pub fn emoji(emoji: &str) -> Result<(), DomainError> {
    let valid = !emoji.is_empty()
        && emoji.chars().count() <= MAX_EMOJI_CHARS
        && !emoji.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/');
    if !valid {
        return Err(DomainError::invalid("emoji", "must be 1-64 characters without blanks or slashes"));
    }
    Ok(())
}
