//! The async driver of a lock's [`Machine`]: it carries out the machine's actions (store calls,
//! sessions, the hub's watch, the reaper) and feeds the answers back; it decides nothing.
//!
//! One lock is one [`Shared`]: the machine, the resources the driver needs for it ([`Io`]: the
//! session, the hub registration, the key claim), and the published state, in one allocation that
//! the handle, the hub and the driver share. Whoever drives takes the *driving token* and runs
//! [`drive`]: `acquire` on the caller's task until the lock is held (no hand-off between tasks on
//! the way in), then the lock's own task while it is held, and `release` on the caller's task
//! when that task is idle (one round trip, no hand-off on the way out). Inputs that are not
//! answers (hub events, commands) go into the machine at once, under the lock, from whatever
//! thread they come; the driver is woken to carry out what they lead to.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::{EventKind, LockBackend, Resumption, Revision};
use crate::error::{Error, LossReason, Result};
use crate::fence::Fence;
use crate::hub::{HubMsg, Registration, Sink};
use crate::locker::{KeyClaim, Locker};
use crate::machine::{
    Action, Command, Failure, Input, Machine, Outcome, ReplyTo, SessionView, State, TakeUp,
};
use crate::reaper::{Job, Target};
use crate::resume::ResumeToken;
use crate::session::{Session, SessionState};
use crate::types::{FencingToken, Ownership};

/// How many published states an [`events`](Shared::events) receiver may fall behind.
pub(crate) const EVENTS_KEPT: usize = 64;

/// How many ended tenures a lock remembers the end of.
const ENDS_KEPT: usize = 256;

/// One lock: its machine, its driver's resources, its published state.
pub(crate) struct Shared {
    pub(crate) key: Arc<str>,
    core: Mutex<Core>,
    /// Rung when the machine has something for its driver.
    doorbell: Notify,
    /// Rung at every change of the published state (or of `ended`), for readers.
    changed: Notify,
}

/// What is behind [`Shared`]'s lock.
struct Core {
    machine: Machine,
    io: Io,
    /// Someone is driving (see the module docs).
    driving: bool,
    /// The lock's task exists (spawned, not finished).
    task: bool,
    /// Callers waiting for an answer to a command.
    replies: Vec<(ReplyTo, oneshot::Sender<Result<()>>)>,
    next_reply: ReplyTo,
    /// For [`Shared::subscribe`]: made on first use.
    sender: Option<watch::Sender<Ownership>>,
    /// For [`Shared::events`]: made on first use.
    events: Option<broadcast::Sender<Ownership>>,
    /// The tenure in progress (published owned), and how the last ones ended, for
    /// [`Shared::tenure_end`] (the last [`ENDS_KEPT`]).
    tenure: Option<Fence>,
    ends: VecDeque<(Fence, LossReason)>,
    /// The error of the last failed store call, and the one kept when the lock stopped on it
    /// (answered to every caller of `wait_owned`, however many).
    last_error: Option<Error>,
    error: Option<Error>,
    /// Nothing more will change.
    ended: bool,
    /// The machine's actions that wait for whoever drives.
    todo: VecDeque<Action>,
}

/// What [`drive`] decides on, besides the session: the actions waiting for it, whether the
/// machine waits for an answer, its state (whether it is settled or ended), and its timer.
#[derive(PartialEq, Eq)]
struct DriverView {
    todo: usize,
    in_flight: bool,
    state: std::mem::Discriminant<State>,
    timeout: Option<Instant>,
}

impl DriverView {
    fn of(core: &Core) -> Self {
        DriverView {
            todo: core.todo.len(),
            in_flight: core.machine.in_flight(),
            state: std::mem::discriminant(core.machine.state()),
            timeout: core.machine.poll_timeout(),
        }
    }
}

impl Core {
    /// Nothing more will happen: the machine ended, its last actions carried out, and nobody is
    /// in the middle of carrying some out.
    fn is_done(&self) -> bool {
        self.machine.is_ended() && self.todo.is_empty() && !self.driving
    }
}

/// What the driver needs to carry out the machine's actions.
struct Io {
    locker: Locker,
    /// A lock on a session of its own: its TTL.
    dedicated_ttl: Option<Duration>,
    session: Option<Arc<Session>>,
    /// The lease of a session of its own that was abandoned: its entry goes with it.
    abandoned: Option<i64>,
    registration: Option<Registration>,
    /// This lock's claim on its key in a shared session slot (one entry per key per lease).
    claim: Option<KeyClaim>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = lock(&self.core);
        f.debug_struct("Shared")
            .field("key", &self.key)
            .field("state", core.machine.state())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(locker: Locker, machine: Machine, dedicated_ttl: Option<Duration>) -> Self {
        Shared {
            key: machine.key().clone(),
            core: Mutex::new(Core {
                machine,
                io: Io {
                    locker,
                    dedicated_ttl,
                    session: None,
                    abandoned: None,
                    registration: None,
                    claim: None,
                },
                driving: false,
                task: false,
                replies: Vec::new(),
                next_reply: 0,
                sender: None,
                events: None,
                tenure: None,
                ends: VecDeque::new(),
                last_error: None,
                error: None,
                ended: false,
                todo: VecDeque::new(),
            }),
            doorbell: Notify::new(),
            changed: Notify::new(),
        }
    }

    /// Feeds `input` to the machine now, and wakes whoever drives if there is work: something
    /// to carry out, or a change of what the driver waits for or until. An input that changes
    /// none of that (the delete of a releasing lock's own entry, seen before the delete's
    /// answer) wakes nobody.
    pub(crate) fn input(&self, input: Input) {
        let mut core = lock(&self.core);
        let before = DriverView::of(&core);
        core.machine.handle(input, Instant::now());
        self.apply_local(&mut core);
        let wake = DriverView::of(&core) != before;
        drop(core);
        if wake {
            self.doorbell.notify_waiters();
        }
    }

    /// Sends a command whose answer someone waits for.
    fn command_with_reply(
        &self,
        command: impl FnOnce(ReplyTo) -> Command,
        take_token: bool,
    ) -> (oneshot::Receiver<Result<()>>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut core = lock(&self.core);
        if core.ended && core.machine.state() != &State::Ended {
            // Nobody drives any more (the lock's task went with its runtime).
            let _ = tx.send(Err(self.closed()));
            return (rx, false);
        }
        // Taken before the command goes in: the lock's task, woken by it, must not carry it out
        // (a hand-off between tasks) when this caller can.
        let token = take_token && !core.driving;
        if token {
            core.driving = true;
        }
        let id = core.next_reply;
        core.next_reply = core.next_reply.wrapping_add(1);
        core.replies.push((id, tx));
        core.machine
            .handle(Input::Command(command(id)), Instant::now());
        self.apply_local(&mut core);
        drop(core);
        if !token {
            self.doorbell.notify_waiters();
        }
        (rx, token)
    }

    /// Sends a command whose answer the caller waits for, and carries out what it leads to on
    /// the caller's task until `until` if nobody else is driving (else the driver does);
    /// answers its outcome as the caller's result.
    pub(crate) async fn command_here(
        self: &Arc<Self>,
        command: impl FnOnce(ReplyTo) -> Command,
        until: Until,
    ) -> Result<()> {
        let (reply, token) = self.command_with_reply(command, true);
        if token {
            let mut guard = HandOver {
                shared: self,
                done: false,
            };
            drive(self, until, true).await;
            guard.done = true;
        }
        outcome(self, reply.await)
    }

    /// **The** answer to "is the lock owned now?" (and what else it is).
    pub(crate) fn ownership(&self) -> Ownership {
        lock(&self.core).machine.ownership(Instant::now())
    }

    /// Checks a value against the store's limits (no I/O).
    pub(crate) fn check_value(&self, value: &[u8]) -> Result<()> {
        lock(&self.core).io.locker.check_value(value)
    }

    /// The error the lock stopped on, if it stopped on one.
    pub(crate) fn stopped_on(&self) -> Option<Error> {
        lock(&self.core).error.clone()
    }

    /// The error the lock stopped on (the same one however often it is asked), or
    /// [`Error::Closed`].
    pub(crate) fn error(&self) -> Error {
        self.stopped_on().unwrap_or_else(|| self.closed())
    }

    fn closed(&self) -> Error {
        Error::Closed {
            key: self.key.to_string(),
        }
    }

    /// A receiver of every published state (latest value wins).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Ownership> {
        let mut core = lock(&self.core);
        if let Some(sender) = &core.sender {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(core.machine.published());
        if !core.ended {
            core.sender = Some(sender);
        }
        receiver
    }

    /// A receiver of every published state, in order (bounded: a receiver more than
    /// [`EVENTS_KEPT`] behind is told it lagged).
    pub(crate) fn events(&self) -> broadcast::Receiver<Ownership> {
        let mut core = lock(&self.core);
        if core.ended {
            // Nothing more will be published: a receiver that says so.
            return broadcast::channel(1).0.subscribe();
        }
        core.events
            .get_or_insert_with(|| broadcast::channel(EVENTS_KEPT).0)
            .subscribe()
    }

    /// The tenure in progress, if the lock is owned now.
    pub(crate) fn tenure_now(&self) -> Option<FencingToken> {
        self.fence_now().map(|f| f.token())
    }

    /// The fence of the tenure in progress, if the lock is owned now.
    pub(crate) fn fence_now(&self) -> Option<Fence> {
        let core = lock(&self.core);
        core.machine
            .ownership(Instant::now())
            .is_owned()
            .then(|| core.tenure.clone())
            .flatten()
    }

    /// The resume token of the tenure `token`, while it is the one held (with its entry's last
    /// write, as the lock knows it).
    pub(crate) fn resume_token(&self, token: FencingToken) -> Option<ResumeToken> {
        let core = lock(&self.core);
        if !core.machine.ownership(Instant::now()).is_owned() {
            return None;
        }
        let entry = core
            .machine
            .held_entry()
            .filter(|e| e.create_revision == token.as_i64())?;
        Some(ResumeToken::new(
            self.key.to_string(),
            entry.lease,
            token,
            entry.mod_revision,
        ))
    }

    /// The fence of the tenure `token`: the one in progress, or one of the last that ended.
    pub(crate) fn fence_of(&self, token: FencingToken) -> Option<Fence> {
        let core = lock(&self.core);
        core.tenure
            .iter()
            .chain(core.ends.iter().rev().map(|(f, _)| f))
            .find(|f| f.token() == token)
            .cloned()
    }

    /// How the tenure `token` ended, once it has (`None` while it lasts).
    pub(crate) fn tenure_end(&self, token: FencingToken) -> Option<LossReason> {
        let core = lock(&self.core);
        if let Some((_, reason)) = core.ends.iter().rev().find(|(f, _)| f.token() == token) {
            return Some(*reason);
        }
        match core.machine.ownership(Instant::now()) {
            // Past its deadline, before the lock's task has heard of it.
            Ownership::Lost { token: t, reason } if t == token => Some(reason),
            _ if core.tenure.as_ref().is_some_and(|f| f.token() == token) && !core.ended => None,
            // Too old to be kept, or the lock stopped: it ended with the lock.
            _ => Some(LossReason::Stopped),
        }
    }

    /// Waits until `done` answers for the published state (and whether the lock has ended).
    pub(crate) async fn wait_for<T>(
        &self,
        mut done: impl FnMut(Ownership, bool) -> Option<T>,
    ) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check: a change right after it still wakes us.
            notified.as_mut().enable();
            let (state, ended) = {
                let core = lock(&self.core);
                let now = Instant::now();
                (core.machine.ownership(now), core.ended)
            };
            if let Some(answer) = done(state, ended) {
                return answer;
            }
            notified.await;
        }
    }

    /// Carries out the actions that need no I/O and no await (publishing, replies, errors),
    /// so that they happen at once, whoever drives; the rest wait for the driver.
    fn apply_local(&self, core: &mut Core) {
        let mut replies = Vec::new();
        while let Some(action) = core.machine.poll_action() {
            match action {
                Action::Publish(state) => self.publish(core, state),
                Action::Reply(to, outcome) => replies.push((to, outcome)),
                Action::KeepError => core.error = core.last_error.clone(),
                other => core.todo.push_back(other),
            }
        }
        // Ended with nothing left to reap: the claim on the key goes now, before anyone hears
        // of the end (a release's caller may lock the same key again at once).
        if core.machine.state() == &State::Ended
            && !core
                .todo
                .iter()
                .any(|a| matches!(a, Action::Reap { .. } | Action::ReapUnseenJoin { .. }))
        {
            core.io.claim = None;
        }
        for (to, outcome) in replies {
            if let Some(at) = core.replies.iter().position(|(id, _)| *id == to) {
                let (_, tx) = core.replies.swap_remove(at);
                let _ = tx.send(self.result(core, outcome));
            }
        }
    }

    fn publish(&self, core: &mut Core, state: Ownership) {
        match state {
            Ownership::Owned { token } | Ownership::Unconfirmed { token, .. }
                if core.tenure.as_ref().is_none_or(|f| f.token() != token) =>
            {
                // The entry the tenure holds: its lease is the fence's.
                let lease = core
                    .machine
                    .held_entry()
                    .filter(|e| e.create_revision == token.as_i64())
                    .map_or(0, |e| e.lease);
                core.tenure = Some(Fence::new(self.key.clone(), lease, token));
            }
            Ownership::Lost { token, reason } => {
                let fence = core
                    .tenure
                    .take()
                    .filter(|f| f.token() == token)
                    .unwrap_or_else(|| Fence::new(self.key.clone(), 0, token));
                core.ends.push_back((fence, reason));
            }
            Ownership::Released | Ownership::Failed { .. } => {
                if let Some(fence) = core.tenure.take() {
                    core.ends.push_back((fence, LossReason::Stopped));
                }
            }
            _ => {}
        }
        if core.ends.len() > ENDS_KEPT {
            core.ends.pop_front();
        }
        if let Some(events) = &core.events {
            let _ = events.send(state);
        }
        match state {
            Ownership::Owned { token } => info!(key = %self.key, %token, "owned"),
            Ownership::Lost { token, reason } => warn!(key = %self.key, %token, %reason, "lost"),
            Ownership::Released => info!(key = %self.key, "released"),
            Ownership::Failed { kind } => warn!(key = %self.key, %kind, "stopped"),
            _ => debug!(key = %self.key, ?state, "published"),
        }
        if let Some(sender) = &core.sender {
            sender.send_replace(state);
        }
        self.changed.notify_waiters();
    }
}

/// A store call (or another wait) in flight, with the input its answer becomes.
type Request = Pin<Box<dyn Future<Output = Input> + Send>>;

/// A store call as a request: its answer as `answer` makes it an input, a failure kept by
/// [`Shared::failed`].
fn call<T>(
    shared: &Arc<Shared>,
    call: impl Future<Output = Result<T>> + Send + 'static,
    answer: impl FnOnce(std::result::Result<T, Failure>) -> Input + Send + 'static,
) -> Option<Request> {
    let shared = shared.clone();
    Some(Box::pin(async move {
        answer(call.await.map_err(|err| shared.failed(err)))
    }))
}

/// Carries out an action on the lock's session: getting one (the locker's, one of its own, or a
/// resumed tenure's lease taken up), or letting it go.
fn session_action(shared: &Arc<Shared>, io: &mut Io, action: Action) -> Option<Request> {
    let key = &shared.key;
    match action {
        Action::OpenSession => {
            let locker = io.locker.clone();
            let dedicated = io.dedicated_ttl;
            let own = io
                .session
                .take()
                .filter(|s| dedicated.is_some() && !s.is_lost());
            if dedicated.is_none() && io.claim.is_none() {
                io.claim = Some(locker.claim_key(key));
            }
            let slot = io.claim.as_ref().map_or(0, KeyClaim::slot);
            session_request(shared, async move {
                match (own, dedicated) {
                    (Some(own), _) => Ok(own),
                    (None, Some(ttl)) => locker.new_session(ttl).await,
                    (None, None) => locker.shared_session(slot).await,
                }
            })
        }
        Action::TakeUpSession { lease } => {
            let locker = io.locker.clone();
            let own = io
                .session
                .take()
                .filter(|s| s.lease() == lease && !s.is_lost());
            session_request(shared, async move {
                match own {
                    Some(own) => Ok(own),
                    None => locker.take_up_session(lease).await,
                }
            })
        }
        Action::LeaveSession(lease) => {
            // Not this lock's lease: unless another lock of this locker took up a tenure under
            // it, the last reference goes, and the keeper stops (a taken-up lease is never
            // revoked).
            io.session.take_if(|s| s.lease() == lease);
            None
        }
        Action::DropSession(lease) => {
            if let Some(session) = io.session.take_if(|s| s.lease() == lease)
                && io.dedicated_ttl.is_none()
            {
                io.locker.forget_shared_session(&session);
            }
            None
        }
        other => {
            debug_assert!(false, "not an action on the session: {other:?}");
            None
        }
    }
}

/// The request of [`Action::TakeUp`]: the backend's `resume`.
fn take_up(
    shared: &Arc<Shared>,
    backend: Arc<dyn LockBackend>,
    entry: String,
    create_revision: Revision,
    mod_revision: Revision,
    value: Vec<u8>,
) -> Option<Request> {
    let key = shared.key.clone();
    call(
        shared,
        async move {
            backend
                .resume(&key, &entry, create_revision, mod_revision, &value)
                .await
        },
        |r| {
            Input::TakenUp(r.map(|taken| match taken {
                Resumption::Resumed(j) => {
                    TakeUp::Taken(Box::new((j.entry, j.predecessor, j.revision)))
                }
                Resumption::Refused(None) => TakeUp::Gone,
                Resumption::Refused(Some(_)) => TakeUp::Written,
            }))
        },
    )
}

/// A request for a session: `session` gets it; the answer tells the machine its view.
fn session_request(
    shared: &Arc<Shared>,
    session: impl Future<Output = Result<Arc<Session>>> + Send + 'static,
) -> Option<Request> {
    let shared = shared.clone();
    Some(Box::pin(async move {
        match session.await {
            Ok(session) => {
                let view = SessionView {
                    lease: session.lease(),
                    ttl: session.ttl(),
                    state: session.state(),
                };
                lock(&shared.core).io.session = Some(session);
                Input::SessionOpened(Ok(view))
            }
            Err(err) => Input::SessionOpened(Err(shared.failed(err))),
        }
    }))
}

/// Until when [`drive`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// Until the lock is held or its attempt ended (an `acquire` on the caller's task).
    Settled,
    /// Until the machine ended (a `release` on the caller's task).
    Ended,
    /// Until nothing is in flight (a `set_value` on the caller's task).
    Idle,
    /// Until the machine ended, letting others drive whenever nothing is in flight (the lock's
    /// own task: a `release` then drives on its caller's task, without a hand-off).
    EndedSharing,
}

/// Drives the machine of `shared` until `until`: carries out its actions (holding the driving
/// token while it does; `token`: the caller holds it already), and feeds it what happens
/// (answers, the session's changes, its timers).
async fn drive(shared: &Arc<Shared>, until: Until, mut token: bool) {
    let mut request: Option<Request> = None;
    // The session's lease, and its receiver until its keeper is gone.
    let mut session: Option<(i64, Option<watch::Receiver<SessionState>>)> = None;
    loop {
        let notified = shared.doorbell.notified();
        tokio::pin!(notified);
        // Registered before looking: whatever comes after the look wakes this loop.
        notified.as_mut().enable();
        let mut unregister = Vec::new();
        let (timeout, done) = {
            let mut core = lock(&shared.core);
            if !token && !core.driving {
                core.driving = true;
                token = true;
            }
            if token {
                shared.apply_local(&mut core);
                while let Some(action) = core.todo.pop_front() {
                    tracing::trace!(key = %shared.key, ?action, "action");
                    if let Some(next) = carry_out(shared, &mut core, action, &mut unregister) {
                        request = Some(next);
                    }
                    shared.apply_local(&mut core);
                }
                if !core.machine.in_flight() {
                    // The machine no longer waits for it (a release dropped a subscription).
                    request = None;
                }
            }
            let lease = core.io.session.as_ref().map(|s| s.lease());
            if session.as_ref().map(|(l, _)| *l) != lease {
                session = core
                    .io
                    .session
                    .as_ref()
                    .map(|s| (s.lease(), Some(s.subscribe())));
            }
            // Ended, its last actions carried out, and nobody else in the middle of some.
            let finished = core.machine.is_ended()
                && core.todo.is_empty()
                && request.is_none()
                && (token || !core.driving);
            let done = match until {
                Until::Settled => core.machine.settled() && core.todo.is_empty(),
                Until::Idle => {
                    request.is_none() && !core.machine.in_flight() && core.todo.is_empty()
                }
                Until::Ended | Until::EndedSharing => finished,
            };
            if request.is_none() && core.todo.is_empty() {
                // Idle: a lock that waits keeps no room it does not use.
                core.machine.shrink();
                core.todo = VecDeque::new();
                if core.replies.is_empty() {
                    core.replies = Vec::new();
                }
            }
            if token && request.is_none() && (done || until == Until::EndedSharing) {
                // Idle (or done): let someone else drive meanwhile.
                core.driving = false;
                token = false;
                if finished {
                    unregister.extend(shared.finish(&mut core));
                }
                if until != Until::EndedSharing {
                    // A caller gives the driving back: the lock's task may have work waiting.
                    shared.doorbell.notify_waiters();
                }
            }
            (core.machine.poll_timeout(), done)
        };
        drop(unregister);
        if done && request.is_none() {
            return;
        }
        let input = tokio::select! {
            biased;
            answer = async { request.as_mut().expect("a request").await }, if request.is_some() => {
                request = None;
                Some(answer)
            }
            () = &mut notified => None,
            changed = async {
                let rx = session.as_mut().and_then(|(_, rx)| rx.as_mut()).expect("a receiver");
                rx.changed().await.map(|()| *rx.borrow_and_update())
            }, if session.as_ref().is_some_and(|(_, rx)| rx.is_some()) => match changed {
                Ok(state) => Some(Input::SessionChanged(state)),
                // The session's keeper is gone: its last state stands.
                Err(_) => {
                    if let Some((_, rx)) = session.as_mut() {
                        *rx = None;
                    }
                    None
                }
            },
            () = sleep_until(timeout), if timeout.is_some() => {
                let mut core = lock(&shared.core);
                core.machine.handle_timeout(Instant::now());
                shared.apply_local(&mut core);
                None
            }
        };
        if let Some(input) = input {
            tracing::trace!(key = %shared.key, ?input, "input");
            let mut core = lock(&shared.core);
            core.machine.handle(input, Instant::now());
            shared.apply_local(&mut core);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Carries out one action that needs the driver's resources: a store call becomes a request
/// whose answer is an input; the rest is done at once.
fn carry_out(
    shared: &Arc<Shared>,
    core: &mut Core,
    action: Action,
    unregister: &mut Vec<Registration>,
) -> Option<Request> {
    let io = &mut core.io;
    let backend = io.locker.inner.backend.clone();
    let key = shared.key.clone();
    match action {
        Action::OpenSession
        | Action::TakeUpSession { .. }
        | Action::LeaveSession(_)
        | Action::DropSession(_) => session_action(shared, io, action),
        Action::TakeUp {
            entry,
            create_revision,
            mod_revision,
            value,
        } => take_up(shared, backend, entry, create_revision, mod_revision, value),
        Action::Subscribe => {
            unregister.extend(io.registration.take());
            let locker = io.locker.clone();
            let shared = shared.clone();
            Some(Box::pin(async move {
                let sink: Arc<dyn Sink> = shared.clone();
                match locker.inner.hub.register(key, sink).await {
                    Ok(registration) => {
                        let mut core = lock(&shared.core);
                        let stale = core.io.registration.replace(registration);
                        drop(core);
                        drop(stale);
                        Input::Subscribed(Ok(()))
                    }
                    Err(err) => Input::Subscribed(Err(shared.failed(err))),
                }
            }))
        }
        Action::Unsubscribe => {
            // Dropped outside the lock: unregistering locks the hub, which delivers to us.
            unregister.extend(io.registration.take());
            None
        }
        Action::Join { lease, value } => call(
            shared,
            async move { backend.join(&key, lease, &value).await },
            |r| Input::Joined(r.map(|j| (j.entry, j.predecessor, j.revision))),
        ),
        Action::Update {
            entry,
            create_revision,
            value,
        } => call(
            shared,
            async move { backend.update_value(&entry, create_revision, &value).await },
            Input::Updated,
        ),
        Action::Position {
            entry,
            create_revision,
        } => call(
            shared,
            async move { backend.position(&key, &entry, create_revision).await },
            |r| Input::Positioned(r.map(|p| (p.own, p.predecessor, p.revision))),
        ),
        Action::Delete {
            entry,
            create_revision,
        } => call(
            shared,
            async move { backend.delete_entry(&entry, create_revision).await },
            Input::Deleted,
        ),
        Action::CheckLease { lease } => call(
            shared,
            async move { backend.keep_alive(lease).await },
            |r| Input::LeaseChecked(r.map(|ttl| ttl.is_some())),
        ),
        Action::Reap {
            entry,
            create_revision,
            lease,
            after,
        } => {
            if io.abandoned == Some(lease) {
                return None; // a session of its own, abandoned: the entry goes with it
            }
            let ended = core.machine.state() == &State::Ended;
            let job = Job {
                target: Target::Entry {
                    key: entry,
                    create_revision,
                },
                session: io.session.clone().filter(|s| s.lease() == lease),
                after,
                // The last thing a lock leaves takes its claim on the key along.
                claim: if ended { io.claim.take() } else { None },
            };
            io.locker.reap(job);
            None
        }
        Action::ReapUnseenJoin { entry, lease } => {
            let ended = core.machine.state() == &State::Ended;
            let session = io.session.clone().filter(|s| s.lease() == lease);
            let again_after = session.as_ref().map_or(io.locker.ttl(), |s| s.ttl());
            io.locker.reap(Job {
                target: Target::UnseenJoin {
                    queue: key,
                    key: entry,
                    again_after,
                },
                session,
                after: Duration::ZERO,
                claim: if ended { io.claim.take() } else { None },
            });
            None
        }
        Action::AbandonSession => {
            // A session of its own is not renewed any more; a taken-up lease (which other locks
            // may share) is left to the reaper, as a shared session's entries are.
            if io.dedicated_ttl.is_some()
                && let Some(session) = &io.session
                && session.is_ours()
            {
                session.abandon();
                io.abandoned = Some(session.lease());
            }
            None
        }
        // Done by `apply_local`.
        Action::Publish(_) | Action::Reply(..) | Action::KeepError => None,
    }
}

impl Shared {
    /// Maps a failed call for the machine, keeping the error.
    fn failed(&self, err: Error) -> Failure {
        let failure = match &err {
            Error::LeaseLost { .. } => Failure::LeaseLost,
            _ => match err.failure_kind() {
                None => Failure::Retryable,
                Some(kind) => Failure::Permanent(kind),
            },
        };
        if failure == Failure::Retryable {
            debug!(key = %self.key, error = %err, "store call failed; retrying");
        } else {
            warn!(key = %self.key, error = %err, "store call failed");
        }
        lock(&self.core).last_error = Some(err);
        failure
    }

    /// The machine ended: nothing more changes; the session, the claim and the waiting callers
    /// go (a session of its own is revoked when its last reference goes). Answers the
    /// registration, to drop once the lock is let go of (unregistering locks the hub, which
    /// delivers to us).
    fn finish(&self, core: &mut Core) -> Option<Registration> {
        if core.ended {
            return None;
        }
        core.ended = true;
        core.sender = None;
        core.events = None;
        core.io.session = None;
        core.io.claim = None;
        for (_, tx) in core.replies.drain(..) {
            let _ = tx.send(Err(self.closed()));
        }
        self.changed.notify_waiters();
        core.io.registration.take()
    }
}

/// Starts the lock's own task: it drives whenever nobody else does, until the machine ends.
pub(crate) fn spawn_task(shared: Arc<Shared>) {
    {
        let mut core = lock(&shared.core);
        if core.task || core.ended {
            return;
        }
        core.task = true;
    }
    tokio::spawn(async move {
        let task = TaskGuard(shared.clone());
        drive(&shared, Until::EndedSharing, false).await;
        drop(task);
    });
}

/// Marks the task gone however it ends; a task that went with its runtime before the machine
/// ended lets readers go (nothing more will change).
struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mut core = lock(&self.0.core);
        core.task = false;
        let registration = self.0.finish(&mut core);
        drop(core);
        drop(registration);
    }
}

/// Drives on the caller's task (an `acquire` until held, a `release` until done). `false` if
/// someone else is driving (a request in flight on the lock's task): then the caller waits for
/// the lock's task instead. If the caller's future is dropped half-way, the answer in flight is
/// abandoned and the lock's task takes over.
pub(crate) async fn drive_here(shared: &Arc<Shared>, until: Until) -> bool {
    {
        let mut core = lock(&shared.core);
        if core.driving {
            return false;
        }
        core.driving = true;
    }
    let mut guard = HandOver {
        shared,
        done: false,
    };
    drive(shared, until, true).await;
    guard.done = true;
    true
}

struct HandOver<'a> {
    shared: &'a Arc<Shared>,
    done: bool,
}

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let mut core = lock(&self.shared.core);
        if !self.done && core.driving {
            // Cancelled half-way: the request in flight (if any) will never be answered.
            if core.machine.in_flight() {
                core.machine.handle(Input::Abandoned, Instant::now());
                self.shared.apply_local(&mut core);
            }
            core.driving = false;
        }
        let ended = core.is_done();
        let registration = if ended {
            self.shared.finish(&mut core)
        } else {
            None
        };
        drop(core);
        drop(registration);
        self.shared.doorbell.notify_waiters();
        if !ended && tokio::runtime::Handle::try_current().is_ok() {
            spawn_task(self.shared.clone());
        }
    }
}

impl Sink for Shared {
    fn deliver(&self, msg: HubMsg) {
        let input = match msg {
            // A lock's registration is on the hub's deletes-only watch: only deletes move a
            // lock (its own entry's, its predecessor's).
            HubMsg::Event(event) if event.kind == EventKind::Delete => Input::EntryDeleted {
                key: event.entry.key,
                revision: event.entry.mod_revision,
            },
            HubMsg::Event(_) => return,
            HubMsg::Resync => Input::Resync,
        };
        self.input(input);
    }

    fn close(&self) {
        self.input(Input::WatchClosed);
    }
}

/// The loss reason a late release reports, for a `LossReason` the machine gave.
pub(crate) fn not_owned(key: &str, reason: LossReason) -> Error {
    Error::NotOwned {
        key: key.to_owned(),
        reason,
    }
}

impl Shared {
    /// A command's outcome as its caller's result: a failure answers the error of the call that
    /// failed (the last one, as the machine answers right after it).
    fn result(&self, core: &Core, outcome: Outcome) -> Result<()> {
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::NotOwned(reason) => Err(not_owned(&self.key, reason)),
            Outcome::Failed => Err(core
                .last_error
                .clone()
                .or_else(|| core.error.clone())
                .unwrap_or_else(|| self.closed())),
            Outcome::Stopped => Err(self.closed()),
        }
    }
}

/// The caller's result of a command, from its reply (a reply never sent: the lock stopped).
pub(crate) fn outcome(
    shared: &Shared,
    reply: Result<Result<()>, oneshot::error::RecvError>,
) -> Result<()> {
    reply.unwrap_or_else(|_| Err(shared.closed()))
}
