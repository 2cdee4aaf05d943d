"""Attention and Transformer encoder layers against torch's own modules, the slow
Hamilton-product reference and gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quatnn import algebra
from quatnn import functional as QF
from quatnn.nn import QDropout, QLayerNorm, QLinear, QMultiheadAttention, QTransformerEncoderLayer
from quatnn.nn.attention import MultiheadAttention, TransformerEncoderLayer


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomize_biases(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=_seeded(len(name)), dtype=p.dtype))
    return module


def _torch_mha(ours, weights):
    """torch's nn.MultiheadAttention holding the real projection ``weights`` (name ->
    (weight, bias)) of ``ours`` (float64, eval)."""
    e, kdim, vdim = ours.embed_dim, ours.kdim, ours.vdim
    ref = nn.MultiheadAttention(
        e, ours.num_heads, batch_first=ours.batch_first, kdim=kdim, vdim=vdim, dtype=torch.float64
    ).eval()
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (weights[n] for n in ("q", "k", "v", "out"))
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(torch.cat([wq, wk, wv]))
        else:
            ref.q_proj_weight.copy_(wq), ref.k_proj_weight.copy_(wk), ref.v_proj_weight.copy_(wv)
        ref.in_proj_bias.copy_(torch.cat([bq, bk, bv]))
        ref.out_proj.weight.copy_(wo), ref.out_proj.bias.copy_(bo)
    return ref


def _real_weights(ours):
    return {n: (getattr(ours, f"{n}_proj").weight, getattr(ours, f"{n}_proj").bias)
            for n in ("q", "k", "v", "out")}  # fmt: skip


def _folded_weights(ours):
    """The quaternion projections as real matrices (block_weight), with the projected
    features reordered so that torch's contiguous heads are ours: torch feature
    ``h 4c + a c + j`` is our blocked feature ``a C + h c + j``."""
    heads, quaternions = ours.num_heads, ours.embed_dim // 4
    c = quaternions // heads
    order = torch.tensor(
        [a * quaternions + h * c + j for h in range(heads) for a in range(4) for j in range(c)]
    )
    out = {}
    for n in ("q", "k", "v", "out"):
        proj = getattr(ours, f"{n}_proj")
        w, b = QF.block_weight(proj.weight), proj.bias
        out[n] = (w[:, order], b) if n == "out" else (w[order], b[order])
    return out


CASES = [
    dict(),
    dict(batch_first=True),
    dict(unbatched=True),
    dict(key_padding_mask="bool"),
    dict(key_padding_mask="float", batch_first=True),
    dict(attn_mask="bool"),
    dict(attn_mask="per_head", key_padding_mask="float", batch_first=True),
    dict(attn_mask="causal", is_causal=True),
    dict(cross=True, batch_first=True),
    dict(kdim=12, vdim=20),
]


def _inputs(case, e, n=3, length=5, source=5):
    g = _seeded(1)
    kdim, vdim = case.get("kdim", e), case.get("vdim", e)
    source = 7 if case.get("cross") or "kdim" in case else source
    shapes = [(length, e), (source, kdim), (source, vdim)]
    if not case.get("unbatched"):
        shapes = [(n, *s) if case.get("batch_first") else (s[0], n, s[1]) for s in shapes]
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    if not (case.get("cross") or "kdim" in case):
        k = v = q  # self-attention
    kw = {}
    if case.get("key_padding_mask"):
        pad = torch.zeros(n, source, dtype=torch.bool)
        pad[0, -2:] = pad[2, 0] = True
        kw["key_padding_mask"] = pad if case["key_padding_mask"] == "bool" else pad.double() * -1e9
    mask = case.get("attn_mask")
    if mask == "bool":
        kw["attn_mask"] = torch.rand(length, source, generator=g) < 0.3
        kw["attn_mask"][:, 0] = False  # every query keeps one key
    elif mask == "per_head":
        kw["attn_mask"] = torch.randn(n * 2, length, source, generator=g, dtype=torch.float64)
    elif mask == "causal":
        kw["attn_mask"] = torch.ones(length, source, dtype=torch.bool).triu(1)
        kw["is_causal"] = True
    return q, k, v, kw


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.items())) or "plain")
@pytest.mark.parametrize("quaternion", [False, True], ids=["real", "quaternion"])
def test_attention_equals_torch_multihead_attention(case, quaternion):
    """Our real attention with torch's weights, and the quaternion one with its folded
    weights (heads reordered), give torch's outputs and attention weights, masks included."""
    torch.manual_seed(0)
    cls = QMultiheadAttention if quaternion else MultiheadAttention
    kw = {k: case[k] for k in ("batch_first", "kdim", "vdim") if k in case}
    ours = _randomize_biases(cls(16, 2, **kw, dtype=torch.float64)).eval()
    ref = _torch_mha(ours, (_folded_weights if quaternion else _real_weights)(ours))
    q, k, v, masks = _inputs(case, 16)
    for average in (True, False):
        with torch.no_grad():
            got, got_w = ours(q, k, v, **masks, average_attn_weights=average)
            want, want_w = ref(q, k, v, **masks, average_attn_weights=average)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_w, want_w)
    with torch.no_grad():  # the fused kernel (need_weights=False) agrees too
        fused, none = ours(q, k, v, **masks, need_weights=False)
    assert none is None
    torch.testing.assert_close(fused, want)


def test_quaternion_scores_are_the_real_part_of_the_quaternion_inner_product():
    """Independent reference: Hamilton products of each query quaternion with the
    conjugate key quaternion of its head, summed, real part, scaled by 1/sqrt(4c)."""
    torch.manual_seed(0)
    heads, e = 2, 24  # 6 quaternions, 3 per head
    att = _randomize_biases(QMultiheadAttention(e, heads, batch_first=True, dtype=torch.float64))
    x = torch.randn(2, 5, e, dtype=torch.float64)
    with torch.no_grad():
        out, weights = att(x, x, x, average_attn_weights=False)
        q, k, v = (algebra.reference_linear(x, p.weight, p.bias) for p in
                   (att.q_proj, att.k_proj, att.v_proj))  # fmt: skip
        qe, ke, ve = (algebra.to_explicit(t, -1).unflatten(-2, (heads, -1)) for t in (q, k, v))
        # (N, L, H, c, 4) x (N, S, H, c, 4) -> (N, H, L, S)
        products = algebra.hamilton_product(
            qe.unsqueeze(2), algebra.conjugate(ke).unsqueeze(1)
        )  # (N, L, S, H, c, 4)
        scores = products[..., 0].sum(-1).permute(0, 3, 1, 2) / (4 * 3) ** 0.5
        want_w = scores.softmax(-1)
        mixed = torch.einsum("nhls,nshcq->nlhcq", want_w, ve)  # (N, L, H, c, 4)
        want = algebra.reference_linear(
            algebra.to_blocked(mixed.flatten(2, 3), -1), att.out_proj.weight, att.out_proj.bias
        )
    torch.testing.assert_close(weights, want_w)
    torch.testing.assert_close(out, want)


def test_attention_weights_invariant_to_a_common_left_rotation():
    """Left-multiplying every query and key projection weight (and bias) quaternion by one
    unit quaternion rotates all queries and keys alike: the attention weights stay."""
    torch.manual_seed(0)
    att = _randomize_biases(QMultiheadAttention(16, 2, batch_first=True, dtype=torch.float64))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        before = att(x, x, x)[1]
        u = algebra.normalize(torch.randn(4, dtype=torch.float64))
        for proj in (att.q_proj, att.k_proj):
            w = algebra.hamilton_product(u, proj.weight.movedim(0, -1)).movedim(-1, 0)
            b = algebra.hamilton_product(u, algebra.to_explicit(proj.bias, 0))
            b = algebra.to_blocked(b, 0)
            proj.weight.copy_(w), proj.bias.copy_(b)
        after = att(x, x, x)[1]
        # a rotation of the queries alone does change them (the test can fail)
        w = att.q_proj.weight.movedim(0, -1)
        att.q_proj.weight.copy_(algebra.hamilton_product(u, w).movedim(-1, 0))
        changed = att(x, x, x)[1]
    torch.testing.assert_close(after, before)
    assert not torch.allclose(changed, before, atol=1e-3)


@pytest.mark.parametrize("need_weights", [False, True])
def test_quaternion_attention_gradcheck(need_weights):
    torch.manual_seed(0)
    att = _randomize_biases(QMultiheadAttention(8, 2, batch_first=True, dtype=torch.float64))
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False, False, False, True], [False] * 4])

    def f(q, kv, *weights):
        params = dict(zip([n for n, _ in att.named_parameters()], weights, strict=True))
        out = torch.func.functional_call(
            att, params, (q, kv, kv), {"key_padding_mask": pad, "need_weights": need_weights}
        )
        return out[0]

    assert torch.autograd.gradcheck(f, (q, kv, *att.parameters()))


def test_attention_parameters_and_dropout():
    real, quat = MultiheadAttention(64, 4), QMultiheadAttention(64, 4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(real) == count(nn.MultiheadAttention(64, 4)) == 4 * (64 * 64 + 64)
    assert count(quat) == 4 * (64 * 64 // 4 + 64)
    assert "QLinear" in repr(quat) and "num_heads=4" in repr(quat)
    # Dropout of attention weights: in training the weights returned are dropped and rescaled,
    # in eval they are not.
    torch.manual_seed(0)
    att = QMultiheadAttention(8, 1, dropout=0.5, batch_first=True)
    x = torch.randn(1, 64, 8)
    _, w = att(x, x, x)
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.allclose(w.sum(-1).mean(), torch.tensor(1.0), atol=0.05)
    att.eval()
    _, w = att(x, x, x)
    assert (w > 0).all() and torch.allclose(w.sum(-1), torch.ones(1, 64))


@pytest.mark.parametrize("kdim", [None, 64])
def test_real_attention_init_is_torch_and_reset_parameters_repeats_it(kdim):
    """torch's init: Glorot-uniform q/k/v with the bound of its one (3E, E) in_proj_weight
    when kdim = vdim = E (separate matrices otherwise), zero biases. Each projection's
    reset_parameters (what the lottery's reinit control calls on every module) gives the
    same init again, not nn.Linear's."""
    torch.manual_seed(0)
    e = 256
    att = MultiheadAttention(e, 4, kdim=kdim, vdim=kdim)
    ref = nn.MultiheadAttention(e, 4, kdim=kdim, vdim=kdim)
    if kdim is None:
        bounds = dict.fromkeys("qkv", (6 / (e + 3 * e)) ** 0.5)
        assert ref.in_proj_weight.abs().max() <= bounds["q"]
    else:
        bounds = {"q": (6 / (2 * e)) ** 0.5, "k": (6 / (e + kdim)) ** 0.5}
        bounds["v"] = bounds["k"]
    for reset in (False, True):
        if reset:
            for module in att.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        for n, bound in bounds.items():
            w = getattr(att, f"{n}_proj").weight.abs().max().item()
            assert 0.97 * bound < w <= bound, (n, reset)
        for n in ("q", "k", "v", "out"):
            assert not getattr(att, f"{n}_proj").bias.any(), (n, reset)
        bound = e**-0.5  # out_proj: nn.Linear's weight init, as torch's
        assert 0.97 * bound < att.out_proj.weight.abs().max().item() <= bound


def test_attention_bad_input_is_named():
    with pytest.raises(ValueError, match="embed_dim must be a positive multiple of 4"):
        QMultiheadAttention(18, 2)
    with pytest.raises(ValueError, match="multiple of 4 .each head holds whole quaternions"):
        QMultiheadAttention(16, 8)
    with pytest.raises(ValueError, match="kdim must be a positive multiple of 4"):
        QMultiheadAttention(16, 2, kdim=6)
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing"):
        MultiheadAttention(16, 3)
    with pytest.raises(ValueError, match="dropout must be in"):
        MultiheadAttention(16, 2, dropout=1.5)
    with pytest.raises(TypeError):  # torch's order: add_bias_kv, add_zero_attn, kdim, ...
        QMultiheadAttention(16, 2, 0.0, True, False, False, 12)
    att = QMultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="query has 12 features, expected 16"):
        att(x[..., :12], x, x)
    with pytest.raises(ValueError, match="key and value must have the same batch and length"):
        att(x, x, x[:, :4])
    with pytest.raises(ValueError, match="batch sizes differ: 2 and 1"):
        att(x, x[:1], x[:1])
    with pytest.raises(ValueError, match="must all be 3-d"):
        att(x, x[0], x[0])
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(5, 5\)"):
        att(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\)"):
        att(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating point"):
        att(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))


# --------------------------------------------------------------------------- encoder layers


def _torch_encoder_layer(ours, **kw):
    ref = nn.TransformerEncoderLayer(dtype=torch.float64, **kw).eval()
    with torch.no_grad():
        mha = _torch_mha(ours.self_attn, _real_weights(ours.self_attn))
        ref.self_attn.load_state_dict(mha.state_dict())
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
    return ref


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_real_encoder_layer_equals_torch(norm_first, activation):
    torch.manual_seed(0)
    kw = dict(d_model=16, nhead=2, dim_feedforward=24, activation=activation,
              norm_first=norm_first, batch_first=True)  # fmt: skip
    ours = _randomize_biases(TransformerEncoderLayer(**kw, dtype=torch.float64)).eval()
    ref = _torch_encoder_layer(ours, **kw)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, -2:] = True
    for masks in ({}, {"src_key_padding_mask": pad}):
        torch.testing.assert_close(ours(x, **masks), ref(x, **masks))


@pytest.mark.parametrize("norm_first", [False, True])
def test_quaternion_encoder_layer_wiring(norm_first):
    """The quaternion layer is torch's composition of its own (separately tested) parts."""
    torch.manual_seed(0)
    layer = QTransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu",
                                     norm_first=norm_first, dtype=torch.float64)  # fmt: skip
    layer = _randomize_biases(layer)
    assert isinstance(layer.self_attn, QMultiheadAttention)
    assert isinstance(layer.linear1, QLinear) and isinstance(layer.norm1, QLayerNorm)
    assert isinstance(layer.dropout, QDropout) and layer.dropout.dim == -1
    x = torch.randn(5, 3, 16, dtype=torch.float64)  # (L, N, E): batch_first=False
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)

    def sa(t):
        return layer.self_attn(t, t, t, attn_mask=mask, need_weights=False)[0]

    def ff(t):
        return layer.linear2(F.gelu(layer.linear1(t)))

    if norm_first:
        h = x + sa(layer.norm1(x))
        want = h + ff(layer.norm2(h))
    else:
        h = layer.norm1(x + sa(x))
        want = layer.norm2(h + ff(h))
    torch.testing.assert_close(layer(x, src_mask=mask), want)
    with pytest.raises(ValueError, match="activation must be one of"):
        QTransformerEncoderLayer(16, 2, activation="swish")


def test_quaternion_encoder_stack_gradcheck_and_size():
    torch.manual_seed(0)
    layer = QTransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=torch.float64)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(encoder, (x,))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    real = count(nn.TransformerEncoderLayer(64, 4, 128))
    quaternion = count(QTransformerEncoderLayer(64, 4, 128))
    assert 0.25 < quaternion / real < 0.3  # weights quartered; biases and norms are not


@pytest.mark.parametrize("cls", [TransformerEncoderLayer, QTransformerEncoderLayer])
def test_encoder_layer_bias_false_drops_the_norm_biases_too(cls):
    """torch's bias=False takes the bias out of the layer norms as well as the linear maps."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, bias=False, dtype=torch.float64)
    layer = cls(16, 2, 32, dropout=0.0, bias=False, dtype=torch.float64).eval()
    assert [n for n, _ in ref.named_parameters() if n.endswith("bias")] == []
    assert [n for n, _ in layer.named_parameters() if n.endswith("bias")] == []
    if cls is TransformerEncoderLayer:  # and torch's state dict, projections joined, fits
        state = {k: v for k, v in layer.state_dict().items() if "_proj" not in k}
        attention = layer.self_attn
        state["self_attn.in_proj_weight"] = torch.cat(
            [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
        )
        state["self_attn.out_proj.weight"] = attention.out_proj.weight
        ref.load_state_dict(state)  # strict
        x = torch.randn(5, 3, 16, dtype=torch.float64)
        torch.testing.assert_close(layer(x), ref.eval()(x))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_is_causal_alone_applies_the_causal_mask(need_weights, padded):
    """torch needs attn_mask with is_causal; here is_causal alone builds that mask."""
    torch.manual_seed(0)
    att = QMultiheadAttention(16, 2, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad = pad if padded else None
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    kw = {"key_padding_mask": pad, "need_weights": need_weights}
    with torch.no_grad():
        got = att(x, x, x, is_causal=True, **kw)[0]
        want = att(x, x, x, attn_mask=causal, **kw)[0]
        plain = att(x, x, x, **kw)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
