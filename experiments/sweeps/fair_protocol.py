"""The fair-comparison protocol (results/sweeps/FAIR.md), declared before any of its runs.

Not a sweep file itself: ``fair_tune_cifar10.py``, ``fair_tune_cora.py`` (selection) and
``fair_final.py`` (the reported runs) read it.

- **Equal tuning budget.** Every method gets the same 4 candidate configurations: the client
  learning rate (2 values, the same for every method of a modality) x the method's own key
  option (2 values), nothing else tuned. Candidates run on the selection seed only.
- **Selection on validation only.** Score = (val/local/mean + val/union/mean) / 2 of the run's
  ``final`` (the last evaluation), averaged over the selection seeds; the highest wins (ties: the
  first declared). Validation = each client's stratified 10% of its training data
  (``val_frac=0.1``; graphs: their validation nodes). No test number is read.
- **Fresh seeds.** Reported numbers come from ``REPORT_SEEDS``, never used for selection.
- **Out of sample.** The CIFAR-10 (alpha 0.3) choice is applied unchanged to CIFAR-100 (alpha
  0.05 and 0.3); the Cora choice to CiteSeer.
- **Identical evaluation.** Every method: Local on plain logits (``local/``), the label-masked
  Local beside it for every method (``local_masked/``), Union on the full test set; the same
  data, rounds and evaluation. HeteroFL and FedRolex run their official network (the CNN with
  BN + Scaler, sBN statistics; ``heterofl.backbone="preact"``); every other method runs the
  plain CNN. ``fair_final.py`` adds a same-network row for each (``backbone="same"``).
- **Controls.** FRAMP -HN (the FedAvg base + top-k + alignment, no hypernetwork output:
  ``framp.residual_scale=0``) is tuned like every method. The descriptor controls (content
  permuted across clients, or a random code per client) and the zero-shot runs (one client per
  budget held out) use the chosen FRAMP and hybrid configurations on the report seeds.
"""
SELECTION_SEEDS = (100,)
REPORT_SEEDS = (200, 201, 202)
SCORE = "(val/local/mean + val/union/mean) / 2"
VAL_FRAC = 0.1

# client learning rate candidates per modality (SGD for the CNN, Adam for the GCN)
LRS = {"cifar10": (0.05, 0.1), "cora": (0.01, 0.02)}

# method -> (preset stem, key option, its 2 values). Preset files: <stem>_<setting>.py with
# setting cifar10_cpu / cora. FRAMP (SPEC's method) runs one generator chunk (SPEC §1.4 item 5)
# and tunes the generator's initial kernel scale: SPEC's He scale or the network's own.
METHODS = {
    "framp": ("framp", "framp.gen_init", ("he", "model")),
    "hybrid": ("hybrid", "framp.residual_scale", (0.1, 0.3)),
    "framp_nohn": ("hybrid", "framp.lam", (0.1, 1.0)),
    "fiarse": ("fiarse", "fiarse.mask_grad", ("masked", "fiarse_paper")),
    "heterofl": ("heterofl", "heterofl.label_mask", (True, False)),
    "fedrolex": ("fedrolex", "fedrolex.label_mask", (True, False)),
    "scalefl": ("scalefl", "scalefl.kd_gamma", (0.0, 0.5)),
    "fedavg": ("fedavg", "momentum", (0.0, 0.5)),
    "local": ("local", "momentum", (0.0, 0.5)),
}

# (method, dataset) -> (key option, its 2 values) where the modality changes it: the GCN's
# clients train with Adam (no momentum), so FedAvg and Local tune the L2 weight decay there
KEY_BY_DATASET = {
    ("fedavg", "cora"): ("weight_decay", (5e-4, 5e-3)),
    ("local", "cora"): ("weight_decay", (5e-4, 5e-3)),
}

# fixed per method (part of the method's definition here, not tuned)
FIXED = {
    "framp": {"framp.chunk_size": 0},
    "framp_nohn": {"framp.residual_scale": 0.0},
}

SETTINGS = {"cifar10": "cifar10_cpu", "cora": "cora"}
COMMON = {"val_frac": VAL_FRAC, "graph_split_seed": -1}


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def candidates(method: str, dataset: str) -> dict:
    """label -> overrides, in declaration order (ties go to the first)."""
    stem, key, values = METHODS[method]
    key, values = KEY_BY_DATASET.get((method, dataset), (key, values))
    out = {}
    for lr in LRS[dataset]:
        for v in values:
            out[f"lr{_label(lr)}_{key.rsplit('.', 1)[-1]}{_label(v)}"] = {
                **COMMON, **FIXED.get(method, {}), "lr": lr, key: v}
    return out


def preset(method: str, dataset: str) -> str:
    return f"../configs/{METHODS[method][0]}_{SETTINGS[dataset]}.py"


def tuning_runs(dataset: str):
    from framp_jax.sweep import Run
    runs = []
    for m in METHODS:
        for label, ov in candidates(m, dataset).items():
            for s in SELECTION_SEEDS:
                runs.append(Run(f"{m}__{label}_seed{s}", preset(m, dataset), {**ov, "seed": s}))
    return runs


# ---------------------------------------------------------------------------------------------
# the reported runs (fair_final.py), from the selections

# tuning dataset -> the settings its choice is reported on: (name, dataset, preset setting,
# overrides). The tuning settings themselves come first; the others are out of sample.
REPORTED = {
    "cifar10": (("cifar10_a03", "cifar10", {}),
                ("cifar100_a005", "cifar10", {"dataset": "cifar100", "alpha": 0.05}),
                ("cifar100_a03", "cifar10", {"dataset": "cifar100", "alpha": 0.3})),
    "cora": (("cora", "cora", {}),
             ("citeseer", "cora", {"dataset": "citeseer"})),
}
# where `framp-jax select` output is committed (relative to this file)
SELECTION_FILES = {"cifar10": "../../results/sweeps/fair_tune_cifar10/selection.json",
                   "cora": "../../results/sweeps/fair_tune_cora/selection.json"}
# the same network for every method: HeteroFL and FedRolex also on the plain CNN (image data)
SAME_NETWORK = {"heterofl": "heterofl.backbone", "fedrolex": "fedrolex.backbone"}
# controls on the tuning settings: the descriptor's content taken out (permuted across clients),
# and zero-shot clients (one per budget level held out), with and without it
CONTROLS = {
    "permuted": {"framp.descriptor_control": "permute"},
    "heldout": {"heldout_frac": 0.2},
    "heldout_permuted": {"heldout_frac": 0.2, "framp.descriptor_control": "permute"},
}
CONTROLLED = ("framp", "hybrid")
# Cora's preset trains all 10 clients every round: with 4 held out, the 6 others
HELDOUT_PER_ROUND = {"cora": {"clients_per_round": 6}}


def final_runs(selections: dict):
    """The reported runs: every method's chosen configuration on every reported setting x
    REPORT_SEEDS, the same-network rows (image settings) and the controls (tuning settings).
    ``selections`` maps a tuning dataset to its selection.json; a method without a choice is an
    error naming it."""
    from framp_jax.sweep import Run
    runs = []
    for tune_ds, settings in REPORTED.items():
        sel = selections[tune_ds]["methods"]
        missing = [m for m in METHODS if sel.get(m, {}).get("chosen") is None]
        if missing:
            raise ValueError(f"no configuration selected yet on {tune_ds} for {missing}: finish "
                             f"fair_tune_{tune_ds}.py and run framp-jax select")
        for i, (setting, preset_ds, extra) in enumerate(settings):
            for m in METHODS:
                ov = {**sel[m]["chosen_overrides"], **extra}
                rows = {m: ov}
                if m in SAME_NETWORK and preset_ds == "cifar10":
                    rows[f"{m}_samenet"] = {**ov, SAME_NETWORK[m]: "same"}
                if i == 0 and m in CONTROLLED:
                    rows.update({f"{m}_{k}": {**ov, **c, **(HELDOUT_PER_ROUND.get(preset_ds, {})
                                                            if "heldout_frac" in c else {})}
                                 for k, c in CONTROLS.items()})
                for row, o in rows.items():
                    for s in REPORT_SEEDS:
                        runs.append(Run(f"{setting}__{row}_seed{s}", preset(m, preset_ds),
                                        {**o, "seed": s}))
    return runs
