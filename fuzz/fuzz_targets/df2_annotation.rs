//! DeepFashion2 annotation files and the consumer-to-shop ground-truth lists: parsers of
//! data sets we did not write. Errors are fine; panics are not.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use shoplens::datasets::{Df2Annotation, GalleryGt, QueryGt, parse_list};

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz.json");
    if let Ok(a) = Df2Annotation::parse(data, file) {
        for item in &a.items {
            assert!(item.bbox.is_valid(), "the parser lets through only valid boxes");
        }
    }
    let _ = parse_list::<QueryGt>(data, file);
    let _ = parse_list::<GalleryGt>(data, file);
});
