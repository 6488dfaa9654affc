"""Run configuration: defaults, presets' base, and validation before any work starts."""
from __future__ import annotations

import os

import ml_collections as mlc

from framp_jax.errors import FrampError

VISION_DATASETS = ("cifar10", "cifar100")
GRAPH_DATASETS = ("cora", "citeseer", "amazon_photo", "amazon_computers", "coauthor_cs",
                  "coauthor_physics", "ogbn_arxiv")
MODELS = ("cnn", "resnet18", "gcn")
PARTITIONS = ("balanced_dirichlet", "dirichlet", "shards", "iid")
TEST_PRIORS = ("matched", "fiarse_independent")


class ConfigError(FrampError, ValueError):
    """A config field holds a value that is not allowed."""

    def __init__(self, field, value, allowed):
        super().__init__(f"config.{field}={value!r} is not allowed: {allowed}")
        self.field = field


def sibling_config(anchor_file: str, filename: str, *args, **kwargs) -> mlc.ConfigDict:
    """``get_config(*args, **kwargs)`` of the preset ``filename`` in the directory of
    ``anchor_file`` (presets are loaded by path, not imported: ``experiments/configs`` is not a
    package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(anchor_file)), filename)
    spec = importlib.util.spec_from_file_location(os.path.splitext(filename)[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(*args, **kwargs)


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.method = "fedavg"
    c.dataset = "cifar10"
    c.data_dir = ""            # "" = search: $FRAMP_DATA_DIR, ../shared/data, ~/.cache/framp_jax
    c.seed = 0
    c.model = "cnn"
    c.conv_impl = "auto"       # auto | xla | im2col (benchmarks/bench_conv.py)
    c.compute_dtype = "float32"  # float32 | bfloat16 (activations, convs and matmuls in bf16;
    #                              params, optimizer state, BN statistics and losses in float32)
    c.num_clients = 20
    c.clients_per_round = 10
    c.rounds = 100
    c.local_steps = 20
    c.batch_size = 20
    c.lr = 0.05
    c.momentum = 0.0
    c.weight_decay = 0.0
    c.grad_clip = 0.0
    c.augment = True
    c.partition = "balanced_dirichlet"
    c.alpha = 0.3
    c.test_prior = "matched"
    c.classes_per_client = 2
    c.budget_levels = (1.0, 0.25, 0.0625, 0.015625)
    c.budget_dist = (1, 1, 1, 1)   # relative shares; contiguous by client index (FIARSE)
    c.heldout_frac = 0.0           # clients per budget level held out of training (unseen)
    c.val_frac = 0.1               # image data: each client's validation share, cut from its
    #                                training data stratified by label (val/ metrics, model
    #                                selection; no training step reads it); 0 = none. Graphs
    #                                always use their validation nodes (this field is unused)
    c.eval_every = 20
    c.eval_last = 1                # results.json "final" = mean of the last eval_last evals
    c.eval_batch = 20
    c.union_subset = 0             # >0: intermediate evals use this many union test samples
    c.eval_model_chunk = 0         # >0: evaluate this many models at a time (memory)
    c.diagnostics = False          # True: every evaluation also records diag/ metrics (Union
    #                                accuracy on classes each client trained on / never saw,
    #                                cosine similarity of the clients' models; diagnostics.py)
    c.record_mask_reuse = False    # True: count, per budget level, how often each prunable entry
    #                                is in a participant's mask (<workdir>/mask_reuse.npz, the
    #                                report's mask-reuse CDF); only for methods with an
    #                                Algorithm.round_masks hook (FIARSE, FRAMP top-k)
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    c.client_map = "auto"          # auto | vmap | map (lax.map: faster on CPU; see Context)
    c.mesh_clients = 1             # devices on the 'clients' mesh axis (0 = all devices)
    c.max_loss_ratio = 1e4         # stop when a round's mean train loss exceeds this multiple of
    #                                ln(num_classes), a chance-level prediction's loss (0 = never)
    # graph datasets (framp_jax.data.graph_modality, framp_jax.problem; SPEC §2.1, §2.3, §2.4)
    c.gcn_hidden = 128             # GCN hidden width (= prototype dimension)
    c.dropout = 0.5                # GCN dropout
    c.graph_split_seed = -1        # node split / partition seed (-1 = c.seed, so seeds vary
    #                                the split; FedSheafHN fixes 123)
    c.graph_partition = "metis"    # metis | bfs
    c.graph_features = "auto"      # dense | sparse (coordinate lists) | auto: sparse when
    #                                under 5% of the node features are nonzero
    c.graph_ratio_train = 0.4      # train node fraction; test and val get half the rest each
    # FRAMP's options sit in every config (its defaults, framp_jax.algorithms.framp): configs
    # and config hashes of every run so far carry them, whatever the method
    from framp_jax.algorithms.framp import framp_defaults
    c.framp = framp_defaults()
    return c


def check(cond, field, value, allowed):
    if not cond:
        raise ConfigError(field, value, allowed)


def validate(c: mlc.ConfigDict) -> None:
    """Raise ConfigError naming the field, the value and what is allowed."""
    from framp_jax.algorithms.registry import names, resolve
    check(c.method in names(), "method", c.method, f"one of {names()}")
    ds = str(c.dataset)
    check(ds in VISION_DATASETS or ds in GRAPH_DATASETS or ds.startswith("npz:"), "dataset", ds,
           f"one of {VISION_DATASETS + GRAPH_DATASETS} or 'npz:PATH'")
    if ds.startswith("npz:"):
        check(os.path.isfile(ds[4:]), "dataset", ds, "npz:PATH must name an existing .npz file")
    if c.data_dir:
        check(os.path.isdir(c.data_dir), "data_dir", c.data_dir, "an existing directory (or '' to search)")
    check(c.model in MODELS, "model", c.model, f"one of {MODELS}")
    check((c.model == "gcn") == (ds in GRAPH_DATASETS), "model", c.model,
           "'gcn' for graph datasets, 'cnn' or 'resnet18' for image datasets")
    check(c.conv_impl in ("auto", "xla", "im2col"), "conv_impl", c.conv_impl, "auto, xla or im2col")
    cd = c.get("compute_dtype", "float32")
    check(cd in ("float32", "bfloat16"), "compute_dtype", cd, "float32 or bfloat16")
    check(cd == "float32" or c.model != "gcn", "compute_dtype", cd,
           "float32 for the GCN (bfloat16 is for the image models)")
    for f in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size",
              "eval_every", "eval_last", "eval_batch", "checkpoint_every", "keep_checkpoints"):
        v = c[f]
        check(isinstance(v, int) and v >= 1, f, v, "an integer >= 1")
    check(isinstance(c.seed, int) and 0 <= c.seed < 2**32, "seed", c.seed,
           "an integer in [0, 2**32) (jax.random.key would wrap larger seeds onto small ones)")
    check(isinstance(c.eval_model_chunk, int) and c.eval_model_chunk >= 0, "eval_model_chunk",
           c.eval_model_chunk, "an integer >= 0 (0 = evaluate every model at once)")
    diag = c.get("diagnostics", False)
    check(isinstance(diag, bool), "diagnostics", diag, "True or False")
    reuse = c.get("record_mask_reuse", False)
    check(isinstance(reuse, bool), "record_mask_reuse", reuse, "True or False")
    check(c.max_loss_ratio >= 0, "max_loss_ratio", c.max_loss_ratio,
           ">= 0 (0 disables the loss-explosion stop)")
    check(c.lr > 0, "lr", c.lr, "a learning rate > 0")
    check(0 <= c.momentum < 1, "momentum", c.momentum, "in [0, 1)")
    check(c.momentum == 0 or ds not in GRAPH_DATASETS, "momentum", c.momentum,
          "0 for graph datasets (their clients train with Adam, which has no momentum option)")
    check(c.weight_decay >= 0, "weight_decay", c.weight_decay, ">= 0")
    check(c.grad_clip >= 0, "grad_clip", c.grad_clip, ">= 0 (0 disables)")
    check(c.partition in PARTITIONS, "partition", c.partition, f"one of {PARTITIONS}")
    check(c.alpha > 0, "alpha", c.alpha, "a Dirichlet concentration > 0")
    check(c.test_prior in TEST_PRIORS, "test_prior", c.test_prior, f"one of {TEST_PRIORS}")
    check(isinstance(c.classes_per_client, int) and c.classes_per_client >= 1,
           "classes_per_client", c.classes_per_client, "an integer >= 1")
    validate_budgets(c)
    n_train = c.num_clients - num_heldout(c)
    check(c.clients_per_round <= n_train, "clients_per_round", c.clients_per_round,
           f"at most the {n_train} trainable clients (num_clients={c.num_clients}, "
           f"heldout_frac={c.heldout_frac})")
    vf = c.get("val_frac", 0.0)
    check(isinstance(vf, (int, float)) and not isinstance(vf, bool) and 0 <= vf <= 0.5,
          "val_frac", vf, "a fraction in [0, 0.5] of each client's training data (0 = none)")
    check(c.union_subset >= 0, "union_subset", c.union_subset, ">= 0 (0 = full union set)")
    resolve(c)  # the method's own options (config.<method>), validated by the method
    check(c.client_map in ("auto", "vmap", "map"), "client_map", c.client_map, "auto, vmap or map")
    check(isinstance(c.mesh_clients, int) and c.mesh_clients >= 0, "mesh_clients",
           c.mesh_clients, "an integer >= 0 (0 = all devices)")
    if c.mesh_clients != 1:  # the device count is cheap to ask; no data is loaded yet
        import jax
        n_dev = jax.device_count()
        n_mesh = n_dev if c.mesh_clients == 0 else c.mesh_clients
        check(n_mesh <= n_dev, "mesh_clients", c.mesh_clients,
               f"at most the {n_dev} available {jax.default_backend()} device(s) (0 = all)")
        check(c.clients_per_round % n_mesh == 0, "clients_per_round", c.clients_per_round,
               f"a multiple of the {n_mesh} devices on the 'clients' mesh axis "
               f"(mesh_clients={c.mesh_clients})")
    if ds in GRAPH_DATASETS:
        validate_graph(c)


def validate_budgets(c) -> None:
    """budget_levels, budget_dist and heldout_frac: every level must end up with trained
    clients, or results would silently average over fewer levels."""
    levels = c.budget_levels
    check(isinstance(levels, (tuple, list)) and len(levels) >= 1
           and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in levels),
           "budget_levels", levels, "a non-empty tuple of budgets in (0, 1], e.g. (1, 0.25)")
    levels = tuple(levels)
    for b in levels:
        check(0 < b <= 1, "budget_levels", levels,
               "every budget in (0, 1] (the kept fraction of prunable parameters)")
    import numpy as np
    check(not any(np.isclose(a, b) for i, a in enumerate(levels) for b in levels[i + 1:]),
           "budget_levels", levels, "distinct budgets")
    dist = c.budget_dist
    check(isinstance(dist, (tuple, list))
           and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in dist),
           "budget_dist", dist, f"a tuple of {len(levels)} non-negative shares, one per level")
    dist = tuple(dist)
    if len(dist) != len(levels):  # blame the one that was changed from its default
        d = base_config()
        if levels == tuple(d.budget_levels) and dist != tuple(d.budget_dist):
            check(False, "budget_dist", dist, f"one share per budget of budget_levels={levels} "
                   f"({len(levels)} budgets, {len(dist)} shares)")
        check(False, "budget_levels", levels,
               f"one budget per share of budget_dist={dist} ({len(dist)} shares, {len(levels)} "
               "budgets); set both together, e.g. --config.budget_levels='(1,0.25)' "
               "--config.budget_dist='(1,1)'")
    check(all(d >= 0 for d in dist), "budget_dist", dist, "non-negative shares")
    check(sum(dist) > 0, "budget_dist", dist,
           "at least one positive share (all shares are zero: no client would get a budget)")
    for b, d in zip(levels, dist):
        check(d > 0, "budget_dist", dist,
               f"a positive share for every budget level (level {b} has share 0 and would have "
               "no clients); drop that level from budget_levels together with its share")
    counts = [int(np.sum(np.isclose(assign_budgets(c), b))) for b in levels]
    for b, n in zip(levels, counts):
        check(n > 0, "budget_dist", dist,
               f"shares that give every budget level at least one of the num_clients="
               f"{c.num_clients} clients (level {b} gets none); drop level {b} from "
               "budget_levels together with its share, or raise its share")
    check(0 <= c.heldout_frac < 1, "heldout_frac", c.heldout_frac, "in [0, 1)")
    if c.heldout_frac > 0:
        for b, ids, n in zip(levels, heldout_ids(c), counts):
            check(len(ids) < n, "heldout_frac", c.heldout_frac,
                   f"a fraction that leaves every budget level a trained client: level {b} has "
                   f"{n} client(s) and ceil({c.heldout_frac} x {n}) = {len(ids)} are held out")


def validate_graph(c) -> None:
    """Options of the graph path (framp_jax.problem.build_graph_problem)."""
    check(isinstance(c.gcn_hidden, int) and c.gcn_hidden >= 1, "gcn_hidden", c.gcn_hidden,
           "an integer >= 1")
    check(0 <= c.dropout < 1, "dropout", c.dropout, "in [0, 1)")
    check(isinstance(c.graph_split_seed, int) and c.graph_split_seed >= -1, "graph_split_seed",
           c.graph_split_seed, "an integer >= 0, or -1 to use config.seed")
    check(c.graph_features in ("auto", "dense", "sparse"), "graph_features", c.graph_features,
           "auto, dense or sparse")
    check(c.graph_partition in ("metis", "bfs"), "graph_partition", c.graph_partition,
           "metis or bfs")
    check(0 < c.graph_ratio_train < 1, "graph_ratio_train", c.graph_ratio_train, "in (0, 1)")
    check(c.union_subset == 0, "union_subset", c.union_subset,
           "0 for graph datasets (every evaluation uses all clients' test nodes)")


def num_heldout(c) -> int:
    import numpy as np
    return int(np.sum([len(ids) for ids in heldout_ids(c)])) if c.heldout_frac > 0 else 0


def assign_budgets(c):
    """Per-client budgets, contiguous by client index in proportion to budget_dist (FIARSE)."""
    import numpy as np
    n, dist = c.num_clients, np.asarray(c.budget_dist, np.float64)
    counts = np.floor(n * dist / dist.sum()).astype(int)
    counts[: n - counts.sum()] += 1  # hand the remainder to the first levels
    return np.repeat(np.asarray(c.budget_levels, np.float64), counts)


def heldout_ids(c):
    """Per level, the last ceil(heldout_frac · n_level) clients are held out (never trained)."""
    import numpy as np
    b = assign_budgets(c)
    out = []
    for s in c.budget_levels:
        ids = np.flatnonzero(np.isclose(b, s))
        k = int(np.ceil(c.heldout_frac * len(ids))) if c.heldout_frac > 0 else 0
        out.append(ids[len(ids) - k:] if k else ids[:0])
    return out
