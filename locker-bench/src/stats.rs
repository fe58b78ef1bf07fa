//! Latency samples, percentiles, and what one scenario reports (table row and JSON object).

use std::fmt::Write as _;
use std::time::Duration;

/// Latencies of one side of a scenario.
#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    values: Vec<Duration>,
    sorted: bool,
}

impl Samples {
    pub(crate) fn push(&mut self, value: Duration) {
        self.values.push(value);
        self.sorted = false;
    }

    pub(crate) fn extend(&mut self, other: &Samples) {
        self.values.extend_from_slice(&other.values);
        self.sorted = false;
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.values.sort_unstable();
            self.sorted = true;
        }
    }

    /// The `q` quantile (0 < q <= 1) by nearest rank; `None` without samples.
    pub(crate) fn quantile(&mut self, q: f64) -> Option<Duration> {
        if self.values.is_empty() {
            return None;
        }
        self.sort();
        let n = self.values.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.values[rank - 1])
    }

    pub(crate) fn max(&mut self) -> Option<Duration> {
        self.quantile(1.0)
    }

    /// The sum of all samples: the time spent in the measured operations.
    pub(crate) fn total(&self) -> Duration {
        self.values.iter().sum()
    }

    /// Operations per second if the samples ran back to back.
    pub(crate) fn rate(&self) -> Option<f64> {
        let total = self.total().as_secs_f64();
        (total > 0.0).then(|| self.values.len() as f64 / total)
    }

    /// p50, p99 and (for sequential operations) the rate.
    pub(crate) fn measure(&mut self) -> Measure {
        Measure {
            p50_us: self.quantile(0.50).map(us),
            p99_us: self.quantile(0.99).map(us),
            ops_per_s: self.rate(),
            samples: self.len(),
        }
    }
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The numbers of one side.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Measure {
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) ops_per_s: Option<f64>,
    pub(crate) samples: usize,
}

/// What the ratio compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RatioKind {
    /// ours p50 ÷ baseline p50, lower is better.
    P50,
    /// ours p99 ÷ baseline p99, lower is better.
    P99,
    /// ours ops/s ÷ baseline ops/s, higher is better.
    Throughput,
    /// ours max ÷ baseline (the TTL), lower is better.
    MaxOverTtl,
}

impl RatioKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            RatioKind::P50 => "ours p50 / baseline p50 (lower is better)",
            RatioKind::P99 => "ours p99 / baseline p99 (lower is better)",
            RatioKind::Throughput => "ours ops/s / baseline ops/s (higher is better)",
            RatioKind::MaxOverTtl => "ours max / TTL (lower is better)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            RatioKind::P50 => "p50",
            RatioKind::P99 => "p99",
            RatioKind::Throughput => "thr",
            RatioKind::MaxOverTtl => "max/ttl",
        }
    }
}

/// A JSON value for the scenario-specific extras.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Num(f64),
    Text(String),
    Bool(bool),
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Num(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Num(v as f64)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Num(v as f64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

/// The result of one scenario.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) name: String,
    pub(crate) ours: Measure,
    /// The baseline's description and numbers.
    pub(crate) baseline: Option<(String, Measure)>,
    pub(crate) ratio_kind: Option<RatioKind>,
    pub(crate) ratio: Option<f64>,
    pub(crate) ratio_p50: Option<f64>,
    pub(crate) ratio_p99: Option<f64>,
    pub(crate) target: String,
    pub(crate) met: Option<bool>,
    pub(crate) extra: Vec<(String, Value)>,
    pub(crate) notes: Vec<String>,
    pub(crate) seconds: f64,
}

impl Outcome {
    pub(crate) fn new(name: &str, ours: Measure) -> Self {
        Outcome {
            name: name.to_owned(),
            ours,
            baseline: None,
            ratio_kind: None,
            ratio: None,
            ratio_p50: None,
            ratio_p99: None,
            target: "report".to_owned(),
            met: None,
            extra: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        }
    }

    /// Sets the baseline and computes the ratios; `limit` is the target for the ratio (at most
    /// `limit` for latencies, at least `limit` for throughput).
    pub(crate) fn compare(
        mut self,
        baseline: &str,
        base: Measure,
        kind: RatioKind,
        limit: f64,
    ) -> Self {
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        self.ratio_p50 = div(self.ours.p50_us, base.p50_us);
        self.ratio_p99 = div(self.ours.p99_us, base.p99_us);
        self.ratio = match kind {
            RatioKind::P50 => self.ratio_p50,
            RatioKind::P99 => self.ratio_p99,
            RatioKind::Throughput => div(self.ours.ops_per_s, base.ops_per_s),
            RatioKind::MaxOverTtl => self.ratio_p99,
        };
        self.met = self.ratio.map(|r| match kind {
            RatioKind::Throughput => r >= limit,
            _ => r <= limit,
        });
        self.target = match kind {
            RatioKind::Throughput => format!("{} >= {limit}", kind.short()),
            _ => format!("{} <= {limit}", kind.short()),
        };
        self.ratio_kind = Some(kind);
        self.baseline = Some((baseline.to_owned(), base));
        self
    }

    pub(crate) fn extra(&mut self, key: &str, value: impl Into<Value>) {
        self.extra.push((key.to_owned(), value.into()));
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Adds a further target to `met` (all must hold).
    pub(crate) fn also_require(&mut self, what: &str, holds: bool) {
        self.target = format!("{}; {what}", self.target);
        self.met = Some(self.met.unwrap_or(true) && holds);
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |us| format!("{:.3}", us / 1000.0))
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"))
}

/// The results as a Markdown table (readable as plain text too).
pub(crate) fn table(outcomes: &[Outcome]) -> String {
    let mut rows: Vec<[String; 10]> = vec![[
        "scenario".into(),
        "p50 ms".into(),
        "p99 ms".into(),
        "ops/s".into(),
        "base p50 ms".into(),
        "base p99 ms".into(),
        "base ops/s".into(),
        "ratio".into(),
        "target".into(),
        "met".into(),
    ]];
    for o in outcomes {
        let base = o.baseline.as_ref().map(|(_, m)| *m).unwrap_or_default();
        rows.push([
            o.name.clone(),
            ms(o.ours.p50_us),
            ms(o.ours.p99_us),
            rate(o.ours.ops_per_s),
            ms(base.p50_us),
            ms(base.p99_us),
            rate(base.ops_per_s),
            match (o.ratio, o.ratio_kind) {
                (Some(r), Some(k)) => format!("{r:.2} ({})", k.short()),
                _ => "-".into(),
            },
            o.target.clone(),
            match o.met {
                Some(true) => "yes".into(),
                Some(false) => "**no**".into(),
                None => "-".into(),
            },
        ]);
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        out.push('|');
        for (c, (w, cell)) in widths.iter().zip(row).enumerate() {
            let pad = w - cell.chars().count();
            if c == 0 || c >= 8 {
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            } else {
                let _ = write!(out, " {}{cell} |", " ".repeat(pad));
            }
        }
        out.push('\n');
        if i == 0 {
            out.push('|');
            for (c, w) in widths.iter().enumerate() {
                let dashes = "-".repeat(*w);
                if c == 0 || c >= 8 {
                    let _ = write!(out, "-{dashes}-|");
                } else {
                    let _ = write!(out, "-{dashes}:|");
                }
            }
            out.push('\n');
        }
    }
    out
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        }
        _ => "null".to_owned(),
    }
}

fn json_value(v: &Value) -> String {
    match v {
        Value::Num(n) => json_num(Some(*n)),
        Value::Text(s) => json_string(s),
        Value::Bool(b) => b.to_string(),
    }
}

fn json_measure(m: &Measure) -> String {
    format!(
        "\"p50_us\": {}, \"p99_us\": {}, \"ops_per_s\": {}, \"samples\": {}",
        json_num(m.p50_us),
        json_num(m.p99_us),
        json_num(m.ops_per_s),
        m.samples
    )
}

/// The results as a JSON array, one object per scenario; `run` fields are added to each.
pub(crate) fn json(outcomes: &[Outcome], run: &[(String, Value)]) -> String {
    let mut out = String::from("[\n");
    for (i, o) in outcomes.iter().enumerate() {
        let mut fields = vec![
            format!("\"name\": {}", json_string(&o.name)),
            json_measure(&o.ours),
        ];
        match &o.baseline {
            Some((what, m)) => {
                fields.push(format!(
                    "\"baseline\": {{\"name\": {}, {}}}",
                    json_string(what),
                    json_measure(m)
                ));
                fields.push(format!("\"baseline_p50_us\": {}", json_num(m.p50_us)));
                fields.push(format!("\"baseline_p99_us\": {}", json_num(m.p99_us)));
                fields.push(format!("\"baseline_ops_per_s\": {}", json_num(m.ops_per_s)));
            }
            None => fields.push("\"baseline\": null".to_owned()),
        }
        fields.push(format!("\"ratio\": {}", json_num(o.ratio)));
        fields.push(format!(
            "\"ratio_kind\": {}",
            o.ratio_kind
                .map_or_else(|| "null".to_owned(), |k| json_string(k.describe()))
        ));
        fields.push(format!("\"ratio_p50\": {}", json_num(o.ratio_p50)));
        fields.push(format!("\"ratio_p99\": {}", json_num(o.ratio_p99)));
        fields.push(format!("\"target\": {}", json_string(&o.target)));
        fields.push(format!(
            "\"target_met\": {}",
            o.met.map_or_else(|| "null".to_owned(), |m| m.to_string())
        ));
        fields.push(format!("\"seconds\": {}", json_num(Some(o.seconds))));
        let extra: Vec<String> = o
            .extra
            .iter()
            .map(|(k, v)| format!("{}: {}", json_string(k), json_value(v)))
            .collect();
        fields.push(format!("\"extra\": {{{}}}", extra.join(", ")));
        let notes: Vec<String> = o.notes.iter().map(|n| json_string(n)).collect();
        fields.push(format!("\"notes\": [{}]", notes.join(", ")));
        for (k, v) in run {
            fields.push(format!("{}: {}", json_string(k), json_value(v)));
        }
        out.push_str("  {");
        out.push_str(&fields.join(", "));
        out.push('}');
        if i + 1 < outcomes.len() {
            out.push(',');
        }
        out.push('\n');
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut s = Samples::default();
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        assert_eq!(s.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(s.quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(s.max(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(json_num(Some(2.0)), "2");
        assert_eq!(json_num(None), "null");
    }
}

/// What this process's threads have used so far, from `/proc/self/task/*`: CPU time (scheduler
/// statistics, nanoseconds) and context switches (voluntary and not). Zero where `/proc` cannot
/// be read (the breakdowns then say nothing about CPU).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcStats {
    pub(crate) cpu: Duration,
    pub(crate) switches: u64,
}

impl ProcStats {
    pub(crate) fn now() -> ProcStats {
        let mut stats = ProcStats::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return stats;
        };
        for task in tasks.flatten() {
            let path = task.path();
            if let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                stats.cpu += Duration::from_nanos(ns);
            }
            if let Ok(status) = std::fs::read_to_string(path.join("status")) {
                stats.switches += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        stats
    }

    /// What was used between `earlier` and this snapshot (threads that ended meanwhile are
    /// not counted).
    pub(crate) fn since(self, earlier: ProcStats) -> ProcStats {
        ProcStats {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }

    pub(crate) fn add(&mut self, other: ProcStats) {
        self.cpu += other.cpu;
        self.switches += other.switches;
    }

    /// `cpu 412 us, 16.3 switches` per `ops` operations.
    pub(crate) fn per_op(self, ops: usize) -> String {
        let ops = ops.max(1) as f64;
        format!(
            "cpu {:.0} us, {:.1} switches",
            us(self.cpu) / ops,
            self.switches as f64 / ops
        )
    }
}
