//! TLS and etcd auth, each test on its own etcd process (own ports, own temporary directory),
//! stopped when the test ends. Certificates are made in the test with `rcgen`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Permission};
use futures::StreamExt;
use futures::stream::BoxStream;
use locker_core::{Error, Holder, Locker};
use locker_etcd::{Certificate, EtcdBackend, EtcdBackendBuilder, Identity, TlsOptions};
use locker_tests::etcd_server::{start_etcd_binary, start_etcd_binary_tls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The connect timeout of every backend here.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a failing connect may take: the connect timeout and some slack.
const FAILS_WITHIN: Duration = Duration::from_secs(5);

/// A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and an
/// unrelated CA; the server's files live in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    other_ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    foreign_cert_pem: String,
    foreign_key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let ca = make_ca("locker test CA");
        let other_ca = make_ca("some other CA");

        let mut server =
            CertificateParams::new(["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "etcd test server");
        // etcd's gRPC gateway dials the server with the server's own certificate.
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &ca).unwrap();

        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "locker-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().unwrap();
        let client_cert = client.signed_by(&client_key, &ca).unwrap();
        let foreign_key = KeyPair::generate().unwrap();
        let foreign_cert = client.signed_by(&foreign_key, &other_ca).unwrap();

        let dir = tempfile::Builder::new()
            .prefix("locker-pki-")
            .tempdir()
            .unwrap();
        let write = |name: &str, contents: &str| {
            std::fs::write(dir.path().join(name), contents).unwrap();
        };
        write("ca.pem", &ca.pem());
        write("server.pem", &server_cert.pem());
        write("server-key.pem", &server_key.serialize_pem());
        Pki {
            ca_pem: ca.pem(),
            other_ca_pem: other_ca.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            foreign_cert_pem: foreign_cert.pem(),
            foreign_key_pem: foreign_key.serialize_pem(),
            dir,
        }
    }

    fn file(&self, name: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        path.to_str().expect("a UTF-8 temporary path").to_owned()
    }

    /// The server's flags: TLS on the client port, and with `client_certs` etcd's
    /// `--client-cert-auth` against our CA.
    fn server_flags(&self, client_certs: bool) -> Vec<String> {
        let mut flags = vec![
            "--cert-file".to_owned(),
            self.file("server.pem"),
            "--key-file".to_owned(),
            self.file("server-key.pem"),
        ];
        if client_certs {
            flags.extend([
                "--client-cert-auth".to_owned(),
                "--trusted-ca-file".to_owned(),
                self.file("ca.pem"),
            ]);
        }
        flags
    }

    /// TLS options trusting our CA, without a client certificate.
    fn ca_only(&self) -> TlsOptions {
        TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }

    /// TLS options trusting our CA, with the client certificate.
    fn with_identity(&self) -> TlsOptions {
        self.ca_only().identity(Identity::from_pem(
            &self.client_cert_pem,
            &self.client_key_pem,
        ))
    }

    /// TLS options trusting our CA, with a client certificate of the other CA.
    fn foreign_identity(&self) -> TlsOptions {
        self.ca_only().identity(Identity::from_pem(
            &self.foreign_cert_pem,
            &self.foreign_key_pem,
        ))
    }

    /// TLS options trusting only a CA that did not sign the server's certificate.
    fn wrong_ca(&self) -> TlsOptions {
        TlsOptions::new().ca_certificate(Certificate::from_pem(&self.other_ca_pem))
    }
}

fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

async fn tls_etcd(pki: &Pki, client_certs: bool) -> locker_tests::etcd_server::EtcdProcess {
    let flags = pki.server_flags(client_certs);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let probe = if client_certs {
        pki.with_identity()
    } else {
        pki.ca_only()
    };
    start_etcd_binary_tls(&flags, probe)
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

/// The next item of a holder stream, within 10 s.
async fn next_holder(
    watch: &mut BoxStream<'static, locker_core::Result<Option<Holder>>>,
) -> Option<Holder> {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch item within 10 s")
        .expect("the watch goes on")
        .expect("a holder, not an error")
}

/// The error with its sources, for messages.
fn chain(err: &Error) -> String {
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
    let pki = Pki::new();
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
    let pki = Pki::new();
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
    let pki = Pki::new();
    let etcd = tls_etcd(&pki, true).await;
    let endpoints = etcd.endpoints();

    let backend = builder(endpoints.clone())
        .tls(pki.with_identity())
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
    let etcd = start_etcd_binary()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let endpoints = etcd.endpoints();
    let mut admin = Client::connect(&endpoints, None).await.unwrap();
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("locker-svc").await.unwrap();
    admin
        .role_grant_permission(
            "locker-svc",
            Permission::read_write("locker/").with_prefix(),
        )
        .await
        .unwrap();
    admin.user_add("svc", SVC_PASSWORD, None).await.unwrap();
    admin.user_grant_role("svc", "locker-svc").await.unwrap();
    admin.auth_enable().await.unwrap();

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
