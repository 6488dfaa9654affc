"""Fair protocol, the reported runs (results/sweeps/FAIR.md): each method's configuration chosen
on validation by ``framp-jax select`` (fair_tune_cifar10.py, fair_tune_cora.py; committed
selection.json files) on the report seeds (never used for selection), CIFAR-10 alpha 0.3 and
Cora, then unchanged on CIFAR-100 alpha 0.05 / 0.3 and CiteSeer (out of sample); plus the
same-network rows of HeteroFL and FedRolex and the FRAMP / hybrid descriptor and zero-shot
controls (fair_protocol.py).

    framp-jax sweep --sweep experiments/sweeps/fair_final.py --workdir runs/fair_final
"""
import json
import os

from framp_jax.sweep import SweepError, sibling_module

P = sibling_module(__file__, "fair_protocol.py")


def _selection(ds):
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         P.SELECTION_FILES[ds]))
    if not os.path.isfile(path):
        raise SweepError(f"fair_final.py needs {path}: run fair_tune_{ds}.py to the end and "
                         f"`framp-jax select` on it first, then commit its selection.json")
    with open(path) as f:
        return json.load(f)


def get_sweep():
    selections = {ds: _selection(ds) for ds in P.SELECTION_FILES}
    try:
        return P.final_runs(selections)
    except ValueError as e:
        raise SweepError(f"fair_final.py: {e}") from None
