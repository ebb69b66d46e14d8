//! Signed tokens on the data path (see `crate::auth`): checked at the upgrade, carried by the
//! connection as a [`Grant`], renewed by a message, and enforced at the sweep and at every
//! subscription.
//!
//! The client presents its token in the first of: the `token` query parameter (what a
//! browser's `new WebSocket(url)` can do), an `Authorization: Bearer` header, or the group's
//! `token_cookie`. Before expiry it may send a text message `{"token": "<fresh JWT>"}` for the
//! same user; wsd answers it (`{"refreshed": true, "exp": N}` or `{"refreshed": false,
//! "error": "..."}`) and the app never sees it. At expiry the connection is closed with
//! [`TOKEN_EXPIRED`](crate::close::TOKEN_EXPIRED) (3000) `token expired`.

use super::context::Context;
use super::event_loop::Loop;
use crate::ConnId;
use crate::Message;
use crate::proto::handshake::{Reject, Request};
use serde_json::Value;
use std::net::SocketAddr;

/// What a connection's token allows, kept while it is open (and carried when it is handed
/// to another worker).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Grant {
    /// Expiry, in Unix seconds.
    pub exp: u64,
    /// Allowed topic patterns; none: every topic but private ones.
    pub topics: Option<Vec<String>>,
    /// Free JSON shown in presence.
    pub info: Option<Value>,
}

/// Whether a client whose token allows `patterns` (none: no `topics` claim) may subscribe to
/// `topic`. A pattern is a topic, or a prefix ending in `*` (`room/*`, `*`). Without a `topics`
/// claim every topic but a private one (starting with `$`) is allowed, and `*` alone does not
/// open private topics either: a `$` topic is allowed only by a pattern that starts with `$`.
pub(crate) fn topic_allowed(patterns: Option<&[String]>, topic: &str) -> bool {
    let private = topic.starts_with('$');
    match patterns {
        None => !private,
        // `*` alone does not open private topics.
        Some(ps) => ps
            .iter()
            .any(|p| crate::config::topic_matches(p, topic) && !(p == "*" && private)),
    }
}

/// `path` (path and query, as sent) with the value of a `token` query parameter replaced by
/// `***`: what a connection keeps of its request for `ctx.path` and `wsd connections`, which
/// must not show operators the client's credentials.
pub(crate) fn redact_token(path: String) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path;
    };
    if !query.split('&').any(|p| p.starts_with("token=")) {
        return path;
    }
    let query: Vec<&str> = query
        .split('&')
        .map(|p| {
            if p.starts_with("token=") {
                "token=***"
            } else {
                p
            }
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Context {
    /// Whether `conn` may subscribe to `topic`: always in a group without `auth`; with it, as
    /// its token's `topics` allow (private `$` topics only when named there).
    pub fn may_subscribe(&self, conn: ConnId, topic: &str) -> bool {
        match self.grant(conn) {
            Some(g) => topic_allowed(g.topics.as_deref(), topic),
            None => true,
        }
    }

    /// The `info` claim of `conn`'s token, if it had one.
    pub fn user_info(&self, conn: ConnId) -> Option<&Value> {
        self.grant(conn)?.info.as_ref()
    }

    pub(crate) fn grant(&self, conn: ConnId) -> Option<&Grant> {
        let (_, extra) = self.carried(conn)?;
        extra?.grant.as_ref()
    }
}

/// A token check that failed: 401, and why.
#[cfg(feature = "jwt")]
fn unauthorized(why: String) -> Reject {
    Reject {
        status: 401,
        why: why.into(),
    }
}

impl Loop {
    /// Checks the token of an upgrade request in a group with `auth = "jwt"`: its user and
    /// grant, `None` in a group without auth, or the 401 that refuses it.
    #[cfg_attr(not(feature = "jwt"), allow(unused_variables))]
    pub(super) fn check_token(
        &self,
        request: &Request,
        remote: SocketAddr,
    ) -> Result<Option<(String, Grant)>, Reject> {
        #[cfg(feature = "jwt")]
        if let Some(verifier) = &self.settings.jwt {
            let req = super::UpgradeRequest::new(request, remote);
            let bearer = req
                .header("authorization")
                .and_then(|v| crate::api::http::bearer(v.as_bytes()))
                .and_then(|b| std::str::from_utf8(b).ok());
            let cookie = self
                .settings
                .token_cookie
                .as_deref()
                .and_then(|c| req.cookie(c));
            let token = req
                .query("token")
                .map(|t| t.into_owned())
                .or_else(|| bearer.map(str::to_string))
                .or_else(|| cookie.map(str::to_string));
            let Some(token) = token else {
                return Err(unauthorized(crate::auth::TokenError::Missing.to_string()));
            };
            return match verifier.verify(token.trim()) {
                Ok(c) => Ok(Some((
                    c.sub,
                    Grant {
                        exp: c.exp,
                        topics: c.topics,
                        info: c.info,
                    },
                ))),
                Err(e) => Err(unauthorized(e.to_string())),
            };
        }
        Ok(None)
    }

    /// Binds a just-opened connection to its token's user and keeps what the token allows.
    pub(super) fn keep_grant(&mut self, id: ConnId, user: &str, grant: Grant) {
        self.ctx.bind_user(id, user);
        if let Some(c) = self.ctx.index_of(id).map(|idx| &mut self.ctx.conns[idx]) {
            c.extra.get_or_insert_with(Box::default).grant = Some(grant);
        }
    }

    /// A message that renews the token of `id` (`{"token": "..."}`), answered here: true if
    /// it was one (the app does not see it).
    pub(super) fn renew_token(&mut self, id: ConnId, msg: &Message) -> bool {
        let Message::Text(text) = msg else {
            return false;
        };
        if self.ctx.grant(id).is_none() || !text.trim_start().starts_with("{\"token\"") {
            return false;
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Renewal {
            token: String,
        }
        let Ok(Renewal { token }) = serde_json::from_str::<Renewal>(text) else {
            return false;
        };
        let answer = match self.verify_renewal(id, &token) {
            Ok(exp) => serde_json::json!({ "refreshed": true, "exp": exp }),
            Err(why) => serde_json::json!({ "refreshed": false, "error": why }),
        };
        let _ = self.ctx.send(id, answer.to_string());
        true
    }

    /// Checks a renewal for `id`'s user and applies it: the new expiry, topics and info, and
    /// the subscriptions the new topics no longer allow dropped.
    fn verify_renewal(&mut self, id: ConnId, token: &str) -> Result<u64, String> {
        #[cfg(feature = "jwt")]
        {
            let verifier = self.settings.jwt.as_ref().ok_or("this group has no auth")?;
            let c = verifier.verify(token).map_err(|e| e.to_string())?;
            if self.ctx.user_of(id) != Some(c.sub.as_str()) {
                return Err(crate::auth::TokenError::OtherUser.to_string());
            }
            for topic in self.ctx.topics_of(id) {
                if !topic_allowed(c.topics.as_deref(), &topic) {
                    self.ctx.unsubscribe(id, &topic);
                }
            }
            let exp = c.exp;
            let idx = self.ctx.index_of(id);
            if let Some(extra) = idx.and_then(|idx| self.ctx.conns[idx].extra.as_mut()) {
                extra.grant = Some(Grant {
                    exp,
                    topics: c.topics,
                    info: c.info,
                });
            }
            Ok(exp)
        }
        #[cfg(not(feature = "jwt"))]
        {
            let _ = (id, token);
            Err("this wsd was built without the jwt feature".into())
        }
    }

    /// Closes the connections whose token has expired (from the sweep).
    pub(super) fn expire_tokens(&mut self, now: u64) {
        let expired: Vec<ConnId> = self
            .ctx
            .conns
            .iter()
            .filter(|(_, c)| c.session.can_send())
            .filter_map(|(_, c)| {
                let g = c.extra.as_ref()?.grant.as_ref()?;
                (g.exp <= now).then_some(c.id)
            })
            .collect();
        for id in expired {
            log::debug!("connection {id}: token expired");
            self.ctx
                .close_with(id, crate::close::TOKEN_EXPIRED, "token expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_the_query_are_not_kept() {
        assert_eq!(redact_token("/?token=abc.def.ghi".into()), "/?token=***");
        assert_eq!(
            redact_token("/chat?room=1&token=x&y=2".into()),
            "/chat?room=1&token=***&y=2"
        );
        assert_eq!(redact_token("/chat?room=1".into()), "/chat?room=1");
        assert_eq!(redact_token("/".into()), "/");
    }

    #[test]
    fn topic_patterns_and_private_topics() {
        assert!(topic_allowed(None, "room/1"));
        assert!(!topic_allowed(None, "$user/1"));
        let ps = ["room/*".to_string(), "$user/42".to_string()];
        assert!(topic_allowed(Some(&ps), "room/7"));
        assert!(topic_allowed(Some(&ps), "$user/42"));
        assert!(!topic_allowed(Some(&ps), "$user/43"));
        assert!(!topic_allowed(Some(&ps), "news"));
        let any = ["*".to_string()];
        assert!(topic_allowed(Some(&any), "news"));
        assert!(!topic_allowed(Some(&any), "$admin"));
        let private = ["$user/*".to_string()];
        assert!(topic_allowed(Some(&private), "$user/1"));
        assert!(!topic_allowed(Some(&[]), "room"));
    }
}
