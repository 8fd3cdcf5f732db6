//! API tokens: kept as SHA-256 hashes in the config (`[[http.tokens]]`) or a file of
//! their own (`[http] tokens_file`, re-read on change), presented as
//! `Authorization: Bearer <token>`, each with scopes; and JWTs from an identity
//! provider (`[http.jwt]`), checked against its JWKS, their scopes in a claim.
//!
//! A token is 32 random bytes in hex, so a plain SHA-256 (not a slow password hash)
//! is enough to keep it unguessable from the config; a presented token is hashed and
//! compared with every configured hash in constant time, so the comparison leaks
//! neither which token nor how much of it matched.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use sluice_config::{JwtConfig, TokenConfig};
use sluice_core::reload::Reloading;

/// Tokens with their hashes decoded.
type Hashed = Vec<(TokenConfig, Vec<u8>)>;

/// The configured tokens, hashes decoded, those of the tokens file, and the JWT
/// verifier.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    hashed: Hashed,
    file: Option<Reloading<Hashed>>,
    jwt: Option<Jwt>,
}

impl Tokens {
    /// From `[[http.tokens]]` (validated: each hash is 64 hex digits), `[http]
    /// tokens_file` and `[http.jwt]` (the file and the JWKS read now: an error if one
    /// does not load).
    pub(crate) fn new(
        configured: &[TokenConfig],
        file: Option<&Path>,
        jwt: Option<&JwtConfig>,
    ) -> Result<Self, String> {
        let load = Box::new(|files: &[PathBuf]| {
            TokenConfig::read_file(&files[0])
                .map(|tokens| hashed(&tokens))
                .map_err(|problems| problems.join("; "))
        });
        Ok(Self {
            hashed: hashed(configured),
            file: file
                .map(|f| Reloading::new("the API tokens file", vec![f.to_owned()], load))
                .transpose()?,
            jwt: jwt.map(Jwt::new).transpose()?,
        })
    }

    /// Whether no tokens, no tokens file and no JWTs are configured (the API is open).
    pub(crate) fn is_empty(&self) -> bool {
        self.hashed.is_empty() && self.file.is_none() && self.jwt.is_none()
    }

    /// Who `presented` is: a configured token, or a JWT's subject and scopes; else why
    /// not.
    pub(crate) fn authenticate(&self, presented: &str) -> Result<Cow<'_, TokenConfig>, String> {
        if let Some(token) = self.find(presented) {
            return Ok(token);
        }
        match &self.jwt {
            Some(jwt) if presented.matches('.').count() == 2 => {
                jwt.verify(presented).map(Cow::Owned)
            }
            _ => Err("unknown API token".into()),
        }
    }

    /// The configured token `presented` is, if any. Every hash is compared, each in
    /// constant time.
    fn find(&self, presented: &str) -> Option<Cow<'_, TokenConfig>> {
        let hash = Sha256::digest(presented.as_bytes());
        let mut found = None;
        for (token, expected) in &self.hashed {
            if constant_time_eq(expected, &hash) {
                found = Some(Cow::Borrowed(token));
            }
        }
        if let Some(file) = &self.file {
            for (token, expected) in file.current().iter() {
                if constant_time_eq(expected, &hash) {
                    found = Some(Cow::Owned(token.clone()));
                }
            }
        }
        found
    }
}

fn hashed(tokens: &[TokenConfig]) -> Hashed {
    tokens
        .iter()
        .map(|t| (t.clone(), hex::decode(&t.sha256).unwrap_or_default()))
        .collect()
}

/// Checks JWTs against `[http.jwt]`: the signature by the JWKS key its `kid` names
/// (or the only key), an asymmetric algorithm (never `none` or a shared secret), `exp`
/// required, `nbf`, `iss` and `aud` when configured.
#[derive(Debug)]
struct Jwt {
    config: JwtConfig,
    keys: Reloading<JwkSet>,
}

impl Jwt {
    fn new(config: &JwtConfig) -> Result<Self, String> {
        let load = Box::new(|files: &[PathBuf]| {
            let text = std::fs::read_to_string(&files[0])
                .map_err(|e| format!("cannot read jwks_file {}: {e}", files[0].display()))?;
            serde_json::from_str::<JwkSet>(&text)
                .map_err(|e| format!("jwks_file {} is not a JWKS: {e}", files[0].display()))
        });
        let keys = Reloading::new("the JWKS", vec![config.jwks_file.clone()], load)?;
        Ok(Self {
            config: config.clone(),
            keys,
        })
    }

    fn verify(&self, token: &str) -> Result<TokenConfig, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("not a usable JWT: {e}"))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(format!(
                "JWT signed with {:?}: only public-key algorithms are accepted",
                header.alg
            ));
        }
        let keys = self.keys.current();
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| format!("no key in the JWKS for the JWT's kid {:?}", header.kid))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key unusable: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway.0.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    "the JWT has expired".to_owned()
                }
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    "the JWT is not valid yet".to_owned()
                }
                jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                    "the JWT's issuer is not the configured one".to_owned()
                }
                jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                    "the JWT is not for this audience".to_owned()
                }
                _ => format!("JWT rejected: {e}"),
            },
        )?;
        let claims = data.claims;
        let scopes = match claims.get(&self.config.scopes_claim) {
            Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let subject = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("?");
        Ok(TokenConfig {
            name: format!("jwt:{subject}"),
            sha256: String::new(),
            scopes,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new token and its SHA-256 in hex (for `sluice token`).
pub fn new_token() -> anyhow::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    let token = format!("slc_{}", hex::encode(bytes));
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    Ok((token, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_found_by_its_hash_and_scoped() {
        let (token, sha256) = new_token().unwrap();
        let config = TokenConfig {
            name: "ci".into(),
            sha256,
            scopes: vec!["query".into(), "ingest:*".into()],
        };
        let tokens = Tokens::new(std::slice::from_ref(&config), None, None).unwrap();
        let found = tokens.find(&token).expect("found");
        assert!(found.allows("query") && found.allows("ingest:telemetry"));
        assert!(!found.allows("admin") && !found.allows("tap"));
        assert!(tokens.find("slc_guess").is_none());
        assert_ne!(new_token().unwrap().0, token, "random");
    }

    /// Tokens in `[http] tokens_file` are found, and a token removed from the file is
    /// refused once the file is re-read (within a second), without a restart.
    #[test]
    fn tokens_in_a_file_are_found_and_revoked_by_editing_it() {
        let (kept, kept_hash) = new_token().unwrap();
        let (revoked, revoked_hash) = new_token().unwrap();
        let path = std::env::temp_dir().join(format!("sluice-tokens-{}.toml", std::process::id()));
        let entry = |name: &str, hash: &str| {
            format!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{hash}\"\nscopes = [\"query\"]\n")
        };
        let both = entry("kept", &kept_hash) + &entry("revoked", &revoked_hash);
        std::fs::write(&path, both).unwrap();
        let tokens = Tokens::new(&[], Some(path.as_path()), None).unwrap();
        assert!(!tokens.is_empty());
        assert_eq!(tokens.find(&kept).expect("kept").name, "kept");
        assert_eq!(tokens.find(&revoked).expect("revoked").name, "revoked");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&path, entry("kept", &kept_hash)).unwrap();
        assert!(tokens.find(&kept).is_some());
        assert!(tokens.find(&revoked).is_none(), "revoked by the edit");
        // A broken edit keeps the last good file in force.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&path, "[[tokens]]\nname = 1\n").unwrap();
        assert!(tokens.find(&kept).is_some());
        std::fs::remove_file(&path).unwrap();
    }
}
