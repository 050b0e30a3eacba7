//! Reading catalog files and DeepFashion2 shop folders.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::LabelMap;
use crate::datasets::{Df2Annotation, Df2Folder};
use crate::geometry::BBox;
use crate::store::ItemMetadata;
use crate::{Error, Result};

/// Where a catalog comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    /// CSV with a header: `sku`, `image` required; `title`, `label`, `price`, `currency`,
    /// `url` optional; any other column becomes a free attribute.
    Csv(PathBuf),
    /// One JSON object per line with the same keys.
    Jsonl(PathBuf),
    /// A DeepFashion2-format shop folder (`image/`, `annos/`): each image is an item whose
    /// sku is its file stem, with its annotated garment boxes.
    Df2Folder(PathBuf),
}

impl CatalogSource {
    /// The file or folder the catalog is read from.
    pub fn path(&self) -> &Path {
        match self {
            Self::Csv(p) | Self::Jsonl(p) | Self::Df2Folder(p) => p,
        }
    }

    /// Tells the kind from the path: a folder with `annos/`, or a `.csv` / `.jsonl` file.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if path.join("annos").is_dir() {
                return Ok(Self::Df2Folder(path.to_path_buf()));
            }
            if path.join("catalog.csv").is_file() {
                return Ok(Self::Csv(path.join("catalog.csv")));
            }
            return Err(Error::InvalidDatasetLayout { path: path.to_path_buf(), reason: "a catalog folder holds annos/ (DeepFashion2) or catalog.csv".into() });
        }
        match path.extension().and_then(|e| e.to_str()).map(str::to_lowercase).as_deref() {
            Some("csv") => Ok(Self::Csv(path.to_path_buf())),
            Some("jsonl") | Some("ndjson") => Ok(Self::Jsonl(path.to_path_buf())),
            _ => Err(Error::InvalidDatasetLayout { path: path.to_path_buf(), reason: "a catalog is a .csv, a .jsonl, or a DeepFashion2 folder".into() }),
        }
    }
}

/// One shop item to index.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    pub metadata: ItemMetadata,
    /// The image on disk (resolved inside the catalog's folder).
    pub image_path: PathBuf,
    /// The catalog's folder: the image must really lie inside it (no link leads out).
    pub root: PathBuf,
    /// Annotated garments (DeepFashion2 folders only), with their categories.
    pub boxes: Vec<(BBox, String)>,
    /// `file:line` for messages.
    pub origin: String,
}

/// A catalog row that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// `file:line`.
    pub origin: String,
    pub sku: Option<String>,
    pub reason: String,
}

/// Resolves an image reference inside `root`: relative, without `..`, so a catalog cannot
/// make the indexer read files outside its folder.
fn resolve_image(root: &Path, reference: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(reference);
    if reference.is_empty() {
        return Err("empty image path".into());
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("image path {reference:?} must be relative to the catalog and must not contain '..'"));
    }
    Ok(root.join(rel))
}

/// The longest text a catalog field may hold, in bytes, by field; free attributes get
/// [`MAX_ATTRIBUTE_BYTES`]. Every field is copied into the store, the serving snapshot and
/// each search answer that shows the item: a 50 MB title would make every answer 50 MB.
pub const FIELD_LIMITS: [(&str, usize); 6] = [("image", 1024), ("title", 1024), ("label", 256), ("category", 256), ("currency", 16), ("url", 2048)];
/// The longest free attribute value and name, in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;
/// Free attributes per item.
pub const MAX_ATTRIBUTES: usize = 64;

/// Refuses a row whose fields are over [`FIELD_LIMITS`] (the sku has its own check).
fn check_field_sizes(fields: &BTreeMap<String, String>) -> std::result::Result<(), String> {
    let known = |name: &str| FIELD_LIMITS.iter().find(|(n, _)| *n == name).map(|(_, max)| *max);
    let attributes = fields.keys().filter(|k| known(k).is_none() && !matches!(k.as_str(), "sku" | "price")).count();
    if attributes > MAX_ATTRIBUTES {
        return Err(format!("{attributes} attribute columns, more than the {MAX_ATTRIBUTES} allowed"));
    }
    for (name, value) in fields {
        let max = known(name).unwrap_or(MAX_ATTRIBUTE_BYTES);
        if value.len() > max || name.len() > MAX_ATTRIBUTE_BYTES {
            return Err(format!("field {:?} is {} bytes, over its {max}-byte limit", truncated(name), value.len()));
        }
    }
    Ok(())
}

/// At most 40 characters of `s`, for messages about oversized input.
fn truncated(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// Builds an entry from string fields (CSV columns or JSON keys).
fn entry_from_fields(mut fields: BTreeMap<String, String>, root: &Path, labels: &LabelMap, origin: String) -> std::result::Result<CatalogEntry, RowError> {
    let fail = |sku: Option<String>, reason: String| RowError { origin: origin.clone(), sku, reason };
    let sku = fields.remove("sku").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).ok_or_else(|| fail(None, "missing sku".into()))?;
    if sku.len() > 256 || sku.chars().any(char::is_control) {
        return Err(fail(Some(sku), "sku longer than 256 bytes or with control characters".into()));
    }
    check_field_sizes(&fields).map_err(|r| fail(Some(sku.clone()), r))?;
    let image = fields.remove("image").unwrap_or_default();
    let image_path = resolve_image(root, image.trim()).map_err(|r| fail(Some(sku.clone()), r))?;
    let price = match fields.remove("price").filter(|p| !p.trim().is_empty()) {
        None => None,
        Some(p) => {
            Some(p.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| fail(Some(sku.clone()), format!("price {p:?} is not a non-negative number")))?)
        }
    };
    let label = fields.remove("label").filter(|l| !l.trim().is_empty());
    let category = fields.remove("category").filter(|c| !c.trim().is_empty()).or_else(|| label.as_deref().map(|l| labels.category(l)));
    let metadata = ItemMetadata {
        sku,
        title: fields.remove("title").filter(|t| !t.is_empty()),
        label,
        category,
        image: image.trim().to_string(),
        price,
        currency: fields.remove("currency").filter(|c| !c.is_empty()),
        url: fields.remove("url").filter(|u| !u.is_empty()),
        attributes: fields,
    };
    Ok(CatalogEntry { metadata, image_path, root: root.to_path_buf(), boxes: Vec::new(), origin })
}

/// Reads a catalog: its entries, and the rows that could not be read.
pub fn read_catalog(source: &CatalogSource, labels: &LabelMap) -> Result<(Vec<CatalogEntry>, Vec<RowError>)> {
    match source {
        CatalogSource::Csv(path) => read_csv(path, labels),
        CatalogSource::Jsonl(path) => read_jsonl(path, labels),
        CatalogSource::Df2Folder(path) => read_df2(path, labels),
    }
}

fn root_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn read_csv(path: &Path, labels: &LabelMap) -> Result<(Vec<CatalogEntry>, Vec<RowError>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_csv(&bytes, path, labels)
}

/// Parses a CSV catalog held in memory; `path` names it in messages and its folder is the
/// root image paths resolve in. (Separate from the file read so the fuzz target
/// `catalog_parsers` reaches it without a file system.)
pub fn parse_csv(bytes: &[u8], path: &Path, labels: &LabelMap) -> Result<(Vec<CatalogEntry>, Vec<RowError>)> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| Error::MalformedDataset { file: path.to_path_buf(), field: "(header)".into(), reason: e.to_string() })?
        .iter()
        .map(|h| h.trim().to_lowercase())
        .collect();
    for required in ["sku", "image"] {
        if !headers.iter().any(|h| h == required) {
            return Err(Error::MalformedDataset { file: path.to_path_buf(), field: required.into(), reason: "column missing from the header".into() });
        }
    }
    let root = root_of(path);
    let (mut entries, mut errors) = (Vec::new(), Vec::new());
    let mut lines = LineCounter::new(bytes);
    for record in reader.records() {
        let result = match record {
            Ok(r) => {
                let line = r.position().map_or(0, |p| lines.line_at(p.byte()));
                if r.len() != headers.len() {
                    errors.push(RowError {
                        origin: format!("{}:{line}", path.display()),
                        sku: r.get(0).map(str::to_string),
                        reason: format!("{} fields, the header has {}", r.len(), headers.len()),
                    });
                    continue;
                }
                let fields: BTreeMap<String, String> = headers.iter().cloned().zip(r.iter().map(str::to_string)).collect();
                entry_from_fields(fields, &root, labels, format!("{}:{line}", path.display()))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| lines.line_at(p.byte()));
                Err(RowError { origin: format!("{}:{line}", path.display()), sku: None, reason: e.to_string() })
            }
        };
        match result {
            Ok(entry) => entries.push(entry),
            Err(e) => errors.push(e),
        }
    }
    Ok((entries, errors))
}

/// Line numbers from byte offsets. The csv crate's own line count is off by one after CRLF
/// line ends and blank lines; a record's byte offset is exact, but may point at the blank
/// lines skipped before it. Records come in order, so the count only moves forward.
struct LineCounter<'a> {
    bytes: &'a [u8],
    at: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0, line: 1 }
    }

    /// The line of the first byte at or after `offset` that is not a line end.
    fn line_at(&mut self, offset: u64) -> u64 {
        let mut start = (offset as usize).min(self.bytes.len());
        while matches!(self.bytes.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        if start >= self.at {
            self.line += self.bytes[self.at..start].iter().filter(|b| **b == b'\n').count() as u64;
            self.at = start;
        }
        self.line
    }
}

fn read_jsonl(path: &Path, labels: &LabelMap) -> Result<(Vec<CatalogEntry>, Vec<RowError>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(parse_jsonl(&text, path, labels))
}

/// Parses a JSON-lines catalog held in memory (see [`parse_csv`]).
pub fn parse_jsonl(text: &str, path: &Path, labels: &LabelMap) -> (Vec<CatalogEntry>, Vec<RowError>) {
    let root = root_of(path);
    let (mut entries, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        let fields = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(obj)) => obj
                .into_iter()
                .filter_map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => return None,
                    };
                    Some((k.to_lowercase(), v))
                })
                .collect(),
            Ok(_) => {
                errors.push(RowError { origin, sku: None, reason: "not a JSON object".into() });
                continue;
            }
            Err(e) => {
                errors.push(RowError { origin, sku: None, reason: format!("not valid JSON: {e}") });
                continue;
            }
        };
        match entry_from_fields(fields, &root, labels, origin) {
            Ok(entry) => entries.push(entry),
            Err(e) => errors.push(e),
        }
    }
    (entries, errors)
}

fn read_df2(path: &Path, labels: &LabelMap) -> Result<(Vec<CatalogEntry>, Vec<RowError>)> {
    let folder = Df2Folder::open(path)?;
    let (mut entries, mut errors) = (Vec::new(), Vec::new());
    for image in folder.images() {
        let sku = image.image.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let origin = image.annotation.display().to_string();
        match Df2Annotation::read(&image.annotation) {
            Ok(anno) => {
                let boxes: Vec<(BBox, String)> =
                    anno.items.iter().map(|i| (i.bbox, if i.category_name.is_empty() { i.category_id.to_string() } else { labels.category(&i.category_name) })).collect();
                let first_category = boxes.first().map(|(_, c)| c.clone());
                let image_ref = image.image.strip_prefix(path).unwrap_or(&image.image).to_string_lossy().into_owned();
                let metadata = ItemMetadata {
                    sku,
                    label: first_category.clone(),
                    category: first_category,
                    image: image_ref,
                    attributes: BTreeMap::from([("pair_id".to_string(), anno.pair_id.to_string())]),
                    ..Default::default()
                };
                entries.push(CatalogEntry { metadata, image_path: image.image.clone(), root: path.to_path_buf(), boxes, origin });
            }
            Err(e) => errors.push(RowError { origin, sku: Some(sku), reason: e.to_string() }),
        }
    }
    Ok((entries, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_become_entries_and_bad_rows_report_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("catalog.csv");
        std::fs::write(
            &csv,
            "sku,image,label,price,colour\n\
             a,images/a.jpg,T-Shirt,9.5,red\n\
             ,images/b.jpg,Pants,,\n\
             c,../../etc/passwd,Pants,,\n\
             d,/etc/passwd,Pants,,\n\
             e,images/e.jpg,Shoes,cheap,\n\
             f,images/f.jpg\n\
             g,\"images/g, quoted.jpg\",Outwear,,blue\n",
        )
        .unwrap();
        let (entries, errors) = read_catalog(&CatalogSource::from_path(&csv).unwrap(), &LabelMap::default()).unwrap();
        let skus: Vec<&str> = entries.iter().map(|e| e.metadata.sku.as_str()).collect();
        assert_eq!(skus, ["a", "g"]);
        assert_eq!(entries[0].metadata.category.as_deref(), Some("top"));
        assert_eq!(entries[0].metadata.price, Some(9.5));
        assert_eq!(entries[0].metadata.attributes["colour"], "red");
        assert_eq!(entries[0].image_path, dir.path().join("images/a.jpg"));
        assert_eq!(entries[1].metadata.category.as_deref(), Some("outer"));
        let lines: Vec<&str> = errors.iter().map(|e| e.origin.rsplit(':').next().unwrap()).collect();
        assert_eq!(lines, ["3", "4", "5", "6", "7"], "{errors:?}");
        assert!(errors[1].reason.contains("..") && errors[2].reason.contains("relative"));
    }

    #[test]
    fn rows_name_their_own_line_whatever_the_line_ends_and_blank_lines() {
        let origins = |text: &str| {
            let (entries, errors) = parse_csv(text.as_bytes(), Path::new("c.csv"), &LabelMap::default()).unwrap();
            let line = |origin: &str| origin.rsplit(':').next().unwrap().parse::<u64>().unwrap();
            (entries.iter().map(|e| line(&e.origin)).collect::<Vec<_>>(), errors.iter().map(|e| line(&e.origin)).collect::<Vec<_>>())
        };
        assert_eq!(origins("sku,image\na,x.jpg\nb,y.jpg\n"), (vec![2, 3], vec![]));
        assert_eq!(origins("sku,image\r\na,x.jpg\r\nb,y.jpg\r\n"), (vec![2, 3], vec![]));
        assert_eq!(origins("sku,image\n\na,x.jpg\n\r\n\nb,y.jpg\n"), (vec![3, 6], vec![]));
        // A quoted field across two lines: the next row starts two lines on.
        assert_eq!(origins("sku,image\na,\"x\ny.jpg\"\nb,y.jpg\nc\n"), (vec![2, 4], vec![5]));
    }

    #[test]
    fn oversized_fields_are_refused_rows_not_copied_into_every_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.jsonl");
        let long_title = "t".repeat(1025);
        let long_colour = "c".repeat(MAX_ATTRIBUTE_BYTES + 1);
        let many: String = (0..=MAX_ATTRIBUTES).map(|i| format!(",\"a{i}\":\"v\"")).collect();
        let text = format!(
            "{{\"sku\":\"ok\",\"image\":\"ok.jpg\",\"title\":\"{}\"}}\n{{\"sku\":\"title\",\"image\":\"t.jpg\",\"title\":\"{long_title}\"}}\n{{\"sku\":\"colour\",\"image\":\"c.jpg\",\"colour\":\"{long_colour}\"}}\n{{\"sku\":\"many\",\"image\":\"m.jpg\"{many}}}\n",
            "t".repeat(1024)
        );
        std::fs::write(&path, text).unwrap();
        let (entries, errors) = read_catalog(&CatalogSource::from_path(&path).unwrap(), &LabelMap::default()).unwrap();
        assert_eq!(entries.iter().map(|e| e.metadata.sku.as_str()).collect::<Vec<_>>(), ["ok"]);
        let reasons: Vec<(&str, &str)> = errors.iter().map(|e| (e.sku.as_deref().unwrap_or(""), e.reason.as_str())).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].0 == "title" && reasons[0].1.contains("\"title\" is 1025 bytes"), "{reasons:?}");
        assert!(reasons[1].0 == "colour" && reasons[1].1.contains("1024-byte limit"), "{reasons:?}");
        assert!(reasons[2].0 == "many" && reasons[2].1.contains("attribute columns"), "{reasons:?}");
    }

    #[test]
    fn jsonl_lines_become_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.jsonl");
        std::fs::write(&path, "{\"sku\":\"x\",\"image\":\"x.jpg\",\"title\":\"Red tee\",\"price\":12,\"brand\":\"B\"}\n\nnot json\n[1]\n").unwrap();
        let (entries, errors) = read_catalog(&CatalogSource::from_path(&path).unwrap(), &LabelMap::default()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].metadata.title.as_deref(), Some("Red tee"));
        assert_eq!(entries[0].metadata.attributes["brand"], "B");
        assert_eq!(errors.len(), 2);
        assert!(errors[0].origin.ends_with(":3"));
    }
}
