"""Tensor (+ sequence) parallel theory: the whole model's saved terms split per tensor-parallel rank
by the plan
PyTorch's tp plan implies (recompute_lab.measure.tensor_parallel measures the same on a fake process
group).

Layer: predict (no torch). Each term of recompute_lab.predict.theory.saved_terms is sharded over
heads / d_ff /
vocab, split along the sequence on the residual stream only with sequence parallelism, or kept
whole: the
all-gathered inputs of qkv, fc and head (:data:`GATHERED`), which PyTorch's SP saves whole on every
rank where
Megatron's SP keeps the 1/t shard and gathers again in backward.
"""

from __future__ import annotations

from dataclasses import replace

from recompute_lab.config.spec import Shape
from recompute_lab.predict import theory
from recompute_lab.predict.theory import Saved

# Terms whose tensor the column-parallel layer all-gathers (with SP) and saves whole: Megatron saves
# the shard.
GATHERED = ("attn.qkv", "mlp.fc", "head")


# ---- theory: the whole model's saved terms, split per rank by the plan
# ------------------------------------


def _rule(module: str, storage: str) -> str:
    """How the plan splits one saved term: tp (heads, d_ff or vocab), seq (residual stream: over tp
    with SP),
    gathered (all-gathered Linear input, whole on each rank) or whole (token ids, rope tables,
    masks, rng)."""
    if storage.endswith(":w_bf16"):
        return "tp"  # autocast's bf16 copy of a sharded weight
    if module == "loss":
        return "tp" if storage == "loss:logp" else "whole"  # vocab-parallel log-probabilities
    if module in ("tok_emb", "pos_emb") or module.endswith(".attn.rotary"):
        return "whole"
    if module.endswith(GATHERED):
        return "gathered"
    if module.endswith(".attn.core"):
        return "whole" if storage.endswith((":causal", ":rng")) else "tp"
    if module.endswith((".attn.out", ".mlp.act", ".mlp.proj")):
        return "tp"
    return "seq"  # norms and the dropouts on the residual stream (drop, attn.drop, mlp.drop)


def _split(nbytes: int, rule: str, tp: int, sp: bool) -> int:
    if rule == "tp" or (rule == "seq" and sp):
        return nbytes // tp
    return nbytes


class TPTheory:
    """theory.predict_activations' architecture interface (saved_terms, region_inputs, reason) for
    one tp rank."""

    def __init__(self, tp: int, sp: bool):
        self.tp, self.sp = tp, sp

    @staticmethod
    def base(cfg):
        """The whole model's theory: ours, or a Hugging Face model's
        (recompute_lab.predict.hf_theory,
        which tp=1 passes through unsplit: tensor-parallel plans exist for our GPT only)."""
        return theory.external(cfg) or theory

    def saved_terms(self, cfg, st: Shape) -> list[Saved]:
        out = []
        one_head = cfg.n_head // self.tp == 1
        for t in self.base(cfg).saved_terms(cfg, st):
            rule = _rule(t.module, t.storage)
            stor = t.storage
            if (
                one_head
                and stor.endswith(".attn.out:in_copy")
                and theory.sdpa_backend(cfg, st) != "math"
                and str(cfg.attention) == "sdpa"
            ):
                stor = stor.replace(
                    ".attn.out:in_copy", ".attn.core:out"
                )  # (b, 1, s, d) -> (b, s, d): a view
            nbytes = _split(t.nbytes, rule, self.tp, self.sp)
            if (
                one_head
                and str(cfg.attention) == "eager"
                and stor.endswith(("core:q_copy", "core:k_copy", "core:v_copy"))
            ):
                # one head per rank: a (b, 1, s, hd) view of the qkv output is already a valid bmm
                # operand, so
                # the batched matmul saves that view, i.e. the whole local qkv output (b, s, (a +
                # 2kv) hd / t)
                stor = stor.split(".attn.core:")[0] + ".attn.qkv:out"
                hd = cfg.d_model // cfg.n_head
                nbytes = (
                    st.batch
                    * st.seq
                    * (cfg.n_head + 2 * (cfg.n_kv_head or cfg.n_head))
                    * hd
                    * st.compute_bytes
                    // self.tp
                )
            why = t.why + f" [tp rule: {rule}]"
            out.append(replace(t, storage=stor, nbytes=nbytes, why=why))
        return out

    def region_inputs(self, cfg, st: Shape, name: str):
        """A region's inputs: head-sharded inside attention and the MLP, else the residual stream's
        split (with SP
        a recomputed attn / mlp sublayer keeps its sharded input and all-gathers it again in
        backward)."""
        inputs = self.base(cfg).region_inputs(cfg, st, name)
        if inputs is None:
            return None
        rule = "tp" if name.endswith((".attn.core", ".mlp.act")) else "seq"
        return [(stor, _split(nb, rule, self.tp, self.sp)) for stor, nb in inputs]

    def reason(self, cfg, st):
        base = self.base(cfg)
        return base.reason(cfg, st) if base is not theory else None


def predict_rank(cfg, st: Shape, tp: int, sp: bool, plan=None) -> dict:
    """theory.predict_activations for one tensor-parallel rank."""
    return theory.predict_activations(cfg, st, plan, source=TPTheory(tp, sp))


def gathered_excess(cfg, st: Shape, tp: int, sp: bool, plan=None) -> int:
    """Bytes per rank that PyTorch's SP keeps above Megatron's: each gathered Linear input saved
    whole instead of
    its 1/t shard (0 without SP, where the input is replicated in both)."""
    if not sp or tp == 1:
        return 0
    pred = predict_rank(cfg, st, tp, sp, plan)
    if pred["total"] is None:
        return 0
    whole = sum(
        t["nbytes"]
        for t in pred["terms"]
        if t["op"] != "checkpoint" and t["module"].endswith(GATHERED)
    )
    return whole - whole // tp
