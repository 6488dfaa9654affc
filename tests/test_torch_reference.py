"""Convolution padding against hand computations, and whole vision models against PyTorch
references built from ``torch.nn`` layers in the layout of the official networks.

The references mirror the official models layer for layer (``nn.Conv2d(k, stride,
padding=(k - 1) // 2, bias=False)``, ``nn.BatchNorm2d(track_running_stats=False)`` for static
BN, the block orders below); the framp_jax weights are copied in (HWIO -> OIHW, [in, out] ->
[out, in]) and the logits and the gradients of the cross-entropy with respect to every weight
are compared. Skipped when torch is not installed (``pip install torch==2.13.0``).

* ``models/resnet.py``: the post-activation static-BN ResNet-18 (FIARSE's ``BetaResNet18_sbn``:
  conv-BN-ReLU stem, BasicBlock conv-BN-ReLU-conv-BN + (1x1 conv + BN) shortcut, ReLU, average
  pool, Linear);
* ``models/preact.py``: HeteroFL's pre-activation ResNet-18 with Scaler (``x / rate`` in
  training) and BN, at width 1/2;
* ``models/exits.py``: ScaleFL's early-exit ResNet-18 at width 1/2 (Scaler between conv and BN
  in train and eval, no Scaler on the shortcut), every exit's logits.

The hand-computed padding cases, which need no torch, are in ``tests/test_conv_padding.py``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.models.exits import make_resnet18_exits
from framp_jax.models.preact import make_preact_resnet18
from framp_jax.models.resnet import make_resnet18

IMPLS = ("xla", "im2col")


# -- PyTorch references ----------------------------------------------------------------------

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


def _sbn(c):
    return nn.BatchNorm2d(c, track_running_stats=False)


class _Scaler(nn.Module):
    def __init__(self, rate, train_only):
        super().__init__()
        self.rate, self.train_only = rate, train_only

    def forward(self, x):
        return x / self.rate if (self.training or not self.train_only) else x


class TorchBasicBlock(nn.Module):
    """Post-activation BasicBlock (FIARSE ``BetaResNet18_sbn``; ScaleFL's with a Scaler)."""

    def __init__(self, cin, c, stride, scaler=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, padding=1, bias=False)
        self.bn1 = _sbn(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, padding=1, bias=False)
        self.bn2 = _sbn(c)
        self.scaler = scaler or nn.Identity()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), _sbn(c))

    def forward(self, x):
        out = F.relu(self.bn1(self.scaler(self.conv1(x))))
        out = self.bn2(self.scaler(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class TorchResNet18(nn.Module):
    """Post-activation ResNet-18; ``exits`` adds an average-pool + Linear head after stages 1-3
    (ScaleFL's ResNet-18 adaptation) and ``rate`` a Scaler active in train and eval."""

    def __init__(self, widths, num_classes, cin=3, rate=1.0, exits=False):
        super().__init__()
        scaler = _Scaler(rate, train_only=False) if rate < 1 else None
        self.conv1 = nn.Conv2d(cin, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = _sbn(widths[0])
        self.scaler = scaler or nn.Identity()
        c_prev, stages = widths[0], []
        for c, s in zip(widths, (1, 2, 2, 2)):
            stages.append(nn.Sequential(TorchBasicBlock(c_prev, c, s, scaler),
                                        TorchBasicBlock(c, c, 1, scaler)))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList([nn.Linear(c, num_classes) for c in widths[:3]]) if exits else None
        self.linear = nn.Linear(c_prev, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.scaler(self.conv1(x))))
        outs = []
        for s, stage in enumerate(self.stages):
            out = stage(out)
            if self.exits is not None and s < 3:
                outs.append(self.exits[s](F.adaptive_avg_pool2d(out, 1).flatten(1)))
        outs.append(self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1)))
        return outs


class TorchPreActBlock(nn.Module):
    """HeteroFL's pre-activation block: n1(scaler(x)) -> relu -> conv1 -> n2(scaler) -> relu ->
    conv2, plus the 1x1 shortcut of relu(n1(scaler(x))) when the shape changes."""

    def __init__(self, cin, c, stride, rate):
        super().__init__()
        self.scaler = _Scaler(rate, train_only=True)
        self.n1 = _sbn(cin)
        self.conv1 = nn.Conv2d(cin, c, 3, stride, padding=1, bias=False)
        self.n2 = _sbn(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, c, 1, stride, bias=False)
                         if stride != 1 or cin != c else None)

    def forward(self, x):
        out = F.relu(self.n1(self.scaler(x)))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.n2(self.scaler(out))))
        return out + sc


class TorchPreActResNet18(nn.Module):
    def __init__(self, widths, num_classes, rate, cin=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, widths[0], 3, 1, padding=1, bias=False)
        c_prev, blocks = widths[0], []
        for c, s in zip(widths, (1, 2, 2, 2)):
            blocks += [TorchPreActBlock(c_prev, c, s, rate), TorchPreActBlock(c, c, 1, rate)]
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.scaler = _Scaler(rate, train_only=True)
        self.n4 = _sbn(c_prev)
        self.linear = nn.Linear(c_prev, num_classes)

    def forward(self, x):
        out = self.blocks(self.conv1(x))
        out = F.relu(self.n4(self.scaler(out)))
        return [self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))]


# -- weight copying: (torch parameter, framp_jax leaf path) pairs -----------------------------

def _post_act_pairs(tm: TorchResNet18, has_exits: bool):
    pairs = [(tm.conv1.weight, ("stem", "kernel")), (tm.bn1.weight, ("stem_bn", "scale")),
             (tm.bn1.bias, ("stem_bn", "offset"))]
    for s, stage in enumerate(tm.stages):
        for b, blk in enumerate(stage):
            n = f"layer{s + 1}_{b}"
            pairs += [(blk.conv1.weight, (n, "conv1", "kernel")), (blk.bn1.weight, (n, "bn1", "scale")),
                      (blk.bn1.bias, (n, "bn1", "offset")), (blk.conv2.weight, (n, "conv2", "kernel")),
                      (blk.bn2.weight, (n, "bn2", "scale")), (blk.bn2.bias, (n, "bn2", "offset"))]
            if len(blk.shortcut):
                pairs += [(blk.shortcut[0].weight, (n, "shortcut", "kernel")),
                          (blk.shortcut[1].weight, (n, "shortcut_bn", "scale")),
                          (blk.shortcut[1].bias, (n, "shortcut_bn", "offset"))]
        if has_exits and s < 3:
            pairs += [(tm.exits[s].weight, (f"exit{s + 1}", "kernel")),
                      (tm.exits[s].bias, (f"exit{s + 1}", "bias"))]
    return pairs + [(tm.linear.weight, ("classifier", "kernel")), (tm.linear.bias, ("classifier", "bias"))]


def _preact_pairs(tm: TorchPreActResNet18):
    pairs = [(tm.conv1.weight, ("stem", "kernel"))]
    for i, blk in enumerate(tm.blocks):
        n = f"layer{i // 2 + 1}_{i % 2}"
        pairs += [(blk.n1.weight, (n, "n1", "scale")), (blk.n1.bias, (n, "n1", "offset")),
                  (blk.conv1.weight, (n, "conv1", "kernel")), (blk.n2.weight, (n, "n2", "scale")),
                  (blk.n2.bias, (n, "n2", "offset")), (blk.conv2.weight, (n, "conv2", "kernel"))]
        if blk.shortcut is not None:
            pairs.append((blk.shortcut.weight, (n, "shortcut", "kernel")))
    return pairs + [(tm.n4.weight, ("n4", "scale")), (tm.n4.bias, ("n4", "offset")),
                    (tm.linear.weight, ("classifier", "kernel")), (tm.linear.bias, ("classifier", "bias"))]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _to_torch_layout(a):
    a = np.asarray(a, np.float32)
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)   # HWIO -> OIHW
    if a.ndim == 2:
        return a.T                        # [in, out] -> [out, in]
    return a


def _load(pairs, params):
    seen = set()
    with torch.no_grad():
        for p, path in pairs:
            w = _to_torch_layout(_get(params, path))
            assert tuple(p.shape) == w.shape, (path, tuple(p.shape), w.shape)
            p.copy_(torch.from_numpy(np.array(w, copy=True)))
            seen.add(path)
    n_leaves = len(jax.tree.leaves(params))
    assert len(seen) == n_leaves, f"{n_leaves - len(seen)} framp_jax leaves have no torch parameter"


def _compare(tm, pairs, params, jax_logits_fn, x, y, train):
    """Max |difference| of the logits and of every weight's gradient (relative to the largest
    gradient entry of that leaf), after asserting both are within float32 rounding."""
    _load(pairs, params)
    tm.train(train)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(np.asarray(y).astype(np.int64))
    outs = tm(xt)
    loss_t = sum(F.cross_entropy(o, yt) for o in outs)
    tm.zero_grad()
    loss_t.backward()

    def loss_j(p):
        return sum(jnp.mean(-jax.nn.log_softmax(lg)[jnp.arange(len(y)), y]) for lg in jax_logits_fn(p, x))

    loss_val, grads = jax.value_and_grad(loss_j)(params)
    logits_j = jax_logits_fn(params, x)
    worst_logit = max(float(np.max(np.abs(np.asarray(a) - b.detach().numpy())))
                      for a, b in zip(logits_j, outs))
    assert worst_logit < 2e-4, worst_logit
    assert abs(float(loss_val) - float(loss_t.detach())) < 1e-4
    worst_grad = 0.0
    for p, path in pairs:
        gj = _to_torch_layout(_get(grads, path))
        gt = p.grad.numpy()
        scale = max(float(np.max(np.abs(gt))), 1e-6)
        err = float(np.max(np.abs(gj - gt))) / scale
        assert err < 1e-3, (path, err)
        worst_grad = max(worst_grad, err)
    print(f"{tm.__class__.__name__}: max |logit diff| {worst_logit:.2e}, max relative gradient "
          f"diff {worst_grad:.2e}")
    return worst_logit, worst_grad


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=4).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("impl", IMPLS)
def test_resnet18_matches_torch(batch, impl):
    x, y = batch
    m = make_resnet18(10, (32, 32, 3), width=0.25, conv_impl=impl)
    params = m.init(jax.random.key(3))
    widths = [math.ceil(0.25 * c) for c in (64, 128, 256, 512)]
    tm = TorchResNet18(widths, 10)
    fn = lambda p, xx: [m.apply(p, xx, train=True)[0]]
    _compare(tm, _post_act_pairs(tm, False), params, fn, x, y, train=True)


@pytest.mark.slow
def test_resnet18_full_width_matches_torch(batch):
    x, y = batch
    m = make_resnet18(10, (32, 32, 3), conv_impl="im2col")
    params = m.init(jax.random.key(4))
    tm = TorchResNet18([64, 128, 256, 512], 10)
    fn = lambda p, xx: [m.apply(p, xx)[0]]
    _compare(tm, _post_act_pairs(tm, False), params, fn, x[:2], y[:2], train=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_preact_resnet18_matches_torch(batch, impl):
    x, y = batch
    m = make_preact_resnet18(10, (32, 32, 3), width=0.5, conv_impl=impl)
    params = m.init(jax.random.key(5))
    widths = [math.ceil(0.5 * c) for c in (64, 128, 256, 512)]
    tm = TorchPreActResNet18(widths, 10, rate=0.5)
    fn = lambda p, xx: [m.apply(p, xx, train=True)[0]]
    _compare(tm, _preact_pairs(tm), params, fn, x, y, train=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_scalefl_exit_resnet18_matches_torch(batch, impl):
    x, y = batch
    m = make_resnet18_exits(10, (32, 32, 3), width=0.5, exits=4, conv_impl=impl)
    params = m.init(jax.random.key(6))
    widths = [int(0.5 * c) for c in (64, 128, 256, 512)]
    tm = TorchResNet18(widths, 10, rate=0.5, exits=True)
    fn = lambda p, xx: m.apply_exits(p, xx, train=False)
    # static BN: batch statistics in evaluation too; the Scaler is on in train and eval
    _compare(tm, _post_act_pairs(tm, True), params, fn, x, y, train=True)
