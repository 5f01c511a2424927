"""Proxy for whether the rank tie-break (and the post-activation rank) helps: on the trained cpu-small baseline,
prune 55% of the MACs with the identity candidate (a = 1, b = 0: the rank control) under each filter property,
then the search's fitness (val CE after 20 SGD steps, lr 0.01, the cpu-small recipe's search) and val top-1.

Usage: python benchmarks/picpq_ranking.py [MODEL_FILE]   (default runs/base-r20/models/baseline.safetensors,
       the cpu-small baseline: tandem run recipes/fashion-mnist-picpq.yaml method=baseline --out runs/base-r20)
Prints one line per ranking (docs/picpq.md quotes them); about 3 minutes on one thread."""
import itertools, sys, torch
torch.set_num_threads(1)
from tandem.engine import load_model, Trainer, cross_entropy_objective, evaluate
from tandem.data import load_dataset, BatchLoader
from tandem.prune import ChannelGraph, ChannelPruner, apply_removal
from tandem.prune.criteria import HRank, break_ties_by_l1
from tandem.methods.picpq import candidate_removal
from tandem.recipes import TrainSpec

base, _ = load_model(sys.argv[1] if len(sys.argv) > 1 else "runs/base-r20/models/baseline.safetensors")
d = load_dataset("fashion-mnist", "../shared/data/fashion-mnist", val_fraction=0.1, seed=0, train_limit=20000)
train = BatchLoader(d.train, 128, shuffle=True, seed=0, mean=d.mean, std=d.std, drop_last=True)
val = BatchLoader(d.val, 256, mean=d.mean, std=d.std)
graph = ChannelGraph(base, torch.zeros(1, 1, 28, 28))
h = HRank(batches=6); h.prepare(graph, (x for x, _ in train))
raw, images = h.ranks, h.images
mods = dict(base.named_modules())
def bn_of(n):
    return {"stem.0": "stem.1"}.get(n, n[:-5] + ("bn1" if n.endswith("conv1") else "bn2"))
sums = {}
hooks = [mods[bn_of(n)].register_forward_hook(lambda m, i, o, n=n: sums.__setitem__(n, sums.get(n, 0) + torch.linalg.matrix_rank(o.relu()).sum(0))) for n in raw]
base.eval()
with torch.no_grad():
    for x, _ in itertools.islice(train, 6): base(x)
for hk in hooks: hk.remove()
relu = {n: (sums[n] / images).float() for n in raw}
fps = {"rank, ties by index": raw, "rank, ties by L1": break_ties_by_l1(raw, graph, images),
       "relu rank, ties by index": relu, "relu rank, ties by L1": break_ties_by_l1(relu, graph, images)}
cfg = TrainSpec(lr=0.01, weight_decay=5e-4, schedule="constant", epochs=1, progress=False, amp=False)
def cycle(loader):
    for e in itertools.count():
        loader.set_epoch(e); yield from loader
def fitness(removed, steps):
    net = apply_removal(graph, removed)
    torch.manual_seed(0)
    Trainer({"net": net}, cross_entropy_objective, cfg).train_steps(cycle(train), steps)
    r = evaluate(net, val)
    return r["loss"], r["top1"]
removals = {k: candidate_removal(graph, fp, {"a": dict.fromkeys(fp, 1.0), "b": dict.fromkeys(fp, 0.0)}, 0.45, 0.9)
            for k, fp in fps.items()}
removals["filter L1 (layer scope; the L1 controls)"] = ChannelPruner(base, torch.zeros(1, 1, 28, 28), "l1", macs_target=0.45).plan()
ref = removals["rank, ties by index"]
for k, rem in removals.items():
    same = sum(len(set(rem.get(g, torch.tensor([])).tolist()) & set(ref.get(g, torch.tensor([])).tolist())) for g in ref)
    total = sum(len(v) for v in rem.values())
    out = [fitness(rem, s) for s in (20, 200)]
    print(f"{k:<42} removed {total:>3} ({same:>3} as index ties) | 20 steps: CE {out[0][0]:.3f} top1 {out[0][1]:.2f} | 200 steps: CE {out[1][0]:.3f} top1 {out[1][1]:.2f}")
