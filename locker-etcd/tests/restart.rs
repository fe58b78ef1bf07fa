//! A leader killed with `kill -9` and restarted at once resumes its term: across a real process
//! exit, the restarted process leads at once, with the same fencing token, instead of queueing
//! behind its own old entry until that lease expires.
//!
//! One binary plays both processes (no libtest harness: `harness = false`): run plainly, it is
//! the test; run with `LOCKER_RESTART_CHILD` set (by the test), it is the leader that gets killed.
//! The token goes from the killed process to the restarted one as JSON (locker-core's `serde`
//! feature), as a service would keep it in a file.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use locker_core::{LockOptions, Locker, ResumeToken};
use locker_etcd::testing::{EtcdServer, unique_prefix};

const CHILD: &str = "LOCKER_RESTART_CHILD";
const ENDPOINTS: &str = "LOCKER_RESTART_ENDPOINTS";
const PREFIX: &str = "LOCKER_RESTART_PREFIX";
const ELECTION: &str = "leader";
const NAME: &str = "resumes_its_term_after_kill_9";
/// The session TTL of both processes: long, so that waiting behind the old entry would show.
const TTL: Duration = Duration::from_secs(30);

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("{NAME}: test");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    if std::env::var_os(CHILD).is_some() {
        runtime.block_on(child());
    } else {
        print!("test {NAME} ... ");
        runtime.block_on(parent());
        println!("ok");
    }
}

async fn locker(endpoints: Vec<String>, prefix: &str) -> Locker {
    let backend = locker_etcd::EtcdBackend::builder()
        .endpoints(endpoints)
        .prefix(prefix)
        .connect()
        .await
        .expect("connect");
    Locker::builder(backend).ttl(TTL).build().expect("a locker")
}

/// The leader that gets killed: leads, writes its resume token on stdout, and waits.
async fn child() {
    let endpoints = std::env::var(ENDPOINTS).expect("endpoints");
    let prefix = std::env::var(PREFIX).expect("prefix");
    let locker = locker(endpoints.split(',').map(str::to_owned).collect(), &prefix).await;
    let leadership = locker.campaign(ELECTION, "before").await.expect("campaign");
    let token = leadership.resume_token().expect("a token while leading");
    let json = serde_json::to_string(&token).expect("the token as JSON");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{json}").expect("write the token");
    out.flush().expect("flush");
    drop(out);
    std::future::pending::<()>().await;
}

async fn parent() {
    let etcd = EtcdServer::shared()
        .await
        .unwrap_or_else(|e| panic!("this test needs etcd: {e}"));
    let prefix = format!("locker-test/{}", unique_prefix("restart"));
    let mut leader = Command::new(std::env::current_exe().expect("this binary"))
        .env(CHILD, "1")
        .env(ENDPOINTS, etcd.endpoints().join(","))
        .env(PREFIX, &prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the leader");
    let mut line = String::new();
    BufReader::new(leader.stdout.take().expect("its stdout"))
        .read_line(&mut line)
        .expect("read its token");
    // kill -9: the leader exits with no chance to resign, release or revoke anything.
    leader.kill().expect("kill -9 the leader");
    let status = leader.wait().expect("the leader exits");
    assert!(!status.success(), "the leader was killed: {status:?}");
    let token: ResumeToken = serde_json::from_str(line.trim()).expect("a token in JSON");

    let admin = etcd.client().await.expect("a client");
    let queue = format!("{prefix}{ELECTION}/");
    let entries = |mut admin: locker_etcd::etcd_client::Client| {
        let queue = queue.clone();
        async move {
            let options = locker_etcd::etcd_client::GetOptions::new().with_prefix();
            admin
                .get(queue, Some(options))
                .await
                .expect("read the queue")
                .kvs()
                .iter()
                .map(|kv| (kv.create_revision(), kv.lease(), kv.value().to_vec()))
                .collect::<Vec<_>>()
        }
    };
    let before = entries(admin.clone()).await;
    assert_eq!(
        before,
        [(token.token().as_i64(), token.lease(), b"before".to_vec())],
        "the killed leader's entry is there, its lease alive"
    );

    // The restart, at once: it leads with the same token, on the same entry and lease (it did
    // not queue a second entry behind the old one, which would wait for the 30 s TTL).
    let restarted = locker(etcd.endpoints(), &prefix).await;
    let leadership = restarted
        .campaign_with(ELECTION, "after", LockOptions::new().resume(token.clone()))
        .await
        .expect("resume the term");
    assert_eq!(leadership.token(), token.token(), "the same term");
    assert_eq!(leadership.fence().lease(), token.lease());
    let after = entries(admin.clone()).await;
    assert_eq!(
        after,
        [(token.token().as_i64(), token.lease(), b"after".to_vec())],
        "one entry, the old one, with the new value"
    );
    let leader = restarted
        .leader(ELECTION)
        .await
        .expect("leader")
        .expect("led");
    assert_eq!((leader.token, leader.lease), (token.token(), token.lease()));

    // Its resignation deletes the entry at once, as any; the taken-up lease is left to expire
    // (never revoked: another process might have resumed another tenure under it).
    leadership.resign().await.expect("resign");
    assert!(entries(admin.clone()).await.is_empty());
    restarted.close().await;
    let _ = admin.clone().lease_revoke(token.lease()).await;
}
