"""Config values checked when training starts, before anything is built: one rule per key, and one error
that names every key out of range with what it accepts (instead of a failure deep inside a later step)."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from vlm.training.preemption import signal_problem

_UNSET = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least_one(value) -> str | None:
    return None if _is_int(value) and value >= 1 else "must be an integer >= 1"


def step_limit(value) -> str | None:
    ok = value is None or (_is_int(value) and (value >= 1 or value == -1))
    return None if ok else "must be an integer >= 1 (or -1: no limit)"


def lora_rank(value) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an integer >= 0 (0: no LoRA)"


def image_size(value) -> str | None:
    sides = value if isinstance(value, list) else [value]
    ok = value is None or (len(sides) in (1, 2) and all(_is_int(s) and s >= 1 for s in sides))
    return None if ok else "must be [height, width] in pixels (or one side), each an integer >= 1"


def catchable_signals(value) -> str | None:
    if not isinstance(value, list):
        return "must be a list of signal names, e.g. [SIGTERM, SIGUSR1]"
    return signal_problem(value)


def bpe_vocab_size(value) -> str | None:
    return None if _is_int(value) and value >= 260 else "must be an integer >= 260 (256 bytes + 4 specials)"


def non_negative(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be a number >= 0 (0: off)"


RULES: dict[str, Callable[[object], str | None]] = {
    "trainer.max_steps": step_limit,
    "trainer.val_check_interval": at_least_one,
    "data.batch_size": at_least_one,
    "data.eval_batch_size": at_least_one,
    "data.source.samples_per_shard": at_least_one,
    "encoder.image_size": image_size,
    "data.source.image_size": image_size,
    "llm.lora.r": lora_rank,
    "loss.prompt_lm_weight": non_negative,
    "llm.tokenizer_vocab_size": bpe_vocab_size,
    "callbacks.preemption.signals": catchable_signals,
}


def check_config(cfg: DictConfig) -> None:
    """Raise a ValueError naming each key of `RULES` whose value breaks its rule (absent keys pass)."""
    problems = []
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_UNSET)
        if value is _UNSET:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        problem = rule(value)
        if problem:
            problems.append(f"{key}={value!r}: {problem}")
    if problems:
        raise ValueError("config values out of range:\n  " + "\n  ".join(problems))
