//! The shared store: keys, leases, revisions, history and watch registrations, behind one
//! `std::sync::Mutex` that is never held across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use locker_core::Error;
use locker_core::Result;
use locker_core::backend::{
    Entry, EventKind, Joined, Lease, LeaseId, Limits, Position, Resumption, Revision, Snapshot,
    WatchEvent, is_entry_of,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

/// How far away "never" is for a deadline that would overflow `Instant` (what tokio itself uses).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// One stored key.
#[derive(Debug, Clone)]
struct KeyValue {
    value: Vec<u8>,
    lease: LeaseId,
    create_revision: Revision,
    mod_revision: Revision,
}

impl KeyValue {
    fn to_entry(&self, key: &str) -> Entry {
        Entry {
            key: key.to_owned(),
            value: self.value.clone(),
            lease: self.lease,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

/// One live lease.
#[derive(Debug)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// A live watch: where its batches go.
#[derive(Debug)]
struct Registration {
    prefix: String,
    min_revision: Revision,
    tx: mpsc::UnboundedSender<Vec<WatchEvent>>,
}

impl Registration {
    /// Sends the part of a batch this watch wants; `false` if the stream is gone.
    fn offer(&self, revision: Revision, events: &[WatchEvent]) -> bool {
        if revision < self.min_revision {
            return true;
        }
        let batch: Vec<WatchEvent> = events
            .iter()
            .filter(|event| event.entry.key.starts_with(&self.prefix))
            .cloned()
            .collect();
        batch.is_empty() || self.tx.send(batch).is_ok()
    }
}

/// The store shared by every client (every [`MemoryBackend`](crate::MemoryBackend)) on it.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) limits: Limits,
    state: Mutex<State>,
    /// Wakes the expiry task: a new (possibly earlier) deadline, or the store going away.
    wake: Arc<Notify>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // The expiry task holds only a `Weak`; this wakes it so that it sees the store is gone.
        self.wake.notify_one();
    }
}

impl Store {
    pub(crate) fn new(limits: Limits) -> Arc<Store> {
        Arc::new(Store {
            limits,
            state: Mutex::new(State::new()),
            wake: Arc::new(Notify::new()),
        })
    }

    /// The state, with every lease whose deadline has passed expired first, so that every
    /// operation sees the store as of `Instant::now()` whatever the expiry task's scheduling.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        let mut state = self.raw_state();
        state.expire_due(Instant::now());
        state
    }

    fn raw_state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Grants a lease and makes sure the expiry task runs.
    pub(crate) fn grant(self: &Arc<Self>, ttl: Duration) -> Result<Lease> {
        let mut state = self.state();
        let lease = state.grant(ttl, &self.limits, Instant::now())?;
        self.ensure_expiry_task(&mut state);
        drop(state);
        self.wake.notify_one();
        Ok(lease)
    }

    /// Spawns the store's expiry task if none is running (lazily: the store may be built outside
    /// a runtime; and again if the runtime that ran it has gone).
    fn ensure_expiry_task(self: &Arc<Self>, state: &mut State) {
        if state
            .expiry_task
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                debug!("memory store: starting the lease expiry task");
                let task = expiry_loop(Arc::downgrade(self), Arc::clone(&self.wake));
                state.expiry_task = Some(runtime.spawn(task));
            }
            Err(_) => warn!(
                "memory store: no tokio runtime; leases expire only when the store is next used"
            ),
        }
    }

    /// Unregisters a watch (its stream was dropped).
    pub(crate) fn unregister(&self, id: u64) {
        if self.raw_state().watchers.remove(&id).is_some() {
            trace!(watch = id, "memory store: watch dropped");
        }
    }
}

/// Expires leases on tokio time: sleeps until the earliest deadline (or until woken by a new
/// lease), never on a fixed interval; ends when the store is dropped.
async fn expiry_loop(store: Weak<Store>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(store) = store.upgrade() else {
                break;
            };
            // Edition 2024: the guard is dropped before `store`, which may be the last handle.
            store.state().next_deadline()
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(deadline) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
    debug!("memory store: dropped; the lease expiry task ends");
}

/// Everything behind the store's lock.
#[derive(Debug)]
pub(crate) struct State {
    revision: Revision,
    compact_revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, LeaseState>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    expired_at: HashMap<LeaseId, Instant>,
    /// One batch per revision, every revision `>= compact_revision` that changed a key.
    history: VecDeque<(Revision, Vec<WatchEvent>)>,
    watchers: BTreeMap<u64, Registration>,
    next_watcher: u64,
    lease_sequence: u64,
    next_client: u64,
    expiry_task: Option<JoinHandle<()>>,
}

/// A bijection on 63-bit integers (odd multipliers and right xor-shifts), so that lease ids look
/// random, are positive and never repeat, and are the same on every run.
fn mix63(sequence: u64) -> u64 {
    const MASK: u64 = (1 << 63) - 1;
    let mut x = sequence & MASK;
    x ^= x >> 31;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & MASK;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9) & MASK;
    x ^= x >> 32;
    x
}

impl State {
    fn new() -> State {
        State {
            // etcd starts at revision 1 with an empty store; the first write makes revision 2.
            revision: 1,
            compact_revision: 0,
            kvs: BTreeMap::new(),
            leases: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            expired_at: HashMap::new(),
            history: VecDeque::new(),
            watchers: BTreeMap::new(),
            next_watcher: 0,
            lease_sequence: 0,
            next_client: 0,
            expiry_task: None,
        }
    }

    pub(crate) fn next_client_id(&mut self) -> u64 {
        self.next_client += 1;
        self.next_client
    }

    pub(crate) fn revision(&self) -> Revision {
        self.revision
    }

    pub(crate) fn compact_revision(&self) -> Revision {
        self.compact_revision
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Expires every lease whose deadline is at or before `now`, earliest first.
    fn expire_due(&mut self, now: Instant) {
        while let Some(&(deadline, lease)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            debug!(
                lease = format_args!("{lease:x}"),
                "memory store: lease TTL ran out"
            );
            self.expire(lease, deadline);
        }
    }

    /// Ends a lease as its TTL running out would, recording when.
    pub(crate) fn expire(&mut self, lease: LeaseId, at: Instant) -> bool {
        if self.end_lease(lease) {
            self.expired_at.insert(lease, at);
            true
        } else {
            false
        }
    }

    /// Removes a lease and deletes its keys at one revision (none if it had no keys).
    fn end_lease(&mut self, lease: LeaseId) -> bool {
        let Some(state) = self.leases.remove(&lease) else {
            return false;
        };
        self.deadlines.remove(&(state.deadline, lease));
        // Sorted, as etcd's lessor sorts a lease's keys before deleting them.
        let keys: Vec<String> = state.keys.into_iter().collect();
        self.delete_keys(keys);
        true
    }

    fn next_lease_id(&mut self) -> LeaseId {
        loop {
            self.lease_sequence += 1;
            let id = mix63(self.lease_sequence) as LeaseId;
            if id > 0 && !self.leases.contains_key(&id) && !self.expired_at.contains_key(&id) {
                return id;
            }
        }
    }

    fn grant(&mut self, ttl: Duration, limits: &Limits, now: Instant) -> Result<Lease> {
        let whole_secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        let granted = Duration::from_secs(whole_secs).max(limits.min_ttl);
        if granted > limits.max_ttl {
            return Err(Error::TtlOutOfRange {
                ttl,
                min: limits.min_ttl,
                max: limits.max_ttl,
            });
        }
        let id = self.next_lease_id();
        let deadline = deadline_after(now, granted);
        self.leases.insert(
            id,
            LeaseState {
                ttl: granted,
                deadline,
                keys: BTreeSet::new(),
            },
        );
        self.deadlines.insert((deadline, id));
        debug!(lease = format_args!("{id:x}"), ?granted, asked = ?ttl, "memory store: lease granted");
        Ok(Lease { id, ttl: granted })
    }

    pub(crate) fn keep_alive(&mut self, lease: LeaseId, now: Instant) -> Option<Duration> {
        let state = self.leases.get_mut(&lease)?;
        self.deadlines.remove(&(state.deadline, lease));
        state.deadline = deadline_after(now, state.ttl);
        self.deadlines.insert((state.deadline, lease));
        trace!(
            lease = format_args!("{lease:x}"),
            "memory store: lease kept alive"
        );
        Some(state.ttl)
    }

    pub(crate) fn revoke(&mut self, lease: LeaseId) {
        if self.end_lease(lease) {
            debug!(
                lease = format_args!("{lease:x}"),
                "memory store: lease revoked"
            );
        }
    }

    /// The entries of the queue of `key`: keys exactly one segment below it.
    fn queue<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (&'a String, &'a KeyValue)> + 'a {
        let prefix = format!("{key}/");
        self.kvs
            .range(prefix.clone()..)
            .take_while(move |(name, _)| name.starts_with(&prefix))
            .filter(move |(name, _)| is_entry_of(name, key))
    }

    fn oldest(&self, key: &str) -> Option<Entry> {
        self.queue(key)
            .min_by_key(|(name, kv)| (kv.create_revision, *name))
            .map(|(name, kv)| kv.to_entry(name))
    }

    /// The newest entry of the queue of `key` created before `create_revision`.
    fn newest_before(&self, key: &str, create_revision: Revision) -> Option<Entry> {
        self.queue(key)
            .filter(|(_, kv)| kv.create_revision < create_revision)
            .max_by_key(|(name, kv)| (kv.create_revision, *name))
            .map(|(name, kv)| kv.to_entry(name))
    }

    pub(crate) fn join(&mut self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
        let Some(lease_state) = self.leases.get_mut(&lease) else {
            return Err(Error::LeaseLost { lease });
        };
        let name = locker_core::backend::entry_key(key, lease);
        if !self.kvs.contains_key(&name) {
            lease_state.keys.insert(name.clone());
            let revision = self.revision + 1;
            let kv = KeyValue {
                value: value.to_vec(),
                lease,
                create_revision: revision,
                mod_revision: revision,
            };
            let event = WatchEvent {
                kind: EventKind::Put,
                entry: kv.to_entry(&name),
            };
            self.kvs.insert(name.clone(), kv);
            self.commit(vec![event]);
            trace!(entry = %name, revision, "memory store: joined");
        }
        let entry = self
            .kvs
            .get(&name)
            .map(|kv| kv.to_entry(&name))
            .ok_or_else(|| Error::Backend {
                message: format!("memory store: entry {name} vanished during join"),
                retryable: false,
                source: None,
            })?;
        let predecessor = self.newest_before(key, entry.create_revision);
        Ok(Joined {
            entry,
            predecessor,
            revision: self.revision,
        })
    }

    pub(crate) fn position(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Position {
        let own = self
            .kvs
            .get(entry_key)
            .filter(|kv| kv.create_revision == create_revision)
            .map(|kv| kv.to_entry(entry_key));
        let predecessor = self.newest_before(key, create_revision);
        Position {
            own,
            predecessor,
            revision: self.revision,
        }
    }

    pub(crate) fn holder(&self, key: &str) -> (Option<Entry>, Revision) {
        (self.oldest(key), self.revision)
    }

    pub(crate) fn entries(&self, key: &str) -> Snapshot {
        let mut entries: Vec<Entry> = self
            .queue(key)
            .map(|(name, kv)| kv.to_entry(name))
            .collect();
        entries.sort_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
        Snapshot {
            entries,
            revision: self.revision,
        }
    }

    pub(crate) fn delete_entry(&mut self, entry_key: &str, create_revision: Revision) -> bool {
        let matches = self
            .kvs
            .get(entry_key)
            .is_some_and(|kv| kv.create_revision == create_revision);
        if matches {
            self.delete_keys(vec![entry_key.to_owned()]);
        }
        matches
    }

    pub(crate) fn update_value(
        &mut self,
        entry_key: &str,
        create_revision: Revision,
        value: &[u8],
    ) -> Result<Option<Revision>> {
        let revision = self.revision + 1;
        let Some(kv) = self
            .kvs
            .get_mut(entry_key)
            .filter(|kv| kv.create_revision == create_revision)
        else {
            return Ok(None);
        };
        if kv.lease != 0 && !self.leases.contains_key(&kv.lease) {
            return Err(Error::LeaseLost { lease: kv.lease });
        }
        kv.value = value.to_vec();
        kv.mod_revision = revision;
        let event = WatchEvent {
            kind: EventKind::Put,
            entry: kv.to_entry(entry_key),
        };
        self.commit(vec![event]);
        trace!(entry = %entry_key, revision, "memory store: value updated");
        Ok(Some(revision))
    }

    /// Takes up an entry again if it is still the one exported (see [`LockBackend::resume`]).
    pub(crate) fn resume(
        &mut self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
        mod_revision: Revision,
        value: &[u8],
    ) -> Result<Resumption> {
        let now = self
            .kvs
            .get(entry_key)
            .filter(|kv| kv.create_revision == create_revision)
            .map(|kv| kv.to_entry(entry_key));
        match now {
            Some(entry) if entry.mod_revision == mod_revision => {
                let revision = self
                    .update_value(entry_key, create_revision, value)?
                    .unwrap_or(self.revision);
                let entry = self
                    .kvs
                    .get(entry_key)
                    .map(|kv| kv.to_entry(entry_key))
                    .unwrap_or(entry);
                let predecessor = self.newest_before(key, create_revision);
                Ok(Resumption::Resumed(Joined {
                    entry,
                    predecessor,
                    revision,
                }))
            }
            now => Ok(Resumption::Refused(now)),
        }
    }

    /// Deletes existing keys at one new revision; no revision if none of them exists.
    pub(crate) fn delete_keys(&mut self, keys: Vec<String>) -> Option<Revision> {
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for key in keys {
            let Some(kv) = self.kvs.remove(&key) else {
                continue;
            };
            if let Some(lease) = self.leases.get_mut(&kv.lease) {
                lease.keys.remove(&key);
            }
            events.push(WatchEvent {
                kind: EventKind::Delete,
                entry: Entry {
                    key,
                    value: Vec::new(),
                    lease: 0,
                    create_revision: 0,
                    mod_revision: revision,
                },
            });
        }
        if events.is_empty() {
            return None;
        }
        trace!(
            revision,
            deleted = events.len(),
            "memory store: keys deleted"
        );
        self.commit(events);
        Some(revision)
    }

    /// Makes the next revision with these events: history, then every live watch.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        self.revision += 1;
        let revision = self.revision;
        self.watchers.retain(|id, watch| {
            let alive = watch.offer(revision, &events);
            if !alive {
                trace!(watch = id, "memory store: pruned a dropped watch");
            }
            alive
        });
        self.history.push_back((revision, events));
    }

    /// Registers a watch after replaying its history into `tx`, under the one lock: no gap.
    /// Answers the start revision and the registration id.
    pub(crate) fn watch(
        &mut self,
        prefix: &str,
        from: Option<Revision>,
        tx: mpsc::UnboundedSender<Vec<WatchEvent>>,
    ) -> Result<(Revision, u64)> {
        let start = match from {
            Some(revision) if revision > 0 => revision,
            // etcd treats a start revision of 0 as "from now on".
            _ => self.revision + 1,
        };
        if start < self.compact_revision {
            return Err(Error::Compacted {
                requested: start,
                compact_revision: self.compact_revision,
            });
        }
        let registration = Registration {
            prefix: prefix.to_owned(),
            min_revision: start,
            tx,
        };
        let first = self
            .history
            .partition_point(|(revision, _)| *revision < start);
        for (revision, events) in self.history.range(first..) {
            registration.offer(*revision, events);
        }
        self.next_watcher += 1;
        let id = self.next_watcher;
        self.watchers.insert(id, registration);
        trace!(watch = id, prefix, start, "memory store: watch registered");
        Ok((start, id))
    }

    pub(crate) fn compact(&mut self, revision: Revision) -> Result<()> {
        if revision > self.revision {
            return Err(Error::Backend {
                message: format!(
                    "cannot compact to revision {revision}: it is a future revision (current {})",
                    self.revision
                ),
                retryable: false,
                source: None,
            });
        }
        if revision <= self.compact_revision {
            return Err(Error::Compacted {
                requested: revision,
                compact_revision: self.compact_revision,
            });
        }
        self.compact_revision = revision;
        let keep_from = self
            .history
            .partition_point(|(history_revision, _)| *history_revision < revision);
        self.history.drain(..keep_from);
        // Give back the room of the history compacted away (a long run would otherwise keep the
        // peak for good).
        if self.history.capacity() > 4 * self.history.len().max(16) {
            self.history.shrink_to_fit();
        }
        debug!(revision, "memory store: compacted");
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn watch_count(&self) -> usize {
        self.watchers.len()
    }

    pub(crate) fn keys(&self) -> Vec<Entry> {
        self.kvs
            .iter()
            .map(|(name, kv)| kv.to_entry(name))
            .collect()
    }

    pub(crate) fn leases(&self) -> Vec<LeaseId> {
        self.leases.keys().copied().collect()
    }

    pub(crate) fn lease_expired_at(&self, lease: LeaseId) -> Option<Instant> {
        self.expired_at.get(&lease).copied()
    }
}

fn deadline_after(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl).unwrap_or_else(|| now + FAR_FUTURE)
}
