"""FedRolex in the FIARSE protocol with FedRolex's own recipe (SPEC §4.0, §4.2): HeteroFL's
pre-activation ResNet-18 (Scaler, sBN evaluation) with the rolling window; 100 clients, 10 per
round, balanced Dirichlet alpha 0.3, budgets 1, 1/4, 1/16, 1/64 (width rates 1, 1/2, 1/4, 1/8)
with 25 clients each, seed 0. Client recipe of FedRolex's README commands and ``utils.py``
(CIFAR): SGD ``--lr 2e-4``, momentum 0.9, weight decay 1e-3, gradient-norm clip 1
(``resnet_client.py``), 1 local epoch of batch 10 (= 50 steps on 500 samples), 3200 rounds on
CIFAR-10 / 2500 on CIFAR-100, MultiStepLR x0.25 at ``--schedule 800 1200`` (Table 3 commands)."""
from framp_jax.algorithms.fedrolex import fedrolex_defaults
from framp_jax.config import base_config


def get_config(dataset: str = "cifar10"):
    c = base_config()
    c.method = "fedrolex"
    c.dataset = dataset
    c.model = "resnet18"           # built as HeteroFL's pre-activation ResNet-18 (backbone=preact)
    c.seed = 0
    c.num_clients = 100
    c.clients_per_round = 10
    c.rounds = 3200 if dataset == "cifar10" else 2500
    c.local_steps = 50             # 1 local epoch x 500 samples / batch 10
    c.batch_size = 10
    c.lr = 2e-4
    c.momentum = 0.9
    c.weight_decay = 1e-3
    c.grad_clip = 1.0
    c.partition = "balanced_dirichlet"
    c.alpha = 0.3
    c.budget_levels = (1.0, 0.25, 0.0625, 0.015625)
    c.budget_dist = (25, 25, 25, 25)
    c.eval_every = 50
    c.eval_last = 5
    c.eval_batch = 20
    c.checkpoint_every = 100
    c.fedrolex = fedrolex_defaults()
    c.fedrolex.lr_milestones = (800, 1200)
    c.fedrolex.lr_gamma = 0.25
    return c
