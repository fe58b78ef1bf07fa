//! Interoperability with clients we did not write: `etcdctl lock` and `etcdctl elect` (etcd's own
//! Go `concurrency` recipes) use the same key layout as locker, so each respects the other.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use locker_core::Locker;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::{sleep, timeout};

use locker_etcd::testing::EtcdProcess;
use locker_tests::Harness;
use locker_tests::suite::{PATIENCE, TTL, assert_test_left_nothing, next_holder, owned, queue_len};
use tokio::sync::OnceCell;

use crate::harness::EtcdHarness;

/// The `etcdctl` to run: `LOCKER_ETCDCTL_BIN`, else `etcdctl` on `PATH`.
///
/// # Panics
///
/// If there is none, saying how to get one.
fn etcdctl() -> PathBuf {
    if let Some(path) = std::env::var_os("LOCKER_ETCDCTL_BIN") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcdctl"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the interop tests need etcd's etcdctl: install it (Debian/Ubuntu: \
             `apt-get install etcd-client`) or set LOCKER_ETCDCTL_BIN=/path/to/etcdctl"
        )
    })
}

/// A running `etcdctl` with its output read line by line.
struct Etcdctl {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Etcdctl {
    fn spawn(h: &EtcdHarness, args: &[&str]) -> Etcdctl {
        let endpoints = h.endpoints().join(",");
        let mut child = Command::new(etcdctl())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run etcdctl: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        Etcdctl {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    async fn line(&mut self) -> String {
        timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("etcdctl printed nothing in time")
            .expect("read etcdctl's output")
            .expect("etcdctl ended early")
    }

    /// Interrupts etcdctl (as Ctrl-C would: it resigns and revokes its lease) and waits for it.
    async fn interrupt(mut self) {
        let pid = self.child.id().expect("etcdctl is running");
        let sent = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(sent.success());
        timeout(PATIENCE, self.child.wait())
            .await
            .expect("etcdctl ended in time")
            .expect("wait for etcdctl");
    }
}

async fn locker(h: &EtcdHarness) -> Locker {
    h.client().await.locker(TTL)
}

/// The leases in etcd now.
async fn lease_ids(h: &EtcdHarness) -> HashSet<i64> {
    let leases = h.admin().await.leases().await.expect("list leases");
    leases.leases().iter().map(|l| l.id()).collect()
}

/// A harness for one interop test, on an etcd of the interop tests' own.
///
/// etcdctl never closes its session: after `lock` or `elect` (even `elect -l`, which only
/// observes) ends, its lease lives on for its TTL (10 s for `lock`, 60 s for `elect`), and nothing
/// in etcdctl's output names the observer's. So each test removes every lease created while it
/// ran, which is safe only on an etcd nobody else uses: a dedicated one (never a cluster given in
/// `LOCKER_ETCD_ENDPOINTS`), shared by the interop tests, which take turns.
async fn interop_harness(name: &str) -> EtcdHarness {
    static ETCD: OnceCell<EtcdProcess> = OnceCell::const_new();
    let etcd = ETCD
        .get_or_try_init(EtcdProcess::start)
        .await
        .unwrap_or_else(|e| panic!("the interop tests need an etcd binary of their own: {e}"));
    let describe = format!("the interop tests' etcd at {:?}", etcd.endpoints());
    EtcdHarness::on(name, etcd.endpoints(), describe).await
}

/// Runs one interop test alone (so the leases etcdctl makes can be told apart), then removes
/// every lease created meanwhile (etcdctl's, see [`interop_harness`]) and checks that nothing of
/// the test is left.
async fn isolated(h: &EtcdHarness, steps: impl Future<Output = Locker>) {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = SERIAL.lock().await;
    let before = lease_ids(h).await;
    let locker = steps.await;
    locker.close().await;
    let mut admin = h.admin().await;
    for lease in lease_ids(h).await.difference(&before) {
        let _ = admin.lease_revoke(*lease).await;
    }
    assert_test_left_nothing(h).await;
}

/// While `etcdctl lock` holds the lock, a locker client waits; it owns once etcdctl lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locker_waits_for_etcdctl_lock() {
    let h = interop_harness("interop-1").await;
    isolated(&h, locker_waits_for_etcdctl_lock_steps(&h)).await;
}

async fn locker_waits_for_etcdctl_lock_steps(h: &EtcdHarness) -> Locker {
    let key = h.key("etcdctl-holds");
    let name = h.etcd_key(&key);
    let mut held = Etcdctl::spawn(h, &["lock", &name]);
    let held_key = held.line().await;
    assert!(held_key.starts_with(&format!("{name}/")), "{held_key}");
    let l = locker(h).await;
    let etcdctl_holder = l.get(&key).await.expect("get").expect("etcdctl holds it");
    let handle = l.lock(key.clone(), "locker").await.expect("lock");
    queue_len(h, &key, 2).await;
    sleep(Duration::from_millis(200)).await;
    assert!(!handle.is_owned(), "owned while etcdctl holds the lock");
    held.interrupt().await;
    let token = owned(&handle).await;
    assert!(token > etcdctl_holder.token);
    handle.release().await.expect("release");
    queue_len(h, &key, 0).await;
    l
}

/// While locker holds the lock, `etcdctl lock` waits; it gets the lock once locker releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_waits_for_locker() {
    let h = interop_harness("interop-2").await;
    isolated(&h, etcdctl_lock_waits_for_locker_steps(&h)).await;
}

async fn etcdctl_lock_waits_for_locker_steps(h: &EtcdHarness) -> Locker {
    let key = h.key("locker-holds");
    let name = h.etcd_key(&key);
    let l = locker(h).await;
    let guard = l.acquire(key.clone(), "locker").await.expect("acquire");
    let mut waiting = Etcdctl::spawn(h, &["lock", &name]);
    queue_len(h, &key, 2).await;
    let early = timeout(Duration::from_millis(300), waiting.lines.next_line()).await;
    assert!(
        early.is_err(),
        "etcdctl got the lock while locker held it: {early:?}"
    );
    guard.release().await.expect("release");
    let held_key = waiting.line().await;
    assert!(held_key.starts_with(&format!("{name}/")), "{held_key}");
    waiting.interrupt().await;
    queue_len(h, &key, 0).await;
    l
}

/// A leader elected with `etcdctl elect` is the holder `get` and `watch` report, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_is_seen_as_holder() {
    let h = interop_harness("interop-3").await;
    isolated(&h, etcdctl_elect_is_seen_as_holder_steps(&h)).await;
}

async fn etcdctl_elect_is_seen_as_holder_steps(h: &EtcdHarness) -> Locker {
    let key = h.key("elected");
    let name = h.etcd_key(&key);
    let l = locker(h).await;
    let mut stream = l.watch(&key).expect("watch");
    assert_eq!(next_holder(&mut stream).await, None);
    let mut leader = Etcdctl::spawn(h, &["elect", &name, "10.0.0.7"]);
    let elected_key = leader.line().await;
    assert!(
        elected_key.starts_with(&format!("{name}/")),
        "{elected_key}"
    );
    assert_eq!(leader.line().await, "10.0.0.7");
    let holder = l.get(&key).await.expect("get").expect("a leader");
    assert_eq!(holder.value_str(), Some("10.0.0.7"));
    assert_eq!(format!("{name}/{:x}", holder.lease), elected_key);
    let seen = next_holder(&mut stream).await.expect("a leader");
    assert_eq!(seen.value_str(), Some("10.0.0.7"));
    leader.interrupt().await;
    assert_eq!(next_holder(&mut stream).await, None);
    l
}

/// A locker holder is the leader `etcdctl elect -l` observes, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locker_holder_is_etcdctl_elect_leader() {
    let h = interop_harness("interop-4").await;
    isolated(&h, locker_holder_is_etcdctl_elect_leader_steps(&h)).await;
}

async fn locker_holder_is_etcdctl_elect_leader_steps(h: &EtcdHarness) -> Locker {
    let key = h.key("observed");
    let name = h.etcd_key(&key);
    let l = locker(h).await;
    let guard = l.acquire(key.clone(), "10.1.1.1").await.expect("acquire");
    let lease = l.get(&key).await.expect("get").expect("held").lease;
    let mut observer = Etcdctl::spawn(h, &["elect", "-l", &name]);
    assert_eq!(observer.line().await, format!("{name}/{lease:x}"));
    assert_eq!(observer.line().await, "10.1.1.1");
    guard.set_value("10.1.1.2").await.expect("set_value");
    assert_eq!(observer.line().await, format!("{name}/{lease:x}"));
    assert_eq!(observer.line().await, "10.1.1.2");
    observer.interrupt().await;
    guard.release().await.expect("release");
    l
}

/// `etcdctl elect` waits while our campaign leads and sees our leader; once we resign it leads,
/// and we see its leader (`leader`, `observe`) and wait behind it in our next campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_and_our_campaign_take_turns() {
    let h = interop_harness("interop-5").await;
    isolated(&h, etcdctl_elect_and_our_campaign_take_turns_steps(&h)).await;
}

async fn etcdctl_elect_and_our_campaign_take_turns_steps(h: &EtcdHarness) -> Locker {
    let name = h.key("campaign");
    let etcd_name = h.etcd_key(&name);
    let l = locker(h).await;
    let mut leaders = l.observe(&name).expect("observe");
    assert_eq!(next_holder(&mut leaders).await, None);
    let ours = l
        .campaign(name.clone(), "locker-leader")
        .await
        .expect("campaign");
    assert_eq!(
        next_holder(&mut leaders).await.map(|leader| leader.token),
        Some(ours.token())
    );
    let mut theirs = Etcdctl::spawn(h, &["elect", &etcd_name, "etcdctl-leader"]);
    queue_len(h, &name, 2).await;
    let early = timeout(Duration::from_millis(300), theirs.lines.next_line()).await;
    assert!(early.is_err(), "etcdctl led while we did: {early:?}");
    let token = ours.token();
    ours.resign().await.expect("resign");
    let elected_key = theirs.line().await;
    assert!(
        elected_key.starts_with(&format!("{etcd_name}/")),
        "{elected_key}"
    );
    assert_eq!(theirs.line().await, "etcdctl-leader");
    let leader = l
        .leader(&name)
        .await
        .expect("leader")
        .expect("etcdctl leads");
    assert_eq!(leader.value_str(), Some("etcdctl-leader"));
    assert!(leader.token > token);
    assert_eq!(format!("{etcd_name}/{:x}", leader.lease), elected_key);
    let seen = next_holder(&mut leaders).await.expect("etcdctl's leader");
    assert_eq!(seen.value_str(), Some("etcdctl-leader"));

    let next = tokio::spawn({
        let (l, name) = (l.clone(), name.clone());
        async move { l.campaign(name, "locker-again").await }
    });
    queue_len(h, &name, 2).await;
    sleep(Duration::from_millis(200)).await;
    assert!(!next.is_finished(), "we led while etcdctl did");
    theirs.interrupt().await;
    let again = timeout(PATIENCE, next)
        .await
        .expect("we lead in time")
        .expect("ran")
        .expect("campaign");
    assert!(again.token() > leader.token);
    again.resign().await.expect("resign");
    l
}

/// `etcdctl elect -l` (observe) follows our leader's proclaims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_observe_follows_our_proclaim() {
    let h = interop_harness("interop-6").await;
    isolated(&h, etcdctl_observe_follows_our_proclaim_steps(&h)).await;
}

async fn etcdctl_observe_follows_our_proclaim_steps(h: &EtcdHarness) -> Locker {
    let name = h.key("proclaimed");
    let etcd_name = h.etcd_key(&name);
    let l = locker(h).await;
    let leadership = l
        .campaign(name.clone(), "10.2.0.1")
        .await
        .expect("campaign");
    let lease = leadership.fence().lease();
    let mut observer = Etcdctl::spawn(h, &["elect", "-l", &etcd_name]);
    assert_eq!(observer.line().await, format!("{etcd_name}/{lease:x}"));
    assert_eq!(observer.line().await, "10.2.0.1");
    leadership.proclaim("10.2.0.2").await.expect("proclaim");
    assert_eq!(observer.line().await, format!("{etcd_name}/{lease:x}"));
    assert_eq!(observer.line().await, "10.2.0.2");
    leadership.proclaim("10.2.0.3").await.expect("proclaim");
    assert_eq!(observer.line().await, format!("{etcd_name}/{lease:x}"));
    assert_eq!(observer.line().await, "10.2.0.3");
    observer.interrupt().await;
    leadership.resign().await.expect("resign");
    l
}
