//! A chaos run with a safety checker.
//!
//! Several clients contend for a few keys under a seeded random schedule of faults. Every client
//! records the intervals in which it believed it owned each key (on the process's one monotonic
//! clock) and writes to a *protected resource* that accepts a write only with a fencing token at
//! least as high as any it has seen. The checker asserts that:
//!
//! - no two clients' believed-ownership intervals on a key overlap;
//! - fencing tokens strictly increase in acquisition order;
//! - the resource never accepts a stale token (its accepted tokens never go down);
//! - after the faults heal, every key gets an owner again within the TTL and a few round trips;
//! - nothing is left in the store (checked by the caller's world).
//!
//! The world (a real etcd cluster, or the memory backend) supplies clients, faults and the
//! resource; the schedule and the checker are written once, here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{FencingToken, Locker};
use tokio::time::{Instant, sleep, timeout};

use crate::harness::{LeaseLog, RecordingBackend};
use crate::record::{TenureLog, TenureRecord};

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
    /// End a client's lease now (as an expiry would).
    ExpireLease(usize),
}

/// Where a chaos run happens.
#[async_trait]
pub trait World: Send + Sync {
    /// How many store members can be killed or paused (0 for the memory backend).
    fn members(&self) -> usize;
    /// Client `i`'s locker (made once per client, at the start).
    async fn locker(&self, client: usize) -> Locker;
    /// Starts a fault; [`World::heal`] ends it.
    async fn inject(&self, fault: Fault);
    /// Ends a fault started by [`World::inject`] (no-op for instantaneous ones).
    async fn heal(&self, fault: Fault);
    /// Writes `(client, token)` to the protected resource of `key`, which accepts it only if
    /// `token` is at least the highest token it has accepted for `key`. Answers whether it did.
    async fn write_resource(&self, key: &str, client: usize, token: FencingToken) -> bool;
    /// Every write the resource accepted for `key`, in order: (client, token).
    async fn resource_log(&self, key: &str) -> Vec<(usize, FencingToken)>;
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

/// Per key, the tenures as (client, token, start offset µs, end offset µs).
pub type History = BTreeMap<String, Vec<(usize, i64, u128, Option<u128>)>>;

/// What a run did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// TenureLog begun, over all keys.
    pub acquisitions: usize,
    /// TenureLog that followed another client's on the same key.
    pub handoffs: usize,
    /// Faults injected.
    pub faults: usize,
    /// Writes the resource accepted.
    pub writes: usize,
    /// Every violation found (empty for a safe run).
    pub violations: Vec<String>,
    /// The history: per key, the tenures as (client, token, start offset, end offset) in
    /// microseconds from the start of the run. On virtual time it is the same for the same seed.
    pub history: History,
}

impl Report {
    /// The one summary line.
    pub fn summary(&self) -> String {
        format!(
            "chaos: seed={} acquisitions={} handoffs={} faults={} writes={} violations={}",
            self.seed,
            self.acquisitions,
            self.handoffs,
            self.faults,
            self.writes,
            self.violations.len()
        )
    }

    /// Prints the summary line, and panics with every violation if there is one, or if the run
    /// acquired nothing or injected no fault (it tested nothing).
    pub fn assert_safe(&self) {
        println!("{}", self.summary());
        assert!(
            self.violations.is_empty(),
            "{}\nviolations:\n{}",
            self.summary(),
            self.violations.join("\n")
        );
        assert!(
            self.acquisitions > 0 && self.faults > 0,
            "{}",
            self.summary()
        );
    }
}

/// Runs the plan in the world and checks the history. Every client's locks are released and its
/// locker closed before it returns.
pub async fn run(world: Arc<dyn World>, plan: &Plan) -> Report {
    let start = Instant::now();
    let end = start + plan.duration;
    let keys: Vec<String> = (0..plan.keys).map(|k| format!("key-{k}")).collect();
    let tenures: Vec<TenureLog> = keys.iter().map(|_| TenureLog::default()).collect();
    let faults = Arc::new(AtomicU64::new(0));
    let mut rng = Rng::new(plan.seed);

    let mut lockers = Vec::new();
    for c in 0..plan.clients {
        lockers.push(world.locker(c).await);
    }

    // Contenders: one task per (client, key), each with its own seeded source.
    let mut tasks = Vec::new();
    for (c, locker) in lockers.iter().enumerate() {
        for (k, key) in keys.iter().enumerate() {
            let (locker, key, world) = (locker.clone(), key.clone(), world.clone());
            let tenures = tenures[k].clone();
            let mut rng = Rng::new(rng.next_u64());
            tasks.push(tokio::spawn(async move {
                contend(world, locker, c, key, tenures, &mut rng, end).await;
            }));
        }
    }

    // The fault schedule.
    let schedule = {
        let world = world.clone();
        let faults = faults.clone();
        let mut rng = Rng::new(rng.next_u64());
        let clients = plan.clients;
        let ttl = plan.ttl;
        tokio::spawn(async move {
            while Instant::now() + Duration::from_millis(500) < end {
                sleep(rng.between(Duration::from_millis(200), Duration::from_millis(1200))).await;
                let fault = pick(&mut rng, world.members(), clients);
                let lasts = match fault {
                    Fault::Compact | Fault::ExpireLease(_) => Duration::ZERO,
                    // Sometimes longer than the TTL, so that leases run out.
                    _ => rng.between(Duration::from_millis(100), ttl * 2),
                };
                let lasts = lasts.min(end.saturating_duration_since(Instant::now()));
                world.inject(fault).await;
                faults.fetch_add(1, Ordering::Relaxed);
                sleep(lasts).await;
                world.heal(fault).await;
            }
        })
    };

    let _ = schedule.await;
    for task in tasks {
        let _ = task.await;
    }

    // After the faults heal, every key gets an owner again: a fresh client takes each in turn.
    let mut violations = Vec::new();
    let checker = world.locker(plan.clients).await;
    for key in &keys {
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
        faults: faults.load(Ordering::Relaxed) as usize,
        ..Report::default()
    };
    for (k, key) in keys.iter().enumerate() {
        let all = tenures[k].all();
        check_tenures(key, &all, &mut violations);
        report.acquisitions += all.len();
        report.handoffs += all
            .windows(2)
            .filter(|w| w[0].client != w[1].client)
            .count();
        let log = world.resource_log(key).await;
        report.writes += log.len();
        for w in log.windows(2) {
            if w[1].1 < w[0].1 {
                violations.push(format!(
                    "{key}: the resource accepted stale token {} (client {}) after {} (client {})",
                    w[1].1, w[1].0, w[0].1, w[0].0
                ));
            }
        }
        report.history.insert(
            key.clone(),
            all.iter()
                .map(|t| {
                    (
                        t.client,
                        t.token.as_i64(),
                        t.from.duration_since(start).as_micros(),
                        t.until.map(|u| u.duration_since(start).as_micros()),
                    )
                })
                .collect(),
        );
    }
    report.violations = violations;
    report
}

fn pick(rng: &mut Rng, members: usize, clients: usize) -> Fault {
    let client = rng.below(clients as u64) as usize;
    loop {
        // Not `ExpireLease`: a lease ended early by the store (an operator's revoke) is not a
        // fault the local deadline can guard against; the suite tests it on its own.
        let fault = match rng.below(6) {
            0 if members > 0 => Fault::KillMember(rng.below(members as u64) as usize),
            1 if members > 0 => Fault::PauseMember(rng.below(members as u64) as usize),
            2 => Fault::CutClient(client),
            3 => Fault::BlackHoleClient(client),
            4 => Fault::SlowClient(client),
            5 => Fault::Compact,
            _ => continue,
        };
        return fault;
    }
}

/// One client's contention for one key: acquire, write to the resource while owning, release.
async fn contend(
    world: Arc<dyn World>,
    locker: Locker,
    client: usize,
    key: String,
    tenures: TenureLog,
    rng: &mut Rng,
    end: Instant,
) {
    while Instant::now() < end {
        let handle = match locker.lock(key.clone(), format!("client-{client}")).await {
            Ok(handle) => handle,
            Err(_) => return,
        };
        tenures.follow(client, &handle);
        let remaining = end.saturating_duration_since(Instant::now());
        let token = match timeout(remaining, handle.wait_owned()).await {
            Ok(Ok(token)) => token,
            _ => {
                let _ = handle.release().await;
                continue;
            }
        };
        // Work while owning: a few fenced writes, each only while still owning.
        for _ in 0..=rng.below(3) {
            if !handle.is_owned() {
                break;
            }
            world.write_resource(&key, client, token).await;
            sleep(rng.between(Duration::from_millis(5), Duration::from_millis(60))).await;
        }
        let _ = handle.release().await;
        sleep(rng.between(Duration::ZERO, Duration::from_millis(100))).await;
    }
}

fn check_tenures(key: &str, all: &[TenureRecord], violations: &mut Vec<String>) {
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            match a.until {
                Some(until) if b.client != a.client && b.from < until => violations.push(format!(
                    "{key}: client {} believed it owned (token {}) until {:?} after client {} \
                     began (token {})",
                    a.client,
                    a.token,
                    until.duration_since(b.from),
                    b.client,
                    b.token
                )),
                None if b.client != a.client => violations.push(format!(
                    "{key}: client {}'s tenure (token {}) never ended, yet client {} owned",
                    a.client, a.token, b.client
                )),
                _ => {}
            }
            if b.token <= a.token {
                violations.push(format!(
                    "{key}: token {} began after token {}",
                    b.token, a.token
                ));
            }
        }
    }
}

/// A protected resource kept in memory: accepts a write only with a token at least the highest
/// it has accepted for the key.
#[derive(Debug, Default)]
pub struct MemoryResource(Mutex<BTreeMap<String, Vec<(usize, FencingToken)>>>);

impl MemoryResource {
    /// Writes `(client, token)` to `key` if the token is not stale.
    pub fn write(&self, key: &str, client: usize, token: FencingToken) -> bool {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let log = all.entry(key.to_owned()).or_default();
        if log.last().is_some_and(|(_, last)| token < *last) {
            return false;
        }
        log.push((client, token));
        true
    }

    /// What it accepted for `key`.
    pub fn log(&self, key: &str) -> Vec<(usize, FencingToken)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default()
    }
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
    Locker::builder_arc(Arc::new(recording))
        .ttl(ttl)
        .jitter_seed(client as u64)
        .retry_delays(Duration::from_millis(20), Duration::from_millis(250))
        .build()
        .expect("valid options")
}
