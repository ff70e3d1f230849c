"""The per-device BatchNorm simulation and the --quick run of the normalization experiment."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from bitcore.layers import StdConv2d
from experiments.normalization import run, summary
from experiments.normalization.chunked_bn import ChunkedBatchNorm2d, chunked_batch_norm
from experiments.normalization.figures import FILES
from experiments.normalization.train import METHODS, build_model


def _separate_replicas(
    x: torch.Tensor, b: int, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, list[nn.BatchNorm2d]]:
    """What b-image devices compute: one real nn.BatchNorm2d per device, same parameters."""
    outputs, replicas = [], []
    for chunk in x.split(b):
        bn = nn.BatchNorm2d(x.shape[1])
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        outputs.append(bn(chunk))
        replicas.append(bn)
    return torch.cat(outputs), replicas


@pytest.mark.parametrize("b", [2, 4, 8, 16])
def test_chunked_statistics_equal_separate_batchnorms(b: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 6, 5, 5) * 3 + 2
    chunked = ChunkedBatchNorm2d(6, device_batch=b)
    with torch.no_grad():
        chunked.weight.copy_(torch.linspace(0.5, 2.0, 6))
        chunked.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    expected, replicas = _separate_replicas(x, b, chunked.weight.detach(), chunked.bias.detach())

    got = chunked(x)

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Running statistics: rank 0's replica (DDP with broadcast_buffers=True keeps rank 0's).
    torch.testing.assert_close(chunked.running_mean, replicas[0].running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.running_var, replicas[0].running_var, rtol=0, atol=1e-6)
    assert int(chunked.num_batches_tracked) == 1
    if b < 16:  # the other devices' statistics really differ, so the choice matters
        other, first = replicas[1].running_mean, replicas[0].running_mean
        assert other is not None and first is not None
        assert not torch.allclose(other, first)


def test_chunked_gradients_equal_averaged_device_gradients() -> None:
    """Mean loss over the global batch = DDP's average of each device's mean loss."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4)
    target = torch.randn(8, 3, 4, 4)
    chunked = ChunkedBatchNorm2d(3, device_batch=4)
    ((chunked(x) - target) ** 2).mean().backward()

    grads = []
    for xs, ts in zip(x.split(4), target.split(4), strict=True):
        bn = nn.BatchNorm2d(3)
        ((bn(xs) - ts) ** 2).mean().backward()
        assert bn.weight.grad is not None and bn.bias.grad is not None
        grads.append((bn.weight.grad, bn.bias.grad))
    torch.testing.assert_close(chunked.weight.grad, (grads[0][0] + grads[1][0]) / 2)
    torch.testing.assert_close(chunked.bias.grad, (grads[0][1] + grads[1][1]) / 2)


def test_whole_batch_device_is_plain_batchnorm_in_train_and_eval() -> None:
    torch.manual_seed(2)
    chunked, plain = ChunkedBatchNorm2d(4, device_batch=8), nn.BatchNorm2d(4)
    for _ in range(3):
        x = torch.randn(8, 4, 3, 3) * 2 - 1
        torch.testing.assert_close(chunked(x), plain(x), rtol=1e-5, atol=1e-5)
    chunked.eval()
    plain.eval()
    x = torch.randn(5, 4, 3, 3)  # eval accepts any batch size
    torch.testing.assert_close(chunked(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.running_var, plain.running_var)


def test_one_image_at_one_pixel_erases_the_input() -> None:
    """b = 1 at 1x1: variance 0, every output equals the bias and no gradient reaches x."""
    bn = ChunkedBatchNorm2d(3, device_batch=1)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(4, 3, 1, 1, requires_grad=True)
    out = bn(x)
    torch.testing.assert_close(out, bn.bias.detach().view(1, 3, 1, 1).expand(4, 3, 1, 1))
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None
    assert float(x.grad.abs().max()) == 0.0
    # No unbiased variance of one value: the biased one (0) is stored, as TensorFlow does.
    torch.testing.assert_close(bn.running_var, torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))


def test_cumulative_momentum_averages_chunk_statistics() -> None:
    bn = ChunkedBatchNorm2d(2, device_batch=2, momentum=None)
    first = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 2, 1, 1)
    second = torch.tensor([5.0, 7.0]).view(2, 1, 1, 1).expand(2, 2, 1, 1)
    bn(first)
    bn(second)
    # means 2 and 6 -> 4; unbiased variances 2 and 2 -> 2
    torch.testing.assert_close(bn.running_mean, torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(bn.running_var, torch.tensor([2.0, 2.0]))


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="device_batch must be >= 1"):
        ChunkedBatchNorm2d(4, device_batch=0)
    bn = ChunkedBatchNorm2d(4, device_batch=3)
    with pytest.raises(ValueError, match="cannot be split into devices of 3"):
        bn(torch.randn(8, 4, 2, 2))
    with pytest.raises(ValueError, match=r"expected input \(N, 4, H, W\)"):
        bn(torch.randn(6, 5, 2, 2))


def test_networks_differ_only_in_injected_layers() -> None:
    factory = chunked_batch_norm(4)
    assert isinstance(factory(8), ChunkedBatchNorm2d)
    bn_ws = build_model(METHODS["bn_ws"], 10, device_batch=4)
    gn = build_model(METHODS["gn"], 10, device_batch=4)
    names = [n for n, _ in bn_ws.named_parameters()]
    assert names == [n for n, _ in gn.named_parameters()]
    assert sum(p.numel() for p in gn.parameters()) == sum(p.numel() for p in bn_ws.parameters())
    bn_unit, gn_unit = (
        bn_ws.get_submodule("body.block4.unit01"),
        gn.get_submodule("body.block4.unit01"),
    )
    assert type(bn_unit.gn3) is ChunkedBatchNorm2d
    assert type(bn_unit.conv2) is StdConv2d
    assert type(gn_unit.gn3) is nn.GroupNorm
    assert type(gn_unit.conv2) is nn.Conv2d


def test_quick_run_writes_csv_summary_and_figures(tmp_path: Path) -> None:
    csv_path = run.run(run.QUICK, tmp_path)

    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == run.COLUMNS
        rows = list(reader)
    finals = {(r["method"], r["device_batch"]) for r in rows if r["metric"] == "test_acc"}
    assert finals == {("bn", "2"), ("bn", "32"), ("bn_ws", "2"), ("gn", ""), ("gn_ws", "")}
    for r in rows:
        if r["metric"] in ("test_acc", "target_test_acc", "target_test_acc_recalibrated"):
            assert 0.0 <= float(r["value"]) <= 1.0
    transfer = {r["method"] for r in rows if r["metric"] == "target_test_acc"}
    assert transfer == {"bn", "bn_frozen", "gn", "gn_ws"}
    timings = {(r["metric"], r["method"], r["batch"]) for r in rows if r["experiment"] == "timing"}
    assert ("train_ms", "gn_ws", "32") in timings
    assert ("infer_ms", "gn_ws_folded", "1") in timings
    rounds = {r["step"] for r in rows if r["metric"] == "train_ms" and r["method"] == "bn"}
    assert rounds == {"0", "1"}  # one median per round: the spread between rounds is reported
    assert all(math.isfinite(float(r["value"])) for r in rows if r["metric"] != "train_loss")
    counts = {e: sum(r["experiment"] == e for r in rows) for e in ("main", "transfer", "timing")}
    # 5 networks x (2 loss points + 4 finals); 3 upstreams (3 metrics + BN's 2 gaps) + 4
    # fine-tunes x 2 + 2 BN fine-tunes x 2; 2 rounds x (3 + 2 x 4) timings + the thread count.
    assert counts == {"main": 30, "transfer": 3 + 2 + 8 + 4, "timing": 2 * 11 + 1}

    for name in FILES:
        png = tmp_path / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000
    text = (tmp_path / run.SUMMARY_NAME).read_text()
    assert text == summary.markdown(run.read_csv(csv_path))
    assert "| BatchNorm | 32 | 32 |" in text
    assert "the median of 2 rounds" in text


DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_committed_summary_and_explainer_numbers_come_from_the_csv() -> None:
    """docs/normalization_summary.md is what the CSV gives, and the explainer quotes only it."""
    rows = run.read_csv(DOCS / run.CSV_NAME)
    generated = summary.markdown(rows)
    assert (DOCS / run.SUMMARY_NAME).read_text() == generated
    text = (DOCS / "normalization.md").read_text()
    quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+", text)
    assert len(quoted) >= 25  # the four-page text quotes fewer; every one must still match
    assert [q for q in quoted if q not in generated] == []
    # Timings: median over rounds with the fastest-slowest range, in ms and relative to BN.
    timings = re.findall(r"\d+\.\d+(?: ms)? \(\d+\.\d+–\d+\.\d+\)", text)
    ratios = re.findall(r"\d+\.\d\dx \(\d+\.\d\d–\d+\.\d\d\)", text)
    assert len(timings) >= 4 and len(ratios) >= 4
    assert [t for t in timings if t.replace(" ms", "") not in generated] == []
    assert [r for r in ratios if r not in generated] == []
    unquoted = re.findall(r"\d+\.\d+ ms(?! \()|\d+\.\d\dx(?! \()", text)
    assert unquoted == []  # every time or ratio in the text carries its spread
    for name in FILES:
        assert f"figures/{name}" in text
