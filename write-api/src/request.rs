//! What a command request carries besides its path: a JSON body (with the digest that tells an
//! idempotent repeat from a reuse of its key), and the Idempotency-Key, If-Match and
//! X-Request-Id headers.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, RawPathParams, Request};
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

/// The command headers, and the scope of an idempotency key.
pub struct CommandHeaders {
    pub idempotency_key: Option<String>,
    pub if_match: Option<u64>,
    pub request_id: Uuid,
    /// Method, route template and decoded path parameters: with the user, the scope of an
    /// idempotency key. Re-encoding the path or writing a UUID in capitals names the same scope.
    pub endpoint: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let text = |name: &str| parts.headers.get(name).map(|v| v.to_str().map(str::trim));
        let idempotency_key = match text("idempotency-key") {
            None => None,
            Some(Ok(key)) if is_idempotency_key(key) => Some(key.to_owned()),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "Idempotency-Key must be 1-255 visible ASCII characters (no spaces)".into(),
                ));
            }
        };
        let if_match = match text("if-match") {
            None => None,
            Some(value) => Some(
                value
                    .ok()
                    .and_then(parse_if_match)
                    .ok_or_else(|| ApiError::BadRequest("If-Match must be a quoted version, such as \"3\"".into()))?,
            ),
        };
        let request_id = text("x-request-id")
            .and_then(Result::ok)
            .and_then(|id| Uuid::parse_str(id).ok())
            .unwrap_or_else(Uuid::now_v7);
        Ok(CommandHeaders { idempotency_key, if_match, request_id, endpoint: endpoint(parts, state).await })
    }
}

/// What the served OpenAPI document states as the Idempotency-Key header's pattern.
pub const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,255}$";
/// What the served OpenAPI document states as the If-Match header's pattern: an entity tag
/// holding a version (weak ones and bare numbers are taken as well).
pub const IF_MATCH_PATTERN: &str = "^(W/)?(\"[0-9]{1,19}\"|[0-9]{1,19})$";

fn is_idempotency_key(key: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

fn parse_if_match(value: &str) -> Option<u64> {
    let tag = value.strip_prefix("W/").unwrap_or(value);
    let digits = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(tag);
    let valid = (1..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| digits.parse().ok()).flatten()
}

async fn endpoint<S: Send + Sync>(parts: &mut Parts, state: &S) -> String {
    let template =
        parts.extensions.get::<MatchedPath>().map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let mut scope = format!("{} {template}", parts.method);
    if let Ok(params) = RawPathParams::from_request_parts(parts, state).await {
        for (name, value) in &params {
            let value = Uuid::parse_str(value).map_or_else(|_| value.to_owned(), |id| id.to_string());
            scope.push_str(&format!(" {name}={value}"));
        }
    }
    scope
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_takes_versions_quoted_or_bare() {
        assert_eq!(parse_if_match("\"3\""), Some(3));
        assert_eq!(parse_if_match("W/\"12\""), Some(12));
        assert_eq!(parse_if_match("7"), Some(7));
        for refused in ["null", "\"\"", "\"+2\"", "*", "\"-1\"", "\"99999999999999999999\"", "\"3"] {
            assert_eq!(parse_if_match(refused), None, "{refused}");
        }
    }

    #[test]
    fn the_documented_patterns_say_what_the_parsers_take() {
        let if_match = regex::Regex::new(IF_MATCH_PATTERN).unwrap();
        let key = regex::Regex::new(IDEMPOTENCY_KEY_PATTERN).unwrap();
        for value in
            ["\"3\"", "W/\"12\"", "3", "null", "\"\"", "\"+2\"", "\"9999999999999999999\"", "W/3", "\"3", "3\""]
        {
            assert_eq!(if_match.is_match(value), parse_if_match(value).is_some(), "{value}");
        }
        for value in ["abc", "a b", "", "é", &"k".repeat(255), &"k".repeat(256), "x\ty"] {
            assert_eq!(key.is_match(value), is_idempotency_key(value), "{value:?}");
        }
    }
}
