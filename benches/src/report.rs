//! Reports: the human table on stdout, JSON lines, and the suite's
//! Markdown report with PNG charts (plotters).

use std::{fmt::Write as _, io::Write as _, path::Path};

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

use crate::{baseline::Baseline, failover::FailoverReport, workloads::RunReport};

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub rustc: String,
    pub shuffle_version: &'static str,
}

impl Machine {
    pub fn detect() -> Self {
        let memory_kb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_string());
        let rustc = std::process::Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map_or_else(|| "unknown".into(), |v| v.trim().to_string());
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: memory_kb * 1024,
            kernel,
            rustc,
            shuffle_version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// The limit a workload's throughput is compared with, and its name: the
/// transport it ran over (the Unix socket, or QUIC's aggregate over
/// several connections), and for W5 the disk as well.
pub fn relevant_limit(report: &RunReport, baseline: &Baseline) -> (f64, &'static str) {
    let (transport, name) = match report.transport {
        "unix" => (baseline.unix_socket_mb_per_s, "Unix socket"),
        _ => (baseline.quic_aggregate_mb_per_s, "QUIC, 4 connections"),
    };
    match report.workload {
        "spill" if baseline.disk_write_fsync_mb_per_s < transport => (baseline.disk_write_fsync_mb_per_s, "disk write"),
        _ => (transport, name),
    }
}

/// The table of runs, with fractions of the baseline when one was measured.
pub fn table(reports: &[RunReport], baseline: Option<&Baseline>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | via | mode | N | M | R | median s | min s | max s | MB/s | peak RSS MiB (anon) | verified | server |{}",
        if baseline.is_some() { " of limit |" } else { "" }
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |{}",
        if baseline.is_some() { " ---: |" } else { "" }
    );
    for r in reports {
        let min = r.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.seconds.iter().copied().fold(0.0, f64::max);
        let _ = write!(
            out,
            "| {} | {:?} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} ({}) | {} | {} |",
            r.workload,
            r.via,
            r.mode,
            r.records,
            r.maps,
            r.partitions,
            r.median_seconds,
            min,
            max,
            r.mb_per_s,
            r.client_peak_rss_bytes >> 20,
            r.peak_anon_rss_bytes >> 20,
            if r.verified { "yes" } else { "NO" },
            r.server
        );
        if let Some(b) = baseline {
            let (limit, _) = relevant_limit(r, b);
            let _ = write!(out, " {:.0}% |", 100.0 * r.mb_per_s / limit);
        }
        out.push('\n');
        if r.workload == "stream" {
            let get = |k: &str| r.extra.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
            let search = if searched(r) {
                format!(
                    "max rate with p99 < 100 ms: {:.0} records/s (probes {:.0} s after {:.0} s warm-up)",
                    get("max_rate"),
                    get("probe_seconds"),
                    get("probe_warmup_seconds")
                )
            } else {
                "a rate given, no search".to_string()
            };
            let _ = writeln!(
                out,
                "|   W4 | {search}; map tasks push at least every {} ms; at {:.0} records/s ({:.0} s after {:.0} s): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms | | | | | | | | | | | |{}",
                get("linger_ms"),
                get("rate"),
                get("measured_seconds"),
                get("warmup_seconds"),
                get("p50_ms"),
                get("p99_ms"),
                get("p999_ms"),
                if baseline.is_some() { " |" } else { "" }
            );
        }
    }
    out
}

/// The baselines as a table.
pub fn baseline_table(b: &Baseline) -> String {
    format!(
        "| baseline | MB/s |\n| --- | ---: |\n| memcpy | {:.0} |\n| disk write + fsync | {:.0} |\n| disk read | {:.0} |\n\
         | QUIC, one stream, loopback (service settings) | {:.0} |\n| QUIC, {} connections, aggregate | {:.0} |\n\
         | Unix socket, one stream | {:.0} |\n| W1's own work, no exchange (generate, partition, tally; all cores) | {:.0} |\n",
        b.memcpy_mb_per_s,
        b.disk_write_fsync_mb_per_s,
        b.disk_read_mb_per_s,
        b.quinn_stream_mb_per_s,
        crate::baseline::QUIC_CONNECTIONS,
        b.quic_aggregate_mb_per_s,
        b.unix_socket_mb_per_s,
        b.w1_compute_mb_per_s
    )
}

/// Appends one JSON object per report to `path`.
pub fn append_json<T: Serialize>(path: &Path, reports: &[T]) -> anyhow::Result<()> {
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| path.display().to_string())?;
    for r in reports {
        writeln!(file, "{}", serde_json::to_string(r)?)?;
    }
    Ok(())
}

/// W6's table: per mode and replication, the medians without and with the
/// fault, the time from the kill to the first read from a surviving copy,
/// and what each faulted run killed and saw.
pub fn failover_table(reports: &[FailoverReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | mode | replication | N | M | R | runs | without fault s (median) | with fault s (median) | with/without | kill → first block a reader of the killed copy read from the surviving copy, ms (median) | faulted runs | verified |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |");
    let ms = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1}"));
    for r in reports {
        let runs: Vec<String> = r
            .faulted
            .iter()
            .map(|f| {
                let mut d = format!(
                    "{} killed at {:.2} s (moment {:.2}): {:.2} s",
                    f.victim, f.killed_after_seconds, f.moment, f.seconds
                );
                if r.replication >= 2 {
                    let _ = write!(
                        d,
                        ", {} readers moved to the surviving copy (first block there +{} ms, slowest +{} ms), first block of its partitions from another copy +{} ms",
                        f.readers_failed_over,
                        ms(f.first_failover_ms),
                        ms(f.slowest_failover_ms),
                        ms(f.kill_to_surviving_read_ms)
                    );
                } else {
                    let _ = write!(
                        d,
                        ", partitions {:?} lost (first +{} ms), maps {:?} named and re-run",
                        f.lost_partitions,
                        ms(f.kill_to_partition_lost_ms),
                        f.rerun_maps
                    );
                }
                if let Some(failure) = &f.failure {
                    let _ = write!(d, ", NOT VERIFIED: {failure}");
                }
                d
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2}× | {} | {} | {} |",
            r.workload,
            r.mode,
            r.replication,
            r.records,
            r.maps,
            r.partitions,
            r.clean_seconds.len(),
            r.clean_median_seconds,
            r.faulted_median_seconds,
            r.faulted_median_seconds / r.clean_median_seconds,
            ms(r.median_first_failover_ms),
            runs.join("; "),
            if r.verified { "yes" } else { "NO" }
        );
    }
    if let Some(r) = reports.first() {
        let _ = writeln!(out, "\ncluster: {}; fault seed {}", r.cluster, r.fault_seed);
    }
    out
}

/// Where plotters finds a font to draw text with: the first DejaVu or
/// Liberation sans font on the system.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let path =
        FONT_CANDIDATES.iter().find(|p| Path::new(p).exists()).context("no TrueType font found for chart labels")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path}: not a usable font"))?;
    Ok(())
}

/// Bars of MB/s per workload, via and mode.
fn throughput_chart(path: &Path, reports: &[RunReport]) -> anyhow::Result<()> {
    let bars: Vec<(String, f64)> = reports
        .iter()
        .filter(|r| r.workload != "stream")
        .map(|r| (format!("{} {:?} {}", r.workload, r.via, r.mode), r.mb_per_s))
        .collect();
    let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput by workload and mode (MB/s of input, median)", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..bars.len().max(1) as f64, 0f64..top)?;
    chart.configure_mesh().disable_x_mesh().disable_x_axis().y_desc("MB/s").label_style(("sans-serif", 16)).draw()?;
    for (i, (label, value)) in bars.iter().enumerate() {
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.1, 0.0), (x + 0.9, *value)],
            BLUE.mix(0.6).filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{value:.0}"),
            (x + 0.3, *value + top * 0.02),
            ("sans-serif", 15),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (x + 0.2, top * 0.03),
            ("sans-serif", 14).into_font().transform(FontTransform::Rotate270).color(&WHITE),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// W4 latency percentiles of every probe against its rate.
fn latency_chart(path: &Path, report: &RunReport) -> anyhow::Result<()> {
    let probes: Vec<crate::workloads::StreamProbe> = report
        .extra
        .get("probes")
        .map(|p| serde_json::from_value::<Vec<serde_json::Value>>(p.clone()))
        .transpose()?
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| {
            Some(crate::workloads::StreamProbe {
                rate: v.get("rate")?.as_f64()?,
                achieved_rate: v.get("achieved_rate")?.as_f64()?,
                p50_ms: v.get("p50_ms")?.as_f64()?,
                p99_ms: v.get("p99_ms")?.as_f64()?,
                p999_ms: v.get("p999_ms")?.as_f64()?,
                records: v.get("records")?.as_u64()?,
                verified: v.get("verified")?.as_bool()?,
            })
        })
        .collect();
    let mut probes = probes;
    probes.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let max_rate = probes.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.05;
    let max_ms = probes.iter().map(|p| p.p999_ms).fold(1.0, f64::max).max(100.0) * 1.2;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("W4 stream: end-to-end latency vs rate", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_rate, (0.1f64..max_ms).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("records/s")
        .y_desc("latency, ms (log)")
        .x_label_formatter(&|x| format!("{:.1}M", x / 1e6))
        .label_style(("sans-serif", 16))
        .draw()?;
    for (name, color, pick) in [
        ("p50", GREEN, (|p: &crate::workloads::StreamProbe| p.p50_ms) as fn(&crate::workloads::StreamProbe) -> f64),
        ("p99", BLUE, |p| p.p99_ms),
        ("p99.9", RED, |p| p.p999_ms),
    ] {
        let points: Vec<(f64, f64)> = probes.iter().map(|p| (p.rate, pick(p).max(0.1))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .draw_series(LineSeries::new(vec![(0.0, 100.0), (max_rate, 100.0)], BLACK.mix(0.4)))?
        .label("100 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `dir/report.md` and its charts.
pub fn write_report(
    dir: &Path,
    reports: &[RunReport],
    baseline: Option<&Baseline>,
    peers: &[PeerRun],
    peers_from: Option<&Path>,
    machine: &Machine,
    command: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let mut md = String::new();
    let _ = writeln!(md, "# shuffle-bench report\n");
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(
        md,
        "Machine: {} cores, {:.1} GiB memory, Linux {}, {}, shuffle {}.\n",
        machine.cores,
        machine.memory_bytes as f64 / (1u64 << 30) as f64,
        machine.kernel,
        machine.rustc,
        machine.shuffle_version
    );
    let _ = writeln!(
        md,
        "Each figure is the median of the runs listed; every run is checked as WORKLOADS.md asks (the `verified` column says whether all of them passed). MB/s is input bytes (W1/W3/W5: 100 per record; W2/W4: 16) per second. \"of limit\" compares with the transport the run crossed: the Unix socket (embedded server) or QUIC over 4 connections.\n"
    );
    md.push_str(&table(reports, baseline));
    if let Some(b) = baseline {
        let _ = writeln!(
            md,
            "\nBaselines measured in the same run (\"of limit\": against the transport each run crossed, W5 also against the disk write):\n"
        );
        md.push_str(&baseline_table(b));
    }
    if !peers.is_empty() {
        let _ = writeln!(md, "\n## Against Spark and Flink\n");
        let when = match peers_from {
            None => "in the same session".to_string(),
            Some(path) => format!(
                "in an earlier session, not this one: run {} read from `{}`",
                peers.first().map_or("?", |p| p.label.as_str()),
                path.display()
            ),
        };
        let _ = writeln!(
            md,
            "The peers ran the same workloads on this machine {when} (`benches/peers`, warm JVMs, median of their \
             runs); \"÷ best peer\" is our median over the best peer's.\n"
        );
        md.push_str(&comparison_table(reports, peers));
        md.push('\n');
        md.push_str(&peers_table(peers));
    }
    let charts = register_font().and_then(|()| {
        throughput_chart(&dir.join("throughput.png"), reports)?;
        if let Some(stream) = reports.iter().find(|r| r.workload == "stream") {
            latency_chart(&dir.join("stream_latency.png"), stream)?;
        }
        Ok(())
    });
    match charts {
        Ok(()) => {
            let _ = writeln!(md, "\n![throughput](throughput.png)\n");
            if reports.iter().any(|r| r.workload == "stream") {
                let _ = writeln!(md, "![W4 latency](stream_latency.png)\n");
            }
        }
        Err(e) => {
            let _ = writeln!(md, "\nCharts were not drawn: {e:#}\n");
        }
    }
    std::fs::write(dir.join("report.md"), md).with_context(|| dir.join("report.md").display().to_string())?;
    Ok(())
}

/// One peer figure (a line of `benches/peers/run.sh`'s JSON output).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct PeerRun {
    pub system: String,
    pub workload: String,
    pub mode: String,
    #[serde(default)]
    pub median_seconds: f64,
    pub verified: bool,
    #[serde(default)]
    pub label: String,
    pub max_rate: Option<f64>,
    pub rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
}

/// The peer figures of the latest run recorded in `path` (its lines share a label).
pub fn load_peers(path: &Path) -> anyhow::Result<Vec<PeerRun>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let all: Vec<PeerRun> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display())))
        .collect::<anyhow::Result<_>>()?;
    let latest = all.last().map(|p| p.label.clone()).unwrap_or_default();
    Ok(all.into_iter().filter(|p| p.label == latest && p.verified).collect())
}

/// Each of our W1–W3 figures beside the best peer's for the same workload,
/// and W4 beside Flink's streaming runs.
pub fn comparison_table(reports: &[RunReport], peers: &[PeerRun]) -> String {
    let mut out = String::from(
        "| workload | ours | median s | best peer | its median s | ours ÷ best peer |\n| --- | --- | ---: | --- | ---: | ---: |\n",
    );
    for r in reports.iter().filter(|r| matches!(r.workload, "exchange" | "groupby" | "sort")) {
        let best = peers
            .iter()
            .filter(|p| p.workload == r.workload && p.median_seconds > 0.0)
            .min_by(|a, b| a.median_seconds.total_cmp(&b.median_seconds));
        let Some(best) = best else { continue };
        let _ = writeln!(
            out,
            "| {} | {:?}, {} ({}) | {:.2} | {} {} | {:.2} | {:.2} |",
            r.workload,
            r.via,
            r.mode,
            r.transport,
            r.median_seconds,
            best.system,
            best.mode,
            best.median_seconds,
            r.median_seconds / best.median_seconds
        );
    }
    if let Some(ours) = reports.iter().find(|r| r.workload == "stream" && searched(r)) {
        let get = |k: &str| ours.extra.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
        for p in peers.iter().filter(|p| p.workload == "stream") {
            let _ = writeln!(
                out,
                "| stream: max rate with p99 < 100 ms | engine, streaming | {:.0}/s | {} {} | {:.0}/s | {:.2} |",
                get("max_rate"),
                p.system,
                p.mode,
                p.max_rate.unwrap_or(f64::NAN),
                get("max_rate") / p.max_rate.unwrap_or(f64::NAN)
            );
            let _ = writeln!(
                out,
                "| stream: p99 at half the max rate | engine, streaming | {:.2} ms | {} {} | {:.2} ms | {:.2} |",
                get("p99_ms"),
                p.system,
                p.mode,
                p.p99_ms.unwrap_or(f64::NAN),
                get("p99_ms") / p.p99_ms.unwrap_or(f64::NAN)
            );
        }
    }
    out
}

/// Whether a W4 run searched for its maximum rate (rather than running at a rate it was given).
fn searched(r: &RunReport) -> bool {
    r.extra.get("searched").and_then(serde_json::Value::as_bool).unwrap_or(true)
}

/// Every peer figure.
pub fn peers_table(peers: &[PeerRun]) -> String {
    let mut out = String::from(
        "| peer | mode | workload | median s | W4 max rate | W4 p50 / p99 / p99.9 ms at half |\n| --- | --- | --- | ---: | ---: | --- |\n",
    );
    for p in peers {
        let w4 = match (p.max_rate, p.p50_ms, p.p99_ms, p.p999_ms) {
            (Some(max), Some(p50), Some(p99), Some(p999)) => {
                (format!("{max:.0}/s"), format!("{p50:.2} / {p99:.2} / {p999:.2}"))
            }
            _ => (String::new(), String::new()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {} | {} |",
            p.system, p.mode, p.workload, p.median_seconds, w4.0, w4.1
        );
    }
    out
}
