//! Watches per locker, with every wait and watch stream multiplexed over them.
//!
//! Opening a fresh watch at a past revision for each wait is what makes etcd's own Go `Mutex` slow
//! under contention (etcd serves such watches from a catch-up loop every 100 ms). The hub opens a
//! queue's watch from the store's current revision when the queue gets its first subscriber,
//! *before* that subscriber reads the queue, so the store serves it from its synced set and
//! nothing after the read is missed. It resumes a broken watch from the revision after the last
//! one it delivered, and hands each event to the subscribers of the event's queue. Two feeds:
//!
//! - [`Feed::Deletes`], for locks: a lock moves on deletes only (its predecessor's, its own), so
//!   its watches leave the puts out ([`Watcher::watch_deletes`](crate::backend::Watcher)).
//! - [`Feed::All`], for watch streams, which follow values too; while it serves any queue it
//!   probes the store (see [`probe`]).
//!
//! Each queue has a watch of its own (a range of the one gRPC stream, on etcd), so a client's
//! watch traffic follows the keys it uses, not every lock under the root: a fleet of services
//! on one etcd does not send each of them every other service's changes. A queue left by its
//! last subscriber keeps its watch for a while ([`IDLE_WATCHES`]), for the next use of the key.
//! A client that uses many keys at once (past [`LockerBuilder::key_watches`](crate::LockerBuilder::key_watches), 128 by default) is
//! served by one watch over the whole root instead, as many watchers would cost the store more
//! than one stream; it takes watches per queue again at a quarter of that. The watch taking over starts at or
//! before the revisions the other had delivered, and each queue drops the events it had
//! already: a switch loses nothing and delivers nothing twice.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{AbortHandle, Abortable, BoxStream, FuturesUnordered, SelectAll};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

use crate::backend::{LockBackend, Revision, WatchEvent, WatchStream, queue_of};
use crate::error::{Error, Result};
use crate::retry::{Backoff, Jitter};

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub(crate) enum HubMsg {
    /// A change to an entry of the subscribed queue.
    Event(WatchEvent),
    /// History was lost (compaction): re-read the queue; events after that read follow.
    Resync,
}

/// Where the hub delivers a queue's messages: a watch stream's [`Mailbox`], or a lock's own
/// state (one allocation per lock).
pub(crate) trait Sink: Send + Sync {
    /// Takes one message; must not block (the hub never waits for a reader).
    fn deliver(&self, msg: HubMsg);
    /// No more messages will come: the hub is gone or its watch failed for good.
    fn close(&self);
}

/// How many messages a [`Mailbox`] keeps for a reader that does not read. Past it, they are
/// dropped for one [`HubMsg::Resync`], as after a compaction: the reader re-reads the queue.
pub(crate) const MAILBOX_MESSAGES: usize = 1024;

/// How many bytes of keys and values a [`Mailbox`] keeps, at most, before it collapses the same
/// way.
pub(crate) const MAILBOX_BYTES: usize = 1 << 20;

/// One subscriber's queue of messages (a watch stream's). The hub never waits for a reader, and
/// a reader that does not read costs bounded memory:
///
/// - a [`HubMsg::Resync`] replaces everything before it (the re-read it asks for covers all of
///   it);
/// - while a `Resync` waits to be taken, events are dropped: the reader re-reads after taking it,
///   at a revision at least that of every event the hub has seen by then;
/// - past [`MAILBOX_MESSAGES`] messages or [`MAILBOX_BYTES`] bytes (one event alone may be
///   larger), the queue collapses into one `Resync`.
///
/// So a stream nobody polls holds at most the bound, and after a collapse one message, however
/// much changes; when it is polled again it re-reads and yields the state as it is then.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    queue: Mutex<Queued>,
    ready: Notify,
    closed: AtomicBool,
}

/// The messages of a [`Mailbox`], and the bytes of keys and values they hold.
#[derive(Debug, Default)]
struct Queued {
    messages: VecDeque<HubMsg>,
    bytes: usize,
}

impl Queued {
    /// Drops every message for one `Resync`.
    fn collapse(&mut self) {
        self.messages = VecDeque::from([HubMsg::Resync]);
        self.bytes = 0;
    }
}

/// The bytes of keys and values a message holds.
fn message_bytes(msg: &HubMsg) -> usize {
    match msg {
        HubMsg::Event(event) => event.entry.key.len() + event.entry.value.len(),
        HubMsg::Resync => 0,
    }
}

impl Sink for Mailbox {
    fn deliver(&self, msg: HubMsg) {
        {
            let mut queued = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            match msg {
                HubMsg::Resync => queued.collapse(),
                // A re-read is due, and covers this event.
                HubMsg::Event(_) if matches!(queued.messages.front(), Some(HubMsg::Resync)) => {
                    return;
                }
                // One event over the byte bound alone is kept: a reader that keeps up with large
                // values is not made to re-read at every change.
                HubMsg::Event(_)
                    if queued.messages.len() >= MAILBOX_MESSAGES
                        || (!queued.messages.is_empty()
                            && queued.bytes + message_bytes(&msg) > MAILBOX_BYTES) =>
                {
                    queued.collapse();
                }
                event => {
                    queued.bytes += message_bytes(&event);
                    queued.messages.push_back(event);
                }
            }
        }
        self.ready.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

impl Mailbox {
    async fn recv(&self) -> Option<HubMsg> {
        loop {
            // A notification between this check and the wait is kept as a permit by Notify.
            let next = {
                let mut queued = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let next = queued.messages.pop_front();
                if let Some(msg) = &next {
                    queued.bytes -= message_bytes(msg);
                }
                next
            };
            if next.is_some() {
                return next;
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            self.ready.notified().await;
        }
    }
}

/// How many queues with subscribers a feed watches one by one by default, each on a watch of its
/// own (see [`LockerBuilder::key_watches`](crate::LockerBuilder::key_watches)).
pub(crate) const KEY_WATCHES: usize = 128;

/// How many queues left by their last subscriber keep their own watch, for a next use of the
/// key: a lock taken again and again opens its watch once.
pub(crate) const IDLE_WATCHES: usize = 16;

/// One watch of a feed: a queue's own, or the shared one over the whole root.
#[derive(Debug)]
struct WatchState {
    /// Which attempt is current: answers and events of older ones are ignored.
    attempt: u64,
    /// Established at least once: every change after a read issued now is delivered (a broken
    /// watch resumes from the revision after the last one delivered).
    ready: bool,
    /// Broken, and being opened again.
    broken: bool,
    /// History was lost: the subscribers re-read once it is open again.
    resync: bool,
    backoff: Backoff,
    /// Ends the stream, and with it the watch on the store.
    abort: Option<AbortHandle>,
}

impl WatchState {
    fn new(attempt: u64, jitter: &Jitter, retry: (Duration, Duration)) -> Self {
        WatchState {
            attempt,
            ready: false,
            broken: false,
            resync: false,
            backoff: jitter.new_backoff(retry.0, retry.1),
            abort: None,
        }
    }

    /// Stops the stream (if open); its watch on the store is cancelled.
    fn stop(&mut self) {
        if let Some(abort) = self.abort.take() {
            abort.abort();
        }
    }
}

impl Drop for WatchState {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One queue of a feed.
struct Queue {
    subscribers: Vec<(u64, Arc<dyn Sink>)>,
    /// The next revision to deliver: every event below it was delivered, or came before every
    /// subscriber. Events are taken from one watch at a time, and this drops those a watch
    /// replays after another served them.
    next: Revision,
    /// The queue's own watch; `None` while the shared watch serves it. A ready own watch serves
    /// the queue; until it is ready, the shared watch does.
    own: Option<Box<WatchState>>,
    /// The store refused the queue's watch for good: its error.
    failed: Option<Box<Error>>,
    /// Set while the queue has no subscriber and keeps its own watch for a next use: its place
    /// in the idle order.
    idle: Option<u64>,
}

impl Queue {
    /// Whether the queue's own watch serves it (and not the shared one).
    fn served_by_own(&self) -> bool {
        self.own.as_ref().is_some_and(|own| own.ready)
    }

    /// Whether the queue needs the shared watch: nothing else serves it.
    fn needs_shared(&self) -> bool {
        self.failed.is_none() && !self.served_by_own()
    }

    fn deliver(&mut self, event: &WatchEvent) {
        let revision = event.entry.mod_revision;
        if revision < self.next {
            return;
        }
        self.next = revision + 1;
        for (_, sink) in &self.subscribers {
            sink.deliver(HubMsg::Event(event.clone()));
        }
    }

    fn resync(&self) {
        for (_, sink) in &self.subscribers {
            sink.deliver(HubMsg::Resync);
        }
    }
}

/// A feed's queues and watches, shared by its subscribers and its task.
struct State {
    queues: BTreeMap<Arc<str>, Queue>,
    /// How many queues have subscribers.
    active: usize,
    /// How many queues with subscribers have watches of their own, at most.
    up_to: usize,
    /// Whether the shared watch serves new queues (past `up_to`, until a quarter of it).
    shared_mode: bool,
    /// The watch over the whole root, while it is wanted.
    shared: Option<WatchState>,
    /// The revision after the last event the shared watch delivered.
    shared_next: Revision,
    /// Idle queues in the order they went idle (entries whose queue was taken again are
    /// skipped), and how many are idle.
    idle: VecDeque<(Arc<str>, u64)>,
    idle_count: usize,
    /// Subscriber ids, watch generations and idle places.
    counter: u64,
    /// The feed's task and how to reach it.
    task: Option<(tokio::task::AbortHandle, mpsc::UnboundedSender<Cmd>)>,
}

impl State {
    fn new(up_to: usize) -> Self {
        State {
            queues: BTreeMap::new(),
            active: 0,
            up_to,
            shared_mode: false,
            shared: None,
            shared_next: 0,
            idle: VecDeque::new(),
            idle_count: 0,
            counter: 0,
            task: None,
        }
    }

    fn bump(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn send(&self, cmd: Cmd) {
        if let Some((_, cmds)) = &self.task {
            // The task is gone only with the hub, or with its runtime (then restarted on the
            // next registration).
            let _ = cmds.send(cmd);
        }
    }

    /// Whether a registration of `key` may return: `Some(Ok)` once a watch serves it.
    fn readiness(&self, key: &str) -> Option<Result<()>> {
        let Some(queue) = self.queues.get(key) else {
            return Some(Err(Error::unavailable("the locker's watch is gone")));
        };
        if let Some(failure) = &queue.failed {
            return Some(Err((**failure).clone()));
        }
        let shared_ready = self.shared.as_ref().is_some_and(|shared| shared.ready);
        (queue.served_by_own() || shared_ready).then_some(Ok(()))
    }

    /// The watch `tag` names, if that attempt is still current, with the revision after the
    /// last event it delivered.
    fn watch_of(&mut self, tag: &Tag) -> Option<(&mut WatchState, &mut Revision)> {
        match tag {
            Tag::Own(key, attempt) => {
                let queue = self.queues.get_mut(key)?;
                let own = queue
                    .own
                    .as_deref_mut()
                    .filter(|own| own.attempt == *attempt)?;
                Some((own, &mut queue.next))
            }
            Tag::Shared(attempt) => {
                let shared = self
                    .shared
                    .as_mut()
                    .filter(|shared| shared.attempt == *attempt)?;
                Some((shared, &mut self.shared_next))
            }
        }
    }

    /// Gives each queue without a watch of its own (and not refused) a new one, its next
    /// revision raised to `floor` (every event below it was delivered): which to open, of which
    /// attempt, from where.
    fn own_watches(
        &mut self,
        jitter: &Jitter,
        retry: (Duration, Duration),
        floor: Revision,
    ) -> Vec<(Arc<str>, u64, Option<Revision>)> {
        let keys: Vec<Arc<str>> = self
            .queues
            .iter()
            .filter(|(_, queue)| queue.own.is_none() && queue.failed.is_none())
            .map(|(key, _)| key.clone())
            .collect();
        let mut opens = Vec::with_capacity(keys.len());
        for key in keys {
            let attempt = self.bump();
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            queue.next = queue.next.max(floor);
            queue.own = Some(Box::new(WatchState::new(attempt, jitter, retry)));
            opens.push((key, attempt, (queue.next > 0).then_some(queue.next)));
        }
        opens
    }

    /// Whether some watch of the feed is broken.
    fn any_broken(&self) -> bool {
        self.shared.as_ref().is_some_and(|shared| shared.broken)
            || self
                .queues
                .values()
                .any(|queue| queue.own.as_ref().is_some_and(|own| own.broken))
    }

    /// The queue `key` lost its last subscriber: it keeps its own watch, idle, or goes.
    fn left(&mut self, key: &Arc<str>) {
        self.active -= 1;
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        if self.shared_mode || !queue.served_by_own() {
            self.queues.remove(key);
            return;
        }
        self.counter += 1;
        queue.idle = Some(self.counter);
        self.idle.push_back((key.clone(), self.counter));
        self.idle_count += 1;
        while self.idle_count > IDLE_WATCHES {
            let Some((key, place)) = self.idle.pop_front() else {
                break;
            };
            if self.queues.get(&key).is_some_and(|q| q.idle == Some(place)) {
                self.queues.remove(&key);
                self.idle_count -= 1;
            }
        }
        // Entries of queues taken again are left behind: drop them once they outnumber the rest.
        if self.idle.len() > 4 * IDLE_WATCHES {
            let queues = &self.queues;
            self.idle
                .retain(|(key, place)| queues.get(key).is_some_and(|q| q.idle == Some(*place)));
        }
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("queues", &self.queues.len())
            .field("active", &self.active)
            .field("shared_mode", &self.shared_mode)
            .field("idle", &self.idle_count)
            .finish()
    }
}

/// What a feed's task is asked to do.
#[derive(Debug)]
enum Cmd {
    /// Open the own watch of a queue (of this generation).
    Open(Arc<str>, u64),
    /// The number of queues with subscribers changed: maybe switch between own watches and the
    /// shared one.
    Rebalance,
}

/// Which of the hub's feeds a subscriber takes its events from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    /// Deletes only: what locks wait for.
    Deletes,
    /// Puts and deletes: what watch streams follow.
    All,
}

/// What a feed's subscribers and its task share.
#[derive(Debug)]
struct FeedShared {
    state: Mutex<State>,
    /// Rung when a queue's watch becomes ready or fails: registrations wait for it.
    changed: Notify,
}

impl FeedShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One of the hub's feeds: its queues, and whether the store may be unreachable.
#[derive(Debug)]
struct FeedState {
    feed: Feed,
    shared: Arc<FeedShared>,
    /// Whether the store may be unreachable (a watch broke, or a probe failed or hung): what
    /// its subscribers know may be stale.
    stale: watch::Sender<bool>,
}

impl FeedState {
    fn new(feed: Feed, up_to: usize) -> Self {
        FeedState {
            feed,
            shared: Arc::new(FeedShared {
                state: Mutex::new(State::new(up_to)),
                changed: Notify::new(),
            }),
            stale: watch::channel(false).0,
        }
    }
}

impl Drop for FeedState {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some((task, _)) = state.task.take() {
            task.abort();
        }
        let queues = std::mem::take(&mut state.queues);
        state.shared = None;
        drop(state);
        for queue in queues.into_values() {
            close_all(queue.subscribers);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Hub {
    backend: Arc<dyn LockBackend>,
    jitter: Arc<Jitter>,
    retry: (Duration, Duration),
    /// How often the [`Feed::All`] watch's store is probed, and how long a probe may take.
    probe_every: Duration,
    deletes: FeedState,
    all: FeedState,
}

/// A sink's place among the subscribers of one queue. Dropping it unsubscribes.
pub(crate) struct Registration {
    id: u64,
    queue: Arc<str>,
    shared: Weak<FeedShared>,
    /// The feed's task stops when its last subscriber goes (the [`Feed::All`] feed: the puts of
    /// the keys it watches need not cross the network for nobody).
    stop_when_empty: bool,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        let Some(queue) = state.queues.get_mut(&self.queue) else {
            return;
        };
        let Some(at) = queue.subscribers.iter().position(|(id, _)| *id == self.id) else {
            // The store refused the queue's watch, and its subscribers were told: forget it.
            if queue.failed.is_some() && queue.subscribers.is_empty() {
                state.queues.remove(&self.queue);
            }
            return;
        };
        let sink = queue.subscribers.swap_remove(at);
        let mut gone = Vec::new();
        if queue.subscribers.is_empty() {
            state.left(&self.queue);
            if self.stop_when_empty && state.active == 0 {
                // Every queue left is idle: its watch ends with the task.
                if let Some((task, _)) = state.task.take() {
                    task.abort();
                }
                gone.extend(std::mem::take(&mut state.queues).into_values());
                state.shared = None;
                state.shared_mode = false;
                state.idle.clear();
                state.idle_count = 0;
            } else if state.shared_mode {
                state.send(Cmd::Rebalance);
            } else {
                retire_shared(&mut state);
            }
        }
        // The sink may be the last reference to a lock's state, and through it to the locker
        // and this hub: drop it only once the hub's state is unlocked.
        drop(state);
        drop(sink);
        drop(gone);
    }
}

/// A subscription to one queue's events, read through a [`Mailbox`]. Dropping it unsubscribes.
#[derive(Debug)]
pub(crate) struct Subscription {
    mailbox: Arc<Mailbox>,
    /// The feed's [`FeedState::stale`]; `None` once the hub is gone.
    stale: Option<watch::Receiver<bool>>,
    _registration: Registration,
}

/// What a [`Subscription`] hears: a message, or a change of whether the store may be
/// unreachable.
#[derive(Debug)]
pub(crate) enum Heard {
    Msg(HubMsg),
    /// `true`: the store may be unreachable (the view may be stale); `false`: reachable again.
    Stale(bool),
}

impl Subscription {
    /// Whether the store may be unreachable now (changes after this come from
    /// [`recv`](Subscription::recv)).
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.as_ref().is_some_and(|stale| *stale.borrow())
    }

    /// The next message or change of reachability; `None` only if the hub is gone or the
    /// queue's watch failed for good.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a message or a change is taken only when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Heard> {
        loop {
            let Some(stale) = &mut self.stale else {
                return self.mailbox.recv().await.map(Heard::Msg);
            };
            tokio::select! {
                biased;
                changed = stale.changed() => match changed {
                    Ok(()) => return Some(Heard::Stale(*stale.borrow_and_update())),
                    // The hub is gone: its mailbox closes.
                    Err(_) => self.stale = None,
                },
                msg = self.mailbox.recv() => return msg.map(Heard::Msg),
            }
        }
    }
}

impl Hub {
    /// A hub over `backend`; `probe_every`: how often the store is probed while watch streams
    /// follow it (see [`Feed::All`]); `key_watches`: how many queues have watches of their own,
    /// at most.
    pub(crate) fn new(
        backend: Arc<dyn LockBackend>,
        jitter: Arc<Jitter>,
        retry: (Duration, Duration),
        probe_every: Duration,
        key_watches: usize,
    ) -> Self {
        Hub {
            backend,
            jitter,
            retry,
            probe_every,
            deletes: FeedState::new(Feed::Deletes, key_watches),
            all: FeedState::new(Feed::All, key_watches),
        }
    }

    /// Subscribes to every event (puts and deletes) of the queue `key`, through a mailbox, on
    /// the [`Feed::All`] feed. Returns once a watch serves the queue (see [`Hub::register`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no subscription behind.
    pub(crate) async fn subscribe(&self, key: &str) -> Result<Subscription> {
        let mailbox = Arc::new(Mailbox::default());
        let registration = self
            .register_in(&self.all, Arc::from(key), mailbox.clone())
            .await?;
        Ok(Subscription {
            mailbox,
            stale: Some(self.all.stale.subscribe()),
            _registration: registration,
        })
    }

    /// Delivers the deletes of the queue `key` to `sink` (a lock), on the [`Feed::Deletes`]
    /// feed, until the registration is dropped. Returns once a watch serves the queue: any read
    /// issued afterwards is at a revision the watch covers, so every delete after that read is
    /// delivered.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves no registration behind.
    pub(crate) async fn register(
        &self,
        key: Arc<str>,
        sink: Arc<dyn Sink>,
    ) -> Result<Registration> {
        self.register_in(&self.deletes, key, sink).await
    }

    async fn register_in(
        &self,
        feed: &FeedState,
        key: Arc<str>,
        sink: Arc<dyn Sink>,
    ) -> Result<Registration> {
        let registration = {
            let mut state = feed.shared.lock();
            self.start_task(feed, &mut state);
            let id = state.bump();
            let attempt = state.bump();
            let becomes_active = state
                .queues
                .get(&key)
                .is_none_or(|queue| queue.subscribers.is_empty());
            if becomes_active && !state.shared_mode && state.active >= state.up_to {
                // One queue more than own watches may serve: the shared watch takes them all.
                state.shared_mode = true;
                state.send(Cmd::Rebalance);
            }
            let shared_mode = state.shared_mode;
            if shared_mode && state.shared.is_none() {
                // The shared watch is not open (a refusal ended it): open it again.
                state.send(Cmd::Rebalance);
            }
            let queue = state.queues.entry(key.clone()).or_insert_with(|| Queue {
                // Most queues have one subscriber in a locker: no room for more up front.
                subscribers: Vec::with_capacity(1),
                next: 0,
                own: None,
                failed: None,
                idle: None,
            });
            // A queue whose watch the store refused is tried afresh by a new subscriber.
            if queue.failed.is_some() && queue.subscribers.is_empty() {
                queue.failed = None;
            }
            let mut open = None;
            if !shared_mode && queue.own.is_none() && queue.failed.is_none() {
                queue.own = Some(Box::new(WatchState::new(attempt, &self.jitter, self.retry)));
                open = Some(attempt);
            }
            let was_idle = queue.idle.take().is_some();
            queue.subscribers.push((id, sink));
            let first = queue.subscribers.len() == 1;
            if was_idle {
                state.idle_count -= 1;
            }
            if first {
                state.active += 1;
            }
            if let Some(attempt) = open {
                state.send(Cmd::Open(key.clone(), attempt));
            }
            Registration {
                id,
                queue: key.clone(),
                shared: Arc::downgrade(&feed.shared),
                stop_when_empty: feed.feed == Feed::All,
            }
        };
        loop {
            let changed = feed.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Not in the `if let`: its temporaries (the lock) would live through the block, and
            // dropping the registration locks again.
            let ready = feed.shared.lock().readiness(&key);
            if let Some(ready) = ready {
                return ready.map(|()| registration);
            }
            changed.await;
        }
    }

    /// Starts the feed's task on first use, and again if it ended (the runtime that ran it shut
    /// down): every queue's watch opens again, from where it was.
    fn start_task(&self, feed: &FeedState, state: &mut State) {
        if state
            .task
            .as_ref()
            .is_some_and(|(task, _)| !task.is_finished())
        {
            return;
        }
        let (cmds, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            FeedTask {
                backend: self.backend.clone(),
                feed: feed.feed,
                jitter: self.jitter.clone(),
                retry: self.retry,
                shared: Arc::downgrade(&feed.shared),
                stale: feed.stale.clone(),
                probe_every: (feed.feed == Feed::All).then_some(self.probe_every),
                streams: SelectAll::new(),
                opening: FuturesUnordered::new(),
            },
            receiver,
        ));
        state.task = Some((task.abort_handle(), cmds));
        state.shared = None;
        state.shared_mode = false;
        // The watches of the task that ended ended with it.
        for queue in state.queues.values_mut() {
            queue.own = None;
        }
        for (key, attempt, _) in state.own_watches(&self.jitter, self.retry, 0) {
            state.send(Cmd::Open(key, attempt));
        }
    }
}

/// Tells every subscriber that no more messages will come. Called with the hub's state
/// unlocked: a sink may be the last reference to a lock's state, and through it to the hub.
fn close_all(subscribers: Vec<(u64, Arc<dyn Sink>)>) {
    for (_, sink) in subscribers {
        sink.close();
    }
}

/// Which watch an answer or an event comes from.
#[derive(Debug, Clone)]
enum Tag {
    /// A queue's own watch, of one generation.
    Own(Arc<str>, u64),
    /// The shared watch, of one generation.
    Shared(u64),
}

impl Tag {
    /// The same watch, another attempt.
    fn again(&self, attempt: u64) -> Tag {
        match self {
            Tag::Own(key, _) => Tag::Own(key.clone(), attempt),
            Tag::Shared(_) => Tag::Shared(attempt),
        }
    }
}

/// A watch's batches, tagged, and then `None` when it ends.
type Tagged = Abortable<BoxStream<'static, (Tag, Option<Result<Vec<WatchEvent>>>)>>;

/// What a feed's task owns: the streams of its watches and the watches being opened.
struct FeedTask {
    backend: Arc<dyn LockBackend>,
    feed: Feed,
    jitter: Arc<Jitter>,
    retry: (Duration, Duration),
    shared: Weak<FeedShared>,
    stale: watch::Sender<bool>,
    /// Probe the store this often (the [`Feed::All`] feed only).
    probe_every: Option<Duration>,
    streams: SelectAll<Tagged>,
    opening: FuturesUnordered<BoxFuture<'static, (Tag, Result<WatchStream>)>>,
}

impl FeedTask {
    /// Sets whether the store may be unreachable. Only watch streams read it: the locks' feed
    /// leaves it alone (a lock learns of an outage from its session).
    fn set_stale(&self, stale: bool) {
        if self.feed != Feed::All {
            return;
        }
        let changed = self
            .stale
            .send_if_modified(|now| std::mem::replace(now, stale) != stale);
        if changed {
            let feed = self.feed;
            if stale {
                warn!(
                    ?feed,
                    "hub watch: the store may be unreachable; views may be stale"
                );
            } else {
                info!(?feed, "hub watch: the store is reachable again");
            }
        }
    }

    /// Opens a watch (after `delay`): the queue's own (`prefix` is `queue/`), or the shared one.
    fn open(&mut self, tag: Tag, from: Option<Revision>, delay: Duration) {
        let (backend, feed) = (self.backend.clone(), self.feed);
        let prefix = match &tag {
            Tag::Own(key, _) => format!("{key}/"),
            Tag::Shared(_) => String::new(),
        };
        self.opening.push(Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let opened = match feed {
                Feed::Deletes => backend.watch_deletes(&prefix, from).await,
                Feed::All => backend.watch(&prefix, from).await,
            };
            (tag, opened)
        }));
    }

    fn command(&mut self, cmd: Cmd) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        match cmd {
            Cmd::Open(key, attempt) => {
                let from = {
                    let state = shared.lock();
                    let Some(queue) = state.queues.get(&key) else {
                        return;
                    };
                    if queue.own.as_ref().is_none_or(|own| own.attempt != attempt) {
                        return;
                    }
                    (queue.next > 0).then_some(queue.next)
                };
                self.open(Tag::Own(key, attempt), from, Duration::ZERO);
            }
            Cmd::Rebalance => self.rebalance(&shared),
        }
    }

    /// Opens the shared watch once the feed serves more queues than own watches may, and goes
    /// back to own watches at a quarter of that.
    fn rebalance(&mut self, shared: &FeedShared) {
        let mut state = shared.lock();
        if !state.shared_mode {
            return;
        }
        if state.active > state.up_to / 4 {
            if state.shared.is_some() {
                return;
            }
            // The shared watch starts where the queue furthest behind is, so that nothing is
            // missed when it takes over (each queue drops what it already had).
            let from = state
                .queues
                .values()
                .map(|queue| queue.next)
                .filter(|next| *next > 0)
                .min();
            let attempt = state.bump();
            debug!(feed = ?self.feed, queues = state.active, "hub: one watch for every queue");
            state.shared_next = from.unwrap_or(0);
            state.shared = Some(WatchState::new(attempt, &self.jitter, self.retry));
            drop(state);
            self.open(Tag::Shared(attempt), from, Duration::ZERO);
        } else {
            debug!(feed = ?self.feed, queues = state.active, "hub: a watch per queue again");
            state.shared_mode = false;
            // Every event below the shared watch's next was delivered to every queue.
            let shared_next = state.shared_next;
            let opens = state.own_watches(&self.jitter, self.retry, shared_next);
            retire_shared(&mut state);
            drop(state);
            for (key, attempt, from) in opens {
                self.open(Tag::Own(key, attempt), from, Duration::ZERO);
            }
        }
    }

    /// A watch answered its opening.
    fn opened(&mut self, tag: Tag, opened: Result<WatchStream>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        let Some((watch, next)) = state.watch_of(&tag) else {
            return;
        };
        let feed = self.feed;
        let stream = match opened {
            Ok(stream) => stream,
            Err(Error::Compacted { .. }) => {
                debug!(
                    ?feed,
                    ?tag,
                    "hub watch: history compacted; resyncing subscribers"
                );
                watch.resync = true;
                drop(state);
                return self.open(tag, None, Duration::ZERO);
            }
            Err(err) if !err.is_retryable() => {
                warn!(?feed, ?tag, error = %err, "hub watch refused by the store");
                return self.refused(state, &tag, &err);
            }
            Err(err) => {
                watch.broken = true;
                let delay = watch.backoff.next_delay();
                let from = (*next > 0).then_some(*next);
                debug!(?feed, ?tag, error = %err, ?delay, "hub watch failed; retrying");
                drop(state);
                self.set_stale(true);
                return self.open(tag, from, delay);
            }
        };
        watch.backoff.reset();
        watch.ready = true;
        watch.broken = false;
        let resync = std::mem::take(&mut watch.resync);
        let end = tag.clone();
        let events: BoxStream<'static, _> = {
            let tag = tag.clone();
            stream
                .events
                .map(move |batch| (tag.clone(), Some(batch)))
                .chain(futures::stream::once(async move { (end, None) }))
                .boxed()
        };
        let (events, abort) = futures::stream::abortable(events);
        watch.abort = Some(abort);
        let start = stream.start_revision;
        *next = (*next).max(start);
        self.streams.push(events);
        match &tag {
            Tag::Own(key, _) => {
                let queue = state.queues.get(key).expect("checked");
                if resync {
                    queue.resync();
                }
                retire_shared(&mut state);
            }
            Tag::Shared(_) => {
                // The shared watch takes over from own watches (its start is at or before
                // their next, unless history was lost: then they re-read).
                let shared_mode = state.shared_mode;
                for queue in state.queues.values_mut() {
                    let switching = shared_mode && queue.own.take().is_some();
                    if (switching && start > queue.next) || (resync && !queue.served_by_own()) {
                        queue.resync();
                    }
                }
            }
        }
        let broken = state.any_broken();
        drop(state);
        // The store answered a watch: it is reachable (said before registrations return, so
        // that a subscriber does not see a stale flag about to clear).
        if !broken {
            self.set_stale(false);
        }
        shared.changed.notify_waiters();
    }

    /// The store refused a watch for good: its queues' subscribers are told, and registrations
    /// waiting for it fail.
    fn refused(&mut self, mut state: std::sync::MutexGuard<'_, State>, tag: &Tag, err: &Error) {
        let mut closed = Vec::new();
        let keys: Vec<Arc<str>> = match tag {
            Tag::Own(key, _) => vec![key.clone()],
            Tag::Shared(_) => {
                state.shared = None;
                state
                    .queues
                    .iter()
                    .filter(|(_, queue)| !queue.served_by_own())
                    .map(|(key, _)| key.clone())
                    .collect()
            }
        };
        for key in keys {
            let Some(queue) = state.queues.get_mut(&key) else {
                continue;
            };
            queue.own = None;
            queue.failed = Some(Box::new(err.clone()));
            let subscribers = std::mem::take(&mut queue.subscribers);
            let was_idle = queue.idle.take().is_some();
            if !subscribers.is_empty() {
                state.active -= 1;
            }
            if was_idle {
                state.idle_count -= 1;
            }
            if subscribers.is_empty() {
                // Nobody waits to hear of the refusal.
                state.queues.remove(&key);
            }
            closed.push(subscribers);
        }
        let shared = self.shared.upgrade();
        drop(state);
        if let Some(shared) = shared {
            shared.changed.notify_waiters();
        }
        // Subscribers see their mailbox close and subscribe again (trying afresh).
        for subscribers in closed {
            close_all(subscribers);
        }
    }

    /// A batch of a watch, or its end (`None`).
    fn item(&mut self, tag: Tag, item: Option<Result<Vec<WatchEvent>>>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        let feed = self.feed;
        match item {
            Some(Ok(batch)) => match &tag {
                Tag::Own(key, attempt) => {
                    let Some(queue) = state.queues.get_mut(key) else {
                        return;
                    };
                    if queue.own.as_ref().is_none_or(|own| own.attempt != *attempt) {
                        return;
                    }
                    for event in &batch {
                        // A queue's prefix also holds the entries of the queues below it.
                        if queue_of(&event.entry.key) == Some(key) {
                            queue.deliver(event);
                        }
                    }
                }
                Tag::Shared(attempt) => {
                    if state
                        .shared
                        .as_ref()
                        .is_none_or(|shared| shared.attempt != *attempt)
                    {
                        return;
                    }
                    for event in &batch {
                        state.shared_next = event.entry.mod_revision + 1;
                        let Some(queue) = queue_of(&event.entry.key)
                            .and_then(|queue| state.queues.get_mut(queue))
                        else {
                            continue;
                        };
                        if !queue.served_by_own() {
                            queue.deliver(event);
                        }
                    }
                }
            },
            ended => {
                let compacted = matches!(ended, Some(Err(Error::Compacted { .. })));
                // A new generation: whatever the old stream still holds is ignored.
                let attempt = state.bump();
                let Some((watch, next)) = state.watch_of(&tag) else {
                    return;
                };
                let (next, reopen) = (*next, tag.again(attempt));
                watch.attempt = attempt;
                watch.abort = None;
                let (from, delay) = if compacted {
                    warn!(
                        ?feed,
                        ?tag,
                        "hub watch: history compacted; resyncing subscribers"
                    );
                    watch.resync = true;
                    (None, Duration::ZERO)
                } else {
                    watch.broken = true;
                    let delay = watch.backoff.next_delay();
                    debug!(
                        ?feed,
                        ?tag,
                        next,
                        ?ended,
                        ?delay,
                        "hub watch broke; resuming"
                    );
                    ((next > 0).then_some(next), delay)
                };
                drop(state);
                if !compacted {
                    self.set_stale(true);
                }
                self.open(reopen, from, delay);
            }
        }
    }
}

/// Ends the shared watch once no queue needs it (every queue has its own watch again).
fn retire_shared(state: &mut State) {
    if !state.shared_mode
        && state.shared.is_some()
        && !state.queues.values().any(Queue::needs_shared)
    {
        debug!("hub: the shared watch ends");
        state.shared = None;
    }
}

/// A read of the store after `every`, cut off after `every` again: whether it was answered. A
/// watch alone says nothing while the store is silent (a hung member, a black-holed network);
/// this read does. It reads the holder of a queue the feed serves (`None`, no opinion, if it
/// serves none).
fn probe(
    backend: Arc<dyn LockBackend>,
    shared: Weak<FeedShared>,
    every: Duration,
) -> BoxFuture<'static, Option<bool>> {
    Box::pin(async move {
        tokio::time::sleep(every).await;
        let key = shared
            .upgrade()
            .and_then(|shared| shared.lock().queues.keys().next().cloned());
        let key = key?;
        Some(matches!(
            tokio::time::timeout(every, backend.holder(&key)).await,
            Ok(Ok(_))
        ))
    })
}

async fn run(mut t: FeedTask, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
    let mut probing = t
        .probe_every
        .map(|every| probe(t.backend.clone(), t.shared.clone(), every));
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(cmd) => t.command(cmd),
                None => return,
            },
            Some((tag, opened)) = t.opening.next(), if !t.opening.is_empty() => t.opened(tag, opened),
            Some((tag, item)) = t.streams.next(), if !t.streams.is_empty() => t.item(tag, item),
            answered = async { probing.as_mut().expect("a probe").await }, if probing.is_some() => {
                if let Some(answered) = answered {
                    let broken = t.shared.upgrade().is_some_and(|shared| shared.lock().any_broken());
                    t.set_stale(!answered || broken);
                }
                probing = t
                    .probe_every
                    .map(|every| probe(t.backend.clone(), t.shared.clone(), every));
            }
        }
    }
}
