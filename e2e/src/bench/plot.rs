//! The optional PNG of the latency distributions: histograms of TTFT, TPOT,
//! ITL and end-to-end latency over the successful requests, one panel each,
//! drawn with plotters' bitmap backend (pure Rust, no system libraries).
//!
//! Text needs a TrueType font, read from a file at run time (default
//! DejaVu Sans from Debian's `fonts-dejavu-core`), so nothing is bundled
//! and no fontconfig is involved. Only the figures' shape is drawn here;
//! the numbers are in the table and the JSON export.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::stats::{RequestRecord, percentile};

/// The font used when `--plot-font` is not given.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Bars per histogram.
const BINS: usize = 40;

/// Draws the four histograms into `path` (PNG), labels in the TrueType
/// font at `font`.
pub fn latency_png(records: &[RequestRecord], path: &Path, font: &Path) -> anyhow::Result<()> {
    load_font(font)?;
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success).collect();
    let ms = |v: f64| v * 1000.0;
    let panels: [(&str, Vec<f64>); 4] = [
        ("TTFT", ok.iter().map(|r| ms(r.ttft_s)).collect()),
        (
            "TPOT",
            ok.iter()
                .filter(|r| r.output_tokens > 1)
                .map(|r| ms((r.e2e_s - r.ttft_s) / (r.output_tokens - 1) as f64))
                .collect(),
        ),
        (
            "ITL",
            ok.iter()
                .flat_map(|r| r.itl_s.iter().map(|&v| ms(v)))
                .collect(),
        ),
        ("E2E latency", ok.iter().map(|r| ms(r.e2e_s)).collect()),
    ];
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, (name, values)) in root.split_evenly((2, 2)).iter().zip(panels) {
            histogram(area, name, values)?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

fn histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    mut values: Vec<f64>,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    values.sort_by(f64::total_cmp);
    // The top 0.5 % would squash the rest into one bar; they are counted in
    // the last bar.
    let hi = (percentile(&values, 99.5) * 1.05).max(1e-3);
    let width = hi / BINS as f64;
    let mut counts = [0u32; BINS];
    for v in &values {
        counts[((v / width) as usize).min(BINS - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) + 1;
    let caption = format!(
        "{name} (ms): n = {}, median {:.1}, p99 {:.1}",
        values.len(),
        percentile(&values, 50.0),
        percentile(&values, 99.0)
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..hi, 0u32..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("ms")
        .y_desc("count")
        .draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
        let x0 = i as f64 * width;
        Rectangle::new([(x0, 0), (x0 + width, c)], BLUE.mix(0.6).filled())
    }))?;
    Ok(())
}

/// Registers the font file as plotters' "sans-serif", once per process.
fn load_font(path: &Path) -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let bytes = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the plot font {}: {e} (install fonts-dejavu-core or pass --plot-font)",
                path.display()
            )
        })?;
        // plotters keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a TrueType font", path.display()))?;
        Ok(path.to_path_buf())
    });
    match loaded {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::TokenCountSource;

    #[test]
    fn draws_a_png_or_names_the_missing_font() {
        let records: Vec<RequestRecord> = (0..20)
            .map(|i| {
                let mut r = RequestRecord::new(i, 100, 5);
                r.success = true;
                r.ttft_s = 0.1 + i as f64 * 0.01;
                r.itl_s = vec![0.02, 0.03, 0.02, 0.04];
                r.e2e_s = r.ttft_s + 0.11;
                r.output_tokens = 5;
                r.output_tokens_source = TokenCountSource::Usage;
                r
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("xpyd-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("latency.png");
        let font = Path::new(DEFAULT_FONT);
        let result = latency_png(&records, &png, font);
        if font.exists() {
            result.unwrap();
            let bytes = std::fs::read(&png).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        } else {
            let e = result.unwrap_err().to_string();
            assert!(e.contains(DEFAULT_FONT) && e.contains("--plot-font"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
