//! Images: decoded to RGB under a pixel limit that is checked from the header,
//! before any pixel buffer is allocated.

use std::io::Cursor;

use image::{ImageError, ImageFormat, ImageReader};

use super::{Document, RgbImage};
use crate::error::{ExtractError, Reason};
use crate::limits::Limits;

pub fn extract(data: &[u8], mime_type: &str, limits: &Limits) -> Result<Document, ExtractError> {
    let format = ImageFormat::from_mime_type(mime_type)
        .ok_or_else(|| ExtractError::new(Reason::UnsupportedType, mime_type.to_string()))?;
    let reader = || {
        let mut r = ImageReader::with_format(Cursor::new(data), format);
        let mut l = image::Limits::default();
        // RGBA at 16 bits per channel is the worst case a decoder may allocate.
        l.max_alloc = Some(limits.max_image_pixels.saturating_mul(8).max(1 << 20));
        r.limits(l);
        r
    };
    let (width, height) = reader().into_dimensions().map_err(map_error)?;
    if width == 0 || height == 0 {
        return Err(ExtractError::corrupt(format!(
            "image of size {width}x{height}"
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_image_pixels {
        return Err(ExtractError::too_large(format!(
            "image of {width}x{height} = {pixels} pixels, over the limit of {}",
            limits.max_image_pixels
        )));
    }
    let data = match (format, decode_jpeg(data, limits)) {
        (ImageFormat::Jpeg, Some(rgb)) => rgb,
        _ => reader().decode().map_err(map_error)?.into_rgb8().into_raw(),
    };
    let mut doc = Document::single_page(String::new(), mime_type);
    doc.metadata.insert("width".into(), width.to_string());
    doc.metadata.insert("height".into(), height.to_string());
    doc.image = Some(RgbImage {
        width,
        height,
        data,
    });
    Ok(doc)
}

/// RGB and grayscale JPEGs through `jpeg-decoder`, whose chroma upsampling follows
/// libjpeg's, so pixels agree with what Pillow gives model preprocessors to within a
/// level or two. Anything else (CMYK, errors) is left to the `image` decoders.
fn decode_jpeg(data: &[u8], limits: &Limits) -> Option<Vec<u8>> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(data));
    decoder
        .set_max_decoding_buffer_size(limits.max_image_pixels.saturating_mul(4).try_into().ok()?);
    let pixels = decoder.decode().ok()?;
    match decoder.info()?.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => Some(pixels),
        jpeg_decoder::PixelFormat::L8 => Some(pixels.iter().flat_map(|&v| [v, v, v]).collect()),
        _ => None,
    }
}

fn map_error(e: ImageError) -> ExtractError {
    match e {
        ImageError::Limits(l) => ExtractError::too_large(format!("image: {l}")),
        ImageError::Unsupported(u) => {
            ExtractError::new(Reason::UnsupportedType, format!("image: {u}"))
        }
        other => ExtractError::corrupt(format!("image: {other}")),
    }
}
