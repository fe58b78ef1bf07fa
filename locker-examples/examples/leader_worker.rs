//! A leader-elected worker: three replicas of one service campaign for `workers/ledger`; the
//! leader runs the work (recording jobs in a ledger), and only while it leads. The ledger is a
//! fenced resource: it keeps the highest fencing token it has seen and refuses a lower one.
//!
//! The leader is killed while a write it sent is still on its way; another replica takes over,
//! registers its token with the ledger, and goes on; the killed leader's late write then reaches
//! the ledger and is refused.
//!
//! Run it from the repository root, on the in-process memory backend or on a real etcd (the
//! `etcd` feature builds etcd-client, whose build script needs `protoc`):
//!
//! ```text
//! cargo run --example leader_worker
//! LOCKER_ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --features etcd --example leader_worker
//! ```

use std::error::Error;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use locker_core::{FencingGate, FencingToken, LeaderOptions, Stale, Tenure};
use locker_examples::{Reports, Store, Timeline};
use tokio::sync::watch;

const ELECTION: &str = "workers/ledger";
const TTL: Duration = Duration::from_secs(2);
/// How often the leader records a job.
const EVERY: Duration = Duration::from_millis(400);
/// How long a write takes to reach the ledger (a slow network).
const LATENCY: Duration = Duration::from_millis(900);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    run(&Store::from_env()?, &Timeline::start()).await
}

/// The fenced resource: a ledger of jobs that refuses writes with a token below one it accepted.
struct Ledger {
    gate: FencingGate,
    jobs: Mutex<Vec<String>>,
    t: Timeline,
}

impl Ledger {
    /// A new leader's first call, before it trusts what the ledger holds: from now on, writes of
    /// the leaders before it are refused.
    fn register(&self, who: &str, token: FencingToken) -> Result<(), Stale> {
        self.gate.check_and_bump(token)?;
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        self.t.say(
            "ledger",
            format!("{who} registered token {token} (jobs so far: {jobs})"),
        );
        Ok(())
    }

    /// Records a job, fenced by the writer's token.
    fn write(&self, token: FencingToken, job: &str) -> Result<(), Stale> {
        match self.gate.check_and_bump(token) {
            Ok(()) => {
                self.jobs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(job.to_owned());
                self.t
                    .say("ledger", format!("accepted {job} (token {token})"));
                Ok(())
            }
            Err(stale) => {
                self.t.say("ledger", format!("refused {job}: {stale}"));
                Err(stale)
            }
        }
    }
}

/// What the replicas tell the main flow.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    /// A replica leads with this token, registered with the ledger.
    Leads(String, FencingToken),
    /// A write of this replica landed (accepted or not).
    Landed(String, bool),
}

/// Three replicas; the first leader is killed, another takes over, the killed one's late write
/// is refused. Everything that happens is told on `t`.
pub(crate) async fn run(store: &Store, t: &Timeline) -> Result<(), Box<dyn Error>> {
    t.say(
        "setup",
        format!("three replicas on {}, lease TTL {TTL:?}", store.describe()),
    );
    let ledger = Arc::new(Ledger {
        gate: FencingGate::new(),
        jobs: Mutex::default(),
        t: t.clone(),
    });
    let (tx, mut reports) = Reports::channel();
    let (shutdown, stop) = watch::channel(false);
    let mut replicas = Vec::new();
    for name in ["replica-1", "replica-2", "replica-3"] {
        let locker = store.process(TTL).await?;
        let (ledger, t, tx, mut stop) = (ledger.clone(), t.clone(), tx.clone(), stop.clone());
        let options = LeaderOptions::new().until(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        });
        replicas.push((
            name,
            tokio::spawn(async move {
                locker
                    .run_while_leader(ELECTION, name, options, |term| {
                        work(name, term, ledger.clone(), t.clone(), tx.clone())
                    })
                    .await
            }),
        ));
    }

    // The first leader works for a while: its writes are accepted.
    let Report::Leads(first, token) = next_leader(&mut reports).await? else {
        unreachable!()
    };
    reports
        .wait_for(&Report::Landed(first.clone(), true))
        .await?;

    let at = replicas
        .iter()
        .position(|(name, _)| *name == first)
        .ok_or("no such replica")?;
    let (killed, task) = replicas.remove(at);
    t.say(
        killed,
        "is killed (its task aborted): a write it sent is still on its way",
    );
    task.abort();

    let Report::Leads(next, next_token) = next_leader(&mut reports).await? else {
        unreachable!()
    };
    t.say(&next, format!("took over (token {next_token} > {token})"));
    // The killed leader's write in flight lands now, and is refused.
    reports
        .wait_for(&Report::Landed(killed.to_owned(), false))
        .await?;
    reports
        .wait_for(&Report::Landed(next.clone(), true))
        .await?;

    t.say("setup", "shutting the replicas down");
    shutdown.send_replace(true);
    for (_, task) in replicas {
        task.await??;
    }
    let jobs = ledger
        .jobs
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    t.say(
        "done",
        format!("the ledger holds {jobs} jobs, none written after its writer lost the lead"),
    );
    Ok(())
}

/// Waits for the next report of a leader, passing over the others.
async fn next_leader(reports: &mut Reports<Report>) -> Result<Report, String> {
    loop {
        if let report @ Report::Leads(..) = reports.next().await? {
            return Ok(report);
        }
    }
}

/// One term of a replica's work: registers its token with the ledger, then records a job every
/// [`EVERY`]; each write takes [`LATENCY`] to reach the ledger, and once sent it goes on even if
/// the term ends (run_while_leader cancels this future, not a request already on the wire).
async fn work(
    who: &'static str,
    term: Tenure,
    ledger: Arc<Ledger>,
    t: Timeline,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
) -> Result<(), Stale> {
    let token = term.token();
    t.say(who, format!("leads {ELECTION} (token {token})"));
    ledger.register(who, token)?;
    let _ = reports.send(Report::Leads(who.to_owned(), token));
    for n in 1.. {
        let job = format!("job-{n} of {who}");
        let (ledger, reports) = (ledger.clone(), reports.clone());
        tokio::spawn(async move {
            tokio::time::sleep(LATENCY).await;
            let accepted = ledger.write(token, &job).is_ok();
            let _ = reports.send(Report::Landed(who.to_owned(), accepted));
        });
        tokio::time::sleep(EVERY).await;
    }
    Ok(())
}
