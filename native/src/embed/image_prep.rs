//! Image preprocessing as `preprocessor_config.json` describes it (CLIPImageProcessor):
//! resize the shortest edge (bicubic), center crop, rescale, normalise, CHW layout.

use std::path::Path;

use serde_json::Value;

use super::image_resize::{resize_rgb, Filter};
use crate::error::EmbedError;
use crate::extract::RgbImage;
use crate::model_dir::read_json;

#[derive(Debug, Clone)]
pub struct Preprocessor {
    shortest_edge: u32,
    crop: (u32, u32),
    rescale: f32,
    mean: [f32; 3],
    std: [f32; 3],
    filter: Filter,
}

impl Preprocessor {
    pub fn from_file(path: &Path) -> Result<Self, EmbedError> {
        let c = read_json(path)?
            .ok_or_else(|| EmbedError::ModelNotFound(format!("{} is missing", path.display())))?;
        let int = |v: Option<&Value>| v.and_then(Value::as_u64).map(|n| n as u32);
        let size = c.get("size");
        let shortest_edge = int(size.and_then(|s| s.get("shortest_edge")))
            .or_else(|| int(size))
            .ok_or_else(|| {
                EmbedError::InvalidModel("preprocessor_config.json: no size.shortest_edge".into())
            })?;
        let crop = c.get("crop_size");
        let crop = match (
            int(crop.and_then(|s| s.get("height"))),
            int(crop.and_then(|s| s.get("width"))),
        ) {
            (Some(h), Some(w)) => (h, w),
            _ => {
                let side = int(crop).unwrap_or(shortest_edge);
                (side, side)
            }
        };
        let triple = |key: &str, default: [f32; 3]| -> [f32; 3] {
            c.get(key)
                .and_then(Value::as_array)
                .filter(|a| a.len() == 3)
                .map(|a| [0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
                .unwrap_or(default)
        };
        let code = c.get("resample").and_then(Value::as_u64).unwrap_or(3);
        let filter = Filter::from_pil(code).ok_or_else(|| {
            EmbedError::InvalidModel(format!(
                "preprocessor_config.json: resample {code} is not supported (1, 2, 3)"
            ))
        })?;
        Ok(Self {
            shortest_edge,
            crop,
            rescale: c
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0) as f32,
            mean: triple("image_mean", [0.481_454_7, 0.457_827_5, 0.408_210_7]),
            std: triple("image_std", [0.268_629_5, 0.261_302_6, 0.275_777_1]),
            filter,
        })
    }

    /// `(channels, height, width)` of the output.
    pub fn shape(&self) -> (usize, usize, usize) {
        (3, self.crop.0 as usize, self.crop.1 as usize)
    }

    pub fn pixel_values(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = (img.width.max(1), img.height.max(1));
        let s = self.shortest_edge;
        // As transformers does: the short side becomes `s`, the long side int(s * long / short).
        let (nw, nh) = if w <= h {
            (s, ((s as u64 * h as u64) / w as u64).max(1) as u32)
        } else {
            (((s as u64 * w as u64) / h as u64).max(1) as u32, s)
        };
        let resized = resize_rgb(
            &img.data,
            w as usize,
            h as usize,
            nw as usize,
            nh as usize,
            self.filter,
        );
        let (ch, cw) = self.crop;
        let top = nh.saturating_sub(ch) / 2;
        let left = nw.saturating_sub(cw) / 2;
        let mut out = vec![0f32; 3 * (ch * cw) as usize];
        let plane = (ch * cw) as usize;
        for y in 0..ch {
            for x in 0..cw {
                // Crops larger than the image pad with zeros, like transformers.
                let (sx, sy) = (left + x, top + y);
                let px = if sx < nw && sy < nh {
                    let at = ((sy * nw + sx) * 3) as usize;
                    [resized[at], resized[at + 1], resized[at + 2]]
                } else {
                    [0, 0, 0]
                };
                let at = (y * cw + x) as usize;
                for c in 0..3 {
                    out[c * plane + at] =
                        (px[c] as f32 * self.rescale - self.mean[c]) / self.std[c];
                }
            }
        }
        out
    }
}
