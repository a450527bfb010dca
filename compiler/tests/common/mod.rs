//! Helpers shared by the compiler's integration tests: a seeded generator,
//! checking a plan that must check, and random values for its tensors.

#![allow(dead_code)]

use shardplan_compiler::interp::Tensor;
use shardplan_compiler::{check_source, Checked};

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
