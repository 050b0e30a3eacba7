//! Safetensors files with our metadata: a model's configuration travels inside its weights
//! file (`__metadata__`), so a weights file alone says how to build and feed its network.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Metadata key holding the model's JSON configuration.
pub const CONFIG_KEY: &str = "shoplens.config";

/// Writes `tensors` with `config` as JSON metadata (atomically: temp file, then rename).
pub fn save<C: Serialize>(path: &Path, tensors: &HashMap<String, Tensor>, config: &C) -> Result<()> {
    let json = serde_json::to_string(config).map_err(|e| Error::InvalidWeights { reason: format!("config does not serialise: {e}") })?;
    let metadata = HashMap::from([(CONFIG_KEY.to_string(), json)]);
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(&candle_core::Device::Cpu)?.contiguous()?))).collect::<Result<_>>()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::durable::replace_with(path, |tmp| {
        safetensors::serialize_to_file(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata), tmp)
            .map_err(|e| Error::InvalidWeights { reason: format!("writing {}: {e}", tmp.display()) })
    })
}

/// A file a weights file names in its config (the backbone), resolved beside it.
pub fn sibling(weights: &Path, name: &str) -> std::path::PathBuf {
    weights.parent().unwrap_or(Path::new(".")).join(name)
}

/// Reads the configuration stored by [`save`].
pub fn read_config<C: DeserializeOwned>(path: &Path) -> Result<C> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::InvalidWeights { reason: format!("{}: {e}", path.display()) })?;
    let json =
        meta.metadata().as_ref().and_then(|m| m.get(CONFIG_KEY)).ok_or_else(|| Error::InvalidWeights { reason: format!("{} carries no {CONFIG_KEY} metadata", path.display()) })?;
    serde_json::from_str(json).map_err(|e| Error::InvalidWeights { reason: format!("{}: config: {e}", path.display()) })
}
