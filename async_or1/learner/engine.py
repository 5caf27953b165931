"""LearnerEngine: the DeepSpeed (ZeRO 0-3) wrapper the training loop drives.

One call of ``train_step`` is one optimizer step over a variable number of micro-batches. The
micro-batch count must be equal on every rank (``packing.shard_for_ranks`` pads with empty ones):
ZeRO-2/3 communicate in every backward/forward, so a rank running fewer passes hangs the rest.

Loss scale: each micro-batch's loss is Σ_tokens / T_global (``policy_loss(num_tokens=T_global)``)
times ``world_size``, because DeepSpeed *averages* gradients over data-parallel ranks; the
result is the gradient of Σ over every token of the step / T_global, whatever the split.

Log-probs never materialise [B, L, V] logits: the model runs to its final hidden states, the
scored positions are gathered, and ``algo.logprobs_and_entropy`` computes chunked log-softmax
against the output-embedding weight. That weight is used outside ``lm_head.forward``, which under
ZeRO-3 leaves it partitioned; it is registered as an external parameter of ``_LogprobHead`` so
DeepSpeed gathers it around that module's forward and backward (``register_external_parameter``).

The reference policy of the KL term (``algo.kl_coef > 0`` only) is a second, frozen copy of the
initial weights behind the same log-prob head, loaded like the policy (``_load_hf``: under ZeRO-3
partitioned as it is built). Under ZeRO-3 it then goes through ``deepspeed.initialize`` without an
optimizer (DeepSpeed's ZeRO-Offload path for an optimizer-less stage-3 engine), which gathers its
partitions around each forward as it does the policy's; under ZeRO 0-2 every rank holds it whole,
as it holds the policy's weights.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Iterator

import torch
from torch import nn

from async_or1.learner.packing import MicroBatch

log = logging.getLogger("async_or1.learner")


class _LogprobHead(nn.Module):
    """Owns no parameters; computes log-probs/entropy of gathered hidden states against the output
    embedding. A module (not a function) so ZeRO-3 has a forward to gather the weight around."""

    def __init__(self, output_embedding: nn.Module, temperature: float, chunk_tokens: int) -> None:
        super().__init__()
        object.__setattr__(self, "_out", output_embedding)  # a reference, not a child: no duplicate names
        self.temperature, self.chunk_tokens = temperature, chunk_tokens

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from async_or1.algo import logprobs_and_entropy

        return logprobs_and_entropy(hidden, self._out.weight, targets, temperature=self.temperature,
                                    chunk_tokens=self.chunk_tokens, bias=getattr(self._out, "bias", None))


class _Policy(nn.Module):
    """What DeepSpeed wraps: HF model (``.hf``) + log-prob head. forward → logp, entropy [N]."""

    def __init__(self, hf: nn.Module, temperature: float, chunk_tokens: int) -> None:
        super().__init__()
        self.hf = hf
        self.head = _LogprobHead(hf.get_output_embeddings(), temperature, chunk_tokens)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # [B, L, H] after the final norm
        return self.head(hidden[rows, cols], targets)  # [N], [N]


def deepspeed_config(cfg: Any, world_size: int) -> dict:
    lc = cfg.learner
    ds: dict = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # accumulation boundaries are set by hand in train_step
        "train_batch_size": world_size,
        "gradient_clipping": float(lc.grad_clip),
        "optimizer": {"type": "AdamW", "params": {"lr": float(lc.lr), "betas": [float(b) for b in lc.betas],
                                                  "eps": 1e-8, "weight_decay": float(lc.weight_decay),
                                                  "torch_adam": True}},  # plain torch AdamW: no op builds
        "zero_optimization": {"stage": int(lc.zero_stage)},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if int(lc.zero_stage) == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    return ds


class LearnerEngine:
    """One learner rank. Construct inside a process whose default process group is initialised."""

    def __init__(self, cfg: Any, model_path: str) -> None:
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("LearnerEngine: the default process group is not initialised; call "
                               "deepspeed.init_distributed() first")
        if cfg.learner.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"learner.zero_stage must be 0-3, got {cfg.learner.zero_stage}")
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.zero_stage = int(cfg.learner.zero_stage)
        self.dtype = getattr(torch, cfg.model.dtype)
        self.bucket_bytes = int(cfg.learner.bucket_mb) << 20
        ds_config = deepspeed_config(cfg, self.world_size)
        hf = _load_hf(model_path, self.dtype, cfg.model.trust_remote_code, ds_config if self.zero_stage == 3 else None)
        hf.config.use_cache = False
        if cfg.learner.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.train()
        policy = _Policy(hf, cfg.algo.temperature, cfg.learner.logprob_chunk_tokens)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=policy, model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=ds_config)
        if self.zero_stage == 3:
            deepspeed.zero.register_external_parameter(self.engine.module.head, hf.get_output_embeddings().weight)
        pad = getattr(hf.config, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # only fed to the dummy pass; any valid id works
        self.reference = self._load_reference(model_path) if cfg.algo.kl_coef > 0 else None

    def _load_reference(self, model_path: str) -> nn.Module:
        """The frozen initial policy of the KL term, partitioned like the policy (module docstring)."""
        import deepspeed

        ds = deepspeed_config(self.cfg, self.world_size)
        ds.pop("optimizer")
        # Built the same way as the policy: under ZeRO-3 partitioned at construction, never whole.
        hf = _load_hf(model_path, self.dtype, self.cfg.model.trust_remote_code, ds if self.zero_stage == 3 else None)
        hf.config.use_cache = False
        hf.eval()
        ref = _Policy(hf, self.cfg.algo.temperature, self.cfg.learner.logprob_chunk_tokens)
        for p in ref.parameters():
            p.requires_grad_(False)
        if self.zero_stage != 3:
            return ref.to(self.device)
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        deepspeed.zero.register_external_parameter(engine.module.head, hf.get_output_embeddings().weight)
        engine.eval()
        return engine

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face model inside the engine (partitioned placeholders under ZeRO-3)."""
        return self.engine.module.hf

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _forward(self, mb: MicroBatch, model: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logp, entropy [N] at the scored positions of ``mb`` (row-major order), and the [N]
        boolean selector of real tokens (False only for the dummy pass of an empty micro-batch).
        ``model``: the policy engine by default, or the reference."""
        model = self.engine if model is None else model
        dev = self.device
        if mb.size == 0:
            # Padding micro-batch: a one-token dummy pass through the whole graph, so every rank runs
            # the same collectives (ZeRO-3 gathers, ZeRO-2 reductions) and every parameter gets a
            # (zero) gradient; its loss is multiplied by 0.
            ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=dev)
            zero = torch.zeros(1, dtype=torch.long, device=dev)
            logp, ent = model(ids, torch.ones_like(ids), zero, zero, ids.reshape(-1))
            return logp, ent, torch.zeros(1, dtype=torch.bool, device=dev)
        sel = mb.loss_mask.to(dev) > 0  # [B, L]
        rows, cols = sel.nonzero(as_tuple=True)  # [N], [N]
        logp, ent = model(mb.input_ids.to(dev), mb.attention_mask.to(dev), rows, cols,
                          mb.targets.to(dev)[rows, cols])
        return logp, ent, torch.ones_like(rows, dtype=torch.bool)

    # ---- public API --------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, micro_batches: list[MicroBatch], *, reference: bool = False
              ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per micro-batch (logp, entropy), float32 [B, L] on the CPU, aligned like the micro-batch's
        per-token tensors (0 off the loss mask), under the current policy or the frozen reference;
        None for a padding micro-batch. No gradient; the [N, V] logits exist one chunk at a time.
        Collective under ZeRO-3: every rank calls it with the same micro-batch count."""
        if reference and self.reference is None:
            raise RuntimeError("LearnerEngine.score(reference=True): no reference model (algo.kl_coef is 0)")
        model = self.reference if reference else self.engine
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for mb in micro_batches:
            logp, ent, _ = self._forward(mb, model)
            if mb.size == 0:
                out.append(None)
                continue
            sel = mb.loss_mask > 0
            lp, en = torch.zeros_like(mb.loss_mask), torch.zeros_like(mb.loss_mask)  # [B, L]
            lp[sel], en[sel] = logp.float().cpu(), ent.float().cpu()
            out.append((lp, en))
        return out

    def train_step(self, micro_batches: list[MicroBatch], *, num_tokens_global: int, entropy_coef: float = 0.0,
                   clip_low: float | None = None, clip_high: float | None = None, correction: str | None = None,
                   kl_coef: float | None = None, m2po_cut: float | None = None) -> dict:
        """One optimizer step over ``micro_batches``; collective over learner ranks.

        Returns stats SUMMED OVER ALL RANKS (all-reduced here): token_count, entropy_sum, ratio_sum,
        clip_low_count, clip_high_count, kl_sum, loss (the step's loss, Σ tokens / T_global),
        micro_batches, plus grad_norm (global, before clipping). Unset knobs come from ``cfg.algo``.

        ``correction`` (``algo.corrections``): 'none' ratios against the behaviour log-probs; the
        others against ``mb.old_logprobs`` (π_prox, from ``score`` before the step's first update)
        with the behaviour weight ``mb.is_weights``. A micro-batch without them is the step's only
        update: π_prox is then this very forward's detached log-probs (the same pre-update weights),
        the weight is computed here, and the stats carry ``behaviour`` sums (``algo.behaviour_sums``)
        and the step's entropy. m2po needs its cut over the whole step, so never comes here without
        weights unless ``m2po_cut`` is given. The KL term needs ``mb.ref_logprobs``."""
        import torch.distributed as dist

        from async_or1.algo import policy_loss
        from async_or1.algo.corrections import DIAG_SUMS, clipped

        a = self.cfg.algo
        clip_low = a.clip_low if clip_low is None else clip_low
        clip_high = a.clip_high if clip_high is None else clip_high
        correction = a.correction if correction is None else correction
        kl_coef = a.kl_coef if kl_coef is None else kl_coef
        params = correction_params(a)
        clip = clipped(correction)
        mbs = list(micro_batches) or [_empty()]
        t_global = max(int(num_tokens_global), 1)
        dev = self.device
        acc = torch.zeros(7, dtype=torch.float64, device=dev)  # tokens, entropy, ratio, clip_lo, clip_hi, loss, kl
        behav_acc = torch.zeros(len(DIAG_SUMS), dtype=torch.float64, device=dev)
        behav_max = torch.zeros((), dtype=torch.float64, device=dev)
        in_step_weights = False
        for k, mb in enumerate(mbs):
            self.engine.set_gradient_accumulation_boundary(k == len(mbs) - 1)
            logp, ent, real = self._forward(mb)
            if mb.size == 0:
                loss = (logp.sum() + ent.sum()) * 0.0
            else:
                sel = mb.loss_mask.to(dev) > 0  # [B, L]
                adv = mb.advantages.to(dev)[sel].float()  # [N]
                old, weight, diag = self._anchor_and_weight(mb, logp, sel, correction, params, m2po_cut)
                if diag is not None:
                    in_step_weights = True
                    behav_acc += diag[0]
                    behav_max = torch.maximum(behav_max, diag[1])
                if kl_coef and mb.ref_logprobs is None:
                    raise ValueError("LearnerEngine.train_step: kl_coef > 0 needs mb.ref_logprobs "
                                     "(score(reference=True))")
                ref = mb.ref_logprobs.to(dev)[sel].float()[None] if kl_coef else None
                loss, st = policy_loss(logp.float()[None], old[None], adv[None], torch.ones_like(adv)[None],
                                       clip_low=clip_low, clip_high=clip_high, clip=clip,
                                       weight=None if weight is None else weight[None], entropy=ent.float()[None],
                                       entropy_coef=float(entropy_coef), num_tokens=t_global, kl_coef=float(kl_coef),
                                       ref_logprobs=ref, kl_estimator=a.kl_estimator)
                acc += torch.stack([st["token_count"], st["entropy_sum"], st["ratio_sum"], st["clip_low_count"],
                                    st["clip_high_count"], loss.detach(),
                                    st.get("kl_sum", torch.zeros((), device=dev))]).double()
            # × world_size: DeepSpeed averages gradients over ranks; we want Σ over all tokens / T.
            self.engine.backward(loss * self.world_size)
        manual_norm = self._grad_norm() if self.zero_stage == 0 else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = manual_norm if norm is None else float(norm)
        flags = torch.tensor([float(in_step_weights)], dtype=torch.float64, device=dev)
        packed = torch.cat([acc, behav_acc, flags])
        dist.all_reduce(packed)
        tokens, ent_sum, ratio_sum, lo, hi, loss_sum, kl_sum = packed[:7].tolist()
        out = {"token_count": int(round(tokens)), "entropy_sum": ent_sum, "ratio_sum": ratio_sum,
               "clip_low_count": int(round(lo)), "clip_high_count": int(round(hi)), "loss": loss_sum,
               "kl_sum": kl_sum, "grad_norm": norm, "micro_batches": len(mbs)}
        if packed[-1] > 0:  # some rank computed the weights in this step: the sums are the step's
            mx = behav_max.clone()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            out["behaviour"] = (packed[7:-1].tolist(), float(mx))
        return out

    def _anchor_and_weight(self, mb: MicroBatch, logp: torch.Tensor, sel: torch.Tensor, correction: str,
                           params: Any, m2po_cut: float | None) -> tuple:
        """One micro-batch's ratio anchor [N], behaviour weight [N] (None: no weight) and, when they were
        computed here, its ``algo.behaviour_sums``. Without proximal log-probs the micro-batch belongs
        to the step's only update, whose forward runs on the pre-update weights: its own detached
        log-probs are π_prox, and the weights come from them."""
        from async_or1.algo import behaviour_sums, correction_weights
        from async_or1.algo.corrections import ratio_anchor_is_behaviour

        dev = self.device
        behav = mb.behavior_logprobs.to(dev)[sel].float()  # [N]
        on_behaviour = ratio_anchor_is_behaviour(correction)
        if mb.old_logprobs is not None:  # the proximal pass ran (learner/update.py)
            if on_behaviour:
                return behav, None, None
            weight = mb.is_weights.to(dev)[sel].float() if mb.is_weights is not None else None
            return mb.old_logprobs.to(dev)[sel].float(), weight, None
        mask_bl = mb.loss_mask.to(dev)  # [B, L]
        prox_bl = torch.zeros_like(mask_bl)
        prox_bl[sel] = logp.detach().float()
        log_rho = (prox_bl - mb.behavior_logprobs.to(dev)) * mask_bl
        w = correction_weights(correction, log_rho, mask_bl, params, m2po_cut)
        diag = behaviour_sums(log_rho, mask_bl, w)
        if on_behaviour:
            return behav, None, diag
        return logp.detach().float(), w.weight[sel].float(), diag

    def _grad_norm(self) -> float:
        """Global L2 norm of the (already all-reduced, identical on every rank) ZeRO-0 gradients;
        DeepSpeed records none for an fp32 torch optimizer without ZeRO."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt())

    # ---- weights and checkpoints (collective on every learner rank) ------------------------------
    def weight_specs(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype, full shape) of every tensor ``full_state_iter`` yields, in its order, from
        metadata (no gather): what a weight update is planned from."""
        from async_or1.learner.checkpoint import param_specs

        return param_specs(self.hf_model)

    def full_state_iter(self, bucket_bytes: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) in ``hf_model.named_parameters()`` order (HF names; a tied output
        embedding appears once, under its input-embedding name, as in the generator's model).
        Yields only on rank 0; every rank must exhaust it (ZeRO-3 gathers are collective). Streams:
        under ZeRO-3 one group of at most ``bucket_bytes`` (default ``learner.bucket_mb``) is gathered
        at a time and released when the next is asked for, so copy what must outlive that."""
        from async_or1.learner.checkpoint import full_state_iter

        return full_state_iter(self.hf_model, zero_stage=self.zero_stage, rank=self.rank,
                               bucket_bytes=bucket_bytes or self.bucket_bytes)

    def save_checkpoint(self, path: str | os.PathLike, client_state: dict) -> None:
        from async_or1.learner.checkpoint import save_checkpoint

        save_checkpoint(self.engine, path, client_state, rank=self.rank)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        from async_or1.learner.checkpoint import load_checkpoint

        return load_checkpoint(self.engine, path)

    def save_hf(self, path: str | os.PathLike, tokenizer: Any = None) -> None:
        from async_or1.learner.checkpoint import save_hf

        save_hf(self.hf_model, path, zero_stage=self.zero_stage, rank=self.rank, tokenizer=tokenizer,
                bucket_bytes=self.bucket_bytes)


def _load_hf(model_path: str, dtype: torch.dtype, trust_remote_code: bool, zero3_config: dict | None) -> nn.Module:
    """The Hugging Face model; with ``zero3_config`` partitioned as it is built, never whole.

    Under ZeRO-3 the model is constructed inside ``deepspeed.zero.Init`` (each module's parameters
    are partitioned as soon as the module exists) and the checkpoint is copied into one module's
    gathered parameters at a time (rank 0 reads the memory-mapped file, DeepSpeed scatters), so no
    rank holds the full model. transformers does exactly this in ``from_pretrained`` while an
    ``HfDeepSpeedConfig`` is alive (its documented integration outside the Trainer); that object is
    a process-wide switch, so it lives only for this call."""
    from transformers import AutoModelForCausalLM

    if zero3_config is None:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    switch = HfDeepSpeedConfig(copy.deepcopy(zero3_config))
    try:
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    finally:
        del switch
        unset_hf_deepspeed_config()
    whole = [n for n, p in hf.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise RuntimeError(f"ZeRO-3 load of {model_path}: {len(whole)} parameters were not partitioned at "
                           f"construction (first: {whole[0]}); transformers did not build the model under "
                           "deepspeed.zero.Init")
    return hf


def correction_params(algo: Any) -> Any:
    """``algo.CorrectionParams`` from the config's algo section."""
    from async_or1.algo import CorrectionParams

    return CorrectionParams(is_cap=algo.is_cap, mis_low=algo.mis_low, mis_high=algo.mis_high,
                            icepop_low=algo.icepop_low, icepop_high=algo.icepop_high,
                            m2po_threshold=algo.m2po_threshold)


def _empty() -> MicroBatch:
    from async_or1.learner.packing import empty_micro_batch

    return empty_micro_batch()
