//! The group of one worker: the mean of one buffer is the buffer. The local loop and a job
//! with a single worker use it, so they run exactly the code a ring runs.

use super::error::CollectiveError;
use super::Collective;

/// A collective of world size 1.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, _buffer: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}
