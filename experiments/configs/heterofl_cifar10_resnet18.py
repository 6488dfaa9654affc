"""HeteroFL in the FIARSE protocol with HeteroFL's own recipe (SPEC §4.0, §4.1): pre-activation
ResNet-18 with Scaler and sBN on CIFAR-10; 100 clients, 10 per round, balanced Dirichlet
alpha 0.3, budgets 1, 1/4, 1/16, 1/64 (width rates 1, 1/2, 1/4, 1/8) with 25 clients each,
seed 0. Client recipe of HeteroFL ``src/utils.py`` ``process_control`` (CIFAR, non-IID): SGD
lr 0.1, momentum 0.9, weight decay 5e-4, gradient-norm clip 1, 5 local epochs of batch 10
(= 250 steps on a client's 500 samples), 800 rounds, MultiStepLR x0.1 at rounds 300 and 500.
The sBN pass covers every client's whole training set before each evaluation."""
from framp_jax.algorithms.heterofl import heterofl_defaults
from framp_jax.config import base_config


def get_config(dataset: str = "cifar10"):
    c = base_config()
    c.method = "heterofl"
    c.dataset = dataset
    c.model = "resnet18"           # built as HeteroFL's pre-activation ResNet-18 (backbone=preact)
    c.seed = 0
    c.num_clients = 100
    c.clients_per_round = 10
    c.rounds = 800
    c.local_steps = 250            # 5 local epochs x 500 samples / batch 10
    c.batch_size = 10
    c.lr = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.grad_clip = 1.0
    c.partition = "balanced_dirichlet"
    c.alpha = 0.3
    c.budget_levels = (1.0, 0.25, 0.0625, 0.015625)
    c.budget_dist = (25, 25, 25, 25)
    c.eval_every = 20
    c.eval_last = 5
    c.eval_batch = 20
    c.checkpoint_every = 50
    c.heterofl = heterofl_defaults()
    c.heterofl.lr_milestones = (300, 500)
    c.heterofl.lr_gamma = 0.1
    return c
