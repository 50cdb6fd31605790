//! Bounded busy-polling, like HAProxy's `busy-polling`: for a window after the last read
//! that moved bytes, the worker's event loop keeps reaping completions instead of sleeping,
//! so the next event of a busy connection does not pay the wake-up of an idle CPU (tens of
//! µs on a VM). Off by default (`busy_poll: 0s`): it spends CPU for latency.
//!
//! Two tasks, a lead and a partner, wake each other in turn. A monoio task that wakes
//! *itself* is re-queued at the front of the run queue and would starve every other task; a
//! task woken by another one is queued at the back, so each turn the runtime runs the ready
//! tasks and polls the driver without sleeping. monoio fires timers only when it parks, so
//! every `TIMER_TURN` the lead lets the run queue empty once while a timer of its own is
//! already due: the runtime then parks with a zero timeout and fires every due timer (the
//! worker tick, connect and idle timeouts) without sleeping.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often a long spin lets due timers fire (monoio's timer wheel counts milliseconds).
const TIMER_TURN: Duration = Duration::from_millis(2);
/// The lead's own timer: due well before `TIMER_TURN` has passed.
const TIMER_KICK: Duration = Duration::from_millis(1);

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
    /// Whether the tasks are spinning (not parked).
    running: Cell<bool>,
    /// Wakers of the lead (0) and the partner (1).
    parked: [Cell<Option<Waker>>; 2],
}

impl BusyPoll {
    /// Spawn the two polling tasks on this worker.
    pub fn start(self: &Rc<Self>, window: Duration) {
        self.window.set(window);
        let (lead, partner) = (self.clone(), self.clone());
        monoio::spawn(async move { lead.lead().await });
        monoio::spawn(async move { partner.partner().await });
    }

    /// Bytes moved (or a connection came): extend the window, or wake the parked lead.
    #[inline]
    pub fn note(&self) {
        self.activity.set(self.activity.get().wrapping_add(1));
        if self.running.get() {
            return;
        }
        if let Some(w) = self.parked[0].take() {
            self.running.set(true);
            w.wake();
        }
    }

    async fn lead(&self) {
        loop {
            // Parked until note().
            poll_fn(|cx| match self.running.get() {
                true => Poll::Ready(()),
                false => {
                    self.parked[0].set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            // Spin for up to TIMER_TURN, then let due timers fire; or stop when the window closes.
            let mut kick = std::pin::pin!(monoio::time::sleep(TIMER_KICK));
            let armed = Instant::now();
            poll_fn(|cx| {
                if kick.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(()); // timers ran: arm the next kick
                }
                let now = Instant::now();
                if !self.window_open(now) {
                    self.running.set(false);
                    return Poll::Ready(());
                }
                self.parked[0].set(Some(cx.waker().clone()));
                if now.duration_since(armed) < TIMER_TURN
                    && let Some(partner) = self.parked[1].take()
                {
                    partner.wake();
                }
                Poll::Pending
            })
            .await;
        }
    }

    async fn partner(&self) {
        poll_fn(|cx| {
            self.parked[1].set(Some(cx.waker().clone()));
            if self.running.get()
                && let Some(lead) = self.parked[0].take()
            {
                lead.wake();
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
