"""FRAMP's ``extraction="width"`` (DESIGN "Varying width"): per client and layer keep the
``ceil(r·C)`` output channels of largest norm in the *generated* weights, gather them into a
genuinely narrower pytree, train it at its own static shape (each budget level vmapped
separately inside the same jitted round), and scatter the delta back to full size for the HN's
VJP (scatter on zeros is the adjoint of the gather, so the HN gets exactly the gradient of the
gathered parameters).

The feature unit (the classifier's input: the CNN's dense layer, ResNet-18's stage-4 stream) is
cut like every other unit. Its kept channels are a subset of the full model's feature channels,
so prototypes stay comparable across budget levels in the full feature space: a client aligns
its narrow features to the global prototypes restricted to its kept feature channels, uploads
its prototypes scattered back to full width together with a {0,1} mask of the channels it
holds, and the server averages each (class, channel) over the clients holding it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import width as W
from framp_jax.algorithms.base import EvalGroup
from framp_jax.algorithms.rounds import concat_cohorts, draw_level_cohorts, train_cohort

MODELS = ("cnn", "resnet18")  # the families whose feature unit this extraction handles


class WidthExtraction:
    def __init__(self, ctx, width_rates, template, prunable):
        self.ctx = ctx
        self.spec, self.keep = ctx.family.width_spec, ctx.family.feature_units
        self.sizes = W.check_spec(template, self.spec)
        self.rates = {float(b): float(r) for b, r in zip(ctx.budget_levels, width_rates)}
        self.template, self.prunable = template, prunable
        total = sum(int(np.prod(x.shape)) for x, f in
                    zip(jax.tree.leaves(template), jax.tree.leaves(prunable)) if f)
        self.kept, self.sent = {}, {}
        for b, r in self.rates.items():
            shapes = jax.eval_shape(lambda p: W.gather(p, self.spec, self.indices(p, r)), template)
            sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)]
            self.kept[b] = sum(n for n, f in zip(sizes, jax.tree.leaves(prunable)) if f)
            # values a client of this level gets (and returns): its narrow pytree (biases and
            # norm scales narrowed too) and its prototypes on the feature channels it holds
            n_feat = W.width_of(self.sizes[self.keep[0]], r)
            self.sent[b] = sum(sizes) + ctx.num_classes * n_feat
        self.fractions = {b: k / total for b, k in self.kept.items()}

    def indices(self, theta, rate):
        return W.norm_topk_indices(theta, self.spec, rate)

    def narrow(self, theta, rate):
        return W.gather(theta, self.spec, self.indices(theta, rate))

    def client(self, rate, train_with_prototypes):
        """One client at width ``rate``, ``run(x, y, n, key, theta_gen, protos, valid)``:
        ``train_with_prototypes(protos, valid, p0, mask, x, y, n, key) -> (params, loss,
        prototypes, counts)`` trains the narrow model and returns its prototypes at the
        configured timing (framp.py)."""
        def run(x, y, n, key, theta_gen, protos, valid):
            idx = self.indices(theta_gen, rate)
            fidx = idx[self.keep[0]]  # the kept feature channels
            p0 = W.gather(theta_gen, self.spec, idx)
            p, loss, pro, cnt = train_with_prototypes(protos[:, fidx], valid, p0, None, x, y, n,
                                                      key)
            zeros = jax.tree.map(jnp.zeros_like, theta_gen)
            delta = W.scatter(zeros, jax.tree.map(jnp.subtract, p0, p), self.spec, idx)
            dims = protos.shape[-1]
            pro_full = jnp.zeros((pro.shape[0], dims), pro.dtype).at[:, fidx].set(pro)
            dmask = jnp.zeros((dims,), pro.dtype).at[fidx].set(1.0)
            cls = W.scatter(jax.tree.map(jnp.zeros_like, theta_gen), p, self.spec, idx)["classifier"]
            return delta, cls, pro_full, cnt, loss, dmask
        return run

    def round(self, state, data, t, phi, generate, heads_of, train_with_prototypes,
              protos, valid):
        """Generate all participants at once (one VJP), then train each level at its shape.
        Returns (the round's cohort, vjp_fn, delta, classifiers, prototypes, counts, losses,
        kept prunable entries, feature-channel masks, values sent to each client), every
        level's clients concatenated in order."""
        levels = draw_level_cohorts(self.ctx, data, t)
        co = concat_cohorts([c for _, c in levels])
        theta_gen, vjp_fn = jax.vjp(
            lambda ph: generate(ph, state.desc[co.ids], heads_of(co.ids), co.ids), phi)
        outs, kept, sent, off = [], [], [], 0
        for budget, lco in levels:
            m = lco.ids.shape[0]
            th = jax.tree.map(lambda a: a[off:off + m], theta_gen)
            run = self.client(self.rates[budget], train_with_prototypes)
            outs.append(train_cohort(self.ctx, run, lco, th, protos, valid,
                                     extra_axes=(0, None, None)))
            kept.append(jnp.full((m,), float(self.kept[budget])))
            sent.append(jnp.full((m,), float(self.sent[budget])))
            off += m
        cat = lambda *xs: jnp.concatenate(xs, axis=0)
        delta, cls, pro, cnt, losses, dmask = jax.tree.map(cat, *outs)
        return (co, vjp_fn, delta, cls, pro, cnt, losses, jnp.concatenate(kept), dmask,
                jnp.concatenate(sent))

    def eval_groups(self, state, generate, heads_of):
        out = []
        for b, r in self.rates.items():
            ids = np.flatnonzero(np.isclose(self.ctx.budgets, b))
            if len(ids) == 0:
                continue
            th = generate(state.phi, state.desc[jnp.asarray(ids)], heads_of(jnp.asarray(ids)),
                          jnp.asarray(ids))
            params = jax.vmap(lambda t, r=r: self.narrow(t, r))(th)
            out.append(EvalGroup(self.ctx.model.apply, params, ids, per_client=True))
        return out
