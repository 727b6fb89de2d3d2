"""float32 check of one case over several seeds, with the working tree's Triton kernels or with
another revision's (``old DIR``: DIR holds that revision's kernels.py and op.py, e.g. from
``git show REV:kernels/triton_sb/kernels.py``). Prints err/budget per tensor, "!" where over.

    python scripts/gpu_fp32_seeds.py new
    python scripts/gpu_fp32_seeds.py old .device/ab/0_head

Written when one fp32 row (dv, D=80, GQA, dense) failed on the H100: both revisions gave
bit-identical errors on six seeds, two of them over budget (README, "H100 results")."""

from __future__ import annotations

import importlib.util
import sys

which = sys.argv[1]
if which == "old":
    import sbbench.kernels.triton_sb as package

    for name in ("kernels", "op"):
        full = f"sbbench.kernels.triton_sb.{name}"
        spec = importlib.util.spec_from_file_location(full, f"{sys.argv[2]}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)

from sbbench.harness.cases import Case  # noqa: E402
from sbbench.harness.check import check_case  # noqa: E402

case = Case(2, 4, 2, 1000, 80, "float32")
for seed in (3318866862755529535, 1, 2, 3, 4, 5):
    rows = check_case("triton", case, "dense", device="cuda", fa2=False, seed=seed)
    cells = " ".join(f"{r['tensor']} {r['err_max']:.2e}/{r['budget']:.2e}{'' if r['passed'] else '!'}" for r in rows)
    print(which, seed, cells, flush=True)
