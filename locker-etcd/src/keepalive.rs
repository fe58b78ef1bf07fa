//! One etcd keep-alive stream per lease, created on first use and re-created after it breaks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use locker_core::Result;
use locker_core::backend::LeaseId;
use tokio::time::Instant;

use crate::error::{Context, is_lease_not_found, is_unavailable, map_error, timed_out};

/// How long past its last known expiry an unused stream is kept before it is closed.
const IDLE_GRACE: Duration = Duration::from_secs(10);
/// How often the map is swept for streams of leases nobody refreshes any more.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// An open keep-alive stream of one lease.
struct Stream {
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    /// A request was sent whose answer was not read (the call was dropped mid-way): the next
    /// answer on this stream is not for the next request, so the stream must not be reused.
    owed: bool,
}

type Slot = Arc<tokio::sync::Mutex<Option<Stream>>>;

struct SlotEntry {
    slot: Slot,
    /// When the lease expires at the latest if nobody refreshes it; past it (and a grace) the
    /// stream is closed by a sweep.
    expires: Instant,
}

#[derive(Default)]
struct State {
    slots: HashMap<LeaseId, SlotEntry>,
    last_sweep: Option<Instant>,
}

/// The keep-alive streams of a backend, by lease.
#[derive(Default)]
pub(crate) struct KeepAlives {
    state: Mutex<State>,
}

/// What one refresh on a stream gave.
enum Refresh {
    /// The lease lives, with this TTL left.
    Alive(Duration),
    /// The lease is gone.
    Gone,
}

impl KeepAlives {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of `lease`, made if absent. Sweeps the map now and then.
    fn slot(&self, lease: LeaseId, request_timeout: Duration) -> Slot {
        let now = Instant::now();
        let mut state = self.lock();
        if state
            .last_sweep
            .is_none_or(|last| now.duration_since(last) >= SWEEP_EVERY)
        {
            state.last_sweep = Some(now);
            let before = state.slots.len();
            // A slot in use (locked, or referenced by a call) is kept whatever its expiry.
            state
                .slots
                .retain(|_, entry| entry.expires > now || Arc::strong_count(&entry.slot) > 1);
            let closed = before - state.slots.len();
            if closed > 0 {
                tracing::debug!(closed, "closed keep-alive streams of unrefreshed leases");
            }
        }
        state
            .slots
            .entry(lease)
            .or_insert_with(|| SlotEntry {
                slot: Slot::default(),
                expires: now + request_timeout * 2 + IDLE_GRACE,
            })
            .slot
            .clone()
    }

    /// Forgets the stream of `lease` (closing it once no call uses it).
    pub(crate) fn remove(&self, lease: LeaseId) {
        self.lock().slots.remove(&lease);
    }

    /// Forgets `slot` if it is still the slot of `lease`.
    fn remove_slot(&self, lease: LeaseId, slot: &Slot) {
        let mut state = self.lock();
        if state
            .slots
            .get(&lease)
            .is_some_and(|entry| Arc::ptr_eq(&entry.slot, slot))
        {
            state.slots.remove(&lease);
        }
    }

    fn refreshed(&self, lease: LeaseId, slot: &Slot, ttl: Duration) {
        let mut state = self.lock();
        if let Some(entry) = state.slots.get_mut(&lease)
            && Arc::ptr_eq(&entry.slot, slot)
        {
            entry.expires = Instant::now() + ttl + IDLE_GRACE;
        }
    }

    /// Refreshes `lease` once: `Some(ttl)` if it lives, `None` if it is gone.
    pub(crate) async fn keep_alive(
        &self,
        client: &LeaseClient,
        lease: LeaseId,
        request_timeout: Duration,
    ) -> Result<Option<Duration>> {
        let slot = self.slot(lease, request_timeout);
        let ctx = Context::op("lease keep-alive").lease(lease);
        let outcome =
            tokio::time::timeout(request_timeout, refresh_on_slot(client, lease, &slot)).await;
        match outcome {
            Err(_) => {
                // The stream may still owe the answer to the request just sent: drop it, so the
                // next call starts on a fresh stream and never reads a stale answer.
                self.remove_slot(lease, &slot);
                Err(timed_out("lease keep-alive", request_timeout))
            }
            Ok(Ok(Refresh::Alive(ttl))) => {
                self.refreshed(lease, &slot, ttl);
                Ok(Some(ttl))
            }
            Ok(Ok(Refresh::Gone)) => {
                self.remove_slot(lease, &slot);
                tracing::debug!(lease = format_args!("{lease:x}"), "lease is gone");
                Ok(None)
            }
            Ok(Err(err)) => {
                self.remove_slot(lease, &slot);
                Err(map_error(err, ctx))
            }
        }
    }
}

/// Refreshes on the slot's stream, re-creating the stream once if it turns out broken.
async fn refresh_on_slot(
    client: &LeaseClient,
    lease: LeaseId,
    slot: &Slot,
) -> Result<Refresh, etcd_client::Error> {
    let mut guard = slot.lock().await;
    if guard.as_ref().is_some_and(|stream| stream.owed) {
        *guard = None;
    }
    if let Some(stream) = guard.as_mut() {
        match refresh(stream).await {
            Ok(refresh) => return Ok(refresh),
            Err(err) if is_unavailable(&err) => {
                *guard = None;
                tracing::debug!(
                    lease = format_args!("{lease:x}"),
                    error = %err,
                    "keep-alive stream broke; re-creating it"
                );
            }
            Err(err) => {
                *guard = None;
                return Err(err);
            }
        }
    }
    // `LeaseClient::keep_alive` opens the stream with one refresh, but keeps that answer's TTL to
    // itself; a second refresh on the new stream answers it.
    let (keeper, responses) = match client.clone().keep_alive(lease).await {
        Ok(opened) => opened,
        Err(err) if is_lease_not_found(&err) => return Ok(Refresh::Gone),
        Err(err) => return Err(err),
    };
    tracing::debug!(
        lease = format_args!("{lease:x}"),
        "opened keep-alive stream"
    );
    let stream = guard.insert(Stream {
        keeper,
        responses,
        owed: false,
    });
    match refresh(stream).await {
        Ok(refresh) => Ok(refresh),
        Err(err) => {
            *guard = None;
            Err(err)
        }
    }
}

/// Sends one keep-alive request on `stream` and reads its answer.
async fn refresh(stream: &mut Stream) -> Result<Refresh, etcd_client::Error> {
    stream.owed = true;
    stream.keeper.keep_alive().await?;
    let answer = stream.responses.message().await?;
    stream.owed = false;
    match answer {
        Some(response) if response.ttl() > 0 => Ok(Refresh::Alive(Duration::from_secs(
            response.ttl().unsigned_abs(),
        ))),
        Some(_) => Ok(Refresh::Gone),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream closed".into(),
        )),
    }
}

/// Maps a missing lease on revoke to success, as the contract asks.
pub(crate) fn revoke_result(result: Result<(), etcd_client::Error>, lease: LeaseId) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(err) if is_lease_not_found(&err) => Ok(()),
        Err(err) => Err(map_error(err, Context::op("lease revoke").lease(lease))),
    }
}
