"""Certificates audited by attack: certify a dataset (:func:`certnet.certify.evaluate`) and set
:class:`certnet.attacks.PGD` against each point's certified prediction, in the certificate's
norm. A certified point whose prediction PGD changes inside the ball is a soundness bug and is
reported in ``violations``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from certnet.attacks import PGD, perturbation_norm
from certnet.certify import evaluate
from certnet.data import Dataset
from certnet.errors import ConfigError, InputError
from certnet.methods.base import CertifiedModel
from certnet.threat import check_eps

#: Relative tolerance on the perturbation norm when counting certificate violations.
NORM_TOLERANCE = 1e-6


def attack_report(model: CertifiedModel, x: torch.Tensor, y: torch.Tensor, eps: float,
                  steps: int = 100, restarts: int = 10, batch_size: int = 256,
                  certifier: str | None = None, seed: int = 0, progress: bool = False,
                  norm: str | None = None) -> dict[str, Any]:
    """Certify ``x`` at ``eps`` with ``certifier`` and attack it with :class:`PGD`, both in
    ``norm`` (defaults: the model's).

    The attack targets the certificate's prediction, so every point (correct or not) tests the
    certificate. Returns a JSON-serialisable dict: ``n``, ``clean_accuracy``,
    ``robust_accuracy`` (empirical: correct on x and on the PGD point), ``vra``,
    ``certified_rate``, ``attack_success_rate`` (prediction changed), ``flipped_certified``
    (certified points whose prediction changed within ``eps * (1 + 1e-6)``; must be 0),
    ``violations`` (their indices) and ``violation_details``.
    """
    check_eps(eps)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x):
        raise InputError("labels must be a 1-D tensor with one entry per input")
    if len(x) == 0:
        raise InputError("empty dataset")
    report = evaluate(model, Dataset("attacked", x, y.cpu(), model.num_classes, ""), eps,
                      certifier, batch_size, norm, progress=progress)
    pred, certified, radius = report.pred, report.certified, report.radius
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    clean_preds, adv_preds, dists = [], [], []
    start = time.perf_counter()
    try:
        for i in tqdm(range(0, len(x), batch_size), desc=f"PGD {report.norm} eps={eps:g}",
                      unit="batch", disable=None if progress else True):
            xb = x[i:i + batch_size].to(device)
            attack = PGD(model, eps, report.norm, steps, restarts, seed=seed + i)
            x_adv = attack(xb, pred[i:i + batch_size].to(device))
            with torch.no_grad():
                clean_preds.append(model(xb).argmax(1).cpu())
                adv_preds.append(model(x_adv).argmax(1).cpu())
            dists.append(perturbation_norm(x_adv - xb, report.norm).cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    attack_s = time.perf_counter() - start
    clean_pred, adv_pred, dist = torch.cat(clean_preds), torch.cat(adv_preds), torch.cat(dists)
    labels = y.cpu()
    correct = pred == labels
    inside = dist <= eps * (1 + NORM_TOLERANCE)
    changed = (adv_pred != pred) & inside
    # A zero perturbation counts too: the float32 forward must agree with the certificate.
    changed |= clean_pred != pred
    violation = certified & changed
    indices = violation.nonzero().squeeze(1).tolist()
    details = [{"index": j, "label": int(labels[j]), "pred": int(pred[j]),
                "clean_pred": int(clean_pred[j]), "adv_pred": int(adv_pred[j]),
                "radius": float(radius[j]), "distance": float(dist[j])} for j in indices]
    return {
        "method": model.method, "certifier": report.certifier, "norm": report.norm,
        "eps": float(eps), "steps": steps, "restarts": restarts, "n": len(labels),
        "clean_accuracy": float(correct.float().mean()),
        "robust_accuracy": float((correct & (clean_pred == labels) & (adv_pred == labels))
                                 .float().mean()),
        "vra": float((correct & certified).float().mean()),
        "certified_rate": float(certified.float().mean()),
        "attack_success_rate": float(changed.float().mean()),
        "flipped_certified": len(indices),
        "violations": indices,
        "violation_details": details,
        "certify_seconds": report.seconds,
        "attack_seconds": attack_s,
    }
