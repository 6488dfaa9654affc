"""FedAvg (full GCN for every client) on Cora split into 10 METIS subgraph clients.

SPEC §2.3's graph column (FedSheafHN's recipe) scaled to minutes on 2 CPU cores: every client
participates every round, 10 full-batch local epochs of Adam (lr 0.01, weight decay 5e-4),
dropout 0.5, 100 rounds, seed 435. Budgets 1, 1/4, 1/16, 1/64 over 10 clients, contiguous by
client index (3, 3, 2, 2 clients). Every graph method preset imports this one and changes only
the method and its own options. ``--config.dataset=citeseer`` (or any graph dataset) works:
the input width and class count come from the data.
"""
from framp_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "fedavg"
    c.dataset = "cora"
    c.model = "gcn"
    c.seed = 435                   # FedSheafHN's seed
    c.graph_split_seed = -1        # the split follows config.seed (FedSheafHN fixes 123)
    c.graph_partition = "metis"
    c.graph_ratio_train = 0.4
    c.num_clients = 10
    c.clients_per_round = 10       # all clients every round
    c.rounds = 100
    c.local_steps = 10             # = local epochs (full batch)
    c.lr = 0.01                    # Adam
    c.weight_decay = 5e-4
    c.dropout = 0.5
    c.gcn_hidden = 128
    c.augment = False
    c.budget_levels = (1.0, 0.25, 0.0625, 0.015625)
    c.budget_dist = (1, 1, 1, 1)
    c.eval_every = 5
    c.eval_last = 5                # results.json "final" = mean of rounds 80, 85, ..., 100
    c.union_subset = 0
    c.checkpoint_every = 50
    return c
