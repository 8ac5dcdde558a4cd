//! A PNG chart of the report: p50 and p99 of TTFT, turn time and router overhead per mode.
//!
//! plotters renders text with `ab_glyph` from a TTF file read at run time (`--font`, else a
//! Debian font if installed), so the build needs no fontconfig and embeds no font. Without a
//! font the chart is skipped with a warning.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{ModeReport, Percentiles, Report};

const FONT_FAMILY: &str = "sans-serif";
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];
/// Picks one metric's percentiles from a mode's report.
type MetricOf = fn(&ModeReport) -> Option<Percentiles>;

const P50_COLOR: RGBColor = RGBColor(66, 133, 244);
const P99_COLOR: RGBColor = RGBColor(234, 67, 53);

/// Draws the chart to `path`; returns an error (the caller warns) if no font can be loaded.
pub fn draw(report: &Report, path: &Path, font: Option<&Path>) -> anyhow::Result<()> {
    register_font(font)?;
    let modes: Vec<&ModeReport> = report.modes.iter().filter(|m| m.skipped.is_none()).collect();
    if modes.is_empty() {
        bail!("no mode ran");
    }
    let root = BitMapBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled("tether-loadtest: p50 / p99 per mode (ms)", (FONT_FAMILY, 22))?;
    let panels = root.split_evenly((1, 3));
    let metrics: [(&str, MetricOf); 3] = [
        ("time to first token", |m| m.ttft_ms),
        ("turn (model call) time", |m| m.turn_ms),
        ("router overhead per turn", |m| m.router_overhead_ms),
    ];
    for (panel, (title, metric)) in panels.iter().zip(metrics) {
        let values: Vec<Option<Percentiles>> = modes.iter().map(|m| metric(m)).collect();
        panel_chart(panel, title, &modes, &values)?;
    }
    root.present().context("writing the chart")?;
    Ok(())
}

fn panel_chart(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    modes: &[&ModeReport],
    values: &[Option<Percentiles>],
) -> anyhow::Result<()> {
    let n = modes.len() as f64;
    let top = values.iter().flatten().map(|p| p.p99).fold(0.0_f64, f64::max).max(0.001) * 1.35;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT_FAMILY, 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)?;
    let names: Vec<&str> = modes.iter().map(|m| m.mode.name()).collect();
    let label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).map_or("", |n| *n).to_owned()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(modes.len() * 4 + 2)
        .x_label_formatter(&label)
        .y_desc("ms")
        .label_style((FONT_FAMILY, 13))
        .draw()?;
    if values.iter().all(Option::is_none) {
        chart.draw_series(std::iter::once(Text::new("n/a", (n / 2.0 - 0.5, top / 2.0), (FONT_FAMILY, 20))))?;
        return Ok(());
    }
    let bars = |offset: f64, color: RGBColor, pick: fn(&Percentiles) -> f64| {
        values.iter().enumerate().filter_map(move |(i, p)| {
            let x = i as f64 + offset;
            p.as_ref().map(|p| Rectangle::new([(x, 0.0), (x + 0.33, pick(p))], color.filled()))
        })
    };
    chart
        .draw_series(bars(-0.35, P50_COLOR, |p| p.p50))?
        .label("p50")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], P50_COLOR.filled()));
    chart
        .draw_series(bars(0.02, P99_COLOR, |p| p.p99))?
        .label("p99")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], P99_COLOR.filled()));
    let missing = values.iter().enumerate().filter(|(_, p)| p.is_none());
    chart.draw_series(missing.map(|(i, _)| Text::new("n/a", (i as f64 - 0.12, top * 0.05), (FONT_FAMILY, 15))))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_FAMILY, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Registers a TTF as plotters' `sans-serif` once per process.
fn register_font(explicit: Option<&Path>) -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let candidates: Vec<PathBuf> = match explicit {
            Some(path) => vec![path.to_owned()],
            None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
        };
        let path = candidates
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| "no TTF font found (install fonts-dejavu-core or pass --font)".to_owned())?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // plotters keeps fonts for the process lifetime; the one font is leaked on purpose.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a usable TTF", path.display()))?;
        Ok(path)
    });
    match result {
        Ok(_) => Ok(()),
        Err(message) => bail!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use crate::config::{Args, Config, Mode};
    use crate::runner::ModeRun;
    use crate::stats::{Stats, TurnSample};

    #[test]
    fn draws_a_png_when_a_font_is_installed() {
        if !super::FONT_CANDIDATES.iter().any(|p| std::path::Path::new(p).is_file()) {
            eprintln!("no font installed; chart test skipped");
            return;
        }
        let config = Config::try_from(Args::parse_from(["lt", "--seed", "1"])).unwrap();
        let runs: Vec<ModeRun> = [(Mode::Ws, 3), (Mode::HttpChained, 6), (Mode::HttpFull, 9), (Mode::Direct, 2)]
            .into_iter()
            .map(|(mode, ms)| {
                let mut stats = Stats::default();
                for i in 0..100u64 {
                    stats.record_turn(&TurnSample {
                        total: Duration::from_micros(ms * 1000 + i * 50),
                        ttft: Some(Duration::from_micros(ms * 500 + i * 20)),
                        engine: (mode != Mode::HttpFull).then(|| Duration::from_millis(1)),
                        ..TurnSample::default()
                    });
                }
                ModeRun { mode, elapsed: Duration::from_secs(1), stats, cpu: Vec::new(), skipped: None }
            })
            .collect();
        let report = crate::report::build(&config, &runs);
        let path = std::env::temp_dir().join(format!("tether-loadtest-chart-{}.png", std::process::id()));
        super::draw(&report, &path, None).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if std::env::var_os("TETHER_LOADTEST_KEEP_CHART").is_none() {
            std::fs::remove_file(&path).unwrap();
        }
    }
}
