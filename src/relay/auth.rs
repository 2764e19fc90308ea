//! Who may connect to the relay and what they may touch: HS256 JWTs carrying a subject, an
//! expiry and the namespaces the bearer may read and write.
//!
//! Tokens come from the WebSocket upgrade request ([`token_from_request`]), are checked once
//! with [`verify`], and the resulting [`Claims`] answer every later `can_read` / `can_write`
//! question for that connection. Time is a parameter (`now`), never read here, so expiry is
//! exact and tests need no clock; the signature check is jsonwebtoken's, with its own clock
//! switched off. Not here: sessions, connection handling, or mapping to wire messages beyond
//! [`AuthError::code`].
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use tandem::relay::auth::{mint, verify, Secret};
//!
//! let secret = Secret::from_bytes(b"correct horse battery staple").unwrap();
//! let now = SystemTime::now();
//! let token = mint(&secret, "ada", &["notes".into()], &[], Duration::from_secs(3600), now);
//! let claims = verify(&secret, &token, now).unwrap();
//! assert!(claims.can_read("notes") && !claims.can_write("notes"));
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::transport::ErrorCode;

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was issued to (a user or service name), for logs.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch; the token is refused from that second on.
    pub exp: u64,
    /// Namespaces the bearer may read.
    #[serde(default)]
    pub read: Vec<String>,
    /// Namespaces the bearer may write (and so also read).
    #[serde(default)]
    pub write: Vec<String>,
}

impl Claims {
    /// Whether the bearer may pull and subscribe to `namespace`. Write implies read: a device
    /// that may push a document must be able to fetch what others pushed to it.
    pub fn can_read(&self, namespace: &str) -> bool {
        self.read.iter().any(|n| n == namespace) || self.can_write(namespace)
    }

    /// Whether the bearer may push to `namespace`.
    pub fn can_write(&self, namespace: &str) -> bool {
        self.write.iter().any(|n| n == namespace)
    }

    /// `Ok` if the bearer has `need` on `namespace`, else [`AuthError::Forbidden`].
    pub fn require(&self, namespace: &str, need: Access) -> Result<(), AuthError> {
        let allowed = match need {
            Access::Read => self.can_read(namespace),
            Access::Write => self.can_write(namespace),
        };
        if allowed {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                namespace: namespace.to_string(),
                need,
            })
        }
    }

    /// Every namespace the bearer may read (read and write scopes, deduplicated, in order).
    pub fn readable(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for ns in self.read.iter().chain(&self.write) {
            if !all.contains(ns) {
                all.push(ns.clone());
            }
        }
        all
    }
}

/// A kind of access to a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// Why a request was not authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request carried no token.
    #[error(
        "no token: send `Authorization: Bearer <jwt>` on the upgrade request, or `?token=<jwt>`"
    )]
    Missing,
    /// The token is not a JWT this relay understands (shape, encoding, claims, audience).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The token was not signed with this relay's secret (or not with HS256).
    #[error("the token's signature does not match this relay's secret")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("the token has expired; get a new one")]
    Expired,
    /// The token is valid but does not grant this access.
    #[error("the token does not allow {need} access to namespace '{namespace}'")]
    Forbidden { namespace: String, need: Access },
}

impl AuthError {
    /// The wire error code a relay reports this as: `Forbidden` for a scope refusal (the
    /// connection stays open), `Unauthorized` (fatal) for everything else.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Forbidden { .. } => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthorized,
        }
    }
}

/// Why a token secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret file could not be read.
    #[error("cannot read the token secret file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The secret is empty (after trimming, for a file): every token would be forgeable.
    #[error(
        "the token secret {origin} is empty; put at least 32 random bytes in it \
         (for example `head -c 32 /dev/urandom | base64 > secret`)"
    )]
    Empty { origin: String },
}

/// The relay's HS256 signing secret. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Loads the secret from a file, dropping trailing whitespace (the newline an editor or
    /// `echo` adds would otherwise be part of the key, and tokens minted by a tool that
    /// trims would all fail).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret, SecretError> {
        let path = path.as_ref();
        let mut bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let kept = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |last| last + 1);
        bytes.truncate(kept);
        if bytes.is_empty() {
            return Err(SecretError::Empty {
                origin: format!("file {}", path.display()),
            });
        }
        Ok(Secret(bytes))
    }

    /// Uses these bytes, as they are, as the secret.
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, SecretError> {
        if bytes.is_empty() {
            return Err(SecretError::Empty {
                origin: "given".into(),
            });
        }
        Ok(Secret(bytes.to_vec()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Seconds since the Unix epoch; a clock before 1970 counts as 0 rather than failing.
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Issues a token for `sub` valid for `ttl` from `now` (rounded down to the second, so a
/// token never outlives its ttl; a ttl of 0 is already expired).
pub fn mint(
    secret: &Secret,
    sub: &str,
    read: &[String],
    write: &[String],
    ttl: Duration,
    now: SystemTime,
) -> String {
    let claims = Claims {
        sub: sub.to_string(),
        exp: unix_seconds(now).saturating_add(ttl.as_secs()),
        read: read.to_vec(),
        write: write.to_vec(),
    };
    // HMAC signing of a struct of strings and integers has no failure mode: the key family
    // matches the header and JSON serialization of these fields cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret.0),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

/// Checks a token's signature and expiry at `now` and returns its claims.
///
/// jsonwebtoken would compare `exp` with the system clock (and treat the `exp` second itself
/// as still valid); we switch that off and compare with `now` ourselves, so the relay's
/// tests and the simulation decide expiry exactly. The leeway stays 0 regardless.
pub fn verify(secret: &Secret, token: &str, now: SystemTime) -> Result<Claims, AuthError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&secret.0), &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                    AuthError::BadSignature
                }
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Malformed(e.to_string()),
            })?;
    let claims = data.claims;
    if unix_seconds(now) >= claims.exp {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

/// Finds the token of a WebSocket upgrade request: `Authorization: Bearer <jwt>` first, else
/// a `token=<jwt>` query parameter (for browsers, which cannot set headers on a WebSocket).
/// JWTs are base64url and dots, so the query value needs no percent-decoding.
pub fn token_from_request(
    authorization_header: Option<&str>,
    query: Option<&str>,
) -> Option<String> {
    let from_header = authorization_header.and_then(|h| {
        let (scheme, rest) = h.trim().split_once(char::is_whitespace)?;
        let token = rest.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
    });
    from_header.or_else(|| {
        let query = query?;
        let query = query.strip_prefix('?').unwrap_or(query);
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, value)| *key == "token" && !value.is_empty())
            .map(|(_, value)| value.to_string())
    })
}

/// [`token_from_request`] then [`verify`]: the whole check of an upgrade request.
pub fn authenticate(
    secret: &Secret,
    authorization_header: Option<&str>,
    query: Option<&str>,
    now: SystemTime,
) -> Result<Claims, AuthError> {
    let token = token_from_request(authorization_header, query).ok_or(AuthError::Missing)?;
    verify(secret, &token, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn token(read: &[&str], write: &[&str], ttl: u64, now: u64) -> String {
        mint(
            &secret(),
            "ada",
            &names(read),
            &names(write),
            Duration::from_secs(ttl),
            at(now),
        )
    }

    #[test]
    fn a_valid_token_yields_its_claims() {
        let t = token(&["notes"], &["tasks"], 60, 1_000_000);
        let claims = verify(&secret(), &t, at(1_000_030)).unwrap();
        assert_eq!(
            claims,
            Claims {
                sub: "ada".into(),
                exp: 1_000_060,
                read: names(&["notes"]),
                write: names(&["tasks"]),
            }
        );
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let t = token(&["notes"], &[], 60, 1_000_000);
        let other = Secret::from_bytes(b"another secret entirely").unwrap();
        assert_eq!(
            verify(&other, &t, at(1_000_000)),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let t = token(&["notes"], &[], 60, 1_000_000);
        let forged = mint(
            &Secret::from_bytes(b"x").unwrap(),
            "mallory",
            &names(&["notes"]),
            &names(&["notes"]),
            Duration::from_secs(60),
            at(1_000_000),
        );
        // Our header and signature around the forger's claims.
        let ours: Vec<&str> = t.split('.').collect();
        let theirs: Vec<&str> = forged.split('.').collect();
        let spliced = format!("{}.{}.{}", ours[0], theirs[1], ours[2]);
        assert_eq!(
            verify(&secret(), &spliced, at(1_000_000)),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn another_algorithm_is_refused() {
        let claims = Claims {
            sub: "ada".into(),
            exp: 2_000_000,
            read: vec![],
            write: vec![],
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(&secret().0),
        )
        .unwrap();
        assert_eq!(
            verify(&secret(), &t, at(1_000_000)),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn expiry_is_exact() {
        let t = token(&["notes"], &[], 60, 1_000_000);
        assert!(verify(&secret(), &t, at(1_000_059)).is_ok());
        let last_instant = at(1_000_059) + Duration::from_millis(999);
        assert!(verify(&secret(), &t, last_instant).is_ok());
        assert_eq!(
            verify(&secret(), &t, at(1_000_060)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn a_zero_ttl_token_is_born_expired() {
        let t = token(&["notes"], &[], 0, 1_000_000);
        assert_eq!(
            verify(&secret(), &t, at(1_000_000)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn a_token_without_exp_is_malformed() {
        #[derive(Serialize)]
        struct NoExp {
            sub: String,
        }
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoExp { sub: "ada".into() },
            &EncodingKey::from_secret(&secret().0),
        )
        .unwrap();
        assert!(matches!(
            verify(&secret(), &t, at(0)),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_and_empty_tokens() {
        assert!(matches!(
            verify(&secret(), "not.a.jwt", at(0)),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            verify(&secret(), "nodots", at(0)),
            Err(AuthError::Malformed(_))
        ));
        assert_eq!(verify(&secret(), "  ", at(0)), Err(AuthError::Missing));
    }

    #[test]
    fn read_and_write_scopes() {
        let t = token(&["notes"], &["tasks"], 60, 1_000_000);
        let claims = verify(&secret(), &t, at(1_000_000)).unwrap();
        assert!(claims.can_read("notes"));
        assert!(!claims.can_write("notes"));
        assert!(claims.can_write("tasks"));
        assert!(!claims.can_read("secrets"));
        assert!(!claims.can_write("secrets"));
        assert_eq!(
            claims.require("notes", Access::Write),
            Err(AuthError::Forbidden {
                namespace: "notes".into(),
                need: Access::Write
            })
        );
        assert_eq!(
            claims.require("notes", Access::Write).unwrap_err().code(),
            ErrorCode::Forbidden
        );
        assert_eq!(claims.readable(), names(&["notes", "tasks"]));
    }

    #[test]
    fn write_implies_read() {
        let t = token(&[], &["tasks"], 60, 1_000_000);
        let claims = verify(&secret(), &t, at(1_000_000)).unwrap();
        assert!(claims.can_read("tasks"));
        assert!(claims.require("tasks", Access::Read).is_ok());
    }

    #[test]
    fn scopes_default_to_empty_when_absent() {
        #[derive(Serialize)]
        struct Bare {
            sub: String,
            exp: u64,
        }
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Bare {
                sub: "svc".into(),
                exp: 2_000_000,
            },
            &EncodingKey::from_secret(&secret().0),
        )
        .unwrap();
        let claims = verify(&secret(), &t, at(1_000_000)).unwrap();
        assert!(claims.read.is_empty() && claims.write.is_empty());
        assert!(!claims.can_read("notes"));
    }

    #[test]
    fn the_secret_file_is_trimmed_at_the_end_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"  s3cret value \n\r\n\t ").unwrap();
        let from_file = Secret::from_file(&path).unwrap();
        assert_eq!(from_file.0, b"  s3cret value");

        let t = mint(
            &Secret::from_bytes(b"  s3cret value").unwrap(),
            "ada",
            &[],
            &[],
            Duration::from_secs(60),
            at(1_000_000),
        );
        assert!(verify(&from_file, &t, at(1_000_000)).is_ok());
        assert_eq!(format!("{from_file:?}"), "Secret(14 bytes)");
    }

    #[test]
    fn an_empty_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"\n  \n").unwrap();
        let err = Secret::from_file(&path).unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }));
        assert!(err.to_string().contains("is empty"), "{err}");
        assert!(matches!(
            Secret::from_bytes(b""),
            Err(SecretError::Empty { .. })
        ));
        assert!(matches!(
            Secret::from_file(dir.path().join("missing")),
            Err(SecretError::Read { .. })
        ));
    }

    #[test]
    fn tokens_are_found_in_the_header_or_the_query() {
        assert_eq!(
            token_from_request(Some("Bearer abc.def.ghi"), None),
            Some("abc.def.ghi".into())
        );
        assert_eq!(
            token_from_request(Some("  bearer   abc.def.ghi "), None),
            Some("abc.def.ghi".into())
        );
        assert_eq!(
            token_from_request(None, Some("token=abc.def.ghi")),
            Some("abc.def.ghi".into())
        );
        assert_eq!(
            token_from_request(None, Some("?x=1&token=a-b_c.d.e&y=2")),
            Some("a-b_c.d.e".into())
        );
        // The header wins; a non-Bearer header falls back to the query.
        assert_eq!(
            token_from_request(Some("Bearer h.h.h"), Some("token=q.q.q")),
            Some("h.h.h".into())
        );
        assert_eq!(
            token_from_request(Some("Basic dXNlcjpwdw=="), Some("token=q.q.q")),
            Some("q.q.q".into())
        );
        assert_eq!(token_from_request(Some("Bearer "), None), None);
        assert_eq!(token_from_request(Some("Bearer"), None), None);
        assert_eq!(token_from_request(None, Some("tokens=x&token=")), None);
        assert_eq!(token_from_request(None, None), None);
    }

    #[test]
    fn authenticate_reports_a_missing_token() {
        assert_eq!(
            authenticate(&secret(), None, Some("a=b"), at(0)),
            Err(AuthError::Missing)
        );
        let t = token(&["notes"], &[], 60, 1_000_000);
        let header = format!("Bearer {t}");
        let claims = authenticate(&secret(), Some(&header), None, at(1_000_000)).unwrap();
        assert_eq!(claims.sub, "ada");
        assert_eq!(
            authenticate(&secret(), Some(&header), None, at(2_000_000))
                .unwrap_err()
                .code(),
            ErrorCode::Unauthorized
        );
    }
}
