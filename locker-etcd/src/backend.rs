//! [`EtcdBackend`]: the locker backend contract on etcd's KV, lease and watch APIs.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, KeyValue, KvClient, LeaseClient,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use locker_core::backend::{
    Entry, Joined, Lease, LeaseId, Limits, Position, Resumption, Revision, Snapshot, WatchStream,
    entry_key, is_entry_of,
};
use locker_core::{Error, Fence, LockBackend, Result, Watcher};

use crate::config::{EtcdBackendBuilder, Settings};
use crate::error::{Context, map_error, timed_out};
use crate::keepalive::{KeepAlives, revoke_result};
use crate::watch::WatchMux;

/// How many keys a holder or predecessor read asks for at first. Entries of deeper queues (`k/b/..`
/// under `k/`) are filtered out; when a whole page is filtered away, the read pages on.
const PAGE: i64 = 8;

/// The bytes of one request kept for keys and request overhead; the rest is for the value.
const KEY_BUDGET: usize = 16 * 1024;
/// Request overhead counted in [`KEY_BUDGET`]: the raft request header (with the user name),
/// protobuf tags and lengths, the lease id, sort options.
const REQUEST_OVERHEAD: usize = 512;
/// How often the join transaction (the largest request) carries the key: the entry key three times
/// (compare, put, get) and the queue prefix four times (two ranges, each with a range end).
const KEY_COPIES: usize = 7;
/// `/` and 16 hex digits of a lease id.
const ENTRY_SUFFIX: usize = 17;
/// The smallest `max_request_bytes` accepted.
const MIN_REQUEST_BYTES: usize = 2 * KEY_BUDGET;

/// etcd's lease id for "no lease" (a put under it is bound to no lease).
const NO_LEASE: LeaseId = 0;

/// The TTL bounds etcd accepts: 2 s is its minimum with default settings (a shorter grant is
/// answered with 2 s); 9,000,000,000 s is `MaxLeaseTTL`.
const MIN_TTL: Duration = Duration::from_secs(2);
const MAX_TTL: Duration = Duration::from_secs(9_000_000_000);

/// The longest lock key for a root of `prefix_len` bytes.
fn max_key_len(prefix_len: usize) -> usize {
    ((KEY_BUDGET - REQUEST_OVERHEAD) / KEY_COPIES).saturating_sub(prefix_len + ENTRY_SUFFIX)
}

/// Checks that a prefix and a request limit leave room for keys and values.
pub(crate) fn check_room(prefix: &str, max_request_bytes: usize) -> Result<()> {
    if max_request_bytes < MIN_REQUEST_BYTES {
        return Err(Error::InvalidConfig(format!(
            "max_request_bytes of {max_request_bytes} is below the minimum of {MIN_REQUEST_BYTES}"
        )));
    }
    if max_key_len(prefix.len()) == 0 {
        return Err(Error::InvalidConfig(format!(
            "the prefix is {} bytes long, which leaves no room for keys (at most {} bytes)",
            prefix.len(),
            max_key_len(0) - 1
        )));
    }
    Ok(())
}

/// A locker backend on etcd.
///
/// Cheap to clone: clones share one connection, one watch stream and one keep-alive stream per
/// lease. See the [crate docs](crate) for the key layout and the requests each method makes.
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    kv: KvClient,
    lease: LeaseClient,
    settings: Settings,
    keep_alives: KeepAlives,
    watches: WatchMux,
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("prefix", &self.inner.settings.prefix)
            .field("request_timeout", &self.inner.settings.request_timeout)
            .field("max_request_bytes", &self.inner.settings.max_request_bytes)
            .finish_non_exhaustive()
    }
}

/// Where a paged queue read goes.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// From the oldest entry up: the holder.
    Oldest,
    /// From the newest entry down (below some create revision): the predecessor.
    Newest,
}

impl Order {
    fn sort(self) -> SortOrder {
        match self {
            Order::Oldest => SortOrder::Ascend,
            Order::Newest => SortOrder::Descend,
        }
    }
}

impl EtcdBackend {
    /// A builder: `EtcdBackend::builder().endpoints(["http://127.0.0.1:2379"]).connect().await`.
    pub fn builder() -> EtcdBackendBuilder {
        EtcdBackendBuilder::new()
    }

    /// A backend on a client you already have, with the default prefix `"locker/"`, request
    /// timeout and limits. No I/O.
    pub fn from_client(client: Client) -> Self {
        Self::from_client_with_prefix(client, crate::config::DEFAULT_PREFIX)
    }

    /// A backend on a client you already have, under `prefix`. No I/O.
    ///
    /// A prefix too long to leave room for keys (over about 2,200 bytes) gives a
    /// [`max_key_len`](Limits::max_key_len) of 0, so every key is refused by core.
    pub fn from_client_with_prefix(client: Client, prefix: impl Into<String>) -> Self {
        Self::from_parts(client, Settings::new(prefix.into()))
    }

    pub(crate) fn from_parts(client: Client, settings: Settings) -> Self {
        // Reads of a whole queue and watch batches may be larger than tonic's default 4 MiB.
        let kv = client.kv_client().max_decoding_message_size(usize::MAX);
        let watch = client.watch_client().max_decoding_message_size(usize::MAX);
        let watches = WatchMux::new(
            watch,
            client.clone(),
            settings.prefix.as_bytes(),
            settings.request_timeout,
        );
        EtcdBackend {
            inner: Arc::new(Inner {
                client: client.clone(),
                kv,
                lease: client.lease_client(),
                settings,
                keep_alives: KeepAlives::default(),
                watches,
            }),
        }
    }

    /// The key root this backend works under.
    pub fn prefix(&self) -> &str {
        &self.inner.settings.prefix
    }

    /// The etcd client this backend uses (its connection, credentials and TLS), for what locker
    /// does not do: a fenced write ([`txn_fenced`](EtcdBackend::txn_fenced)), or any other call.
    /// Cheap to clone.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The full etcd key of a tenure's entry: the prefix, then [`Fence::entry_key`].
    pub fn fence_key(&self, fence: &Fence) -> Vec<u8> {
        self.full(&fence.entry_key())
    }

    /// The compare that fences a transaction to a tenure: its entry still exists with the
    /// tenure's create revision (its token). Once the tenure has ended (released, lost, its lease
    /// revoked or expired, its entry deleted), the entry is gone or another one, and the compare
    /// fails. Go's `Mutex.IsOwner` makes the same compare. Put it in a transaction of your own
    /// with `Txn::when`, next to compares of your own, or use
    /// [`txn_fenced`](EtcdBackend::txn_fenced).
    pub fn fence_compare(&self, fence: &Fence) -> Compare {
        Compare::create_revision(
            self.fence_key(fence),
            CompareOp::Equal,
            fence.token().as_i64(),
        )
    }

    /// Runs `ops` in one etcd transaction fenced to the tenure of `fence`
    /// ([`fence_compare`](EtcdBackend::fence_compare)): they are applied only if the tenure is
    /// still the entry's in the store when etcd runs the transaction, however late that is.
    /// Answers etcd's response (its `op_responses` are those of `ops`), or `None` if the fence
    /// refused the write: the tenure had ended, and nothing was applied. Nothing is read first,
    /// so there is no check-then-act race.
    ///
    /// ```no_run
    /// # async fn f(backend: locker_etcd::EtcdBackend, locker: locker_core::Locker) -> locker_core::Result<()> {
    /// use locker_etcd::etcd_client::TxnOp;
    ///
    /// let guard = locker.acquire("jobs/report", "worker-1").await?;
    /// let write = TxnOp::put("reports/latest", "done", None);
    /// match backend.txn_fenced(guard.fence(), [write]).await? {
    ///     Some(_) => println!("written under token {}", guard.token()),
    ///     None => println!("refused: the tenure had ended"),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Store failures, as for every call (the write was not applied if the error is not
    /// retryable; a retryable one may have been).
    pub async fn txn_fenced(
        &self,
        fence: &Fence,
        ops: impl Into<Vec<TxnOp>>,
    ) -> Result<Option<TxnResponse>> {
        let txn = Txn::new().when([self.fence_compare(fence)]).and_then(ops);
        let (response, _) = self.txn(txn, Context::op("fenced txn")).await?;
        Ok(response.succeeded().then_some(response))
    }

    fn root(&self) -> &[u8] {
        self.inner.settings.prefix.as_bytes()
    }

    /// The full etcd key of a key relative to the root.
    fn full(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.root().len() + key.len());
        full.extend_from_slice(self.root());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// The full etcd prefix of the queue of `key`: `<root><key>/`.
    fn queue_prefix(&self, key: &str) -> Vec<u8> {
        let mut prefix = self.full(key);
        prefix.push(b'/');
        prefix
    }

    /// Runs one request under the request timeout, mapping its error.
    async fn call<T>(
        &self,
        ctx: Context,
        request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.inner.settings.request_timeout, request).await {
            Ok(result) => result.map_err(|err| map_error(err, ctx)),
            Err(_) => Err(timed_out(ctx.op, self.inner.settings.request_timeout)),
        }
    }

    async fn txn(&self, txn: Txn, ctx: Context) -> Result<(TxnResponse, Revision)> {
        let mut kv = self.inner.kv.clone();
        let response = self.call(ctx, kv.txn(txn)).await?;
        let revision = response
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| malformed("a txn response without a header"))?;
        Ok((response, revision))
    }

    async fn range(
        &self,
        key: Vec<u8>,
        options: GetOptions,
        ctx: Context,
    ) -> Result<(GetResponse, Revision)> {
        let mut kv = self.inner.kv.clone();
        let response = self.call(ctx, kv.get(key, Some(options))).await?;
        let revision = response
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| malformed("a range response without a header"))?;
        Ok((response, revision))
    }

    /// The entry of a stored key, or `None` for a key outside the root.
    fn entry(&self, kv: &KeyValue) -> Option<Entry> {
        entry_from_kv(self.root(), kv)
    }

    /// Range options for a queue read: sorted by create revision, `limit` keys at most.
    fn queue_options(order: Order, limit: i64) -> GetOptions {
        GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, order.sort())
            .with_limit(limit)
    }

    /// Range options for a read of a whole queue, oldest first.
    fn whole_queue_options() -> GetOptions {
        GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
    }

    /// The first entry of the queue of `key` in `order`, starting from a first page read at
    /// `revision` and paging on at that same revision while whole pages are entries of deeper
    /// queues.
    ///
    /// Pages overlap by one create revision (`min/max_create_revision` inclusive) so that keys
    /// sharing a create revision with the last key of a page are not skipped; keys already seen
    /// are ignored, and the page size doubles when a page brings nothing new.
    async fn first_of_queue(
        &self,
        key: &str,
        order: Order,
        first: GetResponse,
        revision: Revision,
        except: Option<&str>,
    ) -> Result<Option<Entry>> {
        let mut page = first;
        let mut limit = PAGE;
        let mut boundary: Option<(Revision, HashSet<Vec<u8>>)> = None;
        loop {
            let mut fresh = 0usize;
            for kv in page.kvs() {
                if let Some((at, seen)) = &boundary
                    && kv.create_revision() == *at
                    && seen.contains(kv.key())
                {
                    continue;
                }
                fresh += 1;
                if let Some(entry) = self.entry(kv)
                    && is_entry_of(&entry.key, key)
                    && except != Some(entry.key.as_str())
                {
                    return Ok(Some(entry));
                }
            }
            let Some(last) = page.kvs().last() else {
                return Ok(None);
            };
            if !page.more() {
                return Ok(None);
            }
            let last_revision = last.create_revision();
            let at_boundary = page
                .kvs()
                .iter()
                .filter(|kv| kv.create_revision() == last_revision)
                .map(|kv| kv.key().to_vec());
            match &mut boundary {
                Some((at, seen)) if *at == last_revision => seen.extend(at_boundary),
                _ => boundary = Some((last_revision, at_boundary.collect())),
            }
            if fresh == 0 {
                limit = limit.saturating_mul(2);
            }
            let options = Self::queue_options(order, limit).with_revision(revision);
            let options = match order {
                Order::Oldest => options.with_min_create_revision(last_revision),
                Order::Newest => options.with_max_create_revision(last_revision),
            };
            let ctx = Context::op("queue range").revision(revision);
            page = self.range(self.queue_prefix(key), options, ctx).await?.0;
        }
    }

    async fn join_once(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
        let relative = entry_key(key, lease);
        let entry = self.full(&relative);
        let queue = self.queue_prefix(key);
        // After the put, the newest entries of the queue: ours first, then our predecessor.
        let txn = Txn::new()
            .when([Compare::create_revision(entry.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    entry.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::get(
                    queue.clone(),
                    Some(Self::queue_options(Order::Newest, PAGE)),
                ),
            ])
            .or_else([
                TxnOp::get(entry, None),
                TxnOp::get(queue, Some(Self::whole_queue_options())),
            ]);
        let (response, revision) = self.txn(txn, Context::op("join").lease(lease)).await?;
        let mut ops = response.op_responses();
        if response.succeeded() {
            // Pages on (at the txn's revision) only if the page held nothing but our entry and
            // entries of deeper queues.
            let newest = take_get_response(&mut ops, 1)?;
            let predecessor = self
                .first_of_queue(key, Order::Newest, newest, revision, Some(&relative))
                .await?;
            let entry = Entry {
                key: relative,
                value: value.to_vec(),
                lease,
                create_revision: revision,
                mod_revision: revision,
            };
            return Ok(Joined {
                entry,
                predecessor,
                revision,
            });
        }
        // A retried join: the entry is there from before, somewhere in the queue.
        let entry = get_response(&ops, 0)?
            .kvs()
            .first()
            .and_then(|kv| self.entry(kv))
            .ok_or_else(|| malformed("join found its entry but read nothing"))?;
        let predecessor = get_response(&ops, 1)?
            .kvs()
            .iter()
            .filter(|kv| kv.create_revision() < entry.create_revision)
            .filter_map(|kv| self.entry(kv))
            .filter(|other| is_entry_of(&other.key, key))
            .max_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
        Ok(Joined {
            entry,
            predecessor,
            revision,
        })
    }

    async fn position_once(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Result<Position> {
        let mut ops = vec![TxnOp::get(self.full(entry_key), None)];
        // `max_create_revision` 0 means "no bound" to etcd: nothing is older than revision 1.
        let has_older = create_revision > 1;
        if has_older {
            ops.push(TxnOp::get(
                self.queue_prefix(key),
                Some(
                    Self::queue_options(Order::Newest, PAGE)
                        .with_max_create_revision(create_revision - 1),
                ),
            ));
        }
        let (response, revision) = self
            .txn(Txn::new().and_then(ops), Context::op("position"))
            .await?;
        let mut ops = response.op_responses();
        let own = get_response(&ops, 0)?
            .kvs()
            .first()
            .filter(|kv| kv.create_revision() == create_revision)
            .and_then(|kv| self.entry(kv));
        let predecessor = if has_older {
            let page = take_get_response(&mut ops, 1)?;
            self.first_of_queue(key, Order::Newest, page, revision, None)
                .await?
        } else {
            None
        };
        Ok(Position {
            own,
            predecessor,
            revision,
        })
    }

    async fn holder_once(&self, key: &str) -> Result<(Option<Entry>, Revision)> {
        let (first, revision) = self
            .range(
                self.queue_prefix(key),
                Self::queue_options(Order::Oldest, PAGE),
                Context::op("holder range"),
            )
            .await?;
        let holder = self
            .first_of_queue(key, Order::Oldest, first, revision, None)
            .await?;
        Ok((holder, revision))
    }
}

/// Runs a paged read again when etcd compacted the revision it pages at (the first read is at the
/// newest revision and cannot be compacted, so a retry nearly always succeeds).
async fn retry_compacted<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(Error::Compacted { .. }) if tries < 3 => tries += 1,
            other => return other,
        }
    }
}

/// The range answer at `index` of a transaction's answers.
fn get_response(ops: &[TxnOpResponse], index: usize) -> Result<&GetResponse> {
    match ops.get(index) {
        Some(TxnOpResponse::Get(response)) => Ok(response),
        _ => Err(malformed("a txn answer without the expected range")),
    }
}

/// Takes the range answer at `index` out of a txn's answers (no copy of its keys and values).
fn take_get_response(ops: &mut Vec<TxnOpResponse>, index: usize) -> Result<GetResponse> {
    match (index < ops.len()).then(|| ops.swap_remove(index)) {
        Some(TxnOpResponse::Get(response)) => Ok(response),
        _ => Err(malformed("a txn answer without the expected range")),
    }
}

fn malformed(what: &str) -> Error {
    Error::Backend {
        message: format!("unexpected answer from etcd: {what}"),
        retryable: false,
        source: None,
    }
}

/// The entry of a stored key, its key made relative to `root`; `None` for a key outside the root.
/// Keys that are not UTF-8 are converted lossily, so they still count in their queue.
pub(crate) fn entry_from_kv(root: &[u8], kv: &KeyValue) -> Option<Entry> {
    let key = kv.key().strip_prefix(root)?;
    Some(Entry {
        key: String::from_utf8_lossy(key).into_owned(),
        value: kv.value().to_vec(),
        lease: kv.lease(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

#[async_trait]
impl Watcher for EtcdBackend {
    /// One watch on the backend's shared watch stream (see the [crate docs](crate)).
    async fn watch(&self, prefix: &str, from_revision: Option<Revision>) -> Result<WatchStream> {
        self.inner
            .watches
            .watch(self.full(prefix), from_revision, false)
            .await
    }

    /// The same, with etcd's `NOPUT` filter: etcd leaves the puts out, so they never cross the
    /// network.
    async fn watch_deletes(
        &self,
        prefix: &str,
        from_revision: Option<Revision>,
    ) -> Result<WatchStream> {
        self.inner
            .watches
            .watch(self.full(prefix), from_revision, true)
            .await
    }
}

#[async_trait]
impl LockBackend for EtcdBackend {
    /// - `max_value_len` = `max_request_bytes` − 16 KiB: the join transaction carries the value
    ///   once and keys seven times; 16 KiB are kept for keys and request overhead.
    /// - `max_key_len` = (16 KiB − 512 B overhead) / 7 − prefix length − 17 (`/` and 16 hex digits
    ///   of the lease id): about 2,240 bytes with the default prefix.
    /// - TTL between 2 s (etcd's minimum) and 9,000,000,000 s (etcd's `MaxLeaseTTL`).
    fn limits(&self) -> Limits {
        Limits {
            max_key_len: max_key_len(self.inner.settings.prefix.len()),
            max_value_len: self
                .inner
                .settings
                .max_request_bytes
                .saturating_sub(KEY_BUDGET),
            min_ttl: MIN_TTL,
            max_ttl: MAX_TTL,
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
        let mut lease = self.inner.lease.clone();
        let response = self
            .call(Context::op("lease grant"), lease.grant(seconds, None))
            .await?;
        if !response.error().is_empty() {
            return Err(Error::Backend {
                message: format!("etcd lease grant failed: {}", response.error()),
                retryable: false,
                source: None,
            });
        }
        let granted = Lease {
            id: response.id(),
            ttl: Duration::from_secs(response.ttl().unsigned_abs()),
        };
        tracing::debug!(lease = format_args!("{:x}", granted.id), ttl = ?granted.ttl, "granted lease");
        Ok(granted)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
        self.inner
            .keep_alives
            .keep_alive(
                &self.inner.lease,
                lease,
                self.inner.settings.request_timeout,
            )
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.keep_alives.remove(lease);
        let mut client = self.inner.lease.clone();
        let result =
            match tokio::time::timeout(self.inner.settings.request_timeout, client.revoke(lease))
                .await
            {
                Ok(result) => result.map(drop),
                Err(_) => {
                    return Err(timed_out(
                        "lease revoke",
                        self.inner.settings.request_timeout,
                    ));
                }
            };
        revoke_result(result, lease)?;
        tracing::debug!(lease = format_args!("{lease:x}"), "revoked lease");
        Ok(())
    }

    /// One transaction:
    ///
    /// ```text
    /// if create_revision(entry) == 0
    /// then [ put entry value lease, range queue (newest first, 8 keys) ]
    /// else [ range entry, range queue (whole, oldest first) ]
    /// ```
    ///
    /// A new entry is the newest of its queue, so its predecessor is the next entry of the range
    /// read after the put (newest first). That read pages on (at the same revision) only if its
    /// first page holds nothing but the new entry and entries of deeper queues. A retried join,
    /// whose entry exists, reads the whole queue and picks the predecessor from it.
    ///
    /// Lease 0 is etcd's "no lease": a put under it would create an entry that never expires, so
    /// it is refused as a lease the store does not know, without a request.
    async fn join(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined> {
        if lease == NO_LEASE {
            return Err(Error::LeaseLost { lease });
        }
        retry_compacted(|| self.join_once(key, lease, value)).await
    }

    /// One transaction with two ranges: the entry, and the queue's newest entry created before
    /// `create_revision` (paging as for [`join`](LockBackend::join)).
    async fn position(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Result<Position> {
        retry_compacted(|| self.position_once(key, entry_key, create_revision)).await
    }

    /// One range sorted by create revision (paging as for [`join`](LockBackend::join)).
    async fn holder(&self, key: &str) -> Result<(Option<Entry>, Revision)> {
        retry_compacted(|| self.holder_once(key)).await
    }

    /// One range of the whole queue prefix sorted by create revision, entries of deeper queues
    /// left out.
    async fn entries(&self, key: &str) -> Result<Snapshot> {
        let (response, revision) = self
            .range(
                self.queue_prefix(key),
                Self::whole_queue_options(),
                Context::op("queue range"),
            )
            .await?;
        let entries = response
            .kvs()
            .iter()
            .filter_map(|kv| self.entry(kv))
            .filter(|entry| is_entry_of(&entry.key, key))
            .collect();
        Ok(Snapshot { entries, revision })
    }

    /// One transaction: `if create_revision(entry) == create_revision then delete entry`.
    async fn delete_entry(&self, entry_key: &str, create_revision: Revision) -> Result<bool> {
        if create_revision <= 0 {
            // `create_revision == 0` would match an absent key; no entry has such a revision.
            return Ok(false);
        }
        let key = self.full(entry_key);
        let txn = guarded(&key, create_revision, TxnOp::delete(key.clone(), None));
        let (response, _) = self.txn(txn, Context::op("delete entry")).await?;
        let deleted = response
            .op_responses()
            .iter()
            .any(|op| matches!(op, TxnOpResponse::Delete(delete) if delete.deleted() > 0));
        Ok(response.succeeded() && deleted)
    }

    /// One transaction: `if create_revision(entry) == create_revision then put entry value` with
    /// `ignore_lease`, so the entry keeps whatever lease it is bound to (etcd ≥ 3.3).
    async fn update_value(
        &self,
        entry_key: &str,
        create_revision: Revision,
        value: &[u8],
    ) -> Result<Option<Revision>> {
        if create_revision <= 0 {
            return Ok(None);
        }
        let key = self.full(entry_key);
        let put = TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_ignore_lease()),
        );
        let txn = guarded(&key, create_revision, put);
        let (response, revision) = self.txn(txn, Context::op("update value")).await?;
        Ok(response.succeeded().then_some(revision))
    }

    /// One transaction:
    ///
    /// ```text
    /// if create_revision(entry) == create_revision && mod_revision(entry) == mod_revision
    /// then [ put entry value (ignore_lease), range entry, range queue (newest before it, 8 keys) ]
    /// else [ range entry ]
    /// ```
    ///
    /// (paging on as for [`position`](LockBackend::position) if the first page holds only
    /// entries of deeper queues).
    async fn resume(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
        mod_revision: Revision,
        value: &[u8],
    ) -> Result<Resumption> {
        if create_revision <= 0 {
            return Ok(Resumption::Refused(None));
        }
        let full = self.full(entry_key);
        let mut then = vec![
            TxnOp::put(
                full.clone(),
                value,
                Some(PutOptions::new().with_ignore_lease()),
            ),
            TxnOp::get(full.clone(), None),
        ];
        // `max_create_revision` 0 means "no bound" to etcd: nothing is older than revision 1.
        let has_older = create_revision > 1;
        if has_older {
            then.push(TxnOp::get(
                self.queue_prefix(key),
                Some(
                    Self::queue_options(Order::Newest, PAGE)
                        .with_max_create_revision(create_revision - 1),
                ),
            ));
        }
        let txn = Txn::new()
            .when([
                Compare::create_revision(full.clone(), CompareOp::Equal, create_revision),
                Compare::mod_revision(full.clone(), CompareOp::Equal, mod_revision),
            ])
            .and_then(then)
            .or_else([TxnOp::get(full, None)]);
        let (response, revision) = self.txn(txn, Context::op("resume")).await?;
        let succeeded = response.succeeded();
        let mut ops = response.op_responses();
        let at = if succeeded { 1 } else { 0 };
        let entry = get_response(&ops, at)?
            .kvs()
            .first()
            .filter(|kv| kv.create_revision() == create_revision)
            .and_then(|kv| self.entry(kv));
        if !succeeded {
            return Ok(Resumption::Refused(entry));
        }
        let entry = entry.ok_or_else(|| malformed("resume wrote the entry but read nothing"))?;
        let predecessor = if has_older {
            let page = take_get_response(&mut ops, 2)?;
            self.first_of_queue(key, Order::Newest, page, revision, None)
                .await?
        } else {
            None
        };
        Ok(Resumption::Resumed(Joined {
            entry,
            predecessor,
            revision,
        }))
    }
}

/// `if create_revision(key) == create_revision then op`: an operation on an entry that still is
/// the one created at `create_revision`.
fn guarded(key: &[u8], create_revision: Revision, op: TxnOp) -> Txn {
    Txn::new()
        .when([Compare::create_revision(
            key,
            CompareOp::Equal,
            create_revision,
        )])
        .and_then([op])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_room_for_the_join_transaction() {
        let prefix = "locker/";
        let key = max_key_len(prefix.len());
        assert_eq!(key, (KEY_BUDGET - REQUEST_OVERHEAD) / KEY_COPIES - 7 - 17);
        let entry = prefix.len() + key + ENTRY_SUFFIX;
        let queue = prefix.len() + key + 1;
        let value = crate::config::DEFAULT_MAX_REQUEST_BYTES - KEY_BUDGET;
        assert!(3 * entry + 4 * queue + value + REQUEST_OVERHEAD <= 1_572_864);
    }

    /// The memory backend's defaults are what etcd accepts with the default prefix and request
    /// limit, so that a key etcd refuses is refused in tests on the memory backend too.
    #[tokio::test]
    async fn memory_default_limits_are_those_of_etcd() {
        // Connecting is lazy: no etcd is needed to build the backend and ask its limits.
        let client = Client::connect(["http://127.0.0.1:1"], None)
            .await
            .expect("a lazily connecting client");
        let backend = EtcdBackend::from_client(client);
        assert_eq!(backend.prefix(), crate::config::DEFAULT_PREFIX);
        assert_eq!(
            backend.limits(),
            locker_memory::MemoryBackend::DEFAULT_LIMITS
        );
        assert_eq!(backend.limits().max_key_len, 2_243);
        assert_eq!(backend.limits().max_value_len, 1_556_480);
    }

    /// Lease 0 is etcd's "no lease": a join under it is refused before any request, instead of
    /// creating an entry bound to no lease.
    #[tokio::test]
    async fn a_join_under_lease_0_is_lease_lost() {
        let client = Client::connect(["http://127.0.0.1:1"], None)
            .await
            .expect("a lazily connecting client");
        let backend = EtcdBackend::from_client(client);
        let result = backend.join("k", 0, b"v").await;
        assert!(
            matches!(result, Err(Error::LeaseLost { lease: 0 })),
            "{result:?}"
        );
    }

    #[test]
    fn room_checks() {
        assert!(check_room("locker/", 1_572_864).is_ok());
        assert!(check_room("", MIN_REQUEST_BYTES).is_ok());
        assert!(matches!(
            check_room("locker/", MIN_REQUEST_BYTES - 1),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            check_room(&"p".repeat(3000), 1_572_864),
            Err(Error::InvalidConfig(_))
        ));
    }
}
