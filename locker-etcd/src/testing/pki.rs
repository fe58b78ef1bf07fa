//! Certificates for a throwaway TLS etcd, made on the spot with `rcgen`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::{Certificate, Identity, TlsOptions};

/// A test PKI: a CA, a server certificate for `127.0.0.1` and `localhost` signed by it, a client
/// certificate signed by it, and, for tests of what must be refused, a second unrelated CA with a
/// client certificate of its own. The server's files (`ca.pem`, `server.pem`, `server-key.pem`)
/// live in a temporary directory that is removed on drop.
///
/// ```no_run
/// use locker_etcd::EtcdBackend;
/// use locker_etcd::testing::{EtcdProcess, TestPki};
///
/// # async fn test() -> Result<(), Box<dyn std::error::Error>> {
/// let pki = TestPki::new()?;
/// // TLS, and client certificates required.
/// let etcd = EtcdProcess::start_tls(&pki.server_flags(true), pki.client_tls()).await?;
/// let backend = EtcdBackend::builder()
///     .endpoints(etcd.endpoints())
///     .tls(pki.client_tls())
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_pem: String,
    other_ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    foreign_cert_pem: String,
    foreign_key_pem: String,
}

impl TestPki {
    /// Makes the certificates and writes the server's files.
    ///
    /// # Errors
    ///
    /// If a key or certificate cannot be made, or the files cannot be written.
    pub fn new() -> std::io::Result<TestPki> {
        let ca = make_ca("locker test CA")?;
        let other_ca = make_ca("some other CA")?;

        let mut server = CertificateParams::new(["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(std::io::Error::other)?;
        server
            .distinguished_name
            .push(DnType::CommonName, "etcd test server");
        // etcd's gRPC gateway dials the server with the server's own certificate, and cluster
        // members dial each other with it (`peer_flags`).
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_key = KeyPair::generate().map_err(std::io::Error::other)?;
        let server_cert = server
            .signed_by(&server_key, &ca)
            .map_err(std::io::Error::other)?;

        let mut client =
            CertificateParams::new(Vec::<String>::new()).map_err(std::io::Error::other)?;
        client
            .distinguished_name
            .push(DnType::CommonName, "locker-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().map_err(std::io::Error::other)?;
        let client_cert = client
            .signed_by(&client_key, &ca)
            .map_err(std::io::Error::other)?;
        let foreign_key = KeyPair::generate().map_err(std::io::Error::other)?;
        let foreign_cert = client
            .signed_by(&foreign_key, &other_ca)
            .map_err(std::io::Error::other)?;

        let dir = tempfile::Builder::new().prefix("locker-pki-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("server.pem"), server_cert.pem())?;
        std::fs::write(
            dir.path().join("server-key.pem"),
            server_key.serialize_pem(),
        )?;
        Ok(TestPki {
            ca_pem: ca.pem(),
            other_ca_pem: other_ca.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            foreign_cert_pem: foreign_cert.pem(),
            foreign_key_pem: foreign_key.serialize_pem(),
            dir,
        })
    }

    /// The directory of the server's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of one of the server's files: `ca.pem`, `server.pem` or `server-key.pem`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// etcd's flags for TLS on the client port with these certificates; with `client_certs`, also
    /// etcd's `--client-cert-auth` against the CA (a client must show a certificate it signed).
    pub fn server_flags(&self, client_certs: bool) -> Vec<String> {
        let path = |name: &str| self.file(name).display().to_string();
        let mut flags = vec![
            "--cert-file".to_owned(),
            path("server.pem"),
            "--key-file".to_owned(),
            path("server-key.pem"),
        ];
        if client_certs {
            flags.extend([
                "--client-cert-auth".to_owned(),
                "--trusted-ca-file".to_owned(),
                path("ca.pem"),
            ]);
        }
        flags
    }

    /// etcd's flags for mutual TLS between the members of a cluster ([`EtcdCluster`]'s peer
    /// URLs must then be `https`): each member shows the server certificate to its peers (it is
    /// valid for `127.0.0.1` as a server and as a client) and accepts only peers whose certificate
    /// the CA signed.
    ///
    /// [`EtcdCluster`]: super::EtcdCluster
    pub fn peer_flags(&self) -> Vec<String> {
        let path = |name: &str| self.file(name).display().to_string();
        vec![
            "--peer-cert-file".to_owned(),
            path("server.pem"),
            "--peer-key-file".to_owned(),
            path("server-key.pem"),
            "--peer-client-cert-auth".to_owned(),
            "--peer-trusted-ca-file".to_owned(),
            path("ca.pem"),
        ]
    }

    /// The CA's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Client TLS options trusting the CA, without a client certificate.
    pub fn ca_only(&self) -> TlsOptions {
        TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }

    /// Client TLS options trusting the CA, with the client certificate: what a server started
    /// with [`server_flags(true)`](Self::server_flags) accepts.
    pub fn client_tls(&self) -> TlsOptions {
        self.ca_only().identity(Identity::from_pem(
            &self.client_cert_pem,
            &self.client_key_pem,
        ))
    }

    /// Client TLS options trusting the CA, with a client certificate of the other CA (refused
    /// by a server that checks client certificates).
    pub fn foreign_identity(&self) -> TlsOptions {
        self.ca_only().identity(Identity::from_pem(
            &self.foreign_cert_pem,
            &self.foreign_key_pem,
        ))
    }

    /// Client TLS options trusting only the other CA, which did not sign the server's
    /// certificate.
    pub fn wrong_ca(&self) -> TlsOptions {
        TlsOptions::new().ca_certificate(Certificate::from_pem(&self.other_ca_pem))
    }
}

fn make_ca(name: &str) -> std::io::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(std::io::Error::other)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(std::io::Error::other)?;
    CertifiedIssuer::self_signed(params, key).map_err(std::io::Error::other)
}
