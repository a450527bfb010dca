//! The planner's explanation: the text `inspect --explain` prints.
//!
//! Input: a [`Search`] (with the seconds it took), or one [`Candidate`]
//! predicted for a placement written out. Output: text, one line per
//! figure: the choice, its predicted step broken down into compute,
//! communication and pipeline bubble, its memory, the runners-up with why
//! each lost, and the placement text to paste into a plan.
//!
//! Invariants: the text depends only on its inputs (the search time is the
//! one figure that depends on the machine); times print through [`ms`], so
//! every figure of one explanation has the same form.

use super::{Candidate, Search, NEAR_TIE};
use crate::units::{Bytes, Unit};

/// Milliseconds with three significant figures below 1 ms (steps of
/// small models take tens of microseconds), two decimals above.
pub fn ms(s: f64) -> String {
    let v = s * 1e3;
    match v.abs() {
        a if !(5e-5..1.0).contains(&a) => format!("{:.2} ms", if a < 5e-5 { 0.0 } else { v }),
        a if a >= 0.1 => format!("{v:.3} ms"),
        _ => format!("{v:.4} ms"),
    }
}

/// Sizes in MiB with one decimal, so the figures of one explanation line up.
fn mib(b: u64) -> String {
    format!("{:.1}", Bytes(b).in_unit(Unit::MiB))
}

/// Why `other` lost to `best`.
fn reason(best: &Candidate, other: &Candidate, budget: Option<u64>) -> String {
    if let Some(why) = &other.refused {
        return format!("cannot be placed: {why}");
    }
    if !other.fits {
        let m = other.exact_memory.unwrap_or(other.memory);
        return match budget {
            Some(b) => format!("does not fit: {} per device, the budget is {}", mib(m), mib(b)),
            None => "could not be partitioned".into(),
        };
    }
    let d = [
        ("compute", other.compute_s - best.compute_s, other.compute_s),
        ("communication", other.comm_s - best.comm_s, other.comm_s),
        ("pipeline bubble", other.bubble_s - best.bubble_s, other.bubble_s),
    ];
    if other.step_s() == best.step_s() {
        return format!("same predicted time, more memory: {} against {} per device", mib(other.memory), mib(best.memory));
    }
    if other.step_s() < best.step_s() {
        let faster = (1.0 - other.step_s() / best.step_s().max(1e-12)) * 100.0;
        return format!("{faster:.1}% faster by the model, within its {:.0}% margin: the simpler plan goes first", NEAR_TIE * 100.0);
    }
    let worst = d.iter().max_by(|a, b| a.1.total_cmp(&b.1)).copied().unwrap_or(("compute", 0.0, 0.0));
    let slower = (other.step_s() / best.step_s().max(1e-12) - 1.0) * 100.0;
    format!("{slower:+.0}%: more {} ({} against {})", worst.0, ms(worst.2), ms(worst.2 - worst.1))
}

/// The explanation `inspect --explain` prints.
pub fn explain(file: &str, s: &Search, secs: f64) -> String {
    let mut out = format!(
        "{file}: placement auto over {} devices{}; {} candidates searched in {:.1} ms\n",
        s.devices,
        s.budget.map(|b| format!(", memory {} per device", mib(b))).unwrap_or_default(),
        s.considered,
        secs * 1e3
    );
    let Some(i) = s.chosen else {
        out += "no candidate fits the memory budget; the closest:\n";
        for c in s.candidates.iter().take(3) {
            out += &format!("  {:<44} {} per device\n", c.name(), mib(c.exact_memory.unwrap_or(c.memory)));
        }
        return out;
    };
    let best = &s.candidates[i];
    out += &format!("chosen: {}\n", best.name());
    if best.pipe > 1 {
        out += &format!("  stages: {}\n", best.stages.iter().map(|s| s.join(", ")).collect::<Vec<_>>().join(" | "));
    }
    out += &format!(
        "  predicted step {} = compute {} + communication {} + pipeline bubble {}\n",
        ms(best.step_s()),
        ms(best.compute_s),
        ms(best.comm_s),
        ms(best.bubble_s)
    );
    if best.overlapped_s > 0.0 {
        out += &format!("  (a further {} of pipeline transfers hides behind compute)\n", ms(best.overlapped_s));
    }
    out += &format!("  memory per device {} (planned from its programs; estimate {})\n", mib(best.exact_memory.unwrap_or(best.memory)), mib(best.memory));
    let others: Vec<&Candidate> = s.candidates.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| c).take(5).collect();
    if !others.is_empty() {
        out += "next best:\n";
        let width = others.iter().map(|o| o.name().chars().count()).max().unwrap_or(0).max(60);
        for o in others {
            out += &format!("  {:<width$} {:>10}  {}\n", o.name(), ms(o.step_s()), reason(best, o, s.budget));
        }
    }
    // The faster plans memory ruled out (every mode that would have won).
    let mut over: Vec<&Candidate> = s.candidates.iter().filter(|c| !c.fits && c.refused.is_none() && c.step_s() < best.step_s()).collect();
    over.sort_by(|a, b| a.step_s().total_cmp(&b.step_s()));
    if !over.is_empty() {
        out += "faster, but over the memory budget:\n";
        let width = over.iter().take(5).map(|o| o.name().chars().count()).max().unwrap_or(0).max(60);
        for o in over.iter().take(5) {
            let how = if o.exact_memory.is_some() { "planned" } else { "estimated, more than twice the budget" };
            out += &format!("  {:<width$} {:>10}  {} ({how})\n", o.name(), ms(o.step_s()), reason(best, o, s.budget));
        }
    }
    out += "as placement text:\n";
    for line in s.placement.lines() {
        out += &format!("  {line}\n");
    }
    out
}

/// What `inspect --explain` prints for a plan that places itself: the cost
/// model's predicted step, broken down as for a candidate of the search.
pub fn explain_placed(file: &str, c: &Candidate) -> String {
    let mut out = format!("{file}: {} as placed, by the cost model\n", c.name());
    if c.pipe > 1 {
        out += &format!("  stages: {}\n", c.stages.iter().map(|s| s.join(", ")).collect::<Vec<_>>().join(" | "));
    }
    out +=
        &format!("  predicted step {} = compute {} + communication {} + pipeline bubble {}\n", ms(c.step_s()), ms(c.compute_s), ms(c.comm_s), ms(c.bubble_s));
    if c.overlapped_s > 0.0 {
        out += &format!("  (a further {} of pipeline transfers hides behind compute)\n", ms(c.overlapped_s));
    }
    out += &format!("  memory per device {} (planned from its programs; estimate {})\n", mib(c.exact_memory.unwrap_or(c.memory)), mib(c.memory));
    out
}
