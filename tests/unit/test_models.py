"""Model sources: the tiny model is deterministic; local directories; pickle refusal; remote\ncopies keyed by content, holding only what loading reads."""

import json
import shutil
import uuid

import pytest

from sdray.errors import ModelError
from sdray.models import model_hash, remote_model_hash, resolve_model, select_model_files
from sdray.models.tiny import build_tiny_model


def test_tiny_model_builds_the_same_weights_everywhere(tmp_path, model_cache):
    cached = resolve_model("tiny")
    build_tiny_model(tmp_path / "again")
    assert model_hash(tmp_path / "again") == model_hash(cached.directory)


def test_tiny_tokenizer_and_architecture(tiny_engine):
    assert tiny_engine.tokenizer.model_max_length == 77
    assert (
        tiny_engine.unet.config.cross_attention_dim == tiny_engine.text_encoder.config.hidden_size
    )
    assert tiny_engine.vae_scale_factor == 8
    ids = tiny_engine.tokenizer("a fox").input_ids
    assert (
        ids[0] == tiny_engine.tokenizer.bos_token_id
        and ids[-1] == tiny_engine.tokenizer.eos_token_id
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_every_diffusers_pipeline_of_the_family_loads_the_embedded_model(name, model_cache):
    """The embedded models are ordinary diffusers directories: each pipeline class of their
    family (text-to-image, image-to-image, inpainting) loads them as it would a hub model."""
    import diffusers

    from sdray.families import PIPELINE_CLASSES, detect_family

    directory = resolve_model(name).directory
    family = detect_family(json.loads((directory / "model_index.json").read_text()), name)
    for class_name in PIPELINE_CLASSES[family]:
        extra = {"safety_checker": None, "requires_safety_checker": False}
        if "XL" in class_name:
            extra = {"add_watermarker": False}
        pipe = getattr(diffusers, class_name).from_pretrained(directory, **extra)
        assert type(pipe).__name__ == class_name
        assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_the_model_hash_covers_what_loads_and_only_that(tmp_path, model_cache):
    """A README, another framework's weights or pickle weights not loaded beside safetensors
    leave the model's identity alone; a byte of a weight that loads changes it."""
    local = tmp_path / "model"
    shutil.copytree(resolve_model("tiny").directory, local)
    before = model_hash(local)
    (local / "README.md").write_text("a model card")
    (local / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle, never loaded")
    (local / "text_encoder" / "flax_model.msgpack").write_bytes(b"flax")
    assert model_hash(local) == before
    assert model_hash(local, allow_pickle=True) == before  # safetensors still win
    weights = next((local / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_hash(local) != before


def test_local_directory_source(tmp_path, model_cache):
    copy = tmp_path / "my-model"
    shutil.copytree(resolve_model("tiny").directory, copy)
    files = resolve_model(str(copy))
    assert files.directory == copy and files.name == str(copy)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_model(str(tmp_path / "empty"))


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, model_cache):
    import torch
    from safetensors.torch import load_file

    copy = tmp_path / "pickled"
    shutil.copytree(resolve_model("tiny").directory, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match="only pickle weight files"):
        resolve_model(str(copy))
    assert resolve_model(str(copy), allow_pickle=True).directory == copy

    from sdray.config import ModelConfig
    from sdray.engine import DiffusionEngine

    engine = DiffusionEngine.from_config(
        ModelConfig(source=str(copy), device="cpu", allow_pickle=True)
    )
    assert engine.unet is not None


def test_only_the_files_loading_reads_are_selected():
    listing = [
        "model_index.json",
        "README.md",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
        "text_encoder/tf_model.h5",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]
    expected = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        # No plain safetensors here: the variant is all there is to load.
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert select_model_files(listing, allow_pickle=False) == expected
    assert select_model_files(listing, allow_pickle=True) == expected
    pickled = ["vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/x.fp16.bin"]
    assert select_model_files(pickled, allow_pickle=False) == ["vae/config.json"]
    assert select_model_files(pickled, allow_pickle=True) == pickled[:2]


@pytest.fixture
def bucket(model_cache):
    """The tiny model, with files loading never reads, in an fsspec memory:// "bucket"."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/sdray-test-{uuid.uuid4().hex}/models/tiny"
    tiny = resolve_model("tiny").directory
    for path in tiny.rglob("*"):
        if path.is_file() and not path.name.startswith(".sdray"):
            fs.pipe_file(f"{root}/{path.relative_to(tiny)}", path.read_bytes())
    extras = {
        "unet/diffusion_pytorch_model.fp16.safetensors": b"variant",
        "unet/diffusion_pytorch_model.bin": b"pickle",
        "text_encoder/flax_model.msgpack": b"flax",
        "safety_checker/model.safetensors": b"unused component",
        "README.md": b"readme",
    }
    for relative, data in extras.items():
        fs.pipe_file(f"{root}/{relative}", data)
    try:
        yield {"fs": fs, "root": root, "uri": f"memory://{root}/", "tiny": tiny}
    finally:
        fs.rm(root.rsplit("/models/", 1)[0], recursive=True)


def _files(directory):
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".sdray")
    )


def test_remote_model_copies_only_what_loads(bucket, tmp_path, monkeypatch):
    fs = bucket["fs"]
    fetched = []
    get_file = fs.get_file
    monkeypatch.setattr(
        fs,
        "get_file",
        lambda rpath, lpath, **kw: fetched.append(rpath) or get_file(rpath, lpath, **kw),
    )
    files = resolve_model(bucket["uri"], cache_dir=str(tmp_path))
    assert files.name == bucket["uri"].rstrip("/")
    assert files.directory.parent == tmp_path / "remote"
    assert files.directory.name == remote_model_hash(bucket["uri"])[:32]
    loads = [f for f in _files(bucket["tiny"]) if f != "training.json"]  # a record, not weights
    assert _files(files.directory) == loads
    assert len(fetched) == len(loads)  # file by file, nothing else
    assert resolve_model(bucket["uri"], cache_dir=str(tmp_path)).directory == files.directory
    assert len(fetched) == len(loads)  # cached: no second copy
    assert not [p for p in (tmp_path / "remote").iterdir() if p.name.endswith(".partial")]


def test_changed_remote_model_is_fetched_anew(bucket, tmp_path):
    first = resolve_model(bucket["uri"], cache_dir=str(tmp_path)).directory
    config = f"{bucket['root']}/scheduler/scheduler_config.json"
    changed = json.loads(bucket["fs"].cat_file(config))
    changed["steps_offset"] = 7
    bucket["fs"].pipe_file(config, json.dumps(changed, indent=4).encode())
    second = resolve_model(bucket["uri"], cache_dir=str(tmp_path)).directory
    assert second != first and second.name == remote_model_hash(bucket["uri"])[:32]
    assert json.loads((second / "scheduler" / "scheduler_config.json").read_text()) == changed
    assert json.loads((first / "scheduler" / "scheduler_config.json").read_text()) != changed


def test_a_model_changed_since_the_job_started_is_refused(bucket, tmp_path, model_cache):
    started = remote_model_hash(bucket["uri"])
    resolve_model(bucket["uri"], cache_dir=str(tmp_path), expected_sha256=started)
    config = f"{bucket['root']}/scheduler/scheduler_config.json"
    bucket["fs"].pipe_file(config, bucket["fs"].cat_file(config) + b"\n")
    with pytest.raises(ModelError, match="changed while the job was running"):
        resolve_model(bucket["uri"], cache_dir=str(tmp_path), expected_sha256=started)
    assert len([p for p in (tmp_path / "remote").iterdir() if p.is_dir()]) == 1  # no new copy

    local = tmp_path / "local-model"
    shutil.copytree(resolve_model("tiny").directory, local)
    started = model_hash(local)
    assert resolve_model(str(local), expected_sha256=started).directory == local
    (local / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(ModelError, match="changed while the job was running"):
        resolve_model(str(local), expected_sha256=started)


def test_remote_pickle_only_weights_are_refused_before_copying(bucket, tmp_path):
    bucket["fs"].rm(f"{bucket['root']}/unet/diffusion_pytorch_model.safetensors")
    bucket["fs"].rm(f"{bucket['root']}/unet/diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ModelError, match="only pickle weight files"):
        resolve_model(bucket["uri"], cache_dir=str(tmp_path))
    assert not (tmp_path / "remote").exists()
    files = resolve_model(bucket["uri"], cache_dir=str(tmp_path), allow_pickle=True)
    assert (files.directory / "unet" / "diffusion_pytorch_model.bin").read_bytes() == b"pickle"
