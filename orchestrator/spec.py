"""The sweep spec: a YAML file validated by pydantic (unknown keys rejected) into a SweepSpec.

Errors become tasks.errors.InvalidInput naming the dotted field path and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.errors import InvalidInput

Dtype = Literal["float32", "float64", "bfloat16", "float16"]
PromptKind = Literal["repeat", "control", "text"]
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
MAX_EPS = 10_000  # eps values of one sweep (a list or a lattice range)


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1: `eps: [true]` must be an error, not eps = 1.
        if _holds_bool(v) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("numbers or names, not true/false")
        return v


class ModelEntry(_Strict):
    """One model of the sweep; `dtype` and `gpus_per_actor` override the sweep's for this model.

    `revisions` makes training checkpoints an axis: one model identity per revision (a hub
    branch, tag or commit in the local HF cache, or a subfolder of a model folder), planned
    as the name `NAME@REVISION`.
    """

    name: str = Field(min_length=1)
    dtype: Dtype | list[Dtype] | None = None
    revisions: list[str] | None = Field(default=None, min_length=1)
    # A model too large for one GPU is spread over several in one actor (device_map="auto").
    gpus_per_actor: float | None = Field(default=None, gt=0, le=16)

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_gpus(cls, v: float | None) -> float | None:
        return _check_gpus(v)

    @field_validator("revisions")
    @classmethod
    def _revisions(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for r in v:
            if not r.strip() or "@" in r or "/" in r:
                raise ValueError(f"revision {r!r}: a non-empty branch, tag or commit without '@' or '/'")
        if len(set(v)) != len(v):
            raise ValueError("revisions must not repeat")
        return v

    def names(self) -> list[str]:
        """The model names this entry plans: NAME, or NAME@REVISION for each revision."""
        return [self.name] if self.revisions is None else [f"{self.name}@{r}" for r in self.revisions]


def _check_gpus(v: float | None) -> float | None:
    if v is not None and v > 1 and v != int(v):
        raise ValueError("above 1, a whole number of GPUs (an actor spans whole GPUs); "
                         "below 1, a share of one GPU")
    return v


class PromptSpec(_Strict):
    """Prompts: `BOS + s + s` (repeat), `BOS + s + s'` (control), or windows of a text file."""

    kinds: list[PromptKind] = Field(default=["repeat", "control"], min_length=1)
    T: int = Field(ge=2, le=100_000)
    count: int = Field(ge=1, le=100_000)
    seed: int = Field(default=0, ge=0)
    text_file: str | None = None

    @model_validator(mode="after")
    def _text_needs_file(self) -> PromptSpec:
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError("kinds must not repeat a kind")
        if "text" in self.kinds and not self.text_file:
            raise ValueError("kind 'text' needs prompts.text_file (a UTF-8 text file)")
        if self.text_file and "text" not in self.kinds:
            raise ValueError("prompts.text_file is given but 'text' is not in prompts.kinds")
        return self


class PositionRange(_Strict):
    """Positions start, start+step, ... < stop (Python's range)."""

    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _non_empty(self) -> PositionRange:
        if self.stop <= self.start:
            raise ValueError("range is empty: stop must be > start")
        return self


class LogEps(_Strict):
    """eps = 10**(k / per_decade) for every integer k with start <= eps <= stop.

    Values sit on a fixed lattice, so widening the range yields the very same floats for
    the old values (their unit keys do not change).
    """

    start: float = Field(gt=0)
    stop: float = Field(gt=0)
    per_decade: int = Field(default=2, ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> LogEps:
        if not (math.isfinite(self.start) and math.isfinite(self.stop)):
            raise ValueError("start and stop must be finite")
        if self.stop < self.start:
            raise ValueError("stop must be >= start")
        n = (math.log10(self.stop) - math.log10(self.start)) * self.per_decade + 1
        if n > MAX_EPS:
            raise ValueError(f"at most {MAX_EPS} eps values; this range has {int(n)}")
        if not log_lattice(self.start, self.stop, self.per_decade):
            raise ValueError("no lattice point 10**(k/per_decade) lies in [start, stop]")
        return self


class DirectionSpec(_Strict):
    """Directions u: `random` (Gaussian, normalised, seeded) or explicit unit rows of a .npy file."""

    family: Literal["random", "file"] = "random"
    count: int | None = Field(default=None, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0)
    file: str | None = None

    @model_validator(mode="after")
    def _family_fields(self) -> DirectionSpec:
        if self.family == "file" and not self.file:
            raise ValueError("family 'file' needs directions.file (a .npy array [count, d_model])")
        if self.family == "random" and self.file:
            raise ValueError("directions.file is only allowed with family 'file'")
        return self


class RecordSpec(_Strict):
    """Which response levels l and positions i to keep (None: all l >= lp, all i >= j).

    `heads: true` also records per-head responses (a head_responses table per unit) at the
    offsets i - j that matter: 0, 1..3, T-1, T, plus `head_offsets` ('all': every i >= j).
    """

    layers: list[int] | None = None
    positions: list[int] | None = None
    heads: bool = False
    head_offsets: list[int] | Literal["all"] | None = None

    @model_validator(mode="after")
    def _offsets_need_heads(self) -> RecordSpec:
        if self.head_offsets is not None and not self.heads:
            raise ValueError("record.head_offsets is given but record.heads is false")
        if isinstance(self.head_offsets, list) and (
                not self.head_offsets or min(self.head_offsets) < 0):
            raise ValueError("record.head_offsets: a non-empty list of offsets i - j >= 0, or 'all'")
        return self

    def head_offset_list(self, T: int) -> list[int] | None:
        """The offsets i - j kept for heads (None: all); only meaningful with heads on."""
        from tasks.heads import default_offsets

        if self.head_offsets == "all":
            return None
        return sorted(set(default_offsets(T)) | set(self.head_offsets or []))

    def key_params(self, T: int) -> dict[str, Any]:
        """What of `record` enters a unit's key; heads only when on, so that sweeps without
        them keep the keys they always had."""
        out: dict[str, Any] = {"layers": self.layers, "positions": self.positions}
        if self.heads:
            out["heads"] = {"offsets": self.head_offset_list(T)}
        return out

    @field_validator("layers", "positions")
    @classmethod
    def _non_empty(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("must be a non-empty list or null (all)")
            if min(v) < 0:
                raise ValueError("entries must be >= 0")
        return v


class Resources(_Strict):
    """Ray resources: one actor per `gpus_per_actor` GPUs, else CPU actors when allowed."""

    gpus_per_actor: float = Field(default=1.0, gt=0, le=16)
    actors_per_node: int | None = Field(default=None, ge=1, le=1024)
    cpu_fallback: bool = True
    cpu_actors: int = Field(default=1, ge=1, le=1024)
    cpus_per_actor: int | None = Field(default=None, ge=1, le=1024)
    max_actors: int | None = Field(default=None, ge=1, le=100_000)

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        return _check_gpus(v)


class EngineSpec(_Strict):
    """How the engine computes, never what: `fused_kl` picks the KL kernel (tasks.kl):
    "auto" compiles it once a long run has done enough KL work to pay for it, "on" at start
    (eager if its accuracy gate fails), "off" never."""

    fused_kl: Literal["auto", "on", "off"] = "auto"


class LeaseSpec(_Strict):
    """The database queue: lease time-to-live, heartbeat period, attempts before `failed`,
    and units a worker leases at once (`batch`)."""

    ttl_s: float = Field(default=60.0, gt=0, le=86_400)
    heartbeat_s: float = Field(default=10.0, gt=0, le=3_600)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Units a worker leases and computes together: those differing only in lp and positions
    # share engine calls, so their positions share passes (tasks.run_units); each is still
    # written and completed on its own. 1: one unit at a time. Larger batches make fewer,
    # longer leases, so near a sweep's end fewer workers share the last units.
    batch: int = Field(default=8, ge=1, le=1_000)

    @model_validator(mode="after")
    def _heartbeat_below_ttl(self) -> LeaseSpec:
        if self.heartbeat_s >= self.ttl_s:
            raise ValueError("heartbeat_s must be < ttl_s, or leases expire while a unit runs")
        return self


class SweepSpec(_Strict):
    """A whole sweep: models x dtypes x prompts x layers x positions x eps x directions."""

    name: str = Field(pattern=NAME_RE)
    models: list[Union[str, ModelEntry]] = Field(min_length=1)  # noqa: UP007 (pydantic union order)
    dtype: Dtype | list[Dtype] = "float32"
    prompts: PromptSpec
    layers: list[int] | Literal["all"] = Field(description="perturbation layers lp")
    positions: list[int] | PositionRange | Literal["copy1", "copy2", "all"] = "copy1"
    # Before eps: an empty eps list is valid only with the linear response on.
    linear: bool = True
    eps: list[float] | LogEps = Field(description="eps values or a log lattice")
    directions: DirectionSpec = DirectionSpec()
    record: RecordSpec = RecordSpec()
    cells_per_unit: int = Field(default=256, ge=1, le=10_000_000)
    resources: Resources = Resources()
    lease: LeaseSpec = LeaseSpec()
    engine: EngineSpec = EngineSpec()
    output: str = "unisweep-out"  # a folder, or s3:// gs:// abfs:// (db.storage)
    database: str | None = None

    @model_validator(mode="after")
    def _head_offsets_fit_prompt(self) -> SweepSpec:
        if isinstance(self.record.head_offsets, list):
            n = 2 * self.prompts.T + 1
            if max(self.record.head_offsets) >= n:
                raise ValueError(f"record.head_offsets: offsets i - j in 0..{n - 1} (2T+1 = {n})")
        return self

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("must be a non-empty list of layers or 'all'")
            if min(v) < 0:
                raise ValueError("layers must be >= 0")
            if len(set(v)) != len(v):
                raise ValueError("layers must not repeat")
        return v

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must be a non-empty list, a range {start, stop, step}, "
                                 "'copy1', 'copy2' or 'all'")
            if min(v) < 0:
                raise ValueError("positions must be >= 0")
            if len(set(v)) != len(v):
                raise ValueError("positions must not repeat")
        return v

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list):
            if not v and not info.data.get("linear", True):
                raise ValueError("a non-empty list of eps > 0 or {start, stop, per_decade} "
                                 "(an empty list only with linear: true)")
            if len(v) > MAX_EPS:
                raise ValueError(f"at most {MAX_EPS} eps values, got {len(v)}")
            for x in v:
                if not (math.isfinite(x) and x > 0):
                    raise ValueError(f"every eps must be finite and > 0, got {x}")
            if len({canonical_eps(x) for x in v}) != len(v):
                raise ValueError("eps values must not repeat")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[Any]) -> list[Any]:
        names = [m if isinstance(m, str) else m.name for m in v]
        if any(not n.strip() for n in names):
            raise ValueError("model names must be non-empty")
        return v

    @field_validator("positions", mode="after")
    @classmethod
    def _positions_fit_prompt(cls, v: Any, info: ValidationInfo) -> Any:
        prompts = info.data.get("prompts")
        if prompts is not None:
            n = 2 * prompts.T + 1
            top = max(_positions(v, prompts.T))
            if top >= n:
                raise ValueError(f"positions inside the prompt: 0..{n - 1} (length 2T+1 = {n}); "
                                 f"{top} is outside")
        return v

    @field_validator("record", mode="after")
    @classmethod
    def _record_fits_prompt(cls, v: RecordSpec, info: ValidationInfo) -> RecordSpec:
        prompts = info.data.get("prompts")
        if prompts is not None and v.positions is not None:
            n = 2 * prompts.T + 1
            if max(v.positions) >= n:
                raise ValueError(f"record.positions inside the prompt: 0..{n - 1} (2T+1 = {n})")
        return v

    # ---- resolved values (what the planner uses) ----

    def model_dtypes(self) -> list[tuple[str, str]]:
        """(model name, dtype) pairs in spec order, without repeats."""
        default = [self.dtype] if isinstance(self.dtype, str) else list(self.dtype)
        out: list[tuple[str, str]] = []
        for m in self.models:
            names, dts = ([m], default) if isinstance(m, str) else (m.names(), m.dtype or default)
            for name in names:
                for dt in [dts] if isinstance(dts, str) else dts:
                    if (name, dt) not in out:
                        out.append((name, dt))
        return out

    def gpus_per_actor(self, model: str) -> float:
        """GPUs one actor of `model` takes: the model's own setting, else resources'."""
        for m in self.models:
            if not isinstance(m, str) and model in (m.name, *m.names()) and m.gpus_per_actor is not None:
                return m.gpus_per_actor
        return self.resources.gpus_per_actor

    def position_list(self) -> list[int]:
        """Perturbed positions j, sorted."""
        return _positions(self.positions, self.prompts.T)

    def eps_list(self) -> list[float]:
        """eps values, canonical floats, sorted ascending."""
        if isinstance(self.eps, LogEps):
            return log_lattice(self.eps.start, self.eps.stop, self.eps.per_decade)
        return sorted(canonical_eps(x) for x in self.eps)

    def layer_list(self, n_layers: int) -> list[int]:
        """Perturbation layers lp for a model of n_layers blocks."""
        return list(range(n_layers)) if self.layers == "all" else sorted(self.layers)


def _holds_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v))


def _accepts_bool(annotation: Any) -> bool:
    return annotation is bool or any(_accepts_bool(a) for a in getattr(annotation, "__args__", ()))


def _positions(p: Any, T: int) -> list[int]:
    if p == "copy1":
        return list(range(1, T + 1))
    if p == "copy2":
        return list(range(T + 1, 2 * T + 1))
    if p == "all":
        return list(range(0, 2 * T + 1))
    if isinstance(p, PositionRange):
        return list(range(p.start, p.stop, p.step))
    return sorted(p)


def canonical_eps(x: float) -> float:
    """eps rounded to 12 significant digits, so 1e-3 typed or computed is the same float."""
    return float(f"{x:.12g}")


def log_lattice(start: float, stop: float, per_decade: int) -> list[float]:
    """10**(k/per_decade) for integer k, within [start, stop] (1e-9 relative slack)."""
    lo = math.ceil(math.log10(start) * per_decade - 1e-9)
    hi = math.floor(math.log10(stop) * per_decade + 1e-9)
    return [canonical_eps(10.0 ** (k / per_decade)) for k in range(lo, hi + 1)]


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names accepted at the spec location `loc` (for 'unknown key' messages)."""
    model: Any = SweepSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            # pydantic puts the union member's name into loc (e.g. 'ModelEntry').
            model = {"ModelEntry": ModelEntry, "PositionRange": PositionRange,
                     "LogEps": LogEps}.get(part, model)
            continue
        model = _model_in(field.annotation)
    return sorted(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


_UNION_TAGS = re.compile(r"^(list\[.*\]|literal\[.*\]|ModelEntry|PositionRange|LogEps|str|int|float|bool|"
                         r"function-after\[.*\])$")


def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        elif not _UNION_TAGS.match(str(p)):
            parts.append(str(p))
    return ".".join(parts) or "spec"


def _to_invalid(exc: ValidationError) -> InvalidInput:
    """Turn pydantic's errors into one InvalidInput that names the first field."""
    errs = exc.errors(include_url=False)

    def rank(e: dict[str, Any]) -> tuple[int, int]:
        # Our own checks and unknown keys say the most; among type errors of a union, the
        # deepest location is the member the user meant.
        own = e["type"] in ("value_error", "extra_forbidden")
        depth = len([p for p in e["loc"] if not _UNION_TAGS.match(str(p))])
        return (0 if own else 1, -depth)

    errs.sort(key=rank)
    first = errs[0]
    field = _dotted(first["loc"])
    got = first.get("input")
    if isinstance(got, dict):
        got = "{" + ", ".join(map(str, got)) + "}"
    if first["type"] == "extra_forbidden":
        allowed = "one of " + ", ".join(_allowed_keys(first["loc"]))
        return InvalidInput(field, allowed, got=got, detail="unknown key")
    if first["type"] == "value_error":
        allowed = first["msg"].removeprefix("Value error, ")
    else:
        # A union: say every accepted form, not only the first member's complaint.
        msgs = [e["msg"].removeprefix("Input should be ") for e in errs if _dotted(e["loc"]) == field]
        allowed = "input should be " + " | ".join(dict.fromkeys(msgs))
    others = sorted({_dotted(e["loc"]) for e in errs[1:]} - {field})
    detail = f"also check: {', '.join(others)}" if others else ""
    return InvalidInput(field, allowed, got=got, detail=detail)


def spec_from_dict(data: Any) -> SweepSpec:
    """Validate a mapping (parsed YAML) into a SweepSpec; InvalidInput on any error."""
    if not isinstance(data, dict):
        raise InvalidInput("spec", "a YAML mapping with keys " + ", ".join(SweepSpec.model_fields),
                           got=type(data).__name__)
    if isinstance(data.get("output"), str):
        # Before pydantic: its error would echo the raw value, and a URL may carry a secret.
        from db.storage import check_output

        data = {**data, "output": check_output(data["output"])}
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise _to_invalid(exc) from None


# Hostile-input caps: a real spec is a few hundred bytes; these stop a huge or
# self-expanding YAML before parsing or validation can take minutes or gigabytes.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000  # scalars and containers, YAML aliases counted each time used
MAX_LIST = 10_000  # entries of any list in a spec (eps, layers, positions, models)


class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML (libyaml when present) that refuses a key given twice in one mapping."""


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise InvalidInput(str(key), "each key once per mapping", got=f"line {line}",
                               detail=f"also given on line {seen[key]}")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def _check_size(data: Any, where: str) -> None:
    """Refuse a parsed spec with too many values (aliases counted at each use) or a long list."""
    todo, n = [data], 0
    while todo:
        v = todo.pop()
        n += 1
        if n > MAX_SPEC_VALUES:
            raise InvalidInput("spec", f"at most {MAX_SPEC_VALUES} values (YAML aliases count "
                               "at each use)", got=where)
        if isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, list):
            if len(v) > MAX_LIST:
                raise InvalidInput("spec", f"lists of at most {MAX_LIST} entries", got=where,
                                   detail=f"a list has {len(v)}")
            todo.extend(v)


def parse_spec_text(raw: bytes, where: str) -> Any:
    """Bytes of a spec file -> the parsed YAML, with size, encoding and duplicate-key checks."""
    if len(raw) > MAX_SPEC_BYTES:
        raise InvalidInput("spec", f"a YAML file of at most {MAX_SPEC_BYTES // 1024} KiB",
                           got=f"{len(raw)} bytes", detail=where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("spec", "a UTF-8 text file", got=where,
                           detail=f"byte {exc.start} is not UTF-8") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise InvalidInput("spec", "valid YAML", got=where, detail=str(exc).splitlines()[0]) from None
    _check_size(data, where)
    return data


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file; relative file paths in it resolve against its folder."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInput("spec", "an existing YAML file", got=str(path))
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise InvalidInput("spec", f"a YAML file of at most {MAX_SPEC_BYTES // 1024} KiB",
                               got=f"{size} bytes", detail=str(path))
        raw = p.read_bytes()
    except OSError as exc:
        raise InvalidInput("spec", "a readable YAML file", got=str(path), detail=exc.strerror or "") from None
    spec = spec_from_dict(parse_spec_text(raw, str(path)))
    return resolve_paths(spec, p.parent)


def resolve_paths(spec: SweepSpec, base: Path) -> SweepSpec:
    """Make the input files' paths absolute relative to `base` (the spec file's folder).

    Input files ship with the spec; `output` and `database` stay relative to the working
    directory, like any command line tool's output.
    """

    def absolute(s: str | None) -> str | None:
        if s is None or "://" in s:
            return s
        q = Path(s).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    upd: dict[str, Any] = {}
    if spec.prompts.text_file:
        upd["prompts"] = spec.prompts.model_copy(update={"text_file": absolute(spec.prompts.text_file)})
    if spec.directions.file:
        upd["directions"] = spec.directions.model_copy(update={"file": absolute(spec.directions.file)})
    return spec.model_copy(update=upd)
