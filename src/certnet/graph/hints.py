"""What to do about an operator certnet does not bound, for the one error that names it."""

from __future__ import annotations

_SOFTMAX = ("certnet bounds a classifier's logits; a final softmax changes no prediction and "
            "no margin's sign: remove it (export or trace the logits, which a VNN-LIB "
            "property should then name)")
_LATER = "not bounded yet (sound relaxations for it are planned); no silent pass is made"
_PAD_MODES = ("certnet bounds constant padding only (nn.ZeroPad2d, nn.ConstantPad2d, F.pad "
              "with mode='constant', ONNX Pad with mode='constant'); reflect, replicate and "
              "circular padding are refused")

#: lower-case operator name (ONNX op type, torch function or module class) -> the advice
HINTS = {"softmax": _SOFTMAX, "logsoftmax": _SOFTMAX, "log_softmax": _SOFTMAX,
         **dict.fromkeys(["elu", "selu", "softplus", "mish", "hardswish",
                          "hardsigmoid"], _LATER),
         **dict.fromkeys([f"{kind}pad{d}d" for kind in ("reflection", "replication", "circular")
                          for d in (1, 2, 3)], _PAD_MODES)}


def hint(name: str) -> str:
    """``" (advice)"`` for an operator with known advice (``name`` may be qualified, e.g.
    ``torch.nn.functional.softmax``), else ``""``."""
    advice = HINTS.get(name.rsplit(".", 1)[-1].lower())
    return f" ({advice})" if advice else ""
