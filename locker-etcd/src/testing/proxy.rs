//! A small TCP proxy between one client and etcd, to cut, black-hole, heal and slow the link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

/// The state of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Bytes flow.
    Up,
    /// Connections are closed and new ones are closed at once: calls fail fast.
    Cut,
    /// Connections stay open but no byte moves: calls hang (a black hole).
    BlackHole,
}

#[derive(Debug)]
struct Shared {
    state: watch::Sender<LinkState>,
    latency_us: AtomicU64,
    upstream: SocketAddr,
}

/// A running proxy. It runs for as long as the tokio runtime that started it (a test's), even
/// when this handle is dropped: clients made through it keep working.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`.
    ///
    /// # Errors
    ///
    /// If no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: watch::channel(LinkState::Up).0,
            latency_us: AtomicU64::new(0),
            upstream,
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        debug!(%addr, %upstream, "proxy started");
        Ok(Proxy { addr, shared })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint URL clients connect to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the state of the link.
    pub fn set(&self, state: LinkState) {
        debug!(addr = %self.addr, ?state, "proxy link");
        self.shared.state.send_replace(state);
    }

    /// Adds `latency` to every chunk forwarded, each way (zero removes it).
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::Relaxed);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *shared.state.borrow() == LinkState::Cut {
            drop(client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(shared.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let mut up = tokio::spawn(pump(cr, sw, shared.clone()));
            let mut down = tokio::spawn(pump(sr, cw, shared));
            // When one direction ends, end the other: the connection is gone.
            tokio::select! {
                _ = &mut up => {}
                _ = &mut down => {}
            }
            up.abort();
            down.abort();
        });
    }
}

/// Copies bytes one way, obeying the link state; returns when the link is cut or a side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let mut state = shared.state.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Wait while black-holed; stop when cut.
        if !link_up(&mut state).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let latency = shared.latency_us.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        // Data read just before a black hole is held until it lifts; a cut drops it.
        if !link_up(&mut state).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while the link is black-holed: `true` once it is up, `false` if it is cut (or the proxy
/// is gone).
async fn link_up(state: &mut watch::Receiver<LinkState>) -> bool {
    loop {
        let now = *state.borrow_and_update();
        match now {
            LinkState::Up => return true,
            LinkState::Cut => return false,
            LinkState::BlackHole => {
                if state.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
