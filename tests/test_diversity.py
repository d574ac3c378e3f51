"""The digits report's diversity numbers (util.digit_classifier.diversity): FD, precision and recall in the
judge's penultimate features, checked against direct computations on tiny inputs whose answers are known."""
import numpy as np
import pytest
import torch

from util import digit_classifier as dc

K = 3  # the report's neighbourhood (Kynkäänniemi et al.)


def direct_precision_recall(gen, ref, k=K):
    """By the definition: a sample is covered when it lies within the distance from some sample of the other
    set to that sample's k-th nearest neighbour in its own set (itself excluded)."""
    def radii(x):
        return torch.cdist(x, x).sort(dim=1).values[:, k]  # column 0 is the point itself

    def covered(x, y):  # share of x inside some ball around y
        return (torch.cdist(x, y) <= radii(y)[None, :]).any(dim=1).float().mean().item()

    return covered(gen, ref), covered(ref, gen)


def test_identical_sets_give_zero_distance_and_full_coverage():
    f = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    out = dc.distance(f, f.clone())
    assert out["fd"] == pytest.approx(0.0, abs=1e-3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_shifted_gaussian_gives_the_closed_form_fd(scale):
    """gen = scale * ref + shift: its sample mean moves by the shift (plus (scale - 1) * mean) and its sample
    covariance is scale^2 * S, so FD = |mean difference|^2 + (1 - scale)^2 tr(S) exactly."""
    ref = torch.randn(500, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ torch.diag(
        torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64))
    shift = torch.tensor([3.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    gen = scale * ref + shift
    mean_diff = gen.mean(0) - ref.mean(0)
    expected = mean_diff.dot(mean_diff).item() + (1 - scale) ** 2 * np.trace(np.cov(ref.numpy(), rowvar=False))
    assert dc.distance(gen, ref)["fd"] == pytest.approx(expected, rel=1e-4)
    if scale == 1.0:
        assert expected == pytest.approx(shift.dot(shift).item(), rel=1e-9)


def test_precision_recall_match_the_definition():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(60, 3, generator=g)
    # a third of the generated set sits on the reference cloud, the rest far off; it is narrower than ref
    gen = torch.cat([0.3 * torch.randn(20, 3, generator=g), torch.randn(40, 3, generator=g) + 6.0])
    out = dc.distance(gen, ref)
    precision, recall = direct_precision_recall(gen, ref)
    assert out["precision"] == pytest.approx(precision, abs=1e-4)
    assert out["recall"] == pytest.approx(recall, abs=1e-4)
    assert 0.2 < out["precision"] < 0.5 and out["recall"] < 1.0  # the off-cloud samples and the narrow cloud show


def test_features_are_what_the_class_layer_reads():
    torch.manual_seed(0)
    model = dc.DigitClassifier().eval()
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    f = dc.features(model, x, batch_size=3)
    assert f.shape == (7, 128) and (f >= 0).all()  # after the ReLU
    with torch.no_grad():
        assert torch.allclose(model[-1](f), model(dc.to_classifier_input(x)), atol=1e-5)


def test_split_real_is_disjoint_balanced_and_seeded():
    labels = torch.arange(3).repeat_interleave(10)
    images = torch.arange(30, dtype=torch.float32).reshape(30, 1, 1, 1)
    (ref, ref_y), (floor, floor_y) = dc.split_real(images, labels, per_class=4, seed=5)
    assert set(ref.flatten().tolist()).isdisjoint(floor.flatten().tolist())
    assert torch.bincount(ref_y).tolist() == [4, 4, 4] and torch.bincount(floor_y).tolist() == [4, 4, 4]
    assert all(labels[int(v)] == y for v, y in zip(ref.flatten(), ref_y))  # images keep their labels
    again = dc.split_real(images, labels, per_class=4, seed=5)[0][0]
    assert torch.equal(ref, again)
    with pytest.raises(ValueError, match="class 0 has 10 real digits, fewer than the 2 x 6"):
        dc.split_real(images, labels, per_class=6)


def test_real_reference_against_itself_is_perfect_and_the_floor_is_not():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(2).repeat_interleave(20)
    images = torch.rand(40, 1, 28, 28, generator=g) * 2 - 1
    torch.manual_seed(0)
    model = dc.DigitClassifier(2).eval()
    (ref, _), _ = dc.split_real(images, labels, per_class=8)
    out = dc.diversity(model, ref, images, labels, per_class=8)
    assert out["generated"]["fd"] == pytest.approx(0.0, abs=1e-3)
    assert out["generated"]["precision"] == 1.0 and out["generated"]["recall"] == 1.0
    assert out["real_floor"]["fd"] > 0.0 and out["num_reference"] == out["num_floor"] == 16


def test_judge_trains_when_called_under_no_grad():
    """A report made under no_grad (benchmarks/digits_cfg_sweep.py) on a data folder without a cached judge
    trains the judge there: training must not depend on the caller's grad mode."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.arange(40) % 2
    kwargs = dict(epochs=2, batch_size=20, lr=1e-2, seed=0)
    with torch.no_grad():
        trained = dc.train_digit_classifier(images, labels, **kwargs)
    reference = dc.train_digit_classifier(images, labels, **kwargs)
    for a, b in zip(trained.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    untrained = dc.train_digit_classifier(images, labels, **{**kwargs, "epochs": 0})
    assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                   untrained.state_dict().values()))


def test_judge_is_the_same_whatever_the_callers_thread_count():
    """The judge is every report's yardstick: a run on one thread and a run on two that train it on the same
    data folder get the same weights, and the caller keeps its thread count."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.arange(64) % 4
    kwargs = dict(epochs=2, batch_size=32, lr=1e-2, seed=0)
    before = torch.get_num_threads()
    judges = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            judges.append(dc.train_digit_classifier(images, labels, **kwargs))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for a, b in zip(judges[0].state_dict().values(), judges[1].state_dict().values()):
        assert torch.equal(a, b)
