//! `Locker::watch`: a stream of the holder of a key, fed by the locker's one watch of the store.

use std::collections::BTreeMap;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tracing::debug;

use crate::backend::{Entry, EventKind, Revision};
use crate::error::Result;
use crate::hub::HubMsg;
use crate::locker::Locker;
use crate::types::Holder;

/// The queue of one key as this client knows it, oldest entry first.
#[derive(Debug, Default)]
struct Queue {
    by_revision: BTreeMap<Revision, Entry>,
}

impl Queue {
    fn from_entries(entries: Vec<Entry>) -> Self {
        Queue {
            by_revision: entries
                .into_iter()
                .map(|e| (e.create_revision, e))
                .collect(),
        }
    }

    fn apply(&mut self, kind: EventKind, entry: Entry) {
        match kind {
            EventKind::Put => {
                self.by_revision.insert(entry.create_revision, entry);
            }
            EventKind::Delete => self.by_revision.retain(|_, e| e.key != entry.key),
        }
    }

    fn holder(&self) -> Option<Holder> {
        self.by_revision
            .values()
            .next()
            .cloned()
            .map(Holder::from_entry)
    }
}

pub(crate) fn holder_stream(
    locker: Locker,
    key: String,
) -> BoxStream<'static, Result<Option<Holder>>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(feed(locker, key, tx));
    let abort = task.abort_handle();
    // Stop the feeding task when the stream is dropped.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let guard = AbortOnDrop(abort);
    futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|item| (item, (rx, guard)))
    })
    .boxed()
}

async fn feed(locker: Locker, key: String, tx: mpsc::UnboundedSender<Result<Option<Holder>>>) {
    let inner = &locker.inner;
    let mut last: Option<Option<Holder>> = None;
    let mut failures = 0u32;
    // Each round: subscribe (again after the hub's watch failed), read the queue, follow events.
    loop {
        let mut sub = match inner.hub.subscribe(&key).await {
            Ok(sub) => sub,
            Err(err) if !err.is_retryable() => {
                let _ = tx.send(Err(err));
                return;
            }
            Err(err) => {
                let delay = locker.retry_delay(&mut failures);
                debug!(%key, error = %err, ?delay, "watch: subscribe failed; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        'resync: loop {
            let snapshot = match inner.backend.entries(&key).await {
                Ok(snapshot) => snapshot,
                Err(err) if err.is_retryable() => {
                    let delay = locker.retry_delay(&mut failures);
                    debug!(%key, error = %err, ?delay, "watch: read failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(err) => {
                    let _ = tx.send(Err(err));
                    return;
                }
            };
            failures = 0;
            let read_at = snapshot.revision;
            let mut queue = Queue::from_entries(snapshot.entries);
            if !emit(&tx, &mut last, queue.holder()) {
                return;
            }
            loop {
                match sub.recv().await {
                    Some(HubMsg::Event(event)) => {
                        if event.entry.mod_revision <= read_at {
                            continue;
                        }
                        queue.apply(event.kind, event.entry);
                        if !emit(&tx, &mut last, queue.holder()) {
                            return;
                        }
                    }
                    Some(HubMsg::Resync) => continue 'resync,
                    // The hub's watch failed: subscribe again.
                    None => break 'resync,
                }
            }
        }
    }
}

/// Sends `holder` if it differs from the last one sent. `false` once the stream is dropped.
fn emit(
    tx: &mpsc::UnboundedSender<Result<Option<Holder>>>,
    last: &mut Option<Option<Holder>>,
    holder: Option<Holder>,
) -> bool {
    if last.as_ref() == Some(&holder) {
        return !tx.is_closed();
    }
    *last = Some(holder.clone());
    tx.send(Ok(holder)).is_ok()
}
