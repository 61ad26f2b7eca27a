"""Runs that survive kills and faults: SIGKILL and resume, a crashing actor, config changes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .cli import SDRAY, run_cli

pytestmark = pytest.mark.integration

JOB = [
    "--no-progress",
    "--set",
    "generation.steps=25",
    "--set",
    "generation.width=128",
    "--set",
    "generation.height=128",
    "--set",
    "batch.batch_size=2",
    "--set",
    "output.rows_per_shard=2",
    "--set",
    "batch.min_actors=2",
    "--set",
    "batch.max_actors=2",
]

# One step at 64x64: for tests about bookkeeping, not images.
QUICK = [
    "--set",
    "generation.steps=1",
    "--set",
    "generation.width=64",
    "--set",
    "generation.height=64",
]


def write_prompts(path: Path, n: int) -> None:
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i:03d}" for i in range(n)],
                "prompt": [f"a city, view {i}" for i in range(n)],
            }
        ),
        path,
    )


def metadata_rows(output: Path) -> list[dict]:
    return pq.read_table(output / "metadata").to_pylist()


def check_invariants(output: Path, n: int) -> list[dict]:
    rows = metadata_rows(output)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n, "every input row exactly once"
    assert set(ids) == {f"r{i:03d}" for i in range(n)}
    for row in rows:
        assert row["status"] == "ok", row
        data = (output / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    # Every stored image belongs to exactly one committed row: nothing orphaned or duplicated.
    stored = {p.relative_to(output).as_posix() for p in (output / "images").rglob("*.png")}
    assert stored == {r["image_path"] for r in rows}
    assert not list(output.rglob("*.tmp"))
    return rows


def committed_shards(output: Path) -> dict[str, int]:
    directory = output / "metadata"
    if not directory.exists():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.parquet")}


def settled_shards(output: Path, quiet_s: float = 3.0, limit_s: float = 60.0) -> dict[str, int]:
    """The committed shards once none has appeared for `quiet_s`.

    The killed driver's workers may still finish a write in flight; wait them out, bounded.
    """
    deadline = time.monotonic() + limit_s
    seen = committed_shards(output)
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < quiet_s:
        time.sleep(0.2)
        now = committed_shards(output)
        if now != seen:
            seen, stable_since = now, time.monotonic()
    return seen


def test_sigkill_then_resume(tmp_path, sdray_env):
    n = 60
    source = tmp_path / "prompts.parquet"
    write_prompts(source, n)
    output = tmp_path / "out"
    driver = subprocess.Popen(
        [SDRAY, "generate", "--input", str(source), "--output", str(output), *JOB],
        env=sdray_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(committed_shards(output)) < 3:
        assert driver.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    before = settled_shards(output)
    assert 3 <= len(before) < n // 2, f"killed after {len(before)} of {n // 2} shards"
    # No reader ever sees a half-written file: every visible metadata shard parses, and each
    # holds exactly rows_per_shard rows (only a run's last shard may be short).
    committed_ids = set()
    for name in before:
        table = pq.read_table(output / "metadata" / name, columns=["id"])
        assert table.num_rows == 2, name
        committed_ids |= set(table.column("id").to_pylist())
    assert len(committed_ids) == 2 * len(before)

    # What a write killed between its images and its metadata leaves behind.
    orphan = output / "images" / "part-deadbeef-00000-0000"
    orphan.mkdir(parents=True)
    (orphan / "0123.png").write_bytes(b"half a shard")
    (output / "metadata" / ".part-deadbeef-00000-0000.parquet.77.tmp").write_bytes(b"half")

    refused = subprocess.run(
        [SDRAY, "generate", "--input", str(source), "--output", str(output), *JOB],
        env=sdray_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "--resume" in refused.stderr

    resumed = subprocess.run(  # with paths relative to where the user is, as typed at a shell
        [SDRAY, "generate", "--input", source.name, "--output", output.name, "--resume", *JOB],
        env=sdray_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["counts"]["generated_this_run"] == n - len(committed_ids)
    check_invariants(output, n)
    after = committed_shards(output)
    # Committed shards were left alone, and their rows were not generated again.
    assert {k: after[k] for k in before} == before
    new_rows = sum(
        pq.read_metadata(output / "metadata" / k).num_rows for k in after if k not in before
    )
    assert new_rows == n - len(committed_ids)


def test_a_crash_loop_fails_once_an_actor_crashed_max_actor_restarts_times(tmp_path, sdray_env):
    """Restarts are unbounded for Ray (a lost node must never end a run); sdray counts an
    actor's crashes itself, and one that crashes at every batch fails the run, saying so."""
    source = tmp_path / "prompts.parquet"
    write_prompts(source, 4)
    one = ["--set", "batch.min_actors=1", "--set", "batch.max_actors=1"]
    result = run_cli(
        ["generate", "--input", str(source), "--output", str(tmp_path / "out"), "--no-progress"]
        + [*QUICK, *one, "--set", "batch.max_actor_restarts=1"],
        env={**sdray_env, "SDRAY_TEST_CRASH_ALWAYS": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "a model actor crashed 2 times (batch.max_actor_restarts=1)" in result.stderr
    assert "--resume" in result.stderr


def test_crashing_actor_is_retried(tmp_path, sdray_env):
    n = 12
    source = tmp_path / "prompts.parquet"
    write_prompts(source, n)
    marker = tmp_path / "crashed"
    env = {**sdray_env, "SDRAY_TEST_CRASH_ONCE": str(marker)}
    result = subprocess.run(
        [
            SDRAY,
            "generate",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out"),
            *JOB,
            "--set",
            "generation.steps=2",
            "--set",
            "generation.width=64",
            "--set",
            "generation.height=64",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert marker.exists(), "the fault was injected"
    check_invariants(tmp_path / "out", n)


def test_resume_refuses_changed_config(tmp_path, sdray_env):
    source = tmp_path / "p.csv"
    source.write_text("prompt\na fox\n")
    output = tmp_path / "out"
    base = [
        SDRAY,
        "generate",
        "--input",
        str(source),
        "--output",
        str(output),
        "--no-progress",
        *QUICK,
    ]
    first = subprocess.run(base, env=sdray_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    changed = subprocess.run(
        [*base, "--resume", "--set", "generation.guidance_scale=3"],
        env=sdray_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert changed.returncode == 2
    assert "generation.guidance_scale: 7.5 -> 3.0" in changed.stderr
    assert "Traceback" not in changed.stderr
    other_input = tmp_path / "q.csv"
    other_input.write_text("prompt\na fox\n")
    moved = subprocess.run(
        [*base, "--resume", "--input", str(other_input)],
        env=sdray_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert moved.returncode == 2, moved.stderr[-3000:]
    assert (
        f"1 of its 1 committed rows have ids that are not in {str(other_input)!r}" in moved.stderr
    )
    same = subprocess.run(
        [*base, "--resume"], env=sdray_env, capture_output=True, text=True, timeout=300
    )
    assert same.returncode == 0, same.stderr[-3000:]
    assert json.loads((output / "manifest.json").read_text())["counts"]["generated_this_run"] == 0
    assert os.listdir(output / "metadata") and len(metadata_rows(output)) == 1


def test_resume_keeps_ids_committed_earlier(tmp_path, sdray_env):
    # The last row repeats the first one's id. After the last row's shard is lost, the resumed
    # run must still refuse it that id: the first row's unit, committed, is not validated or
    # claimed again, so the id is known only from the committed shard.
    source = tmp_path / "p.csv"
    source.write_text("id,prompt\na,w\nb,x\nc,y\na,z\n")
    output = tmp_path / "out"
    base = [SDRAY, "generate", "--input", str(source), "--output", str(output), "--no-progress"]
    base += [*QUICK, "--set", "output.rows_per_shard=2"]
    first = subprocess.run(base, env=sdray_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    shards = {
        path: pq.read_table(path).column("prompt").to_pylist()
        for path in (output / "metadata").glob("*.parquet")
    }
    (lost,) = [path for path, prompts in shards.items() if "z" in prompts]
    lost.unlink()
    resumed = subprocess.run(
        [*base, "--resume"], env=sdray_env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {r["prompt"]: r for r in metadata_rows(output)}
    assert sorted(rows) == ["w", "x", "y", "z"]
    assert rows["w"]["id"] == "a" and rows["w"]["status"] == "ok"
    assert rows["y"]["status"] == "ok"
    assert rows["z"]["id"] is None and rows["z"]["status"] == "error"
    assert rows["z"]["error"] == (
        "id='a': also the id of a row an earlier run wrote to this output, which keeps it"
    )
    counts = json.loads((output / "manifest.json").read_text())["counts"]
    assert (counts["rows"], counts["ok"], counts["error"]) == (4, 3, 1)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, model_cache) -> Path:
    """A real local model directory whose VAE decodes to NaN: every image fails in the engine."""
    import shutil

    from diffusers import AutoencoderKL

    from sdray.models import resolve_model

    directory = tmp_path_factory.mktemp("nan-model") / "model"
    shutil.copytree(resolve_model("tiny").directory, directory)
    vae = AutoencoderKL.from_pretrained(directory / "vae")
    vae.decoder.conv_out.bias.data.fill_(float("nan"))
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    return directory


def test_engine_failures_become_error_rows_or_abort(tmp_path, sdray_env, nan_model):
    n = 40
    source = tmp_path / "prompts.parquet"
    write_prompts(source, n)
    base = [
        "generate",
        "--input",
        str(source),
        "--no-progress",
        *JOB,
        "--set",
        f"model.source={nan_model}",
        *QUICK,
        "--set",
        "batch.min_actors=1",
        "--set",
        "batch.max_actors=1",
    ]
    # Within the error budget (1 allows every row to fail): error rows, exit 0.
    kept = run_cli(
        [*base, "--output", str(tmp_path / "kept"), "--set", "batch.max_error_fraction=1"],
        sdray_env,
    )
    assert kept.returncode == 0, kept.stderr[-3000:]
    rows = metadata_rows(tmp_path / "kept")
    assert sorted(r["id"] for r in rows) == [f"r{i:03d}" for i in range(n)]
    assert all(r["status"] == "error" and r["image_path"] is None for r in rows)
    assert all("non-finite values" in r["error"] for r in rows)

    # Over the budget: the run stops early with one clear message and keeps what it committed.
    aborted = run_cli(
        [*base, "--output", str(tmp_path / "aborted"), "--set", "batch.max_error_fraction=0.5"],
        sdray_env,
    )
    assert aborted.returncode == 2, aborted.stderr[-3000:]
    assert "aborting the run" in aborted.stderr
    assert "batch.max_error_fraction=0.5" in aborted.stderr
    assert "Traceback" not in aborted.stderr
