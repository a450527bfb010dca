//! Checkpoint files in the safetensors format.
//!
//! Input: named f32 tensors (row-major, with a shape) plus string metadata to
//! [`save`]; a path to [`load`]. Output: a safetensors file that PyTorch /
//! Hugging Face `safetensors.torch.load_file` reads, and back from it the
//! tensors (sorted by name) and the metadata. [`select`] then matches loaded
//! tensors against the names and shapes a model expects.
//!
//! Invariants:
//! - Round trips are bit-exact: every f32 is stored as its little-endian bit
//!   pattern, so NaN payloads, -0.0 and subnormals survive.
//! - `path` never holds a partial file: [`save`] writes a sibling temporary
//!   file, fsyncs it and renames it over `path`.
//! - Nothing read from a file can panic or make us allocate more than the
//!   file's actual size: the header length is checked against a cap and the
//!   real file length before anything else is read, and every size is checked
//!   against its shape before data is copied.
//! - Only F32 tensors are accepted; any other dtype is an error, not a cast.

use crate::atomic::AtomicFile;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

/// Same cap the safetensors reference implementations enforce, so a file we
/// write is never one that PyTorch would refuse for its header size.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// The length prefix in front of the JSON header.
const LEN_PREFIX: usize = 8;

/// Reserved by the format for the metadata map; a tensor of that name would
/// collide with it in the JSON header.
const METADATA_KEY: &str = "__metadata__";

/// Elements converted per write, so large tensors stream through a small
/// buffer instead of being copied whole into bytes.
const WRITE_CHUNK: usize = 16 * 1024;

/// A named, row-major f32 tensor. `data.len()` equals the product of `shape`
/// (1 for a scalar, whose shape is empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint file {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("invalid checkpoint {}: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },

    #[error(
        "checkpoint {}: tensor `{name}` has dtype {dtype}, but only F32 tensors are supported",
        .path.display()
    )]
    Dtype { path: PathBuf, name: String, dtype: String },

    #[error("{}", mismatch_message(.path, .missing, .extra, .misshaped))]
    Mismatch {
        path: PathBuf,
        missing: Vec<String>,
        extra: Vec<String>,
        /// (name, expected shape, found shape)
        misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    },

    #[error("checkpoint {}: metadata `{key}`: {reason}", .path.display())]
    Meta { path: PathBuf, key: String, reason: String },
}

fn mismatch_message(path: &Path, missing: &[String], extra: &[String], misshaped: &[(String, Vec<usize>, Vec<usize>)]) -> String {
    let mut out =
        format!("checkpoint {} does not match the model ({} missing, {} extra, {} mis-shaped):", path.display(), missing.len(), extra.len(), misshaped.len());
    // Writing into a String cannot fail, so the results are safe to drop.
    for name in missing {
        let _ = write!(out, "\n  missing:    `{name}` (the model has it, the file does not)");
    }
    for name in extra {
        let _ = write!(out, "\n  extra:      `{name}` (the file has it, the model does not)");
    }
    for (name, expected, found) in misshaped {
        let _ = write!(out, "\n  mis-shaped: `{name}` expected {expected:?}, found {found:?}");
    }
    out
}

impl CheckpointError {
    /// A stable identifier for this kind of error, for diagnostics and tests.
    pub fn code(&self) -> &'static str {
        match self {
            CheckpointError::Io { .. } => "checkpoint::io",
            CheckpointError::Corrupt { .. } => "checkpoint::corrupt",
            CheckpointError::Dtype { .. } => "checkpoint::dtype",
            CheckpointError::Mismatch { .. } => "checkpoint::mismatch",
            CheckpointError::Meta { .. } => "checkpoint::meta",
        }
    }

    /// One line telling the user how to fix it.
    pub fn help(&self) -> String {
        match self {
            CheckpointError::Io { .. } => "check that the directory exists, that you may read/write it, and that the disk is not full".to_string(),
            CheckpointError::Corrupt { .. } => "the file is damaged or not a safetensors checkpoint; restore it from a backup or save it again".to_string(),
            CheckpointError::Dtype { name, .. } => format!("convert `{name}` to float32 before saving (in PyTorch: `tensor.float()`)"),
            CheckpointError::Mismatch { .. } => "load a checkpoint saved from this same model, or change the model to match the checkpoint".to_string(),
            CheckpointError::Meta { key, .. } => {
                format!("the checkpoint was not written by a compatible shardplan run; save it again so that it records `{key}`")
            }
        }
    }
}

fn io_err(path: &Path, source: io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

fn from_safetensors(path: &Path, err: SafeTensorError) -> CheckpointError {
    match err {
        SafeTensorError::IoError(source) => io_err(path, source),
        other => corrupt(path, other.to_string()),
    }
}

/// Element count of `shape`, or None when it overflows.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Byte length of an f32 tensor of `shape`, or None when it overflows.
fn f32_byte_len(shape: &[usize]) -> Option<usize> {
    element_count(shape)?.checked_mul(size_of::<f32>())
}

/// Writes tensors (f32, little-endian, laid out in the given order) and string
/// metadata atomically: a temporary file in the same directory, fsync, then
/// rename over `path`. Never leaves a partial file at `path`; on error the
/// temporary file is removed.
///
/// Tensors must have distinct names (not `__metadata__`) and data lengths
/// matching their shapes; otherwise nothing is written and the error is
/// `checkpoint::corrupt`.
pub fn save(path: &Path, tensors: &[Tensor], metadata: &BTreeMap<String, String>) -> Result<(), CheckpointError> {
    let header = build_header(path, tensors, metadata)?;

    // A failed write drops the file, which removes its temporary name.
    let mut file = AtomicFile::create(path).map_err(|e| io_err(path, e))?;
    write_body(path, &mut file, &header, tensors)?;
    file.commit().map_err(|e| io_err(path, e))
}

/// Builds the JSON header with safetensors' own metadata type, so the layout
/// rules (contiguous offsets, 8-byte padding) are the library's, while the
/// tensor bytes can still be streamed in the caller's order without first
/// copying the whole checkpoint into memory.
fn build_header(path: &Path, tensors: &[Tensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, CheckpointError> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(tensors.len());
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        if t.name == METADATA_KEY {
            return Err(corrupt(path, format!("refusing to write a tensor named `{METADATA_KEY}`, which the format reserves")));
        }
        if !seen.insert(&t.name) {
            return Err(corrupt(path, format!("refusing to write two tensors named `{}`", t.name)));
        }
        let count = element_count(&t.shape).ok_or_else(|| corrupt(path, format!("tensor `{}` shape {:?} overflows", t.name, t.shape)))?;
        if count != t.data.len() {
            return Err(corrupt(path, format!("refusing to write tensor `{}`: shape {:?} holds {count} values but it has {}", t.name, t.shape, t.data.len())));
        }
        let end = f32_byte_len(&t.shape).and_then(|n| offset.checked_add(n)).ok_or_else(|| corrupt(path, "total tensor size overflows"))?;
        infos.push((t.name.clone(), TensorInfo { dtype: Dtype::F32, shape: t.shape.clone(), data_offsets: (offset, end) }));
        offset = end;
    }

    let meta = if metadata.is_empty() { None } else { Some(metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect()) };
    let meta = Metadata::new(meta, infos).map_err(|e| from_safetensors(path, e))?;
    let mut header = serde_json::to_vec(&meta).map_err(|e| corrupt(path, format!("cannot encode header: {e}")))?;
    // The format pads the header with spaces so the data starts 8-byte aligned.
    let padded = header.len().next_multiple_of(LEN_PREFIX);
    header.resize(padded, b' ');
    if header.len() as u64 > MAX_HEADER_LEN {
        return Err(corrupt(path, format!("header would be {} bytes, over the {MAX_HEADER_LEN}-byte limit readers accept", header.len())));
    }
    Ok(header)
}

/// Errors name the final `path`: the temporary file is an implementation
/// detail that is gone by the time the user reads the message.
fn write_body(path: &Path, w: &mut impl Write, header: &[u8], tensors: &[Tensor]) -> Result<(), CheckpointError> {
    let err = |e| io_err(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(err)?;
    w.write_all(header).map_err(err)?;
    let mut buf = Vec::with_capacity(WRITE_CHUNK * size_of::<f32>());
    for t in tensors {
        for chunk in t.data.chunks(WRITE_CHUNK) {
            buf.clear();
            // to_le_bytes is a bit copy, which is what keeps NaN payloads intact.
            buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            w.write_all(&buf).map_err(err)?;
        }
    }
    Ok(())
}

/// Reads every tensor and the metadata. Tensors come back sorted by name.
pub fn load(path: &Path) -> Result<(Vec<Tensor>, BTreeMap<String, String>), CheckpointError> {
    let bytes = read_bounded(path)?;
    // read_metadata validates the whole layout: offsets contiguous, sizes
    // consistent with shapes, and the last offset ending exactly at the file end.
    let (header_len, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| from_safetensors(path, e))?;
    let data = LEN_PREFIX.checked_add(header_len).and_then(|start| bytes.get(start..)).ok_or_else(|| corrupt(path, "header runs past the end of the file"))?;

    let mut infos: Vec<(String, &TensorInfo)> = meta.tensors().into_iter().collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    // Check every dtype before converting anything, so a bad file costs no
    // allocation beyond its bytes.
    for (name, info) in &infos {
        if info.dtype != Dtype::F32 {
            return Err(CheckpointError::Dtype { path: path.to_path_buf(), name: name.clone(), dtype: info.dtype.to_string() });
        }
    }

    let mut tensors = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let (start, end) = info.data_offsets;
        let raw = data.get(start..end).ok_or_else(|| corrupt(path, format!("tensor `{name}` data lies outside the file")))?;
        let want = f32_byte_len(&info.shape).ok_or_else(|| corrupt(path, format!("tensor `{name}` shape {:?} overflows", info.shape)))?;
        if raw.len() != want {
            return Err(corrupt(path, format!("tensor `{name}` has {} data bytes but shape {:?} needs {want}", raw.len(), info.shape)));
        }
        let data = raw.chunks_exact(size_of::<f32>()).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.push(Tensor { name, shape: info.shape.clone(), data });
    }

    let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    Ok((tensors, metadata))
}

/// Reads the whole file, but only after the header length prefix has been
/// checked against the cap and the real file size, so a hostile prefix can
/// neither trigger a giant allocation nor make us read an unbounded stream.
fn read_bounded(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();

    let mut prefix = [0u8; LEN_PREFIX];
    if file_len < LEN_PREFIX as u64 {
        return Err(corrupt(path, format!("file is {file_len} bytes, too short for a safetensors header")));
    }
    file.read_exact(&mut prefix).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(path, "file ends inside the header length")
        } else {
            io_err(path, e)
        }
    })?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(corrupt(path, format!("header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit")));
    }
    if header_len > file_len - LEN_PREFIX as u64 {
        return Err(corrupt(path, format!("header claims {header_len} bytes but the file has only {file_len} in total")));
    }

    let len = usize::try_from(file_len).map_err(|_| corrupt(path, format!("file of {file_len} bytes is too large to load")))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| io_err(path, io::Error::new(io::ErrorKind::OutOfMemory, format!("cannot allocate {len} bytes"))))?;
    bytes.extend_from_slice(&prefix);
    // `take` bounds the read to the size we reserved, even if the file grows.
    (&mut file).take(file_len - LEN_PREFIX as u64).read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
    if bytes.len() != len {
        return Err(corrupt(path, format!("file shrank while reading ({} of {len} bytes)", bytes.len())));
    }
    Ok(bytes)
}

/// Checks that `found` has exactly the `expected` (name, shape) tensors, in
/// any order; returns them reordered to match `expected`, or Mismatch listing
/// every missing, extra and mis-shaped tensor.
///
/// A name repeated in `found` beyond its first occurrence counts as extra; a
/// name repeated in `expected` can only be satisfied once, so its repeats
/// count as missing.
pub fn select(path: &Path, found: Vec<Tensor>, expected: &[(String, Vec<usize>)]) -> Result<Vec<Tensor>, CheckpointError> {
    let mut extra = Vec::new();
    let mut by_name: HashMap<String, Tensor> = HashMap::with_capacity(found.len());
    for t in found {
        if by_name.contains_key(&t.name) {
            extra.push(t.name);
        } else {
            by_name.insert(t.name.clone(), t);
        }
    }

    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut out = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        match by_name.remove(name) {
            None => missing.push(name.clone()),
            Some(t) if &t.shape != shape => misshaped.push((name.clone(), shape.clone(), t.shape)),
            Some(t) => out.push(t),
        }
    }
    extra.extend(by_name.into_keys());
    extra.sort();

    if missing.is_empty() && extra.is_empty() && misshaped.is_empty() {
        Ok(out)
    } else {
        Err(CheckpointError::Mismatch { path: path.to_path_buf(), missing, extra, misshaped })
    }
}

/// The metadata value under `key`, or a `checkpoint::meta` error naming it.
pub fn meta_str<'a>(path: &Path, metadata: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, CheckpointError> {
    metadata.get(key).map(String::as_str).ok_or_else(|| CheckpointError::Meta { path: path.to_path_buf(), key: key.to_string(), reason: "missing".to_string() })
}

/// The metadata value under `key` parsed as `T`, or a `checkpoint::meta`
/// error saying what was there and why it did not parse.
pub fn meta_parse<T>(path: &Path, metadata: &BTreeMap<String, String>, key: &str) -> Result<T, CheckpointError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let raw = meta_str(path, metadata, key)?;
    raw.parse().map_err(|e| CheckpointError::Meta { path: path.to_path_buf(), key: key.to_string(), reason: format!("cannot parse {raw:?}: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory per test, so tests run in parallel without sharing files.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let dir = std::env::temp_dir().join(format!("shardplan-checkpoint-{tag}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn t(name: &str, shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor { name: name.to_string(), shape: shape.to_vec(), data }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn special_values() -> Vec<f32> {
        vec![
            0.0,
            -0.0,
            1.5,
            f32::MIN_POSITIVE / 2.0, // subnormal
            f32::from_bits(1),       // smallest subnormal
            -f32::from_bits(0x007f_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7fa0_0001), // signalling NaN with a payload
            f32::from_bits(0xffc0_1234), // negative quiet NaN with a payload
            f32::MAX,
        ]
    }

    fn write_header(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    fn load_err(path: &Path) -> CheckpointError {
        match load(path) {
            Ok(_) => panic!("loading {} should fail", path.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn round_trip_is_bit_exact_with_metadata() {
        let dir = TempDir::new("roundtrip");
        let path = dir.path("model.safetensors");
        let tensors = vec![
            t("z.weight", &[3, 4], special_values()),
            t("a.bias", &[2], vec![-0.0, f32::from_bits(0x7f80_0001)]),
            t("scalar", &[], vec![42.0]),
            t("empty", &[0, 5], vec![]),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), "1200".to_string());
        meta.insert("plan".to_string(), "mlp \"quoted\" ünïcode".to_string());

        save(&path, &tensors, &meta).unwrap();
        let (loaded, loaded_meta) = load(&path).unwrap();

        assert_eq!(loaded_meta, meta);
        let names: Vec<&str> = loaded.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.bias", "empty", "scalar", "z.weight"]);
        for orig in &tensors {
            let got = loaded.iter().find(|l| l.name == orig.name).unwrap();
            assert_eq!(got.shape, orig.shape);
            assert_eq!(bits(&got.data), bits(&orig.data), "tensor {}", orig.name);
        }
        assert_eq!(meta_parse::<u64>(&path, &loaded_meta, "step").unwrap(), 1200);
    }

    #[test]
    fn data_is_laid_out_in_the_given_order() {
        let dir = TempDir::new("order");
        let path = dir.path("c.safetensors");
        save(&path, &[t("b", &[1], vec![2.0]), t("a", &[1], vec![1.0])], &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header must be padded to 8 bytes");
        assert_eq!(&bytes[8 + n..], [2.0f32.to_le_bytes(), 1.0f32.to_le_bytes()].concat());
    }

    #[test]
    fn bytes_match_the_reference_serializer_for_name_ordered_input() {
        let dir = TempDir::new("reference");
        let path = dir.path("c.safetensors");
        let tensors = vec![t("a", &[2], vec![1.0, -0.0]), t("b", &[1, 1], vec![f32::NAN])];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        save(&path, &tensors, &meta).unwrap();

        let raw: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().zip(&raw).map(|(t, r)| (t.name.clone(), TensorView::new(Dtype::F32, t.shape.clone(), r).unwrap())).collect();
        let reference = safetensors::serialize(views, Some(meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), reference);
    }

    #[test]
    fn select_reports_missing_extra_and_misshaped_together() {
        let path = Path::new("ckpt/step-10.safetensors");
        let found = vec![t("w1", &[2, 3], vec![0.0; 6]), t("b1", &[3], vec![0.0; 3]), t("stray", &[1], vec![0.0]), t("w2", &[3, 2], vec![0.0; 6])];
        let expected = vec![("w1".to_string(), vec![2, 3]), ("w2".to_string(), vec![2, 3]), ("b2".to_string(), vec![2]), ("b1".to_string(), vec![3])];
        let err = select(path, found, &expected).unwrap_err();
        assert_eq!(err.code(), "checkpoint::mismatch");
        match &err {
            CheckpointError::Mismatch { missing, extra, misshaped, .. } => {
                assert_eq!(missing, &["b2"]);
                assert_eq!(extra, &["stray"]);
                assert_eq!(misshaped, &[("w2".to_string(), vec![2, 3], vec![3, 2])]);
            }
            other => panic!("unexpected error {other:?}"),
        }
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("ckpt/step-10.safetensors"), "{text}");
        assert!(lines[1].contains("missing") && lines[1].contains("`b2`"), "{text}");
        assert!(lines[2].contains("extra") && lines[2].contains("`stray`"), "{text}");
        assert!(lines[3].contains("mis-shaped") && lines[3].contains("`w2`") && lines[3].contains("expected [2, 3], found [3, 2]"), "{text}");
        assert!(!err.help().is_empty());
    }

    #[test]
    fn select_reorders_to_expected() {
        let found = vec![t("b", &[1], vec![2.0]), t("a", &[2], vec![0.5, 1.0])];
        let expected = vec![("a".to_string(), vec![2]), ("b".to_string(), vec![1])];
        let got = select(Path::new("x"), found, &expected).unwrap();
        assert_eq!(got.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(got[0].data, [0.5, 1.0]);
    }

    #[test]
    fn select_counts_duplicates() {
        let found = vec![t("a", &[1], vec![1.0]), t("a", &[1], vec![2.0])];
        let expected = vec![("a".to_string(), vec![1]), ("a".to_string(), vec![1])];
        match select(Path::new("x"), found, &expected) {
            Err(CheckpointError::Mismatch { missing, extra, .. }) => {
                assert_eq!(missing, ["a"]);
                assert_eq!(extra, ["a"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn assert_corrupt(path: &Path) {
        let err = load_err(path);
        assert_eq!(err.code(), "checkpoint::corrupt", "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn empty_file_is_corrupt() {
        let dir = TempDir::new("empty");
        let path = dir.path("c.safetensors");
        std::fs::write(&path, b"").unwrap();
        assert_corrupt(&path);
    }

    #[test]
    fn random_bytes_are_corrupt() {
        let dir = TempDir::new("random");
        let path = dir.path("c.safetensors");
        // A fixed xorshift stream keeps the test reproducible.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for len in [7usize, 8, 9, 64, 4096] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            std::fs::write(&path, &bytes).unwrap();
            assert_corrupt(&path);
        }
        // Plausible small length prefixes followed by garbage.
        for n in [0u64, 2, 16] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend((0..32).map(|i| (i * 37) as u8));
            std::fs::write(&path, &bytes).unwrap();
            assert_corrupt(&path);
        }
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let dir = TempDir::new("truncated");
        let path = dir.path("c.safetensors");
        save(&path, &[t("w", &[64], vec![1.0; 64])], &BTreeMap::new()).unwrap();
        let full = std::fs::read(&path).unwrap();
        for cut in [full.len() - 1, full.len() - 4, full.len() / 2, 12, 8, 3] {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert_corrupt(&path);
        }
        let mut longer = full.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert_corrupt(&path);
    }

    #[test]
    fn header_claiming_more_data_than_present_is_corrupt() {
        let dir = TempDir::new("short-data");
        let path = dir.path("c.safetensors");
        write_header(&path, r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 8]);
        assert_corrupt(&path);
    }

    #[test]
    fn header_inconsistent_with_shape_is_corrupt() {
        let dir = TempDir::new("bad-shape");
        let path = dir.path("c.safetensors");
        write_header(&path, r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#, &[0u8; 16]);
        assert_corrupt(&path);
        write_header(&path, r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#, &[0u8; 16]);
        assert_corrupt(&path);
    }

    #[test]
    fn giant_header_length_is_corrupt() {
        let dir = TempDir::new("giant");
        let path = dir.path("c.safetensors");
        for n in [u64::MAX, 1 << 40, MAX_HEADER_LEN + 1, 50_000_000] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}      ");
            std::fs::write(&path, &bytes).unwrap();
            assert_corrupt(&path);
        }
    }

    #[test]
    fn non_f32_tensor_is_a_dtype_error() {
        let dir = TempDir::new("dtype");
        let path = dir.path("c.safetensors");
        let raw: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let f32_raw = 1.0f32.to_le_bytes();
        let views = vec![("ok", TensorView::new(Dtype::F32, vec![1], &f32_raw).unwrap()), ("wide", TensorView::new(Dtype::F64, vec![2], &raw).unwrap())];
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let err = load_err(&path);
        assert_eq!(err.code(), "checkpoint::dtype");
        match &err {
            CheckpointError::Dtype { name, dtype, .. } => {
                assert_eq!(name, "wide");
                assert_eq!(dtype, "F64");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.help().contains("wide"));
    }

    #[test]
    fn save_replaces_atomically_and_leaves_no_temp_files() {
        let dir = TempDir::new("atomic");
        let path = dir.path("c.safetensors");
        std::fs::write(&path, b"old contents").unwrap();
        save(&path, &[t("w", &[2], vec![1.0, 2.0])], &BTreeMap::new()).unwrap();
        save(&path, &[t("v", &[1], vec![3.0])], &BTreeMap::new()).unwrap();
        assert_eq!(dir.entries(), ["c.safetensors"]);
        let (loaded, _) = load(&path).unwrap();
        assert_eq!(loaded, [t("v", &[1], vec![3.0])]);
    }

    #[test]
    fn rejected_save_leaves_existing_file_and_no_temp_files() {
        let dir = TempDir::new("rejected");
        let path = dir.path("c.safetensors");
        save(&path, &[t("w", &[1], vec![1.0])], &BTreeMap::new()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let bad = [
            vec![t("w", &[2, 2], vec![1.0; 3])],
            vec![t("w", &[1], vec![1.0]), t("w", &[1], vec![2.0])],
            vec![t(METADATA_KEY, &[1], vec![1.0])],
            vec![t("w", &[usize::MAX, 2], vec![])],
        ];
        for tensors in &bad {
            let err = save(&path, tensors, &BTreeMap::new()).unwrap_err();
            assert_eq!(err.code(), "checkpoint::corrupt", "{err}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(dir.entries(), ["c.safetensors"]);
    }

    #[test]
    fn saving_into_a_missing_directory_is_an_io_error() {
        let dir = TempDir::new("missing-dir");
        let path = dir.path("no/such/dir/c.safetensors");
        let err = save(&path, &[t("w", &[1], vec![1.0])], &BTreeMap::new()).unwrap_err();
        assert_eq!(err.code(), "checkpoint::io");
        assert!(err.to_string().contains("no/such/dir/c.safetensors"), "{err}");
        assert!(dir.entries().is_empty());
    }

    #[test]
    fn loading_a_missing_file_is_an_io_error() {
        let dir = TempDir::new("missing-file");
        let err = load_err(&dir.path("absent.safetensors"));
        assert_eq!(err.code(), "checkpoint::io");
    }

    #[test]
    fn metadata_helpers_report_key() {
        let path = Path::new("c.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), "ten".to_string());
        let err = meta_parse::<u64>(path, &meta, "step").unwrap_err();
        assert_eq!(err.code(), "checkpoint::meta");
        assert!(err.to_string().contains("`step`") && err.to_string().contains("ten"));
        let err = meta_str(path, &meta, "plan").unwrap_err();
        assert_eq!(err.code(), "checkpoint::meta");
        assert!(err.help().contains("plan"));
    }

    #[test]
    fn every_error_has_a_code_and_help() {
        let p = PathBuf::from("c.safetensors");
        let errs = [
            CheckpointError::Io { path: p.clone(), source: io::Error::other("x") },
            corrupt(&p, "x"),
            CheckpointError::Dtype { path: p.clone(), name: "w".into(), dtype: "F16".into() },
            CheckpointError::Mismatch { path: p.clone(), missing: vec![], extra: vec!["e".into()], misshaped: vec![] },
            CheckpointError::Meta { path: p, key: "k".into(), reason: "missing".into() },
        ];
        for e in &errs {
            assert!(e.code().starts_with("checkpoint::"));
            assert!(!e.help().is_empty() && !e.help().contains('\n'));
            assert!(e.to_string().contains("c.safetensors"));
        }
    }
}
