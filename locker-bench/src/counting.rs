//! The call counts of the benchmark's backends: `locker_tests::calls`, kept by
//! `locker_tests::RecordingBackend`.

pub(crate) use locker_tests::calls::{Calls, Counts, METHODS};
