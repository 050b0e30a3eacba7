//! Reports people read, beside each evaluation's `report.json`: a Markdown summary, SVG
//! plots (drawn with plotters: top-k curve, per-category bars) and, for retrieval, an HTML
//! page of the worst queries (query crop beside its first results).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use shoplens::evaluation::detection::DetectionReport;
use shoplens::evaluation::relevance::RelevanceReport;
use shoplens::evaluation::retrieval::{QueryDetail, RetrievalReport, TOP_K};
use shoplens::geometry::BBox;

/// `report.json` → `report.md`, `report-topk.svg`, …
pub fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("report");
    out.with_file_name(format!("{stem}{suffix}"))
}

const PALETTE: [RGBColor; 4] = [RGBColor(210, 70, 60), RGBColor(31, 111, 235), RGBColor(46, 160, 67), RGBColor(130, 80, 223)];

/// A line chart of top-k accuracy, one line per run.
pub fn topk_svg(path: &Path, runs: &[(&str, &BTreeMap<String, f64>)]) -> Result<()> {
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("top-k retrieval accuracy (DeepFashion2 rule)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..21f64, 0f64..1f64)?;
    chart.configure_mesh().x_desc("k").y_desc("accuracy").draw()?;
    for (i, (name, top_k)) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = TOP_K.iter().filter_map(|k| top_k.get(&k.to_string()).map(|v| (*k as f64, *v))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::LowerRight).draw()?;
    root.present()?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series.
pub fn bars_svg(path: &Path, title: &str, series: &[&str], groups: &[(String, Vec<f64>)]) -> Result<()> {
    let width = (120 + groups.len() * 28 * series.len().max(1) + groups.len() * 12).max(480) as u32;
    let root = SVGBackend::new(path, (width, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len().max(1);
    let mut chart =
        ChartBuilder::on(&root).caption(title, ("sans-serif", 18)).margin(12).x_label_area_size(70).y_label_area_size(48).build_cartesian_2d(0f64..n as f64, 0f64..1f64)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc("score").draw()?;
    // Category names under their groups, drawn on the whole canvas (the plotting area
    // clips what lies below its axis).
    for (i, (name, _)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(name.clone(), (x, y + 8), ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top))))?;
    }
    let bar = 0.8 / series.len().max(1) as f64;
    for (s, name) in series.iter().enumerate() {
        let colour = PALETTE[s % PALETTE.len()];
        chart
            .draw_series(groups.iter().enumerate().map(|(i, (_, values))| {
                let x0 = i as f64 + 0.1 + s as f64 * bar;
                Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, values.get(s).copied().unwrap_or(0.0))], colour.filled())
            }))?
            .label(name.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw()?;
    root.present()?;
    Ok(())
}

/// `report.md` and plots of a retrieval evaluation.
pub fn retrieval(out: &Path, report: &RetrievalReport, command: &str) -> Result<Vec<PathBuf>> {
    let topk = sibling(out, "-topk.svg");
    topk_svg(&topk, &[(report.boxes, &report.top_k)])?;
    let bars = sibling(out, "-categories.svg");
    let groups: Vec<(String, Vec<f64>)> = report.per_category.iter().map(|(c, g)| (c.clone(), vec![g.top_k["1"], g.top_k["20"]])).collect();
    bars_svg(&bars, "accuracy per category", &["top-1", "top-20"], &groups)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Retrieval: DeepFashion2 protocol, {} boxes\n", report.boxes);
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(
        md,
        "{} query items ({} missed: no detection of their class assigned to them); gallery of {} garments (generation {}); embedder `{}`{}; {:.0} s.\n",
        report.queries,
        report.misses,
        report.gallery_garments,
        report.generation,
        report.embedder,
        report.detector.as_deref().map(|d| format!(", detector `{d}`")).unwrap_or_default(),
        report.seconds
    );
    let _ = writeln!(md, "| | {} |\n|---|{}", TOP_K.map(|k| format!("top-{k}")).join(" | "), "---|".repeat(TOP_K.len()));
    let row = |name: &str, top: &BTreeMap<String, f64>, n: usize| format!("| {name} ({n}) | {} |", TOP_K.map(|k| format!("{:.3}", top[&k.to_string()])).join(" | "));
    let _ = writeln!(md, "{}", row("**all**", &report.top_k, report.queries));
    for (c, g) in &report.per_category {
        let _ = writeln!(md, "{}", row(c, &g.top_k, g.queries));
    }
    for (s, g) in &report.per_scale {
        let _ = writeln!(md, "{}", row(&format!("scale: {s}"), &g.top_k, g.queries));
    }
    let _ = writeln!(md, "\n![top-k]({})\n\n![per category]({})", file_name(&topk), file_name(&bars));
    let md_path = sibling(out, ".md");
    std::fs::write(&md_path, md)?;
    Ok(vec![md_path, topk, bars])
}

/// `report.md` and a plot of a detection evaluation.
pub fn detection(out: &Path, report: &DetectionReport, command: &str) -> Result<Vec<PathBuf>> {
    let bars = sibling(out, "-categories.svg");
    let groups: Vec<(String, Vec<f64>)> = report.per_category.iter().map(|(c, a)| (c.clone(), vec![a.ap50, a.ap])).collect();
    bars_svg(&bars, "box AP per category", &["AP50", "AP@[.5:.95]"], &groups)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Detection: COCO box AP\n\nCommand: `{command}`\n");
    let _ = writeln!(
        md,
        "{} images, detector `{}` at {}² input, {:.1} ms per image (decode + detect).\n\n**AP {:.3} · AP50 {:.3} · AP75 {:.3}**{}\n",
        report.images,
        report.detector,
        report.input_size,
        report.ms_per_image,
        report.ap,
        report.ap50,
        report.ap75,
        report.headline_ap50.map(|h| format!(" · mean AP50 over top, outer, dress, pants, skirt, shorts, footwear, bag: **{h:.3}**")).unwrap_or_default()
    );
    let _ = writeln!(md, "Class-agnostic AP50 (framing alone, every box one class): {:.3}\n", report.class_agnostic_ap50);
    let _ = writeln!(md, "| category | instances | AP | AP50 | AP75 |\n|---|---|---|---|---|");
    for (c, a) in &report.per_category {
        let _ = writeln!(md, "| {c} | {} | {:.3} | {:.3} | {:.3} |", a.instances, a.ap, a.ap50, a.ap75);
    }
    let _ = writeln!(md, "\n![per category]({})", file_name(&bars));
    if !report.served.is_empty() {
        let _ = writeln!(
            md,
            "\n## Served boxes\n\nThe detector's serving post-processing at each score threshold (a box is right at IoU ≥ 0.5 with an unmatched garment of its category; **bold**: the configured threshold).\n\n| min score | precision | recall | F1 | garments per image | annotated per image |\n|---|---|---|---|---|---|"
        );
        for p in &report.served {
            let row = format!("{:.2} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2}", p.min_score, p.precision, p.recall, p.f1, p.garments_per_image, p.annotated_per_image);
            let _ = writeln!(md, "| {} |", if p.configured { format!("**{}**", row.replace(" | ", "** | **")) } else { row });
        }
    }
    let md_path = sibling(out, ".md");
    std::fs::write(&md_path, md)?;
    Ok(vec![md_path, bars])
}

/// `relevance.json` → Markdown with the per-category table and a bar chart.
pub fn relevance(out: &Path, report: &RelevanceReport, command: &str) -> Result<Vec<PathBuf>> {
    let bars = sibling(out, "-categories.svg");
    let groups: Vec<(String, Vec<f64>)> = report.per_category.iter().map(|(c, r)| (c.clone(), vec![r.precision, r.category_accuracy])).collect();
    bars_svg(&bars, &format!("category precision@{} per category", report.k), &[&format!("precision@{}", report.k), "category accuracy"], &groups)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Relevance: category precision@{}\n\nCommand: `{command}`\n", report.k);
    let _ = writeln!(
        md,
        "{} labelled garments, {} boxes, ranking by {}, embedder `{}`{}; catalog generation {} ({} garments).\n\n**precision@{} {:.3}** · category accuracy {:.3}{}\n",
        report.garments,
        report.boxes,
        report.ranking,
        report.embedder,
        report.detector.as_ref().map(|d| format!(", detector `{d}`")).unwrap_or_default(),
        report.generation,
        report.catalog.values().sum::<usize>(),
        report.k,
        report.overall.precision,
        report.overall.category_accuracy,
        if report.overall.misses > 0 { format!(" · {} garments missed by the detector (count 0)", report.overall.misses) } else { String::new() }
    );
    let _ = writeln!(md, "| category | garments | precision@{} | category accuracy | missed | catalog garments |\n|---|---|---|---|---|---|", report.k);
    for (c, r) in &report.per_category {
        let _ = writeln!(md, "| {c} | {} | {:.3} | {:.3} | {} | {} |", r.queries, r.precision, r.category_accuracy, r.misses, report.catalog.get(c).copied().unwrap_or(0));
    }
    if !report.absent.is_empty() {
        let absent: Vec<String> = report.absent.iter().map(|(c, n)| format!("{c} ({n})")).collect();
        let _ = writeln!(md, "\nLeft out, the catalog has none of their category: {}.", absent.join(", "));
    }
    let _ = writeln!(md, "\n![per category]({})", file_name(&bars));
    let md_path = sibling(out, ".md");
    std::fs::write(&md_path, md)?;
    Ok(vec![md_path, bars])
}

fn file_name(p: &Path) -> String {
    p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string()
}

fn thumbnail(image: &RgbImage, bbox: [f32; 4], path: &Path) -> Result<()> {
    let b = BBox::new(bbox[0], bbox[1], bbox[2], bbox[3]).clip(image.width(), image.height());
    let (x, y) = (b.x1.floor() as u32, b.y1.floor() as u32);
    let (w, h) = ((b.x2.ceil() as u32).saturating_sub(x).max(1), (b.y2.ceil() as u32).saturating_sub(y).max(1));
    let crop = image::imageops::crop_imm(image, x, y, w, h).to_image();
    let scale = 160.0 / w.max(h) as f32;
    let small = image::imageops::resize(&crop, ((w as f32 * scale) as u32).max(1), ((h as f32 * scale) as u32).max(1), image::imageops::FilterType::Triangle);
    small.save(path).with_context(|| format!("writing {}", path.display()))
}

/// An HTML page of the worst queries (no hit in the top 20, then the latest first hits):
/// the query crop beside its first five results, each marked hit or not.
pub fn worst_queries(
    out: &Path,
    details: &[QueryDetail],
    query_image: &dyn Fn(u64) -> Option<PathBuf>,
    gallery_image: &dyn Fn(&str) -> Option<PathBuf>,
    limit: usize,
) -> Result<PathBuf> {
    let dir = sibling(out, "-worst");
    std::fs::create_dir_all(&dir)?;
    let mut worst: Vec<&QueryDetail> = details.iter().collect();
    worst.sort_by_key(|d| (std::cmp::Reverse(d.first_hit.unwrap_or(usize::MAX)), d.query_image_id));
    let mut html = String::from(
        "<!doctype html><meta charset=utf-8><title>Worst queries</title><style>body{font:14px system-ui;margin:20px}\
         .row{display:flex;gap:10px;align-items:flex-start;margin:14px 0;padding-bottom:10px;border-bottom:1px solid #ddd}\
         figure{margin:0;width:160px}img{max-width:160px;max-height:160px;display:block;background:#f3f3f3}\
         figcaption{font-size:12px;color:#555}.q img{outline:3px solid #1f6feb}.hit img{outline:3px solid #2ea043}</style>\
         <h1>Worst queries</h1><p>Blue: the query crop (the detection used, else the ground-truth box). Green: a correct shop item.</p>\n",
    );
    let mut cache: BTreeMap<PathBuf, RgbImage> = BTreeMap::new();
    let mut open = |p: &Path| -> Option<RgbImage> {
        if !cache.contains_key(p) {
            let img = image::open(p).ok()?.to_rgb8();
            cache.insert(p.to_path_buf(), img);
        }
        cache.get(p).cloned()
    };
    for (i, d) in worst.iter().take(limit).enumerate() {
        let _ = write!(html, "<div class=row>");
        let status = match d.first_hit {
            None if d.query_bbox.is_none() => "missed: no detection".to_string(),
            None => "no hit in the top 20".to_string(),
            Some(r) => format!("first hit at rank {}", r + 1),
        };
        if let Some(img) = query_image(d.query_image_id).and_then(|p| open(&p)) {
            let name = format!("q{i}.jpg");
            thumbnail(&img, d.query_bbox.unwrap_or(d.gt_bbox), &dir.join(&name))?;
            let _ =
                write!(html, "<figure class=q><img src=\"{}/{name}\"><figcaption>query {} · {} · {status}</figcaption></figure>", file_name(&dir), d.query_image_id, d.category);
        }
        for (rank, (sku, bbox, score)) in d.retrieved.iter().enumerate() {
            let Some(img) = gallery_image(sku).and_then(|p| open(&p)) else { continue };
            let name = format!("q{i}-r{rank}.jpg");
            thumbnail(&img, *bbox, &dir.join(&name))?;
            let class = if d.first_hit == Some(rank) { "hit" } else { "" };
            let _ = write!(html, "<figure class=\"{class}\"><img src=\"{}/{name}\"><figcaption>#{} {} · {score:.3}</figcaption></figure>", file_name(&dir), rank + 1, escape(sku));
        }
        let _ = writeln!(html, "</div>");
    }
    let path = sibling(out, "-worst.html");
    std::fs::write(&path, html)?;
    Ok(path)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Numbers of a report worth comparing, by name.
fn metrics(v: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    match v["protocol"].as_str() {
        Some("coco-box") => {
            for key in ["ap", "ap50", "ap75", "headline_ap50", "ms_per_image"] {
                if let Some(x) = v[key].as_f64() {
                    out.insert(key.to_string(), x);
                }
            }
            if let Some(per) = v["per_category"].as_object() {
                for (c, a) in per {
                    if let Some(x) = a["ap50"].as_f64() {
                        out.insert(format!("{c} ap50"), x);
                    }
                }
            }
        }
        Some("category-precision") => {
            if let Some(x) = v["overall"]["precision"].as_f64() {
                out.insert("precision".into(), x);
            }
            if let Some(x) = v["overall"]["category_accuracy"].as_f64() {
                out.insert("category accuracy".into(), x);
            }
            if let Some(per) = v["per_category"].as_object() {
                for (c, r) in per {
                    if let Some(x) = r["precision"].as_f64() {
                        out.insert(format!("{c} precision"), x);
                    }
                }
            }
        }
        _ => {
            for k in TOP_K {
                if let Some(x) = v["top_k"][k.to_string()].as_f64() {
                    out.insert(format!("top-{k:02}"), x);
                }
            }
            if let Some(per) = v["per_category"].as_object() {
                for (c, g) in per {
                    for k in [1, 20] {
                        if let Some(x) = g["top_k"][k.to_string()].as_f64() {
                            out.insert(format!("{c} top-{k:02}"), x);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Two reports side by side with differences (b − a).
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let read = |p: &Path| -> Result<Value> {
        serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("{} is not JSON", p.display()))
    };
    let (va, vb) = (read(a)?, read(b)?);
    if va["protocol"] != vb["protocol"] {
        anyhow::bail!("{} is a {} report, {} a {} report: nothing to compare", a.display(), va["protocol"], b.display(), vb["protocol"]);
    }
    let (ma, mb) = (metrics(&va), metrics(&vb));
    let mut out = format!("{:<28} {:>10} {:>10} {:>9}\n", "", "a", "b", "b − a");
    let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    for k in keys {
        let (x, y) = (ma.get(k), mb.get(k));
        let fmt = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let diff = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.3}", y - x),
            _ => "-".into(),
        };
        let _ = writeln!(out, "{k:<28} {:>10} {:>10} {diff:>9}", fmt(x), fmt(y));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_and_comparisons() {
        let dir = tempfile::tempdir().unwrap();
        let top: BTreeMap<String, f64> = TOP_K.iter().map(|k| (k.to_string(), 0.5 + *k as f64 / 50.0)).collect();
        let svg = dir.path().join("t.svg");
        topk_svg(&svg, &[("gt", &top)]).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("top-k retrieval accuracy"), "{text}");
        let bars = dir.path().join("b.svg");
        bars_svg(&bars, "per category", &["AP50"], &[("skirt".into(), vec![0.4]), ("top".into(), vec![0.7])]).unwrap();
        let text = std::fs::read_to_string(&bars).unwrap();
        assert!(text.contains("skirt") && text.contains("<rect"), "{text}");

        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        std::fs::write(&a, r#"{"protocol":"coco-box","ap":0.2,"ap50":0.5,"per_category":{"top":{"ap50":0.6}}}"#).unwrap();
        std::fs::write(&b, r#"{"protocol":"coco-box","ap":0.25,"ap50":0.45,"per_category":{"top":{"ap50":0.7}}}"#).unwrap();
        let table = compare(&a, &b).unwrap();
        assert!(table.contains("ap50") && table.contains("-0.050") && table.contains("+0.100"), "{table}");
        std::fs::write(&b, r#"{"protocol":"deepfashion2-retrieval","top_k":{"1":0.5}}"#).unwrap();
        assert!(compare(&a, &b).is_err());
    }
}
