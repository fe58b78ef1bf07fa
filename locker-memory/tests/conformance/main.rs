//! The conformance suite on the memory backend, on paused (virtual) time: every behaviour and
//! backend-contract clause of `locker_tests`, and lock behaviours that need a store whose watch
//! alone fails, or a runtime that goes away.

mod harness;

use harness::MemoryHarness;

async fn harness(name: &str) -> MemoryHarness {
    MemoryHarness::new(name)
}

locker_tests::conformance_suite!(
    #[tokio::test(start_paused = true)]
    harness
);

/// Lock behaviours that need a store whose watch alone fails, and a runtime that goes away.
mod edges {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use futures::StreamExt;
    use locker_core::backend::{
        Entry, Joined, Lease, LeaseId, Limits, Position, Resumption, Revision, Snapshot,
        WatchStream,
    };
    use locker_core::{
        Error, FailureKind, LockBackend, LockGuard, Locker, LossReason, Ownership, Result, Watcher,
    };
    use locker_memory::MemoryBackend;
    use tokio::sync::Notify;

    /// A memory client whose watches can be broken, and refused while `refuse` is set (as a
    /// store does after a permission is revoked); whose joins, while `lose_joins` is set, go
    /// through but are never answered; and whose next `fail_entries` reads of a queue fail.
    #[derive(Debug, Default)]
    struct WatchGate {
        inner: MemoryBackend,
        refuse: Arc<AtomicBool>,
        cut: Arc<Notify>,
        lose_joins: Arc<AtomicBool>,
        fail_entries: Arc<AtomicU64>,
        /// Joins are refused, as a store refuses a user the lock's keys.
        deny_joins: Arc<AtomicBool>,
    }

    #[async_trait]
    impl Watcher for WatchGate {
        async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(Error::PermissionDenied {
                    message: "watch refused (test)".into(),
                    source: None,
                });
            }
            let stream = self.inner.watch(prefix, from).await?;
            let cut = self.cut.clone().notified_owned();
            let broken = futures::stream::once(async { Err(Error::unavailable("cut (test)")) });
            Ok(WatchStream {
                start_revision: stream.start_revision,
                events: stream.events.take_until(cut).chain(broken).boxed(),
            })
        }
    }

    #[async_trait]
    impl LockBackend for WatchGate {
        fn limits(&self) -> Limits {
            self.inner.limits()
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
            self.inner.revoke_lease(lease).await
        }
        async fn join(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
            if self.deny_joins.load(Ordering::SeqCst) {
                return Err(Error::PermissionDenied {
                    message: "no write permission on the lock's keys (test)".into(),
                    source: None,
                });
            }
            let joined = self.inner.join(key, lease, value).await?;
            if self.lose_joins.load(Ordering::SeqCst) {
                // Applied, but the answer never comes back (a connection lost mid-call).
                std::future::pending::<()>().await;
            }
            Ok(joined)
        }
        async fn position(&self, key: &str, entry: &str, rev: Revision) -> Result<Position> {
            self.inner.position(key, entry, rev).await
        }
        async fn holder(&self, key: &str) -> Result<(Option<Entry>, Revision)> {
            self.inner.holder(key).await
        }
        async fn entries(&self, key: &str) -> Result<Snapshot> {
            let failing = self
                .fail_entries
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(Error::unavailable("queue read failed (test)"));
            }
            self.inner.entries(key).await
        }
        async fn delete_entry(&self, entry: &str, rev: Revision) -> Result<bool> {
            self.inner.delete_entry(entry, rev).await
        }
        async fn update_value(
            &self,
            entry: &str,
            rev: Revision,
            value: &[u8],
        ) -> Result<Option<Revision>> {
            self.inner.update_value(entry, rev, value).await
        }
        async fn resume(
            &self,
            key: &str,
            entry: &str,
            rev: Revision,
            mod_rev: Revision,
            value: &[u8],
        ) -> Result<Resumption> {
            self.inner.resume(key, entry, rev, mod_rev, value).await
        }
    }

    /// A guard on `k` from a locker whose watch is then broken, and refused while the flag is
    /// set; with the store and the flag.
    async fn watch_refused_after_owning() -> (MemoryBackend, LockGuard, Arc<AtomicBool>) {
        let store = MemoryBackend::new();
        let (refuse, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
        let locker = Locker::new(WatchGate {
            inner: store.new_client(),
            refuse: refuse.clone(),
            cut: cut.clone(),
            ..WatchGate::default()
        });
        let guard = locker.acquire("k", "a").await.expect("acquire");
        refuse.store(true, Ordering::SeqCst);
        cut.notify_waiters();
        (store, guard, refuse)
    }

    /// An `acquire` dropped while its join had gone through unanswered leaves no entry behind,
    /// even when the first looks for that entry fail: otherwise the entry would block the key for
    /// as long as the locker's session lives.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_acquire_whose_join_went_unanswered_leaves_no_entry() {
        let store = MemoryBackend::new();
        let gate = WatchGate {
            inner: store.new_client(),
            ..WatchGate::default()
        };
        let (lose, fail) = (gate.lose_joins.clone(), gate.fail_entries.clone());
        let locker = Locker::new(gate);
        lose.store(true, Ordering::SeqCst);
        fail.store(2, Ordering::SeqCst);
        let dropped = tokio::time::timeout(Duration::from_secs(1), locker.acquire("k", "a")).await;
        assert!(dropped.is_err(), "the join was never answered");
        let entries = |store: &MemoryBackend| {
            store
                .keys()
                .into_iter()
                .filter(|e| e.key.starts_with("k/"))
                .count()
        };
        assert_eq!(entries(&store), 1, "the join went through");
        lose.store(false, Ordering::SeqCst);
        // The locker and its session live on: the entry must go all the same.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            fail.load(Ordering::SeqCst),
            0,
            "the failed reads were retried"
        );
        assert_eq!(entries(&store), 0, "the entry was left: {:?}", store.keys());
        let other = Locker::new(store.new_client());
        let guard = tokio::time::timeout(Duration::from_secs(1), other.acquire("k", "b"))
            .await
            .expect("the key is free")
            .expect("acquire");
        guard.release().await.expect("release");
        drop(locker);
    }

    /// An operator deletes the entry of the holder of `k`.
    fn delete_holder_entry(store: &MemoryBackend) {
        let entry = store
            .keys()
            .into_iter()
            .find(|e| e.key.starts_with("k/"))
            .expect("the holder's entry");
        assert!(store.delete_key(&entry.key));
    }

    /// While the locker cannot watch (its watch broken, a new one refused), a `set_value` that
    /// finds the entry deleted ends ownership: the guard never claims a lock someone else owns.
    #[tokio::test(start_paused = true)]
    async fn an_entry_found_gone_while_unwatched_ends_ownership() {
        let (store, guard, refuse) = watch_refused_after_owning().await;
        let b = Locker::new(store.new_client());
        tokio::time::sleep(Duration::from_millis(200)).await;
        delete_holder_entry(&store);
        let err = tokio::time::timeout(Duration::from_secs(5), guard.set_value("a2"))
            .await
            .expect("set_value answers")
            .expect_err("the entry is gone");
        assert!(matches!(err, Error::NotOwned { .. }), "{err:?}");
        refuse.store(false, Ordering::SeqCst);
        let other = tokio::time::timeout(Duration::from_secs(10), b.acquire("k", "b"))
            .await
            .expect("b acquires in time")
            .expect("acquire");
        assert!(other.is_owned());
        assert!(
            !guard.is_owned(),
            "two owners: a still says {:?} with its entry deleted",
            guard.ownership()
        );
        other.release().await.expect("release");
    }

    /// The watch refused for a while and then allowed again: a holder watches again, and
    /// notices a later delete of its entry.
    #[tokio::test(start_paused = true)]
    async fn a_holder_watches_again_after_its_watch_was_refused() {
        let (store, guard, refuse) = watch_refused_after_owning().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        refuse.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(guard.is_owned(), "nothing happened to the entry");
        delete_holder_entry(&store);
        let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .expect("the delete is seen");
        assert_eq!(reason, locker_core::LossReason::EntryDeleted);
    }

    /// A lock task that goes away with its runtime does not leave readers waiting.
    #[test]
    fn waiters_end_when_the_lock_task_is_gone() {
        let store = MemoryBackend::new();
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (locker, guard) = first.block_on(async {
            let locker = Locker::new(store.new_client());
            let guard = locker.acquire("k", "a").await.expect("acquire");
            tokio::task::yield_now().await;
            (locker, guard)
        });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        second.block_on(async {
            let lost = tokio::time::timeout(Duration::from_secs(2), guard.lost()).await;
            assert!(lost.is_ok(), "lost() waits for a task that is gone");
            let set = tokio::time::timeout(Duration::from_secs(2), guard.set_value("x")).await;
            assert!(
                matches!(set, Ok(Err(Error::Closed { .. }))),
                "set_value answered {set:?}"
            );
        });
        drop((guard, locker));
    }

    /// A runtime that goes away right after an `acquire` (its lock task never ran) shuts down:
    /// dropping the lock's last state does not wait for the hub it is being removed from.
    #[test]
    fn a_runtime_dropped_right_after_an_acquire_shuts_down() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let store = MemoryBackend::new();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let locker = Locker::new(store.new_client());
                let guard = locker.acquire("k", "a").await.expect("acquire");
                drop((guard, locker));
            });
            drop(runtime);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "dropping the runtime hangs"
        );
    }

    /// A handle that meets a permanent store error (its joins refused) stops, says why in its
    /// published state, and `wait_owned` answers the error; it does not retry forever.
    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_reaches_wait_owned() {
        let store = MemoryBackend::new();
        let gate = WatchGate {
            inner: store.new_client(),
            ..WatchGate::default()
        };
        gate.deny_joins.store(true, Ordering::SeqCst);
        let locker = Locker::new(gate);
        let handle = locker.lock("k", "a").await.expect("lock");
        let err = tokio::time::timeout(Duration::from_secs(30), handle.wait_owned())
            .await
            .expect("wait_owned answers")
            .expect_err("the joins are refused");
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
        assert_eq!(
            handle.ownership(),
            Ownership::Failed {
                kind: FailureKind::PermissionDenied
            }
        );
        let guard = locker.acquire("k2", "a").await;
        assert!(
            matches!(guard, Err(Error::PermissionDenied { .. })),
            "{guard:?}"
        );
        assert!(store.keys().is_empty(), "{:?}", store.keys());
    }

    /// `ownership()` never claims a tenure past its local deadline, even before the lock's task
    /// has heard of it: here the runtime's one thread is blocked past the deadline (no
    /// keep-alive, no timer ran), and the published state still says `Owned`.
    #[tokio::test(flavor = "current_thread")]
    async fn ownership_after_the_deadline_does_not_claim_it() {
        let store = MemoryBackend::new();
        let locker = Locker::builder(store.new_client())
            .ttl(Duration::from_secs(2))
            .build()
            .expect("locker");
        let guard = locker.acquire("k", "a").await.expect("acquire");
        let published = guard.subscribe();
        assert!(guard.is_owned());
        // Past the deadline (last keep-alive sent + 2 s - the 200 ms margin), without yielding.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(
            *published.borrow(),
            Ownership::Owned {
                token: guard.token()
            },
            "the lock's task ran meanwhile: this test proves nothing"
        );
        assert_eq!(
            guard.ownership(),
            Ownership::Lost {
                token: guard.token(),
                reason: LossReason::DeadlinePassed
            }
        );
        assert!(!guard.is_owned());
        let released = guard.release().await;
        assert!(
            matches!(released, Err(Error::NotOwned { .. })),
            "{released:?}"
        );
    }
}
