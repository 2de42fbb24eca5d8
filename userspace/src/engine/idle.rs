//! Waiting without locks: what a thread does when its ring is full or empty.
//!
//! - [`backoff`]: the ring we push into is full. Spin briefly, then yield: the consumer is
//!   running and will make room within microseconds.
//! - [`Idle`]: the ring we pop from is empty. Yield a few times (an event usually follows soon
//!   after another), then sleep briefly, then, after a long quiet spell, sleep longer, so an idle
//!   appliance costs almost nothing and a busy one answers within microseconds. The sleeps
//!   assume a tight timer slack, which [`Idle::new`] sets for the calling thread (the default
//!   50 µs slack would otherwise dominate a 20 µs sleep).
//!
//! Where the appliance's threads outnumber the cores (`engine.mode: pipelined` forced on a
//! small machine), `sched_yield` is no way to wait: the thread that would make progress may be
//! the one yielded to, or not. The daemon says so once ([`set_oversubscribed`]), and both waits
//! then sleep where they would have yielded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set when threads that wait on each other outnumber the cores.
static OVERSUBSCRIBED: AtomicBool = AtomicBool::new(false);

/// Says whether threads that wait on each other outnumber the cores: then waits sleep instead
/// of yielding.
pub fn set_oversubscribed(yes: bool) {
    OVERSUBSCRIBED.store(yes, Ordering::Relaxed);
}

/// The yield step of a wait: `sched_yield`, or a short sleep where yielding cannot be trusted.
#[inline]
fn give_way() {
    if OVERSUBSCRIBED.load(Ordering::Relaxed) {
        std::thread::sleep(SHORT_SLEEP);
    } else {
        std::thread::yield_now();
    }
}

/// One step of waiting for room in a full ring.
#[inline]
pub fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        core::hint::spin_loop();
    } else {
        *spins = 0;
        give_way();
    }
}

/// Empty polls answered with `yield_now` before sleeping.
const YIELDS: u32 = 32;
/// Empty polls answered with the short sleep before the long one (about 50 ms of quiet).
const SHORT_SLEEPS: u32 = 2_048;
/// The short sleep: the wake-up latency of a busy pipeline.
pub const SHORT_SLEEP: Duration = Duration::from_micros(20);
/// The long sleep: the wake-up latency after a quiet spell.
pub const LONG_SLEEP: Duration = Duration::from_micros(500);

/// Adaptive waiting for an empty ring; [`Idle::busy`] after each non-empty poll.
#[derive(Debug, Default)]
pub struct Idle {
    empty: u32,
    /// [`monotonic_ns`](crate::wire::event::monotonic_ns) as the driver last read it (zero if
    /// its stage has no schedule and so no clock read).
    now: u64,
}

impl Idle {
    /// A new waiter; also tightens the calling thread's timer slack to 1 µs (best effort) so
    /// its short sleeps are short.
    pub fn new() -> Self {
        #[cfg(all(target_os = "linux", not(miri)))]
        // SAFETY: prctl(PR_SET_TIMERSLACK, ns) takes no pointers and affects only this thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1_000, 0, 0, 0);
        }
        Self::default()
    }

    /// The last poll found work.
    #[inline]
    pub fn busy(&mut self) {
        self.empty = 0;
    }

    /// The clock as [`drive`](crate::engine::stage::drive) read it for this pass's
    /// housekeeping check, so a stage's own wait need not read it again (zero: not read).
    #[inline]
    pub fn now(&self) -> u64 {
        self.now
    }

    #[inline]
    pub(crate) fn set_now(&mut self, now: u64) {
        self.now = now;
    }

    /// The last poll found nothing: wait a little, longer the longer it has been quiet.
    pub fn wait(&mut self) {
        self.empty = self.empty.saturating_add(1);
        std::thread::sleep(match self.empty {
            0..=YIELDS => return give_way(),
            n if n <= YIELDS + SHORT_SLEEPS => SHORT_SLEEP,
            _ => LONG_SLEEP,
        });
    }

    /// How the next [`Idle::wait`] will wait (for tests and logs).
    pub fn next_wait(&self) -> Option<Duration> {
        match self.empty.saturating_add(1) {
            0..=YIELDS => None,
            n if n <= YIELDS + SHORT_SLEEPS => Some(SHORT_SLEEP),
            _ => Some(LONG_SLEEP),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_quiet_and_reset_on_work() {
        let mut idle = Idle::default();
        assert_eq!(idle.next_wait(), None);
        for _ in 0..YIELDS {
            idle.empty += 1;
        }
        assert_eq!(idle.next_wait(), Some(SHORT_SLEEP));
        idle.empty += SHORT_SLEEPS;
        assert_eq!(idle.next_wait(), Some(LONG_SLEEP));
        idle.busy();
        assert_eq!(idle.next_wait(), None);
        idle.wait(); // a yield, not a sleep
        assert_eq!(idle.empty, 1);
    }
}
