"""The ``clients`` mesh axis: FedAvg with its clients split over 8 (virtual CPU) devices gives the
same run as on one device. Runs in a subprocess so this pytest process keeps its single device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from framp_jax.config import base_config

SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)  # before any computation
    import jax.numpy as jnp
    import numpy as np
    from framp_jax import simulate
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax.config import base_config
    from framp_jax.problem import build_algorithm, build_problem
    from framp_jax.rundir import read_metrics_csv

    fields, workdir = json.loads(sys.argv[1]), sys.argv[2]
    out = {"devices": len(jax.devices())}

    def config(mesh):
        c = base_config()
        for k, v in fields.items():
            setattr(c, k, v)
        c.mesh_clients, c.clients_per_round = mesh, 8
        return c

    # the sharded round function really splits the clients over the mesh
    c8 = config(8)
    prob = build_problem(c8, verbose=False)
    alg = build_algorithm(prob.ctx, c8)
    state = alg.init(None, prob.data)
    text = jax.jit(alg.round).lower(state, prob.data, jnp.int32(0)).as_text()
    out["mesh_in_module"] = '"clients"=8' in text
    out["sharding_constraints"] = text.count("sharding_constraint")

    runs = {}
    for mesh in (8, 1):
        wd = os.path.join(workdir, f"mesh{mesh}")
        res = simulate.run(config(mesh), wd, progress=False, log=lambda *a: None)
        with CheckpointManager(os.path.join(wd, "checkpoints"), keep=None) as m:
            st, _ = m.restore(fields["rounds"])
        rows = read_metrics_csv(os.path.join(wd, "metrics.csv"))
        runs[mesh] = (res, jax.tree.leaves(st), rows)
    (r8, p8, m8), (r1, p1, m1) = runs[8], runs[1]
    out["compiles"] = [r8["compiles"], r1["compiles"]]
    out["params_max_abs_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                     for a, b in zip(p8, p1))
    out["params_bit_equal"] = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                                  for a, b in zip(p8, p1))
    keys = [k for k in m1[0] if k not in ("round", "wall_s")]
    out["metrics_max_abs_diff"] = max(abs(x[k] - y[k]) for x, y in zip(m8, m1) for k in keys)
    out["train_loss"] = [[x["train_loss"] for x in m8], [y["train_loss"] for y in m1]]
    print("RESULT " + json.dumps(out))
''')


def test_fedavg_on_eight_devices_matches_one_device(tiny_config, tmp_path):
    c = tiny_config(rounds=3)
    base = base_config().to_dict()
    fields = {k: v for k, v in c.to_dict().items() if base.get(k) != v}
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(fields), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["devices"] == 8
    assert out["mesh_in_module"] and out["sharding_constraints"] > 0
    assert out["compiles"] == [1, 1]
    # The 8-way run sums the clients' contributions in another order (per-device partial sums
    # in masked_mean), so parameters agree to float rounding rather than bit for bit.
    assert out["params_max_abs_diff"] < 1e-5, out
    assert out["metrics_max_abs_diff"] < 1e-5, out
