"""A Hugging Face causal LM behind recompute_lab's model interface, so every strategy, the probe,
the FLOP count and
the estimate treat it as they treat recompute_lab.model.gpt.GPT.

The interface (what recompute_lab reads of a model):
    blocks            the decoder layers (an nn.ModuleList; strategies wrap them in place)
    block_runner      how the layer stack runs; block-group strategies (layers, sqrt) replace it
    cfg, parts        the resolved model config, and which submodules play attention / core / MLP /
                      norms
    tok_emb, head     the input and output embeddings (their device is the model's)
    model(idx, targets) -> mean fp32 cross-entropy (no label shift: the same loss as
    recompute_lab.model.gpt.GPT)

How the stack runs under HF's own forward: the base model's layer list is replaced by one
parameter-less slot per
layer. HF's forward computes embeddings, positions, masks and rotary tables as it always does and
calls slot i
with layer i's arguments; slots record them and pass the hidden state on, and the last slot runs
``block_runner(blocks, x)``, where ``blocks[i](x)`` calls layer i with its recorded arguments. A
block-group
checkpoint therefore recomputes several HF layers in one region, with the masks and rotary tables
its frame keeps.

Attention core: HF attention modules call their attention function (eager or SDPA) through
transformers'
AttentionInterface. The model is built with an implementation registered here
(``recompute_lab_sdpa`` /
``recompute_lab_eager``: the same masks as sdpa / eager) that hands the call to the module's
``core`` child, which
runs the real function. ``blocks.i.<attention>.core`` is then a module like recompute_lab's
``attn.core``:
selective recomputation and the budget planner can checkpoint it. Nothing changes numerically.

Layer: model.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recompute_lab.config import ConfigError
from recompute_lab.config.hf_families import Family
from recompute_lab.config.hf import hf_config, require_transformers, resolve_model

ROUTED = "recompute_lab_"  # + sdpa | eager


def _route(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    **kwargs: Any,
) -> tuple:
    """The registered attention implementation: the module's core child runs the real function."""
    return module.core(query, key, value, attention_mask, **kwargs)


@functools.lru_cache(maxsize=None)
def register_routes() -> None:
    """Register recompute_lab_sdpa / recompute_lab_eager with transformers (attention and mask
    interfaces)."""
    transformers = require_transformers()
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        transformers.AttentionInterface.register(ROUTED + base, _route)
        AttentionMaskInterface.register(ROUTED + base, mask)


class AttentionCore(nn.Module):
    """The attention function of one HF attention module (eager or SDPA), as a module a strategy can
    checkpoint.
    Holds its attention module by a plain reference (not a submodule: no cycle in the module
    tree)."""

    def __init__(self, attention: nn.Module, impl: Callable):
        super().__init__()
        self._attention = (attention,)
        self.impl = impl

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        **kwargs: Any,
    ) -> tuple:
        return self.impl(self._attention[0], query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def meta_masks(device: torch.device):
    """On the meta device, HF's mask preparation must not look at values: it checks whether position
    ids are
    packed sequences with a data-dependent ``.all()`` (it skips that only under tracing). Our
    position ids are
    always one arange per row, never packed, so on meta the check answers "not packed" without
    reading them."""
    if device.type != "meta":
        yield
        return
    from transformers import masking_utils

    real = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = real


def base_attention(attention: nn.Module, backend: str) -> Callable:
    """The function HF would call: its SDPA integration, or the family's own
    eager_attention_forward."""
    if backend == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ConfigError(
            f"{type(attention).__name__} has no eager_attention_forward; use model.attention=sdpa"
        )
    return eager


def flash_on_meta(
    attention: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask,
    dropout=0.0,
    scaling=None,
    **kwargs,
) -> tuple:
    """SDPA as a GPU's fused kernel runs it, for meta-device probes (budget planner): aten's
    flash-attention op
    keeps q, k, v, the output and the log-sum-exp, where SDPA's meta path would keep (b, h, s, s)
    scores. Grouped
    k/v heads are repeated first (a small over-estimate, as for recompute_lab's own model)."""
    if key.shape[1] != query.shape[1]:
        key, value = (
            t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value)
        )
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout, True, scale=scaling
    )[0]
    return out.transpose(1, 2).contiguous(), None


class Slot(nn.Module):
    """Stands in HF's layer loop for layer ``index``: records the call, the last slot runs the block
    stack."""

    def __init__(self, index: int, owner: list):
        super().__init__()
        self.index = index
        self._owner = (
            owner  # [adapter]: a plain list, so the adapter is not a submodule of its own slot
        )

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._owner[0]._slot(self.index, hidden_states, args, kwargs)

    def __getattr__(
        self, name: str
    ) -> Any:  # per-layer attributes HF's loop may read (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            owner = self.__dict__.get("_owner")
            if not owner:
                raise
            return getattr(owner[0].blocks[self.__dict__["index"]], name)


def _call_layer(layer: nn.Module, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class BoundBlocks(Sequence):
    """The decoder layers with the arguments HF's loop gave them in this forward: ``blocks[i](x)``
    runs layer i.
    Block runners (recompute_lab.strategies.wrap) index and iterate it like the model's ModuleList;
    a checkpoint
    over a group of layers keeps this object (hence the masks and rotary tables) until its
    backward."""

    def __init__(self, layers: nn.ModuleList, calls: list):
        self.layers, self.calls = layers, calls

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Callable[[Tensor], Tensor]:
        if not isinstance(i, int):
            raise TypeError("BoundBlocks takes integer indices")
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        args, kwargs = self.calls[i]
        return functools.partial(_call_layer, self.layers[i], args, kwargs)


def run_sequential(blocks, x: Tensor) -> Tensor:
    for block in blocks:
        x = block(x)
    return x


def find_layers(base: nn.Module, family: Family, n_layer: int) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the decoder-layer ModuleList: the family's, or the ModuleList
    of n_layer
    layers found by shape (names layers / h / blocks / layer preferred)."""
    if family.layers:
        return base, family.layers
    found = [
        (n, m)
        for n, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n_layer
    ]
    found.sort(key=lambda nm: nm[0].rsplit(".", 1)[-1] not in ("layers", "h", "blocks", "layer"))
    if not found:
        raise ConfigError(f"{type(base).__name__}: no ModuleList of {n_layer} decoder layers found")
    path = found[0][0]
    parent = base.get_submodule(path.rpartition(".")[0]) if "." in path else base
    return parent, path.rpartition(".")[2]


class HFCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` with recompute_lab's model interface (see the module
    docstring)."""

    def __init__(self, hf: nn.Module, cfg: Any, family: Family, routed: bool):
        super().__init__()
        self.cfg = cfg
        self.family = family
        self.hf = hf
        parent, attr = find_layers(hf.base_model, family, hf.config.num_hidden_layers)
        self.blocks = nn.ModuleList(list(getattr(parent, attr)))
        self._owner = [self]
        setattr(
            parent, attr, nn.ModuleList([Slot(i, self._owner) for i in range(len(self.blocks))])
        )
        self.parts = (
            dict(family.parts)
            if routed or not family.parts
            else {k: v for k, v in family.parts.items() if k != "attn.core"}
        )
        self.block_runner = run_sequential
        self._calls: Optional[list] = None
        self._x0: Optional[Tensor] = None

    @property
    def tok_emb(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    @property
    def head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def attention(self, block: nn.Module) -> Optional[nn.Module]:
        return block.get_submodule(self.family.attention) if self.family.attention else None

    def use_flash_cores(self) -> bool:
        """For meta-device probes: every SDPA core runs :func:`flash_on_meta` (call before a
        strategy wraps the
        model). False when the model has no routed cores or does not use SDPA."""
        if str(self.cfg.attention) != "sdpa" or "attn.core" not in self.parts:
            return False
        for block in self.blocks:
            self.attention(block).core.impl = flash_on_meta
        return True

    def get_num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the token (and learned position)
        tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            wpe = getattr(self.hf.base_model, "wpe", None)
            if isinstance(wpe, nn.Embedding):
                n -= wpe.weight.numel()
        return n

    def _slot(self, i: int, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if i == 0:
            self._calls, self._x0 = [], hidden
        self._calls.append((args, kwargs))
        if i < len(self.blocks) - 1:
            return hidden
        calls, x0 = self._calls, self._x0
        self._calls = self._x0 = None  # only what the runner's regions keep outlives the forward
        return self.block_runner(BoundBlocks(self.blocks, calls), x0)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """idx: (B, T) token ids. The mean cross-entropy over all T positions if targets are given
        (fp32 logits, as
        recompute_lab.model.gpt.GPT computes it), else the (B, T, V) logits."""
        with meta_masks(idx.device):
            logits = self.hf(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _load_weights(transformers, source: str, config, backend: str) -> nn.Module:
    """Pretrained weights (safetensors only: a pickled checkpoint could run code) from a local
    folder, or from the
    hub when online."""
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            attn_implementation=backend,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
    except Exception as e:
        raise ConfigError(
            f"model.hf.weights={source!r}: could not load pretrained weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Give a local folder holding config.json "
            f"and "
            "*.safetensors (downloaded beforehand), or a hub id with the network available"
        ) from None


def build(
    mcfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> HFCausalLM:
    """The Hugging Face model ``mcfg`` (a model=hf model config) describes, on ``device`` (``meta``:
    nothing
    allocated), parameters in ``dtype``; random init (from_config) unless model.hf.weights is
    set."""
    transformers = require_transformers()
    resolve_model(mcfg)
    config, family = hf_config(mcfg)
    backend = str(mcfg.attention)
    routed = family.attention is not None
    if routed:
        register_routes()
    device = torch.device(device)
    weights = mcfg.hf.weights
    if weights and device.type != "meta":
        hf = _load_weights(
            transformers, str(weights), config, ROUTED + backend if routed else backend
        ).to(device)
    else:
        with torch.device(device):
            # fp32 first, whatever the config's torch_dtype says (published configs say bfloat16):
            # the precision
            # policy decides the parameter dtype below, as for recompute_lab's own model.
            hf = transformers.AutoModelForCausalLM.from_config(
                config,
                attn_implementation=ROUTED + backend if routed else backend,
                trust_remote_code=False,
                dtype=torch.float32,
            )
    model = HFCausalLM(hf, mcfg, family, routed)
    if routed:
        for block in model.blocks:
            attention = model.attention(block)
            attention.core = AttentionCore(attention, base_attention(attention, backend))
    if dtype != torch.float32:
        for p in (
            model.parameters()
        ):  # parameters only: rotary inv_freq and other buffers keep their dtype
            p.data = p.data.to(dtype)
    return model.train()
