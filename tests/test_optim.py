import pytest
import torch

from ds_bilevel.levels import Level
from ds_bilevel.optim import LevelAdamW, build_param_groups, schedule_lambda


def test_step_moves_only_the_active_level():
    inner, outer = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    groups = build_param_groups({Level.INNER: [inner], Level.OUTER: [outer]},
                                lr={Level.INNER: 0.1, Level.OUTER: 0.1},
                                weight_decay={Level.INNER: 0.5, Level.OUTER: 0.5})
    optimizer = LevelAdamW(groups)
    (inner.sum() + outer.sum()).backward()
    optimizer.active_levels = {Level.INNER.value}
    optimizer.step()
    assert torch.equal(outer, torch.ones(2))  # neither the gradient nor the weight decay touched it
    assert outer not in optimizer.state or not optimizer.state[outer]  # no Adam moments either
    assert not torch.equal(inner, torch.ones(3))
    reference = torch.nn.Parameter(torch.ones(3))
    reference.grad = torch.ones(3)
    torch.optim.AdamW([reference], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(inner, reference)  # the active level is plain AdamW
    moved_inner = inner.detach().clone()
    optimizer.active_levels = {Level.OUTER.value}
    optimizer.step()
    assert torch.equal(inner, moved_inner) and not torch.equal(outer, torch.ones(2))
    assert len(optimizer.param_groups) == 2  # the filter is undone after each step


def test_schedules():
    linear = schedule_lambda("linear", total_steps=10, warmup_steps=2)
    assert [round(linear(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cosine = schedule_lambda("cosine", total_steps=10, warmup_steps=0)
    assert abs(cosine(5) - 0.5) < 1e-9 and cosine(10) < 1e-12
    assert schedule_lambda("constant", 10, 0)(9) == 1.0


def test_a_nonfinite_gradient_or_loss_skips_the_step_entirely():
    weights = torch.nn.Parameter(torch.ones(3))
    optimizer = LevelAdamW(build_param_groups({Level.INNER: [weights]}, lr={Level.INNER: 0.1},
                                              weight_decay={Level.INNER: 0.5}))
    optimizer.active_levels = {Level.INNER.value}
    weights.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    assert optimizer.skipped and torch.equal(weights, torch.ones(3)) and not optimizer.state[weights]
    weights.grad = torch.ones(3)
    optimizer.loss_is_finite = False  # the engine's verdict on the loss
    optimizer.step()
    assert optimizer.skipped and torch.equal(weights, torch.ones(3))
    optimizer.loss_is_finite = True
    optimizer.step()
    assert not optimizer.skipped and optimizer.state[weights]["step"] == 1  # the first real step


def test_hypergradients_read_the_rate_of_the_inner_step_just_taken():
    """Neumann's alpha and original DARTS's xi are the rate of the inner step the hypergradient
    differentiates through: after that step the scheduler already holds the next one, which at a
    linear schedule's last step is 0 (that outer step was first-order). The engine and the
    reference read ``last_lr``, which a resumed scheduler gives back from its step count."""
    from ds_bilevel.config import config_from_flat
    from ds_bilevel.preparation import batch_sources, prepare
    from ds_bilevel.reference import ReferenceBilevel
    from ds_bilevel.schedule import events, run_steps

    run = config_from_flat({"model_name_or_path": "builtin:micro-llama", "data.train_size": 48, "data.eval_size": 8,
                            "adapter.method": "bidora", "bilevel.hypergrad": "neumann", "max_steps": 3,
                            "micro_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 6e-3,
                            "warmup_ratio": 0.0, "adapter.target_modules": "q_proj", "output_dir": "unused"})
    data = prepare(run)
    reference = ReferenceBilevel(data.model, run)
    taken, read = [], []
    inner_step, rate = reference.inner_step, reference.inner_learning_rate
    reference.inner_step = lambda batch: (taken.append(reference.scheduler.get_lr(Level.INNER)), inner_step(batch))[1]
    reference.inner_learning_rate = lambda: (read.append(rate()), read[-1])[1]
    for _ in run_steps(reference, batch_sources(run, reference.mode, data, 0, 1), list(events(reference.mode, 3))):
        pass
    assert taken == pytest.approx([6e-3, 4e-3, 2e-3]) and read == pytest.approx(taken)  # linear decay over 3
    resumed = ReferenceBilevel(data.model, run).scheduler
    resumed.load_state_dict(reference.scheduler.state_dict())
    assert resumed.last_lr(Level.INNER) == pytest.approx(2e-3) and resumed.get_lr(Level.INNER) == 0.0
