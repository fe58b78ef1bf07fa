//! An etcd cluster on loopback ports (one process per member), for fault tests: kill and restart
//! a member, kill the leader, pause a member (SIGSTOP/SIGCONT), stop the whole cluster; in plain
//! HTTP or with mutual TLS everywhere.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::{Instant, sleep};

use super::TestPki;
use super::server::{
    EtcdProcess, connect_options, etcd_binary, free_loopback_port, member_args, spawn_member,
    status_at, url_scheme,
};
use crate::TlsOptions;

/// A running cluster. Dropping it stops every member (by PID) and removes their directories.
///
/// [`EtcdCluster::start`] and [`EtcdCluster::start_with_args`] start one that speaks plain HTTP;
/// [`EtcdCluster::start_mtls`] one that speaks mutual TLS, to clients and between members.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// What a client needs to reach a TLS cluster (the CA and a client certificate).
    tls: Option<TlsOptions>,
    /// A TLS cluster's certificates; their files must outlive every member (restarts read them),
    /// and fields drop in order: the members first.
    pki: Option<TestPki>,
}

#[derive(Debug)]
struct Member {
    process: EtcdProcess,
    client_url: String,
    paused: bool,
}

impl EtcdCluster {
    /// Starts a new cluster of `size` members and waits until it has a leader.
    ///
    /// # Errors
    ///
    /// If there is no etcd binary, or the cluster does not come up within 30 s.
    pub async fn start(size: usize) -> std::io::Result<EtcdCluster> {
        Self::start_with_args(size, &[] as &[&str]).await
    }

    /// Starts a new cluster of `size` members, each with `extra` arguments too (say
    /// `["--auth-token-ttl", "2"]`), and waits until it has a leader.
    ///
    /// # Errors
    ///
    /// If there is no etcd binary, or the cluster does not come up within 30 s.
    pub async fn start_with_args<S: AsRef<str>>(
        size: usize,
        extra: &[S],
    ) -> std::io::Result<EtcdCluster> {
        Self::launch(size, extra, None).await
    }

    /// Starts a new cluster of `size` members that speaks mutual TLS, with `extra` arguments too,
    /// and waits until it has a leader.
    ///
    /// The cluster makes a [`TestPki`] of its own ([`EtcdCluster::pki`]). Every member serves
    /// clients at `https://127.0.0.1:<port>` with the PKI's server certificate (valid for
    /// `127.0.0.1` and `localhost`) and accepts only clients showing a certificate its CA signed
    /// (etcd's `--client-cert-auth`): [`EtcdCluster::client_tls`] is what a client needs. The
    /// members talk to each other over mutual TLS too ([`TestPki::peer_flags`]). The helpers
    /// ([`EtcdCluster::client`], [`EtcdCluster::leader`], restarts) use the client certificate.
    ///
    /// ```no_run
    /// use locker_etcd::EtcdBackend;
    /// use locker_etcd::testing::EtcdCluster;
    ///
    /// # async fn test() -> Result<(), Box<dyn std::error::Error>> {
    /// let cluster = EtcdCluster::start_mtls(3, &["--auth-token-ttl", "2"]).await?;
    /// let mut builder = EtcdBackend::builder().endpoints(cluster.endpoints());
    /// if let Some(tls) = cluster.client_tls() {
    ///     builder = builder.tls(tls);
    /// }
    /// let backend = builder.connect().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// If the certificates cannot be made, there is no etcd binary, or the cluster does not come
    /// up within 30 s.
    pub async fn start_mtls<S: AsRef<str>>(
        size: usize,
        extra: &[S],
    ) -> std::io::Result<EtcdCluster> {
        Self::launch(size, extra, Some(TestPki::new()?)).await
    }

    /// Starts the members (with mutual TLS everywhere given `pki`) and waits for a leader.
    async fn launch<S: AsRef<str>>(
        size: usize,
        extra: &[S],
        pki: Option<TestPki>,
    ) -> std::io::Result<EtcdCluster> {
        let binary = etcd_binary()?;
        let tls = pki.as_ref().map(TestPki::client_tls);
        let scheme = url_scheme(pki.is_some());
        let mut ports = Vec::new();
        while ports.len() < size * 2 {
            let port = free_loopback_port()?;
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let names: Vec<String> = (1..=size).map(|i| format!("n{i}")).collect();
        let peer_urls: Vec<String> = (0..size)
            .map(|i| format!("{scheme}://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let initial = names
            .iter()
            .zip(&peer_urls)
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("locker-{}-{}", std::process::id(), ports[0]);
        let mut members = Vec::new();
        for i in 0..size {
            let dir = tempfile::Builder::new()
                .prefix("locker-cluster-")
                .tempdir()?
                .keep();
            let client_url = format!("{scheme}://127.0.0.1:{}", ports[2 * i]);
            let mut args = member_args(&names[i], &dir, &client_url, &peer_urls[i], &initial);
            args.extend([
                "--initial-cluster-token".to_owned(),
                token.clone(),
                "--initial-cluster-state".to_owned(),
                "new".to_owned(),
                // Short election timings: a lost leader is replaced in well under a TTL.
                "--heartbeat-interval".to_owned(),
                "50".to_owned(),
                "--election-timeout".to_owned(),
                "500".to_owned(),
            ]);
            if let Some(pki) = &pki {
                args.extend(pki.server_flags(true));
                args.extend(pki.peer_flags());
            }
            args.extend(extra.iter().map(|arg| arg.as_ref().to_owned()));
            let process = spawn_member(&binary, dir, client_url.clone(), &args, tls.clone())?;
            members.push(Member {
                process,
                client_url,
                paused: false,
            });
        }
        let cluster = EtcdCluster { members, tls, pki };
        for member in &cluster.members {
            member.process.wait_ready().await?;
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Every member's client endpoint (`http://127.0.0.1:<port>`, or `https://` over TLS).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client endpoint of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url.clone()
    }

    /// For a cluster started by [`EtcdCluster::start_mtls`], the client TLS options its members
    /// accept (its CA, and a client certificate it signed), for
    /// [`EtcdBackendBuilder::tls`](crate::EtcdBackendBuilder::tls); `None` for a plain cluster.
    pub fn client_tls(&self) -> Option<TlsOptions> {
        self.tls.clone()
    }

    /// For a cluster started by [`EtcdCluster::start_mtls`], its certificates (say, to try a
    /// client certificate it refuses); `None` for a plain cluster.
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// Options for an `etcd_client` of this cluster: with [`EtcdCluster::client_tls`] on a TLS
    /// cluster, else the defaults. Add a user, timeouts and so on to them.
    pub fn connect_options(&self) -> ConnectOptions {
        connect_options(self.tls.as_ref())
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The index of the current leader, as the running members see it.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for member in &self.members {
            let status = if member.paused || member.process.pid().is_none() {
                None
            } else {
                status(&member.client_url, self.tls.as_ref()).await
            };
            ids.push(status.map(|(id, _)| id));
            if let Some((_, lead)) = status
                && lead != 0
            {
                leader = Some(lead);
            }
        }
        let leader = leader?;
        ids.iter().position(|id| *id == Some(leader))
    }

    /// Waits until some member is leader.
    ///
    /// # Errors
    ///
    /// If none is within `within`.
    pub async fn wait_for_leader(&self, within: Duration) -> std::io::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(leader) = self.leader().await {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "no leader within {within:?}; member 1's log ends with:\n{}",
                    self.members[0].process.log_tail()
                )));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills member `i` at once (SIGKILL). Its data is kept for [`EtcdCluster::restart`].
    ///
    /// # Errors
    ///
    /// If its supervisor is gone.
    pub fn kill(&mut self, i: usize) -> std::io::Result<()> {
        self.members[i].process.kill()
    }

    /// Stops member `i` gracefully (SIGTERM).
    ///
    /// # Errors
    ///
    /// If its supervisor is gone.
    pub fn stop(&mut self, i: usize) -> std::io::Result<()> {
        self.members[i].process.stop()
    }

    /// Starts member `i` again with its data, and waits until it answers.
    ///
    /// # Errors
    ///
    /// If it does not answer within 20 s.
    pub async fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.members[i].process.restart().await
    }

    /// Freezes member `i` (SIGSTOP).
    ///
    /// # Errors
    ///
    /// If it is not running.
    pub fn pause(&mut self, i: usize) -> std::io::Result<()> {
        self.members[i].process.pause()?;
        self.members[i].paused = true;
        Ok(())
    }

    /// Thaws member `i` (SIGCONT).
    ///
    /// # Errors
    ///
    /// If it is not running.
    pub fn resume(&mut self, i: usize) -> std::io::Result<()> {
        self.members[i].process.resume()?;
        self.members[i].paused = false;
        Ok(())
    }

    /// Stops every member (SIGTERM), keeping their data.
    ///
    /// # Errors
    ///
    /// If a supervisor is gone.
    pub fn stop_all(&mut self) -> std::io::Result<()> {
        for i in 0..self.members.len() {
            self.stop(i)?;
        }
        Ok(())
    }

    /// Starts every stopped member again and waits for a leader.
    ///
    /// # Errors
    ///
    /// If the cluster does not come back within 30 s.
    pub async fn restart_all(&mut self) -> std::io::Result<()> {
        // Members of a cluster wait for each other: start all, then wait for each.
        for member in &mut self.members {
            if member.process.pid().is_none() {
                member.process.start_no_wait()?;
            }
        }
        for member in &self.members {
            member.process.wait_ready().await?;
        }
        self.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(())
    }

    /// An etcd client on the whole cluster, without a user (with the client certificate on a
    /// TLS cluster: [`EtcdCluster::connect_options`]).
    ///
    /// # Errors
    ///
    /// If it cannot be made (etcd-client connects lazily: this rarely fails).
    pub async fn client(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(self.endpoints(), Some(self.connect_options())).await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // A frozen process ignores SIGTERM until thawed.
        for member in &mut self.members {
            if member.paused {
                let _ = member.process.resume();
            }
        }
    }
}

/// Member id and the leader id it knows, from a status call (bounded; over TLS with `tls`).
async fn status(endpoint: &str, tls: Option<&TlsOptions>) -> Option<(u64, u64)> {
    let status = status_at(endpoint, tls, Duration::from_millis(800)).await?;
    let id = status.header().map(|h| h.member_id())?;
    Some((id, status.leader()))
}
