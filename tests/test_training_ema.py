"""The generator EMA against its closed form: after updates with p_1..p_n,
shadow_n = d^n p_0 + sum_j (1 - d) d^(n-j) p_j (an asymmetric decay, so d and 1 - d cannot be confused)."""
import torch

from reward_forcing.training.ema import EMA


def test_shadow_is_the_closed_form_over_several_updates():
    """Bug caught: decay and (1 - decay) exchanged in the update (the shadow would follow the newest weights),
    or an update that skips parameters / blends against the wrong tensor."""
    decay = 0.7
    model = torch.nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(0)
    history = []  # p_0 .. p_n, as float64 copies
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    ema = EMA(model, decay)
    updates = 4
    for _ in range(updates):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 3)  # every step different weights
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        ema.update(model)
    for name, shadow in ema.state_dict().items():
        expected = decay ** updates * history[0][name]
        for j in range(1, updates + 1):
            expected = expected + (1 - decay) * decay ** (updates - j) * history[j][name]
        torch.testing.assert_close(shadow.double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.state_dict().keys() == dict(model.named_parameters()).keys()


def test_shadow_is_an_fp32_copy_that_load_state_dict_restores():
    """Bug caught: a shadow that aliases the live parameters (so it moves with every optimiser step), or a
    load_state_dict that does not restore it."""
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(ema.state_dict()["weight"], saved["weight"])  # not aliased
    ema.update(model)
    assert not torch.equal(ema.state_dict()["weight"], saved["weight"])
    ema.load_state_dict(saved)
    assert all(torch.equal(ema.state_dict()[k], saved[k]) for k in saved)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
