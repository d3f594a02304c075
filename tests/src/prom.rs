//! Reading the Prometheus text format in tests (independent of the
//! exporter's code), and `promtool`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of `text`; panics on a line that is not a sample, a comment
/// or empty (the exporter must not write such lines).
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_line(l).unwrap_or_else(|| panic!("not a sample line: {l:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, BTreeMap::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` (no braces).
fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(key.to_string(), value);
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    Some(out)
}

/// The value of the sample `name` with exactly `labels` (in any order).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// The families `text` declares (`# TYPE` lines).
pub fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Runs `promtool` (Debian's `prometheus` package; `cargo xtask setup`
/// installs it) with `args`, `stdin` on its standard input; fails with its
/// output unless it exits 0.
pub fn promtool(args: &[&str], stdin: &str) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (package prometheus; cargo xtask setup installs it)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {} failed:\n{text}", args.join(" "));
    }
    Ok(text)
}

/// `promtool check metrics` on `text`.
pub fn check_metrics(text: &str) -> Result<String> {
    promtool(&["check", "metrics"], text)
}

/// `promtool check config` on the file `path`.
pub fn check_config(path: &Path) -> Result<String> {
    promtool(&["check", "config", &path.display().to_string()], "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_in_any_order_and_escapes() {
        let text = "# HELP x y\n# TYPE x counter\nx{b=\"1\",a=\"q\\\"z\"} 5\nplain 2.5\n";
        assert_eq!(value(text, "x", &[("a", "q\"z"), ("b", "1")]), Some(5.0));
        assert_eq!(value(text, "plain", &[]), Some(2.5));
        assert_eq!(value(text, "x", &[("a", "q\"z")]), None);
        assert_eq!(families(text), BTreeSet::from(["x".to_string()]));
    }
}
