"""FixMatch augmentation: the weak and strong views, per image with PIL or per batch on uint8 tensors.

Modules: :mod:`.draws` (what is drawn: op lists, magnitude ranges, order of draws; both generators),
:mod:`.pil` (applied per image with Pillow, the reference for correctness), :mod:`.ops` and
:mod:`.geometry` (the same ops on uint8 batches, bit-identical), :mod:`.slots` (RandAugment's op slots
on a batch), :mod:`.views` (batched views and the trainer's ``batch_transform``), :mod:`.cuda_graph`
(the batched views replayed as one CUDA graph), :mod:`.common` (constants and argument checks).
"""

from ignite_fixmatch.augment.common import FILL_REFERENCE, PAD_MODES, VARIANTS
from ignite_fixmatch.augment.ops import normalize
from ignite_fixmatch.augment.pil import RandAugmentOfficial, RandAugmentReference, StrongView, WeakView, pad_crop_flip, to_normalized_tensor
from ignite_fixmatch.augment.views import BatchedAugment, BatchedView, collate_columns

__all__ = [
    "FILL_REFERENCE", "PAD_MODES", "VARIANTS", "BatchedAugment", "BatchedView", "RandAugmentOfficial", "RandAugmentReference",
    "StrongView", "WeakView", "collate_columns", "normalize", "pad_crop_flip", "to_normalized_tensor",
]
