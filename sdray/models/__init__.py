"""Model sources: the embedded tiny model, a local diffusers directory, or an fsspec URI of one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from sdray.errors import ModelError
from sdray.families import SD, ModelPlan, components, plan_model, weight_components

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Weights of other frameworks, which loading (PyTorch) never reads.
OTHER_FRAMEWORK_SUFFIXES = (".msgpack", ".h5", ".onnx", ".onnx_data", ".ot")
_HASH_FILE = ".sdray-model.json"


@dataclass(frozen=True)
class ModelFiles:
    """A model resolved to a complete local diffusers directory, and its plan."""

    source: str
    directory: Path
    name: str
    plan: ModelPlan


def cache_root(cache_dir: str | None = None) -> Path:
    """The local model cache: config, then $SDRAY_CACHE_DIR, then ~/.cache/sdray."""
    root = cache_dir or os.environ.get("SDRAY_CACHE_DIR") or Path.home() / ".cache" / "sdray"
    return Path(root).expanduser()


def _materialize_once(target: Path, fill) -> Path:
    """Create `target` with `fill(tmp_dir)` exactly once per node, never exposing a partial copy.

    A file lock serialises processes on this node; the copy is built in a temporary directory
    and renamed into place, so a reader sees either nothing or the complete directory.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=3600):
        if target.is_dir():
            return target
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
        try:
            fill(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _weight_kind(name: str) -> tuple[str, bool] | None:
    """("safetensors" | "pickle", is a variant) for a weight or shard-index file, else None.

    A variant carries a dotted tag before its suffix: `diffusion_pytorch_model.fp16.safetensors`,
    `model.safetensors.index.fp16.json`, `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`.
    """
    index = re.fullmatch(r"(.+)\.(safetensors|bin)\.index(\.[^.]+)?\.json", name)
    if index:
        return ("safetensors" if index[2] == "safetensors" else "pickle", bool(index[3]))
    for suffix, kind in (
        (".safetensors", "safetensors"),
        *((s, "pickle") for s in PICKLE_SUFFIXES),
    ):
        if name.endswith(suffix):
            stem = re.sub(r"-\d+-of-\d+$", "", name[: -len(suffix)])
            return kind, "." in stem
    return None


def _loadable_weights(paths: list[str], allow_pickle: bool) -> list[str]:
    """A weight folder's files minus the weights loading never reads.

    Pickle files go when safetensors exist or pickle is not allowed; other variants (fp16, ...)
    go when the plain weights exist; other frameworks' weights (Flax, TF, ONNX) always go.
    """
    kinds = {p: _weight_kind(p.rsplit("/", 1)[-1]) for p in paths}
    formats = {k[0] for k in kinds.values() if k}
    keep = "safetensors" if "safetensors" in formats else "pickle" if allow_pickle else None
    plain = any(k == (keep, False) for k in kinds.values())
    return [
        p
        for p, kind in kinds.items()
        if (kind is None and not p.endswith(OTHER_FRAMEWORK_SUFFIXES))
        or (kind is not None and kind[0] == keep and not (plain and kind[1]))
    ]


def select_model_files(paths: list[str], *, allow_pickle: bool, family: str = SD) -> list[str]:
    """Of a model's files (relative paths), the ones loading reads: `model_index.json` and the
    family's component folders, with only the weights that will load (see `_loadable_weights`)."""
    chosen = [p for p in paths if p == "model_index.json"]
    for component in components(family):
        files = [p for p in paths if p.startswith(component + "/")]
        if component in weight_components(family):
            files = _loadable_weights(files, allow_pickle)
        chosen.extend(files)
    return sorted(chosen)


def _remote_listing(source: str, storage_options: dict[str, Any] | None):
    """(fs, base path, {relative path: info}, plan) of a remote model; reads only its configs."""
    from sdray.storage import filesystem

    fs, path = filesystem(source, storage_options)
    base = path.rstrip("/") + "/"
    fs.invalidate_cache(path.rstrip("/"))  # a long-lived process must see a changed model
    listing = {
        key[len(base) :]: info
        for key, info in fs.find(base, detail=True).items()
        if key.startswith(base)
    }
    if not listing:
        raise ModelError(f"model.source {source!r} does not exist or is empty")

    def read_json(relative: str) -> dict[str, Any] | None:
        if relative not in listing:
            return None
        return _parse_json(fs.cat_file(base + relative), relative, source)

    return fs, base, listing, plan_model(list(listing), read_json, source)


def _parse_json(data: bytes | str, relative: str, source: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:
        raise ModelError(f"model {source!r}: {relative} is not valid JSON ({error})") from None


def plan_directory(directory: Path, source: str) -> ModelPlan:
    """`plan_model` of a local model directory."""
    if not directory.is_dir():
        raise ModelError(
            f"model.source {source!r} is not a directory (nor an embedded model: "
            f"{', '.join(EMBEDDED)}; nor a URI)"
        )
    files = [
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".sdray")
    ]

    def read_json(relative: str) -> dict[str, Any] | None:
        path = directory / relative
        return _parse_json(path.read_bytes(), relative, source) if path.is_file() else None

    return plan_model(files, read_json, source)


def _listing_hash(listing: dict[str, dict[str, Any]]) -> str:
    entries = sorted(
        (
            key,
            info.get("size"),
            str(info.get("ETag") or info.get("etag") or info.get("mtime") or ""),
        )
        for key, info in listing.items()
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _download(source: str, fs, base: str, files: dict[str, dict[str, Any]]):
    """Fill a directory with `files` of a remote model, one by one (the store's client retries
    transient errors)."""
    for relative in files:
        if any(part in ("", ".", "..") for part in relative.split("/")):
            raise ModelError(f"model {source!r}: refusing the file name {relative!r}")

    def fill(tmp: Path) -> None:
        for relative, info in files.items():
            local = tmp / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(base + relative, str(local))
            if info.get("size") is not None and local.stat().st_size != info["size"]:
                raise ModelError(
                    f"model {source!r} changed while it was being copied ({relative}); try again"
                )

    return fill


def resolve_model(
    source: str,
    *,
    cache_dir: str | None = None,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    expected_sha256: str | None = None,
) -> ModelFiles:
    """Turn `model.source` into a checked local diffusers directory (building or copying it).

    A remote model is copied once per node into a cache directory named by its listing hash
    (`remote_model_hash`): a changed model is a new directory, never the old copy.
    `expected_sha256` (the identity a job recorded when it started, see `model_identity`)
    refuses a model that has changed since, so one run never mixes two models.
    """
    root = cache_root(cache_dir)
    if source in EMBEDDED:
        version, build = EMBEDDED[source]()
        directory = _materialize_once(root / "models" / version, build)
        name = source
    elif _is_remote(source):
        fs, base, listing, plan = _remote_listing(source, storage_options)
        for component in weight_components(plan.family):
            names = [k.rsplit("/", 1)[-1] for k in listing if k.startswith(component + "/")]
            _check_weights(names, component, source, allow_pickle=allow_pickle)
        files = select_model_files(list(listing), allow_pickle=allow_pickle, family=plan.family)
        identity = _listing_hash(listing)
        _check_unchanged(source, identity, expected_sha256)
        directory = _materialize_once(
            root / "remote" / identity[:32],
            _download(source, fs, base, {f: listing[f] for f in files}),
        )
        name = source.rstrip("/")
    else:
        directory = Path(source.removeprefix("file://")).expanduser()
        name = str(directory)
    plan = check_model_directory(directory, source, allow_pickle=allow_pickle)
    if expected_sha256 is not None and not _is_remote(source):
        actual = model_hash(directory, family=plan.family, allow_pickle=allow_pickle)
        _check_unchanged(source, actual, expected_sha256)
    return ModelFiles(source=source, directory=directory, name=name, plan=plan)


def _tiny():
    from sdray.models.tiny import build_tiny_model, shipped_version

    return shipped_version(), build_tiny_model


def _tiny_xl():
    from sdray.models.tiny_xl import TINY_XL_VERSION, build_tiny_xl_model

    return TINY_XL_VERSION, build_tiny_xl_model


# Embedded models (no download): name -> (cache version, builder), imported on use. `tiny`
# is trained here and shipped in the package; `tiny-xl` is built in code with random weights.
EMBEDDED = {"tiny": _tiny, "tiny-xl": _tiny_xl}


def _check_unchanged(source: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise ModelError(
            f"model {source!r} changed while the job was running (sha256 {expected[:12]}... "
            f"when it started, {actual[:12]}... now); rerun the job with --overwrite against "
            "the model you mean, or restore the old one and --resume"
        )


def check_model_directory(directory: Path, source: str, *, allow_pickle: bool) -> ModelPlan:
    """Refuse models of other families, incomplete directories and pickle-only weights unless
    allowed; return the model's plan."""
    plan = plan_directory(directory, source)
    for component in weight_components(plan.family):
        names = [p.name for p in (directory / component).iterdir()]
        _check_weights(names, component, source, allow_pickle=allow_pickle)
    return plan


def _check_weights(names: list[str], component: str, source: str, *, allow_pickle: bool) -> None:
    """Refuse a weight folder (its file names) with no weights, or only pickle ones unless allowed."""
    if any(f.endswith(".safetensors") for f in names):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in names):
        if not allow_pickle:
            raise ModelError(
                f"model {source!r}: {component}/ has only pickle weight files "
                f"({', '.join(sorted(f for f in names if f.endswith(PICKLE_SUFFIXES)))}); "
                "pickle files can run arbitrary code when loaded. Convert them to "
                "safetensors, or set model.allow_pickle=true if you trust them."
            )
        return
    raise ModelError(f"model {source!r}: {component}/ holds no weight files")


def model_hash(directory: Path, *, family: str | None = None, allow_pickle: bool = False) -> str:
    """sha256 over the files loading reads (`select_model_files`: paths and bytes; a README,
    another framework's weights or an unused folder beside them change nothing), cached beside
    the model by size+mtime, so each node hashes a model once."""
    if family is None:
        family = plan_directory(directory, str(directory)).family
    present = [
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".sdray")
    ]
    chosen = select_model_files(present, allow_pickle=allow_pickle, family=family)
    files = [directory / relative for relative in chosen]
    stamp = [[str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cached = directory / _HASH_FILE
    try:
        record = json.loads(cached.read_text())
        if record.get("stamp") == stamp:
            return record["sha256"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        cached.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:
        pass  # read-only model directories are fine; we just hash again next time
    return value


def remote_model_hash(source: str, storage_options: dict[str, Any] | None = None) -> str:
    """sha256 over a remote model's listing (paths, sizes, ETags): its identity, no download."""
    return _listing_hash(_remote_listing(source, storage_options)[2])


def model_identity(
    source: str,
    *,
    cache_dir: str | None = None,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[dict[str, str], ModelPlan]:
    """The model's source, display name, content hash and family, and its plan: checked in the
    driver before any actor starts.

    Local and embedded models are hashed by content; a remote model by its listing (its configs
    are read, never its weights), so the driver never downloads weights it does not use.
    """
    if _is_remote(source):
        _, _, listing, plan = _remote_listing(source, storage_options)
        for component in weight_components(plan.family):
            names = [k.rsplit("/", 1)[-1] for k in listing if k.startswith(component + "/")]
            _check_weights(names, component, source, allow_pickle=allow_pickle)
        identity = {"source": source, "name": source.rstrip("/"), "sha256": _listing_hash(listing)}
    else:
        files = resolve_model(source, cache_dir=cache_dir, allow_pickle=allow_pickle)
        plan = files.plan
        identity = {
            "source": files.source,
            "name": files.name,
            "sha256": model_hash(files.directory, family=plan.family, allow_pickle=allow_pickle),
        }
    return {**identity, "family": plan.family}, plan


def load_denoiser(
    files: ModelFiles, *, device: str, dtype: str, allow_pickle: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """Load the UNet and VAE onto a device (the VAE in the dtype the family needs), and the
    scheduler config. The text parts are the family's to load (`sdray.families`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    quiet_libraries()
    use_safetensors = None if allow_pickle else True
    d = files.directory
    unet = UNet2DConditionModel.from_pretrained(
        d / "unet", torch_dtype=getattr(torch, dtype), use_safetensors=use_safetensors
    )
    vae = AutoencoderKL.from_pretrained(
        d / "vae",
        torch_dtype=getattr(torch, files.plan.vae_dtype(dtype)),
        use_safetensors=use_safetensors,
    )
    scheduler_config = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae):
        module.to(device).eval().requires_grad_(False)
    return unet, vae, scheduler_config


def quiet_libraries() -> None:
    """diffusers and transformers: errors only, no progress bars."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
