//! Turn integrity: which upstream event answers which client event on one upstream connection.
//!
//! The upstream answers client events in the order it received them. The ledger keeps the
//! events sent and not yet answered, and the id of the response running now, and attributes
//! every upstream event to one of them. A turn ends only on a terminal event that belongs to
//! its own `response.create`: a terminal of the running response (matched by `response.id`),
//! or an `error` that answers the create itself (before its `response.created`).
//!
//! Whatever cannot be attributed with certainty *taints* the connection: it may go on serving
//! the session that holds it, but it is never pooled or handed to anyone else. That covers an
//! event nobody asked for, and an `error` that could answer either a side event
//! (`response.steer`, `response.inject`, `response.processed`) or the running response.
//!
//! Events the ledger knows (PROTOCOL.md §2.2, §3): `response.steer` is answered by
//! `response.steer.accepted|pending|failed` or `error`; `response.inject` by
//! `response.inject.created|failed` or `error`; `response.processed` by nothing, or an `error`
//! (so an `error` while it is the oldest unanswered event is uncertain). An accepted steer may
//! end the running response with `response.incomplete` (reason `steered`) followed by a
//! successor `response.created`: the turn goes on with the successor.

use std::collections::VecDeque;

use crate::event::Terminal;

/// A client event sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Create,
    Steer,
    Inject,
    Processed,
}

impl Sent {
    /// The kind of a client event type the gateway forwards; `None` for anything else (it is
    /// answered locally and never reaches the upstream).
    pub fn from_type(ty: &str) -> Option<Sent> {
        match ty {
            "response.create" => Some(Sent::Create),
            "response.steer" => Some(Sent::Steer),
            "response.inject" => Some(Sent::Inject),
            "response.processed" => Some(Sent::Processed),
            _ => None,
        }
    }
}

/// What an upstream event is, for the connection's holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    /// Part of the running response (or of the create awaiting its `response.created`).
    Part,
    /// The terminal event of the turn's create: the turn is over.
    Terminal,
    /// The answer to a side event.
    Answer,
    /// Belongs to nothing the ledger knows; the connection is tainted.
    Unattributed,
}

/// The attribution state of one upstream connection.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Events sent and not yet answered, oldest first (bounded by the caller).
    outstanding: VecDeque<Sent>,
    /// `response.id` of the response running now.
    active: Option<Box<str>>,
    /// A steer was accepted for the running response.
    steer_accepted: bool,
    /// The running response ended `incomplete` because of a steer; its successor follows.
    awaiting_successor: bool,
    tainted: bool,
}

impl Ledger {
    /// Records an event sent upstream.
    pub fn sent(&mut self, kind: Sent) {
        self.outstanding.push_back(kind);
    }

    /// Events sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Marks the connection unusable for anyone else.
    pub fn taint(&mut self) {
        self.tainted = true;
    }

    /// True if everything sent was answered and nothing was left unattributed: the
    /// connection may serve another session.
    pub fn is_clean(&self) -> bool {
        !self.tainted
            && self.outstanding.is_empty()
            && self.active.is_none()
            && !self.awaiting_successor
    }

    pub fn is_tainted(&self) -> bool {
        self.tainted
    }

    /// Attributes one upstream event of type `ty` (`text` is parsed only for the few types
    /// whose attribution needs a field).
    pub fn attribute(&mut self, ty: &str, text: &str) -> Attribution {
        self.attribute_inspected(ty, text, None)
    }

    /// [`Ledger::attribute`], for an event whose terminal fields the caller already parsed
    /// (`inspected`: [`Terminal::inspect`] of this event), so it is parsed once.
    pub fn attribute_inspected(
        &mut self,
        ty: &str,
        text: &str,
        inspected: Option<&Terminal>,
    ) -> Attribution {
        let verdict = match ty {
            "response.created" => self.created(text),
            "response.completed" | "response.failed" | "response.incomplete" => {
                let read;
                let t = match inspected {
                    Some(t) => t,
                    None => {
                        read = Terminal::inspect(ty, text);
                        &read
                    }
                };
                self.response_end(ty, t.response_id.as_deref(), t.steered)
            }
            "error" => self.error(),
            "response.steer.accepted" | "response.steer.pending" | "response.steer.failed" => {
                let accepted = ty == "response.steer.accepted";
                let answered = self.answer(Sent::Steer);
                if answered && accepted {
                    self.steer_accepted = true;
                }
                if answered {
                    Attribution::Answer
                } else {
                    Attribution::Unattributed
                }
            }
            "response.inject.created" | "response.inject.failed" => {
                if self.answer(Sent::Inject) {
                    Attribution::Answer
                } else {
                    Attribution::Unattributed
                }
            }
            _ if self.expects_parts() => Attribution::Part,
            _ => Attribution::Unattributed,
        };
        if verdict == Attribution::Unattributed {
            self.tainted = true;
        }
        verdict
    }

    /// Whether an event of an ordinary type (a delta) would be attributed as part of the
    /// turn now (what [`Ledger::attribute`] answers for it, without side effects).
    pub fn expects_parts(&self) -> bool {
        self.active.is_some() || self.awaiting_successor || self.create_pending()
    }

    /// Whether a `response.created` would be attributed as the turn's now (what
    /// [`Ledger::attribute`] answers for it, without side effects).
    pub fn expects_created(&self) -> bool {
        self.active.is_none() && (self.awaiting_successor || self.create_pending())
    }

    fn create_pending(&self) -> bool {
        self.outstanding.contains(&Sent::Create)
    }

    /// Removes the create and the side events sent before it: the upstream got to the create,
    /// so it had nothing (more) to say about them.
    fn take_create(&mut self) -> bool {
        match self.outstanding.iter().position(|s| *s == Sent::Create) {
            Some(pos) => {
                self.outstanding.drain(..=pos);
                true
            }
            None => false,
        }
    }

    fn created(&mut self, text: &str) -> Attribution {
        let id = crate::event::response_id(text);
        if self.active.is_none() && (self.awaiting_successor || self.take_create()) {
            self.awaiting_successor = false;
            self.steer_accepted = false;
            self.active = Some(id.unwrap_or_default().into());
            return Attribution::Part;
        }
        Attribution::Unattributed
    }

    fn response_end(&mut self, ty: &str, id: Option<&str>, steered: bool) -> Attribution {
        if self.active.as_deref().is_some_and(|a| id == Some(a)) {
            self.active = None;
            if ty == "response.incomplete" && steered && self.steer_accepted {
                self.awaiting_successor = true;
                self.steer_accepted = false;
                return Attribution::Part;
            }
            self.steer_accepted = false;
            return Attribution::Terminal;
        }
        // Ended before it said `response.created`: the create's own answer.
        if self.active.is_none() && !self.awaiting_successor && self.take_create() {
            return Attribution::Terminal;
        }
        Attribution::Unattributed
    }

    fn error(&mut self) -> Attribution {
        let side = self.outstanding.iter().position(|s| *s != Sent::Create);
        let create = self.outstanding.iter().position(|s| *s == Sent::Create);
        match (side, create) {
            // The oldest unanswered event is the create: this is its answer.
            (_, Some(c)) if self.active.is_none() && side.is_none_or(|s| c < s) => {
                self.take_create();
                Attribution::Terminal
            }
            (Some(s), _) => {
                let kind = self.outstanding.remove(s);
                // Certain only for an event that is always answered, with no running response
                // that could have failed instead.
                if self.active.is_some() || self.awaiting_successor || kind == Some(Sent::Processed)
                {
                    self.tainted = true;
                }
                Attribution::Answer
            }
            (None, _) if self.active.is_some() => {
                self.active = None;
                self.steer_accepted = false;
                Attribution::Terminal
            }
            _ => Attribution::Unattributed,
        }
    }

    /// Removes the oldest outstanding `kind` (and the `response.processed` events before it,
    /// which got no answer); false if none is outstanding.
    fn answer(&mut self, kind: Sent) -> bool {
        let Some(pos) = self.outstanding.iter().position(|s| *s == kind) else {
            return false;
        };
        if self
            .outstanding
            .iter()
            .take(pos)
            .all(|s| *s == Sent::Processed)
        {
            self.outstanding.drain(..=pos);
        } else {
            self.outstanding.remove(pos);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Attribution::*;

    fn created(id: &str) -> String {
        format!(r#"{{"type":"response.created","response":{{"id":"{id}"}}}}"#)
    }
    fn ended(ty: &str, id: &str) -> String {
        format!(r#"{{"type":"{ty}","response":{{"id":"{id}"}}}}"#)
    }
    /// Attributes as the engine does (a terminal inspected once and shared with the ledger)
    /// and checks that the ledger's own parse gives the same verdict and state.
    fn feed(l: &mut Ledger, ty: &str, text: &str) -> Attribution {
        let mut own = l.clone();
        let by_own_parse = own.attribute(ty, text);
        let inspected = (ty.starts_with("response.") && crate::event::is_terminal(ty))
            .then(|| crate::event::Terminal::inspect(ty, text));
        let verdict = l.attribute_inspected(ty, text, inspected.as_ref());
        assert_eq!(verdict, by_own_parse, "{ty}");
        assert_eq!(format!("{l:?}"), format!("{own:?}"), "{ty}");
        verdict
    }

    /// The raw relay takes runs of events `event::is_plain_part` accepts, without asking
    /// the ledger: in every state where parts are expected, such an event must be a part
    /// that changes nothing, and every type the ledger reads must be refused.
    #[test]
    fn plain_parts_are_parts_that_change_nothing() {
        use crate::event::is_plain_part;
        let mut states = Vec::new();
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        states.push(l.clone()); // before response.created
        feed(&mut l, "response.created", &created("r1"));
        states.push(l.clone()); // running
        l.sent(Sent::Steer);
        states.push(l.clone()); // running, a steer unanswered
        feed(&mut l, "response.steer.accepted", "{}");
        feed(
            &mut l,
            "response.incomplete",
            r#"{"type":"response.incomplete","response":{"id":"r1","incomplete_details":{"reason":"steered"}}}"#,
        );
        states.push(l.clone()); // awaiting the steered response's successor
        let types = [
            "response.output_text.delta",
            "response.function_call_arguments.delta",
            "response.reasoning_summary_text.delta",
            "response.output_item.added",
            "response.output_item.done",
            "response.content_part.added",
            "response.content_part.done",
            "response.output_text.done",
            "response.in_progress",
            "codex.rate_limits",
            "response.some_future_event",
            "response.created",
            "response.completed",
            "response.failed",
            "response.incomplete",
            "error",
            "response.steer.accepted",
            "response.steer.pending",
            "response.steer.failed",
            "response.inject.created",
            "response.inject.failed",
        ];
        for (i, state) in states.iter().enumerate() {
            assert!(state.expects_parts(), "state {i}");
            for ty in types {
                let mut l = state.clone();
                let text = format!(r#"{{"type":"{ty}","response":{{"id":"r1"}}}}"#);
                let verdict = feed(&mut l, ty, &text);
                let unchanged = format!("{l:?}") == format!("{state:?}");
                if is_plain_part(ty) {
                    assert_eq!(verdict, Part, "state {i}: {ty}");
                    assert!(unchanged, "state {i}: {ty} changed the ledger");
                } else {
                    assert!(
                        verdict != Part || !unchanged,
                        "state {i}: {ty} is plain to the ledger; refused needlessly?"
                    );
                }
            }
        }
    }

    #[test]
    fn a_plain_turn() {
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        assert!(!l.is_clean());
        assert_eq!(feed(&mut l, "codex.rate_limits", "{}"), Part);
        assert_eq!(feed(&mut l, "response.created", &created("r1")), Part);
        assert_eq!(feed(&mut l, "response.output_text.delta", "{}"), Part);
        assert_eq!(feed(&mut l, "response.some_future_event", "{}"), Part);
        assert_eq!(
            feed(
                &mut l,
                "response.completed",
                &ended("response.completed", "r1")
            ),
            Terminal
        );
        assert!(l.is_clean());
    }

    #[test]
    fn an_error_that_answers_the_create_ends_the_turn() {
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        assert_eq!(feed(&mut l, "error", "{}"), Terminal);
        assert!(l.is_clean());
        // A failed response without response.created is the create's answer too.
        l.sent(Sent::Create);
        assert_eq!(
            feed(&mut l, "response.failed", &ended("response.failed", "r9")),
            Terminal
        );
        assert!(l.is_clean());
    }

    #[test]
    fn a_mid_stream_error_of_the_running_response_ends_the_turn() {
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        feed(&mut l, "response.created", &created("r1"));
        assert_eq!(feed(&mut l, "error", "{}"), Terminal);
        assert!(l.is_clean());
    }

    #[test]
    fn a_rejected_steer_does_not_end_the_turn_and_taints() {
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        feed(&mut l, "response.created", &created("r1"));
        l.sent(Sent::Steer);
        // Either the steer's answer or the response's failure: the steer's (FIFO), uncertain.
        assert_eq!(feed(&mut l, "error", "{}"), Answer);
        assert!(l.is_tainted());
        assert_eq!(feed(&mut l, "response.output_text.delta", "{}"), Part);
        assert_eq!(
            feed(
                &mut l,
                "response.completed",
                &ended("response.completed", "r1")
            ),
            Terminal
        );
        assert!(!l.is_clean(), "tainted for good");
    }

    #[test]
    fn terminals_of_other_responses_do_not_end_the_turn() {
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        feed(&mut l, "response.created", &created("r2"));
        assert_eq!(
            feed(
                &mut l,
                "response.completed",
                &ended("response.completed", "r1")
            ),
            Unattributed
        );
        assert!(l.is_tainted());
        assert_eq!(
            feed(
                &mut l,
                "response.completed",
                &ended("response.completed", "r2")
            ),
            Terminal
        );
    }

    #[test]
    fn anything_between_turns_is_unattributed() {
        let mut l = Ledger::default();
        assert_eq!(
            feed(&mut l, "response.output_text.delta", "{}"),
            Unattributed
        );
        assert!(!l.is_clean());
        let mut l = Ledger::default();
        assert_eq!(feed(&mut l, "error", "{}"), Unattributed);
        let mut l = Ledger::default();
        assert_eq!(
            feed(&mut l, "response.created", &created("x")),
            Unattributed
        );
    }

    #[test]
    fn accepted_steers_and_their_successor() {
        let mut l = Ledger::default();
        l.sent(Sent::Create);
        feed(&mut l, "response.created", &created("r1"));
        l.sent(Sent::Steer);
        assert_eq!(feed(&mut l, "response.steer.accepted", "{}"), Answer);
        let steered = r#"{"type":"response.incomplete","response":{"id":"r1","incomplete_details":{"reason":"steered"}}}"#;
        assert_eq!(feed(&mut l, "response.incomplete", steered), Part);
        assert_eq!(feed(&mut l, "response.created", &created("r2")), Part);
        assert_eq!(
            feed(
                &mut l,
                "response.completed",
                &ended("response.completed", "r2")
            ),
            Terminal
        );
        assert!(l.is_clean(), "every event was attributed with certainty");
        // Without an accepted steer, `steered` is just the end of the turn.
        l.sent(Sent::Create);
        feed(&mut l, "response.created", &created("r3"));
        let steered = steered.replace("r1", "r3");
        assert_eq!(feed(&mut l, "response.incomplete", &steered), Terminal);
    }

    #[test]
    fn side_events_between_turns() {
        // A steer between turns answered by an error: certain (a steer is always answered).
        let mut l = Ledger::default();
        l.sent(Sent::Steer);
        assert_eq!(feed(&mut l, "error", "{}"), Answer);
        assert!(l.is_clean());
        // processed, then a create: an error could answer either.
        l.sent(Sent::Processed);
        l.sent(Sent::Create);
        assert_eq!(feed(&mut l, "error", "{}"), Answer);
        assert!(l.is_tainted());
        // processed, then a create that starts: processed needed no answer.
        let mut l = Ledger::default();
        l.sent(Sent::Processed);
        l.sent(Sent::Create);
        assert_eq!(feed(&mut l, "response.created", &created("r1")), Part);
        assert_eq!(
            feed(
                &mut l,
                "response.completed",
                &ended("response.completed", "r1")
            ),
            Terminal
        );
        assert!(l.is_clean());
        // An inject answer with no inject outstanding.
        assert_eq!(feed(&mut l, "response.inject.created", "{}"), Unattributed);
    }

    #[test]
    fn client_event_kinds() {
        assert_eq!(Sent::from_type("response.create"), Some(Sent::Create));
        assert_eq!(Sent::from_type("response.steer"), Some(Sent::Steer));
        assert_eq!(Sent::from_type("response.inject"), Some(Sent::Inject));
        assert_eq!(Sent::from_type("response.processed"), Some(Sent::Processed));
        assert_eq!(Sent::from_type("response.cancel"), None);
        assert_eq!(Sent::from_type("session.update"), None);
    }
}
