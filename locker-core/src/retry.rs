//! Jittered exponential back-off with a seedable source, so a run can be replayed.

use std::sync::Mutex;
use std::time::Duration;

/// A small seedable random source (xorshift64*), shared by a [`Locker`](crate::Locker)'s tasks.
#[derive(Debug)]
pub(crate) struct Jitter {
    state: Mutex<u64>,
}

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        // Zero is a fixed point of xorshift; mix the seed so every seed gives a live state.
        let mixed = seed ^ 0x9E37_79B9_7F4A_7C15;
        Jitter {
            state: Mutex::new(if mixed == 0 { 1 } else { mixed }),
        }
    }

    /// A seed from the process's hash randomness, for lockers built without one.
    pub(crate) fn random_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x6c6f_636b_6572);
        h.finish()
    }

    /// A number in `[0, 1)`.
    pub(crate) fn next_unit(&self) -> f64 {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut x = *s;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *s = x;
        let out = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (out >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The delay before retry number `attempt` (0-based): `base * 2^attempt`, capped at `max`,
    /// then scaled by a random factor in `[0.5, 1)` so that clients spread out.
    pub(crate) fn backoff(&self, attempt: u32, base: Duration, max: Duration) -> Duration {
        let exp = base.saturating_mul(1u32 << attempt.min(16)).min(max);
        exp.mul_f64(0.5 + self.next_unit() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let a = Jitter::new(7);
        let b = Jitter::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_unit().to_bits(), b.next_unit().to_bits());
        }
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let j = Jitter::new(1);
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(1);
        for attempt in 0..40 {
            let d = j.backoff(attempt, base, max);
            let cap = base.saturating_mul(1u32 << attempt.min(16)).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs cap {cap:?}"
            );
        }
    }
}
