"""Run configuration: defaults, presets' base, and validation before any work starts."""
from __future__ import annotations

import os

import ml_collections as mlc

from framp_jax.errors import FrampError

METHODS = ("fedavg", "local", "framp", "heterofl", "fedrolex", "fiarse", "scalefl")
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
    c.eval_every = 20
    c.eval_last = 1                # results.json "final" = mean of the last eval_last evals
    c.eval_batch = 20
    c.union_subset = 0             # >0: intermediate evals use this many union test samples
    c.eval_model_chunk = 0         # >0: evaluate this many models at a time (memory)
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    c.client_map = "auto"          # auto | vmap | map (lax.map: faster on CPU; see Context)
    c.mesh_clients = 1             # devices on the 'clients' mesh axis (0 = all devices)
    c.max_loss_ratio = 1e4         # stop when a round's mean train loss exceeds this multiple of
    #                                ln(num_classes), a chance-level prediction's loss (0 = never)
    # graph datasets (framp_jax.graph_engine; SPEC §2.1, §2.3, §2.4)
    c.gcn_hidden = 128             # GCN hidden width (= prototype dimension)
    c.dropout = 0.5                # GCN dropout
    c.graph_split_seed = 123       # node split / partition seed (FedSheafHN's 123; -1 = c.seed)
    c.graph_partition = "metis"    # metis | bfs
    c.graph_features = "auto"      # dense | sparse (coordinate lists) | auto: sparse when
    #                                under 5% of the node features are nonzero
    c.graph_ratio_train = 0.4      # train node fraction; test and val get half the rest each
    c.framp = framp_defaults()
    return c


def framp_defaults() -> mlc.ConfigDict:
    """FRAMP's options (SPEC §1 and §5 defaults); every one is switchable from the config."""
    f = mlc.ConfigDict()
    f.descriptor = "label_hist+budget"  # | func_emb+budget | onehot_budget | budget_only
    f.func_emb_steps = 50               # local steps behind a func_emb descriptor
    f.hypernet = "chunked"              # key of framp_jax.hypernet.HYPERNETS
    f.hn_hidden = 128
    f.chunk_size = 16384                # 0 = one chunk of all P entries (FedSheafHN's single head)
    f.chunk_dim = 64
    f.gen_hidden = 256
    f.generate = "all"                  # | backbone (per-client local classifier)
    f.extraction = "topk"               # | width (narrower pytrees per budget level)
    f.width_rates = (1.0, 0.5, 0.25, 0.125)  # width per budget level (extraction="width")
    f.scope = "global"                  # | groupwise (one top-k threshold per stage)
    f.mask_grad = "masked"              # | fiarse_paper (threshold-aware gradient factor)
    f.lam = 1.0                         # weight of the prototype-alignment loss
    f.align = "fedproto"                # | batch_proto
    f.proto_weighting = "count"         # | uniform (FedProto's code)
    f.proto_samples = 0                 # local prototypes from the first N train samples (0 = all)
    f.proto_timing = "post_eval"        # | last_epoch_train (FedProto's code: train-mode features
    #                                     of the last local epoch's steps, before each update)
    f.proto_bank = True                 # keep classes unseen this round
    f.proto_noise_std = 0.0             # privacy: Gaussian noise on uploaded prototypes
    f.proto_rotation = "none"           # | shared (secret common rotation) | per_client
    f.hn_optimizer = "adam"             # | sgd | sgd_momentum (pFedHN's SGD + momentum + wd)
    f.hn_lr = 1e-3
    f.hn_clip = 50.0
    f.hn_momentum = 0.9                 # sgd_momentum only (pFedHN: 0.9)
    f.hn_weight_decay = 1e-3            # sgd_momentum only, on every HN parameter (pFedHN: 1e-3)
    f.embed_lr = 0.0                    # per-client embedding rows' lr (pfedhn); 0 = hn_lr
    f.embed_dim = -1                    # pfedhn embedding size; -1 = int(1 + num_clients / 4)
    f.hn_layers = 3                     # pfedhn trunk: hidden Linear(H, H) layers (n_hidden)
    f.reduction = "mean"                # | sum over clients of the HN VJP
    f.eval_mode = "generated"           # | finetuned
    f.finetune_steps = 20               # local steps before evaluation in finetuned mode
    f.unseen_budgets = ()               # budgets evaluated zero-shot at the end, e.g. (1/256, 1/2)
    return f


def _check(cond, field, value, allowed):
    if not cond:
        raise ConfigError(field, value, allowed)


def validate(c: mlc.ConfigDict) -> None:
    """Raise ConfigError naming the field, the value and what is allowed."""
    _check(c.method in METHODS, "method", c.method, f"one of {METHODS}")
    ds = str(c.dataset)
    _check(ds in VISION_DATASETS or ds in GRAPH_DATASETS or ds.startswith("npz:"), "dataset", ds,
           f"one of {VISION_DATASETS + GRAPH_DATASETS} or 'npz:PATH'")
    if ds.startswith("npz:"):
        _check(os.path.isfile(ds[4:]), "dataset", ds, "npz:PATH must name an existing .npz file")
    if c.data_dir:
        _check(os.path.isdir(c.data_dir), "data_dir", c.data_dir, "an existing directory (or '' to search)")
    _check(c.model in MODELS, "model", c.model, f"one of {MODELS}")
    _check((c.model == "gcn") == (ds in GRAPH_DATASETS), "model", c.model,
           "'gcn' for graph datasets, 'cnn' or 'resnet18' for image datasets")
    _check(c.conv_impl in ("auto", "xla", "im2col"), "conv_impl", c.conv_impl, "auto, xla or im2col")
    cd = c.get("compute_dtype", "float32")
    _check(cd in ("float32", "bfloat16"), "compute_dtype", cd, "float32 or bfloat16")
    _check(cd == "float32" or c.model != "gcn", "compute_dtype", cd,
           "float32 for the GCN (bfloat16 is for the image models)")
    for f in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size",
              "eval_every", "eval_last", "eval_batch", "checkpoint_every", "keep_checkpoints"):
        v = c[f]
        _check(isinstance(v, int) and v >= 1, f, v, "an integer >= 1")
    _check(isinstance(c.seed, int) and 0 <= c.seed < 2**32, "seed", c.seed,
           "an integer in [0, 2**32) (jax.random.key would wrap larger seeds onto small ones)")
    _check(isinstance(c.eval_model_chunk, int) and c.eval_model_chunk >= 0, "eval_model_chunk",
           c.eval_model_chunk, "an integer >= 0 (0 = evaluate every model at once)")
    _check(c.max_loss_ratio >= 0, "max_loss_ratio", c.max_loss_ratio,
           ">= 0 (0 disables the loss-explosion stop)")
    _check(c.lr > 0, "lr", c.lr, "a learning rate > 0")
    _check(0 <= c.momentum < 1, "momentum", c.momentum, "in [0, 1)")
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, ">= 0")
    _check(c.grad_clip >= 0, "grad_clip", c.grad_clip, ">= 0 (0 disables)")
    _check(c.partition in PARTITIONS, "partition", c.partition, f"one of {PARTITIONS}")
    _check(c.alpha > 0, "alpha", c.alpha, "a Dirichlet concentration > 0")
    _check(c.test_prior in TEST_PRIORS, "test_prior", c.test_prior, f"one of {TEST_PRIORS}")
    _check(isinstance(c.classes_per_client, int) and c.classes_per_client >= 1,
           "classes_per_client", c.classes_per_client, "an integer >= 1")
    validate_budgets(c)
    n_train = c.num_clients - num_heldout(c)
    _check(c.clients_per_round <= n_train, "clients_per_round", c.clients_per_round,
           f"at most the {n_train} trainable clients (num_clients={c.num_clients}, "
           f"heldout_frac={c.heldout_frac})")
    _check(c.union_subset >= 0, "union_subset", c.union_subset, ">= 0 (0 = full union set)")
    if c.method == "framp":
        validate_framp(c)
    if c.method == "fedrolex":
        from framp_jax.algorithms.fedrolex import validate_options as validate_fedrolex
        validate_fedrolex(c)
    _check(c.client_map in ("auto", "vmap", "map"), "client_map", c.client_map, "auto, vmap or map")
    _check(isinstance(c.mesh_clients, int) and c.mesh_clients >= 0, "mesh_clients",
           c.mesh_clients, "an integer >= 0 (0 = all devices)")
    if c.mesh_clients != 1:  # the device count is cheap to ask; no data is loaded yet
        import jax
        n_dev = jax.device_count()
        n_mesh = n_dev if c.mesh_clients == 0 else c.mesh_clients
        _check(n_mesh <= n_dev, "mesh_clients", c.mesh_clients,
               f"at most the {n_dev} available {jax.default_backend()} device(s) (0 = all)")
        _check(c.clients_per_round % n_mesh == 0, "clients_per_round", c.clients_per_round,
               f"a multiple of the {n_mesh} devices on the 'clients' mesh axis "
               f"(mesh_clients={c.mesh_clients})")
    if ds in GRAPH_DATASETS:
        validate_graph(c)


def validate_budgets(c) -> None:
    """budget_levels, budget_dist and heldout_frac: every level must end up with trained
    clients, or results would silently average over fewer levels."""
    levels = c.budget_levels
    _check(isinstance(levels, (tuple, list)) and len(levels) >= 1
           and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in levels),
           "budget_levels", levels, "a non-empty tuple of budgets in (0, 1], e.g. (1, 0.25)")
    levels = tuple(levels)
    for b in levels:
        _check(0 < b <= 1, "budget_levels", levels,
               "every budget in (0, 1] (the kept fraction of prunable parameters)")
    import numpy as np
    _check(not any(np.isclose(a, b) for i, a in enumerate(levels) for b in levels[i + 1:]),
           "budget_levels", levels, "distinct budgets")
    dist = c.budget_dist
    _check(isinstance(dist, (tuple, list))
           and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in dist),
           "budget_dist", dist, f"a tuple of {len(levels)} non-negative shares, one per level")
    dist = tuple(dist)
    if len(dist) != len(levels):  # blame the one that was changed from its default
        d = base_config()
        if levels == tuple(d.budget_levels) and dist != tuple(d.budget_dist):
            _check(False, "budget_dist", dist, f"one share per budget of budget_levels={levels} "
                   f"({len(levels)} budgets, {len(dist)} shares)")
        _check(False, "budget_levels", levels,
               f"one budget per share of budget_dist={dist} ({len(dist)} shares, {len(levels)} "
               "budgets); set both together, e.g. --config.budget_levels='(1,0.25)' "
               "--config.budget_dist='(1,1)'")
    _check(all(d >= 0 for d in dist), "budget_dist", dist, "non-negative shares")
    _check(sum(dist) > 0, "budget_dist", dist,
           "at least one positive share (all shares are zero: no client would get a budget)")
    for b, d in zip(levels, dist):
        _check(d > 0, "budget_dist", dist,
               f"a positive share for every budget level (level {b} has share 0 and would have "
               "no clients); drop that level from budget_levels together with its share")
    counts = [int(np.sum(np.isclose(assign_budgets(c), b))) for b in levels]
    for b, n in zip(levels, counts):
        _check(n > 0, "budget_dist", dist,
               f"shares that give every budget level at least one of the num_clients="
               f"{c.num_clients} clients (level {b} gets none); drop level {b} from "
               "budget_levels together with its share, or raise its share")
    _check(0 <= c.heldout_frac < 1, "heldout_frac", c.heldout_frac, "in [0, 1)")
    if c.heldout_frac > 0:
        for b, ids, n in zip(levels, heldout_ids(c), counts):
            _check(len(ids) < n, "heldout_frac", c.heldout_frac,
                   f"a fraction that leaves every budget level a trained client: level {b} has "
                   f"{n} client(s) and ceil({c.heldout_frac} x {n}) = {len(ids)} are held out")


def validate_graph(c) -> None:
    """Options of the graph path (framp_jax.graph_engine)."""
    _check(isinstance(c.gcn_hidden, int) and c.gcn_hidden >= 1, "gcn_hidden", c.gcn_hidden,
           "an integer >= 1")
    _check(0 <= c.dropout < 1, "dropout", c.dropout, "in [0, 1)")
    _check(isinstance(c.graph_split_seed, int) and c.graph_split_seed >= -1, "graph_split_seed",
           c.graph_split_seed, "an integer >= 0, or -1 to use config.seed")
    _check(c.graph_features in ("auto", "dense", "sparse"), "graph_features", c.graph_features,
           "auto, dense or sparse")
    _check(c.graph_partition in ("metis", "bfs"), "graph_partition", c.graph_partition,
           "metis or bfs")
    _check(0 < c.graph_ratio_train < 1, "graph_ratio_train", c.graph_ratio_train, "in (0, 1)")
    _check(c.union_subset == 0, "union_subset", c.union_subset,
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


def validate_framp(c) -> None:
    f = c.framp
    opts = {"descriptor": ("label_hist+budget", "func_emb+budget", "onehot_budget", "budget_only"),
            "generate": ("all", "backbone"), "extraction": ("topk", "width"),
            "scope": ("global", "groupwise"), "mask_grad": ("masked", "fiarse_paper"),
            "align": ("fedproto", "batch_proto"), "proto_weighting": ("count", "uniform"),
            "proto_rotation": ("none", "shared", "per_client"), "reduction": ("mean", "sum"),
            "eval_mode": ("generated", "finetuned"),
            "hn_optimizer": ("adam", "sgd", "sgd_momentum"),
            "proto_timing": ("post_eval", "last_epoch_train")}
    for k, allowed in opts.items():
        _check(f[k] in allowed, f"framp.{k}", f[k], f"one of {allowed}")
    from framp_jax.hypernet import HYPERNETS
    _check(f.hypernet in HYPERNETS, "framp.hypernet", f.hypernet, f"one of {tuple(HYPERNETS)}")
    _check(isinstance(f.proto_samples, int) and f.proto_samples >= 0, "framp.proto_samples",
           f.proto_samples, "an integer >= 0 (0 = every training sample)")
    _check(f.proto_timing == "post_eval" or f.proto_samples == 0, "framp.proto_samples",
           f.proto_samples, "0 with proto_timing='last_epoch_train' (the last epoch's batches)")
    _check(0 <= f.hn_momentum < 1, "framp.hn_momentum", f.hn_momentum, "in [0, 1)")
    _check(f.hn_weight_decay >= 0, "framp.hn_weight_decay", f.hn_weight_decay, ">= 0")
    _check(f.embed_lr >= 0, "framp.embed_lr", f.embed_lr, ">= 0 (0 = hn_lr)")
    _check(f.embed_lr == 0 or f.hypernet == "pfedhn", "framp.embed_lr", f.embed_lr,
           "0 unless hypernet='pfedhn' (the only HN with per-client embedding rows)")
    _check(isinstance(f.embed_dim, int) and (f.embed_dim >= 1 or f.embed_dim == -1),
           "framp.embed_dim", f.embed_dim, "an integer >= 1, or -1 for int(1 + num_clients / 4)")
    _check(isinstance(f.hn_layers, int) and f.hn_layers >= 0, "framp.hn_layers", f.hn_layers,
           "an integer >= 0")
    if f.hypernet == "pfedhn":
        from framp_jax.hypernet import check_pfedhn_size
        check_pfedhn_size(c)
    for k in ("hn_hidden", "chunk_dim", "gen_hidden", "func_emb_steps"):
        _check(isinstance(f[k], int) and f[k] >= 1, f"framp.{k}", f[k], "an integer >= 1")
    _check(isinstance(f.chunk_size, int) and f.chunk_size >= 0, "framp.chunk_size", f.chunk_size,
           "an integer >= 1, or 0 for a single chunk of every generated entry")
    _check(f.lam >= 0, "framp.lam", f.lam, ">= 0")
    _check(f.hn_lr > 0, "framp.hn_lr", f.hn_lr, "> 0")
    _check(f.proto_noise_std >= 0, "framp.proto_noise_std", f.proto_noise_std, ">= 0")
    _check(f.mask_grad == "masked" or f.scope == "global", "framp.mask_grad", f.mask_grad,
           "'masked' when framp.scope='groupwise' (the threshold-aware factor uses one tau)")
    _check(f.eval_mode == "generated" or f.finetune_steps >= 1, "framp.finetune_steps",
           f.finetune_steps, ">= 1 with eval_mode='finetuned'")
    for b in tuple(f.unseen_budgets):
        _check(0 < b <= 1, "framp.unseen_budgets", tuple(f.unseen_budgets), "budgets in (0, 1]")
    _check(f.extraction == "topk" or f.proto_rotation == "none", "framp.proto_rotation",
           f.proto_rotation, "'none' with extraction='width' (clients hold different feature channels)")
    _check(f.extraction == "topk" or f.generate == "all", "framp.generate", f.generate,
           "'all' with extraction='width'")
    rates = tuple(f.width_rates)
    _check(len(rates) == len(tuple(c.budget_levels)) and all(0 < r <= 1 for r in rates),
           "framp.width_rates", rates, f"{len(tuple(c.budget_levels))} rates in (0, 1], one per budget level")
    _check(not (f.descriptor == "onehot_budget" and tuple(f.unseen_budgets)), "framp.descriptor",
           f.descriptor, "not onehot_budget when framp.unseen_budgets is set (it cannot encode them)")
