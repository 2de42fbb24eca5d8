//! The stage contract: every loop of the appliance (AF_XDP and `recvmmsg` receive queues, the
//! dispatcher, the workers, the DLQ) is a [`Stage`] run by one driver, [`drive`], instead of a
//! loop written out by hand in each.
//!
//! A stage is polled with a budget (at most that many items a pass: descriptors, datagrams,
//! events); it publishes its thread-local counters after every pass that did work (one flush a
//! batch, never an atomic per event); it gets its housekeeping on a schedule (kernel
//! statistics, anything time-driven that need not run every pass); and it says when it is done
//! (stopped and drained). Between passes that found nothing it waits its own way: receive
//! queues spin for `xdp.busy_spin_us` and then sleep in `poll`/`recvmmsg` (the kernel wakes
//! them); ring consumers use [`Idle`].
//!
//! The driver is generic over the stage, so a pass is a direct, inlinable call: the contract
//! costs one clock read a pass, which it hands to the wait ([`Idle::now`]) so a spinning
//! stage times its spin without a second.

use std::io;
use std::time::Duration;

use crate::engine::idle::Idle;
use crate::wire::event::monotonic_ns;

/// What one pass did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// This many items were handled.
    Worked(usize),
    /// Nothing to do: the driver calls [`Stage::wait`].
    Idle,
    /// Stopped and drained: the driver flushes once more and returns.
    Done,
}

/// One loop of the appliance, driven by [`drive`].
pub trait Stage {
    /// Handles at most `budget` items.
    ///
    /// # Errors
    /// A sink's or the kernel's, which ends the stage (and so the run).
    fn poll(&mut self, budget: usize) -> io::Result<Pass>;

    /// Publishes thread-local counters into the shared ones; after every pass that did work,
    /// and before the driver returns.
    #[inline]
    fn flush(&mut self) {}

    /// How often [`Stage::housekeeping`] runs (zero: never).
    fn housekeeping_every(&self) -> Duration {
        Duration::ZERO
    }

    /// Scheduled work, `now` being [`monotonic_ns`]; also once when the stage is done.
    fn housekeeping(&mut self, _now: u64) {}

    /// Waits after a pass that found nothing.
    #[inline]
    fn wait(&mut self, idle: &mut Idle) {
        idle.wait();
    }
}

/// Runs `stage` until it is done: poll with `budget`, flush after work, housekeeping on its
/// schedule, wait when idle.
///
/// # Errors
/// The first error of a pass.
pub fn drive<S: Stage + ?Sized>(stage: &mut S, budget: usize) -> io::Result<()> {
    let mut idle = Idle::new();
    let every = u64::try_from(stage.housekeeping_every().as_nanos()).unwrap_or(u64::MAX);
    let mut next = 0u64;
    loop {
        let pass = match stage.poll(budget) {
            Ok(p) => p,
            Err(e) => {
                stage.flush();
                return Err(e);
            }
        };
        if pass != Pass::Idle {
            stage.flush();
        }
        if pass == Pass::Done {
            // The last word on scheduled counters (kernel statistics) is the final state.
            if every != 0 {
                stage.housekeeping(monotonic_ns());
            }
            return Ok(());
        }
        if every != 0 {
            let now = monotonic_ns();
            if now >= next {
                stage.housekeeping(now);
                next = now.saturating_add(every);
            }
            idle.set_now(now);
        }
        if pass == Pass::Idle {
            stage.wait(&mut idle);
        } else {
            idle.busy();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts to `n` in passes of at most the budget, housekeeping every millisecond.
    struct Counter {
        n: usize,
        done: usize,
        flushed: usize,
        passes: usize,
        idle_passes: usize,
        chores: usize,
        /// The clock each wait was handed, and the last housekeeping's.
        waits_now: Vec<u64>,
        chore_now: u64,
    }

    impl Stage for Counter {
        fn poll(&mut self, budget: usize) -> io::Result<Pass> {
            self.passes += 1;
            // Every third pass finds nothing.
            if self.passes.is_multiple_of(3) {
                return Ok(Pass::Idle);
            }
            if self.done == self.n {
                return Ok(Pass::Done);
            }
            let k = budget.min(self.n - self.done);
            self.done += k;
            Ok(Pass::Worked(k))
        }
        fn flush(&mut self) {
            self.flushed = self.done;
        }
        fn housekeeping_every(&self) -> Duration {
            Duration::from_nanos(1)
        }
        fn housekeeping(&mut self, now: u64) {
            self.chores += 1;
            self.chore_now = now;
        }
        fn wait(&mut self, idle: &mut Idle) {
            self.idle_passes += 1;
            self.waits_now.push(idle.now());
            // Due after every pass, so this pass's housekeeping saw the same clock read.
            assert_eq!(idle.now(), self.chore_now);
        }
    }

    #[test]
    fn a_stage_runs_to_done_in_budgeted_passes_and_is_flushed() {
        let mut c = Counter {
            n: 1000,
            done: 0,
            flushed: 0,
            passes: 0,
            idle_passes: 0,
            chores: 0,
            waits_now: Vec::new(),
            chore_now: 0,
        };
        let start = monotonic_ns();
        drive(&mut c, 64).unwrap();
        assert_eq!(c.done, 1000);
        assert_eq!(c.flushed, 1000, "flushed before the driver returned");
        // 16 working passes (15 of 64, one of 40), every third pass idle, then Done.
        assert_eq!(c.idle_passes, c.passes / 3);
        assert_eq!(c.passes - c.idle_passes, 17);
        // Due after every pass but the last, and once at the end (two passes within one clock
        // tick share one).
        assert!(c.chores >= 2 && c.chores <= c.passes, "{} chores", c.chores);
        // Each wait is handed the pass's clock read (a spinning stage times its spin by it),
        // never zero for a stage with a schedule, and never going back.
        assert_eq!(c.waits_now.len(), c.idle_passes);
        assert!(c.waits_now[0] >= start);
        assert!(c.waits_now.windows(2).all(|w| w[0] <= w[1]));
    }

    struct Failing;

    impl Stage for Failing {
        fn poll(&mut self, _budget: usize) -> io::Result<Pass> {
            Err(io::Error::other("sink gone"))
        }
    }

    #[test]
    fn an_error_ends_the_stage() {
        let e = drive(&mut Failing, 8).unwrap_err();
        assert_eq!(e.to_string(), "sink gone");
    }
}
