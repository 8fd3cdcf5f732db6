//! What the nodes of a cluster say of themselves, through the lake they share.
//!
//! Each node rewrites `_nodes/<node>/status.json` every few seconds: its HTTP address,
//! the time, and the source partitions it owns. Any node (`/api/cluster`) and
//! `sluice status` list them all from the lake; there is no registry of our own, and a
//! node that stopped writing shows how long it has been silent.

use std::collections::BTreeMap;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{NODES_DIR, node_ids};
use crate::location::LakeLocation;
use crate::{Error, Result, store_error};

const STATUS_FILE: &str = "status.json";

/// One node's report of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `[cluster] node_id`.
    pub node_id: String,
    /// Its HTTP API address (`[http] listen`).
    pub http: String,
    /// When it wrote this (epoch ms).
    pub updated_ms: i64,
    /// Source name → the partitions it owns (`topic/n` for Kafka).
    pub partitions: BTreeMap<String, Vec<String>>,
}

/// Writes `status` as its node's status object (replacing the previous one).
pub async fn write_status(location: &LakeLocation, status: &NodeStatus) -> Result<()> {
    let path = status_path(&status.node_id);
    let json = serde_json::to_vec_pretty(status).map_err(|e| Error::Io {
        path: path.to_string(),
        source: std::io::Error::other(e),
    })?;
    location
        .store()
        .put(&path, PutPayload::from(json))
        .await
        .map_err(store_error(&path))?;
    Ok(())
}

/// Removes node `node_id`'s status object (a clean stop: it owns nothing any more).
pub async fn remove_status(location: &LakeLocation, node_id: &str) -> Result<()> {
    let path = status_path(node_id);
    match location.store().delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(store_error(&path)(e)),
    }
}

/// Every node's newest status in the lake, by node id. Nodes that never wrote one (or
/// whose object cannot be read) are left out.
pub async fn node_statuses(location: &LakeLocation) -> Result<Vec<NodeStatus>> {
    let mut statuses = Vec::new();
    for id in node_ids(location).await? {
        let path = status_path(&id);
        let bytes = match location.store().get(&path).await {
            Ok(got) => got.bytes().await.map_err(store_error(&path))?,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(store_error(&path)(e)),
        };
        match serde_json::from_slice::<NodeStatus>(&bytes) {
            Ok(status) => statuses.push(status),
            Err(e) => {
                tracing::debug!(path = %path, error = %e, "ignoring an unreadable node status")
            }
        }
    }
    statuses.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(statuses)
}

fn status_path(node_id: &str) -> ObjectPath {
    ObjectPath::from(format!("{NODES_DIR}/{node_id}/{STATUS_FILE}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nodes_list_each_other_through_the_lake() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = LakeLocation::local(dir.path()).expect("location");
        assert!(node_statuses(&location).await.expect("list").is_empty());
        let status = |id: &str, partitions: &[&str]| NodeStatus {
            node_id: id.into(),
            http: format!("127.0.0.1:80{}", id.len()),
            updated_ms: 1_000,
            partitions: BTreeMap::from([(
                "k".into(),
                partitions.iter().map(|p| (*p).to_owned()).collect(),
            )]),
        };
        for s in [status("b", &["t/1"]), status("a", &["t/0", "t/2"])] {
            write_status(&location, &s).await.expect("write");
        }
        // A node with checkpoints but no status yet is not listed.
        std::fs::create_dir_all(dir.path().join(NODES_DIR).join("c").join("_manifests"))
            .expect("dir");
        let mut again = status("b", &["t/1", "t/3"]);
        again.updated_ms = 2_000;
        write_status(&location, &again).await.expect("rewrite");
        assert_eq!(
            node_statuses(&location).await.expect("list"),
            [status("a", &["t/0", "t/2"]), again]
        );
        remove_status(&location, "a").await.expect("remove");
        remove_status(&location, "a")
            .await
            .expect("removing twice is fine");
        assert_eq!(node_statuses(&location).await.expect("list").len(), 1);
    }
}
