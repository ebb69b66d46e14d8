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
//! - The taker gives the clients it took on that line none of what it reads before the mark
//!   (the giver's copies bring them that), and what it reads after the mark only once the cut
//!   has come, after the last copy.
//! - The taker publishes the mark once the giver's closing record has come, after the
//!   subscriptions the clients brought (Redis has them before the mark), so every message
//!   after the mark reaches it. Redis puts a message in every subscriber's stream at the
//!   same point, so both read the mark at the same place among the messages they share.
//!
//! Only the messages both read are shared out this way: a broadcast or a user's message (on
//! the group's channel both listen to), a publish to a topic the clients brought (the giver
//! listens to it until the mark), and a `send_to` when both are workers of the same slot (the
//! slot's channel). Anything else reaches the taker alone, and it delivers it at once.
//!
//! A client handed after the closing record (its upgrade completed during the stop) gets a
//! crossing of its own: the giver names a new one, and the taker marks again.
//!
//! If the mark does not come within [`WAIT`] (Redis down, or too slow), both go on without
//! it: a message around that moment may then reach a handed client twice or not at all, as
//! Redis's messages do during an outage.

// Without the cluster bus no crossing is ever given.
#![cfg_attr(not(feature = "cluster"), allow(dead_code))]

use super::wire::BusMessage;
use crate::ConnId;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The longest either side waits for the mark once the last connection is on the line.
pub const WAIT: Duration = Duration::from_secs(2);

/// A worker's crossings: at most one as the giver, any number as the taker (one per line
/// at a time, and those whose cut came and whose mark has not).
#[derive(Default)]
pub(crate) struct Crossings {
    giving: Option<Giving>,
    taking: Vec<Taking>,
    /// Crossings named here so far: with the pid, a token no other crossing of the host has.
    named: u32,
}

/// The giver's side of one crossing.
struct Giving {
    token: u64,
    phase: Giver,
    /// What this worker delivered from other hosts since the copies were last taken.
    copies: Vec<BusMessage>,
    /// Topics this worker has no subscriber to any more: left once the mark has come.
    leaves: Vec<String>,
}

/// Where the giver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Giver {
    /// Handing over: every message from another host is copied.
    Copying,
    /// The last connection is on the line: copying until the mark, at the latest until then.
    Waiting(Instant),
    /// The mark came (or the wait is over): the cut goes on the line with the next copies.
    Marked,
}

/// The taker's side of one crossing: the clients that came on one line.
struct Taking {
    line: usize,
    token: u64,
    phase: Taker,
    conns: HashSet<ConnId>,
    /// The topics they brought: the giver listens to them until the mark.
    topics: HashSet<String>,
    /// Giver and taker are workers of the same slot, listening to the same slot channel.
    same_slot: bool,
    /// Set once the mark is asked for: the latest the crossing may end.
    until: Option<Instant>,
}

/// Where the taker is.
enum Taker {
    /// Neither the mark nor the cut yet.
    Before,
    /// The mark was read here; what was read since waits for the cut.
    Marked(Vec<BusMessage>),
    /// The cut came; the mark is still to be read here.
    Cut,
}

/// What the giver puts on the line next.
#[derive(Debug, PartialEq)]
pub(crate) enum ToLine {
    /// Copies of what it delivered from other hosts since the last time.
    Copies(Vec<BusMessage>),
    /// The last copies, then the cut. The crossing is over for the giver, which leaves the
    /// topic channels it kept for it.
    Cut {
        copies: Vec<BusMessage>,
        leave: Vec<String>,
    },
}

/// Clients and the messages they are still to get: what a crossing that ends leaves to do.
pub(crate) type Owed = (HashSet<ConnId>, Vec<BusMessage>);

impl Taking {
    fn active(&self) -> bool {
        !matches!(self.phase, Taker::Cut)
    }

    /// Whether the giver reads `msg` too, so that it is shared out around the mark.
    fn shares(&self, msg: &BusMessage) -> bool {
        match msg {
            BusMessage::Broadcast(_) | BusMessage::SendUser(..) => true,
            BusMessage::Publish(topic, _) => self.topics.contains(topic),
            BusMessage::SendTo(..) => self.same_slot,
            BusMessage::App(_) | BusMessage::Ask(..) | BusMessage::Answer(..) => false,
            BusMessage::Mark(_) => false,
        }
    }

    fn owed(self) -> Owed {
        match self.phase {
            Taker::Marked(later) => (self.conns, later),
            Taker::Before | Taker::Cut => (self.conns, Vec::new()),
        }
    }
}

impl Crossings {
    // ---- the giver ---------------------------------------------------------------------

    /// A token for a crossing this worker gives: its pid and a count.
    pub fn name(&mut self) -> u64 {
        self.named = self.named.wrapping_add(1);
        (u64::from(std::process::id()) << 32) | u64::from(self.named)
    }

    /// This worker hands clients over as crossing `token`: a new one, or, while one is still
    /// copying, that one under the new token (a client going after the closing record: the
    /// taker marks again, and the copying goes on until that mark).
    pub fn give(&mut self, token: u64) {
        match self.giving.as_mut() {
            Some(g) if g.phase != Giver::Marked => {
                g.token = token;
                g.phase = Giver::Copying;
            }
            _ => {
                self.giving = Some(Giving {
                    token,
                    phase: Giver::Copying,
                    copies: Vec::new(),
                    leaves: Vec::new(),
                })
            }
        }
    }

    /// Copies a message from another host delivered here, for the clients handed over.
    pub fn copy(&mut self, msg: &BusMessage) {
        if let Some(g) = self.giving.as_mut()
            && g.phase != Giver::Marked
            && msg.is_for_clients()
        {
            g.copies.push(msg.clone());
        }
    }

    /// Whether leaving `topic` waits for the mark (the clients that took it away may still
    /// be owed its messages): it is then left with the cut.
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

    /// The last connection is on the line: the mark is waited for up to [`WAIT`].
    pub fn given(&mut self, now: Instant) {
        if let Some(g) = self.giving.as_mut().filter(|g| g.phase == Giver::Copying) {
            g.phase = Giver::Waiting(now + WAIT);
        }
    }

    /// The handoff broke: no mark is waited for; the cut goes with the next copies.
    pub fn cut_now(&mut self) {
        if let Some(g) = self.giving.as_mut() {
            g.phase = Giver::Marked;
        }
    }

    /// What goes on the line now (`None`: no crossing is given).
    pub fn take_for_line(&mut self) -> Option<ToLine> {
        let g = self.giving.as_mut()?;
        let copies = std::mem::take(&mut g.copies);
        if g.phase != Giver::Marked {
            return Some(ToLine::Copies(copies));
        }
        let leave = self.giving.take().expect("checked above").leaves;
        Some(ToLine::Cut { copies, leave })
    }

    /// The crossing this worker gives, until its cut has gone on the line.
    pub fn giving(&self) -> Option<u64> {
        self.giving.as_ref().map(|g| g.token)
    }

    // ---- the taker ---------------------------------------------------------------------

    /// The giver on `line` named crossing `token` (`same_slot`: the two are workers of the
    /// same slot). A crossing still under way on the line takes the new token: the giver
    /// copies until the new mark, so what was kept for the old one's cut is dropped.
    pub fn take(&mut self, line: usize, token: u64, same_slot: bool) {
        if let Some(t) = self.active(line) {
            t.token = token;
            t.phase = Taker::Before;
            t.until = None;
            return;
        }
        self.taking.push(Taking {
            line,
            token,
            phase: Taker::Before,
            conns: HashSet::new(),
            topics: HashSet::new(),
            same_slot,
            until: None,
        });
    }

    /// Connection `id`, subscribed to `topics`, came on `line`.
    pub fn adopted(&mut self, line: usize, id: ConnId, topics: Vec<String>) {
        if let Some(t) = self.active(line) {
            t.conns.insert(id);
            t.topics.extend(topics);
        }
    }

    /// The giver on `line` has put its last connection on it: the mark to ask for, once per
    /// token.
    pub fn ask_mark(&mut self, line: usize, now: Instant) -> Option<u64> {
        let t = self.active(line).filter(|t| t.until.is_none())?;
        t.until = Some(now + WAIT);
        Some(t.token)
    }

    /// Whether any crossing is under way as the taker.
    pub fn is_taking(&self) -> bool {
        !self.taking.is_empty()
    }

    /// Whether `msg`, read here from another host, must not go to `id` now: a crossing is
    /// still under way for it, and shares `msg` out.
    pub fn withholds(&self, id: ConnId, msg: &BusMessage) -> bool {
        (self.taking.iter()).any(|t| t.conns.contains(&id) && t.shares(msg))
    }

    /// A message read here from another host: kept for the clients of every crossing past
    /// its mark that shares it out (they get it once the cut comes).
    pub fn read(&mut self, msg: &BusMessage) {
        for t in self.taking.iter_mut() {
            if t.shares(msg)
                && let Taker::Marked(later) = &mut t.phase
            {
                later.push(msg.clone());
            }
        }
    }

    /// Whether the giver's copy `msg`, on `line`, goes to `id`: one of the line's clients, and
    /// a message shared out.
    pub fn copy_for(&self, line: usize, id: ConnId, msg: &BusMessage) -> bool {
        (self.taking.iter())
            .any(|t| t.line == line && t.active() && t.shares(msg) && t.conns.contains(&id))
    }

    /// The giver's cut came on `line`: what is owed, if that ends the crossing.
    pub fn cut(&mut self, line: usize) -> Option<Owed> {
        let at = (self.taking.iter()).position(|t| t.line == line && t.active())?;
        if let Taker::Before = self.taking[at].phase {
            self.taking[at].phase = Taker::Cut;
            return None;
        }
        Some(self.taking.swap_remove(at).owed())
    }

    // ---- both ----------------------------------------------------------------------------

    /// Mark `token` was read here, in its place among the messages from other hosts: the
    /// giver's cut follows; a crossing this worker takes may end (what is owed).
    pub fn marked(&mut self, token: u64) -> Option<Owed> {
        if let Some(g) = self.giving.as_mut().filter(|g| g.token == token) {
            g.phase = Giver::Marked;
        }
        let at = (self.taking.iter()).position(|t| t.token == token)?;
        match self.taking[at].phase {
            Taker::Before => {
                self.taking[at].phase = Taker::Marked(Vec::new());
                None
            }
            Taker::Marked(_) => None,
            Taker::Cut => Some(self.taking.swap_remove(at).owed()),
        }
    }

    /// Line `line` is gone: the crossing under way on it ends, with what it owes. One whose
    /// cut came stays (the giver had no more to send): its mark is still waited for.
    pub fn line_gone(&mut self, line: usize) -> Option<Owed> {
        let at = (self.taking.iter()).position(|t| t.line == line && t.active())?;
        Some(self.taking.swap_remove(at).owed())
    }

    /// This worker hands its clients over in turn: every crossing it takes ends now.
    pub fn end_taking(&mut self) -> Vec<Owed> {
        self.taking.drain(..).map(Taking::owed).collect()
    }

    /// The earliest moment a wait for a mark ends.
    pub fn due(&self) -> Option<Instant> {
        let giving = self.giving.as_ref().and_then(|g| match g.phase {
            Giver::Waiting(until) => Some(until),
            Giver::Copying | Giver::Marked => None,
        });
        (self.taking.iter().filter_map(|t| t.until))
            .chain(giving)
            .min()
    }

    /// Ends the waits past their time: the giver cuts without the mark (true if its cut is
    /// to go on the line now); the crossings taken end, with what they owe.
    pub fn overdue(&mut self, now: Instant) -> (bool, Vec<Owed>) {
        let mut cut = false;
        if let Some(g) = self.giving.as_mut()
            && let Giver::Waiting(until) = g.phase
            && now >= until
        {
            log::warn!("no mark from redis in {WAIT:?}: handing over without it");
            g.phase = Giver::Marked;
            cut = true;
        }
        let mut owed = Vec::new();
        while let Some(at) = (self.taking.iter()).position(|t| t.until.is_some_and(|u| now >= u)) {
            log::warn!("no mark from redis in {WAIT:?}: taking over without it");
            owed.push(self.taking.swap_remove(at).owed());
        }
        (cut, owed)
    }

    /// The crossings taken on line `from` go by `to` from now on: the line turned round.
    pub fn rekey(&mut self, from: usize, to: usize) {
        for t in self.taking.iter_mut().filter(|t| t.line == from) {
            t.line = to;
        }
    }

    /// The crossing under way on `line`, if any.
    fn active(&mut self, line: usize) -> Option<&mut Taking> {
        (self.taking.iter_mut()).find(|t| t.line == line && t.active())
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

    fn publish(topic: &str) -> BusMessage {
        BusMessage::Publish(topic.into(), Message::from("p"))
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
        assert_eq!(c.take_for_line(), Some(ToLine::Copies(vec![msg("a")])));
        c.given(Instant::now());
        assert_eq!(c.marked(8), None);
        c.copy(&msg("b"));
        assert_eq!(c.marked(7), None, "no crossing is taken here");
        c.copy(&msg("after the mark"));
        let cut = ToLine::Cut {
            copies: vec![msg("b")],
            leave: vec!["news".into()],
        };
        assert_eq!(c.take_for_line(), Some(cut));
        assert_eq!((c.giving(), c.take_for_line()), (None, None));
        assert!(!c.defer_leave("news"), "over: topics are left at once");
    }

    #[test]
    fn the_taker_holds_back_what_it_reads_after_the_mark_until_the_cut() {
        let mut c = Crossings::default();
        c.take(3, 7, true);
        c.adopted(3, id(1), vec!["news".into()]);
        c.adopted(4, id(2), Vec::new());
        assert!(c.withholds(id(1), &msg("x")) && !c.withholds(id(2), &msg("x")));
        assert_eq!(c.ask_mark(3, Instant::now()), Some(7));
        assert_eq!(c.ask_mark(3, Instant::now()), None, "asked once");
        c.read(&msg("before"));
        assert_eq!(c.marked(7), None);
        c.read(&msg("after"));
        c.read(&publish("elsewhere"));
        assert!(c.copy_for(3, id(1), &publish("news")));
        assert!(!c.copy_for(3, id(1), &publish("elsewhere")));
        assert!(!c.copy_for(3, id(2), &msg("x")));
        let (conns, later) = c.cut(3).expect("mark and cut: over");
        assert_eq!((conns, later), (HashSet::from([id(1)]), vec![msg("after")]));
        assert!(!c.is_taking() && !c.withholds(id(1), &msg("x")));
    }

    #[test]
    fn only_what_the_giver_reads_too_is_withheld() {
        let mut c = Crossings::default();
        c.take(0, 1, false);
        c.adopted(0, id(1), vec!["brought".into()]);
        assert!(c.withholds(id(1), &publish("brought")));
        assert!(c.withholds(id(1), &BusMessage::SendUser("u".into(), "m".into())));
        assert!(!c.withholds(id(1), &publish("subscribed here since")));
        let to_slot = BusMessage::SendTo(id(1), Message::from("m"));
        assert!(!c.withholds(id(1), &to_slot), "another slot's channel");
    }

    #[test]
    fn a_cut_before_the_mark_waits_for_it() {
        let mut c = Crossings::default();
        c.take(0, 9, true);
        c.adopted(0, id(1), Vec::new());
        assert_eq!(c.cut(0), None);
        assert_eq!(
            c.line_gone(0),
            None,
            "the giver closes its line after its cut"
        );
        c.read(&msg("still before the mark here"));
        assert!(c.withholds(id(1), &msg("x")));
        // The line's key is used again for another giver's line meanwhile.
        c.take(0, 10, true);
        c.adopted(0, id(2), Vec::new());
        assert!(c.withholds(id(1), &msg("x")), "the first crossing stays");
        assert_eq!(c.marked(9), Some((HashSet::from([id(1)]), Vec::new())));
        assert!(c.withholds(id(2), &msg("x")));
    }

    #[test]
    fn a_client_after_the_closing_record_is_marked_again() {
        let mut c = Crossings::default();
        c.give(1);
        c.take(0, 1, true);
        c.adopted(0, id(1), Vec::new());
        c.given(Instant::now());
        assert_eq!(c.ask_mark(0, Instant::now()), Some(1));
        assert_eq!(c.marked(1), None);
        c.read(&msg("after mark 1"));
        // A late client: the giver renames its crossing before the cut of the first.
        c.give(2);
        c.take(0, 2, true);
        c.adopted(0, id(2), Vec::new());
        assert_eq!(c.ask_mark(0, Instant::now()), Some(2));
        assert_eq!(c.marked(1), None, "the old mark means nothing now");
        c.copy(&msg("after mark 1"));
        assert_eq!(
            c.take_for_line(),
            Some(ToLine::Copies(vec![msg("after mark 1")])),
            "copied until the new mark"
        );
        assert_eq!(c.marked(2), None);
        let owed = c.cut(0).expect("over");
        assert_eq!(owed, (HashSet::from([id(1), id(2)]), Vec::new()));
    }

    #[test]
    fn waits_end_on_time() {
        let mut c = Crossings::default();
        let now = Instant::now();
        c.give(1);
        c.take(0, 2, true);
        c.adopted(0, id(5), Vec::new());
        assert_eq!(c.due(), None, "nothing waits before the last connection");
        c.given(now);
        c.ask_mark(0, now + Duration::from_millis(5));
        assert_eq!(c.due(), Some(now + WAIT));
        assert_eq!(c.overdue(now), (false, Vec::new()));
        let (cut, owed) = c.overdue(now + WAIT + Duration::from_millis(5));
        assert!(cut);
        assert_eq!(owed, vec![(HashSet::from([id(5)]), Vec::new())]);
        let cut = ToLine::Cut {
            copies: Vec::new(),
            leave: Vec::new(),
        };
        assert_eq!(c.take_for_line(), Some(cut));
        assert_eq!(c.due(), None);
    }

    #[test]
    fn a_line_that_goes_ends_its_crossing() {
        let mut c = Crossings::default();
        c.take(2, 4, true);
        c.adopted(2, id(1), Vec::new());
        c.marked(4);
        c.read(&msg("x"));
        assert_eq!(
            c.line_gone(2),
            Some((HashSet::from([id(1)]), vec![msg("x")]))
        );
        assert_eq!(c.line_gone(2), None);
    }

    /// Connections coming back on a line before it has turned round: their crossing goes by
    /// the line's new key from then on, copies, cut and all.
    #[test]
    fn a_crossing_follows_its_line_to_a_new_key() {
        const OUT: usize = usize::MAX;
        let mut c = Crossings::default();
        c.take(OUT, 9, true);
        c.adopted(OUT, id(1), Vec::new());
        c.rekey(OUT, 3);
        assert!(c.copy_for(3, id(1), &msg("a")));
        assert!(!c.copy_for(OUT, id(1), &msg("a")));
        assert_eq!(c.ask_mark(3, Instant::now()), Some(9));
        assert_eq!(c.cut(3), None, "the mark is still to come");
        assert_eq!(c.marked(9), Some((HashSet::from([id(1)]), Vec::new())));
        assert!(!c.is_taking());
    }
}
