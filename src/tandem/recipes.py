"""Recipes: YAML experiment descriptions, validated on load, with `key=value` overrides.

Every mistake becomes one `RecipeError` line that names the key, the value given and what is
allowed; nothing is created on disk before a recipe validates.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, one_of
from .fields import ArchSpec, Named, Section, StageMilestones  # noqa: F401  (re-exported: tandem.recipes.ArchSpec)


class ModelSpec(ArchSpec):
    checkpoint: Optional[str] = None   # trained weights to start from: a tandem model file or a plain state dict


class DatasetSpec(Named):
    name: str = "digits"
    root: Optional[str] = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # the validation split is drawn by this seed, not the run's: runs of several seeds (and a
    # baseline shared by them) all select epochs on the same held-out images, never on images
    # another seed's baseline trained on
    split_seed: int = Field(0, ge=0)
    train_limit: Optional[int] = Field(None, ge=10)   # a fixed stratified subset of the training set
    test_limit: Optional[int] = Field(None, ge=10)    # ... and of the test set (cpu-small runs)
    # None: the dataset's default augmentation; false: none; true: insist on it (refused for a
    # dataset whose augmentation is off, e.g. fashion-mnist without options.crop_padding / hflip)
    augment: Optional[bool] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from .data import list_datasets
        return one_of(v, list_datasets(), "dataset")


class TrainSpec(Section):
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(64, ge=1)
    # 256: on CPU a ResNet-56 evaluates 2.2x faster in batches of 256 than of 1024 (cache); raise it on a GPU
    eval_batch_size: int = Field(256, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    # parameter categories trained without weight decay (engine/optim.py): any of
    # bn (BatchNorm scale and shift), bias, quantizer (LSQ steps, PACT alpha, ...), gate
    no_decay: list[Literal["bn", "bias", "quantizer", "gate"]] = Field(default_factory=list)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[float] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    # autocast: true = bf16 on CUDA (CPU stays float32, as before); 'bf16' = bf16 on CUDA and on a
    # CPU with bf16 instructions (avx512_bf16 or amx_bf16; refused on one without); false = off
    amp: Union[bool, Literal["bf16"]] = True
    channels_last: bool = False   # NHWC tensors for the convs (the oneDNN layout on CPU)
    compile: bool = False         # torch.compile each trained network (nn.Module.compile, in place)
    sync_bn: bool = True       # SyncBatchNorm under multi-GPU DDP (CUDA only; CPU ranks keep per-rank BN)
    progress: bool = True
    threads: Optional[int] = Field(None, ge=1)   # torch intra-op threads per process (None: torch's default)

    def for_stage(self, epochs: Optional[int] = None, lr: Optional[float] = None) -> "TrainSpec":
        """This schedule with a stage's own epochs / lr where the method's section gives them."""
        return self.model_copy(update={k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None})

    def multistep(self, epochs: int, lr: float, milestones: list[float], gamma: float = 0.1,
                  **update) -> "TrainSpec":
        """A stage's own step schedule (methods' fine-tunes): `milestones` are fractions of
        `epochs`, no warm-up; `update` sets other fields (weight_decay, nesterov, ...)."""
        return self.model_copy(update={"epochs": epochs, "lr": lr, "schedule": "multistep", "gamma": gamma,
                                       "milestones": [m * epochs for m in milestones], "warmup_epochs": 0.0,
                                       **update})

    @model_validator(mode="after")
    def _milestones_in_range(self):
        bad = [m for m in self.milestones if not 0 < m < self.epochs + 1]
        if bad:
            raise ValueError(f"milestones {bad} must lie within 0 < m <= epochs ({self.epochs})")
        return self


class ReportSpec(Section):
    """What each results row measures beyond accuracy and counted cost, and what the report
    ranks by. `latency`: every row's measured inference latency (tandem/latency.py: CPU,
    batch 1 and `latency_batch`, eager and onnxruntime); `cost`: what the verdict's Pareto front
    and the plot's first panel use (bops, macs, or latency: onnxruntime at `latency_batch`,
    eager where a model does not export)."""
    latency: bool = True
    latency_batch: int = Field(32, ge=1)
    cost: Literal["bops", "macs", "latency"] = "bops"

    @model_validator(mode="after")
    def _latency_measured(self):
        if self.cost == "latency" and not self.latency:
            raise ValueError("cost 'latency' needs latency: true (nothing would be measured to rank by)")
        return self


DEFAULT_JOB = ["independent", "mutual", "pqkd"]
# The default job's compression, strong enough that its rows differ by more than the noise of
# digits' 359 test images (about 0.4 points of standard error at 99%): P keeps 6% of the MACs,
# Q and pqkd use 2-bit weights and activations in every layer. A recipe file starts from the
# sections' own defaults instead (prune: half the MACs; quant: LSQ W4A4, first/last 8 bits).
DEFAULT_JOB_SECTIONS = {"prune": {"criterion": "l1", "macs_target": 0.06},
                        "quant": {"method": "lsq", "w_bits": 2, "a_bits": 2, "first_last": "same"}}


def method_sections() -> dict[str, type[BaseModel]]:
    """{section name: its pydantic model}: the sections the registered methods read, each
    declared in its method's `register_method(name, sections={...})`."""
    from .methods import SECTIONS
    return dict(SECTIONS.items())


class Recipe(Section):
    """The default values are the default job: the small CNN on scikit-learn's digits, trained,
    then pruned and quantized peers trained alone and by mutual learning, then pqkd. ``method``
    is one method or a list run in turn on one run context (one baseline, one report).

    Besides the fields below, a recipe holds the sections its methods own (``recipe.prune``,
    ``recipe.pdd``, ...; None when absent), validated by the model each method registered."""
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: Optional[str] = None
    method: Union[str, list[str]] = Field(default_factory=lambda: list(DEFAULT_JOB))
    protocol: Literal["cpu-small", "cpu-medium", "paper", "smoke"] = "cpu-small"
    seed: int = Field(0, ge=0)
    device: str = "auto"
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    @model_validator(mode="after")
    def _method_sections(self):
        known = method_sections()
        extra = self.__pydantic_extra__
        for key, value in list(extra.items()):
            if key not in known:
                allowed = [*type(self).model_fields, *known]
                raise RecipeError(f"recipe error: unknown key '{key}'; allowed here: {', '.join(allowed)}")
            if value is not None and not isinstance(value, known[key]):
                try:
                    extra[key] = known[key].model_validate(value)
                except ValidationError as exc:
                    raise RecipeError(" ".join(_format_error(exc, value, prefix=(key,)).split())) from None
        from .methods import list_methods, sections_used
        used = sections_used(self.methods)
        for key, value in extra.items():
            if value is not None and key not in used:
                readers = sections_used(list_methods()).get(key, [])
                raise RecipeError(f"recipe error: {key}: no method of this recipe ({', '.join(self.methods)}) reads "
                                  f"it, so it would have no effect (read by: {', '.join(readers) or 'none'}); drop it")
        for key in used:   # what ran is what the record says: the defaults of every section read
            if extra.get(key) is None:
                extra[key] = known[key]()
        ordered = {key: extra.get(key) for key in known}   # one order, however the file listed them
        extra.clear()
        extra.update(ordered)
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        from .methods import list_methods
        if isinstance(v, str):
            return one_of(v, list_methods(), "method")
        if not v:
            raise ValueError("give a method or a non-empty list of methods")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a method twice")
        return [one_of(m, list_methods(), "method") for m in v]

    @property
    def methods(self) -> list[str]:
        """The methods to run, in order."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N")
        return v


def _allowed_keys(model_cls, loc) -> list[str]:
    """The field names allowed at the parent of `loc` (for 'unknown key' errors)."""
    cls = model_cls
    sections = method_sections()
    if model_cls is Recipe and loc and loc[0] in sections:
        cls, loc = sections[loc[0]], loc[1:]
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # Optional[Section]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _format_error(exc: ValidationError, raw: dict, prefix: tuple = ()) -> str:
    err = exc.errors()[0]
    loc = prefix + tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
    key = ".".join(str(p) for p in loc) or "(recipe)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Recipe, loc)
        return f"recipe error: unknown key '{key}'; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"recipe error: '{key}' is required"
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    if isinstance(value, dict) and len(str(value)) > 80:
        return f"recipe error: {key}: {msg}"   # a section's own check: its message names the keys
    return f"recipe error: {key} = {value!r}: {msg}"


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, str) and p in ("model", "dataset"):
            nxt = {"name": nxt}
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"recipe error: override {dotted}: '{p}' is not a section")
        node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise RecipeError(f"recipe error: override {item!r} is not of the form key=value (e.g. train.epochs=5)")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def read_yaml(path: str | Path) -> dict:
    """A recipe file; a bare name that is no file here is looked up among the recipes shipped
    with tandem (`tandem run digits-qat`), so an installed tandem runs them from any folder."""
    path = Path(path)
    if not path.is_file() and len(path.parts) == 1:
        bundled = Path(__file__).with_name("bundled_recipes") / path.name
        path = next((p for p in (bundled, bundled.with_name(f"{bundled.name}.yaml")) if p.is_file()), path)
    if not path.is_file():
        raise RecipeError(f"recipe error: recipe file {path} not found (`tandem list` names the bundled recipes)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise RecipeError(f"recipe error: {path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe error: {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def validate(raw: dict) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        # one line, whatever odd characters a key or value holds
        raise RecipeError(" ".join(_format_error(exc, raw).split())) from None
    from .methods import check_recipe
    check_recipe(recipe)   # each method's checks: settings valid alone but not together
    return recipe


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (None: the default job), apply `key=value` overrides, validate."""
    raw = read_yaml(path) if path else {k: dict(v) for k, v in DEFAULT_JOB_SECTIONS.items()}
    given = parse_overrides(list(overrides))
    for key, value in given:
        set_dotted(raw, key, value)
    overridden = {k.split(".")[0] for k, _ in given}
    if not path or "method" in overridden:
        # sections written for other methods (the default job's, or the file's before `method=`
        # replaced its methods) are dropped; a section given here for no method is refused
        from .methods import SECTIONS, sections_used
        methods = raw.get("method", DEFAULT_JOB)
        used = sections_used([methods] if isinstance(methods, str) else methods or [])
        for key in SECTIONS.names():
            if key not in used and key not in overridden:
                raw.pop(key, None)
    if not path and "prune.ratio" in dict(given) and isinstance(raw.get("prune"), dict):
        raw["prune"].pop("macs_target", None)   # the user's ratio replaces the default job's target
    recipe = validate(raw)
    if recipe.name is None:
        recipe.name = Path(path).stem if path else "default"
    return recipe


def changed_keys(saved: str | Path, recipe: Recipe) -> list[str]:
    """The dotted keys whose values differ between the recipe.yaml at `saved` and `recipe`
    (both validated, so fields added since the file was written do not count)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    try:
        a = flat(load_recipe(saved).model_dump(mode="json"))
    except RecipeError:
        return ["(the saved recipe no longer validates)"]
    b = flat(recipe.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def same_recipe(saved: str | Path, recipe: Recipe) -> bool:
    """Whether the recipe.yaml at `saved` describes `recipe`: both validated, so fields this
    version added (with their defaults) do not make an older run folder look different."""
    try:
        return dump_recipe(load_recipe(saved)) == dump_recipe(recipe)
    except RecipeError:
        return False


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, every section its methods read resolved (defaults included); the
    sections no method reads are left out."""
    data = recipe.model_dump(mode="json")
    for key in method_sections():
        if data.get(key) is None:
            data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)
