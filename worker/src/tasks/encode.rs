//! The encode tasks: a shard of training prompts, and the held-out prompts (which also
//! evaluates the base model), read from the dataset and cached as latents in the store.

use spin_common::dataset::ReadReport;
use spin_common::shards::Shard;
use spin_common::store::layout;

use super::{store_error, JobRunner, Metrics};
use crate::train::data::{encode_examples, examples_to_bytes, Example};
use crate::train::TrainError;

impl JobRunner {
    /// Encodes training prompts `shard` (positions in the job's training list) and writes
    /// them to the store, calling `progress(done, total)` after each batch of pairs. Returns
    /// the key written and what reading skipped.
    pub fn encode_shard(
        &mut self,
        shard: &Shard,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(String, ReadReport), TrainError> {
        let prompts = self.prompts()?;
        let first = usize::try_from(shard.first).unwrap_or(usize::MAX);
        let end = usize::try_from(shard.end)
            .unwrap_or(usize::MAX)
            .min(prompts.train.len());
        if first >= end {
            return Err(TrainError::Input(format!(
                "encode shard {} covers prompts {}..{} but the job has {} training prompts",
                shard.index,
                shard.first,
                shard.end,
                prompts.train.len()
            )));
        }
        let indices = prompts.train[first..end].to_vec();
        let positions: Vec<u64> = (shard.first..shard.first + indices.len() as u64).collect();
        let key = layout::latents(shard.index);
        let mut report = ReadReport::default();
        self.encode_to(&key, &indices, &positions, &mut report, &mut progress)?;
        Ok((key, report))
    }

    /// Encodes the held-out prompts, writes them, and evaluates the base model on them;
    /// `progress(done, total)` counts the encoded prompts, then the evaluation's units.
    pub fn encode_held_out(
        &mut self,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(String, Metrics), TrainError> {
        let prompts = self.prompts()?;
        let indices = prompts.held_out.clone();
        let positions: Vec<u64> = (0..indices.len() as u64).collect();
        let key = layout::held_out();
        let mut report = ReadReport::default();
        let examples = self.encode_to(&key, &indices, &positions, &mut report, &mut progress)?;
        self.held_out = Some(examples);
        let metrics = self.evaluate(0, &mut progress)?;
        Ok((key, metrics))
    }

    /// Encodes dataset rows `indices` (job positions `positions`) and writes them to `key`;
    /// what reading skipped goes to `report`, `progress(done, total)` follows each batch.
    fn encode_to(
        &self,
        key: &str,
        indices: &[usize],
        positions: &[u64],
        report: &mut ReadReport,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Example>, TrainError> {
        let prompts = self
            .prompts
            .as_ref()
            .ok_or_else(|| TrainError::Input("job prompts not read".into()))?;
        let examples = encode_examples(
            &self.spec,
            &self.pipeline,
            prompts,
            indices,
            positions,
            report,
            &self.device,
            progress,
        )?;
        let bytes = examples_to_bytes(&examples, self.latent_shape, self.context_shape)?;
        self.store.put(key, &bytes).map_err(store_error)?;
        Ok(examples)
    }
}
