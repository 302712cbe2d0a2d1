"""Hugging Face transformers models as a model source (``model=hf``): configs, families, the
adapter, theory.

    source.py    where the config comes from (shipped, local, hub) and how it fills recompute_lab's
                 model config
    families.py  per architecture family: decoder layers, the submodules playing attention / core /
                 MLP / norms
    adapter.py   HFCausalLM: a transformers causal LM behind recompute_lab's model interface
    theory.py    saved-tensor terms for the families whose structure recompute_lab.predict.theory
                 knows

transformers is an optional extra (pip install -e '.[hf]'); nothing here imports it until a model is
built.
"""

from recompute_lab.model.hf.adapter import build as _build
from recompute_lab.predict import (
    hf_theory as _theory,
)  # registers the hf architecture with recompute_lab.predict.theory
from recompute_lab.config.hf import resolve_model

__all__ = ["resolve_model", "notes"]

ESTIMATE_NOTE = (
    "Hugging Face model: its own code runs on meta as on the device (e.g. LlamaRMSNorm in Python "
    "keeps "
    "fp32 x, 1/rms and the normalised x, GPT-2's gelu_new three more tensors); the kernel "
    "assumptions "
    "above apply to SDPA, dropout and LayerNorm"
)


def notes(mcfg) -> list[str]:
    """What an estimate of ``mcfg`` should say about a Hugging Face model (nothing for
    recompute_lab's own)."""
    return [ESTIMATE_NOTE] if str(mcfg.arch) == "hf" else []


_theory.META_BUILDER = (
    _build  # the theory's parameter shapes come from a meta build (predict imports no torch)
)
