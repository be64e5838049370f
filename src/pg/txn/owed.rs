//! The answers a held server connection owes, in order, and for each whether the client
//! asked for it. The client must see exactly the answers to what it sent; the proxy adds
//! requests of its own (re-preparing a statement on a new connection, closing a name
//! before reusing it, replaying session settings), whose answers are dropped here.

use std::collections::VecDeque;

use super::conn::Prepared;
use crate::pg::protocol::tags::BackendTag;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// ParseComplete; `hash`: the named statement it creates on the connection.
    ParseComplete {
        pass: bool,
        hash: Option<u64>,
    },
    CloseComplete {
        pass: bool,
    },
    /// A client's Sync or simple Query: answered by ReadyForQuery.
    Ready,
    /// A simple Query of the proxy's own (session-state replay): everything up to and
    /// including its ReadyForQuery is dropped.
    Replay,
    /// The proxy's write-floor question (Bind, Execute, Sync of its prepared statement),
    /// sent right after a commit (read-your-writes: `Machine::ask_floor`): its row is
    /// kept, the rest dropped.
    Floor,
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The client asked for it.
    Pass,
    /// An answer to the proxy's own request.
    Drop,
    /// An error answering the proxy's own replay request (dropped, worth a log line).
    ReplayError,
    /// The ReadyForQuery that ends a client request (`Ready`).
    Ready,
    /// The row answering the write-floor question (`Owed::Floor`).
    FloorRow,
    /// An error answering the write-floor question.
    FloorFailed,
    /// The ReadyForQuery that ends the write-floor question's answer.
    FloorEnd,
}

#[derive(Debug, Default)]
pub struct OwedQueue {
    queue: VecDeque<Owed>,
    /// `Ready` entries in `queue`.
    ready: usize,
}

impl OwedQueue {
    /// The queue's storage, moved in and out at rest (`spares`; nothing is owed then, so
    /// the count of `Ready` entries stays right).
    pub(super) fn storage(&mut self) -> &mut VecDeque<Owed> {
        &mut self.queue
    }

    pub fn push(&mut self, o: Owed) {
        self.ready += (o == Owed::Ready) as usize;
        self.queue.push_back(o);
    }

    /// Insert before the last entry (a request that must be answered before the last one
    /// queued: see DEALLOCATE).
    pub fn insert_before_last(&mut self, o: Owed) {
        let at = self.queue.len().saturating_sub(1);
        self.ready += (o == Owed::Ready) as usize;
        self.queue.insert(at, o);
    }

    pub fn clear(&mut self) {
        self.queue.clear();
        self.ready = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Client requests (Sync, Query) not yet answered by ReadyForQuery.
    pub fn pending(&self) -> usize {
        self.ready
    }

    /// The next answers are those of the proxy's own simple Query: a replayed setting or
    /// the write-floor question (none passed on).
    pub fn replaying(&self) -> bool {
        matches!(self.queue.front(), Some(Owed::Replay | Owed::Floor))
    }

    /// All the client asked is answered; only the write-floor question's answers are to
    /// come (it is queued last, after its statement's Close and Parse if the connection
    /// did not have it, and the client's next messages wait for its answer).
    pub fn only_floor(&self) -> bool {
        self.ready == 0 && self.queue.back() == Some(&Owed::Floor)
    }

    pub fn last(&self) -> Option<Owed> {
        self.queue.back().copied()
    }

    /// Decide on one server message (`tag`). `prepared`: the named statements of the
    /// connection, corrected when a Parse turns out not to have created one.
    pub fn on_message(&mut self, tag: BackendTag, prepared: &mut Prepared) -> Verdict {
        use BackendTag::*;
        if self.queue.front() == Some(&Owed::Replay) {
            return match tag {
                ReadyForQuery => {
                    self.queue.pop_front();
                    Verdict::Drop
                }
                ErrorResponse => Verdict::ReplayError,
                _ => Verdict::Drop,
            };
        }
        if self.queue.front() == Some(&Owed::Floor) {
            return match tag {
                DataRow => Verdict::FloorRow,
                ErrorResponse => Verdict::FloorFailed,
                ReadyForQuery => {
                    self.queue.pop_front();
                    Verdict::FloorEnd
                }
                _ => Verdict::Drop,
            };
        }
        match tag {
            ParseComplete | CloseComplete => {
                // Answers never cross a Sync: look only up to the next Ready.
                let found = self
                    .queue
                    .iter()
                    .take_while(|o| !matches!(o, Owed::Ready | Owed::Replay | Owed::Floor))
                    .position(|o| {
                        matches!(
                            (o, tag),
                            (Owed::ParseComplete { .. }, ParseComplete) | (Owed::CloseComplete { .. }, CloseComplete)
                        )
                    });
                match found.and_then(|i| self.queue.remove(i)) {
                    Some(Owed::ParseComplete { pass, .. } | Owed::CloseComplete { pass }) if !pass => Verdict::Drop,
                    _ => Verdict::Pass,
                }
            }
            ErrorResponse => {
                // In the extended protocol the server skips everything up to Sync: those
                // answers will not come, and a skipped or failed Parse created nothing.
                while let Some(Owed::ParseComplete { .. } | Owed::CloseComplete { .. }) = self.queue.front() {
                    if let Some(Owed::ParseComplete { hash: Some(h), .. }) = self.queue.pop_front() {
                        prepared.remove(&h);
                    }
                }
                // Preparing the floor question failed: its answer, not the client's.
                if self.queue.front() == Some(&Owed::Floor) {
                    return Verdict::FloorFailed;
                }
                Verdict::Pass
            }
            ReadyForQuery => {
                while let Some(o) = self.queue.pop_front() {
                    if o == Owed::Ready {
                        self.ready -= 1;
                        return Verdict::Ready;
                    }
                }
                // A ReadyForQuery nobody asked for: pass it, the client's view is the
                // server's.
                Verdict::Pass
            }
            _ => Verdict::Pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(q: &mut OwedQueue, tags: &[u8]) -> Vec<Verdict> {
        let mut prepared = Prepared::default();
        tags.iter()
            .map(|&t| q.on_message(BackendTag::of(t), &mut prepared))
            .collect()
    }

    #[test]
    fn a_statement_prepared_for_the_client_is_invisible() {
        // Bind of a statement prepared on another connection: Close + Parse (dropped),
        // then the client's Bind/Execute/Sync.
        let mut q = OwedQueue::default();
        q.push(Owed::CloseComplete { pass: false });
        q.push(Owed::ParseComplete {
            pass: false,
            hash: Some(7),
        });
        q.push(Owed::Ready);
        assert_eq!(q.pending(), 1);
        use Verdict::*;
        assert_eq!(run(&mut q, b"312DCZ"), vec![Drop, Drop, Pass, Pass, Pass, Ready]);
        assert!(q.is_empty());
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn an_error_mid_pipeline_skips_the_answers_up_to_sync() {
        // Parse(s1) Bind Execute Parse(s2) Sync; the first Execute fails.
        let mut q = OwedQueue::default();
        q.push(Owed::ParseComplete {
            pass: true,
            hash: Some(1),
        });
        q.push(Owed::ParseComplete {
            pass: true,
            hash: Some(2),
        });
        q.push(Owed::Ready);
        let mut prepared: Prepared = [1, 2].into_iter().collect();
        assert_eq!(q.on_message(BackendTag::of(b'1'), &mut prepared), Verdict::Pass);
        assert_eq!(q.on_message(BackendTag::of(b'2'), &mut prepared), Verdict::Pass);
        assert_eq!(q.on_message(BackendTag::of(b'E'), &mut prepared), Verdict::Pass);
        // s2's Parse was skipped: it does not exist on the connection.
        assert_eq!(prepared, [1].into_iter().collect());
        assert_eq!(q.on_message(BackendTag::of(b'Z'), &mut prepared), Verdict::Ready);
        assert!(q.is_empty());
    }

    #[test]
    fn replayed_settings_are_dropped_whole() {
        let mut q = OwedQueue::default();
        q.push(Owed::Replay);
        q.push(Owed::Replay);
        q.push(Owed::Ready);
        use Verdict::*;
        // SET: CommandComplete, ParameterStatus, ReadyForQuery; a failing one: E, Z.
        assert_eq!(run(&mut q, b"CSZ"), vec![Drop, Drop, Drop]);
        assert_eq!(run(&mut q, b"EZ"), vec![ReplayError, Drop]);
        assert_eq!(run(&mut q, b"TDCZ"), vec![Pass, Pass, Pass, Ready]);
    }

    #[test]
    fn the_floor_question_after_a_commit_keeps_its_row_only() {
        let mut q = OwedQueue::default();
        q.push(Owed::Ready);
        q.push(Owed::Floor);
        use Verdict::*;
        // COMMIT's answer goes to the client; then the question's T, D, C, Z.
        assert_eq!(run(&mut q, b"CZ"), vec![Pass, Ready]);
        assert_eq!(q.pending(), 0);
        assert!(q.only_floor() && q.replaying());
        assert_eq!(run(&mut q, b"TDCZ"), vec![Drop, FloorRow, Drop, FloorEnd]);
        assert!(q.is_empty());
        q.push(Owed::Ready);
        q.push(Owed::Floor);
        assert_eq!(run(&mut q, b"CZEZ"), vec![Pass, Ready, FloorFailed, FloorEnd]);
        assert!(q.is_empty() && !q.only_floor());
    }

    /// A client's request, then the floor question on a connection that lacks its
    /// statement (`hash`): Close, Parse, then its Bind, Execute, Sync.
    fn floor_question_first_time(q: &mut OwedQueue, hash: u64) {
        q.push(Owed::Ready);
        q.push(Owed::CloseComplete { pass: false });
        q.push(Owed::ParseComplete {
            pass: false,
            hash: Some(hash),
        });
        q.push(Owed::Floor);
    }

    #[test]
    fn the_floor_questions_own_statement_is_prepared_unseen() {
        let mut q = OwedQueue::default();
        floor_question_first_time(&mut q, 9);
        use Verdict::*;
        assert_eq!(run(&mut q, b"CZ"), vec![Pass, Ready]);
        assert!(q.only_floor(), "Close and Parse are the proxy's too");
        assert_eq!(run(&mut q, b"312DCZ"), vec![Drop, Drop, Drop, FloorRow, Drop, FloorEnd]);
        assert!(q.is_empty());
        // Its Parse fails: the error is the question's, and nothing was prepared.
        floor_question_first_time(&mut q, 9);
        let mut prepared: Prepared = [9].into_iter().collect();
        let verdicts: Vec<Verdict> = b"CZ3EZ"
            .iter()
            .map(|&t| q.on_message(BackendTag::of(t), &mut prepared))
            .collect();
        assert_eq!(verdicts, vec![Pass, Ready, Drop, FloorFailed, FloorEnd]);
        assert!(prepared.is_empty() && q.is_empty());
    }

    #[test]
    fn parse_answers_do_not_cross_a_sync() {
        let mut q = OwedQueue::default();
        q.push(Owed::Ready);
        q.push(Owed::ParseComplete {
            pass: false,
            hash: None,
        });
        q.push(Owed::Ready);
        use Verdict::*;
        // A ParseComplete before the first Ready cannot be the second unit's.
        assert_eq!(run(&mut q, b"1Z1Z"), vec![Pass, Ready, Drop, Ready]);
    }

    #[test]
    fn deallocate_inserts_its_requests_before_its_query() {
        let mut q = OwedQueue::default();
        q.push(Owed::Ready);
        q.insert_before_last(Owed::CloseComplete { pass: false });
        q.insert_before_last(Owed::ParseComplete {
            pass: false,
            hash: None,
        });
        use Verdict::*;
        assert_eq!(run(&mut q, b"31CZ"), vec![Drop, Drop, Pass, Ready]);
    }
}
