//! The candle device models run on.
//!
//! CPU builds always get the CPU. With the `cuda` feature, the first CUDA GPU is used when
//! one is present, and the CPU otherwise, so one binary serves both kinds of machine.

use candle_core::Device;

use crate::Result;

/// Which device the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePreference {
    /// A CUDA GPU when this build has the `cuda` feature and one is present, else the CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
}

/// Opens the device for `preference`.
pub fn select_device(preference: DevicePreference) -> Result<Device> {
    match preference {
        DevicePreference::Cpu => Ok(Device::Cpu),
        DevicePreference::Auto => Ok(Device::cuda_if_available(0)?),
    }
}

/// A short human description of `device`, for logs and `status` output.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => "cuda:0".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// Whether this build can use a CUDA GPU at all.
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_preference_gives_the_cpu_and_runs_a_tensor_op() {
        let device = select_device(DevicePreference::Cpu).unwrap();
        assert!(device.is_cpu());
        let t = candle_core::Tensor::new(&[1f32, 2., 3.], &device).unwrap();
        assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 6.0);
    }

    #[test]
    fn auto_without_cuda_feature_is_the_cpu() {
        let device = select_device(DevicePreference::Auto).unwrap();
        if !cuda_compiled() {
            assert!(device.is_cpu());
        }
        assert!(!describe(&device).is_empty());
    }
}
