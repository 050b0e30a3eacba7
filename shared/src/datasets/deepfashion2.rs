//! Reading DeepFashion2-format folders and annotations, with errors that name the file and
//! field at fault.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::geometry::BBox;
use crate::{Error, Result};

/// Which side of consumer-to-shop an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    User,
    Shop,
}

/// One garment of an annotation (`itemN`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Df2Item {
    /// N of the `itemN` key.
    pub index: u32,
    pub category_id: u32,
    pub category_name: String,
    /// 0 = not matched across the pair; k ≥ 1 = matches the other side's style k.
    pub style: u32,
    pub bbox: BBox,
    /// Flat `[x, y, visibility, ...]`.
    pub landmarks: Vec<f32>,
    /// Polygons, each flat `[x, y, ...]`.
    pub segmentation: Vec<Vec<f32>>,
    pub scale: u8,
    pub occlusion: u8,
    pub zoom_in: u8,
    pub viewpoint: u8,
}

/// One annotation file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Df2Annotation {
    pub source: Source,
    pub pair_id: u64,
    /// Items in `itemN` order.
    pub items: Vec<Df2Item>,
}

/// One image of a folder with its annotation file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Df2Image {
    /// The numeric file stem (`000123` → 123).
    pub id: u64,
    pub image: PathBuf,
    pub annotation: PathBuf,
}

/// A DeepFashion2-format folder (`image/` + `annos/`).
#[derive(Debug, Clone)]
pub struct Df2Folder {
    root: PathBuf,
    images: Vec<Df2Image>,
}

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::MalformedDataset { file: self.file.to_path_buf(), field: field.to_string(), reason: reason.into() }
    }

    fn required<'v>(&self, obj: &'v Map<String, Value>, prefix: &str, key: &str) -> Result<&'v Value> {
        obj.get(key).ok_or_else(|| self.err(&join(prefix, key), "missing"))
    }

    fn uint(&self, value: &Value, field: &str, max: u64) -> Result<u64> {
        let n = value.as_u64().ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {}", kind(value))))?;
        if n > max {
            return Err(self.err(field, format!("{n} is larger than {max}")));
        }
        Ok(n)
    }

    fn optional_small(&self, obj: &Map<String, Value>, prefix: &str, key: &str, default: u8) -> Result<u8> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => Ok(self.uint(v, &join(prefix, key), u8::MAX as u64)? as u8),
        }
    }

    fn numbers(&self, value: &Value, field: &str) -> Result<Vec<f32>> {
        let arr = value.as_array().ok_or_else(|| self.err(field, format!("expected a list of numbers, found {}", kind(value))))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| x as f32).ok_or_else(|| self.err(&format!("{field}[{i}]"), format!("expected a number, found {}", kind(v)))))
            .collect()
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Df2Annotation {
    /// Parses an annotation; `file` names the source in errors.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self> {
        let ctx = Ctx { file };
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ctx.err("(document)", format!("not valid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| ctx.err("(document)", format!("expected an object, found {}", kind(&value))))?;
        let source = match ctx.required(obj, "", "source")?.as_str() {
            Some("user") => Source::User,
            Some("shop") => Source::Shop,
            _ => return Err(ctx.err("source", "expected \"user\" or \"shop\"")),
        };
        let pair_id = ctx.uint(ctx.required(obj, "", "pair_id")?, "pair_id", u64::MAX)?;
        let mut items = Vec::new();
        for (key, value) in obj {
            let Some(index) = key.strip_prefix("item") else { continue };
            let index: u32 = index.parse().map_err(|_| ctx.err(key, "item keys are item1, item2, ..."))?;
            items.push(Self::parse_item(&ctx, key, index, value)?);
        }
        items.sort_by_key(|i| i.index);
        Ok(Self { source, pair_id, items })
    }

    fn parse_item(ctx: &Ctx<'_>, key: &str, index: u32, value: &Value) -> Result<Df2Item> {
        let obj = value.as_object().ok_or_else(|| ctx.err(key, format!("expected an object, found {}", kind(value))))?;
        let category_id = ctx.uint(ctx.required(obj, key, "category_id")?, &join(key, "category_id"), u32::MAX as u64)? as u32;
        let category_name = match obj.get("category_name") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(ctx.err(&join(key, "category_name"), format!("expected a string, found {}", kind(other)))),
        };
        let style = ctx.uint(ctx.required(obj, key, "style")?, &join(key, "style"), u32::MAX as u64)? as u32;
        let field = join(key, "bounding_box");
        let b = ctx.numbers(ctx.required(obj, key, "bounding_box")?, &field)?;
        if b.len() != 4 {
            return Err(ctx.err(&field, format!("expected 4 numbers [x1, y1, x2, y2], found {}", b.len())));
        }
        let bbox = BBox::new(b[0], b[1], b[2], b[3]);
        if !bbox.is_valid() || bbox.x1 < 0.0 || bbox.y1 < 0.0 {
            return Err(ctx.err(&field, format!("{b:?} is not a box with x1 < x2, y1 < y2 inside the image")));
        }
        let landmarks = match obj.get("landmarks") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => ctx.numbers(v, &join(key, "landmarks"))?,
        };
        let segmentation = match obj.get("segmentation") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(polys)) => polys.iter().enumerate().map(|(i, p)| ctx.numbers(p, &format!("{key}.segmentation[{i}]"))).collect::<Result<_>>()?,
            Some(other) => return Err(ctx.err(&join(key, "segmentation"), format!("expected a list of polygons, found {}", kind(other)))),
        };
        Ok(Df2Item {
            index,
            category_id,
            category_name,
            style,
            bbox,
            landmarks,
            segmentation,
            scale: ctx.optional_small(obj, key, "scale", 0)?,
            occlusion: ctx.optional_small(obj, key, "occlusion", 0)?,
            zoom_in: ctx.optional_small(obj, key, "zoom_in", 0)?,
            viewpoint: ctx.optional_small(obj, key, "viewpoint", 0)?,
        })
    }

    /// Reads and parses an annotation file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }
}

impl Df2Folder {
    /// Lists a folder: every `annos/<id>.json` with its `image/<id>.jpg` (or `.jpeg`/`.png`).
    /// An annotation without its image is an error; images without annotations are ignored.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let annos = root.join("annos");
        let image_dir = root.join("image");
        for dir in [&annos, &image_dir] {
            if !dir.is_dir() {
                return Err(Error::InvalidDatasetLayout { path: dir.clone(), reason: "missing: a DeepFashion2-format folder holds image/ and annos/".into() });
            }
        }
        let mut images = Vec::new();
        for entry in std::fs::read_dir(&annos).map_err(|e| Error::io(&annos, e))? {
            let path = entry.map_err(|e| Error::io(&annos, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let id: u64 = stem.parse().map_err(|_| Error::InvalidDatasetLayout { path: path.clone(), reason: "annotation file names are numeric ids (000123.json)".into() })?;
            let image = ["jpg", "jpeg", "png"]
                .iter()
                .map(|ext| image_dir.join(format!("{stem}.{ext}")))
                .find(|p| p.is_file())
                .ok_or_else(|| Error::InvalidDatasetLayout { path: path.clone(), reason: format!("no image {stem}.jpg in {}", image_dir.display()) })?;
            images.push(Df2Image { id, image, annotation: path });
        }
        images.sort_by_key(|i| i.id);
        Ok(Self { root, images })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The images with annotations, by ascending id.
    pub fn images(&self) -> &[Df2Image] {
        &self.images
    }

    /// The image with id `id`.
    pub fn image(&self, id: u64) -> Option<&Df2Image> {
        self.images.binary_search_by_key(&id, |i| i.id).ok().map(|at| &self.images[at])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Df2Annotation> {
        Df2Annotation::parse(json.as_bytes(), Path::new("annos/000007.json"))
    }

    #[test]
    fn parses_a_deepfashion2_annotation_in_item_order() {
        let a = parse(
            r#"{"source":"user","pair_id":7,
                "item2":{"category_id":4,"category_name":"footwear","style":2,"bounding_box":[1,2,3,4],
                         "landmarks":[],"segmentation":[[1,2,3,4,5,6]],"scale":1,"occlusion":1,"zoom_in":1,"viewpoint":2},
                "item1":{"category_id":9,"category_name":"top","style":0,"bounding_box":[10,20,30,40]}}"#,
        )
        .unwrap();
        assert_eq!((a.source, a.pair_id, a.items.len()), (Source::User, 7, 2));
        assert_eq!(a.items[0].index, 1);
        assert_eq!(a.items[0].style, 0);
        assert_eq!(a.items[1].bbox, BBox::new(1.0, 2.0, 3.0, 4.0));
        assert_eq!(a.items[1].segmentation, vec![vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]);
        assert_eq!(a.items[1].viewpoint, 2);
    }

    #[test]
    fn malformed_annotations_name_file_and_field() {
        let cases = [
            (r#"{"pair_id":1}"#, "`source`"),
            (r#"{"source":"user","pair_id":-1}"#, "`pair_id`"),
            (r#"{"source":"user","pair_id":1,"item1":{"category_id":1,"style":1,"bounding_box":[1,2,3]}}"#, "`item1.bounding_box`"),
            (r#"{"source":"user","pair_id":1,"item1":{"category_id":1,"style":1,"bounding_box":[5,2,3,4]}}"#, "`item1.bounding_box`"),
            (r#"{"source":"user","pair_id":1,"item3":{"category_id":"x","style":1,"bounding_box":[1,2,3,4]}}"#, "`item3.category_id`"),
            (r#"{"source":"user","pair_id":1,"item1":{"category_id":1,"bounding_box":[1,2,3,4]}}"#, "`item1.style`"),
            (r#"{"source":"user","pair_id":1,"item1":{"category_id":1,"style":1,"bounding_box":[1,2,3,4],"landmarks":[1,"a"]}}"#, "`item1.landmarks[1]`"),
            (r#"{"source":"user","pair_id":1,"itemX":{}}"#, "`itemX`"),
            ("[1,2]", "`(document)`"),
            ("{not json", "`(document)`"),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains("annos/000007.json") && err.contains(field), "{json} gave {err}");
        }
    }
}
