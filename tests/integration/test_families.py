"""Model families end to end: SDXL (`tiny-xl`) through `sdray generate`, `sdray sweep` and
`sdray serve`; unsupported families refused in one line before Ray starts anything; a resume
onto another family refused naming the change."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .cli import read_metadata, run_cli
from .serve_harness import start_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "configs" / "examples" / "prompts.csv"
XL = ["--set", "model.source=tiny-xl", "--set", "generation.steps=2"]


@pytest.fixture(scope="module")
def xl_output(tmp_path_factory, sdray_env):
    """The example prompt table generated with the tiny SDXL."""
    output = tmp_path_factory.mktemp("xl") / "out"
    result = run_cli(["generate", "--input", str(PROMPTS), "--output", str(output), *XL], sdray_env)
    assert result.returncode == 0, result.stderr
    return output


def test_generate_runs_sdxl_and_records_its_family(xl_output):
    import pyarrow.csv as pacsv

    rows = {r["id"]: r for r in read_metadata(xl_output)}
    options = pacsv.ConvertOptions(strings_can_be_null=True)
    given = {r["id"]: r for r in pacsv.read_csv(PROMPTS, convert_options=options).to_pylist()}
    assert set(rows) == set(given)  # every row, exactly once
    assert {r["model_family"] for r in rows.values()} == {"sdxl"}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok and all((xl_output / r["image_path"]).is_file() for r in ok)
    for row in ok:  # rows without a size take the model's native one, 96x96 for tiny-xl
        image = Image.open(xl_output / row["image_path"])
        assert image.size == (row["width"], row["height"])
        if given[row["id"]].get("width") is None:
            assert row["width"] == 96
    manifest = json.loads((xl_output / "manifest.json").read_text())
    assert manifest["model"]["family"] == "sdxl"
    assert manifest["model"]["plan"]["class_name"] == "StableDiffusionXLPipeline"
    assert manifest["fingerprint_parts"]["model_family"] == "sdxl"


def test_a_resume_onto_another_family_is_refused_naming_it(xl_output, sdray_env):
    result = run_cli(
        [
            "generate",
            "--input",
            str(PROMPTS),
            "--output",
            str(xl_output),
            "--resume",
            "--set",
            "model.source=tiny",
            "--set",
            "generation.steps=2",
        ],
        sdray_env,
    )
    assert result.returncode == 2
    assert "model_family: 'sdxl' -> 'sd'" in result.stderr


def _flux(directory: Path) -> Path:
    from sdray.models import resolve_model

    shutil.copytree(resolve_model("tiny-xl").directory, directory)
    index = json.loads((directory / "model_index.json").read_text())
    (directory / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "FluxPipeline"})
    )
    return directory


def test_an_unsupported_family_is_refused_before_ray_starts(tmp_path, model_cache):
    """In a fresh process: the refusal is one line, and no Ray (so no actor, no replica) ran."""
    flux = _flux(tmp_path / "flux")
    script = f"""
import ray, sys
from sdray.config import load_config
from sdray.errors import ModelError
config = load_config(None, ["model.source={flux}"])
for name, call in [
    ("generate", lambda: __import__("sdray.batch", fromlist=["x"]).run_generate(
        {str(PROMPTS)!r}, {str(tmp_path / "out")!r}, config, progress=False)),
    ("serve", lambda: __import__("sdray.serve", fromlist=["x"]).run_server(config, port=1)),
]:
    try:
        call()
    except ModelError as error:
        print(name, "|", error, "|", ray.is_initialized())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    for line, command in zip(lines, ["generate", "serve"], strict=True):
        name, message, initialized = line.split(" | ")
        assert name == command and initialized == "False"
        assert "is a FluxPipeline, which sdray does not run" in message
    assert not (tmp_path / "out").exists()


def test_sweep_runs_on_sdxl(tmp_path, sdray_env):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: xl\nprompts: [a red square, a blue circle]\n"
        "axes:\n  guidance_scale: [1.0, 5.0]\n  width: 64\n  height: 64\n"
    )
    output = tmp_path / "out"
    result = run_cli(["sweep", str(spec), "--output", str(output), *XL], sdray_env)
    assert result.returncode == 0, result.stderr
    rows = read_metadata(output)
    assert len(rows) == 4 and {r["model_family"] for r in rows} == {"sdxl"}
    assert {r["status"] for r in rows} == {"ok"}
    sheets = json.loads((output / "contact_sheets" / "index.json").read_text())
    assert sheets and (output / "index.html").is_file()


def test_serve_answers_the_openai_client_with_sdxl(tmp_path, sdray_env, xl_output):
    import openai

    config = {"model": {"source": "tiny-xl"}, "generation": {"steps": 2}}
    server = start_server(tmp_path, sdray_env, config, api_keys=None)
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["family"]) for m in models] == [("tiny-xl", "sdxl")]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)
        # The same row as offline: online == offline for SDXL too.
        row = next(r for r in read_metadata(xl_output) if r["status"] == "ok")
        answer = client.images.generate(
            model="tiny-xl",
            prompt=row["prompt"],
            size=f"{row['width']}x{row['height']}",
            response_format="b64_json",
            extra_body={
                "seed": row["seed"],
                "negative_prompt": row["negative_prompt"],
                "steps": row["steps"],
                "guidance_scale": row["guidance_scale"],
                "scheduler": row["scheduler"],
            },
        )
        online = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
        offline = Image.open(xl_output / row["image_path"])
        assert online.size == offline.size == (row["width"], row["height"])
        # Same image whatever batch it rode in (test_engine.py's contract); other seeds give ~10.
        mse = np.mean((np.asarray(online, float) - np.asarray(offline.convert("RGB"), float)) ** 2)
        assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 40
    finally:
        server.cleanup()
