//! The etcd backend's own tests, against real etcd servers: the backend's calls on the etcd
//! shared by this binary, TLS and auth on dedicated servers, etcd in Docker, and configuration
//! that only etcd has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The backend's calls, one by one, on the etcd shared by this binary.
mod backend;

/// The testcontainers path: etcd in a Docker container (`LOCKER_ETCD_IMAGE`, or a local image
/// built from the etcd binary), and a lock hand-off through it.
mod docker;

/// TLS and auth on dedicated etcd servers.
mod security;

/// Fenced writes.
mod fenced;

/// Errors at first contact.
mod first_contact;

/// Bad input that only etcd has: endpoints nobody answers on, and bad configuration.
mod bad_input {
    use std::time::Duration;

    use locker_core::Error;
    use locker_etcd::EtcdBackend;

    /// Endpoints nobody listens on: an error in bounded time (not a hang), naming them.
    #[tokio::test]
    async fn unreachable_endpoints_fail_in_bounded_time() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // released: nothing listens there now
        let endpoint = format!("http://127.0.0.1:{port}");
        let connect = EtcdBackend::builder()
            .endpoints([endpoint.clone()])
            .connect_timeout(Duration::from_secs(1))
            .connect();
        let err = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .expect("connect answered in bounded time")
            .expect_err("nothing listens there");
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains(&endpoint), "{err}");
    }

    /// Configuration that cannot work is refused before any I/O, naming what is wrong.
    #[tokio::test]
    async fn bad_configuration_is_refused_before_io() {
        let no_endpoints = EtcdBackend::builder().connect().await.unwrap_err();
        assert!(
            matches!(no_endpoints, Error::InvalidConfig(_)),
            "{no_endpoints}"
        );
        let zero_timeout = EtcdBackend::builder()
            .endpoints(["http://127.0.0.1:1"])
            .connect_timeout(Duration::ZERO)
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(zero_timeout, Error::InvalidConfig(_)),
            "{zero_timeout}"
        );
        assert!(
            zero_timeout.to_string().contains("timeout"),
            "{zero_timeout}"
        );
    }
}
