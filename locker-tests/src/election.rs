//! The behaviours of leader election, one `pub async fn` each: campaign, proclaim, resign,
//! leader, observe, and `run_while_leader`. Run on every backend by
//! [`conformance_suite!`](crate::conformance_suite) in a module `election`.

use std::future::Future;
use std::time::Duration;

use locker_core::{
    Error, FencingToken, LeaderOptions, Leadership, Locker, LossReason, Ownership, StopWork, Tenure,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

use crate::harness::{Cut, Harness};
use crate::suite::{PATIENCE, TTL, next_holder, queue_len};

/// The behaviours of this module, in the order the macro runs them.
pub const BEHAVIOURS: &[&str] = &[
    "a_campaign_leads_once_the_leader_before_it_resigns",
    "leader_and_observe_follow_leaders_and_proclaims",
    "a_proclaim_after_the_term_ended_is_refused",
    "run_while_leader_runs_the_work_per_term_and_cancels_it_at_the_loss",
    "run_while_leader_stops_the_work_before_the_loss_says_why",
    "run_while_leader_stops_the_work_when_unconfirmed",
    "run_while_leader_keeps_the_work_through_unconfirmed_when_told",
    "run_while_leader_resigns_and_campaigns_again_after_the_work_fails",
    "run_while_leader_resigns_at_shutdown",
];

/// A second candidate waits while the first leads, and leads (with a greater token) once the
/// first resigns.
pub async fn a_campaign_leads_once_the_leader_before_it_resigns(h: &dyn Harness) {
    let name = h.key("election");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let first = a.campaign(name.clone(), "a").await.expect("campaign");
    assert!(first.is_leader());
    assert_eq!(first.name(), name);
    assert_eq!(first.value(), b"a");
    let second = spawn_campaign(b, &name, "b");
    queue_len(h, &name, 2).await;
    assert!(!second.is_finished(), "b leads while a does");
    let token = first.token();
    first.resign().await.expect("resign");
    let second = leads(second).await;
    assert!(second.token() > token);
    assert_eq!(second.fence().token(), second.token());
    second.resign().await.expect("resign");
}

/// `leader` reads the leader once; `observe` yields the current leader, then every change of
/// leader or value, and `None` when there is none.
pub async fn leader_and_observe_follow_leaders_and_proclaims(h: &dyn Harness) {
    let name = h.key("observed");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let observer = h.client().await.locker(TTL);
    let mut leaders = observer.observe(&name).expect("observe");
    assert_eq!(next_holder(&mut leaders).await, None);
    assert_eq!(observer.leader(&name).await.expect("leader"), None);

    let first = a
        .campaign(name.clone(), "10.0.0.1")
        .await
        .expect("campaign");
    let seen = next_holder(&mut leaders).await.expect("a leader");
    assert_eq!(seen.value_str(), Some("10.0.0.1"));
    assert_eq!(seen.token, first.token());
    let leader = observer.leader(&name).await.expect("leader").expect("led");
    assert_eq!(leader, seen);

    first.proclaim("10.0.0.2").await.expect("proclaim");
    assert_eq!(first.value(), b"10.0.0.2");
    let seen = next_holder(&mut leaders).await.expect("a leader");
    assert_eq!(seen.value_str(), Some("10.0.0.2"));
    assert_eq!(seen.token, first.token(), "the same term");

    let waiting = spawn_campaign(b, &name, "10.0.0.3");
    queue_len(h, &name, 2).await;
    first.resign().await.expect("resign");
    let seen = next_holder(&mut leaders).await.expect("the next leader");
    assert_eq!(seen.value_str(), Some("10.0.0.3"));
    let second = leads(waiting).await;
    assert_eq!(seen.token, second.token());
    second.resign().await.expect("resign");
    assert_eq!(next_holder(&mut leaders).await, None);
}

/// A leadership whose term ended (its entry deleted by an operator) cannot proclaim: the
/// observers keep seeing what the store has.
pub async fn a_proclaim_after_the_term_ended_is_refused(h: &dyn Harness) {
    let name = h.key("deposed");
    let a = h.client().await.locker(TTL);
    let leadership = a.campaign(name.clone(), "old").await.expect("campaign");
    let entry = h.entries(&name).await.remove(0);
    h.delete_key(&entry.key).await;
    assert_eq!(
        timeout(PATIENCE, leadership.lost()).await.expect("in time"),
        LossReason::EntryDeleted
    );
    let refused = leadership.proclaim("new").await;
    assert!(
        matches!(refused, Err(Error::NotOwned { .. } | Error::Closed { .. })),
        "{refused:?}"
    );
    assert_eq!(a.leader(&name).await.expect("leader"), None);
    assert_eq!(leadership.value(), b"old");
}

/// What a term's work reports: it started with this token, or its future was dropped while its
/// tenure stood so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Started(FencingToken),
    Dropped(FencingToken, Stood),
}

/// Where a tenure stood when its work was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stood {
    Owned,
    Unconfirmed,
    /// Not owned, its loss not yet said ([`Ownership::Ending`]).
    Ending,
    NotOwned,
}

/// Sends `Dropped` when the work's future is dropped (cancelled, or ended).
struct OnDrop(mpsc::UnboundedSender<Work>, Tenure);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let stood = match self.1.ownership() {
            Ownership::Owned { .. } => Stood::Owned,
            Ownership::Unconfirmed { .. } => Stood::Unconfirmed,
            Ownership::Ending { .. } => Stood::Ending,
            _ => Stood::NotOwned,
        };
        let _ = self.0.send(Work::Dropped(self.1.token(), stood));
    }
}

async fn next_work(reports: &mut mpsc::UnboundedReceiver<Work>) -> Work {
    timeout(PATIENCE, reports.recv())
        .await
        .expect("the work reports in time")
        .expect("the work reports")
}

/// Work that reports its start and its end, and runs until cancelled.
fn endless_work(
    reports: mpsc::UnboundedSender<Work>,
) -> impl FnMut(Tenure) -> futures::future::BoxFuture<'static, Result<(), Error>> {
    move |term| {
        let reports = reports.clone();
        Box::pin(async move {
            let _report = OnDrop(reports.clone(), term.clone());
            let _ = reports.send(Work::Started(term.token()));
            std::future::pending::<()>().await;
            Ok(())
        })
    }
}

/// The first `Started` report: the token of the term.
async fn started(reports: &mut mpsc::UnboundedReceiver<Work>) -> FencingToken {
    match next_work(reports).await {
        Work::Started(token) => token,
        other => panic!("the work did not start: {other:?}"),
    }
}

/// `run_while_leader` of a locker in a task of its own, until [`Running::stop`].
struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<locker_core::Result<()>>,
}

/// Runs `work` while `locker` leads `name` (with `options`, and a shutdown of the test's).
fn run_leader<W, F, E>(locker: &Locker, name: &str, options: LeaderOptions, work: W) -> Running
where
    W: FnMut(Tenure) -> F + Send + 'static,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let (stop, until) = oneshot::channel::<()>();
    let (locker, name) = (locker.clone(), name.to_owned());
    let options = options.until(async move {
        let _ = until.await;
    });
    let task = tokio::spawn(async move { locker.run_while_leader(name, "a", options, work).await });
    Running { stop, task }
}

impl Running {
    /// Shuts it down, and waits until `run_while_leader` returned `Ok`.
    async fn stop(self) {
        let _ = self.stop.send(());
        timeout(PATIENCE, self.task)
            .await
            .expect("returns in time")
            .expect("ran")
            .expect("run_while_leader");
    }
}

/// `locker` campaigns for `name` in a task of its own.
fn spawn_campaign(
    locker: Locker,
    name: &str,
    value: &'static str,
) -> tokio::task::JoinHandle<locker_core::Result<Leadership>> {
    let name = name.to_owned();
    tokio::spawn(async move { locker.campaign(name, value).await })
}

/// Waits for a spawned campaign to lead.
async fn leads(campaign: tokio::task::JoinHandle<locker_core::Result<Leadership>>) -> Leadership {
    timeout(PATIENCE, campaign)
        .await
        .expect("leads in time")
        .expect("the campaign ran")
        .expect("campaign")
}

/// The work runs once per term, with the term's token; a loss (an operator deletes the
/// leader's entry) cancels it at once, and the candidate leads again with a greater token,
/// running the work again.
pub async fn run_while_leader_runs_the_work_per_term_and_cancels_it_at_the_loss(h: &dyn Harness) {
    let name = h.key("worker");
    let a = h.client().await.locker(TTL);
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let run = run_leader(&a, &name, LeaderOptions::new(), endless_work(reports_tx));
    let first = started(&mut reports).await;
    let entry = h.entries(&name).await.remove(0);
    assert_eq!(entry.create_revision, first.as_i64(), "the term's token");
    h.delete_key(&entry.key).await;
    let dropped = next_work(&mut reports).await;
    assert!(
        matches!(dropped, Work::Dropped(t, Stood::Ending | Stood::NotOwned) if t == first),
        "{dropped:?}"
    );
    let second = started(&mut reports).await;
    assert!(second > first);
    run.stop().await;
    assert_eq!(
        next_work(&mut reports).await,
        Work::Dropped(second, Stood::Owned),
        "the work is dropped before the resignation"
    );
}

/// The work stops the moment the leader's entry is gone, before the loss is told with its reason
/// (the lookup of its lease, here slowed down, is still on its way): no work runs while another
/// may lead.
pub async fn run_while_leader_stops_the_work_before_the_loss_says_why(h: &dyn Harness) {
    let name = h.key("prompt");
    let client = h.client().await;
    let a = client.locker(TTL);
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let options = LeaderOptions::new().stop_work(StopWork::AtLoss);
    let run = run_leader(&a, &name, options, endless_work(reports_tx));
    let first = started(&mut reports).await;
    // Calls now take a while (keep-alives are still answered well within a third of the TTL).
    client.faults.set_latency(TTL / 5).await;
    let entry = h.entries(&name).await.remove(0);
    h.delete_key(&entry.key).await;
    assert_eq!(
        next_work(&mut reports).await,
        Work::Dropped(first, Stood::Ending),
        "the work ran on until the loss was told"
    );
    client.faults.set_latency(Duration::ZERO).await;
    let second = started(&mut reports).await;
    assert!(second > first);
    run.stop().await;
}

/// With the default ([`StopWork::WhenUnconfirmed`]), a leader cut off from the store has its work
/// cancelled as soon as it is unconfirmed, before its local deadline; it leads again once the
/// store is back.
pub async fn run_while_leader_stops_the_work_when_unconfirmed(h: &dyn Harness) {
    let name = h.key("cautious");
    let client = h.client().await;
    let a = client.locker(TTL);
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let run = run_leader(&a, &name, LeaderOptions::new(), endless_work(reports_tx));
    let first = started(&mut reports).await;
    client.faults.cut(Cut::Hang).await;
    assert_eq!(
        next_work(&mut reports).await,
        Work::Dropped(first, Stood::Unconfirmed),
        "the work is cancelled while unconfirmed, before the loss"
    );
    client.faults.heal().await;
    let second = started(&mut reports).await;
    assert!(second > first);
    run.stop().await;
}

/// With [`StopWork::AtLoss`], a stall of keep-alives shorter than the deadline (the leader is
/// `Unconfirmed` for a while, as the work sees through its tenure) does not cancel the work.
pub async fn run_while_leader_keeps_the_work_through_unconfirmed_when_told(h: &dyn Harness) {
    let name = h.key("steady");
    let client = h.client().await;
    let a = client.locker(TTL);
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (unconfirmed_tx, mut unconfirmed) = mpsc::unbounded_channel();
    let options = LeaderOptions::new().stop_work(StopWork::AtLoss);
    let run = run_leader(&a, &name, options, move |term| {
        let reports = reports_tx.clone();
        let unconfirmed = unconfirmed_tx.clone();
        async move {
            let _report = OnDrop(reports.clone(), term.clone());
            let _ = reports.send(Work::Started(term.token()));
            loop {
                if matches!(term.ownership(), Ownership::Unconfirmed { .. }) {
                    let _ = unconfirmed.send(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        }
    });
    let first = started(&mut reports).await;
    client.faults.cut(Cut::Hang).await;
    timeout(PATIENCE, unconfirmed.recv())
        .await
        .expect("the work sees the leadership unconfirmed in time")
        .expect("the work runs");
    client.faults.heal().await;
    // Healed before the deadline: the term goes on, and so does its work.
    tokio::time::sleep(TTL).await;
    assert!(
        reports.try_recv().is_err(),
        "the work was cancelled although the term went on"
    );
    let now = a.get(&name).await.expect("get").expect("still led");
    assert_eq!(now.token, first, "the same term");
    run.stop().await;
    assert_eq!(
        next_work(&mut reports).await,
        Work::Dropped(first, Stood::Owned)
    );
}

/// Work that fails is not retried in a loop on the spot: the leadership is resigned (another
/// candidate leads), and this one campaigns again.
pub async fn run_while_leader_resigns_and_campaigns_again_after_the_work_fails(h: &dyn Harness) {
    let name = h.key("failing");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let run = run_leader(&a, &name, LeaderOptions::new(), move |term| {
        let started = started_tx.clone();
        async move {
            let _ = started.send(term.token());
            Err::<(), _>(std::io::Error::other("the work failed"))
        }
    });
    let first = timeout(PATIENCE, started.recv())
        .await
        .expect("in time")
        .expect("started");
    // b campaigns while a leads: a's failed work hands the leadership over.
    let b_leads = b.campaign(name.clone(), "b").await.expect("campaign");
    assert!(b_leads.token() > first);
    let entries = h.entries(&name).await;
    assert!(entries.len() <= 2, "{entries:?}");
    b_leads.resign().await.expect("resign");
    let again = timeout(PATIENCE, started.recv())
        .await
        .expect("in time")
        .expect("started again");
    assert!(again > first);
    run.stop().await;
}

/// At shutdown the work is cancelled and the leadership resigned: the next candidate leads at
/// once, and nothing of this one is left.
pub async fn run_while_leader_resigns_at_shutdown(h: &dyn Harness) {
    let name = h.key("shutdown");
    let a = h.client().await.locker(TTL);
    let b = h.client().await.locker(TTL);
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let run = run_leader(&a, &name, LeaderOptions::new(), endless_work(reports_tx));
    let first = started(&mut reports).await;
    let waiting = spawn_campaign(b, &name, "b");
    queue_len(h, &name, 2).await;
    run.stop().await;
    assert_eq!(
        next_work(&mut reports).await,
        Work::Dropped(first, Stood::Owned)
    );
    let next = leads(waiting).await;
    assert!(next.token() > first);
    assert_eq!(h.entries(&name).await.len(), 1, "a left nothing");
    next.resign().await.expect("resign");
}
