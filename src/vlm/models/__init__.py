"""Model parts (encoders, resamplers, projectors, LLMs) and their composition."""


def not_yet_available(option: str, issue: int, **official_sizes) -> None:
    """Stand-in target for config options whose implementation lands in a later issue."""
    raise NotImplementedError(
        f"`{option}` is declared (its config shows the official sizes) but not implemented yet; "
        f"it lands with issue #{issue}."
    )
