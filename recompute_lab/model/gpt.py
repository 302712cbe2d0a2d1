"""A decoder-only transformer (and the seed notebook's toy MLP) whose parts have stable, addressable
names.

Module tree of the ``gpt`` architecture (names that strategies and measurements rely on):

    tok_emb, pos_emb (learned positions only), drop
    blocks.{i}.norm1, blocks.{i}.attn.{qkv, core, out, drop}, blocks.{i}.norm2, blocks.{i}.mlp.{fc,
    act, proj, drop}
    norm_f, head (weight tied to tok_emb unless tie_embeddings=false)

``attn.core`` is the attention core (QK^T -> mask -> softmax -> dropout -> xV): with
``attention=eager`` it
stores the (b, h, s, s) scores for backward, with ``sdpa`` the fused kernel decides what it keeps.
The ``toy_mlp``
architecture replaces every block by the notebook's Linear(d)-ReLU-Linear(d) (``linear1``, ``relu``,
``linear2``).
Strategies change how blocks run without renaming parameters: see recompute_lab.strategies.

Layer: model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from recompute_lab.config import Arch, Attention, Mlp, ModelConfig, Norm, Positions
from recompute_lab.config.spec import as_model_config


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == Norm.rmsnorm:
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def building_on_meta() -> bool:
    """Is the model being built under ``torch.device("meta")`` (build_model's device context)?
    There buffers need their shapes only (issue 29: computing their values on meta cost seconds)."""
    return torch.empty(0).is_meta


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) tables; rotates pairs of channels of q and k by position."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        if building_on_meta():  # the tables' shapes only (their values would run Python
            # references op by op: 0.3 s for Llama-3 405B)
            cos, sin = (torch.empty(max_seq_len, head_dim // 2) for _ in range(2))
        else:
            inv_freq = 1.0 / (
                theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            )
            angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
            cos, sin = angles.cos(), angles.sin()  # (S, hd/2)
        # Non-persistent: derived from the config, not part of the checkpoint.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, nh, T, hs)
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class AttentionCore(nn.Module):
    """softmax(QK^T / sqrt(hs) + causal mask) V, the part Megatron's selective recomputation
    recomputes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backend = cfg.attention
        self.dropout = cfg.dropout
        self.n_rep = cfg.n_head // (cfg.n_kv_head or cfg.n_head)
        eager = cfg.attention == Attention.eager
        mask = None
        if eager:
            s = cfg.max_seq_len
            # on meta the shape only: tril runs a Python reference that imports torch._dynamo
            mask = torch.empty(s, s, dtype=torch.bool)
            mask = mask if building_on_meta() else torch.ones_like(mask).tril()
        self.register_buffer("causal", mask, persistent=False)  # (S, S) lower triangle, eager only

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: (B, nh, T, hs); k, v: (B, n_kv, T, hs)
        p = self.dropout if self.training else 0.0
        if self.backend == Attention.sdpa:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=True, enable_gqa=self.n_rep > 1
            )
        if self.n_rep > 1:  # grouped-query attention: share each k/v head among n_rep query heads
            k = repeat(k, "b g t d -> b (g r) t d", r=self.n_rep)
            v = repeat(v, "b g t d -> b (g r) t d", r=self.n_rep)
        t = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (
            1.0 / math.sqrt(q.shape[-1])
        )  # (B, nh, T, T): the s^2 scores
        att = att.masked_fill(~self.causal[:t, :t], float("-inf"))
        att = F.softmax(att, dim=-1)
        att = F.dropout(att, p=p, training=self.training)
        return att @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(
            cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias
        )
        rope = cfg.positions == Positions.rope
        self.rotary = Rotary(self.head_dim, cfg.max_seq_len, cfg.rope_theta) if rope else None
        self.core = AttentionCore(cfg)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, C)
        hd, nq, nkv = self.head_dim, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([nq, nkv, nkv], dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", d=hd)  # (B, nh, T, hs)
        k = rearrange(k, "b t (h d) -> b h t d", d=hd)  # (B, n_kv, T, hs)
        v = rearrange(v, "b t (h d) -> b h t d", d=hd)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = self.core(q, k, v)
        y = rearrange(y, "b h t d -> b t (h d)")
        return self.drop(self.out(y))


class SwiGLU(nn.Module):
    """silu(a) * b on the two halves of the fused fc output (Shazeer 2020)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        gated = cfg.mlp == Mlp.swiglu
        self.fc = nn.Linear(
            cfg.d_model, (2 if gated else 1) * cfg.d_ff, bias=cfg.bias
        )  # swiglu: gate and up fused
        # gelu_tanh: aten's fused tanh-approximation kernel, which saves only its input (as exact
        # GELU does).
        self.act = (
            SwiGLU()
            if gated
            else nn.GELU(approximate="tanh" if cfg.mlp == Mlp.gelu_tanh else "none")
        )
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyBlock(nn.Module):
    """The seed notebook's checkpointing demo block: linear2(relu(linear1(x))), no residual, no
    norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.relu(self.linear1(x)))


BlockRunner = Callable[[nn.ModuleList, Tensor], Tensor]


def run_sequential(blocks: nn.ModuleList, x: Tensor) -> Tensor:
    for block in blocks:
        x = block(x)
    return x


class Embedding(nn.Embedding):
    """nn.Embedding left uninitialised on the meta device, where there are no values to set and
    ``normal_`` runs a Python reference that imports torch._dynamo (1 s of an estimate, issue 29).
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        toy = cfg.arch == Arch.toy_mlp
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.positions == Positions.learned and not toy
        self.pos_emb = Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([(ToyBlock if toy else Block)(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = nn.Identity() if toy else make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # How the block stack runs; strategies that checkpoint groups of blocks replace it (plain
        # attribute,
        # so parameter names never change).
        self.block_runner: BlockRunner = run_sequential
        if self.tok_emb.weight.device.type != "meta":
            self.apply(self._init_weights)
            # GPT-2: scale residual output projections by 1/sqrt(2 * n_layer).
            for name, p in self.named_parameters():
                if name.endswith(("attn.out.weight", "mlp.proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tied weights once); non_embedding drops token and position
        tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """idx: (B, T) token ids. Returns the mean cross-entropy loss if targets are given, else (B,
        T, V) logits."""
        t = idx.shape[1]
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        x = self.block_runner(self.blocks, self.drop(x))
        logits = self.head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits
        # fp32 cross-entropy input: under bf16 this is the 4*s*b*v logits buffer the theory counts
        # separately.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> GPT:
    """Build the model directly on ``device`` (``meta`` allocates nothing) in parameter dtype
    ``dtype``.
    ``arch=hf``: a Hugging Face causal LM behind the same interface
    (recompute_lab.model.hf.adapter)."""
    cfg = as_model_config(cfg)
    if cfg.arch == Arch.hf:
        from recompute_lab.model.hf.adapter import build

        return build(cfg, device, dtype)
    with torch.device(device):
        model = GPT(cfg)
    if dtype != torch.float32:
        # Parameters only: RoPE tables stay fp32 (cast per use) so positions keep their precision.
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def replica_key(model: nn.Module) -> tuple:
    """What decides every answer a replica built from ``model``'s configuration gives (its class,
    its configuration, a Hugging Face model's resolved config whole, its device; torch's
    deterministic mode, checkpoint early-stop setting and version), never its weights: the key of
    the per-process caches of such answers (the budget's option prices, the counted FLOPs)."""
    import torch.utils.checkpoint as ckpt

    hf = getattr(model, "hf", None)
    return (
        type(model).__qualname__,
        repr(model.cfg),
        hf.config.to_json_string() if hf is not None else None,
        str(model.tok_emb.weight.device),
        torch.are_deterministic_algorithms_enabled(),
        # set_checkpoint_early_stop(False) reruns a region's trailing matmul too (more recompute
        # FLOPs and saved bytes); tests/unit/test_flops.py counts under both settings
        getattr(ckpt, "_enable_checkpoint_early_stop", None),
        torch.__version__,
    )


def remember(cache: dict, key: tuple, make: Callable[[], Any], keep: int = 256) -> Any:
    """``cache[key]``, made by ``make()`` when absent, for the per-process caches keyed by
    replica_key; past ``keep`` entries the oldest go first."""
    if key not in cache:
        while len(cache) >= keep:
            del cache[next(iter(cache))]
        cache[key] = make()
    return cache[key]


# Hugging Face models live behind the same interface; importing the package registers their meta
# builder with the
# theory (recompute_lab.predict.hf_theory). Last: the adapter may import this module's names.
from recompute_lab.model import hf as _hf  # noqa: E402,F401
