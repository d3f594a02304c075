//! A parser of the Prometheus text exposition format (version 0.0.4), for
//! reading what inference servers report on their `/metrics`.
//!
//! It is a character-level scanner following the format's grammar, one line
//! at a time (the format is line-based: a newline inside a label value must
//! be escaped, so no token spans lines):
//!
//! ```text
//! line      = blanks ( sample | comment | "" )
//! sample    = metric-name blanks [ "{" labels "}" blanks ] value [ blanks timestamp ] blanks
//! labels    = blanks [ label { blanks "," blanks label } [ blanks "," ] blanks ]
//! label     = label-name blanks "=" blanks '"' escaped-text '"'
//! comment   = "#" blanks ( "HELP" blanks metric-name [ blank text ]
//!                        | "TYPE" blanks metric-name blanks type blanks
//!                        | any other text )
//! ```
//!
//! Decisions:
//! - Metric names are `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names
//!   `[a-zA-Z_][a-zA-Z0-9_]*`. Label values are double-quoted; the only
//!   escapes are `\\`, `\"` and `\n` (any other is an error). A label name
//!   may not appear twice in one sample.
//! - Blanks (spaces and tabs) are allowed before a line's first token and
//!   between any two tokens, as Prometheus' own text parser allows. A blank
//!   is required between a bare metric name and its value, and between the
//!   value and the timestamp.
//! - Values are what Go's `strconv.ParseFloat` accepts in decimal, which
//!   Prometheus uses: decimal numbers with an optional sign, fraction and
//!   exponent; `NaN` (any case, no sign); `Inf` or `Infinity` (any case,
//!   optional sign). A decimal too large for an `f64` is an error, as in Go.
//!   Go's hexadecimal floats (`0x1p-2`) are not accepted: no exporter emits
//!   them. NaN is returned as NaN; judging it is the caller's business.
//! - The timestamp is an integer in milliseconds (it may be negative), as in
//!   format 0.0.4. Nothing but blanks may follow it.
//! - `# HELP` and `# TYPE` lines are checked (a valid metric name; for TYPE a
//!   known type: counter, gauge, histogram, summary, untyped, and
//!   OpenMetrics' unknown, info, stateset, gaugehistogram) but not returned;
//!   HELP text is not checked. `# HELP` or `# TYPE` with nothing after it is
//!   a plain comment, as Prometheus treats it. Every other comment is
//!   ignored, which covers OpenMetrics' `# EOF` and `# UNIT`; OpenMetrics'
//!   `_created` samples are ordinary samples. (OpenMetrics exemplars, `# {…}`
//!   after a value, are not accepted: they only appear when OpenMetrics is
//!   asked for.)
//! - Lines end at `\n`; one `\r` before it is dropped, so `\r\n` texts parse.
//! - At most [`MAX_SAMPLES`] samples: a huge scrape must not eat memory.
//! - Errors name the 1-based line, what was expected and what was found.

use std::str::FromStr;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// The value of the label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a text failed to parse: the 1-based line and what was wrong there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Most samples one text may hold; more is an error (a huge scrape must not eat memory).
pub const MAX_SAMPLES: usize = 100_000;

/// The metric types a `# TYPE` line may name.
const TYPES: [&str; 9] = [
    "counter",
    "gauge",
    "histogram",
    "summary",
    "untyped",
    "unknown",
    "info",
    "stateset",
    "gaugehistogram",
];

/// Parses a whole text, returning its samples in order.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    parse_filtered(text, |_| true)
}

/// Like [`parse`], but returns only the samples whose metric name `keep`
/// accepts. Other sample lines are checked up to their metric name and not
/// read further: a scrape of an inference server is mostly histograms the
/// caller does not need, and reading them would be most of the cost.
pub fn parse_filtered(text: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<Sample>, ParseError> {
    parse_page(text, keep).map(|page| page.samples)
}

/// What [`parse_page`] read from a text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Page {
    /// The kept samples, in order.
    pub samples: Vec<Sample>,
    /// The kept metric names a `# HELP` or `# TYPE` line declared, each
    /// once, in order: a family can be declared before it has samples (an
    /// exporter that registered it and has not set it yet).
    pub declared: Vec<String>,
}

/// Like [`parse_filtered`], and also returns the kept names the text
/// declares. A run of sample lines of one skipped name (a histogram's
/// buckets) costs one comparison per line after its first: the name was
/// checked on the first line of the run.
pub fn parse_page(text: &str, keep: impl Fn(&str) -> bool) -> Result<Page, ParseError> {
    let mut page = Page::default();
    // The name of the last sample line that was skipped.
    let mut skipped: &str = "";
    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        let content = raw.strip_suffix('\r').unwrap_or(raw);
        if !skipped.is_empty()
            && content.starts_with(skipped)
            && content
                .as_bytes()
                .get(skipped.len())
                .is_none_or(|b| !is_metric_name_char(char::from(*b)))
        {
            continue;
        }
        let parsed = parse_line(content, &keep).map_err(|message| ParseError { line, message })?;
        match parsed {
            Line::Sample(sample) => {
                if page.samples.len() == MAX_SAMPLES {
                    return Err(ParseError {
                        line,
                        message: format!(
                            "more than {MAX_SAMPLES} samples (the most one text may hold)"
                        ),
                    });
                }
                page.samples.push(sample);
            }
            Line::Skipped(name) => skipped = name,
            Line::Declared(name) => {
                if !page.declared.iter().any(|d| d == name) {
                    page.declared.push(name.to_owned());
                }
            }
            Line::Nothing => {}
        }
    }
    Ok(page)
}

/// What one line is.
enum Line<'a> {
    /// A sample that is kept.
    Sample(Sample),
    /// A sample line of a name that is not kept (read up to its name).
    Skipped(&'a str),
    /// A `# HELP` or `# TYPE` line of a kept name.
    Declared(&'a str),
    /// A blank line or another comment.
    Nothing,
}

/// One line (without its line ending).
fn parse_line<'a>(line: &'a str, keep: &impl Fn(&str) -> bool) -> Result<Line<'a>, String> {
    let mut cur = Cursor::new(line);
    cur.skip_blanks();
    match cur.peek() {
        None => Ok(Line::Nothing),
        Some('#') => {
            cur.bump();
            Ok(match parse_comment(&mut cur)? {
                Some(name) if keep(name) => Line::Declared(name),
                _ => Line::Nothing,
            })
        }
        Some(_) => {
            let mut ahead = Cursor {
                line: cur.line,
                pos: cur.pos,
            };
            let name = ahead.metric_name();
            if !name.is_empty() && !keep(name) {
                return Ok(Line::Skipped(name));
            }
            parse_sample(&mut cur).map(Line::Sample)
        }
    }
}

/// The rest of a comment line, after its `#`: the metric name of a
/// `# HELP` or `# TYPE` line.
fn parse_comment<'a>(cur: &mut Cursor<'a>) -> Result<Option<&'a str>, String> {
    cur.skip_blanks();
    let keyword = cur.take_while(|c| !is_blank(c));
    if keyword != "HELP" && keyword != "TYPE" {
        return Ok(None);
    }
    cur.skip_blanks();
    if cur.at_end() {
        // "# HELP" or "# TYPE" alone: a plain comment, as in Prometheus.
        return Ok(None);
    }
    let name = cur.metric_name();
    if name.is_empty() {
        return Err(format!(
            "expected a metric name after \"# {keyword}\", found {}",
            found(cur.peek())
        ));
    }
    if !cur.at_end() && !cur.skip_blanks() {
        return Err(format!(
            "expected a blank or the end of the line after metric name {name:?} in \"# {keyword}\", found {}",
            found(cur.peek())
        ));
    }
    if keyword == "HELP" {
        // The rest is the help text, free-form.
        return Ok(Some(name));
    }
    let kind = cur.take_while(|c| !is_blank(c));
    if kind.is_empty() {
        return Err(format!(
            "expected a metric type after \"# TYPE {name}\", found {}",
            found(cur.peek())
        ));
    }
    if !TYPES.contains(&kind) {
        return Err(format!(
            "expected a metric type ({}) for {name:?}, found {kind:?}",
            TYPES.join(", ")
        ));
    }
    cur.skip_blanks();
    if !cur.at_end() {
        return Err(format!(
            "expected the end of the line after metric type {kind:?}, found {}",
            found(cur.peek())
        ));
    }
    Ok(Some(name))
}

/// A sample line, from its metric name on.
fn parse_sample(cur: &mut Cursor<'_>) -> Result<Sample, String> {
    let name = cur.metric_name();
    if name.is_empty() {
        return Err(format!(
            "expected a metric name, a comment or a blank line, found {}",
            found(cur.peek())
        ));
    }
    let blank_after_name = cur.skip_blanks();
    let mut labels = Vec::new();
    let before_value = if cur.eat('{') {
        labels = parse_labels(cur, name)?;
        cur.skip_blanks();
        format!("after the labels of {name:?}")
    } else {
        if !blank_after_name && !cur.at_end() {
            return Err(format!(
                "expected a blank or '{{' after metric name {name:?}, found {}",
                found(cur.peek())
            ));
        }
        format!("after metric name {name:?}")
    };

    let token = cur.take_while(|c| !is_blank(c));
    if token.is_empty() {
        // Blanks were skipped, so this is the end of the line.
        return Err(format!(
            "expected a value {before_value}, found the end of the line"
        ));
    }
    let value = match parse_value(token) {
        Ok(value) => value,
        Err(BadValue::Syntax) => {
            return Err(format!(
                "expected a value (a decimal number, NaN, Inf, +Inf or -Inf) {before_value}, found {token:?}"
            ));
        }
        Err(BadValue::Range) => {
            return Err(format!(
                "expected a value {before_value} within the range of a 64-bit float, found {token:?}"
            ));
        }
    };

    cur.skip_blanks();
    let timestamp_ms = if cur.at_end() {
        None
    } else {
        let token = cur.take_while(|c| !is_blank(c));
        let Ok(timestamp) = i64::from_str(token) else {
            return Err(format!(
                "expected an integer timestamp in milliseconds (or the end of the line) after the value of {name:?}, found {token:?}"
            ));
        };
        cur.skip_blanks();
        if !cur.at_end() {
            return Err(format!(
                "expected the end of the line after the timestamp of {name:?}, found {}",
                found(cur.peek())
            ));
        }
        Some(timestamp)
    };

    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
        timestamp_ms,
    })
}

/// A label set, after its `{`, up to and including its `}`.
fn parse_labels(cur: &mut Cursor<'_>, metric: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels: Vec<(String, String)> = Vec::new();
    cur.skip_blanks();
    if cur.eat('}') {
        return Ok(labels);
    }
    loop {
        // Here: at a label name (the first, or one after a ',').
        let name = cur.label_name();
        if name.is_empty() {
            return Err(format!(
                "expected a label name or '}}' in the labels of {metric:?}, found {}",
                found(cur.peek())
            ));
        }
        cur.skip_blanks();
        if !cur.eat('=') {
            return Err(format!(
                "expected '=' after label name {name:?}, found {}",
                found(cur.peek())
            ));
        }
        cur.skip_blanks();
        if !cur.eat('"') {
            return Err(format!(
                "expected '\"' to open the value of label {name:?}, found {}",
                found(cur.peek())
            ));
        }
        let value = parse_label_value(cur, name)?;
        labels.push((name.to_owned(), value));
        cur.skip_blanks();
        let end = match cur.bump() {
            Some('}') => true,
            Some(',') => {
                cur.skip_blanks();
                // A trailing comma is allowed.
                cur.eat('}')
            }
            other => {
                return Err(format!(
                    "expected ',' or '}}' after the value of label {name:?}, found {}",
                    found(other)
                ));
            }
        };
        if end {
            break;
        }
    }
    if let Some(duplicate) = duplicate_label(&labels) {
        return Err(format!(
            "duplicate label name {duplicate:?} in the labels of {metric:?}"
        ));
    }
    Ok(labels)
}

/// A label value, after its opening `"`, up to and including its closing `"`.
fn parse_label_value(cur: &mut Cursor<'_>, label: &str) -> Result<String, String> {
    let mut value = String::new();
    loop {
        match cur.bump() {
            Some('"') => return Ok(value),
            Some('\\') => match cur.bump() {
                Some('\\') => value.push('\\'),
                Some('"') => value.push('"'),
                Some('n') => value.push('\n'),
                other => {
                    return Err(format!(
                        "expected '\\\\', '\"' or 'n' after a backslash in the value of label {label:?}, found {}",
                        found(other)
                    ));
                }
            },
            Some(c) => value.push(c),
            None => {
                return Err(format!(
                    "expected '\"' to close the value of label {label:?}, found the end of the line"
                ));
            }
        }
    }
}

/// A label name that appears more than once, if any. Label sets are small,
/// so a pairwise check is usual; a long one (a hostile line) is sorted
/// instead, so it cannot cost quadratic time.
fn duplicate_label(labels: &[(String, String)]) -> Option<&str> {
    const PAIRWISE_UP_TO: usize = 16;
    if labels.len() <= PAIRWISE_UP_TO {
        labels
            .iter()
            .enumerate()
            .find(|(i, (name, _))| labels[..*i].iter().any(|(earlier, _)| earlier == name))
            .map(|(_, (name, _))| name.as_str())
    } else {
        let mut names: Vec<&str> = labels.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }
}

/// Why a value token is not a value.
#[derive(Debug, PartialEq)]
enum BadValue {
    /// Not in the grammar.
    Syntax,
    /// A decimal number too large for an `f64`.
    Range,
}

/// A value as Go's `strconv.ParseFloat` reads decimal text: `NaN` (any
/// case, no sign), `Inf`/`Infinity` (any case, optional sign), or
/// `[+-]? (digits [. digits?] | . digits) ([eE] [+-]? digits)?`.
fn parse_value(token: &str) -> Result<f64, BadValue> {
    if token.eq_ignore_ascii_case("nan") {
        return Ok(f64::NAN);
    }
    let (negative, unsigned) = match token.as_bytes().first() {
        Some(b'+') => (false, &token[1..]),
        Some(b'-') => (true, &token[1..]),
        _ => (false, token),
    };
    if unsigned.eq_ignore_ascii_case("inf") || unsigned.eq_ignore_ascii_case("infinity") {
        return Ok(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if !is_decimal(unsigned) {
        return Err(BadValue::Syntax);
    }
    // The grammar was checked above; the standard library does the rounding.
    let value = f64::from_str(token).map_err(|_| BadValue::Syntax)?;
    if value.is_infinite() {
        return Err(BadValue::Range);
    }
    Ok(value)
}

/// Whether `s` is `(digits [. digits?] | . digits) ([eE] [+-]? digits)?`.
fn is_decimal(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let mut mantissa_digits = digits(&mut i);
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        mantissa_digits += digits(&mut i);
    }
    if mantissa_digits == 0 {
        return false;
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == bytes.len()
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_metric_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_metric_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn is_label_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_label_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// What was found where something else was expected, for messages.
fn found(c: Option<char>) -> String {
    match c {
        Some(c) => format!("{c:?}"),
        None => "the end of the line".to_owned(),
    }
}

/// A position in one line.
struct Cursor<'a> {
    line: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(line: &'a str) -> Self {
        Cursor { line, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.line[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn at_end(&self) -> bool {
        self.pos == self.line.len()
    }

    /// Consumes `c` if it is next.
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    /// Consumes the characters for which `f` holds, returning them.
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.line[start..self.pos]
    }

    /// Skips spaces and tabs, returning whether there were any.
    fn skip_blanks(&mut self) -> bool {
        let bytes = self.line.as_bytes();
        let begin = self.pos;
        while bytes
            .get(self.pos)
            .is_some_and(|b| *b == b' ' || *b == b'\t')
        {
            self.pos += 1;
        }
        self.pos > begin
    }

    /// A metric name, or "" if none starts here.
    fn metric_name(&mut self) -> &'a str {
        self.name(is_metric_name_start, is_metric_name_char)
    }

    /// A label name, or "" if none starts here.
    fn label_name(&mut self) -> &'a str {
        self.name(is_label_name_start, is_label_name_char)
    }

    fn name(&mut self, start: impl Fn(char) -> bool, rest: impl Fn(char) -> bool) -> &'a str {
        // Name characters are ASCII, so the bytes are tested one by one (no
        // byte of a multi-byte character is ASCII): the names are most of
        // what a filtered parse reads.
        let bytes = self.line.as_bytes();
        let ascii = |i: usize, f: &dyn Fn(char) -> bool| {
            bytes
                .get(i)
                .is_some_and(|b| b.is_ascii() && f(char::from(*b)))
        };
        let begin = self.pos;
        if ascii(begin, &start) {
            let mut end = begin + 1;
            while ascii(end, &rest) {
                end += 1;
            }
            self.pos = end;
        }
        &self.line[begin..self.pos]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Sample {
        let mut samples = parse(text).unwrap();
        assert_eq!(samples.len(), 1, "{samples:?}");
        samples.remove(0)
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn error(text: &str) -> ParseError {
        parse(text).expect_err("should not parse")
    }

    /// Asserts that `text` fails on `line` with a message containing `part`.
    fn fails(text: &str, line: usize, part: &str) {
        let err = error(text);
        assert_eq!(err.line, line, "{err}");
        assert!(err.message.contains(part), "{err} (wanted {part:?})");
    }

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4523
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12345.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.5",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 41.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 41.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 98.25
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 8731.0
"#;

    #[test]
    fn parses_a_vllm_scrape() {
        let samples = parse(VLLM).unwrap();
        assert_eq!(samples.len(), 10);
        let model = "meta-llama/Llama-3.1-8B-Instruct";
        assert_eq!(
            samples[1],
            Sample {
                name: "vllm:num_requests_waiting".into(),
                labels: labels(&[("engine", "0"), ("model_name", model)]),
                value: 7.0,
                timestamp_ms: None,
            }
        );
        assert_eq!(samples[2].value, 0.4523);
        let inf_bucket = &samples[6];
        assert_eq!(inf_bucket.name, "vllm:e2e_request_latency_seconds_bucket");
        assert_eq!(inf_bucket.label("le"), Some("+Inf"));
        assert_eq!(inf_bucket.label("model_name"), Some(model));
        assert_eq!(inf_bucket.value, 41.0);
        assert_eq!(samples[8].value, 98.25);
        assert_eq!(samples[9].label("generation"), Some("0"));
    }

    #[test]
    fn label_finds_a_label_or_none() {
        let s = one(r#"m{a="1",b="2"} 0"#);
        assert_eq!(s.label("a"), Some("1"));
        assert_eq!(s.label("b"), Some("2"));
        assert_eq!(s.label("c"), None);
    }

    #[test]
    fn unescapes_label_values() {
        let s = one(r#"m{path="C:\\dir\\",quote="say \"hi\"",lines="a\nb"} 1"#);
        assert_eq!(
            s.labels,
            labels(&[
                ("path", r"C:\dir\"),
                ("quote", "say \"hi\""),
                ("lines", "a\nb")
            ])
        );
    }

    #[test]
    fn label_values_may_hold_separators_and_any_text() {
        let s = one(r##"m{a="x, y",b="{}",c="k=v}",d=" spaced  out ",e="",f="héllo ☃",g="#"} 2"##);
        assert_eq!(
            s.labels,
            labels(&[
                ("a", "x, y"),
                ("b", "{}"),
                ("c", "k=v}"),
                ("d", " spaced  out "),
                ("e", ""),
                ("f", "héllo ☃"),
                ("g", "#"),
            ])
        );
        assert_eq!(s.value, 2.0);
    }

    #[test]
    fn blanks_are_allowed_between_tokens() {
        let s = one("  m \t{ a = \"1\" ,\tb=\"2\" , } \t 3 \t 17 \t");
        assert_eq!(s.name, "m");
        assert_eq!(s.labels, labels(&[("a", "1"), ("b", "2")]));
        assert_eq!(s.value, 3.0);
        assert_eq!(s.timestamp_ms, Some(17));
        // No blank needed between '}' and the value.
        assert_eq!(one(r#"m{a="1"}4"#).value, 4.0);
    }

    #[test]
    fn trailing_comma_and_empty_label_sets() {
        assert_eq!(one(r#"m{a="1",} 1"#).labels, labels(&[("a", "1")]));
        assert_eq!(one("m{} 1").labels, vec![]);
        assert_eq!(one("m{ } 1").labels, vec![]);
        assert_eq!(one("m 1").labels, vec![]);
    }

    #[test]
    fn names_may_use_their_whole_alphabet() {
        let s = one(r#":a_B9:c{_x="1",Y_2="2"} 1"#);
        assert_eq!(s.name, ":a_B9:c");
        assert_eq!(s.labels, labels(&[("_x", "1"), ("Y_2", "2")]));
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            one("m 1 1712345678901").timestamp_ms,
            Some(1_712_345_678_901)
        );
        assert_eq!(one("m 1 -5").timestamp_ms, Some(-5));
        assert_eq!(one("m 1 +5").timestamp_ms, Some(5));
        assert_eq!(one("m 1 0").timestamp_ms, Some(0));
        assert_eq!(one(r#"m{a="b"} 1 42"#).timestamp_ms, Some(42));
        assert_eq!(one("m 1").timestamp_ms, None);
        assert_eq!(one("m 1   ").timestamp_ms, None);
    }

    #[test]
    fn decimal_values() {
        for (text, want) in [
            ("0", 0.0),
            ("42", 42.0),
            ("-1.5", -1.5),
            ("+2", 2.0),
            (".5", 0.5),
            ("5.", 5.0),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("-2.5e+2", -250.0),
            ("007", 7.0),
            ("1e-400", 0.0),
            ("1.7976931348623157e308", f64::MAX),
        ] {
            assert_eq!(one(&format!("m {text}")).value, want, "{text}");
        }
    }

    #[test]
    fn nan_and_infinities() {
        for text in ["NaN", "nan", "NAN", "nAn"] {
            assert!(one(&format!("m {text}")).value.is_nan(), "{text}");
        }
        for text in ["+Inf", "Inf", "inf", "+inf", "INF", "Infinity", "+infinity"] {
            assert_eq!(one(&format!("m {text}")).value, f64::INFINITY, "{text}");
        }
        for text in ["-Inf", "-inf", "-Infinity"] {
            assert_eq!(one(&format!("m {text}")).value, f64::NEG_INFINITY, "{text}");
        }
    }

    #[test]
    fn values_outside_the_grammar_are_rejected() {
        for text in [
            "+NaN",
            "-nan",
            "in",
            "infinit",
            "Infinityy",
            "1.2.3",
            ".",
            "e5",
            "1e",
            "1e+",
            "--1",
            "+",
            "0x10",
            "0x1p-2",
            "1_000",
            "1,5",
            "one",
            "1f",
        ] {
            fails(&format!("m {text}"), 1, &format!("found {text:?}"));
        }
        fails(
            "m 1e400",
            1,
            "within the range of a 64-bit float, found \"1e400\"",
        );
        fails("m -1e400", 1, "within the range");
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let text = "\n# just a comment\n#\n#HELP m no space after the hash\n   \n\t\n\
                    # HELP m Help with \\n, \\\\ and {weird} \"text\" = 1\n\
                    # HELP m\n# TYPE m gauge\n# TYPE\n# HELP\n# UNIT m seconds\n\
                    # something else entirely\nm 1\n# EOF\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].name, "m");
    }

    #[test]
    fn every_known_type_is_accepted() {
        for kind in TYPES {
            parse(&format!("# TYPE m {kind}\n# TYPE m\t{kind}  \n")).unwrap();
        }
    }

    #[test]
    fn openmetrics_input_is_tolerated() {
        let text = "# TYPE sglang:prompt_tokens counter\n\
                    # UNIT sglang:prompt_tokens tokens\n\
                    # HELP sglang:prompt_tokens Number of prefill tokens processed.\n\
                    sglang:prompt_tokens_total{model_name=\"qwen\"} 10.0\n\
                    sglang:prompt_tokens_created{model_name=\"qwen\"} 1.7123456789e+09\n\
                    # TYPE x info\nx_info{version=\"1\"} 1\n\
                    # TYPE s stateset\n# TYPE g gaugehistogram\n# TYPE u unknown\n\
                    # EOF\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[1].name, "sglang:prompt_tokens_created");
        assert_eq!(samples[1].value, 1.712_345_678_9e9);
    }

    #[test]
    fn crlf_line_endings() {
        let text = "# HELP m A metric.\r\n# TYPE m gauge\r\nm{a=\"1\"} 1 5\r\n\r\nn 2\r\nbad{\r\n";
        let err = error(text);
        assert_eq!(err.line, 6);
        let samples = parse(&text.replace("bad{\r\n", "")).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels, labels(&[("a", "1")]));
        assert_eq!(samples[0].timestamp_ms, Some(5));
        assert_eq!(samples[1].value, 2.0);
        // A '\r' before the end of a label value's line is still the line end.
        fails("m{a=\"1\r\n", 1, "to close the value of label \"a\"");
    }

    #[test]
    fn a_text_without_a_final_newline_parses() {
        assert_eq!(parse("a 1\nb 2").unwrap().len(), 2);
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn error_display_names_line_expectation_and_finding() {
        let err = error("a 1\n# TYPE m gauge\nm{model} 1\n");
        assert_eq!(
            err.to_string(),
            r#"line 3: expected '=' after label name "model", found '}'"#
        );
    }

    #[test]
    fn missing_value() {
        fails(
            "a 1\nm\n",
            2,
            "expected a value after metric name \"m\", found the end of the line",
        );
        fails(
            "m  \n",
            1,
            "expected a value after metric name \"m\", found the end of the line",
        );
        fails(
            "a 1\nb 2\nm{a=\"1\"}\n",
            3,
            "expected a value after the labels of \"m\", found the end of the line",
        );
        fails(
            "m{a=\"1\"}   \n",
            1,
            "expected a value after the labels of \"m\"",
        );
    }

    #[test]
    fn bad_metric_names() {
        fails(
            "1m 1\n",
            1,
            "expected a metric name, a comment or a blank line, found '1'",
        );
        fails(
            "a 1\n{a=\"1\"} 1\n",
            2,
            "expected a metric name, a comment or a blank line, found '{'",
        );
        fails(
            "a 1\nmy-metric 1\n",
            2,
            "expected a blank or '{' after metric name \"my\", found '-'",
        );
        fails("my.metric 1\n", 1, "found '.'");
        fails("mé 1\n", 1, "found 'é'");
    }

    #[test]
    fn bad_label_names() {
        fails(
            "m{1a=\"1\"} 1",
            1,
            "expected a label name or '}' in the labels of \"m\", found '1'",
        );
        fails(
            "m{a=\"1\",,b=\"2\"} 1",
            1,
            "expected a label name or '}' in the labels of \"m\", found ','",
        );
        fails(
            "m{a:b=\"1\"} 1",
            1,
            "expected '=' after label name \"a\", found ':'",
        );
        fails(
            "m{a-b=\"1\"} 1",
            1,
            "expected '=' after label name \"a\", found '-'",
        );
        fails("m{=\"1\"} 1", 1, "found '='");
        fails(
            "m{a} 1",
            1,
            "expected '=' after label name \"a\", found '}'",
        );
        fails(
            "m{a",
            1,
            "expected '=' after label name \"a\", found the end of the line",
        );
    }

    #[test]
    fn bad_label_values() {
        fails(
            "m{a=1} 1",
            1,
            "expected '\"' to open the value of label \"a\", found '1'",
        );
        fails(
            "m{a=} 1",
            1,
            "expected '\"' to open the value of label \"a\", found '}'",
        );
        fails(
            "a 1\nb 1\nc 1\nm{a=\"1} 1\n",
            4,
            "expected '\"' to close the value of label \"a\", found the end of the line",
        );
        fails(
            "m{a=\"1\\",
            1,
            "after a backslash in the value of label \"a\", found the end of the line",
        );
        fails(
            "m{a=\"1\"b=\"2\"} 1",
            1,
            "expected ',' or '}' after the value of label \"a\", found 'b'",
        );
        fails(
            "m{a=\"1\"",
            1,
            "expected ',' or '}' after the value of label \"a\", found the end of the line",
        );
        fails(
            "m{a=\"1\",",
            1,
            "expected a label name or '}' in the labels of \"m\", found the end of the line",
        );
    }

    #[test]
    fn bad_escapes() {
        for (escape, shown) in [
            ("\\t", "'t'"),
            ("\\'", "'\\''"),
            ("\\x41", "'x'"),
            ("\\ ", "' '"),
        ] {
            fails(
                &format!("a 1\nm{{a=\"x{escape}y\"}} 1\n"),
                2,
                &format!(
                    "expected '\\\\', '\"' or 'n' after a backslash in the value of label \"a\", found {shown}"
                ),
            );
        }
    }

    #[test]
    fn duplicate_labels() {
        fails(
            "a 1\nm{a=\"1\",b=\"2\",a=\"3\"} 1\n",
            2,
            "duplicate label name \"a\" in the labels of \"m\"",
        );
        // A long label set takes the sorting path.
        let mut long: Vec<String> = (0..40).map(|i| format!("l{i}=\"{i}\"")).collect();
        long.push("l7=\"again\"".into());
        fails(
            &format!("m{{{}}} 1", long.join(",")),
            1,
            "duplicate label name \"l7\"",
        );
        long.pop();
        assert_eq!(one(&format!("m{{{}}} 1", long.join(","))).labels.len(), 40);
    }

    #[test]
    fn junk_after_the_value_or_timestamp() {
        fails(
            "a 1\nb 2\nm 1 2 3\n",
            3,
            "expected the end of the line after the timestamp of \"m\", found '3'",
        );
        fails(
            "m 1 2x",
            1,
            "expected an integer timestamp in milliseconds (or the end of the line) after the value of \"m\", found \"2x\"",
        );
        fails("m 1 1.5", 1, "found \"1.5\"");
        fails("m 1 # {trace_id=\"a\"} 1", 1, "found \"#\"");
        fails(
            "m 1 99999999999999999999",
            1,
            "found \"99999999999999999999\"",
        );
        fails("m{a=\"1\"} 1 2 }", 1, "found '}'");
    }

    #[test]
    fn bad_help_and_type_lines() {
        fails(
            "a 1\n# TYPE m bogus\n",
            2,
            "expected a metric type (counter, gauge, histogram, summary, untyped, unknown, info, stateset, gaugehistogram) for \"m\", found \"bogus\"",
        );
        fails("# TYPE m Counter\n", 1, "found \"Counter\"");
        fails(
            "a 1\nb 1\n# TYPE m\n",
            3,
            "expected a metric type after \"# TYPE m\", found the end of the line",
        );
        fails(
            "# TYPE m   \n",
            1,
            "expected a metric type after \"# TYPE m\", found the end of the line",
        );
        fails(
            "# TYPE m gauge extra\n",
            1,
            "expected the end of the line after metric type \"gauge\", found 'e'",
        );
        fails(
            "# TYPE 1m gauge\n",
            1,
            "expected a metric name after \"# TYPE\", found '1'",
        );
        fails(
            "# TYPE m-x gauge\n",
            1,
            "expected a blank or the end of the line after metric name \"m\" in \"# TYPE\", found '-'",
        );
        fails(
            "a 1\n# HELP {x} help\n",
            2,
            "expected a metric name after \"# HELP\", found '{'",
        );
        fails("# HELP m.x help\n", 1, "found '.'");
    }

    #[test]
    fn filtered_parsing_reads_only_the_kept_families() {
        let text = "a 1\nb{x=\"1\"} 2\nb_junk{{{ not read\na{y=\"2\"} 3\n";
        let s = parse_filtered(text, |n| n == "a").unwrap();
        assert_eq!(s.iter().map(|s| s.value).collect::<Vec<_>>(), [1.0, 3.0]);
        assert!(
            parse(text).is_err(),
            "unfiltered, the junk line is an error"
        );
        assert!(
            parse_filtered("a 1\n!bad 2\n", |n| n == "a").is_err(),
            "a line without a metric name is still an error"
        );
        let e = parse_filtered("a{y=} 1\n", |n| n == "a").unwrap_err();
        assert_eq!(e.line, 1, "kept lines are read in full");
    }

    #[test]
    fn a_page_names_the_kept_families_it_declares() {
        let text =
            "# HELP a An a.\n# TYPE a gauge\n# TYPE b counter\n# HELP c\n# TYPE d gauge\nd 1\n";
        let page = parse_page(text, |n| n == "a" || n == "d").unwrap();
        assert_eq!(page.declared, ["a", "d"], "each once, kept names only");
        assert_eq!(page.samples.len(), 1);
    }

    #[test]
    fn runs_of_a_skipped_name_are_skipped_and_a_longer_name_is_not_mistaken_for_it() {
        // `hx` starts with the skipped `h` but is another name: it is kept;
        // `h{{{` is a skipped name's line and is not read further.
        let text = "h_bucket{le=\"1\"} 1\nh_bucket{{{\nh_bucket\nh_bucketx 2\nh_bucket 3\n!h 4\n";
        let keep = |n: &str| n == "h_bucketx";
        let e = parse_filtered(text, keep).unwrap_err();
        assert_eq!(e.line, 6, "a line without a metric name is an error: {e}");
        let text = &text[..text.find("!h").unwrap()];
        let s = parse_filtered(text, keep).unwrap();
        assert_eq!(s.iter().map(|s| s.value).collect::<Vec<_>>(), [2.0]);
    }

    #[test]
    fn at_most_max_samples() {
        let full = "m 1\n".repeat(MAX_SAMPLES);
        assert_eq!(parse(&full).unwrap().len(), MAX_SAMPLES);
        // Comments and blank lines do not count.
        let with_comments = format!("# HELP m x\n\n{full}# EOF\n\n");
        assert_eq!(parse(&with_comments).unwrap().len(), MAX_SAMPLES);

        let over = format!("{full}m 1\n");
        let err = error(&over);
        assert_eq!(err.line, MAX_SAMPLES + 1);
        assert_eq!(
            err.message,
            "more than 100000 samples (the most one text may hold)"
        );
    }
}
