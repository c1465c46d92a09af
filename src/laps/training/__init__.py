"""Training: the LightningModule, its callbacks, checkpoints and the launcher glue (Hydra sweeps, DDP, wandb)."""
