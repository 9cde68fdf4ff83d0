//! Tokens: when configured, clients and workers must present theirs. Tokens are compared in
//! constant time. A broker with no token at all is open to every role (fit for loopback, or
//! started with `--insecure-no-auth`); once any token is set, a role without one is closed.

use protocol::messages::ErrorCode;
use subtle::ConstantTimeEq;

/// The tokens the broker requires, per role. `None` for both means every role is open; `None`
/// for one role while the other has a token means that role is closed.
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
        let Some(expected) = expected else {
            return if self.is_open() { Ok(()) } else { Err(ErrorCode::Forbidden) };
        };
        let Some(given) = given else { return Err(ErrorCode::Unauthorized) };
        if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) { Ok(()) } else { Err(ErrorCode::Forbidden) }
    }
}

impl Tokens {
    /// No role needs a token.
    pub fn is_open(&self) -> bool {
        self.client.is_none() && self.worker.is_none()
    }

    /// The role is closed: other roles have tokens and this one has none.
    pub fn is_closed(&self, role: Role) -> bool {
        let token = match role {
            Role::Client => &self.client,
            Role::Worker => &self.worker,
        };
        token.is_none() && !self.is_open()
    }

    /// What to tell a peer of `role` refused with `code` by [`Tokens::check`].
    pub fn refusal(&self, role: Role, code: ErrorCode) -> String {
        let which = if role == Role::Client { "client" } else { "worker" };
        if self.is_closed(role) {
            format!("this broker has no {which} token configured, so {which}s are not accepted")
        } else if code == ErrorCode::Unauthorized {
            format!("this broker requires a {which} token: send it as `Authorization: Bearer <token>`")
        } else {
            format!("wrong {which} token")
        }
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
        assert_eq!(t.check(Role::Worker, None), Err(ErrorCode::Forbidden), "an unset role is closed");
        assert_eq!(t.check(Role::Worker, Some("c")), Err(ErrorCode::Forbidden));
        assert!(t.is_closed(Role::Worker) && !t.is_closed(Role::Client));
        let open = Tokens::default();
        assert_eq!(open.check(Role::Worker, None), Ok(()));
        assert!(open.is_open() && !open.is_closed(Role::Client));
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
    }
}
