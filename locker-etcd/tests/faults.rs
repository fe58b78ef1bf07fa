//! Fault behaviours on a real three-node etcd cluster (one cluster per test, three processes on
//! loopback): leader killed or frozen, the whole cluster down past the TTL, restarts, a client cut
//! off, compaction, a holder that dies, cancelled waiters, restarts (one member, all, rolling) of
//! an authenticated cluster in plain HTTP and over mutual TLS; and on a single etcd of the test's
//! own, frozen whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use locker_core::{LockBackend, Locker, Ownership};
use locker_etcd::EtcdBackend;
use locker_etcd::testing::{
    EtcdCluster, EtcdProcess, LinkState, Proxy, enable_auth, unique_prefix,
};
use locker_tests::record::{self, TenureLog};
use locker_tests::suite::{PATIENCE, eventually, next_holder, owned};
use tokio::time::{Instant, sleep, timeout};

const TTL: Duration = Duration::from_secs(2);

/// A cluster and everything a test needs on it.
struct Bed {
    cluster: EtcdCluster,
    prefix: String,
}

/// A client's link to every member, through one proxy each.
struct Link(Vec<Proxy>);

impl Link {
    fn set(&self, state: LinkState) {
        for proxy in &self.0 {
            proxy.set(state);
        }
    }
}

impl Bed {
    async fn new(name: &str) -> Bed {
        locker_tests::init_logging();
        let cluster = EtcdCluster::start(3).await.expect("a three-node cluster");
        Bed {
            cluster,
            prefix: format!("locker-faults/{}", unique_prefix(name)),
        }
    }

    async fn backend_on(&self, endpoints: Vec<String>) -> EtcdBackend {
        EtcdBackend::builder()
            .endpoints(endpoints)
            .prefix(self.prefix.clone())
            .request_timeout(Duration::from_millis(700))
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connect to the cluster")
    }

    /// A locker straight on the cluster's members.
    async fn locker(&self) -> Locker {
        let backend = self.backend_on(self.cluster.endpoints()).await;
        locker(Arc::new(backend))
    }

    /// A locker whose link to every member can be cut.
    async fn locker_with_link(&self) -> (Locker, Link) {
        let mut proxies = Vec::new();
        for endpoint in self.cluster.endpoints() {
            let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
            proxies.push(Proxy::start(addr).await.unwrap());
        }
        let backend = self
            .backend_on(proxies.iter().map(Proxy::endpoint).collect())
            .await;
        (locker(Arc::new(backend)), Link(proxies))
    }

    /// Entries and leases of this test left in the cluster (every lease of its lockers has a
    /// TTL of at most `max_ttl`).
    async fn assert_clean(&self) {
        self.assert_clean_within(TTL).await;
    }

    async fn assert_clean_within(&self, max_ttl: Duration) {
        let mut client = self.cluster.client().await.expect("an etcd client");
        eventually("the test's keys are gone", || {
            let mut client = client.clone();
            let prefix = self.prefix.clone();
            async move {
                let options = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only();
                client
                    .get(prefix, Some(options))
                    .await
                    .is_ok_and(|r| r.count() == 0)
            }
        })
        .await;
        let leases = client.leases().await.expect("list leases");
        // Leases of closed lockers are revoked; abandoned ones expire within the TTL.
        for lease in leases.leases() {
            let ttl = client.lease_time_to_live(lease.id(), None).await.unwrap();
            assert!(
                ttl.granted_ttl() <= max_ttl.as_secs() as i64,
                "a lease not made by this test: {ttl:?}"
            );
        }
        eventually("every lease is gone", || {
            let mut client = client.clone();
            async move { client.leases().await.is_ok_and(|l| l.leases().is_empty()) }
        })
        .await;
    }
}

fn locker(backend: Arc<dyn LockBackend>) -> Locker {
    Locker::builder(backend)
        .ttl(TTL)
        .jitter_seed(7)
        .retry_delays(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .unwrap()
}

/// What happens to the leader.
#[derive(Clone, Copy)]
enum LeaderFault {
    Kill,
    Pause,
}

/// The leader suffers `fault` for twice the TTL while a lock is held and another client waits:
/// the holder keeps ownership, or reports it lost before anyone else owns; someone owns after.
async fn leader_fault_while_lock_held(name: &str, fault: LeaderFault) {
    let mut bed = Bed::new(name).await;
    let (a, b) = (bed.locker().await, bed.locker().await);
    let tenures = TenureLog::default();
    let ha = a.lock("k", "a").await.unwrap();
    tenures.follow(0, &ha);
    owned(&ha).await;
    let hb = b.lock("k", "b").await.unwrap();
    tenures.follow(1, &hb);
    let leader = bed.cluster.leader().await.expect("a leader");
    match fault {
        LeaderFault::Kill => bed.cluster.kill(leader).unwrap(),
        LeaderFault::Pause => bed.cluster.pause(leader).unwrap(),
    }
    sleep(TTL * 2).await;
    match fault {
        LeaderFault::Kill => bed.cluster.restart(leader).await.unwrap(),
        LeaderFault::Pause => bed.cluster.resume(leader).unwrap(),
    }
    eventually("someone owns k", || async {
        ha.is_owned() || hb.is_owned()
    })
    .await;
    assert!(tenures.assert_safe() >= 1);
    ha.release().await.unwrap();
    hb.release().await.unwrap();
    a.close().await;
    b.close().await;
    bed.assert_clean().await;
}

/// The leader is killed while a lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_lock_held() {
    leader_fault_while_lock_held("leader-killed", LeaderFault::Kill).await;
}

/// The leader is frozen (SIGSTOP) while a lock is held, then thawed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_paused_while_lock_held() {
    leader_fault_while_lock_held("leader-paused", LeaderFault::Pause).await;
}

/// A lock held on an etcd that freezes (SIGSTOP: it keeps its sockets, and answers and fails
/// nothing) is `Unconfirmed` before it is lost, and lost within the TTL although a request may
/// wait for 5 s (the default timeout); thawed, etcd answers again and the lock is owned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_etcd_shows_unconfirmed_before_loss() {
    locker_tests::init_logging();
    let etcd = EtcdProcess::start()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let prefix = format!("locker-faults/{}", unique_prefix("frozen"));
    let mut admin = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("an etcd client");
    // The default request timeout: longer than the TTL.
    let a = locker(Arc::new(etcd.backend(&prefix).await.unwrap()));
    let ha = a.lock("k", "a").await.unwrap();
    let first = owned(&ha).await;
    let states = record::states_until(&ha, move |state| {
        state.is_owned() && state.token() != Some(first)
    });
    let mut claimed = ha.subscribe();

    let frozen_at = Instant::now();
    etcd.pause().unwrap();
    timeout(PATIENCE, claimed.wait_for(|state| !state.is_owned()))
        .await
        .expect("lost in time")
        .unwrap();
    etcd.resume().unwrap();
    once_reachable(|| {
        let mut admin = admin.clone();
        async move {
            admin
                .status()
                .await
                .map_err(|e| locker_core::Error::unavailable(e.to_string()))
        }
    })
    .await;
    let second = owned(&ha).await;
    assert!(second > first);
    let seen = timeout(PATIENCE, states).await.unwrap().unwrap();
    let loss = record::assert_unconfirmed_before_loss(&seen, first);
    let lost_after = loss.lost_at.duration_since(frozen_at);
    assert!(
        lost_after < TTL,
        "still claimed ownership {lost_after:?} after etcd froze (TTL {TTL:?}); states: {}",
        record::describe(&seen)
    );
    let holder = once_reachable(|| a.get("k")).await;
    assert_eq!(holder.expect("held").token, second);
    ha.release().await.unwrap();
    a.close().await;
    eventually("nothing of the test is left", || {
        let mut admin = admin.clone();
        let prefix = prefix.clone();
        async move {
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            let keys = admin.get(prefix, Some(options)).await;
            let leases = admin.leases().await;
            keys.is_ok_and(|r| r.count() == 0) && leases.is_ok_and(|l| l.leases().is_empty())
        }
    })
    .await;
    admin.status().await.expect("etcd still answers");
}

/// The answer of `call`, tried again while it fails with a retryable error (after a restart the
/// client may still be reconnecting to a member), for at most [`PATIENCE`].
async fn once_reachable<T, Fut>(mut call: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = locker_core::Result<T>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Ok(answer) => return answer,
            Err(err) => assert!(err.is_retryable() && start.elapsed() < PATIENCE, "{err}"),
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// The whole cluster is down for longer than the TTL: the holder reports *not owned* before the
/// TTL has run out, and owns again once the cluster is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_down_longer_than_ttl() {
    let mut bed = Bed::new("cluster-down").await;
    let a = bed.locker().await;
    let ha = a.lock("k", "a").await.unwrap();
    let first = owned(&ha).await;
    let mut changes = ha.owned_changes();
    assert_eq!(changes.next().await, Some(true));
    let down_at = Instant::now();
    bed.cluster.stop_all().unwrap();
    assert_eq!(
        timeout(PATIENCE, changes.next()).await.unwrap(),
        Some(false)
    );
    let lost_after = down_at.elapsed();
    assert!(
        lost_after < TTL,
        "still claimed ownership {lost_after:?} after the store went away (TTL {TTL:?})"
    );
    assert!(!ha.is_owned());
    sleep(TTL).await;
    bed.cluster.restart_all().await.unwrap();
    let second = owned(&ha).await;
    assert!(second > first);
    // (The client may still be reconnecting to a member: a retryable error, tried again.)
    let holder = once_reachable(|| a.get("k")).await;
    assert_eq!(
        holder.expect("held").token,
        second,
        "the store agrees on the new tenure"
    );
    ha.release().await.unwrap();
    a.close().await;
    bed.assert_clean().await;
}

/// The whole cluster restarts quickly (data kept): the session survives, and a watch resumes
/// with no change missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_restart_keeps_sessions_and_watches() {
    let mut bed = Bed::new("restart").await;
    let backend = bed.backend_on(bed.cluster.endpoints()).await;
    // A longer TTL, so that the session outlives the restart.
    let a = Locker::builder(Arc::new(backend))
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let w = bed.locker().await;
    let mut stream = w.watch("k").unwrap();
    assert_eq!(next_holder(&mut stream).await, None);
    let guard = a.acquire("k", "v1").await.unwrap();
    assert_eq!(
        next_holder(&mut stream).await.unwrap().value_str(),
        Some("v1")
    );
    bed.cluster.stop_all().unwrap();
    bed.cluster.restart_all().await.unwrap();
    // The same tenure goes on; changes after the restart reach the watch in order. (The client
    // may still be reconnecting: set_value answers that as a retryable error.)
    once_reachable(|| guard.set_value("v2")).await;
    assert!(guard.is_owned());
    let seen = next_holder(&mut stream).await.unwrap();
    assert_eq!((seen.value_str(), seen.token), (Some("v2"), guard.token()));
    guard.release().await.unwrap();
    assert_eq!(next_holder(&mut stream).await, None);
    a.close().await;
    w.close().await;
    bed.assert_clean_within(Duration::from_secs(10)).await;
}

/// A holder cut off from every member past the TTL reports the loss before the waiter owns; once
/// healed it owns again, and its watch, resumed, saw every holder in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cut_off_and_healed() {
    let bed = Bed::new("cut").await;
    let (a, link) = bed.locker_with_link().await;
    let b = bed.locker().await;
    let tenures = TenureLog::default();
    let ha = a.lock("k", "a").await.unwrap();
    tenures.follow(0, &ha);
    owned(&ha).await;
    let mut a_watch = a.watch("k").unwrap();
    assert_eq!(
        next_holder(&mut a_watch).await.unwrap().value_str(),
        Some("a")
    );
    let hb = b.lock("k", "b").await.unwrap();
    tenures.follow(1, &hb);
    link.set(LinkState::BlackHole);
    owned(&hb).await;
    assert!(!ha.is_owned());
    hb.set_value("b2").await.unwrap();
    link.set(LinkState::Up);
    // a's watch resumes where it stopped: b, then b2, in order. If it noticed the cut-off (its
    // probe of the store went unanswered), it reads the queue afresh once healed, and yields the
    // holder from that read: b2 (b was held while it could not hear).
    let mut values = Vec::new();
    while values.last().map(String::as_str) != Some("b2") {
        if let Some(holder) = next_holder(&mut a_watch).await {
            values.push(holder.value_str().unwrap().to_owned());
        }
    }
    assert!(values == ["b", "b2"] || values == ["b2"], "{values:?}");
    hb.release().await.unwrap();
    owned(&ha).await;
    eventually("a's new tenure is recorded", || async {
        tenures.all().len() >= 3
    })
    .await;
    tenures.assert_safe();
    ha.release().await.unwrap();
    drop(a_watch);
    a.close().await;
    b.close().await;
    bed.assert_clean().await;
}

/// A watch whose client was cut off while history it needed was compacted reports the current
/// holder once healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_across_compaction() {
    let bed = Bed::new("compaction").await;
    let (w, link) = bed.locker_with_link().await;
    let a = bed.locker().await;
    let mut stream = w.watch("k").unwrap();
    assert_eq!(next_holder(&mut stream).await, None);
    link.set(LinkState::Cut);
    for round in 0..3 {
        let guard = a.acquire("k", format!("r{round}")).await.unwrap();
        guard.release().await.unwrap();
    }
    let guard = a.acquire("k", "current").await.unwrap();
    let mut admin = bed.cluster.client().await.expect("an etcd client");
    let revision = admin
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    admin.compact(revision, None).await.unwrap();
    link.set(LinkState::Up);
    loop {
        let holder = next_holder(&mut stream).await;
        if holder.as_ref().and_then(|h| h.value_str()) == Some("current") {
            assert_eq!(holder.unwrap().token, guard.token());
            break;
        }
    }
    guard.release().await.unwrap();
    assert_eq!(next_holder(&mut stream).await, None);
    drop(stream);
    w.close().await;
    a.close().await;
    bed.assert_clean().await;
}

/// A holder whose process dies without releasing (its runtime stops dead: no revoke, no delete)
/// is replaced by a waiter within the TTL and a few round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_dies_without_releasing() {
    let bed = Arc::new(Bed::new("dies").await);
    // The "process": its own runtime on its own thread.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let holder_bed = bed.clone();
    let (token_tx, token_rx) = tokio::sync::oneshot::channel();
    doomed.spawn(async move {
        let a = holder_bed.locker().await;
        let guard = a.acquire("k", "doomed").await.unwrap();
        let _ = token_tx.send(guard.token());
        std::future::pending::<()>().await;
        drop((a, guard));
    });
    let dead_token = token_rx.await.unwrap();
    let b = bed.locker().await;
    let hb = b.lock("k", "b").await.unwrap();
    eventually("b is queued", || async { !hb.is_owned() }).await;
    let died_at = Instant::now();
    doomed.shutdown_background();
    let token = timeout(TTL + Duration::from_secs(3), hb.wait_owned())
        .await
        .expect("a waiter owns within the TTL and a few round trips")
        .unwrap();
    assert!(token > dead_token);
    assert!(
        died_at.elapsed() >= TTL / 2,
        "owned before the dead holder's lease could expire"
    );
    hb.release().await.unwrap();
    b.close().await;
    bed.assert_clean().await;
}

/// A waiter cancelled at each step of acquiring (session, subscription, join, waiting) leaves no
/// entry behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_cancelled_at_each_step_leaves_nothing() {
    let bed = Bed::new("cancelled").await;
    let a = bed.locker().await;
    let guard = a.acquire("k", "a").await.unwrap();
    let admin = bed.cluster.client().await.expect("an etcd client");
    let entries = || {
        let mut admin = admin.clone();
        let key = format!("{}k/", bed.prefix);
        async move {
            admin
                .get(key, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .unwrap()
                .kvs()
                .len()
        }
    };
    for delay_ms in [0u64, 5, 20, 45, 70, 100, 150, 250, 400] {
        // A fresh client each time, with latency on its link so that the cancel lands inside
        // each step in turn.
        let (b, link) = bed.locker_with_link().await;
        for proxy in &link.0 {
            proxy.set_latency(Duration::from_millis(15));
        }
        let attempt = timeout(Duration::from_millis(delay_ms), b.acquire("k", "b")).await;
        assert!(attempt.is_err(), "acquired a held lock");
        eventually("the cancelled waiter's entry is gone", || async {
            entries().await == 1
        })
        .await;
        for proxy in &link.0 {
            proxy.set_latency(Duration::ZERO);
        }
        b.close().await;
    }
    assert_eq!(entries().await, 1);
    assert!(matches!(guard.ownership(), Ownership::Owned { .. }));
    guard.release().await.unwrap();
    a.close().await;
    bed.assert_clean().await;
}

/// How the authenticated cluster is restarted.
#[derive(Debug, Clone, Copy)]
enum Restart {
    OneMember,
    AllMembers,
    Rolling,
}

/// How clients reach the authenticated cluster.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// Plain HTTP.
    Plain,
    /// Mutual TLS: every client shows a certificate, on top of its password.
    Mtls,
}

const SVC_PASSWORD: &str = "svc-pw-71f0c2a9";

/// A restart of an authenticated three-node cluster, with tokens that expire after 2 s
/// (`--auth-token-ttl`), reached over `transport`, while a lock is held, waited for and watched:
/// the holder keeps its lock, the waiter's `acquire` does not fail and owns once the holder
/// releases, and the watch follows without ending.
async fn restart_under_auth(how: Restart, transport: Transport) {
    // Long enough that the whole cluster can be down and up again within it.
    const LOCK_TTL: Duration = Duration::from_secs(20);
    const ARGS: &[&str] = &["--auth-token-ttl", "2"];
    locker_tests::init_logging();
    let mut cluster = match transport {
        Transport::Plain => EtcdCluster::start_with_args(3, ARGS).await,
        Transport::Mtls => EtcdCluster::start_mtls(3, ARGS).await,
    }
    .expect("a three-node cluster");
    let endpoints = cluster.endpoints();
    let tls = cluster.client_tls();
    if let Transport::Mtls = transport {
        assert_mtls_only(&cluster).await;
    }
    let mut admin = cluster.client().await.expect("a client");
    enable_auth(&mut admin, "root-pw", "svc", SVC_PASSWORD, "locker/")
        .await
        .unwrap();
    let root_options = cluster.connect_options().with_user("root", "root-pw");
    let locker = || async {
        let mut builder = EtcdBackend::builder()
            .endpoints(endpoints.clone())
            .prefix("locker/")
            .user("svc", SVC_PASSWORD)
            .connect_timeout(Duration::from_secs(2));
        if let Some(tls) = tls.clone() {
            builder = builder.tls(tls);
        }
        let backend = builder.connect().await.expect("connect as svc");
        Locker::builder(backend).ttl(LOCK_TTL).build().unwrap()
    };
    let (holder, waiter, watcher) = (locker().await, locker().await, locker().await);
    let mut watch = watcher.watch("ar").unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    let guard = holder.acquire("ar", "holder").await.unwrap();
    assert_eq!(
        next_holder(&mut watch).await.map(|h| h.token),
        Some(guard.token())
    );
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.acquire("ar", "waiter").await }
    });
    eventually("the waiter is queued", || async {
        let mut root = etcd_client::Client::connect(endpoints.clone(), Some(root_options.clone()))
            .await
            .unwrap();
        let queue = root
            .get(
                "locker/ar/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .map(|r| r.kvs().len());
        queue.ok() == Some(2)
    })
    .await;

    match how {
        Restart::OneMember => {
            cluster.stop(0).unwrap();
            cluster.restart(0).await.unwrap();
        }
        Restart::AllMembers => {
            cluster.stop_all().unwrap();
            cluster.restart_all().await.unwrap();
        }
        Restart::Rolling => {
            for i in 0..cluster.len() {
                cluster.stop(i).unwrap();
                cluster.restart(i).await.unwrap();
                cluster
                    .wait_for_leader(Duration::from_secs(30))
                    .await
                    .unwrap();
            }
        }
    }
    // Past the restart and past the tokens' TTL: the old tokens are all gone.
    sleep(Duration::from_secs(3)).await;
    assert!(guard.is_owned(), "{how:?}: the holder kept its lock");
    assert!(!waiting.is_finished(), "{how:?}: the waiter still waits");
    let first = guard.token();
    guard.release().await.expect("release after the restart");
    let second = timeout(PATIENCE, waiting)
        .await
        .expect("the waiter owns in time")
        .expect("the waiter's task")
        .unwrap_or_else(|err| panic!("{how:?}: the waiter's acquire failed: {err}"));
    assert!(second.token() > first);
    // The watch did not end: it sees the waiter hold, then nobody.
    let mut last = None;
    while last != Some(second.token()) {
        last = next_holder(&mut watch).await.map(|h| h.token);
    }
    second.release().await.unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    for locker in [holder, waiter, watcher] {
        locker.close().await;
    }
}

/// Every member of a cluster started by [`EtcdCluster::start_mtls`] serves TLS only, and refuses
/// a client that trusts its CA but shows no certificate.
async fn assert_mtls_only(cluster: &EtcdCluster) {
    let pki = cluster.pki().expect("a TLS cluster has its certificates");
    for endpoint in cluster.endpoints() {
        assert!(endpoint.starts_with("https://"), "{endpoint}");
        let options = etcd_client::ConnectOptions::new()
            .with_tls(pki.ca_only())
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        let status = async {
            let mut client = etcd_client::Client::connect([&endpoint], Some(options)).await?;
            client.status().await
        };
        let refused = timeout(PATIENCE, status).await.expect("refused in time");
        assert!(
            refused.is_err(),
            "{endpoint} answered a client without a certificate"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_one_member_restart_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(Restart::OneMember, Transport::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_whole_cluster_restart_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(Restart::AllMembers, Transport::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_rolling_restart_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(Restart::Rolling, Transport::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_one_member_restart_over_mtls_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(Restart::OneMember, Transport::Mtls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_whole_cluster_restart_over_mtls_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(Restart::AllMembers, Transport::Mtls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_rolling_restart_over_mtls_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(Restart::Rolling, Transport::Mtls).await;
}
