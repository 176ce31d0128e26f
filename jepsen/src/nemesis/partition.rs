//! Partition shapes as grudges: for each node, the nodes whose packets it drops. Pure, so the
//! shapes are tested without a network.

use std::collections::{BTreeMap, BTreeSet};

/// For each node, the nodes it cannot hear. Symmetric for every shape here.
pub type Grudge = BTreeMap<String, Vec<String>>;

/// Every node drops every node outside its own component.
pub fn components(parts: &[Vec<String>]) -> Grudge {
    let mut g = Grudge::new();
    for (i, part) in parts.iter().enumerate() {
        let others: Vec<String> = parts
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, p)| p.iter().cloned())
            .collect();
        for n in part {
            g.insert(n.clone(), others.clone());
        }
    }
    g
}

/// Two halves, the smaller first: `nodes` is already shuffled.
pub fn halves(nodes: &[String]) -> Vec<Vec<String>> {
    let (a, b) = nodes.split_at(nodes.len() / 2);
    vec![a.to_vec(), b.to_vec()]
}

/// `node` alone against the rest.
pub fn isolate(node: &str, nodes: &[String]) -> Vec<Vec<String>> {
    vec![
        vec![node.to_string()],
        nodes.iter().filter(|n| *n != node).cloned().collect(),
    ]
}

/// Two sides that cannot hear each other and one node (the middle of `nodes`, already
/// shuffled) that hears both: with five nodes, each side plus the bridge is a majority.
pub fn bridge(nodes: &[String]) -> (Grudge, String) {
    let mid = nodes.len() / 2;
    let left = &nodes[..mid];
    let right = &nodes[mid + 1..];
    let mut g = Grudge::new();
    for n in left {
        g.insert(n.clone(), right.to_vec());
    }
    for n in right {
        g.insert(n.clone(), left.to_vec());
    }
    let desc = format!(
        "{} | {} (bridge) | {}",
        left.join(" "),
        nodes[mid],
        right.join(" ")
    );
    (g, desc)
}

/// Nodes in a ring (`nodes`, already shuffled), each hearing only its nearest neighbours, as
/// many as make a majority with itself: every node sees a majority, no two see the same one.
/// With five nodes each hears one neighbour on each side (symmetric); when the count of
/// neighbours is odd, the extra one is on the right, and TCP then fails both ways anyway.
pub fn majorities_ring(nodes: &[String]) -> (Grudge, String) {
    let n = nodes.len();
    let majority = n / 2 + 1;
    let mut g = Grudge::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut seen: BTreeSet<usize> = BTreeSet::new();
        seen.insert(i);
        let mut d = 1;
        while seen.len() < majority {
            seen.insert((i + d) % n);
            if seen.len() < majority {
                seen.insert((i + n - d) % n);
            }
            d += 1;
        }
        g.insert(
            node.clone(),
            (0..n)
                .filter(|j| !seen.contains(j))
                .map(|j| nodes[j].clone())
                .collect(),
        );
    }
    (
        g,
        format!("ring {} (each hears its neighbours)", nodes.join("-")),
    )
}

/// `a b | c d e`.
pub fn describe(parts: &[Vec<String>]) -> String {
    parts
        .iter()
        .map(|p| p.join(" "))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five() -> Vec<String> {
        (1..=5).map(|i| format!("n{i}")).collect()
    }

    fn hears(g: &Grudge, a: &str, b: &str) -> bool {
        !g.get(a).is_some_and(|d| d.iter().any(|x| x == b))
    }

    #[test]
    fn halves_cut_every_link_across() {
        let parts = halves(&five());
        assert_eq!(parts[0].len(), 2);
        assert_eq!(parts[1].len(), 3);
        let g = components(&parts);
        for a in &parts[0] {
            for b in &parts[1] {
                assert!(!hears(&g, a, b) && !hears(&g, b, a));
            }
        }
        assert!(hears(&g, "n3", "n4") && hears(&g, "n1", "n2"));
        assert_eq!(describe(&parts), "n1 n2 | n3 n4 n5");
    }

    #[test]
    fn isolate_leaves_one_node_alone() {
        let g = components(&isolate("n3", &five()));
        assert_eq!(g["n3"], vec!["n1", "n2", "n4", "n5"]);
        assert_eq!(g["n1"], vec!["n3"]);
    }

    #[test]
    fn the_bridge_hears_both_sides_which_do_not_hear_each_other() {
        let (g, desc) = bridge(&five());
        assert_eq!(desc, "n1 n2 | n3 (bridge) | n4 n5");
        assert!(!g.contains_key("n3"));
        assert!(hears(&g, "n1", "n3") && hears(&g, "n5", "n3"));
        assert!(!hears(&g, "n1", "n4") && !hears(&g, "n5", "n2"));
    }

    #[test]
    fn in_the_ring_everyone_hears_a_different_majority() {
        for n in [3usize, 5, 7] {
            let symmetric = n == 5;
            let nodes: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
            let (g, _) = majorities_ring(&nodes);
            let mut majorities = BTreeSet::new();
            for a in &nodes {
                let heard: BTreeSet<&String> = nodes.iter().filter(|b| hears(&g, a, b)).collect();
                assert_eq!(heard.len(), n / 2 + 1, "{a} in a ring of {n}");
                majorities.insert(heard);
                for b in nodes.iter().filter(|_| symmetric) {
                    assert_eq!(hears(&g, a, b), hears(&g, b, a), "{a} {b}");
                }
            }
            if n > 3 {
                assert_eq!(majorities.len(), n, "ring of {n}");
            }
        }
    }
}
