//! `Locker::watch`: a stream of the holder of a key, fed by the locker's watch of the store
//! for watch streams (the hub's `Feed::All`).

use std::collections::BTreeMap;

use futures::StreamExt;
use futures::stream::BoxStream;
use tracing::debug;

use crate::backend::{Entry, EventKind, Revision};
use crate::error::Result;
use crate::hub::{Heard, HubMsg, Subscription};
use crate::locker::Locker;
use crate::retry::Backoff;
use crate::types::{Holder, HolderUpdate};

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

/// The stream runs on the caller's task, polled by the caller: no task of its own, so a change
/// reaches the reader in one hop from the hub.
pub(crate) fn holder_stream(
    locker: Locker,
    key: String,
) -> BoxStream<'static, Result<HolderUpdate>> {
    let backoff = locker.backoff();
    let feed = Feed {
        locker,
        key,
        sub: None,
        view: None,
        last: None,
        backoff,
        done: false,
        said_stale: false,
        current_after_read: false,
        then: None,
    };
    futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next().await?;
        Some((item, feed))
    })
    .boxed()
}

/// A watch stream's state: its subscription, its view of the queue, and what it sent last.
struct Feed {
    locker: Locker,
    key: String,
    sub: Option<Subscription>,
    /// The queue as read, and the revision of the read (events at or before it are in it).
    view: Option<(Queue, Revision)>,
    last: Option<Option<Holder>>,
    backoff: Backoff,
    done: bool,
    /// `Stale` was yielded, and `Current` not since.
    said_stale: bool,
    /// The store is reachable again: yield `Current` after the next read.
    current_after_read: bool,
    /// An update to yield before anything else (`Current`, after the `Holder` it follows).
    then: Option<HolderUpdate>,
}

impl Feed {
    /// The next update; `None` once the stream has ended (after a permanent error).
    async fn next(&mut self) -> Option<Result<HolderUpdate>> {
        if self.done {
            return None;
        }
        if let Some(update) = self.then.take() {
            return Some(Ok(update));
        }
        let locker = self.locker.clone();
        let inner = &locker.inner;
        // Each round: subscribe (again after the hub's watch failed), read the queue (again
        // after a gap), follow events.
        loop {
            let Some(sub) = &mut self.sub else {
                match inner.hub.subscribe(&self.key).await {
                    Ok(sub) => {
                        let stale = sub.is_stale();
                        self.sub = Some(sub);
                        self.view = None;
                        if let Some(update) = self.reachability(stale) {
                            return Some(Ok(update));
                        }
                    }
                    Err(err) if !err.is_retryable() => return self.fail(err),
                    Err(err) => {
                        let delay = self.backoff.next_delay();
                        debug!(key = %self.key, error = %err, ?delay, "watch: subscribe failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
                continue;
            };
            let Some((queue, read_at)) = &mut self.view else {
                match inner.backend.entries(&self.key).await {
                    Ok(snapshot) => {
                        self.backoff.reset();
                        let queue = Queue::from_entries(snapshot.entries);
                        let holder = queue.holder();
                        self.view = Some((queue, snapshot.revision));
                        let current = std::mem::take(&mut self.current_after_read)
                            .then_some(HolderUpdate::Current);
                        match (changed(&mut self.last, holder), current) {
                            (Some(item), current) => {
                                self.then = current;
                                return Some(Ok(HolderUpdate::Holder(item)));
                            }
                            (None, Some(current)) => return Some(Ok(current)),
                            (None, None) => {}
                        }
                    }
                    Err(err) if err.is_retryable() => {
                        let delay = self.backoff.next_delay();
                        debug!(key = %self.key, error = %err, ?delay, "watch: read failed; retrying");
                        if sub.is_stale()
                            && let Some(update) = self.reachability(true)
                        {
                            return Some(Ok(update));
                        }
                        tokio::time::sleep(delay).await;
                    }
                    Err(err) => return self.fail(err),
                }
                continue;
            };
            match sub.recv().await {
                Some(Heard::Msg(HubMsg::Event(event))) => {
                    if event.entry.mod_revision <= *read_at {
                        continue;
                    }
                    queue.apply(event.kind, event.entry);
                    let holder = queue.holder();
                    if let Some(item) = changed(&mut self.last, holder) {
                        return Some(Ok(HolderUpdate::Holder(item)));
                    }
                }
                // History was lost, or the backlog dropped: read the queue again.
                Some(Heard::Msg(HubMsg::Resync)) => {
                    self.view = None;
                    return Some(Ok(HolderUpdate::Skipped));
                }
                Some(Heard::Stale(stale)) => {
                    if let Some(update) = self.reachability(stale) {
                        return Some(Ok(update));
                    }
                }
                // The hub's watch failed: subscribe again.
                None => self.sub = None,
            }
        }
    }

    /// Whether the store may be unreachable now: `Stale` to yield, once per outage; once it is
    /// reachable again, the queue is read afresh and `Current` follows the read.
    fn reachability(&mut self, stale: bool) -> Option<HolderUpdate> {
        if stale && !self.said_stale {
            self.said_stale = true;
            return Some(HolderUpdate::Stale);
        }
        if !stale && std::mem::take(&mut self.said_stale) {
            self.view = None;
            self.current_after_read = true;
        }
        None
    }

    fn fail(&mut self, err: crate::error::Error) -> Option<Result<HolderUpdate>> {
        self.done = true;
        self.sub = None;
        Some(Err(err))
    }
}

/// `holder` if it differs from the last one sent (and now the last one sent).
fn changed(last: &mut Option<Option<Holder>>, holder: Option<Holder>) -> Option<Option<Holder>> {
    if last.as_ref() == Some(&holder) {
        return None;
    }
    *last = Some(holder.clone());
    Some(holder)
}
