"""Every touch of a transformers private internal, in one place.

rayfit leans on transformers' continuous batching (deployments.engine.pool,
deployments.engine.row_logits) and on its paged-cache allocators to size the KV pool
(placement.sizing.kv_budget) further than the public API reaches. Each such
touch is one named function or constant here, with the public behaviour whose
absence forces it; nothing else in rayfit reaches into transformers' private
parts. It lives in placement/ because the planner needs the allocators too and
deployments/ may import placement/, never the reverse.

pyproject pins the transformers versions this was tested on (`TESTED_ON`).
`check_transformers_internals()` runs at engine start and names each internal
that moved, with the installed version, instead of serving wrong answers or
budgeting the wrong KV pool after an upgrade. A name that is gone at import
becomes a placeholder that raises the same error on use, so this module (and
what imports it) still imports and the check gets to speak.
"""

from __future__ import annotations

import dis
import functools
import importlib
import inspect
import logging
import math
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)

# The transformers release line rayfit was tested on (pyproject pins it).
TESTED_ON = "5.25"

_CB = "transformers.generation.continuous_batching"


class TransformersInternalsError(RuntimeError):
    """A transformers internal rayfit relies on moved or changed shape (an untested transformers version)."""


class _MissingMeta(type):
    """The type of a placeholder for a name transformers no longer has: any use raises, naming it."""

    path: str

    def _fail(cls) -> TransformersInternalsError:
        return TransformersInternalsError(
            f"transformers {transformers.__version__} has no {cls.path} (rayfit was tested on {TESTED_ON}.x; "
            "see placement/hf_internals.py)"
        )

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise cls._fail()

    def __getitem__(cls, key: Any) -> Any:
        raise cls._fail()

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise cls._fail()


def _find(module: str, name: str) -> Any:
    """`module.name`, or a placeholder that raises TransformersInternalsError on use (subclassing it still works)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return _MissingMeta(name, (), {"path": f"{module}.{name}"})


# ---- the transformers objects reached -------------------------------------------------------------
# Read once here; the check takes any object with these attributes (tests point it at a namespace lacking one).
TRANSFORMERS = SimpleNamespace(
    version=transformers.__version__,
    ContinuousBatchingManager=_find(f"{_CB}.continuous_api", "ContinuousBatchingManager"),
    ContinuousBatchProcessor=_find(f"{_CB}.continuous_api", "ContinuousBatchProcessor"),
    OutputRouter=_find(f"{_CB}.continuous_api", "OutputRouter"),
    BackgroundThreadStatus=_find(f"{_CB}.continuous_api", "BackgroundThreadStatus"),
    ModelRunner=_find(f"{_CB}.model_runner", "ModelRunner"),
    PagedAttentionCache=_find(f"{_CB}.cache", "PagedAttentionCache"),
    FutureRequestState=_find(f"{_CB}.requests", "FutureRequestState"),
    RequestState=_find(f"{_CB}.requests", "RequestState"),
    ContinuousBatchingLogitsProcessor=_find(f"{_CB}.cb_logits_processors", "ContinuousBatchingLogitsProcessor"),
    ContinuousBatchingLogitsProcessorList=_find(f"{_CB}.cb_logits_processors", "ContinuousBatchingLogitsProcessorList"),
    ContinuousBatchingTopPLogitsWarper=_find(f"{_CB}.cb_logits_processors", "ContinuousBatchingTopPLogitsWarper"),
    ATTN_TYPE_TO_ALLOCATOR=_find(f"{_CB}.cache", "ATTN_TYPE_TO_ALLOCATOR"),
    group_layers_by_attn_type=_find(f"{_CB}.cache", "group_layers_by_attn_type"),
    FullAttentionCacheAllocator=_find(f"{_CB}.cache_allocators", "FullAttentionCacheAllocator"),
    find_head_dim=_find(f"{_CB}.utils", "find_head_dim"),
    find_num_key_value_heads=_find(f"{_CB}.utils", "find_num_key_value_heads"),
    DummyLayer=_find("transformers.cache_utils", "DummyLayer"),
    PreTrainedModel=_find("transformers", "PreTrainedModel"),
)
_T = TRANSFORMERS

# ---- continuous batching: per-request logits processors ------------------------------------------

# No public way to give the manager a per-request logits processor: this base class is its protocol
# (fill_defaults / prepare_tensor_args / __call__, kwargs declared in supported_kwargs).
CBLogitsProcessor = _T.ContinuousBatchingLogitsProcessor

# The per-request top-p warper the manager builds from generation_config; no public way to change how it
# filters (deployments.engine.pool subclasses it to skip the vocabulary sort where it changes nothing).
CBTopPWarper = _T.ContinuousBatchingTopPLogitsWarper


def request_row_state(request: Any) -> tuple[Mapping[str, Any], list[int]]:
    """A request's processor kwargs and generated tokens, as `prepare_tensor_args` is handed it."""
    # The processor protocol hands FutureRequestState objects; no public view of their request's state.
    state = request.state
    return state.logit_processor_kwargs, state.generated_tokens


def swap_top_p_warper(manager: Any, subclass: type) -> Any | None:
    """Replace the manager's stock top-p warper by an instance of `subclass` with the same settings
    (call before `manager.start()`); the new warper, or None when the manager built none."""
    # No public hook to replace a processor the manager built from generation_config: its list is edited,
    # and the stock warper's settings (its __dict__) copied into the subclass instance.
    processors = manager.logit_processor.logits_processor
    for index, processor in enumerate(processors):
        if type(processor) is CBTopPWarper:
            replacement = subclass.__new__(subclass)
            replacement.__dict__.update(processor.__dict__)
            processors[index] = replacement
            return replacement
    return None


def add_first_processor(manager: Any, processor: Any) -> None:
    """Put a per-request `processor` first in the manager's processors (before temperature and top-p,
    so it sees the model's own scores); call before `manager.start()`."""
    # No public way to add a custom per-request processor: the list's bookkeeping is written by hand.
    processors = manager.logit_processor
    processors.logits_processor.insert(0, processor)
    processors.tensors_required += 1
    processors.supported_keys.update(processor.supported_kwargs)
    processors.do_processing = True


# ---- continuous batching: the manager's running state --------------------------------------------


def _router_entries(manager: Any) -> tuple[Any, dict[str, Any]]:
    router = manager.output_router
    return router._lock, router.result_handlers


def deliver_on_loop(manager: Any, request_id: str, callback: Callable[[Any], None], loop: Any) -> None:
    """Have the manager call `callback(output)` on `loop` for each of this request's outputs."""
    # register_result_handler reads the running loop, so it only works on the loop itself; this writes the
    # same router entry from the submitting thread.
    lock, handlers = _router_entries(manager)
    with lock:
        handlers[request_id] = (callback, loop)


def drop_loop_delivery(manager: Any, request_id: str) -> None:
    """Forget this request's loop delivery (if any)."""
    # No public way to unregister a handler before its request finishes (a cancelled request).
    lock, handlers = _router_entries(manager)
    with lock:
        handlers.pop(request_id, None)


def built_batch_processor(manager: Any) -> Any | None:
    """The manager's batch processor once its loop thread has built it (with the KV cache), else None."""
    # No public signal that the loop thread has built its batch and cache.
    return manager.batch_processor


def kv_cache_bytes(batch_processor: Any) -> int:
    """Bytes of the paged KV pool tensor the manager allocated."""
    # No public size of the pool the manager allocated.
    tensor = batch_processor.cache.cache_tensor
    return int(tensor.numel() * tensor.element_size())


# The sampling step: `step(scores, output_ids)`, scores [1, rows, vocab], writes the rows' next token ids
# into output_ids[0, :rows] (and with logprobs asked for, their logprobs as int32 bits into output_ids[1]).
SampleStep = Callable[[torch.Tensor, torch.Tensor], None]


def wrap_sampler(batch_processor: Any, wrap: Callable[[SampleStep, bool], SampleStep]) -> None:
    """Replace the model runner's sampling step by `wrap(stock_step, returns_logprobs)`."""
    # No public hook for the sampling step (every row, greedy ones too, goes through softmax + multinomial).
    runner = batch_processor.model_runner
    runner._sample = wrap(runner._sample, bool(runner.return_logprobs))


def loop_fatal_error(manager: Any) -> BaseException | None:
    """Why the manager's batching loop died, if it recorded a reason."""
    # No public reason for a stopped batching loop.
    return getattr(manager.background_thread_status, "fatal_error", None)


def decode_step(manager: Any) -> int | None:
    """The manager's count of batching steps (None if it has none yet)."""
    # No public progress counter of the batching loop.
    return getattr(manager, "current_batch", None)


# ---- paged KV cache sizing --------------------------------------------------------------------------


def kv_heads(config: Any) -> int:
    """KV heads per layer, read from a text config as the paged cache reads it."""
    # transformers' own reading of the several config spellings lives in a private utils module.
    return _T.find_num_key_value_heads(config)


def head_dim(config: Any) -> int:
    """Head size, read from a text config as the paged cache reads it."""
    # As kv_heads: private utils.
    return _T.find_head_dim(config)


def layer_groups(config: Any) -> dict[str, list[int]]:
    """Layer indices by attention type ("full_attention", "sliding_attention"), as the paged cache groups them."""
    # No public grouping of layers as the paged cache does it.
    return _T.group_layers_by_attn_type(config)


def cache_allocators(config: Any, *, cache_dtype: torch.dtype, page_size: int) -> list[Any]:
    """The paged cache's allocator of each layer group (block sharing off), as it builds them."""
    # No public way to ask the paged cache what a block of each layer group costs: its allocators are built.
    kv = kv_heads(config)
    return [
        _T.ATTN_TYPE_TO_ALLOCATOR[kind](
            index=index,
            layer_indices=layers,
            config=config,
            num_key_value_heads=kv,
            cache_dtype=cache_dtype,
            page_size=page_size,
            allow_block_sharing=False,
        )
        for index, (kind, layers) in enumerate(layer_groups(config).items())
    ]


def block_bytes(allocator: Any) -> int:
    """Bytes of one block of an allocator's group (one page per layer of the group)."""
    # Set by the private allocator base class; no public accessor.
    return int(allocator.bytes_per_block)


def blocks_per_request(allocator: Any, context_length: int) -> int:
    """Blocks one request of `context_length` tokens takes in an allocator's group."""
    # No public count; the allocator's own rule (a sliding group needs only its window).
    return int(allocator._compute_blocks_needed(0, 0, context_length))


def full_attention_page_bytes(config: Any, *, cache_dtype: torch.dtype, page_size: int) -> int:
    """Bytes of one full-attention page of one layer: the unit transformers converts `num_blocks` with."""
    # transformers sizes the pool from num_blocks with this private classmethod; no public formula.
    return int(
        _T.FullAttentionCacheAllocator.get_bytes_per_page(kv_heads(config), head_dim(config), cache_dtype, page_size)
    )


# Sectors are aligned to lcm(block sizes, 128 bytes): a literal inside PagedAttentionCache.__init__, with no
# name to read (tests/test_kv_budget compares paged_pool with the real PagedAttentionCache).
SECTOR_ALIGNMENT_BYTES = 128


def sector_bytes(allocators: list[Any]) -> int:
    """Bytes of one sector of the pool: every group's blocks fit a whole number of times."""
    return math.lcm(*(block_bytes(a) for a in allocators), SECTOR_ALIGNMENT_BYTES)


# ---- models and caches outside continuous batching -----------------------------------------------

# The layer a Cache holds for a layer that stores no KV (shared-KV or attention-free layers); it is
# undocumented, and nothing public tells such a layer apart (deployments.engine.kv skips it).
NoKvCacheLayer = _T.DummyLayer


def model_from_config(cls: type, config: Any) -> Any:
    """An instance of the model class `cls` built from `config` (under the caller's device context)."""
    # Only the Auto classes have a public from_config; a specific model class has the private _from_config.
    return cls._from_config(config)


# ---- the check ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Internal:
    """What the functions above need of one transformers object: attributes it has, a callable's parameters."""

    owner: str  # the attribute of TRANSFORMERS it is, e.g. "ModelRunner"
    attributes: tuple[str, ...] = ()  # attributes the class defines or assigns to its instances
    callable: str | None = None  # a method whose parameters are checked ("": the owner itself)
    parameters: tuple[str, ...] = ()  # that callable's leading parameters, after self / cls


INTERNALS: tuple[Internal, ...] = (
    Internal("ContinuousBatchingLogitsProcessor", ("supported_kwargs", "ignored_kwargs")),
    Internal("ContinuousBatchingLogitsProcessor", (), "prepare_tensor_args", ("requests_with_new_token",)),
    Internal("ContinuousBatchingLogitsProcessor", (), "fill_defaults", ("int32_tensor",)),
    Internal("ContinuousBatchingLogitsProcessor", (), "__call__", ("scores", "tensor_arg")),
    Internal("ContinuousBatchingTopPLogitsWarper", ("top_p", "filter_value", "min_tokens_to_keep")),
    Internal("ContinuousBatchingTopPLogitsWarper", (), "__call__", ("scores", "tensor_arg")),
    Internal("FutureRequestState", ("state",)),
    Internal("RequestState", ("logit_processor_kwargs", "generated_tokens")),
    Internal(
        "ContinuousBatchingManager",
        ("logit_processor", "output_router", "batch_processor", "background_thread_status", "current_batch"),
    ),
    Internal(
        "ContinuousBatchingLogitsProcessorList",
        ("logits_processor", "tensors_required", "supported_keys", "do_processing"),
    ),
    Internal("OutputRouter", ("_lock", "result_handlers")),
    Internal("ContinuousBatchProcessor", ("model_runner", "cache")),
    Internal("PagedAttentionCache", ("cache_tensor",)),
    Internal("ModelRunner", ("return_logprobs",), "_sample", ("scores", "output_ids")),
    Internal("BackgroundThreadStatus", ("fatal_error",)),
    Internal("ATTN_TYPE_TO_ALLOCATOR"),
    Internal("group_layers_by_attn_type", (), "", ("config",)),
    Internal(
        "FullAttentionCacheAllocator",
        ("bytes_per_block",),
        "__init__",
        ("index", "config", "num_key_value_heads", "cache_dtype", "page_size", "layer_indices", "allow_block_sharing"),
    ),
    Internal(
        "FullAttentionCacheAllocator",
        (),
        "get_bytes_per_page",
        ("num_key_value_heads", "head_dim", "cache_dtype", "page_size"),
    ),
    Internal(
        "FullAttentionCacheAllocator", (), "_compute_blocks_needed", ("allocated_blocks", "past_length", "query_length")
    ),
    Internal("find_head_dim", (), "", ("config",)),
    Internal("find_num_key_value_heads", (), "", ("config",)),
    Internal("DummyLayer"),
    Internal("PreTrainedModel", (), "_from_config", ("config",)),
)

# The layer kinds kv_budget sizes, and the allocator each must be (the sliding one subclasses the full one).
_ALLOCATOR_KINDS = ("full_attention", "sliding_attention")


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


@functools.cache
def _assigned_attributes(cls: type) -> frozenset[str]:
    """Attribute names any method of `cls` (or its bases) assigns (`self.x = ...`), plus slots and annotations."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        slots = vars(klass).get("__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
        names.update(vars(klass).get("__annotations__", {}))
        for member in vars(klass).values():
            function = getattr(member, "__func__", member)  # classmethod / staticmethod
            code = getattr(function, "__code__", None)
            if code is None:
                continue
            for nested in _code_objects(code):
                names.update(i.argval for i in dis.get_instructions(nested) if i.opname == "STORE_ATTR")
    return frozenset(names)


def _leading_parameters(function: Any) -> tuple[str, ...]:
    parameters = list(inspect.signature(function).parameters)
    if parameters and parameters[0] in ("self", "cls"):
        parameters = parameters[1:]
    return tuple(parameters)


def _problems(internal: Internal, source: Any) -> Iterator[str]:
    """What is wrong with `internal` in `source`, one line each, each naming the internal."""
    name = internal.owner
    owner = getattr(source, name, None)
    if owner is None or isinstance(owner, _MissingMeta):
        yield f"{owner.path if isinstance(owner, _MissingMeta) else name} is gone"
        return
    if internal.attributes:
        known = _assigned_attributes(owner) if isinstance(owner, type) else set()
        for attribute in internal.attributes:
            if attribute not in known and not hasattr(owner, attribute):
                yield f"{name}.{attribute} is gone"
    if internal.callable is not None:
        label = f"{name}.{internal.callable}" if internal.callable else name
        if internal.callable and internal.callable not in dir(owner):
            yield f"{label} is gone"
            return
        function = getattr(owner, internal.callable) if internal.callable else owner
        found = _leading_parameters(function)
        if found[: len(internal.parameters)] != internal.parameters:
            yield f"{label} takes ({', '.join(found)}), expected ({', '.join(internal.parameters)}, ...)"
    if name == "ATTN_TYPE_TO_ALLOCATOR":
        full = getattr(source, "FullAttentionCacheAllocator", None)
        for kind in _ALLOCATOR_KINDS:
            allocator = owner.get(kind) if isinstance(owner, Mapping) else None
            if not (isinstance(allocator, type) and isinstance(full, type) and issubclass(allocator, full)):
                yield f"ATTN_TYPE_TO_ALLOCATOR[{kind!r}] is no longer a FullAttentionCacheAllocator"


def transformers_internals_problems(source: Any = TRANSFORMERS) -> list[str]:
    """One line per internal that moved or changed shape in `source` (default: the installed transformers)."""
    problems: list[str] = []
    for internal in INTERNALS:
        problems.extend(p for p in _problems(internal, source) if p not in problems)
    return problems


def check_transformers_internals(source: Any = TRANSFORMERS) -> None:
    """Raise TransformersInternalsError naming every transformers internal that moved, and the version.

    `source`: the transformers objects to check (default: the installed ones, `TRANSFORMERS`); any
    object with the same attributes, e.g. a namespace lacking one, to see what the check says.
    """
    version = getattr(source, "version", transformers.__version__)
    problems = transformers_internals_problems(source)
    if problems:
        raise TransformersInternalsError(
            f"transformers {version} changed internals rayfit relies on (tested on {TESTED_ON}.x, pinned in "
            f"pyproject; see placement/hf_internals.py): " + "; ".join(problems)
        )
    if not str(version).startswith(f"{TESTED_ON}."):
        logger.warning("transformers %s is not the version rayfit was tested on (%s.x)", version, TESTED_ON)
