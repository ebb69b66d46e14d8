//! Signed tokens (JWT) for connections: who a client is, until when, and which topics it may
//! join. A group with `auth = "jwt"` refuses an upgrade without a valid token with 401, before
//! the `101` and before the app sees it; an accepted connection is bound to the token's user
//! (`sub`), keeps its allowed topics and `info`, and is closed at the token's expiry unless the
//! client sends a fresh one.
//!
//! The signature is checked by a kept crate (`jsonwebtoken`, on `ring` like the TLS stack).
//! The algorithm is the server's choice, never the token's: HS256 with a shared secret, or
//! RS256/ES256 with a public key, so `alg: none` or an HMAC made with the public key as its
//! secret is refused.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The shortest HS256 secret accepted: the signature is as strong as the secret.
pub const MIN_SECRET_LEN: usize = 32;

/// Checks tokens against the group's key. Cheap to clone (the key is shared).
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    key: DecodingKey,
    validation: Validation,
    /// What the key is, for `Debug` and comparison: never the secret itself.
    kind: &'static str,
    /// The key material, to tell a changed key at a reload.
    source: Vec<u8>,
}

impl PartialEq for Verifier {
    fn eq(&self, other: &Verifier) -> bool {
        self.inner.kind == other.inner.kind && self.inner.source == other.inner.source
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier({})", self.inner.kind)
    }
}

/// Why a key cannot check tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// An HS256 secret shorter than [`MIN_SECRET_LEN`].
    #[error("jwt_hs256_secret is {0} bytes; use at least {MIN_SECRET_LEN} random bytes")]
    ShortSecret(usize),
    /// The public key file cannot be read.
    #[error("cannot read jwt_public_key {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Not a PEM RSA or EC public key.
    #[error("jwt_public_key {0} is not a PEM RSA or EC (P-256, P-384) public key")]
    NotAKey(String),
}

/// Why a token is refused. The client gets 401 with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No token in the query, the `Authorization` header or the cookie.
    #[error("no token: send ?token=, Authorization: Bearer, or the token cookie")]
    Missing,
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// Signed with another key.
    #[error("token signature does not verify")]
    BadSignature,
    /// Signed with an algorithm the server does not use (including `none`).
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// Before its `nbf`.
    #[error("token not valid yet")]
    NotYetValid,
    /// Without `sub` or `exp`.
    #[error("token lacks the {0:?} claim")]
    MissingClaim(String),
    /// A claim of the wrong type (`sub` not a string, `exp` not a number, `topics` not a
    /// list of strings).
    #[error("token claims are not {{sub: string, exp: number, topics?: [string], info?: any}}")]
    BadClaims,
    /// A refresh for another user than the connection's.
    #[error("token is for another user")]
    OtherUser,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, in Unix seconds.
    pub exp: u64,
    /// Topic patterns the client may subscribe to (`room/*`, `$user/42`); none: every topic
    /// but private (`$`) ones.
    pub topics: Option<Vec<String>>,
    /// Free JSON shown in presence.
    pub info: Option<Value>,
}

/// The claims as they come: a missing `sub` is named as missing, not as bad JSON.
#[derive(Deserialize)]
struct Raw {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    info: Option<Value>,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Result<Verifier, KeyError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::ShortSecret(secret.len()));
        }
        Ok(Verifier::new(
            DecodingKey::from_secret(secret),
            &[Algorithm::HS256],
            "HS256",
            secret.to_vec(),
        ))
    }

    /// RS256 (or RS384, RS512) or ES256 (or ES384) with the PEM public key in `pem`; `name`
    /// names it in errors.
    pub fn public_key(pem: &[u8], name: &str) -> Result<Verifier, KeyError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            let algs = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
            return Ok(Verifier::new(key, &algs, "RS256", pem.to_vec()));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            let algs = [Algorithm::ES256, Algorithm::ES384];
            return Ok(Verifier::new(key, &algs, "ES256", pem.to_vec()));
        }
        Err(KeyError::NotAKey(name.to_string()))
    }

    /// Reads the PEM public key in `path`.
    pub fn load_public_key(path: &Path) -> Result<Verifier, KeyError> {
        let pem = std::fs::read(path).map_err(|e| KeyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Verifier::public_key(&pem, &path.display().to_string())
    }

    fn new(key: DecodingKey, algs: &[Algorithm], kind: &'static str, source: Vec<u8>) -> Self {
        let mut validation = Validation::new(algs[0]);
        validation.algorithms = algs.to_vec();
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            inner: Arc::new(Inner {
                key,
                validation,
                kind,
                source,
            }),
        }
    }

    /// The claims of `token`, if its signature, algorithm and times hold.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Raw>(token, &self.inner.key, &self.inner.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::WrongAlgorithm
                }
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                ErrorKind::Json(e) if e.is_data() => TokenError::BadClaims,
                _ => TokenError::Malformed,
            })?;
        let Raw {
            sub,
            exp,
            topics,
            info,
        } = data.claims;
        // RFC 7519: not accepted "on or after" exp (the crate refuses only after it).
        if exp <= crate::worker::unix_now() {
            return Err(TokenError::Expired);
        }
        Ok(Claims {
            sub: sub.ok_or_else(|| TokenError::MissingClaim("sub".into()))?,
            exp,
            topics,
            info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: Value, secret: &[u8]) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn tokens_are_checked_for_key_algorithm_time_and_claims() {
        let v = Verifier::hs256(SECRET).unwrap();
        let good = hs(
            json!({"sub": "ada", "exp": now() + 60, "topics": ["room/*"], "info": {"n": 1}}),
            SECRET,
        );
        let c = v.verify(&good).unwrap();
        assert_eq!(c.sub, "ada");
        assert_eq!(c.topics.as_deref(), Some(&["room/*".to_string()][..]));
        assert_eq!(c.info, Some(json!({"n": 1})));
        let other = b"another secret that is long enough!!";
        assert_eq!(
            v.verify(&hs(json!({"sub": "a", "exp": now() + 60}), other)),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            v.verify(&hs(json!({"sub": "a", "exp": now() - 1}), SECRET)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            v.verify(&hs(json!({"exp": now() + 60}), SECRET)),
            Err(TokenError::MissingClaim("sub".into()))
        );
        assert_eq!(
            v.verify(&hs(json!({"sub": 5, "exp": now() + 60}), SECRET)),
            Err(TokenError::BadClaims)
        );
        assert_eq!(v.verify("not.a.token"), Err(TokenError::Malformed));
        // alg: none, unsigned.
        let b64 = |s: &str| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
        };
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&json!({"sub": "a", "exp": now() + 60}).to_string())
        );
        assert!(v.verify(&none).is_err());
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(v.verify(&hs512), Err(TokenError::WrongAlgorithm));
        assert_eq!(
            Verifier::hs256(b"short").unwrap_err(),
            KeyError::ShortSecret(5)
        );
        assert!(Verifier::public_key(b"nope", "k.pem").is_err());
    }
}
