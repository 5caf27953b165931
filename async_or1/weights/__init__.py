"""Weights room: the broadcast group between learner rank 0 and the generator engines.

``protocol`` holds the rendezvous, the wire layouts and bucket planning, the sender and the
receiver; ``group`` owns the group's lifecycle on learner rank 0 (form, re-form when the
generators change, bounded retry, owed versions).
"""

from async_or1.weights.protocol import (  # noqa: F401  (the room's public surface)
    LAYOUTS,
    bucket_specs,
    destroy_weight_group,
    dtype_name,
    dtype_of,
    init_weight_group,
    plan_buckets,
    plan_update,
    recv_weights,
    release_buffers,
    send_weights,
)
from async_or1.weights.group import WeightGroup, group_layout, group_name  # noqa: F401
