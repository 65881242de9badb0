//! Training checkpoints in a job's store: `checkpoints/iteration-{k}/step-{s:08}/` holds
//! theta, the optimizer state and `state.json` after optimizer step `s` (0-based) of iteration
//! `k`, published by a sha256 manifest. Resuming from it continues at step `s + 1`. The
//! newest checkpoint whose manifest verifies is the one to use; newer ones that do not verify
//! (torn by a crash, corrupted) are reported and skipped, never loaded.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest;

/// `state.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Iteration k.
    pub iteration: u32,
    /// The last optimizer step applied (0-based).
    pub step: u64,
    /// Optimizer steps taken in the iteration (skipped steps take none).
    pub optimizer_steps: u64,
    /// Steps dropped as non-finite so far in the job.
    pub skipped_steps: u64,
}

/// theta in diffusers layout (a folder with `config.json` and the weights).
pub const WEIGHTS: &str = "unet";
/// The optimizer's moments and step.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// [`CheckpointState`] as JSON.
pub const STATE: &str = "state.json";

/// The folder (relative to the job's store) of iteration `k`'s checkpoints.
pub fn iteration_dir(k: u32) -> String {
    format!("checkpoints/iteration-{k}")
}

/// The folder (relative to the job's store) of the checkpoint after step `step` of `k`.
pub fn key(k: u32, step: u64) -> String {
    format!("checkpoints/iteration-{k}/step-{step:08}")
}

/// A checkpoint found on disk.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    /// Its folder.
    pub dir: PathBuf,
    /// Its state.
    pub state: CheckpointState,
}

/// The newest verified checkpoint of iteration `k` under `job_dir` (the job's store folder),
/// and the newer ones that were refused with the reason.
pub fn latest_verified(job_dir: &Path, k: u32) -> (Option<Found>, Vec<(PathBuf, String)>) {
    latest_at_most(job_dir, k, u64::MAX)
}

/// Like [`latest_verified`], among checkpoints of steps `<= max_step`.
pub fn latest_at_most(
    job_dir: &Path,
    k: u32,
    max_step: u64,
) -> (Option<Found>, Vec<(PathBuf, String)>) {
    let dir = job_dir.join(iteration_dir(k));
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_string();
                    let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
                    Some((step, e.path()))
                })
                .filter(|(s, _)| *s <= max_step)
                .collect()
        })
        .unwrap_or_default();
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut refused = Vec::new();
    for (step, path) in steps {
        match check(&path, k, step) {
            Ok(state) => return (Some(Found { dir: path, state }), refused),
            Err(reason) => refused.push((path, reason.to_string())),
        }
    }
    (None, refused)
}

/// Why a checkpoint folder was passed over.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// Its manifest is missing or does not match its files.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// Its state file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Its state file is not a checkpoint state.
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// Its state names another iteration or step than its folder.
    #[error("{} says iteration {iteration} step {step}, its folder iteration {k} step {folder_step}", path.display())]
    Mismatch {
        path: PathBuf,
        iteration: u32,
        step: u64,
        k: u32,
        folder_step: u64,
    },
}

fn check(dir: &Path, k: u32, step: u64) -> Result<CheckpointState, Refusal> {
    manifest::verify(dir)?;
    let path = dir.join(STATE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(Refusal::Read { path, source }),
    };
    let state: CheckpointState = match serde_json::from_str(&text) {
        Ok(state) => state,
        Err(source) => return Err(Refusal::Parse { path, source }),
    };
    if state.iteration != k || state.step != step {
        return Err(Refusal::Mismatch {
            path,
            iteration: state.iteration,
            step: state.step,
            k,
            folder_step: step,
        });
    }
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(job: &Path, k: u32, step: u64) -> PathBuf {
        let dir = job.join(key(k, step));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(WEIGHTS), format!("weights {step}")).unwrap();
        let state = CheckpointState {
            iteration: k,
            step,
            optimizer_steps: step + 1,
            skipped_steps: 0,
        };
        std::fs::write(dir.join(STATE), serde_json::to_string(&state).unwrap()).unwrap();
        manifest::publish(&dir, "test").unwrap();
        dir
    }

    #[test]
    fn the_newest_verified_checkpoint_wins_and_broken_ones_are_named() {
        let job = std::env::temp_dir().join(format!("spin-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&job);
        assert_eq!(latest_verified(&job, 0), (None, Vec::new()));
        write(&job, 0, 3);
        let newer = write(&job, 0, 7);
        let (found, refused) = latest_verified(&job, 0);
        assert_eq!(found.unwrap().state.step, 7);
        assert!(refused.is_empty());
        // Corrupt the newest: the one before is used, and the reason names the file.
        std::fs::write(newer.join(WEIGHTS), "garbage").unwrap();
        let (found, refused) = latest_verified(&job, 0);
        assert_eq!(found.unwrap().state.step, 3);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.contains(WEIGHTS), "{}", refused[0].1);
        // A torn one (no manifest) is skipped too.
        let torn = job.join(key(0, 9));
        std::fs::create_dir_all(&torn).unwrap();
        let (found, refused) = latest_verified(&job, 0);
        assert_eq!(found.unwrap().state.step, 3);
        assert_eq!(refused.len(), 2);
        assert_eq!(latest_at_most(&job, 0, 2).0, None);
        assert!(latest_verified(&job, 1).0.is_none());
    }
}
