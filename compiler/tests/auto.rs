//! `placement auto`: the search is deterministic, never picks a plan that
//! does not fit, and moves from data parallelism to sharded or pipelined
//! plans as the memory budget shrinks.

mod common;

use shardplan_compiler::partition::auto::{search, Profile};
use shardplan_compiler::{autodiff, graph};

fn plan(budget: &str) -> String {
    std::fs::read_to_string("../examples/auto.plan").unwrap().replace("memory 512 MiB per device", &format!("memory {budget} per device"))
}

/// A machine with a core per device, so devices do not take turns.
fn profile() -> Profile {
    Profile { cores: 4, ..Profile::default() }
}

fn chosen(budget: &str) -> (usize, usize, usize, u64) {
    let c = common::checked(&plan(budget));
    let g = autodiff::differentiate(graph::build(&c), &c);
    let s = search(&c, &g, &profile());
    let i = s.chosen.unwrap_or_else(|| panic!("nothing fits {budget}"));
    let best = &s.candidates[i];
    (best.data, best.model, best.pipe, best.exact_memory.expect("checked exactly"))
}

#[test]
fn a_shrinking_budget_moves_from_data_parallel_to_sharded_or_pipelined() {
    let (d, t, p, _) = chosen("512 MiB");
    assert_eq!((d, t, p), (4, 1, 1), "with memory to spare, pure data parallelism");
    let (d, t, p, mem) = chosen("20 MiB");
    assert!(t > 1 || p > 1, "at 20 MiB: data {d} tensor {t} pipe {p}");
    assert!(mem <= 20 << 20, "{mem}");
}

#[test]
fn the_choice_always_fits_and_is_deterministic() {
    for budget in ["512 MiB", "40 MiB", "30 MiB", "20 MiB", "16 MiB", "12 MiB"] {
        let a = chosen(budget);
        let b = chosen(budget);
        assert_eq!(a, b, "{budget}");
        let limit: u64 = budget.trim_end_matches(" MiB").parse::<u64>().unwrap() << 20;
        assert!(a.3 <= limit, "{budget}: chose {a:?}");
    }
}

#[test]
fn nothing_fits_a_tiny_budget() {
    let c = common::checked(&plan("1 MiB"));
    let g = autodiff::differentiate(graph::build(&c), &c);
    let s = search(&c, &g, &profile());
    assert_eq!(s.chosen, None);
    assert!(!s.candidates.is_empty());
}
