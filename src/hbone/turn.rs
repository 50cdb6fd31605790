//! Turns at a writer shared by the tasks of one thread (an HBONE carrier's TLS stream, where
//! each stream and the carrier's own writer hand over whole frames): one task holds the turn,
//! the others wait in line, and a turn given back wakes the first in line alone, so a carrier
//! with 100 streams wakes one task per frame, not 100. Wakers only: no I/O, no runtime.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// The turn and the line of tasks waiting for it.
#[derive(Default)]
pub struct Line {
    held: Cell<bool>,
    /// Waiting tasks, oldest first, by ticket (a task polled again keeps its place).
    waiting: RefCell<VecDeque<(u64, Waker)>>,
    /// The next waiter's ticket.
    tickets: Cell<u64>,
}

impl Line {
    /// Wait for the turn; it passes on when the returned guard drops.
    pub fn take(&self) -> Take<'_> {
        Take { line: self, ticket: None }
    }

    /// Someone holds the turn.
    pub fn is_held(&self) -> bool {
        self.held.get()
    }

    /// Tasks waiting in line.
    pub fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }

    /// Wake every task in line (the writer is gone: each must see it when it gets the turn).
    pub fn wake_all(&self) {
        for (_, w) in self.waiting.borrow().iter() {
            w.wake_by_ref();
        }
    }

    /// Wake the oldest waiter: it takes the turn when polled, or passes it on if dropped first.
    fn wake_next(&self) {
        if let Some((_, w)) = self.waiting.borrow().front() {
            w.wake_by_ref();
        }
    }
}

/// Waiting for the turn (`Line::take`).
pub struct Take<'a> {
    line: &'a Line,
    ticket: Option<u64>,
}

impl Take<'_> {
    /// Out of the line (given the turn, or dropped).
    fn leave(&mut self) {
        if let Some(t) = self.ticket.take() {
            let mut waiting = self.line.waiting.borrow_mut();
            // Nearly always the first: the one woken is the one that takes the turn.
            if waiting.front().is_some_and(|e| e.0 == t) {
                waiting.pop_front();
            } else {
                waiting.retain(|e| e.0 != t);
            }
        }
    }
}

impl<'a> Future for Take<'a> {
    type Output = Turn<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Turn<'a>> {
        let line = self.line;
        if !line.held.replace(true) {
            self.leave();
            return Poll::Ready(Turn(line));
        }
        let mut waiting = line.waiting.borrow_mut();
        match self.ticket {
            Some(t) => {
                if let Some(e) = waiting.iter_mut().find(|e| e.0 == t) {
                    e.1.clone_from(cx.waker());
                }
            }
            None => {
                let t = line.tickets.get();
                line.tickets.set(t.wrapping_add(1));
                waiting.push_back((t, cx.waker().clone()));
                drop(waiting);
                self.ticket = Some(t);
            }
        }
        Poll::Pending
    }
}

impl Drop for Take<'_> {
    fn drop(&mut self) {
        if self.ticket.is_some() {
            self.leave();
            // It may have been the one woken for a free turn (its connection cut meanwhile):
            // the next in line must not be stranded.
            if !self.line.held.get() {
                self.line.wake_next();
            }
        }
    }
}

/// The turn; dropping it wakes the next in line.
pub struct Turn<'a>(&'a Line);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.held.set(false);
        self.0.wake_next();
    }
}
