"""Weight sync, trainer -> rollout engines: bucket layout and staging ring (pure) and transports.

    from hpc_rlhf.weight_sync import broadcast_weights, sync_from_broadcast, sync_in_process
"""
from hpc_rlhf.weight_sync.bucket import Bucket, TensorMeta, checksum, unbucketize
from hpc_rlhf.weight_sync.staging import StagingRing
from hpc_rlhf.weight_sync.transport import (DEFAULT_BUCKET_BYTES, BroadcastReceiver,
                                            BroadcastSender, SyncStats, broadcast_weights,
                                            copied, receive_weights, sync_from_broadcast,
                                            sync_in_process)

__all__ = ["Bucket", "TensorMeta", "StagingRing", "checksum", "unbucketize", "DEFAULT_BUCKET_BYTES",
           "BroadcastReceiver", "BroadcastSender",
           "SyncStats", "broadcast_weights", "copied", "receive_weights", "sync_from_broadcast",
           "sync_in_process"]
