//! Accept back-off (SPEC §1): when accepting fails for want of descriptors or memory, pause
//! with a growing delay instead of retrying at once, and say so in one log line per interval.
//! The policy only: no I/O, no clock (callers pass `now`), so both the workers (async) and
//! the admin threads (blocking) share it.

use std::io;
use std::time::{Duration, Instant};

/// First pause after a resource error.
pub const MIN_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause: descriptors freed are picked up within this.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per this interval while errors go on.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Whether an accept error means "out of a resource": pausing helps, retrying at once spins
/// (the pending connection stays queued, so the next accept fails the same way).
pub fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// One listener's back-off state.
#[derive(Debug, Default)]
pub struct Backoff {
    pause: Duration,
    last_error: Option<Instant>,
    last_log: Option<Instant>,
    unlogged: u64,
}

/// What to do after a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub struct Pause {
    /// Stop accepting for this long.
    pub pause: Duration,
    /// Log one line now, with this many failures since the previous line.
    pub log: Option<u64>,
}

impl Backoff {
    /// An accept failed with a resource error at `now`: the pause doubles (10 ms up to 1 s)
    /// while errors keep coming; after a quiet second it starts again from 10 ms.
    pub fn failed(&mut self, now: Instant) -> Pause {
        let continuing =
            self.last_error.is_some_and(|t| now.saturating_duration_since(t) <= self.pause + LOG_EVERY);
        self.pause = if continuing { (self.pause * 2).clamp(MIN_PAUSE, MAX_PAUSE) } else { MIN_PAUSE };
        self.last_error = Some(now);
        self.unlogged += 1;
        let due = self.last_log.is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY) || !continuing;
        let log = due.then(|| {
            self.last_log = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        Pause { pause: self.pause, log }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_grows_from_10ms_to_1s_and_logging_is_at_most_one_line_a_second() {
        let mut b = Backoff::default();
        let mut now = Instant::now();
        let (mut pauses, mut lines, mut counted) = (Vec::new(), 0, 0);
        for _ in 0..30 {
            let p = b.failed(now);
            pauses.push(p.pause.as_millis());
            if let Some(n) = p.log {
                lines += 1;
                counted += n;
            }
            now += p.pause; // the next accept fails right after the pause
        }
        assert_eq!(&pauses[..8], &[10, 20, 40, 80, 160, 320, 640, 1000]);
        assert!(pauses[8..].iter().all(|&p| p == 1000));
        // ~24.3 s of errors: the first line at once, then one a second.
        assert!((20..=26).contains(&lines), "{lines} lines");
        assert!(counted + b.unlogged == 30);
    }

    #[test]
    fn after_a_quiet_second_the_pause_starts_again_from_10ms_and_logs_at_once() {
        let mut b = Backoff::default();
        let now = Instant::now();
        for i in 0..10 {
            b.failed(now + Duration::from_millis(i));
        }
        // The line counts the 9 failures not yet logged and this one.
        let later = now + Duration::from_secs(5);
        assert_eq!(b.failed(later), Pause { pause: MIN_PAUSE, log: Some(10) });
    }

    #[test]
    fn only_running_out_of_descriptors_or_memory_is_a_resource_error() {
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_error(&io::Error::from_raw_os_error(e)));
        }
        assert!(!is_resource_error(&io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }
}
