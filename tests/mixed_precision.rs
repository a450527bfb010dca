//! `autocast bf16`: the rounding itself, a bfloat16 run against the float32
//! run over 100 steps of the GPT example, placements against one device
//! with the same autocast, and the memory it saves.

mod common;

use common::{root, tiny_gpt as gpt, TP_GPT};
use shardplan_compiler::partition::memory;
use shardplan_runtime::backend::cpu::ops;

/// The bfloat16 nearest to `x` (ties to even), worked out in f64 from the
/// two bfloat16 values around it: the reference the kernels must match.
fn nearest(x: f32) -> u16 {
    let bits = x.to_bits();
    let lo = bits & 0xFFFF_0000;
    let hi = lo + 0x1_0000;
    let (dl, dh) = ((x as f64 - f32::from_bits(lo) as f64).abs(), (f32::from_bits(hi) as f64 - x as f64).abs());
    let pick = if dl < dh || (dl == dh && (lo >> 16) & 1 == 0) { lo } else { hi };
    (pick >> 16) as u16
}

#[test]
fn rounding_to_bf16_is_to_nearest_with_ties_to_even() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut xs: Vec<f32> = (0..100_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Random bits: every exponent and mantissa, both signs.
            f32::from_bits((seed >> 32) as u32)
        })
        .filter(|x| x.is_finite() && x.abs() < 3.0e38)
        .collect();
    // Exact ties, both ways, and values that are bfloat16 already.
    xs.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -(1.0 + 1.0 / 256.0), 0.0, -0.0, 1.0, 3.140625]);
    let mut got = vec![0u16; xs.len()];
    ops::to_bf16(&xs, &mut got, 2);
    for (x, g) in xs.iter().zip(&got) {
        assert_eq!(*g, nearest(*x), "{x:e} ({:#010x})", x.to_bits());
    }
    let mut back = vec![0f32; xs.len()];
    ops::from_bf16(&got, &mut back, 2);
    for ((x, g), b) in xs.iter().zip(&got).zip(&back) {
        assert_eq!(b.to_bits(), (*g as u32) << 16, "{x:e}");
        // Within half a unit of bfloat16's 8-bit mantissa (normal values).
        assert!(x.abs() < f32::MIN_POSITIVE || (b - x).abs() <= x.abs() / 256.0, "{x:e} → {b:e}");
    }
    // Specials: infinities stay, NaN stays NaN, the largest values overflow to infinity.
    let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, -f32::MAX];
    let mut out = vec![0u16; specials.len()];
    ops::to_bf16(&specials, &mut out, 1);
    let mut wide = vec![0f32; specials.len()];
    ops::from_bf16(&out, &mut wide, 1);
    assert_eq!(&wide[..2], &[f32::INFINITY, f32::NEG_INFINITY]);
    assert!(wide[2].is_nan());
    assert_eq!(&wide[3..], &[f32::INFINITY, f32::NEG_INFINITY]);
}

/// The GPT example for `steps` steps on one device, with `extra` in a
/// placement of one device.
fn example(extra: &str, steps: u64) -> String {
    let text = std::fs::read_to_string(root().join("examples/tiny_gpt.plan")).expect("example");
    let text = text.replace("\"data/tiny.txt\"", &format!("{:?}", common::example_data("tiny.txt")));
    text.replace("steps: 300", &format!("steps: {steps}")).replace("devices cpu x 1", &format!("devices cpu x 1\nplacement {{\n  mesh (one: 1)\n  {extra}\n}}"))
}

/// The stated tolerance: over 100 steps of the GPT example, every loss of
/// the bfloat16 run within 2e-3 relative of the float32 run's (measured:
/// 5.3e-4 at most).
#[test]
fn a_bf16_run_follows_the_f32_run_for_100_steps() {
    let f32_run = common::train_text(&example("", 100), root(), |_| {}, None);
    let bf16_run = common::train_text(&example("autocast bf16", 100), root(), |_| {}, None);
    assert_eq!((f32_run.len(), bf16_run.len()), (100, 100));
    let worst = f32_run.iter().zip(&bf16_run).map(|(a, b)| ((a - b) / a).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 2e-3, "largest relative difference {worst:e}");
    // And the rounding happens: the two runs are not the same.
    assert!(f32_run.iter().zip(&bf16_run).skip(1).any(|(a, b)| a != b));
    assert!(bf16_run[99] < bf16_run[0] * 0.6, "it learns: {} → {}", bf16_run[0], bf16_run[99]);
}

/// Under autocast every placement matches one device with the same
/// autocast to bfloat16's precision: another summation order can round to
/// the neighbouring bfloat16 (losses within 1e-4, parameters within 2e-3;
/// `shardplan verify`'s defaults for such plans).
#[test]
fn placements_under_autocast_match_one_device() {
    let check = |name: &str, plan: String| {
        let cmp = common::verify_text(&plan, root(), &[]);
        assert_eq!(cmp.losses.len(), 10, "{name}");
        assert!(cmp.within(1e-4, 2e-3), "{name}: {cmp:?}");
    };
    let pp = "pipeline over pipe {\n    stage embed, pos, blocks[0]\n    stage blocks[1], ln, head\n    microbatches 2\n    schedule 1f1b\n  }";
    check("dp2", gpt(8, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n  autocast bf16\n}"));
    check("tp2", gpt(8, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_GPT}\n  autocast bf16 blocks[*]\n}}")));
    check("pp2", gpt(8, 2, &format!("placement {{\n  mesh (pipe: 2)\n  {pp}\n  autocast bf16\n}}")));
    check("dp4_zero3_recompute", gpt(8, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n  zero 3\n  recompute blocks[*]\n  autocast bf16\n}"));
}

fn planned(plan: &str) -> Vec<memory::Memory> {
    let (c, d) = shardplan_compiler::check_source(plan.as_bytes());
    let c = c.unwrap_or_else(|| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    let compiled = shardplan_compiler::compile(&c, &Default::default()).unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    memory::plan(compiled.plan().expect("placed"))
}

/// The values kept from the forward pass into the backward pass take two
/// bytes where they are bfloat16, and the memory plan counts two: a deeper
/// model saves more, as those values grow with its depth and the
/// conversions' temporaries do not.
#[test]
fn autocast_keeps_activations_in_two_bytes() {
    let deep = |extra: &str| example(extra, 10).replace("repeat 2 Block", "repeat 8 Block");
    let (f, b) = (planned(&deep("")), planned(&deep("autocast bf16")));
    assert_eq!((f[0].params, f[0].optimizer), (b[0].params, b[0].optimizer), "master weights and optimizer state stay f32");
    assert!((b[0].activations as f64) < 0.85 * f[0].activations as f64, "{} against {}", b[0].activations, f[0].activations);
    // The bytes the plan counts are the bytes the program's buffers hold.
    let (c, _) = shardplan_compiler::check_source(deep("autocast bf16").as_bytes());
    let compiled = shardplan_compiler::compile(&c.expect("checks"), &Default::default()).expect("compiles");
    let d = &compiled.plan().expect("placed").devices[0];
    let halves = d.program.buffers.iter().filter(|x| x.elem == shardplan_compiler::kernel::Elem::Bf16).count();
    assert!(halves > 0);
    let exec = shardplan_runtime::backend::cpu::exec::Executor::with_slots(d.program.clone(), 1, d.slots).expect("builds");
    assert_eq!(exec.bytes(), memory::device(d).total());
}
