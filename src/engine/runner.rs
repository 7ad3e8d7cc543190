//! Batch metadata for one step: the scheduler's plan turned into the `Batch` every
//! backend reads (token ids, positions, slot mapping, block tables, logits rows).

use super::scheduler::{Scheduler, StepPlan};
use crate::backend::Batch;

/// Builds the step's batch; logits rows come in the order of the plan's chunks that
/// want logits.
pub fn build_batch(plan: &StepPlan, scheduler: &Scheduler) -> Batch {
    let mut batch = Batch::default();
    for chunk in &plan.chunks {
        let seq = scheduler
            .sequence(chunk.seq)
            .unwrap_or_else(|| unreachable!("the scheduler planned sequence {}", chunk.seq));
        let tokens = &seq.tokens[chunk.first_pos..chunk.first_pos + chunk.len];
        batch.push_seq_of_prompt(
            tokens,
            chunk.first_pos,
            &seq.block_table,
            chunk.want_logits,
            seq.prompt_len,
        );
    }
    batch
}
