"""Device meshes, and the one rules table from logical axis names to mesh axes.

Every parameter and activation dimension has a logical name (`model.py`); the rules say which
mesh axes each name is split over. Changing the parallelism is changing the mesh spec and the
rules, never the model code:

    mesh = make_mesh("data=2,fsdp=2,tensor=2")     # -1 fills the remaining devices
    rules = resolve_rules("heads=,mlp=tensor")     # overrides on top of DEFAULT_RULES

A dimension that its mesh axes do not divide (14 heads on tensor=4) is sharded over the longest
prefix of those axes that does divide it, down to replicated, with one log line saying so.
Replicating is exact, so the result never changes, only where the work happens.

Any mesh a user builds works too, e.g. `jax.make_mesh((4, 2), ("fsdp", "tensor"))`: one of our
axes that the mesh lacks counts as size 1 (the rules naming it skip it), and rules may name any
axis of the mesh, so `rules="heads=model,kv_heads=model,mlp=model,vocab=model"` puts tensor
parallelism on a mesh axis called "model". A mesh axis that is none of ours and that no rule
names is an error (`check_mesh`), never a silent copy of everything over its devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger("qwen2_jax")

# Outermost to innermost: the innermost axis gets the closest devices (on TPU, the same ICI
# ring), so tensor parallelism, which communicates every layer, goes last; data parallelism,
# which communicates least, goes first and spans hosts.
# `sequence` splits long sequences (the `length` of activations) for prefill and training;
# attention then gathers keys and values over it (see `attention.attend`).
MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")
LOGICAL_AXES = ("batch", "length", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
                "expert", "layers", "cache_length")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# FSDP plus tensor parallelism. Order is priority: a mesh axis is used by at most one dimension
# of an array, and the earlier rule wins, so activations [batch, length, embed] are split over
# batch (data+fsdp) and parameters [vocab, embed] over vocab (tensor) and embed (fsdp).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("embed", ("fsdp",)),
    ("expert", ("expert",)),
    ("length", ("sequence",)),
    ("cache_length", ()),  # KV cache slots: whole on every device that holds the row
    ("head_dim", ()),
    ("layers", ()),
)

DEFAULT_MESH = "fsdp=-1"


class ShardingError(ValueError):
    """A mesh spec or rules override that cannot be used."""


def _assignments(text: str, what: str, form: str) -> Iterator[tuple[str, str, str]]:
    """(name, value, part) for each comma-separated NAME=VALUE part of `text`."""
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq:
            raise ShardingError(f"{what} {text!r}: {part!r} is not {form}")
        yield name.strip(), value.strip(), part


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """Axis sizes from "data=2,fsdp=-1,tensor=2": every axis of MESH_AXES, absent ones 1.

    One axis may be -1 and takes the devices the others leave. The sizes must use exactly
    `num_devices` devices: using fewer would silently idle the rest.
    """
    sizes: dict[str, int] = {}
    form = f"AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}"
    for name, value, part in _assignments(spec, "mesh spec", form):
        if name not in MESH_AXES:
            raise ShardingError(f"mesh spec {spec!r}: {part!r} is not {form}")
        if name in sizes:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ShardingError(f"mesh spec {spec!r}: size of {name!r} must be an integer or -1, "
                                f"got {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ShardingError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1")
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh spec {spec!r}: only one axis may be -1, got {fill}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ShardingError(f"mesh spec {spec!r}: the fixed axes use {fixed} devices, which "
                                f"does not divide the {num_devices} devices available")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(f"mesh spec {spec!r} uses {fixed} devices but {num_devices} are "
                            "available; change the sizes or let one axis be -1")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str = DEFAULT_MESH, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all MESH_AXES (unused ones of size 1) over `devices` (default: all devices
    of all processes), laid out by `jax.make_mesh` for the platform's topology."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def parse_rules(text: str) -> dict[str, tuple[str, ...]]:
    """Overrides from "heads=tensor,embed=,batch=data+fsdp": an empty value replicates."""
    return {name: tuple(a.strip() for a in value.split("+") if a.strip())
            for name, value, _ in _assignments(text, "rules", "LOGICAL=MESH_AXIS[+MESH_AXIS]")}


def resolve_rules(overrides: str | dict | Rules | None = None, mesh: Mesh | None = None) -> Rules:
    """DEFAULT_RULES with `overrides` (a parse_rules string, a {logical: mesh axes} dict, or a
    complete rules tuple) replacing the entries they name; new names are appended.

    Rules may name our MESH_AXES and, given `mesh`, any axis of it; with a mesh the result is
    also checked against it (`check_mesh`), so a mismatch fails here, before any work.
    """
    known = MESH_AXES if mesh is None else tuple(dict.fromkeys((*MESH_AXES, *mesh.axis_names)))
    if isinstance(overrides, str):
        overrides = parse_rules(overrides)
    if overrides is None:
        items, base = [], dict(DEFAULT_RULES)
    elif isinstance(overrides, (tuple, list)):
        items, base = [(name, axes) for name, axes in overrides], {}
    else:
        items, base = list(overrides.items()), dict(DEFAULT_RULES)
    for name, axes in items:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if name not in LOGICAL_AXES:
            raise ShardingError(f"rules: unknown logical axis {name!r}; known: "
                                f"{', '.join(LOGICAL_AXES)}")
        bad = [a for a in axes if a not in known]
        if bad:
            raise ShardingError(f"rules: {name!r} maps to unknown mesh axes {bad}; known: "
                                f"{', '.join(known)}")
        base[name] = axes
    rules = tuple(base.items())
    if mesh is not None:
        check_mesh(mesh, rules)
    return rules


@functools.cache
def check_mesh(mesh: Mesh, rules: Rules) -> None:
    """Raises ShardingError for a mesh axis of size > 1 that is none of ours and that no rule
    names: every array would be copied over its devices, which would all do the same work.

    (Our axes that the mesh lacks are fine: they count as size 1. So is an unknown axis of size
    1, which splits nothing.) Cached: `logical_spec` calls it for every array.
    """
    named = {a for _, axes in rules for a in axes}
    for axis, size in mesh.shape.items():
        if axis in MESH_AXES or axis in named or size == 1:
            continue
        raise ShardingError(
            f"mesh axis {axis!r} (size {size}) is none of ours ({', '.join(MESH_AXES)}) and no "
            f"rule names it, so every array would be copied over its {size} devices. Either "
            f"rename the mesh axis to one of ours (e.g. 'tensor' for tensor parallelism), or "
            f"pass rules that map logical axes onto it, the same to load, init, forward and "
            f"generate (Python rules=..., CLI --rules ...): e.g. "
            f"rules=\"heads={axis},kv_heads={axis},mlp={axis},vocab={axis}\" to split the "
            f"heads, mlp and vocab over it, or rules=\"batch=data+fsdp+{axis}\" to split the "
            f"batch")


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis of type Auto: what our shardings and constraints are built on.

    `jax.make_mesh` gives Explicit axes by default, under which every op must derive its output
    sharding from its inputs' types; some cannot (the embedding gather of vocab-sharded rows by
    batch-sharded ids raises ShardingTypeError). The model states where parameters and
    block-boundary activations go and leaves the rest to the compiler, which is what Auto axes
    mean. Converting the mesh rather than annotating every op keeps the model code unchanged;
    the devices and their layout stay the user's, so arrays are sharded exactly as asked.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


_LOGGED: set[tuple] = set()


def _log_once(name: str, size: int, wanted: tuple[str, ...], devices: int,
              used: tuple[str, ...]) -> None:
    """One line per distinct fallback, however many arrays and traces hit it."""
    key = (name, size, wanted, devices, used)
    if key not in _LOGGED:
        _LOGGED.add(key)
        kept = f"sharding it over {'+'.join(used)} only" if used else "replicating it"
        logger.info("sharding: %s of size %d does not divide over %s (%d devices); %s",
                    name, size, "+".join(wanted), devices, kept)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Rules) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dims have logical names `axes`.

    Rules are taken in order; a mesh axis serves at most one dimension. A dimension gets the
    longest prefix of its mesh axes whose device count divides it (logged when cut short).
    A mesh axis the mesh lacks counts as size 1.
    """
    check_mesh(mesh, rules)
    mesh_sizes = dict(mesh.shape)

    def devices(mesh_axes: tuple[str, ...]) -> int:
        return math.prod(mesh_sizes.get(a, 1) for a in mesh_axes)

    taken: set[str] = set()
    chosen: list[tuple[str, ...]] = [()] * len(axes)
    for name, mesh_axes in rules:
        if name not in axes or any(a in taken for a in mesh_axes):
            continue
        dim = list(axes).index(name)
        if chosen[dim]:
            continue
        used = mesh_axes
        while used and shape[dim] % devices(used):
            used = used[:-1]
        # Size-1 mesh axes split nothing; leaving them out keeps specs (and the log) plain.
        chosen[dim] = tuple(a for a in used if mesh_sizes.get(a, 1) > 1)
        if used != mesh_axes:
            _log_once(name, shape[dim], mesh_axes, devices(mesh_axes), chosen[dim])
        taken.update(used)
    return PartitionSpec(*[(c[0] if len(c) == 1 else c) if c else None for c in chosen])


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Rules) -> NamedSharding:
    """logical_spec's sharding, on `mesh` made all-Auto (see `auto_axes`)."""
    return NamedSharding(auto_axes(mesh), logical_spec(axes, shape, mesh, rules))


# The mesh and rules that `constrain` applies, set around tracing by `use_mesh`.
_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "qwen2_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Makes `constrain` place activations on `mesh` (None: constrain does nothing).

    Entered inside a jitted function whose cache key includes mesh and rules (static
    arguments), since `jax.set_mesh` cannot be used under jit.
    """
    token = _CONTEXT.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh` of the all-Auto `mesh` (see `auto_axes`), around a public function's
    calls into jit (nothing for None).

    Inside a caller's own `with jax.set_mesh(explicit_mesh)`, every host array and jit argument
    would otherwise be typed as living on that Explicit mesh, and rejected next to our
    Auto-sharded parameters.
    """
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(auto_axes(mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; identity outside `use_mesh`."""
    context = _CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh, rules))


def sequence_axes(length: int) -> tuple[str, ...]:
    """The mesh axes that split a `length` dimension of this size under `use_mesh` (() when
    none: no mesh, no sequence axis, or a length they do not divide)."""
    context = _CONTEXT.get()
    if context is None:
        return ()
    mesh, rules = context
    spec = logical_spec(("length",), (length,), mesh, rules)[0]
    return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def current_mesh_and_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) `use_mesh` set, as given, or None."""
    return _CONTEXT.get()


def current_mesh() -> Mesh | None:
    """The mesh `use_mesh` set (made all-Auto), or None."""
    context = _CONTEXT.get()
    return None if context is None else auto_axes(context[0])


def shard_input(x: np.ndarray, mesh: Mesh, axes: Sequence[str | None],
                rules: Rules = DEFAULT_RULES) -> jax.Array:
    """A global array from a host array every process holds in full: each process places only
    the slices its own devices hold."""
    x = np.asarray(x)
    sharding = named_sharding(axes, x.shape, mesh, rules)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array as numpy on every process (an all-gather when other
    processes hold parts of it)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to a multi-process job before any other JAX call.

    With no arguments JAX detects the cluster (TPU pod slices, SLURM, ...). With a coordinator
    "HOST:PORT", a process count and this process's id, any set of processes works, several
    on one machine included; CPU collectives then go through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    logger.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` live on, or None if they are not NamedSharding arrays."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None
