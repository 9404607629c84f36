//! The connections' timers in one heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::{Conn, State};

/// Timers of every connection: a heap holding, per connection, at least its next deadline.
/// A later deadline does not add an entry; the earlier one fires and the connection is looked
/// at (finding nothing due) and rescheduled, so the heap stays about one entry per connection.
#[derive(Default)]
pub(super) struct Timers(BinaryHeap<Reverse<(Instant, usize, u64)>>);

impl Timers {
    pub(super) fn schedule(&mut self, handle: usize, conn: &mut Conn) {
        if let Some(at) = conn.deadline()
            && conn.scheduled.is_none_or(|s| at < s)
        {
            conn.scheduled = Some(at);
            self.0.push(Reverse((at, handle, conn.generation)));
        }
    }

    pub(super) fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse((at, ..))| *at)
    }

    /// Marks every connection whose scheduled instant has come.
    pub(super) fn expire(&mut self, now: Instant, st: &mut State) {
        while let Some(&Reverse((at, handle, generation))) = self.0.peek() {
            if at > now {
                break;
            }
            self.0.pop();
            if let Some(conn) = st.conn(handle, generation)
                && conn.scheduled == Some(at)
            {
                conn.scheduled = None;
                st.mark(handle);
            }
        }
    }
}
