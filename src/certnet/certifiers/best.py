"""``best``: every sound certificate that applies, combined per point (any certifies ->
certified; the radius is the largest proved; ``by`` names the certifier that proved it).

The certifiers that compute a radius per point run first, on every point (the largest radius
wins, whatever their registration order); then the "eps or nothing" ones, cheapest first, each
only on the points still uncertified: they could only add a radius of eps, never larger than a
radius > eps already proved, so nothing is lost and full CROWN runs on the few hard points
only.
A certifier that another applicable one subsumes (full CROWN, by alpha-CROWN, which starts
from CROWN's bound on the same intermediate bounds) is skipped: its work would be redone.
"""

from __future__ import annotations

import torch

from certnet.certifiers.base import (
    CERTIFIERS,
    Certificate,
    Certifier,
    applicable,
    register_certifier,
)


class BestCertifier(Certifier):
    name = "best"
    gives_radius = False
    cost = 100
    combines = True

    def applies(self, model, norm):
        return None if applicable(model, norm) else "no certifier applies"

    def certify(self, model, x, threat):
        names = applicable(model, threat.norm)
        subsumed = {s for name in names for s in CERTIFIERS[name].subsumes}
        names = sorted((name for name in names if name not in subsumed),
                       key=lambda name: not CERTIFIERS[name].gives_radius)  # stable: by cost
        pred = certified = radius = margin = None
        by = ["" for _ in range(len(x))]
        gives_radius = True
        for name in names:
            everything = certified is None or CERTIFIERS[name].gives_radius
            todo = torch.arange(len(x), device=x.device) if everything else \
                (~certified).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            cert = CERTIFIERS[name].certify(model, x[todo], threat)
            gives_radius &= cert.gives_radius
            if pred is None:
                pred, certified, radius = cert.pred, cert.certified, cert.radius
                margin = cert.margin if cert.margin is not None else \
                    torch.full((len(x),), -torch.inf, dtype=torch.float64, device=x.device)
                fresh = cert.certified
            else:
                # every certifier predicts by the same float64 forward pass; should one ever
                # differ, its certificate is about another class and is not used
                proved = cert.certified & (cert.pred == pred[todo])
                fresh = proved & ~certified[todo]  # ``by`` keeps the first to prove a point
                certified[todo] |= proved
                same = cert.pred == pred[todo]
                radius[todo] = torch.where(same, torch.maximum(radius[todo], cert.radius),
                                           radius[todo])
                if cert.margin is not None:
                    margin[todo] = torch.where(same,
                                               torch.maximum(margin[todo], cert.margin),
                                               margin[todo])
            for i in todo[fresh].tolist():
                by[i] = name
        return Certificate(pred=pred, certified=certified, radius=radius,
                           gives_radius=gives_radius and len(names) == 1, margin=margin, by=by)


register_certifier(BestCertifier())
