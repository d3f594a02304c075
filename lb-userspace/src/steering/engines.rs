//! An inference server's load, read from its metrics page: how many
//! requests wait (its queue), how many run, how full its KV cache is, and a
//! progress count (tokens or forward passes so far) that shows whether it
//! is getting anywhere. Prometheus text is parsed with
//! [`crate::steering::promtext`]; TensorRT-LLM's own server may answer JSON.
//!
//! The servers and their families (see docs/load-aware-weights.md, whose
//! table must match [`SPECS`]):
//! - vLLM: queue `vllm:num_requests_waiting`, running
//!   `vllm:num_requests_running`, KV `vllm:kv_cache_usage_perc` (a fraction
//!   0..=1 despite its name) or, when a server lacks that family, the older
//!   `vllm:gpu_cache_usage_perc`; progress `vllm:prompt_tokens_total` +
//!   `vllm:generation_tokens_total` (counted every engine step). vLLM's
//!   `vllm:num_requests_waiting_by_reason{reason}` splits the same waiting
//!   requests by why they wait: it is not added (that would count each
//!   waiting request twice).
//! - NVIDIA NIM: vLLM's names without the `vllm:` prefix
//!   (`num_requests_waiting`, ...; NIM serves them on `/v1/metrics`).
//! - Ray Serve LLM: vLLM's names with the prefix `ray_vllm:`, or, after
//!   Ray's name sanitising, `ray_vllm_` (`ray_vllm_num_requests_waiting`).
//! - SGLang: queue `sglang:num_queue_reqs`, running `sglang:num_running_reqs`,
//!   KV `sglang:token_usage` (a fraction); progress
//!   `sglang:realtime_tokens_total` (every log interval, newer builds) +
//!   `sglang:prompt_tokens_total` + `sglang:generation_tokens_total` (the
//!   latter two counted when a request finishes).
//! - Triton: queue `nv_inference_pending_request_count` plus, for
//!   TensorRT-LLM, `nv_trt_llm_request_metrics{request_type="waiting"}`;
//!   running `nv_trt_llm_request_metrics{request_type="active"}`; KV
//!   `nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}`, or
//!   else the blocks `used` over the blocks `max` (a `used` and a `max`
//!   sample are paired by their other labels; a pair whose `max` is 0 gives
//!   nothing); progress `nv_inference_count` + `nv_inference_exec_count` +
//!   `nv_trt_llm_general_metrics{general_type="iteration_counter"}`.
//! - TGI: queue `tgi_queue_size`, running `tgi_batch_current_size`; TGI
//!   reports no KV-cache use; progress `tgi_batch_inference_success` (one
//!   per forward pass that worked).
//! - TensorRT-LLM's server (`trtllm-serve`): Prometheus families
//!   `trtllm_num_requests_waiting`, `trtllm_num_requests_running`,
//!   `trtllm_kv_cache_utilization` (a fraction), progress
//!   `trtllm_prompt_tokens_total` + `trtllm_generation_tokens_total` +
//!   `trtllm_request_success_total` + `trtllm_num_requests_completed_total`
//!   (newer builds, on
//!   `/prometheus/metrics`); or its JSON `/metrics`, a list of iteration
//!   statistics since the previous request, of which the last counts:
//!   `numQueuedRequests`, `numActiveRequests`, KV `kvCacheStats.usedNumBlocks
//!   / maxNumBlocks`. An empty list means no iteration ran since the last
//!   scrape: nothing queued or running as far as the page says. The JSON
//!   page has no progress count (a hung engine and an idle one both answer
//!   `[]`): stall detection needs the Prometheus families.
//!
//! Decisions:
//! - The engine is the one set for the VIP (`[vip.load] engine`), or else
//!   the first in the order of [`SPECS`] (vLLM, Ray, SGLang, Triton, TGI,
//!   TensorRT-LLM, NIM: NIM's unprefixed names are the most generic, so
//!   they come last) whose queue family has a sample (for Triton, either
//!   queue family). A page that only declares an engine's queue family
//!   (`# TYPE vllm:num_requests_waiting gauge`, an engine starting up) is
//!   [`ExtractError::Missing`] naming it; a page with nothing known is
//!   [`ExtractError::Unknown`].
//! - One server may report a family under several label sets (engines,
//!   models, data-parallel ranks). Counts (queue, running) are summed across
//!   them, except across label sets that differ only in the rank of a
//!   parallelism whose ranks share one scheduler ([`REPLICA_RANKS`]:
//!   tensor, pipeline, attention tensor and context, expert ranks): those
//!   report the same global count (SGLang with context parallelism does on
//!   every rank), so the largest is taken. Data-parallel ranks (`dp_rank`,
//!   vLLM's `engine`) have queues of their own and are summed.
//! - The KV cache is the maximum across label sets, not the sum or the
//!   mean: a node is as full as its fullest cache, since that cache is where
//!   a request to it may have to wait.
//! - Progress is the sum of the engine's progress counters: only whether
//!   it changed between two reports matters (a counter reset is a change).
//! - A bad report must never change weights, so a report is taken whole or
//!   not at all: any value used that is NaN, infinite or negative, a sum
//!   that overflows to infinity, or a KV fraction above 1 rejects it with
//!   [`ExtractError::Invalid`]. Samples that are not used (other families,
//!   other label values such as `request_type="max"`, or the vLLM fallback
//!   family when the preferred one is present) are ignored whatever their
//!   values. In `Invalid`, `family` is the metric name, followed by the
//!   label that selects the samples where there is one (for example
//!   `nv_trt_llm_request_metrics{request_type="waiting"}`).
//! - A family absent from the page gives `None` for running, KV and
//!   progress (the node does not report it), never 0.

use std::{fmt, str::FromStr};

use crate::steering::promtext::{self, Sample};

/// The inference servers whose metrics pages are understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Engine {
    Vllm,
    /// NVIDIA NIM: vLLM's names without the prefix.
    Nim,
    /// Ray Serve LLM: vLLM's names with a `ray_vllm:` or `ray_vllm_` prefix.
    Ray,
    Sglang,
    Triton,
    Tgi,
    /// TensorRT-LLM's own server, `trtllm-serve`.
    Trtllm,
}

impl Engine {
    /// Every engine, as `[vip.load] engine` names them.
    pub const ALL: [Engine; 7] = [
        Engine::Vllm,
        Engine::Nim,
        Engine::Ray,
        Engine::Sglang,
        Engine::Triton,
        Engine::Tgi,
        Engine::Trtllm,
    ];

    /// The name in the config, the API and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Nim => "nim",
            Engine::Ray => "ray",
            Engine::Sglang => "sglang",
            Engine::Triton => "triton",
            Engine::Tgi => "tgi",
            Engine::Trtllm => "trtllm",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Engine::ALL
                    .iter()
                    .map(|e| format!("\"{}\"", e.name()))
                    .collect();
                format!(
                    "unknown engine {s:?} (expected \"auto\", {})",
                    names.join(", ")
                )
            })
    }
}

/// What a node reports: requests waiting (queue), requests running, KV-cache
/// use (0..=1) and its progress count, if it reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineLoad {
    pub engine: Engine,
    pub queue: f64,
    pub running: Option<f64>,
    pub kv: Option<f64>,
    /// The sum of the engine's progress counters (see the module docs).
    pub progress: Option<f64>,
}

/// Why a page gives no load.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error(
        "no known inference-server metric families (vLLM, NIM, Ray Serve, SGLang, Triton, TGI, TensorRT-LLM)"
    )]
    Unknown,
    /// The engine's queue family has no sample: the page declares it (an
    /// engine starting up), or the VIP says the node runs this engine and
    /// the page lacks it.
    #[error("{}", missing_message(*engine, family, *declared))]
    Missing {
        engine: Engine,
        family: &'static str,
        declared: bool,
    },
    /// The text is not the format it looks like.
    #[error("{0}")]
    Malformed(String),
    #[error("{family}: {value} is not a valid value ({why})")]
    Invalid {
        family: String,
        value: f64,
        why: &'static str,
    },
}

fn missing_message(engine: Engine, family: &str, declared: bool) -> String {
    if declared {
        format!(
            "{family} is declared but has no sample yet ({engine} is starting up, or has not set it)"
        )
    } else {
        format!("no {family} on the page (the VIP reads it as {engine}'s)")
    }
}

/// Labels naming the rank of a parallelism whose ranks share one scheduler:
/// samples that differ only in them repeat one count.
pub const REPLICA_RANKS: [&str; 8] = [
    "tp_rank",
    "pp_rank",
    "attn_tp_rank",
    "attn_cp_rank",
    "attn_dcp_rank",
    "cp_rank",
    "moe_ep_rank",
    "moe_tp_rank",
];

/// The families an engine's page is read for.
pub struct Spec {
    pub engine: Engine,
    /// Requests waiting: the sum of these (a sample of any identifies the
    /// engine).
    queue: &'static [Family],
    running: &'static [Family],
    /// KV-cache use as a fraction: the first of these with a sample.
    kv: &'static [Family],
    /// Counters that move while the engine works: summed.
    progress: &'static [Family],
}

impl Spec {
    fn families(&self) -> impl Iterator<Item = &Family> {
        self.queue
            .iter()
            .chain(self.running)
            .chain(self.kv)
            .chain(self.progress)
            .chain(if self.engine == Engine::Triton {
                &[TRT_KV_USED, TRT_KV_MAX][..]
            } else {
                &[]
            })
    }

    /// Whether a sample named `name` is read.
    fn reads(&self, name: &str) -> bool {
        self.families().any(|f| f.name == name)
    }
}

/// vLLM's families under a prefix (`vllm:`, NIM's none, Ray's).
macro_rules! vllm_like {
    ($engine:expr, $p:literal) => {
        Spec {
            engine: $engine,
            queue: &[Family::all(concat!($p, "num_requests_waiting"))],
            running: &[Family::all(concat!($p, "num_requests_running"))],
            kv: &[
                Family::all(concat!($p, "kv_cache_usage_perc")),
                Family::all(concat!($p, "gpu_cache_usage_perc")),
            ],
            progress: &[
                Family::all(concat!($p, "prompt_tokens_total")),
                Family::all(concat!($p, "generation_tokens_total")),
            ],
        }
    };
}

const TRT_REQUESTS: &str = "nv_trt_llm_request_metrics";
const TRT_BLOCKS: &str = "nv_trt_llm_kv_cache_block_metrics";
const TRT_BLOCK_TYPE: &str = "kv_cache_block_type";
const TRITON_PENDING: Family = Family::all("nv_inference_pending_request_count");
const TRT_WAITING: Family = Family::with(TRT_REQUESTS, "request_type", "waiting");
const TRT_KV_USED: Family = Family::with(TRT_BLOCKS, TRT_BLOCK_TYPE, "used");
const TRT_KV_MAX: Family = Family::with(TRT_BLOCKS, TRT_BLOCK_TYPE, "max");

/// Every engine's families, in the order engines are detected.
pub const SPECS: [Spec; 8] = [
    vllm_like!(Engine::Vllm, "vllm:"),
    vllm_like!(Engine::Ray, "ray_vllm:"),
    vllm_like!(Engine::Ray, "ray_vllm_"),
    Spec {
        engine: Engine::Sglang,
        queue: &[Family::all("sglang:num_queue_reqs")],
        running: &[Family::all("sglang:num_running_reqs")],
        kv: &[Family::all("sglang:token_usage")],
        progress: &[
            Family::all("sglang:realtime_tokens_total"),
            Family::all("sglang:prompt_tokens_total"),
            Family::all("sglang:generation_tokens_total"),
        ],
    },
    Spec {
        engine: Engine::Triton,
        queue: &[TRITON_PENDING, TRT_WAITING],
        running: &[Family::with(TRT_REQUESTS, "request_type", "active")],
        kv: &[Family::with(TRT_BLOCKS, TRT_BLOCK_TYPE, "fraction")],
        progress: &[
            Family::all("nv_inference_count"),
            Family::all("nv_inference_exec_count"),
            Family::with(
                "nv_trt_llm_general_metrics",
                "general_type",
                "iteration_counter",
            ),
        ],
    },
    Spec {
        engine: Engine::Tgi,
        queue: &[Family::all("tgi_queue_size")],
        running: &[Family::all("tgi_batch_current_size")],
        kv: &[],
        progress: &[Family::all("tgi_batch_inference_success")],
    },
    Spec {
        engine: Engine::Trtllm,
        queue: &[Family::all("trtllm_num_requests_waiting")],
        running: &[Family::all("trtllm_num_requests_running")],
        kv: &[Family::all("trtllm_kv_cache_utilization")],
        progress: &[
            Family::all("trtllm_prompt_tokens_total"),
            Family::all("trtllm_generation_tokens_total"),
            Family::all("trtllm_request_success_total"),
            Family::all("trtllm_num_requests_completed_total"),
        ],
    },
    vllm_like!(Engine::Nim, ""),
];

/// Whether any engine's page is read for samples of metric `name`. A
/// `match`: one length dispatch and a comparison or two per name, which
/// matters at a thousand pages a second (a unit test keeps it equal to
/// [`SPECS`]).
pub fn wanted(name: &str) -> bool {
    matches!(
        name,
        "vllm:num_requests_waiting"
            | "vllm:num_requests_running"
            | "vllm:kv_cache_usage_perc"
            | "vllm:gpu_cache_usage_perc"
            | "vllm:prompt_tokens_total"
            | "vllm:generation_tokens_total"
            | "ray_vllm:num_requests_waiting"
            | "ray_vllm:num_requests_running"
            | "ray_vllm:kv_cache_usage_perc"
            | "ray_vllm:gpu_cache_usage_perc"
            | "ray_vllm:prompt_tokens_total"
            | "ray_vllm:generation_tokens_total"
            | "ray_vllm_num_requests_waiting"
            | "ray_vllm_num_requests_running"
            | "ray_vllm_kv_cache_usage_perc"
            | "ray_vllm_gpu_cache_usage_perc"
            | "ray_vllm_prompt_tokens_total"
            | "ray_vllm_generation_tokens_total"
            | "num_requests_waiting"
            | "num_requests_running"
            | "kv_cache_usage_perc"
            | "gpu_cache_usage_perc"
            | "prompt_tokens_total"
            | "generation_tokens_total"
            | "sglang:num_queue_reqs"
            | "sglang:num_running_reqs"
            | "sglang:token_usage"
            | "sglang:realtime_tokens_total"
            | "sglang:prompt_tokens_total"
            | "sglang:generation_tokens_total"
            | "nv_inference_pending_request_count"
            | "nv_trt_llm_request_metrics"
            | "nv_trt_llm_kv_cache_block_metrics"
            | "nv_inference_count"
            | "nv_inference_exec_count"
            | "nv_trt_llm_general_metrics"
            | "tgi_queue_size"
            | "tgi_batch_current_size"
            | "tgi_batch_inference_success"
            | "trtllm_num_requests_waiting"
            | "trtllm_num_requests_running"
            | "trtllm_kv_cache_utilization"
            | "trtllm_prompt_tokens_total"
            | "trtllm_generation_tokens_total"
            | "trtllm_request_success_total"
            | "trtllm_num_requests_completed_total"
    )
}

/// The load a node's page reports: `engine` as the VIP sets it, or
/// detected (`None`).
pub fn read(text: &str, engine: Option<Engine>) -> Result<EngineLoad, ExtractError> {
    if matches!(engine, None | Some(Engine::Trtllm)) && text.trim_start().starts_with('[') {
        return trtllm_json(text);
    }
    let page = match engine {
        None => promtext::parse_page(text, wanted),
        Some(e) => promtext::parse_page(text, |name| {
            wanted(name) && SPECS.iter().any(|s| s.engine == e && s.reads(name))
        }),
    }
    .map_err(|e| ExtractError::Malformed(e.to_string()))?;
    let specs = SPECS
        .iter()
        .filter(|s| engine.is_none_or(|e| s.engine == e));
    let mut declared = None;
    for spec in specs {
        if spec.queue.iter().any(|f| f.present(&page.samples)) {
            return spec.load(&page.samples);
        }
        if declared.is_none() {
            declared = spec
                .queue
                .iter()
                .find(|f| page.declared.iter().any(|d| d == f.name))
                .map(|f| (spec.engine, f.name));
        }
    }
    match (declared, engine) {
        (Some((engine, family)), _) => Err(ExtractError::Missing {
            engine,
            family,
            declared: true,
        }),
        (None, Some(e)) => Err(ExtractError::Missing {
            engine: e,
            family: SPECS
                .iter()
                .find(|s| s.engine == e)
                .map_or("", |s| s.queue[0].name),
            declared: false,
        }),
        (None, None) => Err(ExtractError::Unknown),
    }
}

/// The load in samples of an already parsed page, the engine detected.
pub fn extract(samples: &[Sample]) -> Result<EngineLoad, ExtractError> {
    SPECS
        .iter()
        .find(|s| s.queue.iter().any(|f| f.present(samples)))
        .ok_or(ExtractError::Unknown)?
        .load(samples)
}

impl Spec {
    fn load(&self, samples: &[Sample]) -> Result<EngineLoad, ExtractError> {
        let queue = sum_of(self.queue, samples)?.unwrap_or(0.0);
        let mut kv = None;
        for family in self.kv {
            // Only looked at (and so only validated) while no earlier one
            // had a sample.
            kv = family.max_fraction(samples)?;
            if kv.is_some() {
                break;
            }
        }
        if kv.is_none() && self.engine == Engine::Triton {
            kv = triton_kv(samples)?;
        }
        Ok(EngineLoad {
            engine: self.engine,
            queue,
            running: sum_of(self.running, samples)?,
            kv,
            progress: sum_of(self.progress, samples)?,
        })
    }
}

/// The sum of several families' counts (`None` if none has a sample).
fn sum_of(families: &[Family], samples: &[Sample]) -> Result<Option<f64>, ExtractError> {
    let mut total: Option<f64> = None;
    for f in families {
        if let Some(v) = f.sum(samples)? {
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    if let Some(t) = total
        && t.is_infinite()
    {
        let names: Vec<String> = families.iter().map(|f| f.describe()).collect();
        return Err(ExtractError::Invalid {
            family: names.join(" + "),
            value: t,
            why: "infinite",
        });
    }
    Ok(total)
}

/// `trtllm-serve`'s JSON `/metrics`: iteration statistics, the last counts.
fn trtllm_json(text: &str) -> Result<EngineLoad, ExtractError> {
    let stats: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
        ExtractError::Malformed(format!(
            "not a JSON list of TensorRT-LLM iteration statistics: {e}"
        ))
    })?;
    let Some(last) = stats.last() else {
        // No iteration since the last scrape.
        return Ok(EngineLoad {
            engine: Engine::Trtllm,
            queue: 0.0,
            running: Some(0.0),
            kv: None,
            progress: None,
        });
    };
    let count = |path: &str| -> Result<Option<f64>, ExtractError> {
        let Some(v) = last.pointer(path) else {
            return Ok(None);
        };
        let family = format!("trtllm-serve {}", &path[1..].replace('/', "."));
        let value = v
            .as_f64()
            .ok_or_else(|| ExtractError::Malformed(format!("{family}: {v} is not a number")))?;
        if value < 0.0 {
            return Err(ExtractError::Invalid {
                family,
                value,
                why: "negative",
            });
        }
        Ok(Some(value))
    };
    let queue = count("/numQueuedRequests")?.ok_or_else(|| {
        ExtractError::Malformed(
            "trtllm-serve iteration statistics without numQueuedRequests".into(),
        )
    })?;
    let kv = match (
        count("/kvCacheStats/usedNumBlocks")?,
        count("/kvCacheStats/maxNumBlocks")?,
    ) {
        (Some(used), Some(max)) if max > 0.0 => {
            let ratio = used / max;
            if ratio > 1.0 {
                return Err(ExtractError::Invalid {
                    family: "trtllm-serve kvCacheStats.usedNumBlocks / maxNumBlocks".into(),
                    value: ratio,
                    why: "a fraction must be at most 1",
                });
            }
            Some(ratio)
        }
        _ => None,
    };
    Ok(EngineLoad {
        engine: Engine::Trtllm,
        queue,
        running: count("/numActiveRequests")?,
        kv,
        progress: None,
    })
}

/// Triton's (TensorRT-LLM's) KV-cache use from blocks: the largest
/// `used / max` of a `used` and a `max` sample with the same other labels.
fn triton_kv(samples: &[Sample]) -> Result<Option<f64>, ExtractError> {
    for family in [TRT_KV_USED, TRT_KV_MAX] {
        for sample in family.samples(samples) {
            check_count(family, sample.value)?;
        }
    }
    let mut fullest: Option<f64> = None;
    for used in TRT_KV_USED.samples(samples) {
        let key = labels_but(used, &[TRT_BLOCK_TYPE]);
        let Some(max) = TRT_KV_MAX
            .samples(samples)
            .find(|max| labels_but(max, &[TRT_BLOCK_TYPE]) == key)
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
/// differ only in those labels.
fn labels_but<'s>(sample: &'s Sample, except: &[&str]) -> Vec<(&'s str, &'s str)> {
    let mut labels: Vec<(&str, &str)> = sample
        .labels
        .iter()
        .filter(|(name, _)| !except.contains(&name.as_str()))
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

    /// The count across label sets (see the module docs: summed, except
    /// over [`REPLICA_RANKS`]); `None` if there is no sample.
    fn sum(self, samples: &[Sample]) -> Result<Option<f64>, ExtractError> {
        let mut total: Option<f64> = None;
        // Label sets but the replica ranks, and the largest count of each.
        let mut replicas: Vec<(Vec<(&str, &str)>, f64)> = Vec::new();
        for sample in self.samples(samples) {
            check_count(self, sample.value)?;
            if sample
                .labels
                .iter()
                .any(|(name, _)| REPLICA_RANKS.contains(&name.as_str()))
            {
                let key = labels_but(sample, &REPLICA_RANKS);
                match replicas.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => *v = v.max(sample.value),
                    None => replicas.push((key, sample.value)),
                }
            } else {
                total = Some(total.unwrap_or(0.0) + sample.value);
            }
        }
        for (_, v) in replicas {
            total = Some(total.unwrap_or(0.0) + v);
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

    fn load(text: &str) -> Result<EngineLoad, ExtractError> {
        read(text, None)
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
        for e in Engine::ALL {
            assert_eq!(e.name().parse::<Engine>(), Ok(e));
        }
        let err = "vllm2".parse::<Engine>().unwrap_err();
        assert!(
            err.contains("\"auto\"") && err.contains("\"trtllm\""),
            "{err}"
        );
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
                progress: None,
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
                progress: None,
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
                progress: None,
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
                progress: None,
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
                progress: None,
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
                progress: None,
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
            "no known inference-server metric families (vLLM, NIM, Ray Serve, SGLang, Triton, TGI, TensorRT-LLM)"
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

    #[test]
    fn wanted_is_every_family_of_every_spec() {
        for spec in &SPECS {
            for f in spec.families() {
                assert!(wanted(f.name), "{} of {}", f.name, spec.engine);
            }
        }
        assert!(!wanted("vllm:num_requests_waiting_by_reason"));
    }

    #[test]
    fn nim_ray_and_trtllm_serve_pages_are_read_with_progress() {
        let nim = "# TYPE num_requests_waiting gauge\n\
                   num_requests_waiting{model_name=\"meta/llama-3.1-8b-instruct\"} 4\n\
                   num_requests_running{model_name=\"meta/llama-3.1-8b-instruct\"} 2\n\
                   gpu_cache_usage_perc{model_name=\"meta/llama-3.1-8b-instruct\"} 0.3\n\
                   prompt_tokens_total{model_name=\"meta/llama-3.1-8b-instruct\"} 100\n\
                   generation_tokens_total{model_name=\"meta/llama-3.1-8b-instruct\"} 50\n";
        let r = load(nim).unwrap();
        assert_eq!(
            (r.engine, r.queue, r.running, r.kv, r.progress),
            (Engine::Nim, 4.0, Some(2.0), Some(0.3), Some(150.0))
        );
        for prefix in ["ray_vllm:", "ray_vllm_"] {
            let ray = format!(
                "{prefix}num_requests_waiting{{model_name=\"m\",ReplicaId=\"r1\"}} 3\n\
                 {prefix}num_requests_running{{model_name=\"m\",ReplicaId=\"r1\"}} 1\n\
                 {prefix}kv_cache_usage_perc{{model_name=\"m\",ReplicaId=\"r1\"}} 0.5\n\
                 {prefix}generation_tokens_total{{model_name=\"m\",ReplicaId=\"r1\"}} 9\n"
            );
            let r = load(&ray).unwrap();
            assert_eq!(
                (r.engine, r.queue, r.kv, r.progress),
                (Engine::Ray, 3.0, Some(0.5), Some(9.0)),
                "{prefix}"
            );
        }
        let trt = "trtllm_num_requests_waiting{model_name=\"m\",engine_type=\"trtllm\"} 6\n\
                   trtllm_num_requests_running{model_name=\"m\",engine_type=\"trtllm\"} 2\n\
                   trtllm_kv_cache_utilization{model_name=\"m\",engine_type=\"trtllm\"} 0.25\n\
                   trtllm_request_success_total{model_name=\"m\",finished_reason=\"stop\"} 12\n";
        let r = load(trt).unwrap();
        assert_eq!(
            (r.engine, r.queue, r.running, r.kv, r.progress),
            (Engine::Trtllm, 6.0, Some(2.0), Some(0.25), Some(12.0))
        );
        // A vLLM page is vLLM, not NIM, though it has no unprefixed names.
        assert_eq!(load(VLLM).unwrap().engine, Engine::Vllm);
    }

    #[test]
    fn trtllm_serve_json_statistics_are_read_from_the_last_iteration() {
        let json = r#"[{"iter": 1, "numQueuedRequests": 9, "numActiveRequests": 1,
                        "kvCacheStats": {"usedNumBlocks": 10, "maxNumBlocks": 100}},
                       {"iter": 2, "numQueuedRequests": 3, "numActiveRequests": 4,
                        "kvCacheStats": {"usedNumBlocks": 40, "maxNumBlocks": 100}}]"#;
        let r = load(json).unwrap();
        assert_eq!(
            (r.engine, r.queue, r.running, r.kv, r.progress),
            (Engine::Trtllm, 3.0, Some(4.0), Some(0.4), None)
        );
        let idle = load("[]").unwrap();
        assert_eq!((idle.queue, idle.running), (0.0, Some(0.0)));
        let e = load(r#"[{"numActiveRequests": 1}]"#).unwrap_err();
        assert!(e.to_string().contains("numQueuedRequests"), "{e}");
        let e = load(r#"[{"numQueuedRequests": -1}]"#).unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
        let e = load("[1, 2").unwrap_err();
        assert!(matches!(e, ExtractError::Malformed(_)), "{e}");
    }

    #[test]
    fn declared_families_without_samples_say_what_is_missing() {
        let starting = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
                        # TYPE vllm:num_requests_waiting gauge\n\
                        # TYPE vllm:num_requests_running gauge\n";
        let e = load(starting).unwrap_err();
        assert_eq!(
            e,
            ExtractError::Missing {
                engine: Engine::Vllm,
                family: "vllm:num_requests_waiting",
                declared: true
            }
        );
        assert_eq!(
            e.to_string(),
            "vllm:num_requests_waiting is declared but has no sample yet (vllm is starting up, or has not set it)"
        );
        // The VIP says SGLang; the page is vLLM's.
        let e = read(VLLM, Some(Engine::Sglang)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no sglang:num_queue_reqs on the page (the VIP reads it as sglang's)"
        );
        assert_eq!(read(VLLM, Some(Engine::Vllm)).unwrap().engine, Engine::Vllm);
    }

    #[test]
    fn ranks_that_share_a_scheduler_are_counted_once_data_parallel_ranks_summed() {
        // SGLang with context parallelism: every rank reports the global
        // queue; two data-parallel ranks have queues of their own.
        let mut text = String::new();
        for dp in 0..2 {
            for cp in 0..4 {
                text += &format!(
                    "sglang:num_queue_reqs{{dp_rank=\"{dp}\",attn_cp_rank=\"{cp}\",tp_rank=\"{cp}\"}} {}\n",
                    5 + dp
                );
            }
        }
        assert_eq!(load(&text).unwrap().queue, 11.0, "5 + 6, not 4 x (5 + 6)");
    }

    #[test]
    fn waiting_by_reason_is_not_added_to_the_queue() {
        let text = format!(
            "{VLLM}vllm:num_requests_waiting_by_reason{{engine=\"0\",model_name=\"m\",reason=\"capacity\"}} 6\n"
        );
        assert_eq!(load(&text).unwrap().queue, load(VLLM).unwrap().queue);
    }
}
