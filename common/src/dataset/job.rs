//! A job's prompts: the parquet files its spec names, read into pairs, split into training and
//! held-out prompts. The coordinator plans shards over `train`, workers encode positions of it;
//! both compute the same lists from the spec alone.

use std::path::PathBuf;

use super::{list_shards, read_pairs, split_prompts, DatasetError, PreferencePair, ReadReport};
use crate::spec::JobSpec;

/// The prompts of a job.
#[derive(Debug)]
pub struct JobPrompts {
    /// Every usable pair, numbered by position.
    pub pairs: Vec<PreferencePair>,
    /// What reading found (ties dropped, rows skipped).
    pub report: ReadReport,
    /// Pair indices to train on (at most `data.max_prompts` when it is set).
    pub train: Vec<usize>,
    /// Pair indices held out for evaluation (at most `max(eval.samples, 8)`).
    pub held_out: Vec<usize>,
}

/// The parquet files of `data.train`: directories are listed, files taken as they are.
pub fn shard_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DatasetError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(list_shards(path)?);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(DatasetError::InvalidArgument(format!(
                "data.train entry {} does not exist",
                path.display()
            )));
        }
    }
    if files.is_empty() {
        let listed: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(DatasetError::InvalidArgument(format!(
            "data.train holds no parquet shards (looked in {})",
            listed.join(", ")
        )));
    }
    Ok(files)
}

impl JobPrompts {
    /// Reads the job's dataset and splits it under the job's seed.
    pub fn read(spec: &JobSpec) -> Result<Self, DatasetError> {
        let files = shard_files(&spec.train_data)?;
        let (pairs, report) = read_pairs(&files)?;
        tracing::info!(
            files = files.len(),
            pairs = pairs.len(),
            ties = report.ties_dropped,
            skipped = report.skipped.len(),
            "read dataset"
        );
        let split = split_prompts(pairs.len(), spec.seed, spec.held_out_fraction)?;
        let mut train = split.train;
        if spec.max_prompts > 0 {
            train.truncate(spec.max_prompts);
        }
        if train.is_empty() {
            return Err(DatasetError::InvalidArgument(format!(
                "no training prompts in data.train: {} usable pairs of {} rows read \
                 ({} ties dropped, {} corrupt rows skipped), held-out fraction {}",
                pairs.len(),
                report.rows,
                report.ties_dropped,
                report.skipped.len(),
                spec.held_out_fraction
            )));
        }
        let held_out = split
            .held_out
            .into_iter()
            .take(spec.eval.samples.max(8))
            .collect();
        Ok(Self {
            pairs,
            report,
            train,
            held_out,
        })
    }
}
