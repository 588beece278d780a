"""Data: pack raw datasets into block shards, stream uint8 batches to the device, corrupt on device.

    from aedist.data import load_batches, corrupt
    for images, labels in load_batches("shards/fashion4", split="train", batch_size=256):
        inputs, targets, params = corrupt(images.float() / 255, [{"rotate": {"max_degrees": 180}}])
"""

from aedist.data.corruption import corrupt, validate_spec
from aedist.data.loader import BatchStream, load_batches, num_batches
from aedist.data.position import DataPosition
from aedist.data.shards import Manifest, read_manifest, write_shards

__all__ = ["BatchStream", "DataPosition", "Manifest", "corrupt", "load_batches", "num_batches", "read_manifest", "validate_spec", "write_shards"]
