"""The update schedule on a toy: which network steps on which micro-step, with what gradient."""
import pytest
import torch

from reward_forcing.training.schedule import TrainingDiverged, Updater, is_generator_step, optimiser_step


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
