"""Weights room: the broadcast group between learner rank 0 and the generator engines.

``protocol`` holds the rendezvous, the wire layouts and bucket planning, the sender and the
receiver. The group's lifecycle (form, re-form on a generator restart, retry) belongs here too,
with one small surface that the learner, the controller and the engines use.
"""

from async_or1.weights.protocol import (  # noqa: F401  (the room's public surface)
    LAYOUTS,
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
