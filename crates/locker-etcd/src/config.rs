//! The builder of [`EtcdBackend`].

use std::fmt;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use locker_core::Error;

use crate::backend::EtcdBackend;
use crate::error::{Context, map_error};

/// The default key root.
pub const DEFAULT_PREFIX: &str = "locker/";
/// The default time allowed for connecting and for the first request.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default time allowed for one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's default `--max-request-bytes`: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;

/// HTTP/2 pings on open streams, so a dead connection under a watch or keep-alive stream is noticed.
/// etcd refuses pings more often than every 5 s (`--grpc-keepalive-min-time`).
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The settings an [`EtcdBackend`] runs with, after validation.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) prefix: String,
    pub(crate) request_timeout: Duration,
    pub(crate) max_request_bytes: usize,
}

impl Settings {
    pub(crate) fn new(prefix: String) -> Self {
        Settings {
            prefix,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// Builds an [`EtcdBackend`]: `EtcdBackend::builder().endpoints([..]).connect().await`.
///
/// Every setting is checked by [`connect`](Self::connect) before any I/O; a setting that cannot
/// work is an [`Error::InvalidConfig`]. `Debug` never shows the password.
#[derive(Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct EtcdBackendBuilder {
    endpoints: Vec<String>,
    prefix: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    user: Option<(String, String)>,
    max_request_bytes: usize,
}

impl Default for EtcdBackendBuilder {
    fn default() -> Self {
        EtcdBackendBuilder {
            endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            user: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

impl fmt::Debug for EtcdBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackendBuilder")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("user", &self.user.as_ref().map(|(name, _)| Redacted(name)))
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

/// Shows a user name with its password hidden.
struct Redacted<'a>(&'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} (password hidden)", self.0)
    }
}

impl EtcdBackendBuilder {
    /// A builder with the defaults: no endpoints yet, prefix `"locker/"`, 5 s connect and request
    /// timeouts, no user, etcd's default 1.5 MiB request limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// The etcd endpoints (`"http://127.0.0.1:2379"` or `"127.0.0.1:2379"`). At least one is needed.
    ///
    /// `https://` endpoints are refused: this crate builds etcd-client without TLS.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The key root under which every lock key lives (default `"locker/"`).
    ///
    /// It is prepended as is: end it with `/` to keep locker's keys in their own directory. An empty
    /// prefix puts lock keys at the top of etcd's key space.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long [`connect`](Self::connect) may take, including the first request (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one request (a transaction, a range, a lease call, one keep-alive round trip, the
    /// creation of a watch) may take before it fails with [`Error::Unavailable`] (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Authenticates as `name` with `password` (etcd's auth). The password is never shown by
    /// `Debug`.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// The server's `--max-request-bytes` (default 1.5 MiB, etcd's default). It sets
    /// [`Limits`](locker_core::backend::Limits): see [`EtcdBackend::limits`](locker_core::LockBackend::limits).
    /// At least 32 KiB.
    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig(
                "no etcd endpoints given: call `endpoints([\"http://127.0.0.1:2379\"])`".into(),
            ));
        }
        if let Some(bad) = self.endpoints.iter().find(|e| e.trim().is_empty()) {
            return Err(Error::InvalidConfig(format!(
                "empty etcd endpoint {bad:?} in {:?}",
                self.endpoints
            )));
        }
        if let Some(tls) = self.endpoints.iter().find(|e| e.starts_with("https://")) {
            return Err(Error::InvalidConfig(format!(
                "endpoint {tls:?} needs TLS, which this build of locker-etcd does not support"
            )));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "the connect timeout must be above zero".into(),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "the request timeout must be above zero".into(),
            ));
        }
        crate::backend::check_room(&self.prefix, self.max_request_bytes)?;
        if let Some((name, _)) = &self.user
            && name.is_empty()
        {
            return Err(Error::InvalidConfig("the etcd user name is empty".into()));
        }
        Ok(())
    }

    /// Checks the settings, connects, and makes one request (a read of the prefix key, or a status
    /// call for an empty prefix) within the connect timeout, so an unreachable cluster, refused
    /// credentials or a missing read permission fail here.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for settings that cannot work (before any I/O);
    /// [`Error::Unavailable`] naming the endpoints when nothing answers in time;
    /// [`Error::PermissionDenied`] for refused credentials.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops the half-made connection.
    pub async fn connect(self) -> Result<EtcdBackend, Error> {
        self.validate()?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(HTTP2_KEEPALIVE_INTERVAL, self.request_timeout)
            // etcd answers pings without open streams with GOAWAY ("too_many_pings").
            .with_keep_alive_while_idle(false);
        if let Some((name, password)) = &self.user {
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let endpoints = self.endpoints.clone();
        let prefix = self.prefix.clone();
        let attempt = async move {
            let mut client = Client::connect(&endpoints, Some(options)).await?;
            if prefix.is_empty() {
                client.status().await?;
            } else {
                client
                    .get(
                        prefix.as_bytes(),
                        Some(GetOptions::new().with_keys_only().with_limit(1)),
                    )
                    .await?;
            }
            Ok::<_, etcd_client::Error>(client)
        };
        let client = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "could not reach etcd at {:?} within {:?}",
                    self.endpoints, self.connect_timeout
                )));
            }
            Ok(Err(err)) => {
                if matches!(
                    err,
                    etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_)
                ) {
                    return Err(Error::InvalidConfig(format!(
                        "bad etcd endpoints {:?}: {err}",
                        self.endpoints
                    )));
                }
                return Err(match map_error(err, Context::op("connect")) {
                    Error::Unavailable { message, source } => Error::Unavailable {
                        message: format!("could not reach etcd at {:?}: {message}", self.endpoints),
                        source,
                    },
                    other => other,
                });
            }
            Ok(Ok(client)) => client,
        };
        tracing::debug!(endpoints = ?self.endpoints, prefix = %self.prefix, "connected to etcd");
        Ok(EtcdBackend::from_parts(
            client,
            Settings {
                prefix: self.prefix,
                request_timeout: self.request_timeout,
                max_request_bytes: self.max_request_bytes,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let builder = EtcdBackend::builder()
            .endpoints(["http://127.0.0.1:2379"])
            .user("alice", "s3cr3t-passw0rd");
        let shown = format!("{builder:?}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let shown = format!("{builder:#?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    async fn config_error(builder: EtcdBackendBuilder) -> String {
        match builder.connect().await {
            Err(Error::InvalidConfig(message)) => message,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_settings_fail_before_io() {
        let ok = || EtcdBackend::builder().endpoints(["http://127.0.0.1:1"]);
        assert!(
            config_error(EtcdBackend::builder())
                .await
                .contains("no etcd endpoints")
        );
        assert!(config_error(ok().endpoints([""])).await.contains("empty"));
        assert!(
            config_error(ok().connect_timeout(Duration::ZERO))
                .await
                .contains("connect timeout")
        );
        assert!(
            config_error(ok().request_timeout(Duration::ZERO))
                .await
                .contains("request timeout")
        );
        assert!(
            config_error(ok().max_request_bytes(1000))
                .await
                .contains("max_request_bytes")
        );
        assert!(
            config_error(ok().prefix("p".repeat(5000)))
                .await
                .contains("prefix")
        );
        assert!(
            config_error(ok().endpoints(["https://127.0.0.1:2379"]))
                .await
                .contains("TLS")
        );
        assert!(config_error(ok().user("", "pw")).await.contains("user"));
        assert!(
            config_error(ok().endpoints(["http://bad host:2379"]))
                .await
                .contains("bad etcd endpoints")
        );
    }

    #[tokio::test]
    async fn connect_to_nothing_fails_in_bounded_time() {
        // Port 1 on loopback: nothing listens there.
        let started = std::time::Instant::now();
        let err = EtcdBackend::builder()
            .endpoints(["http://127.0.0.1:1"])
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert!(err.is_retryable());
    }
}
