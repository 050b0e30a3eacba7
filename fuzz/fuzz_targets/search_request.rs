//! The search request path up to the networks: the query string as `/v1/search` parses it,
//! then the photo bytes, then the garment region the engine would embed (the shopper's box
//! clipped to the photo) through the shared preprocessing. Input layout: query string, a
//! newline, photo bytes.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use shoplens::geometry::BBox;
use shoplens::vision::{DecodeLimits, Preprocess, decode_image};
use shoplens_searcher::app::parse_search_query;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (query, photo) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(query) = std::str::from_utf8(query) else { return };
    let Ok(request) = parse_search_query(query) else { return };
    assert!((1..=shoplens::serving::engine::MAX_RESULTS).contains(&request.k));
    let limits = DecodeLimits { max_pixels: 4_000_000, max_side: 8_192, ..DecodeLimits::default() };
    let Ok(image) = decode_image(photo, limits) else { return };
    let (w, h) = image.dimensions();
    let region = match request.region {
        Some(r) => {
            let clipped = r.clip(w, h);
            if !clipped.is_valid() {
                return;
            }
            clipped
        }
        None => BBox::new(0.0, 0.0, w as f32, h as f32),
    };
    let pre = Preprocess { size: 64, ..Preprocess::LITE0 };
    pre.crop_to_tensor(&image, Some(region), &Device::Cpu).expect("a valid region of a decoded image always preprocesses");
});
