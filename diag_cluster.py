import torch, traceback
from deqkern import _cluster as e
from deqkern.ops import persistent, persistent_cluster
print("smem", e.smem(torch.bfloat16, 512, 8, 16))
for c, bm in [(8, 16), (16, 16), (4, 32), (1, 16), (2, 16)]:
    try:
        print(c, bm, e.max_active(torch.bfloat16, 0, 256, 512, c, bm))
    except Exception as x:
        print(c, bm, "ERR", x)
import sys
sys.path.insert(0, "tests")
from test_ops_persistent import make_cell
_, cast = make_cell(256, 512, torch.bfloat16, torch.Generator().manual_seed(0), device="cuda")
for cfg in [(8, 16), (16, 16), (4, 32)]:
    try:
        h, st, rstd, chk = persistent_cluster.solve_cluster(*cast, 1e-6, 0.8, 20, 2e-2, "rel", True, config=cfg)
        he, ste, _, _ = persistent.solve_reference(*cast, 1e-6, 0.8, 20, 2e-2, "rel", True)
        torch.cuda.synchronize()
        print(cfg, "err", float((h.float() - he.float()).norm() / he.float().norm()), "nstep", st.nstep[:8].tolist(), ste.nstep[:8].tolist(), "res", st.residual[:4].tolist())
    except Exception:
        traceback.print_exc()
