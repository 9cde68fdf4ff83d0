//! Tokens: when configured, clients and workers must present theirs. Tokens are compared in
//! constant time.

use protocol::messages::ErrorCode;
use subtle::ConstantTimeEq;

/// The tokens the broker requires, per role. `None` means that role is open.
#[derive(Clone, Default)]
pub struct Tokens {
    pub client: Option<String>,
    pub worker: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("client", &self.client.as_ref().map(|_| "<set>"))
            .field("worker", &self.worker.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Which side of the broker a connection speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Worker,
}

impl Tokens {
    /// Checks `given` against the token of `role`: `Unauthorized` when one is needed and none
    /// was given, `Forbidden` when it is wrong.
    pub fn check(&self, role: Role, given: Option<&str>) -> Result<(), ErrorCode> {
        let expected = match role {
            Role::Client => &self.client,
            Role::Worker => &self.worker,
        };
        let Some(expected) = expected else { return Ok(()) };
        let Some(given) = given else { return Err(ErrorCode::Unauthorized) };
        if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) { Ok(()) } else { Err(ErrorCode::Forbidden) }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = Tokens { client: Some("c".into()), worker: None };
        assert_eq!(t.check(Role::Client, None), Err(ErrorCode::Unauthorized));
        assert_eq!(t.check(Role::Client, Some("x")), Err(ErrorCode::Forbidden));
        assert_eq!(t.check(Role::Client, Some("c")), Ok(()));
        assert_eq!(t.check(Role::Worker, None), Ok(()));
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
    }
}
