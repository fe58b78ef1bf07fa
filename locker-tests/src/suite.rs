//! The behaviours every backend must show, one `pub async fn` each.
//!
//! Each takes the test's [`Harness`] and asserts the behaviour it is named after. Time is tokio
//! time: paused (virtual) on the memory backend, real on etcd; no assertion depends on how long
//! something took in wall time. Orders of events are checked on tokio's clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use locker_core::backend::LeaseId;
use locker_core::{
    Error, FencingToken, Holder, HolderUpdate, LockGuard, LockHandle, LockOptions, Locker,
    LossReason, Ownership, Result, ResumeToken,
};
use tokio::time::{Instant, sleep, timeout};

use crate::harness::{Client, Cut, Harness, HistoryUse, LeaseLog, RecordingBackend};
use crate::record;

/// The TTL of most tests: etcd's minimum.
pub const TTL: Duration = Duration::from_secs(2);

/// The longest any single wait in a test may take before the test fails (generous: a real etcd
/// on a loaded machine).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Every behaviour of the suite, by name. Backends instantiate all of them through
/// [`conformance_suite!`](crate::conformance_suite).
pub const BEHAVIOURS: &[&str] = &[
    "mutual_exclusion_under_many_contenders",
    "waiters_own_in_fifo_order",
    "get_answers_none_when_free",
    "get_answers_holder_value_and_token",
    "value_change_while_holding_is_seen_by_get_and_watch",
    "set_value_while_waiting_is_used_when_owned",
    "watch_starts_with_current_holder",
    "watch_starts_with_none_when_free",
    "watch_sees_put_change_and_delete",
    "a_watch_stream_says_stale_then_current_around_an_outage",
    "a_locker_hears_only_the_keys_it_uses",
    "a_locker_past_its_key_watches_shares_one_watch_and_misses_nothing",
    "watch_misses_no_change_in_a_burst_of_handoffs",
    "watch_resumes_after_compaction",
    "release_hands_off_at_once",
    "abandon_hands_off_only_after_ttl",
    "abandon_on_shared_session_hands_off_after_ttl",
    "dropped_guard_releases",
    "dropped_handle_releases",
    "seed_two_competing_clients",
    "fencing_tokens_strictly_increase",
    "partitioned_holder_stops_owning_before_lease_expires",
    "keepalive_failures_show_unconfirmed_before_loss",
    "hung_keepalives_show_unconfirmed_before_loss",
    "lost_lease_reacquires_when_fault_heals",
    "operator_deleted_entry_means_loss",
    "operator_deleted_entry_makes_handle_rejoin",
    "a_handle_that_loses_and_rejoins_reports_the_loss",
    "release_right_after_an_operator_delete_reports_not_owned",
    "cancelled_acquire_leaves_no_entry",
    "transient_errors_below_deadline_keep_ownership",
    "slow_store_keeps_ownership",
    "try_acquire_on_held_key_answers_none",
    "try_acquire_on_free_key_owns",
    "many_locks_on_one_session_expire_together",
    "prefix_keys_never_see_each_other",
    "waiter_whose_lease_dies_does_not_own",
    "owned_changes_report_every_transition",
    "release_of_lost_guard_reports_not_owned",
    "dedicated_session_release_revokes_its_lease",
    "close_releases_default_session_locks",
    "reacquire_on_the_same_locker_after_a_drop",
    "release_then_acquire_reuses_the_session",
    "two_locks_on_one_key_in_one_locker_exclude_each_other",
    "try_acquire_fails_fast_when_the_store_is_unreachable",
    "input_at_the_limits_is_accepted",
    "contenders_in_one_locker_take_turns_on_few_leases",
    "bad_input_empty_key",
    "bad_input_key_too_long",
    "bad_input_value_too_large",
    "bad_input_ttl_out_of_range",
    "bad_input_safety_margin",
    "releasing_one_resumed_tenure_leaves_the_others_of_its_lease",
    "a_resumed_tenure_goes_on_with_the_same_token",
    "a_resume_of_an_ended_tenure_reports_its_loss_and_joins_again",
    "a_second_resume_of_one_token_is_refused",
    "bad_input_resume_token_of_another_key",
    "guards_and_tenures_give_their_fence",
    "loss_reason_lease_gone_when_another_client_revokes_the_lease",
    "loss_reason_lease_gone_when_the_store_expires_the_lease",
    "loss_reason_entry_deleted_when_only_the_entry_is_deleted",
    "loss_reason_deadline_passed_when_the_store_is_out_of_reach",
    "bad_input_malformed_keys",
];

/// Makes one named test per behaviour of the suite, and one per clause of the backend contract
/// ([`contract`](crate::contract)) in a module `contract` (`cargo test contract::` runs them
/// alone).
///
/// `$attr` is the test attribute (e.g. `#[tokio::test(start_paused = true)]`); `$make` is an
/// async function or closure-like path taking the test's name and returning a [`Harness`].
/// After each behaviour, nothing of it may be left once its leases had time to end
/// ([`assert_test_left_nothing`]); after each clause, nothing at once
/// ([`assert_clause_left_nothing`](crate::contract::assert_clause_left_nothing)). The module
/// `contract` also has a test that its clauses are exactly [`CLAUSES`](crate::contract::CLAUSES),
/// and the behaviours one that they are exactly [`BEHAVIOURS`].
#[macro_export]
macro_rules! conformance_suite {
    (#[$attr:meta] $make:path) => {
        $crate::conformance_suite!(@each #[$attr] $make, [
            mutual_exclusion_under_many_contenders,
            waiters_own_in_fifo_order,
            get_answers_none_when_free,
            get_answers_holder_value_and_token,
            value_change_while_holding_is_seen_by_get_and_watch,
            set_value_while_waiting_is_used_when_owned,
            watch_starts_with_current_holder,
            watch_starts_with_none_when_free,
            watch_sees_put_change_and_delete,
            a_watch_stream_says_stale_then_current_around_an_outage,
            a_locker_hears_only_the_keys_it_uses,
            a_locker_past_its_key_watches_shares_one_watch_and_misses_nothing,
            watch_misses_no_change_in_a_burst_of_handoffs,
            watch_resumes_after_compaction,
            release_hands_off_at_once,
            abandon_hands_off_only_after_ttl,
            abandon_on_shared_session_hands_off_after_ttl,
            dropped_guard_releases,
            dropped_handle_releases,
            seed_two_competing_clients,
            fencing_tokens_strictly_increase,
            partitioned_holder_stops_owning_before_lease_expires,
            keepalive_failures_show_unconfirmed_before_loss,
            hung_keepalives_show_unconfirmed_before_loss,
            lost_lease_reacquires_when_fault_heals,
            operator_deleted_entry_means_loss,
            operator_deleted_entry_makes_handle_rejoin,
            a_handle_that_loses_and_rejoins_reports_the_loss,
            release_right_after_an_operator_delete_reports_not_owned,
            cancelled_acquire_leaves_no_entry,
            transient_errors_below_deadline_keep_ownership,
            slow_store_keeps_ownership,
            try_acquire_on_held_key_answers_none,
            try_acquire_on_free_key_owns,
            many_locks_on_one_session_expire_together,
            prefix_keys_never_see_each_other,
            waiter_whose_lease_dies_does_not_own,
            owned_changes_report_every_transition,
            release_of_lost_guard_reports_not_owned,
            dedicated_session_release_revokes_its_lease,
            close_releases_default_session_locks,
            reacquire_on_the_same_locker_after_a_drop,
            release_then_acquire_reuses_the_session,
            two_locks_on_one_key_in_one_locker_exclude_each_other,
            try_acquire_fails_fast_when_the_store_is_unreachable,
            input_at_the_limits_is_accepted,
            contenders_in_one_locker_take_turns_on_few_leases,
            bad_input_empty_key,
            bad_input_key_too_long,
            bad_input_value_too_large,
            bad_input_ttl_out_of_range,
            bad_input_safety_margin,
            releasing_one_resumed_tenure_leaves_the_others_of_its_lease,
            a_resumed_tenure_goes_on_with_the_same_token,
            a_resume_of_an_ended_tenure_reports_its_loss_and_joins_again,
            a_second_resume_of_one_token_is_refused,
            bad_input_resume_token_of_another_key,
            guards_and_tenures_give_their_fence,
            loss_reason_lease_gone_when_another_client_revokes_the_lease,
            loss_reason_lease_gone_when_the_store_expires_the_lease,
            loss_reason_entry_deleted_when_only_the_entry_is_deleted,
            loss_reason_deadline_passed_when_the_store_is_out_of_reach,
            bad_input_malformed_keys,
        ]);
        /// Leader election, one test per behaviour.
        mod election {
            #[allow(unused_imports)]
            use super::*;

            $crate::conformance_suite!(@election #[$attr] $make, [
                a_campaign_leads_once_the_leader_before_it_resigns,
                leader_and_observe_follow_leaders_and_proclaims,
                a_proclaim_after_the_term_ended_is_refused,
                run_while_leader_runs_the_work_per_term_and_cancels_it_at_the_loss,
                run_while_leader_stops_the_work_before_the_loss_says_why,
                run_while_leader_stops_the_work_when_unconfirmed,
                run_while_leader_keeps_the_work_through_unconfirmed_when_told,
                run_while_leader_resigns_and_campaigns_again_after_the_work_fails,
                run_while_leader_resigns_at_shutdown,
            ]);
        }
        /// The backend contract, one test per clause.
        mod contract {
            #[allow(unused_imports)]
            use super::*;

            $crate::conformance_suite!(@clauses #[$attr] $make, [
                limits_are_consistent,
                join_at_the_limits_is_accepted_by_the_store,
                join_creates_the_entry_and_answers_it,
                join_is_idempotent,
                join_answers_the_newest_earlier_entry,
                queues_are_isolated,
                guarded_writes_refuse_a_stale_create_revision,
                an_update_answers_the_revision_of_its_write,
                resume_takes_up_an_entry_unwritten_since_and_refuses_it_after,
                a_gone_lease_fails_as_a_whole_with_lease_lost,
                leases_are_granted_kept_alive_and_revoked,
                a_granted_ttl_is_at_least_the_asked_and_the_minimum,
                revoke_deletes_every_entry_of_the_lease_and_only_those,
                lease_expiry_deletes_its_entries_and_only_those,
                revisions_increase_across_the_store,
                reads_are_consistent_and_answer_their_revision,
                a_watch_from_after_a_read_misses_nothing,
                watch_from_a_revision_delivers_every_change_in_order,
                watch_misses_nothing_in_a_concurrent_burst,
                watch_from_now_starts_at_the_next_revision,
                watch_sees_only_keys_under_its_prefix,
                watch_deletes_delivers_every_delete_and_no_put,
                compacted_history_is_its_own_error,
                an_unreachable_store_fails_every_call_as_retryable,
                a_broken_watch_ends_retryable_or_resumes_without_gap,
            ]);
        }
    };
    (@each #[$attr:meta] $make:path, [$($name:ident),* $(,)?]) => {
        $(
            #[$attr]
            async fn $name() {
                let harness = $make(stringify!($name)).await;
                $crate::suite::$name(&harness).await;
                $crate::suite::assert_test_left_nothing(&harness).await;
            }
        )*

        #[test]
        fn every_behaviour_is_instantiated() {
            assert_eq!([$(stringify!($name)),*], $crate::suite::BEHAVIOURS);
        }
    };
    (@election #[$attr:meta] $make:path, [$($name:ident),* $(,)?]) => {
        $crate::conformance_suite!(@module #[$attr] $make, election, "election-",
            $crate::suite::assert_test_left_nothing, $crate::election::BEHAVIOURS, [$($name),*]);
    };
    (@clauses #[$attr:meta] $make:path, [$($name:ident),* $(,)?]) => {
        $crate::conformance_suite!(@module #[$attr] $make, contract, "contract-",
            $crate::contract::assert_clause_left_nothing, $crate::contract::CLAUSES, [$($name),*]);
    };
    // One test per function of `$crate::$module`, each on a harness named `$prefix` and the
    // function, checked by `$check` afterwards; and a test that the list is `$all`.
    (@module #[$attr:meta] $make:path, $module:ident, $prefix:literal, $check:path, $all:path,
        [$($name:ident),* $(,)?]) => {
        $(
            #[$attr]
            async fn $name() {
                let harness = $make(concat!($prefix, stringify!($name))).await;
                $crate::$module::$name(&harness).await;
                $check(&harness).await;
            }
        )*

        #[test]
        fn every_behaviour_is_instantiated() {
            assert_eq!([$(stringify!($name)),*], $all);
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Waits until `check` answers true, re-checking every 10 ms of tokio time; fails the test after
/// [`PATIENCE`]. For test assertions only: the library itself never polls.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < PATIENCE, "timed out waiting until {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until the handle owns, and answers its token.
pub async fn owned(handle: &LockHandle) -> FencingToken {
    timeout(PATIENCE, handle.wait_owned())
        .await
        .unwrap_or_else(|_| panic!("{} not owned in time", handle.key()))
        .expect("the handle is running")
}

/// Waits (bounded) until the queue of `key` has `n` entries.
pub async fn queue_len(h: &dyn Harness, key: &str, n: usize) {
    eventually(&format!("{key} has {n} entries"), || async {
        h.entries(key).await.len() == n
    })
    .await;
}

/// The next item of a holder stream, bounded.
pub async fn next_holder(
    stream: &mut BoxStream<'static, Result<Option<Holder>>>,
) -> Option<Holder> {
    timeout(PATIENCE, stream.next())
        .await
        .expect("watch yielded nothing in time")
        .expect("watch stream ended")
        .expect("watch stream failed")
}

/// The next item of a stream of holder updates, bounded.
pub async fn next_update(stream: &mut BoxStream<'static, Result<HolderUpdate>>) -> HolderUpdate {
    timeout(PATIENCE, stream.next())
        .await
        .expect("watch_updates yielded nothing in time")
        .expect("watch_updates stream ended")
        .expect("watch_updates stream failed")
}

fn value_of(holder: &Option<Holder>) -> Option<String> {
    holder
        .as_ref()
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
}

/// Waits until nothing of the test is left in the store (keys under its prefix, `leases`).
pub async fn assert_clean(h: &dyn Harness, leases: &[LeaseId]) {
    let start = Instant::now();
    loop {
        let left = h.leftovers(leases).await;
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "left behind in {}: {left:?}",
            h.name()
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// After a behaviour: every lease its clients were granted is gone (revoked, or expired for
/// what was abandoned or cut off), and no key is left under its prefix.
pub async fn assert_test_left_nothing(h: &dyn Harness) {
    assert_clean(h, &h.granted_leases()).await;
}

async fn holder_lease(locker: &Locker, key: &str) -> LeaseId {
    locker.get(key).await.expect("get").expect("held").lease
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion, order, tokens

/// Eight clients take turns on one key, three times each: never two in the critical section, and
/// every tenure's token is greater than the one before.
pub async fn mutual_exclusion_under_many_contenders(h: &dyn Harness) {
    let key = h.key("shared");
    let inside = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut leases = Vec::new();
    for i in 0..8 {
        let locker = h.client().await.locker(TTL);
        let (key, inside, done, tokens) =
            (key.clone(), inside.clone(), done.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let mut my_leases = Vec::new();
            for round in 0..3 {
                let guard = timeout(
                    PATIENCE,
                    locker.acquire(key.clone(), format!("c{i}-r{round}")),
                )
                .await
                .expect("acquired in time")
                .expect("acquire");
                assert!(
                    !inside.swap(true, Ordering::SeqCst),
                    "two holders inside the critical section"
                );
                tokens.lock().unwrap().push(guard.token());
                my_leases.push(holder_lease(&locker, &key).await);
                sleep(Duration::from_millis(5)).await;
                assert!(guard.is_owned());
                inside.store(false, Ordering::SeqCst);
                guard.release().await.expect("release");
                done.fetch_add(1, Ordering::SeqCst);
            }
            locker.close().await;
            my_leases
        }));
    }
    for task in tasks {
        leases.extend(task.await.expect("contender task"));
    }
    assert_eq!(done.load(Ordering::SeqCst), 24);
    let tokens = tokens.lock().unwrap().clone();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not increasing in acquisition order: {tokens:?}"
    );
    assert_clean(h, &leases).await;
}

/// Waiters own in the order they joined, one after the other.
pub async fn waiters_own_in_fifo_order(h: &dyn Harness) {
    let key = h.key("fifo");
    let first = h.client().await.locker(TTL);
    let guard = first.acquire(key.clone(), "first").await.expect("acquire");
    let mut handles = Vec::new();
    for i in 0..4 {
        let locker = h.client().await.locker(TTL);
        let handle = locker
            .lock(key.clone(), format!("w{i}"))
            .await
            .expect("lock");
        queue_len(h, &key, i + 2).await;
        handles.push((locker, handle));
    }
    guard.release().await.expect("release");
    let mut last = FencingToken::from_i64(0);
    for (i, (_locker, handle)) in handles.into_iter().enumerate() {
        let token = owned(&handle).await;
        assert!(token > last);
        last = token;
        let holder = first.get(&key).await.expect("get").expect("held");
        assert_eq!(holder.value_str(), Some(format!("w{i}").as_str()));
        handle.release().await.expect("release");
    }
    assert!(first.get(&key).await.expect("get").is_none());
}

/// Every new holder gets a greater token, across clients and sessions.
pub async fn fencing_tokens_strictly_increase(h: &dyn Harness) {
    let key = h.key("tokens");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let mut last = None;
    for round in 0..6 {
        let locker = if round % 2 == 0 { &a } else { &b };
        let guard = if round == 3 {
            locker
                .acquire_with(
                    key.clone(),
                    "own",
                    LockOptions::new().dedicated_session(TTL),
                )
                .await
        } else {
            locker.acquire(key.clone(), "x").await
        }
        .expect("acquire");
        let token = guard.token();
        assert_eq!(a.get(&key).await.expect("get").expect("held").token, token);
        if let Some(last) = last {
            assert!(token > last, "token {token} after {last}");
        }
        last = Some(token);
        guard.release().await.expect("release");
    }
}

// ---------------------------------------------------------------------------------------------
// Get

/// `get` of a free key answers `None`.
pub async fn get_answers_none_when_free(h: &dyn Harness) {
    let locker = h.client().await.locker(TTL);
    assert!(locker.get(&h.key("free")).await.expect("get").is_none());
}

/// `get` answers the holder's value and fencing token.
pub async fn get_answers_holder_value_and_token(h: &dyn Harness) {
    let key = h.key("www.example.com");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "10.1.1.1").await.expect("acquire");
    let holder = b.get(&key).await.expect("get").expect("held");
    assert_eq!(holder.value_str(), Some("10.1.1.1"));
    assert_eq!(holder.token, guard.token());
    guard.release().await.expect("release");
    assert!(b.get(&key).await.expect("get").is_none());
}

/// A value changed while holding is seen by `get` and by `watch`, and the token stays.
pub async fn value_change_while_holding_is_seen_by_get_and_watch(h: &dyn Harness) {
    let key = h.key("proclaim");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "v1").await.expect("acquire");
    let mut stream = b.watch(&key).expect("watch");
    assert_eq!(
        value_of(&next_holder(&mut stream).await).as_deref(),
        Some("v1")
    );
    guard.set_value("v2").await.expect("set_value");
    let seen = next_holder(&mut stream).await.expect("held");
    assert_eq!(seen.value_str(), Some("v2"));
    assert_eq!(seen.token, guard.token());
    let got = b.get(&key).await.expect("get").expect("held");
    assert_eq!(got.value_str(), Some("v2"));
    assert_eq!(got.token, guard.token());
    guard.release().await.expect("release");
    assert_eq!(next_holder(&mut stream).await, None);
}

/// A value set while waiting is the value the store shows once the handle owns.
pub async fn set_value_while_waiting_is_used_when_owned(h: &dyn Harness) {
    let key = h.key("pending-value");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let handle = b.lock(key.clone(), "b-old").await.expect("lock");
    queue_len(h, &key, 2).await;
    handle
        .set_value("b-new")
        .await
        .expect("set_value while waiting");
    guard.release().await.expect("release");
    owned(&handle).await;
    let holder = a.get(&key).await.expect("get").expect("held");
    assert_eq!(holder.value_str(), Some("b-new"));
    handle.release().await.expect("release");
}

// ---------------------------------------------------------------------------------------------
// Watch

/// A watch of a held key yields the holder first.
pub async fn watch_starts_with_current_holder(h: &dyn Harness) {
    let key = h.key("watched");
    let a = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "here").await.expect("acquire");
    let b = h.client().await.locker(TTL);
    let mut stream = b.watch(&key).expect("watch");
    let first = next_holder(&mut stream).await.expect("held");
    assert_eq!(first.value_str(), Some("here"));
    assert_eq!(first.token, guard.token());
    guard.release().await.expect("release");
}

/// A watch stream says when the store may be unreachable (its view may be stale) while the
/// holder changes behind its back, and, once the store is reachable again, yields the holder as
/// it is now and says that it is current.
pub async fn a_watch_stream_says_stale_then_current_around_an_outage(h: &dyn Harness) {
    // The watcher's probe runs every third of its TTL: long enough that a loaded store is not
    // taken for an unreachable one before the cut.
    const WATCHER_TTL: Duration = Duration::from_secs(6);
    let key = h.key("stale");
    let watcher_client = h.client().await;
    let watcher = watcher_client.locker(WATCHER_TTL);
    let mut updates = watcher.watch_updates(&key).expect("watch_updates");
    assert_eq!(next_update(&mut updates).await, HolderUpdate::Holder(None));
    let a = h.client().await.locker(TTL);
    let first = a.acquire(key.clone(), "a").await.expect("acquire");
    match next_update(&mut updates).await {
        HolderUpdate::Holder(Some(holder)) => assert_eq!(holder.token, first.token()),
        other => panic!("expected the first holder, got {other:?}"),
    }

    watcher_client.faults.cut(Cut::Hang).await;
    first.release().await.expect("release");
    let second = a.acquire(key.clone(), "b").await.expect("acquire again");
    assert_eq!(
        next_update(&mut updates).await,
        HolderUpdate::Stale,
        "the watcher is cut off: its view may be stale"
    );

    watcher_client.faults.heal().await;
    // Holders may come first (the changes the watch missed, delivered on healing); the last one
    // before `Current` is the holder now.
    let mut last = None;
    loop {
        match next_update(&mut updates).await {
            HolderUpdate::Holder(holder) => last = Some(holder),
            HolderUpdate::Current => break,
            other => panic!("expected holders, then Current; got {other:?}"),
        }
    }
    let now = last.flatten().expect("a holder before Current");
    assert_eq!(
        (now.token, now.value_str()),
        (second.token(), Some("b")),
        "current again: the holder now"
    );
    second.release().await.expect("release");
}

/// A watch of a free key yields `None` first.
pub async fn watch_starts_with_none_when_free(h: &dyn Harness) {
    let b = h.client().await.locker(TTL);
    let mut stream = b.watch(&h.key("nobody")).expect("watch");
    assert_eq!(next_holder(&mut stream).await, None);
}

/// A watch sees a lock taken, its value changed, and its release (`None`).
pub async fn watch_sees_put_change_and_delete(h: &dyn Harness) {
    let key = h.key("lifecycle");
    let watcher = h.client().await.locker(TTL);
    let mut stream = watcher.watch(&key).expect("watch");
    assert_eq!(next_holder(&mut stream).await, None);
    let a = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "one").await.expect("acquire");
    assert_eq!(
        value_of(&next_holder(&mut stream).await).as_deref(),
        Some("one")
    );
    guard.set_value("two").await.expect("set_value");
    assert_eq!(
        value_of(&next_holder(&mut stream).await).as_deref(),
        Some("two")
    );
    guard.release().await.expect("release");
    assert_eq!(next_holder(&mut stream).await, None);
}

/// A locker's watches follow the keys it uses: another client's changes to other keys (a
/// sibling, a key whose name starts with this one's, a key elsewhere) send it no event, and the
/// changes of its own key still reach it.
pub async fn a_locker_hears_only_the_keys_it_uses(h: &dyn Harness) {
    let key = h.key("own-keys");
    let recording = Arc::new(RecordingBackend::new(
        h.client().await.backend,
        LeaseLog::default(),
    ));
    let counts = recording.counts();
    let a = Locker::builder(recording).ttl(TTL).build().expect("locker");
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let mut stream = a.watch(&key).expect("watch");
    assert_eq!(
        value_of(&next_holder(&mut stream).await).as_deref(),
        Some("a")
    );
    let before = counts.events();
    let b = h.client().await.locker(TTL);
    let others = [
        format!("{key}-sibling"),
        format!("{key}x"),
        h.key("elsewhere"),
    ];
    for other in &others {
        for i in 0..5 {
            let g = b.acquire(other.clone(), "b").await.expect("acquire");
            g.set_value(format!("b{i}")).await.expect("set_value");
            g.release().await.expect("release");
        }
    }
    // A change of its own key, seen by the stream: every event sent before it has arrived.
    guard.set_value("a2").await.expect("set_value");
    assert_eq!(
        value_of(&next_holder(&mut stream).await).as_deref(),
        Some("a2")
    );
    let heard = counts.events() - before;
    assert_eq!(
        heard, 1,
        "a heard {heard} events while another client made 45 changes to other keys and a \
         changed its own value once"
    );
    // Its own key's hand-off reaches it.
    let waiter = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    guard.release().await.expect("release");
    owned(&waiter).await;
    loop {
        if value_of(&next_holder(&mut stream).await).as_deref() == Some("b") {
            break;
        }
    }
    assert!(counts.events() - before > heard);
    waiter.release().await.expect("release");
}

/// A locker that uses more keys at once than it watches one by one (here 8) watches the whole
/// root with one watch, and takes a watch per key again as it lets keys go (here at 2). Through
/// both switches, a waiter owns when its predecessor releases, and a holder sees an operator
/// delete its entry.
pub async fn a_locker_past_its_key_watches_shares_one_watch_and_misses_nothing(h: &dyn Harness) {
    let a = h
        .client()
        .await
        .builder(TTL)
        .key_watches(8)
        .build()
        .expect("locker");
    let b = h.client().await.locker(TTL);
    // Watches of its own: a holds one key and waits for two that b holds.
    let first = h.key("switch-held");
    let guard = a.acquire(first.clone(), "a").await.expect("acquire");
    let mut waits = Vec::new();
    let mut held_by_b = Vec::new();
    for i in 0..2 {
        let key = h.key(&format!("switch-wait{i}"));
        held_by_b.push(b.acquire(key.clone(), "b").await.expect("acquire"));
        waits.push(a.lock(key.clone(), "a").await.expect("lock"));
        queue_len(h, &key, 2).await;
    }
    // Seven keys more: ten in use, past eight, so one watch serves them all.
    let mut many = Vec::new();
    for i in 0..7 {
        let key = h.key(&format!("switch-many{i}"));
        many.push(a.acquire(key, "a").await.expect("acquire"));
    }
    let next = held_by_b.remove(0);
    next.release().await.expect("release");
    owned(&waits[0]).await;
    let entry = h.entries(&first).await.remove(0);
    h.delete_key(&entry.key).await;
    let reason = timeout(PATIENCE, guard.lost()).await.expect("loss seen");
    assert_eq!(reason, LossReason::EntryDeleted);
    // Down to two keys in use (the waits): a watch per key again.
    for g in many {
        g.release().await.expect("release");
    }
    drop(guard);
    let next = held_by_b.remove(0);
    next.release().await.expect("release");
    owned(&waits[1]).await;
    let mut changes = waits[0].owned_changes();
    assert_eq!(changes.next().await, Some(true));
    let entry = h.entries(&h.key("switch-wait0")).await.remove(0);
    h.delete_key(&entry.key).await;
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.expect("in time"),
        Some(false),
        "the holder saw its entry deleted"
    );
    for handle in waits {
        let _ = handle.release().await;
    }
}

/// Six holders in quick succession: the watch yields every one of them, in order, then `None`.
pub async fn watch_misses_no_change_in_a_burst_of_handoffs(h: &dyn Harness) {
    let key = h.key("burst");
    let watcher = h.client().await.locker(TTL);
    let mut stream = watcher.watch(&key).expect("watch");
    assert_eq!(next_holder(&mut stream).await, None);
    let mut handles = Vec::new();
    for i in 0..6 {
        let locker = h.client().await.locker(TTL);
        handles.push((
            locker
                .lock(key.clone(), format!("h{i}"))
                .await
                .expect("lock"),
            locker,
        ));
        queue_len(h, &key, i + 1).await;
    }
    // Release every holder as soon as it owns, without waiting for the watcher.
    for (handle, _locker) in handles {
        owned(&handle).await;
        handle.release().await.expect("release");
    }
    let mut seen = Vec::new();
    while let Some(holder) = next_holder(&mut stream).await {
        seen.push(holder);
    }
    let values: Vec<_> = seen
        .iter()
        .map(|h| h.value_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(values, ["h0", "h1", "h2", "h3", "h4", "h5"]);
    assert!(seen.windows(2).all(|w| w[0].token < w[1].token));
}

/// A watch whose client misses changes that are then compacted away re-reads and reports the
/// current holder.
pub async fn watch_resumes_after_compaction(h: &dyn Harness) {
    h.use_history(HistoryUse::Compacts).await;
    let key = h.key("compacted");
    let watcher_client = h.client().await;
    let watcher = watcher_client.locker(TTL);
    let mut stream = watcher.watch(&key).expect("watch");
    assert_eq!(next_holder(&mut stream).await, None);
    watcher_client.faults.cut(Cut::Fail).await;
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let first = a.acquire(key.clone(), "gone").await.expect("acquire");
    first.release().await.expect("release");
    let guard = b.acquire(key.clone(), "current").await.expect("acquire");
    h.compact().await;
    watcher_client.faults.heal().await;
    // Whatever it saw in between, the stream ends up at the current holder.
    loop {
        let holder = next_holder(&mut stream).await;
        if let Some(holder) = holder.filter(|h| h.value_str() == Some("current")) {
            assert_eq!(holder.token, guard.token());
            break;
        }
    }
    guard.release().await.expect("release");
    assert_eq!(next_holder(&mut stream).await, None);
}

// ---------------------------------------------------------------------------------------------
// Hand-off

/// Release deletes the entry at once: the waiter owns while the old holder's lease still lives.
pub async fn release_hands_off_at_once(h: &dyn Harness) {
    let key = h.key("handoff");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let a_lease = holder_lease(&a, &key).await;
    let handle = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    guard.release().await.expect("release");
    owned(&handle).await;
    assert!(
        h.lease_exists(a_lease).await,
        "the hand-off waited for the old holder's lease"
    );
    handle.release().await.expect("release");
}

/// An abandoned lock (dedicated session) is not handed off until its lease has expired.
pub async fn abandon_hands_off_only_after_ttl(h: &dyn Harness) {
    let key = h.key("abandon");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let handle = a
        .lock_with(key.clone(), "a", LockOptions::new().dedicated_session(TTL))
        .await
        .expect("lock");
    owned(&handle).await;
    let a_lease = holder_lease(&a, &key).await;
    let waiter = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    let abandoned_at = Instant::now();
    handle.abandon();
    owned(&waiter).await;
    assert!(
        !h.lease_exists(a_lease).await,
        "the waiter owned while the abandoned lease was alive"
    );
    if h.virtual_time() {
        assert!(abandoned_at.elapsed() >= TTL.mul_f64(0.5));
    }
    waiter.release().await.expect("release");
    assert_clean(h, &[a_lease]).await;
}

/// Abandoning a lock held on the shared session hands it off after the session's TTL, and leaves
/// the session alive for the other locks.
pub async fn abandon_on_shared_session_hands_off_after_ttl(h: &dyn Harness) {
    let key = h.key("abandon-shared");
    let other_key = h.key("other");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let other = a
        .acquire(other_key.clone(), "stays")
        .await
        .expect("acquire");
    let handle = a.lock(key.clone(), "a").await.expect("lock");
    owned(&handle).await;
    let waiter = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    let abandoned_at = Instant::now();
    handle.abandon();
    owned(&waiter).await;
    if h.virtual_time() {
        assert!(abandoned_at.elapsed() >= TTL, "handed off before the TTL");
    }
    assert!(other.is_owned(), "abandon ended the shared session");
    other.release().await.expect("release");
    waiter.release().await.expect("release");
}

/// Dropping a guard releases the lock, without waiting for the lease.
pub async fn dropped_guard_releases(h: &dyn Harness) {
    let key = h.key("drop-guard");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let a_lease = holder_lease(&a, &key).await;
    let waiter = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    drop(guard);
    owned(&waiter).await;
    assert!(h.lease_exists(a_lease).await);
    waiter.release().await.expect("release");
}

/// Dropping a handle releases the lock in the background.
pub async fn dropped_handle_releases(h: &dyn Harness) {
    let key = h.key("drop-handle");
    let a = h.client().await.locker(TTL);
    let handle = a.lock(key.clone(), "a").await.expect("lock");
    owned(&handle).await;
    drop(handle);
    eventually("the entry is gone", || async {
        h.entries(&key).await.is_empty()
    })
    .await;
    assert!(a.get(&key).await.expect("get").is_none());
}

/// The seed's scenario: two clients lock one key; one owns, the other waits; when the owner
/// quits, the other owns and `get` shows its value.
pub async fn seed_two_competing_clients(h: &dyn Harness) {
    let key = h.key("key");
    let c1 = h.client().await.locker(TTL);
    let c2 = h.client().await.locker(TTL);
    let h1 = c1.lock(key.clone(), "value-1").await.expect("lock");
    let mut owned1 = h1.owned_changes();
    owned(&h1).await;
    let h2 = c2.lock(key.clone(), "value-2").await.expect("lock");
    let mut owned2 = h2.owned_changes();
    queue_len(h, &key, 2).await;
    assert!(h1.is_owned());
    assert!(!h2.is_owned());
    assert_eq!(
        c2.get(&key).await.expect("get").expect("held").value_str(),
        Some("value-1")
    );
    // owned channels: 1 says true, 2 says false.
    let mut last1 = None;
    while let Ok(Some(b)) = timeout(Duration::from_millis(1), owned1.next()).await {
        last1 = Some(b);
    }
    assert_eq!(last1, Some(true));
    assert_eq!(
        timeout(PATIENCE, owned2.next()).await.expect("in time"),
        Some(false)
    );
    h1.release().await.expect("quit");
    assert_eq!(
        timeout(PATIENCE, owned2.next()).await.expect("in time"),
        Some(true)
    );
    assert_eq!(
        c1.get(&key).await.expect("get").expect("held").value_str(),
        Some("value-2")
    );
    h2.release().await.expect("release");
}

// ---------------------------------------------------------------------------------------------
// Faults and safety

/// A holder cut off from the store reports *not owned* strictly before the store expires its
/// lease, and nobody else owns the key before that.
pub async fn partitioned_holder_stops_owning_before_lease_expires(h: &dyn Harness) {
    let key = h.key("partitioned");
    let a_client = h.client().await;
    let a = a_client.locker(TTL);
    let b = h.client().await.locker(TTL);
    let observer = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let waiter = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    let mut stream = observer.watch(&key).expect("watch");
    assert_eq!(
        value_of(&next_holder(&mut stream).await).as_deref(),
        Some("a")
    );

    a_client.faults.cut(Cut::Hang).await;
    let lost_at = {
        let reason = timeout(PATIENCE, guard.lost())
            .await
            .expect("loss reported");
        assert_eq!(reason, LossReason::DeadlinePassed);
        Instant::now()
    };
    assert!(!guard.is_owned());
    // The store ends a's tenure (lease expiry) only after a stopped claiming it.
    let next = next_holder(&mut stream).await;
    let store_moved_at = Instant::now();
    assert_eq!(value_of(&next).as_deref(), Some("b"));
    owned(&waiter).await;
    let b_owned_at = Instant::now();
    assert!(
        lost_at < store_moved_at,
        "the store moved on before a stopped claiming"
    );
    assert!(lost_at < b_owned_at, "b owned before a stopped claiming");
    a_client.faults.heal().await;
    waiter.release().await.expect("release");
}

/// While keep-alives fail, a holder is `Unconfirmed` (with its deadline) before it is lost.
pub async fn keepalive_failures_show_unconfirmed_before_loss(h: &dyn Harness) {
    let key = h.key("unconfirmed");
    let client = h.client().await;
    let a = client.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let mut states = guard.subscribe();
    client.faults.cut(Cut::Fail).await;
    let mut saw_unconfirmed = false;
    loop {
        timeout(PATIENCE, states.changed())
            .await
            .expect("a change")
            .expect("running");
        let state = *states.borrow_and_update();
        match state {
            Ownership::Unconfirmed { token, deadline } => {
                assert_eq!(token, guard.token());
                assert!(deadline > Instant::now() || !saw_unconfirmed);
                saw_unconfirmed = true;
            }
            Ownership::Lost { reason, .. } => {
                assert_eq!(reason, LossReason::DeadlinePassed);
                break;
            }
            Ownership::Owned { .. } if !saw_unconfirmed => {}
            other => panic!("unexpected state {other:?}"),
        }
    }
    assert!(
        saw_unconfirmed,
        "went from owned to lost without Unconfirmed"
    );
    client.faults.heal().await;
}

/// While keep-alives hang (no answer, no error: a frozen store, a black hole), a holder is
/// `Unconfirmed` (with its token) before it stops claiming ownership, and stops claiming before
/// the store ends its tenure; once healed, it owns again.
pub async fn hung_keepalives_show_unconfirmed_before_loss(h: &dyn Harness) {
    let key = h.key("hung");
    let client = h.client().await;
    let a = client.locker(TTL);
    let observer = h.client().await.locker(TTL);
    let handle = a.lock(key.clone(), "a").await.expect("lock");
    let first = owned(&handle).await;
    let mut holders = observer.watch(&key).expect("watch");
    assert_eq!(
        next_holder(&mut holders).await.map(|holder| holder.token),
        Some(first)
    );
    let states = record::states_until(&handle, move |state| {
        state.is_owned() && state.token() != Some(first)
    });

    client.faults.cut(Cut::Hang).await;
    // The store ends the tenure when the lease expires.
    assert_eq!(next_holder(&mut holders).await, None);
    let store_moved_at = Instant::now();
    client.faults.heal().await;
    let second = owned(&handle).await;
    assert!(second > first);
    let seen = timeout(PATIENCE, states)
        .await
        .expect("owned again in time")
        .expect("recorded");
    let loss = record::assert_unconfirmed_before_loss(&seen, first);
    assert!(
        loss.lost_at < store_moved_at,
        "the store moved on before a stopped claiming: {loss:?}, store at {store_moved_at:?}"
    );
    assert_eq!(a.get(&key).await.expect("get").expect("held").token, second);
    handle.release().await.expect("release");
}

/// A handle that lost its lease during a fault owns again (with a new token) once it heals.
pub async fn lost_lease_reacquires_when_fault_heals(h: &dyn Harness) {
    let key = h.key("reacquire");
    let client = h.client().await;
    let a = client.locker(TTL);
    let handle = a.lock(key.clone(), "a").await.expect("lock");
    let first = owned(&handle).await;
    let lease = holder_lease(&a, &key).await;
    let mut changes = handle.owned_changes();
    assert_eq!(changes.next().await, Some(true));
    client.faults.cut(Cut::Fail).await;
    assert_eq!(
        timeout(PATIENCE, changes.next())
            .await
            .expect("lost in time"),
        Some(false)
    );
    assert!(!handle.is_owned());
    eventually("the old lease expired", || async {
        !h.lease_exists(lease).await
    })
    .await;
    client.faults.heal().await;
    let second = owned(&handle).await;
    assert!(second > first);
    let holder = a.get(&key).await.expect("get").expect("held");
    assert_eq!(holder.token, second);
    assert_ne!(holder.lease, lease);
    handle.release().await.expect("release");
}

/// A holder whose lease another client revokes (as `etcdctl lease revoke` does) reports
/// `LeaseGone`, not `EntryDeleted`: a guard in `lost()` and in its release, and a handle in its
/// tenure's end, before it owns again on a new lease.
pub async fn loss_reason_lease_gone_when_another_client_revokes_the_lease(h: &dyn Harness) {
    let key = h.key("revoked");
    let operator = h.client().await;
    let a = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let lease = holder_lease(&a, &key).await;
    operator.backend.revoke_lease(lease).await.expect("revoke");
    let reason = timeout(PATIENCE, guard.lost()).await.expect("lost in time");
    assert_eq!(reason, LossReason::LeaseGone);
    assert!(matches!(
        guard.release().await,
        Err(Error::NotOwned {
            reason: LossReason::LeaseGone,
            ..
        })
    ));

    let handle = a.lock(key.clone(), "a").await.expect("lock");
    let mut tenures = handle.tenures();
    let first = timeout(PATIENCE, tenures.next())
        .await
        .expect("a tenure in time")
        .expect("tenures go on");
    let lease = holder_lease(&a, &key).await;
    operator.backend.revoke_lease(lease).await.expect("revoke");
    assert_eq!(
        timeout(PATIENCE, first.lost()).await.expect("lost in time"),
        LossReason::LeaseGone
    );
    let second = timeout(PATIENCE, tenures.next())
        .await
        .expect("a new tenure in time")
        .expect("tenures go on");
    assert!(second.token() > first.token());
    assert_ne!(holder_lease(&a, &key).await, lease, "owns on a new lease");
    handle.release().await.expect("release");
}

/// A holder whose lease the store expires (an operator's expiry; a revoke on etcd) reports
/// `LeaseGone`, and so does every other lock on that lease.
pub async fn loss_reason_lease_gone_when_the_store_expires_the_lease(h: &dyn Harness) {
    let a = h.client().await.locker(TTL);
    let one = a.acquire(h.key("expired-1"), "a").await.expect("acquire");
    let two = a.acquire(h.key("expired-2"), "a").await.expect("acquire");
    let lease = holder_lease(&a, &h.key("expired-1")).await;
    assert_eq!(
        holder_lease(&a, &h.key("expired-2")).await,
        lease,
        "one session"
    );
    h.expire_lease(lease).await;
    for guard in [one, two] {
        let reason = timeout(PATIENCE, guard.lost()).await.expect("lost in time");
        assert_eq!(reason, LossReason::LeaseGone, "{}", guard.key());
        assert!(!guard.is_owned());
        let _ = guard.release().await;
    }
}

/// A holder whose entry alone is deleted (its lease alive, as `etcdctl del` does) reports
/// `EntryDeleted`; another lock on the same lease keeps owning.
pub async fn loss_reason_entry_deleted_when_only_the_entry_is_deleted(h: &dyn Harness) {
    let a = h.client().await.locker(TTL);
    let deleted = a.acquire(h.key("deleted"), "a").await.expect("acquire");
    let kept = a.acquire(h.key("kept"), "a").await.expect("acquire");
    let entry = h.entries(&h.key("deleted")).await.remove(0);
    h.delete_key(&entry.key).await;
    let reason = timeout(PATIENCE, deleted.lost())
        .await
        .expect("lost in time");
    assert_eq!(reason, LossReason::EntryDeleted);
    assert!(h.lease_exists(entry.lease).await, "the lease lives on");
    assert!(kept.is_owned(), "another lock on the lease is not touched");
    let _ = deleted.release().await;
    kept.release().await.expect("release");
}

/// A holder cut off from the store reports `DeadlinePassed` at its local deadline: the store
/// may not have expired the lease yet, but it may at any moment.
pub async fn loss_reason_deadline_passed_when_the_store_is_out_of_reach(h: &dyn Harness) {
    let client = h.client().await;
    let a = client.locker(TTL);
    let guard = a.acquire(h.key("cut-off"), "a").await.expect("acquire");
    client.faults.cut(Cut::Hang).await;
    let reason = timeout(PATIENCE, guard.lost()).await.expect("lost in time");
    assert_eq!(reason, LossReason::DeadlinePassed);
    client.faults.heal().await;
    let _ = guard.release().await;
}

/// Every guard and tenure gives its fence: the key, the entry's key as the store has it, the
/// entry's lease and the token; a later tenure's fence has a greater token.
pub async fn guards_and_tenures_give_their_fence(h: &dyn Harness) {
    let key = h.key("fence");
    let a = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let entry = h.entries(&key).await.remove(0);
    let fence = guard.fence().clone();
    assert_eq!(fence.key(), key);
    assert_eq!(fence.entry_key(), entry.key);
    assert_eq!(fence.lease(), entry.lease);
    assert_eq!(fence.token().as_i64(), entry.create_revision);
    assert_eq!(fence.token(), guard.token());
    guard.release().await.expect("release");

    let handle = a.lock(key.clone(), "a").await.expect("lock");
    let tenure = timeout(PATIENCE, handle.tenures().next())
        .await
        .expect("a tenure in time")
        .expect("tenures go on");
    let entry = h.entries(&key).await.remove(0);
    assert_eq!(tenure.fence().entry_key(), entry.key);
    assert_eq!(tenure.fence().lease(), entry.lease);
    assert_eq!(tenure.fence().token(), tenure.token());
    assert!(tenure.fence().token() > fence.token());
    handle.release().await.expect("release");
}

/// A guard of a client that then "crashes" (cut off from the store for good, as a killed
/// process is), and the resume token it exported.
async fn crashed_holder(h: &dyn Harness, key: &str) -> (Client, LockGuard, ResumeToken) {
    let client = h.client().await;
    let guard = client
        .locker(TTL)
        .acquire(key.to_owned(), "old")
        .await
        .expect("acquire");
    let token = guard.resume_token().expect("a held lock exports its token");
    assert_eq!(token.key(), key);
    assert_eq!(token.token(), guard.token());
    assert_eq!(token.lease(), guard.fence().lease());
    client.faults.cut(Cut::Hang).await;
    (client, guard, token)
}

/// A process that restarts with the resume token of its old tenure owns at once with the same
/// token, on the same entry and lease (no second entry queued behind the old one), and keeps
/// the lease alive from then on; its release ends it as any release does.
pub async fn a_resumed_tenure_goes_on_with_the_same_token(h: &dyn Harness) {
    let key = h.key("resumed");
    let (old_client, old, token) = crashed_holder(h, &key).await;
    let text = token.to_string();
    let restarted = h.client().await.locker(TTL);
    let token: ResumeToken = text.parse().expect("the token reads back");
    let guard = restarted
        .acquire_with(key.clone(), "new", LockOptions::new().resume(token.clone()))
        .await
        .expect("resume");
    assert_eq!(guard.token(), token.token(), "the same tenure");
    assert_eq!(guard.fence().lease(), token.lease());
    let entries = h.entries(&key).await;
    assert_eq!(entries.len(), 1, "one entry, the old one: {entries:?}");
    assert_eq!(entries[0].value, b"new");
    assert_eq!(entries[0].create_revision, token.token().as_i64());
    // The old process keeps nothing alive: the restarted one does, past the TTL.
    sleep(TTL * 2).await;
    assert!(guard.is_owned());
    assert!(h.lease_exists(token.lease()).await);
    let again = guard.resume_token().expect("it exports a token of its own");
    assert_eq!(again.token(), token.token());
    assert!(
        again.written() > token.written(),
        "the take-up wrote the entry"
    );
    guard.release().await.expect("release");
    assert!(h.entries(&key).await.is_empty());
    eventually(
        "the taken-up lease expires once its last lock ended",
        || async { !h.lease_exists(token.lease()).await },
    )
    .await;
    drop(old);
    old_client.faults.heal().await;
}

/// A resume token of a tenure that has ended: its loss is reported (`Lost` with that token and
/// why), and then a handle joins as any lock and owns with a greater token, while `acquire`
/// answers `NotOwned` with the reason. The lease of an ended tenure that still lives is left
/// alone (it is another process's).
pub async fn a_resume_of_an_ended_tenure_reports_its_loss_and_joins_again(h: &dyn Harness) {
    let key = h.key("ended");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let token = guard.resume_token().expect("a token");
    guard.release().await.expect("release");
    let handle = b
        .lock_with(key.clone(), "b", LockOptions::new().resume(token.clone()))
        .await
        .expect("lock");
    let states = record::states_until(&handle, |state| state.is_owned());
    let seen = timeout(PATIENCE, states)
        .await
        .expect("owned in time")
        .expect("recorded");
    let lost = Ownership::Lost {
        token: token.token(),
        reason: LossReason::EntryDeleted,
    };
    let owned_at = seen.iter().position(|(_, state)| state.is_owned());
    assert!(
        matches!((seen.iter().position(|(_, s)| *s == lost), owned_at), (Some(l), Some(o)) if l < o),
        "the old tenure's loss is not reported first: {}",
        record::describe(&seen)
    );
    assert!(handle.ownership().token() > Some(token.token()));
    assert!(h.lease_exists(token.lease()).await, "a's lease is a's");
    handle.release().await.expect("release");

    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let token = guard.resume_token().expect("a token");
    h.expire_lease(token.lease()).await;
    let _ = timeout(PATIENCE, guard.lost()).await.expect("lost in time");
    let refused = b
        .acquire_with(key.clone(), "b", LockOptions::new().resume(token))
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::NotOwned {
                reason: LossReason::LeaseGone,
                ..
            })
        ),
        "{refused:?}"
    );
    let _ = guard.release().await;
}

/// Two processes that each resume another tenure of one dead process's lease keep it alive
/// together: when one releases its lock, the other's tenure goes on (a taken-up lease is never
/// revoked), and its entry stays.
pub async fn releasing_one_resumed_tenure_leaves_the_others_of_its_lease(h: &dyn Harness) {
    let (k1, k2) = (h.key("one"), h.key("two"));
    let dead = h.client().await;
    let dead_locker = dead.locker(TTL);
    let one = dead_locker
        .acquire(k1.clone(), "dead")
        .await
        .expect("acquire");
    let two = dead_locker
        .acquire(k2.clone(), "dead")
        .await
        .expect("acquire");
    let (t1, t2) = (
        one.resume_token().expect("a token"),
        two.resume_token().expect("a token"),
    );
    assert_eq!(t1.lease(), t2.lease(), "one session");
    dead.faults.cut(Cut::Hang).await;
    let (p2, p3) = (h.client().await.locker(TTL), h.client().await.locker(TTL));
    let first = p2
        .acquire_with(k1.clone(), "p2", LockOptions::new().resume(t1))
        .await
        .expect("resume one");
    let second = p3
        .acquire_with(k2.clone(), "p3", LockOptions::new().resume(t2.clone()))
        .await
        .expect("resume two");
    first.release().await.expect("release");
    assert!(h.entries(&k1).await.is_empty());
    sleep(TTL * 2).await;
    assert!(
        second.is_owned(),
        "the other's tenure was ended by a release"
    );
    assert!(h.lease_exists(t2.lease()).await);
    let entries = h.entries(&k2).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].create_revision, t2.token().as_i64());
    second.release().await.expect("release");
    drop((one, two));
    dead.faults.heal().await;
}

/// A token is taken up once: a second process resuming it is refused (`ResumedElsewhere`), and
/// its handle waits its turn behind the first.
pub async fn a_second_resume_of_one_token_is_refused(h: &dyn Harness) {
    let key = h.key("twice");
    let (old_client, old, token) = crashed_holder(h, &key).await;
    let first = h.client().await.locker(TTL);
    let second = h.client().await.locker(TTL);
    let resumed = first
        .acquire_with(
            key.clone(),
            "first",
            LockOptions::new().resume(token.clone()),
        )
        .await
        .expect("the first resume");
    let refused = second
        .acquire_with(
            key.clone(),
            "second",
            LockOptions::new().resume(token.clone()),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::NotOwned {
                reason: LossReason::ResumedElsewhere,
                ..
            })
        ),
        "{refused:?}"
    );
    let waiting = second
        .lock_with(
            key.clone(),
            "second",
            LockOptions::new().resume(token.clone()),
        )
        .await
        .expect("lock");
    queue_len(h, &key, 2).await;
    assert!(!waiting.is_owned(), "two owners of one tenure");
    assert!(resumed.is_owned());
    resumed.release().await.expect("release");
    let next = owned(&waiting).await;
    assert!(next > token.token());
    waiting.release().await.expect("release");
    drop(old);
    old_client.faults.heal().await;
}

/// A resume token is checked before any I/O: one for another key is refused, naming both.
pub async fn bad_input_resume_token_of_another_key(h: &dyn Harness) {
    let l = cut_off_locker(h).await;
    let token: ResumeToken = format!("1f:2:2:{}", h.key("other"))
        .parse()
        .expect("a token");
    let err = l
        .acquire_with(h.key("this"), "v", LockOptions::new().resume(token))
        .await
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains(&h.key("other")), "{err}");
    assert!("not a token".parse::<ResumeToken>().is_err());
}

/// A guard on a fresh key whose entry an operator has just deleted (the locker must outlive it).
async fn acquire_then_operator_delete(h: &dyn Harness, name: &str) -> (Locker, LockGuard) {
    let key = h.key(name);
    let locker = h.client().await.locker(TTL);
    let guard = locker.acquire(key.clone(), "a").await.expect("acquire");
    let entry = h.entries(&key).await.remove(0);
    h.delete_key(&entry.key).await;
    (locker, guard)
}

/// An entry deleted by an operator means the guard has lost the lock.
pub async fn operator_deleted_entry_means_loss(h: &dyn Harness) {
    let (_locker, guard) = acquire_then_operator_delete(h, "operator").await;
    let reason = timeout(PATIENCE, guard.lost())
        .await
        .expect("loss reported");
    assert_eq!(reason, LossReason::EntryDeleted);
    assert!(!guard.is_owned());
    assert!(matches!(
        guard.release().await,
        Err(Error::NotOwned {
            reason: LossReason::EntryDeleted,
            ..
        })
    ));
}

/// A release that comes right after an operator deleted the entry (before or after the lock
/// heard of it) says the lock was not owned to the end.
pub async fn release_right_after_an_operator_delete_reports_not_owned(h: &dyn Harness) {
    let (_locker, guard) = acquire_then_operator_delete(h, "operator-release").await;
    let result = guard.release().await;
    assert!(
        matches!(
            result,
            Err(Error::NotOwned {
                reason: LossReason::EntryDeleted,
                ..
            })
        ),
        "release after the entry was deleted answered {result:?}"
    );
}

/// A handle whose entry an operator deleted reports the loss and owns again with a new token.
pub async fn operator_deleted_entry_makes_handle_rejoin(h: &dyn Harness) {
    let key = h.key("operator-handle");
    let a = h.client().await.locker(TTL);
    let handle = a.lock(key.clone(), "a").await.expect("lock");
    let first = owned(&handle).await;
    let mut changes = handle.owned_changes();
    assert_eq!(changes.next().await, Some(true));
    let entry = h.entries(&key).await.remove(0);
    h.delete_key(&entry.key).await;
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.expect("in time"),
        Some(false)
    );
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.expect("in time"),
        Some(true)
    );
    let second = owned(&handle).await;
    assert!(second > first);
    handle.release().await.expect("release");
}

/// A handle that loses the lock (its entry deleted by an operator) and owns again at once reports
/// the loss with its reason: in its events (never coalesced away by the new tenure), and as the
/// end of the first of its tenures, whose next one has a higher token.
pub async fn a_handle_that_loses_and_rejoins_reports_the_loss(h: &dyn Harness) {
    let key = h.key("rejoin-reported");
    let a = h.client().await.locker(TTL);
    let handle = a.lock(key.clone(), "a").await.expect("lock");
    let mut tenures = handle.tenures();
    let first = timeout(PATIENCE, tenures.next())
        .await
        .expect("a tenure in time")
        .expect("tenures go on");
    assert!(first.is_current());
    let states = crate::record::states_until(&handle, {
        let first = first.token();
        move |state| state.is_owned() && state.token() != Some(first)
    });
    let entry = h.entries(&key).await.remove(0);
    h.delete_key(&entry.key).await;

    assert_eq!(
        timeout(PATIENCE, first.lost()).await.expect("lost in time"),
        LossReason::EntryDeleted
    );
    assert!(!first.is_current());
    let second = timeout(PATIENCE, tenures.next())
        .await
        .expect("a new tenure in time")
        .expect("tenures go on");
    assert!(second.token() > first.token());
    assert!(second.is_current());
    let seen = timeout(PATIENCE, states)
        .await
        .expect("owned again in time")
        .expect("recorded");
    let lost = Ownership::Lost {
        token: first.token(),
        reason: LossReason::EntryDeleted,
    };
    let at = seen.iter().position(|(_, state)| *state == lost);
    let owned_again = seen
        .iter()
        .position(|(_, state)| state.token() == Some(second.token()) && state.is_owned());
    assert!(
        matches!((at, owned_again), (Some(at), Some(again)) if at < again),
        "the loss is not reported before the next tenure: {}",
        crate::record::describe(&seen)
    );
    handle.release().await.expect("release");
    assert_eq!(
        timeout(PATIENCE, second.lost())
            .await
            .expect("ended in time"),
        LossReason::Stopped
    );
    assert!(
        timeout(PATIENCE, tenures.next())
            .await
            .expect("ended in time")
            .is_none(),
        "no tenure after the release"
    );
}

/// An `acquire` cancelled while waiting leaves no entry behind.
pub async fn cancelled_acquire_leaves_no_entry(h: &dyn Harness) {
    let key = h.key("cancelled");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    {
        let acquire = b.acquire(key.clone(), "b");
        tokio::pin!(acquire);
        tokio::select! {
            _ = &mut acquire => panic!("acquired a held lock"),
            _ = queue_len(h, &key, 2) => {}
        }
    } // cancelled here
    queue_len(h, &key, 1).await;
    assert_eq!(
        h.entries(&key).await[0].create_revision,
        guard.token().as_i64()
    );
    guard.release().await.expect("release");
    assert!(a.get(&key).await.expect("get").is_none());
}

/// Failures shorter than the deadline do not cost ownership: same tenure, same token, never lost.
pub async fn transient_errors_below_deadline_keep_ownership(h: &dyn Harness) {
    let key = h.key("transient");
    let client = h.client().await;
    let a = client.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let mut states = guard.subscribe();
    let watch_states = tokio::spawn(async move {
        let mut seen = Vec::new();
        while states.changed().await.is_ok() {
            let state = *states.borrow_and_update();
            seen.push(state);
            if matches!(state, Ownership::Lost { .. } | Ownership::Released) {
                break;
            }
        }
        seen
    });
    for _ in 0..3 {
        client.faults.cut(Cut::Fail).await;
        sleep(TTL / 4).await;
        client.faults.heal().await;
        sleep(TTL / 2).await;
        assert!(guard.is_owned());
    }
    let token = guard.token();
    assert_eq!(a.get(&key).await.expect("get").expect("held").token, token);
    guard.release().await.expect("release");
    let seen = watch_states.await.expect("states");
    assert!(
        seen.iter().all(|s| !matches!(s, Ownership::Lost { .. })),
        "lost during short faults: {seen:?}"
    );
}

/// A slow store (added latency well below the TTL) does not cost ownership.
pub async fn slow_store_keeps_ownership(h: &dyn Harness) {
    let key = h.key("slow");
    let client = h.client().await;
    let a = client.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    client.faults.set_latency(Duration::from_millis(150)).await;
    sleep(TTL * 2).await;
    assert!(guard.is_owned());
    assert!(matches!(guard.ownership(), Ownership::Owned { .. }));
    client.faults.set_latency(Duration::ZERO).await;
    guard.release().await.expect("release");
}

/// `try_acquire` of a held key answers `None` at once and leaves no entry.
pub async fn try_acquire_on_held_key_answers_none(h: &dyn Harness) {
    let key = h.key("try-held");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    assert!(
        b.try_acquire(key.clone(), "b")
            .await
            .expect("try_acquire")
            .is_none()
    );
    queue_len(h, &key, 1).await;
    guard.release().await.expect("release");
}

/// `try_acquire` of a free key owns it.
pub async fn try_acquire_on_free_key_owns(h: &dyn Harness) {
    let key = h.key("try-free");
    let a = h.client().await.locker(TTL);
    let guard = a
        .try_acquire(key.clone(), "a")
        .await
        .expect("try_acquire")
        .expect("owned");
    assert!(guard.is_owned());
    assert_eq!(
        a.get(&key).await.expect("get").expect("held").token,
        guard.token()
    );
    guard.release().await.expect("release");
}

/// Locks on one session share its lease: when it ends, every one of them is lost and free.
pub async fn many_locks_on_one_session_expire_together(h: &dyn Harness) {
    let a = h.client().await.locker(TTL);
    let mut guards = Vec::new();
    for i in 0..5 {
        guards.push(
            a.acquire(h.key(&format!("many-{i}")), "a")
                .await
                .expect("acquire"),
        );
    }
    let lease = holder_lease(&a, &h.key("many-0")).await;
    for i in 1..5 {
        assert_eq!(holder_lease(&a, &h.key(&format!("many-{i}"))).await, lease);
    }
    h.expire_lease(lease).await;
    for guard in &guards {
        let reason = timeout(PATIENCE, guard.lost()).await.expect("lost in time");
        assert!(
            matches!(reason, LossReason::LeaseGone | LossReason::EntryDeleted),
            "{reason:?}"
        );
    }
    for i in 0..5 {
        assert!(
            a.get(&h.key(&format!("many-{i}")))
                .await
                .expect("get")
                .is_none()
        );
    }
}

/// Keys that are prefixes of one another (`a`, `a/b`, `ab`) are separate locks.
pub async fn prefix_keys_never_see_each_other(h: &dyn Harness) {
    let (a, ab, a_b) = (h.key("a"), h.key("ab"), h.key("a/b"));
    let l1 = h.client().await.locker(TTL);
    let l2 = h.client().await.locker(TTL);
    let l3 = h.client().await.locker(TTL);
    let mut watch_a = l1.watch(&a).expect("watch");
    assert_eq!(next_holder(&mut watch_a).await, None);
    let g_ab = l2.acquire(ab.clone(), "ab").await.expect("acquire ab");
    let g_a_b = l3.acquire(a_b.clone(), "a/b").await.expect("acquire a/b");
    // Nobody holds `a` yet, whatever `a/b` and `ab` do.
    assert!(l1.get(&a).await.expect("get").is_none());
    let g_a = l1
        .try_acquire(a.clone(), "a")
        .await
        .expect("try")
        .expect("a is free");
    assert_eq!(
        value_of(&next_holder(&mut watch_a).await).as_deref(),
        Some("a")
    );
    assert_eq!(
        l2.get(&a_b).await.expect("get").expect("held").value_str(),
        Some("a/b")
    );
    assert_eq!(
        l3.get(&ab).await.expect("get").expect("held").value_str(),
        Some("ab")
    );
    g_a_b.release().await.expect("release");
    g_ab.release().await.expect("release");
    assert!(g_a.is_owned());
    g_a.release().await.expect("release");
    assert_eq!(next_holder(&mut watch_a).await, None);
    assert_eq!(h.entries(&a).await.len(), 0);
}

/// A waiter whose own lease dies while it waits never believes it owns with the dead entry: it
/// joins again and owns with a new, greater token.
pub async fn waiter_whose_lease_dies_does_not_own(h: &dyn Harness) {
    let key = h.key("dead-waiter");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let waiter = b.lock(key.clone(), "b").await.expect("lock");
    queue_len(h, &key, 2).await;
    let dead = h.entries(&key).await[1].clone();
    h.expire_lease(dead.lease).await;
    // b notices, gets a new session and joins again behind a.
    eventually("b joined again", || async {
        let entries = h.entries(&key).await;
        entries.len() == 2 && entries[1].lease != dead.lease
    })
    .await;
    assert!(!waiter.is_owned());
    guard.release().await.expect("release");
    let token = owned(&waiter).await;
    assert!(token.as_i64() > dead.create_revision);
    let holder = a.get(&key).await.expect("get").expect("held");
    assert_eq!(holder.token, token);
    waiter.release().await.expect("release");
}

/// The `bool` view: false while waiting, true when owned, false after the release, then ends.
pub async fn owned_changes_report_every_transition(h: &dyn Harness) {
    let key = h.key("transitions");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let handle = b.lock(key.clone(), "b").await.expect("lock");
    let mut changes = handle.owned_changes();
    assert_eq!(changes.next().await, Some(false));
    guard.release().await.expect("release");
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.expect("in time"),
        Some(true)
    );
    let sub = handle.subscribe();
    handle.release().await.expect("release");
    assert_eq!(*sub.borrow(), Ownership::Released);
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.expect("in time"),
        Some(false)
    );
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.expect("in time"),
        None
    );
}

/// Releasing a guard that already lost the lock says so.
pub async fn release_of_lost_guard_reports_not_owned(h: &dyn Harness) {
    let key = h.key("lost-release");
    let a = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let lease = holder_lease(&a, &key).await;
    h.expire_lease(lease).await;
    timeout(PATIENCE, guard.lost()).await.expect("lost in time");
    match guard.release().await {
        Err(Error::NotOwned { key: k, .. }) => assert_eq!(k, key),
        other => panic!("release of a lost guard answered {other:?}"),
    }
}

/// A lock on a dedicated session revokes that lease on release.
pub async fn dedicated_session_release_revokes_its_lease(h: &dyn Harness) {
    let key = h.key("dedicated");
    let a = h.client().await.locker(TTL);
    let shared = a.acquire(h.key("on-shared"), "s").await.expect("acquire");
    let guard = a
        .acquire_with(
            key.clone(),
            "d",
            LockOptions::new().dedicated_session(TTL * 2),
        )
        .await
        .expect("acquire");
    let lease = holder_lease(&a, &key).await;
    assert_ne!(lease, holder_lease(&a, &h.key("on-shared")).await);
    guard.release().await.expect("release");
    eventually("the dedicated lease is revoked", || async {
        !h.lease_exists(lease).await
    })
    .await;
    assert!(shared.is_owned());
    shared.release().await.expect("release");
}

/// `close` revokes the default session: its locks are lost, and nothing is left in the store.
pub async fn close_releases_default_session_locks(h: &dyn Harness) {
    let key = h.key("closed");
    let a = h.client().await.locker(TTL);
    let guard = a.acquire(key.clone(), "a").await.expect("acquire");
    let lease = holder_lease(&a, &key).await;
    a.close().await;
    let reason = timeout(PATIENCE, guard.lost()).await.expect("lost in time");
    assert!(
        matches!(reason, LossReason::LeaseGone | LossReason::EntryDeleted),
        "{reason:?}"
    );
    drop(guard);
    assert_clean(h, &[lease]).await;
}

/// A released guard frees its key for the next lock of the same locker at once, and its task
/// ends: acquire + release in a loop use the locker's one session (no lease per acquisition).
pub async fn release_then_acquire_reuses_the_session(h: &dyn Harness) {
    let key = h.key("cycle");
    let locker = h.client().await.locker(TTL);
    for round in 0..20 {
        let guard = timeout(PATIENCE, locker.acquire(key.clone(), format!("r{round}")))
            .await
            .expect("acquired in time")
            .expect("acquire");
        let mut state = guard.subscribe();
        guard.release().await.expect("release");
        assert_eq!(*state.borrow_and_update(), Ownership::Released);
        // The lock's task ends (dropping the state's sender) once it has cleaned up.
        timeout(PATIENCE, async { while state.changed().await.is_ok() {} })
            .await
            .expect("the lock task ended");
        assert_eq!(*state.borrow(), Ownership::Released);
    }
    let leases = h.granted_leases();
    assert_eq!(leases.len(), 1, "one session for all cycles: {leases:?}");
}

/// Acquiring and dropping a guard on one key over and over on the same locker (same lease, so
/// the same entry name each time) works every time and leaves the key free.
pub async fn reacquire_on_the_same_locker_after_a_drop(h: &dyn Harness) {
    let key = h.key("again");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let mut last = None;
    for round in 0..10 {
        let guard = timeout(PATIENCE, a.acquire(key.clone(), format!("r{round}")))
            .await
            .expect("acquired in time")
            .expect("acquire");
        assert!(guard.is_owned());
        if let Some(last) = last {
            assert!(guard.token() > last);
        }
        last = Some(guard.token());
        drop(guard);
    }
    let guard = timeout(PATIENCE, b.acquire(key.clone(), "b"))
        .await
        .expect("the key is free again")
        .expect("acquire");
    assert_eq!(h.entries(&key).await.len(), 1);
    guard.release().await.expect("release");
}

/// Two locks on one key from the same locker are two contenders (two entries), never two
/// owners.
pub async fn two_locks_on_one_key_in_one_locker_exclude_each_other(h: &dyn Harness) {
    let key = h.key("same-locker");
    let a = h.client().await.locker(TTL);
    let first = a.acquire(key.clone(), "first").await.expect("acquire");
    assert!(
        a.try_acquire(key.clone(), "second")
            .await
            .expect("try")
            .is_none()
    );
    let second = a.lock(key.clone(), "second").await.expect("lock");
    queue_len(h, &key, 2).await;
    assert!(!second.is_owned());
    assert_eq!(
        a.get(&key).await.expect("get").expect("held").value_str(),
        Some("first")
    );
    first.release().await.expect("release");
    let token = owned(&second).await;
    let holder = a.get(&key).await.expect("get").expect("held");
    assert_eq!((holder.value_str(), holder.token), (Some("second"), token));
    second.release().await.expect("release");
}

/// Four tasks of one locker take turns on one key, five times each: one owner at a time, and
/// the locker's shared sessions are reused (no lease per acquisition).
pub async fn contenders_in_one_locker_take_turns_on_few_leases(h: &dyn Harness) {
    let key = h.key("one-locker");
    let locker = h.client().await.locker(TTL);
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (locker, key, inside) = (locker.clone(), key.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                let guard = timeout(
                    PATIENCE,
                    locker.acquire(key.clone(), format!("t{i}-{round}")),
                )
                .await
                .expect("acquired in time")
                .expect("acquire");
                assert!(!inside.swap(true, Ordering::SeqCst), "two owners at once");
                sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("contender");
    }
    let leases = h.granted_leases();
    assert!(
        leases.len() <= 4,
        "{} leases for 4 contenders",
        leases.len()
    );
    locker.close().await;
}

/// `try_acquire` answers a store error, not a wait, when the store cannot be reached.
pub async fn try_acquire_fails_fast_when_the_store_is_unreachable(h: &dyn Harness) {
    let client = h.client().await;
    client.faults.cut(Cut::Fail).await;
    let l = client.locker(TTL);
    let err = timeout(PATIENCE, l.try_acquire(h.key("unreachable"), "v"))
        .await
        .expect("answered in time")
        .expect_err("the store is unreachable");
    assert!(err.is_retryable(), "{err}");
    client.faults.heal().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input: rejected before any I/O (the client is cut off, so I/O would fail differently).

async fn cut_off_locker(h: &dyn Harness) -> Locker {
    let client = h.client().await;
    client.faults.cut(Cut::Fail).await;
    client.locker(TTL)
}

/// A key and a value exactly at the store's limits are accepted, stored and read back whole.
pub async fn input_at_the_limits_is_accepted(h: &dyn Harness) {
    let l = h.client().await.locker(TTL);
    let limits = l.backend().limits();
    let key = h.key(&"k".repeat(limits.max_key_len - h.key("").len()));
    assert_eq!(key.len(), limits.max_key_len);
    let value = vec![b'v'; limits.max_value_len];
    let guard = l
        .acquire(key.clone(), value.clone())
        .await
        .expect("acquire at the limits");
    let holder = l.get(&key).await.expect("get").expect("held");
    assert_eq!(holder.value.len(), value.len());
    assert_eq!(holder.token, guard.token());
    guard.release().await.expect("release");
    assert!(l.get(&key).await.expect("get").is_none());
}

/// An empty key is rejected by every call, before any I/O.
pub async fn bad_input_empty_key(h: &dyn Harness) {
    let l = cut_off_locker(h).await;
    assert!(matches!(l.lock("", "v").await, Err(Error::EmptyKey)));
    assert!(matches!(l.acquire("", "v").await, Err(Error::EmptyKey)));
    assert!(matches!(l.try_acquire("", "v").await, Err(Error::EmptyKey)));
    assert!(matches!(l.get("").await, Err(Error::EmptyKey)));
    assert!(matches!(l.watch(""), Err(Error::EmptyKey)));
    let err = l.get("").await.unwrap_err();
    assert!(err.is_invalid_input() && !err.is_retryable());
    assert!(err.to_string().contains("empty"), "{err}");
}

/// A key over the store's limit is rejected, naming the limit; a key at the limit is not
/// rejected as too long.
pub async fn bad_input_key_too_long(h: &dyn Harness) {
    let l = cut_off_locker(h).await;
    let max = l.backend().limits().max_key_len;
    let long = "k".repeat(max + 1);
    match l.acquire(long.clone(), "v").await {
        Err(Error::KeyTooLong { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("{other:?}"),
    }
    let err = l.get(&long).await.unwrap_err();
    assert!(err.to_string().contains(&max.to_string()), "{err}");
    assert!(matches!(l.watch(&long), Err(Error::KeyTooLong { .. })));
    // At the limit it passes validation and reaches the (cut off) store.
    let at = "k".repeat(max);
    let err = l.get(&at).await.unwrap_err();
    assert!(err.is_retryable(), "a key at the limit was rejected: {err}");
}

/// A value over the store's limit is rejected, naming the limit, by lock and by set_value.
pub async fn bad_input_value_too_large(h: &dyn Harness) {
    let l = cut_off_locker(h).await;
    let max = l.backend().limits().max_value_len;
    let big = vec![b'v'; max + 1];
    match l.lock(h.key("v"), big.clone()).await {
        Err(Error::ValueTooLarge { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("{other:?}"),
    }
    let err = l.try_acquire(h.key("v"), big.clone()).await.unwrap_err();
    assert!(err.to_string().contains(&max.to_string()), "{err}");
    // set_value on a live guard: reject before I/O.
    let ok = h.client().await.locker(TTL);
    let guard = ok.acquire(h.key("v"), "small").await.expect("acquire");
    assert!(matches!(
        guard.set_value(big).await,
        Err(Error::ValueTooLarge { .. })
    ));
    assert_eq!(
        ok.get(&h.key("v"))
            .await
            .expect("get")
            .expect("held")
            .value_str(),
        Some("small")
    );
    guard.release().await.expect("release");
}

/// TTLs of zero, below the store's minimum and absurdly large are rejected, naming the range.
pub async fn bad_input_ttl_out_of_range(h: &dyn Harness) {
    let client = h.client().await;
    client.faults.cut(Cut::Fail).await;
    let limits = client.backend.limits();
    for ttl in [
        Duration::ZERO,
        limits.min_ttl - Duration::from_millis(1),
        limits.max_ttl + Duration::from_secs(1),
    ] {
        match client.builder(ttl).build() {
            Err(Error::TtlOutOfRange { ttl: t, min, max }) => {
                assert_eq!((t, min, max), (ttl, limits.min_ttl, limits.max_ttl));
            }
            other => panic!("ttl {ttl:?}: {other:?}"),
        }
        let l = client.locker(TTL);
        let err = l
            .lock_with(h.key("t"), "v", LockOptions::new().dedicated_session(ttl))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TtlOutOfRange { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("{:?}", limits.min_ttl)),
            "{err}"
        );
    }
}

/// A safety margin that leaves no room for keep-alives is rejected before any I/O.
pub async fn bad_input_safety_margin(h: &dyn Harness) {
    let client = h.client().await;
    client.faults.cut(Cut::Fail).await;
    for margin in [Duration::ZERO, TTL / 3, TTL] {
        let err = client
            .builder(TTL)
            .safety_margin(margin)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert!(err.to_string().contains("third of the TTL"), "{err}");
    }
}

/// Keys of a shape no lock key may have (a leading or trailing `/`, an empty segment, a NUL byte)
/// are refused by every call, before any I/O, saying why; keys of several segments are keys.
pub async fn bad_input_malformed_keys(h: &dyn Harness) {
    let l = cut_off_locker(h).await;
    for (key, why) in [
        (h.key("trailing/"), "end with '/'"),
        ("/leading".to_owned(), "start with '/'"),
        (h.key("a//b"), "empty segment"),
        (h.key("nul\0byte"), "NUL"),
    ] {
        let refused = |result: Result<()>| match result {
            Err(Error::InvalidKey { key: k, reason }) => {
                assert_eq!(k, key);
                assert!(reason.contains(why), "{key:?}: {reason}");
            }
            other => panic!("{key:?}: {other:?}"),
        };
        refused(l.lock(key.clone(), "v").await.map(drop));
        refused(l.acquire(key.clone(), "v").await.map(drop));
        refused(l.try_acquire(key.clone(), "v").await.map(drop));
        refused(l.get(&key).await.map(drop));
        refused(l.watch(&key).map(drop));
        refused(l.watch_updates(&key).map(drop));
        let err = l.get(&key).await.unwrap_err();
        assert!(err.is_invalid_input() && !err.is_retryable(), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    // Several segments make a key like any other, reaching the (cut off) store.
    let err = l.get(&h.key("a/b/c")).await.unwrap_err();
    assert!(err.is_retryable(), "a key of segments was refused: {err}");
}

#[cfg(test)]
mod tests {
    /// The names of the `pub async fn NAME(h: &dyn Harness)` of a source file, but for the
    /// `assert_*` checks run after each test, sorted.
    fn harness_fns(source: &str) -> Vec<&str> {
        let mut names: Vec<&str> = source
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.strip_suffix("(h: &dyn Harness) {"))
            .filter(|name| !name.starts_with("assert_"))
            .collect();
        names.sort_unstable();
        names
    }

    fn sorted(names: &[&'static str]) -> Vec<&'static str> {
        let mut names = names.to_vec();
        names.sort_unstable();
        names
    }

    /// Every behaviour written in this file is in [`BEHAVIOURS`](super::BEHAVIOURS), and so in
    /// the macro (whose generated test checks the macro against the list): none is left out of
    /// the suite by forgetting to list it.
    #[test]
    fn every_behaviour_written_is_listed() {
        assert_eq!(
            harness_fns(include_str!("suite.rs")),
            sorted(super::BEHAVIOURS)
        );
    }

    /// The same for the behaviours of elections.
    #[test]
    fn every_election_behaviour_written_is_listed() {
        assert_eq!(
            harness_fns(include_str!("election.rs")),
            sorted(crate::election::BEHAVIOURS)
        );
    }

    /// The same for the clauses of the backend contract.
    #[test]
    fn every_clause_written_is_listed() {
        assert_eq!(
            harness_fns(include_str!("contract.rs")),
            sorted(crate::contract::CLAUSES)
        );
    }
}
