//! The conformance suite on the memory backend, on paused (virtual) time.

use locker_tests::memory::MemoryHarness;

async fn harness(name: &str) -> MemoryHarness {
    MemoryHarness::new(name)
}

locker_tests::conformance_suite!(
    #[tokio::test(start_paused = true)]
    harness
);
