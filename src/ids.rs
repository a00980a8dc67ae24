//! Newtype ids shared by the pool, sessions and logs. Cheap to clone (`Arc<str>`).

use std::fmt;
use std::sync::Arc;

/// An upstream account id from `accounts[].id`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

/// A conversation id, from headers or `prompt_cache_key` (DESIGN §2): a lane (one upstream
/// socket, serialized turns) or an affinity (which account serves it).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(Arc<str>);

/// The tenant: the client key's name (`clients[].name`), or [`ClientId::anonymous`] when the
/// gateway runs without client keys. One tenant never rides another's connection.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

macro_rules! str_id {
    ($t:ident) => {
        impl $t {
            pub fn new(s: impl Into<Arc<str>>) -> Self {
                $t(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                $t(s.into())
            }
        }
    };
}
str_id!(AccountId);
str_id!(ConversationId);
str_id!(ClientId);

impl ClientId {
    /// The single tenant of a gateway without client keys (`clients: []`).
    pub fn anonymous() -> ClientId {
        ClientId::new("-")
    }
}

/// Which ingress carried a turn (logs, metrics, status).
#[derive(Debug, PartialEq, Eq, Clone, Copy, Default)]
pub enum Ingress {
    /// A client WebSocket session.
    #[default]
    Ws,
    /// A `POST` on the paths (SSE or one JSON body).
    Http,
}

impl Ingress {
    pub fn label(self) -> &'static str {
        match self {
            Ingress::Ws => "ws",
            Ingress::Http => "http",
        }
    }
}

/// Where a session's turns go (DESIGN §2): the tenant, the lane (the pool key's conversation
/// part) and the affinity (the key of the sticky account assignment). Both ids are scoped by
/// the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub client: ClientId,
    /// `None`: served unpooled (`bypass reason=no_key`).
    pub lane: Option<ConversationId>,
    /// `None` only when `lane` is `None` too.
    pub affinity: Option<ConversationId>,
}

impl Route {
    /// The affinity, if it differs from the lane (logged as `affinity=`).
    pub fn distinct_affinity(&self) -> Option<&ConversationId> {
        self.affinity
            .as_ref()
            .filter(|a| Some(*a) != self.lane.as_ref())
    }
}

/// Longest conversation id accepted from a client.
pub const MAX_CONVERSATION_ID_LEN: usize = 256;

impl ConversationId {
    /// Validates a client-supplied id: 1..=256 visible ASCII characters.
    pub fn parse(s: &str) -> Result<ConversationId, String> {
        if s.is_empty() {
            return Err("is empty".into());
        }
        if s.len() > MAX_CONVERSATION_ID_LEN {
            return Err(format!(
                "is longer than {MAX_CONVERSATION_ID_LEN} characters"
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII without spaces".into());
        }
        Ok(ConversationId::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn conversation_id_rules() {
        assert!(ConversationId::parse("5d0c2f7e-1b7a").is_ok());
        assert!(ConversationId::parse("").is_err());
        assert!(ConversationId::parse("a b").is_err());
        assert!(ConversationId::parse(&"x".repeat(257)).is_err());
        assert!(ConversationId::parse("é").is_err());
    }
}
