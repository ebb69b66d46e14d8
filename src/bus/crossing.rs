//! Messages from other hosts across a handoff, each delivered once.
//!
//! Every worker reads Redis on a connection of its own, so the worker handing its clients
//! over (the giver) and the one taking them (the taker) each read every message from other
//! hosts, each at its own pace. Which of the two delivers a message to a client that moves
//! must not depend on that pace. They agree on one point in Redis's order instead, a *mark*:
//!
//! - The giver delivers what it reads up to the mark: to the clients it still has, and, as
//!   copies on the handoff line between the clients (`Carried::Remote`), to those it has
//!   handed over. It keeps its topic channels until then, and puts a *cut* on the line when
//!   it reads the mark (`Carried::Cut`).
//! - The taker gives the clients it took on that line nothing it reads before the mark (the
//!   giver's copies bring them that), and what it reads after the mark only once the cut has
//!   come, after the last copy.
//! - The taker publishes the mark once the giver's closing record has come, after the
//!   subscriptions the clients brought (Redis has them before the mark), so every message
//!   after the mark reaches it. Redis puts a message in every subscriber's stream at the
//!   same point, so both read the mark at the same place among the messages they share.
//!
//! If the mark does not come within [`WAIT`] (Redis down, or too slow), both go on without
//! it: a message around that moment may then reach a handed client twice or not at all, as
//! Redis's messages do during an outage.

use super::wire::BusMessage;
use crate::ConnId;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The longest either side waits for the mark once the last connection is on the line.
pub const WAIT: Duration = Duration::from_secs(2);

/// A worker's crossings: at most one as the giver, any number as the taker (one per line).
#[derive(Default)]
pub(crate) struct Crossings {
    giving: Option<Giving>,
    taking: Vec<Taking>,
}

/// The giver's side of one crossing.
struct Giving {
    token: u64,
    /// What this worker delivered from other hosts since the copies were last taken.
    copies: Vec<BusMessage>,
    /// Topics this worker has no subscriber to any more: left once the mark has come.
    leaves: Vec<String>,
    /// Set once the last connection is on the line: the latest the mark may come.
    until: Option<Instant>,
    /// The mark came, or the wait is over: the cut goes on the line next.
    cut: bool,
}

/// The taker's side of one crossing: the clients that came on one line.
struct Taking {
    line: usize,
    token: u64,
    conns: HashSet<ConnId>,
    /// The mark was read here.
    marked: bool,
    /// The giver's cut came.
    cut: bool,
    /// Messages read here after the mark, for `conns` once the cut comes.
    later: Vec<BusMessage>,
    /// Set once the mark is asked for: the latest the crossing may end.
    until: Option<Instant>,
}

/// Clients and the messages they are still to get: what a crossing that ends leaves to do.
pub(crate) type Owed = (HashSet<ConnId>, Vec<BusMessage>);

/// A message from another host for clients.
fn for_clients(msg: &BusMessage) -> bool {
    matches!(
        msg,
        BusMessage::Broadcast(_)
            | BusMessage::Publish(..)
            | BusMessage::SendUser(..)
            | BusMessage::SendTo(..)
    )
}

impl Crossings {
    // ---- the giver ---------------------------------------------------------------------

    /// This worker begins handing its clients over, as crossing `token`.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub fn give(&mut self, token: u64) {
        self.giving = Some(Giving {
            token,
            copies: Vec::new(),
            leaves: Vec::new(),
            until: None,
            cut: false,
        });
    }

    /// Copies a message from another host delivered here, for the clients handed over.
    pub fn copy(&mut self, msg: &BusMessage) {
        if let Some(g) = self.giving.as_mut().filter(|g| !g.cut)
            && for_clients(msg)
        {
            g.copies.push(msg.clone());
        }
    }

    /// Whether leaving `topic` waits for the mark (the clients that took it away may still
    /// be owed its messages): it is then left by [`Crossings::take_copies`].
    pub fn defer_leave(&mut self, topic: &str) -> bool {
        let Some(g) = self.giving.as_mut() else {
            return false;
        };
        if !g.leaves.iter().any(|t| t == topic) {
            g.leaves.push(topic.to_string());
        }
        true
    }

    /// A subscriber to `topic` came back here: the channel stays.
    pub fn cancel_leave(&mut self, topic: &str) {
        if let Some(g) = self.giving.as_mut() {
            g.leaves.retain(|t| t != topic);
        }
    }

    /// The last connection is on the line: the mark may be waited for up to [`WAIT`].
    pub fn given(&mut self, now: Instant) {
        if let Some(g) = self.giving.as_mut() {
            g.until.get_or_insert(now + WAIT);
        }
    }

    /// The copies to put on the line now, and whether the cut follows them. With the cut,
    /// the crossing is over for the giver: it returns the topics to leave now.
    pub fn take_copies(&mut self) -> (Vec<BusMessage>, Option<Vec<String>>) {
        let Some(g) = self.giving.as_mut() else {
            return (Vec::new(), None);
        };
        let copies = std::mem::take(&mut g.copies);
        if !g.cut {
            return (copies, None);
        }
        let g = self.giving.take().expect("checked above");
        (copies, Some(g.leaves))
    }

    /// The handoff broke: no mark is waited for; the cut (and the topics) go with the
    /// copies next taken.
    pub fn cut_now(&mut self) {
        if let Some(g) = self.giving.as_mut() {
            g.cut = true;
        }
    }

    /// This worker's crossing as the giver, while its cut is still to go.
    pub fn giving(&self) -> Option<u64> {
        self.giving.as_ref().map(|g| g.token)
    }

    // ---- the taker ---------------------------------------------------------------------

    /// The giver on `line` announced crossing `token`.
    pub fn take(&mut self, line: usize, token: u64) {
        self.taking.retain(|t| t.line != line);
        self.taking.push(Taking {
            line,
            token,
            conns: HashSet::new(),
            marked: false,
            cut: false,
            later: Vec::new(),
            until: None,
        });
    }

    /// Connection `id` came on `line`.
    pub fn adopted(&mut self, line: usize, id: ConnId) {
        if let Some(t) = self.taking.iter_mut().find(|t| t.line == line) {
            t.conns.insert(id);
        }
    }

    /// The giver on `line` has put its last connection on it: the mark to ask for, once.
    pub fn ask_mark(&mut self, line: usize, now: Instant) -> Option<u64> {
        let t = self.taking.iter_mut().find(|t| t.line == line)?;
        if t.until.is_some() {
            return None;
        }
        t.until = Some(now + WAIT);
        Some(t.token)
    }

    /// Whether a message read here from another host must not go to `id` now: it is one of
    /// the clients a crossing is still under way for.
    pub fn withholds(&self, id: ConnId) -> bool {
        self.taking.iter().any(|t| t.conns.contains(&id))
    }

    /// Whether any crossing is under way as the taker.
    pub fn is_taking(&self) -> bool {
        !self.taking.is_empty()
    }

    /// A message read here from another host: kept for the clients of every crossing past
    /// its mark (they get it once the cut comes).
    pub fn read(&mut self, msg: &BusMessage) {
        if !for_clients(msg) {
            return;
        }
        for t in self.taking.iter_mut().filter(|t| t.marked) {
            t.later.push(msg.clone());
        }
    }

    /// The clients the giver's copies on `line` are for.
    pub fn copies_for(&self, line: usize) -> Option<&HashSet<ConnId>> {
        (self.taking.iter().find(|t| t.line == line)).map(|t| &t.conns)
    }

    /// The giver's cut came on `line`: what is owed, if that ends the crossing.
    pub fn cut(&mut self, line: usize) -> Option<Owed> {
        let t = self.taking.iter_mut().find(|t| t.line == line)?;
        t.cut = true;
        self.end_done()
    }

    // ---- both ----------------------------------------------------------------------------

    /// Mark `token` was read here, in its place among the messages from other hosts. The
    /// giver's cut follows; a crossing this worker takes may end (what is owed).
    pub fn marked(&mut self, token: u64) -> Option<Owed> {
        if let Some(g) = self.giving.as_mut().filter(|g| g.token == token) {
            g.cut = true;
        }
        let t = self.taking.iter_mut().find(|t| t.token == token)?;
        t.marked = true;
        self.end_done()
    }

    /// Line `line` is gone: the crossing on it ends, with what it owes, unless its cut came
    /// (the giver had no more to send: the mark is still waited for).
    pub fn line_gone(&mut self, line: usize) -> Option<Owed> {
        let at = (self.taking.iter()).position(|t| t.line == line && !t.cut)?;
        let t = self.taking.swap_remove(at);
        Some((t.conns, t.later))
    }

    /// This worker hands its clients over in turn: every crossing it takes ends now.
    pub fn end_taking(&mut self) -> Vec<Owed> {
        (self.taking.drain(..))
            .map(|t| (t.conns, t.later))
            .collect()
    }

    /// The earliest moment a wait for a mark ends.
    pub fn due(&self) -> Option<Instant> {
        let giving = self
            .giving
            .as_ref()
            .filter(|g| !g.cut)
            .and_then(|g| g.until);
        (self.taking.iter().filter_map(|t| t.until))
            .chain(giving)
            .min()
    }

    /// Ends the waits past their time: the giver cuts without the mark (true if it must put
    /// its cut on the line now); the crossings taken end, with what they owe.
    pub fn overdue(&mut self, now: Instant) -> (bool, Vec<Owed>) {
        let mut cut = false;
        if let Some(g) = self.giving.as_mut()
            && !g.cut
            && g.until.is_some_and(|at| now >= at)
        {
            log::warn!("no mark from redis in {WAIT:?}: handing over without it");
            g.cut = true;
            cut = true;
        }
        let mut owed = Vec::new();
        while let Some(at) = (self.taking.iter()).position(|t| t.until.is_some_and(|u| now >= u)) {
            log::warn!("no mark from redis in {WAIT:?}: taking over without it");
            let t = self.taking.swap_remove(at);
            owed.push((t.conns, t.later));
        }
        (cut, owed)
    }

    /// Ends the first crossing taken that has both its mark and its cut.
    fn end_done(&mut self) -> Option<Owed> {
        let at = self.taking.iter().position(|t| t.marked && t.cut)?;
        let t = self.taking.swap_remove(at);
        Some((t.conns, t.later))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    fn id(n: u32) -> ConnId {
        ConnId { serial: 1, idx: n }
    }

    fn msg(s: &str) -> BusMessage {
        BusMessage::Broadcast(Message::from(s))
    }

    #[test]
    fn the_giver_copies_until_the_mark_then_cuts_and_leaves_its_topics() {
        let mut c = Crossings::default();
        c.give(7);
        c.copy(&msg("a"));
        c.copy(&BusMessage::Ask(1, "{}".into()));
        assert!(c.defer_leave("news"));
        assert!(c.defer_leave("sport"));
        c.cancel_leave("sport");
        assert_eq!(c.take_copies(), (vec![msg("a")], None));
        c.given(Instant::now());
        assert_eq!(c.marked(8), None);
        c.copy(&msg("b"));
        assert_eq!(c.marked(7), None, "no crossing is taken here");
        c.copy(&msg("after the mark"));
        assert_eq!(c.take_copies(), (vec![msg("b")], Some(vec!["news".into()])));
        assert_eq!(c.giving(), None);
        assert!(!c.defer_leave("news"), "over: topics are left at once");
    }

    #[test]
    fn the_taker_holds_back_what_it_reads_after_the_mark_until_the_cut() {
        let mut c = Crossings::default();
        c.take(3, 7);
        c.adopted(3, id(1));
        c.adopted(4, id(2));
        assert!(c.withholds(id(1)) && !c.withholds(id(2)));
        assert_eq!(c.ask_mark(3, Instant::now()), Some(7));
        assert_eq!(c.ask_mark(3, Instant::now()), None, "asked once");
        c.read(&msg("before"));
        assert_eq!(c.marked(7), None);
        c.read(&msg("after"));
        assert_eq!(c.copies_for(3), Some(&HashSet::from([id(1)])));
        let (conns, later) = c.cut(3).expect("mark and cut: over");
        assert_eq!((conns, later), (HashSet::from([id(1)]), vec![msg("after")]));
        assert!(!c.is_taking() && !c.withholds(id(1)));
    }

    #[test]
    fn a_cut_before_the_mark_waits_for_it() {
        let mut c = Crossings::default();
        c.take(0, 9);
        c.adopted(0, id(1));
        assert_eq!(c.cut(0), None);
        assert_eq!(
            c.line_gone(0),
            None,
            "the giver closes its line after its cut"
        );
        c.read(&msg("still before the mark here"));
        assert!(c.withholds(id(1)));
        assert_eq!(c.marked(9), Some((HashSet::from([id(1)]), Vec::new())));
    }

    #[test]
    fn waits_end_on_time() {
        let mut c = Crossings::default();
        let now = Instant::now();
        c.give(1);
        c.take(0, 2);
        c.adopted(0, id(5));
        assert_eq!(c.due(), None, "nothing waits before the last connection");
        c.given(now);
        c.ask_mark(0, now + Duration::from_millis(5));
        assert_eq!(c.due(), Some(now + WAIT));
        assert_eq!(c.overdue(now), (false, Vec::new()));
        let (cut, owed) = c.overdue(now + WAIT + Duration::from_millis(5));
        assert!(cut);
        assert_eq!(owed, vec![(HashSet::from([id(5)]), Vec::new())]);
        assert_eq!(c.take_copies().1, Some(Vec::new()));
        assert_eq!(c.due(), None);
    }

    #[test]
    fn a_line_that_goes_ends_its_crossing() {
        let mut c = Crossings::default();
        c.take(2, 4);
        c.adopted(2, id(1));
        c.marked(4);
        c.read(&msg("x"));
        assert_eq!(
            c.line_gone(2),
            Some((HashSet::from([id(1)]), vec![msg("x")]))
        );
        assert_eq!(c.line_gone(2), None);
    }
}
