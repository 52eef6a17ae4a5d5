"""The causal LM's loss without its (B, T, V) logits: the output head that computes the loss.

At a real vocabulary the logits are the largest activation of a fine-tune: 8192 tokens x
128256 (LLaMA-3) is 2.1 GB in bf16, and backward adds their gradient, as large again.
``linear_cross_entropy`` (or ``use_liger_kernel``, as HF Trainer does) replaces the model's
output head with ``LinearLossHead``, which owns the head's own weight and bias (the same
Parameter objects: tied embeddings stay tied, state-dict keys and exports are unchanged).
While the engine scores a batch (``scoring(labels)``) its forward takes the last hidden states
and returns the summed next-token loss in place of the logits: the projection and the
cross-entropy run together per chunk of tokens (``losses.linear_token_loss_sum``, exact to fp32
rounding; Liger's fused kernel under ``use_liger_kernel``). Otherwise (evaluation, export,
generation) it is the plain projection.

Why a module that owns the weight rather than a function called on ``lm_head.weight`` after the
model's forward: under ZeRO-3 a parameter is whole only inside the forward of the module that
holds it, and again in that module's backward (DeepSpeed's hooks gather it around both). Here
the loss is computed inside the head's forward, and its backward, which recomputes the chunks'
logits, runs under the head's pre-backward gather. This is also why Liger's patched
``LlamaForCausalLM.forward``, which reads ``lm_head.weight`` outside the head, is not used.

The model's forward must hand the head's output back unchanged as ``.logits``: true of the
families below (their forward applies nothing after the head when no labels are passed);
Gemma-2's logit soft-capping, Cohere's ``logit_scale`` and Granite's ``logits_scaling`` would
silently change the loss, so other families are refused (``unsupported``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.losses import linear_token_loss_sum, shifted_targets

# model_type of the causal LMs whose forward returns the head's output as .logits untouched
# (transformers 5.x; the builtin models are LLaMA), checked by tests/test_loss_head.py.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox",
                         "falcon", "opt")

FusedLoss = Callable[..., torch.Tensor]
"""``fn(hidden (N, H), weight (V, H), targets (N,), bias) -> summed loss`` (kernels.fused_linear_loss_fn)."""


def unsupported(model_type: str | None, target_modules: list[str] | str = ()) -> str | None:
    """Why the loss head cannot replace the output head of a ``model_type`` model whose adapters
    target ``target_modules``, or None when it can."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"the loss without logits is supported for model types {', '.join(SUPPORTED_MODEL_TYPES)}, whose "
                f"forward returns the output head's result unchanged; not for {model_type!r}")
    if not isinstance(target_modules, str) and any(name.split(".")[-1] in ("lm_head", "embed_out")
                                                   for name in target_modules):
        return "the output head is an adapter target (adapter.target_modules), so it cannot compute the loss"
    return None


class LinearLossHead(nn.Module):
    """The output projection (V, H), which returns the summed token loss while ``scoring``."""

    def __init__(self, head: nn.Linear, fused_loss: FusedLoss | None = None):
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight  # the same Parameter: a tied embedding stays tied
        self.bias = head.bias
        self.fused_loss = fused_loss
        self._labels: torch.Tensor | None = None

    @contextlib.contextmanager
    def scoring(self, labels: torch.Tensor) -> Iterator[None]:
        """Within: the next forward returns the summed next-token loss against ``labels`` (B, T)
        (fp32, 0-dim) instead of the logits. The model's forward must call the head once."""
        self._labels = labels
        try:
            yield
        finally:
            self._labels = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        labels, self._labels = self._labels, None
        if labels is None:
            return F.linear(hidden, self.weight, self.bias)
        if self.fused_loss is not None:
            flat = hidden.reshape(-1, hidden.shape[-1])
            return self.fused_loss(flat, self.weight, shifted_targets(labels), self.bias).float()
        return linear_token_loss_sum(hidden, self.weight, labels, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"loss={'fused (Liger)' if self.fused_loss is not None else 'chunked'}")


def install_loss_head(model: nn.Module, fused_loss: FusedLoss | None = None) -> LinearLossHead:
    """Replace ``model``'s output head (``get_output_embeddings``, an nn.Linear) with a
    ``LinearLossHead`` over the same parameters; before ``deepspeed.initialize``, so that ZeRO-3's
    hooks are put on it. Raises ValueError where ``unsupported`` says why."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings()
    reason = unsupported(model_type) or (None if type(head) is nn.Linear else
                                         f"the output head is a {type(head).__name__}, not an nn.Linear")
    if reason:
        raise ValueError(f"linear_cross_entropy: true, but {reason}; allowed: false")
    loss_head = LinearLossHead(head, fused_loss)
    model.set_output_embeddings(loss_head)
    return loss_head


def loss_head_of(model: nn.Module) -> LinearLossHead | None:
    """The model's ``LinearLossHead``, or None when it computes logits (no loss head installed)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, LinearLossHead) else None
