"""A small mutation check of the code behind reported numbers: applies one listed one-line
mutation at a time to a scratch copy of the repository, runs the tests that cover it there,
and reports whether they caught it (a test failed) or it survived (every test passed).

    python experiments/mutation_check.py                 # baseline, then every mutation
    python experiments/mutation_check.py --list          # the mutations and their tests
    python experiments/mutation_check.py --only final-mean label-mask-zero
    python experiments/mutation_check.py --markdown out.md   # also the result table

Each mutation names its file, the original line's text (matched on the stripped line, not
on a line number, since other work moves lines) and the mutated text (the original line's
indentation is kept). If the original line is not in the file, or is there more than once,
the mutation is reported as "original line not found" / "ambiguous" and not run: update its
entry. The working tree is never touched: the copy (without .git, .venv, results/, runs/) lives
in a temporary directory, with ``../shared`` linked beside it for the tests that read the
shared data, and the installed package is shadowed by ``PYTHONPATH``. The copy shares one
persistent XLA compilation cache across its pytest runs (a compiled program is keyed by its
HLO, so a mutated computation is compiled afresh). The unmutated copy runs every listed test
first (``--no-baseline`` skips it): a failing baseline makes every "caught" meaningless.

The list and its last result are in docs/MUTATIONS.md. Exit status 0 iff every mutation run
was caught (and the baseline passed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    id: str
    file: str
    original: str
    mutated: str
    tests: tuple
    what: str


M = Mutation
MUTATIONS = [
    # -- the four that survived e6040ab's audit (issue 32) --------------------------------------
    M("label-mask-zero", "framp_jax/losses.py",
      "return jnp.where(label_mask[None, :] > 0, logits, 0.0)",
      "return jnp.where(label_mask[None, :] > 0, logits, -1e9)",
      ("tests/test_reported_numbers.py",),
      "HeteroFL's masked logits: absent classes -1e9 instead of 0"),
    M("eval-label-mask-inverted", "framp_jax/eval.py",
      "return label_masked_logits(logits, label_counts_row > 0)",
      "return label_masked_logits(logits, label_counts_row == 0)",
      ("tests/test_reported_numbers.py",),
      "label-masked Local (local_masked/): the client's own classes masked instead of the absent"),
    M("image-mask-rows", "framp_jax/data/image_modality.py",
      "lc = label_counts if label_counts is not None else jnp.zeros((test_x.shape[0], 1))",
      "lc = jnp.roll(label_counts, 1, axis=0) if label_counts is not None else "
      "jnp.zeros((test_x.shape[0], 1))",
      ("tests/test_reported_numbers.py::test_image_local_accuracy_masks_the_absent_classes",),
      "image Local: client i's logits masked with another client's label counts"),
    M("graph-mask-rows", "framp_jax/data/graph_modality.py",
      "lc = label_counts if label_counts is not None else jnp.zeros((n, 1))",
      "lc = jnp.roll(label_counts, 1, axis=0) if label_counts is not None else jnp.zeros((n, 1))",
      ("tests/test_reported_numbers.py::test_graph_local_accuracy_masks_the_absent_classes",),
      "graph Local: client i's logits masked with another client's label counts"),
    M("final-mean", "framp_jax/simulate.py",
      "mean_last = {k: float(np.mean([h[k] for h in lastk if k in h])) for k in keys}",
      "mean_last = {k: float(np.max([h[k] for h in lastk if k in h])) for k in keys}",
      ("tests/test_reported_numbers.py",),
      "results.json final: the best of the last eval_last evaluations instead of their mean"),
    M("hn-kernel-scale", "framp_jax/hypernet.py",
      "a, b = 0.0, math.sqrt(2.0 / max(fan_in, 1))",
      "a, b = 0.0, math.sqrt(1.0 / max(fan_in, 1))",
      ("tests/test_reported_numbers.py::test_entry_scales_by_hand",
       "tests/test_framp.py::test_hypernet_generates_template_at_init_scale"),
      "generated kernels' scale off by sqrt(2)"),
    # -- masks and aggregation -------------------------------------------------------------------
    M("topk-floor", "framp_jax/masks.py",
      "k = jnp.clip(jnp.floor(budget * n).astype(jnp.int32), 1, n)",
      "k = jnp.clip(jnp.ceil(budget * n).astype(jnp.int32), 1, n)",
      ("tests/test_masks_aggregate.py",),
      "top-k keeps ceil(budget * P) entries instead of floor"),
    M("topk-ties", "framp_jax/masks.py",
      "out = [(jnp.abs(x) >= taus[gid]).astype(x.dtype) if f else jnp.ones_like(x)",
      "out = [(jnp.abs(x) > taus[gid]).astype(x.dtype) if f else jnp.ones_like(x)",
      ("tests/test_masks_aggregate.py",),
      "top-k drops the threshold entry (|w| > tau)"),
    M("holders-mean", "framp_jax/algorithms/rounds.py",
      "return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), global_value)",
      "return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)",
      ("tests/test_rounds.py::test_holders_mean",
       "tests/test_heterofl.py::test_combine_overlapping_submodels_by_hand"),
      "entries no client holds are zeroed instead of keeping their global value"),
    M("masked-mean-weights", "framp_jax/aggregate.py",
      "cover = _bcast(w, p) if mk is None else mk * _bcast(w, p)",
      "cover = _bcast(w, p) if mk is None else mk",
      ("tests/test_masks_aggregate.py",),
      "masked mean ignores the client weights (a dropped client counts)"),
    M("heterofl-labelwise", "framp_jax/algorithms/heterofl.py",
      "w = w * label_mask.astype(jnp.float32).reshape(shape)",
      "w = w",
      ("tests/test_heterofl.py::test_combine_overlapping_submodels_by_hand",),
      "HeteroFL's output rows averaged over every client, not only those holding the label"),
    M("fiarse-server-count", "framp_jax/algorithms/fiarse.py",
      "cnt = jnp.sum((d != 0).astype(d.dtype), axis=0)",
      "cnt = jnp.sum(jnp.ones_like(d), axis=0)",
      ("tests/test_fiarse.py::test_server_rule_by_hand",),
      "FIARSE's server divides by every client instead of those that changed the entry"),
    # -- evaluation summaries ----------------------------------------------------------------------
    M("summary-local-mean", "framp_jax/eval.py",
      'out[f"{name}/mean"] = float(np.nanmean(acc)) if name == "local" else float(np.mean(per))',
      'out[f"{name}/mean"] = float(np.mean(per))',
      ("tests/test_eval.py",),
      "local/mean over the budget levels instead of over the clients"),
    M("summary-per-budget", "framp_jax/eval.py",
      'out[f"{name}/{budget_label(s)}"] = float(np.nanmean(acc[sel]))',
      'out[f"{name}/{budget_label(s)}"] = float(np.nanmax(acc[sel]))',
      ("tests/test_eval.py",),
      "per-budget accuracy: the best client of the level instead of the mean"),
    # -- data, local training, schedules -----------------------------------------------------------
    M("dirichlet-prior", "framp_jax/data/partition.py",
      "p = rng.dirichlet(np.full(K, alpha), size=n)",
      "p = rng.dirichlet(np.full(K, 1.0), size=n)",
      ("tests/test_partition.py",),
      "balanced Dirichlet priors ignore alpha"),
    M("local-steps", "framp_jax/client.py",
      "jnp.arange(local.steps))",
      "jnp.arange(local.steps - 1))",
      ("tests/test_client.py",),
      "one local step fewer"),
    M("lr-milestones", "framp_jax/algorithms/rounds.py",
      "n = jnp.sum(jnp.asarray(milestones, jnp.int32) <= t + offset)",
      "n = jnp.sum(jnp.asarray(milestones, jnp.int32) < t + offset)",
      ("tests/test_rounds.py", "tests/test_heterofl.py::test_lr_schedule"),
      "MultiStepLR decays one round late"),
    M("fedrolex-window", "framp_jax/width.py",
      "return {u: jnp.mod(jnp.arange(width_of(c, rate), dtype=jnp.int32) - t, c)",
      "return {u: jnp.mod(jnp.arange(width_of(c, rate), dtype=jnp.int32) + t, c)",
      ("tests/test_width.py::test_rolling_window_by_hand",
       "tests/test_heterofl.py::test_rolling_round_moves_the_window"),
      "FedRolex's window rolls the wrong way"),
    M("fedrolex-eval-window", "framp_jax/algorithms/fedrolex.py",
      "jnp.maximum(t_done - 1, 0))",
      "jnp.maximum(t_done, 0))",
      ("tests/test_heterofl.py::test_fedrolex_count_bug_and_last_window_by_value",),
      "eval_window='last' evaluates the window of the next round"),
    M("fiarse-factor", "framp_jax/algorithms/rounds.py",
      "return 1.0 + jnp.where(den > 0, 2.0 * tau * abs_w / jnp.where(den > 0, den, 1.0), 0.0)",
      "return 1.0 + jnp.where(den > 0, 1.0 * tau * abs_w / jnp.where(den > 0, den, 1.0), 0.0)",
      ("tests/test_rounds.py::test_fiarse_paper_factor_by_hand",
       "tests/test_fiarse.py::test_gradient_factor_by_hand"),
      "FIARSE's gradient factor 1 + tau|w|/(|w|+tau)^2 instead of 1 + 2 tau|w|/(...)"),
    M("scalefl-exit-weights", "framp_jax/algorithms/scalefl.py",
      "total = total + (j + 1) * lj",
      "total = total + lj",
      ("tests/test_scalefl.py::test_exit_loss_matches_hand_computation",),
      "ScaleFL's exits weighted equally instead of by depth"),
    M("scalefl-kd-start", "framp_jax/algorithms/scalefl.py",
      "return t > kd_start * rounds",
      "return t >= kd_start * rounds",
      ("tests/test_scalefl.py::test_kd_switches_on_after_a_quarter_of_the_rounds",),
      "ScaleFL's distillation starts one round early"),
    # -- FRAMP -----------------------------------------------------------------------------------
    M("proto-weighting", "framp_jax/algorithms/framp.py",
      'w = counts if weighting == "count" else (counts > 0).astype(counts.dtype)',
      "w = (counts > 0).astype(counts.dtype)",
      ("tests/test_framp.py::test_prototype_aggregation_weights_by_counts_and_keeps_bank",),
      "prototypes averaged uniformly over clients instead of by class counts"),
    M("hn-vjp-mean", "framp_jax/algorithms/framp.py",
      'w = finite.astype(jnp.float32) / (jnp.maximum(n_ok, 1.0) if fc.reduction == "mean" else 1.0)',
      "w = finite.astype(jnp.float32)",
      ("tests/test_framp.py::test_hn_gradient_is_vjp_of_client_deltas",),
      "the HN's VJP summed over clients instead of averaged"),
    M("hn-vjp-sign", "framp_jax/algorithms/framp.py",
      "cot = jax.tree.map(lambda d: d * _bcast(w, d), delta_ok)",
      "cot = jax.tree.map(lambda d: -d * _bcast(w, d), delta_ok)",
      ("tests/test_framp.py::test_hn_gradient_is_vjp_of_client_deltas",),
      "the HN steps along the clients' deltas instead of against them"),
    M("groupwise-scope", "framp_jax/algorithms/framp.py",
      'groups = M.stage_groups(template) if fc.scope == "groupwise" else None',
      "groups = None",
      ("tests/test_framp.py::test_groupwise_scope_keeps_the_budget_in_every_stage",),
      "scope='groupwise' silently runs the global top-k"),
    M("proto-rotation", "framp_jax/algorithms/framp.py",
      "pro = pro @ rot_shared",
      "pro = pro",
      ("tests/test_framp.py::test_shared_rotation_does_not_change_training",),
      "proto_rotation='shared' uploads the prototypes unrotated (and the clients un-rotate them)"),
    M("finetune-key", "framp_jax/algorithms/framp.py",
      "root = jax.random.fold_in(jax.random.key(ctx.seed), 4)",
      "root = jax.random.fold_in(jax.random.key(ctx.seed), 5)",
      ("tests/test_framp.py::test_finetuned_evaluation_trains_the_evaluated_models_not_the_server",),
      "fine-tuned evaluation draws its batches from another key"),
    M("batch-proto-denominator", "framp_jax/losses.py",
      "return jnp.sum(sq) / (jnp.maximum(jnp.sum(present), 1) * features.shape[-1])",
      "return jnp.sum(sq) / jnp.maximum(jnp.sum(present), 1)",
      ("tests/test_framp.py::test_alignment_losses_match_hand_computation",
       "tests/test_framp.py::test_batch_proto_alignment_in_the_local_loss"),
      "batch_proto alignment not divided by the feature dimension"),
    # -- exact resume ------------------------------------------------------------------------------
    M("resume-history", "framp_jax/simulate.py",
      'history = list(extra.get("history", []))',
      "history = []",
      ("tests/test_engine.py::test_resume_after_kill_equals_uninterrupted",),
      "a resumed run forgets the evaluations before the checkpoint"),
    M("resume-start", "framp_jax/simulate.py",
      'start = int(extra["round"])',
      'start = int(extra["round"]) + 1',
      ("tests/test_engine.py::test_resume_after_kill_equals_uninterrupted",),
      "a resumed run skips the round after the checkpoint"),
]

IGNORE = shutil.ignore_patterns(".git", ".venv", "results", "runs", "__pycache__", ".pytest_cache",
                                ".hypothesis", "*.egg-info", ".device", "build")


def locate(text: str, original: str):
    """Indices of the lines whose stripped text is ``original`` (stripped)."""
    want = original.strip()
    return [i for i, line in enumerate(text.splitlines(keepends=True)) if line.strip() == want]


def apply(text: str, m: Mutation):
    """``text`` with ``m``'s line mutated, or (None, reason)."""
    hits = locate(text, m.original)
    if not hits:
        return None, "original line not found"
    if len(hits) > 1:
        return None, f"ambiguous: {len(hits)} lines match"
    lines = text.splitlines(keepends=True)
    line = lines[hits[0]]
    indent = line[:len(line) - len(line.lstrip())]
    ending = line[len(line.rstrip("\r\n")):]
    lines[hits[0]] = indent + m.mutated.strip() + ending
    return "".join(lines), hits[0] + 1


def make_scratch(root: Path) -> Path:
    copy = root / "repo"
    shutil.copytree(REPO, copy, ignore=IGNORE, symlinks=True)
    shared = REPO.parent / "shared"
    if shared.exists():
        os.symlink(shared, root / "shared")
    return copy


def pytest(copy: Path, tests, env, timeout: int):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {timeout} s\n{e.stdout or ''}"
    return rc, out, time.time() - t0


def summary_line(out: str) -> str:
    lines = [l for l in out.strip().splitlines() if l.strip()]
    fails = [l for l in lines if l.startswith("FAILED") or l.startswith("ERROR")]
    return (fails[0] if fails else (lines[-1] if lines else ""))[:160]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    ap.add_argument("--markdown", help="write the result table (markdown) to this file")
    ap.add_argument("--json", help="write the results (JSON) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        unknown = set(args.only) - {m.id for m in chosen}
        ap.error(f"unknown mutation ids: {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.id}: {m.file}: {m.what}\n    - {m.original}\n    + {m.mutated}\n"
                  f"    tests: {' '.join(m.tests)}")
        return 0

    root = Path(tempfile.mkdtemp(prefix="framp_mutation_"))
    results, ok = [], True
    try:
        copy = make_scratch(root)
        env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
                   JAX_COMPILATION_CACHE_DIR=str(root / "jit_cache"))
        where = subprocess.run([sys.executable, "-c", "import framp_jax; print(framp_jax.__file__)"],
                               cwd=copy, env=env, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(copy)):
            print(f"framp_jax imports from {where!r}, not from the copy {copy}", file=sys.stderr)
            return 2
        print(f"scratch copy: {copy}", flush=True)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            rc, out, dt = pytest(copy, tests, env, args.timeout * 2)
            print(f"baseline (unmutated, {len(tests)} test selections): "
                  f"{'passed' if rc == 0 else 'FAILED'} in {dt:.0f} s", flush=True)
            if rc != 0:
                print(out[-3000:])
                return 1
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            mutated, where = apply(original, m)
            if mutated is None:
                status, dt, detail, line = where, 0.0, "", None
            else:
                line = where
                path.write_text(mutated)
                try:
                    rc, out, dt = pytest(copy, m.tests, env, args.timeout)
                finally:
                    path.write_text(original)
                status = {0: "survived", 1: "caught"}.get(rc, f"error (pytest exit {rc})")
                detail = summary_line(out)
            ok &= status == "caught"
            results.append(dict(id=m.id, file=m.file, line=line, status=status, seconds=round(dt),
                                what=m.what, original=m.original, mutated=m.mutated,
                                tests=list(m.tests), detail=detail))
            print(f"{status:>10}  {m.id:<26} {m.file}:{line}  ({dt:.0f} s)  {detail}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    caught = sum(r["status"] == "caught" for r in results)
    print(f"\n{caught} of {len(results)} mutations caught")
    if args.markdown:
        rows = ["| id | file:line | mutation | result | tests | s |", "|---|---|---|---|---|---|"]
        esc = lambda t: t.strip().replace("|", "\\|")
        for r in results:
            tests = ", ".join(f"`{t.replace('tests/', '')}`" for t in r["tests"])
            rows.append(f"| {r['id']} | `{r['file']}:{r['line']}` | {esc(r['what'])}: "
                        f"`{esc(r['original'])}` → `{esc(r['mutated'])}` | "
                        f"**{r['status']}** | {tests} | {r['seconds']} |")
        Path(args.markdown).write_text("\n".join(rows) + f"\n\n{caught} of {len(results)} caught.\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
