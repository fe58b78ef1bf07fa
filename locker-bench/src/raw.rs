//! The baselines' building blocks: plain `etcd-client` calls doing the minimum etcd work.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::task::JoinHandle;

use crate::BenchResult;

/// A lease kept alive every ttl/3 by a background task, as a lock client would; the task stops
/// when this is dropped (the lease then expires), or at [`RawLease::stop`].
pub(crate) struct RawLease {
    pub(crate) id: i64,
    keeper: JoinHandle<()>,
}

impl RawLease {
    pub(crate) async fn grant(client: &Client, ttl: Duration) -> BenchResult<RawLease> {
        let mut client = client.clone();
        let id = client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await?
            .id();
        let (mut keeper, mut responses) = client.lease_keep_alive(id).await?;
        let every = ttl / 3;
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                match responses.message().await {
                    Ok(Some(answer)) if answer.ttl() > 0 => {}
                    _ => return,
                }
            }
        });
        Ok(RawLease { id, keeper })
    }

    /// Stops keeping the lease alive (it expires after its TTL): a holder that vanished.
    pub(crate) fn stop(&self) {
        self.keeper.abort();
    }

    pub(crate) async fn revoke(self, client: &Client) {
        self.keeper.abort();
        let _ = client.clone().lease_revoke(self.id).await;
    }
}

impl Drop for RawLease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// The revision an answer was served at.
fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// `if create_revision(key) == 0 then put key value (lease)`.
fn create_txn(key: &[u8], lease: i64) -> Txn {
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            "v",
            Some(PutOptions::new().with_lease(lease)),
        )])
}

/// Create-if-absent, one txn: whether the key was created.
pub(crate) async fn try_create(client: &mut Client, key: &[u8], lease: i64) -> BenchResult<bool> {
    Ok(client.txn(create_txn(key, lease)).await?.succeeded())
}

/// Create-if-absent that must succeed, answering the key's create revision.
pub(crate) async fn create_revision(
    client: &mut Client,
    key: &[u8],
    lease: i64,
) -> BenchResult<i64> {
    let answer = client.txn(create_txn(key, lease)).await?;
    if !answer.succeeded() {
        return Err("create: the key was already there".into());
    }
    Ok(revision(answer.header()))
}

/// How many keys are under `prefix` (a count-only range).
pub(crate) async fn count(client: &mut Client, prefix: &[u8]) -> BenchResult<i64> {
    let options = GetOptions::new().with_prefix().with_count_only();
    Ok(client.get(prefix, Some(options)).await?.count())
}

/// Waits until `prefix` holds `n` keys, polling every millisecond (outside measured intervals).
pub(crate) async fn wait_count(client: &mut Client, prefix: &[u8], n: i64) -> BenchResult<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = count(client, prefix).await?;
        if seen == n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{} keys under the prefix, waited for {n}", seen).into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A watch stream whose `created` answer has been read.
pub(crate) async fn watch(
    client: &mut Client,
    key: &[u8],
    options: WatchOptions,
) -> BenchResult<WatchStream> {
    let mut stream = client.watch(key, Some(options)).await?;
    match stream.message().await? {
        Some(answer) if answer.created() => Ok(stream),
        other => Err(format!("watch not created: {other:?}").into()),
    }
}

/// Waits on `stream` for the delete of `key` at a revision after `after`.
pub(crate) async fn wait_delete(
    stream: &mut WatchStream,
    key: &[u8],
    after: i64,
) -> BenchResult<()> {
    loop {
        let answer = stream.message().await?.ok_or("watch stream ended")?;
        for event in answer.events() {
            if event.event_type() == EventType::Delete
                && let Some(kv) = event.kv()
                && kv.key() == key
                && kv.mod_revision() > after
            {
                return Ok(());
            }
        }
    }
}

/// One contender of a raw lock queue under `queue` (`.../key/`), the way a careful etcd user
/// would write it with the fewest round trips: one join txn that creates its entry and reads its
/// predecessor; one long-lived prefix watch (created once, never at a past revision); after the
/// predecessor's delete, one read for a new predecessor.
pub(crate) struct RawContender {
    client: Client,
    queue: Vec<u8>,
    entry: Vec<u8>,
    lease: RawLease,
    watch: WatchStream,
}

impl RawContender {
    pub(crate) async fn new(client: Client, queue: &[u8], ttl: Duration) -> BenchResult<Self> {
        let mut client = client;
        let lease = RawLease::grant(&client, ttl).await?;
        let mut entry = queue.to_vec();
        entry.extend_from_slice(format!("{:x}", lease.id).as_bytes());
        let watch = watch(&mut client, queue, WatchOptions::new().with_prefix()).await?;
        Ok(RawContender {
            client,
            queue: queue.to_vec(),
            entry,
            lease,
            watch,
        })
    }

    /// Joins the queue and waits until first in it.
    pub(crate) async fn acquire(&mut self) -> BenchResult<()> {
        let newest_two = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2);
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.entry.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    self.entry.clone(),
                    "v",
                    Some(PutOptions::new().with_lease(self.lease.id)),
                ),
                TxnOp::get(self.queue.clone(), Some(newest_two)),
            ]);
        let answer = self.client.txn(txn).await?;
        if !answer.succeeded() {
            return Err("raw contender: entry already there".into());
        }
        let mine = revision(answer.header());
        let mut read_at = mine;
        // The newest entry is ours (it was created by this txn); the second is the predecessor.
        let mut predecessor = match answer.op_responses().get(1) {
            Some(TxnOpResponse::Get(get)) => get.kvs().get(1).map(|kv| kv.key().to_vec()),
            _ => return Err("raw contender: txn without its range".into()),
        };
        while let Some(key) = predecessor {
            wait_delete(&mut self.watch, &key, read_at).await?;
            let before_me = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(mine - 1)
                .with_limit(1);
            let answer = self.client.get(self.queue.clone(), Some(before_me)).await?;
            read_at = revision(answer.header());
            predecessor = answer.kvs().first().map(|kv| kv.key().to_vec());
        }
        Ok(())
    }

    /// Deletes the entry: the hand-off.
    pub(crate) async fn release(&mut self) -> BenchResult<()> {
        self.client.delete(self.entry.clone(), None).await?;
        Ok(())
    }

    pub(crate) async fn close(self) {
        self.lease.revoke(&self.client).await;
    }
}

/// A range of the queue under `queue` (a prefix), sorted by create revision, at most 8 keys.
fn queue_range(queue: &[u8], order: SortOrder) -> TxnOp {
    TxnOp::get(
        queue,
        Some(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, order)
                .with_limit(8),
        ),
    )
}

/// The shape of our backend's join, in raw calls: `if create_revision(entry) == 0 then [put entry
/// (lease), range queue newest first, limit 8] else [range entry, range queue]`. Answers the
/// entry's create revision.
pub(crate) async fn join_shaped(
    client: &mut Client,
    queue: &[u8],
    entry: &[u8],
    lease: i64,
) -> BenchResult<i64> {
    let txn = Txn::new()
        .when([Compare::create_revision(entry, CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(entry, "v", Some(PutOptions::new().with_lease(lease))),
            queue_range(queue, SortOrder::Descend),
        ])
        .or_else(retried_join(queue, entry));
    commit_join(client, txn, "join-shaped txn").await
}

/// A join shape that skips the queue read when the queue is empty (tried, and measured slower
/// for etcd than reading it): `if create_revision(entry) == 0 then [txn(if create_revision(queue/*)
/// == 0 then [] else [range queue, newest first, limit 8]), put entry (lease)] else [range entry,
/// range queue]`. Answers the entry's create revision.
pub(crate) async fn join_skip_if_empty(
    client: &mut Client,
    queue: &[u8],
    entry: &[u8],
    lease: i64,
) -> BenchResult<i64> {
    let predecessor = Txn::new()
        .when([Compare::create_revision(queue, CompareOp::Equal, 0).with_prefix()])
        .or_else([queue_range(queue, SortOrder::Descend)]);
    let txn = Txn::new()
        .when([Compare::create_revision(entry, CompareOp::Equal, 0)])
        .and_then([
            TxnOp::txn(predecessor),
            TxnOp::put(entry, "v", Some(PutOptions::new().with_lease(lease))),
        ])
        .or_else(retried_join(queue, entry));
    commit_join(client, txn, "join-skip-if-empty txn").await
}

/// The `else` of a join: read the entry that is already there, and the whole queue.
fn retried_join(queue: &[u8], entry: &[u8]) -> [TxnOp; 2] {
    [
        TxnOp::get(entry, None),
        queue_range(queue, SortOrder::Ascend),
    ]
}

/// Sends a join txn; answers its revision (the new entry's create revision).
async fn commit_join(client: &mut Client, txn: Txn, what: &str) -> BenchResult<i64> {
    let answer = client.txn(txn).await?;
    if !answer.succeeded() {
        return Err(format!("{what}: the entry was already there").into());
    }
    Ok(revision(answer.header()))
}

/// The shape of our backend's release: `if create_revision(entry) == rev then delete entry`.
pub(crate) async fn guarded_delete(client: &mut Client, entry: &[u8], rev: i64) -> BenchResult<()> {
    let txn = Txn::new()
        .when([Compare::create_revision(entry, CompareOp::Equal, rev)])
        .and_then([TxnOp::delete(entry, None)]);
    if !client.txn(txn).await?.succeeded() {
        return Err("guarded delete: the entry changed".into());
    }
    Ok(())
}

/// A watch on a whole prefix, drained by a background task (as our locker's hub watches its whole
/// root); `deletes_only` filters out puts on the server. Stops when dropped.
pub(crate) struct DrainedWatch(JoinHandle<()>);

impl DrainedWatch {
    pub(crate) async fn open(
        client: &Client,
        prefix: &[u8],
        deletes_only: bool,
    ) -> BenchResult<Self> {
        let mut client = client.clone();
        let mut options = WatchOptions::new().with_prefix();
        if deletes_only {
            options = options.with_filters([etcd_client::WatchFilterType::NoPut]);
        }
        let mut stream = watch(&mut client, prefix, options).await?;
        Ok(DrainedWatch(tokio::spawn(async move {
            let _connection = client;
            while let Ok(Some(_)) = stream.message().await {}
        })))
    }
}

impl Drop for DrainedWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The shape of our backend's `update_value`: `if create_revision(key) == rev then put key value
/// (ignore lease)`.
pub(crate) async fn guarded_put(
    client: &mut Client,
    key: &[u8],
    rev: i64,
    value: &[u8],
) -> BenchResult<()> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, rev)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_ignore_lease()),
        )]);
    if !client.txn(txn).await?.succeeded() {
        return Err("guarded put: the key changed".into());
    }
    Ok(())
}
