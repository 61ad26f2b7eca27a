"""The lever benchmark at real model sizes (same as `sdray bench --suite gpu`).

    python pipelines/bench_gpu.py --out bench-gpu/            # on a GPU node: SD 1.5 and SDXL
    python pipelines/bench_gpu.py --out /tmp/b --no-compile   # on CPU: the tiny models

Writes bench-gpu/bench_gpu.json (every figure, written as it is measured) and bench_gpu.png,
and prints a Markdown table. On one H200 the full run takes about 9 minutes (--budget caps it;
what does not fit is listed as skipped).
"""

import argparse

from sdray.tools.bench_levers import run_suite, summary_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench-gpu", help="directory for the JSON and PNG")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--budget", type=float, default=540, help="seconds the run may take")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data pipeline")
    parser.add_argument(
        "--quick", action="store_true", help="only the Ray Data pipeline against the plain loop"
    )
    args = parser.parse_args()
    results = run_suite(
        args.out,
        device=args.device,
        budget_s=args.budget,
        compile=not args.no_compile,
        ray=not args.no_ray,
        quick=args.quick,
    )
    print(summary_table(results))
