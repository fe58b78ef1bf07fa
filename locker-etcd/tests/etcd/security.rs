//! TLS and etcd auth, each test on its own etcd process (own ports, own temporary directory),
//! stopped when the test ends. Certificates are made in the test with `rcgen`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::StreamExt;
use locker_core::{Error, FailureKind, Locker, Ownership};
use locker_etcd::testing::{EtcdProcess, TestPki, enable_auth};
use locker_etcd::{EtcdBackend, EtcdBackendBuilder, Identity};
use locker_tests::suite::next_holder;

/// The connect timeout of every backend here.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a failing connect may take: the connect timeout and some slack.
const FAILS_WITHIN: Duration = Duration::from_secs(5);

async fn tls_etcd(pki: &TestPki, client_certs: bool) -> EtcdProcess {
    let flags = pki.server_flags(client_certs);
    let probe = if client_certs {
        pki.client_tls()
    } else {
        pki.ca_only()
    };
    EtcdProcess::start_tls(&flags, probe)
        .await
        .expect("a dedicated TLS etcd (this test needs an etcd binary)")
}

fn builder(endpoints: Vec<String>) -> EtcdBackendBuilder {
    EtcdBackend::builder()
        .endpoints(endpoints)
        .prefix("locker/")
        .connect_timeout(CONNECT_TIMEOUT)
}

/// Connects, expecting a failure within [`FAILS_WITHIN`]; answers the error and how long it took.
async fn connect_fails(builder: EtcdBackendBuilder) -> (Error, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(FAILS_WITHIN * 2, builder.connect())
        .await
        .expect("connect gives up by itself");
    let took = started.elapsed();
    let err = result.expect_err("connect fails");
    assert!(
        took < FAILS_WITHIN,
        "connect failed only after {took:?}: {err}"
    );
    (err, took)
}

/// Watches, acquires, reads and releases one lock, leaving nothing held.
async fn lock_round_trip(backend: EtcdBackend, key: &str) {
    let locker = Locker::new(backend);
    let mut watch = locker.watch(key).unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    let guard = locker.acquire(key, "holder-a").await.unwrap();
    let holder = locker.get(key).await.unwrap().expect("held");
    assert_eq!(holder.value_str(), Some("holder-a"));
    assert_eq!(holder.token, guard.token());
    let seen = next_holder(&mut watch)
        .await
        .expect("the watch sees the holder");
    assert_eq!(seen.token, guard.token());
    guard.release().await.unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    assert_eq!(locker.get(key).await.unwrap(), None);
    drop(watch);
    locker.close().await;
}

/// The error with its sources, for messages.
pub(crate) fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(" <- ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_with_our_ca_serves_locks() {
    let pki = TestPki::new().unwrap();
    let etcd = tls_etcd(&pki, false).await;
    let endpoints = etcd.endpoints();
    assert!(endpoints[0].starts_with("https://"), "{endpoints:?}");

    let backend = builder(endpoints.clone())
        .tls(pki.ca_only())
        .connect()
        .await
        .unwrap();
    lock_round_trip(backend, "tls/job").await;

    // A bare host:port with TLS settings means https://.
    let bare = endpoints[0].trim_start_matches("https://").to_owned();
    let backend = builder(vec![bare])
        .tls(pki.ca_only())
        .connect()
        .await
        .unwrap();
    lock_round_trip(backend, "tls/bare").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mismatches_fail_in_bounded_time_and_say_why() {
    let pki = TestPki::new().unwrap();
    let etcd = tls_etcd(&pki, false).await;
    let https = etcd.endpoints()[0].clone();
    let http = https.replacen("https://", "http://", 1);

    // A plain-HTTP client against the TLS port.
    let (err, took) = connect_fails(builder(vec![http.clone()])).await;
    eprintln!("plain HTTP against TLS: {took:?}: {}", chain(&err));
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&http), "{message}");
    assert!(
        message.contains("if it serves TLS, use an https:// endpoint"),
        "{message}"
    );

    // A TLS client trusting another CA.
    let (err, took) = connect_fails(builder(vec![https.clone()]).tls(pki.wrong_ca())).await;
    eprintln!("wrong CA: {took:?}: {}", chain(&err));
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(!err.is_retryable(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&https), "{message}");
    assert!(message.contains("certificate was refused"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");

    // Our CA, but checking the certificate for a name it does not list.
    let (err, took) = connect_fails(
        builder(vec![https.clone()]).tls(pki.ca_only().domain_name("etcd.example.com")),
    )
    .await;
    eprintln!("wrong name: {took:?}: {}", chain(&err));
    assert!(!err.is_retryable(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("certificate was refused"), "{message}");
    assert!(
        message.contains("not valid for name \"etcd.example.com\""),
        "{message}"
    );

    // TLS material that cannot be used: refused before any request.
    let garbage = pki
        .ca_only()
        .identity(Identity::from_pem("not a cert", "not a key"));
    let (err, took) = connect_fails(builder(vec![https.clone()]).tls(garbage)).await;
    eprintln!("unusable identity: {took:?}: {}", chain(&err));
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("TLS settings"), "{err}");

    // https:// without TLS settings, and TLS settings with http://: refused before any I/O.
    let (err, _) = connect_fails(builder(vec![https.clone()])).await;
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains(".tls("), "{err}");
    let (err, _) = connect_fails(builder(vec![http]).tls(pki.ca_only())).await;
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("https://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_auth_needs_our_identity() {
    let pki = TestPki::new().unwrap();
    let etcd = tls_etcd(&pki, true).await;
    let endpoints = etcd.endpoints();

    let backend = builder(endpoints.clone())
        .tls(pki.client_tls())
        .connect()
        .await
        .unwrap();
    lock_round_trip(backend, "mtls/job").await;

    let (err, took) = connect_fails(builder(endpoints.clone()).tls(pki.ca_only())).await;
    eprintln!("no client certificate: {took:?}: {}", chain(&err));
    assert_refused_client_certificate(&err, &endpoints[0]);

    // A client certificate from a CA the server does not trust.
    let (err, took) = connect_fails(builder(endpoints.clone()).tls(pki.foreign_identity())).await;
    eprintln!("foreign client certificate: {took:?}: {}", chain(&err));
    assert_refused_client_certificate(&err, &endpoints[0]);
}

/// The server refused our client certificate (or its absence). Depending on timing the client
/// sees etcd's TLS alert (a permanent `PermissionDenied`) or only the connection closing right
/// after the handshake (`Unavailable`); either way the message names the endpoint and the fix.
fn assert_refused_client_certificate(err: &Error, endpoint: &str) {
    let message = err.to_string();
    assert!(
        matches!(
            err,
            Error::PermissionDenied { .. } | Error::Unavailable { .. }
        ),
        "{err:?}"
    );
    if let Error::PermissionDenied { .. } = err {
        assert!(message.contains("received fatal alert"), "{message}");
    }
    assert!(message.contains(endpoint), "{message}");
    assert!(message.contains("--client-cert-auth"), "{message}");
    assert!(message.contains("TlsOptions::identity"), "{message}");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SVC_PASSWORD: &str = "svc-pw-4c1e9a77";
const WRONG_PASSWORD: &str = "wrong-pw-83b0d5f2";

// Current-thread runtime: every task runs on the test's thread, under its scoped subscriber.
#[tokio::test]
async fn auth_limits_a_user_to_its_prefix_and_hides_passwords() {
    let etcd = EtcdProcess::start()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let endpoints = etcd.endpoints();
    let mut admin = Client::connect(&endpoints, None).await.unwrap();
    enable_auth(&mut admin, "root-pw", "svc", SVC_PASSWORD, "locker/")
        .await
        .unwrap();

    let svc = || builder(endpoints.clone()).user("svc", SVC_PASSWORD);
    let shown = format!("{:?} {:#?}", svc(), svc());
    assert!(shown.contains("svc"), "{shown}");
    assert!(!shown.contains(SVC_PASSWORD), "{shown}");

    // Under locker/: acquire, get, watch, release.
    let backend = svc().connect().await.unwrap();
    assert!(!format!("{backend:?}").contains(SVC_PASSWORD));
    let locker = Locker::new(backend);
    let mut watch = locker.watch("svc/job").unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    let guard = locker.acquire("svc/job", "svc-1").await.unwrap();
    let holder = locker.get("svc/job").await.unwrap().expect("held");
    assert_eq!(holder.value_str(), Some("svc-1"));
    assert_eq!(holder.token, guard.token());
    let seen = next_holder(&mut watch).await;
    assert_eq!(seen.as_ref().map(|h| h.token), Some(guard.token()));
    guard.release().await.unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    drop(watch);
    locker.close().await;

    // Under other/: the connect check reads the prefix and is refused...
    let (err, _) = connect_fails(svc().prefix("other/")).await;
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    // ... and so is an acquire on a backend made from a client.
    let client = Client::connect(
        &endpoints,
        Some(etcd_client::ConnectOptions::new().with_user("svc", SVC_PASSWORD)),
    )
    .await
    .unwrap();
    let outside = Locker::new(EtcdBackend::from_client_with_prefix(client, "other/"));
    let err = tokio::time::timeout(Duration::from_secs(10), outside.acquire("job", "x"))
        .await
        .expect("acquire gives up by itself")
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert!(!err.is_retryable());
    // A handle there stops too (it does not retry forever), says why, and `wait_owned` answers
    // the error.
    let handle = outside.lock("job", "x").await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), handle.wait_owned())
        .await
        .expect("wait_owned answers by itself")
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    // Every later call answers the same error (not `Closed`).
    let again = handle.wait_owned().await.unwrap_err();
    assert!(matches!(again, Error::PermissionDenied { .. }), "{again:?}");
    assert_eq!(again.to_string(), err.to_string());
    assert_eq!(
        handle.ownership(),
        Ownership::Failed {
            kind: FailureKind::PermissionDenied
        }
    );
    outside.close().await;

    // A wrong password: PermissionDenied at connect, in bounded time, and no password in the log
    // (everything down to TRACE, from every crate) or in the error.
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let (err, took) = {
        let _scope = tracing::subscriber::set_default(subscriber);
        tracing::info!("capture starts");
        connect_fails(builder(endpoints.clone()).user("svc", WRONG_PASSWORD)).await
    };
    eprintln!("wrong password: {took:?}: {}", chain(&err));
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let log = captured.text();
    assert!(log.contains("capture starts"), "the capture works: {log}");
    eprintln!("captured {} bytes of log", log.len());
    for shown in [log, chain(&err), format!("{err:?}")] {
        assert!(!shown.contains(WRONG_PASSWORD), "{shown}");
        assert!(!shown.contains(SVC_PASSWORD), "{shown}");
    }
}

/// An etcd with authentication on: `root`, and `svc` limited to `locker/`; with `tls`, it serves
/// clients over TLS only and asks for client certificates (mTLS), with passwords on top.
async fn etcd_with_auth(tls: Option<&TestPki>) -> EtcdProcess {
    let etcd = match tls {
        Some(pki) => tls_etcd(pki, true).await,
        None => EtcdProcess::start()
            .await
            .expect("a dedicated etcd (this test needs an etcd binary)"),
    };
    let mut admin = Client::connect(etcd.endpoints(), connect_options(tls))
        .await
        .unwrap();
    enable_auth(&mut admin, "root-pw", "svc", SVC_PASSWORD, "locker/")
        .await
        .unwrap();
    etcd
}

/// A plain client's options: the client certificate with `tls`.
fn connect_options(tls: Option<&TestPki>) -> Option<etcd_client::ConnectOptions> {
    tls.map(|pki| etcd_client::ConnectOptions::new().with_tls(pki.client_tls()))
}

/// `root`'s client.
async fn root_client(etcd: &EtcdProcess, tls: Option<&TestPki>) -> Client {
    let options = connect_options(tls)
        .unwrap_or_default()
        .with_user("root", "root-pw");
    Client::connect(etcd.endpoints(), Some(options))
        .await
        .unwrap()
}

/// `svc`'s backends.
fn svc_builder(etcd: &EtcdProcess, tls: Option<&TestPki>) -> EtcdBackendBuilder {
    let builder = builder(etcd.endpoints()).user("svc", SVC_PASSWORD);
    match tls {
        Some(pki) => builder.tls(pki.client_tls()),
        None => builder,
    }
}

/// A restart of an etcd with authentication on invalidates every token it issued: the holder
/// keeps its lock, the waiter's `acquire` does not fail and owns once the holder releases, and the
/// watch stream follows both without ending.
async fn restart_under_auth(tls: Option<&TestPki>) {
    let mut etcd = etcd_with_auth(tls).await;
    let holder = Locker::new(svc_builder(&etcd, tls).connect().await.unwrap());
    let waiter = Locker::new(svc_builder(&etcd, tls).connect().await.unwrap());
    let watcher = Locker::new(svc_builder(&etcd, tls).connect().await.unwrap());

    let mut watch = watcher.watch("ar").unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    let guard = holder.acquire("ar", "holder").await.unwrap();
    let seen = next_holder(&mut watch).await.expect("held");
    assert_eq!(seen.token, guard.token());
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.acquire("ar", "waiter").await }
    });
    // The waiter is queued before the restart.
    let mut root = root_client(&etcd, tls).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued = root
            .get(
                "locker/ar/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap()
            .kvs()
            .len();
        if queued == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    etcd.stop().expect("stop etcd");
    etcd.restart().await.expect("start etcd again");
    // Past the restart, on new tokens: a keep-alive round and more.
    tokio::time::sleep(locker_core::DEFAULT_TTL / 2).await;
    assert!(
        guard.is_owned(),
        "the holder kept its lock through the restart"
    );
    assert!(!waiting.is_finished(), "the waiter still waits");
    let token = guard.token();
    guard.release().await.expect("release after the restart");
    let second = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter owns in time")
        .expect("the waiter's task")
        .expect("the waiter's acquire does not fail");
    assert!(second.token() > token);
    // The watch followed: the holder went, the waiter came, and it did not end.
    let mut last = None;
    while last.as_ref().map(|h: &locker_core::Holder| h.token) != Some(second.token()) {
        last = next_holder(&mut watch).await;
    }
    second.release().await.unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    for locker in [holder, waiter, watcher] {
        locker.close().await;
    }
}

#[tokio::test]
async fn a_restart_under_auth_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    restart_under_auth(None).await;
}

#[tokio::test]
async fn a_restart_under_auth_and_mtls_loses_no_lock_fails_no_waiter_and_ends_no_watch() {
    let pki = TestPki::new().expect("test certificates");
    restart_under_auth(Some(&pki)).await;
}

/// A real change of rights is not a token to renew: after `svc`'s password changed and etcd
/// restarted, authenticating again is refused, and a waiter's `acquire` and a watch stream end
/// with a permission error instead of retrying forever.
#[tokio::test]
async fn a_changed_password_under_auth_is_a_permanent_error() {
    let mut etcd = etcd_with_auth(None).await;
    let holder = Locker::new(svc_builder(&etcd, None).connect().await.unwrap());
    let waiter = Locker::new(svc_builder(&etcd, None).connect().await.unwrap());
    let watcher = Locker::new(svc_builder(&etcd, None).connect().await.unwrap());
    let mut watch = watcher.watch("ar").unwrap();
    assert_eq!(next_holder(&mut watch).await, None);
    let guard = holder.acquire("ar", "holder").await.unwrap();
    assert!(next_holder(&mut watch).await.is_some());
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.acquire("ar", "waiter").await.map(|_| ()) }
    });

    let mut root = root_client(&etcd, None).await;
    root.user_change_password("svc", "another-pw-5d2e")
        .await
        .unwrap();
    etcd.stop().expect("stop etcd");
    etcd.restart().await.expect("start etcd again");

    let err = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter gives up in time")
        .expect("the waiter's task")
        .expect_err("the waiter cannot own without rights");
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends in time");
    match ended {
        Some(Err(err)) => assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}"),
        other => panic!("expected the watch to end with a permission error, got {other:?}"),
    }
    drop(guard);
    for locker in [holder, waiter, watcher] {
        locker.close().await;
    }
}
