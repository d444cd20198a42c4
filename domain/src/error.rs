use thiserror::Error;

/// Why the domain refused a command. Refusals append nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    /// The thing does not exist, or the caller may not see it (HTTP 404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller can see the thing but may not do this to it (HTTP 403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The thing's state forbids the command, e.g. an archived channel (HTTP 409).
    #[error("{0}")]
    Conflict(&'static str),
    /// A field of the command is invalid whatever the state (HTTP 422, naming the field).
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// A field names something that does not fit the current state, such as a user who is not
    /// in the workspace (HTTP 422, naming the field). Unlike [`DomainError::Invalid`] it may
    /// change with the state, so a refusal decided on cached state is confirmed on fresh state.
    #[error("{field}: {message}")]
    InvalidReference { field: &'static str, message: &'static str },
}

impl DomainError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { field, message: message.into() }
    }
}
