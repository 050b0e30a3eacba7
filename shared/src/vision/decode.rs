//! Decoding untrusted image bytes: format sniffed from the bytes, pixel and memory limits
//! checked before decoding (decompression bombs), EXIF orientation applied.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// Limits on what a decode may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width × height accepted.
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_pixels: 40_000_000, max_side: 16_384 }
    }
}

/// Decodes JPEG, PNG, WebP, GIF (first frame) or TIFF bytes to RGB, upright.
pub fn decode_image(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::ImageDecode { reason: "empty input".into() });
    }
    // HEIC/HEIF and AVIF (ISO-BMFF brands): real photo formats, from phones above all, that
    // we cannot decode here; say so rather than "not an image".
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        let brand = &bytes[8..12];
        if [b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"].iter().any(|b| brand == *b) {
            return Err(Error::UnsupportedImageFormat { format: format!("{} (HEIF/AVIF; send JPEG, PNG, WebP, GIF or TIFF)", String::from_utf8_lossy(brand)) });
        }
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::ImageDecode { reason: e.to_string() })?;
    // Bytes of no known image format are not an image at all (a client error of another
    // kind than a real format we do not take, such as BMP).
    let format = reader.format().ok_or(Error::ImageDecode { reason: "not an image: the bytes match no known image format (send JPEG, PNG, WebP, GIF or TIFF)".into() })?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Tiff) {
        return Err(Error::UnsupportedImageFormat { format: format!("{format:?}") });
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a cut-off scan with grey instead of failing; an upload that
        // lost its end must not be searched as a half-grey photo.
        return Err(Error::ImageDecode { reason: "truncated JPEG: the data ends before the end-of-image marker".into() });
    }
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::ImageDecode { reason: format!("image of {width}×{height} pixels") });
    }
    if width as u64 * height as u64 > limits.max_pixels || width.max(height) > limits.max_side {
        return Err(Error::ImageTooLarge { width, height, max_pixels: limits.max_pixels });
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// True when the last scan (SOS marker `FF DA`) is followed by an end-of-image marker
/// (`FF D9`). Inside entropy-coded data a `FF` byte is always followed by `00` or a restart
/// marker, so neither pair can appear there; an EXIF thumbnail's markers come before the
/// main image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == marker);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

fn decode_error(e: image::ImageError) -> Error {
    match e {
        image::ImageError::Unsupported(u) => Error::UnsupportedImageFormat { format: u.to_string() },
        image::ImageError::Limits(l) => Error::ImageDecode { reason: format!("limit exceeded: {l}") },
        other => Error::ImageDecode { reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_and_refuses_what_it_must() {
        let ok = decode_image(&png(5, 3), DecodeLimits::default()).unwrap();
        assert_eq!(ok.dimensions(), (5, 3));
        assert!(matches!(decode_image(&[], DecodeLimits::default()), Err(Error::ImageDecode { .. })));
        assert!(matches!(decode_image(b"hello world, not an image", DecodeLimits::default()), Err(Error::ImageDecode { .. })));
        assert!(matches!(decode_image(b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00", DecodeLimits::default()), Err(Error::UnsupportedImageFormat { .. })));
        let bytes = png(50, 50);
        assert!(decode_image(&bytes[..bytes.len() / 2], DecodeLimits::default()).unwrap_err().is_user_error());
        let mut jpeg = Vec::new();
        image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90])).write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).unwrap();
        assert!(decode_image(&jpeg, DecodeLimits::default()).is_ok());
        let cut = decode_image(&jpeg[..jpeg.len() * 2 / 3], DecodeLimits::default()).unwrap_err();
        assert!(cut.to_string().contains("truncated"), "{cut}");
        let small = DecodeLimits { max_pixels: 100, max_side: 1000 };
        assert!(matches!(decode_image(&bytes, small), Err(Error::ImageTooLarge { width: 50, height: 50, .. })));
    }

    #[test]
    fn a_png_header_declaring_a_huge_image_is_refused_before_decoding() {
        // A valid PNG signature and IHDR for 100000×100000, no data: must not allocate 30 GB.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let err = decode_image(&bytes, DecodeLimits::default()).unwrap_err();
        assert!(err.is_user_error(), "{err}");
    }
}
