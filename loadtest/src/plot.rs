//! The PNG: acknowledgement latency over time (p50, p99, max per second) above the
//! percentile distribution, drawn with plotters. Text uses DejaVu Sans compiled in
//! (plotters' ab_glyph backend), so the tool needs no system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::anyhow;
use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::stats::Second;

const FONT: &str = "sans-serif";

fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow!("the embedded DejaVu font did not load"));
    });
    result
}

/// Draws the plot to `path` (PNG).
pub fn write_png(
    path: &Path,
    title: &str,
    timeline: &[Second],
    h: &Histogram<u64>,
) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(450);
    draw_timeline(&top, title, timeline).map_err(|e| anyhow!("plot: {e}"))?;
    draw_percentiles(&bottom, h).map_err(|e| anyhow!("plot: {e}"))?;
    root.present()
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type PlotResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw_timeline(area: &Area<'_>, title: &str, timeline: &[Second]) -> PlotResult {
    let ms = |us: u64| us as f64 / 1000.0;
    let t_max = timeline.iter().map(|s| s.t_s).max().unwrap_or(1).max(1) as f64;
    let y_max = timeline.iter().map(|s| ms(s.max_us)).fold(1.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("ack latency (ms)")
        .label_style((FONT, 14))
        .draw()?;
    for (name, color, pick) in [
        ("p50", BLUE, (|s: &Second| s.p50_us) as fn(&Second) -> u64),
        ("p99", RED, |s: &Second| s.p99_us),
        ("max", BLACK, |s: &Second| s.max_us),
    ] {
        chart
            .draw_series(LineSeries::new(
                timeline
                    .iter()
                    .filter(|s| s.acked > 0)
                    .map(|s| (s.t_s as f64, ms(pick(s)))),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn draw_percentiles(area: &Area<'_>, h: &Histogram<u64>) -> PlotResult {
    // x: 1/(1-q) on a log axis, as HdrHistogram's plotter draws it.
    let points: Vec<(f64, f64)> = if h.is_empty() {
        Vec::new()
    } else {
        h.iter_quantiles(5)
            .map(|v| v.quantile_iterated_to())
            .filter(|q| *q < 1.0)
            .map(|q| (1.0 / (1.0 - q), h.value_at_quantile(q) as f64 / 1000.0))
            .collect()
    };
    let x_max = points.iter().map(|p| p.0).fold(10.0f64, f64::max);
    let y_max = (h.max() as f64 / 1000.0).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("ack latency by percentile", (FONT, 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..x_max).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("percentile (1/(1-q): 10 = p90, 100 = p99, 1000 = p99.9)")
        .y_desc("latency (ms)")
        .label_style((FONT, 14))
        .draw()?;
    chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
    Ok(())
}
