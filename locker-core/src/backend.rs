//! The backend contract: the few primitives a store must provide.
//!
//! Everything clever (waiting, keep-alive, ownership deadlines, watch streams) lives once, in
//! [`Locker`](crate::Locker). A backend only maps these primitives onto its store, each as **one
//! linearizable operation** (one etcd transaction), never two.
//!
//! # Keys and layout
//!
//! Keys given to a backend are relative to the backend's own root (etcd's `locker/` prefix, say);
//! the backend adds its root on the way in and strips it on the way out. The lock for key `k` is the
//! *queue* of entries `k/<lease id in lowercase hex>` (see [`entry_key`]); the holder is the entry
//! with the lowest create revision. A queue holds only entries **exactly one segment** below its
//! key: the queue of `a` never contains `a/b/1f` (that entry belongs to the queue of `a/b`).
//!
//! # Revisions
//!
//! Revisions are store-wide, start above 0 and increase with every write. Every read answers the
//! revision it was served at, so core can start a watch right after it without a gap.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::{Error, Result};

/// A lease id, as the store gives it (etcd's `i64`).
pub type LeaseId = i64;

/// A store-wide revision.
pub type Revision = i64;

/// The key of the entry that `lease` has in the queue of `key`: `key/<lease in lowercase hex>`.
///
/// This is the layout of etcd's Go `concurrency` recipes (`Mutex`, `Election`) and of `etcdctl lock`
/// and `etcdctl elect`, so those tools and locker see each other's entries.
pub fn entry_key(key: &str, lease: LeaseId) -> String {
    format!("{key}/{lease:x}")
}

/// Checks the shape of a lock key (not its length, which depends on the store): the rules every
/// lock, read and watch applies before any I/O, answering [`Error::InvalidKey`] with the reason.
///
/// A key is any non-empty UTF-8 string of `/`-separated segments, none of them empty, with no
/// NUL byte. So `www.example.com`, `jobs/nightly-report` and `a/b/c` are keys, and these are not:
///
/// | key | refused because |
/// |---|---|
/// | `/leading` | a leading `/` (an empty first segment) |
/// | `trailing/` | a trailing `/`: its entries would be `trailing//<lease>`, which no other client of the layout (etcd's `concurrency` recipes, `etcdctl`) would name the same way |
/// | `a//b` | an empty segment |
/// | `nul\0byte` | a NUL byte, which tools and logs cut the key at |
///
/// The empty key is [`Error::EmptyKey`]. Keys may be prefixes of one another (`a` and `a/b` are two
/// locks): the queue of a key holds only the entries exactly one segment below it.
///
/// ```
/// use locker_core::backend::check_key_shape;
/// assert!(check_key_shape("jobs/nightly-report").is_ok());
/// assert!(check_key_shape("trailing/").is_err());
/// ```
///
/// # Errors
///
/// [`Error::EmptyKey`] or [`Error::InvalidKey`].
pub fn check_key_shape(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        return Err(Error::EmptyKey);
    } else if key.contains('\0') {
        "a key may not hold a NUL byte"
    } else if key.starts_with('/') {
        "a key may not start with '/'"
    } else if key.ends_with('/') {
        "a key may not end with '/' (its entries would be KEY//LEASE)"
    } else if key.contains("//") {
        "a key may not have an empty segment ('//')"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

/// The queue (lock key) an entry key belongs to: everything before its last `/`, or `None` for a
/// key with no `/`.
pub fn queue_of(entry_key: &str) -> Option<&str> {
    entry_key.rsplit_once('/').map(|(queue, _)| queue)
}

/// Whether `entry_key` is an entry of the queue `queue`: exactly one segment below it.
pub fn is_entry_of(entry_key: &str, queue: &str) -> bool {
    entry_key
        .strip_prefix(queue)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

/// One entry of a lock queue, as stored.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The entry's key, relative to the backend root (`lock-key/<lease hex>`).
    pub key: String,
    /// The value the contender offered.
    pub value: Vec<u8>,
    /// The lease the entry is bound to.
    pub lease: LeaseId,
    /// The revision that created the entry: its place in the queue, and its fencing token.
    pub create_revision: Revision,
    /// The revision of the entry's last change.
    pub mod_revision: Revision,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("lease", &format_args!("{:x}", self.lease))
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

/// What a store accepts; checked by core before any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest lock key, in bytes (room for the backend root and `/<lease hex>` already taken off).
    pub max_key_len: usize,
    /// The largest value, in bytes.
    pub max_value_len: usize,
    /// The shortest lease TTL the store grants.
    pub min_ttl: Duration,
    /// The longest lease TTL the store grants.
    pub max_ttl: Duration,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease id.
    pub id: LeaseId,
    /// The TTL the store granted (it may round up what was asked).
    pub ttl: Duration,
}

/// The answer to [`LockBackend::join`]: the contender's entry and where it stands, as one
/// consistent read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The contender's own entry: newly created, or the one already there for this lease.
    pub entry: Entry,
    /// The newest entry of the queue created before `entry`: the one to wait for, exactly as
    /// [`Position::predecessor`]. `None` means `entry` is first in the queue: the holder.
    pub predecessor: Option<Entry>,
    /// The revision the join was served at.
    pub revision: Revision,
}

/// The answer to [`LockBackend::resume`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumption {
    /// The entry was taken up: as it is now, with its predecessor, at the write's revision.
    Resumed(Joined),
    /// The entry is gone (`None`), or is no longer the one asked for (`Some`: it was written
    /// since, by another process that took it up, or by its holder).
    Refused(Option<Entry>),
}

/// The answer to [`LockBackend::position`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The contender's own entry, if it still exists with the create revision asked about.
    pub own: Option<Entry>,
    /// The newest entry of the queue created before the contender's own: the one to wait for.
    /// `None` means the contender is first in the queue (the holder), if `own` exists.
    pub predecessor: Option<Entry>,
    /// The revision the read was served at.
    pub revision: Revision,
}

/// A consistent read of a whole queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The queue's entries, oldest (the holder) first.
    pub entries: Vec<Entry>,
    /// The revision the read was served at.
    pub revision: Revision,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or its value changed.
    Put,
    /// The key was deleted (by a delete, or by its lease ending).
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key as it is after a put; for a delete, `key` and `mod_revision` (the delete's revision)
    /// are set, and the rest may be empty or zero.
    pub entry: Entry,
}

/// A running watch: every change under a prefix, from `start_revision` on, in order.
pub struct WatchStream {
    /// The first revision the stream covers: every change at or after it is delivered, none is
    /// skipped.
    pub start_revision: Revision,
    /// Batches of changes, in revision order. An `Err(Error::Compacted { .. })` means the history
    /// the stream needed is gone (re-read and start again); any error ends the stream.
    pub events: BoxStream<'static, Result<Vec<WatchEvent>>>,
}

impl fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStream")
            .field("start_revision", &self.start_revision)
            .finish_non_exhaustive()
    }
}

/// The watch half of a store.
///
/// # Contract
///
/// - `watch(prefix, Some(rev))` delivers every put and delete of a key starting with `prefix`
///   whose revision is `>= rev`, in revision order, without gaps, as long as the stream lives;
///   `start_revision` is `rev`.
/// - `watch(prefix, None)` starts at the store's next revision; `start_revision` says which. A read
///   issued after `watch` returned is served at a revision `>= start_revision - 1`.
/// - If `rev` is older than the store's compaction revision, the call fails with, or the stream
///   yields, [`Error::Compacted`].
/// - A broken connection may end the stream with a retryable error; the caller resumes from the
///   revision after the last one it saw.
/// - [`watch_deletes`](Watcher::watch_deletes) is the same with the puts left out: every delete
///   `>= rev`, in order, without gaps, and nothing else.
#[async_trait]
pub trait Watcher: Send + Sync + 'static {
    /// Watches every key under `prefix` (relative to the backend root) from `from_revision`.
    async fn watch(&self, prefix: &str, from_revision: Option<Revision>) -> Result<WatchStream>;

    /// Watches the deletes under `prefix` from `from_revision`: what a lock waits for (its
    /// predecessor's delete, or its own). The same contract as [`watch`](Watcher::watch), with
    /// every put left out; a batch that would hold only puts is not sent.
    ///
    /// The default takes [`watch`](Watcher::watch)'s stream and drops the puts on the client. A
    /// store that can leave them out itself (etcd's `NOPUT` filter) overrides it, so that the
    /// puts of every join and value update under the prefix never cross the network.
    async fn watch_deletes(
        &self,
        prefix: &str,
        from_revision: Option<Revision>,
    ) -> Result<WatchStream> {
        let stream = self.watch(prefix, from_revision).await?;
        Ok(WatchStream {
            start_revision: stream.start_revision,
            events: deletes_only(stream.events),
        })
    }
}

/// The deletes of a stream of batches, without the batches left empty.
fn deletes_only(
    events: BoxStream<'static, Result<Vec<WatchEvent>>>,
) -> BoxStream<'static, Result<Vec<WatchEvent>>> {
    use futures::StreamExt;
    events
        .filter_map(|batch| {
            std::future::ready(match batch {
                Ok(mut batch) => {
                    batch.retain(|event| event.kind == EventKind::Delete);
                    (!batch.is_empty()).then_some(Ok(batch))
                }
                Err(err) => Some(Err(err)),
            })
        })
        .boxed()
}

/// The primitives a lock store provides.
///
/// # Contract
///
/// Each method is one linearizable operation on the store. Keys are relative to the backend root
/// (see the [module docs](self)). Entries are written **only** under a live lease: a call naming a
/// lease the store does not know fails with [`Error::LeaseLost`], as a
/// whole. Store failures are classified: unreachable → [`Error::Unavailable`]
/// (retryable); refused credentials or keys → [`Error::PermissionDenied`].
/// Backends do not validate input sizes; core does that, against [`LockBackend::limits`].
#[async_trait]
pub trait LockBackend: Watcher + fmt::Debug {
    /// What this store accepts. Cheap; no I/O.
    fn limits(&self) -> Limits;

    /// Grants a lease of (at least) `ttl`; the answer says the TTL granted.
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease>;

    /// Refreshes a lease. `Some(ttl)` is the TTL left after the refresh; `None` means the lease is
    /// gone (expired or revoked).
    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>>;

    /// Revokes a lease, deleting every entry bound to it. Revoking a lease that is gone is `Ok`.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Joins the queue of `key` under `lease` with `value`, in one operation: creates the entry
    /// [`entry_key(key, lease)`](entry_key) if it is absent (an existing entry keeps its value and
    /// place), and answers the entry with its predecessor: the newest entry of the queue created
    /// before it (`None` when the entry is the holder). Entries of deeper queues never count.
    async fn join(&self, key: &str, lease: LeaseId, value: &[u8]) -> Result<Joined>;

    /// Where an entry stands, in one consistent read: the entry itself if it still exists with
    /// `create_revision`, and the newest entry of the queue of `key` created before it.
    async fn position(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
    ) -> Result<Position>;

    /// The holder of the queue of `key` (its oldest entry), or `None`, with the read's revision.
    async fn holder(&self, key: &str) -> Result<(Option<Entry>, Revision)>;

    /// Every entry of the queue of `key`, oldest first, in one consistent read.
    async fn entries(&self, key: &str) -> Result<Snapshot>;

    /// Deletes `entry_key` if it still has `create_revision`. Answers whether it was deleted.
    async fn delete_entry(&self, entry_key: &str, create_revision: Revision) -> Result<bool>;

    /// Sets the value of `entry_key` if it still has `create_revision`, keeping its lease. Answers
    /// the revision of the write (the entry's new mod revision), or `None` if the entry was not
    /// there to update.
    async fn update_value(
        &self,
        entry_key: &str,
        create_revision: Revision,
        value: &[u8],
    ) -> Result<Option<Revision>>;

    /// Takes up an entry again, for a tenure resumed by another process, in one operation: if
    /// `entry_key` still exists with `create_revision` and was last written at `mod_revision`
    /// (nobody took it up or wrote it since), sets its value to `value` (keeping its lease) and
    /// answers [`Resumption::Resumed`]: the entry as it is after, with its predecessor in the queue
    /// of `key` (as [`join`](LockBackend::join) answers it) and the revision of the write. Else
    /// [`Resumption::Refused`] with the entry as it is now (`None` if it is gone).
    async fn resume(
        &self,
        key: &str,
        entry_key: &str,
        create_revision: Revision,
        mod_revision: Revision,
        value: &[u8],
    ) -> Result<Resumption>;
}
