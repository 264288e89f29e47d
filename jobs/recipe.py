"""Training recipes: the one description of a job, YAML validated by pydantic.

A bad recipe fails in `load_recipe` with a `RecipeError` that names the field, the bad value
and what is allowed, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from privlm.validation import Strict as _Strict
from privlm.validation import problems, render


class Strict(_Strict):
    """privlm.validation's strict base; assignments are validated too (`--set` overrides, merges)."""

    model_config = ConfigDict(validate_assignment=True)


PosInt = Annotated[int, Field(gt=0)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class ModelConfig(Strict):
    """Architecture and size of a decoder-only model built from scratch (no hub downloads)."""

    architecture: Literal["llama", "gpt2"] = "llama"
    hidden_size: PosInt = 256
    num_layers: PosInt = 4
    num_heads: PosInt = 4
    num_kv_heads: PosInt | None = None
    intermediate_size: PosInt | None = None
    max_position_embeddings: PosInt = 2048
    vocab_size: PosInt | None = Field(None, description="defaults to tokenizer.vocab_size")
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    dropout: Ratio = 0.0

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}")
        if self.architecture == "gpt2" and self.num_kv_heads not in (None, self.num_heads):
            raise ValueError("gpt2 has no grouped-query attention: leave num_kv_heads unset")
        return self


class TokenizerConfig(Strict):
    """Byte-level BPE trained on the cleaned corpus, or an existing tokenizer directory."""

    path: str | None = Field(None, description="existing tokenizer directory; None trains one")
    vocab_size: PosInt = 8192
    min_frequency: PosInt = 2
    max_train_bytes: PosInt | None = Field(
        None, description="train on at most this many bytes of the train split (in a fixed order); None: all")

    @field_validator("vocab_size")
    @classmethod
    def _vocab_floor(cls, v: int) -> int:
        if v < 300:
            raise ValueError(f"{v} is too small for byte-level BPE: use at least 300 (256 bytes + specials)")
        return v


class DataSource(Strict):
    """One input: a directory or file. `{stdlib}` and `{purelib}` expand to this Python's folders, `{privlm}` to
    the checkout (for the data shipped with the recipes)."""

    path: str
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    include: list[str] = Field(default_factory=lambda: ["*.txt", "*.md", "*.py", "*.jsonl", "*.jsonl.gz",
                                                        "*.parquet"],
                               description="globs relative to path (or file names) of the files to read")
    exclude: list[str] = Field(default_factory=list)
    text_field: str = "text"
    max_files: PosInt | None = None
    weight: float | None = Field(None, gt=0, description="share of the train tokens from this source, relative to "
                                 "the other sources' weights; None on every source keeps the natural mix")
    record_schema: str | None = Field(None, description="JSON Schema file each JSONL/Parquet record must satisfy; "
                                      "records that fail go to the quarantine file with the reason")
    split: Literal["train", "eval", "test"] | None = Field(
        None, description="chat and preference data only: every record of this source goes to this split (a fixed "
        "held-out set); None: records are split by data.split's fractions")

    def resolved_path(self) -> Path:
        return _expand(self.path)

    def resolved_schema(self) -> Path | None:
        return _expand(self.record_schema).resolve() if self.record_schema else None

    @field_validator("path")
    @classmethod
    def _placeholders_known(cls, v: str) -> str:
        _expand(v)
        return v

    @field_validator("record_schema")
    @classmethod
    def _schema_is_valid(cls, v: str | None) -> str | None:
        if v is not None:
            from jobs.data.schema import check_schema_file

            check_schema_file(_expand(v))
        return v

    @model_validator(mode="after")
    def _schema_needs_records(self) -> DataSource:
        if self.record_schema and self.format == "text":
            raise ValueError(f"record_schema={self.record_schema!r} needs records: format={self.format!r} has none; "
                             "use format jsonl, parquet or auto, or remove record_schema")
        return self


def _expand(path: str) -> Path:
    """`{stdlib}`, `{purelib}` and `{prefix}` expanded to this Python's folders, `{privlm}` to the folder that
    holds privlm's code and recipes (the checkout), and `~` to the home folder."""
    paths = sysconfig.get_paths()
    try:
        expanded = path.format(stdlib=paths["stdlib"], purelib=paths["purelib"], prefix=sys.prefix,
                               privlm=Path(__file__).resolve().parents[1])
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{path!r} has a placeholder other than {{stdlib}}, {{purelib}}, {{prefix}} and "
                         "{privlm}; write a literal brace as {{ or }}") from None
    return Path(expanded).expanduser()


class FilterConfig(Strict):
    """Length filters and Gopher-style quality heuristics (Rae et al. 2021, appendix A)."""

    min_chars: int = Field(200, ge=0)
    max_chars: PosInt = 1_000_000
    min_words: int = Field(50, ge=0)
    max_words: PosInt = 200_000
    min_mean_word_length: float = Field(2.0, ge=0)
    max_mean_word_length: float = Field(12.0, gt=0)
    max_symbol_ratio: Ratio = Field(0.1, description="'#' and '...' per word")
    max_duplicate_line_fraction: Ratio = 0.3
    max_top_ngram_fraction: Ratio = Field(0.2, description="share of characters in the most common 2-gram")
    min_alpha_word_fraction: Ratio = Field(0.5, description="share of words with an alphabetic character")

    @model_validator(mode="after")
    def _ordered(self) -> FilterConfig:
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words"),
                       ("min_mean_word_length", "max_mean_word_length")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} is above {hi}={getattr(self, hi)}")
        return self


class LanguageConfig(Strict):
    """Language identification per document (lingua, offline), Traditional→Simplified conversion, which to keep."""

    detect: bool = True
    candidates: list[str] = Field(default_factory=lambda: ["en", "zh", "ja", "ko", "fr", "de", "es", "ru"],
                                  description="ISO 639-1 codes the detector chooses among (fewer is faster)")
    keep: list[str] | None = Field(None, description="languages to keep (plus 'und', undetermined, if listed); "
                                   "None keeps all")
    sample_chars: int = Field(1000, ge=50, description="characters of each document the detector reads")
    t2s: bool = Field(False, description="convert Chinese documents from Traditional to Simplified (OpenCC t2s)")

    @field_validator("candidates", "keep")
    @classmethod
    def _known_codes(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        from jobs.data.language import supported_codes

        bad = [c for c in v if c not in supported_codes()]
        if bad:
            raise ValueError(f"unknown language codes {bad}; use ISO 639-1 codes the detector knows, e.g. zh, en, ja")
        return v

    @model_validator(mode="after")
    def _enough_candidates(self) -> LanguageConfig:
        if self.detect and len(set(self.candidates)) < 2:
            raise ValueError(f"candidates={self.candidates} must name at least two languages for detection "
                             "(or set detect: false)")
        outside = sorted(set(self.keep or []) - set(self.candidates) - {"und"})
        if self.detect and outside:
            raise ValueError(f"keep={self.keep} names {outside}, which are not in candidates={self.candidates}; "
                             "add them to candidates")
        return self


class SplitConfig(Strict):
    """Stratified train/validation/test split; validation is stored as the `eval` split the trainer reads."""

    validation: float = Field(0.1, ge=0.0, lt=0.5)
    test: float = Field(0.1, ge=0.0, lt=0.5)
    by: str = Field("source", pattern=r"^(source|field:.+)$",
                    description="strata: 'source', or 'field:NAME' for a JSONL/Parquet record field")

    @property
    def field(self) -> str | None:
        return self.by.removeprefix("field:") if self.by.startswith("field:") else None


class DedupConfig(Strict):
    """Exact (SHA-256) and near-duplicate (MinHash LSH) removal."""

    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="estimated Jaccard above which docs are duplicates")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(5, ge=1, le=32, description="n-gram size of the shingles, in words; a CJK character "
                              "counts as a word, so Chinese text gets character n-grams")
    sentences: bool = Field(True, description="remove prose sentences repeated across documents (code is left "
                            "as it is); the first kept document keeps them")
    min_sentence_chars: int = Field(12, ge=1, description="shorter sentences are never removed")


class PIIConfig(Strict):
    """Which kinds of personal data are replaced by typed placeholders."""

    email: bool = True
    phone: bool = True
    ip_address: bool = True
    id_number: bool = True


class ChatDataConfig(Strict):
    """How chat and preference records become training sequences (data.format chat or preference)."""

    truncate: bool = Field(False, description="cut a sample longer than training.sequence_length to that length "
                           "(kept when assistant tokens remain); False skips it and counts it in the report")
    template: str | None = Field(None, description="a Jinja chat template file that replaces the tokenizer's; None "
                                 "uses the tokenizer's template, or privlm's default when it has none")

    def resolved_template(self) -> Path | None:
        return _expand(self.template).resolve() if self.template else None

    @field_validator("template")
    @classmethod
    def _template_exists(cls, v: str | None) -> str | None:
        if v is not None and not _expand(v).is_file():
            raise ValueError(f"{v!r} is not a file; point data.chat.template at a Jinja chat template, or remove it "
                             "to use the tokenizer's")
        return v


class DataConfig(Strict):
    """Raw inputs, cleaning thresholds, and where the shards go."""

    format: Literal["text", "chat", "preference"] = Field(
        "text", description="text: documents packed as a token stream; chat: JSONL with `messages` or "
        "`prompt`/`response`, loss on assistant tokens only; preference: JSONL with `prompt`, `chosen`, `rejected`")
    chat: ChatDataConfig = Field(default_factory=ChatDataConfig)
    sources: list[DataSource] = Field(min_length=1)
    output_dir: str = "data/{name}"
    num_shards: PosInt = 4
    workers: PosInt = 2
    eval_fraction: float | None = Field(None, ge=0.0, lt=0.5,
                                        description="shorthand for split: {validation: F, test: 0}")
    split: SplitConfig = Field(default_factory=SplitConfig)
    output_file_mb: float = Field(256.0, gt=0, description="size of one packed .bin file before a new one starts")
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    language_filters: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per language (ISO 639-1), filter thresholds that replace data.filters'")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)

    @model_validator(mode="after")
    def _split_and_mix(self) -> DataConfig:
        if self.eval_fraction is not None:
            shorthand = SplitConfig(validation=self.eval_fraction, test=0.0)
            if "split" in self.model_fields_set and self.split != shorthand:
                raise ValueError(f"eval_fraction={self.eval_fraction} and split={self.split.model_dump()} both set "
                                 "the split; keep one of them")
            object.__setattr__(self, "split", shorthand)
        if self.split.validation + self.split.test >= 0.9:
            raise ValueError(f"split validation={self.split.validation} + test={self.split.test} leaves under 10% "
                             "for training; lower them")
        weighted = [i for i, s in enumerate(self.sources) if s.weight is not None]
        if weighted and len(weighted) != len(self.sources):
            missing = [i for i in range(len(self.sources)) if i not in weighted]
            raise ValueError(f"data.sources{weighted} have a weight but data.sources{missing} do not; give every "
                             "source a weight, or none for the natural mix")
        for lang in self.language_filters:
            from jobs.data.language import supported_codes

            if lang not in supported_codes():
                raise ValueError(f"language_filters has {lang!r}, which is not an ISO 639-1 code the detector knows "
                                 "(e.g. zh, en)")
            self.filters_for(lang)  # raises with the field and value when a threshold is out of bounds
        fixed = [i for i, src in enumerate(self.sources) if src.split is not None]
        if fixed and self.format == "text":
            raise ValueError(f"data.sources{fixed} set split, which only chat and preference data take; remove it "
                             "or set data.format: chat or preference")
        return self

    def filters_for(self, lang: str) -> FilterConfig:
        """data.filters with the thresholds of data.language_filters[lang] in their place."""
        override = self.language_filters.get(lang)
        if not override:
            return self.filters
        unknown = sorted(set(override) - set(FilterConfig.model_fields))
        if unknown:
            raise ValueError(f"language_filters.{lang} has unknown fields {unknown}; use the fields of data.filters")
        try:
            return FilterConfig(**{**self.filters.model_dump(), **override})
        except ValidationError as exc:
            raise ValueError("; ".join(problems(exc, f"language_filters.{lang}"))) from None


class EarlyStoppingConfig(Strict):
    """Stop when the validation loss has not improved by `min_delta` for `patience` evaluations; the best
    checkpoint is the exported model."""

    patience: PosInt = 3
    min_delta: float = Field(0.0, ge=0)


class GuardConfig(Strict):
    """Divergence guard: a non-finite loss, or one above `spike_factor` x the running mean, rolls the run
    back to the last checkpoint and skips the offending batch."""

    enabled: bool = True
    spike_factor: float | None = Field(None, gt=1, description="None: only NaN/Inf trip the guard")
    warmup_steps: int = Field(5, ge=0, description="steps before spikes are judged (the mean must settle)")
    max_rollbacks: int = Field(3, ge=0, description="give up (exit 3) after this many rollbacks")


class ParallelConfig(Strict):
    """Model parallelism: tensor (DeepSpeed AutoTP) and pipeline (DeepSpeed PipelineModule) degrees; data
    parallelism takes the remaining ranks, world / (tensor x pipeline)."""

    tensor: PosInt = 1
    pipeline: PosInt = 1
    partition: Literal["uniform", "parameters"] = Field(
        "uniform", description="how layers split over pipeline stages (DeepSpeed's partition_method)")

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline


class TrainingConfig(Strict):
    """Batch geometry, schedule and stopping rule. Gradient accumulation is derived."""

    sequence_length: PosInt = 256
    micro_batch_size: PosInt = 8
    global_batch_size: PosInt = 32
    processes_per_node: PosInt = Field(1, description="ranks on one machine (GPUs, or CPU processes)")
    nodes: PosInt = 1
    learning_rate: float = Field(3e-4, gt=0, lt=1)
    min_learning_rate: float = Field(3e-5, ge=0, description="floor of the cosine decay")
    warmup_steps: int = Field(10, ge=0)
    max_steps: PosInt | None = None
    token_budget: PosInt | None = None
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 1234
    log_every: PosInt = 10
    activation_checkpointing: bool = False
    threads_per_process: PosInt | None = Field(None, description="torch threads per rank; 1 on CPU by default")
    eval_every: PosInt | None = Field(None, description="validate on the whole held-out split every N steps")
    early_stopping: EarlyStoppingConfig | None = None
    guard: GuardConfig = Field(default_factory=GuardConfig)
    record_samples: bool = Field(False, description="write each step's block ids per rank to run_dir/samples/")

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.sequence_length

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        assert self.token_budget is not None
        return max(1, -(-self.token_budget // self.tokens_per_step))

    def gradient_accumulation(self, data_parallel: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (pipeline: micro-batches in flight)."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel)

    def batch_geometry_error(self, data_parallel: int, layout: str) -> str | None:
        """Why the global batch does not split over `data_parallel` ranks (None when it does)."""
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step == 0:
            return None
        return (f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"x {layout} = {self.micro_batch_size} x {data_parallel} = {per_step}; "
                f"use e.g. global_batch_size={max(per_step, self.global_batch_size // per_step * per_step)}")

    @model_validator(mode="after")
    def _geometry(self) -> TrainingConfig:
        if self.eval_every is None and self.early_stopping is not None:
            raise ValueError("early_stopping needs eval_every (the validation interval, in steps)")
        if (self.max_steps is None) == (self.token_budget is None):
            raise ValueError("set exactly one of max_steps and token_budget")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"min_learning_rate={self.min_learning_rate} is above learning_rate={self.learning_rate}"
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below max_steps={self.max_steps}")
        return self


class OptimizerConfig(Strict):
    """Optimizer as DeepSpeed names it. `torch_adam` keeps resume bitwise exact on CPU."""

    type: Literal["AdamW", "Adam"] = "AdamW"
    torch_adam: bool = True
    eps: float = Field(1e-8, gt=0)


class DeepSpeedConfig(Strict):
    """What goes into the DeepSpeed JSON config; `extra` is merged in verbatim."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param={self.offload_param!r} needs zero_stage 3")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("nvme offload needs nvme_path (a local NVMe folder)")
        return self


class CheckpointConfig(Strict):
    """When and where checkpoints go. `interval: auto` picks the Young/Daly interval from the measured
    write time and `interruptions_per_hour`."""

    interval: PosInt | Literal["auto"] = 100
    keep: PosInt = 3
    directory: str = "runs/{name}/checkpoints"
    verify_checksums: bool = True
    interruptions_per_hour: float = Field(0.1, gt=0, description="expected preemptions, for interval: auto")
    s3_uri: str | None = Field(None, pattern=r"^s3://[a-z0-9.-]+(/.*)?$", description="also sync checkpoints here")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, tests); None for AWS")


class SpotConfig(Strict):
    """Watch the EC2 metadata service for spot interruption and rebalance notices."""

    watch: bool = False
    metadata_url: str = "http://169.254.169.254"
    poll_s: float = Field(5.0, gt=0)
    include_rebalance: bool = True


class LoRAConfig(Strict):
    """Low-rank adapters through peft."""

    rank: PosInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: Ratio = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class DPOConfig(Strict):
    """Direct preference optimisation (Rafailov et al. 2023) against a frozen reference model."""

    beta: float = Field(0.1, gt=0, description="strength of the KL tie to the reference")
    reference: str | None = Field(None, description="frozen reference model directory (default: finetune.base)")


class DistillConfig(Strict):
    """Knowledge distillation (Hinton et al. 2015): loss = T² · KL(teacher_T || student_T) + alpha · CE."""

    teacher: str = Field(description="models:/NAME@alias or models:/NAME/VERSION from the registry, or a model "
                                     "directory")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, description="weight of the cross-entropy on the data's labels")


class FinetuneConfig(Strict):
    """Start from a pretrained checkpoint directory or a Hugging Face model directory.

    method: full (every weight) or lora (adapters) — on text or chat data (`data.format`); dpo on preference
    pairs (full weights, or adapters with `lora_adapters`); distill: a student of `model`'s shape (from `base`
    when given, else freshly initialised) learns from `distill.teacher`."""

    base: str | None = None
    method: Literal["full", "lora", "dpo", "distill"] = "lora"
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _method(self) -> FinetuneConfig:
        if self.method != "distill" and not self.base:
            raise ValueError(f"finetune.method={self.method!r} needs finetune.base (the model to start from)")
        if self.method == "distill" and self.distill is None:
            raise ValueError("finetune.method='distill' needs finetune.distill.teacher, e.g. "
                             "models:/privlm-tiny@champion")
        return self


class ABPolicy(Strict):
    """When A/B feedback decides a promotion: Welch's t-test on the arms' feedback scores."""

    required: bool = Field(False, description="champion only on a significant A/B win (privlm model compare)")
    alpha: float = Field(0.05, gt=0, lt=1, description="the p-value below which a difference is significant")
    power: float = Field(0.8, gt=0, lt=1, description="for the minimum sample size per arm")
    min_effect: float = Field(0.3, gt=0, description="smallest effect size (Cohen's d) worth detecting")


class DriftPolicy(Strict):
    """When the served version's outputs have drifted: KL divergence of a recent window to its reference."""

    threshold: float = Field(0.15, gt=0, description="KL divergence above which drift is alerted")
    window: str = Field("1h", pattern=r"^[0-9]+[smhd]$", description="recent traffic compared, e.g. 30m, 1h")
    reference_window: str = Field("1h", pattern=r"^[0-9]+[smhd]$",
                                  description="traffic after promotion that becomes the reference")
    min_tokens: int = Field(200, gt=0, description="fewer generated tokens in a window: no verdict")


class PromotionPolicy(Strict):
    """When a challenger may replace the champion: a metric, its direction and a minimum margin."""

    metric: str = "eval_perplexity"
    direction: Literal["minimize", "maximize"] = "minimize"
    min_margin: float = Field(0.0, ge=0, description="absolute improvement the challenger must show")
    max_quantized_perplexity_delta: float = Field(
        0.05, ge=0, description="a quantized challenger's highest relative perplexity rise over its parent")
    ab: ABPolicy = Field(default_factory=ABPolicy)


class RegistryConfig(Strict):
    """MLflow tracking and the registered model this recipe's runs become."""

    tracking: bool = True
    experiment: str = "privlm"
    model_name: str | None = Field(None, description="registered model name; defaults to the recipe name")
    promotion: PromotionPolicy = Field(default_factory=PromotionPolicy)
    drift: DriftPolicy = Field(default_factory=DriftPolicy)


class SlurmConfig(Strict):
    """Where and how `privlm train submit` runs the job on Slurm (submitit); checked against `sinfo` first."""

    partition: str | None = Field(None, description="Slurm partition; None uses the cluster's default")
    time_limit_min: PosInt = Field(60, description="wall-clock limit per run; a job past it checkpoints and requeues")
    min_nodes: PosInt | None = Field(None, description="accept MIN..training.nodes nodes (sbatch --nodes=MIN-MAX): a "
                                     "requeue onto fewer nodes resumes the checkpoint on the smaller world size")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: PosInt | None = Field(None, description="CPUs per rank; default training.threads_per_process or 1")
    gpus_per_node: int | None = Field(None, ge=0, description="--gres=gpu:N; None: one per rank on GPU partitions")
    mem_gb: PosInt | None = Field(None, description="memory per node; None leaves Slurm's default")
    signal_delay_s: PosInt = Field(90, description="seconds before the time limit when the job is told to checkpoint")
    max_requeues: int = Field(20, ge=0, description="time-limit requeues before the job is given up")
    expected_step_s: float | None = Field(None, gt=0, description="step time estimate until one has been measured")
    sbatch: dict[str, str | int] = Field(default_factory=dict, description="extra #SBATCH options: {exclusive: ''}")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the ranks start")


class Recipe(Strict):
    """A whole job: model, tokenizer, data, training, DeepSpeed, checkpoints, optional fine-tuning."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    run_dir: str = "runs/{name}"
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig | None = None
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    spot: SpotConfig = Field(default_factory=SpotConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.model.vocab_size is None:
            self.model.vocab_size = self.tokenizer.vocab_size
        if self.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is below tokenizer.vocab_size="
                f"{self.tokenizer.vocab_size}; leave model.vocab_size unset to follow the tokenizer"
            )
        if self.training.sequence_length > self.model.max_position_embeddings:
            raise ValueError(
                f"training.sequence_length={self.training.sequence_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        if self.data.format != "text" and not self.tokenizer.path:
            raise ValueError(f"data.format={self.data.format!r} needs tokenizer.path: chat and preference data are "
                             "tokenized with the base model's tokenizer; set tokenizer.path, e.g. "
                             "data/tiny-cpu/tokenizer")
        ft = self.finetune
        if ft is not None and ft.method == "dpo" and self.data.format != "preference":
            raise ValueError(f"finetune.method='dpo' trains on preference pairs but data.format={self.data.format!r}; "
                             "set data.format: preference (prompt, chosen, rejected)")
        if self.data.format == "preference" and (ft is None or ft.method != "dpo"):
            raise ValueError("data.format='preference' is for finetune.method: dpo")
        problems = parallel_problems(self, self.training.world_size) or self._min_nodes_problems()
        if problems:
            raise ValueError("\n  - ".join(problems))
        if self.finetune and self.finetune.method == "lora" and self.model.architecture == "gpt2":
            bad = set(self.finetune.lora.target_modules) - {"c_attn", "c_proj", "c_fc"}
            if bad:
                raise ValueError(
                    f"finetune.lora.target_modules={sorted(bad)} do not exist in gpt2; use c_attn, c_proj, c_fc"
                )
        return self

    def _min_nodes_problems(self) -> list[str]:
        """slurm.min_nodes: at most training.nodes, and every node count it admits must split the batch."""
        t, low = self.training, self.slurm.min_nodes
        if low is None:
            return []
        if low > t.nodes:
            return [f"slurm.min_nodes={low} is above training.nodes={t.nodes}; set slurm.min_nodes to at most "
                    f"{t.nodes} (or leave it unset to require all {t.nodes})"]
        if low < t.nodes and t.processes_per_node > 1:
            return [f"slurm.min_nodes={low} with training.processes_per_node={t.processes_per_node}: a node range "
                    "runs one rank per node (with --ntasks-per-node Slurm allocates the range's minimum); set "
                    "training.processes_per_node: 1 or leave slurm.min_nodes unset"]
        for nodes in range(low, t.nodes):
            world = nodes * t.processes_per_node
            why = parallel_problems(self, world)
            if why:
                return [f"slurm.min_nodes={low}: on {nodes} node(s) ({world} ranks) the job could not run: {why[0]}; "
                        f"raise slurm.min_nodes above {nodes} or pick a batch every admitted size divides"]
        return []

    @property
    def data_parallel(self) -> int:
        """Data-parallel ranks of the recipe's own world size."""
        return self.training.world_size // self.parallel.model_parallel

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.training.gradient_accumulation(self.data_parallel)

    # --- resolved paths -------------------------------------------------------------------
    def _fmt(self, template: str) -> Path:
        return Path(template.format(name=self.name))

    @property
    def run_path(self) -> Path:
        return self._fmt(self.run_dir)

    @property
    def data_path(self) -> Path:
        return self._fmt(self.data.output_dir)

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name

    @property
    def checkpoint_path(self) -> Path:
        return self._fmt(self.checkpoint.directory)

    def fingerprint(self) -> str:
        """A stable hash of the whole recipe, for lineage and cache keys."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PIPELINE_ZERO = (0, 1)  # DeepSpeed's PipelineEngine asserts ZeRO < 2 ("incompatible with pipeline parallelism")
TENSOR_ZERO = (0, 1, 2)  # AutoTP training: "ZeRO Optimization: Stage 0, 1, or 2" (DeepSpeed's AutoTP tutorial)


def parallel_problems(recipe: Recipe, world_size: int) -> list[str]:
    """What stops `recipe` from running on `world_size` ranks with its tensor/pipeline layout, each naming
    the field, the value and the fix; the planner proposes only layouts for which this is empty."""
    par, ds, m = recipe.parallel, recipe.deepspeed, recipe.model
    t, p = par.tensor, par.pipeline
    out: list[str] = []
    if world_size % (t * p):
        out.append(f"parallel.tensor x parallel.pipeline = {t} x {p} = {t * p} does not divide the world size "
                   f"training.nodes x processes_per_node = {world_size}; pick degrees whose product divides it")
        return out
    if t > 1 and p > 1:
        out.append(f"parallel.tensor={t} with parallel.pipeline={p}: DeepSpeed's AutoTP builds a 2-D (data, "
                   "tensor) mesh and its PipelineEngine has no AutoTP path; set one of them to 1")
    if p > 1 and ds.zero_stage not in PIPELINE_ZERO:
        out.append(f"deepspeed.zero_stage={ds.zero_stage} with parallel.pipeline={p}: DeepSpeed's pipeline engine "
                   "runs ZeRO 0 or 1 only; set deepspeed.zero_stage: 1")
    if t > 1 and ds.zero_stage not in TENSOR_ZERO:
        out.append(f"deepspeed.zero_stage={ds.zero_stage} with parallel.tensor={t}: AutoTP training supports "
                   "ZeRO 0, 1 or 2; set deepspeed.zero_stage: 2 (or 1)")
    if p > 1 and m.num_layers < p:
        out.append(f"parallel.pipeline={p} is more than model.num_layers={m.num_layers}; use at most {m.num_layers}")
    if t > 1:
        kv = m.num_kv_heads or m.num_heads
        for name, value in (("model.num_heads", m.num_heads), ("model.num_kv_heads", kv)):
            if value % t:
                out.append(f"{name}={value} is not divisible by parallel.tensor={t}: AutoTP splits heads evenly; "
                           f"use a tensor degree that divides {value}")
    if (t > 1 or p > 1) and recipe.finetune is not None and recipe.finetune.method in ("dpo", "distill"):
        out.append(f"finetune.method={recipe.finetune.method!r} with parallel.tensor={t}, parallel.pipeline={p}: "
                   "the second (reference or teacher) model runs beside the data-parallel engine only; set "
                   "parallel.tensor and parallel.pipeline to 1")
    if p > 1 and recipe.data.format != "text":
        out.append(f"data.format={recipe.data.format!r} with parallel.pipeline={p}: the pipeline stages take no "
                   "attention mask for packed samples; set parallel.pipeline: 1")
    if (t > 1 or p > 1) and recipe.finetune is not None and recipe.finetune.method == "lora":
        out.append(f"finetune.method='lora' with parallel.tensor={t}, parallel.pipeline={p}: adapters train with "
                   "data parallelism only; set parallel.tensor and parallel.pipeline to 1 (ZeRO-3 fits large bases)")
    if p > 1 and ds.offload_optimizer != "none":
        out.append(f"deepspeed.offload_optimizer={ds.offload_optimizer!r} with parallel.pipeline={p}: not with "
                   "the pipeline engine; set deepspeed.offload_optimizer: none")
    dp = world_size // (t * p)
    layout = "data-parallel ranks (world / (tensor x pipeline))" if t * p > 1 else "world size"
    geometry = recipe.training.batch_geometry_error(dp, layout)
    if geometry:
        out.append(f"training.{geometry}")
    return out


class RecipeError(ValueError):
    """A recipe that cannot run, with one line per problem: field, value, what is allowed."""


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; raise RecipeError listing every problem."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(render(exc, source, "recipe")) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `a.b.c=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (recipes/ has the shipped ones)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
    return parse_recipe(data, str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `training.max_steps=20` style overrides (values parsed as YAML) in place."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, as it is saved next to checkpoints and models."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
