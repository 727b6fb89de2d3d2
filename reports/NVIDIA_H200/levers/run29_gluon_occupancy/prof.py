"""Run 29's profiled launches: the forward at D=64, T=4096, bf16, B=4, dense, twice each (the
second launch of each is the one to read): the Triton kernel with the shipped config and
training statistics, then Gluon variants (64-key tile) without and with the producer warp.

    python prof.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "run27_gluon"))
import gluon_fwd  # noqa: E402

from sbbench.core.problem import validate  # noqa: E402
from sbbench.core.registry import get_backend  # noqa: E402
from sbbench.harness.cases import Case  # noqa: E402
from sbbench.harness.inputs import make_inputs  # noqa: E402
from sbbench.kernels.triton_sb import _config_list  # noqa: E402
from sbbench.kernels.triton_sb import op as triton_op  # noqa: E402

inp = make_inputs(Case(4, 24, 24, 4096, 64, dtype="bfloat16"), "dense", device=torch.device("cuda"), seed=0)
q, k, v = inp["q"], inp["k"], inp["v"]
cfg = _config_list(get_backend("triton").resolve_config(validate(q, k, v, None, False, None, None), None))
with torch.no_grad():
    for _ in range(2):
        triton_op.triton_sb_fwd(q, k, v, None, 64 ** -0.5, False, 4096, cfg, True)
    for var in (dict(block_n=64), dict(block_n=64, ws=True, maxnreg=80), dict(block_n=64, ws=True, maxnreg=128)):
        for _ in range(2):
            gluon_fwd.sb_fwd_gluon(q, k, v, **var)
    torch.cuda.synchronize()
