"""FIARSE in the FIARSE protocol (SPEC §2.3, §4.4): ResNet-18 sBN on CIFAR-10, 100 clients,
10 per round, 800 rounds, K = 100 local iterations of batch 20 with SGD lr 0.1, balanced
Dirichlet alpha 0.3, budgets 1, 1/4, 1/16, 1/64 with 25 clients each, seed 0.

FIARSE's own "Local" numbers use test priors drawn independently of the train priors:
``--config.test_prior=fiarse_independent`` reproduces that; the default keeps matched priors.
"""
import ml_collections as mlc

from framp_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "fiarse"
    c.dataset = "cifar10"
    c.model = "resnet18"
    c.seed = 0
    c.num_clients = 100
    c.clients_per_round = 10
    c.rounds = 800
    c.local_steps = 100          # --K 100 (iterations)
    c.batch_size = 20            # --bsz 20
    c.lr = 0.1                   # --lr -1 (10^-1)
    c.momentum = 0.0
    c.weight_decay = 0.0
    c.partition = "balanced_dirichlet"
    c.alpha = 0.3
    c.budget_levels = (1.0, 0.25, 0.0625, 0.015625)
    c.budget_dist = (25, 25, 25, 25)
    c.eval_every = 20            # FIARSE logs per-size accuracy every save_freq = 20 rounds
    c.eval_last = 5              # final = mean over rounds 720..800 (FIARSE's last-100 window)
    c.eval_batch = 20
    c.checkpoint_every = 50
    c.fiarse = mlc.ConfigDict()
    c.fiarse.scope = "global"        # fiarse/ (one threshold for all masked layers)
    c.fiarse.mask_grad = "masked"
    c.fiarse.server_lr = 1.0
    return c
