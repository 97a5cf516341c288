"""The certification engine: several radii in one pass agree with one radius at a time."""

import pytest
import torch

from certnet.archs import build_arch
from certnet.certify import evaluate, reports_to_dict, summary_table
from certnet.data import Dataset
from certnet.errors import InputError
from certnet.methods.gloro import GloroNet

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def setup():
    model = GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10)
    g = torch.Generator().manual_seed(0)
    data = Dataset("random", torch.rand(50, *SHAPE, generator=g),
                   torch.randint(0, 10, (50,), generator=g), 10, "")
    return model, data


def test_several_radii_match_one_at_a_time(setup):
    model, data = setup
    radii = [0.0, 0.05, 0.2]
    reports = evaluate(model, data, radii, batch_size=16)
    assert [r.eps for r in reports] == radii
    assert reports[0].abstain_rate < reports[1].abstain_rate < reports[2].abstain_rate
    for eps, report in zip(radii, reports, strict=True):
        one = evaluate(model, data, eps, batch_size=16)
        assert torch.equal(one.certified, report.certified) and torch.equal(one.pred, report.pred)
        assert one.vra == report.vra and one.abstain_rate == report.abstain_rate
    payload = reports_to_dict(reports)
    assert payload["n"] == 50 and [r["eps"] for r in payload["results"]] == radii
    assert "n" not in payload["results"][0]
    assert len(summary_table(reports).splitlines()) == 2 + len(radii)


@pytest.mark.parametrize("eps", [[], [0.1, -1.0], [float("nan")]])
def test_bad_radii_are_refused_before_any_work(setup, eps):
    model, data = setup
    with pytest.raises(InputError):
        evaluate(model, data, eps)
