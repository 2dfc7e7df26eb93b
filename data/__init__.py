from .default_dataset import default_split, ensure_default_dataset
from .folder import ImageFolderDataset, TorchBatches, make_loader
from .images import DataError, adm_center_crop, list_images, load_crop, to_model_range
from .order import epoch_order, eval_batches, evenly_spaced, rank_batches, sequential_batches, steps_per_epoch
from .sources import LOADERS, load_batch, open_images

__all__ = ["DataError", "ImageFolderDataset", "LOADERS", "TorchBatches", "adm_center_crop", "default_split",
           "ensure_default_dataset", "epoch_order", "eval_batches", "evenly_spaced", "list_images", "load_batch",
           "load_crop", "make_loader", "open_images", "rank_batches", "sequential_batches", "steps_per_epoch",
           "to_model_range"]
