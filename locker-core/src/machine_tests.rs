//! The state machine step by step: each test feeds inputs and checks the actions and states
//! that come out (no store, no clock, no tasks).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{Entry, Revision};
use crate::error::{FailureKind, LossReason};
use crate::machine::{Action, Command, Failure, Input, Machine, Mode, Outcome, SessionView, State};
use crate::retry::Backoff;
use crate::session::SessionState;
use crate::types::{FencingToken, Ownership};

const LEASE: i64 = 0xa;
const TTL: Duration = Duration::from_secs(10);

fn entry(lease: i64, create_revision: Revision) -> Entry {
    Entry {
        key: format!("k/{lease:x}"),
        value: b"v".to_vec(),
        lease,
        create_revision,
        mod_revision: create_revision,
    }
}

/// A machine that has its session and subscription, its join in flight.
fn joining(mode: Mode, now: Instant) -> Machine {
    let mut m = Machine::new(
        Arc::from("k"),
        b"v".to_vec(),
        mode,
        Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 1),
    );
    assert_eq!(m.poll_action(), Some(Action::OpenSession));
    m.handle(
        Input::SessionOpened(Ok(SessionView {
            lease: LEASE,
            ttl: TTL,
            state: SessionState::Live {
                deadline: now + Duration::from_secs(9),
            },
        })),
        now,
    );
    assert_eq!(m.poll_action(), Some(Action::Subscribe));
    m.handle(Input::Subscribed(Ok(())), now);
    assert_eq!(
        m.poll_action(),
        Some(Action::Join {
            lease: LEASE,
            value: b"v".to_vec()
        })
    );
    m
}

fn actions(m: &mut Machine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

#[test]
fn first_in_the_queue_owns_at_once() {
    let now = Instant::now();
    let mut m = joining(Mode::Persistent, now);
    m.handle(Input::Joined(Ok((entry(LEASE, 5), None, 5))), now);
    let token = FencingToken(5);
    assert_eq!(
        actions(&mut m),
        [Action::Publish(Ownership::Owned { token })]
    );
    assert_eq!(m.ownership(now), Ownership::Owned { token });
    assert!(m.settled());
    // The deadline is the timer: past it, the tenure is lost (and reported).
    assert_eq!(m.poll_timeout(), Some(now + Duration::from_secs(9)));
    let later = now + Duration::from_secs(9);
    assert!(!m.ownership(later).is_owned(), "owned past the deadline");
    m.handle_timeout(later);
    let out = actions(&mut m);
    assert_eq!(
        out[0],
        Action::Publish(Ownership::Lost {
            token,
            reason: LossReason::DeadlinePassed
        })
    );
    assert!(out.contains(&Action::DropSession(LEASE)));
    // A handle joins again.
    assert!(out.contains(&Action::OpenSession));
}

#[test]
fn a_waiter_reads_again_after_its_predecessor_goes_and_then_owns() {
    let now = Instant::now();
    let mut m = joining(Mode::Once, now);
    let before = entry(0xb, 4);
    m.handle(
        Input::Joined(Ok((entry(LEASE, 5), Some(before.clone()), 5))),
        now,
    );
    assert!(actions(&mut m).is_empty());
    assert!(matches!(m.state(), State::Waiting { .. }));
    // A delete of another entry, or of the predecessor from before the read, moves nothing.
    m.handle(
        Input::EntryDeleted {
            key: "k/c".into(),
            revision: 6,
        },
        now,
    );
    m.handle(
        Input::EntryDeleted {
            key: before.key.clone(),
            revision: 5,
        },
        now,
    );
    assert!(actions(&mut m).is_empty());
    m.handle(
        Input::EntryDeleted {
            key: before.key.clone(),
            revision: 7,
        },
        now,
    );
    assert_eq!(
        actions(&mut m),
        [Action::Position {
            entry: "k/a".into(),
            create_revision: 5
        }]
    );
    m.handle(Input::Positioned(Ok((Some(entry(LEASE, 5)), None, 7))), now);
    assert_eq!(
        actions(&mut m),
        [Action::Publish(Ownership::Owned {
            token: FencingToken(5)
        })]
    );
}

#[test]
fn a_delete_seen_while_the_join_is_in_flight_is_not_missed() {
    let now = Instant::now();
    let mut m = joining(Mode::Once, now);
    let before = entry(0xb, 4);
    // The predecessor goes at revision 6, after the join's read at 5, before its answer.
    m.handle(
        Input::EntryDeleted {
            key: before.key.clone(),
            revision: 6,
        },
        now,
    );
    m.handle(Input::Joined(Ok((entry(LEASE, 5), Some(before), 5))), now);
    assert_eq!(
        actions(&mut m),
        [Action::Position {
            entry: "k/a".into(),
            create_revision: 5
        }]
    );
}

#[test]
fn release_stops_claiming_before_the_delete() {
    let now = Instant::now();
    let mut m = joining(Mode::Once, now);
    m.handle(Input::Joined(Ok((entry(LEASE, 5), None, 5))), now);
    actions(&mut m);
    m.handle(Input::Command(Command::Release(Some(1))), now);
    assert_eq!(
        actions(&mut m),
        [
            Action::Publish(Ownership::Released),
            Action::Unsubscribe,
            Action::Delete {
                entry: "k/a".into(),
                create_revision: 5
            }
        ]
    );
    assert!(!m.ownership(now).is_owned());
    m.handle(Input::Deleted(Ok(true)), now);
    let out = actions(&mut m);
    assert_eq!(out[0], Action::Reply(1, Outcome::Done));
    assert!(m.is_ended());
}

#[test]
fn a_permanent_error_stops_a_handle_and_says_why() {
    let now = Instant::now();
    let mut m = joining(Mode::Persistent, now);
    m.handle(
        Input::Joined(Err(Failure::Permanent(FailureKind::PermissionDenied))),
        now,
    );
    let out = actions(&mut m);
    assert!(out.contains(&Action::KeepError));
    assert!(out.contains(&Action::Publish(Ownership::Failed {
        kind: FailureKind::PermissionDenied
    })));
    // The join may have gone through: the reaper looks for its entry.
    assert!(out.contains(&Action::ReapUnseenJoin {
        entry: "k/a".into(),
        lease: LEASE
    }));
    assert_eq!(m.state(), &State::Ended);
}

#[test]
fn a_retryable_error_backs_off_and_tries_again() {
    let now = Instant::now();
    let mut m = joining(Mode::Once, now);
    m.handle(Input::Joined(Err(Failure::Retryable)), now);
    assert!(actions(&mut m).is_empty());
    let retry = m.poll_timeout().expect("a back-off");
    assert!(retry > now && retry <= now + Duration::from_millis(50));
    m.handle_timeout(retry);
    assert_eq!(actions(&mut m), [Action::OpenSession]);
}

#[test]
fn a_try_that_finds_the_lock_held_removes_its_entry_before_answering() {
    let now = Instant::now();
    let mut m = joining(Mode::TryOnce, now);
    m.handle(
        Input::Joined(Ok((entry(LEASE, 5), Some(entry(0xb, 4)), 5))),
        now,
    );
    let out = actions(&mut m);
    assert!(out.contains(&Action::Delete {
        entry: "k/a".into(),
        create_revision: 5
    }));
    assert!(!m.settled(), "answered before the entry is gone");
    m.handle(Input::Deleted(Ok(true)), now);
    assert!(m.settled());
    assert_eq!(m.published(), Ownership::Released);
}

/// A held lock whose entry is deleted at `revision` (by someone else, or with its lease): not
/// owned at once, and a lookup of the lease asked for.
fn held_then_deleted(mode: Mode, now: Instant) -> Machine {
    let mut m = joining(mode, now);
    m.handle(Input::Joined(Ok((entry(LEASE, 5), None, 5))), now);
    actions(&mut m);
    m.handle(
        Input::EntryDeleted {
            key: "k/a".into(),
            revision: 8,
        },
        now,
    );
    assert_eq!(
        actions(&mut m),
        [
            Action::Publish(Ownership::Ending {
                token: FencingToken(5)
            }),
            Action::CheckLease { lease: LEASE }
        ]
    );
    assert_eq!(
        m.ownership(now),
        Ownership::Ending {
            token: FencingToken(5)
        }
    );
    m
}

#[test]
fn a_held_entry_deleted_by_someone_else_is_a_loss_that_a_handle_reports_and_rejoins() {
    let now = Instant::now();
    let mut m = held_then_deleted(Mode::Persistent, now);
    // The lease lives: someone else deleted the entry.
    m.handle(Input::LeaseChecked(Ok(true)), now);
    assert_eq!(
        actions(&mut m),
        [
            Action::Publish(Ownership::Lost {
                token: FencingToken(5),
                reason: LossReason::EntryDeleted
            }),
            Action::Publish(Ownership::Acquiring),
            Action::OpenSession,
        ]
    );
}

#[test]
fn a_held_entry_gone_with_its_lease_is_lease_gone_and_the_session_is_dropped() {
    let now = Instant::now();
    let mut m = held_then_deleted(Mode::Once, now);
    m.handle(Input::Command(Command::Release(Some(3))), now);
    assert_eq!(actions(&mut m), [], "the release waits for the reason");
    m.handle(Input::LeaseChecked(Ok(false)), now);
    let out = actions(&mut m);
    assert_eq!(
        out[0],
        Action::Publish(Ownership::Lost {
            token: FencingToken(5),
            reason: LossReason::LeaseGone
        })
    );
    assert!(out.contains(&Action::DropSession(LEASE)), "{out:?}");
    assert!(
        out.contains(&Action::Reply(3, Outcome::NotOwned(LossReason::LeaseGone))),
        "{out:?}"
    );
    assert!(m.is_ended());
}

#[test]
fn a_lookup_that_fails_says_what_was_seen() {
    let now = Instant::now();
    let mut m = held_then_deleted(Mode::Once, now);
    m.handle(Input::LeaseChecked(Err(Failure::Retryable)), now);
    assert_eq!(
        actions(&mut m)[0],
        Action::Publish(Ownership::Lost {
            token: FencingToken(5),
            reason: LossReason::EntryDeleted
        })
    );
}

#[test]
fn a_hung_session_is_unconfirmed_then_lost_at_its_deadline() {
    let now = Instant::now();
    let mut m = joining(Mode::Once, now);
    m.handle(Input::Joined(Ok((entry(LEASE, 5), None, 5))), now);
    actions(&mut m);
    let deadline = now + Duration::from_secs(9);
    m.handle(
        Input::SessionChanged(SessionState::Unconfirmed { deadline }),
        now,
    );
    let token = FencingToken(5);
    assert_eq!(
        actions(&mut m),
        [Action::Publish(Ownership::Unconfirmed { token, deadline })]
    );
    m.handle_timeout(deadline);
    assert_eq!(
        actions(&mut m)[0],
        Action::Publish(Ownership::Lost {
            token,
            reason: LossReason::DeadlinePassed
        })
    );
    assert_eq!(m.state(), &State::Ended);
}

// The bugs the model checker found, step by step.

#[test]
fn a_join_answered_after_the_delete_of_its_entry_does_not_hold_it() {
    let now = Instant::now();
    let mut m = joining(Mode::Persistent, now);
    // The watch says the entry went (an operator) before the join's answer comes.
    m.handle(
        Input::EntryDeleted {
            key: "k/a".into(),
            revision: 6,
        },
        now,
    );
    m.handle(Input::Joined(Ok((entry(LEASE, 5), None, 5))), now);
    let out = actions(&mut m);
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Publish(o) if o.is_owned())),
        "held a deleted entry: {out:?}"
    );
    assert!(!m.ownership(now).is_owned());
    // It joins again (the session is still good).
    assert!(out.contains(&Action::OpenSession), "{out:?}");
}

#[test]
fn a_drop_while_a_release_waits_to_retry_its_delete_does_not_stop_it() {
    let now = Instant::now();
    let mut m = joining(Mode::Once, now);
    m.handle(Input::Joined(Ok((entry(LEASE, 5), None, 5))), now);
    actions(&mut m);
    m.handle(Input::Command(Command::Release(Some(1))), now);
    actions(&mut m);
    // The delete fails: a retry is due after a back-off. The guard is dropped meanwhile.
    m.handle(Input::Deleted(Err(Failure::Retryable)), now);
    m.handle(Input::Command(Command::Release(None)), now);
    assert!(
        matches!(m.state(), State::Releasing { .. }),
        "{:?}",
        m.state()
    );
    let retry = m.poll_timeout().expect("a retry");
    m.handle_timeout(retry);
    assert!(actions(&mut m).contains(&Action::Delete {
        entry: "k/a".into(),
        create_revision: 5
    }));
    m.handle(Input::Deleted(Ok(true)), retry);
    assert_eq!(
        actions(&mut m),
        [Action::Reply(1, Outcome::Done), Action::Unsubscribe]
    );
    assert!(m.is_ended());
}

#[test]
fn a_waiter_whose_watch_closes_during_a_value_update_joins_again() {
    let now = Instant::now();
    let mut m = joining(Mode::Persistent, now);
    m.handle(
        Input::Joined(Ok((entry(LEASE, 5), Some(entry(0xb, 4)), 5))),
        now,
    );
    actions(&mut m);
    m.handle(Input::Command(Command::SetValue(b"w".to_vec(), 1)), now);
    assert!(matches!(
        actions(&mut m).as_slice(),
        [Action::Update { .. }]
    ));
    // The watch closes while the update is in flight: once it is answered, the waiter does
    // not wait on with no watch.
    m.handle(Input::WatchClosed, now);
    m.handle(Input::Updated(Ok(Some(9))), now);
    let mut out = actions(&mut m);
    if let Some(Action::Position { .. }) = out.last() {
        m.handle(
            Input::Positioned(Ok((Some(entry(LEASE, 5)), Some(entry(0xb, 4)), 6))),
            now,
        );
        out.extend(actions(&mut m));
    }
    assert!(out.contains(&Action::OpenSession), "{out:?}");
}
