//! The build DAG: derivations as petgraph nodes, edges from an input to the derivation using it.

use std::collections::{BTreeMap, HashMap};

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::Serialize;

use crate::derivation::{Derivation, DrvHash};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("derivation {name} names input {input}, which is not in the graph")]
    MissingInput { name: String, input: DrvHash },
    #[error("the build graph has a cycle through {0}")]
    Cycle(String),
}

#[derive(Debug, Default, Clone)]
pub struct Graph {
    g: DiGraph<Derivation, ()>,
    index: HashMap<DrvHash, NodeIndex>,
    /// How derivations of a foreign `system` run here (see [`Graph::set_emulator`]).
    emulators: BTreeMap<String, Emulator>,
}

/// How derivations of a foreign system run on this machine: an interpreter the sandbox
/// registers with binfmt_misc. Part of the build environment, never of a derivation's hash:
/// its derivation is built first, like an input, but a derivation's hash does not name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Emulator {
    /// The derivation whose output holds the interpreter.
    pub drv: DrvHash,
    /// The interpreter's path inside that output (a static binary).
    pub interpreter: String,
    /// binfmt_misc's name for it, and the magic and mask (hex) of the ELF headers it runs.
    pub name: String,
    pub magic: String,
    pub mask: String,
}

#[derive(Serialize)]
struct JsonNode<'a> {
    hash: &'a str,
    name: &'a str,
    stage: &'a str,
    network: bool,
    inputs: Vec<&'a str>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Add a derivation (its inputs must already be in the graph). Adding the same derivation
    /// twice yields the same node.
    pub fn add(&mut self, drv: Derivation) -> Result<DrvHash, GraphError> {
        let hash = drv.hash();
        if self.index.contains_key(&hash) {
            return Ok(hash);
        }
        let mut input_nodes = Vec::with_capacity(drv.inputs.len());
        for input in &drv.inputs {
            let n = self
                .index
                .get(input)
                .ok_or_else(|| GraphError::MissingInput {
                    name: drv.name.clone(),
                    input: input.clone(),
                })?;
            input_nodes.push(*n);
        }
        if let Some(em) = drv.system.as_ref().and_then(|s| self.emulators.get(s)) {
            input_nodes.push(self.index[&em.drv]);
        }
        let node = self.g.add_node(drv);
        for n in input_nodes {
            self.g.update_edge(n, node, ());
        }
        self.index.insert(hash.clone(), node);
        Ok(hash)
    }

    /// Run derivations of `system` under `emulator` (its derivation must be in the graph): the
    /// emulator is built before any of them, and their sandboxes register it.
    pub fn set_emulator(&mut self, system: &str, emulator: Emulator) -> Result<(), GraphError> {
        let em_node = *self
            .index
            .get(&emulator.drv)
            .ok_or_else(|| GraphError::MissingInput {
                name: format!("the emulator for {system}"),
                input: emulator.drv.clone(),
            })?;
        let users: Vec<NodeIndex> = self
            .g
            .node_indices()
            .filter(|n| self.g[*n].system.as_deref() == Some(system))
            .collect();
        for n in users {
            self.g.update_edge(em_node, n, ());
        }
        self.emulators.insert(system.to_owned(), emulator);
        Ok(())
    }

    /// The emulator `drv` runs under on this machine, if its system is foreign here.
    pub fn emulator_for(&self, drv: &Derivation) -> Option<&Emulator> {
        drv.system.as_ref().and_then(|s| self.emulators.get(s))
    }

    /// What must be built before `drv`: its inputs, and its emulator if it needs one.
    pub fn needs(&self, drv: &Derivation) -> Vec<DrvHash> {
        let mut v = drv.inputs.clone();
        v.extend(self.emulator_for(drv).map(|e| e.drv.clone()));
        v
    }

    pub fn get(&self, hash: &DrvHash) -> Option<&Derivation> {
        self.index.get(hash).map(|n| &self.g[*n])
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// All derivations in an order where inputs come before their users.
    pub fn topo_order(&self) -> Result<Vec<DrvHash>, GraphError> {
        let order = petgraph::algo::toposort(&self.g, None)
            .map_err(|c| GraphError::Cycle(self.g[c.node_id()].name.clone()))?;
        Ok(order.into_iter().map(|n| self.g[n].hash()).collect())
    }

    /// The derivations that use `hash`'s output.
    pub fn dependents(&self, hash: &DrvHash) -> Vec<DrvHash> {
        match self.index.get(hash) {
            Some(n) => self
                .g
                .edges_directed(*n, Direction::Outgoing)
                .map(|e| self.g[e.target()].hash())
                .collect(),
            None => vec![],
        }
    }

    fn nodes_sorted(&self) -> Vec<(&DrvHash, &Derivation)> {
        let mut v: Vec<_> = self.index.iter().map(|(h, n)| (h, &self.g[*n])).collect();
        v.sort_by(|a, b| (a.1.stage, &a.1.name, a.0).cmp(&(b.1.stage, &b.1.name, b.0)));
        v
    }

    /// `{"nodes": [{"hash", "name", "stage", "network", "inputs": [hash…]}]}`
    pub fn to_json(&self) -> serde_json::Value {
        let nodes: Vec<JsonNode> = self
            .nodes_sorted()
            .into_iter()
            .map(|(h, d)| JsonNode {
                hash: &h.0,
                name: &d.name,
                stage: d.stage.as_str(),
                network: d.uses_network(),
                inputs: d.inputs.iter().map(|i| i.0.as_str()).collect(),
            })
            .collect();
        serde_json::json!({ "nodes": nodes })
    }

    /// Graphviz rendering of the same DAG, one cluster per stage.
    pub fn to_dot(&self) -> String {
        let mut s =
            String::from("digraph rbuild {\n  rankdir=LR;\n  node [shape=box, fontsize=10];\n");
        let nodes = self.nodes_sorted();
        for stage in crate::derivation::Stage::ALL {
            s.push_str(&format!(
                "  subgraph cluster_{stage} {{\n    label=\"{stage}\";\n"
            ));
            for (h, d) in nodes.iter().filter(|(_, d)| d.stage == stage) {
                let style = if d.uses_network() {
                    ", style=dashed"
                } else {
                    ""
                };
                s.push_str(&format!(
                    "    \"{}\" [label=\"{}\\n{}\"{}];\n",
                    h.0,
                    d.name.replace('"', "\\\""),
                    &h.0[..12],
                    style
                ));
            }
            s.push_str("  }\n");
        }
        for (h, d) in &nodes {
            for i in &d.inputs {
                s.push_str(&format!("  \"{}\" -> \"{}\";\n", i.0, h.0));
            }
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::derivation::Stage;

    /// A derivation for tests: a builtin with no arguments and these inputs.
    pub(crate) fn d(name: &str, inputs: Vec<DrvHash>) -> Derivation {
        Derivation {
            name: name.into(),
            stage: Stage::Unpack,
            builder: "builtin:x".into(),
            args: vec![],
            env: Default::default(),
            inputs,
            system: None,
            fixed_output: None,
        }
    }

    #[test]
    fn dedupes_and_orders_inputs_first() {
        let mut g = Graph::new();
        let a = g.add(d("a", vec![])).unwrap();
        let b = g.add(d("b", vec![a.clone()])).unwrap();
        let c = g.add(d("c", vec![a.clone(), b.clone()])).unwrap();
        assert_eq!(g.add(d("a", vec![])).unwrap(), a);
        assert_eq!(g.len(), 3);
        let order = g.topo_order().unwrap();
        let pos = |h: &DrvHash| order.iter().position(|x| x == h).unwrap();
        assert!(pos(&a) < pos(&b) && pos(&b) < pos(&c));
        let mut deps = g.dependents(&a);
        deps.sort();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(deps, want);
    }

    #[test]
    fn unknown_input_is_an_error() {
        let mut g = Graph::new();
        let err = g.add(d("b", vec![DrvHash("ff".into())])).unwrap_err();
        assert!(err.to_string().contains("not in the graph"));
    }
}
