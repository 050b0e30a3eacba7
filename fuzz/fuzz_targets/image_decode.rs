//! Untrusted image bytes through the decoder and the one preprocessing path (crop,
//! letterbox, normalise) that index and query share. Any outcome but a panic, an abort or
//! a runaway allocation is fine: errors are the expected answer to garbage.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use shoplens::vision::{DecodeLimits, Preprocess, decode_image};

fuzz_target!(|data: &[u8]| {
    // Tighter than the server's default so libFuzzer's memory limit measures our code, not
    // one legitimate 40-megapixel decode.
    let limits = DecodeLimits { max_pixels: 4_000_000, max_side: 8_192, ..DecodeLimits::default() };
    if let Ok(image) = decode_image(data, limits) {
        let pre = Preprocess { size: 64, ..Preprocess::LITE0 };
        pre.crop_to_tensor(&image, None, &Device::Cpu).expect("a decoded image always preprocesses");
    }
});
