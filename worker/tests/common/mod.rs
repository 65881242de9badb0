//! Shared helpers of the parity tests: fixture paths and tolerant comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use spin_worker::weights::{StoredTensor, WeightFile};

/// `worker/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The reference tensors recorded by `scripts/make_fixtures.py` for pipeline `name`.
pub fn reference(name: &str) -> WeightFile {
    WeightFile::open(&fixture(name).join("reference.safetensors")).expect("reference fixture")
}

/// The CPU device every test runs on.
pub fn device() -> Device {
    Device::flex()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f32::max)
}

/// Asserts `actual` has the stored shape and lies within `tol` (max abs) of it.
pub fn assert_close<const D: usize>(
    actual: Tensor<D>,
    expected: &StoredTensor,
    tol: f32,
    what: &str,
) {
    assert_eq!(actual.dims().to_vec(), expected.shape, "{what}: shape");
    let values = actual
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data");
    let diff = max_abs_diff(&values, &expected.values);
    assert!(diff <= tol, "{what}: max abs error {diff:e} > {tol:e}");
    eprintln!("{what}: max abs error {diff:e}");
}
