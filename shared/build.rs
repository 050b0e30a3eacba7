//! With the `cuda` feature, compiles our GPU kernels (`src/models/kernels/cuda/kernels.cu`)
//! to PTX with nvcc, as candle's build compiles its own; without it, does nothing, so the
//! CPU build needs nothing of CUDA.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/models/kernels/cuda/kernels.cu";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    for var in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("shoplens_kernels.ptx");
    // The oldest architecture CUDA 13 still targets, unless the build names one: the driver
    // compiles PTX for the GPU it runs on, so older PTX runs on newer GPUs.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let status = Command::new(nvcc())
        .args(["--ptx", "-O3", "--fmad=false", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("running nvcc for {SOURCE} ({e}): the `cuda` feature needs the CUDA toolkit (set NVCC or CUDA_HOME)"));
    assert!(status.success(), "nvcc failed on {SOURCE}: {status}");
}

/// `$NVCC`, else `$CUDA_HOME/bin/nvcc` (or `$CUDA_PATH`), else `nvcc` on the PATH.
fn nvcc() -> PathBuf {
    if let Some(path) = std::env::var_os("NVCC") {
        return path.into();
    }
    for home in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(home) {
            let candidate = PathBuf::from(home).join("bin/nvcc");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    "nvcc".into()
}
