"""FRAMP in the FIARSE protocol (SPEC §2.3 vision column, §1.4): ResNet-18 sBN on CIFAR-10,
100 clients, 10 per round, 800 rounds, K = 100 local iterations of batch 20 with SGD lr 0.1,
balanced Dirichlet alpha 0.3, budgets 1, 1/4, 1/16, 1/64 with 25 clients each, seed 0: exactly
fiarse_cifar10_resnet18.py's data, clients, rounds and client optimizer. FRAMP: the chunked HN of
SPEC §1.4 (trunk 3x128, chunk embeddings 64, chunk 16 384, generator hidden 256: ~683 chunks
for the 11.2 M parameters), label_hist+budget descriptor, global top-k, FedProto alignment with
lambda 1 on the 512-d pooled features, HN Adam 1e-3. Paper scale: run on an accelerator."""
from framp_jax.algorithms.framp import framp_defaults
from framp_jax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "fiarse_cifar10_resnet18.py")
    c.method = "framp"
    del c["fiarse"]
    c.framp = framp_defaults()
    c.framp.chunk_size = 16384
    c.framp.proto_samples = 0
    c.framp.unseen_budgets = (1 / 256, 1 / 128, 1 / 32, 1 / 8, 1 / 2)
    return c
