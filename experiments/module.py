"""The LightningModule: an image classifier ``nn.Module`` (a CLI ``class_path``), SGD, cross-entropy."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn import functional as F

from experiments.models import SharedMLP, count_parameters, materialize_seeded


class Classifier(LightningModule):
    """Trains ``model`` (stored as ``self.model``, so its parameters are named ``model.net.3.weight`` ...).

    Taking the network as an ``nn.Module`` argument maps onto LightningCLI as
    ``--model.model.class_path experiments.models.SharedMLP --model.model.init_args.tied false``.
    ``init_seed`` (``--model.init_seed 7``) takes the initial weights apart from ``--seed_everything``.
    """

    def __init__(self, model: nn.Module | None = None, lr: float = 0.1, init_seed: int | None = None) -> None:
        super().__init__()
        # The network's own config is in the CLI's config.yaml; saving the module object here would only
        # duplicate it (and Lightning warns about nn.Module hyperparameters).
        self.save_hyperparameters(ignore=["model"])
        # None (not a default instance): every Classifier gets its own fresh network.
        self.model = model if model is not None else SharedMLP()
        self.lr = lr
        self.init_seed = init_seed

    def setup(self, stage: str) -> None:
        """Materialize the lazy layers before ``configure_optimizers`` sees the parameters.

        With ``init_seed`` the initial weights come from ``torch.manual_seed(init_seed)`` alone, apart
        from the data order (``seed_everything``); see :func:`materialize_seeded`.
        """
        materialize_seeded(self.model, self.init_seed)
        # save_hyperparameters (not hparams[...] = ...) also updates hparams_initial, which is what the
        # Trainer hands to the logger, after the setup hooks.
        self.save_hyperparameters({**self.hparams, "num_parameters": count_parameters(self.model)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped network."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on one batch, logged per step as ``train_loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs epoch means of ``val_loss`` and ``val_acc`` (weighted by batch size)."""
        x, y = batch
        logits = self(x)
        # sync_dist: under DDP each rank sees part of the validation set
        self.log("val_loss", F.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_train_start(self) -> None:
        """Logs the unique parameter count as a metric too (TensorBoard's scalars and hparams views)."""
        self.log("num_parameters", float(self.hparams["num_parameters"]), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD, as in the textbook."""
        return torch.optim.SGD(self.parameters(), lr=self.lr)
