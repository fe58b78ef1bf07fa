//! The backend contract, one `pub async fn` per clause: what the `# Contract` sections of
//! [`LockBackend`] and [`Watcher`](locker_core::Watcher) promise, checked by calling a backend
//! directly (as core does), not through [`Locker`](locker_core::Locker).
//!
//! Each clause takes the test's [`Harness`], asserts the clause it is named after, and runs
//! unchanged on every backend: keys are the test's own ([`Harness::key`]); time is tokio time,
//! paused on the memory backend and real on etcd, and no assertion depends on how long something
//! took in wall time. A clause revokes every lease it is granted, so nothing of it is left once it
//! returns: [`assert_clause_left_nothing`] checks that at once, with no wait.
//!
//! Clauses that watch from past revisions declare it first thing ([`HistoryUse::Reads`]), and
//! the one that compacts declares that ([`HistoryUse::Compacts`]), so that on a store shared
//! between tests no compaction removes history a clause still needs.
//!
//! [`conformance_suite!`](crate::conformance_suite) makes one test per clause, in a module
//! `contract` (`cargo test contract::` runs them alone).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use locker_core::backend::{
    Entry, EventKind, Joined, LeaseId, LockBackend, Revision, WatchEvent, WatchStream, entry_key,
    queue_of,
};
use locker_core::{Error, Result};
use tokio::time::{Instant, sleep, timeout};

use crate::harness::{Cut, Harness, HistoryUse};
use crate::suite::PATIENCE;

/// The TTL of the clauses' leases: long enough that none expires during a clause (every clause
/// revokes its leases; only [`lease_expiry_deletes_its_entries_and_only_those`] lets one run
/// out, of the store's shortest TTL).
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Every clause of the backend contract, by name. Backends instantiate all of them through
/// [`conformance_suite!`](crate::conformance_suite), which checks that its list is this one.
pub const CLAUSES: &[&str] = &[
    "limits_are_consistent",
    "join_at_the_limits_is_accepted_by_the_store",
    "join_creates_the_entry_and_answers_it",
    "join_is_idempotent",
    "join_answers_the_newest_earlier_entry",
    "queues_are_isolated",
    "guarded_writes_refuse_a_stale_create_revision",
    "an_update_answers_the_revision_of_its_write",
    "resume_takes_up_an_entry_unwritten_since_and_refuses_it_after",
    "a_gone_lease_fails_as_a_whole_with_lease_lost",
    "leases_are_granted_kept_alive_and_revoked",
    "a_granted_ttl_is_at_least_the_asked_and_the_minimum",
    "revoke_deletes_every_entry_of_the_lease_and_only_those",
    "lease_expiry_deletes_its_entries_and_only_those",
    "revisions_increase_across_the_store",
    "reads_are_consistent_and_answer_their_revision",
    "a_watch_from_after_a_read_misses_nothing",
    "watch_from_a_revision_delivers_every_change_in_order",
    "watch_misses_nothing_in_a_concurrent_burst",
    "watch_from_now_starts_at_the_next_revision",
    "watch_sees_only_keys_under_its_prefix",
    "watch_deletes_delivers_every_delete_and_no_put",
    "compacted_history_is_its_own_error",
    "an_unreachable_store_fails_every_call_as_retryable",
    "a_broken_watch_ends_retryable_or_resumes_without_gap",
];

// ---------------------------------------------------------------------------------------------
// Helpers

/// After a clause: nothing of it is left in the store (no key under its prefix, none of the
/// leases its clients were granted), at once. Unlike a behaviour, a clause has no lock task that
/// cleans up in the background and no lease that is left to expire: it revokes what it grants.
pub async fn assert_clause_left_nothing(h: &dyn Harness) {
    let left = h.leftovers(&h.granted_leases()).await;
    assert!(
        left.is_empty(),
        "the clause left behind in {}: {left:?}",
        h.name()
    );
}

/// The backend of a fresh client (its leases are recorded for the leak check).
async fn backend(h: &dyn Harness) -> Arc<dyn LockBackend> {
    h.client().await.backend
}

/// A lease of [`LEASE_TTL`].
async fn lease(b: &dyn LockBackend) -> LeaseId {
    b.grant_lease(LEASE_TTL).await.expect("grant a lease").id
}

async fn join(b: &dyn LockBackend, key: &str, lease: LeaseId, value: &str) -> Joined {
    b.join(key, lease, value.as_bytes())
        .await
        .unwrap_or_else(|err| panic!("join {key} under {lease:x}: {err}"))
}

async fn revoke(b: &dyn LockBackend, leases: &[LeaseId]) {
    for &lease in leases {
        b.revoke_lease(lease)
            .await
            .unwrap_or_else(|err| panic!("revoke {lease:x}: {err}"));
    }
}

/// The queue of `key` as the backend reads it.
async fn queue(b: &dyn LockBackend, key: &str) -> Vec<Entry> {
    b.entries(key).await.expect("read the queue").entries
}

/// The holder of `key` as the backend reads it.
async fn holder(b: &dyn LockBackend, key: &str) -> Option<Entry> {
    b.holder(key).await.expect("read the holder").0
}

async fn watch(b: &dyn LockBackend, prefix: &str, from: Option<Revision>) -> WatchStream {
    b.watch(prefix, from)
        .await
        .unwrap_or_else(|err| panic!("watch {prefix:?} from {from:?}: {err}"))
}

/// The put event of `entry` as it is now.
fn put(entry: &Entry) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Put,
        entry: entry.clone(),
    }
}

/// Asserts that `event` is the delete of `key`. A delete carries its key and its revision; the
/// rest may be empty.
fn assert_delete(event: &WatchEvent, key: &str) {
    assert_eq!(
        (event.kind, event.entry.key.as_str()),
        (EventKind::Delete, key),
        "expected the delete of {key}, got {event:?}"
    );
}

/// The next batch of `stream`, which must come within [`PATIENCE`].
pub async fn next_batch(stream: &mut WatchStream) -> Vec<WatchEvent> {
    match timeout(PATIENCE, stream.events.next()).await {
        Err(_) => panic!("no watch batch within {PATIENCE:?}"),
        Ok(None) => panic!("the watch stream ended"),
        Ok(Some(Err(err))) => panic!("the watch stream failed: {err}"),
        Ok(Some(Ok(batch))) => batch,
    }
}

/// Reads batches until at least `count` events came; answers every event read.
pub async fn next_events(stream: &mut WatchStream, count: usize) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    while events.len() < count {
        events.extend(next_batch(stream).await);
    }
    events
}

/// Reads batches until the put of `key` came, which must be the last event read; answers every
/// event read.
async fn events_until_put_of(stream: &mut WatchStream, key: &str) -> Vec<WatchEvent> {
    let mut events: Vec<WatchEvent> = Vec::new();
    loop {
        events.extend(next_batch(stream).await);
        if let Some(at) = events
            .iter()
            .position(|e| e.kind == EventKind::Put && e.entry.key == key)
        {
            assert_eq!(
                at + 1,
                events.len(),
                "events after the put of {key}: {events:?}"
            );
            return events;
        }
    }
}

/// Asserts that revisions never go back along `events`.
fn assert_in_revision_order(events: &[WatchEvent]) {
    assert!(
        events
            .windows(2)
            .all(|w| w[0].entry.mod_revision <= w[1].entry.mod_revision),
        "events out of revision order: {events:?}"
    );
}

/// `call`, tried again while it fails with a retryable error (a client reconnecting), for at
/// most [`PATIENCE`].
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Ok(value) => return value,
            Err(err) if err.is_retryable() && start.elapsed() < PATIENCE => {
                sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{what}: {err}"),
        }
    }
}

/// Asserts that `result` is [`Error::LeaseLost`] for `lease`.
fn assert_lease_lost<T: std::fmt::Debug>(result: Result<T>, lease: LeaseId, what: &str) {
    match result {
        Err(Error::LeaseLost { lease: lost }) => assert_eq!(lost, lease, "{what}"),
        other => panic!("{what}: expected LeaseLost for {lease:x}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Limits

/// `limits()` is a sane range, and the same every time and for every client of the store.
pub async fn limits_are_consistent(h: &dyn Harness) {
    let a = backend(h).await;
    let b = backend(h).await;
    let limits = a.limits();
    assert!(limits.min_ttl > Duration::ZERO, "{limits:?}");
    assert!(limits.min_ttl <= limits.max_ttl, "{limits:?}");
    assert!(limits.max_key_len > 0, "{limits:?}");
    assert!(limits.max_value_len > 0, "{limits:?}");
    assert_eq!(a.limits(), limits, "limits() answers the same every time");
    assert_eq!(
        b.limits(),
        limits,
        "every client of the store has the same limits"
    );
}

/// A join with a key of exactly `max_key_len` bytes and a value of exactly `max_value_len` bytes
/// is accepted by the store itself (the backend does not validate sizes; core does), stored and
/// read back whole; so is an update to a value of that size.
pub async fn join_at_the_limits_is_accepted_by_the_store(h: &dyn Harness) {
    let b = backend(h).await;
    let limits = b.limits();
    let room = limits
        .max_key_len
        .checked_sub(h.key("").len())
        .expect("room for a key under the test's prefix");
    let key = h.key(&"k".repeat(room));
    assert_eq!(key.len(), limits.max_key_len);
    let value = vec![b'v'; limits.max_value_len];
    let l = lease(&*b).await;
    let joined = b
        .join(&key, l, &value)
        .await
        .expect("a join at the limits is accepted");
    assert_eq!(joined.entry.key, entry_key(&key, l));
    assert!(
        joined.entry.value == value,
        "the value was not stored whole"
    );
    assert_eq!(queue(&*b, &key).await, vec![joined.entry.clone()]);
    assert_eq!(holder(&*b, &key).await, Some(joined.entry.clone()));
    let other = vec![b'w'; limits.max_value_len];
    let updated = b
        .update_value(&joined.entry.key, joined.entry.create_revision, &other)
        .await
        .expect("an update at the limit is accepted")
        .is_some();
    assert!(updated);
    let read = holder(&*b, &key).await.expect("the entry");
    assert!(read.value == other, "the new value was not stored whole");
    revoke(&*b, &[l]).await;
}

// ---------------------------------------------------------------------------------------------
// Join

/// A join on an empty queue creates the entry `key/<lease hex>` with the value, bound to the
/// lease, at a new revision, and answers it as the holder (no predecessor), exactly as stored.
pub async fn join_creates_the_entry_and_answers_it(h: &dyn Harness) {
    let b = backend(h).await;
    let key = h.key("q");
    let l = lease(&*b).await;
    let joined = join(&*b, &key, l, "first").await;
    let entry = &joined.entry;
    assert_eq!(entry.key, entry_key(&key, l));
    assert_eq!(queue_of(&entry.key), Some(key.as_str()));
    assert_eq!(entry.value, b"first");
    assert_eq!(entry.lease, l);
    assert!(joined.revision > 0);
    assert_eq!(
        (entry.create_revision, entry.mod_revision),
        (joined.revision, joined.revision),
        "a new entry is created at the join's revision"
    );
    assert_eq!(joined.predecessor, None, "first in the queue: the holder");
    // As stored: the operator's listing and the backend's reads agree with the answer.
    assert_eq!(h.entries(&key).await, vec![entry.clone()]);
    assert_eq!(queue(&*b, &key).await, vec![entry.clone()]);
    assert_eq!(holder(&*b, &key).await, Some(entry.clone()));
    revoke(&*b, &[l]).await;
}

/// A join retried with the same lease (from the same client or another) answers the same entry,
/// with its value and place, and its own predecessor (not the newest entry of the queue); it
/// writes nothing.
pub async fn join_is_idempotent(h: &dyn Harness) {
    let b = backend(h).await;
    let other_client = backend(h).await;
    let key = h.key("retried");
    let leases = [lease(&*b).await, lease(&*b).await, lease(&*b).await];
    let mut joined = Vec::new();
    for (i, &l) in leases.iter().enumerate() {
        joined.push(join(&*b, &key, l, &format!("v{i}")).await);
    }
    let last = joined[2].revision;
    let mut changes = watch(&*b, &h.key(""), None).await;
    for (i, &l) in leases.iter().enumerate() {
        for client in [&b, &other_client] {
            let again = join(&**client, &key, l, "changed").await;
            assert_eq!(
                again.entry, joined[i].entry,
                "a retried join answers the same entry, value and place"
            );
            let expected = i.checked_sub(1).map(|before| joined[before].entry.clone());
            assert_eq!(
                again.predecessor, expected,
                "a retried join answers the predecessor of entry {i}"
            );
            assert!(again.revision >= last);
        }
    }
    // The retried joins wrote nothing: the first change after them is the marker.
    let marker = join(&*b, &h.key("marker"), leases[0], "marker").await;
    assert_eq!(next_events(&mut changes, 1).await, vec![put(&marker.entry)]);
    let entries: Vec<Entry> = joined.iter().map(|j| j.entry.clone()).collect();
    assert_eq!(queue(&*b, &key).await, entries);
    revoke(&*b, &leases).await;
}

/// A join answers as predecessor the newest entry of the queue created before its own (the newer
/// of two earlier entries), as `position` does; with that one gone, the one before it.
pub async fn join_answers_the_newest_earlier_entry(h: &dyn Harness) {
    let b = backend(h).await;
    let key = h.key("t");
    let leases = [lease(&*b).await, lease(&*b).await, lease(&*b).await];
    let first = join(&*b, &key, leases[0], "1").await;
    let second = join(&*b, &key, leases[1], "2").await;
    let third = join(&*b, &key, leases[2], "3").await;
    assert_eq!(first.predecessor, None);
    assert_eq!(second.predecessor, Some(first.entry.clone()));
    assert_eq!(
        third.predecessor,
        Some(second.entry.clone()),
        "the newer of the two earlier entries"
    );
    assert!(first.entry.create_revision < second.entry.create_revision);
    assert!(second.entry.create_revision < third.entry.create_revision);
    let position = b
        .position(&key, &third.entry.key, third.entry.create_revision)
        .await
        .expect("position");
    assert_eq!(
        position.predecessor, third.predecessor,
        "as position answers"
    );

    // With the one before it gone, the one before that.
    let (second_key, second_rev) = (&second.entry.key, second.entry.create_revision);
    assert!(
        b.delete_entry(second_key, second_rev)
            .await
            .expect("delete")
    );
    let again = join(&*b, &key, leases[2], "3").await;
    assert_eq!(again.predecessor, Some(first.entry.clone()));
    // With the holder gone too, the entry is the holder.
    let (first_key, first_rev) = (&first.entry.key, first.entry.create_revision);
    assert!(b.delete_entry(first_key, first_rev).await.expect("delete"));
    let again = join(&*b, &key, leases[2], "3").await;
    assert_eq!(again.predecessor, None);
    // A lease whose entry was deleted joins again at a new place, behind the newest.
    let back = join(&*b, &key, leases[0], "back").await;
    assert!(back.entry.create_revision > third.entry.create_revision);
    assert_eq!(back.predecessor, Some(third.entry.clone()));
    revoke(&*b, &leases).await;
}

/// The queues of `a`, `a/b` and `ab` never see each other's entries, in join, position, holder
/// and entries, even with more entries of deeper queues than a store reads at once.
pub async fn queues_are_isolated(h: &dyn Harness) {
    let b = backend(h).await;
    let (a, a_b, ab) = (h.key("a"), h.key("a/b"), h.key("ab"));
    let (l1, l2, l3) = (lease(&*b).await, lease(&*b).await, lease(&*b).await);
    // Entries of deeper queues under `a/`, older than any entry of `a`; more than a page of them
    // (etcd's reads of a queue ask for 8 keys at first).
    for i in 0..10 {
        join(&*b, &h.key(&format!("a/d{i}")), l1, "deep").await;
    }
    assert_eq!(holder(&*b, &a).await, None);
    assert!(queue(&*b, &a).await.is_empty());
    let in_ab = join(&*b, &ab, l3, "ab").await;
    assert_eq!(in_ab.predecessor, None, "`ab` is a queue of its own");
    let deeper = join(&*b, &h.key("a/b/c"), l2, "a/b/c").await;
    assert_eq!(deeper.predecessor, None);
    let in_a_b = join(&*b, &a_b, l3, "a/b").await;
    assert_eq!(in_a_b.predecessor, None, "`a/b/c` is not in `a/b`");
    let first = join(&*b, &a, l1, "a1").await;
    assert_eq!(
        first.predecessor, None,
        "no entry of `a/…` or `ab` is in `a`"
    );
    // More deeper entries, newer than the first entry of `a`.
    for i in 0..10 {
        join(&*b, &h.key(&format!("a/e{i}")), l2, "deep").await;
    }
    let second = join(&*b, &a, l2, "a2").await;
    assert_eq!(second.predecessor, Some(first.entry.clone()));
    // Retried joins read the queue another way; the same answers.
    let again = join(&*b, &a, l2, "a2").await;
    assert_eq!(again.predecessor, Some(first.entry.clone()));
    assert_eq!(join(&*b, &a, l1, "a1").await.predecessor, None);
    for (entry, predecessor) in [(&first, None), (&second, Some(first.entry.clone()))] {
        let position = b
            .position(&a, &entry.entry.key, entry.entry.create_revision)
            .await
            .expect("position");
        assert_eq!(position.own, Some(entry.entry.clone()));
        assert_eq!(position.predecessor, predecessor);
    }
    let position = b
        .position(&a_b, &in_a_b.entry.key, in_a_b.entry.create_revision)
        .await
        .expect("position");
    assert_eq!(position.predecessor, None, "`a/b/c` is not in `a/b`");
    assert_eq!(holder(&*b, &a).await, Some(first.entry.clone()));
    assert_eq!(holder(&*b, &a_b).await, Some(in_a_b.entry.clone()));
    assert_eq!(holder(&*b, &ab).await, Some(in_ab.entry.clone()));
    let expected_a = vec![first.entry.clone(), second.entry.clone()];
    assert_eq!(queue(&*b, &a).await, expected_a);
    assert_eq!(h.entries(&a).await, expected_a, "as the operator lists it");
    assert_eq!(queue(&*b, &a_b).await, vec![in_a_b.entry.clone()]);
    assert_eq!(queue(&*b, &ab).await, vec![in_ab.entry.clone()]);
    // Entries of the other queues going away change nothing in `a`.
    revoke(&*b, &[l3]).await;
    assert_eq!(queue(&*b, &a).await, expected_a);
    revoke(&*b, &[l1]).await;
    assert_eq!(holder(&*b, &a).await, Some(second.entry.clone()));
    assert_eq!(queue(&*b, &h.key("a/b/c")).await, vec![deeper.entry]);
    revoke(&*b, &[l2]).await;
    assert_eq!(holder(&*b, &a).await, None);
}

// ---------------------------------------------------------------------------------------------
// Guarded writes

/// `delete_entry` and `update_value` act only on an entry that still has the create revision
/// given: a stale one (the key deleted and created again, or any other) is refused and changes
/// nothing; the right one succeeds, and an update keeps the entry's lease and place.
pub async fn guarded_writes_refuse_a_stale_create_revision(h: &dyn Harness) {
    let b = backend(h).await;
    let key = h.key("g");
    let l = lease(&*b).await;
    let entry = join(&*b, &key, l, "one").await.entry;
    let rev = entry.create_revision;
    for stale in [rev - 1, rev + 1, 0, -1] {
        let updated = b.update_value(&entry.key, stale, b"x").await;
        assert!(
            updated.expect("update").is_none(),
            "an update guarded by {stale}"
        );
        let deleted = b.delete_entry(&entry.key, stale).await;
        assert!(!deleted.expect("delete"), "a delete guarded by {stale}");
    }
    let missing = format!("{key}/missing");
    assert!(
        b.update_value(&missing, rev, b"x")
            .await
            .expect("update")
            .is_none()
    );
    assert!(!b.delete_entry(&missing, rev).await.expect("delete"));
    assert_eq!(
        queue(&*b, &key).await,
        vec![entry.clone()],
        "refused writes change nothing (and create nothing)"
    );

    assert!(
        b.update_value(&entry.key, rev, b"two")
            .await
            .expect("update")
            .is_some()
    );
    let updated = holder(&*b, &key).await.expect("the entry");
    assert_eq!(updated.value, b"two");
    assert_eq!(updated.lease, l, "an update keeps the lease");
    assert_eq!(updated.create_revision, rev, "and the place");
    assert!(updated.mod_revision > entry.mod_revision);

    assert!(b.delete_entry(&entry.key, rev).await.expect("delete"));
    assert!(
        !b.delete_entry(&entry.key, rev).await.expect("delete"),
        "twice"
    );
    assert!(
        b.update_value(&entry.key, rev, b"three")
            .await
            .expect("update")
            .is_none(),
        "an update does not create a deleted entry again"
    );
    assert!(queue(&*b, &key).await.is_empty());

    // The same key again under the same lease: a new entry at a new place, which the guards of
    // the old one do not touch.
    let again = join(&*b, &key, l, "four").await.entry;
    assert_eq!(again.key, entry.key);
    assert!(again.create_revision > rev);
    assert!(
        b.update_value(&entry.key, rev, b"stale")
            .await
            .expect("update")
            .is_none()
    );
    assert!(!b.delete_entry(&entry.key, rev).await.expect("delete"));
    assert_eq!(holder(&*b, &key).await, Some(again.clone()));
    // An updated entry is still bound to its lease: revoking it deletes the entry.
    let updated = b
        .update_value(&again.key, again.create_revision, b"five")
        .await;
    assert!(updated.expect("update").is_some());
    revoke(&*b, &[l]).await;
    assert!(
        queue(&*b, &key).await.is_empty(),
        "the update kept the lease"
    );
}

// ---------------------------------------------------------------------------------------------
// Leases

/// An update answers the revision of its write: the entry's mod revision after it, which a
/// read shows; an update of an entry that is not there answers `None`.
pub async fn an_update_answers_the_revision_of_its_write(h: &dyn Harness) {
    let b = backend(h).await;
    let key = h.key("update");
    let l = lease(&*b).await;
    let entry = join(&*b, &key, l, "one").await.entry;
    let written = b
        .update_value(&entry.key, entry.create_revision, b"two")
        .await
        .expect("update")
        .expect("the entry is there");
    assert!(written > entry.mod_revision);
    let read = holder(&*b, &key).await.expect("the entry");
    assert_eq!(
        (read.value.as_slice(), read.mod_revision),
        (&b"two"[..], written)
    );
    assert_eq!(read.create_revision, entry.create_revision);
    let missing = entry_key(&key, l + 1);
    assert_eq!(
        b.update_value(&missing, written, b"x")
            .await
            .expect("update"),
        None
    );
    revoke(&*b, &[l]).await;
}

/// `resume` takes up an entry that nobody wrote since its mod revision: it writes the value,
/// keeps the lease and the create revision (the token), and answers the entry with its
/// predecessor and the write's revision. A second resume from the same mod revision is
/// refused with the entry as it is now; a resume of an entry that is gone, or that has another
/// create revision, is refused with `None`.
pub async fn resume_takes_up_an_entry_unwritten_since_and_refuses_it_after(h: &dyn Harness) {
    use locker_core::backend::Resumption;
    let b = backend(h).await;
    let key = h.key("resume");
    let (l1, l2) = (lease(&*b).await, lease(&*b).await);
    let first = join(&*b, &key, l1, "first").await.entry;
    let exported = join(&*b, &key, l2, "old").await.entry;
    let taken = b
        .resume(
            &key,
            &exported.key,
            exported.create_revision,
            exported.mod_revision,
            b"new",
        )
        .await
        .expect("resume");
    let Resumption::Resumed(joined) = taken else {
        panic!("an entry unwritten since was refused: {taken:?}");
    };
    assert_eq!(joined.entry.key, exported.key);
    assert_eq!(joined.entry.lease, l2, "the lease is kept");
    assert_eq!(joined.entry.create_revision, exported.create_revision);
    assert_eq!(joined.entry.value, b"new");
    assert_eq!(joined.entry.mod_revision, joined.revision);
    assert!(joined.revision > exported.mod_revision);
    assert_eq!(joined.predecessor, Some(first.clone()));
    assert_eq!(
        queue(&*b, &key).await,
        vec![first.clone(), joined.entry.clone()]
    );

    let again = b
        .resume(
            &key,
            &exported.key,
            exported.create_revision,
            exported.mod_revision,
            b"other",
        )
        .await
        .expect("resume");
    assert_eq!(again, Resumption::Refused(Some(joined.entry.clone())));
    let stale = b
        .resume(&key, &exported.key, exported.create_revision - 1, 0, b"x")
        .await
        .expect("resume");
    assert_eq!(stale, Resumption::Refused(None));
    revoke(&*b, &[l2]).await;
    let gone = b
        .resume(
            &key,
            &joined.entry.key,
            joined.entry.create_revision,
            joined.entry.mod_revision,
            b"x",
        )
        .await
        .expect("resume");
    assert_eq!(gone, Resumption::Refused(None));
    assert_eq!(queue(&*b, &key).await, vec![first]);
    revoke(&*b, &[l1]).await;
}

/// A join naming a lease the store does not know (revoked, expired, never granted, or 0, which
/// etcd reads as "no lease") fails with `Error::LeaseLost` for that lease, as a whole: nothing
/// is written, whether the queue is empty, held, or holds only entries of a deeper queue. Such
/// a lease's keep-alive answers `None`, and revoking it is `Ok`.
pub async fn a_gone_lease_fails_as_a_whole_with_lease_lost(h: &dyn Harness) {
    let b = backend(h).await;
    let live = lease(&*b).await;
    let revoked = lease(&*b).await;
    revoke(&*b, &[revoked]).await;
    let expired = lease(&*b).await;
    h.expire_lease(expired).await;
    let never: LeaseId = 0x7777_0000_1234;
    let held = join(&*b, &h.key("held"), live, "holder").await;
    join(&*b, &h.key("deep/er"), live, "deeper").await;
    let mut changes = watch(&*b, &h.key(""), None).await;
    for queue in ["empty", "held", "deep"] {
        for gone in [revoked, expired, never, 0] {
            let result = b.join(&h.key(queue), gone, b"v").await;
            assert_lease_lost(result, gone, &format!("a join of {queue} under {gone:x}"));
        }
    }
    for gone in [revoked, expired, never, 0] {
        assert_eq!(b.keep_alive(gone).await.expect("keep-alive"), None);
        b.revoke_lease(gone)
            .await
            .expect("revoking a gone lease is Ok");
    }
    // Nothing was written: the queues are as they were, and the first change after the joins is
    // the marker.
    assert_eq!(h.entries(&h.key("held")).await, vec![held.entry]);
    assert!(h.entries(&h.key("empty")).await.is_empty());
    assert!(h.entries(&h.key("deep")).await.is_empty());
    let marker = join(&*b, &h.key("marker"), live, "marker").await;
    assert_eq!(next_events(&mut changes, 1).await, vec![put(&marker.entry)]);
    revoke(&*b, &[live]).await;
}

/// A lease is granted (at least the TTL asked, each with its own id), kept alive by any client
/// (answering the TTL left), and revoked by any client; a revoked lease's keep-alive answers
/// `None` on every client, even one that was keeping it alive, and revoking it again is `Ok`.
pub async fn leases_are_granted_kept_alive_and_revoked(h: &dyn Harness) {
    let a = backend(h).await;
    let other = backend(h).await;
    let max_ttl = a.limits().max_ttl;
    let first = a.grant_lease(LEASE_TTL).await.expect("grant");
    let second = a.grant_lease(LEASE_TTL).await.expect("grant");
    assert_ne!(first.id, second.id);
    for lease in [first, second] {
        assert!(lease.ttl >= LEASE_TTL && lease.ttl <= max_ttl, "{lease:?}");
    }
    for client in [&a, &a, &other] {
        let left = client.keep_alive(first.id).await.expect("keep-alive");
        let left = left.expect("a live lease");
        assert!(left > Duration::ZERO && left <= first.ttl, "{left:?}");
    }
    a.revoke_lease(first.id).await.expect("revoke");
    assert_eq!(a.keep_alive(first.id).await.expect("keep-alive"), None);
    assert_eq!(other.keep_alive(first.id).await.expect("keep-alive"), None);
    a.revoke_lease(first.id)
        .await
        .expect("revoking twice is Ok");
    // Revoked by another client while this one keeps it alive.
    assert!(a.keep_alive(second.id).await.expect("keep-alive").is_some());
    other.revoke_lease(second.id).await.expect("revoke");
    assert_eq!(a.keep_alive(second.id).await.expect("keep-alive"), None);
}

/// A granted TTL is at least the one asked and at least `limits().min_ttl`: a shorter one (even
/// zero) is rounded up to the minimum; the longest, `max_ttl`, is granted.
pub async fn a_granted_ttl_is_at_least_the_asked_and_the_minimum(h: &dyn Harness) {
    let b = backend(h).await;
    let limits = b.limits();
    let mut leases = Vec::new();
    for short in [Duration::ZERO, Duration::from_millis(1), limits.min_ttl / 2] {
        let lease = b.grant_lease(short).await.expect("grant");
        assert_eq!(lease.ttl, limits.min_ttl, "asked {short:?}");
        leases.push(lease.id);
    }
    for asked in [
        limits.min_ttl,
        limits.min_ttl + Duration::from_millis(500),
        limits.max_ttl,
    ] {
        let lease = b.grant_lease(asked).await.expect("grant");
        assert!(
            lease.ttl >= asked && lease.ttl <= limits.max_ttl,
            "asked {asked:?}: {lease:?}"
        );
        leases.push(lease.id);
    }
    revoke(&*b, &leases).await;
}

/// Revoking a lease deletes every entry bound to it, in every queue, in one operation (one delete
/// event each, all at one revision), and nothing else.
pub async fn revoke_deletes_every_entry_of_the_lease_and_only_those(h: &dyn Harness) {
    let b = backend(h).await;
    let (l, other) = (lease(&*b).await, lease(&*b).await);
    let mut keys = Vec::new();
    for queue in ["q1", "q2", "q3/deeper"] {
        keys.push(join(&*b, &h.key(queue), l, queue).await.entry.key);
    }
    let stays = join(&*b, &h.key("q1"), other, "stays").await.entry;
    let mut changes = watch(&*b, &h.key(""), None).await;
    revoke(&*b, &[l]).await;
    let events = next_events(&mut changes, keys.len()).await;
    assert_eq!(events.len(), keys.len(), "{events:?}");
    let mut deleted: Vec<&str> = events.iter().map(|e| e.entry.key.as_str()).collect();
    deleted.sort_unstable();
    keys.sort_unstable();
    assert_eq!(deleted, keys);
    assert!(
        events.iter().all(|e| e.kind == EventKind::Delete),
        "{events:?}"
    );
    let revision = events[0].entry.mod_revision;
    assert!(
        events.iter().all(|e| e.entry.mod_revision == revision),
        "a revoke is one operation: {events:?}"
    );
    assert_eq!(queue(&*b, &h.key("q1")).await, vec![stays.clone()]);
    assert!(queue(&*b, &h.key("q2")).await.is_empty());
    assert!(queue(&*b, &h.key("q3/deeper")).await.is_empty());
    // And nothing else: the next change is the marker.
    let marker = join(&*b, &h.key("marker"), other, "marker").await;
    assert_eq!(next_events(&mut changes, 1).await, vec![put(&marker.entry)]);
    revoke(&*b, &[other]).await;
}

/// A lease that is not kept alive ends no earlier than its TTL, and the store then deletes every
/// entry bound to it (one delete event each, at one revision) and nothing else; a join under it
/// then fails with `Error::LeaseLost`.
pub async fn lease_expiry_deletes_its_entries_and_only_those(h: &dyn Harness) {
    let b = backend(h).await;
    let min_ttl = b.limits().min_ttl;
    let keeper = lease(&*b).await;
    let mut changes = watch(&*b, &h.key(""), None).await;
    let granted_at = Instant::now();
    let short = b.grant_lease(min_ttl).await.expect("grant");
    let x = join(&*b, &h.key("x"), short.id, "x").await;
    let y = join(&*b, &h.key("y"), short.id, "y").await;
    let stays = join(&*b, &h.key("x"), keeper, "stays").await;
    let puts = next_events(&mut changes, 3).await;
    assert_eq!(puts, vec![put(&x.entry), put(&y.entry), put(&stays.entry)]);
    // No keep-alive: the store ends the lease after its TTL (tokio time; paused on memory).
    let deletes = next_events(&mut changes, 2).await;
    assert!(
        granted_at.elapsed() >= short.ttl,
        "the lease ended {:?} after it was granted, before its TTL of {:?}",
        granted_at.elapsed(),
        short.ttl
    );
    assert_eq!(deletes.len(), 2, "{deletes:?}");
    assert_delete(&deletes[0], &x.entry.key);
    assert_delete(&deletes[1], &y.entry.key);
    assert_eq!(
        deletes[0].entry.mod_revision, deletes[1].entry.mod_revision,
        "the entries of a lease end at one revision"
    );
    assert_eq!(b.keep_alive(short.id).await.expect("keep-alive"), None);
    let late = b.join(&h.key("z"), short.id, b"late").await;
    assert_lease_lost(late, short.id, "a join under an expired lease");
    // Only those: the other lease's entry stays, and the next change is the marker.
    assert_eq!(queue(&*b, &h.key("x")).await, vec![stays.entry.clone()]);
    let marker = join(&*b, &h.key("marker"), keeper, "marker").await;
    assert_eq!(next_events(&mut changes, 1).await, vec![put(&marker.entry)]);
    revoke(&*b, &[keeper]).await;
}

// ---------------------------------------------------------------------------------------------
// Revisions and reads

/// Revisions are store-wide: above 0, and greater for every write, whatever its client and its
/// queue; a read answers a revision at least that of every write completed before it.
pub async fn revisions_increase_across_the_store(h: &dyn Harness) {
    let (a, b) = (backend(h).await, backend(h).await);
    let (la, lb) = (lease(&*a).await, lease(&*b).await);
    let one = join(&*a, &h.key("one"), la, "1").await;
    let two = join(&*b, &h.key("two"), lb, "2").await;
    let three = join(&*a, &h.key("three"), la, "3").await;
    assert!(one.revision > 0, "{}", one.revision);
    assert!(one.revision < two.revision && two.revision < three.revision);
    let (_, read) = b.holder(&h.key("one")).await.expect("holder");
    assert!(
        read >= three.revision,
        "read at {read} after a write at {}",
        three.revision
    );
    let (_, read) = a.holder(&h.key("never-written")).await.expect("holder");
    assert!(
        read >= three.revision,
        "read at {read} after a write at {}",
        three.revision
    );
    let (key, rev) = (&one.entry.key, one.entry.create_revision);
    assert!(
        b.update_value(key, rev, b"1b")
            .await
            .expect("update")
            .is_some()
    );
    let snapshot = a.entries(&h.key("one")).await.expect("entries");
    let updated = &snapshot.entries[0];
    assert!(updated.mod_revision > three.revision, "{updated:?}");
    assert!(snapshot.revision >= updated.mod_revision);
    revoke(&*a, &[la, lb]).await;
}

/// `position`, `holder` and `entries` are consistent reads, from any client, of the store as of
/// the revision they answer: they see every write completed before them, and a client's reads
/// never go back.
pub async fn reads_are_consistent_and_answer_their_revision(h: &dyn Harness) {
    let w = backend(h).await;
    let r = backend(h).await;
    let key = h.key("r");
    let (l1, l2) = (lease(&*w).await, lease(&*w).await);
    let mut revisions = Vec::new();
    let first = join(&*w, &key, l1, "1").await.entry;

    let (held, at) = r.holder(&key).await.expect("holder");
    assert_eq!(held, Some(first.clone()));
    revisions.push(at);
    let snapshot = r.entries(&key).await.expect("entries");
    assert_eq!(snapshot.entries, vec![first.clone()]);
    revisions.push(snapshot.revision);
    let position = r
        .position(&key, &first.key, first.create_revision)
        .await
        .expect("position");
    assert_eq!(
        (position.own, position.predecessor),
        (Some(first.clone()), None)
    );
    revisions.push(position.revision);
    assert!(revisions[0] >= first.create_revision);

    let second = join(&*w, &key, l2, "2").await.entry;
    assert!(
        second.create_revision > position.revision,
        "a write after a read"
    );
    let position = r
        .position(&key, &second.key, second.create_revision)
        .await
        .expect("position");
    assert_eq!(position.own, Some(second.clone()));
    assert_eq!(position.predecessor, Some(first.clone()));
    revisions.push(position.revision);
    assert!(position.revision >= second.create_revision);
    let snapshot = r.entries(&key).await.expect("entries");
    assert_eq!(snapshot.entries, vec![first.clone(), second.clone()]);
    assert!(
        snapshot
            .entries
            .iter()
            .all(|e| e.mod_revision <= snapshot.revision)
    );
    revisions.push(snapshot.revision);

    assert!(
        w.update_value(&first.key, first.create_revision, b"1b")
            .await
            .expect("update")
            .is_some()
    );
    let (held, at) = r.holder(&key).await.expect("holder");
    let held = held.expect("a holder");
    assert_eq!(
        (held.value.as_slice(), held.create_revision),
        (&b"1b"[..], first.create_revision)
    );
    assert!(held.mod_revision > second.create_revision && held.mod_revision <= at);
    revisions.push(at);

    // Asked about a create revision the entry does not have, it is not one's own.
    let wrong = r
        .position(&key, &second.key, first.create_revision)
        .await
        .expect("position");
    assert_eq!((wrong.own, wrong.predecessor), (None, None));
    revisions.push(wrong.revision);
    // The holder deleted: gone from every read, and the next entry is the holder.
    assert!(
        w.delete_entry(&first.key, first.create_revision)
            .await
            .expect("delete")
    );
    let gone = r
        .position(&key, &first.key, first.create_revision)
        .await
        .expect("position");
    assert_eq!(gone.own, None);
    revisions.push(gone.revision);
    let position = r
        .position(&key, &second.key, second.create_revision)
        .await
        .expect("position");
    assert_eq!(
        (position.own, position.predecessor),
        (Some(second.clone()), None)
    );
    revisions.push(position.revision);
    assert_eq!(holder(&*r, &key).await, Some(second.clone()));
    revoke(&*w, &[l1, l2]).await;
    let (held, at) = r.holder(&key).await.expect("holder");
    assert_eq!(held, None);
    revisions.push(at);
    let snapshot = r.entries(&key).await.expect("entries");
    assert!(snapshot.entries.is_empty());
    revisions.push(snapshot.revision);
    assert!(
        revisions.windows(2).all(|w| w[0] <= w[1]),
        "a client's reads went back: {revisions:?}"
    );
}

/// A watch from the revision after a read's (`holder`, `entries`, `position`) delivers every
/// change the read did not see, and none it did: read-then-watch leaves no gap.
pub async fn a_watch_from_after_a_read_misses_nothing(h: &dyn Harness) {
    h.use_history(HistoryUse::Reads).await;
    let w = backend(h).await;
    let r = backend(h).await;
    let key = h.key("rw");
    let prefix = format!("{key}/");
    let seen = lease(&*w).await;
    let seen_entry = join(&*w, &key, seen, "seen").await.entry;
    for read in ["holder", "entries", "position"] {
        let at = match read {
            "holder" => r.holder(&key).await.expect("holder").1,
            "entries" => r.entries(&key).await.expect("entries").revision,
            _ => {
                let (own, rev) = (&seen_entry.key, seen_entry.create_revision);
                r.position(&key, own, rev).await.expect("position").revision
            }
        };
        // A change between the read and the watch.
        let between = lease(&*w).await;
        let joined = join(&*w, &key, between, "between").await;
        let mut stream = watch(&*r, &prefix, Some(at + 1)).await;
        assert_eq!(stream.start_revision, at + 1);
        assert_eq!(
            next_events(&mut stream, 1).await,
            vec![put(&joined.entry)],
            "after a {read} read at {at}"
        );
        revoke(&*w, &[between]).await;
    }
    revoke(&*w, &[seen]).await;
}

// ---------------------------------------------------------------------------------------------
// Watch

/// A watch from a revision delivers every put and delete under its prefix from that revision on
/// (the revision itself included), in order, without gaps: joins, updates, deletes and the
/// deletes of a revoke; a put carries the whole entry, keys relative to the backend's root.
pub async fn watch_from_a_revision_delivers_every_change_in_order(h: &dyn Harness) {
    h.use_history(HistoryUse::Reads).await;
    let b = backend(h).await;
    let w = backend(h).await;
    let prefix = h.key("w/");
    let (l1, l2) = (lease(&*b).await, lease(&*b).await);
    let j1 = join(&*b, &h.key("w/q1"), l1, "1").await;
    let j2 = join(&*b, &h.key("w/q1"), l2, "2").await;
    join(&*b, &h.key("x"), l1, "outside").await;
    let j3 = join(&*b, &h.key("w/q2/deep"), l1, "3").await;
    let (j2_key, j2_rev) = (&j2.entry.key, j2.entry.create_revision);
    assert!(
        b.update_value(j2_key, j2_rev, b"2b")
            .await
            .expect("update")
            .is_some()
    );
    let (j1_key, j1_rev) = (&j1.entry.key, j1.entry.create_revision);
    assert!(b.delete_entry(j1_key, j1_rev).await.expect("delete"));
    join(&*b, &h.key("w/q1"), l2, "retried").await;
    revoke(&*b, &[l1]).await; // deletes x/… (outside) and w/q2/deep/…
    let last = join(&*b, &h.key("w/q3"), l2, "last").await;

    let mut all = watch(&*w, &prefix, Some(j1.revision)).await;
    assert_eq!(all.start_revision, j1.revision);
    let events = events_until_put_of(&mut all, &last.entry.key).await;
    assert_eq!(events.len(), 7, "{events:#?}");
    assert_eq!(
        events[..3],
        [put(&j1.entry), put(&j2.entry), put(&j3.entry)]
    );
    let update = &events[3];
    assert_eq!(update.kind, EventKind::Put);
    assert_eq!(
        Entry {
            mod_revision: 0,
            ..update.entry.clone()
        },
        Entry {
            value: b"2b".to_vec(),
            mod_revision: 0,
            ..j2.entry.clone()
        },
        "the put of an update carries the whole entry"
    );
    assert_delete(&events[4], &j1.entry.key);
    assert_delete(&events[5], &j3.entry.key);
    assert_eq!(events[6], put(&last.entry));
    assert!(
        events
            .windows(2)
            .all(|w| w[0].entry.mod_revision < w[1].entry.mod_revision),
        "one revision per change, in order: {events:#?}"
    );

    // From a revision in the middle, the revision itself included: exactly the rest.
    let from_update = update.entry.mod_revision;
    let mut rest = watch(&*w, &prefix, Some(from_update)).await;
    assert_eq!(rest.start_revision, from_update);
    let rest = events_until_put_of(&mut rest, &last.entry.key).await;
    assert_eq!(rest, events[3..]);
    // From the revision after the first change: all but the first.
    let mut after_first = watch(&*w, &prefix, Some(j1.revision + 1)).await;
    let after = events_until_put_of(&mut after_first, &last.entry.key).await;
    assert_eq!(after, events[1..]);
    revoke(&*b, &[l2]).await;
}

/// `watch_deletes` from a revision delivers every delete under its prefix from that revision,
/// in order, and no put: not the joins, not a value update, not a retried join.
pub async fn watch_deletes_delivers_every_delete_and_no_put(h: &dyn Harness) {
    h.use_history(HistoryUse::Reads).await;
    let b = backend(h).await;
    let w = backend(h).await;
    let prefix = h.key("d/");
    let (l1, l2) = (lease(&*b).await, lease(&*b).await);
    let j1 = join(&*b, &h.key("d/q1"), l1, "1").await;
    let j2 = join(&*b, &h.key("d/q1"), l2, "2").await;
    let deep = join(&*b, &h.key("d/q2/deep"), l1, "3").await;
    let outside = join(&*b, &h.key("x"), l2, "outside").await;
    let (j2_key, j2_rev) = (&j2.entry.key, j2.entry.create_revision);
    assert!(
        b.update_value(j2_key, j2_rev, b"2b")
            .await
            .expect("update")
            .is_some()
    );
    let (j1_key, j1_rev) = (&j1.entry.key, j1.entry.create_revision);
    assert!(b.delete_entry(j1_key, j1_rev).await.expect("delete"));
    join(&*b, &h.key("d/q1"), l2, "retried").await;
    let (out_key, out_rev) = (&outside.entry.key, outside.entry.create_revision);
    assert!(
        b.delete_entry(out_key, out_rev)
            .await
            .expect("delete outside")
    );
    revoke(&*b, &[l1]).await; // deletes d/q2/deep/…
    let last = join(&*b, &h.key("d/q3"), l2, "last").await;
    let (last_key, last_rev) = (&last.entry.key, last.entry.create_revision);
    assert!(
        b.delete_entry(last_key, last_rev)
            .await
            .expect("delete last")
    );

    let mut deletes = w
        .watch_deletes(&prefix, Some(j1.revision))
        .await
        .unwrap_or_else(|err| panic!("watch_deletes {prefix:?}: {err}"));
    assert_eq!(deletes.start_revision, j1.revision);
    let events = next_events(&mut deletes, 3).await;
    assert_eq!(events.len(), 3, "{events:#?}");
    assert_delete(&events[0], &j1.entry.key);
    assert_delete(&events[1], &deep.entry.key);
    assert_delete(&events[2], &last.entry.key);
    assert!(
        events
            .windows(2)
            .all(|w| w[0].entry.mod_revision < w[1].entry.mod_revision),
        "in order: {events:#?}"
    );
    // From the revision of the second delete, that delete included: exactly the rest.
    let mut rest = w
        .watch_deletes(&prefix, Some(events[1].entry.mod_revision))
        .await
        .expect("watch_deletes from the middle");
    assert_eq!(next_events(&mut rest, 2).await, events[1..]);
    revoke(&*b, &[l2]).await;
}

/// Writers on four clients join at once; a watch started during the burst, from its first
/// write's revision, delivers every join, revision by revision, then every delete of the four
/// revokes, each revoke at one revision.
pub async fn watch_misses_nothing_in_a_concurrent_burst(h: &dyn Harness) {
    const WRITERS: usize = 4;
    const JOINS: usize = 10;
    h.use_history(HistoryUse::Reads).await;
    let watcher = backend(h).await;
    let prefix = h.key("burst/");
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let client = backend(h).await;
        let l = lease(&*client).await;
        writers.push((client, l));
    }
    let first = join(&*writers[0].0, &h.key("burst/first"), writers[0].1, "first").await;
    let mut tasks = Vec::new();
    for (t, (client, l)) in writers.iter().enumerate() {
        let (client, l, prefix) = (client.clone(), *l, prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut joined = Vec::new();
            for n in 0..JOINS {
                let key = format!("{prefix}t{t}-{n}");
                joined.push(join(&*client, &key, l, &format!("{t}-{n}")).await);
                if n % 3 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            joined
        }));
    }
    let mut stream = watch(&*watcher, &prefix, Some(first.revision)).await;
    let mut joined = vec![first];
    for task in tasks {
        joined.extend(task.await.expect("a writer"));
    }
    joined.sort_by_key(|j| j.revision);
    let events = next_events(&mut stream, joined.len()).await;
    assert_eq!(events.len(), joined.len(), "{events:#?}");
    for (event, joined) in events.iter().zip(&joined) {
        assert_eq!(
            event,
            &put(&joined.entry),
            "at revision {}",
            joined.revision
        );
    }

    for (client, l) in &writers {
        revoke(&**client, &[*l]).await;
    }
    let deletes = next_events(&mut stream, joined.len()).await;
    assert_eq!(deletes.len(), joined.len(), "{deletes:#?}");
    assert_in_revision_order(&deletes);
    let mut at = 0;
    for (_, l) in &writers {
        let mut expected: Vec<&str> = joined
            .iter()
            .filter(|j| j.entry.lease == *l)
            .map(|j| j.entry.key.as_str())
            .collect();
        let revoked = &deletes[at..at + expected.len()];
        at += expected.len();
        let mut keys: Vec<&str> = revoked.iter().map(|e| e.entry.key.as_str()).collect();
        expected.sort_unstable();
        keys.sort_unstable();
        assert_eq!(keys, expected, "the deletes of lease {l:x}");
        assert!(revoked.iter().all(|e| e.kind == EventKind::Delete));
        let revision = revoked[0].entry.mod_revision;
        assert!(revoked.iter().all(|e| e.entry.mod_revision == revision));
    }
}

/// `watch(prefix, None)` starts at the store's next revision: after every write completed
/// before it, and a read issued after it answers a revision at least `start_revision - 1`; the
/// first change it delivers is the first write after it.
pub async fn watch_from_now_starts_at_the_next_revision(h: &dyn Harness) {
    let b = backend(h).await;
    let w = backend(h).await;
    let l = lease(&*b).await;
    let before = join(&*b, &h.key("now/a"), l, "before").await;
    let (_, read_before) = w.holder(&h.key("now/a")).await.expect("holder");
    let mut stream = watch(&*w, &h.key("now/"), None).await;
    assert!(
        stream.start_revision > before.revision && stream.start_revision > read_before,
        "a watch from now started at {} after a write at {} and a read at {read_before}",
        stream.start_revision,
        before.revision
    );
    let (_, read_after) = w.holder(&h.key("now/a")).await.expect("holder");
    assert!(read_after >= stream.start_revision - 1);
    let after = join(&*b, &h.key("now/b"), l, "after").await;
    assert!(after.revision >= stream.start_revision);
    assert_eq!(
        next_events(&mut stream, 1).await,
        vec![put(&after.entry)],
        "the first change is the first write after the watch"
    );
    revoke(&*b, &[l]).await;
}

/// A watch delivers the changes of keys that start with its prefix, as a string (`p` covers
/// `p/…` and `pq/…`; `p/` covers `p/…` and `p/d/…`, not `pq/…`), and no others; dropping one
/// watch leaves the others running.
pub async fn watch_sees_only_keys_under_its_prefix(h: &dyn Harness) {
    let b = backend(h).await;
    let w = backend(h).await;
    let l = lease(&*b).await;
    let mut by_string = watch(&*w, &h.key("p"), None).await;
    let mut by_queue = watch(&*w, &h.key("p/"), None).await;
    let mut sibling = watch(&*w, &h.key("pq/"), None).await;
    let in_p = join(&*b, &h.key("p"), l, "p").await.entry;
    let deeper = join(&*b, &h.key("p/d"), l, "p/d").await.entry;
    let in_pq = join(&*b, &h.key("pq"), l, "pq").await.entry;
    join(&*b, &h.key("o"), l, "outside every prefix").await;
    let marker_p = join(&*b, &h.key("p/m"), l, "p/m").await.entry;
    let marker_pq = join(&*b, &h.key("pq/m"), l, "pq/m").await.entry;
    let expected = [&in_p, &deeper, &in_pq, &marker_p, &marker_pq];
    assert_eq!(
        next_events(&mut by_string, 5).await,
        expected.map(put).to_vec()
    );
    let expected = [&in_p, &deeper, &marker_p];
    assert_eq!(
        next_events(&mut by_queue, 3).await,
        expected.map(put).to_vec()
    );
    let expected = [&in_pq, &marker_pq];
    assert_eq!(
        next_events(&mut sibling, 2).await,
        expected.map(put).to_vec()
    );
    drop((by_string, sibling));
    let (key, rev) = (&in_p.key, in_p.create_revision);
    assert!(
        b.update_value(key, rev, b"again")
            .await
            .expect("update")
            .is_some()
    );
    let events = next_events(&mut by_queue, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            events[0].entry.key.as_str(),
            events[0].entry.value.as_slice()
        ),
        (key.as_str(), &b"again"[..])
    );
    revoke(&*b, &[l]).await;
}

/// A watch from a revision older than the store's compaction revision fails with
/// `Error::Compacted` (from the call, or as the stream's only item), naming the revision asked
/// for and the compaction revision; from the compaction revision itself the history is there, and
/// a watch that was running before the compaction goes on.
pub async fn compacted_history_is_its_own_error(h: &dyn Harness) {
    h.use_history(HistoryUse::Compacts).await;
    let b = backend(h).await;
    let l = lease(&*b).await;
    let first = join(&*b, &h.key("c"), l, "1").await;
    let mut running = watch(&*b, &h.key("c/"), Some(first.revision)).await;
    assert_eq!(next_events(&mut running, 1).await, vec![put(&first.entry)]);
    let second = join(&*b, &h.key("d"), l, "2").await;
    h.compact().await;

    let err = match b.watch(&h.key(""), Some(first.revision)).await {
        Err(err) => err,
        Ok(mut stream) => {
            let item = timeout(PATIENCE, stream.events.next())
                .await
                .expect("an answer in time")
                .expect("an error before the stream ends");
            let err = item.expect_err("no events from a compacted revision");
            let after = timeout(PATIENCE, stream.events.next()).await;
            assert!(
                matches!(after, Ok(None)),
                "the error ends the stream: {after:?}"
            );
            err
        }
    };
    let compacted_at = match err {
        Error::Compacted {
            requested,
            compact_revision,
        } => {
            assert_eq!(requested, first.revision);
            assert!(
                compact_revision >= second.revision,
                "compacted at {compact_revision}, after a write at {}",
                second.revision
            );
            compact_revision
        }
        other => panic!("expected Compacted, got {other:?}"),
    };

    let mut from_compaction = watch(&*b, &h.key(""), Some(compacted_at)).await;
    assert_eq!(from_compaction.start_revision, compacted_at);
    let third = join(&*b, &h.key("e"), l, "3").await;
    let events = events_until_put_of(&mut from_compaction, &third.entry.key).await;
    let mut expected = Vec::new();
    if compacted_at <= second.revision {
        expected.push(put(&second.entry));
    }
    expected.push(put(&third.entry));
    assert_eq!(events, expected);

    let (key, rev) = (&first.entry.key, first.entry.create_revision);
    assert!(
        b.update_value(key, rev, b"after")
            .await
            .expect("update")
            .is_some()
    );
    let events = next_events(&mut running, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].entry.value, b"after");
    revoke(&*b, &[l]).await;
}

// ---------------------------------------------------------------------------------------------
// Failures

/// A client that cannot reach the store gets `Error::Unavailable` (retryable) from every call
/// (`limits()`, which needs no I/O, still answers); once it can again, its calls go through.
pub async fn an_unreachable_store_fails_every_call_as_retryable(h: &dyn Harness) {
    let client = h.client().await;
    let b = client.backend.clone();
    let key = h.key("cut");
    let l = lease(&*b).await;
    let entry = join(&*b, &key, l, "v").await.entry;
    let limits = b.limits();
    client.faults.cut(Cut::Fail).await;
    assert_eq!(b.limits(), limits, "limits() needs no I/O");
    let rev = entry.create_revision;
    let results: Vec<(&str, Result<()>)> = vec![
        ("grant_lease", b.grant_lease(LEASE_TTL).await.map(drop)),
        ("keep_alive", b.keep_alive(l).await.map(drop)),
        ("revoke_lease", b.revoke_lease(l).await),
        ("join", b.join(&h.key("other"), l, b"v").await.map(drop)),
        (
            "position",
            b.position(&key, &entry.key, rev).await.map(drop),
        ),
        ("holder", b.holder(&key).await.map(drop)),
        ("entries", b.entries(&key).await.map(drop)),
        (
            "delete_entry",
            b.delete_entry(&entry.key, rev).await.map(drop),
        ),
        (
            "update_value",
            b.update_value(&entry.key, rev, b"w").await.map(drop),
        ),
        (
            "resume",
            b.resume(&key, &entry.key, rev, entry.mod_revision, b"w")
                .await
                .map(drop),
        ),
        ("watch", b.watch(&key, None).await.map(drop)),
    ];
    for (call, result) in results {
        match result {
            Err(err @ Error::Unavailable { .. }) => assert!(err.is_retryable(), "{call}: {err}"),
            other => panic!("{call} on an unreachable store answered {other:?}"),
        }
    }
    client.faults.heal().await;
    let read = retrying("entries once healed", || b.entries(&key)).await;
    assert_eq!(read.entries, vec![entry]);
    retrying("revoke once healed", || b.revoke_lease(l)).await;
}

/// A watch whose client loses the store either ends with a retryable error (and a watch from the
/// revision after the last one seen picks up exactly where it left off) or goes on by itself
/// once the store is back; either way, no change is missed and none is seen twice.
pub async fn a_broken_watch_ends_retryable_or_resumes_without_gap(h: &dyn Harness) {
    h.use_history(HistoryUse::Reads).await;
    let watcher = h.client().await;
    let x = backend(h).await;
    let prefix = h.key("b/");
    let l = lease(&*x).await;
    let one = join(&*x, &h.key("b/1"), l, "1").await.entry;
    let mut stream = watch(&*watcher.backend, &prefix, Some(one.create_revision)).await;
    let mut seen = next_events(&mut stream, 1).await;
    watcher.faults.cut(Cut::Fail).await;
    let two = join(&*x, &h.key("b/2"), l, "2").await.entry;
    assert!(
        x.update_value(&one.key, one.create_revision, b"1b")
            .await
            .expect("update")
            .is_some()
    );
    assert!(
        x.delete_entry(&two.key, two.create_revision)
            .await
            .expect("delete")
    );
    watcher.faults.heal().await;
    let last = join(&*x, &h.key("b/3"), l, "3").await.entry;
    let mut resumed = 0;
    while !seen.iter().any(|e| e.entry.key == last.key) {
        match timeout(PATIENCE, stream.events.next()).await {
            Err(_) => panic!("nothing within {PATIENCE:?} after the link healed; seen {seen:#?}"),
            Ok(Some(Ok(batch))) => seen.extend(batch),
            Ok(Some(Err(err))) => {
                assert!(err.is_retryable(), "a broken watch ended with {err:?}");
                let after = timeout(PATIENCE, stream.events.next()).await;
                assert!(
                    matches!(after, Ok(None)),
                    "the error ends the stream: {after:?}"
                );
                let from = seen
                    .last()
                    .map_or(one.create_revision, |e| e.entry.mod_revision + 1);
                let watcher = &watcher.backend;
                stream = retrying("watch again", || watcher.watch(&prefix, Some(from))).await;
                assert_eq!(stream.start_revision, from);
                resumed += 1;
                assert!(resumed < 10, "the watch kept breaking");
            }
            Ok(None) => panic!("the watch ended without an error; seen {seen:#?}"),
        }
    }
    assert_eq!(seen.len(), 5, "{seen:#?}");
    assert_eq!(seen[0], put(&one));
    assert_eq!(seen[1], put(&two));
    assert_eq!(seen[2].kind, EventKind::Put);
    assert_eq!(
        (seen[2].entry.key.as_str(), seen[2].entry.value.as_slice()),
        (one.key.as_str(), &b"1b"[..])
    );
    assert_delete(&seen[3], &two.key);
    assert_eq!(seen[4], put(&last));
    assert!(
        seen.windows(2)
            .all(|w| w[0].entry.mod_revision < w[1].entry.mod_revision),
        "{seen:#?}"
    );
    revoke(&*x, &[l]).await;
}
