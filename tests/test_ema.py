"""EMA arithmetic, warm-up, evaluation swap and state round trip."""
import pytest
import torch

from dream.ema import EMA


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GroupNorm(1, 3))


def test_update_arithmetic():
    model = make_model()
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for shadow, s0, p in zip(ema.shadow, start, model.parameters()):
        torch.testing.assert_close(shadow, 0.9 * s0 + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)


def test_warmup_decay_schedule():
    ema = EMA(make_model(), decay=0.9999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(make_model())
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert EMA(make_model(), decay=0.5, warmup=True).current_decay() == pytest.approx(0.1)


def test_applied_swaps_and_restores_even_on_error():
    model = make_model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1)
    ema.update(model)
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.applied(model):
        for p, s in zip(model.parameters(), ema.shadow):
            assert torch.equal(p, s)
    for p, q in zip(model.parameters(), trained):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError):
        with ema.applied(model):
            raise RuntimeError("evaluation failed")
    for p, q in zip(model.parameters(), trained):
        assert torch.equal(p, q)


def test_state_dict_round_trip():
    model = make_model()
    ema = EMA(model, decay=0.99, warmup=True)
    with torch.no_grad():
        model[0].weight.add_(1)
    ema.update(model)
    other = EMA(make_model(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.warmup and other.num_updates == 1
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)
    full = ema.model_state_dict(model)
    assert set(full) == set(model.state_dict())
    assert torch.equal(full["0.weight"], ema.shadow[0])


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(make_model(), decay=1.5)


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_decay_at_the_ends_of_its_range(decay):
    """d = 0 makes the shadow the latest weights, d = 1 keeps the first ones; both ends are valid."""
    model = make_model()
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=decay)
    ema.update(perturbed(model))
    for shadow, s0, p in zip(ema.shadow, start, model.parameters()):
        torch.testing.assert_close(shadow, p.detach() if decay == 0.0 else s0, rtol=0, atol=0)


def test_in_use_is_set_only_while_applied():
    model = make_model()
    ema = EMA(model)
    assert not ema.in_use
    with ema.applied(model):
        assert ema.in_use
    assert not ema.in_use
    with pytest.raises(RuntimeError), ema.applied(model):
        raise RuntimeError("evaluation failed")
    assert not ema.in_use


def test_load_state_dict_refuses_a_state_missing_parameters():
    ema = EMA(make_model())
    state = ema.state_dict()
    del state["shadow"]["1.bias"]
    with pytest.raises(ValueError, match="lacks 1 parameters, e.g. 1.bias"):
        EMA(make_model()).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_state_dict_is_a_copy_in_the_models_dtype(dtype):
    model = make_model().to(dtype)
    ema = EMA(model, decay=0.5)
    assert all(s.dtype == torch.float32 for s in ema.shadow)  # averaged in fp32
    exported = ema.model_state_dict(model)
    assert all(v.dtype == dtype for v in exported.values())
    before = {k: v.clone() for k, v in exported.items()}
    ema.update(perturbed(model))
    for k, v in exported.items():  # later updates leave an exported state as it was
        assert torch.equal(v, before[k]), k


def test_frozen_parameters_are_not_averaged_and_export_as_the_model_has_them():
    model = make_model()
    model[1].weight.requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert ema.names == ["0.weight", "0.bias", "1.bias"]
    with torch.no_grad():
        model[1].weight.mul_(torch.rand(3) + 2)
    ema.update(model)
    assert torch.equal(ema.model_state_dict(model)["1.weight"], model[1].weight)


def reference_update(shadow, params, decay):
    """shadow + (1 - d)(param - shadow) in float64."""
    return [s.double() + (1 - decay) * (p.detach().double() - s.double()) for s, p in zip(shadow, params)]


@pytest.mark.parametrize("warmup", [False, True])
def test_an_update_decided_on_the_device_applies_or_leaves_everything(warmup):
    """update(model, applied=flag): where the flag is True, the update and its count are those of a plain update
    (the warm-up decay counting applied updates only); where False, the shadow and the count stay as they were."""
    torch.manual_seed(1)
    model = make_model()
    ema = EMA(model, decay=0.9, warmup=warmup)
    applied_count = 0
    for flag in (True, False, False, True, True):
        perturbed(model)
        before = [s.clone() for s in ema.shadow]
        decay = min(0.9, (1 + applied_count) / (10 + applied_count)) if warmup else 0.9
        expected = reference_update(before, model.parameters(), decay)
        ema.update(model, applied=torch.tensor(flag))
        if flag:
            applied_count += 1
            for shadow, want in zip(ema.shadow, expected):
                torch.testing.assert_close(shadow.double(), want, rtol=1e-6, atol=1e-7)
        else:
            assert all(torch.equal(s, b) for s, b in zip(ema.shadow, before))
        assert ema.num_updates == applied_count
    assert ema.state_dict()["num_updates"] == 3


def test_a_conditional_update_matches_the_plain_one():
    """With applied=True the device-decided arithmetic gives the plain update's shadow to fp32 rounding."""
    torch.manual_seed(2)
    model = perturbed(make_model())
    plain, decided = EMA(make_model(), decay=0.7), EMA(make_model(), decay=0.7)
    plain.update(model)
    decided.update(model, applied=torch.tensor(True))
    for a, b in zip(plain.shadow, decided.shadow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert plain.num_updates == decided.num_updates == 1


@pytest.mark.parametrize("decided", [False, True], ids=["plain", "decided"])
def test_warmup_decay_is_capped_at_decay_on_either_update_path(decided):
    """d_k = min(decay, (1 + k) / (10 + k)) at every update: the ramp 1/10, 2/11, ... passes decay = 0.5 at k = 9
    (10/19), where the cap takes over; a plain update (no `applied` flag, as the fp16 path makes it) warms up
    like a device-decided one. Each shadow against a float64 reference."""
    torch.manual_seed(4)
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=True)
    for k in range(12):
        decay = min(0.5, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(decay, rel=1e-12)
        perturbed(model)
        expected = reference_update(ema.shadow, model.parameters(), decay)
        ema.update(model, applied=torch.tensor(True) if decided else None)
        for shadow, want in zip(ema.shadow, expected):
            torch.testing.assert_close(shadow.double(), want, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 12
