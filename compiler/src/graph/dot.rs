//! Graphviz DOT of a graph: one box per node (op and result type), edges
//! labelled with the operand position when an op takes several; forward,
//! backward and update nodes in different colours.

use super::{Graph, Op, Role};
use crate::check::Checked;
use std::fmt::Write;

/// Renders `g` as DOT. Parameter and input nodes are named after the model.
pub fn to_dot(g: &Graph, c: &Checked) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", c.model.name);
    let _ = writeln!(out, "  rankdir=TB;");
    let _ = writeln!(out, "  node [shape=box, fontname=\"monospace\", fontsize=10, style=filled];");
    for id in g.ids() {
        let n = g.node(id);
        let name = match &n.op {
            Op::Input(i) => c.model.inputs.get(*i).map(|x| format!("input {}", x.name)).unwrap_or_else(|| n.op.name()),
            Op::Param(i) => c.model.params.get(*i).map(|p| format!("param {}", p.path)).unwrap_or_else(|| n.op.name()),
            Op::State(i) => g.states.get(*i).map(|s| format!("state {}", s.name)).unwrap_or_else(|| n.op.name()),
            Op::Assign(super::Target::Param(i)) => c.model.params.get(*i).map(|p| format!("assign {}", p.path)).unwrap_or_else(|| n.op.name()),
            Op::Assign(super::Target::State(i)) => g.states.get(*i).map(|s| format!("assign {}", s.name)).unwrap_or_else(|| n.op.name()),
            op => op.name(),
        };
        let color = match (n.role, id == g.loss) {
            (_, true) => "#f4cccc",
            (Role::Forward, _) => "#dae8fc",
            (Role::Backward, _) => "#fff2cc",
            (Role::Update, _) => "#d5e8d4",
        };
        let _ = writeln!(out, "  n{} [label=\"{}\\n{}\", fillcolor=\"{color}\"];", id.0, escape(&name), n.ty);
    }
    for id in g.ids() {
        let args = g.args(id);
        for (i, a) in args.iter().enumerate() {
            if args.len() > 1 {
                let _ = writeln!(out, "  n{} -> n{} [label=\"{i}\"];", a.0, id.0);
            } else {
                let _ = writeln!(out, "  n{} -> n{};", a.0, id.0);
            }
        }
    }
    out.push_str("}\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
