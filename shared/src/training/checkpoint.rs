//! Per-epoch checkpoints beside a training run's output, for `--resume`: the variables
//! (`OUT.ckpt.safetensors`) and the number of finished epochs (`OUT.ckpt.epoch`). AdamW's
//! moments are not saved (candle does not expose them): a resumed run restarts them.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;

use super::{Progress, ProgressFn};
use crate::{Error, Result};

pub struct Checkpoint {
    path: PathBuf,
}

impl Checkpoint {
    /// The checkpoint of the run writing `out`.
    pub fn beside(out: &Path) -> Self {
        Self { path: out.with_extension("ckpt.safetensors") }
    }

    /// Loads the variables into `varmap` when `resume` and a checkpoint exists; returns the
    /// first epoch to run.
    pub fn resume(&self, resume: bool, varmap: &mut VarMap, progress: ProgressFn) -> Result<usize> {
        if !resume || !self.path.is_file() {
            return Ok(0);
        }
        varmap.load(&self.path)?;
        let epoch = std::fs::read_to_string(self.path.with_extension("epoch")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        progress(Progress::Message(format!("resumed from {} after epoch {epoch} (optimizer moments restart)", self.path.display())));
        Ok(epoch)
    }

    /// Records that `epochs` epochs are done, with their variables.
    pub fn save(&self, varmap: &VarMap, epochs: usize) -> Result<()> {
        varmap.save(&self.path)?;
        std::fs::write(self.path.with_extension("epoch"), epochs.to_string()).map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn resumes_variables_and_epoch_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::beside(&dir.path().join("model.safetensors"));
        let mut a = VarMap::new();
        let w = a.get((2, 2), "w", candle_nn::Init::Const(3.0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ckpt.resume(true, &mut a, &mut |_| {}).unwrap(), 0, "no checkpoint yet");
        ckpt.save(&a, 4).unwrap();
        let mut b = VarMap::new();
        b.get((2, 2), "w", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ckpt.resume(false, &mut b, &mut |_| {}).unwrap(), 0, "not asked to resume");
        assert_eq!(ckpt.resume(true, &mut b, &mut |_| {}).unwrap(), 4);
        let loaded = b.all_vars()[0].as_tensor().clone();
        let diff = (loaded - w).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }
}
