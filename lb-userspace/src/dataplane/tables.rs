//! A VIP's table history: the previous table (`LB_PREV`) and the churn
//! hold (see `lb_common::second_chance`).
//!
//! Every rebuild of a VIP starts from the table the builder wants (Maglev
//! of the current weights) and the table the VIP has. Position by
//! position:
//!
//! - unchanged: stays;
//! - its backend left the table (removed, down, drained, stalled: the
//!   builder gave it no position): moves at once, whatever the hold. If the
//!   backend still serves its flows (drained, stalled), it becomes the
//!   position's previous backend (an older one is forgotten); if not
//!   (removed, down), the move starts no hold (its flows are gone);
//! - the builder gives it back to its previous backend: moves at once (the
//!   position still has held only those two);
//! - its backend is still in service but the builder gives the position to
//!   a third (weights changed, a backend joined): moves only if the
//!   position has not moved within the hold (`churn_hold`); else it stays
//!   where it is until it may.
//!
//! A position that moves remembers the backend it had as its *previous*
//! backend, if that backend still serves (a drained backend, weight 0,
//! still has its flows); else it keeps the previous backend it had. A
//! previous backend that is removed or goes down is forgotten (the
//! position's previous becomes its current: no candidate).
//!
//! Hence, with a hold of H: a position has held at most two backends over
//! any window of H in which no backend left the table, the current and the
//! previous; a connection younger than H that this table (or an identical
//! one) scheduled is on one of them. Without a hold (H = 0, VIPs whose
//! weights do not follow load), every rebuild moves what the builder says,
//! and the previous backend covers one move of the position.
//!
//! The hold makes the table lag the builder: a load change that the
//! builder answers by moving a position that moved less than H ago waits.
//! What moves at once still moves in the direction the weights ask, so the
//! shares follow the weights partly at once and wholly within H.

use lb_common::NO_BACKEND;

/// A set of backend ids, one bit per id: a rebuild asks it once or twice
/// per table position (65,537 and more), where a hashed set cost more
/// than the table build itself. Ids beyond the highest inserted one (and
/// [`NO_BACKEND`]) are not in it.
#[derive(Clone, Debug, Default)]
pub struct IdSet(Vec<u64>);

impl IdSet {
    pub fn contains(&self, id: u32) -> bool {
        self.0
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }
}

impl FromIterator<u32> for IdSet {
    fn from_iter<I: IntoIterator<Item = u32>>(ids: I) -> Self {
        let mut words = Vec::new();
        for id in ids.into_iter().filter(|&id| id != NO_BACKEND) {
            let w = id as usize / 64;
            if w >= words.len() {
                words.resize(w + 1, 0);
            }
            words[w] |= 1u64 << (id % 64);
        }
        IdSet(words)
    }
}

/// A VIP's previous table and when each position last moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The previous backend id at each position (the current one where
    /// there is none).
    pub previous: Vec<u32>,
    /// When each position last moved, in [`Clock`] seconds; 0: not since
    /// the history began.
    pub moved: Vec<u32>,
}

/// The table clock, in seconds from 1 (0 means "never"): since the
/// dataplane started; or, for a fleet member, Unix seconds pinned to the
/// time the fleet's steering leader published (see
/// [`Clock::pin`]), so that every member's churn hold decides alike.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: std::time::Instant,
    pinned: Option<u32>,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            start: std::time::Instant::now(),
            pinned: None,
        }
    }

    pub fn now(&self) -> u32 {
        self.pinned
            .unwrap_or_else(|| (self.start.elapsed().as_secs() as u32).saturating_add(1))
    }

    /// From now on, the clock reads `at` (until pinned again).
    pub fn pin(&mut self, at: u32) {
        self.pinned = Some(at.max(1));
    }
}

/// Unix seconds now, as the fleet's table clock counts.
pub fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32)
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// What one rebuild moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moves {
    /// Positions that moved.
    pub moved: usize,
    /// Positions whose backend left the table (moved whatever the hold).
    pub forced: usize,
    /// Positions the builder wanted moved that the hold kept.
    pub held: usize,
    /// When the first held position may move ([`Clock`] seconds; 0: none
    /// held).
    pub release_at: u32,
}

impl History {
    /// The history of a table that has none: no previous backends.
    pub fn fresh(table: &[u32]) -> History {
        History {
            previous: table.to_vec(),
            moved: vec![0; table.len()],
        }
    }

    /// The history of an adopted table `table` whose previous table, as
    /// the maps hold it, is `previous`: positions with a previous backend
    /// count as moved `now` (they may have moved just before the restart).
    pub fn adopted(table: &[u32], previous: Vec<u32>, now: u32) -> History {
        let moved = table
            .iter()
            .zip(&previous)
            .map(|(c, p)| if c != p { now } else { 0 })
            .collect();
        History { previous, moved }
    }

    /// The table to write given the one the VIP has (`current`, empty for
    /// a new VIP) and the one the builder wants, and the history after it.
    /// `serves(id)`: the backend is one of the VIP's and not down (a
    /// drained or stalled one serves its flows, out of the table). `hold`:
    /// seconds a moved position stays before it may move again while its
    /// backend is in the table.
    pub fn next(
        &mut self,
        current: &[u32],
        wanted: &[u32],
        now: u32,
        hold: u32,
        serves: impl Fn(u32) -> bool,
    ) -> (Vec<u32>, Moves) {
        let mut moves = Moves::default();
        if current.len() != wanted.len() || self.previous.len() != wanted.len() {
            *self = History::fresh(wanted);
            return (wanted.to_vec(), moves);
        }
        // The backends the builder gave positions: the others (removed,
        // down, drained, stalled) take no new flows and leave at once.
        let in_table: IdSet = wanted.iter().copied().collect();
        let mut table = Vec::with_capacity(wanted.len());
        for (pos, (&cur, &want)) in current.iter().zip(wanted).enumerate() {
            let cur_serves = cur != NO_BACKEND && serves(cur);
            let entry = if cur == want {
                cur
            } else if !in_table.contains(cur) {
                moves.forced += 1;
                moves.moved += 1;
                if cur_serves {
                    // Drained or stalled: it keeps its flows, which now
                    // need it as their candidate (an older previous
                    // backend is forgotten).
                    self.previous[pos] = cur;
                    self.moved[pos] = now;
                }
                want
            } else if hold == 0
                || self.moved[pos] == 0
                || now.saturating_sub(self.moved[pos]) >= hold
                || want == self.previous[pos]
            {
                moves.moved += 1;
                self.previous[pos] = cur;
                self.moved[pos] = now;
                want
            } else {
                moves.held += 1;
                let at = self.moved[pos].saturating_add(hold);
                if moves.release_at == 0 || at < moves.release_at {
                    moves.release_at = at;
                }
                cur
            };
            let prev = self.previous[pos];
            if prev != entry && (prev == NO_BACKEND || !serves(prev)) {
                self.previous[pos] = entry;
            }
            table.push(entry);
        }
        (table, moves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u32 = 1;
    const B: u32 = 2;
    const C: u32 = 3;

    fn serves(ids: &'static [u32]) -> impl Fn(u32) -> bool {
        move |id| ids.contains(&id)
    }

    #[test]
    fn id_sets_hold_what_was_put_in_and_nothing_else() {
        let s: IdSet = [3, 64, 1000, NO_BACKEND].into_iter().collect();
        for id in [3, 64, 1000] {
            assert!(s.contains(id), "{id}");
        }
        for id in [0, 2, 4, 63, 65, 999, 1001, 1 << 20, NO_BACKEND] {
            assert!(!s.contains(id), "{id}");
        }
        assert!(!IdSet::default().contains(0));
    }

    #[test]
    fn a_moved_position_remembers_its_backend_and_holds() {
        // (Position 3 keeps C in the builder's table throughout.)
        let mut h = History::fresh(&[A, A, B, C]);
        // t=10: position 0 moves to C; its previous is A.
        let (t, m) = h.next(&[A, A, B, C], &[C, A, B, C], 10, 60, serves(&[A, B, C]));
        assert_eq!(t, vec![C, A, B, C]);
        assert_eq!(h.previous, vec![A, A, B, C]);
        assert_eq!(
            m,
            Moves {
                moved: 1,
                forced: 0,
                held: 0,
                release_at: 0
            }
        );
        // t=30: the builder wants it on B, a third backend: held (moved
        // 20 s ago); position 1 moves at once (A has no position left in
        // the builder's table; it keeps serving its flows, as the
        // position's previous backend).
        let (t, m) = h.next(&t, &[B, B, B, C], 30, 60, serves(&[A, B, C]));
        assert_eq!(t, vec![C, B, B, C]);
        assert_eq!(h.previous, vec![A, A, B, C]);
        assert_eq!(
            m,
            Moves {
                moved: 1,
                forced: 1,
                held: 1,
                release_at: 70
            }
        );
        // t=70: the hold is over: position 0 moves, previous C.
        let (t, _) = h.next(&t, &[B, B, B, C], 70, 60, serves(&[A, B, C]));
        assert_eq!(t, vec![B, B, B, C]);
        assert_eq!(h.previous, vec![C, A, B, C]);
    }

    #[test]
    fn a_drained_backend_leaves_at_once_and_stays_the_candidate() {
        let mut h = History::fresh(&[A, B]);
        let (t, _) = h.next(&[A, B], &[C, B], 10, 60, serves(&[A, B, C]));
        assert_eq!(t, vec![C, B]);
        // C drained 5 s later (it serves its flows, the builder gives it
        // no position): it leaves position 0 at once, whatever the hold,
        // and is the position's previous backend.
        let (t, m) = h.next(&t, &[B, B], 15, 60, serves(&[A, B, C]));
        assert_eq!((t, h.previous.clone()), (vec![B, B], vec![C, B]));
        assert_eq!((m.forced, m.held), (1, 0));
    }

    #[test]
    fn a_move_back_to_the_previous_backend_is_never_held() {
        let mut h = History::fresh(&[A]);
        let (t, _) = h.next(&[A], &[B], 10, 60, serves(&[A, B]));
        // The load that moved it is gone 5 s later: back at once.
        let (t, m) = h.next(&t, &[A], 15, 60, serves(&[A, B]));
        assert_eq!((t, h.previous.clone()), (vec![A], vec![B]));
        assert_eq!(m.held, 0);
    }

    #[test]
    fn a_backend_that_was_down_takes_its_positions_back_at_once() {
        let mut h = History::fresh(&[A, B]);
        // A goes down: its position moves (no hold starts) ...
        let (t, _) = h.next(&[A, B], &[B, B], 10, 60, serves(&[B]));
        assert_eq!(t, vec![B, B]);
        // ... and returns to A as soon as A is back, B its previous.
        let (t, m) = h.next(&t, &[A, B], 12, 60, serves(&[A, B]));
        assert_eq!((t, h.previous.clone()), (vec![A, B], vec![B, B]));
        assert_eq!(m.held, 0);
    }

    #[test]
    fn a_backend_leaving_service_moves_at_once_and_is_no_candidate() {
        let mut h = History::fresh(&[A, B]);
        let (t, _) = h.next(&[A, B], &[C, B], 10, 60, serves(&[A, B, C]));
        assert_eq!((t.clone(), h.previous.clone()), (vec![C, B], vec![A, B]));
        // C goes down 5 s later: position 0 moves whatever the hold, and
        // keeps A (which still serves) as its previous.
        let (t, m) = h.next(&t, &[A, B], 15, 60, serves(&[A, B]));
        assert_eq!(t, vec![A, B]);
        assert_eq!(m.forced, 1);
        assert_eq!(h.previous, vec![A, B]);
        // B leaves: position 1 moves to A; B is no candidate.
        let (t, _) = h.next(&t, &[A, A], 16, 60, serves(&[A]));
        assert_eq!(t, vec![A, A]);
        assert_eq!(h.previous, vec![A, A]);
    }

    #[test]
    fn without_a_hold_every_move_applies() {
        let mut h = History::fresh(&[A]);
        let (t, _) = h.next(&[A], &[B], 1, 0, serves(&[A, B, C]));
        let (t, _) = h.next(&t, &[C], 1, 0, serves(&[A, B, C]));
        assert_eq!(t, vec![C]);
        assert_eq!(h.previous, vec![B]);
    }

    /// Over any window shorter than the hold, with every backend serving,
    /// each position holds at most two backends: the one a flow of the
    /// window got is the current or the previous one at every later time
    /// of the window.
    #[test]
    fn within_the_hold_a_flow_finds_its_backend_as_current_or_previous() {
        let mut rng = 0x1234_5678_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let n = 64;
        let hold = 20;
        let mut table: Vec<u32> = (0..n).map(|i| i % 4).collect();
        let mut h = History::fresh(&table);
        let mut past: Vec<Vec<u32>> = vec![table.clone()];
        for now in 1..200u32 {
            // Every backend keeps positions (one leaving the table moves
            // at once: outside the guarantee).
            let wanted: Vec<u32> = (0..n)
                .map(|i| if i < 4 { i } else { (next() % 4) as u32 })
                .collect();
            (table, _) = h.next(&table, &wanted, now, hold, |_| true);
            past.push(table.clone());
            // Every table of the last `hold` seconds.
            let from = past.len().saturating_sub(hold as usize);
            for old in &past[from..] {
                for pos in 0..n as usize {
                    assert!(
                        old[pos] == table[pos] || old[pos] == h.previous[pos],
                        "t={now} pos {pos}: {} is neither {} nor {}",
                        old[pos],
                        table[pos],
                        h.previous[pos]
                    );
                }
            }
        }
    }
}
