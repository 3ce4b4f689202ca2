//! The per-row tensors of a head's state, as checkpoints and the backends name them.

use crate::config::OptimizerKind;

/// A per-row f32 tensor of a shard: its centers or one of the optimizer's buffers. Checkpoints hold
/// exactly the tensors `for_optimizer` lists, plus AdamW's step counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateTensor {
    Centers,
    Momentum,
    ExpAvg,
    ExpAvgSq,
}

impl StateTensor {
    pub fn name(self) -> &'static str {
        match self {
            StateTensor::Centers => "centers",
            StateTensor::Momentum => "momentum",
            StateTensor::ExpAvg => "exp_avg",
            StateTensor::ExpAvgSq => "exp_avg_sq",
        }
    }

    pub fn for_optimizer(kind: OptimizerKind) -> &'static [StateTensor] {
        match kind {
            OptimizerKind::Sgd => &[StateTensor::Centers, StateTensor::Momentum],
            OptimizerKind::AdamW => &[StateTensor::Centers, StateTensor::ExpAvg, StateTensor::ExpAvgSq],
        }
    }
}
