//! A GPU's verdict record: what the device found wrong in a step — a bad row of a device batch, a
//! non-finite loss, gradient or update, a sampling count gone wrong — accumulated by the kernels
//! and read back by the host once, where it must decide. The word and flag numbers are
//! kernels/common.cuh's `VERDICT_*` and `SELECT_*`; a test holds the two together.

use crate::error::{Error, Result, Status};

pub(crate) const WORDS: usize = 6;
const FLAGS: usize = 0;
const LABEL_ROW: usize = 1;
const LABEL: usize = 2;
const NON_FINITE_ROW: usize = 3;
const OVERSIZED_ROW: usize = 4;
const OVERSIZED_NORM: usize = 5;

const BAD_BATCH: u64 = 1;
const NON_FINITE_GRADIENT: u64 = 2;
const NON_FINITE_LOSS: u64 = 4;
const UPDATE: u64 = 8;
const SAMPLING: u64 = 16;

/// Words of the sampling select's state; the host reads only the sampled count.
pub(crate) const SELECT_COUNT: usize = 4;
pub(crate) const SELECT_WORDS: usize = 5;

const NONE: u64 = u64::MAX;

/// The record as read back.
pub(crate) struct Verdict(pub [u64; WORDS]);

impl Verdict {
    fn flag(&self, bit: u64) -> bool {
        self.0[FLAGS] & bit != 0
    }

    /// The checks of local batch `batch` (`check_batch`), reported as src/batch.rs `validate`
    /// reports a host batch's: the first bad label, else the first non-finite row, else the first
    /// row too large to normalize.
    pub fn batch(&self, batch: usize, classes: u64) -> Result<()> {
        if !self.flag(BAD_BATCH) {
            return Ok(());
        }
        let w = &self.0;
        Err(Error::invalid(if w[LABEL_ROW] != NONE {
            format!("batch {batch}: label {} at row {} is outside [0, {classes})", w[LABEL] as i64, w[LABEL_ROW])
        } else if w[NON_FINITE_ROW] != NONE {
            format!("batch {batch}: embedding row {} holds NaN or Inf", w[NON_FINITE_ROW])
        } else {
            format!(
                "batch {batch}: embedding row {} has norm {:.3e}, above {:.3e}: it cannot be normalized in f32",
                w[OVERSIZED_ROW],
                f64::from_bits(w[OVERSIZED_NORM]),
                crate::limits::MAX_ROW_NORM
            )
        }))
    }

    /// What fails the step outright: a sampling count the compaction refused, a non-finite loss.
    pub fn step(&self) -> Result<()> {
        if self.flag(SAMPLING) {
            return Err(Error::new(Status::Device, "GPU sampling selected another number of classes than it counted; nothing was written (a device count went wrong)"));
        }
        if self.flag(NON_FINITE_LOSS) {
            return Err(Error::non_finite("the loss"));
        }
        Ok(())
    }

    pub fn gradients_finite(&self) -> bool {
        !self.flag(NON_FINITE_GRADIENT)
    }

    pub fn update_finite(&self) -> bool {
        !self.flag(UPDATE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::kernels::defined;

    #[test]
    fn the_record_is_the_kernels_record() {
        for (name, value) in [
            ("VERDICT_FLAGS", FLAGS),
            ("VERDICT_LABEL_ROW", LABEL_ROW),
            ("VERDICT_LABEL", LABEL),
            ("VERDICT_NON_FINITE_ROW", NON_FINITE_ROW),
            ("VERDICT_OVERSIZED_ROW", OVERSIZED_ROW),
            ("VERDICT_OVERSIZED_NORM", OVERSIZED_NORM),
            ("VERDICT_WORDS", WORDS),
            ("SELECT_COUNT", SELECT_COUNT),
            ("SELECT_WORDS", SELECT_WORDS),
        ] {
            assert_eq!(defined(name), value as u64, "{name}");
        }
        for (name, bit) in [
            ("VERDICT_BAD_BATCH", BAD_BATCH),
            ("VERDICT_NON_FINITE_GRADIENT", NON_FINITE_GRADIENT),
            ("VERDICT_NON_FINITE_LOSS", NON_FINITE_LOSS),
            ("VERDICT_UPDATE", UPDATE),
            ("VERDICT_SAMPLING", SAMPLING),
        ] {
            assert_eq!(defined(name), bit, "{name}");
        }
    }

    #[test]
    fn a_bad_batch_is_reported_as_a_host_batch_would_be() {
        let mut w = [0, NONE, 0, NONE, NONE, 0];
        assert!(Verdict(w).batch(0, 10).is_ok());
        w[FLAGS] = BAD_BATCH;
        w[NON_FINITE_ROW] = 3;
        w[LABEL_ROW] = 5;
        w[LABEL] = -2i64 as u64;
        let e = Verdict(w).batch(1, 10).unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument);
        assert_eq!(e.message, "batch 1: label -2 at row 5 is outside [0, 10)");
        w[LABEL_ROW] = NONE;
        assert_eq!(Verdict(w).batch(1, 10).unwrap_err().message, "batch 1: embedding row 3 holds NaN or Inf");
    }
}
