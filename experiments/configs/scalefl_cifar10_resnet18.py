"""ScaleFL in the FIARSE protocol (SPEC §2.3, §4.3): ResNet-18 sBN with early exits after stages
1-3 on CIFAR-10, 100 clients, 10 per round, 800 rounds, balanced Dirichlet alpha 0.3, budgets 1,
1/4, 1/16, 1/64 with 25 clients each, seed 0; ScaleFL's own client recipe for CIFAR
(git-disl/scale-fl ``config.py``): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 16,
5 local epochs (500 samples → 32 batches per epoch → 160 steps), lr × 0.1 at rounds 100 and
200; KD off (γ = 0, ``args.py``). Level map of SPEC §4.3: 1 → (4 exits, width 1),
1/4 → (3, 1), 1/16 → (3, 0.5), 1/64 → (2, 0.5)."""
from framp_jax.algorithms.scalefl import default_options
from framp_jax.config import base_config


def get_config(dataset: str = "cifar10"):
    c = base_config()
    c.method = "scalefl"
    c.dataset = dataset
    c.model = "resnet18"
    c.seed = 0
    c.num_clients = 100
    c.clients_per_round = 10
    c.rounds = 800
    c.local_steps = 160          # 5 epochs x ceil(500 / 16) batches
    c.batch_size = 16
    c.lr = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.partition = "balanced_dirichlet"
    c.alpha = 0.3
    c.budget_levels = (1.0, 0.25, 0.0625, 0.015625)
    c.budget_dist = (25, 25, 25, 25)
    c.eval_every = 20
    c.eval_last = 5              # final = mean over rounds 720..800
    c.eval_batch = 20
    c.checkpoint_every = 50
    c.scalefl = default_options()
    c.scalefl.exits = (4, 3, 3, 2)
    c.scalefl.widths = (1.0, 1.0, 0.5, 0.5)
    c.scalefl.lr_milestones = (100, 200)
    c.scalefl.lr_decay = 0.1
    return c
