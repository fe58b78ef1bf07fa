//! The scenarios of issue 5, each run against our client and its baseline in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, EventType, LockOptions as RawLockOptions, WatchOptions};
use futures::StreamExt;
use locker_core::{LockBackend, LockGuard, LockOptions, Locker};
use locker_memory::MemoryBackend;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use crate::counting::{Calls, Counts, METHODS};
use crate::raw::{self, DrainedWatch, RawContender, RawLease};
use crate::stats::{Measure, Outcome, ProcStats, RatioKind, Samples, us};
use crate::{BenchResult, Env, alloc_stats};

/// Latency scenarios alternate ours and the baseline in this many blocks, so that both see the
/// same background load.
const BLOCKS: usize = 10;
/// The TTL of the default sessions (locker's default).
const SESSION_TTL: Duration = Duration::from_secs(10);

async fn ours_cycle(locker: &Locker, key: &str) -> BenchResult<Duration> {
    let started = Instant::now();
    let guard = locker.acquire(key, "v").await?;
    guard.release().await?;
    Ok(started.elapsed())
}

async fn raw_cycle(client: &mut Client, key: &[u8], lease: i64) -> BenchResult<Duration> {
    let started = Instant::now();
    if !raw::try_create(client, key, lease).await? {
        return Err("raw cycle: the key was already there".into());
    }
    client.delete(key, None).await?;
    Ok(started.elapsed())
}

/// Join + guarded delete straight on the backend: the store's part of an acquire + release.
async fn backend_cycle(backend: &dyn LockBackend, lease: i64) -> BenchResult<Duration> {
    let started = Instant::now();
    let joined = backend.join("direct", lease, b"v").await?;
    if joined.predecessor.is_some() {
        return Err("backend cycle: the key was held".into());
    }
    if !backend
        .delete_entry(&joined.entry.key, joined.entry.create_revision)
        .await?
    {
        return Err("backend cycle: the entry was not deleted".into());
    }
    Ok(started.elapsed())
}

fn calls_note(what: &str, calls: Calls, ops: usize) -> String {
    format!("backend calls per {what}: {}", calls.per_op(ops))
}

/// The cycles `acquire_release` times, ours and the baseline first, then the breakdown: the same
/// etcd work in raw calls, piece by piece, and our backend without the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cycle {
    /// `Locker::acquire` + `LockGuard::release`.
    Ours,
    /// The baseline: raw create-if-absent txn + plain delete.
    Raw,
    /// Raw join txn (put + queue range) + plain delete.
    JoinPlain,
    /// Raw create-if-absent txn + guarded delete txn.
    CreateGuarded,
    /// Raw calls with both our txn shapes: join txn + guarded delete.
    Shaped,
    /// The same, on a prefix a watch on the same connection covers (as our hub's does).
    Watched,
    /// The same, under a deletes-only watch.
    DeletesWatched,
    /// A join that reads the queue only when it is not empty + guarded delete.
    SkipIfEmpty,
    /// Our backend's `join` + `delete_entry`, on the locker's backend (its hub's watch open).
    Backend,
    /// Our backend's `join` + `delete_entry` on a connection with no watch.
    BackendUnwatched,
}

impl Cycle {
    const ALL: [Cycle; 10] = [
        Cycle::Ours,
        Cycle::Raw,
        Cycle::JoinPlain,
        Cycle::CreateGuarded,
        Cycle::Shaped,
        Cycle::Watched,
        Cycle::DeletesWatched,
        Cycle::SkipIfEmpty,
        Cycle::Backend,
        Cycle::BackendUnwatched,
    ];

    /// The name in the JSON extras and notes.
    /// Where this cycle's runs are in a list made in the order of [`Cycle::ALL`].
    fn index(self) -> usize {
        Cycle::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    fn name(self) -> &'static str {
        match self {
            Cycle::Ours => "locker",
            Cycle::Raw => "raw",
            Cycle::JoinPlain => "raw_join_txn_plain_delete",
            Cycle::CreateGuarded => "raw_create_guarded_delete",
            Cycle::Shaped => "raw_same_txn_shapes",
            Cycle::Watched => "raw_same_txn_shapes_watched",
            Cycle::DeletesWatched => "raw_same_txn_shapes_deletes_watched",
            Cycle::SkipIfEmpty => "raw_join_skip_if_empty",
            Cycle::Backend => "backend_only",
            Cycle::BackendUnwatched => "backend_only_no_watch",
        }
    }
}

/// One cycle's samples and the client CPU and context switches its blocks used.
#[derive(Default)]
struct CycleRuns {
    samples: Samples,
    used: ProcStats,
}

/// A raw queue and our entry in it (the entry named by the lease, as our backend names it).
struct RawQueue {
    queue: Vec<u8>,
    entry: Vec<u8>,
}

impl RawQueue {
    fn new(prefix: &str, lease: i64) -> Self {
        let queue = format!("{prefix}q/").into_bytes();
        let entry = [queue.as_slice(), format!("{lease:x}").as_bytes()].concat();
        RawQueue { queue, entry }
    }
}

/// `acquire_release`: uncontended acquire + release on a live session, against a raw
/// create-if-absent txn + delete.
pub(crate) async fn acquire_release(env: &Env) -> BenchResult<Outcome> {
    let cycles = env.pick(3000, 300);
    let prefix = |side: &str| env.prefix("acquire_release", side);
    let (backend, counts) = env.ours(&prefix("ours")).await?;
    let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
    let mut client = env.raw().await?;
    let lease = RawLease::grant(&client, SESSION_TTL).await?;
    let raw_key = format!("{}k", prefix("raw")).into_bytes();
    // The backend's own calls without the state machine: join + guarded delete.
    let backend = locker.backend().clone();
    let backend_lease = backend.grant_lease(Duration::from_secs(600)).await?;
    // The same backend calls on a connection without any watch (no locker uses it).
    let (bare, _) = env.ours(&prefix("bare")).await?;
    let bare_lease = bare.grant_lease(Duration::from_secs(600)).await?;
    let shaped = RawQueue::new(&format!("{}shaped/", prefix("raw")), lease.id);
    let skip_if_empty = RawQueue::new(&format!("{}skip-if-empty/", prefix("raw")), lease.id);
    // Prefixes with a watch open on the same connection (as our hub has), with all events or
    // deletes only.
    let watched = RawQueue::new(&prefix("raw-watched"), lease.id);
    let deletes = RawQueue::new(&prefix("raw-watched-deletes"), lease.id);
    let _watches = (
        DrainedWatch::open(&client, &watched.queue, false).await?,
        DrainedWatch::open(&client, &deletes.queue, true).await?,
    );
    let mut runs: Vec<CycleRuns> = Cycle::ALL.iter().map(|_| CycleRuns::default()).collect();
    let mut before = counts.snapshot();
    for block in 0..=BLOCKS {
        // Block 0 warms every cycle up (20 each) and is not counted.
        let n = if block == 0 { 20 } else { cycles / BLOCKS };
        if block == 1 {
            before = counts.snapshot();
        }
        for (cycle, runs) in Cycle::ALL.iter().zip(runs.iter_mut()) {
            let used = ProcStats::now();
            for _ in 0..n {
                let started = Instant::now();
                match cycle {
                    Cycle::Ours => {
                        ours_cycle(&locker, "k").await?;
                    }
                    Cycle::Raw => {
                        raw_cycle(&mut client, &raw_key, lease.id).await?;
                    }
                    Cycle::JoinPlain => {
                        raw::join_shaped(&mut client, &shaped.queue, &shaped.entry, lease.id)
                            .await?;
                        client.delete(shaped.entry.clone(), None).await?;
                    }
                    Cycle::CreateGuarded => {
                        let rev = raw::create_revision(&mut client, &raw_key, lease.id).await?;
                        raw::guarded_delete(&mut client, &raw_key, rev).await?;
                    }
                    Cycle::Shaped | Cycle::Watched | Cycle::DeletesWatched => {
                        let queue = match cycle {
                            Cycle::Shaped => &shaped,
                            Cycle::Watched => &watched,
                            _ => &deletes,
                        };
                        let rev =
                            raw::join_shaped(&mut client, &queue.queue, &queue.entry, lease.id)
                                .await?;
                        raw::guarded_delete(&mut client, &queue.entry, rev).await?;
                    }
                    Cycle::SkipIfEmpty => {
                        let rev = raw::join_skip_if_empty(
                            &mut client,
                            &skip_if_empty.queue,
                            &skip_if_empty.entry,
                            lease.id,
                        )
                        .await?;
                        raw::guarded_delete(&mut client, &skip_if_empty.entry, rev).await?;
                    }
                    Cycle::Backend => {
                        backend_cycle(backend.as_ref(), backend_lease.id).await?;
                    }
                    Cycle::BackendUnwatched => {
                        backend_cycle(bare.as_ref(), bare_lease.id).await?;
                    }
                }
                if block > 0 {
                    runs.samples.push(started.elapsed());
                }
            }
            if block > 0 {
                runs.used.add(ProcStats::now().since(used));
            }
        }
    }
    let backend_cycles = runs[Cycle::Backend.index()].samples.len() as u64;
    let calls = counts
        .snapshot()
        .since(before)
        .since(Calls(std::array::from_fn(|i| {
            // The direct backend cycles went through the same counters: one join and one delete each.
            match METHODS[i] {
                "join" | "delete_entry" => backend_cycles,
                _ => 0,
            }
        })));
    backend.revoke_lease(backend_lease.id).await?;
    bare.revoke_lease(bare_lease.id).await?;
    let cycles_done = runs[Cycle::Ours.index()].samples.len();
    let base_measure = runs[Cycle::Raw.index()].samples.measure();
    let ours_measure = runs[Cycle::Ours.index()].samples.measure();
    let mut outcome = Outcome::new("acquire_release", ours_measure).compare(
        "raw create-if-absent txn + delete",
        base_measure,
        RatioKind::P50,
        1.10,
    );
    let raw_p50 = base_measure.p50_us.unwrap_or(f64::NAN);
    let mut lines = Vec::new();
    for (cycle, runs) in Cycle::ALL.iter().zip(runs.iter_mut()) {
        let p50 = runs.samples.quantile(0.5).map_or(f64::NAN, us);
        let ops = runs.samples.len();
        if *cycle != Cycle::Ours && *cycle != Cycle::Raw {
            outcome.extra(&format!("{}_p50_us", cycle.name()), p50);
        }
        outcome.extra(
            &format!("{}_cpu_us_per_cycle", cycle.name()),
            us(runs.used.cpu) / ops.max(1) as f64,
        );
        outcome.extra(
            &format!("{}_switches_per_cycle", cycle.name()),
            runs.used.switches as f64 / ops.max(1) as f64,
        );
        lines.push(format!(
            "{} {p50:.0} us ({:.3}; {})",
            cycle.name(),
            p50 / raw_p50,
            runs.used.per_op(ops)
        ));
    }
    outcome.extra(
        "backend_only_p99_us",
        runs[Cycle::Backend.index()]
            .samples
            .quantile(0.99)
            .map_or(f64::NAN, us),
    );
    outcome.note(format!(
        "breakdown, p50 (÷ raw; client cpu and context switches per cycle, all threads): {}",
        lines.join("; ")
    ));
    outcome.extra("calls_per_cycle", calls.per_op(cycles_done));
    outcome.extra(
        "grant_lease_per_cycle",
        calls.get("grant_lease") as f64 / cycles_done.max(1) as f64,
    );
    outcome.note(calls_note("cycle", calls, cycles_done));
    locker.close().await;
    lease.revoke(&client).await;
    Ok(outcome)
}

/// `lock_rpc`: the same cycle against etcd's lock service with a kept-alive lease.
pub(crate) async fn lock_rpc(env: &Env) -> BenchResult<Outcome> {
    let cycles = env.pick(3000, 300);
    let (backend, counts) = env.ours(&env.prefix("lock_rpc", "ours")).await?;
    let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
    let client = env.raw().await?;
    let lease = RawLease::grant(&client, SESSION_TTL).await?;
    let name = format!("{}k", env.prefix("lock_rpc", "raw")).into_bytes();
    let rpc_cycle = |mut client: Client| {
        let name = name.clone();
        async move {
            let started = Instant::now();
            let locked = client
                .lock(name, Some(RawLockOptions::new().with_lease(lease.id)))
                .await?;
            client.unlock(locked.key().to_vec()).await?;
            BenchResult::Ok(started.elapsed())
        }
    };
    for _ in 0..20 {
        ours_cycle(&locker, "k").await?;
        rpc_cycle(client.clone()).await?;
    }
    let before = counts.snapshot();
    let (mut ours, mut base) = (Samples::default(), Samples::default());
    for _ in 0..BLOCKS {
        for _ in 0..cycles / BLOCKS {
            ours.push(ours_cycle(&locker, "k").await?);
        }
        for _ in 0..cycles / BLOCKS {
            base.push(rpc_cycle(client.clone()).await?);
        }
    }
    let calls = counts.snapshot().since(before);
    let mut outcome = Outcome::new("lock_rpc", ours.measure()).compare(
        "etcd lock service: lock + unlock (kept-alive lease)",
        base.measure(),
        RatioKind::P50,
        1.0,
    );
    outcome.note(calls_note("cycle", calls, ours.len()));
    locker.close().await;
    lease.revoke(&client).await;
    client.clone().delete(name, None).await.ok();
    Ok(outcome)
}

/// What a contender of the hand-off ring tells the coordinator.
enum RingEvent {
    Acquired { id: usize, at: Instant },
    Releasing { at: Instant },
}

async fn ours_contender(
    locker: Locker,
    id: usize,
    events: mpsc::UnboundedSender<RingEvent>,
    mut go: mpsc::UnboundedReceiver<()>,
) -> BenchResult<()> {
    loop {
        let guard = locker.acquire("k", format!("c{id}")).await?;
        let at = Instant::now();
        if events.send(RingEvent::Acquired { id, at }).is_err() || go.recv().await.is_none() {
            guard.release().await?;
            locker.close().await;
            return Ok(());
        }
        let _ = events.send(RingEvent::Releasing { at: Instant::now() });
        guard.release().await?;
    }
}

async fn raw_contender(
    mut contender: RawContender,
    id: usize,
    events: mpsc::UnboundedSender<RingEvent>,
    mut go: mpsc::UnboundedReceiver<()>,
) -> BenchResult<()> {
    loop {
        contender.acquire().await?;
        let at = Instant::now();
        if events.send(RingEvent::Acquired { id, at }).is_err() || go.recv().await.is_none() {
            contender.release().await?;
            contender.close().await;
            return Ok(());
        }
        let _ = events.send(RingEvent::Releasing { at: Instant::now() });
        contender.release().await?;
    }
}

async fn next_event(
    events: &mut mpsc::UnboundedReceiver<RingEvent>,
    tasks: &mut JoinSet<BenchResult<()>>,
) -> BenchResult<RingEvent> {
    tokio::select! {
        event = timeout(Duration::from_secs(30), events.recv()) => {
            event.map_err(|_| "no hand-off within 30 s")?.ok_or_else(|| "all contenders ended".into())
        }
        Some(ended) = tasks.join_next() => {
            ended??;
            Err("a contender ended early".into())
        }
    }
}

/// A hand-off ring: N + 1 contenders taking turns on one queue, and what its coordinator needs.
struct Ring {
    queue: Vec<u8>,
    waiters: usize,
    events: mpsc::UnboundedReceiver<RingEvent>,
    gos: Vec<mpsc::UnboundedSender<()>>,
    tasks: JoinSet<BenchResult<()>>,
    /// The contender that owns and waits for its go, between two runs of the ring.
    holder: Option<usize>,
}

impl Ring {
    /// Runs `rounds` hand-offs after `warmup` unmeasured ones: waits until the queue holds the
    /// holder and every waiter, lets it settle, tells the holder to release, and times release →
    /// next acquisition. Leaves the ring with its holder waiting, so that it can run again.
    async fn run(
        &mut self,
        counter: &mut Client,
        warmup: usize,
        rounds: usize,
        settle: Duration,
    ) -> BenchResult<Samples> {
        let mut samples = Samples::default();
        let mut released: Option<Instant> = None;
        for round in 0..=warmup + rounds {
            let id = match (round, self.holder.take()) {
                (0, Some(id)) => id,
                _ => {
                    let RingEvent::Acquired { id, at } =
                        next_event(&mut self.events, &mut self.tasks).await?
                    else {
                        return Err("a release without an acquisition".into());
                    };
                    if let Some(t) = released.take()
                        && round > warmup
                    {
                        samples.push(at - t);
                    }
                    id
                }
            };
            // Wait for the old holder's rejoin, which belongs to the last hand-off.
            raw::wait_count(counter, &self.queue, self.waiters as i64 + 1).await?;
            tokio::time::sleep(settle).await;
            if round == warmup + rounds {
                self.holder = Some(id);
                return Ok(samples);
            }
            self.gos[id].send(()).map_err(|_| "the holder is gone")?;
            let RingEvent::Releasing { at } = next_event(&mut self.events, &mut self.tasks).await?
            else {
                return Err("an acquisition before the release".into());
            };
            released = Some(at);
        }
        Err("the ring ended early".into())
    }

    async fn stop(self) {
        stop_ring(self.gos, self.tasks).await;
    }
}

async fn stop_ring(gos: Vec<mpsc::UnboundedSender<()>>, mut tasks: JoinSet<BenchResult<()>>) {
    drop(gos);
    // The holder releases and ends; waiters are cancelled (acquire is cancel safe).
    let _ = timeout(Duration::from_millis(500), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// `handoff_N`: the holder releases → the next of `waiters` waiters' acquire returns.
pub(crate) async fn handoff(env: &Env, waiters: usize) -> BenchResult<Outcome> {
    let name = format!("handoff_{waiters}");
    let rounds = env.pick(600, 30);
    // Short blocks: a stall of the machine (seen here: tens of ms, for a few hand-offs in a row)
    // then lands on both sides alike instead of on the p99 of one.
    let blocks = env.pick(60, 3);
    let warmup = 5;
    let settle = Duration::from_millis(env.pick(10, 5));
    let mut counter = env.raw().await?;

    // Ours: each contender is a client of its own (its own connection, locker and session).
    let prefix = env.prefix(&name, "ours");
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut gos = Vec::new();
    let mut tasks = JoinSet::new();
    let mut counts: Vec<Arc<Counts>> = Vec::new();
    for id in 0..=waiters {
        let (backend, c) = env.ours(&prefix).await?;
        counts.push(c);
        let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
        let (go_tx, go_rx) = mpsc::unbounded_channel();
        gos.push(go_tx);
        tasks.spawn(ours_contender(locker, id, events_tx.clone(), go_rx));
    }
    drop(events_tx);
    let snapshot = || {
        counts
            .iter()
            .map(|c| c.snapshot())
            .fold(Calls::default(), Calls::plus)
    };
    let mut ours_ring = Ring {
        queue: format!("{prefix}k/").into_bytes(),
        waiters,
        events,
        gos,
        tasks,
        holder: None,
    };

    // The baseline: the same ring of raw contenders, alive alongside ours (idle while ours runs).
    let prefix = env.prefix(&name, "raw");
    let queue = format!("{prefix}k/").into_bytes();
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut gos = Vec::new();
    let mut tasks = JoinSet::new();
    for id in 0..=waiters {
        let contender = RawContender::new(env.raw().await?, &queue, SESSION_TTL).await?;
        let (go_tx, go_rx) = mpsc::unbounded_channel();
        gos.push(go_tx);
        tasks.spawn(raw_contender(contender, id, events_tx.clone(), go_rx));
    }
    drop(events_tx);
    let mut raw_ring = Ring {
        queue,
        waiters,
        events,
        gos,
        tasks,
        holder: None,
    };

    // Alternate the two rings in blocks, so that both see the same background load.
    let (mut ours, mut base) = (Samples::default(), Samples::default());
    let mut calls = Calls::default();
    ours_ring.run(&mut counter, warmup, 0, settle).await?;
    raw_ring.run(&mut counter, warmup, 0, settle).await?;
    for _ in 0..blocks {
        let before = snapshot();
        ours.extend(
            &ours_ring
                .run(&mut counter, 0, rounds / blocks, settle)
                .await?,
        );
        calls = calls.plus(snapshot().since(before));
        base.extend(
            &raw_ring
                .run(&mut counter, 0, rounds / blocks, settle)
                .await?,
        );
    }
    ours_ring.stop().await;
    raw_ring.stop().await;

    let mut outcome = Outcome::new(&name, ours.measure()).compare(
        "raw: delete -> watch event -> one read",
        base.measure(),
        RatioKind::P99,
        1.5,
    );
    // Calls include the old holder's rejoin (join + position) and its release (delete).
    outcome.note(calls_note(
        "hand-off (all clients: release + wake + rejoin)",
        calls,
        ours.len(),
    ));
    outcome.extra("calls_per_handoff", calls.per_op(ours.len()));
    Ok(outcome)
}

/// `contended_8`: 8 clients (lockers on one connection) take turns on one key.
pub(crate) async fn contended(env: &Env) -> BenchResult<Outcome> {
    const TASKS: usize = 8;
    let period = Duration::from_secs(env.pick(5, 1));
    let rounds = 2;
    let (backend, counts) = env.ours(&env.prefix("contended_8", "ours")).await?;
    let lockers = (0..TASKS)
        .map(|_| Locker::builder(backend.clone()).ttl(SESSION_TTL).build())
        .collect::<Result<Vec<_>, _>>()?;
    for locker in &lockers {
        ours_cycle(locker, "k").await?;
    }
    let mut client = env.raw().await?;
    let lease = RawLease::grant(&client, SESSION_TTL).await?;
    let raw_key = format!("{}k", env.prefix("contended_8", "raw")).into_bytes();
    for _ in 0..20 {
        raw_cycle(&mut client, &raw_key, lease.id).await?;
    }

    let (mut waits, mut base) = (Samples::default(), Samples::default());
    let (mut ours_n, mut ours_time) = (0u64, Duration::ZERO);
    let (mut base_n, mut base_time) = (0u64, Duration::ZERO);
    let mut calls = Calls::default();
    let (mut ours_used, mut base_used) = (ProcStats::default(), ProcStats::default());
    for _ in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let acquired = Arc::new(AtomicU64::new(0));
        let before = counts.snapshot();
        let used = ProcStats::now();
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for locker in &lockers {
            let (locker, stop, acquired) = (locker.clone(), stop.clone(), acquired.clone());
            tasks.spawn(async move {
                let mut waits = Samples::default();
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    let guard = locker.acquire("k", "v").await?;
                    waits.push(asked.elapsed());
                    acquired.fetch_add(1, Ordering::Relaxed);
                    guard.release().await?;
                }
                BenchResult::Ok(waits)
            });
        }
        tokio::time::sleep(period).await;
        let n = acquired.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        ours_used.add(ProcStats::now().since(used));
        let after = counts.snapshot();
        stop.store(true, Ordering::Relaxed);
        while let Some(done) = tasks.join_next().await {
            waits.extend(&done??);
        }
        ours_n += n;
        ours_time += elapsed;
        calls = calls.plus(after.since(before));

        let used = ProcStats::now();
        let started = Instant::now();
        while started.elapsed() < period {
            base.push(raw_cycle(&mut client, &raw_key, lease.id).await?);
            base_n += 1;
        }
        base_time += started.elapsed();
        base_used.add(ProcStats::now().since(used));
    }
    let mut ours = waits.measure();
    ours.ops_per_s = Some(ours_n as f64 / ours_time.as_secs_f64());
    let mut baseline = base.measure();
    baseline.ops_per_s = Some(base_n as f64 / base_time.as_secs_f64());
    let mut outcome = Outcome::new("contended_8", ours).compare(
        "raw sequential create-if-absent txn + delete cycles",
        baseline,
        RatioKind::Throughput,
        0.8,
    );
    outcome.note("p50/p99 = wait from acquire() to owning; baseline p50/p99 = one raw cycle");
    outcome.note(calls_note("acquisition", calls, ours_n as usize));
    outcome.extra("calls_per_acquisition", calls.per_op(ours_n as usize));
    outcome.note(format!(
        "client per acquisition (all threads): {}; per raw cycle: {}",
        ours_used.per_op(ours_n as usize),
        base_used.per_op(base_n as usize)
    ));
    outcome.extra(
        "cpu_us_per_acquisition",
        us(ours_used.cpu) / ours_n.max(1) as f64,
    );
    outcome.extra(
        "switches_per_acquisition",
        ours_used.switches as f64 / ours_n.max(1) as f64,
    );
    outcome.extra(
        "raw_cpu_us_per_cycle",
        us(base_used.cpu) / base_n.max(1) as f64,
    );
    for locker in &lockers {
        locker.close().await;
    }
    lease.revoke(&client).await;
    Ok(outcome)
}

/// Waits on `rx` for `value`, answering when it arrived.
async fn arrival(
    rx: &mut mpsc::UnboundedReceiver<(Vec<u8>, Instant)>,
    value: &[u8],
) -> BenchResult<Instant> {
    loop {
        let (seen, at) = timeout(Duration::from_secs(10), rx.recv())
            .await
            .map_err(|_| "no watch delivery within 10 s")?
            .ok_or("the watch ended")?;
        if seen == value {
            return Ok(at);
        }
    }
}

/// `watch_latency`: the holder changes its value → another client's `watch` stream yields it.
pub(crate) async fn watch_latency(env: &Env) -> BenchResult<Outcome> {
    let changes = env.pick(1000, 150);
    let prefix = env.prefix("watch_latency", "ours");
    let (holder_backend, counts) = env.ours(&prefix).await?;
    let (watcher_backend, _) = env.ours(&prefix).await?;
    let holder = Locker::builder(holder_backend).ttl(SESSION_TTL).build()?;
    let watcher = Locker::builder(watcher_backend).ttl(SESSION_TTL).build()?;
    let guard = holder.acquire("w", "v0").await?;
    let mut stream = watcher.watch("w")?;
    let (tx, mut ours_rx) = mpsc::unbounded_channel();
    let ours_feed = tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let at = Instant::now();
            if let Ok(Some(holder)) = item
                && tx.send((holder.value, at)).is_err()
            {
                return;
            }
        }
    });
    arrival(&mut ours_rx, b"v0").await?;

    let mut writer = env.raw().await?;
    let mut reader = env.raw().await?;
    let raw_key = format!("{}w", env.prefix("watch_latency", "raw")).into_bytes();
    writer.put(raw_key.clone(), "v0", None).await?;
    let mut raw_stream = raw::watch(&mut reader, &raw_key, WatchOptions::new()).await?;
    let (tx, mut raw_rx) = mpsc::unbounded_channel();
    let raw_feed = tokio::spawn(async move {
        while let Ok(Some(answer)) = raw_stream.message().await {
            let at = Instant::now();
            for event in answer.events() {
                if event.event_type() == EventType::Put
                    && let Some(kv) = event.kv()
                    && tx.send((kv.value().to_vec(), at)).is_err()
                {
                    return;
                }
            }
        }
    });

    let before = counts.snapshot();
    let (mut ours, mut base) = (Samples::default(), Samples::default());
    let (mut ours_write, mut base_write) = (Samples::default(), Samples::default());
    // The guarded put our backend makes (`update_value`), in raw calls, for the breakdown.
    let (mut guarded, mut guarded_write) = (Samples::default(), Samples::default());
    let guarded_rev = writer
        .get(raw_key.clone(), None)
        .await?
        .kvs()
        .first()
        .map_or(0, |kv| kv.create_revision());
    let mut n = 0;
    for _ in 0..BLOCKS {
        for _ in 0..changes / BLOCKS {
            n += 1;
            let value = format!("v{n}");
            let started = Instant::now();
            guard.set_value(value.clone()).await?;
            ours_write.push(started.elapsed());
            ours.push(arrival(&mut ours_rx, value.as_bytes()).await? - started);
        }
        for _ in 0..changes / BLOCKS {
            n += 1;
            let value = format!("v{n}");
            let started = Instant::now();
            writer.put(raw_key.clone(), value.clone(), None).await?;
            base_write.push(started.elapsed());
            base.push(arrival(&mut raw_rx, value.as_bytes()).await? - started);
        }
        for _ in 0..changes / BLOCKS {
            n += 1;
            let value = format!("v{n}");
            let started = Instant::now();
            raw::guarded_put(&mut writer, &raw_key, guarded_rev, value.as_bytes()).await?;
            guarded_write.push(started.elapsed());
            guarded.push(arrival(&mut raw_rx, value.as_bytes()).await? - started);
        }
    }
    let calls = counts.snapshot().since(before);
    ours_feed.abort();
    raw_feed.abort();
    guard.release().await?;
    holder.close().await;
    watcher.close().await;
    writer.delete(raw_key, None).await?;
    let mut outcome = Outcome::new("watch_latency", ours.measure()).compare(
        "raw put -> raw etcd watch delivery",
        base.measure(),
        RatioKind::P50,
        1.2,
    );
    outcome.note(calls_note("change (holder side)", calls, ours.len()));
    let ours_write_p50 = ours_write.quantile(0.5).map_or(f64::NAN, us);
    let base_write_p50 = base_write.quantile(0.5).map_or(f64::NAN, us);
    let guarded_write_p50 = guarded_write.quantile(0.5).map_or(f64::NAN, us);
    let guarded_p50 = guarded.quantile(0.5).map_or(f64::NAN, us);
    outcome.extra("set_value_returned_p50_us", ours_write_p50);
    outcome.extra("raw_put_returned_p50_us", base_write_p50);
    outcome.extra("raw_guarded_put_returned_p50_us", guarded_write_p50);
    outcome.extra("raw_guarded_put_delivered_p50_us", guarded_p50);
    outcome.note(format!(
        "the writer's call returned after (p50): set_value {ours_write_p50:.0} us, raw put \
         {base_write_p50:.0} us, raw guarded put txn (our update_value's shape) \
         {guarded_write_p50:.0} us, delivered after {guarded_p50:.0} us"
    ));
    Ok(outcome)
}

/// A small xorshift generator for the failover phases (no seed needed to be replayable here).
struct XorShift(u64);

impl XorShift {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        XorShift(seed | 1)
    }

    fn below(&mut self, limit: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let nanos = limit.as_nanos().max(1) as u64;
        Duration::from_nanos(self.0 % nanos)
    }
}

const FAILOVER_TTL: Duration = Duration::from_secs(2);

async fn ours_failover_once(
    holder: Locker,
    waiter: Locker,
    mut counter: Client,
    queue: Vec<u8>,
    key: String,
    phase: Duration,
) -> BenchResult<Duration> {
    let handle = holder
        .lock_with(
            key.clone(),
            "holder",
            LockOptions::new().dedicated_session(FAILOVER_TTL),
        )
        .await?;
    handle.wait_owned().await?;
    let (owned_tx, owned_rx) = oneshot::channel();
    let waiting = tokio::spawn(async move {
        let guard = waiter.acquire(key, "waiter").await?;
        let _ = owned_tx.send(Instant::now());
        BenchResult::Ok(guard)
    });
    raw::wait_count(&mut counter, &queue, 2).await?;
    tokio::time::sleep(phase).await;
    let vanished = Instant::now();
    handle.abandon();
    let owned = timeout(FAILOVER_TTL * 3, owned_rx)
        .await
        .map_err(|_| "no failover within 3 TTLs")?
        .map_err(|_| "the waiter failed")?;
    waiting.await??.release().await?;
    Ok(owned - vanished)
}

async fn raw_failover_once(
    client: Client,
    entry: Vec<u8>,
    phase: Duration,
) -> BenchResult<Duration> {
    let mut client = client;
    let lease = RawLease::grant(&client, FAILOVER_TTL).await?;
    if !raw::try_create(&mut client, &entry, lease.id).await? {
        return Err("raw failover: the key was already there".into());
    }
    let mut watch = raw::watch(&mut client, &entry, WatchOptions::new()).await?;
    tokio::time::sleep(Duration::from_millis(20) + phase).await;
    let vanished = Instant::now();
    lease.stop();
    timeout(FAILOVER_TTL * 3, raw::wait_delete(&mut watch, &entry, 0))
        .await
        .map_err(|_| "no expiry within 3 TTLs")??;
    client.get(entry, None).await?;
    Ok(vanished.elapsed())
}

/// `failover`: the holder vanishes without releasing (TTL 2 s) → a waiter owns.
pub(crate) async fn failover(env: &Env) -> BenchResult<Outcome> {
    let rounds = env.pick(4, 1);
    let parallel = env.pick(6, 4);
    let prefix = env.prefix("failover", "ours");
    let raw_prefix = env.prefix("failover", "raw");
    let (holder_backend, _) = env.ours(&prefix).await?;
    let (waiter_backend, _) = env.ours(&prefix).await?;
    let holder = Locker::builder(holder_backend).ttl(FAILOVER_TTL).build()?;
    let waiter = Locker::builder(waiter_backend).ttl(SESSION_TTL).build()?;
    let client = env.raw().await?;
    let mut rng = XorShift::new();
    let (mut ours, mut base) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        let mut tasks = Vec::new();
        let mut raw_tasks = Vec::new();
        for k in 0..parallel {
            let key = format!("f{round}-{k}");
            let queue = format!("{prefix}{key}/").into_bytes();
            tasks.push(ours_failover_once(
                holder.clone(),
                waiter.clone(),
                client.clone(),
                queue,
                key.clone(),
                rng.below(FAILOVER_TTL / 3),
            ));
            let entry = format!("{raw_prefix}{key}/holder").into_bytes();
            raw_tasks.push(raw_failover_once(
                client.clone(),
                entry,
                rng.below(FAILOVER_TTL / 3),
            ));
        }
        let (ours_round, raw_round) = tokio::join!(
            futures::future::try_join_all(tasks),
            futures::future::try_join_all(raw_tasks)
        );
        for d in ours_round? {
            ours.push(d);
        }
        for d in raw_round? {
            base.push(d);
        }
    }
    holder.close().await;
    waiter.close().await;
    let ttl_us = us(FAILOVER_TTL);
    let max = ours.max().map(us);
    let median = ours.quantile(0.5).map(us);
    let measure = Measure {
        p50_us: median,
        p99_us: max,
        ops_per_s: None,
        samples: ours.len(),
    };
    let ttl = Measure {
        p50_us: Some(ttl_us),
        p99_us: Some(ttl_us),
        ops_per_s: None,
        samples: 0,
    };
    let mut outcome =
        Outcome::new("failover", measure).compare("the TTL (2 s)", ttl, RatioKind::MaxOverTtl, 1.3);
    outcome.note("p50 = median, p99 column = max; the baseline is the TTL itself");
    let raw_median = base.quantile(0.5).map(us);
    let raw_max = base.max().map(us);
    outcome.extra("median_over_ttl", median.map_or(f64::NAN, |m| m / ttl_us));
    outcome.extra("max_over_ttl", max.map_or(f64::NAN, |m| m / ttl_us));
    outcome.extra("raw_median_us", raw_median.unwrap_or(f64::NAN));
    outcome.extra("raw_max_us", raw_max.unwrap_or(f64::NAN));
    outcome.extra("raw_max_over_ttl", raw_max.map_or(f64::NAN, |m| m / ttl_us));
    outcome.note(format!(
        "median/TTL {:.2}, max/TTL {:.2}; raw etcd floor (lease left to expire -> delete event -> \
         one read): median {:.0} ms, max {:.0} ms ({:.2} TTL)",
        median.unwrap_or(f64::NAN) / ttl_us,
        max.unwrap_or(f64::NAN) / ttl_us,
        raw_median.unwrap_or(f64::NAN) / 1000.0,
        raw_max.unwrap_or(f64::NAN) / 1000.0,
        raw_max.unwrap_or(f64::NAN) / ttl_us,
    ));
    Ok(outcome)
}

/// Raw create-if-absent txns on `keys` keys at `concurrency`, over one connection and one lease.
/// What the raw txns of `many_locks` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The baseline: create-if-absent (a put in a txn with one compare).
    Minimal,
    /// Our join txn's shape: the put plus a sorted range of the queue.
    JoinShaped,
    /// Join-shaped, with a watch open on the whole prefix (as our locker's hub has).
    JoinShapedWatched,
    /// Join-shaped, with a deletes-only watch open on the whole prefix.
    JoinShapedWatchedDeletes,
    /// A join that reads the queue only when it is not empty (a compare over its range).
    JoinSkipIfEmpty,
}

async fn raw_many(
    env: &Env,
    prefix: &str,
    keys: usize,
    concurrency: usize,
    shape: Shape,
) -> BenchResult<(Duration, Samples, f64)> {
    let client = env.raw().await?;
    settle(&client).await?;
    let lease = RawLease::grant(&client, SESSION_TTL).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let watcher = match shape {
        Shape::JoinShapedWatched => {
            Some(DrainedWatch::open(&client, prefix.as_bytes(), false).await?)
        }
        Shape::JoinShapedWatchedDeletes => {
            Some(DrainedWatch::open(&client, prefix.as_bytes(), true).await?)
        }
        _ => None,
    };
    let mem_before = alloc_stats();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, next, prefix, lease) =
            (client.clone(), next.clone(), prefix.to_owned(), lease.id);
        tasks.spawn(async move {
            let mut samples = Samples::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return BenchResult::Ok(samples);
                }
                let t = Instant::now();
                let queue = format!("{prefix}m{i}/");
                let key = format!("{queue}{lease:x}");
                if shape == Shape::Minimal {
                    if !raw::try_create(&mut client, key.as_bytes(), lease).await? {
                        return Err("raw many: key already there".into());
                    }
                } else if shape == Shape::JoinSkipIfEmpty {
                    raw::join_skip_if_empty(&mut client, queue.as_bytes(), key.as_bytes(), lease)
                        .await?;
                } else {
                    raw::join_shaped(&mut client, queue.as_bytes(), key.as_bytes(), lease).await?;
                }
                samples.push(t.elapsed());
            }
        });
    }
    let mut samples = Samples::default();
    while let Some(done) = tasks.join_next().await {
        samples.extend(&done??);
    }
    let elapsed = started.elapsed();
    let allocated =
        (alloc_stats().bytes_allocated - mem_before.bytes_allocated) as f64 / keys as f64;
    lease.revoke(&client).await;
    drop(watcher);
    Ok((elapsed, samples, allocated))
}

/// Compacts and defragments etcd before a run of `many_locks`: each run writes (and its lease's
/// revoke deletes) thousands of keys, and etcd slows down as its history grows, so without this
/// the runs after the first are measured on a slower store than the first.
async fn settle(client: &Client) -> BenchResult<()> {
    let mut client = client.clone();
    crate::compact(&mut client).await?;
    // The member this client talks to (the bench's own etcd has one).
    client.defragment().await?;
    Ok(())
}

/// `many_locks`: 10,000 keys acquired by 64 tasks on one session, held, released.
pub(crate) async fn many_locks(env: &Env) -> BenchResult<Outcome> {
    const CONCURRENCY: usize = 64;
    let keys = env.pick(10_000, 2_000);
    let hold = Duration::from_secs(env.pick(10, 3));

    // The raw runs go before and after ours, in mirrored order, so that a drift of etcd's speed
    // (its database grows) weighs on all of them alike.
    const SHAPES: [Shape; 5] = [
        Shape::Minimal,
        Shape::JoinShaped,
        Shape::JoinShapedWatched,
        Shape::JoinShapedWatchedDeletes,
        Shape::JoinSkipIfEmpty,
    ];
    let mut times = [Duration::ZERO; 5];
    // The minimal raw run's own time before and after ours.
    let mut minimal_runs = Vec::new();
    let mut base = Samples::default();
    let mut raw_allocated = 0.0;
    for (i, shape) in SHAPES.iter().enumerate() {
        let prefix = env.prefix("many_locks", &format!("raw-{shape:?}-a"));
        let (time, samples, allocated) = raw_many(env, &prefix, keys, CONCURRENCY, *shape).await?;
        times[i] += time;
        if *shape == Shape::Minimal {
            base.extend(&samples);
            raw_allocated = allocated;
            minimal_runs.push(keys as f64 / time.as_secs_f64());
        }
    }

    settle(&env.raw().await?).await?;
    let (backend, counts) = env.ours(&env.prefix("many_locks", "ours")).await?;
    let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
    ours_cycle(&locker, "warm-up").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mem_before = alloc_stats();
    let calls_before = counts.snapshot();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (locker, next) = (locker.clone(), next.clone());
        tasks.spawn(async move {
            let mut guards: Vec<LockGuard> = Vec::new();
            let mut samples = Samples::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return BenchResult::Ok((guards, samples));
                }
                let t = Instant::now();
                guards.push(locker.acquire(format!("m{i}"), "v").await?);
                samples.push(t.elapsed());
            }
        });
    }
    let mut guards = Vec::with_capacity(keys);
    let mut ours = Samples::default();
    while let Some(done) = tasks.join_next().await {
        let (g, s) = done??;
        guards.extend(g);
        ours.extend(&s);
    }
    let acquire_time = started.elapsed();
    let acquire_calls = counts.snapshot().since(calls_before);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mem_held = alloc_stats();

    let hold_before = counts.snapshot();
    let hold_started = Instant::now();
    tokio::time::sleep(hold).await;
    let held_for = hold_started.elapsed();
    let hold_calls = counts.snapshot().since(hold_before);
    let still_owned = guards.iter().filter(|g| g.is_owned()).count();

    let release_started = Instant::now();
    let failed = Arc::new(AtomicUsize::new(0));
    futures::stream::iter(guards)
        .for_each_concurrent(CONCURRENCY, |guard| {
            let failed = failed.clone();
            async move {
                if guard.release().await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    let release_time = release_started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mem_after = alloc_stats();
    locker.close().await;

    for (i, shape) in SHAPES.iter().enumerate().rev() {
        let prefix = env.prefix("many_locks", &format!("raw-{shape:?}-b"));
        let (time, samples, _) = raw_many(env, &prefix, keys, CONCURRENCY, *shape).await?;
        times[i] += time;
        if *shape == Shape::Minimal {
            base.extend(&samples);
            minimal_runs.push(keys as f64 / time.as_secs_f64());
        }
    }
    let rate = |i: usize| 2.0 * keys as f64 / times[i].as_secs_f64();
    let (shaped_rate, watched_rate, deletes_rate) = (rate(1), rate(2), rate(3));
    let skip_if_empty_rate = rate(4);

    let mut measure = ours.measure();
    measure.ops_per_s = Some(keys as f64 / acquire_time.as_secs_f64());
    let mut baseline = base.measure();
    baseline.ops_per_s = Some(rate(0));
    let mut outcome = Outcome::new("many_locks", measure).compare(
        "raw create-if-absent txns, 64 tasks, one connection, one lease",
        baseline,
        RatioKind::Throughput,
        0.8,
    );
    let live = |s: stats_alloc::Stats| s.bytes_allocated as f64 - s.bytes_deallocated as f64;
    let live_per_lock = (live(mem_held) - live(mem_before)) / keys as f64;
    let allocated_per_lock =
        (mem_held.bytes_allocated - mem_before.bytes_allocated) as f64 / keys as f64;
    let allocations_per_lock = (mem_held.allocations - mem_before.allocations) as f64 / keys as f64;
    let left_per_lock = (live(mem_after) - live(mem_before)) / keys as f64;
    let keep_alives_per_s = hold_calls.get("keep_alive") as f64 / held_for.as_secs_f64();
    let other_calls = hold_calls.total() - hold_calls.get("keep_alive");
    outcome.also_require("live bytes/lock <= 2048", live_per_lock <= 2048.0);
    outcome.extra("keys", keys);
    outcome.extra("hold_s", held_for.as_secs_f64());
    outcome.extra("keep_alives_per_s_while_holding", keep_alives_per_s);
    outcome.extra("other_backend_calls_while_holding", other_calls);
    outcome.extra("still_owned_after_hold", still_owned);
    outcome.extra("live_bytes_per_held_lock", live_per_lock);
    outcome.extra("allocated_bytes_per_acquire", allocated_per_lock);
    outcome.extra("allocations_per_acquire", allocations_per_lock);
    outcome.extra("raw_allocated_bytes_per_txn", raw_allocated);
    outcome.extra("raw_join_shaped_per_s", shaped_rate);
    outcome.extra("raw_join_shaped_watched_per_s", watched_rate);
    outcome.extra("raw_join_shaped_deletes_watched_per_s", deletes_rate);
    outcome.extra("raw_join_skip_if_empty_per_s", skip_if_empty_rate);
    outcome.note(format!(
        "breakdown (acquires/s at 64 tasks): raw create-if-absent {:.0} (before ours {:.0}, after \
         {:.0}); raw with our join txn's shape {shaped_rate:.0}; same with a prefix watch open (like our hub) {watched_rate:.0}, \
         with a deletes-only prefix watch {deletes_rate:.0}; a join reading the queue only when it \
         is not empty {skip_if_empty_rate:.0}; ours {:.0}",
        outcome
            .baseline
            .as_ref()
            .and_then(|(_, m)| m.ops_per_s)
            .unwrap_or(f64::NAN),
        minimal_runs.first().copied().unwrap_or(f64::NAN),
        minimal_runs.last().copied().unwrap_or(f64::NAN),
        outcome.ours.ops_per_s.unwrap_or(f64::NAN),
    ));
    outcome.extra(
        "raw_minimal_before_per_s",
        minimal_runs.first().copied().unwrap_or(f64::NAN),
    );
    outcome.extra(
        "raw_minimal_after_per_s",
        minimal_runs.last().copied().unwrap_or(f64::NAN),
    );
    outcome.extra("live_bytes_per_lock_after_release", left_per_lock);
    outcome.extra("release_per_s", keys as f64 / release_time.as_secs_f64());
    outcome.extra("release_failures", failed.load(Ordering::Relaxed));
    outcome.extra("calls_per_acquire", acquire_calls.per_op(keys));
    outcome.note(format!(
        "while holding {keys} locks for {:.1} s: {keep_alives_per_s:.2} keep-alives/s, {other_calls} \
         other backend calls, {still_owned} still owned",
        held_for.as_secs_f64()
    ));
    outcome.note(format!(
        "client memory: {live_per_lock:.0} B live per held lock (target <= 2048), \
         {allocated_per_lock:.0} B in {allocations_per_lock:.1} allocations per acquire (raw txn: \
         {raw_allocated:.0} B), {left_per_lock:.0} B per lock left after release"
    ));
    outcome.note(format!(
        "release: {:.0}/s at 64 tasks; {}",
        keys as f64 / release_time.as_secs_f64(),
        calls_note("acquire", acquire_calls, keys)
    ));
    Ok(outcome)
}

/// Creates one entry per key (`<prefix>w<i>/<lease hex>`), one after the other, answering when
/// each was sent.
async fn write_entries(env: &Env, prefix: &str, n: usize) -> BenchResult<(Vec<Instant>, Client)> {
    let mut client = env.raw().await?;
    let lease = RawLease::grant(&client, SESSION_TTL).await?;
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("{prefix}w{i}/{:x}", lease.id);
        sent.push(Instant::now());
        if !raw::try_create(&mut client, key.as_bytes(), lease.id).await? {
            return Err("watchers: key already there".into());
        }
    }
    lease.revoke(&client).await;
    Ok((sent, client))
}

/// The index `i` of a key `<prefix>w<i>/...`.
fn key_index(key: &[u8], prefix: &[u8]) -> Option<usize> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(b"w")?;
    let end = rest.iter().position(|b| *b == b'/')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn delivery_samples(sent: &[Instant], got: &[Option<Instant>]) -> BenchResult<Samples> {
    let mut samples = Samples::default();
    for (s, g) in sent.iter().zip(got) {
        samples.push(g.ok_or("a change was not delivered")? - *s);
    }
    Ok(samples)
}

/// `watchers`: 1,000 watch streams on distinct keys over one connection, one change each.
pub(crate) async fn watchers(env: &Env) -> BenchResult<Outcome> {
    const N: usize = 1000;
    let rounds = env.pick(3, 1);
    let (mut ours, mut base) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        // Ours: one locker (one connection), 1,000 `watch` streams.
        let prefix = env.prefix("watchers", &format!("ours{round}"));
        let (backend, _) = env.ours(&prefix).await?;
        let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
        let mut streams = Vec::with_capacity(N);
        for i in 0..N {
            streams.push(locker.watch(&format!("w{i}"))?.map(move |item| (i, item)));
        }
        let mut all = futures::stream::select_all(streams);
        let (ready_tx, ready_rx) = oneshot::channel();
        let consumer = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let (mut initial, mut remaining) = (0, N);
            let mut got: Vec<Option<Instant>> = vec![None; N];
            while let Some((i, item)) = all.next().await {
                let at = Instant::now();
                match item? {
                    None => {
                        initial += 1;
                        if initial == N
                            && let Some(ready) = ready.take()
                        {
                            let _ = ready.send(());
                        }
                    }
                    Some(_) if got[i].is_none() => {
                        got[i] = Some(at);
                        remaining -= 1;
                        if remaining == 0 {
                            return BenchResult::Ok(got);
                        }
                    }
                    Some(_) => {}
                }
            }
            Err("the watch streams ended".into())
        });
        timeout(Duration::from_secs(30), ready_rx)
            .await
            .map_err(|_| "watch streams not ready within 30 s")??;
        let (sent, _) = write_entries(env, &prefix, N).await?;
        let got = timeout(Duration::from_secs(30), consumer)
            .await
            .map_err(|_| "changes not delivered within 30 s")???;
        ours.extend(&delivery_samples(&sent, &got)?);
        locker.close().await;

        // The baseline: 1,000 raw watches on one stream (one connection).
        let raw_prefix = env.prefix("watchers", &format!("raw{round}"));
        let mut reader = env.raw().await?;
        let first = format!("{raw_prefix}w0/");
        let stream = reader
            .watch(first, Some(WatchOptions::new().with_prefix()))
            .await?;
        let (mut requests, mut responses) = stream.split();
        let (ready_tx, ready_rx) = oneshot::channel();
        let key_prefix = raw_prefix.clone().into_bytes();
        let consumer = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let (mut created, mut remaining) = (0, N);
            let mut got: Vec<Option<Instant>> = vec![None; N];
            while let Some(answer) = responses.message().await? {
                let at = Instant::now();
                if answer.created() {
                    created += 1;
                    if created == N
                        && let Some(ready) = ready.take()
                    {
                        let _ = ready.send(());
                    }
                }
                for event in answer.events() {
                    if event.event_type() == EventType::Put
                        && let Some(i) = event.kv().and_then(|kv| key_index(kv.key(), &key_prefix))
                        && i < N
                        && got[i].is_none()
                    {
                        got[i] = Some(at);
                        remaining -= 1;
                    }
                }
                if remaining == 0 {
                    return BenchResult::Ok(got);
                }
            }
            Err("the raw watch stream ended".into())
        });
        for i in 1..N {
            requests
                .watch(
                    format!("{raw_prefix}w{i}/"),
                    Some(WatchOptions::new().with_prefix()),
                )
                .await?;
        }
        timeout(Duration::from_secs(30), ready_rx)
            .await
            .map_err(|_| "raw watches not created within 30 s")??;
        let (sent, _) = write_entries(env, &raw_prefix, N).await?;
        let got = timeout(Duration::from_secs(30), consumer)
            .await
            .map_err(|_| "raw changes not delivered within 30 s")???;
        base.extend(&delivery_samples(&sent, &got)?);
        drop(requests);
    }
    let mut outcome = Outcome::new("watchers", ours.measure()).compare(
        "1,000 raw watches on one stream",
        base.measure(),
        RatioKind::P99,
        1.2,
    );
    outcome.note(
        "delivery = from sending the put that makes a holder to the stream yielding it; \
         ops/s = deliveries per second of measured latency (not meaningful)",
    );
    Ok(outcome)
}

/// `memory_backend`: acquire + release cycles on the in-process backend, real time.
pub(crate) async fn memory_backend(env: &Env) -> BenchResult<Outcome> {
    let period = Duration::from_secs(env.pick(3, 1));
    let locker = Locker::builder(MemoryBackend::new())
        .ttl(SESSION_TTL)
        .build()?;
    for _ in 0..100 {
        ours_cycle(&locker, "k").await?;
    }
    let mut samples = Samples::default();
    let started = Instant::now();
    while started.elapsed() < period {
        samples.push(ours_cycle(&locker, "k").await?);
    }
    let elapsed = started.elapsed();
    locker.close().await;
    let mut measure = samples.measure();
    measure.ops_per_s = Some(samples.len() as f64 / elapsed.as_secs_f64());
    let mut outcome = Outcome::new("memory_backend", measure);
    outcome.target = "report".to_owned();
    Ok(outcome)
}

/// How often each service of the fleet takes and gives back a key of its own.
const FLEET_CHURN_EVERY: Duration = Duration::from_secs(1);

/// The CPU etcd (the one the bench started) has used so far, from `/proc/<pid>/stat` (utime +
/// stime, in clock ticks of 10 ms).
fn etcd_cpu(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// One fleet's numbers.
struct FleetRun {
    handoffs: Samples,
    events_per_client_per_s: f64,
    etcd_cpu_share: Option<f64>,
    seconds: f64,
}

/// `fleet`: many services, each with its own `Locker` (its own connection and session) on one
/// etcd, under one root, as the seed's health mesh at scale. Each service holds two keys of its
/// own and watches them, and takes and gives back a third of its own every second; two more
/// services hand a key to each other meanwhile, timed. Reported for 50 and 200 services: the watch
/// events each client received per second, etcd's CPU, and the hand-off latency.
pub(crate) async fn fleet(env: &Env) -> BenchResult<Outcome> {
    let sizes = [50, 200];
    let mut runs = Vec::new();
    for n in sizes {
        runs.push(fleet_of(env, n).await?);
        crate::compact(&mut env.raw().await?).await?;
    }
    let last = runs.last_mut().ok_or("no fleet ran")?;
    let mut outcome = Outcome::new("fleet", last.handoffs.measure());
    for (n, run) in sizes.iter().zip(runs.iter_mut()) {
        let p50 = run.handoffs.quantile(0.5).map_or(f64::NAN, us);
        let p99 = run.handoffs.quantile(0.99).map_or(f64::NAN, us);
        outcome.extra(
            &format!("events_per_client_per_s_{n}"),
            run.events_per_client_per_s,
        );
        outcome.extra(&format!("handoff_p50_us_{n}"), p50);
        outcome.extra(&format!("handoff_p99_us_{n}"), p99);
        if let Some(share) = run.etcd_cpu_share {
            outcome.extra(&format!("etcd_cpu_share_{n}"), share);
        }
        outcome.note(format!(
            "{n} services, {:.1} s: {:.0} watch events per client per s; etcd CPU {}; hand-off \
             p50 {p50:.0} us, p99 {p99:.0} us ({} samples)",
            run.seconds,
            run.events_per_client_per_s,
            run.etcd_cpu_share.map_or_else(
                || "unknown".to_owned(),
                |s| format!("{:.0} % of a core", s * 100.0)
            ),
            run.handoffs.len(),
        ));
    }
    Ok(outcome)
}

async fn fleet_of(env: &Env, n: usize) -> BenchResult<FleetRun> {
    let rounds = env.pick(200, 20);
    let prefix = env.prefix("fleet", &format!("n{n}"));
    let stop = Arc::new(AtomicBool::new(false));
    let mut services = Vec::new();
    let mut background = JoinSet::new();
    for i in 0..n {
        let (backend, counts) = env.ours(&prefix).await?;
        let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
        let mut held = Vec::new();
        for j in 0..2 {
            let key = format!("svc{i}/k{j}");
            let handle = locker.lock(key.clone(), "up").await?;
            handle.wait_owned().await?;
            held.push(handle);
            let mut stream = locker.watch(&key)?;
            background.spawn(async move { while stream.next().await.is_some() {} });
        }
        // Each service's churn starts at its own offset, so the fleet's writes are spread.
        let (churner, stop) = (locker.clone(), stop.clone());
        let offset = FLEET_CHURN_EVERY * i as u32 / n as u32;
        background.spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(FLEET_CHURN_EVERY);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(guard) = churner.acquire(format!("svc{i}/churn"), "x").await {
                    let _ = guard.release().await;
                }
            }
        });
        services.push((locker, counts, held));
    }
    // Two more services hand a key to each other, timed, while the fleet churns.
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut gos = Vec::new();
    let mut tasks = JoinSet::new();
    for id in 0..2 {
        let (backend, _) = env.ours(&prefix).await?;
        let locker = Locker::builder(backend).ttl(SESSION_TTL).build()?;
        let (go_tx, go_rx) = mpsc::unbounded_channel();
        gos.push(go_tx);
        tasks.spawn(ours_contender(locker, id, events_tx.clone(), go_rx));
    }
    drop(events_tx);
    let mut ring = Ring {
        queue: format!("{prefix}k/").into_bytes(),
        waiters: 1,
        events,
        gos,
        tasks,
        holder: None,
    };
    let mut counter = env.raw().await?;
    // Let every service's churn run once before measuring.
    tokio::time::sleep(FLEET_CHURN_EVERY).await;
    let events_before: u64 = services.iter().map(|(_, c, _)| c.events()).sum();
    let cpu_before = etcd_cpu(env.etcd_pid);
    let started = Instant::now();
    let handoffs = ring
        .run(&mut counter, 5, rounds, Duration::from_millis(5))
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let events: u64 = services
        .iter()
        .map(|(_, c, _)| c.events())
        .sum::<u64>()
        .saturating_sub(events_before);
    let cpu = etcd_cpu(env.etcd_pid)
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before).as_secs_f64() / seconds);

    ring.stop().await;
    stop.store(true, Ordering::Relaxed);
    for (locker, _, held) in services {
        for handle in held {
            let _ = handle.release().await;
        }
        locker.close().await;
    }
    background.abort_all();
    while background.join_next().await.is_some() {}
    Ok(FleetRun {
        handoffs,
        events_per_client_per_s: events as f64 / n as f64 / seconds,
        etcd_cpu_share: cpu,
        seconds,
    })
}
