//! Where FAQ entries and shards live: an entry belongs to shard `hash(id) % S`; shard `k`
//! is held by the `R` live nodes with the highest rendezvous weight `hash(node, k)`.
//!
//! Rendezvous hashing needs no coordination (every node computes the same placement from
//! the same membership view) and moves little: when a node leaves, only the shards it
//! held get a new replica; when one joins, it takes about `S·R/n` replicas, each from
//! one node.

use serde::Serialize;

use super::{Member, stable_hash};

/// The shard FAQ entry `id` belongs to.
pub fn shard_of(id: &str, shards: u32) -> u32 {
    (stable_hash(&["faq-entry", id]) % u64::from(shards.max(1))) as u32
}

/// For each shard `0..shards`, the nodes that should hold it, best first:
/// `min(replicas, nodes)` distinct ids.
pub fn place(nodes: &[&str], shards: u32, replicas: u32) -> Vec<Vec<String>> {
    (0..shards)
        .map(|k| {
            let key = k.to_string();
            let mut ranked: Vec<(u64, &str)> =
                nodes.iter().map(|n| (stable_hash(&["faq-shard", &key, n]), *n)).collect();
            ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            ranked.dedup_by(|a, b| a.1 == b.1);
            ranked.into_iter().take(replicas as usize).map(|(_, n)| n.to_string()).collect()
        })
        .collect()
}

/// One shard as the cluster sees it (`GET /v1/cluster`, `ragnode cluster status`).
#[derive(Clone, Debug, Serialize)]
pub struct ShardView {
    pub shard: u32,
    /// The nodes placement assigns it to.
    pub placed_on: Vec<String>,
    /// Every node holding a replica (placed, catching up, or handing over).
    pub replicas: Vec<ReplicaView>,
    /// Replicas answering queries.
    pub serving: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaView {
    pub node: String,
    pub serving: bool,
    pub applied: u64,
    pub lag: u64,
    pub documents: u64,
}

/// The shard table of a membership view.
pub fn shard_table(members: &[Member], shards: u32, replicas: u32) -> Vec<ShardView> {
    let ids: Vec<&str> = members.iter().map(|m| m.status.id.as_str()).collect();
    place(&ids, shards, replicas)
        .into_iter()
        .enumerate()
        .map(|(k, placed_on)| {
            let k = k as u32;
            let replicas: Vec<ReplicaView> = members
                .iter()
                .filter_map(|m| {
                    m.status.faq_shards.iter().find(|h| h.shard == k).map(|h| ReplicaView {
                        node: m.status.id.clone(),
                        serving: h.serving,
                        applied: h.applied,
                        lag: h.lag,
                        documents: h.documents,
                    })
                })
                .collect();
            let serving = replicas.iter().filter(|r| r.serving).count();
            ShardView { shard: k, placed_on, replicas, serving }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_deterministic_distinct_and_capped() {
        let nodes = ["a", "b", "c"];
        let p = place(&nodes, 8, 2);
        assert_eq!(p, place(&["c", "a", "b"], 8, 2), "order of the view does not matter");
        for holders in &p {
            assert_eq!(holders.len(), 2);
            assert_ne!(holders[0], holders[1]);
        }
        // Every node holds something; one node alone holds everything once.
        for n in nodes {
            assert!(p.iter().any(|h| h.iter().any(|x| x == n)), "{n} holds no shard");
        }
        assert!(place(&["a"], 8, 2).iter().all(|h| h == &["a".to_string()]));
        assert!(place(&[], 4, 2).iter().all(Vec::is_empty));
    }

    #[test]
    fn a_leaving_node_moves_only_its_own_replicas() {
        let before = place(&["a", "b", "c", "d"], 64, 2);
        let after = place(&["a", "b", "d"], 64, 2);
        for (b, a) in before.iter().zip(&after) {
            for n in b.iter().filter(|n| *n != "c") {
                assert!(a.contains(n), "{n} lost a shard it held although it stayed: {b:?} -> {a:?}");
            }
        }
        // And spread: 64 shards x 2 over 4 nodes, none holds more than twice its share.
        for n in ["a", "b", "c", "d"] {
            let held = before.iter().filter(|h| h.iter().any(|x| x == n)).count();
            assert!((16..=64).contains(&held), "{n} holds {held} of 128 replicas");
        }
    }

    #[test]
    fn entries_spread_over_shards() {
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[shard_of(&format!("faq-{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        assert_eq!(shard_of("x", 1), 0);
    }
}
