"""Local-only training, small CNN on real CIFAR-10, sized for ~10 minutes on 2 CPU cores."""
from framp_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "local"
    c.dataset = "cifar10"
    c.model = "cnn"
    c.seed = 0
    c.num_clients = 20
    c.clients_per_round = 10
    c.rounds = 150
    c.local_steps = 20
    c.batch_size = 20
    c.lr = 0.05
    c.partition = "balanced_dirichlet"
    c.alpha = 0.3
    c.eval_every = 25
    c.union_subset = 2000
    c.checkpoint_every = 25
    return c
