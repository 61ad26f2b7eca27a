"""Model sources: the tiny model is deterministic; local directories; pickle refusal."""

import shutil

import pytest

from sdray.errors import ModelError
from sdray.models import model_hash, resolve_model
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


def test_local_directory_source(tmp_path, model_cache):
    copy = tmp_path / "my-model"
    shutil.copytree(resolve_model("tiny").directory, copy)
    files = resolve_model(str(copy))
    assert files.directory == copy and files.name == str(copy)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="missing tokenizer/, text_encoder/"):
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
