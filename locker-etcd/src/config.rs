//! The builder of [`EtcdBackend`].

use std::fmt;
use std::time::Duration;

#[cfg(feature = "tls")]
use etcd_client::TlsOptions;
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
/// work is an [`Error::InvalidConfig`]. `Debug` never shows the password, nor the TLS settings
/// (which may hold a private key).
///
/// # TLS
///
/// With the crate feature `tls` (on by default; rustls with `ring`), [`tls`](Self::tls) sets the
/// CA certificate that verifies the servers and, for etcd's `--client-cert-auth`, the client's
/// certificate and key:
///
/// ```rust,no_run
/// # #[cfg(feature = "tls")]
/// # async fn example() -> Result<(), locker_core::Error> {
/// use locker_etcd::{Certificate, EtcdBackend, Identity, TlsOptions};
///
/// # let (ca_pem, cert_pem, key_pem) = (String::new(), String::new(), String::new());
/// let backend = EtcdBackend::builder()
///     .endpoints(["https://etcd-1.example.com:2379"])
///     .tls(
///         TlsOptions::new()
///             .ca_certificate(Certificate::from_pem(ca_pem))
///             // Only for `--client-cert-auth`:
///             .identity(Identity::from_pem(cert_pem, key_pem)),
///     )
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
///
/// With TLS settings every endpoint must be `https://host:port` or a bare `host:port` (which then
/// means `https://`); an `http://` endpoint is an [`Error::InvalidConfig`]. An `https://` endpoint
/// without TLS settings trusts the system's root certificates if the feature `tls-native-roots`
/// is on, and is an [`Error::InvalidConfig`] naming the fix otherwise. Without the feature `tls`
/// every `https://` endpoint is an [`Error::InvalidConfig`] saying to enable it.
///
/// A failed TLS handshake (a server certificate the CA does not vouch for, a refused or missing
/// client certificate, an `http://` endpoint of a TLS server) makes `connect` fail within the
/// connect timeout with a message naming the endpoints and, as far as the error tells, the cause.
#[derive(Clone)]
#[must_use = "a builder does nothing until `connect` is called"]
pub struct EtcdBackendBuilder {
    endpoints: Vec<String>,
    prefix: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    user: Option<(String, String)>,
    max_request_bytes: usize,
    #[cfg(feature = "tls")]
    tls: Option<TlsOptions>,
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
            #[cfg(feature = "tls")]
            tls: None,
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
            .field("tls", &self.tls_shown())
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

/// How a failed first request knows the server took the connection and closed it.
const CLOSED: &[&str] = &[
    "connection closed",
    "broken pipe",
    "connection reset",
    "stream closed",
    "unexpected eof",
    // io::ErrorKind as hyper prints it: `Kind(ConnectionReset)`.
    "connectionreset",
    "connectionaborted",
    "brokenpipe",
];

/// The reason rustls gave for refusing the server's certificate, if that is the failure (tonic
/// puts it in the status message, and keeps it in the status's sources).
fn certificate_problem(err: &etcd_client::Error) -> Option<String> {
    const REFUSED: &str = "invalid peer certificate";
    if let etcd_client::Error::GRpcStatus(status) = err {
        if status.message().contains(REFUSED) {
            return Some(status.message().to_owned());
        }
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            let message = cause.to_string();
            if message.contains(REFUSED) {
                return Some(message);
            }
            source = cause.source();
        }
    }
    None
}

/// The name of the TLS alert in rustls's error text (`BadCertificate`, …).
fn alert(detail: &str) -> &str {
    detail
        .split("received fatal alert: ")
        .nth(1)
        .map_or("", |rest| {
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            &rest[..end]
        })
}

/// An error's message followed by those of its sources that add something (tonic's transport
/// error says only "transport error" and keeps the cause as its source).
fn with_sources(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// What went wrong in `connect`.
enum Failure {
    /// Settings etcd-client cannot use (endpoints, TLS material), before any request.
    Settings(etcd_client::Error),
    /// The first request.
    Request(etcd_client::Error),
}

/// Whether `endpoint` starts with `scheme` (`"https://"`), as etcd-client reads it.
fn is_scheme(endpoint: &str, scheme: &str) -> bool {
    endpoint.starts_with(scheme)
}

impl EtcdBackendBuilder {
    /// What `Debug` shows of the TLS settings: whether there are any, never their contents.
    fn tls_shown(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "configured (hidden)";
        }
        "none"
    }

    /// A builder with the defaults: no endpoints yet, prefix `"locker/"`, 5 s connect and request
    /// timeouts, no user, etcd's default 1.5 MiB request limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// The etcd endpoints (`"http://127.0.0.1:2379"` or `"127.0.0.1:2379"`). At least one is needed.
    ///
    /// `https://` endpoints need TLS: see [TLS](Self#tls).
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

    /// Connects with TLS: the CA certificate(s) that verify the servers, and the client identity
    /// (certificate and key) for servers started with `--client-cert-auth`. Endpoints are then
    /// `https://host:port` (or `host:port`). See [TLS](Self#tls). Feature `tls`.
    ///
    /// `Debug` shows only that TLS is configured, never the options (they may hold a private key).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, options: TlsOptions) -> Self {
        self.tls = Some(options);
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
        self.validate_tls()?;
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

    /// Checks that the endpoints' schemes fit the TLS settings.
    fn validate_tls(&self) -> Result<(), Error> {
        let https = self.endpoints.iter().find(|e| is_scheme(e, "https://"));
        #[cfg(not(feature = "tls"))]
        if let Some(https) = https {
            return Err(Error::InvalidConfig(format!(
                "endpoint {https:?} needs TLS, which this build of locker-etcd leaves out: enable \
                 the feature `tls` of locker-etcd"
            )));
        }
        #[cfg(feature = "tls")]
        {
            if self.tls.is_some() {
                if let Some(http) = self.endpoints.iter().find(|e| is_scheme(e, "http://")) {
                    return Err(Error::InvalidConfig(format!(
                        "endpoint {http:?} is plain HTTP but TLS is configured with `.tls(..)`: \
                         use https:// (or host:port) for every endpoint"
                    )));
                }
            } else if let Some(https) = https
                && !cfg!(feature = "tls-native-roots")
            {
                return Err(Error::InvalidConfig(format!(
                    "endpoint {https:?} needs TLS settings: call \
                     `.tls(TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem)))` \
                     with the CA that signed the server's certificate (or enable the feature \
                     `tls-native-roots` of locker-etcd to trust the system's root certificates)"
                )));
            }
        }
        Ok(())
    }

    /// The TLS options to connect with, if any.
    #[cfg(feature = "tls")]
    fn tls_options(&self) -> Option<TlsOptions> {
        if let Some(tls) = &self.tls {
            return Some(tls.clone());
        }
        #[cfg(feature = "tls-native-roots")]
        if self.endpoints.iter().any(|e| is_scheme(e, "https://")) {
            return Some(TlsOptions::new().with_native_roots());
        }
        None
    }

    /// The endpoints, for a message: `http://a:2379, http://b:2379`.
    fn endpoint_list(&self) -> String {
        self.endpoints.join(", ")
    }

    /// The error of a failed first request: one sentence that names the endpoints and the cause
    /// (with what the failure tells about TLS, credentials, or a server that is not etcd), the
    /// etcd-client error kept as its source.
    fn connect_error(&self, err: etcd_client::Error) -> Error {
        let at = self.endpoint_list();
        let said = crate::error::cause(&err);
        // A proxy's 502, 503 or 504 (etcd behind it restarting) maps to Unavailable: that one
        // may be etcd soon, and stays retryable.
        if let etcd_client::Error::GRpcStatus(status) = &err
            && (status.code() == tonic::Code::Unimplemented
                || (status.message().contains("HTTP status code")
                    && status.code() != tonic::Code::Unavailable))
        {
            // etcd serves the range the connect makes; a server that answers it with an HTTP
            // status, or does not know the call, is something else.
            return Error::Backend {
                message: format!(
                    "the server at {at} does not answer as etcd does ({said}): is this etcd? \
                     (give etcd's client URLs, port 2379 by default)"
                ),
                retryable: false,
                source: Some(std::sync::Arc::new(err)),
            };
        }
        if let etcd_client::Error::GRpcStatus(status) = &err
            && status.message().contains(crate::error::NO_USER)
        {
            return Error::PermissionDenied {
                message: format!(
                    "etcd at {at} has authentication on and no user was given: call \
                     `.user(name, password)` ({said})"
                ),
                source: Some(std::sync::Arc::new(err)),
            };
        }
        let tls = self.endpoints.iter().any(|e| is_scheme(e, "https://")) || self.tls_configured();
        // tonic's status shows its transport source only in `Debug`.
        let raw = format!("{err} {err:?}");
        let detail = raw.to_ascii_lowercase();
        if tls && let Some(problem) = certificate_problem(&err) {
            return Error::Backend {
                message: format!(
                    "TLS with etcd at {at} failed: the server's certificate was refused \
                     ({problem}): `.tls(..)` must trust the CA that signed it, and the endpoint's \
                     host must be a name or address the certificate lists (or set \
                     `TlsOptions::domain_name`)"
                ),
                retryable: false,
                source: Some(std::sync::Arc::new(err)),
            };
        }
        if tls && detail.contains("received fatal alert") {
            // The server's TLS refused us: a client certificate missing or not trusted.
            let alert = alert(&raw);
            return Error::PermissionDenied {
                message: format!(
                    "etcd at {at} refused the TLS connection (received fatal alert: {alert}): if \
                     it runs with --client-cert-auth it wants a client certificate its CA \
                     trusts; give one with `TlsOptions::identity`"
                ),
                source: Some(std::sync::Arc::new(err)),
            };
        }
        match map_error(err, Context::op("connect")) {
            Error::Unavailable { source, .. } => {
                // The server took the connection and closed it: not a refused or timed-out
                // connect, but a server speaking another protocol, or refusing our certificate.
                // (OS messages differ in case: "Connection reset by peer".)
                let lower = detail.to_ascii_lowercase();
                let hint = if !CLOSED.iter().any(|closed| lower.contains(closed)) {
                    ""
                } else if tls {
                    " (the server closed the TLS connection at once: if it runs with \
                     --client-cert-auth it refused our client certificate or got none; give one \
                     its CA trusts with `TlsOptions::identity`)"
                } else {
                    " (the server closed the connection at once: if it serves TLS, use an \
                     https:// endpoint and `.tls(..)`; else, is this etcd?)"
                };
                Error::Unavailable {
                    message: format!("could not reach etcd at {at}: {said}{hint}"),
                    source,
                }
            }
            Error::PermissionDenied { source, .. } if said.contains("permission denied") => {
                Error::PermissionDenied {
                    message: format!(
                        "etcd at {at} denied the user access to the prefix {:?}: {said}",
                        self.prefix
                    ),
                    source,
                }
            }
            Error::PermissionDenied { source, .. } => Error::PermissionDenied {
                message: format!("etcd at {at} refused the credentials: {said}"),
                source,
            },
            Error::Backend {
                retryable, source, ..
            } => Error::Backend {
                message: format!("etcd at {at} refused the first request: {said}"),
                retryable,
                source,
            },
            other => other,
        }
    }

    /// Whether TLS settings were given.
    fn tls_configured(&self) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return true;
        }
        false
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
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls_options() {
            options = options.with_tls(tls);
        }
        if let Some((name, password)) = &self.user {
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let endpoints = self.endpoints.clone();
        let prefix = self.prefix.clone();
        let attempt = async move {
            // Without a user this makes no request: its failures are settings that cannot work
            // (endpoints, TLS certificates or keys that cannot be read).
            let mut client = Client::connect(&endpoints, Some(options))
                .await
                .map_err(|err| match err {
                    etcd_client::Error::TransportError(_)
                    | etcd_client::Error::InvalidArgs(_)
                    | etcd_client::Error::InvalidUri(_) => Failure::Settings(err),
                    other => Failure::Request(other),
                })?;
            if prefix.is_empty() {
                client.status().await.map_err(Failure::Request)?;
            } else {
                client
                    .get(
                        prefix.as_bytes(),
                        Some(GetOptions::new().with_keys_only().with_limit(1)),
                    )
                    .await
                    .map_err(Failure::Request)?;
            }
            Ok::<_, Failure>(client)
        };
        let client = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "could not reach etcd at {} within {:?}",
                    self.endpoint_list(),
                    self.connect_timeout
                )));
            }
            Ok(Err(Failure::Settings(err))) => {
                return Err(Error::InvalidConfig(format!(
                    "bad etcd endpoints {:?} or TLS settings: {}",
                    self.endpoints,
                    match &err {
                        etcd_client::Error::TransportError(transport) => with_sources(transport),
                        other => with_sources(other),
                    }
                )));
            }
            Ok(Err(Failure::Request(err))) => return Err(self.connect_error(err)),
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
        // With `tls-native-roots`, https:// without `.tls(..)` trusts the system's roots.
        #[cfg(not(feature = "tls-native-roots"))]
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

    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn https_without_the_tls_feature_says_to_enable_it() {
        let message =
            config_error(EtcdBackend::builder().endpoints(["https://127.0.0.1:2379"])).await;
        assert!(message.contains("feature `tls`"), "{message}");
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn tls_settings_and_schemes_must_agree() {
        use crate::{Certificate, Identity, TlsOptions};
        let tls = || {
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem("not a real CA"))
                .identity(Identity::from_pem("client cert", "PRIVATE-KEY-BYTES"))
        };
        let message = config_error(
            EtcdBackend::builder()
                .endpoints(["https://127.0.0.1:1", "http://127.0.0.1:2"])
                .tls(tls()),
        )
        .await;
        assert!(message.contains("http://127.0.0.1:2"), "{message}");
        assert!(message.contains("https://"), "{message}");
        #[cfg(not(feature = "tls-native-roots"))]
        {
            let message =
                config_error(EtcdBackend::builder().endpoints(["https://127.0.0.1:1"])).await;
            assert!(message.contains(".tls("), "{message}");
            assert!(message.contains("tls-native-roots"), "{message}");
        }
        // `Debug` says TLS is on and shows nothing of the options (the key above is bytes, which
        // derived `Debug` would print as numbers: look for the field names instead).
        let builder = EtcdBackend::builder()
            .endpoints(["https://127.0.0.1:1"])
            .tls(tls());
        let shown = format!("{builder:?}");
        assert!(shown.contains("tls: \"configured (hidden)\""), "{shown}");
        assert!(
            !shown.contains("identity") && !shown.contains("key"),
            "{shown}"
        );
        let shown = format!("{:?}", EtcdBackend::builder());
        assert!(shown.contains("tls: \"none\""), "{shown}");
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
