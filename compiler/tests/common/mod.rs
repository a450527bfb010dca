//! Helpers shared by the compiler's integration tests: a seeded generator,
//! checking a plan that must check, compiling it through the driver, and
//! random values for its tensors.

#![allow(dead_code)]

use shardplan_compiler::graph::Graph;
use shardplan_compiler::interp::Tensor;
use shardplan_compiler::kernel::Program;
use shardplan_compiler::partition::Plan;
use shardplan_compiler::{check_source, compile, Checked, Compiled, Options, Target};

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn checked(src: &str) -> Checked {
    let (c, d) = check_source(src.as_bytes());
    c.unwrap_or_else(|| panic!("plan does not check: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()))
}

/// `c` through the compiler driver with `o`; panics with the diagnostics when it fails.
pub fn compiled(c: &Checked, o: &Options) -> Compiled {
    compile(c, o).unwrap_or_else(|d| panic!("the plan does not compile: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()))
}

/// One device's training step of `c`, as the driver compiles it: the
/// training graph and its kernel program.
pub fn one_device(c: &Checked) -> (Graph, Program) {
    let compiled = compiled(c, &Options { single_device: true, ..Default::default() });
    match compiled.target {
        Target::One(p) => (compiled.graph, p),
        Target::Placed(_) => panic!("compiled for one device, the plan was partitioned"),
    }
}

/// The training graph of `c`, as the driver builds it.
pub fn training_graph(c: &Checked) -> Graph {
    one_device(c).0
}

/// The device programs of `c` (which has a placement), as the driver partitions it.
pub fn placed(c: &Checked) -> Plan {
    match compiled(c, &Options::default()).target {
        Target::Placed(plan) => plan,
        Target::One(_) => panic!("the plan has no placement: it compiles to one program"),
    }
}

pub fn shape(t: &shardplan_compiler::check::Ty) -> Vec<usize> {
    t.shape.iter().map(|d| d.size as usize).collect()
}

/// Random parameters and inputs; integer inputs below `int_hi`.
pub fn values(c: &Checked, rng: &mut Rng, int_hi: f64) -> (Vec<Tensor>, Vec<Tensor>) {
    let params = c
        .model
        .params
        .iter()
        .map(|p| {
            let s = shape(&p.ty);
            let n = s.iter().product();
            Tensor::new(s, (0..n).map(|_| rng.next() - 0.5).collect())
        })
        .collect();
    let inputs = c
        .model
        .inputs
        .iter()
        .map(|i| {
            let s = shape(&i.ty);
            let n = s.iter().product();
            let data =
                if i.ty.dtype.is_float() { (0..n).map(|_| rng.next() * 2.0 - 1.0).collect() } else { (0..n).map(|_| (rng.next() * int_hi).floor()).collect() };
            Tensor::new(s, data)
        })
        .collect();
    (params, inputs)
}

/// A 2-block decoder over an 11-token vocabulary (batch 2, seq 5), trained
/// with `optimizer`; `extra` adds train settings.
pub fn tiny_gpt(optimizer: &str, extra: &str) -> String {
    format!(
        r#"
model Gpt {{
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(11, 8)
  layer pos = PositionalEmbedding(seq, 8)
  layer blocks = repeat 2 Block(8, 2)
  layer ln = LayerNorm(8)
  layer head = Linear(8, 11)
  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets)
}}
data corpus = text("t.txt")
train {{ batch: 2, seq: 5, steps: 1, optimizer: {optimizer}{extra} }}
"#
    )
}
