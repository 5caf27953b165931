"""Rule-based rewards: the math verifier and the code sandbox.

Nothing here imports from the rest of ``async_or1`` (config values arrive as arguments), and this
``__init__`` imports nothing, so worker processes start cheaply:

- ``rewards.math``:  answer extraction and math-verify grading (no timeouts of its own);
- ``rewards.code``:  the code sandbox (``run_code``) with hostile-program isolation;
- ``rewards.sandbox``: ``probe`` / ``require``, the sandbox's self-check of the isolation it really gives;
- ``rewards.pool``:  ``RewardPool`` — a batch of (ability, response, ground truth) items scored in
  parallel with hard per-item time limits (stuck math workers are killed and replaced);
- ``rewards.cli``:   ``async-or1 reward math|code --jsonl F``.
"""
