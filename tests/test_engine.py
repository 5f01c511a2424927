import math

import pytest
import torch

from tandem.data import BatchLoader, load_dataset
from tandem.engine import Trainer, TrainingDiverged, cross_entropy_objective, evaluate, lr_factor
from tandem.engine.checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from tandem.errors import CheckpointError, TandemError
from tandem.models import create_model
from tandem.recipes import TrainSpec


def cfg(**kw):
    base = dict(epochs=3, batch_size=32, lr=0.05, progress=False)
    base.update(kw)
    return TrainSpec(**base)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_classes=4, channels=1, image_size=8, train_size=256, test_size=64,
                        val_fraction=0.25)


def loaders(d, batch=32):
    train = BatchLoader(d.train, batch, shuffle=True, mean=d.mean, std=d.std, seed=0, drop_last=True)
    val = BatchLoader(d.val, 256, mean=d.mean, std=d.std)
    return train, val


def make_net(seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=4, in_channels=1)


def test_lr_schedules():
    c = cfg(epochs=10, warmup_epochs=1, schedule="cosine")
    assert lr_factor(0, 10, c) == pytest.approx(0.1)          # warm-up climbs linearly per step
    assert lr_factor(9, 10, c) == pytest.approx(1.0)
    assert lr_factor(10, 10, c) == pytest.approx(1.0)          # cosine starts at 1 after warm-up
    assert lr_factor(55, 10, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 10, c) == pytest.approx(0.0, abs=1e-9)
    m = cfg(epochs=10, schedule="multistep", milestones=[3, 6], gamma=0.1)
    assert lr_factor(29, 10, m) == 1.0 and lr_factor(30, 10, m) == pytest.approx(0.1)
    assert lr_factor(60, 10, m) == pytest.approx(0.01)


def test_trainer_learns_and_selects_best_by_validation(data, tmp_path):
    net = make_net()
    train, val = loaders(data)
    before = evaluate(net, val)["top1"]
    trainer = Trainer({"net": net}, cross_entropy_objective, cfg(epochs=4), ckpt_path=tmp_path / "last.ckpt")
    best = trainer.fit(train, val)
    after = evaluate(net, val)["top1"]
    assert after > 70 and after > before + 20     # chance is 25 %
    vals = [h["val_top1/net"] for h in trainer.history]
    assert best["net"]["val_top1"] == max(vals) == pytest.approx(after)
    assert best["net"]["epoch"] == vals.index(max(vals)) + 1
    assert load_checkpoint(tmp_path / "last.ckpt")["epoch"] == 4


class StopAt:
    """Simulates a kill in the middle of an epoch."""
    def __init__(self, step):
        self.step = step

    def after_step(self, trainer):
        if trainer.step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path):
    train, val = loaders(data)
    full = make_net()
    Trainer({"net": full}, cross_entropy_objective, cfg(), ckpt_path=tmp_path / "a.ckpt").fit(train, val)

    steps_per_epoch = len(train)
    net = make_net()
    t = Trainer({"net": net}, cross_entropy_objective, cfg(), ckpt_path=tmp_path / "b.ckpt",
                callbacks=[StopAt(2 * steps_per_epoch + 2)])
    with pytest.raises(KeyboardInterrupt):
        t.fit(train, val)
    assert load_checkpoint(tmp_path / "b.ckpt")["epoch"] == 2

    resumed = make_net(seed=123)        # different init: everything must come from the checkpoint
    t2 = Trainer({"net": resumed}, cross_entropy_objective, cfg(), ckpt_path=tmp_path / "b.ckpt")
    t2.fit(train, val, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_nan_loss_stops_with_epoch_and_step(data, tmp_path):
    train, val = loaders(data)

    def exploding(outputs, y, x):
        loss = cross_entropy_objective(outputs, y, x)["ce/net"]
        return {"loss": loss * float("nan")}

    t = Trainer({"net": make_net()}, exploding, cfg(), ckpt_path=tmp_path / "c.ckpt")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1"):
        t.fit(train, val)


def test_two_networks_each_get_their_own_optimizer(data):
    train, val = loaders(data)
    a, b = make_net(0), make_net(1)
    t = Trainer({"a": a, "b": b}, cross_entropy_objective, cfg(epochs=1))
    t.fit(train, val)
    assert set(t.optimizers) == {"a", "b"}
    assert t.optimizers["a"].param_groups[0]["params"][0] is next(a.parameters())


def test_frozen_teacher_is_not_updated(data):
    train, val = loaders(data)
    teacher = make_net(5)
    before = [p.clone() for p in teacher.parameters()]

    def kd(outputs, y, x):
        assert not outputs["teacher"].requires_grad and not teacher.training   # eval, no grad while fitting
        return cross_entropy_objective({"net": outputs["net"]}, y, x)

    Trainer({"net": make_net()}, kd, cfg(epochs=1), frozen={"teacher": teacher}).fit(train, val)
    assert all(torch.equal(p, q) for p, q in zip(before, teacher.parameters()))
    # given back as it came, so a later stage can train it (or a copy of it)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_checkpoint_errors_name_the_file(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bogus.ckpt"):
        load_checkpoint(bogus)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "x.ckpt"
    save_checkpoint({"epoch": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint({"epoch": 2, "bad": Boom()}, path)
    assert load_checkpoint(path)["epoch"] == 1                     # the old file survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]      # no temporary left behind


def test_model_file_rebuilds_pruned_architecture(tmp_path):
    net = create_model("resnet20", num_classes=10, widths=[16] + [8, 16] * 3 + [12, 32] * 3 + [20, 64] * 3)
    net.eval()
    path = tmp_path / "m.safetensors"
    save_model(net, path, dataset={"name": "synthetic"})
    again, meta = load_model(path)
    again.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(x), again(x))
    assert meta["dataset"] == {"name": "synthetic"}


def test_loading_weights_of_another_architecture_fails_clearly(tmp_path):
    from tandem.engine.checkpoint import load_state, read_model_file
    path = tmp_path / "r20.safetensors"
    save_model(create_model("resnet20"), path)
    state, _ = read_model_file(path)
    with pytest.raises(CheckpointError, match="r20.safetensors holds weights of another architecture"):
        load_state(create_model("resnet32"), state, str(path))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(junk)


def test_sequential_updates_recompute_predictions(data):
    """In sequential mode the second network's target comes from the already-updated first one."""
    from tandem.distill import mutual_losses
    train, val = loaders(data)
    seen = []

    def objective(outputs, y, x):
        seen.append({n: o.detach().clone() for n, o in outputs.items()})
        return mutual_losses(outputs, y)

    a, b = make_net(0), make_net(1)
    t = Trainer({"a": a, "b": b}, objective, cfg(epochs=1), update="sequential")
    t.fit(train, val)
    assert len(seen) == 2 * len(train)                       # one objective call per network per step
    assert not torch.equal(seen[0]["a"], seen[1]["a"])       # a was updated before b's turn
    assert torch.equal(seen[0]["b"], seen[1]["b"])           # b not yet: same predictions


def test_target_only_forward_leaves_bn_running_stats_alone():
    from tandem.engine.trainer import _no_grad_call
    net = make_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _no_grad_call(net, torch.randn(4, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net(torch.randn(4, 1, 8, 8))
    assert not all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_sequential_update_rejects_unnamed_terms(data):
    from tandem.errors import TandemError
    train, val = loaders(data)
    t = Trainer({"a": make_net(0), "b": make_net(1)}, lambda o, y, x: {"loss": sum(v.sum() for v in o.values())},
                cfg(epochs=1), update="sequential")
    with pytest.raises(TandemError, match="no loss term for network 'a'"):
        t.fit(train, val)


def test_resuming_from_a_checkpoint_of_another_architecture_names_the_file(data, tmp_path):
    train, val = loaders(data)
    ckpt = tmp_path / "last.ckpt"
    Trainer({"net": make_net()}, cross_entropy_objective, cfg(epochs=1), ckpt_path=ckpt).fit(train, val)
    other = create_model("small_cnn", num_classes=4, in_channels=1, widths=[8, 16, 32])
    t = Trainer({"net": other}, cross_entropy_objective, cfg(epochs=2), ckpt_path=ckpt)
    with pytest.raises(CheckpointError, match=r"last.ckpt holds weights of another architecture"):
        t.fit(train, val, resume=True)


def test_no_decay_leaves_those_parameter_categories_undecayed():
    from tandem.engine.optim import build_optimizer, parameter_groups
    from tandem.quant import quantize_
    net = quantize_(make_net(), method="pact", w_bits=4, a_bits=4)   # PACT's alpha: a quantizer parameter
    c = cfg(weight_decay=0.1, momentum=0.0, no_decay=["bn", "bias", "quantizer"])
    groups = parameter_groups(net, c, {"weight": {"lr": 0.5}})
    assert {g["name"] for g in groups} == {"weight", "bias", "bn", "quantizer"}
    assert [n for n, _ in net.named_parameters() if n.endswith("alpha")]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(groups, c)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)        # only weight decay moves a parameter
    opt.step()
    for n, p in net.named_parameters():
        moved = not torch.equal(p, before[n])
        kind = next(g["name"] for g in groups if any(q is p for q in g["params"]))
        assert moved == (kind == "weight"), (n, kind)
        if kind == "weight":   # decayed by lr 0.5 (the method's option) * wd 0.1
            torch.testing.assert_close(p, before[n] * (1 - 0.05))


class _Zeroer:
    """A stateful callback: remembers, per epoch, a value that depends on the weights then."""

    def __init__(self, net):
        self.net, self.seen = net, {}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]

    def on_epoch_end(self, trainer, epoch):
        self.seen[epoch] = next(self.net.parameters()).detach().sum().clone()


def test_callback_state_is_checkpointed_and_resumed(data, tmp_path):
    from tandem.prune import ChannelPruner, SoftPruning
    train, val = loaders(data)
    x = next(iter(train))[0][:1]

    def run(net, ckpt, extra=(), resume=False):
        soft = SoftPruning(ChannelPruner(net, x, "l1", ratio=0.5))
        zeroer = _Zeroer(net)
        t = Trainer({"net": net}, cross_entropy_objective, cfg(), ckpt_path=ckpt, callbacks=[soft, zeroer, *extra])
        t.fit(train, val, resume=resume)
        return soft, zeroer

    full_soft, full_zeroer = run(make_net(), tmp_path / "a.ckpt")
    with pytest.raises(KeyboardInterrupt):
        run(make_net(), tmp_path / "b.ckpt", extra=[StopAt(2 * len(train) + 1)])
    soft, zeroer = run(make_net(seed=5), tmp_path / "b.ckpt", resume=True)
    assert sorted(soft.by_epoch) == sorted(full_soft.by_epoch) == [1, 2, 3]
    for e in (1, 2, 3):
        assert {k: v.tolist() for k, v in soft.by_epoch[e].items()} == \
            {k: v.tolist() for k, v in full_soft.by_epoch[e].items()}
        assert torch.equal(zeroer.seen[e], full_zeroer.seen[e])
    assert soft.history == full_soft.history


@pytest.mark.parametrize("amp,channels_last", [("bf16", False), (True, True), ("bf16", True)])
def test_bf16_autocast_and_channels_last_reach_the_convs(amp, channels_last):
    """train.amp bf16 runs the convs in bf16 on a CPU with bf16 instructions (refused on one
    without); train.channels_last gives them NHWC inputs; training still lowers the loss."""
    import tandem
    from tandem.latency import cpu_flags
    from tandem.recipes import TrainSpec
    if amp == "bf16" and not {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
        with pytest.raises(TandemError, match="no bf16 instructions"):
            Trainer({"n": tandem.create_model("small_cnn", num_classes=10, in_channels=1)}, cross_entropy_objective,
                    TrainSpec(epochs=1, amp="bf16", progress=False))
        return
    torch.manual_seed(0)
    net = tandem.create_model("small_cnn", num_classes=10, in_channels=1)
    seen = []
    net.features[1][0].register_forward_hook(lambda m, i, o: seen.append(
        (o.dtype, i[0].is_contiguous(memory_format=torch.channels_last))))
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]

    class Loader(list):
        def set_epoch(self, epoch):
            pass
    cfg = TrainSpec(epochs=3, batch_size=32, lr=0.05, amp=amp, channels_last=channels_last, progress=False)
    trainer = Trainer({"n": net}, cross_entropy_objective, cfg)
    trainer.fit(Loader(batches))
    assert seen[0] == (torch.bfloat16 if amp == "bf16" else torch.float32, channels_last)
    losses = [h["ce/n"] for h in trainer.history if "ce/n" in h]
    assert losses[-1] < losses[0], losses


def test_eval_mode_gives_every_module_its_own_mode_back():
    from tandem.modes import eval_mode

    net = create_model("small_cnn", in_channels=1).train()
    frozen = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()
    before = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before and not frozen.training
    with pytest.raises(RuntimeError):
        with eval_mode(net):
            raise RuntimeError("a failed pass")
    assert [m.training for m in net.modules()] == before
    evaluate(net, [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))])
    assert [m.training for m in net.modules()] == before
