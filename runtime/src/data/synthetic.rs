//! Synthetic classification data: Gaussian blobs, one per class.
//!
//! Input: `rows`, `features`, `classes` and `seed` of the source, and the
//! model's class count when it is known.
//! Output: a training [`Dataset`] of `rows` samples (no test split). Each
//! class `c` has a mean vector `mu_c` with standard normal entries; a row
//! draws its label uniformly from `0..classes` and its features as
//! `mu_label + noise`, the noise standard normal. The label is therefore
//! learnable from the features: the class means lie about `sqrt(2 *
//! features)` noise deviations apart.
//! Invariants: the data depends only on the four arguments (bit for bit, on
//! every machine); the first `k` rows are the same whatever `rows` is, so a
//! larger data set extends a smaller one.

use super::rng::Xoshiro256;
use super::{DataError, Dataset, Splits};
use std::path::Path;

/// Names the synthetic stream, so that it is unrelated to the sampler's
/// stream under the same seed.
const DOMAIN: u64 = 0x7379_6e74_6865_7469; // "syntheti"

/// The most values (`rows * features`) generated: 4 GiB of `f32`, far beyond
/// what a synthetic benchmark needs and short of exhausting a machine.
const MAX_VALUES: usize = 1 << 30;

pub(super) fn generate(rows: i64, features: i64, classes: i64, seed: u64, model_classes: Option<usize>) -> Result<Splits, DataError> {
    let nowhere = Path::new("");
    let positive = |v: i64, name: &str, min: i64| -> Result<usize, DataError> {
        // The checker enforces these minimums; they are checked again so a
        // source built some other way cannot make generation misbehave.
        match usize::try_from(v) {
            Ok(n) if v >= min => Ok(n),
            _ => Err(DataError::new("data::bad_argument", format!("synthetic `{name}` is {v}, below {min}"), nowhere)
                .help(format!("give `{name}` a value of at least {min}"))),
        }
    };
    let rows = positive(rows, "rows", 1)?;
    let width = positive(features, "features", 1)?;
    let classes = positive(classes, "classes", 2)?;
    if rows.checked_mul(width).is_none_or(|n| n > MAX_VALUES) || classes.checked_mul(width).is_none_or(|n| n > MAX_VALUES) {
        return Err(DataError::new("data::too_large", format!("synthetic data of {rows} rows × {width} features is too large to generate"), nowhere)
            .help(format!("keep rows × features (and classes × features) at most {MAX_VALUES}")));
    }
    if i32::try_from(classes).is_err() {
        return Err(DataError::new("data::bad_argument", format!("synthetic `classes` is {classes}, beyond i32"), nowhere).help("use fewer classes"));
    }
    if let Some(c) = model_classes.filter(|&c| classes > c) {
        return Err(DataError::new("data::label_out_of_range", format!("the synthetic source has {classes} classes, but the model has {c}"), nowhere)
            .help(format!("set `classes: {c}` in the source, or widen the model's output to {classes}")));
    }

    let mut rng = Xoshiro256::stream(seed, DOMAIN, 0);
    // Means first, with a fixed number of draws, so the rows that follow do
    // not depend on `rows`.
    let means: Vec<f64> = (0..classes * width).map(|_| rng.normal()).collect();
    let mut xs = Vec::with_capacity(rows * width);
    let mut ys = Vec::with_capacity(rows);
    for _ in 0..rows {
        let c = rng.below(classes as u64) as usize;
        ys.push(c as i32);
        xs.extend(means[c * width..(c + 1) * width].iter().map(|&m| (m + rng.normal()) as f32));
    }
    Ok(Splits { train: Dataset::table(xs, ys, width), test: None })
}

#[cfg(test)]
mod tests {
    use super::super::{load, Batch, Dataset};
    use shardplan_compiler::check::DataSource;
    use std::path::Path;

    fn synth(rows: i64, features: i64, classes: i64, seed: u64) -> Dataset {
        let source = DataSource::Synthetic { rows, features, classes, seed };
        load(&source, Path::new("."), None, None).unwrap().train
    }

    fn all(d: &Dataset) -> (Vec<f32>, Vec<i32>) {
        let rows: Vec<usize> = (0..d.len()).collect();
        match d.gather(&rows) {
            Batch::Table { features, labels } => (features, labels),
            Batch::Text { .. } => panic!("not a table"),
        }
    }

    #[test]
    fn same_seed_same_data() {
        let a = synth(256, 8, 4, 3);
        assert_eq!(a.len(), 256);
        assert_eq!(a.width(), 8);
        assert_eq!(all(&a), all(&synth(256, 8, 4, 3)));
        assert_ne!(all(&a), all(&synth(256, 8, 4, 4)));
        // A longer data set starts with the shorter one.
        let (xs, ys) = all(&synth(512, 8, 4, 3));
        let (xs0, ys0) = all(&a);
        assert_eq!((&xs[..xs0.len()], &ys[..ys0.len()]), (&xs0[..], &ys0[..]));
    }

    #[test]
    fn labels_cover_the_classes_and_are_learnable() {
        let (xs, ys) = all(&synth(2000, 16, 4, 1));
        assert!(ys.iter().all(|&y| (0..4).contains(&y)));
        let counts: Vec<usize> = (0..4).map(|c| ys.iter().filter(|&&y| y == c).count()).collect();
        assert!(counts.iter().all(|&n| n > 400), "{counts:?}");
        // Nearest class centroid, estimated from the data itself, recovers
        // almost every label: the classes are separable from the features.
        let mut centroids = vec![0.0f64; 4 * 16];
        for (row, &y) in xs.chunks_exact(16).zip(&ys) {
            for (k, &x) in row.iter().enumerate() {
                centroids[y as usize * 16 + k] += f64::from(x) / counts[y as usize] as f64;
            }
        }
        let correct = xs
            .chunks_exact(16)
            .zip(&ys)
            .filter(|(row, &y)| {
                let dist = |c: usize| row.iter().enumerate().map(|(k, &x)| (f64::from(x) - centroids[c * 16 + k]).powi(2)).sum::<f64>();
                (0..4).min_by(|&a, &b| dist(a).total_cmp(&dist(b))) == Some(y as usize)
            })
            .count();
        assert!(correct > 1900, "{correct} of 2000");
    }

    #[test]
    fn arguments_are_checked() {
        let err =
            |rows, features, classes, model| load(&DataSource::Synthetic { rows, features, classes, seed: 0 }, Path::new("."), None, model).unwrap_err().code;
        assert_eq!(err(0, 4, 2, None), "data::bad_argument");
        assert_eq!(err(4, -1, 2, None), "data::bad_argument");
        assert_eq!(err(4, 4, 1, None), "data::bad_argument");
        assert_eq!(err(1 << 40, 1 << 20, 2, None), "data::too_large");
        assert_eq!(err(4, 4, 5, Some(4)), "data::label_out_of_range");
        let ok = load(&DataSource::Synthetic { rows: 4, features: 4, classes: 3, seed: 0 }, Path::new("."), None, Some(4));
        assert!(ok.is_ok_and(|s| s.test.is_none()));
    }
}
