"""Attention in one canonical form (docs/method.md, "Modules of a transformer"), :class:`HeadAttention`: one ``qkv``
linear layer reshaped to heads, scaled dot-product attention, an output projection ``proj``. The layouts users
write (timm's fused ``qkv``, separate query/key/value layers as Hugging Face writes them, ``nn.MultiheadAttention``)
are converted to it once (:func:`canonical`), each conversion checked to compute what the user's layer computes;
the graph keeps each attention layer one node (:func:`is_attention`). A layer that computes more than that (a
relative position bias, talking heads, rotary embeddings, cross-covariance attention, spatial reduction, a class
token attending alone) is kept whole: its heads stay, the network around it is cut (:func:`kept_whole`). A head
is gated at the projection's input (its ``head_dim`` columns) and sliced by cutting its rows of ``qkv`` and its
columns of ``proj`` (:meth:`HeadAttention.keep_heads`; slim's units, :mod:`cnnmod.slim.units`, do the cutting).
"""

from __future__ import annotations

import weakref
from collections.abc import Collection

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads", "heads", "n_head")
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"),
             ("to_q", "to_k", "to_v"))
OUT_NAMES = ("proj", "out_proj", "o_proj", "to_out", "out", "dense")
_WHY_WHOLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> why canonical kept it whole


class HeadAttention(nn.Module):
    """Multi-head self-attention in the form slicing keeps: ``qkv`` (dim -> 3 heads head_dim), heads of
    ``head_dim``, softmax(q k^T scale) v, ``proj`` (heads head_dim -> dim). timm's ``Attention`` state-dict keys;
    ``forward`` depends on ``num_heads``, never on the input's width, so a copy with heads cut computes the rest
    unchanged. ``returns``: how the layer it replaced returned its output (``"tensor"``, ``"tuple:N"`` (the output
    first, N entries, the others None), or ``"mha"`` / ``"mha-seq-first"``: ``nn.MultiheadAttention``'s call and
    (output, None), batch first or not)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True, proj_bias: bool = True,
                 out_dim: int | None = None, scale: float | None = None, returns: str = "tensor") -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        self.returns = returns
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, out_dim or dim, bias=proj_bias)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, *args, **kwargs):
        mha = self.returns.startswith("mha")
        extra = (args[2:] if mha else args) + tuple(kwargs.values())
        if any(isinstance(a, torch.Tensor) for a in extra):
            raise UserError("cnnmod's attention runs without masks or head masks; call the layer on the tokens "
                            "alone")
        if mha:
            if self.returns == "mha-seq-first":
                return self.attend(x.transpose(0, 1)).transpose(0, 1), None
            return self.attend(x), None
        out = self.attend(x)
        if self.returns.startswith("tuple:"):
            return (out,) + (None,) * (int(self.returns.split(":")[1]) - 1)
        return out

    def keep_heads(self, heads: torch.Tensor) -> None:
        """Cut to the heads ``heads`` (indices, in order): their rows of ``qkv``, their columns of ``proj``."""
        d, h = self.head_dim, self.num_heads
        cols = (heads[:, None] * d + torch.arange(d)).flatten()
        rows = torch.cat([part * h * d + cols for part in range(3)])
        self.qkv = cut_linear(self.qkv, rows=rows)
        if isinstance(self.proj, ConcatHeads):  # the projection lies outside (its columns are cut there)
            self.proj = ConcatHeads(cols.numel())
        else:
            self.proj = cut_linear(self.proj, cols=cols)
        self.num_heads = int(heads.numel())

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


def cut_linear(layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A copy of a linear layer or 1x1 convolution with only the output ``rows`` and input ``cols`` kept."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        rows = rows.to(w.device)
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols.to(w.device)]
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        bias=b is not None)
    new = new.to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(layer.training)
    return new


# ------------------------------------------------------------------------------------------------ attention
def head_count(m: nn.Module) -> int | None:
    """The head count an attention layer records under one of :data:`HEAD_COUNT_NAMES`, or None."""
    for name in HEAD_COUNT_NAMES:
        v = getattr(m, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _separate(m: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    for names in QKV_NAMES:
        layers = [getattr(m, n, None) for n in names]
        if all(isinstance(v, nn.Linear) for v in layers):
            return tuple(layers)
    return None


def _out_projection(m: nn.Module) -> nn.Linear | None:
    for name in OUT_NAMES:
        v = getattr(m, name, None)
        if isinstance(v, nn.Sequential) and len(v) and isinstance(v[0], nn.Linear):
            v = v[0]  # to_out = Sequential(Linear, Dropout)
        if isinstance(v, nn.Linear):
            return v
    return None


def is_attention(m: nn.Module) -> bool:
    """Whether ``m`` is a self-attention layer in one of the layouts :func:`canonical` converts."""
    if isinstance(m, (HeadAttention, nn.MultiheadAttention)):
        return True
    if type(m).__module__.startswith("torch.nn"):
        return False
    fused = isinstance(getattr(m, "qkv", None), nn.Linear)
    return fused or _separate(m) is not None or _query_and_kv(m)


def _query_and_kv(m: nn.Module) -> bool:
    """A query layer and one joint key/value layer (spatial-reduction attention: PVT v2, SegFormer): kept whole."""
    return isinstance(getattr(m, "q", None), nn.Linear) and isinstance(getattr(m, "kv", None), nn.Linear)


def _layout(m: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear | None, int | None]:
    """A recognised attention layer's fused q/k/v weight (3 H d, dim) and bias, its output projection (None: the
    layer ends at the heads' concatenation, the projection lies outside it) and its recorded head count."""
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise UserError(f"cnnmod cannot follow the attention in layer {name!r}: nn.MultiheadAttention with "
                            "separate key/value sizes, bias_k or add_zero_attn; use self-attention with one "
                            "embedding size")
        return m.in_proj_weight.detach(), (m.in_proj_bias.detach() if m.in_proj_bias is not None else None), \
            m.out_proj, m.num_heads
    fused = getattr(m, "qkv", None)
    if isinstance(fused, nn.Linear):
        w, b = fused.weight.detach(), fused.bias.detach() if fused.bias is not None else None
    elif _separate(m) is None:
        raise UserError(f"cnnmod cannot follow the attention in layer {name!r}: its keys and values come from one "
                        "layer of their own (spatial-reduction attention)")
    else:
        q, k, v = _separate(m)
        w = torch.cat([q.weight, k.weight, v.weight]).detach()
        b = torch.cat([q.bias, k.bias, v.bias]).detach() if q.bias is not None else None
    return w, b, _out_projection(m), head_count(m)


def parse_heads(text: str | None) -> dict[str, int]:
    """``"layer=N,layer=N"`` (the ``heads`` setting) as {layer: N}."""
    out: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        layer, _, n = part.partition("=")
        if not n.strip().isdigit() or int(n) < 1:
            raise UserError(f"«heads» gives head counts as layer=N,layer=N (N a whole number), got {part!r}")
        out[layer.strip()] = int(n)
    return out


def to_canonical(m: nn.Module, name: str, heads: dict[str, int] | None = None,
                 example: torch.Tensor | None = None) -> HeadAttention:
    """The :class:`HeadAttention` computing what attention layer ``m`` computes, checked on ``example`` (its input
    in the network) or on random tokens. The head count: given in ``heads``, else the one the layer records, else
    the one (of the divisors of its width) that computes what the layer does; a layer that computes something else
    is one line naming it."""
    if isinstance(m, HeadAttention):
        return m
    w, b, proj, recorded = _layout(m, name)
    given = (heads or {}).get(name) or recorded
    width = w.shape[0] // 3
    x = _example(w.shape[1], example).to(w)
    theirs = _their_output(m, name, x)  # the user's layer runs once, whatever head counts are tried
    if given is not None:
        if w.shape[0] % (3 * given):
            raise UserError(f"the attention layer {name!r} projects to {w.shape[0]} query/key/value features, not "
                            f"a multiple of 3 x {given} heads; give its head count: --set heads={name}=N")
        return _converted(m, name, (w, b, proj), given, x, theirs)
    for n in [n for n in range(1, width + 1) if width % n == 0 and width // n >= 4]:
        try:
            return _converted(m, name, (w, b, proj), n, x, theirs)
        except UserError:
            continue
    raise UserError(f"cannot read the head count of the attention layer {name!r} ({type(m).__name__} records none "
                    f"of {', '.join(HEAD_COUNT_NAMES)}, and no count computes what it does); give it: "
                    f"--set heads={name}=N")


def _converted(m: nn.Module, name: str, fused: tuple, n: int, x: torch.Tensor, theirs) -> HeadAttention:
    """``m`` as a :class:`HeadAttention` of ``n`` heads (``fused``: its q/k/v weight, bias and projection, as
    :func:`_layout` reads them), checked against ``theirs``, what ``m`` returned for the tokens ``x``."""
    w, b, proj = fused
    d, dim = w.shape[0] // (3 * n), w.shape[1]
    if isinstance(m, nn.MultiheadAttention):
        returns = "mha" if m.batch_first else "mha-seq-first"
    else:
        returns = f"tuple:{len(theirs)}" if isinstance(theirs, (tuple, list)) else "tensor"
    scale = getattr(m, "scale", None)
    scale = float(scale) if isinstance(scale, (int, float)) else None
    if proj is not None and proj.weight.shape[1] != n * d:  # values wider than queries and keys (EfficientFormer)
        raise UserError(f"cannot follow the attention in layer {name!r}: its projection reads "
                        f"{proj.weight.shape[1]} features of {n} heads of {d}")
    out_dim = proj.out_features if proj is not None else n * d
    new = HeadAttention(dim, n, d, qkv_bias=b is not None, proj_bias=proj is None or proj.bias is not None,
                        out_dim=out_dim, scale=scale, returns=returns)
    new = new.to(w.device, w.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(w)
        if b is not None:
            new.qkv.bias.copy_(b)
        if proj is not None:
            new.proj.weight.copy_(proj.weight)
            if proj.bias is not None:
                new.proj.bias.copy_(proj.bias)
    if proj is None:
        new.proj = ConcatHeads(n * d)
    _check_same(m, new, name, x, theirs)
    return new.train(m.training)


class ConcatHeads(nn.Module):
    """No projection: the heads' concatenation as it is, where the attention layer's own projection lies outside
    it (the layer after it reads the heads)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _example(dim: int, example: torch.Tensor | None) -> torch.Tensor:
    return example if example is not None else torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(0))


def _their_output(m: nn.Module, name: str, x: torch.Tensor):
    """What the user's attention layer returns for the tokens ``x`` (in eval mode, as the module will run)."""
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            return m(x, x, x, need_weights=False) if isinstance(m, nn.MultiheadAttention) else m(x)
    except Exception as e:  # noqa: BLE001 - any failure here means the layer is not attention cnnmod can follow
        raise UserError(f"cnnmod cannot follow the attention in layer {name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100] if str(e) else ''}); slim modules of it are not possible")
    finally:
        m.train(was)


def _check_same(m: nn.Module, new: HeadAttention, name: str, x: torch.Tensor, theirs) -> None:
    """One line naming the layer unless ``new`` returns for ``x`` what the user's layer returned (``theirs``)."""
    try:
        with torch.no_grad():
            ours = new.eval()(x)
    except Exception as e:  # noqa: BLE001 - tokens the canonical form cannot read (a (B, H, W, C) map)
        raise UserError(f"cnnmod cannot follow the attention in layer {name!r} ({type(m).__name__}): it reads "
                        f"{tuple(x.shape)[1:]} per input, not (tokens, features) ({type(e).__name__})")
    theirs = theirs[0] if isinstance(theirs, (tuple, list)) else theirs
    ours = ours[0] if isinstance(ours, (tuple, list)) else ours
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape:
        raise UserError(f"cnnmod cannot follow the attention in layer {name!r}: it returns "
                        f"{tuple(getattr(theirs, 'shape', ()))}, not the attended tokens; slim modules of it are not "
                        "possible")
    gap = float((theirs - ours).abs().max())
    if gap > 1e-4 * (float(theirs.abs().max()) + 1.0):
        raise UserError(f"cnnmod cannot follow the attention in layer {name!r} ({type(m).__name__}): it computes "
                        f"something besides softmax(q k^T / sqrt(d)) v over its heads (differs by {gap:.2g}: a "
                        "normalisation, a position bias, a mask); slim modules of it are not possible")


def canonical(net: nn.Module, heads: dict[str, int] | None = None,
              input_shape: tuple[int, ...] | None = None, whole: Collection[str] | None = None) -> nn.Module:
    """``net`` (changed in place) with every attention layer in :class:`HeadAttention` form (each conversion
    checked on the tokens the layer reads in ``net``'s forward pass on a random input of ``input_shape``, or on
    random tokens); ``heads``: head counts by layer name, where a layer does not record its own. A layer that
    cannot be converted is kept as it is (:func:`kept_whole` says why), and so are the layers named in ``whole``
    (as a saved module recorded them)."""
    found = [(n, m) for n, m in net.named_modules() if n and is_attention(m) and not isinstance(m, HeadAttention)]
    if not found:
        return net
    examples: dict[str, tuple[torch.Tensor, bool]] = {}  # the tokens, and whether more tensors were passed
    if input_shape is not None:
        def keep(name: str, m: nn.Module, args: tuple, kwargs: dict) -> None:  # a hook that changes nothing
            examples.setdefault(name, _call_of(m, args, kwargs))

        hooks = [m.register_forward_pre_hook(lambda _m, a, k, n=n: keep(n, _m, a, k), with_kwargs=True)
                 for n, m in found]
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                net(torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(
                    next(net.parameters()).device))
        except Exception:  # noqa: BLE001 - the forward's own failure is reported where the model is read
            pass
        finally:
            net.train(was)
            for h in hooks:
                h.remove()
    for name, m in found:
        if name in set(whole or ()):
            _WHY_WHOLE[m] = "kept whole when the module was made"
            continue
        x, more = examples.get(name, (None, False))
        try:
            if more:
                raise UserError(f"cnnmod cannot follow the attention in layer {name!r}: the network passes it "
                                "more than its tokens (a position embedding, a mask)")
            new = to_canonical(m, name, heads, x)
        except UserError as e:
            _WHY_WHOLE[m] = str(e).split("; slim modules")[0]
            continue
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, new)
    return net


def _call_of(m: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """The tokens an attention layer was called with, and whether it was passed other tensors too (for
    ``nn.MultiheadAttention``, besides the same tokens as query, key and value)."""
    x = args[0]
    rest = [a for a in args[1:] if not (isinstance(m, nn.MultiheadAttention) and a is x)] + list(kwargs.values())
    return x.detach(), any(isinstance(a, torch.Tensor) for a in rest)


def kept_whole(net: nn.Module) -> dict[str, str]:
    """The attention layers of ``net`` (after :func:`canonical`) left as they are, each with why."""
    return {n: _WHY_WHOLE.get(m, "not converted") for n, m in net.named_modules()
            if n and is_attention(m) and not isinstance(m, HeadAttention)}
