"""The embedded model's synthetic world, and a quality guard that scores pictures against prompts.

`score(image, prompt)` -> {attribute: hit} for the colour, shape, position, size and background
a prompt names; `accuracy(scores)` aggregates them. No model or download is involved.
"""

from sdray.quality.scorer import ATTRIBUTES, Detection, Spec, accuracy, detect, parse_prompt, score

__all__ = ["ATTRIBUTES", "Detection", "Spec", "accuracy", "detect", "parse_prompt", "score"]
