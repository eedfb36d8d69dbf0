//! Upload tokens: short-lived JWTs the application signs for its users (HS256 with a shared
//! secret, or EdDSA with ferry holding the public key). With a key configured, every tus request
//! must carry one; the upload is bound to the token's subject, and another subject's requests
//! for it get 404.

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{Method, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AppState, error::ApiError};
use crate::uploads::links::LinkQuery;

/// Who is calling, from a verified token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub owner: String,
    /// A smaller size limit for this caller's uploads.
    pub max_size: Option<u64>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    max_size: Option<u64>,
}

pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier(redacted)")
    }
}

impl TokenVerifier {
    /// HS256 with a secret shared with the application.
    pub fn hs256(secret: &str) -> Self {
        Self::with(DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
    }

    /// EdDSA (Ed25519) with the application's public key, PEM-encoded.
    pub fn eddsa(public_key_pem: &[u8]) -> anyhow::Result<Self> {
        Ok(Self::with(DecodingKey::from_ed_pem(public_key_pem)?, Algorithm::EdDSA))
    }

    fn with(key: DecodingKey, algorithm: Algorithm) -> Self {
        // Only the configured algorithm is accepted (no "none", no switching), and `exp` is required.
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self { key, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Caller, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the upload token has expired".to_string(),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "the upload token's signature is invalid".into(),
            _ => format!("the upload token is not valid: {e}"),
        })?;
        Ok(Caller { owner: data.claims.sub, max_size: data.claims.max_size })
    }
}

/// 401, in the request's protocol (a problem document for the IETF draft).
fn unauthorized(request: &Request, message: &str) -> Response {
    let error = ApiError::Unauthorized(message.to_string());
    if request.extensions().get::<super::ietf::Interop>().is_some() {
        super::ietf::problem_response(error)
    } else {
        error.into_response()
    }
}

/// The token from `Authorization: Bearer`. Never from the query: URLs end up in proxy and
/// browser logs, so plain links carry a signature instead (see [`crate::uploads::links`]).
fn token_of(request: &Request) -> Option<String> {
    let value = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

/// A GET of an upload itself (a download) that carries a signed link's parameters: the download
/// checks the signature instead of a token.
fn is_signed_download(state: &AppState, request: &Request) -> bool {
    request.method() == Method::GET
        && request.extensions().get::<super::ietf::Interop>().is_none()
        && request
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|p| p.as_str().strip_prefix(state.base_path.as_str()) == Some("{id}"))
        && LinkQuery::parse(request.uri().query()).is_some()
}

/// Requires a valid token on every tus request but OPTIONS and signed downloads, when tokens
/// are configured.
pub async fn require_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(verifier) = &state.tokens else {
        return next.run(request).await;
    };
    if request.method() == Method::OPTIONS || is_signed_download(&state, &request) {
        return next.run(request).await;
    }
    let Some(token) = token_of(&request) else {
        let query_token =
            request.uri().query().is_some_and(|q| url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "token"));
        let message = if query_token {
            "an upload token is not taken from the URL (proxies log URLs): send 'Authorization: Bearer <token>', \
             or download with a signed link from GET <upload URL>/link"
        } else {
            "an upload token is required: send 'Authorization: Bearer <token>'"
        };
        return unauthorized(&request, message);
    };
    match verifier.verify(&token) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(message) => unauthorized(&request, &message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn in_a_minute() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60
    }

    #[test]
    fn tokens() {
        let verifier = TokenVerifier::hs256("s3cret");
        let caller = verifier
            .verify(&token("s3cret", serde_json::json!({"sub": "u1", "exp": in_a_minute(), "max_size": 5})))
            .unwrap();
        assert_eq!(caller.owner, "u1");
        assert_eq!(caller.max_size, Some(5));
        assert!(verifier.verify(&token("other", serde_json::json!({"sub": "u1", "exp": in_a_minute()}))).is_err());
        let expired = token("s3cret", serde_json::json!({"sub": "u1", "exp": 1000}));
        assert!(verifier.verify(&expired).unwrap_err().contains("expired"));
        assert!(verifier.verify(&token("s3cret", serde_json::json!({"sub": "u1"}))).is_err(), "exp is required");
        assert!(verifier.verify("not.a.jwt").is_err());
    }

    // A key pair made for this test only (openssl genpkey -algorithm ed25519).
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEII2NTp0U7zghZn4U68EyRG8AjQxkWCJObN+xy4bTW1cD\n-----END PRIVATE KEY-----\n";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAVrvKp8J+kVm2CTqT+K+QeytNNU9FDphyhiBV86Pqnlw=\n-----END PUBLIC KEY-----\n";

    #[test]
    fn eddsa_tokens() {
        let verifier = TokenVerifier::eddsa(ED_PUBLIC.as_bytes()).unwrap();
        let key = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
        let claims = serde_json::json!({"sub": "u2", "exp": in_a_minute()});
        let signed = encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap();
        assert_eq!(verifier.verify(&signed).unwrap().owner, "u2");
        // An HS256 token signed with the public key's bytes must not pass (no algorithm switching).
        let forged = token(ED_PUBLIC, serde_json::json!({"sub": "u2", "exp": in_a_minute()}));
        assert!(verifier.verify(&forged).is_err());
    }
}
