//! API tokens: kept as SHA-256 hashes in the config (`[[http.tokens]]`), presented as
//! `Authorization: Bearer <token>`, each with scopes.
//!
//! A token is 32 random bytes in hex, so a plain SHA-256 (not a slow password hash)
//! is enough to keep it unguessable from the config; a presented token is hashed and
//! compared with every configured hash in constant time, so the comparison leaks
//! neither which token nor how much of it matched.

use sha2::{Digest, Sha256};
use sluice_config::TokenConfig;

/// The configured tokens, hashes decoded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens(Vec<(TokenConfig, Vec<u8>)>);

impl Tokens {
    /// From `[[http.tokens]]` (validated: each hash is 64 hex digits).
    pub(crate) fn new(configured: &[TokenConfig]) -> Self {
        Self(
            configured
                .iter()
                .map(|t| (t.clone(), hex::decode(&t.sha256).unwrap_or_default()))
                .collect(),
        )
    }

    /// Whether any token is configured (else the API is open).
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The configured token `presented` is, if any. Every hash is compared, each in
    /// constant time.
    pub(crate) fn find(&self, presented: &str) -> Option<&TokenConfig> {
        let hash = Sha256::digest(presented.as_bytes());
        let mut found = None;
        for (token, expected) in &self.0 {
            if constant_time_eq(expected, &hash) {
                found = Some(token);
            }
        }
        found
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
        let tokens = Tokens::new(std::slice::from_ref(&config));
        let found = tokens.find(&token).expect("found");
        assert!(found.allows("query") && found.allows("ingest:telemetry"));
        assert!(!found.allows("admin") && !found.allows("tap"));
        assert!(tokens.find("slc_guess").is_none());
        assert_ne!(new_token().unwrap().0, token, "random");
    }
}
