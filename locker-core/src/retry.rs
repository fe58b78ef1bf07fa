//! Jittered exponential back-off, the one used by every retry loop, with a seedable source so
//! that a run can be replayed.

use std::sync::Mutex;
use std::time::Duration;

/// A small seedable random source (xorshift64*), shared by a [`Locker`](crate::Locker)'s tasks:
/// it seeds each [`Backoff`].
#[derive(Debug)]
pub(crate) struct Jitter {
    state: Mutex<u64>,
}

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter {
            state: Mutex::new(mix(seed)),
        }
    }

    /// A seed from the process's hash randomness, for lockers built without one.
    pub(crate) fn random_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x6c6f_636b_6572);
        h.finish()
    }

    /// The next number of the locker's sequence.
    pub(crate) fn next_u64(&self) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        xorshift(&mut state)
    }

    /// A back-off of `base` doubling up to `max`, seeded from this source.
    pub(crate) fn new_backoff(&self, base: Duration, max: Duration) -> Backoff {
        Backoff::new(base, max, self.next_u64())
    }
}

/// Zero is a fixed point of xorshift: mix the seed so that every seed gives a live state.
fn mix(seed: u64) -> u64 {
    let mixed = seed ^ 0x9E37_79B9_7F4A_7C15;
    if mixed == 0 { 1 } else { mixed }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// The delays between the tries of one failing call: `base`, doubling at each failure up to
/// `max`, each scaled by a random factor in `[0.5, 1)` so that clients spread out; back to
/// `base` after a success ([`Backoff::reset`]). A plain value (no clock, no I/O): the state
/// machine keeps one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// A back-off from `base` up to `max`, its jitter seeded with `seed`.
    pub(crate) fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            base,
            max,
            failures: 0,
            rng: mix(seed),
        }
    }

    /// The delay before the next try, counting one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let unit = (xorshift(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
        exp.mul_f64(0.5 + unit / 2.0)
    }

    /// A call succeeded: the next failure waits `base` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// How many failures in a row so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_delays() {
        let (a, b) = (Jitter::new(7), Jitter::new(7));
        let (mut x, mut y) = (
            a.new_backoff(Duration::from_millis(50), Duration::from_secs(1)),
            b.new_backoff(Duration::from_millis(50), Duration::from_secs(1)),
        );
        for _ in 0..100 {
            assert_eq!(x.next_delay(), y.next_delay());
        }
    }

    #[test]
    fn delays_are_bounded_grow_and_reset() {
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(1);
        let mut backoff = Backoff::new(base, max, 1);
        for attempt in 0..40u32 {
            let delay = backoff.next_delay();
            let cap = base.saturating_mul(1u32 << attempt.min(16)).min(max);
            assert!(
                delay >= cap / 2 && delay <= cap,
                "attempt {attempt}: {delay:?} vs cap {cap:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= base);
    }
}
