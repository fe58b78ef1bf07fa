//! Long-lived watches per locker, with every wait and watch stream multiplexed over them.
//!
//! Opening a fresh watch at a past revision for each wait is what makes etcd's own Go `Mutex` slow
//! under contention (etcd serves such watches from a catch-up loop every 100 ms). The hub keeps
//! one watch per [`Feed`] over the whole backend root, each for the life of the
//! [`Locker`](crate::Locker), resumes it from the last revision seen when it breaks, and hands
//! each event to the subscribers of the event's queue:
//!
//! - [`Feed::Deletes`], for locks: a lock moves on deletes only (its predecessor's, its own), so
//!   its watch leaves the puts out ([`Watcher::watch_deletes`](crate::backend::Watcher)), and the
//!   join and release of every lock under the root cost one event each, not two.
//! - [`Feed::All`], for watch streams, which follow values too: opened by the first watch stream,
//!   stopped with the last; while it runs it probes the store (see [`FeedTask`]).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::backend::{LockBackend, Revision, WatchEvent, queue_of};
use crate::error::{Error, Result};
use crate::retry::Jitter;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub(crate) enum HubMsg {
    /// A change to an entry of the subscribed queue.
    Event(WatchEvent),
    /// History was lost (compaction): re-read the queue; events after that read follow.
    Resync,
}

type Subscribers = BTreeMap<Arc<str>, Vec<(u64, Arc<dyn Sink>)>>;

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

/// Whether the hub's watch is up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Being established (or re-established after a compaction).
    Starting,
    /// Established: every event after this reaches subscribers.
    Up,
    /// The store refused the watch for good (permission denied, ...): the message and whether
    /// it was a permission error. The task has ended; the next subscriber starts a new one.
    Failed { message: String, permission: bool },
}

impl Status {
    fn error(&self) -> Option<Error> {
        match self {
            Status::Failed {
                message,
                permission: true,
            } => Some(Error::PermissionDenied {
                message: message.clone(),
                source: None,
            }),
            Status::Failed {
                message,
                permission: false,
            } => Some(Error::Backend {
                message: message.clone(),
                retryable: false,
                source: None,
            }),
            _ => None,
        }
    }
}

#[derive(Default)]
struct State {
    subscribers: Subscribers,
    next_id: u64,
    task: Option<tokio::task::AbortHandle>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("queues", &self.subscribers.len())
            .field("next_id", &self.next_id)
            .field("task", &self.task)
            .finish()
    }
}

/// Which of the hub's watches a subscriber takes its events from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    /// Deletes only: what locks wait for.
    Deletes,
    /// Puts and deletes: what watch streams follow.
    All,
}

/// One of the hub's watches: its subscribers and whether it is up.
#[derive(Debug)]
struct FeedState {
    feed: Feed,
    state: Arc<Mutex<State>>,
    /// Whether the watch is established; every event after that reaches subscribers.
    status: watch::Sender<Status>,
    /// Whether the store may be unreachable (the watch broke, or a probe failed or hung): what
    /// its subscribers know may be stale.
    stale: watch::Sender<bool>,
}

impl FeedState {
    fn new(feed: Feed) -> Self {
        FeedState {
            feed,
            state: Arc::new(Mutex::new(State::default())),
            status: watch::channel(Status::Starting).0,
            stale: watch::channel(false).0,
        }
    }
}

impl Drop for FeedState {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = &state.task {
            task.abort();
        }
        let subscribers = std::mem::take(&mut state.subscribers);
        drop(state);
        close_all(subscribers);
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
    state: Weak<Mutex<State>>,
    /// The feed's watch stops when its last subscriber goes (the [`Feed::All`] watch: the puts
    /// of every lock under the root need not cross the network for nobody).
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
        let Some(state) = self.state.upgrade() else {
            return;
        };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = state.subscribers.get_mut(&self.queue) else {
            return;
        };
        let Some(at) = list.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        let sink = list.swap_remove(at);
        if list.is_empty() {
            state.subscribers.remove(&self.queue);
        }
        if self.stop_when_empty
            && state.subscribers.is_empty()
            && let Some(task) = state.task.take()
        {
            task.abort();
        }
        // The sink may be the last reference to a lock's state, and through it to the locker
        // and this hub: drop it only once the hub's state is unlocked.
        drop(state);
        drop(sink);
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

    /// The next message or change of reachability; `None` only if the hub is gone or its watch
    /// failed for good.
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
    /// follow it (see [`Feed::All`]).
    pub(crate) fn new(
        backend: Arc<dyn LockBackend>,
        jitter: Arc<Jitter>,
        retry: (Duration, Duration),
        probe_every: Duration,
    ) -> Self {
        Hub {
            backend,
            jitter,
            retry,
            probe_every,
            deletes: FeedState::new(Feed::Deletes),
            all: FeedState::new(Feed::All),
        }
    }

    /// Subscribes to every event (puts and deletes) of the queue `key`, through a mailbox, on
    /// the [`Feed::All`] watch. Returns once that watch is established (see [`Hub::register`]).
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
    /// watch, until the registration is dropped. Returns once that watch is established: any
    /// read issued afterwards is at a revision the watch covers, so every delete after that read
    /// is delivered.
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
            let mut state = feed.state.lock().unwrap_or_else(|e| e.into_inner());
            let id = state.next_id;
            state.next_id += 1;
            state
                .subscribers
                .entry(key.clone())
                // Most queues have one subscriber in a locker: no room for more up front.
                .or_insert_with(|| Vec::with_capacity(1))
                .push((id, sink));
            // Start the watch task on first use, and again if it ended (a permanent error, or
            // the runtime that ran it shut down).
            if state.task.as_ref().is_none_or(|t| t.is_finished()) {
                feed.status.send_replace(Status::Starting);
                let task = tokio::spawn(run(FeedTask {
                    backend: self.backend.clone(),
                    feed: feed.feed,
                    jitter: self.jitter.clone(),
                    retry: self.retry,
                    state: Arc::downgrade(&feed.state),
                    status: feed.status.clone(),
                    stale: feed.stale.clone(),
                    probe_every: (feed.feed == Feed::All).then_some(self.probe_every),
                }));
                state.task = Some(task.abort_handle());
            }
            Registration {
                id,
                queue: key,
                state: Arc::downgrade(&feed.state),
                stop_when_empty: feed.feed == Feed::All,
            }
        };
        // Already up (the common case): no need to wait.
        let status = if *feed.status.borrow() == Status::Up {
            Status::Up
        } else {
            let mut status = feed.status.subscribe();
            // The sender lives in `self`, so this only ends when the watch is up or has failed.
            status
                .wait_for(|s| *s != Status::Starting)
                .await
                .map(|s| s.clone())
                .unwrap_or(Status::Up)
        };
        match status.error() {
            Some(err) => Err(err),
            None => Ok(registration),
        }
    }
}

/// Tells every subscriber that no more messages will come. Called with the hub's state
/// unlocked: a sink may be the last reference to a lock's state, and through it to the hub.
fn close_all(subscribers: Subscribers) {
    for (_, sink) in subscribers.values().flatten() {
        sink.close();
    }
}

/// What a feed's task needs.
struct FeedTask {
    backend: Arc<dyn LockBackend>,
    feed: Feed,
    jitter: Arc<Jitter>,
    retry: (Duration, Duration),
    state: Weak<Mutex<State>>,
    status: watch::Sender<Status>,
    stale: watch::Sender<bool>,
    /// Probe the store this often (the [`Feed::All`] watch only).
    probe_every: Option<Duration>,
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
}

/// A read of the store after `every`, cut off after `every` again: whether it was answered. A
/// watch alone says nothing while the store is silent (a hung member, a black-holed network);
/// this read does. It reads the holder of a queue the feed serves (`None`, no opinion, if it
/// serves none).
fn probe(
    backend: Arc<dyn LockBackend>,
    state: Weak<Mutex<State>>,
    every: Duration,
) -> Pin<Box<dyn Future<Output = Option<bool>> + Send>> {
    Box::pin(async move {
        tokio::time::sleep(every).await;
        let key = state.upgrade().and_then(|state| {
            let state = state.lock().unwrap_or_else(|e| e.into_inner());
            state.subscribers.keys().next().cloned()
        });
        let key = key?;
        Some(matches!(
            tokio::time::timeout(every, backend.holder(&key)).await,
            Ok(Ok(_))
        ))
    })
}

async fn run(t: FeedTask) {
    let feed = t.feed;
    let mut from: Option<Revision> = None;
    let mut resync = false;
    let mut backoff = t.jitter.new_backoff(t.retry.0, t.retry.1);
    loop {
        let opened = match feed {
            Feed::Deletes => t.backend.watch_deletes("", from).await,
            Feed::All => t.backend.watch("", from).await,
        };
        let stream = match opened {
            Ok(stream) => stream,
            Err(Error::Compacted { .. }) => {
                debug!(?feed, "hub watch: history compacted; resyncing subscribers");
                from = None;
                resync = true;
                continue;
            }
            Err(err) if !err.is_retryable() => {
                warn!(?feed, error = %err, "hub watch refused by the store");
                let permission = matches!(err, Error::PermissionDenied { .. });
                t.status.send_replace(Status::Failed {
                    message: err.to_string(),
                    permission,
                });
                // Subscribers see their mailbox close and subscribe again (starting a new task).
                if let Some(state) = t.state.upgrade() {
                    let subscribers = std::mem::take(
                        &mut state.lock().unwrap_or_else(|e| e.into_inner()).subscribers,
                    );
                    close_all(subscribers);
                }
                return;
            }
            Err(err) => {
                t.set_stale(true);
                let delay = backoff.next_delay();
                debug!(?feed, error = %err, ?delay, "hub watch failed; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        backoff.reset();
        let mut next = stream.start_revision;
        if resync {
            resync = false;
            if !send_all(&t.state, HubMsg::Resync) {
                return;
            }
        }
        // The store answered the watch: it is reachable (said before Up, so that a subscriber
        // woken by Up does not see a stale flag about to clear).
        t.set_stale(false);
        t.status.send_replace(Status::Up);
        let mut events = stream.events;
        let mut probing = t
            .probe_every
            .map(|every| probe(t.backend.clone(), t.state.clone(), every));
        loop {
            tokio::select! {
                batch = events.next() => match batch {
                    Some(Ok(batch)) => {
                        if let Some(last) = batch.last() {
                            next = last.entry.mod_revision + 1;
                        }
                        if !send_events(&t.state, batch) {
                            return;
                        }
                    }
                    Some(Err(Error::Compacted { .. })) => {
                        warn!(?feed, "hub watch: history compacted; resyncing subscribers");
                        resync = true;
                        break;
                    }
                    Some(Err(err)) => {
                        debug!(?feed, error = %err, next, "hub watch broke; resuming");
                        t.set_stale(true);
                        break;
                    }
                    None => {
                        debug!(?feed, next, "hub watch ended; resuming");
                        t.set_stale(true);
                        break;
                    }
                },
                answered = async { probing.as_mut().expect("a probe").await }, if probing.is_some() => {
                    if let Some(answered) = answered {
                        t.set_stale(!answered);
                    }
                    probing = t
                        .probe_every
                        .map(|every| probe(t.backend.clone(), t.state.clone(), every));
                }
            }
        }
        from = if resync { None } else { Some(next) };
        if !resync {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// Sends each event to the subscribers of its queue. `false` once the hub is gone.
fn send_events(state: &Weak<Mutex<State>>, batch: Vec<WatchEvent>) -> bool {
    let Some(state) = state.upgrade() else {
        return false;
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    for event in batch {
        let Some(queue) = queue_of(&event.entry.key) else {
            continue;
        };
        if let Some(list) = state.subscribers.get_mut(queue) {
            for (_, sink) in list.iter() {
                sink.deliver(HubMsg::Event(event.clone()));
            }
        }
    }
    true
}

/// Sends `msg` to every subscriber. `false` once the hub is gone.
fn send_all(state: &Weak<Mutex<State>>, msg: HubMsg) -> bool {
    let Some(state) = state.upgrade() else {
        return false;
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    for list in state.subscribers.values_mut() {
        for (_, sink) in list.iter() {
            sink.deliver(msg.clone());
        }
    }
    true
}
