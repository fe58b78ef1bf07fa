//! The ownership state machine of one lock, with no I/O, no clock and no tasks (sans-IO, as
//! quinn-proto's `Connection` and raft-rs's `RawNode`).
//!
//! A [`Machine`] is driven from outside (by [`driver`](crate::driver)): every input comes with
//! the time it happened ([`Machine::handle`], [`Machine::handle_timeout`]); the machine answers
//! with [`Action`]s to carry out ([`Machine::poll_action`]: store requests, states to publish,
//! replies, clean-ups) and the instant of its next timer ([`Machine::poll_timeout`]). At most one
//! store request is in flight, and its answer comes back as an input: the answer itself, or
//! [`Input::Abandoned`] if it will never come. Commands and events that cannot be served while a
//! request is in flight wait for its answer.
//!
//! Whether the lock is owned at an instant is decided in one place, [`Machine::ownership`]: held
//! ([`State::Holding`]) and the session's local deadline not passed. Whether an entry holds the
//! lock is decided in one place too, [`holds`]: it has no predecessor (a counting semaphore or a
//! read-write lock changes that decision, not the machine).
//!
//! # States
//!
//! ```text
//!        OpenSession          Subscribe               Join                   Position
//!  Idle ─────────────► Opening ─────────► Subscribing ─────► Joining ──► Waiting ◄─────► Positioning
//!   ▲  ▲                                                        │ first     │ first          │
//!   │  └── back-off after a failed call                         └───────────┴──► Holding ◄───┘
//!   │                                                                              │   │ Release
//!   └─────────── a loss (a handle joins again) ◄───────────────────────────────────┘   ▼
//!                                       Ended ◄──── a guard's loss, a failure ─── Releasing
//! ```
//!
//! | state | waits for | on its answer | on other inputs |
//! |---|---|---|---|
//! | `Idle` | the back-off's end | – | `Release`, `Abandon`: end. `SetValue`: the new value |
//! | `Opening` | a session | valid: `Subscribing`; lease already gone: `Idle`; error: back-off in `Idle` | commands wait |
//! | `Subscribing` | the queue's watch | `Joining` | `Release`/`Abandon` end at once (the answer is dropped) |
//! | `Joining` | the join | value changed since: `Refreshing`; first in the queue: `Holding`; behind (a try: give up): `Waiting`; lease gone: `Idle`; error: back-off in `Idle` (the entry may exist: the same lease finds it again, an end reaps it) | commands wait |
//! | `Refreshing` | the update of the value | as `Joining`'s answer; the entry gone: join again | commands wait |
//! | `Waiting` | a delete of its predecessor or of itself, or a resync | – | the delete, a resync: `Positioning`. Watch closed: `Idle` (join again). Lease gone: reap, `Idle`. `Release`: `Releasing`. `Abandon`: end, reaped after the TTL. `SetValue`: update |
//! | `Positioning` | the read | first: `Holding`; behind: `Waiting`; gone: `Idle`; error: back-off, read again | commands wait |
//! | `Holding` | a change of the session, a delete, its deadline | (a check after a resync: still there, or `Gone`) | `Live`/`Unconfirmed`: published. Lease gone, deadline passed: **a loss**. Own entry deleted: `Gone`. Resync: check the entry. Watch closed: subscribe again, then check. `Release`: `Releasing`. `Abandon`: end. `SetValue`: update (gone: `Gone`) |
//! | `Gone` | the lookup of the entry's lease (not owned meanwhile: `Ownership::Ending`) | lease alive: **a loss**, `EntryDeleted`; lease gone: **a loss**, `LeaseGone`; no answer: what the session knows, else `EntryDeleted` | the session's end answers it the same way; commands wait |
//! | `Releasing` | the delete | deleted (or gone with the lease): end; a guard's entry found gone: `Gone` (the release answers why); no answer: back-off, delete again | commands wait |
//! | `Ended` | nothing | – | commands are answered at once |
//!
//! **A loss** publishes [`Ownership::Lost`] with its reason (every tenure's end is an action of
//! its own: nothing coalesces it away), hands the entry to the locker's reaper (a guarded delete:
//! the store may still have it), forgets the session if its lease is gone, and then a handle
//! ([`Mode::Persistent`]) joins again while a guard ends. A **permanent** store error stops
//! handles and guards alike ([`Ownership::Failed`]; the driver keeps the error for
//! [`wait_owned`](crate::LockHandle::wait_owned)); a retryable one waits out a jittered
//! [`Backoff`] and tries again (a `try_acquire` gives up at once).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

#[cfg(test)]
#[path = "machine_model.rs"]
mod model;

use crate::backend::{Entry, LeaseId, Revision, entry_key};
use crate::error::{FailureKind, LossReason};
use crate::retry::Backoff;
use crate::session::SessionState;
use crate::types::{FencingToken, Ownership};

/// How long a lock keeps at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    /// A handle: keeps trying to own until released; joins again after a loss.
    Persistent,
    /// A guard from `acquire`: waits to own; stops at the first loss.
    Once,
    /// A guard from `try_acquire`: owns at once or gives up.
    TryOnce,
}

/// How a store call failed, as far as the machine needs to know (the error itself stays with
/// the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Failure {
    /// The lease named is gone from the store.
    LeaseLost,
    /// Worth trying again (unreachable, timed out, cut off).
    Retryable,
    /// Trying again will not help (permission denied, invalid argument).
    Permanent(FailureKind),
}

/// What a command is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    /// Done.
    Done,
    /// Ownership had ended before the release, or the entry was found gone: why.
    NotOwned(LossReason),
    /// The lock stopped before the command could be served.
    Stopped,
    /// The store failed (the driver has the error).
    Failed,
}

/// Who waits for a command's answer (the driver keeps the channel).
pub(crate) type ReplyTo = u32;

/// A user's command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Command {
    /// Delete the entry now and stop (`Some`: someone waits for the answer).
    Release(Option<ReplyTo>),
    /// Stop without deleting: the entry goes with its lease.
    Abandon,
    /// Use this value from now on, and write it to the entry there is.
    SetValue(Vec<u8>, ReplyTo),
}

/// The session a lock is under, as the machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionView {
    /// Its lease.
    pub(crate) lease: LeaseId,
    /// Its TTL.
    pub(crate) ttl: Duration,
    /// The last state heard of.
    pub(crate) state: SessionState,
}

/// A tenure exported by another process (a `ResumeToken`), for this lock to take up: the
/// entry `key/<lease>` with its create revision (the token), last written at `mod_revision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Exported {
    /// The entry's lease.
    pub(crate) lease: LeaseId,
    /// The entry's create revision: the tenure's token.
    pub(crate) create_revision: Revision,
    /// The revision of the entry's last write when the token was exported.
    pub(crate) mod_revision: Revision,
}

/// How taking up an exported tenure went.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TakeUp {
    /// Taken up: the entry as it is now, its predecessor, the revision of the write.
    Taken(Box<(Entry, Option<Entry>, Revision)>),
    /// The entry is gone.
    Gone,
    /// The entry was written since the token was exported (another process took it up).
    Written,
}

/// An input: an answer to the request in flight, a change of the world, or a command.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Input {
    /// Answer to [`Action::OpenSession`].
    SessionOpened(Result<SessionView, Failure>),
    /// Answer to [`Action::Subscribe`].
    Subscribed(Result<(), Failure>),
    /// Answer to [`Action::Join`]: the entry, its predecessor, the revision read at.
    Joined(Result<(Entry, Option<Entry>, Revision), Failure>),
    /// Answer to [`Action::Update`]: the revision of the write, or `None` if the entry was not
    /// there.
    Updated(Result<Option<Revision>, Failure>),
    /// Answer to [`Action::Position`]: the entry if it is still there, its predecessor, the
    /// revision read at.
    Positioned(Result<(Option<Entry>, Option<Entry>, Revision), Failure>),
    /// Answer to [`Action::Delete`]: whether it deleted the entry.
    Deleted(Result<bool, Failure>),
    /// Answer to [`Action::CheckLease`]: whether the lease is still alive in the store.
    LeaseChecked(Result<bool, Failure>),
    /// Answer to [`Action::TakeUp`].
    TakenUp(Result<TakeUp, Failure>),
    /// The answer to the request in flight will never come (the call was cancelled).
    Abandoned,
    /// The session's state changed.
    SessionChanged(SessionState),
    /// An entry of the queue was deleted, at `revision`.
    EntryDeleted {
        /// The entry's key.
        key: String,
        /// The revision of the delete.
        revision: Revision,
    },
    /// The queue's watch lost history: what it said may be stale.
    Resync,
    /// The queue's watch stopped: subscribe again.
    WatchClosed,
    /// A user's command.
    Command(Command),
}

/// What the machine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Action {
    /// Get a session (a live lease); answer [`Input::SessionOpened`], and from then on every
    /// change of it as [`Input::SessionChanged`].
    OpenSession,
    /// The session's lease is gone (or its deadline passed): never use it again.
    DropSession(LeaseId),
    /// Keep the exported tenure's lease alive from now on (it is answered as a session, with
    /// [`Input::SessionOpened`]), after checking in the store that it lives.
    TakeUpSession {
        /// The exported tenure's lease.
        lease: LeaseId,
    },
    /// Stop using this session without revoking its lease: it is not this lock's (an exported
    /// tenure that could not be taken up: another process may hold entries under it).
    LeaveSession(LeaseId),
    /// Take up the exported tenure's entry, writing the value, if nobody wrote it since it was
    /// exported; answer [`Input::TakenUp`].
    TakeUp {
        /// The entry's key.
        entry: String,
        /// Its create revision.
        create_revision: Revision,
        /// The revision of its last write when it was exported.
        mod_revision: Revision,
        /// The value.
        value: Vec<u8>,
    },
    /// Subscribe to the queue's changes; answer [`Input::Subscribed`] once every change after a
    /// later read is sure to come.
    Subscribe,
    /// Stop listening to the queue.
    Unsubscribe,
    /// Join the queue; answer [`Input::Joined`].
    Join {
        /// The session's lease.
        lease: LeaseId,
        /// The value.
        value: Vec<u8>,
    },
    /// Write `value` to the entry if it still has `create_revision`; answer [`Input::Updated`].
    Update {
        /// The entry's key.
        entry: String,
        /// Its create revision.
        create_revision: Revision,
        /// The value.
        value: Vec<u8>,
    },
    /// Read where the entry stands; answer [`Input::Positioned`].
    Position {
        /// The entry's key.
        entry: String,
        /// Its create revision.
        create_revision: Revision,
    },
    /// Delete the entry if it still has `create_revision`; answer [`Input::Deleted`].
    Delete {
        /// The entry's key.
        entry: String,
        /// Its create revision.
        create_revision: Revision,
    },
    /// Ask the store whether `lease` is alive (one lookup, on the path of a loss only); answer
    /// [`Input::LeaseChecked`]. Tells a lease that ended in the store (revoked, expired) from an
    /// entry that someone else deleted.
    CheckLease {
        /// The lease of the entry found gone.
        lease: LeaseId,
    },
    /// Hand the entry to the locker's reaper: a guarded delete in the background, after
    /// `after`, retried until done or until the lease ends.
    Reap {
        /// The entry's key.
        entry: String,
        /// Its create revision.
        create_revision: Revision,
        /// The lease it is under.
        lease: LeaseId,
        /// How long to wait first (an abandoned entry goes when its lease would have expired).
        after: Duration,
    },
    /// A join under `lease` may have gone through unseen: have the reaper look for `entry` and
    /// delete it.
    ReapUnseenJoin {
        /// The key the join's entry would have.
        entry: String,
        /// The lease.
        lease: LeaseId,
    },
    /// Stop renewing this lock's own session without revoking it (an abandon).
    AbandonSession,
    /// Publish this state.
    Publish(Ownership),
    /// Answer a command.
    Reply(ReplyTo, Outcome),
    /// The lock stops on the store call that just failed: keep its error (for every
    /// `wait_owned`, and the replies after the end).
    KeepError,
}

/// Where the lock is. See the [module docs](self) for what each state waits for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum State {
    /// To (re)start: a session first. A back-off may be in progress.
    Idle,
    /// Asked for a session.
    Opening,
    /// Subscribing to the queue.
    Subscribing,
    /// The join is sent; until its answer the entry may or may not be there.
    Joining,
    /// The join found the entry from before with an older value: writing the value.
    Refreshing {
        /// The entry, its predecessor, and the revision of the join.
        joined: Box<(Entry, Option<Entry>, Revision)>,
    },
    /// In the queue behind `predecessor`, waiting for its delete (or its own).
    Waiting {
        /// The lock's own entry.
        entry: Entry,
        /// The key of the entry just before it.
        predecessor: String,
        /// The revision it was read at: only later deletes count.
        read_at: Revision,
        /// A delete or a resync came while a request was in flight: read again after it.
        moved: bool,
    },
    /// Reading where the entry stands.
    Positioning {
        /// The lock's own entry.
        entry: Entry,
    },
    /// Holding the lock: owned while the session's deadline has not passed.
    Holding {
        /// The lock's own entry; its create revision is the fencing token.
        entry: Entry,
        /// Whether the entry must be checked (history was lost), and how far that is.
        check: Check,
    },
    /// The entry of the tenure in progress, or of a release, was found gone from the store:
    /// a lookup of its lease says why ([`Action::CheckLease`]). Not owned meanwhile.
    Gone {
        /// The entry.
        entry: Entry,
        /// Commands that wait for the reason.
        replies: Vec<ReplyTo>,
        /// The lock was released before (and said so): only the replies are answered.
        released: bool,
    },
    /// Deleting the entry to release.
    Releasing {
        /// The entry.
        entry: Entry,
        /// Who waits for the answer.
        reply: Option<ReplyTo>,
        /// Ownership had already ended before the release: why (the answer says so).
        late: Option<LossReason>,
    },
    /// Nothing more happens.
    Ended,
}

/// The check of a held entry after its watch lost history or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Check {
    /// Not needed.
    No,
    /// The watch closed: subscribe again, then read.
    Resubscribe,
    /// Subscribing again (a close meanwhile makes it `Resubscribe` again).
    Subscribing,
    /// Read the entry as soon as nothing is in flight.
    Read,
    /// Reading it.
    Reading,
}

/// How the queue's watch failed while a join or a read was in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Gap {
    /// History was lost: read again.
    Resync,
    /// The watch closed: subscribe again.
    Closed,
}

/// The request whose answer the machine waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pending {
    Session,
    Subscribe,
    Join(LeaseId),
    /// An update, for a `SetValue` (with its reply) or to refresh a retried join's value.
    Update(Option<ReplyTo>),
    Position,
    Delete,
    CheckLease,
    TakeUp,
}

/// The ownership state machine of one lock. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Machine {
    key: Arc<str>,
    value: Vec<u8>,
    mode: Mode,
    state: State,
    session: Option<SessionView>,
    pending: Option<Pending>,
    /// Commands that came while a request was in flight.
    queued: VecDeque<Command>,
    /// A join whose answer was not seen: the entry under this lease may exist.
    unseen_join: Option<LeaseId>,
    /// Deletes in the queue seen while a join or a read was in flight (key, revision): those
    /// after the read's revision still count once its answer is known.
    deletes_seen: Vec<(String, Revision)>,
    /// The queue's watch lost history or closed while a join or a read was in flight: read (or
    /// subscribe) again once its answer is known.
    watch_gap: Option<Gap>,
    /// The state published last.
    published: Ownership,
    backoff: Backoff,
    /// When the back-off in progress ends.
    retry_at: Option<Instant>,
    actions: VecDeque<Action>,
    /// An exported tenure to take up, until it is (or cannot be).
    exported: Option<Exported>,
}

impl Machine {
    /// A machine for the lock on `key` with `value`, in `mode`, retrying with `backoff`. Its
    /// first action asks for a session.
    #[cfg(test)]
    pub(crate) fn new(key: Arc<str>, value: Vec<u8>, mode: Mode, backoff: Backoff) -> Self {
        Machine::taking_up(key, value, mode, backoff, None)
    }

    /// A machine that first takes up the tenure another process exported (`Some`), continuing
    /// it with the same token if its lease lives and nobody wrote its entry since; else it
    /// reports that tenure's loss, and then a handle joins as any other.
    pub(crate) fn taking_up(
        key: Arc<str>,
        value: Vec<u8>,
        mode: Mode,
        backoff: Backoff,
        exported: Option<Exported>,
    ) -> Self {
        let mut machine = Machine {
            key,
            value,
            mode,
            state: State::Idle,
            session: None,
            pending: None,
            queued: VecDeque::new(),
            unseen_join: None,
            deletes_seen: Vec::new(),
            watch_gap: None,
            published: Ownership::Acquiring,
            backoff,
            retry_at: None,
            actions: VecDeque::new(),
            exported,
        };
        machine.open_session();
        machine
    }

    /// The lock key.
    pub(crate) fn key(&self) -> &Arc<str> {
        &self.key
    }

    /// Where the lock is.
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// The entry of the tenure in progress (or just found gone).
    pub(crate) fn held_entry(&self) -> Option<&Entry> {
        match &self.state {
            State::Holding { entry, .. }
            | State::Gone {
                entry,
                released: false,
                ..
            } => Some(entry),
            _ => None,
        }
    }

    /// The state published last.
    pub(crate) fn published(&self) -> Ownership {
        self.published
    }

    /// Whether a request is in flight (its answer is awaited).
    pub(crate) fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether nothing more will happen (ended, every action taken).
    pub(crate) fn is_ended(&self) -> bool {
        self.state == State::Ended && self.actions.is_empty()
    }

    /// Whether the lock is held (or its attempt ended) with nothing in flight: where `acquire`
    /// leaves the driving to a task of the lock's own.
    pub(crate) fn settled(&self) -> bool {
        matches!(self.state, State::Holding { .. } | State::Ended) && self.pending.is_none()
    }

    /// **The** decision of whether the lock is owned at `now`: held, and the session's local
    /// deadline not passed. Every reader asks this; otherwise it answers the state published
    /// last.
    pub(crate) fn ownership(&self, now: Instant) -> Ownership {
        let entry = match &self.state {
            State::Holding { entry, .. } => entry,
            State::Gone {
                entry,
                released: false,
                ..
            } => {
                return Ownership::Ending {
                    token: FencingToken(entry.create_revision),
                };
            }
            _ => return self.published,
        };
        let token = FencingToken(entry.create_revision);
        match self.session.map(|s| s.state) {
            Some(SessionState::Live { deadline }) if now < deadline => Ownership::Owned { token },
            Some(SessionState::Unconfirmed { deadline }) if now < deadline => {
                Ownership::Unconfirmed { token, deadline }
            }
            Some(SessionState::Lost(LossReason::LeaseGone)) => Ownership::Lost {
                token,
                reason: LossReason::LeaseGone,
            },
            _ => Ownership::Lost {
                token,
                reason: LossReason::DeadlinePassed,
            },
        }
    }

    /// The next action to carry out, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Gives back the room of its queues while they are empty (a held lock that waits keeps
    /// nothing it does not need; the driver calls this when it goes idle).
    pub(crate) fn shrink(&mut self) {
        if self.actions.is_empty() {
            self.actions = VecDeque::new();
        }
        if self.queued.is_empty() {
            self.queued = VecDeque::new();
        }
        if self.deletes_seen.is_empty() {
            self.deletes_seen = Vec::new();
        }
    }

    /// When [`Machine::handle_timeout`] is due: the end of a back-off, or a held lock's local
    /// deadline.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let deadline = match (&self.state, self.session.map(|s| s.state)) {
            (
                State::Holding { .. },
                Some(SessionState::Live { deadline } | SessionState::Unconfirmed { deadline }),
            ) => Some(deadline),
            _ => None,
        };
        match (self.retry_at, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passed: at `now`, a held lock whose deadline passed is lost, and a back-off that is
    /// over goes on.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.state, State::Holding { .. }) && !self.ownership(now).is_owned() {
            self.lose(LossReason::DeadlinePassed);
        }
        if self.retry_at.is_some_and(|at| now >= at) {
            self.retry_at = None;
            if self.pending.is_none() {
                self.resume();
            }
        }
    }

    /// Takes `input`, which happened at `now`.
    pub(crate) fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Command(command) => self.command(command, now),
            Input::SessionChanged(state) => self.session_changed(state, now),
            Input::EntryDeleted { key, revision } => self.entry_deleted(&key, revision),
            Input::Resync => self.moved(),
            Input::WatchClosed => self.watch_closed(),
            answer => {
                // An answer to a request the machine gave up on (a release dropped a
                // subscription while its answer was on its way): nothing to do.
                let Some(pending) = self.pending.take() else {
                    return;
                };
                self.answer(pending, answer, now);
                self.after_request(now);
            }
        }
    }

    // --- requests and answers ------------------------------------------------------------

    fn request(&mut self, pending: Pending, action: Action) {
        debug_assert!(self.pending.is_none(), "two requests in flight");
        self.pending = Some(pending);
        self.actions.push_back(action);
    }

    fn publish(&mut self, state: Ownership) {
        if self.published != state {
            self.published = state;
            self.actions.push_back(Action::Publish(state));
        }
    }

    fn open_session(&mut self) {
        self.state = State::Opening;
        let action = match self.exported {
            Some(exported) => Action::TakeUpSession {
                lease: exported.lease,
            },
            None => Action::OpenSession,
        };
        self.request(Pending::Session, action);
    }

    /// A new attempt from the start: a handle after a loss, anyone after a failed call.
    fn restart(&mut self) {
        self.deletes_seen.clear();
        self.watch_gap = None;
        self.publish(Ownership::Acquiring);
        self.open_session();
    }

    /// What was deferred while a request was in flight: the next step, then the commands.
    fn after_request(&mut self, now: Instant) {
        if self.pending.is_none() && self.retry_at.is_none() {
            self.resume();
        }
        while self.pending.is_none()
            && let Some(command) = self.queued.pop_front()
        {
            self.command(command, now);
        }
    }

    /// A store call failed: try `state`'s step again after a back-off, or give up.
    fn failed(&mut self, failure: Failure, state: State, now: Instant) {
        self.state = state;
        match failure {
            Failure::Permanent(kind) => {
                self.actions.push_back(Action::KeepError);
                self.stop(Ownership::Failed { kind });
            }
            _ if self.mode == Mode::TryOnce => {
                self.actions.push_back(Action::KeepError);
                self.stop(Ownership::Released);
            }
            _ => self.retry_at = Some(now + self.backoff.next_delay()),
        }
    }

    /// With nothing in flight and no back-off in progress: the next step of the state, if it has
    /// one (what failed, or what was deferred).
    fn resume(&mut self) {
        match self.state.clone() {
            State::Idle => self.restart(),
            State::Positioning { entry }
            | State::Waiting {
                entry, moved: true, ..
            } => self.position(entry),
            State::Holding { .. } => self.check_if_due(),
            State::Releasing { entry, .. } => self.request(Pending::Delete, delete(&entry)),
            State::Gone { entry, .. } => self.check_lease(&entry),
            _ => {}
        }
    }

    fn answer(&mut self, pending: Pending, answer: Input, now: Instant) {
        if let State::Gone { replies, .. } = &mut self.state
            && pending != Pending::CheckLease
        {
            // An answer from before the entry was found gone: a value update waits for the
            // reason with the rest; anything else is moot.
            if let Pending::Update(Some(reply)) = pending {
                replies.push(reply);
            }
            return;
        }
        match (pending, answer) {
            (Pending::Session, Input::SessionOpened(Ok(session))) => {
                if session.state.valid_at(now) {
                    self.session = Some(session);
                    self.state = State::Subscribing;
                    self.request(Pending::Subscribe, Action::Subscribe);
                } else {
                    self.actions.push_back(Action::DropSession(session.lease));
                    self.restart();
                }
            }
            (Pending::Session, Input::SessionOpened(Err(Failure::LeaseLost)))
                if self.exported.is_some() =>
            {
                self.not_taken_up(LossReason::LeaseGone);
            }
            (Pending::Session, Input::SessionOpened(Err(failure))) => {
                self.failed(failure, State::Idle, now);
            }
            (Pending::TakeUp, Input::TakenUp(result)) => self.taken_up(result, now),
            (Pending::Subscribe, Input::Subscribed(Ok(()))) => match self.state {
                State::Subscribing => self.join(),
                // Subscribed again: read the entry (a close that came meanwhile left
                // `Resubscribe`, which stays due).
                State::Holding {
                    check: Check::Subscribing,
                    ..
                } => self.set_check(Check::Read),
                _ => {}
            },
            (Pending::Subscribe, Input::Subscribed(Err(failure))) => match self.state {
                State::Subscribing => self.failed(failure, State::Idle, now),
                State::Holding { .. } => self.failed_while_holding(failure, now),
                _ => {}
            },
            (Pending::Join(_), Input::Joined(Ok(joined))) => {
                self.unseen_join = None;
                self.backoff.reset();
                if joined.0.value == self.value {
                    self.joined(joined.0, joined.1, joined.2, now);
                } else {
                    // A retried join found the entry from before, with an older value.
                    let update = update(&joined.0, &self.value);
                    self.state = State::Refreshing {
                        joined: Box::new(joined),
                    };
                    self.request(Pending::Update(None), update);
                }
            }
            (Pending::Join(lease), Input::Joined(Err(Failure::LeaseLost))) => {
                self.unseen_join = None;
                self.session = None;
                self.actions.push_back(Action::DropSession(lease));
                self.restart();
            }
            (Pending::Join(lease), Input::Joined(Err(failure))) => {
                // The join may have gone through: a retry under the same lease finds the entry,
                // and the end of the lock reaps it.
                self.unseen_join = Some(lease);
                self.failed(failure, State::Idle, now);
            }
            (Pending::Update(reply), Input::Updated(result)) => self.updated(reply, result, now),
            (Pending::Position, Input::Positioned(Ok((own, predecessor, revision)))) => {
                self.backoff.reset();
                self.positioned(own, predecessor, revision, now);
            }
            (Pending::Position, Input::Positioned(Err(Failure::LeaseLost))) => {
                self.entry_gone(LossReason::LeaseGone)
            }
            (Pending::Position, Input::Positioned(Err(failure))) => match self.state.clone() {
                State::Holding { .. } => self.failed_while_holding(failure, now),
                state => self.failed(failure, state, now),
            },
            (Pending::Delete, Input::Deleted(result)) => self.deleted(result, now),
            (Pending::CheckLease, Input::LeaseChecked(result)) => self.lease_checked(result),
            (pending, Input::Abandoned) => self.abandoned(pending, now),
            (pending, answer) => debug_assert!(false, "answer {answer:?} to {pending:?}"),
        }
    }

    /// The answer to `pending` will never come.
    fn abandoned(&mut self, pending: Pending, now: Instant) {
        match pending {
            Pending::Join(lease) => {
                self.unseen_join = Some(lease);
                self.failed(Failure::Retryable, State::Idle, now);
            }
            Pending::Delete => {
                // A release cancelled half-way: the reaper finishes it.
                if let State::Releasing { entry, reply, .. } = self.state.clone() {
                    self.reap(&entry, Duration::ZERO);
                    if let Some(reply) = reply {
                        self.actions
                            .push_back(Action::Reply(reply, Outcome::Stopped));
                    }
                    self.end();
                }
            }
            Pending::Update(Some(reply)) => {
                self.actions
                    .push_back(Action::Reply(reply, Outcome::Stopped));
            }
            Pending::Update(None) => {
                if let State::Refreshing { joined } = self.state.clone() {
                    self.joined(joined.0, joined.1, joined.2, now);
                }
            }
            Pending::CheckLease => {
                let reason = self.reason_unchecked();
                self.gone_because(reason);
            }
            // The write may have reached the store: a take-up tried again may find the entry
            // written since, and report it taken up elsewhere.
            Pending::TakeUp => self.failed(Failure::Retryable, State::Idle, now),
            Pending::Session | Pending::Subscribe | Pending::Position => {
                let state = match self.state.clone() {
                    State::Opening | State::Subscribing => State::Idle,
                    state => state,
                };
                match state {
                    State::Holding { .. } => self.failed_while_holding(Failure::Retryable, now),
                    state => self.failed(Failure::Retryable, state, now),
                }
            }
        }
    }

    fn join(&mut self) {
        let Some(session) = self.session else {
            self.restart();
            return;
        };
        self.state = State::Joining;
        if let Some(exported) = self.exported {
            let action = Action::TakeUp {
                entry: entry_key(&self.key, exported.lease),
                create_revision: exported.create_revision,
                mod_revision: exported.mod_revision,
                value: self.value.clone(),
            };
            self.request(Pending::TakeUp, action);
            return;
        }
        let action = Action::Join {
            lease: session.lease,
            value: self.value.clone(),
        };
        self.request(Pending::Join(session.lease), action);
    }

    /// The join (or a read) answered `entry` with `predecessor`, read at `revision`.
    fn joined(
        &mut self,
        entry: Entry,
        predecessor: Option<Entry>,
        revision: Revision,
        now: Instant,
    ) {
        let seen = std::mem::take(&mut self.deletes_seen);
        let gap = self.watch_gap.take();
        if seen
            .iter()
            .any(|(key, at)| *key == entry.key && *at > entry.create_revision)
        {
            // The entry was deleted (an operator, its lease) while the answer was on its way:
            // it holds nothing; join again (found by the model checker: the join's answer
            // arrived after the watch's delete, and the lock held a deleted entry for good).
            if self.mode == Mode::TryOnce {
                self.stop(Ownership::Released);
            } else {
                if !self.session.is_some_and(|s| s.state.valid_at(now)) {
                    self.forget_session();
                }
                self.restart();
            }
            return;
        }
        if holds(&entry, predecessor.as_ref()) {
            self.begin_holding(entry, now);
            if let Some(gap) = gap {
                self.watch_failed(gap);
            }
            return;
        }
        if self.mode == Mode::TryOnce {
            // Held by another: give up, taking the entry away before answering (a `try_acquire`
            // that answers `None` leaves nothing in the queue).
            self.publish(Ownership::Released);
            self.actions.push_back(Action::Unsubscribe);
            self.request(Pending::Delete, delete(&entry));
            self.state = State::Releasing {
                entry,
                reply: None,
                late: None,
            };
            return;
        }
        if !self.session.is_some_and(|s| s.state.valid_at(now)) {
            // The session ended meanwhile: the entry goes with it; join again on a new one.
            self.reap(&entry, Duration::ZERO);
            self.forget_session();
            self.restart();
            return;
        }
        let predecessor = predecessor.map(|p| p.key).unwrap_or_default();
        // A delete of the predecessor (or of the entry) after the read, seen while waiting for
        // its answer, or a gap in the watch: read again at once.
        let moved = gap.is_some()
            || seen
                .iter()
                .any(|(key, at)| *at > revision && (*key == predecessor || *key == entry.key));
        self.state = State::Waiting {
            entry,
            predecessor,
            read_at: revision,
            moved,
        };
        if gap == Some(Gap::Closed) {
            self.rejoin();
        }
    }

    /// Subscribes again by joining again, from the start: the join finds the entry where it is.
    /// Until then the entry is as good as a join whose answer was not seen: if the lock ends
    /// first, the reaper looks for it (found by the model checker: a lock dropped while it
    /// subscribed again left its entry in the queue for as long as the session lived).
    fn rejoin(&mut self) {
        if let State::Waiting { entry, .. } = &self.state {
            self.unseen_join = Some(entry.lease);
        }
        self.restart();
    }

    fn position(&mut self, entry: Entry) {
        let action = Action::Position {
            entry: entry.key.clone(),
            create_revision: entry.create_revision,
        };
        self.state = State::Positioning { entry };
        self.request(Pending::Position, action);
    }

    fn positioned(
        &mut self,
        own: Option<Entry>,
        predecessor: Option<Entry>,
        revision: Revision,
        now: Instant,
    ) {
        match (self.state.clone(), own) {
            (State::Holding { .. }, None) => self.found_gone(Vec::new(), false),
            // Still there. A check asked for meanwhile (the watch closed while reading) stays
            // due (found by the model checker: the read's answer cleared a resubscription, and
            // the holder, with no watch, missed the delete of its entry for good).
            (
                State::Holding {
                    check: Check::Reading,
                    ..
                },
                Some(_),
            ) => self.set_check(Check::No),
            (State::Holding { .. }, Some(_)) => {}
            // Our entry went while we waited (its lease, an operator): join again.
            (State::Positioning { .. }, None) => self.restart(),
            (State::Positioning { .. }, Some(entry)) => {
                self.joined(entry, predecessor, revision, now)
            }
            _ => {}
        }
    }

    /// Begins a tenure of `entry`, if the session is still valid at `now`.
    fn begin_holding(&mut self, entry: Entry, now: Instant) {
        self.state = State::Holding {
            entry,
            check: Check::No,
        };
        let ownership = self.ownership(now);
        if ownership.is_owned() {
            self.publish(ownership);
            return;
        }
        // The session ended just before: nothing was owned. Take the entry away; try again on
        // a new session.
        if let State::Holding { entry, .. } = self.state.clone() {
            self.reap(&entry, Duration::ZERO);
        }
        self.forget_session();
        self.restart();
    }

    /// The tenure in progress ends for `reason`: **a loss**.
    fn lose(&mut self, reason: LossReason) {
        let (entry, gone) = match self.state.clone() {
            State::Holding { entry, .. } => (entry, false),
            State::Gone { entry, .. } => (entry, true),
            _ => return,
        };
        self.publish(Ownership::Lost {
            token: FencingToken(entry.create_revision),
            reason,
        });
        if !gone {
            // The store may still have the entry (a passed deadline, a stale view): take it
            // away so that the next holder need not wait for the lease.
            self.reap(&entry, Duration::ZERO);
        }
        if matches!(reason, LossReason::LeaseGone | LossReason::DeadlinePassed) {
            self.forget_session();
        }
        self.retry_at = None;
        if self.mode == Mode::Persistent {
            self.state = State::Idle;
            if self.pending.is_none() {
                self.restart();
            }
        } else {
            self.end();
        }
    }

    /// Stops for good, publishing `last`, handing what may be in the store to the reaper.
    fn stop(&mut self, last: Ownership) {
        match self.state.clone() {
            State::Waiting { entry, .. }
            | State::Positioning { entry }
            | State::Holding { entry, .. } => self.reap(&entry, Duration::ZERO),
            State::Refreshing { joined } => self.reap(&joined.0, Duration::ZERO),
            _ => {}
        }
        self.publish(last);
        self.end();
    }

    fn end(&mut self) {
        if let Some(lease) = self.unseen_join.take() {
            self.actions.push_back(Action::ReapUnseenJoin {
                entry: entry_key(&self.key, lease),
                lease,
            });
        }
        self.state = State::Ended;
        self.retry_at = None;
        self.actions.push_back(Action::Unsubscribe);
        while let Some(command) = self.queued.pop_front() {
            self.answer_ended(command);
        }
    }

    fn forget_session(&mut self) {
        if let Some(session) = self.session.take() {
            self.actions.push_back(Action::DropSession(session.lease));
        }
    }

    fn reap(&mut self, entry: &Entry, after: Duration) {
        self.actions.push_back(Action::Reap {
            entry: entry.key.clone(),
            create_revision: entry.create_revision,
            lease: entry.lease,
            after,
        });
    }

    // --- commands --------------------------------------------------------------------------

    fn command(&mut self, command: Command, now: Instant) {
        if self.state == State::Ended {
            self.answer_ended(command);
            return;
        }
        if let State::Releasing { reply: waiting, .. } = &mut self.state {
            // A release in progress (its delete in flight, or a retry due) goes on: it answers
            // a second release too; nothing else stops it half-way (found by the model checker:
            // a drop while a failed delete waited for its retry ended the lock and left the
            // entry in the store for as long as the session lived).
            match command {
                Command::Release(Some(reply)) if waiting.is_none() => *waiting = Some(reply),
                Command::Release(Some(reply)) | Command::SetValue(_, reply) => {
                    self.actions
                        .push_back(Action::Reply(reply, Outcome::Stopped));
                }
                Command::Release(None) | Command::Abandon => {}
            }
            return;
        }
        // A subscription in flight before the join may take long (the store is down): a release
        // or an abandon does not wait for it.
        let drop_subscribe = self.pending == Some(Pending::Subscribe)
            && self.state == State::Subscribing
            && !matches!(command, Command::SetValue(..));
        if drop_subscribe {
            self.pending = None;
            self.state = State::Idle;
        }
        if self.pending.is_some() {
            self.queued.push_back(command);
            return;
        }
        match command {
            Command::Release(reply) => self.release(reply, now),
            Command::Abandon => self.abandon(),
            Command::SetValue(value, reply) => self.set_value(value, reply),
        }
    }

    fn answer_ended(&mut self, command: Command) {
        let outcome = match self.published {
            Ownership::Lost { reason, .. } => Outcome::NotOwned(reason),
            Ownership::Failed { .. } => Outcome::Failed,
            _ => Outcome::Stopped,
        };
        match command {
            // A release after the end: done, unless ownership was lost before it.
            Command::Release(Some(reply)) => {
                let outcome = match outcome {
                    Outcome::Stopped => Outcome::Done,
                    other => other,
                };
                self.actions.push_back(Action::Reply(reply, outcome));
            }
            Command::SetValue(_, reply) => {
                self.actions
                    .push_back(Action::Reply(reply, Outcome::Stopped));
            }
            Command::Release(None) | Command::Abandon => {}
        }
    }

    fn release(&mut self, reply: Option<ReplyTo>, now: Instant) {
        let entry = match &self.state {
            State::Waiting { entry, .. }
            | State::Positioning { entry }
            | State::Holding { entry, .. } => entry.clone(),
            _ => {
                self.publish(Ownership::Released);
                if let Some(reply) = reply {
                    self.actions.push_back(Action::Reply(reply, Outcome::Done));
                }
                self.end();
                return;
            }
        };
        // Released, but ownership had already ended (its deadline passed) before.
        let late = match self.ownership(now) {
            Ownership::Lost { reason, .. } if matches!(self.state, State::Holding { .. }) => {
                Some(reason)
            }
            _ => None,
        };
        // Stop claiming ownership before the entry goes: the next holder may own as soon as it
        // is deleted.
        self.publish(Ownership::Released);
        self.retry_at = None;
        self.actions.push_back(Action::Unsubscribe);
        self.request(Pending::Delete, delete(&entry));
        self.state = State::Releasing { entry, reply, late };
    }

    fn deleted(&mut self, result: Result<bool, Failure>, now: Instant) {
        let State::Releasing { entry, reply, late } = self.state.clone() else {
            return;
        };
        let lease_gone = self
            .session
            .is_none_or(|s| matches!(s.state, SessionState::Lost(_)));
        let outcome = match result {
            Ok(true) => late.map_or(Outcome::Done, Outcome::NotOwned),
            // Gone before the release: ownership had ended before this guard heard of it (a
            // handle, which would have joined again, just stops). Why: the session, if it knows
            // the lease is gone; else the deadline, if it had passed; else the lease's lookup.
            Err(Failure::LeaseLost) if self.mode != Mode::Persistent => {
                Outcome::NotOwned(LossReason::LeaseGone)
            }
            Ok(false) if self.mode != Mode::Persistent => match (lease_gone, late) {
                (true, _) => Outcome::NotOwned(LossReason::LeaseGone),
                (false, Some(reason)) => Outcome::NotOwned(reason),
                (false, None) => {
                    self.state = State::Gone {
                        entry,
                        replies: reply.into_iter().collect(),
                        released: true,
                    };
                    self.resume();
                    return;
                }
            },
            Ok(false) | Err(Failure::LeaseLost) => Outcome::Done,
            // The lease is no longer renewed: the entry goes with it.
            Err(Failure::Retryable) if lease_gone => late.map_or(Outcome::Done, Outcome::NotOwned),
            Err(Failure::Retryable) => {
                // No answer: try again; a later "not there" may be this very delete.
                self.retry_at = Some(now + self.backoff.next_delay());
                return;
            }
            Err(Failure::Permanent(_)) => {
                // The reaper keeps trying, while the lease lives.
                self.reap(&entry, Duration::ZERO);
                self.actions.push_back(Action::KeepError);
                Outcome::Failed
            }
        };
        if let Some(reply) = reply {
            self.actions.push_back(Action::Reply(reply, outcome));
        }
        self.end();
    }

    fn abandon(&mut self) {
        match self.state.clone() {
            State::Waiting { entry, .. }
            | State::Positioning { entry }
            | State::Holding { entry, .. } => {
                // The entry stays until its lease would have expired, as if this process had
                // died: a session of its own is just not renewed; on a shared session the reaper
                // deletes the entry after the TTL.
                self.actions.push_back(Action::AbandonSession);
                let ttl = self.session.map_or(Duration::ZERO, |s| s.ttl);
                self.reap(&entry, ttl);
            }
            _ => {}
        }
        self.publish(Ownership::Released);
        self.end();
    }

    fn set_value(&mut self, value: Vec<u8>, reply: ReplyTo) {
        self.value = value;
        match &self.state {
            State::Waiting { entry, .. }
            | State::Positioning { entry }
            | State::Holding { entry, .. } => {
                let action = update(entry, &self.value);
                self.request(Pending::Update(Some(reply)), action);
            }
            _ => self.actions.push_back(Action::Reply(reply, Outcome::Done)),
        }
    }

    /// The entry's value is the lock's, written at `revision`.
    fn set_entry_value(&mut self, revision: Revision) {
        let value = self.value.clone();
        if let State::Waiting { entry, .. }
        | State::Positioning { entry }
        | State::Holding { entry, .. } = &mut self.state
        {
            entry.value = value;
            entry.mod_revision = revision;
        }
    }

    /// Why the entry would be gone: its lease, if the session is no longer valid.
    fn missing_entry_reason(&self) -> LossReason {
        match self.session.map(|s| s.state) {
            Some(SessionState::Live { .. } | SessionState::Unconfirmed { .. }) => {
                LossReason::EntryDeleted
            }
            _ => LossReason::LeaseGone,
        }
    }

    /// The answer to an update: of a retried join's value (`None`), or of a `SetValue` (its
    /// reply).
    fn updated(
        &mut self,
        reply: Option<ReplyTo>,
        result: Result<Option<Revision>, Failure>,
        now: Instant,
    ) {
        match reply {
            None => self.refreshed(result, now),
            Some(reply) => self.value_set(reply, result),
        }
    }

    /// A retried join found the entry with an older value and wrote the lock's: go on from the
    /// join's answer (the entry gone meanwhile: join again).
    fn refreshed(&mut self, result: Result<Option<Revision>, Failure>, now: Instant) {
        if let State::Refreshing { joined } = self.state.clone() {
            let (mut entry, predecessor, revision) = *joined;
            match result {
                Ok(Some(written)) => {
                    entry.value = self.value.clone();
                    entry.mod_revision = written;
                }
                // The entry went meanwhile (found in review: the lock went on to own
                // an entry the store had just said was gone): join again.
                Ok(None) | Err(Failure::LeaseLost) => {
                    self.deletes_seen.clear();
                    self.watch_gap = None;
                    if result == Err(Failure::LeaseLost) {
                        self.forget_session();
                    }
                    self.restart();
                    return;
                }
                Err(_) => {}
            }
            self.joined(entry, predecessor, revision, now);
        }
    }

    /// The answer to a `SetValue`'s write, for its reply.
    fn value_set(&mut self, reply: ReplyTo, result: Result<Option<Revision>, Failure>) {
        let outcome = match result {
            Ok(Some(written)) => {
                self.set_entry_value(written);
                Outcome::Done
            }
            Ok(None) if matches!(self.state, State::Holding { .. }) => {
                // The tenure's entry is gone: why, the lease's lookup says.
                self.found_gone(vec![reply], false);
                return;
            }
            Ok(None) => {
                let reason = self.missing_entry_reason();
                self.entry_gone(reason);
                Outcome::NotOwned(reason)
            }
            Err(Failure::LeaseLost) => {
                self.entry_gone(LossReason::LeaseGone);
                Outcome::NotOwned(LossReason::LeaseGone)
            }
            // The reply answers the call's error; the lock goes on.
            Err(_) => Outcome::Failed,
        };
        self.actions.push_back(Action::Reply(reply, outcome));
    }

    /// The answer to a take-up of the exported tenure.
    fn taken_up(&mut self, result: Result<TakeUp, Failure>, now: Instant) {
        match result {
            Ok(TakeUp::Taken(taken)) => {
                let (entry, predecessor, revision) = *taken;
                let deleted_since = self
                    .deletes_seen
                    .iter()
                    .any(|(key, at)| *key == entry.key && *at > revision);
                if deleted_since {
                    let reason = self.reason_unchecked();
                    self.not_taken_up(reason);
                    return;
                }
                if !self.session.is_some_and(|s| s.state.valid_at(now)) {
                    // Taken up, but the session's deadline passed meanwhile: that tenure ends
                    // here, and says so.
                    self.not_taken_up(LossReason::DeadlinePassed);
                    return;
                }
                self.exported = None;
                self.backoff.reset();
                self.joined(entry, predecessor, revision, now);
            }
            Ok(TakeUp::Gone) => {
                let reason = self.reason_unchecked();
                self.not_taken_up(reason);
            }
            Ok(TakeUp::Written) => self.not_taken_up(LossReason::ResumedElsewhere),
            Err(Failure::LeaseLost) => self.not_taken_up(LossReason::LeaseGone),
            Err(failure) => self.failed(failure, State::Idle, now),
        }
    }

    /// The exported tenure could not be taken up, for `reason`: its loss is reported (it never
    /// was this lock's), its lease left to whoever holds it, and then a handle joins as any
    /// other lock while a guard ends.
    fn not_taken_up(&mut self, reason: LossReason) {
        let Some(exported) = self.exported.take() else {
            return;
        };
        self.publish(Ownership::Lost {
            token: FencingToken(exported.create_revision),
            reason,
        });
        if let Some(session) = self.session.take() {
            self.actions.push_back(Action::LeaveSession(session.lease));
        }
        self.deletes_seen.clear();
        self.watch_gap = None;
        self.retry_at = None;
        match self.mode {
            Mode::Persistent => self.restart(),
            Mode::Once | Mode::TryOnce => self.end(),
        }
    }

    /// The tenure's entry (or a released guard's) was found gone from the store, by its delete,
    /// a read or a guarded write: not owned from now on. Why is told with the loss, once known:
    /// the session may know already that the lease is gone; else one lookup of the lease tells a
    /// lease that ended in the store (`LeaseGone`) from an entry that someone else deleted
    /// (`EntryDeleted`). `replies` wait for the reason.
    fn found_gone(&mut self, replies: Vec<ReplyTo>, released: bool) {
        let (State::Holding { entry, .. } | State::Releasing { entry, .. }) = self.state.clone()
        else {
            return;
        };
        let token = FencingToken(entry.create_revision);
        self.retry_at = None;
        self.state = State::Gone {
            entry,
            replies,
            released,
        };
        if !released {
            // Not owned from now on, before the loss says why: every reader, and every
            // subscriber, stops claiming now (a successor may own one round trip later).
            self.publish(Ownership::Ending { token });
        }
        if self.lease_known_gone() {
            self.gone_because(LossReason::LeaseGone);
        } else if self.pending.is_none() {
            self.resume();
        }
        // Else the lookup goes once the request in flight is answered.
    }

    fn check_lease(&mut self, entry: &Entry) {
        let lease = entry.lease;
        self.request(Pending::CheckLease, Action::CheckLease { lease });
    }

    /// The answer to the lookup of a gone entry's lease: why the entry went.
    fn lease_checked(&mut self, result: Result<bool, Failure>) {
        let reason = match result {
            Ok(true) => LossReason::EntryDeleted,
            Ok(false) | Err(Failure::LeaseLost) => LossReason::LeaseGone,
            Err(_) => self.reason_unchecked(),
        };
        self.gone_because(reason);
    }

    /// Whether the session says the lease is gone from the store.
    fn lease_known_gone(&self) -> bool {
        self.session
            .is_some_and(|s| s.state == SessionState::Lost(LossReason::LeaseGone))
    }

    /// Why the entry went when the lease's lookup could not answer: what the session knows, else
    /// what was seen (the entry deleted).
    fn reason_unchecked(&self) -> LossReason {
        if self.lease_known_gone() {
            LossReason::LeaseGone
        } else {
            LossReason::EntryDeleted
        }
    }

    /// The entry found gone went for `reason`: the loss (unless the lock was released first),
    /// and the answers that waited for it.
    fn gone_because(&mut self, reason: LossReason) {
        let State::Gone {
            replies, released, ..
        } = self.state.clone()
        else {
            return;
        };
        if released {
            if reason == LossReason::LeaseGone {
                self.forget_session();
            }
            self.end();
        } else {
            self.lose(reason);
        }
        for reply in replies {
            self.actions
                .push_back(Action::Reply(reply, Outcome::NotOwned(reason)));
        }
    }

    /// The entry was found gone (by an update or a read) while waiting.
    fn entry_gone(&mut self, reason: LossReason) {
        match self.state {
            State::Holding { .. } => self.lose(reason),
            State::Waiting { .. } | State::Positioning { .. } => {
                if reason == LossReason::LeaseGone {
                    self.forget_session();
                }
                self.restart();
            }
            _ => {}
        }
    }

    // --- the session and the watch ---------------------------------------------------------

    fn session_changed(&mut self, state: SessionState, now: Instant) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        session.state = state;
        match (&self.state, state) {
            // Waiting for the lease's lookup, which the session's end answers: its lease gone,
            // or the store out of reach (the lookup may hang as long).
            (State::Gone { .. }, SessionState::Lost(_)) => {
                let reason = self.reason_unchecked();
                self.gone_because(reason);
            }
            (State::Holding { .. }, SessionState::Lost(reason)) => self.lose(match reason {
                LossReason::Stopped => LossReason::LeaseGone,
                other => other,
            }),
            (State::Holding { .. }, _) => {
                let ownership = self.ownership(now);
                if ownership.is_owned() {
                    self.publish(ownership);
                } else {
                    self.lose(LossReason::DeadlinePassed);
                }
            }
            (State::Waiting { entry, .. }, SessionState::Lost(_)) if self.pending.is_none() => {
                // The entry goes with the lease (or is no longer ours to claim): join again on
                // a new session.
                let entry = entry.clone();
                self.reap(&entry, Duration::ZERO);
                self.forget_session();
                self.retry_at = None;
                self.restart();
            }
            _ => {}
        }
    }

    /// Whether a join or a read of the queue is in flight (or its answer waits to be used):
    /// what the watch says meanwhile counts once that answer is known.
    fn reading_the_queue(&self) -> bool {
        matches!(
            self.state,
            State::Joining | State::Refreshing { .. } | State::Positioning { .. }
        )
    }

    fn entry_deleted(&mut self, key: &str, revision: Revision) {
        if self.reading_the_queue() {
            self.deletes_seen.push((key.to_owned(), revision));
            return;
        }
        match &self.state {
            State::Waiting {
                entry,
                predecessor,
                read_at,
                ..
            } if revision > *read_at && (key == predecessor || key == entry.key) => self.moved(),
            // A delete of our key from before this tenure (same lease, an earlier entry) is not
            // about this entry.
            State::Holding { entry, .. }
                if key == entry.key && revision > entry.create_revision =>
            {
                self.found_gone(Vec::new(), false);
            }
            _ => {}
        }
    }

    /// Something moved in the queue (a delete, or lost history): where does the entry stand?
    fn moved(&mut self) {
        if self.state == State::Subscribing || self.reading_the_queue() {
            self.watch_gap.get_or_insert(Gap::Resync);
            return;
        }
        match &mut self.state {
            State::Waiting { entry, moved, .. } => {
                if self.pending.is_some() {
                    *moved = true;
                } else {
                    let entry = entry.clone();
                    self.position(entry);
                }
            }
            State::Holding { check, .. } => {
                // A resubscription due or in progress reads the entry after it anyway.
                if matches!(check, Check::No | Check::Reading) {
                    *check = Check::Read;
                }
                self.check_if_due();
            }
            _ => {}
        }
    }

    fn watch_closed(&mut self) {
        if self.state == State::Subscribing || self.reading_the_queue() {
            self.watch_gap = Some(Gap::Closed);
            return;
        }
        self.watch_failed(Gap::Closed);
    }

    /// The queue's watch lost history or closed.
    fn watch_failed(&mut self, gap: Gap) {
        if gap == Gap::Resync {
            self.moved();
            return;
        }
        match self.state {
            // Subscribe again by joining again: the join finds the entry where it is.
            State::Waiting { .. } if self.pending.is_none() => self.rejoin(),
            State::Waiting { .. } => {
                // A request is in flight (a value update): rejoin once its answer is known
                // (found in review: the waiter forgot the close and waited with no watch).
                self.watch_gap = Some(Gap::Closed);
                self.moved();
            }
            State::Holding { .. } => {
                self.set_check(Check::Resubscribe);
                self.check_if_due();
            }
            _ => {}
        }
    }

    fn set_check(&mut self, to: Check) {
        if let State::Holding { check, .. } = &mut self.state {
            *check = to;
        }
    }

    /// While holding: subscribes again or reads the entry, if that is due and nothing is in
    /// flight or backing off.
    fn check_if_due(&mut self) {
        let State::Holding { entry, check } = &self.state else {
            return;
        };
        if self.pending.is_some() || self.retry_at.is_some() {
            return;
        }
        match check {
            Check::Resubscribe => {
                self.set_check(Check::Subscribing);
                self.request(Pending::Subscribe, Action::Subscribe);
            }
            Check::Read => {
                let action = Action::Position {
                    entry: entry.key.clone(),
                    create_revision: entry.create_revision,
                };
                self.set_check(Check::Reading);
                self.request(Pending::Position, action);
            }
            Check::No | Check::Reading | Check::Subscribing => {}
        }
    }

    /// A check or a resubscription failed while holding: the lock stays held (its lease is kept
    /// alive; the deadline rule still holds) and the check is tried again after a back-off, even
    /// after a permanent failure (a watch refused for a while: the holder watches again once it
    /// is allowed).
    fn failed_while_holding(&mut self, failure: Failure, now: Instant) {
        match failure {
            Failure::LeaseLost => self.lose(LossReason::LeaseGone),
            Failure::Permanent(_) | Failure::Retryable => {
                if let State::Holding { check, .. } = &mut self.state {
                    match *check {
                        Check::Reading => *check = Check::Read,
                        Check::Subscribing => *check = Check::Resubscribe,
                        _ => {}
                    }
                }
                self.retry_at = Some(now + self.backoff.next_delay());
            }
        }
    }
}

/// **The** decision of whether an entry holds the lock: it has no predecessor in its queue.
pub(crate) fn holds(_entry: &Entry, predecessor: Option<&Entry>) -> bool {
    predecessor.is_none()
}

fn update(entry: &Entry, value: &[u8]) -> Action {
    Action::Update {
        entry: entry.key.clone(),
        create_revision: entry.create_revision,
        value: value.to_vec(),
    }
}

fn delete(entry: &Entry) -> Action {
    Action::Delete {
        entry: entry.key.clone(),
        create_revision: entry.create_revision,
    }
}
