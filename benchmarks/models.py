"""The benchmark's model: a small GPT-style language model with tied input/output embeddings.

Defaults (vocab 8192, width 256, 6 blocks, context 64) give 6.85M unique parameters in 76 tensors:
``wte``, ``wpe``, 6 x (``ln_1``, ``attn.qkv``, ``attn.proj``, ``ln_2``, ``mlp.fc``, ``mlp.proj``,
each a weight and a bias) and ``ln_f``; ``lm_head.weight`` is ``wte.weight`` (one tensor, two uses).

>>> model = TinyGPT()
>>> sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
(6852608, 76)
>>> model.lm_head.weight is model.wte.weight
True
>>> model(torch.zeros(2, 64, dtype=torch.long)).shape
torch.Size([2, 64, 8192])
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 64
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer LM; ``lm_head.weight = wte.weight`` (weight tying)."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or GPTConfig()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor, used by two modules
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LitLM(pl.LightningModule):
    """Next-token cross-entropy on ``TinyGPT``; AdamW.

    ``grad_norm_recipe=True`` adds Lightning's documented gradient-norm recipe
    (``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``, every step).
    """

    def __init__(self, cfg: GPTConfig | None = None, grad_norm_recipe: bool = False) -> None:
        super().__init__()
        self.model = TinyGPT(cfg)
        self.grad_norm_recipe = grad_norm_recipe

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_norm_recipe:
            from lightning.pytorch.utilities import grad_norm

            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def random_token_loader(
    n_batches: int, batch_size: int = 8, seq_len: int = 64, vocab_size: int = 8192, seed: int = 0
) -> DataLoader:
    """``n_batches`` batches of random tokens as (inputs, next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n_batches * batch_size, seq_len + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=False)
