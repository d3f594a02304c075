//! An inference server's load, read from a parsed scrape of its `/metrics`
//! (see [`crate::steering::promtext`]): how many requests wait (its queue), how many
//! run, and how full its KV cache is.
//!
//! Four servers are known, each by its metric families:
//! - vLLM: queue `vllm:num_requests_waiting`, running
//!   `vllm:num_requests_running`, KV `vllm:kv_cache_usage_perc` (a fraction
//!   0..=1 despite its name), or, when a server lacks that family, the older
//!   `vllm:gpu_cache_usage_perc`.
//! - SGLang: queue `sglang:num_queue_reqs`, running `sglang:num_running_reqs`,
//!   KV `sglang:token_usage` (a fraction).
//! - Triton: queue `nv_inference_pending_request_count` plus, for
//!   TensorRT-LLM, `nv_trt_llm_request_metrics{request_type="waiting"}`;
//!   running `nv_trt_llm_request_metrics{request_type="active"}`; KV
//!   `nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}`, or
//!   else the blocks `used` over the blocks `max` (a `used` and a `max`
//!   sample are paired by their other labels; a pair whose `max` is 0 gives
//!   nothing).
//! - TGI: queue `tgi_queue_size`, running `tgi_batch_current_size`; TGI
//!   reports no KV-cache use.
//!
//! Decisions:
//! - The engine is the first, in the order vLLM, SGLang, Triton, TGI, whose
//!   queue family has a sample (for Triton, either queue family). A scrape
//!   with none is [`ExtractError::Unknown`].
//! - One server may report a family under several label sets (engines,
//!   models, GPUs). Counts (queue, running) are summed across them. The KV
//!   cache is the maximum across them, not the sum or the mean: a node is as
//!   full as its fullest cache, since that cache is where a request to it
//!   may have to wait.
//! - A bad report must never change weights, so a report is taken whole or
//!   not at all: any value used that is NaN, infinite or negative, a sum
//!   that overflows to infinity, or a KV fraction above 1 rejects it with
//!   [`ExtractError::Invalid`]. Samples that are not used (other families,
//!   other label values such as `request_type="max"`, or the vLLM fallback
//!   family when the preferred one is present) are ignored whatever their
//!   values. In `Invalid`, `family` is the metric name, followed by the
//!   label that selects the samples where there is one (for example
//!   `nv_trt_llm_request_metrics{request_type="waiting"}`).
//! - A family absent from the scrape gives `None` for running and KV (the
//!   node does not report it), never 0.

use std::fmt;

use crate::steering::promtext::Sample;

/// The inference servers whose metrics are understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Vllm,
    Sglang,
    Triton,
    Tgi,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Triton => "triton",
            Engine::Tgi => "tgi",
        })
    }
}

/// What a node reports: requests waiting (queue), requests running, KV-cache use (0..=1), if it reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineLoad {
    pub engine: Engine,
    pub queue: f64,
    pub running: Option<f64>,
    pub kv: Option<f64>,
}

/// Why a scrape gives no load.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error("no known inference-server metric families (vLLM, SGLang, Triton, TGI)")]
    Unknown,
    #[error("{family}: {value} is not a valid value ({why})")]
    Invalid {
        family: String,
        value: f64,
        why: &'static str,
    },
}

const VLLM_WAITING: Family = Family::all("vllm:num_requests_waiting");
const VLLM_RUNNING: Family = Family::all("vllm:num_requests_running");
const VLLM_KV: Family = Family::all("vllm:kv_cache_usage_perc");
const VLLM_KV_OLD: Family = Family::all("vllm:gpu_cache_usage_perc");

const SGLANG_QUEUE: Family = Family::all("sglang:num_queue_reqs");
const SGLANG_RUNNING: Family = Family::all("sglang:num_running_reqs");
const SGLANG_KV: Family = Family::all("sglang:token_usage");

const TRITON_PENDING: Family = Family::all("nv_inference_pending_request_count");
const TRT_REQUESTS: &str = "nv_trt_llm_request_metrics";
const TRT_WAITING: Family = Family::with(TRT_REQUESTS, "request_type", "waiting");
const TRT_ACTIVE: Family = Family::with(TRT_REQUESTS, "request_type", "active");
const TRT_BLOCKS: &str = "nv_trt_llm_kv_cache_block_metrics";
const TRT_BLOCK_TYPE: &str = "kv_cache_block_type";
const TRT_KV_FRACTION: Family = Family::with(TRT_BLOCKS, TRT_BLOCK_TYPE, "fraction");
const TRT_KV_USED: Family = Family::with(TRT_BLOCKS, TRT_BLOCK_TYPE, "used");
const TRT_KV_MAX: Family = Family::with(TRT_BLOCKS, TRT_BLOCK_TYPE, "max");

const TGI_QUEUE: Family = Family::all("tgi_queue_size");
const TGI_RUNNING: Family = Family::all("tgi_batch_current_size");

/// Whether [`extract`] reads samples of metric `name` (for
/// [`crate::steering::promtext::parse_filtered`]).
pub fn wanted(name: &str) -> bool {
    [
        VLLM_WAITING.name,
        VLLM_RUNNING.name,
        VLLM_KV.name,
        VLLM_KV_OLD.name,
        SGLANG_QUEUE.name,
        SGLANG_RUNNING.name,
        SGLANG_KV.name,
        TRITON_PENDING.name,
        TRT_REQUESTS,
        TRT_BLOCKS,
        TGI_QUEUE.name,
        TGI_RUNNING.name,
    ]
    .contains(&name)
}

/// The load an inference server reports in one scrape.
pub fn extract(samples: &[Sample]) -> Result<EngineLoad, ExtractError> {
    if VLLM_WAITING.present(samples) {
        let kv = match VLLM_KV.max_fraction(samples)? {
            Some(kv) => Some(kv),
            // Only looked at (and so only validated) when the other is absent.
            None => VLLM_KV_OLD.max_fraction(samples)?,
        };
        Ok(EngineLoad {
            engine: Engine::Vllm,
            queue: VLLM_WAITING.sum(samples)?.unwrap_or(0.0),
            running: VLLM_RUNNING.sum(samples)?,
            kv,
        })
    } else if SGLANG_QUEUE.present(samples) {
        Ok(EngineLoad {
            engine: Engine::Sglang,
            queue: SGLANG_QUEUE.sum(samples)?.unwrap_or(0.0),
            running: SGLANG_RUNNING.sum(samples)?,
            kv: SGLANG_KV.max_fraction(samples)?,
        })
    } else if TRITON_PENDING.present(samples) || TRT_WAITING.present(samples) {
        let pending = TRITON_PENDING.sum(samples)?.unwrap_or(0.0);
        let waiting = TRT_WAITING.sum(samples)?.unwrap_or(0.0);
        let queue = pending + waiting;
        if queue.is_infinite() {
            return Err(ExtractError::Invalid {
                family: format!("{} + {}", TRITON_PENDING.describe(), TRT_WAITING.describe()),
                value: queue,
                why: "infinite",
            });
        }
        Ok(EngineLoad {
            engine: Engine::Triton,
            queue,
            running: TRT_ACTIVE.sum(samples)?,
            kv: triton_kv(samples)?,
        })
    } else if TGI_QUEUE.present(samples) {
        Ok(EngineLoad {
            engine: Engine::Tgi,
            queue: TGI_QUEUE.sum(samples)?.unwrap_or(0.0),
            running: TGI_RUNNING.sum(samples)?,
            kv: None,
        })
    } else {
        Err(ExtractError::Unknown)
    }
}

/// Triton's (TensorRT-LLM's) KV-cache use: the largest `fraction`, or else
/// the largest `used / max` of a `used` and a `max` sample with the same
/// other labels.
fn triton_kv(samples: &[Sample]) -> Result<Option<f64>, ExtractError> {
    if let Some(kv) = TRT_KV_FRACTION.max_fraction(samples)? {
        return Ok(Some(kv));
    }
    for family in [TRT_KV_USED, TRT_KV_MAX] {
        for sample in family.samples(samples) {
            check_count(family, sample.value)?;
        }
    }
    let mut fullest: Option<f64> = None;
    for used in TRT_KV_USED.samples(samples) {
        let key = labels_but(used, TRT_BLOCK_TYPE);
        let Some(max) = TRT_KV_MAX
            .samples(samples)
            .find(|max| labels_but(max, TRT_BLOCK_TYPE) == key)
        else {
            continue;
        };
        if max.value == 0.0 {
            continue;
        }
        let ratio = used.value / max.value;
        if ratio > 1.0 {
            return Err(ExtractError::Invalid {
                family: format!("{} / {}", TRT_KV_USED.describe(), TRT_KV_MAX.describe()),
                value: ratio,
                why: "a fraction must be at most 1",
            });
        }
        fullest = Some(fullest.map_or(ratio, |f| f.max(ratio)));
    }
    Ok(fullest)
}

/// A sample's labels other than `except`, sorted, to pair samples that
/// differ only in that label.
fn labels_but<'s>(sample: &'s Sample, except: &str) -> Vec<(&'s str, &'s str)> {
    let mut labels: Vec<(&str, &str)> = sample
        .labels
        .iter()
        .filter(|(name, _)| name != except)
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    labels.sort_unstable();
    labels
}

/// The samples of one metric name, optionally only those with one label
/// value.
#[derive(Clone, Copy, Debug)]
struct Family {
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
}

impl Family {
    /// Every sample named `name`.
    const fn all(name: &'static str) -> Self {
        Family { name, label: None }
    }

    /// The samples named `name` whose label `label` is `value`.
    const fn with(name: &'static str, label: &'static str, value: &'static str) -> Self {
        Family {
            name,
            label: Some((label, value)),
        }
    }

    fn samples<'s>(self, samples: &'s [Sample]) -> impl Iterator<Item = &'s Sample> + 's {
        samples.iter().filter(move |sample| {
            sample.name == self.name
                && self
                    .label
                    .is_none_or(|(label, value)| sample.label(label) == Some(value))
        })
    }

    fn present(self, samples: &[Sample]) -> bool {
        self.samples(samples).next().is_some()
    }

    /// The family as named in errors.
    fn describe(self) -> String {
        match self.label {
            None => self.name.to_owned(),
            Some((label, value)) => format!("{}{{{label}=\"{value}\"}}", self.name),
        }
    }

    /// The sum of a count across label sets; `None` if there is no sample.
    fn sum(self, samples: &[Sample]) -> Result<Option<f64>, ExtractError> {
        let mut total: Option<f64> = None;
        for sample in self.samples(samples) {
            check_count(self, sample.value)?;
            total = Some(total.unwrap_or(0.0) + sample.value);
        }
        if let Some(total) = total {
            // Finite values can still add up to infinity.
            check_count(self, total)?;
        }
        Ok(total)
    }

    /// The largest fraction across label sets; `None` if there is no sample.
    fn max_fraction(self, samples: &[Sample]) -> Result<Option<f64>, ExtractError> {
        let mut fullest: Option<f64> = None;
        for sample in self.samples(samples) {
            check_count(self, sample.value)?;
            if sample.value > 1.0 {
                return Err(self.invalid(sample.value, "a fraction must be at most 1"));
            }
            fullest = Some(fullest.map_or(sample.value, |f| f.max(sample.value)));
        }
        Ok(fullest)
    }

    fn invalid(self, value: f64, why: &'static str) -> ExtractError {
        ExtractError::Invalid {
            family: self.describe(),
            value,
            why,
        }
    }
}

/// Rejects a value that cannot be a count or a fraction.
fn check_count(family: Family, value: f64) -> Result<(), ExtractError> {
    let why = if value.is_nan() {
        "not a number"
    } else if value.is_infinite() {
        "infinite"
    } else if value < 0.0 {
        "negative"
    } else {
        return Ok(());
    };
    Err(family.invalid(value, why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::promtext::parse;

    fn load(text: &str) -> Result<EngineLoad, ExtractError> {
        extract(&parse(text).expect("test scrape parses"))
    }

    fn invalid(text: &str) -> (String, f64, &'static str) {
        match load(text) {
            Err(ExtractError::Invalid { family, value, why }) => (family, value, why),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.75
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 41.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 41.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 98.25
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1234.5
"#;

    const SGLANG: &str = r#"# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 12.0
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-0.5B-Instruct",tp_rank="0"} 1.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 5.0
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-0.5B-Instruct",tp_rank="0"} 0.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 0.62
sglang:token_usage{model_name="Qwen/Qwen2.5-0.5B-Instruct",tp_rank="0"} 0.08
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 843.2
"#;

    const TRITON: &str = r#"# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 1
nv_inference_pending_request_count{model="preprocessing",version="1"} 0
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 2
nv_inference_pending_request_count{model="postprocessing",version="1"} 0
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 256
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 4
nv_trt_llm_request_metrics{model="tensorrt_llm_2",request_type="active",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm_2",request_type="waiting",version="1"} 1
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 300
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 700
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 1000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.3
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm_2",version="1"} 450
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm_2",version="1"} 500
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm_2",version="1"} 0.9
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-0c4fd4c2-5f7e-0d4b-4a2a-1d5a3e0f9b11"} 0.87
nv_gpu_utilization{gpu_uuid="GPU-8a1b2c3d-4e5f-6789-0abc-def012345678"} 0.91
"#;

    const TGI: &str = r#"# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 8
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 16000
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 10
tgi_request_duration_bucket{le="+Inf"} 12
tgi_request_duration_sum 7.5
tgi_request_duration_count 12
"#;

    #[test]
    fn engine_display() {
        assert_eq!(Engine::Vllm.to_string(), "vllm");
        assert_eq!(Engine::Sglang.to_string(), "sglang");
        assert_eq!(Engine::Triton.to_string(), "triton");
        assert_eq!(Engine::Tgi.to_string(), "tgi");
    }

    #[test]
    fn vllm_sums_counts_and_takes_the_fullest_cache() {
        assert_eq!(
            load(VLLM).unwrap(),
            EngineLoad {
                engine: Engine::Vllm,
                queue: 6.0,
                running: Some(8.0),
                kv: Some(0.75),
            }
        );
    }

    #[test]
    fn vllm_falls_back_to_gpu_cache_usage() {
        let old = VLLM.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc");
        assert_eq!(load(&old).unwrap().kv, Some(0.75));
        // The preferred family wins when both are there; the unused one is
        // not judged.
        let both = format!("{VLLM}vllm:gpu_cache_usage_perc{{engine=\"0\"}} NaN\n");
        assert_eq!(load(&both).unwrap().kv, Some(0.75));
        // Neither: no KV.
        let neither: String = VLLM
            .lines()
            .filter(|l| !l.contains("kv_cache_usage_perc"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(load(&neither).unwrap().kv, None);
    }

    #[test]
    fn vllm_without_running_reports_none() {
        let text = "vllm:num_requests_waiting 2\n";
        assert_eq!(
            load(text).unwrap(),
            EngineLoad {
                engine: Engine::Vllm,
                queue: 2.0,
                running: None,
                kv: None,
            }
        );
    }

    #[test]
    fn sglang() {
        assert_eq!(
            load(SGLANG).unwrap(),
            EngineLoad {
                engine: Engine::Sglang,
                queue: 5.0,
                running: Some(13.0),
                kv: Some(0.62),
            }
        );
    }

    #[test]
    fn triton_with_fraction() {
        assert_eq!(
            load(TRITON).unwrap(),
            EngineLoad {
                engine: Engine::Triton,
                // Pending 1 + 0 + 2 + 0, TensorRT-LLM waiting 4 + 1.
                queue: 8.0,
                running: Some(9.0),
                kv: Some(0.9),
            }
        );
    }

    #[test]
    fn triton_kv_from_used_over_max() {
        let text: String = TRITON
            .lines()
            .filter(|l| !l.contains("\"fraction\""))
            .map(|l| format!("{l}\n"))
            .collect();
        // 300/1000 and 450/500: the fullest is 0.9.
        assert_eq!(load(&text).unwrap().kv, Some(0.9));

        // A `used` without a matching `max`, or with a `max` of 0, gives nothing.
        let text = "nv_inference_pending_request_count{model=\"a\"} 0\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\",model=\"a\"} 5\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"b\"} 10\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\",model=\"c\"} 0\n\
                    nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"c\"} 0\n";
        assert_eq!(load(text).unwrap().kv, None);

        // Pairing does not depend on label order.
        let text = "nv_inference_pending_request_count{model=\"a\"} 0\n\
                    nv_trt_llm_kv_cache_block_metrics{model=\"a\",kv_cache_block_type=\"used\",version=\"1\"} 1\n\
                    nv_trt_llm_kv_cache_block_metrics{version=\"1\",kv_cache_block_type=\"max\",model=\"a\"} 4\n";
        assert_eq!(load(text).unwrap().kv, Some(0.25));
    }

    #[test]
    fn triton_without_trt_llm() {
        let text = "nv_inference_pending_request_count{model=\"resnet\",version=\"1\"} 7\n\
                    nv_gpu_utilization{gpu_uuid=\"GPU-1\"} 0.5\n";
        assert_eq!(
            load(text).unwrap(),
            EngineLoad {
                engine: Engine::Triton,
                queue: 7.0,
                running: None,
                kv: None,
            }
        );
        // TensorRT-LLM's waiting count alone is enough to recognise Triton.
        let text = "nv_trt_llm_request_metrics{request_type=\"waiting\",model=\"m\"} 2\n";
        let load = load(text).unwrap();
        assert_eq!((load.engine, load.queue), (Engine::Triton, 2.0));
    }

    #[test]
    fn tgi() {
        assert_eq!(
            load(TGI).unwrap(),
            EngineLoad {
                engine: Engine::Tgi,
                queue: 3.0,
                running: Some(8.0),
                kv: None,
            }
        );
    }

    #[test]
    fn detection_order() {
        // A scrape with several servers' families is the first in the order.
        let all = format!("{TGI}{TRITON}{SGLANG}{VLLM}");
        assert_eq!(load(&all).unwrap().engine, Engine::Vllm);
        let no_vllm = format!("{TGI}{TRITON}{SGLANG}");
        assert_eq!(load(&no_vllm).unwrap().engine, Engine::Sglang);
        let no_sglang = format!("{TGI}{TRITON}");
        assert_eq!(load(&no_sglang).unwrap().engine, Engine::Triton);
        // Running or KV alone do not identify an engine.
        let text = "vllm:num_requests_running 1\nsglang:token_usage 0.5\n";
        assert_eq!(load(text), Err(ExtractError::Unknown));
    }

    #[test]
    fn unknown() {
        assert_eq!(load(""), Err(ExtractError::Unknown));
        let text = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1\n\
                    nv_trt_llm_request_metrics{request_type=\"active\"} 3\n";
        let err = load(text).unwrap_err();
        assert_eq!(err, ExtractError::Unknown);
        assert_eq!(
            err.to_string(),
            "no known inference-server metric families (vLLM, SGLang, Triton, TGI)"
        );
    }

    #[test]
    fn nan_infinite_and_negative_counts_are_invalid() {
        for (value, why) in [
            ("NaN", "not a number"),
            ("+Inf", "infinite"),
            ("-Inf", "infinite"),
            ("-1", "negative"),
        ] {
            let (family, got, reason) = invalid(&format!(
                "vllm:num_requests_waiting{{engine=\"0\"}} 1\nvllm:num_requests_waiting{{engine=\"1\"}} {value}\n"
            ));
            assert_eq!(
                (family.as_str(), reason),
                ("vllm:num_requests_waiting", why)
            );
            assert_eq!(got.to_string(), value.parse::<f64>().unwrap().to_string());
        }
        // A negative value does not hide in a positive sum.
        let (_, value, why) = invalid("tgi_queue_size{a=\"1\"} 5\ntgi_queue_size{a=\"2\"} -2\n");
        assert_eq!((value, why), (-2.0, "negative"));
        // Running and KV are judged too.
        let (family, _, why) = invalid("sglang:num_queue_reqs 1\nsglang:num_running_reqs -3\n");
        assert_eq!(
            (family.as_str(), why),
            ("sglang:num_running_reqs", "negative")
        );
        let (family, _, why) = invalid("sglang:num_queue_reqs 1\nsglang:token_usage NaN\n");
        assert_eq!(
            (family.as_str(), why),
            ("sglang:token_usage", "not a number")
        );
        let (family, _, why) = invalid(
            "nv_inference_pending_request_count 0\n\
             nv_trt_llm_request_metrics{request_type=\"active\"} Inf\n",
        );
        assert_eq!(
            (family.as_str(), why),
            (
                "nv_trt_llm_request_metrics{request_type=\"active\"}",
                "infinite"
            )
        );
        let (family, _, why) = invalid(
            "nv_inference_pending_request_count 0\n\
             nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} -1\n",
        );
        assert_eq!(
            (family.as_str(), why),
            (
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"}",
                "negative"
            )
        );
    }

    #[test]
    fn sums_that_overflow_are_invalid() {
        let (family, value, why) =
            invalid("tgi_queue_size{a=\"1\"} 1e308\ntgi_queue_size{a=\"2\"} 1e308\n");
        assert_eq!(
            (family.as_str(), value, why),
            ("tgi_queue_size", f64::INFINITY, "infinite")
        );
        let (family, _, why) = invalid(
            "nv_inference_pending_request_count 1e308\n\
             nv_trt_llm_request_metrics{request_type=\"waiting\"} 1e308\n",
        );
        assert_eq!(why, "infinite");
        assert!(
            family.starts_with("nv_inference_pending_request_count + "),
            "{family}"
        );
    }

    #[test]
    fn kv_above_one_is_invalid() {
        let (family, value, why) = invalid(
            "vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.5\n\
             vllm:kv_cache_usage_perc{engine=\"1\"} 45.2\n",
        );
        assert_eq!(
            (family.as_str(), value, why),
            (
                "vllm:kv_cache_usage_perc",
                45.2,
                "a fraction must be at most 1"
            )
        );
        let (family, _, why) = invalid(
            "nv_inference_pending_request_count 0\n\
             nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 1.5\n",
        );
        assert_eq!(
            (family.as_str(), why),
            (
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"}",
                "a fraction must be at most 1"
            )
        );
        let (_, value, why) = invalid(
            "nv_inference_pending_request_count 0\n\
             nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\"} 12\n\
             nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} 10\n",
        );
        assert_eq!((value, why), (1.2, "a fraction must be at most 1"));
        // Exactly full is fine.
        let text = "sglang:num_queue_reqs 0\nsglang:token_usage 1.0\n";
        assert_eq!(load(text).unwrap().kv, Some(1.0));
    }

    #[test]
    fn invalid_display() {
        let err = ExtractError::Invalid {
            family: "vllm:num_requests_waiting".into(),
            value: -1.0,
            why: "negative",
        };
        assert_eq!(
            err.to_string(),
            "vllm:num_requests_waiting: -1 is not a valid value (negative)"
        );
    }

    #[test]
    fn unused_samples_are_ignored_whatever_their_values() {
        let text = format!(
            "{VLLM}some_other_gauge NaN\nprocess_open_fds -Inf\n\
             vllm:e2e_request_latency_seconds_sum{{engine=\"2\"}} NaN\n\
             sglang:num_queue_reqs NaN\ntgi_queue_size -1\n"
        );
        assert_eq!(load(&text).unwrap().queue, 6.0);
        // Triton: request types and block types that are not used.
        let text = format!(
            "{TRITON}nv_trt_llm_request_metrics{{model=\"x\",request_type=\"max\",version=\"1\"}} NaN\n\
             nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type=\"free\",model=\"x\"}} -5\n\
             nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type=\"used\",model=\"x\"}} NaN\n"
        );
        // `used` is not looked at while `fraction` is there.
        assert_eq!(load(&text).unwrap().kv, Some(0.9));
    }
}
