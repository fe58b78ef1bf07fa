//! Recording who believed they owned what, and when, on the one monotonic clock of the process,
//! and checking that no two beliefs on a key overlap; recording the states one handle published.

use std::sync::{Arc, Mutex};

use locker_core::{FencingToken, LockHandle, LossReason, Ownership};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One tenure as its holder believed it: from the moment it was published as owned to the moment
/// it was published as no longer owned (or the local deadline passed, whichever came first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenureRecord {
    /// Who held it (an index given by the test).
    pub client: usize,
    /// Its fencing token.
    pub token: FencingToken,
    /// When it began.
    pub from: Instant,
    /// When it ended; `None` while it lasts.
    pub until: Option<Instant>,
}

/// The tenures of every client on one key.
#[derive(Debug, Clone, Default)]
pub struct TenureLog(Arc<Mutex<Vec<TenureRecord>>>);

impl TenureLog {
    /// Records every tenure of `handle` as `client`'s, until the handle ends.
    pub fn follow(&self, client: usize, handle: &LockHandle) {
        let mut rx = handle.subscribe();
        let log = self.0.clone();
        tokio::spawn(async move {
            let mut current: Option<FencingToken> = None;
            loop {
                let state = *rx.borrow_and_update();
                current = note(&log, client, current, state, Instant::now());
                if rx.changed().await.is_err() {
                    if let Some(old) = current {
                        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                        end(&mut log, client, old, Instant::now());
                    }
                    return;
                }
            }
        });
    }

    /// Every tenure recorded so far, in the order they began.
    pub fn all(&self) -> Vec<TenureRecord> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        all.sort_by_key(|t| t.from);
        all
    }

    /// Panics if two clients' tenures overlap, or tokens do not increase in the order tenures
    /// began. Answers the number of tenures checked.
    pub fn assert_safe(&self) -> usize {
        let all = self.all();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                let a_end = a.until.unwrap_or_else(Instant::now);
                assert!(
                    a.client == b.client || b.from >= a_end,
                    "overlapping ownership: {a:?} and {b:?}"
                );
                assert!(b.token > a.token, "tokens not increasing: {a:?} then {b:?}");
            }
        }
        all.len()
    }
}

/// Records the change to `state` at `now`; answers the token now owned.
fn note(
    log: &Mutex<Vec<TenureRecord>>,
    client: usize,
    current: Option<FencingToken>,
    state: Ownership,
    now: Instant,
) -> Option<FencingToken> {
    let owned = match state {
        Ownership::Owned { token } | Ownership::Unconfirmed { token, .. } => Some(token),
        _ => None,
    };
    if current.is_some() && current == owned {
        return current;
    }
    let mut entries = log.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = current {
        end(&mut entries, client, old, now);
    }
    if let Some(token) = owned {
        entries.push(TenureRecord {
            client,
            token,
            from: now,
            until: None,
        });
    }
    owned
}

fn end(log: &mut [TenureRecord], client: usize, token: FencingToken, at: Instant) {
    if let Some(t) = log
        .iter_mut()
        .rev()
        .find(|t| t.client == client && t.token == token && t.until.is_none())
    {
        t.until = Some(at);
    }
}

/// Every state `handle` publishes ([`LockHandle::events`]: none coalesced away), starting with
/// the current one, each with when a task saw it, until one for which `until` is true (kept) or
/// the handle ends.
///
/// # Panics
///
/// In the task, if the events lag (more than 64 states unread).
pub fn states_until(
    handle: &LockHandle,
    until: impl Fn(&Ownership) -> bool + Send + 'static,
) -> JoinHandle<Vec<(Instant, Ownership)>> {
    let mut events = handle.events();
    let first = handle.ownership();
    tokio::spawn(async move {
        let mut seen = vec![(Instant::now(), first)];
        if until(&first) {
            return seen;
        }
        loop {
            match events.recv().await {
                Ok(state) => {
                    seen.push((Instant::now(), state));
                    if until(&state) {
                        return seen;
                    }
                }
                Err(RecvError::Closed) => return seen,
                Err(RecvError::Lagged(n)) => panic!("{n} states were not recorded"),
            }
        }
    })
}

/// How a tenure ended without an answer from the store, as [`assert_unconfirmed_before_loss`]
/// found it in recorded states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuspectedLoss {
    /// When the tenure was first seen `Unconfirmed`.
    pub unconfirmed_at: Instant,
    /// The deadline it was `Unconfirmed` with.
    pub deadline: Instant,
    /// When it was first seen no longer claimed.
    pub lost_at: Instant,
}

/// Checks that, in `seen` (from [`states_until`]), the tenure `token` was `Owned`, then
/// `Unconfirmed` with one deadline and never confirmed again, then `Lost` for
/// [`LossReason::DeadlinePassed`], not before that deadline.
///
/// # Panics
///
/// If it was not so; the message quotes `seen`.
pub fn assert_unconfirmed_before_loss(
    seen: &[(Instant, Ownership)],
    token: FencingToken,
) -> SuspectedLoss {
    let mut unconfirmed: Option<(Instant, Instant)> = None;
    for &(at, state) in seen {
        match (state, unconfirmed) {
            (Ownership::Owned { token: t }, None) if t == token => {}
            (Ownership::Unconfirmed { token: t, deadline }, None) if t == token => {
                unconfirmed = Some((at, deadline));
            }
            (Ownership::Unconfirmed { token: t, deadline }, Some((_, d)))
                if t == token && deadline == d => {}
            (Ownership::Lost { token: t, reason }, Some((unconfirmed_at, deadline)))
                if t == token =>
            {
                assert_eq!(
                    reason,
                    LossReason::DeadlinePassed,
                    "states: {}",
                    describe(seen)
                );
                assert!(
                    at >= deadline,
                    "lost before its deadline; states: {}",
                    describe(seen)
                );
                return SuspectedLoss {
                    unconfirmed_at,
                    deadline,
                    lost_at: at,
                };
            }
            _ => panic!(
                "tenure {token}: expected Owned, then Unconfirmed (one deadline), then not \
                 claimed; saw {state:?}; states: {}",
                describe(seen)
            ),
        }
    }
    panic!(
        "tenure {token}: never stopped claiming ownership; states: {}",
        describe(seen)
    )
}

/// Recorded states, one a line, with times (and deadlines) since the first.
pub fn describe(seen: &[(Instant, Ownership)]) -> String {
    let Some(&(start, _)) = seen.first() else {
        return "none".to_owned();
    };
    let mut lines = String::new();
    for &(at, state) in seen {
        let state = match state {
            Ownership::Unconfirmed { token, deadline } => format!(
                "Unconfirmed {{ token: {token}, deadline: +{:?} }}",
                deadline.saturating_duration_since(start)
            ),
            other => format!("{other:?}"),
        };
        lines.push_str(&format!("\n  +{:?} {state}", at.duration_since(start)));
    }
    lines
}
