//! `locker-bench`: the benchmarks of issue 5, our client side by side with plain `etcd-client`
//! baselines on the same etcd, in the same run.
//!
//! ```text
//! cargo run --release -p locker-bench -- [--quick] [--json FILE] [--only NAME[,NAME..]]
//! ```
//!
//! It starts its own etcd from the `etcd` binary (`LOCKER_ETCD_BIN`, else `PATH`) **with fsync
//! on** (the test harness's `--unsafe-no-fsync` is overridden by `--unsafe-no-fsync=false`, the
//! last flag wins), or uses `LOCKER_ETCD_ENDPOINTS`. Results and the reading of them are in
//! `BENCHMARKS.md` at the root of the workspace.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::Client;
use locker_core::LockBackend;
use locker_etcd::EtcdBackend;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

mod counting;
mod raw;
mod scenarios;
mod stats;

use counting::Counts;
use locker_tests::RecordingBackend;
use stats::{Outcome, Value};

/// Counts every allocation, for the client memory per held lock (`many_locks`).
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// The allocator's counters now.
pub(crate) fn alloc_stats() -> stats_alloc::Stats {
    INSTRUMENTED_SYSTEM.stats()
}

pub(crate) type BenchError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type BenchResult<T> = Result<T, BenchError>;

/// Every scenario, in the order of the issue's table.
const SCENARIOS: [&str; 12] = [
    "acquire_release",
    "lock_rpc",
    "handoff_1",
    "handoff_2",
    "handoff_8",
    "contended_8",
    "watch_latency",
    "failover",
    "many_locks",
    "watchers",
    "memory_backend",
    "fleet",
];

const USAGE: &str = "\
usage: locker-bench [--quick] [--json FILE] [--only NAME[,NAME..]]

  --quick      fewer samples and shorter holds: the whole run takes under a minute
  --json FILE  also write the results, one object per scenario, to FILE
  --only NAMES run only these scenarios (comma-separated)

etcd: started from the etcd binary (LOCKER_ETCD_BIN, else PATH) with fsync on, on free loopback
ports; or an existing one from LOCKER_ETCD_ENDPOINTS=http://host:2379[,..].
RUST_LOG sets the log filter (default: error).";

#[derive(Debug, Default)]
struct Args {
    quick: bool,
    json: Option<String>,
    only: Option<Vec<String>>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--json" => args.json = Some(it.next().ok_or("--json needs a file name")?),
            "--only" => {
                let names: Vec<String> = it
                    .next()
                    .ok_or("--only needs scenario names")?
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = names.iter().find(|n| !SCENARIOS.contains(&n.as_str())) {
                    return Err(format!(
                        "unknown scenario {bad:?}; the scenarios are: {}",
                        SCENARIOS.join(", ")
                    ));
                }
                args.only.get_or_insert_with(Vec::new).extend(names);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// What every scenario needs: where etcd is, how long to run, a unique key root for this run.
pub(crate) struct Env {
    endpoints: Vec<String>,
    /// The PID of the etcd the bench started (`None` for `LOCKER_ETCD_ENDPOINTS`).
    pub(crate) etcd_pid: Option<u32>,
    quick: bool,
    run: String,
}

impl Env {
    /// `full` in a full run, `quick` with `--quick`.
    pub(crate) fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// The key root of one side of a scenario: `bench/<run>/<scenario>/<side>/`.
    pub(crate) fn prefix(&self, scenario: &str, side: &str) -> String {
        format!("bench/{}/{scenario}/{side}/", self.run)
    }

    /// Our backend on a connection of its own under `prefix`, counting the calls core makes.
    pub(crate) async fn ours(
        &self,
        prefix: &str,
    ) -> BenchResult<(Arc<dyn LockBackend>, Arc<Counts>)> {
        let backend = EtcdBackend::builder()
            .endpoints(self.endpoints.clone())
            .prefix(prefix)
            .connect()
            .await?;
        let recording = RecordingBackend::new(Arc::new(backend), locker_tests::LeaseLog::default());
        let counts = recording.counts();
        Ok((Arc::new(recording), counts))
    }

    /// A plain etcd client on a connection of its own.
    pub(crate) async fn raw(&self) -> BenchResult<Client> {
        let mut client = Client::connect(self.endpoints.clone(), None).await?;
        client.status().await?;
        Ok(client)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Compacts etcd's history up to its current revision, waiting for the compaction to apply.
pub(crate) async fn compact(client: &mut Client) -> BenchResult<()> {
    let revision = client
        .get("bench/", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    if revision > 1 {
        let options = etcd_client::CompactionOptions::new().with_physical();
        match client.compact(revision, Some(options)).await {
            // Nothing was written since the last compaction.
            Err(err) if err.to_string().contains("compacted") => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

async fn run_one(env: &Env, name: &str) -> BenchResult<Outcome> {
    match name {
        "acquire_release" => scenarios::acquire_release(env).await,
        "lock_rpc" => scenarios::lock_rpc(env).await,
        "handoff_1" => scenarios::handoff(env, 1).await,
        "handoff_2" => scenarios::handoff(env, 2).await,
        "handoff_8" => scenarios::handoff(env, 8).await,
        "contended_8" => scenarios::contended(env).await,
        "watch_latency" => scenarios::watch_latency(env).await,
        "failover" => scenarios::failover(env).await,
        "many_locks" => scenarios::many_locks(env).await,
        "watchers" => scenarios::watchers(env).await,
        "memory_backend" => scenarios::memory_backend(env).await,
        "fleet" => scenarios::fleet(env).await,
        other => Err(format!("unknown scenario {other}").into()),
    }
}

/// `handoff_8 ÷ handoff_1`, added to `handoff_8` when both ran: the cost of more waiters (a herd
/// would make it grow with the number of waiters).
fn herd_ratio(outcomes: &mut [Outcome]) {
    let find = |outcomes: &[Outcome], name: &str| {
        outcomes
            .iter()
            .position(|o| o.name == name)
            .map(|i| outcomes[i].clone())
    };
    let (Some(one), Some(_)) = (find(outcomes, "handoff_1"), find(outcomes, "handoff_8")) else {
        return;
    };
    let Some(eight) = outcomes.iter_mut().find(|o| o.name == "handoff_8") else {
        return;
    };
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let p50 = div(eight.ours.p50_us, one.ours.p50_us);
    let p99 = div(eight.ours.p99_us, one.ours.p99_us);
    let base = |o: &Outcome| o.baseline.as_ref().map(|(_, m)| *m).unwrap_or_default();
    let (base_one, base_eight) = (base(&one), base(eight));
    let base_p50 = div(base_eight.p50_us, base_one.p50_us).unwrap_or(f64::NAN);
    let base_p99 = div(base_eight.p99_us, base_one.p99_us).unwrap_or(f64::NAN);
    if let (Some(p50), Some(p99)) = (p50, p99) {
        eight.extra("over_handoff_1_p50", p50);
        eight.extra("over_handoff_1_p99", p99);
        eight.extra("raw_over_handoff_1_p50", base_p50);
        eight.extra("raw_over_handoff_1_p99", base_p99);
        eight.also_require("8/1 p50, p99 <= 1.3", p50 <= 1.3 && p99 <= 1.3);
        eight.note(format!(
            "handoff_8 / handoff_1: p50 {p50:.2}, p99 {p99:.2} (target <= 1.3: no herd); the raw \
             baseline's: p50 {base_p50:.2}, p99 {base_p99:.2}"
        ));
    }
}

async fn run(args: Args) -> BenchResult<bool> {
    let process;
    let mut etcd_pid = None;
    let (endpoints, fsync) = match std::env::var("LOCKER_ETCD_ENDPOINTS") {
        Ok(list) => {
            let endpoints: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect();
            (
                endpoints,
                "unknown (an existing etcd from LOCKER_ETCD_ENDPOINTS)",
            )
        }
        Err(_) => {
            // The harness starts etcd with `--unsafe-no-fsync`; a later `=false` turns fsync
            // back on (Go flags: the last one wins). Checked with strace: ~1.75 fdatasync per
            // put with it, none without.
            process = locker_etcd::testing::EtcdProcess::start_with_args(&[
                "--unsafe-no-fsync=false",
            ])
            .await
            .map_err(|err| {
                format!(
                    "cannot start etcd ({err}); install it (apt-get install etcd-server), set \
                     LOCKER_ETCD_BIN, or point LOCKER_ETCD_ENDPOINTS at a running etcd"
                )
            })?;
            etcd_pid = process.pid();
            (process.endpoints(), "on (--unsafe-no-fsync=false)")
        }
    };
    let mut status_client = Client::connect(endpoints.clone(), None).await?;
    let etcd_version = status_client.status().await?.version().to_owned();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    let env = Env {
        endpoints,
        etcd_pid,
        quick: args.quick,
        run: format!("{}-{nanos:x}", std::process::id()),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = load_average();
    eprintln!(
        "locker-bench: etcd {etcd_version} (fsync {fsync}), {cores} cores, load {load_before}{}",
        if args.quick { ", --quick" } else { "" }
    );

    let names: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|n| {
            args.only
                .as_ref()
                .is_none_or(|only| only.iter().any(|o| o == n))
        })
        .collect();
    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for name in names {
        eprint!("  {name:<16} ... ");
        let t = std::time::Instant::now();
        match run_one(&env, name).await {
            Ok(mut outcome) => {
                outcome.seconds = t.elapsed().as_secs_f64();
                eprintln!(
                    "{:.1} s, ratio {}",
                    outcome.seconds,
                    outcome
                        .ratio
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
                );
                outcomes.push(outcome);
            }
            Err(err) => {
                eprintln!("FAILED: {err}");
                failed.push(format!("{name}: {err}"));
            }
        }
        // Let the scenario's background work (revokes, deletes) finish, then compact etcd's
        // history so that every scenario starts from a similar store.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Err(err) = compact(&mut status_client).await {
            eprintln!("  (compaction failed: {err})");
        }
    }
    herd_ratio(&mut outcomes);
    let load_after = load_average();
    let total = started.elapsed().as_secs_f64();

    println!(
        "\netcd {etcd_version}, fsync {fsync}; {cores} cores; load average before {load_before}, \
         after {load_after}; {total:.0} s{}\n",
        if args.quick { " (--quick)" } else { "" }
    );
    println!("{}", stats::table(&outcomes));
    println!(
        "ratio: latency ours / baseline (lower is better); thr = ours ops/s / baseline ops/s (higher is better)."
    );
    for o in &outcomes {
        for note in &o.notes {
            println!("- {}: {note}", o.name);
        }
    }
    if let Some(path) = &args.json {
        let run = vec![
            (
                "etcd_version".to_owned(),
                Value::from(etcd_version.as_str()),
            ),
            ("fsync".to_owned(), Value::from(fsync)),
            ("cores".to_owned(), Value::from(cores)),
            ("quick".to_owned(), Value::from(args.quick)),
            ("load_before".to_owned(), Value::from(load_before.as_str())),
            ("load_after".to_owned(), Value::from(load_after.as_str())),
        ];
        std::fs::write(path, stats::json(&outcomes, &run))
            .map_err(|err| format!("cannot write {path}: {err}"))?;
        eprintln!("wrote {path}");
    }
    for f in &failed {
        eprintln!("failed: {f}");
    }
    Ok(failed.is_empty())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("locker-bench: {message}\n");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("locker-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("locker-bench: {err}");
            ExitCode::FAILURE
        }
    }
}
