//! The tensors of a weights file as our networks' loaders read them: through candle-nn's
//! `VarBuilder`, which checks each tensor's shape and converts it to f32 on the way out, so a
//! loader only names what it expects. Every refusal names the file and is an
//! [`Error::InvalidWeights`]: a bad file is the user's to fix, not an internal failure.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// Named tensors of one weights file (or of a map built in memory).
pub struct NamedTensors {
    tensors: VarBuilder<'static>,
    /// The file's path (or a name for an in-memory map), for error messages.
    origin: String,
}

impl NamedTensors {
    /// Every tensor of the safetensors file at `path`, on `device`.
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::InvalidWeights { reason: format!("{} does not exist", path.display()) });
        }
        let map = candle_core::safetensors::load(path, device).map_err(|e| Error::InvalidWeights { reason: format!("{}: {e}", path.display()) })?;
        Ok(Self::new(map, device, path.display().to_string()))
    }

    /// Tensors already in memory; `origin` names them in errors.
    pub fn new(map: HashMap<String, Tensor>, device: &Device, origin: impl Into<String>) -> Self {
        Self { tensors: VarBuilder::from_tensors(map, DType::F32, device), origin: origin.into() }
    }

    /// The tensor `name` as f32; refused unless it exists with exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.tensors.get(shape, name).map_err(|e| self.invalid(e))
    }

    /// The tensor `name` as f32 whatever its shape, or `None` if the file lacks it: for
    /// loaders that read a network's layout from the shapes.
    pub fn find(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.tensors.contains_tensor(name) {
            return Ok(None);
        }
        self.tensors.get_unchecked(name).map(Some).map_err(|e| self.invalid(e))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_tensor(name)
    }

    fn invalid(&self, e: candle_core::Error) -> Error {
        Error::InvalidWeights { reason: format!("{}: {e}", self.origin) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> NamedTensors {
        let map = HashMap::from([("w".to_string(), Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap())]);
        NamedTensors::new(map, &Device::Cpu, "test.safetensors")
    }

    #[test]
    fn a_tensor_comes_out_as_f32_with_the_shape_asked_for() {
        let w = tensors().get("w", &[2, 3]).unwrap();
        assert_eq!(w.dtype(), DType::F32);
        assert_eq!(w.dims(), [2, 3]);
    }

    #[test]
    fn a_wrong_shape_or_a_missing_tensor_is_invalid_weights_naming_the_file() {
        for e in [tensors().get("w", &[3, 2]).unwrap_err(), tensors().get("b", &[2]).unwrap_err()] {
            match e {
                Error::InvalidWeights { reason } => assert!(reason.starts_with("test.safetensors: "), "{reason}"),
                other => panic!("expected invalid weights, got {other:?}"),
            }
        }
    }

    #[test]
    fn find_reads_any_shape_and_tells_a_missing_tensor() {
        let t = tensors();
        assert_eq!(t.find("w").unwrap().unwrap().dims(), [2, 3]);
        assert!(t.find("b").unwrap().is_none());
        assert!(t.contains("w") && !t.contains("b"));
    }
}
