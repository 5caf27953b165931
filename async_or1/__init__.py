"""async-or1: asynchronous actor-learner RL for long chain-of-thought reasoning (Skywork-OR1 MAGIC)."""

__version__ = "0.1.0"
