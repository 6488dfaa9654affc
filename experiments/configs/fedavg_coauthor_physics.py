"""FedAvg on Coauthor Physics (34,493 nodes, 8415 binary features, 5 classes) split into 10 METIS
subgraph clients: fedavg_cora's recipe (all clients per round, 10 full-batch Adam epochs, lr
0.01, wd 5e-4, dropout 0.5, seed 435, budgets 1, 1/4, 1/16, 1/64) with fewer rounds, because
the dense 8415-wide first GCN layer dominates: one local epoch of one client (~3.5k nodes) is
~23 GFLOP, a round ~2.3 TFLOP. The padded dense features take ~1.2 GB (one copy on the device,
shared by the train/test/union fields)."""
from framp_jax.config import sibling_config


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.dataset = "coauthor_physics"
    c.rounds = 30
    c.eval_every = 5
    c.eval_last = 2                # "final" = mean of rounds 25 and 30
    c.checkpoint_every = 10
    return c
