//! A real, throwaway etcd: found or started (see [`EtcdServer::start`]), and dedicated processes
//! that a test can stop, kill, freeze and restart ([`EtcdProcess`]).
//!
//! # Cleaning up
//!
//! An etcd process is started by a small `sh` supervisor whose standard input is a pipe held by
//! the test process. When the test process ends, however it ends (even killed with `SIGKILL`), the
//! kernel closes the pipe; the supervisor reads end-of-file, kills etcd by its PID, waits for it
//! and removes the temporary directory. So even the server behind [`EtcdServer::shared`], a
//! static that is never dropped, goes away with the process. A Docker container gets the same kind
//! of guard, running `docker rm -f <id>`. No process is ever killed by name.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, ConnectOptions};

use crate::EtcdBackend;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// How long a started etcd may take to answer.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// The supervisor of one etcd process. Arguments: `<dir> <etcd> <args..>`. Commands on stdin, one
/// a line: `start`, `stop` (SIGTERM), `kill` (SIGKILL); it answers `started <pid>` or `stopped` on
/// stdout. At end-of-file it stops etcd, waits for it and removes `<dir>`.
const SUPERVISOR: &str = r#"
dir=$1; shift
pid=
start() { "$@" >>"$dir/etcd.log" 2>&1 & pid=$!; echo "started $pid"; }
stop() {
  # SIGCONT after the signal: a frozen etcd (pause) only acts on SIGTERM once thawed.
  if [ -n "$pid" ]; then kill "$1" "$pid" 2>/dev/null; kill -CONT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=; fi
  echo stopped
}
start "$@"
while read -r cmd; do
  case "$cmd" in
    start) [ -n "$pid" ] || start "$@" ;;
    stop) stop -TERM ;;
    kill) stop -KILL ;;
  esac
done
stop -TERM >/dev/null
rm -rf "$dir"
"#;

/// Removes a container when the test process ends. Argument: the container id.
const DOCKER_GUARD: &str = r#"cat >/dev/null; docker rm -f "$1" >/dev/null 2>&1"#;

/// An etcd to test against: an existing cluster, or one started for the test process.
///
/// Dropping a server that was started (from the binary or in Docker) stops it and removes its
/// data; one named by `LOCKER_ETCD_ENDPOINTS` is left alone.
#[derive(Debug)]
pub struct EtcdServer {
    endpoints: Vec<String>,
    origin: Origin,
}

#[derive(Debug)]
enum Origin {
    Existing,
    Binary(EtcdProcess),
    Docker(DockerContainer),
}

/// What to do when no etcd can be found: the message of [`EtcdServer::start`]'s error.
fn how_to_get_etcd(docker: &str) -> String {
    format!(
        "these tests need etcd, and none was found:\n\
         - set LOCKER_ETCD_ENDPOINTS=http://host:2379[,..] to use a running cluster, or\n\
         - install an etcd binary (Debian/Ubuntu: `apt-get install etcd-server`; macOS: `brew \
           install etcd`; or set LOCKER_ETCD_BIN=/path/to/etcd), or\n\
         - make Docker available (image LOCKER_ETCD_IMAGE, default {DEFAULT_IMAGE}).\n\
         Docker failed with: {docker}"
    )
}

impl EtcdServer {
    /// Finds or starts an etcd, in this order:
    ///
    /// 1. `LOCKER_ETCD_ENDPOINTS` (comma-separated): an existing cluster; nothing is started.
    /// 2. An `etcd` binary ([`etcd_binary`]: `LOCKER_ETCD_BIN`, else `etcd` on `PATH`), started on
    ///    free loopback ports in a temporary directory, with `--unsafe-no-fsync` (fast, and fine
    ///    for data that dies with the test).
    /// 3. Docker, through `testcontainers`: image `LOCKER_ETCD_IMAGE` (default
    ///    `quay.io/coreos/etcd:v3.5.17`), its etcd at `LOCKER_ETCD_DOCKER_BIN` (default
    ///    `/usr/local/bin/etcd`). On a machine without a registry, the repository's
    ///    `scripts/etcd-image.sh` builds such an image from a local etcd binary.
    ///
    /// Each call starts a server of its own (unless the endpoints are given); to share one
    /// between the tests of a binary, use [`EtcdServer::shared`].
    ///
    /// # Errors
    ///
    /// With none of the three, an error whose message says how to get etcd; if a binary or an
    /// image is there but etcd does not start, the error quotes its log.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use locker_core::Locker;
    /// use locker_etcd::testing::{EtcdServer, unique_prefix};
    ///
    /// # async fn test() -> Result<(), Box<dyn std::error::Error>> {
    /// let etcd = EtcdServer::start().await?;
    /// let locker = Locker::new(etcd.backend(&unique_prefix("my-test")).await?);
    /// let guard = locker.acquire("jobs/nightly", "worker-1").await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start() -> std::io::Result<EtcdServer> {
        if let Ok(endpoints) = std::env::var("LOCKER_ETCD_ENDPOINTS") {
            let endpoints: Vec<String> = endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect();
            if endpoints.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "LOCKER_ETCD_ENDPOINTS is set but names no endpoint",
                ));
            }
            return Ok(EtcdServer {
                endpoints,
                origin: Origin::Existing,
            });
        }
        match etcd_binary() {
            Ok(binary) => {
                let process = start_dedicated(&binary, &[], None).await.map_err(|err| {
                    std::io::Error::new(
                        err.kind(),
                        format!("could not start {}: {err}", binary.display()),
                    )
                })?;
                return Ok(EtcdServer {
                    endpoints: process.endpoints(),
                    origin: Origin::Binary(process),
                });
            }
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            Err(_) => {}
        }
        let image = std::env::var("LOCKER_ETCD_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_owned());
        start_docker(&image).await.map_err(|docker| {
            std::io::Error::new(std::io::ErrorKind::NotFound, how_to_get_etcd(&docker))
        })
    }

    /// The etcd shared by every test of this process, found or started on first use, as by
    /// [`EtcdServer::start`]. It stops when the process ends. Give each test its own key prefix
    /// ([`unique_prefix`]).
    ///
    /// # Errors
    ///
    /// As [`EtcdServer::start`]; a failed attempt is not remembered (the next call tries again).
    pub async fn shared() -> std::io::Result<&'static EtcdServer> {
        static SHARED: OnceCell<EtcdServer> = OnceCell::const_new();
        SHARED.get_or_try_init(EtcdServer::start).await
    }

    /// The client endpoints (`http://host:port`).
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    /// Where this etcd comes from, for messages.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Existing => format!("existing etcd at {:?}", self.endpoints),
            Origin::Binary(process) => format!(
                "etcd process {} at {:?}",
                process.pid.unwrap_or_default(),
                self.endpoints
            ),
            Origin::Docker(container) => format!(
                "etcd container {} of {} at {:?}",
                container.id, container.image, self.endpoints
            ),
        }
    }

    /// The id of the Docker container this etcd runs in, if it does.
    pub fn container_id(&self) -> Option<&str> {
        match &self.origin {
            Origin::Docker(container) => Some(&container.id),
            _ => None,
        }
    }

    /// A backend on this etcd whose keys live under `prefix` (use one per test:
    /// [`unique_prefix`]).
    ///
    /// # Errors
    ///
    /// As [`EtcdBackendBuilder::connect`](crate::EtcdBackendBuilder::connect).
    pub async fn backend(&self, prefix: &str) -> locker_core::Result<EtcdBackend> {
        backend_at(self.endpoints(), prefix).await
    }

    /// A plain etcd client on this etcd, for what the backend does not do (compaction, raw
    /// puts, an operator's deletes).
    ///
    /// # Errors
    ///
    /// If the client cannot be made (etcd-client connects lazily: this rarely fails).
    pub async fn client(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(self.endpoints(), None).await
    }
}

/// A backend on `endpoints` with its keys under `prefix`, default settings otherwise.
async fn backend_at(endpoints: Vec<String>, prefix: &str) -> locker_core::Result<EtcdBackend> {
    EtcdBackend::builder()
        .endpoints(endpoints)
        .prefix(prefix)
        .connect()
        .await
}

/// A key prefix no other test (in this process or another) uses: `<name>-<pid>-<time>-<n>/`.
pub fn unique_prefix(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() % 1_000_000_000_000);
    format!("{name}-{}-{nanos:x}-{n}/", std::process::id())
}

/// The etcd binary to start: `LOCKER_ETCD_BIN`, else `etcd` on `PATH`.
///
/// # Errors
///
/// `NotFound` if there is none (the message says how to get one); `InvalidInput` if
/// `LOCKER_ETCD_BIN` names no file.
pub fn etcd_binary() -> std::io::Result<PathBuf> {
    if let Some(binary) = std::env::var_os("LOCKER_ETCD_BIN") {
        let binary = PathBuf::from(binary);
        if !binary.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("LOCKER_ETCD_BIN={} is not a file", binary.display()),
            ));
        }
        return Ok(binary);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcd"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no etcd binary: install etcd (Debian/Ubuntu: apt-get install etcd-server) or \
                 set LOCKER_ETCD_BIN",
            )
        })
}

/// A dedicated etcd process, started by [`EtcdProcess::start`] (or its variants), that a test can
/// stop, kill, freeze and restart. Dropping it stops etcd (by its PID) and removes its directory.
///
/// [`stop`](Self::stop) and [`kill`](Self::kill) wait for the process to exit (a blocking wait of
/// milliseconds, on the calling thread); so does dropping it, for up to 10 s if etcd ignores
/// SIGTERM.
#[derive(Debug)]
pub struct EtcdProcess {
    supervisor: Child,
    commands: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
    pid: Option<u32>,
    client_url: String,
    dir: PathBuf,
    /// For a TLS server: what a client needs to tell that it answers.
    probe: Option<crate::TlsOptions>,
}

/// Starts a dedicated etcd from `binary` (plain HTTP, or TLS with `tls`: the server's TLS flags
/// are among `extra` and `tls` is what a client needs to check it is up), retrying on other ports
/// a few times: the ports are picked by binding port 0 and released before etcd binds them, so
/// another process may take one meanwhile.
async fn start_dedicated(
    binary: &Path,
    extra: &[String],
    tls: Option<crate::TlsOptions>,
) -> std::io::Result<EtcdProcess> {
    let mut last = None;
    for _ in 0..3 {
        let process = spawn_single(binary, tls.clone(), extra)?;
        // On failure `process` is dropped here, which stops etcd and removes its directory.
        match process.wait_ready().await {
            Ok(()) => return Ok(process),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The scheme of a client or peer URL: `https` with TLS, else `http`.
pub(crate) fn url_scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// Starts one member of a cluster under a supervisor, without waiting for it to answer (the
/// members of a new cluster wait for each other). `args` are the member's own flags; for a member
/// serving clients over TLS, `probe` is what a client needs to tell that it answers.
pub(crate) fn spawn_member(
    binary: &Path,
    dir: PathBuf,
    client_url: String,
    args: &[String],
    probe: Option<crate::TlsOptions>,
) -> std::io::Result<EtcdProcess> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(SUPERVISOR)
        .arg("locker-etcd-supervisor")
        .arg(&dir)
        .arg(binary)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut supervisor = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
    };
    let (Some(commands), Some(stdout)) = (supervisor.stdin.take(), supervisor.stdout.take()) else {
        return Err(std::io::Error::other("the supervisor has no pipes"));
    };
    let mut process = EtcdProcess {
        supervisor,
        commands: Some(commands),
        replies: BufReader::new(stdout),
        pid: None,
        client_url,
        dir,
        probe,
    };
    process.pid = Some(process.read_started()?);
    Ok(process)
}

/// The flags of one etcd member: its name, data directory, client and peer URLs, the initial
/// cluster, no fsync (test data dies with the test), and zap logs on stderr.
pub(crate) fn member_args(
    name: &str,
    dir: &Path,
    client_url: &str,
    peer_url: &str,
    initial_cluster: &str,
) -> Vec<String> {
    let flags = [
        ("--name", name.to_owned()),
        ("--data-dir", dir.join("data").display().to_string()),
        ("--listen-client-urls", client_url.to_owned()),
        ("--advertise-client-urls", client_url.to_owned()),
        ("--listen-peer-urls", peer_url.to_owned()),
        ("--initial-advertise-peer-urls", peer_url.to_owned()),
        ("--initial-cluster", initial_cluster.to_owned()),
        ("--logger", "zap".to_owned()),
        ("--log-outputs", "stderr".to_owned()),
    ];
    let mut args: Vec<String> = flags
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
    args.push("--unsafe-no-fsync".to_owned());
    args
}

/// A free loopback port (bound, then released: another process may take it meanwhile).
pub(crate) fn free_loopback_port() -> std::io::Result<u16> {
    free_port()
}

/// Starts a single-node etcd under a supervisor on free loopback ports (serving clients over TLS
/// with `tls`: the server's TLS flags are among `extra`), with `--unsafe-no-fsync` and the `extra`
/// flags, without waiting for it.
fn spawn_single(
    binary: &Path,
    tls: Option<crate::TlsOptions>,
    extra: &[String],
) -> std::io::Result<EtcdProcess> {
    let dir = tempfile::Builder::new()
        .prefix("locker-etcd-")
        .tempdir()?
        .keep();
    let client_port = free_port()?;
    let mut peer_port = free_port()?;
    while peer_port == client_port {
        peer_port = free_port()?;
    }
    let scheme = url_scheme(tls.is_some());
    let client_url = format!("{scheme}://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut args = member_args(
        "locker-test",
        &dir,
        &client_url,
        &peer_url,
        &format!("locker-test={peer_url}"),
    );
    args.extend(extra.iter().cloned());
    spawn_member(binary, dir, client_url, &args, tls)
}

impl EtcdProcess {
    /// Starts a dedicated etcd from the binary [`etcd_binary`] finds, with `--unsafe-no-fsync`, on
    /// free loopback ports, and waits until it answers.
    ///
    /// # Errors
    ///
    /// If there is no binary, or it does not start and answer within 20 s (the error quotes its
    /// log).
    pub async fn start() -> std::io::Result<EtcdProcess> {
        EtcdProcess::start_with_args::<&str>(&[]).await
    }

    /// Like [`EtcdProcess::start`], with extra etcd flags (`--max-request-bytes=..`, say; a flag
    /// given twice takes its last value, so `--unsafe-no-fsync=false` turns fsync back on).
    ///
    /// # Errors
    ///
    /// As [`EtcdProcess::start`].
    pub async fn start_with_args<S: AsRef<str>>(extra: &[S]) -> std::io::Result<EtcdProcess> {
        let extra: Vec<String> = extra.iter().map(|a| a.as_ref().to_owned()).collect();
        start_dedicated(&etcd_binary()?, &extra, None).await
    }

    /// Starts a dedicated etcd that serves clients over TLS only, at `https://127.0.0.1:<port>`
    /// ([`EtcdProcess::endpoints`]).
    ///
    /// `flags` are the server's TLS flags (`--cert-file`, `--key-file`; for client certificates
    /// `--client-cert-auth` and `--trusted-ca-file`: [`TestPki::server_flags`](super::TestPki::server_flags)
    /// gives them) and any others. Readiness is a status call made with `probe`: client TLS
    /// options the server accepts (also after a [`restart`](Self::restart)).
    ///
    /// # Errors
    ///
    /// As [`EtcdProcess::start`].
    pub async fn start_tls<S: AsRef<str>>(
        flags: &[S],
        probe: crate::TlsOptions,
    ) -> std::io::Result<EtcdProcess> {
        let flags: Vec<String> = flags.iter().map(|a| a.as_ref().to_owned()).collect();
        start_dedicated(&etcd_binary()?, &flags, Some(probe)).await
    }

    /// The client endpoint, `http://127.0.0.1:<port>` (`https://` for a TLS server).
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    /// The PID of the running etcd, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The directory holding etcd's data and its log (`etcd.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A backend on this etcd whose keys live under `prefix`.
    ///
    /// # Errors
    ///
    /// As [`EtcdBackendBuilder::connect`](crate::EtcdBackendBuilder::connect).
    pub async fn backend(&self, prefix: &str) -> locker_core::Result<EtcdBackend> {
        backend_at(self.endpoints(), prefix).await
    }

    fn send(&mut self, command: &str) -> std::io::Result<String> {
        let commands = self
            .commands
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the etcd supervisor is closed"))?;
        writeln!(commands, "{command}")?;
        commands.flush()?;
        let mut line = String::new();
        self.replies.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    fn read_started(&mut self) -> std::io::Result<u32> {
        let mut line = String::new();
        self.replies.read_line(&mut line)?;
        parse_started(&line)
    }

    /// Stops etcd gracefully (SIGTERM to its PID) and waits for it to exit. Its data is kept.
    ///
    /// # Errors
    ///
    /// If the supervisor is gone.
    pub fn stop(&mut self) -> std::io::Result<()> {
        self.send("stop")?;
        self.pid = None;
        Ok(())
    }

    /// Kills etcd at once (SIGKILL to its PID) and waits for it to exit. Its data is kept.
    ///
    /// # Errors
    ///
    /// If the supervisor is gone.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.send("kill")?;
        self.pid = None;
        Ok(())
    }

    /// Starts etcd again (same ports, same data) after [`stop`](Self::stop) or
    /// [`kill`](Self::kill), and waits until it answers. Nothing to do if it runs.
    ///
    /// # Errors
    ///
    /// If it does not start and answer within 20 s.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        if self.pid.is_some() {
            return Ok(());
        }
        let reply = self.send("start")?;
        self.pid = Some(parse_started(&reply)?);
        self.wait_ready().await
    }

    /// Starts etcd again without waiting for it to answer (a cluster member waits for its peers).
    pub(crate) fn start_no_wait(&mut self) -> std::io::Result<()> {
        if self.pid.is_none() {
            let reply = self.send("start")?;
            self.pid = Some(parse_started(&reply)?);
        }
        Ok(())
    }

    /// Waits until etcd answers a status request (over TLS for a TLS server), failing early if
    /// it exits.
    pub(crate) async fn wait_ready(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if answers(&self.client_url, self.probe.as_ref()).await {
                return Ok(());
            }
            if let Some(pid) = self.pid
                && has_exited(pid)
            {
                return Err(std::io::Error::other(format!(
                    "etcd exited before answering; its log ends with:\n{}",
                    self.log_tail()
                )));
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "etcd did not answer at {} within {READY_WITHIN:?}; its log ends with:\n{}",
                    self.client_url,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freezes etcd (SIGSTOP to its PID): it keeps its sockets but answers nothing.
    ///
    /// # Errors
    ///
    /// If it is not running or the signal cannot be sent.
    pub fn pause(&self) -> std::io::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws etcd after [`pause`](Self::pause) (SIGCONT to its PID).
    ///
    /// # Errors
    ///
    /// If it is not running or the signal cannot be sent.
    pub fn resume(&self) -> std::io::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> std::io::Result<()> {
        let pid = self
            .pid
            .ok_or_else(|| std::io::Error::other("etcd is not running"))?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "kill {signal} {pid}: {status}"
            )))
        }
    }

    /// The last lines of etcd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        // End-of-file on its stdin makes the supervisor stop etcd, wait and remove the directory.
        drop(self.commands.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.supervisor.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => break,
            }
        }
        // etcd ignored SIGTERM for 10 s: kill it, by its PID, and then the supervisor.
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_started(line: &str) -> std::io::Result<u32> {
    line.trim()
        .strip_prefix("started ")
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("unexpected supervisor answer {line:?}")))
}

/// Whether the process `pid` has exited (it is gone, or a zombie not yet reaped).
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
        // Without /proc (not Linux) we cannot tell; rely on the deadline.
        Err(_) => Path::new("/proc/self").exists(),
    }
}

/// Whether etcd answers a status request at `endpoint` (over TLS with `tls`) within a second.
async fn answers(endpoint: &str, tls: Option<&crate::TlsOptions>) -> bool {
    status_at(endpoint, tls, Duration::from_secs(1))
        .await
        .is_some()
}

/// Options for a plain etcd client: TLS with `tls`.
pub(crate) fn connect_options(tls: Option<&crate::TlsOptions>) -> ConnectOptions {
    let options = ConnectOptions::new();
    match tls {
        Some(tls) => options.with_tls(tls.clone()),
        None => options,
    }
}

/// etcd's answer to a status request at `endpoint` (over TLS with `tls`), if it comes within
/// `within` (connecting may take half of it).
pub(crate) async fn status_at(
    endpoint: &str,
    tls: Option<&crate::TlsOptions>,
    within: Duration,
) -> Option<etcd_client::StatusResponse> {
    let attempt = async {
        let options = connect_options(tls).with_connect_timeout(within / 2);
        let mut client = Client::connect([endpoint], Some(options)).await?;
        client.status().await
    };
    tokio::time::timeout(within, attempt).await.ok()?.ok()
}

const DEFAULT_IMAGE: &str = "quay.io/coreos/etcd:v3.5.17";

/// Splits `registry/name:tag` into name and tag (`latest` if none).
fn split_image(image: &str) -> (String, String) {
    let slash = image.rfind('/').map_or(0, |at| at + 1);
    match image[slash..].rfind(':') {
        Some(colon) => (
            image[..slash + colon].to_owned(),
            image[slash + colon + 1..].to_owned(),
        ),
        None => (image.to_owned(), "latest".to_owned()),
    }
}

/// A container started by [`EtcdServer::start_docker`]. A guard process removes it when the test process
/// ends, however it ends; dropping this removes it at once (and waits for `docker rm`).
#[derive(Debug)]
struct DockerContainer {
    id: String,
    image: String,
    // Held for its stdin: end-of-file makes the guard run `docker rm -f <id>`.
    guard: Option<Child>,
}

impl DockerContainer {
    fn new(id: String, image: &str) -> Self {
        let guard = Command::new("sh")
            .arg("-c")
            .arg(DOCKER_GUARD)
            .arg("locker-etcd-docker-guard")
            .arg(&id)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| {
                eprintln!(
                    "locker-etcd testing: cannot start the guard that removes container {id}: {err}"
                );
            })
            .ok();
        DockerContainer {
            id,
            image: image.to_owned(),
            guard,
        }
    }

    /// The last lines of the container's output (etcd logs on stderr).
    fn log_tail(&self) -> String {
        let output = Command::new("docker")
            .args(["logs", "--tail", "20", &self.id])
            .output();
        match output {
            Ok(output) => format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(err) => format!("(docker logs failed: {err})"),
        }
    }
}

impl Drop for DockerContainer {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            let _ = Command::new("docker")
                .args(["rm", "-f", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            return;
        };
        drop(guard.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while matches!(guard.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl EtcdServer {
    /// Starts a dedicated etcd in a Docker container of `image` (through `testcontainers`; it is
    /// pulled only if it is not there already) and waits until it answers a status request.
    ///
    /// The image's etcd is started as `LOCKER_ETCD_DOCKER_BIN` (default `/usr/local/bin/etcd`, where
    /// the `quay.io/coreos/etcd` images and `scripts/etcd-image.sh` put it), set as the entrypoint,
    /// listening on port 2379 of the container with its data in `/tmp` and `--unsafe-no-fsync`.
    /// Readiness is a successful status call on the mapped port, not a log line, so any etcd 3.4+
    /// image works. Dropping the returned target removes the container; so does the end of the test
    /// process.
    ///
    /// # Errors
    ///
    /// If Docker is not reachable, the image is missing and cannot be pulled, or etcd exits or does
    /// not answer within 60 s (the message quotes its log).
    pub async fn start_docker(image: &str) -> std::io::Result<EtcdServer> {
        start_docker(image).await.map_err(std::io::Error::other)
    }
}

async fn start_docker(image: &str) -> Result<EtcdServer, String> {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    const DOCKER_READY_WITHIN: Duration = Duration::from_secs(60);
    let binary = std::env::var("LOCKER_ETCD_DOCKER_BIN")
        .unwrap_or_else(|_| "/usr/local/bin/etcd".to_owned());
    let (name, tag) = split_image(image);
    // GenericImage's own settings (port, wait, entrypoint) must come before ImageExt's (cmd, ..).
    let container = GenericImage::new(name, tag)
        .with_exposed_port(2379.tcp())
        .with_wait_for(WaitFor::Nothing)
        .with_entrypoint(&binary)
        .with_cmd([
            "--name",
            "locker-test",
            "--data-dir",
            "/tmp/locker-etcd-data",
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "locker-test=http://127.0.0.1:2380",
            "--unsafe-no-fsync",
        ])
        .with_label("locker-tests", "etcd")
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .await
        .map_err(|err| format!("Docker could not start a container of {image}: {err}"))?;
    let docker = DockerContainer::new(container.id().to_owned(), image);
    let endpoint = async {
        let host = container.get_host().await?;
        let port = container.get_host_port_ipv4(2379.tcp()).await?;
        Ok::<_, testcontainers::TestcontainersError>(format!("http://{host}:{port}"))
    }
    .await;
    // `docker` removes the container; the handle's own drop (which needs the runtime it was made
    // on) must never run.
    std::mem::forget(container);
    let endpoint =
        endpoint.map_err(|err| format!("reading the port of container {}: {err}", docker.id))?;
    let deadline = Instant::now() + DOCKER_READY_WITHIN;
    let mut checked = Instant::now();
    while !answers(&endpoint, None).await {
        let now = Instant::now();
        if now >= checked + Duration::from_millis(500) {
            checked = now;
            if !container_runs(&docker.id) {
                return Err(format!(
                    "etcd in container {} of {image} exited before answering; its log ends \
                     with:\n{}",
                    docker.id,
                    docker.log_tail()
                ));
            }
        }
        if now >= deadline {
            return Err(format!(
                "etcd in container {} of {image} did not answer at {endpoint} within \
                 {DOCKER_READY_WITHIN:?}; its log ends with:\n{}",
                docker.id,
                docker.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(EtcdServer {
        endpoints: vec![endpoint],
        origin: Origin::Docker(docker),
    })
}

/// Whether the container `id` is running (false if `docker inspect` fails).
fn container_runs(id: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "--format", "{{.State.Running}}", id])
        .output()
        .is_ok_and(|output| output.status.success() && output.stdout.starts_with(b"true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_split() {
        assert_eq!(
            split_image("quay.io/coreos/etcd:v3.5.17"),
            ("quay.io/coreos/etcd".to_owned(), "v3.5.17".to_owned())
        );
        assert_eq!(
            split_image("localhost:5000/etcd"),
            ("localhost:5000/etcd".to_owned(), "latest".to_owned())
        );
        assert_eq!(
            split_image("etcd:3.4"),
            ("etcd".to_owned(), "3.4".to_owned())
        );
    }

    #[test]
    fn prefixes_are_unique() {
        assert_ne!(unique_prefix("a"), unique_prefix("a"));
        assert!(unique_prefix("a").ends_with('/'));
    }
}
