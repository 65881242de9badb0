//! The ring all-reduce as a pure schedule: buckets, chunks, pieces and the per-step transfers
//! of every rank. No I/O here; [`super::ring`] carries the schedule out.
//!
//! A buffer of `len` values is cut into buckets of at most `bucket_elems` values; each bucket
//! into `world` chunks (the first `len % world` one value longer); each chunk into the same
//! number of pieces, so a piece can be forwarded as soon as it has been reduced (pipelining).
//! Reduce-scatter runs `world - 1` steps: at step `s` rank `r` sends chunk `(r - s) mod n` to its
//! right neighbour and adds chunk `(r - s - 1) mod n` from its left one; afterwards rank `r`
//! owns the full sum of chunk `(r + 1) mod n`. All-gather runs `world - 1` more steps: send
//! chunk `(r + 1 - s) mod n`, receive (copy) chunk `(r - s) mod n`. Each rank sends
//! `2 (n - 1) / n` of the buffer.

use std::ops::Range;

use super::frame::Phase;

/// One step of one rank: which chunk goes right, which arrives from the left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Reduce-scatter (add what arrives) or all-gather (copy it).
    pub phase: Phase,
    /// The step within its phase, `0..world - 1`.
    pub step: usize,
    /// The chunk sent to the right neighbour.
    pub send_chunk: usize,
    /// The chunk received from the left neighbour.
    pub recv_chunk: usize,
}

/// How one buffer is cut up and exchanged around a ring of `world` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingSchedule {
    len: usize,
    world: usize,
    bucket_elems: usize,
    piece_elems: usize,
    max_pieces: usize,
}

/// The `index`-th of `parts` near-equal consecutive sub-ranges of `range` (the first
/// `len % parts` are one longer).
pub fn split_even(range: Range<usize>, parts: usize, index: usize) -> Range<usize> {
    let len = range.end - range.start;
    let base = len / parts;
    let extra = len % parts;
    let start = range.start + index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

impl RingSchedule {
    /// A schedule for `len` values over `world` ranks, buckets of at most `bucket_elems` values
    /// and pieces of about `piece_elems` values, at most `max_pieces` pieces per chunk (the
    /// number of frames a link can hold must exceed it, see [`super::Transport`]).
    pub fn new(
        len: usize,
        world: usize,
        bucket_elems: usize,
        piece_elems: usize,
        max_pieces: usize,
    ) -> Self {
        Self {
            len,
            world: world.max(1),
            bucket_elems: bucket_elems.max(1),
            piece_elems: piece_elems.max(1),
            max_pieces: max_pieces.max(1),
        }
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether there is nothing to exchange (one rank, or an empty buffer).
    pub fn is_noop(&self) -> bool {
        self.world == 1 || self.len == 0
    }

    /// The buckets' ranges in the buffer, in order.
    pub fn buckets(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.len)
            .step_by(self.bucket_elems)
            .map(|start| start..(start + self.bucket_elems).min(self.len))
    }

    /// The range of `chunk` (`0..world`) of `bucket` in the buffer.
    pub fn chunk_range(&self, bucket: &Range<usize>, chunk: usize) -> Range<usize> {
        split_even(bucket.clone(), self.world, chunk)
    }

    /// How many pieces every chunk of `bucket` is cut into (the same for all its chunks).
    pub fn pieces_per_chunk(&self, bucket: &Range<usize>) -> usize {
        let longest_chunk = (bucket.end - bucket.start).div_ceil(self.world);
        longest_chunk
            .div_ceil(self.piece_elems)
            .clamp(1, self.max_pieces)
    }

    /// The range of `piece` of `chunk` of `bucket` in the buffer (possibly empty).
    pub fn piece_range(&self, bucket: &Range<usize>, chunk: usize, piece: usize) -> Range<usize> {
        let chunk_range = self.chunk_range(bucket, chunk);
        split_even(chunk_range, self.pieces_per_chunk(bucket), piece)
    }

    /// `rank`'s steps, reduce-scatter then all-gather: `2 (world - 1)` of them. The chunk a
    /// step receives is the chunk the next step sends.
    pub fn steps(&self, rank: usize) -> Vec<Step> {
        let n = self.world;
        let r = rank % n;
        let reduce = (0..n - 1).map(|s| Step {
            phase: Phase::ReduceScatter,
            step: s,
            send_chunk: (r + n - s) % n,
            recv_chunk: (r + 2 * n - s - 1) % n,
        });
        let gather = (0..n - 1).map(|s| Step {
            phase: Phase::AllGather,
            step: s,
            send_chunk: (r + 1 + n - s) % n,
            recv_chunk: (r + n - s) % n,
        });
        reduce.chain(gather).collect()
    }

    /// The rank that sends to `rank`.
    pub fn left(&self, rank: usize) -> usize {
        (rank + self.world - 1) % self.world
    }

    /// The rank `rank` sends to.
    pub fn right(&self, rank: usize) -> usize {
        (rank + 1) % self.world
    }

    /// The number of values `rank` sends in one all-reduce of the whole buffer.
    pub fn values_sent(&self, rank: usize) -> usize {
        if self.is_noop() {
            return 0;
        }
        let steps = self.steps(rank);
        self.buckets()
            .map(|bucket| {
                steps
                    .iter()
                    .map(|step| self.chunk_range(&bucket, step.send_chunk).len())
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(len: usize, world: usize) -> RingSchedule {
        RingSchedule::new(len, world, 1 << 20, 1 << 10, 64)
    }

    #[test]
    fn split_even_covers_the_range_with_sizes_differing_by_at_most_one() {
        for len in 0..40 {
            for parts in 1..7 {
                let ranges: Vec<_> = (0..parts)
                    .map(|i| split_even(5..5 + len, parts, i))
                    .collect();
                assert_eq!(ranges[0].start, 5);
                assert_eq!(ranges[parts - 1].end, 5 + len);
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let sizes: Vec<_> = ranges.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{sizes:?}");
            }
        }
    }

    #[test]
    fn four_ranks_follow_the_textbook_ring() {
        let s = schedule(100, 4);
        let rank1 = s.steps(1);
        let sends: Vec<_> = rank1.iter().map(|t| t.send_chunk).collect();
        let recvs: Vec<_> = rank1.iter().map(|t| t.recv_chunk).collect();
        // Reduce-scatter: send 1, 0, 3; receive 0, 3, 2 -> rank 1 owns chunk 2.
        // All-gather: send 2, 1, 0; receive 1, 0, 3.
        assert_eq!(sends, vec![1, 0, 3, 2, 1, 0]);
        assert_eq!(recvs, vec![0, 3, 2, 1, 0, 3]);
        assert_eq!(rank1[0].phase, Phase::ReduceScatter);
        assert_eq!(rank1[3].phase, Phase::AllGather);
        assert_eq!(rank1[3].step, 0);
    }

    #[test]
    fn what_a_rank_receives_is_what_its_left_sends_and_what_it_forwards_next() {
        for world in 2..9 {
            let s = schedule(1000, world);
            for rank in 0..world {
                let mine = s.steps(rank);
                let left = s.steps(s.left(rank));
                assert_eq!(mine.len(), 2 * (world - 1));
                for (i, step) in mine.iter().enumerate() {
                    assert_eq!(step.recv_chunk, left[i].send_chunk);
                    assert_eq!((step.phase, step.step), (left[i].phase, left[i].step));
                    if let Some(next) = mine.get(i + 1) {
                        assert_eq!(next.send_chunk, step.recv_chunk);
                    }
                }
            }
        }
    }

    #[test]
    fn after_reduce_scatter_each_chunk_has_every_contribution_once() {
        for world in 2..8 {
            let s = schedule(1000, world);
            // contributions[rank][chunk]: the set of ranks summed into that rank's copy.
            let mut held: Vec<Vec<Vec<bool>>> = (0..world)
                .map(|r| {
                    (0..world)
                        .map(|_| (0..world).map(|q| q == r).collect())
                        .collect()
                })
                .collect();
            let steps: Vec<_> = (0..world).map(|r| s.steps(r)).collect();
            for i in 0..2 * (world - 1) {
                let before = held.clone();
                for r in 0..world {
                    let step = steps[r][i];
                    let left = s.left(r);
                    let incoming = &before[left][steps[left][i].send_chunk];
                    let slot = &mut held[r][step.recv_chunk];
                    for q in 0..world {
                        slot[q] = match step.phase {
                            Phase::ReduceScatter => {
                                assert!(!(slot[q] && incoming[q]), "double count");
                                slot[q] || incoming[q]
                            }
                            Phase::AllGather => incoming[q],
                        };
                    }
                }
                if i == world - 2 {
                    for (r, chunks) in held.iter().enumerate() {
                        assert!(chunks[(r + 1) % world].iter().all(|&b| b), "rank {r}");
                    }
                }
            }
            assert!(held.iter().flatten().flatten().all(|&b| b));
        }
    }

    #[test]
    fn uneven_lengths_cover_the_buffer_exactly_once() {
        let s = RingSchedule::new(1003, 3, 500, 7, 64);
        let buckets: Vec<_> = s.buckets().collect();
        assert_eq!(buckets, vec![0..500, 500..1000, 1000..1003]);
        let mut seen = vec![0u8; 1003];
        for bucket in &buckets {
            let pieces = s.pieces_per_chunk(bucket);
            for chunk in 0..3 {
                for piece in 0..pieces {
                    for i in s.piece_range(bucket, chunk, piece) {
                        seen[i] += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        // 500 values over 3 ranks: chunks of 167, 167, 166.
        assert_eq!(s.chunk_range(&buckets[0], 0), 0..167);
        assert_eq!(s.chunk_range(&buckets[0], 2), 334..500);
        assert_eq!(s.pieces_per_chunk(&buckets[0]), 24);
        // A bucket shorter than the world leaves some chunks empty.
        assert_eq!(s.chunk_range(&buckets[2], 2), 1002..1003);
        let tiny = RingSchedule::new(2, 4, 500, 7, 64);
        let b = 0..2;
        assert_eq!(tiny.chunk_range(&b, 3), 2..2);
    }

    #[test]
    fn pieces_are_capped_by_the_link_capacity() {
        let s = RingSchedule::new(1 << 20, 2, 1 << 20, 1, 9);
        assert_eq!(s.pieces_per_chunk(&(0..1 << 20)), 9);
    }

    #[test]
    fn each_rank_sends_two_times_n_minus_one_over_n_of_the_data() {
        for world in 2..7 {
            let len = 600 * world;
            let s = schedule(len, world);
            for rank in 0..world {
                assert_eq!(s.values_sent(rank), 2 * (world - 1) * len / world);
            }
        }
    }

    #[test]
    fn one_rank_or_an_empty_buffer_is_a_noop() {
        assert!(schedule(10, 1).is_noop());
        assert!(schedule(0, 4).is_noop());
        assert!(!schedule(1, 2).is_noop());
        assert_eq!(schedule(10, 1).values_sent(0), 0);
    }
}
