//! Errors as `application/problem+json` (RFC 9457). Internal details are logged, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quikapp_commands::CommandError;
use quikapp_commands::store::StoreError;
use quikapp_domain::DomainError;
use serde_json::json;

/// Seconds a client should wait before retrying a 429 or 503.
const RETRY_AFTER_UNAVAILABLE: u64 = 1;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400: the body is not JSON, or a header is malformed.
    BadRequest(String),
    /// 401: no token, or a bad one.
    Unauthorized,
    Forbidden(String),
    /// 404: absent, or invisible to the caller.
    NotFound(String),
    /// 405: the path exists, the method does not.
    MethodNotAllowed,
    Conflict(String),
    PreconditionFailed(String),
    PayloadTooLarge,
    UnsupportedMediaType,
    /// 422 naming the field.
    Invalid {
        field: String,
        message: String,
    },
    TooManyRequests {
        retry_after_seconds: u64,
    },
    Unavailable,
    /// 503: the read model has not applied the position the request asked for (X-Min-Position)
    /// within the wait.
    Lagging(String),
    /// 503: the command may or may not have been applied (its commit could not be confirmed in
    /// time); a retry with the same Idempotency-Key answers which.
    OutcomeUnknown,
    Internal,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { field: field.into(), message: message.into() }
    }

    fn parts(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        match self {
            BadRequest(detail) => (StatusCode::BAD_REQUEST, "bad-request", detail.clone()),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required".into()),
            Forbidden(detail) => (StatusCode::FORBIDDEN, "forbidden", detail.clone()),
            NotFound(detail) => (StatusCode::NOT_FOUND, "not-found", detail.clone()),
            MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "this path does not take that method".into())
            }
            Conflict(detail) => (StatusCode::CONFLICT, "conflict", detail.clone()),
            PreconditionFailed(detail) => (StatusCode::PRECONDITION_FAILED, "precondition-failed", detail.clone()),
            PayloadTooLarge => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "the request body is too large".into())
            }
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as application/json".into(),
            ),
            Invalid { field, message } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", format!("{field}: {message}"))
            }
            TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "too many commands; slow down".into())
            }
            Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "a store is unavailable; retry shortly".into())
            }
            Lagging(detail) => (StatusCode::SERVICE_UNAVAILABLE, "position-not-reached", detail.clone()),
            OutcomeUnknown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome-unknown",
                "the command may or may not have been applied; retry with the same Idempotency-Key to learn which"
                    .into(),
            ),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side".into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, detail) = self.parts();
        let mut body = json!({
            "type": format!("urn:quikapp:problem:{slug}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
        });
        if let ApiError::Invalid { field, message } = &self {
            body["errors"] = json!([{ "field": field, "message": message }]);
        }
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        let retry_after = match self {
            ApiError::TooManyRequests { retry_after_seconds } => Some(retry_after_seconds),
            ApiError::Unavailable | ApiError::OutcomeUnknown | ApiError::Lagging(_) => Some(RETRY_AFTER_UNAVAILABLE),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            DomainError::Forbidden(why) => ApiError::Forbidden(why.into()),
            DomainError::Conflict(why) => ApiError::Conflict(why.into()),
            DomainError::Invalid { field, message } => ApiError::invalid(field, message),
            DomainError::InvalidReference { field, message } => ApiError::invalid(field, message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "event store failure");
        match error {
            StoreError::Unavailable(_) => ApiError::Unavailable,
            StoreError::OutcomeUnknown(_) => ApiError::OutcomeUnknown,
            StoreError::Failed(_) => ApiError::Internal,
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Rejected(domain) => domain.into(),
            CommandError::PreconditionFailed { .. } => ApiError::PreconditionFailed(error.to_string()),
            CommandError::NameTaken | CommandError::Contention => ApiError::Conflict(error.to_string()),
            CommandError::IdempotencyKeyReused => {
                ApiError::invalid("Idempotency-Key", "was used before with a different request")
            }
            CommandError::Store(store) => store.into(),
        }
    }
}
