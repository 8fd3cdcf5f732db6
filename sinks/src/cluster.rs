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
    /// Source name → every partition of its topics, as far as the node knows (Kafka).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub known: BTreeMap<String, Vec<String>>,
}

/// The partitions of each source that some live node knows of and no live node
/// owns: a node is live when its status is younger than `live_ms` at `now_ms` (by
/// the reader's clock: the nodes' clocks must agree to well within `live_ms`). A
/// consumer group should leave none unowned for long; one that does reads nothing of
/// them.
pub fn unowned(
    statuses: &[NodeStatus],
    now_ms: i64,
    live_ms: i64,
) -> BTreeMap<String, Vec<String>> {
    let live = |s: &&NodeStatus| now_ms.saturating_sub(s.updated_ms) < live_ms;
    let mut known: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for status in statuses.iter().filter(live) {
        for (source, partitions) in &status.known {
            known
                .entry(source)
                .or_default()
                .extend(partitions.iter().map(String::as_str));
        }
    }
    for status in statuses.iter().filter(live) {
        for (source, partitions) in &status.partitions {
            if let Some(left) = known.get_mut(source.as_str()) {
                for p in partitions {
                    left.remove(p.as_str());
                }
            }
        }
    }
    known
        .into_iter()
        .filter(|(_, left)| !left.is_empty())
        .map(|(source, left)| {
            (
                source.to_owned(),
                left.into_iter().map(str::to_owned).collect(),
            )
        })
        .collect()
}

/// The node that looks for unowned partitions on the cluster's behalf: the live node
/// (see [`unowned`]) with the smallest id among those that know partitions. One
/// checker reads every status; the others read only the checker's, and take over
/// when it falls silent, so a check costs the store one list and a read per node,
/// not one per pair of nodes.
pub fn checker(statuses: &[NodeStatus], now_ms: i64, live_ms: i64) -> Option<&str> {
    statuses
        .iter()
        .filter(|s| now_ms.saturating_sub(s.updated_ms) < live_ms && !s.known.is_empty())
        .map(|s| s.node_id.as_str())
        .min()
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
        statuses.extend(node_status(location, &id).await?);
    }
    statuses.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(statuses)
}

/// Node `node_id`'s newest status in the lake; `None` if it has none (or it cannot be
/// read).
pub async fn node_status(location: &LakeLocation, node_id: &str) -> Result<Option<NodeStatus>> {
    let path = status_path(node_id);
    let bytes = match location.store().get(&path).await {
        Ok(got) => got.bytes().await.map_err(store_error(&path))?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(store_error(&path)(e)),
    };
    match serde_json::from_slice::<NodeStatus>(&bytes) {
        Ok(status) => Ok(Some(status)),
        Err(e) => {
            tracing::debug!(path = %path, error = %e, "ignoring an unreadable node status");
            Ok(None)
        }
    }
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
            known: BTreeMap::new(),
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
            [status("a", &["t/0", "t/2"]), again.clone()]
        );
        remove_status(&location, "a").await.expect("remove");
        remove_status(&location, "a")
            .await
            .expect("removing twice is fine");
        assert_eq!(node_statuses(&location).await.expect("list").len(), 1);
        assert_eq!(
            node_status(&location, "b").await.expect("read"),
            Some(again)
        );
        assert_eq!(node_status(&location, "a").await.expect("read"), None);
    }

    #[test]
    fn the_checker_is_the_live_node_with_the_smallest_id_that_knows_partitions() {
        let status = |id: &str, updated_ms, knows: bool| NodeStatus {
            node_id: id.into(),
            updated_ms,
            known: BTreeMap::from_iter(knows.then(|| ("k".into(), vec!["t/0".into()]))),
            ..NodeStatus::default()
        };
        let mut nodes = vec![
            status("c", 10_000, true),
            // Knows no partitions (no Kafka source): never the checker.
            status("a", 10_000, false),
            status("b", 10_000, true),
        ];
        assert_eq!(checker(&nodes, 10_000, 15_000), Some("b"));
        // b falls silent: c takes over.
        nodes[2].updated_ms = -6_000;
        assert_eq!(checker(&nodes, 10_000, 15_000), Some("c"));
        nodes[0].updated_ms = -6_000;
        assert_eq!(checker(&nodes, 10_000, 15_000), None);
    }

    #[test]
    fn partitions_known_and_owned_by_no_live_node_are_unowned() {
        let status = |id: &str, updated_ms, owned: &[&str], known: &[&str]| NodeStatus {
            node_id: id.into(),
            updated_ms,
            partitions: BTreeMap::from([("k".into(), owned.iter().map(|p| (*p).into()).collect())]),
            known: BTreeMap::from([("k".into(), known.iter().map(|p| (*p).into()).collect())]),
            ..NodeStatus::default()
        };
        let all = ["t/0", "t/1", "t/2", "t/3"];
        let mut nodes = vec![
            status("a", 10_000, &["t/0"], &all),
            status("b", 10_000, &["t/1", "t/2"], &[]),
            // Silent for 20 s: what it owned is owned by nobody live.
            status("c", -10_000, &["t/3"], &all),
        ];
        assert_eq!(
            unowned(&nodes, 10_000, 15_000),
            BTreeMap::from([("k".to_owned(), vec!["t/3".to_owned()])])
        );
        nodes[2].updated_ms = 9_000;
        assert!(unowned(&nodes, 10_000, 15_000).is_empty());
        // What only a dead node knew (its topic may have changed since) is not listed.
        nodes[2].updated_ms = -10_000;
        nodes[2].known.insert("gone".into(), vec!["old/0".into()]);
        assert_eq!(unowned(&nodes, 10_000, 15_000).len(), 1, "k only");
        // Nothing known, nothing unowned (a node of another version, or Kinesis).
        for n in &mut nodes {
            n.known.clear();
        }
        nodes.pop();
        assert!(unowned(&nodes, 10_000, 15_000).is_empty());
    }
}
