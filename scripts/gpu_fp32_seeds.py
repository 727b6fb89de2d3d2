"""The float32 check of the case nearest its budget, over several seeds (one GPU, a minute).

The float32 path of the Triton backward sits near the edge of its error budget for dv at D=80
with GQA on `dense` inputs, and `sbbench check` draws fresh inputs per run, so one run can pass
or fail. This runs that case on fixed seeds and prints each tensor's error / budget ("!" where
over), to compare kernel revisions on the same inputs.

    python scripts/gpu_fp32_seeds.py [--seeds 3318866862755529535,1,2,3,4,5]
"""

from __future__ import annotations

import argparse

from sbbench.harness.cases import Case
from sbbench.harness.check import check_case

CASE = Case(2, 4, 2, 1000, 80, "float32")
DEFAULT_SEEDS = "3318866862755529535,1,2,3,4,5"  # the first is the seed of a check row that failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated input seeds")
    args = parser.parse_args(argv)
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = check_case("triton", CASE, "dense", device="cuda", fa2=False, seed=seed)
        cells = " ".join(f"{r['tensor']} {r['err_max'] / r['budget']:.2f}{'' if r['passed'] else '!'}" for r in rows)
        print(f"seed {seed:>20}  {cells}", flush=True)


if __name__ == "__main__":
    main()
