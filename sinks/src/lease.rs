//! Leases on a source's shards, kept in the lake's object store (ARCHITECTURE.md,
//! "Kinesis shards leased through the lake").
//!
//! A shard's lease is a chain of objects `_leases/<source>/<shard>/<epoch>`, each made
//! with a conditional create: of two nodes creating the same epoch, one wins. So the
//! object store arbitrates, as it does for Delta commits, and nothing here needs the
//! `If-Match` update that object_store's local store lacks. Nodes also rewrite
//! `_leases/<source>/_members/<node>` each round so that each can count the others.
//! This module only reads and writes those objects; the source decides what to take.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sluice_core::lease::{Lease, LeaseScan};

use crate::location::LakeLocation;
use crate::{Error, Result, store_error};

/// The folder of every source's leases.
pub const LEASES_DIR: &str = "_leases";
const MEMBERS_DIR: &str = "_members";

/// One source's leases in one lake.
#[derive(Debug)]
pub struct LeaseBook {
    location: LakeLocation,
    root: ObjectPath,
    /// Lease bodies read so far, by (shard, epoch): an epoch's object never changes.
    bodies: Mutex<HashMap<(String, u64), Lease>>,
}

impl LeaseBook {
    /// The leases of source `source` in the lake at `location`.
    pub fn new(location: &LakeLocation, source: &str) -> Self {
        Self {
            location: location.clone(),
            root: ObjectPath::from(format!("{LEASES_DIR}/{source}")),
            bodies: Mutex::default(),
        }
    }

    /// Every shard's newest lease and every member's tag, from one listing (plus a
    /// read of each newest lease not seen before).
    pub async fn scan(&self) -> Result<LeaseScan> {
        let store = self.location.store();
        let listed: Vec<_> = match store.list(Some(&self.root)).try_collect().await {
            Ok(listed) => listed,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(store_error(&self.root)(e)),
        };
        let mut scan = LeaseScan::default();
        let mut newest: HashMap<String, u64> = HashMap::new();
        for meta in &listed {
            let Some(parts) = meta.location.prefix_match(&self.root) else {
                continue;
            };
            let parts: Vec<String> = parts.map(|p| p.as_ref().to_owned()).collect();
            match parts.as_slice() {
                [dir, node] if dir == MEMBERS_DIR => {
                    let tag = meta.e_tag.clone().unwrap_or_else(|| {
                        format!("{}-{}", meta.last_modified.timestamp_micros(), meta.size)
                    });
                    scan.members.insert(node.clone(), tag);
                }
                [shard, epoch] => {
                    if let Ok(epoch) = epoch.parse::<u64>() {
                        let e = newest.entry(shard.clone()).or_insert(epoch);
                        *e = (*e).max(epoch);
                    }
                }
                _ => {}
            }
        }
        for (shard, epoch) in newest {
            let lease = self.body(&shard, epoch).await?;
            scan.shards.insert(shard, lease);
        }
        Ok(scan)
    }

    /// Creates lease `epoch` of `shard` with `lease`'s owner and state. `false` if that
    /// epoch exists already: another node got there first. The caller creates the epoch
    /// after the newest its last [`scan`](Self::scan) showed. On success, the epoch
    /// before the previous one is deleted (best effort: a left-over one is ignored; each
    /// creation deletes one, so the chain stays two long). Keeping
    /// the previous one means a listing always finds the chain, and an epoch deleted is
    /// at least two behind the newest, which no node creates after a fresh scan.
    pub async fn create(&self, shard: &str, epoch: u64, lease: &Lease) -> Result<bool> {
        let path = self.lease_path(shard, epoch);
        let body = serde_json::to_vec(lease).map_err(|e| Error::Io {
            path: path.to_string(),
            source: std::io::Error::other(e),
        })?;
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let store = self.location.store();
        match store.put_opts(&path, PutPayload::from(body), options).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(e) => return Err(store_error(&path)(e)),
        }
        let mut created = lease.clone();
        created.epoch = epoch;
        self.remember(shard, created);
        if let Some(old) = epoch.checked_sub(2) {
            match store.delete(&self.lease_path(shard, old)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::debug!(shard, epoch = old, error = %e, "an old lease object stays")
                }
            }
        }
        Ok(true)
    }

    /// Says node `node` is alive: rewrites its member object with `round`.
    pub async fn heartbeat(&self, node: &str, round: u64) -> Result<()> {
        let path = self.member_path(node);
        self.location
            .store()
            .put(&path, PutPayload::from(round.to_string().into_bytes()))
            .await
            .map_err(store_error(&path))?;
        Ok(())
    }

    /// Node `node` leaves (a clean stop): its member object goes.
    pub async fn leave(&self, node: &str) -> Result<()> {
        let path = self.member_path(node);
        match self.location.store().delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(&path)(e)),
        }
    }

    async fn body(&self, shard: &str, epoch: u64) -> Result<Lease> {
        let known = self
            .bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(shard.to_owned(), epoch))
            .cloned();
        if let Some(lease) = known {
            return Ok(lease);
        }
        let path = self.lease_path(shard, epoch);
        let bytes = self
            .location
            .store()
            .get(&path)
            .await
            .map_err(store_error(&path))?
            .bytes()
            .await
            .map_err(store_error(&path))?;
        let mut lease: Lease = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            path: path.to_string(),
            source: std::io::Error::other(e),
        })?;
        lease.epoch = epoch;
        self.remember(shard, lease.clone());
        Ok(lease)
    }

    fn remember(&self, shard: &str, lease: Lease) {
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        // Only the newest epochs are read again; the cache stays one entry a shard.
        bodies.retain(|(s, e), _| s != shard || *e >= lease.epoch);
        bodies.insert((shard.to_owned(), lease.epoch), lease);
    }

    fn lease_path(&self, shard: &str, epoch: u64) -> ObjectPath {
        ObjectPath::from(format!("{}/{shard}/{epoch:020}", self.root))
    }

    fn member_path(&self, node: &str) -> ObjectPath {
        ObjectPath::from(format!("{}/{MEMBERS_DIR}/{node}", self.root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(owner: &str) -> Lease {
        Lease {
            owner: owner.into(),
            ..Lease::default()
        }
    }

    #[tokio::test]
    async fn one_of_two_nodes_creating_an_epoch_wins_and_the_newest_epoch_is_the_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = LakeLocation::local(dir.path()).expect("location");
        let a = LeaseBook::new(&location, "k");
        let b = LeaseBook::new(&location, "k");
        assert_eq!(a.scan().await.expect("scan"), LeaseScan::default());
        let (lease_a, lease_b) = (held("a"), held("b"));
        let (won_a, won_b) = tokio::join!(
            a.create("shard-0", 0, &lease_a),
            b.create("shard-0", 0, &lease_b)
        );
        let (won_a, won_b) = (won_a.expect("a"), won_b.expect("b"));
        assert!(won_a != won_b, "exactly one wins: {won_a} {won_b}");
        let winner = if won_a { "a" } else { "b" };
        let scan = b.scan().await.expect("scan");
        assert_eq!(scan.shards["shard-0"].owner, winner);
        assert_eq!(scan.shards["shard-0"].epoch, 0);
        // Renewals climb; a stale renewal of an epoch someone else made fails.
        for epoch in 1..=4 {
            assert!(a.create("shard-0", epoch, &held("a")).await.expect("renew"));
        }
        assert!(!b.create("shard-0", 4, &held("b")).await.expect("late"));
        let released = Lease {
            finished: true,
            ..Lease::default()
        };
        assert!(a.create("shard-0", 5, &released).await.expect("release"));
        let scan = b.scan().await.expect("scan");
        assert_eq!(
            scan.shards["shard-0"],
            Lease {
                epoch: 5,
                owner: String::new(),
                finished: true
            }
        );
        // Older epochs were deleted as newer ones were made.
        let objects = std::fs::read_dir(dir.path().join(LEASES_DIR).join("k").join("shard-0"))
            .expect("dir")
            .count();
        assert!(objects <= 4, "{objects} lease objects left");
    }

    #[tokio::test]
    async fn members_show_a_new_tag_each_round_and_leave_on_a_clean_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = LakeLocation::local(dir.path()).expect("location");
        let book = LeaseBook::new(&location, "k");
        book.heartbeat("a", 1).await.expect("a");
        book.heartbeat("b", 1).await.expect("b");
        let first = book.scan().await.expect("scan").members;
        assert_eq!(first.keys().collect::<Vec<_>>(), ["a", "b"]);
        book.heartbeat("a", 2).await.expect("a again");
        let second = book.scan().await.expect("scan").members;
        assert_ne!(first["a"], second["a"], "a said it is alive again");
        book.leave("b").await.expect("leave");
        book.leave("b").await.expect("leaving twice is fine");
        assert_eq!(
            book.scan()
                .await
                .expect("scan")
                .members
                .keys()
                .collect::<Vec<_>>(),
            ["a"]
        );
    }
}
