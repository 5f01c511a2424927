"""Regularized (aging) evolution (Real et al. 2019), as PIC-PQ / LeGR search their criteria
(methods.md §4.3): a population of `population` candidates; each new candidate is the best
(lowest fitness) of `sample` random members, mutated, and replaces the *oldest* member.

Every evaluated candidate and its fitness is appended to a JSON-lines log. The search is a pure
function of its seed and the fitness values, so after an interruption it replays the log
(candidates are regenerated from the seed and checked against it, fitnesses are read, not
recomputed) and continues where it stopped, ending at the same best candidate as a search never
interrupted.
"""
from __future__ import annotations

import json
import random
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from ..errors import TandemError

Candidate = dict   # JSON-serialisable


def regularized_evolution(fitness: Callable[[Candidate], float], initial: Callable[[random.Random, int], Candidate],
                          mutate: Callable[[random.Random, Candidate, int], Candidate], *, evaluations: int,
                          population: int, sample: int, seed: int = 0, log: Optional[Path] = None,
                          progress: bool = True) -> tuple[Candidate, float]:
    """Returns (best candidate, its fitness) over all evaluations.

    `initial(rng, i)` makes candidate i of the first `population` (i < population);
    `mutate(rng, parent, g)` makes candidate g from a parent. Both must use only `rng`."""
    if not 1 <= sample <= population <= evaluations:
        raise TandemError(f"evolution needs 1 <= sample ({sample}) <= population ({population}) "
                          f"<= evaluations ({evaluations})")
    done = _read_log(log) if log is not None else []
    rng = random.Random(seed)
    alive: deque = deque()
    best: tuple[Candidate, float] | None = None
    lines = progress and not sys.stderr.isatty()   # a log file gets a line per 5% instead of the bar
    bar = tqdm(total=evaluations, initial=0, desc="search", unit="cand", disable=not progress or lines,
               dynamic_ncols=True)
    try:
        for g in range(evaluations):
            if g < population:
                cand = initial(rng, g)
            else:
                parent = min(rng.sample(list(alive), sample), key=lambda m: m[1])
                cand = mutate(rng, parent[0], g)
            cand = json.loads(json.dumps(cand))   # what the log holds, so replay compares like with like
            if g < len(done):
                if done[g]["candidate"] != cand:
                    raise TandemError(f"search log {log} does not match this search at evaluation {g} "
                                      f"(another seed or setting wrote it); remove it to search again")
                fit = done[g]["fitness"]
            else:
                fit = float(fitness(cand))
                if log is not None:
                    with open(log, "a") as f:
                        f.write(json.dumps({"evaluation": g, "candidate": cand, "fitness": fit}) + "\n")
            alive.append((cand, fit))
            if len(alive) > population:
                alive.popleft()                    # aging: the oldest dies, however good
            if best is None or fit < best[1]:
                best = (cand, fit)
            bar.update()
            bar.set_postfix(best=f"{best[1]:.4f}", refresh=False)
            if lines and ((g + 1) % max(1, evaluations // 20) == 0 or g + 1 == evaluations):
                print(f"search: {g + 1}/{evaluations} candidates, best fitness {best[1]:.4f}", file=sys.stderr)
    finally:
        bar.close()
    return best


def _read_log(log: Path) -> list[dict]:
    """Complete lines only: a line cut by a kill is dropped (its candidate is evaluated again)."""
    if not log.exists():
        return []
    lines, out = log.read_text().splitlines(), []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(out) < len(lines):   # rewrite without the torn tail
        log.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out
