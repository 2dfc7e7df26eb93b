from .default_dataset import ensure_default_dataset
from .folder import (ImageFolderDataset, adm_center_crop, epoch_order, make_loader, rank_batches,
                     sequential_batches, steps_per_epoch)

__all__ = ["ImageFolderDataset", "adm_center_crop", "ensure_default_dataset", "epoch_order", "make_loader",
           "rank_batches", "sequential_batches", "steps_per_epoch"]
