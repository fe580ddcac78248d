"""The update schedule on a toy: which network steps on which micro-step, with what gradient."""
import pytest
import torch

from reward_forcing.training.schedule import (
    TrainingDiverged,
    Updater,
    is_generator_step,
    optimiser_step,
    upstream_iteration,
)


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, name, log):
        super().__init__(params, lr=1.0)
        self.name, self.log = name, log

    def step(self, closure=None):
        self.log.append((self.name, "step", [p.grad.clone() for p in self.param_groups[0]["params"]]))
        return super().step(closure)


def _make(log, accum):
    gen, critic = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    gen.weight.data.zero_()
    critic.weight.data.zero_()
    updaters = [Updater("generator", gen, RecordingSGD(gen.parameters(), "generator", log), grad_clip=1e9),
                Updater("critic", critic, RecordingSGD(critic.parameters(), "critic", log), grad_clip=1e9)]

    def micro(name, model):
        def run(i):
            log.append((name, "micro", i))
            x = torch.tensor([1.0, float(i + 1)])
            loss = model(x).sum() / accum  # d loss / d weight = x / accum
            loss.backward()
            return {"loss": loss.detach(), "probe": float(i)}
        return run

    return updaters, micro("generator", gen), micro("critic", critic)


def test_generator_every_third_step_before_critic():
    log, accum = [], 2
    (gen, critic), gen_micro, critic_micro = _make(log, accum)
    rows = [optimiser_step(s, accum, 3, gen, critic, gen_micro, critic_micro) for s in range(4)]
    events = [(name, kind, i if kind == "micro" else None) for name, kind, i in log]
    g_block = [("generator", "micro", 0), ("generator", "micro", 1), ("generator", "step", None)]
    c_block = [("critic", "micro", 0), ("critic", "micro", 1), ("critic", "step", None)]
    assert events == g_block + c_block + c_block + c_block + g_block + c_block  # steps 0 and 3 include the generator
    assert [("generator_loss" in r) for r in rows] == [True, False, False, True]
    assert all("critic_loss" in r for r in rows)
    assert rows[0]["probe"] == 0.5  # non-loss metrics are averaged over micro-steps
    assert [is_generator_step(s, 5) for s in range(6)] == [True, False, False, False, False, True]


def test_gradient_is_mean_of_micro_gradients_and_zeroed_after_step():
    log, accum = [], 2
    (gen, critic), gen_micro, critic_micro = _make(log, accum)
    optimiser_step(0, accum, 5, gen, critic, gen_micro, critic_micro)
    grads = [entry[2][0] for entry in log if entry[1] == "step"]
    # micro inputs [1, 1] and [1, 2]: the accumulated gradient is their mean
    for grad in grads:
        assert torch.allclose(grad, torch.tensor([[1.0, 1.5]]))
    assert gen.model.weight.grad is None and critic.model.weight.grad is None
    assert torch.allclose(gen.model.weight.data, -torch.tensor([[1.0, 1.5]]))  # SGD lr 1 from zero


def test_clipping_to_grad_clip():
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.data.zero_()
    updater = Updater("generator", model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=1.0)
    model(torch.tensor([3.0, 4.0])).sum().backward()
    norm = updater.step(1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(model.weight.data, -torch.tensor([[0.6, 0.8]]), atol=1e-6)


def test_nan_loss_stops_without_stepping():
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    updater = Updater("critic", model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=10.0)
    model(torch.tensor([1.0, 1.0])).sum().backward()
    with pytest.raises(TrainingDiverged, match="critic loss is nan"):
        updater.step(float("nan"))
    assert torch.equal(model.weight.detach(), before)


def _released_run_loop(run_step, iterations, accum=8, gen_every=5):
    """Runs `run_step` on toy networks whose every micro-step adds the gradient [1 / accum, 0]; returns, per
    optimiser step, how many micro-batches its gradient holds, and per clip how many the clipped sum holds."""
    log = []

    class Counting(Updater):
        def clip(self, loss):
            log.append((self.name, "clip", round(float(self.model.weight.grad[0, 0]) * accum)))
            return super().clip(loss)

    updaters = []
    for name in ("generator", "critic"):
        model = torch.nn.Linear(2, 1, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer.register_step_pre_hook(lambda opt, *_, name=name, model=model: log.append(
            (name, "step", round(float(model.weight.grad[0, 0]) * accum))))
        updaters.append(Counting(name, model, optimizer, grad_clip=1e9))

    def micro(model):
        def run(i):
            loss = model(torch.tensor([1.0, 0.0])).sum() / accum
            loss.backward()
            return {"loss": loss.detach()}
        return run

    gen, critic = updaters
    for step in range(iterations):
        run_step(step, accum, gen_every, gen, critic, micro(gen.model), micro(critic.model))
    return log


def _histogram(log, name, kind):
    counts = {}
    for who, what, micro_batches in log:
        if (who, what) == (name, kind):
            counts[micro_batches] = counts.get(micro_batches, 0) + 1
    return counts


def test_upstream_loop_counts_of_the_released_run():
    # configs/reward_forcing_upstream.yaml's derivation: 601 iterations, grad_accum 8, ratio 5. By hand: generator
    # events at iterations 0, 40, ..., 600 (16), two steps each on one micro-batch; the critic steps on each
    # iteration (601) and again on the 76 iterations divisible by 8, on sums of (iteration mod 8) micro-batches,
    # or 8 on the divisible ones (1 at iteration 0).
    log = _released_run_loop(upstream_iteration, 601)
    assert _histogram(log, "generator", "step") == {1: 32}
    assert _histogram(log, "generator", "clip") == {1: 16}
    assert _histogram(log, "critic", "step") == {1: 77, 2: 75, 3: 75, 4: 75, 5: 75, 6: 75, 7: 75, 8: 150}
    assert _histogram(log, "critic", "clip") == {1: 76, 2: 75, 3: 75, 4: 75, 5: 75, 6: 75, 7: 75, 8: 75}


def test_corrected_loop_counts_of_the_default_preset():
    # configs/reward_forcing.yaml: 160 optimiser steps, generator on every 5th: 32 generator and 160 critic steps,
    # each on all 8 micro-batches, clipped once, on the full sum
    log = _released_run_loop(optimiser_step, 160)
    assert _histogram(log, "generator", "step") == _histogram(log, "generator", "clip") == {8: 32}
    assert _histogram(log, "critic", "step") == _histogram(log, "critic", "clip") == {8: 160}
