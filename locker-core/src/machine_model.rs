//! Model checking of the ownership [`Machine`]: every interleaving of a few contenders against an
//! abstract store, explored breadth-first (a plain search, no dependency), for small
//! configurations with faults (lease expiry, keep-alive silence and failure, operator deletes and
//! revokes, compaction, closed watches, failed and lost requests) and users who release, drop,
//! cancel or abandon at any step; and contenders that start by resuming the tenure of a process
//! that died holding the key (its entry and lease in the store, its exported token), racing that
//! lease's expiry or another resume of the same token.
//!
//! The world is the real [`Machine`] of each contender (the code the driver runs), each
//! contender's locker (its shared session and the keeper that renews it), its reaper, the
//! requests in flight (and those cancelled, which the store may still apply), the queue's watch
//! (events in order, or a resync after compaction) and an abstract store: a revision counter,
//! leases with their expiry and the queue entries. Time passes in ticks of one second with a TTL
//! of two; every instant is kept relative to now, so that states that differ only by when they
//! happen are one state.
//!
//! Checked at every state:
//! - **one owner**: no two contenders claim one key at the same instant under the deadline rule
//!   ([`Machine::ownership`] at now), and an owner's entry is in the store, first in its queue.
//!   An operator's delete of a holder's entry makes an overlap that no client can prevent (the
//!   next holder may own before the old one hears of it): the deposed holder is left out of this
//!   check until it reports the loss, which the next property requires;
//! - **every loss reported**: a tenure ends only with a published `Lost` for its token (or the
//!   owner's own release or abandon); never by an `Acquiring` or a new token;
//! - **tokens strictly increase**: each new tenure of a key has a greater token than every one
//!   before it (a resumed tenure goes on with the token it had);
//! - **a loss says what happened**: `LeaseGone` only with the tenure's lease gone from the store,
//!   `EntryDeleted` only after an operator deleted the entry (unless the lookup of the lease did
//!   not answer, or the tenure was another's to resume).
//!
//! Checked from every state, by running it on with no more faults and every other contender
//! leaving (a fair, deterministic schedule): **liveness and clean-up**: the contender that stays
//! owns within a bounded number of steps, its published state agrees with the store, it has a
//! watch, every other contender has ended, and no entry but the owner's is left in the store.
//!
//! Limits, so that each search stays under half a minute: each configuration (the tests at the
//! end) has a few kinds of fault, not all; liveness follows one schedule, not every fair one.
//! Not modelled: value updates (`SetValue`), permanent errors, two locks sharing one locker's
//! session (and its key claims). Assumed: a cancelled request reaches the store within a TTL or
//! never (the reaper's second look for an unseen join comes a TTL later).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::backend::queue_of;

/// One tick of time.
const TICK: Duration = Duration::from_secs(1);
/// The TTL of every session, in ticks.
const TTL: i8 = 2;
/// Steps a calm run may take before the live contender must own.
const CALM_STEPS: usize = 400;

/// Now: every instant in a state is kept relative to it.
fn now() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| Instant::now() + Duration::from_secs(1000))
}

fn at(ticks: i8) -> Instant {
    now() + TICK * u32::try_from(ticks.max(0)).unwrap_or(0)
}

/// The instant `x` one tick later: passed instants are all one (now).
fn shift(x: Instant) -> Instant {
    if x <= now() + TICK { now() } else { x - TICK }
}

fn clamp(x: Instant) -> Instant {
    x.max(now())
}

/// What a contender does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    /// Never gives up: the liveness property is about it.
    Stays,
    /// May make its move at any step (and then drop the lock, if the move was a cancellation),
    /// and drops the lock in a calm run.
    Leaves(Move),
}

/// How a contender leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Move {
    /// `release().await` (and, at any step of it, a cancellation of that future).
    Release,
    /// Drops the lock.
    Drop,
    /// `abandon()`.
    Abandon,
    /// Cancels the call in progress (an `acquire` future dropped), which drops the lock.
    Cancel,
}

#[derive(Debug, Clone, Copy)]
struct ContenderConfig {
    key: &'static str,
    mode: Mode,
    role: Role,
    /// Starts by resuming the tenure of the process that died ([`Config::dead`]).
    resumes: bool,
}

/// How many of each fault may happen in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Budget {
    /// A request fails (not applied) or its answer is lost (applied); a reaper's try fails.
    request_faults: u8,
    /// An operator deletes an entry.
    operator_deletes: u8,
    /// An operator revokes a lease (its entries go at once, its keeper hears of it later).
    revokes: u8,
    /// A watch loses its history (compaction): a resync.
    compactions: u8,
    /// A watch closes.
    watch_closes: u8,
    /// Keep-alives go unanswered (or fail) from now on: the session is unconfirmed, and, unless
    /// they are answered again before its deadline, lost (its lease then expires in the store).
    silences: u8,
}

struct Config {
    name: &'static str,
    contenders: Vec<ContenderConfig>,
    budget: Budget,
    /// A process that died holding key "a": its entry and its lease, which expires in this many
    /// ticks unless someone takes it up; resumers take it up from its exported token.
    dead: Option<i8>,
}

/// The lease and the token of the dead process's tenure ([`Config::dead`]).
const DEAD_LEASE: LeaseId = 100;
const DEAD_TOKEN: Revision = 2;

/// The keeper of one session's lease, in a contender's locker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Keeper {
    lease: LeaseId,
    /// The local deadline, in ticks from now (0: passed).
    deadline: i8,
    state: KeeperState,
    /// Still the locker's session (renewed); `false` once the lock dropped it.
    renewed: bool,
    /// Its keep-alives go unanswered.
    silent: bool,
    /// A resumed tenure's lease, taken up: never the locker's shared session.
    taken_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum KeeperState {
    Live,
    Unconfirmed,
    Lost(LossReason),
}

impl Keeper {
    fn session_state(&self) -> SessionState {
        match self.state {
            KeeperState::Live => SessionState::Live {
                deadline: at(self.deadline),
            },
            KeeperState::Unconfirmed => SessionState::Unconfirmed {
                deadline: at(self.deadline),
            },
            KeeperState::Lost(reason) => SessionState::Lost(reason),
        }
    }
}

/// An answer on its way to a machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Answer {
    Input(Input),
    /// A session: its view is read when it arrives.
    Session(LeaseId),
}

/// A reaper's job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Job {
    Entry {
        key: String,
        create_revision: Revision,
        /// Ticks before it runs.
        after: i8,
    },
    /// Look for the entry of a join whose answer was not seen, and delete it: once at once, and
    /// once more a TTL later (`late`), when a cancelled join can no longer reach the store.
    UnseenJoin { key: String, late: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Contender {
    machine: Machine,
    /// The request sent, not yet served by the store.
    request: Option<Action>,
    /// The answer on its way.
    answer: Option<Answer>,
    /// Requests whose caller was cancelled: the store may still apply them.
    orphans: Vec<Action>,
    /// Whether the queue's watch delivers.
    subscribed: bool,
    /// Watch events on their way.
    events: VecDeque<Input>,
    /// The locker's sessions.
    keepers: Vec<Keeper>,
    /// The reaper's jobs.
    jobs: Vec<Job>,
    /// The user released, dropped or abandoned.
    left: bool,
    /// The user cancelled a call.
    cancelled: bool,
    /// The token of the tenure published now.
    tenure: Option<Revision>,
    /// A lookup of the lease of an entry found gone did not answer (it failed, was cancelled, or
    /// the session ended first): the loss may say only what was seen, `EntryDeleted`.
    lookup_unanswered: bool,
    /// The lease of the tenure published now.
    tenure_lease: Option<LeaseId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Store {
    revision: Revision,
    next_lease: LeaseId,
    /// In create order.
    entries: Vec<Entry>,
    /// Leases and their expiry, in ticks from now.
    leases: Vec<(LeaseId, i8)>,
}

impl Store {
    fn lease_alive(&self, lease: LeaseId) -> bool {
        self.leases.iter().any(|(l, _)| *l == lease)
    }

    fn predecessor(&self, queue: &str, create_revision: Revision) -> Option<Entry> {
        self.entries
            .iter()
            .rfind(|e| queue_of(&e.key) == Some(queue) && e.create_revision < create_revision)
            .cloned()
    }

    fn find(&self, key: &str, create_revision: Revision) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.key == key && e.create_revision == create_revision)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct World {
    contenders: Vec<Contender>,
    store: Store,
    budget: Budget,
    /// The greatest token each key has had.
    last_token: Vec<(String, Revision)>,
    /// Entries an operator deleted, or whose lease an operator revoked (key, create revision):
    /// their holders may claim them until they hear of it.
    deposed: Vec<(String, Revision)>,
    /// The create revisions of the entries an operator deleted (not by a revoke).
    deleted_by_operator: Vec<Revision>,
}

/// One step of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The store serves contender `c`'s request.
    Serve(usize),
    /// Its request fails without being applied.
    Fail(usize),
    /// Its request is applied but the answer is lost (an error).
    LoseAnswer(usize),
    /// The answer reaches the machine.
    Deliver(usize),
    /// The next watch event reaches the machine.
    Event(usize),
    /// The machine's timer fires.
    Timeout(usize),
    /// Keeper `k`'s keep-alives go unanswered from now on.
    Silence(usize, usize),
    /// They are answered again.
    Answered(usize, usize),
    /// The keeper's deadline passed.
    KeeperDeadline(usize, usize),
    /// The keeper hears that its lease is gone.
    LeaseGone(usize, usize),
    /// The store expires lease `l` (index into its leases).
    Expire(usize),
    /// An operator revokes lease `l` (index into the store's leases).
    Revoke(usize),
    /// An operator deletes entry `e` (index).
    OperatorDelete(usize),
    /// Contender `c`'s watch loses its history.
    Compact(usize),
    /// Contender `c`'s watch closes.
    CloseWatch(usize),
    /// The reaper runs job `j`.
    Reap(usize, usize),
    /// The reaper's try fails.
    ReapFail(usize, usize),
    /// A cancelled request reaches the store after all.
    Orphan(usize, usize),
    /// A cancelled request never reaches the store.
    DropOrphan(usize, usize),
    /// The user releases (and waits for the answer).
    Release(usize),
    /// The user drops the lock.
    Drop(usize),
    /// The user abandons the lock.
    Abandon(usize),
    /// The user cancels the call in progress (an `acquire` or a `release` future dropped), which
    /// drops the lock.
    Cancel(usize),
    /// A tick passes.
    Tick,
}

/// A property that failed.
#[derive(Debug, Clone)]
struct Violation(String);

impl World {
    fn new(config: &Config) -> World {
        let contenders = config
            .contenders
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let exported = c.resumes.then_some(Exported {
                    lease: DEAD_LEASE,
                    create_revision: DEAD_TOKEN,
                    mod_revision: DEAD_TOKEN,
                });
                let machine = Machine::taking_up(
                    Arc::from(c.key),
                    format!("v{i}").into_bytes(),
                    c.mode,
                    Backoff::new(TICK, TICK, 1),
                    exported,
                );
                Contender {
                    machine,
                    request: None,
                    answer: None,
                    orphans: Vec::new(),
                    subscribed: false,
                    events: VecDeque::new(),
                    keepers: Vec::new(),
                    jobs: Vec::new(),
                    left: false,
                    cancelled: false,
                    tenure: None,
                    lookup_unanswered: false,
                    tenure_lease: None,
                }
            })
            .collect();
        let mut store = Store {
            revision: 1,
            next_lease: 1,
            entries: Vec::new(),
            leases: Vec::new(),
        };
        let mut last_token = Vec::new();
        if let Some(expiry) = config.dead {
            store.revision = DEAD_TOKEN;
            store.leases.push((DEAD_LEASE, expiry));
            store.entries.push(Entry {
                key: entry_key("a", DEAD_LEASE),
                value: b"dead".to_vec(),
                lease: DEAD_LEASE,
                create_revision: DEAD_TOKEN,
                mod_revision: DEAD_TOKEN,
            });
            last_token.push(("a".to_owned(), DEAD_TOKEN));
        }
        let mut world = World {
            contenders,
            store,
            budget: config.budget,
            last_token,
            deposed: Vec::new(),
            deleted_by_operator: Vec::new(),
        };
        for c in 0..world.contenders.len() {
            world.drain(config, c).expect("first actions");
        }
        world
    }

    /// Every step possible from here (`calm`: no faults, no user moves but leaving).
    fn steps(&self, config: &Config, calm: bool) -> Vec<Step> {
        let mut steps = Vec::new();
        let faults = !calm;
        for (i, c) in self.contenders.iter().enumerate() {
            for (k, keeper) in c.keepers.iter().enumerate() {
                match keeper.state {
                    KeeperState::Lost(_) => {}
                    _ if !self.store.lease_alive(keeper.lease) => steps.push(Step::LeaseGone(i, k)),
                    _ if keeper.deadline == 0 => steps.push(Step::KeeperDeadline(i, k)),
                    _ if keeper.silent => steps.push(Step::Answered(i, k)),
                    _ if faults && keeper.renewed && self.budget.silences > 0 => {
                        steps.push(Step::Silence(i, k))
                    }
                    _ => {}
                }
            }
            if c.answer.is_some() {
                steps.push(Step::Deliver(i));
            }
            if !c.events.is_empty() {
                steps.push(Step::Event(i));
            }
            if c.request.is_some() {
                steps.push(Step::Serve(i));
                if faults && self.budget.request_faults > 0 {
                    steps.push(Step::Fail(i));
                    if matches!(
                        c.request,
                        Some(
                            Action::Join { .. }
                                | Action::Update { .. }
                                | Action::Delete { .. }
                                | Action::TakeUp { .. }
                        )
                    ) {
                        steps.push(Step::LoseAnswer(i));
                    }
                }
            }
            if c.machine.poll_timeout().is_some_and(|t| t <= now()) {
                steps.push(Step::Timeout(i));
            }
            let joins_in_flight = c.orphans.iter().any(|o| matches!(o, Action::Join { .. }));
            for (j, job) in c.jobs.iter().enumerate() {
                let due = match job {
                    Job::Entry { after, .. } => *after == 0,
                    Job::UnseenJoin { late, .. } => !late || !joins_in_flight,
                };
                if due {
                    steps.push(Step::Reap(i, j));
                    if faults && self.budget.request_faults > 0 {
                        steps.push(Step::ReapFail(i, j));
                    }
                }
            }
            for j in 0..c.orphans.len() {
                steps.push(Step::Orphan(i, j));
                if faults {
                    steps.push(Step::DropOrphan(i, j));
                }
            }
            if faults && c.subscribed {
                if self.budget.compactions > 0 {
                    steps.push(Step::Compact(i));
                }
                if self.budget.watch_closes > 0 {
                    steps.push(Step::CloseWatch(i));
                }
            }
            if let Role::Leaves(how) = config.contenders[i].role
                && !c.left
            {
                match how {
                    _ if calm => steps.push(Step::Drop(i)),
                    Move::Release => steps.push(Step::Release(i)),
                    Move::Drop => steps.push(Step::Drop(i)),
                    Move::Abandon => steps.push(Step::Abandon(i)),
                    Move::Cancel => {}
                }
            }
            let cancels = matches!(
                config.contenders[i].role,
                Role::Leaves(Move::Cancel | Move::Release)
            );
            if faults && cancels && !c.cancelled && c.machine.in_flight() {
                steps.push(Step::Cancel(i));
            }
        }
        for (l, (_, expiry)) in self.store.leases.iter().enumerate() {
            if *expiry == 0 {
                steps.push(Step::Expire(l));
            }
        }
        if faults && self.budget.revokes > 0 {
            steps.extend((0..self.store.leases.len()).map(Step::Revoke));
        }
        if faults && self.budget.operator_deletes > 0 {
            steps.extend((0..self.store.entries.len()).map(Step::OperatorDelete));
        }
        steps.push(Step::Tick);
        steps
    }

    /// The world after `step`, or the property it breaks.
    fn after(&self, config: &Config, step: Step) -> Result<World, Violation> {
        let mut w = self.clone();
        let touched = w.apply(step);
        if let Some(c) = touched {
            w.drain(config, c)?;
        }
        if step == Step::Tick {
            for c in 0..w.contenders.len() {
                w.drain(config, c)?;
            }
        }
        w.check(config)?;
        Ok(w)
    }

    /// Carries out `step`; returns the contender whose machine took an input.
    fn apply(&mut self, step: Step) -> Option<usize> {
        match step {
            Step::Serve(i) => {
                let request = self.contenders[i].request.take().expect("a request");
                let answer = self.serve(i, &request);
                if matches!(request, Action::OpenSession | Action::TakeUpSession { .. }) {
                    // Answered at once: what matters is when it is served.
                    self.contenders[i].answer = Some(answer);
                    return self.apply(Step::Deliver(i));
                }
                self.contenders[i].answer = Some(answer);
                None
            }
            Step::Fail(i) => {
                self.budget.request_faults -= 1;
                let request = self.contenders[i].request.take().expect("a request");
                self.contenders[i].lookup_unanswered |=
                    matches!(request, Action::CheckLease { .. });
                self.contenders[i].answer = Some(Answer::Input(failed(&request)));
                None
            }
            Step::LoseAnswer(i) => {
                self.budget.request_faults -= 1;
                let request = self.contenders[i].request.take().expect("a request");
                self.serve(i, &request);
                self.contenders[i].answer = Some(Answer::Input(failed(&request)));
                None
            }
            Step::Deliver(i) => {
                let input = match self.contenders[i].answer.take().expect("an answer") {
                    Answer::Input(input) => input,
                    Answer::Session(lease) => {
                        let keeper = self.keeper(i, lease).expect("a keeper");
                        Input::SessionOpened(Ok(SessionView {
                            lease,
                            ttl: TICK * u32::try_from(TTL).unwrap_or(0),
                            state: keeper.session_state(),
                        }))
                    }
                };
                self.contenders[i].machine.handle(input, now());
                Some(i)
            }
            Step::Event(i) => {
                let event = self.contenders[i].events.pop_front().expect("an event");
                self.contenders[i].machine.handle(event, now());
                Some(i)
            }
            Step::Timeout(i) => {
                self.contenders[i].machine.handle_timeout(now());
                Some(i)
            }
            Step::Silence(i, k) => {
                self.budget.silences -= 1;
                let keeper = &mut self.contenders[i].keepers[k];
                keeper.silent = true;
                keeper.state = KeeperState::Unconfirmed;
                self.notify(i, k)
            }
            Step::Answered(i, k) => {
                let keeper = &mut self.contenders[i].keepers[k];
                keeper.silent = false;
                self.renew(i, k);
                self.notify(i, k)
            }
            Step::KeeperDeadline(i, k) => {
                let c = &mut self.contenders[i];
                c.lookup_unanswered |= matches!(c.machine.state(), State::Gone { .. });
                self.contenders[i].keepers[k].state = KeeperState::Lost(LossReason::DeadlinePassed);
                self.notify(i, k)
            }
            Step::LeaseGone(i, k) => {
                self.contenders[i].keepers[k].state = KeeperState::Lost(LossReason::LeaseGone);
                self.notify(i, k)
            }
            Step::Expire(l) | Step::Revoke(l) => {
                if matches!(step, Step::Revoke(_)) {
                    self.budget.revokes -= 1;
                }
                let (lease, _) = self.store.leases.remove(l);
                let gone: Vec<Entry> = self
                    .store
                    .entries
                    .iter()
                    .filter(|e| e.lease == lease)
                    .cloned()
                    .collect();
                if matches!(step, Step::Revoke(_)) {
                    self.deposed
                        .extend(gone.iter().map(|e| (e.key.clone(), e.create_revision)));
                }
                if !gone.is_empty() {
                    self.store.revision += 1;
                    for entry in gone {
                        self.remove_entry(&entry.key, entry.create_revision);
                    }
                }
                None
            }
            Step::OperatorDelete(e) => {
                self.budget.operator_deletes -= 1;
                let entry = self.store.entries[e].clone();
                self.deposed
                    .push((entry.key.clone(), entry.create_revision));
                self.deleted_by_operator.push(entry.create_revision);
                self.store.revision += 1;
                self.remove_entry(&entry.key, entry.create_revision);
                None
            }
            Step::Compact(i) => {
                self.budget.compactions -= 1;
                let c = &mut self.contenders[i];
                c.events.clear();
                c.events.push_back(Input::Resync);
                None
            }
            Step::CloseWatch(i) => {
                self.budget.watch_closes -= 1;
                let c = &mut self.contenders[i];
                c.subscribed = false;
                c.events.push_back(Input::WatchClosed);
                None
            }
            Step::Reap(i, j) => {
                let job = self.contenders[i].jobs.remove(j);
                match job {
                    Job::Entry {
                        key,
                        create_revision,
                        ..
                    } => {
                        self.delete(&key, create_revision);
                    }
                    Job::UnseenJoin { key, .. } => {
                        if let Some(entry) = self.store.entries.iter().find(|e| e.key == key) {
                            let create_revision = entry.create_revision;
                            self.delete(&key, create_revision);
                        }
                    }
                }
                None
            }
            Step::ReapFail(_, _) => {
                self.budget.request_faults -= 1;
                None
            }
            Step::Orphan(i, j) => {
                let request = self.contenders[i].orphans.remove(j);
                self.serve(i, &request);
                None
            }
            Step::DropOrphan(i, j) => {
                self.contenders[i].orphans.remove(j);
                None
            }
            Step::Release(i) => {
                self.contenders[i].left = true;
                let m = &mut self.contenders[i].machine;
                m.handle(Input::Command(Command::Release(Some(1))), now());
                Some(i)
            }
            Step::Drop(i) => {
                self.contenders[i].left = true;
                let m = &mut self.contenders[i].machine;
                m.handle(Input::Command(Command::Release(None)), now());
                Some(i)
            }
            Step::Abandon(i) => {
                self.contenders[i].left = true;
                let m = &mut self.contenders[i].machine;
                m.handle(Input::Command(Command::Abandon), now());
                Some(i)
            }
            Step::Cancel(i) => {
                let c = &mut self.contenders[i];
                c.cancelled = true;
                c.lookup_unanswered |= matches!(c.request, Some(Action::CheckLease { .. }))
                    || matches!(c.answer, Some(Answer::Input(Input::LeaseChecked(_))));
                c.left = true;
                c.answer = None;
                if let Some(request) = c.request.take()
                    && matches!(
                        request,
                        Action::Join { .. }
                            | Action::Update { .. }
                            | Action::Delete { .. }
                            | Action::TakeUp { .. }
                    )
                {
                    c.orphans.push(request);
                }
                c.machine.handle(Input::Abandoned, now());
                c.machine
                    .handle(Input::Command(Command::Release(None)), now());
                Some(i)
            }
            Step::Tick => {
                for c in &mut self.contenders {
                    for k in &mut c.keepers {
                        k.deadline = (k.deadline - 1).max(0);
                    }
                    for job in &mut c.jobs {
                        if let Job::Entry { after, .. } = job {
                            *after = (*after - 1).max(0);
                        }
                    }
                    shift_machine(&mut c.machine);
                }
                for (_, expiry) in &mut self.store.leases {
                    *expiry = (*expiry - 1).max(0);
                }
                // Sessions whose keep-alives are answered stay a TTL ahead.
                let mut touched = None;
                for i in 0..self.contenders.len() {
                    for k in 0..self.contenders[i].keepers.len() {
                        let keeper = &self.contenders[i].keepers[k];
                        if keeper.renewed
                            && !keeper.silent
                            && !matches!(keeper.state, KeeperState::Lost(_))
                            && self.store.lease_alive(keeper.lease)
                        {
                            self.renew(i, k);
                            touched = touched.or(self.notify(i, k));
                        }
                    }
                }
                touched
            }
        }
    }

    /// A keep-alive of keeper `k` of contender `i` is answered now.
    fn renew(&mut self, i: usize, k: usize) {
        let keeper = &mut self.contenders[i].keepers[k];
        keeper.deadline = TTL;
        keeper.state = KeeperState::Live;
        let lease = keeper.lease;
        for (l, expiry) in &mut self.store.leases {
            if *l == lease {
                *expiry = TTL;
            }
        }
    }

    fn keeper(&self, i: usize, lease: LeaseId) -> Option<&Keeper> {
        self.contenders[i].keepers.iter().find(|k| k.lease == lease)
    }

    /// Tells contender `i`'s machine of keeper `k`'s state, if it is its session.
    fn notify(&mut self, i: usize, k: usize) -> Option<usize> {
        let c = &mut self.contenders[i];
        let keeper = &c.keepers[k];
        if c.machine.session.map(|s| s.lease) != Some(keeper.lease) {
            return None;
        }
        let state = keeper.session_state();
        c.machine.handle(Input::SessionChanged(state), now());
        Some(i)
    }

    /// The store carries out `request` of contender `i`, and answers.
    fn serve(&mut self, i: usize, request: &Action) -> Answer {
        let queue: Arc<str> = self.contenders[i].machine.key().clone();
        let input = match request {
            Action::OpenSession => {
                let c = &self.contenders[i];
                let current = c
                    .keepers
                    .iter()
                    .find(|k| k.renewed && !k.taken_up && !matches!(k.state, KeeperState::Lost(_)));
                let lease = match current {
                    Some(k) => k.lease,
                    None => {
                        let lease = self.store.next_lease;
                        self.store.next_lease += 1;
                        self.store.leases.push((lease, TTL));
                        self.contenders[i].keepers.push(Keeper {
                            lease,
                            deadline: TTL,
                            state: KeeperState::Live,
                            renewed: true,
                            silent: false,
                            taken_up: false,
                        });
                        lease
                    }
                };
                return Answer::Session(lease);
            }
            Action::TakeUpSession { lease } => {
                if !self.store.lease_alive(*lease) {
                    return Answer::Input(Input::SessionOpened(Err(Failure::LeaseLost)));
                }
                // A keep-alive first: it renews the lease in the store.
                for (l, expiry) in &mut self.store.leases {
                    if l == lease {
                        *expiry = TTL;
                    }
                }
                let keepers = &mut self.contenders[i].keepers;
                keepers.retain(|k| k.lease != *lease);
                keepers.push(Keeper {
                    lease: *lease,
                    deadline: TTL,
                    state: KeeperState::Live,
                    renewed: true,
                    silent: false,
                    taken_up: true,
                });
                return Answer::Session(*lease);
            }
            Action::TakeUp {
                entry,
                create_revision,
                mod_revision,
                value,
            } => match self.store.find(entry, *create_revision) {
                Some(e) if self.store.entries[e].mod_revision == *mod_revision => {
                    self.store.revision += 1;
                    let revision = self.store.revision;
                    let stored = &mut self.store.entries[e];
                    stored.value = value.clone();
                    stored.mod_revision = revision;
                    let taken = stored.clone();
                    let predecessor = self.store.predecessor(&queue, *create_revision);
                    Input::TakenUp(Ok(TakeUp::Taken(Box::new((taken, predecessor, revision)))))
                }
                Some(_) => Input::TakenUp(Ok(TakeUp::Written)),
                None => Input::TakenUp(Ok(TakeUp::Gone)),
            },
            Action::Subscribe => {
                self.contenders[i].subscribed = true;
                Input::Subscribed(Ok(()))
            }
            Action::Join { lease, value } => {
                if !self.store.lease_alive(*lease) {
                    Input::Joined(Err(Failure::LeaseLost))
                } else {
                    let key = entry_key(&queue, *lease);
                    let entry = match self.store.entries.iter().find(|e| e.key == key) {
                        Some(entry) => entry.clone(),
                        None => {
                            self.store.revision += 1;
                            let entry = Entry {
                                key,
                                value: value.clone(),
                                lease: *lease,
                                create_revision: self.store.revision,
                                mod_revision: self.store.revision,
                            };
                            self.store.entries.push(entry.clone());
                            entry
                        }
                    };
                    let predecessor = self.store.predecessor(&queue, entry.create_revision);
                    Input::Joined(Ok((entry, predecessor, self.store.revision)))
                }
            }
            Action::Update {
                entry,
                create_revision,
                value,
            } => match self.store.find(entry, *create_revision) {
                Some(e) => {
                    self.store.revision += 1;
                    let revision = self.store.revision;
                    let stored = &mut self.store.entries[e];
                    stored.value = value.clone();
                    stored.mod_revision = revision;
                    Input::Updated(Ok(Some(revision)))
                }
                None => Input::Updated(Ok(None)),
            },
            Action::Position {
                entry,
                create_revision,
            } => {
                let own = self
                    .store
                    .find(entry, *create_revision)
                    .map(|e| self.store.entries[e].clone());
                let predecessor = self.store.predecessor(&queue, *create_revision);
                Input::Positioned(Ok((own, predecessor, self.store.revision)))
            }
            Action::Delete {
                entry,
                create_revision,
            } => Input::Deleted(Ok(self.delete(entry, *create_revision))),
            Action::CheckLease { lease } => {
                // A keep-alive: it also renews the lease in the store.
                let alive = self.store.lease_alive(*lease);
                for (l, expiry) in &mut self.store.leases {
                    if l == lease {
                        *expiry = TTL;
                    }
                }
                Input::LeaseChecked(Ok(alive))
            }
            other => unreachable!("not a request: {other:?}"),
        };
        Answer::Input(input)
    }

    /// A guarded delete: whether it deleted.
    fn delete(&mut self, key: &str, create_revision: Revision) -> bool {
        if self.store.find(key, create_revision).is_none() {
            return false;
        }
        self.store.revision += 1;
        self.remove_entry(key, create_revision);
        true
    }

    /// Removes the entry at the current revision and tells the watches of its queue.
    fn remove_entry(&mut self, key: &str, create_revision: Revision) {
        let Some(e) = self.store.find(key, create_revision) else {
            return;
        };
        self.store.entries.remove(e);
        let revision = self.store.revision;
        for c in &mut self.contenders {
            if c.subscribed && queue_of(key) == Some(&**c.machine.key()) {
                c.events.push_back(Input::EntryDeleted {
                    key: key.to_owned(),
                    revision,
                });
            }
        }
    }

    /// Carries out what contender `i`'s machine asked for, checking what it publishes.
    fn drain(&mut self, config: &Config, i: usize) -> Result<(), Violation> {
        while let Some(action) = self.contenders[i].machine.poll_action() {
            let c = &mut self.contenders[i];
            match action {
                Action::OpenSession
                | Action::Subscribe
                | Action::Join { .. }
                | Action::Update { .. }
                | Action::Position { .. }
                | Action::Delete { .. }
                | Action::CheckLease { .. }
                | Action::TakeUpSession { .. }
                | Action::TakeUp { .. } => {
                    // A subscription the machine gave up on (a release while it was in flight):
                    // its answer is ignored; the new request replaces it.
                    c.request = Some(action);
                    c.answer = None;
                }
                Action::Unsubscribe => c.subscribed = false,
                Action::LeaveSession(lease) => {
                    for k in &mut c.keepers {
                        if k.lease == lease {
                            k.renewed = false;
                        }
                    }
                }
                Action::DropSession(lease) => {
                    for k in &mut c.keepers {
                        if k.lease == lease {
                            k.renewed = false;
                        }
                    }
                }
                Action::Reap {
                    entry,
                    create_revision,
                    after,
                    ..
                } => c.jobs.push(Job::Entry {
                    key: entry,
                    create_revision,
                    after: i8::try_from(after.as_secs().div_ceil(TICK.as_secs())).unwrap_or(TTL),
                }),
                Action::ReapUnseenJoin { entry, .. } => {
                    for late in [false, true] {
                        c.jobs.push(Job::UnseenJoin {
                            key: entry.clone(),
                            late,
                        });
                    }
                }
                Action::AbandonSession | Action::Reply(..) | Action::KeepError => {}
                Action::Publish(state) => self.published(config, i, state)?,
            }
        }
        let c = &mut self.contenders[i];
        // Keepers that no one renews or reads any more.
        let in_use = c.machine.session.map(|s| s.lease);
        // A taken-up lease is kept alive while the lock uses it, not by the locker: once the
        // lock ends or leaves it, its keeper stops (without revoking a lease that may be
        // another's; the real driver revokes one it took a tenure up under, which is sooner).
        let lock_uses = if c.machine.is_ended() { None } else { in_use };
        for k in &mut c.keepers {
            if k.taken_up && Some(k.lease) != lock_uses {
                k.renewed = false;
            }
        }
        c.keepers.retain(|k| {
            k.renewed || Some(k.lease) == in_use || !matches!(k.state, KeeperState::Lost(_))
        });
        normalize_machine(&mut c.machine);
        Ok(())
    }

    /// Contender `i` published `state`: a tenure begins with a greater token than any before on
    /// its key, and ends only with its `Lost` (or the owner's own release).
    fn published(&mut self, config: &Config, i: usize, state: Ownership) -> Result<(), Violation> {
        let key = config.contenders[i].key;
        let resumer = config.contenders[i].resumes;
        self.reason_says_what_happened(i, state, resumer)?;
        let tenure_lease = state
            .token()
            .and_then(|t| self.store.entries.iter().find(|e| e.create_revision == t.0))
            .map(|e| e.lease)
            .or(self.contenders[i].machine.session.map(|s| s.lease));
        let c = &mut self.contenders[i];
        match (c.tenure, state) {
            // The tenure's entry is gone; its Lost follows (the tenure ends there).
            (Some(t), Ownership::Ending { token }) if token.0 == t => {}
            (_, Ownership::Ending { .. }) => {
                return Err(Violation(format!(
                    "contender {i}: published {state:?} outside the tenure it ends"
                )));
            }
            // The dead process's tenure, taken up: the same token, continued.
            (None, Ownership::Owned { token } | Ownership::Unconfirmed { token, .. })
                if resumer && token.0 == DEAD_TOKEN =>
            {
                c.tenure = Some(token.0);
                c.tenure_lease = Some(DEAD_LEASE);
                c.lookup_unanswered = false;
            }
            // The dead process's tenure could not be taken up: its loss, reported.
            (None, Ownership::Lost { token, .. }) if resumer && token.0 == DEAD_TOKEN => {}
            (Some(t), Ownership::Owned { token } | Ownership::Unconfirmed { token, .. })
                if token.0 == t => {}
            (
                Some(t),
                Ownership::Owned { .. } | Ownership::Unconfirmed { .. } | Ownership::Acquiring,
            ) => {
                return Err(Violation(format!(
                    "contender {i}: the tenure with token {t} ended without a Lost: published {state:?}"
                )));
            }
            (None, Ownership::Owned { token } | Ownership::Unconfirmed { token, .. })
                if self
                    .deposed
                    .iter()
                    .any(|(k, r)| queue_of(k) == Some(key) && *r == token.0) =>
            {
                // A tenure of an entry an operator deleted, begun before its holder heard of it:
                // fencing refuses its token where a later one was seen.
                c.tenure = Some(token.0);
                c.tenure_lease = tenure_lease;
                c.lookup_unanswered = false;
            }
            (None, Ownership::Owned { token } | Ownership::Unconfirmed { token, .. }) => {
                let last = self.last_token.iter_mut().find(|(k, _)| k == key);
                match last {
                    Some((_, last)) if *last >= token.0 => {
                        return Err(Violation(format!(
                            "contender {i}: token {} on {key:?} does not exceed {last}",
                            token.0
                        )));
                    }
                    Some((_, last)) => *last = token.0,
                    None => self.last_token.push((key.to_owned(), token.0)),
                }
                c.tenure = Some(token.0);
                c.tenure_lease = tenure_lease;
                c.lookup_unanswered = false;
            }
            (Some(t), Ownership::Lost { token, .. }) if token.0 != t => {
                return Err(Violation(format!(
                    "contender {i}: lost token {} during the tenure of {t}",
                    token.0
                )));
            }
            (None, Ownership::Lost { token, .. }) => {
                return Err(Violation(format!(
                    "contender {i}: lost token {} with no tenure",
                    token.0
                )));
            }
            (Some(t), Ownership::Released) if !c.left => {
                return Err(Violation(format!(
                    "contender {i}: the tenure with token {t} ended with Released, but its user did not leave"
                )));
            }
            (_, Ownership::Lost { .. } | Ownership::Released | Ownership::Failed { .. }) => {
                c.tenure = None;
            }
            (None, Ownership::Acquiring) => {}
        }
        Ok(())
    }

    /// A loss says what happened: `LeaseGone` only once the store has no lease of the tenure's
    /// entry, and `EntryDeleted` only for an entry an operator deleted (unless the lease's lookup
    /// did not answer: the loss then says what was seen).
    fn reason_says_what_happened(
        &self,
        i: usize,
        state: Ownership,
        resumer: bool,
    ) -> Result<(), Violation> {
        let Ownership::Lost { token, reason } = state else {
            return Ok(());
        };
        let c = &self.contenders[i];
        let deposed = self.deleted_by_operator.contains(&token.0);
        // The report of a dead tenure this resumer could not take up: its entry may have gone
        // with another resumer's release.
        let not_taken_up = resumer && token.0 == DEAD_TOKEN && c.tenure.is_none();
        let lease = if not_taken_up {
            Some(DEAD_LEASE)
        } else {
            c.tenure_lease
        };
        match reason {
            LossReason::LeaseGone if lease.is_some_and(|l| self.store.lease_alive(l)) => {
                Err(Violation(format!(
                    "contender {i}: lost token {} as LeaseGone, but its lease {lease:?} is alive",
                    token.0
                )))
            }
            LossReason::EntryDeleted if !deposed && !c.lookup_unanswered && !not_taken_up => {
                Err(Violation(format!(
                    "contender {i}: lost token {} as EntryDeleted, but no operator deleted its entry",
                    token.0
                )))
            }
            _ => Ok(()),
        }
    }

    /// The properties that hold in every state.
    fn check(&self, config: &Config) -> Result<(), Violation> {
        let mut owners: Vec<(&str, usize)> = Vec::new();
        for (i, c) in self.contenders.iter().enumerate() {
            let ownership = c.machine.ownership(now());
            let deposed = match c.machine.state() {
                State::Holding { entry, .. } => self
                    .deposed
                    .iter()
                    .any(|(k, r)| *k == entry.key && *r == entry.create_revision),
                _ => false,
            };
            if !ownership.is_owned() {
                continue;
            }
            if deposed {
                // Exempt only while it is sure to hear of the delete: a check is due, its watch
                // has a gap, or the delete (or a resync, a close) is on its way.
                let State::Holding { entry, check } = c.machine.state() else {
                    unreachable!("deposed means holding");
                };
                let hears = *check != Check::No
                    || c.machine.watch_gap.is_some()
                    || c.events.iter().any(|e| match e {
                        Input::EntryDeleted { key, revision } => {
                            *key == entry.key && *revision > entry.create_revision
                        }
                        Input::WatchClosed | Input::Resync => true,
                        _ => false,
                    });
                if !hears {
                    return Err(Violation(format!(
                        "contender {i} claims {entry:?}, which an operator deleted, and will never hear of it"
                    )));
                }
                continue;
            }
            let key = config.contenders[i].key;
            if let Some((_, other)) = owners.iter().find(|(k, _)| *k == key) {
                return Err(Violation(format!(
                    "contenders {other} and {i} both claim {key:?} ({ownership:?})"
                )));
            }
            owners.push((key, i));
            let State::Holding { entry, .. } = c.machine.state() else {
                return Err(Violation(format!(
                    "contender {i} claims {key:?} in {:?}",
                    c.machine.state()
                )));
            };
            let first = self
                .store
                .entries
                .iter()
                .find(|e| queue_of(&e.key) == Some(key));
            if first.map(|e| (&e.key, e.create_revision))
                != Some((&entry.key, entry.create_revision))
            {
                return Err(Violation(format!(
                    "contender {i} claims {key:?} with {entry:?}, but the store's first entry is {first:?}"
                )));
            }
        }
        Ok(())
    }

    /// Runs on with no faults, every leaving contender leaving, until the staying contender
    /// owns and nothing else is left, or until a world already known to settle (`settles`, the
    /// hashes of every world a calm run went through); the steps taken, or what is wrong after
    /// them.
    fn calm(
        &self,
        config: &Config,
        settles: &mut HashSet<u64>,
    ) -> Result<(), (Vec<Step>, Violation)> {
        let mut w = self.clone();
        let mut taken = Vec::new();
        let mut path = Vec::new();
        let mut settled = false;
        for _ in 0..CALM_STEPS {
            let h = fingerprint(&w);
            if settles.contains(&h) || w.settled(config) {
                settled = true;
                break;
            }
            if path.contains(&h) {
                break; // round and round: it never settles
            }
            path.push(h);
            let Some(step) = w
                .steps(config, true)
                .into_iter()
                .min_by_key(|s| calm_priority(*s))
            else {
                break;
            };
            taken.push(step);
            w = w.after(config, step).map_err(|v| (taken.clone(), v))?;
        }
        if settled {
            settles.extend(path);
            return Ok(());
        }
        let why = w.unsettled(config);
        Err((
            taken,
            Violation(format!("not settled after a calm run: {why}")),
        ))
    }

    fn settled(&self, config: &Config) -> bool {
        self.unsettled(config).is_empty()
    }

    /// What keeps this world from being settled: the staying contenders own, as the store says,
    /// the others have ended, and nothing else is left.
    fn unsettled(&self, config: &Config) -> String {
        let mut why = String::new();
        let mut expected = Vec::new();
        for (i, (c, cc)) in self.contenders.iter().zip(&config.contenders).enumerate() {
            match cc.role {
                Role::Stays => {
                    let ownership = c.machine.ownership(now());
                    match c.machine.state() {
                        State::Holding { entry, .. }
                            if ownership.is_owned() && c.machine.published() == ownership =>
                        {
                            expected.push((entry.key.clone(), entry.create_revision));
                        }
                        state => {
                            let _ = write!(
                                why,
                                "contender {i} does not own ({state:?}, published {:?}); ",
                                c.machine.published()
                            );
                        }
                    }
                }
                Role::Leaves(_) => {
                    if !c.machine.is_ended() {
                        let _ = write!(why, "contender {i} has not ended; ");
                    }
                }
            }
            if cc.role == Role::Stays && (!c.subscribed || !c.events.is_empty()) {
                let _ = write!(why, "contender {i} has no watch, or events pending; ");
            }
            if c.request.is_some()
                || c.answer.is_some()
                || !c.orphans.is_empty()
                || !c.jobs.is_empty()
            {
                let _ = write!(why, "contender {i} has work left; ");
            }
        }
        let mut stored: Vec<_> = self
            .store
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.create_revision))
            .collect();
        stored.sort();
        expected.sort();
        if stored != expected {
            let _ = write!(why, "the store has {stored:?}, expected {expected:?}");
        }
        why
    }
}

fn fingerprint(world: &World) -> u64 {
    let mut h = DefaultHasher::new();
    world.hash(&mut h);
    h.finish()
}

/// What a failed request answers.
fn failed(request: &Action) -> Input {
    match request {
        Action::OpenSession => Input::SessionOpened(Err(Failure::Retryable)),
        Action::Subscribe => Input::Subscribed(Err(Failure::Retryable)),
        Action::Join { .. } => Input::Joined(Err(Failure::Retryable)),
        Action::Update { .. } => Input::Updated(Err(Failure::Retryable)),
        Action::Position { .. } => Input::Positioned(Err(Failure::Retryable)),
        Action::Delete { .. } => Input::Deleted(Err(Failure::Retryable)),
        Action::CheckLease { .. } => Input::LeaseChecked(Err(Failure::Retryable)),
        Action::TakeUpSession { .. } => Input::SessionOpened(Err(Failure::Retryable)),
        Action::TakeUp { .. } => Input::TakenUp(Err(Failure::Retryable)),
        other => unreachable!("not a request: {other:?}"),
    }
}

fn calm_priority(step: Step) -> u8 {
    match step {
        Step::Drop(_) => 0,
        Step::LeaseGone(..) | Step::KeeperDeadline(..) => 0,
        Step::Expire(_) => 1,
        Step::Deliver(_) => 2,
        Step::Event(_) => 3,
        Step::Serve(_) => 4,
        Step::Timeout(_) => 5,
        Step::Reap(..) => 6,
        Step::Orphan(..) => 7,
        Step::Answered(..) => 8,
        Step::Tick => 10,
        _ => 11,
    }
}

/// The machine one tick later.
fn shift_machine(m: &mut Machine) {
    m.retry_at = m.retry_at.map(shift);
    shift_times(m, shift);
}

/// The machine's instants in their one form: a back-off in progress ends at the next tick; its
/// jitter is not part of the state.
fn normalize_machine(m: &mut Machine) {
    m.retry_at = m.retry_at.map(|t| if t <= now() { now() } else { at(1) });
    m.backoff = Backoff::new(TICK, TICK, 1);
    shift_times(m, clamp);
    m.shrink();
}

fn shift_times(m: &mut Machine, f: fn(Instant) -> Instant) {
    if let Some(session) = &mut m.session {
        session.state = match session.state {
            SessionState::Live { deadline } => SessionState::Live {
                deadline: f(deadline),
            },
            SessionState::Unconfirmed { deadline } => SessionState::Unconfirmed {
                deadline: f(deadline),
            },
            lost => lost,
        };
    }
    if let Ownership::Unconfirmed { token, deadline } = m.published {
        m.published = Ownership::Unconfirmed {
            token,
            deadline: f(deadline),
        };
    }
}

/// What a search found.
struct Explored {
    states: usize,
    transitions: usize,
    max_depth: usize,
}

/// Explores every state of `config` breadth-first, checking every property; on a violation,
/// panics with the trace that leads to it.
fn explore(config: &Config, limit: usize) -> Explored {
    let start = World::new(config);
    let mut seen: HashMap<Arc<World>, usize> = HashMap::new();
    // Each state: the state, its parent and the step from it, its depth.
    let mut states: Vec<(Arc<World>, usize, Option<Step>, usize)> = Vec::new();
    let start = Arc::new(start);
    seen.insert(start.clone(), 0);
    states.push((start, 0, None, 0));
    let mut settles = HashSet::new();
    let mut next = 0;
    let mut transitions = 0;
    while next < states.len() {
        let (world, _, _, depth) = states[next].clone();

        if let Err((calm, violation)) = world.calm(config, &mut settles) {
            panic!("{}", trace(config, &states, next, None, &calm, &violation));
        }
        for step in world.steps(config, false) {
            transitions += 1;
            match world.after(config, step) {
                Ok(after) => {
                    let after = Arc::new(after);
                    if !seen.contains_key(&after) {
                        let id = states.len();
                        seen.insert(after.clone(), id);
                        states.push((after, next, Some(step), depth + 1));
                        assert!(
                            states.len() <= limit,
                            "{}: more than {limit} states",
                            config.name
                        );
                    }
                }
                Err(violation) => {
                    panic!(
                        "{}",
                        trace(config, &states, next, Some(step), &[], &violation)
                    );
                }
            }
        }
        next += 1;
    }
    Explored {
        states: states.len(),
        transitions,
        max_depth: states.iter().map(|s| s.3).max().unwrap_or(0),
    }
}

/// The steps from the start to state `to` (then `last`, then the calm run), each with what the
/// machines did.
fn trace(
    config: &Config,
    states: &[(Arc<World>, usize, Option<Step>, usize)],
    to: usize,
    last: Option<Step>,
    calm: &[Step],
    violation: &Violation,
) -> String {
    let mut path = Vec::new();
    let mut at = to;
    while let Some(step) = states[at].2 {
        path.push(step);
        at = states[at].1;
    }
    path.reverse();
    path.extend(last);
    let calm_from = path.len();
    path.extend_from_slice(calm);
    let mut out = format!(
        "model {:?}: {}\ncounterexample, {} steps (a calm run from step {}):\n",
        config.name,
        violation.0,
        path.len(),
        calm_from + 1
    );
    let mut world = (*states[0].0).clone();
    for (n, step) in path.iter().enumerate() {
        let _ = writeln!(out, "{:>3}. {}", n + 1, describe(&world, *step));
        match world.after(config, *step) {
            Ok(next) => world = next,
            Err(v) => {
                let _ = writeln!(out, "     => {}", v.0);
                break;
            }
        }
        for (i, c) in world.contenders.iter().enumerate() {
            let _ = writeln!(
                out,
                "       c{i}: {:<60} published {:?}",
                short(c.machine.state()),
                c.machine.published()
            );
        }
    }
    let _ = writeln!(out, "store: {:?}", world.store.entries);
    out
}

fn describe(w: &World, step: Step) -> String {
    match step {
        Step::Serve(i) => format!("c{i}: the store serves {:?}", w.contenders[i].request),
        Step::Fail(i) => format!("c{i}: {:?} fails, not applied", w.contenders[i].request),
        Step::LoseAnswer(i) => format!(
            "c{i}: {:?} applied, its answer lost",
            w.contenders[i].request
        ),
        Step::Deliver(i) => format!("c{i}: gets {:?}", w.contenders[i].answer),
        Step::Event(i) => format!("c{i}: watch says {:?}", w.contenders[i].events.front()),
        Step::Expire(l) => format!("the store expires lease {:?}", w.store.leases[l].0),
        Step::Revoke(l) => format!("an operator revokes lease {:?}", w.store.leases[l].0),
        Step::OperatorDelete(e) => format!("an operator deletes {:?}", w.store.entries[e]),
        Step::Reap(i, j) => format!("c{i}: the reaper runs {:?}", w.contenders[i].jobs[j]),
        Step::Orphan(i, j) => format!(
            "c{i}: the cancelled {:?} reaches the store",
            w.contenders[i].orphans[j]
        ),
        Step::Silence(i, k)
        | Step::Answered(i, k)
        | Step::KeeperDeadline(i, k)
        | Step::LeaseGone(i, k) => {
            format!(
                "c{i}: {step:?} (lease {:x})",
                w.contenders[i].keepers[k].lease
            )
        }
        other => format!("{other:?}"),
    }
}

fn short(state: &State) -> String {
    match state {
        State::Waiting {
            entry, predecessor, ..
        } => format!(
            "Waiting({} @{} behind {predecessor})",
            entry.key, entry.create_revision
        ),
        State::Positioning { entry } => {
            format!("Positioning({} @{})", entry.key, entry.create_revision)
        }
        State::Holding { entry, check } => {
            format!(
                "Holding({} @{}, {check:?})",
                entry.key, entry.create_revision
            )
        }
        State::Releasing { entry, .. } => {
            format!("Releasing({} @{})", entry.key, entry.create_revision)
        }
        State::Refreshing { .. } => "Refreshing".to_owned(),
        other => format!("{other:?}"),
    }
}

fn contender(key: &'static str, mode: Mode, role: Role) -> ContenderConfig {
    ContenderConfig {
        key,
        mode,
        role,
        resumes: false,
    }
}

/// A contender that starts by resuming the dead process's tenure.
fn resumer(mode: Mode, role: Role) -> ContenderConfig {
    ContenderConfig {
        resumes: true,
        ..contender("a", mode, role)
    }
}

fn run(config: Config, limit: usize) {
    let started = std::time::Instant::now();
    let explored = explore(&config, limit);
    println!(
        "model {:?}: {} states, {} transitions, depth {}, every property holds ({:.1?})",
        config.name,
        explored.states,
        explored.transitions,
        explored.max_depth,
        started.elapsed()
    );
}

/// More states than this is a model grown by mistake.
const LIMIT: usize = 1_000_000;

fn stays(key: &'static str) -> ContenderConfig {
    contender(key, Mode::Persistent, Role::Stays)
}

#[test]
fn release_racing_expiry() {
    run(
        Config {
            name: "2 contenders, 1 key: a release racing its lease's expiry, keep-alive silence",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Once, Role::Leaves(Move::Release)),
            ],
            budget: Budget {
                silences: 1,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn cancellation_at_every_step() {
    run(
        Config {
            name: "2 contenders, 1 key: cancellation at every step, failed and lost requests",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Once, Role::Leaves(Move::Cancel)),
            ],
            budget: Budget {
                request_faults: 2,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn operator_deletes_and_broken_watches() {
    run(
        Config {
            name: "2 handles, 1 key: operator deletes, compaction, a closed watch",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Persistent, Role::Leaves(Move::Drop)),
            ],
            budget: Budget {
                operator_deletes: 1,
                compactions: 1,
                watch_closes: 1,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn three_contenders_one_key() {
    run(
        Config {
            name: "3 contenders (a handle, acquire, try_acquire), 1 key: an abandon, a drop",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Once, Role::Leaves(Move::Abandon)),
                contender("a", Mode::TryOnce, Role::Leaves(Move::Drop)),
            ],
            budget: Budget::default(),
        },
        LIMIT,
    );
}

#[test]
fn three_contenders_two_keys() {
    run(
        Config {
            name: "3 contenders, 2 keys: a release, a drop",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Once, Role::Leaves(Move::Release)),
                contender("b", Mode::Persistent, Role::Leaves(Move::Drop)),
            ],
            budget: Budget::default(),
        },
        LIMIT,
    );
}

#[test]
fn a_guard_and_an_operator_delete() {
    run(
        Config {
            name: "2 contenders (a handle, acquire), 1 key: an operator delete",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Once, Role::Leaves(Move::Release)),
            ],
            budget: Budget {
                operator_deletes: 1,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn a_revoked_lease_and_a_failed_lookup() {
    run(
        Config {
            name: "2 contenders (a handle, acquire), 1 key: an operator revokes a lease",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Once, Role::Leaves(Move::Release)),
            ],
            budget: Budget {
                revokes: 1,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn a_lone_holder_revoked_deleted_and_failing() {
    run(
        Config {
            name: "1 handle: an operator revokes its lease and deletes its entry, requests fail",
            dead: None,
            contenders: vec![stays("a")],
            budget: Budget {
                revokes: 1,
                operator_deletes: 1,
                request_faults: 2,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn resume_racing_the_lease_expiry() {
    run(
        Config {
            name: "a resumer and a handle, 1 key: the dead holder's lease expiring as it is resumed, a request fails",
            dead: Some(1),
            contenders: vec![
                resumer(Mode::Persistent, Role::Stays),
                contender("a", Mode::Once, Role::Leaves(Move::Release)),
            ],
            budget: Budget {
                request_faults: 1,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn resume_racing_a_second_resume() {
    run(
        Config {
            name: "2 resumers of one token (a handle, acquire), 1 key: a request fails",
            dead: Some(TTL),
            contenders: vec![
                resumer(Mode::Persistent, Role::Stays),
                resumer(Mode::Once, Role::Leaves(Move::Release)),
            ],
            budget: Budget {
                request_faults: 1,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}

#[test]
fn watches_closed_twice() {
    run(
        Config {
            name: "2 handles, 1 key: two closed watches",
            dead: None,
            contenders: vec![
                stays("a"),
                contender("a", Mode::Persistent, Role::Leaves(Move::Drop)),
            ],
            budget: Budget {
                watch_closes: 2,
                ..Budget::default()
            },
        },
        LIMIT,
    );
}
