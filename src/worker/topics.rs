//! Topic subscriptions of one worker's connections: rooms and channels without app-side
//! bookkeeping. A publish reaches every worker over the bus; each delivers to its own
//! subscribers, so this table only ever holds local connections.
//!
//! The same table keeps users (`Context::bind_user`): a user is the set of its connections,
//! which a connection joins once.

use crate::ConnId;
use std::collections::{HashMap, HashSet};

#[derive(Default)]
pub(crate) struct Topics {
    members: HashMap<String, HashSet<ConnId>>,
    of_conn: HashMap<ConnId, Vec<String>>,
}

impl Topics {
    /// Adds `conn` to `topic`; false if it was already there.
    pub fn subscribe(&mut self, conn: ConnId, topic: &str) -> bool {
        let added = self
            .members
            .entry(topic.to_string())
            .or_default()
            .insert(conn);
        if added {
            self.of_conn
                .entry(conn)
                .or_default()
                .push(topic.to_string());
        }
        added
    }

    /// Removes `conn` from `topic`; false if it was not there.
    pub fn unsubscribe(&mut self, conn: ConnId, topic: &str) -> bool {
        let Some(set) = self.members.get_mut(topic) else {
            return false;
        };
        if !set.remove(&conn) {
            return false;
        }
        if set.is_empty() {
            self.members.remove(topic);
        }
        if let Some(list) = self.of_conn.get_mut(&conn) {
            list.retain(|t| t != topic);
            if list.is_empty() {
                self.of_conn.remove(&conn);
            }
        }
        true
    }

    /// Drops every subscription of a connection that has gone; returns the topics it was the
    /// last subscriber of.
    pub fn forget(&mut self, conn: ConnId) -> Vec<String> {
        let mut emptied = Vec::new();
        for topic in self.of_conn.remove(&conn).unwrap_or_default() {
            if let Some(set) = self.members.get_mut(&topic) {
                set.remove(&conn);
                if set.is_empty() {
                    self.members.remove(&topic);
                    emptied.push(topic);
                }
            }
        }
        emptied
    }

    /// The topics with subscribers here.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.members.keys()
    }

    /// How many topics have subscribers here.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// How many of this worker's connections are in `topic`.
    pub fn count(&self, topic: &str) -> usize {
        self.members.get(topic).map_or(0, HashSet::len)
    }

    /// This worker's subscribers of `topic`.
    pub fn members(&self, topic: &str) -> Vec<ConnId> {
        self.members
            .get(topic)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The topics `conn` is subscribed to.
    pub fn of(&self, conn: ConnId) -> &[String] {
        self.of_conn.get(&conn).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_come_and_go_with_their_connections() {
        let (a, b) = (ConnId { serial: 1, idx: 0 }, ConnId { serial: 2, idx: 1 });
        let mut t = Topics::default();
        assert!(t.subscribe(a, "room"));
        assert!(!t.subscribe(a, "room"));
        assert!(t.subscribe(b, "room"));
        assert!(t.subscribe(a, "news"));
        assert_eq!(t.members("room").len(), 2);
        assert_eq!(t.of(a), ["room".to_string(), "news".to_string()]);
        assert!(t.unsubscribe(b, "room"));
        assert!(!t.unsubscribe(b, "room"));
        t.forget(a);
        assert!(t.members("room").is_empty() && t.members("news").is_empty());
        assert!(t.of(a).is_empty());
        assert!(t.members.is_empty() && t.of_conn.is_empty());
    }
}
