//! Errors at first contact: what `connect` says when the other side is not what it should be.

use std::time::Duration;

use etcd_client::Client;
use locker_core::Error;
use locker_etcd::EtcdBackend;
use locker_etcd::testing::{EtcdProcess, enable_auth};

use crate::security::chain;

/// What `connect` answers at `endpoints`: its error (printed, for the test's log).
async fn connect_error(endpoints: Vec<String>) -> Error {
    let err = EtcdBackend::builder()
        .endpoints(endpoints)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .expect_err("connect fails");
    eprintln!("{err}");
    err
}

/// A server on loopback that takes HTTP/2 connections and answers every request 404 (a web
/// server, a proxy, the wrong port): not etcd.
async fn http2_404_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let response = http::Response::builder().status(404).body(()).unwrap();
                    let _ = respond.send_response(response, true);
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A server on loopback that speaks HTTP/1.1 only, answering 404 and closing.
async fn http1_404_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// What every first-contact error shares: one sentence that names the endpoints, with no nested
/// error dump in it (the etcd-client error is the source, for `source()`).
fn assert_one_sentence(err: &Error, endpoint: &str) {
    let shown = err.to_string();
    assert!(
        shown.contains(endpoint),
        "does not name {endpoint}: {shown}"
    );
    for dump in [
        "tonic::",
        "Transport,",
        "ConnectError(",
        "Status {",
        "Os {",
        "grpc request error",
    ] {
        assert!(!shown.contains(dump), "a nested dump ({dump}) in: {shown}");
    }
    assert!(
        std::error::Error::source(err).is_some(),
        "the cause is kept as the source: {err:?}"
    );
}

/// Endpoints nobody listens on: `Unavailable`, naming them and the cause in plain words.
#[tokio::test]
async fn unreachable_endpoints_say_so_in_one_sentence() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let err = connect_error(vec![endpoint.clone()]).await;
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_one_sentence(&err, &endpoint);
    assert!(err.to_string().contains("Connection refused"), "{err}");
    eprintln!("with its sources: {}", chain(&err));
}

/// Authentication on and no user given: `PermissionDenied` (permanent), saying how to give one.
#[tokio::test]
async fn auth_on_without_credentials_is_permission_denied() {
    let etcd = EtcdProcess::start()
        .await
        .expect("a dedicated etcd (this test needs an etcd binary)");
    let endpoints = etcd.endpoints();
    let mut admin = Client::connect(&endpoints, None).await.unwrap();
    enable_auth(&mut admin, "root-pw", "svc", "svc-pw", "locker/")
        .await
        .unwrap();
    let err = connect_error(endpoints.clone()).await;
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert_one_sentence(&err, &endpoints[0]);
    assert!(err.to_string().contains(".user("), "{err}");
}

/// A server that speaks HTTP/2 but is not etcd: a permanent error that names it and asks.
#[tokio::test]
async fn a_server_that_is_not_etcd_is_a_permanent_error_that_asks() {
    let endpoint = http2_404_server().await;
    let err = connect_error(vec![endpoint.clone()]).await;
    assert!(
        matches!(
            err,
            Error::Backend {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert_one_sentence(&err, &endpoint);
    assert!(err.to_string().contains("is this etcd?"), "{err}");
    assert!(err.to_string().contains("404"), "{err}");
}

/// A server that speaks HTTP/1.1 only, and closes: unavailable (it may be a TLS server, or a
/// restart), with a hint that asks whether it is etcd.
#[tokio::test]
async fn a_server_that_closes_at_once_asks_whether_it_is_etcd() {
    let endpoint = http1_404_server().await;
    let err = connect_error(vec![endpoint.clone()]).await;
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_one_sentence(&err, &endpoint);
    assert!(err.to_string().contains("is this etcd?"), "{err}");
}
