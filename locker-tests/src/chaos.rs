//! A chaos run with a safety checker.
//!
//! Several clients contend for a few keys under a seeded random schedule of faults. While a client
//! owns a key it writes to a *fenced resource* ([`FencedResource`]), which refuses a write whose
//! fencing token is below the highest it has accepted for that key.
//!
//! # What is recorded
//!
//! Everything is stamped ([`Stamp`]) on the process's one monotonic clock (tokio's, so paused
//! time works) and ordered by one counter (two stamps on paused time often share an instant).
//!
//! - **Believed tenures**, by the contending task itself, never by a task of its own: a tenure
//!   begins when `wait_owned` returned the token to the client (stamped right after), and ends
//!   when the client stopped believing: stamped just before it calls `release`, or as soon as it
//!   saw its handle answer anything but that token (a published change it was waiting on, or the
//!   check before a write). So a begin is stamped a little after the handle published ownership
//!   (no write can happen in between), and an end caused by the local deadline a little after the
//!   deadline (at most one pause between writes): the safety margin between a client's deadline
//!   and the store's expiry of its lease covers that.
//! - **Writes**: the resource, under its lock, asks the writer's handle whether it still owns the
//!   key with the write's token ([`LockHandle::ownership`](locker_core::LockHandle::ownership),
//!   which never claims ownership past the local deadline). If not, no write is made. If so, it
//!   stamps the write, then accepts it (token at least the highest accepted) or refuses it.
//! - **Revocations**: for an `ExpireLease`, the world waits for the key's next holder
//!   ([`fresh_holder`], so that the victim is still at work when its successor takes over), with
//!   `isolate` black-holes the victim's client, then stamps just before it asks the store to revoke
//!   the victim's lease, and again once the store answered.
//!
//! # What the checker asserts
//!
//! Per key:
//!
//! 1. Tokens increase in the order tenures began.
//! 2. Two clients' believed tenures never overlap, **except** the overlap that early revocation
//!    makes unavoidable: tenure `A` may overlap a later tenure `B` of another client only if an
//!    `ExpireLease` revoked the lease of `A`'s client that carried `A`'s entry (`A`'s token, the
//!    entry's create revision, is below the store's revision read after the revocation), `B`
//!    began after the revocation was issued, and `A` ended at most one TTL after the store
//!    answered (the design's bound: `A`'s local deadline is the last keep-alive sent before the
//!    revocation plus the TTL minus the safety margin). `A` may even begin after the revocation:
//!    the read that made it the holder was answered before and reached it after. Such an overlap
//!    is *excused*.
//! 3. Every write (accepted or refused) was made inside its writer's believed tenure with the
//!    write's token, and no other client's tenure on that key covered the write's instant unless
//!    that overlap is excused.
//! 4. The resource is checked on its own, from its log: an accepted write never follows an
//!    accepted write with a higher token, and a refused write always does.
//! 5. A refused write must come from an excused victim (its writer's tenure overlaps, excused, a
//!    later tenure that began before the write): fencing stopped a stale holder. A refusal that
//!    no revocation explains means the lock let two clients believe at once.
//! 6. If an isolated `ExpireLease` revoked a holder's lease, at least one write was refused;
//!    otherwise the run never tested fencing. (Every schedule opens with one. A victim that is not
//!    cut off usually hears of the revocation before its successor writes, so it proves nothing
//!    either way.) If the schedule has an `ExpireLease`, at least one found a holder to revoke.
//! 7. After the faults heal, every key gets an owner again within the TTL and a few round trips;
//!    nothing is left in the store (checked by the caller's world).
//!
//! What this accepts, precisely: a victim of an `ExpireLease` keeps believing until it hears of
//! the revocation (its watch, or its keep-alive answering that the lease is gone) or until its
//! local deadline, whichever is first. During that overlap a write of the victim is *accepted*
//! only while no later holder has written yet (the resource cannot know the victim is stale:
//! that is the limit of fencing, and harmless, since every later holder's write supersedes it),
//! and *refused* from the moment a later holder's write was accepted (assertion 4). Nothing else
//! may overlap.
//!
//! # Replay
//!
//! The fault schedule ([`schedule`]) is a pure function of the seed and the plan: the same seed
//! gives the same faults at the same offsets from the start (a fault that could not start on time,
//! behind a slow restart or an `ExpireLease` waiting for a fresh holder, starts late; each lasts
//! as planned from when it took effect; the sequence stays the same). A failing run prints its
//! seed and the command that replays it, the schedule, and each revocation with the tenures
//! around it. On the memory backend (paused time, seeded runtime) the
//! whole history replays; on a real cluster the schedule does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{FencingToken, LockHandle, Locker, Ownership};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::harness::{LeaseLog, RecordingBackend};

/// A seeded random source (splitmix64): the schedule of a run is a function of its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration between `lo` and `hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(self.below(span + 1))
    }
}

/// A moment of the run: a number from one counter of the process, which orders every stamp (two
/// stamps on paused time often share an instant), and the instant on tokio's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// The order of the stamp among all stamps of the process.
    pub seq: u64,
    /// When it was taken.
    pub at: Instant,
}

impl Stamp {
    /// Takes a stamp now.
    pub fn now() -> Stamp {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Stamp {
            seq: NEXT.fetch_add(1, Ordering::SeqCst),
            at: Instant::now(),
        }
    }
}

/// One fault the schedule can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Kill a store member and restart it after a while.
    KillMember(usize),
    /// Freeze a store member for a while.
    PauseMember(usize),
    /// Cut one client off (fail fast) for a while.
    CutClient(usize),
    /// Black-hole one client for a while.
    BlackHoleClient(usize),
    /// Slow one client's link for a while.
    SlowClient(usize),
    /// Compact the store's history.
    Compact,
    /// An operator revokes the lease of the holder of key number `key` now, long before it would
    /// expire. With `isolate`, the holder's client is first black-holed until the fault heals, so
    /// that it cannot hear of the revocation before its local deadline: the widest overlap early
    /// revocation allows.
    ExpireLease {
        /// Which key's holder ([`key_name`]).
        key: usize,
        /// Whether the holder's client is black-holed while the fault lasts.
        isolate: bool,
    },
}

impl Fault {
    /// The fault's kind, for counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillMember(_) => "kill-member",
            Fault::PauseMember(_) => "pause-member",
            Fault::CutClient(_) => "cut-client",
            Fault::BlackHoleClient(_) => "black-hole-client",
            Fault::SlowClient(_) => "slow-client",
            Fault::Compact => "compact",
            Fault::ExpireLease { isolate: false, .. } => "expire-lease",
            Fault::ExpireLease { isolate: true, .. } => "expire-lease-isolated",
        }
    }
}

/// The name of key number `k` in a run.
pub fn key_name(k: usize) -> String {
    format!("key-{k}")
}

/// What injecting a fault did, as the world reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// The fault is on (or done, for an instantaneous one).
    Done,
    /// An `ExpireLease` revoked the lease of a holder.
    Revoked(Revocation),
    /// An `ExpireLease` found no holder to revoke (or the store refused the revocation).
    Missed,
}

/// An `ExpireLease` that revoked a holder's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revocation {
    /// The client whose lease it was.
    pub client: usize,
    /// Whether the client was black-holed first.
    pub isolated: bool,
    /// Stamped just before the revocation was sent to the store.
    pub issued: Stamp,
    /// Stamped once the store answered that it revoked it.
    pub done: Stamp,
    /// The store's revision read after that answer: every entry the lease carried was created
    /// before it.
    pub revision: i64,
}

/// Where a chaos run happens.
#[async_trait]
pub trait World: Send + Sync {
    /// How many store members can be killed or paused (0 for the memory backend).
    fn members(&self) -> usize;
    /// Client `i`'s locker (made once per client, at the start).
    async fn locker(&self, client: usize) -> Locker;
    /// Starts a fault; [`World::heal`] ends it. An `ExpireLease` answers what it revoked, with
    /// the stamps described on [`Revocation`].
    async fn inject(&self, fault: Fault) -> Injected;
    /// Ends a fault started by [`World::inject`], which answered `injected` (no-op for
    /// instantaneous ones).
    async fn heal(&self, fault: Fault, injected: Injected);
}

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed of the fault schedule and of every random choice.
    pub seed: u64,
    /// How long clients contend while faults happen.
    pub duration: Duration,
    /// How many clients.
    pub clients: usize,
    /// How many keys.
    pub keys: usize,
    /// The TTL of every client's locker.
    pub ttl: Duration,
}

impl Plan {
    /// The plan from `LOCKER_CHAOS_SEED` and `LOCKER_CHAOS_SECS`, with these defaults.
    pub fn from_env(default_seed: u64, default_secs: u64) -> Plan {
        let seed = std::env::var("LOCKER_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_seed);
        let secs = std::env::var("LOCKER_CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_secs);
        Plan {
            seed,
            duration: Duration::from_secs(secs),
            clients: 4,
            keys: 3,
            ttl: Duration::from_secs(2),
        }
    }
}

/// One step of a fault schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// When it starts, from the start of the run.
    pub at: Duration,
    /// The fault.
    pub fault: Fault,
    /// How long it lasts before it heals (zero for an instantaneous one).
    pub lasts: Duration,
}

/// The fault schedule of `plan` in a world of `members` store members: a pure function of the
/// seed and the plan. One fault at a time, each healed before the next begins, all within the
/// run's duration; the first is an isolated `ExpireLease`.
pub fn schedule(plan: &Plan, members: usize) -> Vec<Step> {
    let mut rng = Rng::new(plan.seed ^ 0x5C4E_D01E_FA17_0000);
    let mut steps = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        at += rng.between(Duration::from_millis(200), Duration::from_millis(1200));
        if at + Duration::from_millis(500) >= plan.duration {
            return steps;
        }
        // Every run opens with an isolated revocation, so that every run tests fencing.
        let fault = if steps.is_empty() {
            Fault::ExpireLease {
                key: rng.below(plan.keys as u64) as usize,
                isolate: true,
            }
        } else {
            pick(&mut rng, members, plan.clients, plan.keys)
        };
        let lasts = match fault {
            Fault::Compact | Fault::ExpireLease { isolate: false, .. } => Duration::ZERO,
            // Sometimes longer than the TTL, so that leases run out (and an isolated victim of
            // an `ExpireLease` learns only at its deadline).
            _ => rng.between(Duration::from_millis(100), plan.ttl * 2),
        };
        let lasts = lasts.min(plan.duration - at);
        steps.push(Step { at, fault, lasts });
        at += lasts;
    }
}

fn pick(rng: &mut Rng, members: usize, clients: usize, keys: usize) -> Fault {
    let client = rng.below(clients as u64) as usize;
    loop {
        let fault = match rng.below(8) {
            0 if members > 0 => Fault::KillMember(rng.below(members as u64) as usize),
            1 if members > 0 => Fault::PauseMember(rng.below(members as u64) as usize),
            2 => Fault::CutClient(client),
            3 => Fault::BlackHoleClient(client),
            4 => Fault::SlowClient(client),
            5 => Fault::Compact,
            6 | 7 => Fault::ExpireLease {
                key: rng.below(keys as u64) as usize,
                isolate: rng.below(4) != 0,
            },
            _ => continue,
        };
        return fault;
    }
}

/// One believed tenure, as the client recorded it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Belief {
    /// Who believed.
    pub client: usize,
    /// The key's number.
    pub key: usize,
    /// The tenure's fencing token.
    pub token: FencingToken,
    /// When `wait_owned` had returned the token.
    pub from: Stamp,
    /// When the client stopped believing; `None` while it lasts.
    pub until: Option<Stamp>,
}

/// One write the resource was asked to make by a writer who, at that instant, believed it owned
/// the key with `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// The writer.
    pub client: usize,
    /// The key's number.
    pub key: usize,
    /// The write's fencing token.
    pub token: FencingToken,
    /// When it was made, stamped under the resource's lock.
    pub at: Stamp,
    /// Whether the resource accepted it.
    pub accepted: bool,
}

/// A protected resource kept in memory, one register per key: accepts a write only with a token
/// at least the highest it has accepted for the key, and logs every write, accepted or refused.
#[derive(Debug, Default)]
pub struct FencedResource(Mutex<Vec<Write>>);

impl FencedResource {
    /// Writes to `key` as `client`, if `believed` (asked under the resource's lock, right before
    /// the write) answers the token the writer owns the key with; `None` (and no write) if it
    /// answers `None`. The write is accepted unless a higher token was accepted for `key`.
    pub fn write(
        &self,
        key: usize,
        client: usize,
        believed: impl FnOnce() -> Option<FencingToken>,
    ) -> Option<Write> {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let token = believed()?;
        let highest = log
            .iter()
            .rev()
            .filter(|w| w.key == key && w.accepted)
            .map(|w| w.token)
            .next();
        let write = Write {
            client,
            key,
            token,
            at: Stamp::now(),
            accepted: highest.is_none_or(|highest| token >= highest),
        };
        log.push(write);
        Some(write)
    }

    /// Every write, in the order it was made.
    pub fn log(&self) -> Vec<Write> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Believed tenures, appended to by the contending tasks.
#[derive(Debug, Default)]
struct Beliefs(Mutex<Vec<Belief>>);

impl Beliefs {
    fn begin(&self, belief: Belief) -> usize {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.push(belief);
        all.len() - 1
    }

    fn end(&self, i: usize, at: Stamp) {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[i].until = Some(at);
    }

    fn all(&self) -> Vec<Belief> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Per key, the tenures as (client, token, start offset µs, end offset µs).
pub type History = BTreeMap<String, Vec<(usize, i64, u128, Option<u128>)>>;

/// What a run did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// How long the clients contended, in seconds.
    pub secs: u64,
    /// Tenures begun, over all keys.
    pub acquisitions: usize,
    /// Tenures that followed another client's on the same key.
    pub handoffs: usize,
    /// Faults injected.
    pub faults: usize,
    /// Faults injected, by [`Fault::kind`].
    pub faults_by_kind: BTreeMap<&'static str, usize>,
    /// `ExpireLease` faults that revoked a holder's lease.
    pub revocations: usize,
    /// Those of them that black-holed the holder's client first.
    pub isolated_revocations: usize,
    /// Overlapping tenures excused by a revocation.
    pub excused_overlaps: usize,
    /// Writes the resource accepted (each checked against the tenures).
    pub accepted: usize,
    /// Writes the resource refused: stale holders that fencing stopped.
    pub refused: usize,
    /// Every violation found (empty for a safe run).
    pub violations: Vec<String>,
    /// The fault schedule.
    pub schedule: Vec<Step>,
    /// Every revocation, described with its stamps as offsets from the start of the run.
    pub revocation_log: Vec<String>,
    /// The history: per key, the tenures as (client, token, start offset, end offset) in
    /// microseconds from the start of the run. On virtual time it is the same for the same seed.
    pub history: History,
}

impl Report {
    /// The one summary line.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(kind, n)| format!("{kind}:{n}"))
            .collect();
        format!(
            "chaos: seed={} secs={} acquisitions={} handoffs={} faults={} [{}] revocations={} \
             (isolated {}) excused_overlaps={} accepted_writes={} refused_writes={} violations={}",
            self.seed,
            self.secs,
            self.acquisitions,
            self.handoffs,
            self.faults,
            kinds.join(" "),
            self.revocations,
            self.isolated_revocations,
            self.excused_overlaps,
            self.accepted,
            self.refused,
            self.violations.len()
        )
    }

    /// Prints the summary line, and panics with every violation if there is one, or if the run
    /// tested nothing: no acquisition, no fault, `ExpireLease` in the schedule but no holder's
    /// lease revoked, or an isolated holder's lease revoked but no write refused.
    /// The message says how to replay the run: `cargo test -p <package> --test chaos` with the
    /// seed and duration.
    pub fn assert_safe(&self, package: &str) {
        println!("{}", self.summary());
        let replay = format!(
            "replay: LOCKER_CHAOS_SEED={} LOCKER_CHAOS_SECS={} cargo test -p {package} --test \
             chaos -- --nocapture",
            self.seed, self.secs
        );
        let steps: Vec<String> = self.schedule.iter().map(|s| format!("{s:?}")).collect();
        let explain = format!(
            "{}\n{replay}\nschedule:\n{}\nrevocations:\n{}",
            self.summary(),
            steps.join("\n"),
            self.revocation_log.join("\n")
        );
        assert!(
            self.violations.is_empty(),
            "{explain}\nviolations:\n{}",
            self.violations.join("\n")
        );
        assert!(
            self.acquisitions > 0 && self.faults > 0,
            "the run tested nothing: {explain}"
        );
        let expire_leases = self
            .schedule
            .iter()
            .filter(|s| matches!(s.fault, Fault::ExpireLease { .. }))
            .count();
        assert!(
            expire_leases == 0 || self.revocations > 0,
            "no ExpireLease of the schedule found a holder to revoke. {explain}"
        );
        assert!(
            self.isolated_revocations == 0 || self.refused > 0,
            "isolated holders' leases were revoked, yet the resource refused no write: the run \
             never tested fencing. {explain}"
        );
    }
}

/// Runs the plan in the world and checks the history. Every client's locks are released and its
/// locker closed before it returns.
pub async fn run(world: Arc<dyn World>, plan: &Plan) -> Report {
    let start = Instant::now();
    let end = start + plan.duration;
    let resource = Arc::new(FencedResource::default());
    let beliefs = Arc::new(Beliefs::default());

    let mut lockers = Vec::new();
    for c in 0..plan.clients {
        lockers.push(world.locker(c).await);
    }

    // Contenders: one task per (client, key), each with its own seeded source.
    let mut tasks = Vec::new();
    for (c, locker) in lockers.iter().enumerate() {
        for k in 0..plan.keys {
            let contender = Contender {
                locker: locker.clone(),
                client: c,
                key: k,
                resource: resource.clone(),
                beliefs: beliefs.clone(),
                ttl: plan.ttl,
            };
            let stream = (((c as u64) << 32) | k as u64).wrapping_add(1);
            let rng = Rng::new(plan.seed ^ stream.wrapping_mul(0x2545_F491_4F6C_DD1D));
            tasks.push(tokio::spawn(contender.run(rng, end)));
        }
    }

    // The fault schedule, fixed before anything happens.
    let steps = schedule(plan, world.members());
    let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut revocations = Vec::new();
    for step in &steps {
        sleep_until(start + step.at).await;
        let injected = world.inject(step.fault).await;
        *by_kind.entry(step.fault.kind()).or_default() += 1;
        if let Injected::Revoked(revocation) = injected {
            revocations.push(revocation);
        }
        tracing::debug!(?step, ?injected, "chaos: fault injected");
        // It lasts as long as planned from when it took effect: an `ExpireLease` may have
        // waited for a fresh holder.
        sleep(step.lasts).await;
        world.heal(step.fault, injected).await;
    }
    for task in tasks {
        let _ = task.await;
    }

    // After the faults heal, every key gets an owner again: a fresh client takes each in turn.
    let mut violations = Vec::new();
    let checker = world.locker(plan.clients).await;
    for k in 0..plan.keys {
        let key = key_name(k);
        match timeout(
            plan.ttl * 3 + Duration::from_secs(2),
            checker.acquire(key.clone(), "check"),
        )
        .await
        {
            Ok(Ok(guard)) => {
                let _ = guard.release().await;
            }
            Ok(Err(err)) => violations.push(format!("{key}: no owner after healing: {err}")),
            Err(_) => violations.push(format!(
                "{key}: nobody could own it within the TTL and a few round trips after healing"
            )),
        }
    }
    checker.close().await;
    for locker in &lockers {
        locker.close().await;
    }

    let mut report = Report {
        seed: plan.seed,
        secs: plan.duration.as_secs(),
        faults: steps.len(),
        faults_by_kind: by_kind,
        revocations: revocations.len(),
        isolated_revocations: revocations.iter().filter(|r| r.isolated).count(),
        schedule: steps,
        ..Report::default()
    };
    let all = beliefs.all();
    let writes = resource.log();
    report.revocation_log = describe_revocations(start, &revocations, &all, &writes, plan.ttl);
    for k in 0..plan.keys {
        let key = key_name(k);
        let mut tenures: Vec<Belief> = all.iter().filter(|b| b.key == k).copied().collect();
        tenures.sort_by_key(|b| b.from);
        let writes: Vec<Write> = writes.iter().filter(|w| w.key == k).copied().collect();
        let checked = check_key(&key, start, &tenures, &writes, &revocations, plan.ttl);
        violations.extend(checked.violations);
        report.excused_overlaps += checked.excused;
        report.acquisitions += tenures.len();
        report.handoffs += tenures
            .windows(2)
            .filter(|w| w[0].client != w[1].client)
            .count();
        report.accepted += writes.iter().filter(|w| w.accepted).count();
        report.refused += writes.iter().filter(|w| !w.accepted).count();
        report.history.insert(
            key,
            tenures
                .iter()
                .map(|t| {
                    (
                        t.client,
                        t.token.as_i64(),
                        t.from.at.duration_since(start).as_micros(),
                        t.until.map(|u| u.at.duration_since(start).as_micros()),
                    )
                })
                .collect(),
        );
    }
    report.violations = violations;
    report
}

/// Each revocation, then the tenures around it (begun up to a second before it, up to a TTL
/// after it) with how many of their writes were accepted and refused.
fn describe_revocations(
    start: Instant,
    revocations: &[Revocation],
    tenures: &[Belief],
    writes: &[Write],
    ttl: Duration,
) -> Vec<String> {
    let since = |t: Stamp| t.at.saturating_duration_since(start);
    let mut lines = Vec::new();
    for r in revocations {
        lines.push(format!(
            "client {}{} issued +{:?} done +{:?} revision {}",
            r.client,
            if r.isolated { " (isolated)" } else { "" },
            since(r.issued),
            since(r.done),
            r.revision
        ));
        let near = |t: &&Belief| {
            t.from.at + Duration::from_secs(1) >= r.issued.at
                && t.from.at <= r.done.at + ttl
                && t.until.is_none_or(|u| u.at >= r.issued.at)
        };
        for t in tenures.iter().filter(near) {
            let mine = writes
                .iter()
                .filter(|w| w.client == t.client && w.key == t.key && w.token == t.token);
            let (accepted, refused) =
                mine.fold(
                    (0, 0),
                    |(a, f), w| {
                        if w.accepted { (a + 1, f) } else { (a, f + 1) }
                    },
                );
            lines.push(format!(
                "  {}: client {} token {} +{:?}..+{:?} writes accepted {accepted} refused {refused}",
                key_name(t.key),
                t.client,
                t.token,
                since(t.from),
                t.until.map(since).unwrap_or_default(),
            ));
        }
    }
    lines
}

/// One client's contention for one key.
struct Contender {
    locker: Locker,
    client: usize,
    key: usize,
    resource: Arc<FencedResource>,
    beliefs: Arc<Beliefs>,
    ttl: Duration,
}

impl Contender {
    /// Until `end`: lock, wait to own, write to the resource every few milliseconds while owning
    /// (for a random while), stop believing, release; again.
    async fn run(self, mut rng: Rng, end: Instant) {
        let name = key_name(self.key);
        while Instant::now() < end {
            let handle = match self
                .locker
                .lock(name.clone(), format!("client-{}", self.client))
                .await
            {
                Ok(handle) => handle,
                Err(_) => return,
            };
            let remaining = end.saturating_duration_since(Instant::now());
            let token = match timeout(remaining, handle.wait_owned()).await {
                Ok(Ok(token)) => token,
                _ => {
                    let _ = handle.release().await;
                    continue;
                }
            };
            let tenure = self.beliefs.begin(Belief {
                client: self.client,
                key: self.key,
                token,
                from: Stamp::now(),
                until: None,
            });
            // Mostly short tenures (many hand-offs); one in ten outlasts the TTL, so that a
            // holder cut off from the store must stop at its local deadline.
            let hold = if rng.below(10) == 0 {
                rng.between(self.ttl, self.ttl * 3)
            } else {
                rng.between(Duration::from_millis(150), Duration::from_millis(600))
            };
            let hold_until = Instant::now() + hold;
            let mut changes = handle.subscribe();
            loop {
                let wrote = self
                    .resource
                    .write(self.key, self.client, || believed(&handle, token));
                if wrote.is_none() {
                    break;
                }
                let gap = rng.between(Duration::from_millis(5), Duration::from_millis(40));
                if Instant::now() + gap >= hold_until.min(end) {
                    break;
                }
                tokio::select! {
                    _ = sleep(gap) => {}
                    _ = no_longer_owned(&mut changes, token) => break,
                }
            }
            // The client stops believing before it gives the lock up.
            self.beliefs.end(tenure, Stamp::now());
            let _ = handle.release().await;
            sleep(rng.between(Duration::ZERO, Duration::from_millis(100))).await;
        }
    }
}

/// The token `handle` owns its key with now, if it is `token`.
fn believed(handle: &LockHandle, token: FencingToken) -> Option<FencingToken> {
    match handle.ownership() {
        Ownership::Owned { token: t } | Ownership::Unconfirmed { token: t, .. } if t == token => {
            Some(t)
        }
        _ => None,
    }
}

/// Completes once the handle publishes anything but ownership with `token`.
async fn no_longer_owned(changes: &mut watch::Receiver<Ownership>, token: FencingToken) {
    loop {
        let owned = match *changes.borrow_and_update() {
            Ownership::Owned { token: t } | Ownership::Unconfirmed { token: t, .. } => t == token,
            _ => false,
        };
        if !owned || changes.changed().await.is_err() {
            return;
        }
    }
}

/// What checking one key found.
#[derive(Debug, Default)]
struct Checked {
    violations: Vec<String>,
    excused: usize,
}

/// Whether `victim`'s tenure may overlap `later` (another client's, begun after it): a
/// revocation of the victim's client's lease, which carried the victim's entry (the entry, whose
/// create revision is the victim's token, was there before the revocation), issued before `later`
/// began, and the victim's belief over within a TTL of the store's answer.
///
/// The victim's tenure may even *begin* after the revocation: the read that told it that it held
/// the key was answered before the revocation and reached it after.
fn excused(victim: &Belief, later: &Belief, revocations: &[Revocation], ttl: Duration) -> bool {
    let Some(until) = victim.until else {
        return false;
    };
    revocations.iter().any(|r| {
        r.client == victim.client
            && victim.token.as_i64() < r.revision
            && r.issued <= later.from
            && until.at <= r.done.at + ttl
    })
}

/// Checks one key's tenures (sorted by `from`) and writes (in the order made); see the module
/// docs for what is asserted.
fn check_key(
    key: &str,
    start: Instant,
    tenures: &[Belief],
    writes: &[Write],
    revocations: &[Revocation],
    ttl: Duration,
) -> Checked {
    let mut checked = Checked::default();
    let violations = &mut checked.violations;
    let since = |t: Stamp| t.at.saturating_duration_since(start);
    for (i, a) in tenures.iter().enumerate() {
        let Some(a_until) = a.until else {
            violations.push(format!(
                "{key}: client {}'s tenure (token {}) never ended",
                a.client, a.token
            ));
            continue;
        };
        for b in &tenures[i + 1..] {
            if b.token <= a.token {
                violations.push(format!(
                    "{key}: token {} (client {}) began after token {} (client {})",
                    b.token, b.client, a.token, a.client
                ));
            }
            if b.from >= a_until {
                continue;
            }
            if b.client == a.client {
                violations.push(format!(
                    "{key}: client {} began tenure {} before its tenure {} ended",
                    a.client, b.token, a.token
                ));
            } else if excused(a, b, revocations, ttl) {
                checked.excused += 1;
            } else {
                violations.push(format!(
                    "{key}: client {} believed it owned (token {}, from +{:?}) until +{:?}, \
                     {:?} after client {} began (token {}), and no ExpireLease explains it",
                    a.client,
                    a.token,
                    since(a.from),
                    since(a_until),
                    a_until.at.saturating_duration_since(b.from.at),
                    b.client,
                    b.token
                ));
            }
        }
    }

    let mut highest: Option<FencingToken> = None;
    for w in writes {
        let verdict = if w.accepted { "accepted" } else { "refused" };
        // Made inside its writer's believed tenure, with its token.
        let Some(own) = tenures.iter().find(|t| {
            t.client == w.client
                && t.token == w.token
                && t.from <= w.at
                && t.until.is_none_or(|u| w.at <= u)
        }) else {
            violations.push(format!(
                "{key}: a write {verdict} at +{:?} from client {} (token {}) was made outside \
                 its believed tenure",
                since(w.at),
                w.client,
                w.token
            ));
            continue;
        };
        // No other tenure on the key at that instant, unless the overlap is excused.
        for other in tenures
            .iter()
            .filter(|t| t.client != w.client && t.from <= w.at && t.until.is_none_or(|u| w.at <= u))
        {
            let (earlier, later) = if other.from <= own.from {
                (other, own)
            } else {
                (own, other)
            };
            if !excused(earlier, later, revocations, ttl) {
                violations.push(format!(
                    "{key}: a write {verdict} at +{:?} from client {} (token {}) was made while \
                     client {} believed it owned (token {}), and no ExpireLease explains it",
                    since(w.at),
                    w.client,
                    w.token,
                    other.client,
                    other.token
                ));
            }
        }
        // The resource, checked on its own.
        let stale = highest.is_some_and(|h| w.token < h);
        match (w.accepted, stale) {
            (true, true) => violations.push(format!(
                "{key}: the resource accepted stale token {} (client {}) at +{:?} after token {}",
                w.token,
                w.client,
                since(w.at),
                highest.map_or(0, |h| h.as_i64())
            )),
            (false, false) => violations.push(format!(
                "{key}: the resource refused token {} (client {}) at +{:?}, no higher one \
                 accepted before",
                w.token,
                w.client,
                since(w.at)
            )),
            _ => {}
        }
        if w.accepted {
            highest = highest.max(Some(w.token));
        } else {
            // Fencing stopped a stale holder: it must be a victim of a revocation, overlapping
            // (excused) a later tenure that had begun.
            let explained = tenures.iter().any(|later| {
                later.client != own.client
                    && later.token > own.token
                    && later.from <= w.at
                    && excused(own, later, revocations, ttl)
            });
            if !explained {
                violations.push(format!(
                    "{key}: the resource refused client {}'s write (token {}) at +{:?}: a stale \
                     holder that no ExpireLease explains",
                    w.client,
                    w.token,
                    since(w.at)
                ));
            }
        }
    }
    checked
}

/// The holder an operator revokes for an `ExpireLease` on `key`, read through `operator` (a
/// backend on the run's prefix that no fault touches): the first holder to take the key after
/// this call, so that the victim has just begun its tenure and is still working when a later
/// holder takes over (an isolated victim then certainly writes as a stale holder). If no
/// hand-off happens within half a TTL, the holder of the moment (one that has held that long is
/// at a long tenure's work); `None` if there is none.
pub async fn fresh_holder(
    operator: &dyn locker_core::LockBackend,
    key: &str,
    ttl: Duration,
) -> Option<locker_core::backend::Entry> {
    let first = operator.holder(key).await.ok().and_then(|(h, _)| h);
    let give_up = Instant::now() + ttl / 2;
    let mut last = first.clone();
    while Instant::now() < give_up {
        sleep(Duration::from_millis(5)).await;
        if let Ok((holder, _)) = operator.holder(key).await {
            match (&first, &holder) {
                (Some(f), Some(h)) if f.create_revision != h.create_revision => return holder,
                (None, Some(_)) => return holder,
                _ => {}
            }
            last = holder;
        }
    }
    last
}

/// An `ExpireLease` on `key`, as a world carries it out: a [`fresh_holder`] read through
/// `operator`, its client named by `client_of` (its lease), black-holed first by `isolate_client`
/// if `isolate`, its lease ended by `revoke` (`false`: the store did not end it, and the client is
/// let back in), then the store's revision read through `operator`. The stamps are those of
/// [`Revocation`].
pub async fn revoke_holder<Revoked: std::future::Future<Output = bool>>(
    operator: &dyn locker_core::LockBackend,
    key: &str,
    ttl: Duration,
    isolate: bool,
    client_of: impl Fn(locker_core::backend::LeaseId) -> Option<usize>,
    isolate_client: impl Fn(usize, bool),
    revoke: impl Fn(locker_core::backend::LeaseId) -> Revoked,
) -> Injected {
    let Some(holder) = fresh_holder(operator, key, ttl).await else {
        tracing::warn!(key, "chaos: no holder to revoke");
        return Injected::Missed;
    };
    let Some(client) = client_of(holder.lease) else {
        tracing::warn!(key, ?holder, "chaos: the holder is no client's");
        return Injected::Missed;
    };
    if isolate {
        isolate_client(client, true);
    }
    let issued = Stamp::now();
    if !revoke(holder.lease).await {
        tracing::warn!(key, ?holder, "chaos: the holder's lease was not revoked");
        if isolate {
            isolate_client(client, false);
        }
        return Injected::Missed;
    }
    let done = Stamp::now();
    // The store's revision now (any read answers it): the lease's entries are older.
    let mut revision = None;
    for _ in 0..100 {
        revision = operator.holder(key).await.ok().map(|(_, r)| r);
        if revision.is_some() {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    Injected::Revoked(Revocation {
        client,
        isolated: isolate,
        issued,
        done,
        // Failing that, at least the revoked entry of this key is older.
        revision: revision.unwrap_or(holder.create_revision + 1),
    })
}

/// A chaos client's locker: its backend wrapped to record the leases it is granted, a jitter
/// seeded by the client's number. Worlds make their lockers with it.
pub fn client_locker(
    backend: Arc<dyn locker_core::LockBackend>,
    granted: LeaseLog,
    client: usize,
    ttl: Duration,
) -> Locker {
    let recording = RecordingBackend::new(backend, granted);
    Locker::builder(Arc::new(recording))
        .ttl(ttl)
        .jitter_seed(client as u64)
        .retry_delays(Duration::from_millis(20), Duration::from_millis(250))
        .build()
        .expect("valid options")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64, secs: u64) -> Plan {
        Plan {
            seed,
            duration: Duration::from_secs(secs),
            clients: 4,
            keys: 3,
            ttl: Duration::from_secs(2),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = schedule(&plan(42, 600), 3);
        assert_eq!(a, schedule(&plan(42, 600), 3));
        assert_ne!(a, schedule(&plan(43, 600), 3));
        // A shorter run of the same seed is a prefix of the longer one, but for its last step,
        // which may be cut short.
        let short = schedule(&plan(42, 60), 3);
        assert!(!short.is_empty());
        let n = short.len() - 1;
        assert_eq!(short[..n], a[..n]);
        assert_eq!((short[n].at, short[n].fault), (a[n].at, a[n].fault));
    }

    #[test]
    fn schedules_fit_the_run_and_draw_every_kind() {
        for (members, kinds) in [(3, 8), (0, 6)] {
            let plan = plan(7, 600);
            let steps = schedule(&plan, members);
            let mut seen = std::collections::BTreeSet::new();
            let mut previous_end = Duration::ZERO;
            for step in &steps {
                assert!(step.at >= previous_end, "{step:?} overlaps the one before");
                previous_end = step.at + step.lasts;
                assert!(previous_end <= plan.duration, "{step:?} outlasts the run");
                seen.insert(step.fault.kind());
                if let Fault::KillMember(m) | Fault::PauseMember(m) = step.fault {
                    assert!(m < members);
                }
            }
            assert_eq!(
                seen.len(),
                kinds,
                "{members} members: kinds drawn: {seen:?}"
            );
        }
    }

    /// A tiny history on one key, stamped in the order given: `ms` from a common start.
    struct Story {
        start: Instant,
        seq: u64,
        tenures: Vec<Belief>,
        writes: Vec<Write>,
        revocations: Vec<Revocation>,
    }

    impl Story {
        fn new() -> Story {
            Story {
                start: Instant::now(),
                seq: 0,
                tenures: Vec::new(),
                writes: Vec::new(),
                revocations: Vec::new(),
            }
        }

        fn at(&mut self, ms: u64) -> Stamp {
            self.seq += 1;
            Stamp {
                seq: self.seq,
                at: self.start + Duration::from_millis(ms),
            }
        }

        fn tenure(&mut self, client: usize, token: i64, from: u64) -> usize {
            let from = self.at(from);
            self.tenures.push(Belief {
                client,
                key: 0,
                token: FencingToken::from_i64(token),
                from,
                until: None,
            });
            self.tenures.len() - 1
        }

        fn end(&mut self, tenure: usize, ms: u64) {
            self.tenures[tenure].until = Some(self.at(ms));
        }

        fn write(&mut self, client: usize, token: i64, ms: u64, accepted: bool) {
            let at = self.at(ms);
            self.writes.push(Write {
                client,
                key: 0,
                token: FencingToken::from_i64(token),
                at,
                accepted,
            });
        }

        fn revoke(&mut self, client: usize, ms: u64, revision: i64) {
            let (issued, done) = (self.at(ms), self.at(ms));
            self.revocations.push(Revocation {
                client,
                isolated: true,
                issued,
                done,
                revision,
            });
        }

        fn check(&self) -> Checked {
            let mut tenures = self.tenures.clone();
            tenures.sort_by_key(|t| t.from);
            check_key(
                "k",
                self.start,
                &tenures,
                &self.writes,
                &self.revocations,
                Duration::from_secs(2),
            )
        }
    }

    /// Asserts that the story's check finds no violation and excuses `excused` overlaps.
    fn assert_passes(story: &Story, excused: usize) {
        let checked = story.check();
        assert!(checked.violations.is_empty(), "{:?}", checked.violations);
        assert_eq!(checked.excused, excused);
    }

    /// Asserts that one of `violations` says `what`.
    fn assert_violation(violations: &[String], what: &str) {
        assert!(
            violations.iter().any(|v| v.contains(what)),
            "no violation says {what:?}: {violations:?}"
        );
    }

    #[test]
    fn hand_offs_without_overlap_pass() {
        let mut story = Story::new();
        let a = story.tenure(0, 10, 0);
        story.write(0, 10, 5, true);
        story.end(a, 10);
        let b = story.tenure(1, 12, 10);
        story.write(1, 12, 10, true);
        story.end(b, 20);
        assert_passes(&story, 0);
    }

    #[test]
    fn an_overlap_no_revocation_explains_is_a_violation() {
        let mut story = Story::new();
        let a = story.tenure(0, 10, 0);
        let b = story.tenure(1, 12, 100);
        story.write(1, 12, 110, true);
        story.write(0, 10, 120, false);
        story.end(a, 130);
        story.end(b, 200);
        let violations = story.check().violations;
        assert_violation(&violations, "no ExpireLease explains it");
        assert_violation(&violations, "a stale holder that no ExpireLease explains");
    }

    #[test]
    fn a_revoked_holder_may_overlap_its_successor_while_fencing_refuses_it() {
        let mut story = Story::new();
        let a = story.tenure(0, 10, 0);
        story.write(0, 10, 10, true);
        story.revoke(0, 50, 11);
        let b = story.tenure(1, 12, 60);
        // Before the successor wrote, the victim's write cannot be refused; after, it must be.
        story.write(0, 10, 65, true);
        story.write(1, 12, 70, true);
        story.write(0, 10, 80, false);
        story.end(a, 1500);
        story.end(b, 2000);
        assert_passes(&story, 1);
    }

    #[test]
    fn a_holder_told_so_just_before_its_lease_was_revoked_may_overlap_its_successor() {
        let mut story = Story::new();
        story.revoke(0, 50, 11);
        let a = story.tenure(0, 10, 55);
        let b = story.tenure(1, 12, 60);
        story.write(1, 12, 70, true);
        story.write(0, 10, 80, false);
        story.end(a, 100);
        story.end(b, 200);
        assert_passes(&story, 1);
    }

    #[test]
    fn a_revocation_does_not_excuse_a_tenure_its_lease_did_not_carry() {
        let mut story = Story::new();
        story.revoke(0, 50, 11);
        // Token 13: an entry created after the revocation, under another lease.
        let a = story.tenure(0, 13, 55);
        let b = story.tenure(1, 14, 60);
        story.end(a, 100);
        story.end(b, 200);
        let violations = story.check().violations;
        assert_violation(&violations, "no ExpireLease explains it");
    }

    #[test]
    fn a_revoked_holder_that_believes_past_a_ttl_is_a_violation() {
        let mut story = Story::new();
        let a = story.tenure(0, 10, 0);
        story.revoke(0, 50, 11);
        let b = story.tenure(1, 12, 60);
        story.end(a, 50 + 2001);
        story.end(b, 3000);
        let violations = story.check().violations;
        assert_violation(&violations, "no ExpireLease explains it");
    }

    #[test]
    fn a_resource_that_accepts_a_stale_token_is_caught() {
        let mut story = Story::new();
        let a = story.tenure(0, 10, 0);
        story.revoke(0, 50, 11);
        let b = story.tenure(1, 12, 60);
        story.write(1, 12, 70, true);
        story.write(0, 10, 80, true);
        story.end(a, 100);
        story.end(b, 200);
        let violations = story.check().violations;
        assert_violation(&violations, "the resource accepted stale token 10");
    }

    #[test]
    fn a_write_outside_the_writers_tenure_is_caught() {
        let mut story = Story::new();
        let a = story.tenure(0, 10, 0);
        story.end(a, 10);
        story.write(0, 10, 20, true);
        let violations = story.check().violations;
        assert_violation(&violations, "was made outside its believed tenure");
    }
}
