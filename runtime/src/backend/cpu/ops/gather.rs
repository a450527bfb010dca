//! Embedding lookup (a row gather) and its gradient (a row scatter-add).
//! Ids come from data, so they are checked before any row is touched and
//! one out of range is a [`EngineError::BadData`] naming it.
//!
//! Input: a table, ids and their shapes. Output: the gathered rows (or the
//! scattered gradient). Invariant: the scatter-add visits ids in order, so
//! repeated ids add up the same way on every run.

use super::{expect_shape, invalid, par_rows, EngineError, F32Arg, I32Arg, Name};

/// Fails with the first id that is not a row of a `rows`-row table.
fn check_ids(ids: &[i32], rows: usize, what: &str) -> Result<(), EngineError> {
    match ids.iter().enumerate().find(|(_, &id)| usize::try_from(id).map_or(true, |r| r >= rows)) {
        Some((p, id)) => Err(EngineError::BadData(format!("{what} {id} at position {p} is outside 0..{rows}"))),
        None => Ok(()),
    }
}

/// (table [v, d], ids) → rows of the table, shape ids.shape + [d].
pub(super) fn embedding(
    name: Name<'_>,
    (table, ts): F32Arg<'_>,
    (ids, is): I32Arg<'_>,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    let &[v, d] = ts else {
        return Err(invalid(name, format!("table must be [vocab, dim], got {ts:?}")));
    };
    let want: Vec<usize> = is.iter().copied().chain([d]).collect();
    expect_shape(name, out_shape, &want)?;
    check_ids(ids, v, "embedding id")?;
    if d == 0 {
        return Ok(());
    }
    par_rows(
        out,
        d,
        threads,
        out.len(),
        #[inline(always)]
        |r0, block| {
            for (row, &id) in block.chunks_exact_mut(d).zip(ids.get(r0..).unwrap_or(&[])) {
                let s = id as usize * d;
                if let Some(src) = table.get(s..s + d) {
                    row.copy_from_slice(src);
                }
            }
        },
    );
    Ok(())
}

/// (ids, dy) → d table [v, d]: each dy row added to its id's row, in id order.
pub(super) fn embedding_grad(
    name: Name<'_>,
    (ids, _): I32Arg<'_>,
    (dy, _): F32Arg<'_>,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    let &[v, d] = out_shape else {
        return Err(invalid(name, format!("output must be [vocab, dim], got {out_shape:?}")));
    };
    if dy.len() != ids.len() * d {
        return Err(invalid(name, format!("dy has {} elements for {} ids of dim {d}", dy.len(), ids.len())));
    }
    check_ids(ids, v, "embedding id")?;
    if d == 0 {
        return Ok(());
    }
    // Threads own disjoint blocks of table rows and each scans every id, so
    // a row's sum has the same order whatever the split.
    par_rows(
        out,
        d,
        threads,
        dy.len(),
        #[inline(always)]
        |r0, block| {
            block.fill(0.0);
            let r1 = r0 + block.len() / d;
            for (k, &id) in ids.iter().enumerate() {
                let r = id as usize;
                if r < r0 || r >= r1 {
                    continue;
                }
                let (Some(dst), Some(src)) = (block.get_mut((r - r0) * d..(r - r0 + 1) * d), dy.get(k * d..(k + 1) * d)) else { continue };
                for (o, &g) in dst.iter_mut().zip(src) {
                    *o += g;
                }
            }
        },
    );
    Ok(())
}
