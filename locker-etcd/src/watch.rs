//! All watches of a backend, multiplexed over one long-lived etcd watch stream.
//!
//! A background task (the *hub*) owns the gRPC watch stream. Watches are created on it one at a
//! time (etcd answers creations in order; the next is sent once the previous is `created`), and
//! responses are routed to each watch by its etcd watch id. When the stream breaks (a restart, a
//! lost connection), every watch on it ends with a retryable [`Error::Unavailable`], as the
//! `Watcher` contract allows: resuming from the revision after the last one delivered is the
//! caller's, done once, in locker-core's hub, with its back-off. A later watch opens a new
//! stream. A compaction ends the affected watch with [`Error::Compacted`]. Dropping a
//! [`WatchStream`]'s events cancels its watch on the server.
//!
//! The hub is started on the first `watch` call, on the caller's runtime, and restarted there if
//! that runtime has since shut down. It ends when the backend and every stream are gone.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use etcd_client::{
    Client, EventType, WatchClient, WatchFilterType, WatchOptions, WatchRequestSender,
    WatchResponse, WatchResponseStream,
};
use futures::{Stream, StreamExt};
use locker_core::backend::{Entry, EventKind, Revision, WatchEvent, WatchStream};
use locker_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use crate::backend::entry_from_kv;
use crate::error::{Context, is_unavailable, map_cancel_reason, map_error, timed_out};

type Batch = Result<Vec<WatchEvent>>;

enum Command {
    Create {
        id: u64,
        key: Vec<u8>,
        start: Option<Revision>,
        deletes_only: bool,
        reply: oneshot::Sender<Result<Revision>>,
        events: mpsc::UnboundedSender<Batch>,
    },
    Cancel {
        id: u64,
    },
}

/// The handle a backend keeps on its hub.
pub(crate) struct WatchMux {
    client: WatchClient,
    /// The client the watch client comes from, to authenticate again with (its credentials,
    /// if it has any).
    auth: Client,
    root: Arc<[u8]>,
    request_timeout: Duration,
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    next_id: AtomicU64,
}

impl WatchMux {
    pub(crate) fn new(
        client: WatchClient,
        auth: Client,
        root: &[u8],
        request_timeout: Duration,
    ) -> Self {
        WatchMux {
            client,
            auth,
            root: root.into(),
            request_timeout,
            commands: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends a command to the hub, starting (or restarting) the hub task if needed.
    fn send(&self, mut command: Command) -> mpsc::UnboundedSender<Command> {
        let mut commands = self.commands.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = commands.as_ref() {
            match sender.send(command) {
                Ok(()) => return sender.clone(),
                // The hub task is gone (its runtime shut down): start a new one.
                Err(mpsc::error::SendError(returned)) => command = returned,
            }
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let hub = MuxState::new(
            self.client.clone(),
            self.auth.clone(),
            self.root.clone(),
            self.request_timeout,
        );
        tokio::spawn(hub.run(receiver));
        // The receiver is alive (just made), so this send cannot fail.
        let _ = sender.send(command);
        *commands = Some(sender.clone());
        sender
    }

    /// Starts a watch of everything under `key` (a full etcd key, root included), or of its
    /// deletes only (etcd leaves the puts out: `NOPUT`).
    pub(crate) async fn watch(
        &self,
        key: Vec<u8>,
        start: Option<Revision>,
        deletes_only: bool,
    ) -> Result<WatchStream> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let (events, receiver) = mpsc::unbounded_channel();
        let commands = self.send(Command::Create {
            id,
            key,
            start,
            deletes_only,
            reply,
            events,
        });
        let events = Events {
            receiver,
            id,
            commands,
        };
        match tokio::time::timeout(self.request_timeout, answer).await {
            // Dropping `events` cancels the watch.
            Err(_) => Err(timed_out("watch creation", self.request_timeout)),
            Ok(Err(_)) => Err(Error::unavailable("the etcd watch task ended")),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Ok(Ok(start_revision))) => Ok(WatchStream {
                start_revision,
                events: Box::pin(events),
            }),
        }
    }
}

/// The events of one watch; dropping it cancels the watch.
struct Events {
    receiver: mpsc::UnboundedReceiver<Batch>,
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Stream for Events {
    type Item = Batch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Batch>> {
        self.receiver.poll_recv(cx)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        // The hub may be gone already; then there is nothing to cancel.
        let _ = self.commands.send(Command::Cancel { id: self.id });
    }
}

/// One watch, as the hub tracks it.
struct Watch {
    key: Vec<u8>,
    /// Deletes only (`NOPUT`).
    deletes_only: bool,
    /// The next revision the watch must deliver: where it (re)starts. `None` until first created
    /// when started "now".
    next: Option<Revision>,
    /// The revision the current creation asked for (for [`Error::Compacted`]).
    requested: Revision,
    etcd_id: Option<i64>,
    reply: Option<oneshot::Sender<Result<Revision>>>,
    events: mpsc::UnboundedSender<Batch>,
}

struct MuxState {
    client: WatchClient,
    auth: Client,
    root: Arc<[u8]>,
    request_timeout: Duration,
    watches: HashMap<u64, Watch>,
    by_etcd_id: HashMap<i64, u64>,
    /// Watches waiting to be created on the stream, in order.
    pending: VecDeque<u64>,
    /// The watch whose creation was sent and not answered yet.
    in_flight: Option<u64>,
    sender: Option<WatchRequestSender>,
    responses: Option<WatchResponseStream>,
}

impl MuxState {
    fn new(client: WatchClient, auth: Client, root: Arc<[u8]>, request_timeout: Duration) -> Self {
        MuxState {
            client,
            auth,
            root,
            request_timeout,
            watches: HashMap::new(),
            by_etcd_id: HashMap::new(),
            pending: VecDeque::new(),
            in_flight: None,
            sender: None,
            responses: None,
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            self.pump().await;
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                response = next_response(&mut self.responses) => self.response(response).await,
            }
        }
    }

    /// Opens the stream, or sends the next creation, when there is one to send.
    async fn pump(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        // Skip watches cancelled while they waited.
        while let Some(id) = self.pending.front() {
            if self.watches.contains_key(id) {
                break;
            }
            self.pending.pop_front();
        }
        let Some(&id) = self.pending.front() else {
            return;
        };
        let Some(watch) = self.watches.get_mut(&id) else {
            return;
        };
        let mut options = WatchOptions::new().with_prefix();
        if watch.deletes_only {
            options = options.with_filters([WatchFilterType::NoPut]);
        }
        if let Some(next) = watch.next {
            options = options.with_start_revision(next);
            watch.requested = next;
        }
        let key = watch.key.clone();
        if let Some(sender) = self.sender.as_mut() {
            self.pending.pop_front();
            self.in_flight = Some(id);
            if let Err(err) = sender.watch(key, Some(options)).await {
                self.broken(&err.to_string());
            }
            return;
        }
        let mut client = self.client.clone();
        match tokio::time::timeout(self.request_timeout, client.watch(key, Some(options))).await {
            Ok(Ok(stream)) => {
                let (sender, responses) = stream.split();
                self.sender = Some(sender);
                self.responses = Some(responses);
                self.pending.pop_front();
                self.in_flight = Some(id);
                tracing::debug!(watches = self.watches.len(), "opened etcd watch stream");
            }
            // Refused for good (credentials, permissions), or not open now: every watch waiting
            // for a stream fails with it (retryable or not, as the error is).
            Ok(Err(err)) => {
                let err = map_error(err, Context::op("watch"));
                tracing::debug!(error = %err, "etcd did not open the watch stream");
                self.broken_for_good(&err);
            }
            Err(_) => {
                self.broken_for_good(&timed_out("opening the watch stream", self.request_timeout))
            }
        }
    }

    /// Fails every watch (created, or waiting to be) with `err` and drops the stream.
    fn broken_for_good(&mut self, err: &Error) {
        self.sender = None;
        self.responses = None;
        self.in_flight = None;
        self.by_etcd_id.clear();
        let ids: Vec<u64> = self.watches.keys().copied().collect();
        for id in ids {
            self.fail(id, clone_error(err));
        }
        self.pending.clear();
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Create {
                id,
                key,
                start,
                deletes_only,
                reply,
                events,
            } => {
                let start = start.map(|start| start.max(1));
                self.watches.insert(
                    id,
                    Watch {
                        key,
                        deletes_only,
                        next: start,
                        requested: start.unwrap_or(0),
                        etcd_id: None,
                        reply: Some(reply),
                        events,
                    },
                );
                self.pending.push_back(id);
            }
            Command::Cancel { id } => {
                let Some(watch) = self.watches.remove(&id) else {
                    return;
                };
                // A watch still pending is skipped by `pump`; one in flight is cancelled when its
                // creation is answered.
                if let Some(etcd_id) = watch.etcd_id {
                    self.by_etcd_id.remove(&etcd_id);
                    self.cancel_on_server(etcd_id).await;
                }
            }
        }
    }

    async fn cancel_on_server(&mut self, etcd_id: i64) {
        if let Some(sender) = self.sender.as_mut()
            && let Err(err) = sender.cancel(etcd_id).await
        {
            self.broken(&err.to_string());
        }
    }

    async fn response(
        &mut self,
        response: Option<std::result::Result<WatchResponse, etcd_client::Error>>,
    ) {
        let response = match response {
            Some(Ok(response)) => response,
            Some(Err(err)) if is_refused(&err) => {
                // Refused for good on the stream itself: retrying cannot help.
                let err = map_error(err, Context::op("watch"));
                tracing::debug!(error = %err, "etcd refused the watch stream");
                self.broken_for_good(&err);
                return;
            }
            Some(Err(err)) => return self.broken(&err.to_string()),
            None => return self.broken("the server closed the stream"),
        };
        if response.created() {
            return self.created(&response).await;
        }
        let etcd_id = response.watch_id();
        // Progress notifications (-1) and answers for watches cancelled meanwhile.
        let Some(&id) = self.by_etcd_id.get(&etcd_id) else {
            return;
        };
        if response.canceled() {
            self.by_etcd_id.remove(&etcd_id);
            if let Some(watch) = self.watches.get_mut(&id) {
                watch.etcd_id = None;
            }
            if is_token_refused(response.cancel_reason()) {
                return self.authenticate_again(id).await;
            }
            let err = self.cancel_error(id, &response);
            return self.fail(id, err);
        }
        let Some(watch) = self.watches.get_mut(&id) else {
            return;
        };
        let batch: Vec<WatchEvent> = response
            .events()
            .iter()
            .filter_map(|event| convert(&self.root, event))
            .collect();
        let Some(last) = batch.last() else {
            return;
        };
        watch.next = Some(last.entry.mod_revision + 1);
        if watch.events.send(Ok(batch)).is_err() {
            // The consumer is gone; its Cancel command is on its way.
            tracing::trace!(watch = id, "watch consumer gone");
        }
    }

    async fn created(&mut self, response: &WatchResponse) {
        let Some(id) = self.in_flight.take() else {
            tracing::warn!("etcd answered a watch creation nobody asked for");
            return;
        };
        let etcd_id = response.watch_id();
        if response.canceled() {
            if is_token_refused(response.cancel_reason()) {
                return self.authenticate_again(id).await;
            }
            let err = self.cancel_error(id, response);
            return self.fail(id, err);
        }
        let Some(watch) = self.watches.get_mut(&id) else {
            // Cancelled while its creation was in flight.
            return self.cancel_on_server(etcd_id).await;
        };
        let revision = response.header().map_or(0, |header| header.revision());
        let start = *watch.next.get_or_insert(revision + 1);
        watch.etcd_id = Some(etcd_id);
        self.by_etcd_id.insert(etcd_id, id);
        if let Some(reply) = watch.reply.take() {
            // If the caller gave up waiting, its Cancel command is on its way.
            let _ = reply.send(Ok(start));
        }
    }

    fn cancel_error(&self, id: u64, response: &WatchResponse) -> Error {
        if response.compact_revision() > 0 {
            Error::Compacted {
                requested: self.watches.get(&id).map_or(0, |watch| watch.requested),
                compact_revision: response.compact_revision(),
            }
        } else {
            map_cancel_reason(response.cancel_reason())
        }
    }

    /// Ends a watch with an error.
    fn fail(&mut self, id: u64, err: Error) {
        let Some(mut watch) = self.watches.remove(&id) else {
            return;
        };
        if let Some(etcd_id) = watch.etcd_id {
            self.by_etcd_id.remove(&etcd_id);
        }
        match watch.reply.take() {
            Some(reply) => {
                let _ = reply.send(Err(err));
            }
            None => {
                let _ = watch.events.send(Err(err));
            }
        }
    }

    /// The stream broke: every watch on it (or waiting for it) ends with a retryable error; the
    /// caller resumes from the revision after the last one it saw.
    /// etcd refused the token the stream was opened with: it expired (`--auth-token-ttl`), or
    /// it was issued before a restart or by another member. A stream keeps the token it was
    /// opened with, so: authenticate again, then end every watch on the stream as broken
    /// (retryable; their callers resume), and the next stream opens with the new token. Only a
    /// refusal of the credentials themselves (a changed password, a removed user) ends the
    /// watch for good.
    async fn authenticate_again(&mut self, id: u64) {
        match tokio::time::timeout(self.request_timeout, self.auth.refresh_token()).await {
            Ok(Err(err)) => {
                let err = map_error(err, Context::op("authenticate"));
                if !err.is_retryable() {
                    tracing::warn!(error = %err, "etcd refused the credentials");
                    return self.fail(id, err);
                }
                self.broken(&format!(
                    "the auth token was refused; authenticating failed: {err}"
                ));
            }
            Err(_) => self.broken("the auth token was refused; authenticating timed out"),
            Ok(Ok(())) => {
                tracing::info!("etcd refused the watch stream's auth token; authenticated again");
                self.broken("the auth token was refused; authenticated again");
            }
        }
    }

    fn broken(&mut self, why: &str) {
        tracing::debug!(
            reason = why,
            watches = self.watches.len(),
            "etcd watch stream broke; every watch ends (the caller resumes)"
        );
        self.broken_for_good(&Error::unavailable(format!(
            "the etcd watch stream broke ({why}): watch again from the next revision"
        )));
    }
}

async fn next_response(
    responses: &mut Option<WatchResponseStream>,
) -> Option<std::result::Result<WatchResponse, etcd_client::Error>> {
    match responses.as_mut() {
        Some(responses) => responses.next().await,
        None => std::future::pending().await,
    }
}

/// A copy of an error for failing several watches at once (the source is not kept).
fn clone_error(err: &Error) -> Error {
    match err {
        Error::PermissionDenied { message, .. } => Error::PermissionDenied {
            message: message.clone(),
            source: None,
        },
        Error::Unavailable { message, .. } => Error::unavailable(message.clone()),
        other => Error::Backend {
            message: other.to_string(),
            retryable: other.is_retryable(),
            source: None,
        },
    }
}

/// Converts one etcd event, stripping the root from its key.
fn convert(root: &[u8], event: &etcd_client::Event) -> Option<WatchEvent> {
    let kv = event.kv()?;
    match event.event_type() {
        EventType::Put => Some(WatchEvent {
            kind: EventKind::Put,
            entry: entry_from_kv(root, kv)?,
        }),
        EventType::Delete => {
            let key = kv.key().strip_prefix(root)?;
            Some(WatchEvent {
                kind: EventKind::Delete,
                entry: Entry {
                    key: String::from_utf8_lossy(key).into_owned(),
                    value: Vec::new(),
                    lease: 0,
                    create_revision: 0,
                    mod_revision: kv.mod_revision(),
                },
            })
        }
    }
}

/// Whether etcd cancelled a watch because it refused the token (not the rights) it came with.
fn is_token_refused(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("auth token is expired")
}

/// Whether a failure means the store refuses the watch for good (credentials, permissions,
/// invalid request), rather than a broken link or an overloaded server worth retrying.
fn is_refused(err: &etcd_client::Error) -> bool {
    !is_unavailable(err) && !map_error_is_retryable(err)
}

fn map_error_is_retryable(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::ResourceExhausted,
        _ => false,
    }
}
