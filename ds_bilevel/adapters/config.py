"""Adapter settings, shared by every method (a method reads the fields it needs)."""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterConfig:
    method: str = "lora"
    """lora | dora (one-level baselines); the bi-level methods are listed by ``ds_bilevel.adapters.METHODS``."""
    rank: int = 8
    """r: rank of the low-rank update."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by s = alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter path only (never on the frozen path)."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    """Names (last component, e.g. q_proj, or a full dotted name) of the nn.Linear layers to adapt."""
    detach_norm: bool = True
    """DoRA/BiDoRA: treat the row norm as a constant in backward (DoRA section 4.3, PEFT)."""

    def validate(self) -> None:
        from ds_bilevel.adapters import METHODS

        if self.method not in METHODS:
            raise ValueError(f"adapter.method: {self.method!r} is not one of {sorted(METHODS)}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"adapter.rank: {self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"adapter.alpha: {self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout: {self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("adapter.target_modules: empty; give at least one linear-layer name")
