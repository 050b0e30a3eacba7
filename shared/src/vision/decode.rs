//! Decoding untrusted image bytes: format sniffed from the bytes, pixel and memory limits
//! checked before decoding (decompression bombs), EXIF orientation applied.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::errors::DecodeErrors;

use super::declared::{self, Declared};
use crate::{Error, Result};

/// Limits on what a decode may cost, checked against what the file declares before any
/// pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width × height accepted.
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_side: u32,
    /// Pixels a file may declare per byte it holds, beyond `free_pixels`. No honest photo
    /// comes near (a 12 MP phone JPEG holds 3–6 pixels per byte, a flat shop shot under
    /// 200, deflate's ceiling is about 1,000 per byte of RGB); a 35-byte GIF declaring a
    /// 6000×6000 screen or a 633-byte JPEG declaring 16384×2441 holds thousands, and would
    /// cost a second of CPU and hundreds of MB for nothing.
    pub max_pixels_per_byte: u64,
    /// Pixels any file may declare whatever its size (a tiny flat image is fine).
    pub free_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_pixels: 40_000_000, max_side: 16_384, max_pixels_per_byte: 2_048, free_pixels: 4_000_000 }
    }
}

impl DecodeLimits {
    /// Refuses a declared geometry over the limits or over the decode budget of a file of
    /// `file_bytes` bytes.
    fn check(&self, file_bytes: usize, declared: Declared) -> Result<()> {
        let Declared { width, height, .. } = declared;
        if width == 0 || height == 0 {
            return Err(Error::ImageDecode { reason: format!("image of {width}×{height} pixels") });
        }
        if width as u64 * height as u64 > self.max_pixels || width.max(height) > self.max_side || declared.extra_pixels > self.max_pixels {
            return Err(Error::ImageTooLarge { width, height, max_pixels: self.max_pixels });
        }
        let budget = self.free_pixels.max((file_bytes as u64).saturating_mul(self.max_pixels_per_byte));
        if declared.cost() > budget {
            let reason = format!("decoding it would touch {} pixels, over the budget of {budget} for a file of this size", declared.cost());
            return Err(Error::DecodeBudget { width, height, bytes: file_bytes, reason });
        }
        Ok(())
    }

    /// The image crate's own allocation cap, as a second line behind [`Self::check`]
    /// (which sees the dimensions first): RGBA at 16 bits over the largest canvas, plus a
    /// frame of the same size.
    fn image_crate_limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(self.max_pixels.saturating_mul(16));
        limits
    }
}

/// Decodes JPEG, PNG, WebP, GIF (first frame) or TIFF bytes to RGB, upright.
pub fn decode_image(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage> {
    let format = sniff(bytes)?;
    let (mut image, orientation) = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, limits)?,
        _ => decode_other(bytes, format, limits)?,
    };
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// The format of the bytes, refusing what we do not read with the reason.
fn sniff(bytes: &[u8]) -> Result<ImageFormat> {
    if bytes.is_empty() {
        return Err(Error::ImageDecode { reason: "empty input".into() });
    }
    // Real photo formats (HEIF from phones above all, BigTIFF from scanners) that we cannot
    // decode here: say so rather than "not an image".
    if let Some(brand) = declared::heif_brand(bytes) {
        return Err(Error::UnsupportedImageFormat { format: format!("{} (HEIF/AVIF; send JPEG, PNG, WebP, GIF or TIFF)", String::from_utf8_lossy(brand)) });
    }
    if declared::is_bigtiff(bytes) {
        return Err(Error::UnsupportedImageFormat { format: "BigTIFF (send JPEG, PNG, WebP, GIF or a classic TIFF)".into() });
    }
    // Bytes of no known image format are not an image at all (a client error of another
    // kind than a real format we do not take, such as BMP).
    let format =
        image::guess_format(bytes).map_err(|_| Error::ImageDecode { reason: "not an image: the bytes match no known image format (send JPEG, PNG, WebP, GIF or TIFF)".into() })?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Tiff) {
        return Err(Error::UnsupportedImageFormat { format: format!("{format:?}") });
    }
    Ok(format)
}

/// JPEG through zune-jpeg in strict mode, fed the bytes up to (not including) the last
/// end-of-image marker. Decoders, strict zune-jpeg included, fill a scan that stops early
/// at a marker with made-up data; without the marker, a scan cut short runs out of bytes,
/// which strict mode reports. So an upload that lost its end is refused even with an EOI
/// glued on, instead of being searched as a half-grey photo. (A whole scan never needs
/// the EOI: 1,692 real photos of our data sets decode to the same pixels this way as
/// the lenient decoder gives for the whole file.) Other strict complaints (stray bytes
/// between segments, common in camera files) fall back to the lenient decoder.
fn decode_jpeg(bytes: &[u8], limits: DecodeLimits) -> Result<(DynamicImage, Orientation)> {
    let truncated = || Error::ImageDecode { reason: "truncated JPEG: the scan data ends before the last row of the image".into() };
    let last = |marker: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == marker);
    // Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker,
    // so neither pair below can appear there; an EXIF thumbnail's markers come before the
    // main image's scans.
    let eoi = match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => eoi,
        _ => return Err(truncated()),
    };
    let options =
        DecoderOptions::default().set_strict_mode(true).set_max_width(limits.max_side as usize).set_max_height(limits.max_side as usize).jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&bytes[..eoi]), options);
    let (width, height) = match (decoder.decode_headers(), decoder.dimensions()) {
        (Ok(()), Some((w, h))) => (w as u32, h as u32),
        _ => return decode_other(bytes, ImageFormat::Jpeg, limits),
    };
    limits.check(bytes.len(), Declared::canvas(width, height))?;
    let orientation = decoder.exif().and_then(|exif| Orientation::from_exif_chunk(exif)).unwrap_or(Orientation::NoTransforms);
    match decoder.decode() {
        Ok(pixels) if decoder.output_colorspace() == Some(ColorSpace::RGB) => RgbImage::from_raw(width, height, pixels)
            .map(|image| (DynamicImage::ImageRgb8(image), orientation))
            .ok_or_else(|| Error::ImageDecode { reason: format!("the JPEG decoder returned a buffer that is not {width}×{height} RGB") }),
        Ok(_) => decode_other(bytes, ImageFormat::Jpeg, limits),
        Err(DecodeErrors::ExhaustedData) => Err(truncated()),
        Err(DecodeErrors::FormatStatic(m)) if m.starts_with("Premature") => Err(truncated()),
        Err(_) => decode_other(bytes, ImageFormat::Jpeg, limits),
    }
}

/// Every other format (and the lenient JPEG path) through the image crate, after the
/// declared geometry has passed the limits.
fn decode_other(bytes: &[u8], format: ImageFormat, limits: DecodeLimits) -> Result<(DynamicImage, Orientation)> {
    let hand_read = match format {
        ImageFormat::Gif => declared::gif(bytes),
        ImageFormat::WebP => declared::webp(bytes),
        _ => None,
    };
    if let Some(declared) = hand_read {
        limits.check(bytes.len(), declared)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.image_crate_limits());
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    limits.check(bytes.len(), Declared { width, height, extra_pixels: hand_read.map_or(0, |d| d.extra_pixels) })?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok((DynamicImage::from_decoder(decoder).map_err(decode_error)?, orientation))
}

fn decode_error(e: image::ImageError) -> Error {
    match e {
        image::ImageError::Unsupported(u) => Error::UnsupportedImageFormat { format: u.to_string() },
        image::ImageError::Limits(l) => Error::DecodeBudget { width: 0, height: 0, bytes: 0, reason: format!("the decoder's allocation limit: {l}") },
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
        let small = DecodeLimits { max_pixels: 100, max_side: 1000, ..DecodeLimits::default() };
        assert!(matches!(decode_image(&bytes, small), Err(Error::ImageTooLarge { width: 50, height: 50, .. })));
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])).write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg).unwrap();
        out
    }

    #[test]
    fn a_truncated_jpeg_is_refused_even_with_an_end_marker_glued_on() {
        let whole = jpeg(64, 48);
        let mut cut = whole[..whole.len() * 2 / 3].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD9]);
        let err = decode_image(&cut, DecodeLimits::default()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // The strict decoder gives what the lenient one gave for a whole file.
        let strict = decode_image(&whole, DecodeLimits::default()).unwrap();
        let lenient = image::load_from_memory_with_format(&whole, ImageFormat::Jpeg).unwrap().into_rgb8();
        assert_eq!(strict, lenient);
    }

    #[test]
    fn tiny_files_declaring_huge_canvases_are_refused_before_decoding() {
        // The 35-byte GIF of the hostile run: a 6000×6000 screen, a 1×1 frame.
        let mut gif = b"GIF89a\x70\x17\x70\x17\x00\x00\x00".to_vec();
        gif.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 0x01, 0, 0x3B]);
        let err = decode_image(&gif, DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, Error::DecodeBudget { width: 6000, height: 6000, .. }), "{err}");
        // A small JPEG whose frame header says 16384×2441 (under the 40 MP limit).
        let mut big = jpeg(16, 16);
        let sof = big.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        big[sof + 5..sof + 7].copy_from_slice(&2441u16.to_be_bytes());
        big[sof + 7..sof + 9].copy_from_slice(&16384u16.to_be_bytes());
        let err = decode_image(&big, DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, Error::DecodeBudget { width: 16384, height: 2441, .. }), "{err}");
        // The same geometry is fine when the file is big enough to hold it honestly.
        let limits = DecodeLimits::default();
        assert!(limits.check(40_000_000 / 2_048 + 1, Declared::canvas(16384, 2441)).is_ok());
    }

    #[test]
    fn bigtiff_is_unsupported_and_an_oversized_webp_canvas_is_too_large() {
        let err = decode_image(b"II+\0\x08\0\0\0\x10\0\0\0\0\0\0\0", DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, Error::UnsupportedImageFormat { .. }), "{err}");
        let mut webp = b"RIFF\x1a\0\0\0WEBPVP8X\x0a\0\0\0\x10\0\0\0".to_vec();
        webp.extend_from_slice(&[0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00]); // 65536 × 65536
        let err = decode_image(&webp, DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, Error::ImageTooLarge { width: 65536, height: 65536, .. }), "{err}");
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
