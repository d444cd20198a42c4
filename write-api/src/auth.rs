//! Bearer tokens: HS256 JWTs whose `sub` is the acting user's id.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::problem::ApiError;

/// How long a minted token stays valid.
const TOKEN_LIFETIME_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

/// HS256 needs a key at least as long as its hash (RFC 7518, 3.2): a shorter secret can be guessed.
pub const MIN_SECRET_BYTES: usize = 32;

/// The configured secret cannot sign tokens safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the JWT secret must be at least {MIN_SECRET_BYTES} bytes long (it has {0}); set QUIKAPP_JWT_SECRET")]
pub struct WeakSecret(pub usize);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    /// Issued-at: written on minted tokens, not required of others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    exp: u64,
}

impl Tokens {
    pub fn new(secret: &str) -> Result<Self, WeakSecret> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(WeakSecret(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // Tokens minted elsewhere may name an audience; this service does not check one.
        validation.validate_aud = false;
        Ok(Tokens {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    pub fn mint(&self, user: Uuid) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims { sub: user.to_string(), iat: Some(now), exp: now + TOKEN_LIFETIME_SECONDS };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// The user a token speaks for, if it is valid.
    pub fn verify(&self, token: &str) -> Option<Uuid> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        Uuid::parse_str(&data.claims.sub).ok()
    }
}

/// The acting user, from the request's bearer token; never from the body.
#[derive(Debug, Clone, Copy)]
pub struct Actor(pub Uuid);

/// Anything that can check tokens, so every API's state can authenticate.
pub trait HasTokens {
    fn tokens(&self) -> &Tokens;
}

impl<S: HasTokens + Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        state.tokens().verify(token).map(Actor).ok_or(ApiError::Unauthorized)
    }
}

/// The token of an `Authorization: Bearer …` header, if there is one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let header = headers.get(AUTHORIZATION)?.to_str().ok()?;
    // Auth schemes are case-insensitive (RFC 9110, 11.1).
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
