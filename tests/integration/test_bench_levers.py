"""The lever benchmark in its CPU form: the tiny model through the whole ladder, the Ray Data
pipeline, the JSON, the table and the plot (on a GPU the same code runs SD 1.5 and SDXL)."""

from __future__ import annotations

import json

from PIL import Image

from sdray.tools.bench_levers import Workload, run_suite, summary_table

LADDER = [
    "diffusers pipeline, float32",
    "engine, float32, classic attention (all levers off)",
    "+ SDPA attention",
    "diffusers pipeline, bfloat16",
    "+ bfloat16",
    "+ fused QKV projections",
    "+ channels_last",
]


def test_the_cpu_suite_measures_every_lever_and_the_pipeline(ray_cluster, tmp_path):
    workload = Workload(
        "tiny", 64, steps=(2, 3), ladder_batch=2, batches=(1,), repeats=1, pipeline_rows=40
    )
    results = run_suite(tmp_path, device="cpu", budget_s=3600, compile=False, workloads=[workload])
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["workloads"] == results["workloads"]
    rows = results["workloads"]["tiny 64x64"]
    measured = {row["case"]: row for row in rows if "images_per_s" in row}
    for case in LADDER:
        assert measured[case]["images_per_s"] > 0, case
        assert measured[case]["s_per_image"] > 0 and measured[case]["batch"] == 2
    assert any(r["case"] == "all levers" and r["steps"] == 3 for r in rows)
    assert {"case": "+ compiled UNet / VAE", "skipped": "compile off or time budget"} in rows
    assert results["vae_decode_2048"] == {"skipped": "cuda only"}
    ray = results["pipeline"]["tiny 64x64"]  # measured first: (a) of the GPU run
    assert ray["(c) steady"]["images_per_s"] > 0 and ray["rows"] == 40  # 5 commits of 8 rows
    assert ray["(c) end_to_end"]["ratio"] > 0 and ray["(a) diffusers loop"]["ratio"] == 1.0
    table = summary_table(results)
    assert all(f"| {case} |" in table for case in LADDER)
    with Image.open(tmp_path / "bench_gpu.png") as plot:
        assert plot.size[0] == 1200 and plot.size[1] > 200
