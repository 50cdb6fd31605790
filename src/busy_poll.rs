//! Bounded busy-polling, like HAProxy's `busy-polling`: for a window after the last read
//! that moved bytes, the worker's event loop keeps reaping completions instead of sleeping,
//! so the next event of a busy connection does not pay the wake-up of an idle CPU (tens of
//! µs on a VM). Off by default (`busy_poll: 0s`): it spends CPU for latency.
//!
//! Two tasks wake each other in turn. A monoio task that wakes *itself* is re-queued at the
//! front of the run queue and would starve every other task; a task woken by another one is
//! queued at the back, so each turn the runtime runs the ready tasks and polls the driver
//! without sleeping.

use std::cell::Cell;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Per-worker busy-poll state, touched by the relay once per read.
#[derive(Default)]
pub struct BusyPoll {
    window: Cell<Duration>,
    /// Reads (and accepts) so far.
    activity: Cell<u64>,
    /// `activity` when the window was last extended.
    seen: Cell<u64>,
    /// End of the current window.
    until: Cell<Option<Instant>>,
    /// Whether the two tasks are passing the turn (not parked).
    running: Cell<bool>,
    parked: [Cell<Option<Waker>>; 2],
}

impl BusyPoll {
    /// Spawn the two polling tasks on this worker.
    pub fn start(self: &Rc<Self>, window: Duration) {
        self.window.set(window);
        for me in 0..2 {
            let this = self.clone();
            monoio::spawn(async move { this.turns(me).await });
        }
    }

    /// Bytes moved (or a connection came): extend the window, or wake the parked tasks.
    #[inline]
    pub fn note(&self) {
        self.activity.set(self.activity.get().wrapping_add(1));
        if self.running.get() {
            return;
        }
        if let Some(w) = self.parked[0].take().or_else(|| self.parked[1].take()) {
            self.running.set(true);
            w.wake();
        }
    }

    /// One task's turns, forever: hand the turn to the other task while the window is open.
    async fn turns(&self, me: usize) {
        std::future::poll_fn(|cx| {
            self.parked[me].set(Some(cx.waker().clone()));
            if self.running.get() && self.window_open(Instant::now()) {
                if let Some(other) = self.parked[1 - me].take() {
                    other.wake();
                }
            } else {
                self.running.set(false);
            }
            Poll::<()>::Pending
        })
        .await
    }

    fn window_open(&self, now: Instant) -> bool {
        match self.until.get() {
            Some(until) if self.activity.get() == self.seen.get() => {
                if now < until {
                    return true;
                }
                self.until.set(None);
                false
            }
            // New activity (or a fresh start): the window runs from now.
            _ => {
                self.seen.set(self.activity.get());
                self.until.set(Some(now + self.window.get()));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_closes_only_after_a_quiet_window() {
        let b = BusyPoll::default();
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        b.window.set(ms(20));
        assert!(b.window_open(t0), "a start opens the window");
        assert!(b.window_open(t0 + ms(19)));
        b.note();
        assert!(b.window_open(t0 + ms(30)), "activity extends it from then");
        assert!(b.window_open(t0 + ms(49)));
        assert!(!b.window_open(t0 + ms(50)), "quiet for a whole window: closed");
        assert!(b.window_open(t0 + ms(51)), "the next turn starts a new window");
    }
}
