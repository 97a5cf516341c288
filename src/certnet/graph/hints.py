"""What to do about an operator certnet does not bound, for the one error that names it."""

from __future__ import annotations

_SOFTMAX = ("certnet bounds a classifier's logits; a final softmax changes no prediction and "
            "no margin's sign: remove it (export or trace the logits, which a VNN-LIB "
            "property should then name)")
_LATER = "not bounded yet (sound relaxations for it are planned); no silent pass is made"

#: lower-case operator name (ONNX op type, torch function or module class) -> the advice
HINTS = {"softmax": _SOFTMAX, "logsoftmax": _SOFTMAX, "log_softmax": _SOFTMAX,
         **dict.fromkeys(["sigmoid", "gelu", "erf", "leakyrelu", "leaky_relu", "maxpool",
                          "maxpool2d", "max_pool2d", "pad"], _LATER)}


def hint(name: str) -> str:
    """``" (advice)"`` for an operator with known advice (``name`` may be qualified, e.g.
    ``torch.nn.functional.softmax``), else ``""``."""
    advice = HINTS.get(name.rsplit(".", 1)[-1].lower())
    return f" ({advice})" if advice else ""
