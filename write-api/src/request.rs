//! What a command request carries besides its path: a JSON body (with the digest that tells an
//! idempotent repeat from a reuse of its key), and the Idempotency-Key, If-Match and
//! X-Request-Id headers.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::problem::ApiError;

/// Idempotency keys longer than this are refused.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A JSON body of type `T`: 415 unless sent as JSON, 413 past the body limit, 400 when it is not
/// JSON, 422 naming the field when it does not fit `T`.
pub struct JsonBody<T> {
    pub value: T,
    /// SHA-256 of the request as `T` reads it, so that key order, spacing and a null spelled as
    /// an absent field do not make the same request look different to an idempotency key.
    pub digest: String,
}

impl<T: DeserializeOwned + Serialize, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !(essence == "application/json" || essence.ends_with("+json")) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            _ => ApiError::BadRequest(rejection.body_text()),
        })?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
        let value: T = serde_path_to_error::deserialize(&json).map_err(|e| field_error(&e))?;
        let typed = serde_json::to_vec(&value).expect("request bodies serialize");
        Ok(JsonBody { digest: format!("{:x}", Sha256::digest(&typed)), value })
    }
}

/// Names the field a deserialization error is about: its path (which for an unknown field ends
/// in that field), or for a missing field the name serde quotes in backticks.
fn field_error(error: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let message = error.inner().to_string();
    let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
    let path = error.path().to_string();
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
    let field = match (missing, path.as_str()) {
        (Some(name), ".") => name.to_owned(),
        (Some(name), parent) => format!("{parent}.{name}"),
        (None, ".") => "body".to_owned(),
        (None, _) => path,
    };
    ApiError::invalid(field, message)
}

/// The command headers and where the request went.
pub struct CommandHeaders {
    pub idempotency_key: Option<String>,
    pub if_match: Option<u64>,
    pub request_id: Uuid,
    /// Method and path, which scope an idempotency key together with the user.
    pub endpoint: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let text = |name: &str| parts.headers.get(name).map(|v| v.to_str().map(str::trim));
        let idempotency_key = match text("idempotency-key") {
            None => None,
            Some(Ok(key)) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN => Some(key.to_owned()),
            Some(_) => {
                return Err(ApiError::BadRequest("Idempotency-Key must be 1-255 visible characters".into()));
            }
        };
        let if_match = match text("if-match") {
            None => None,
            Some(Ok(value)) => Some(
                value
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .parse()
                    .map_err(|_| ApiError::BadRequest("If-Match must be a quoted version, such as \"3\"".into()))?,
            ),
            Some(Err(_)) => {
                return Err(ApiError::BadRequest("If-Match must be a quoted version, such as \"3\"".into()));
            }
        };
        let request_id = text("x-request-id")
            .and_then(Result::ok)
            .and_then(|id| Uuid::parse_str(id).ok())
            .unwrap_or_else(Uuid::now_v7);
        Ok(CommandHeaders {
            idempotency_key,
            if_match,
            request_id,
            endpoint: format!("{} {}", parts.method, parts.uri.path()),
        })
    }
}
