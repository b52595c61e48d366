"""Top-k similarity search over the episodic memory's keys.

:func:`topk_similarity` is the single entry point. It finds, for every query, the ``k`` keys with the
largest dot product, and dispatches to a backend picked by name. The backends live in a small
registry (name -> function) so that new ones (a fused Triton kernel on CUDA, FAISS on CPU) can be
plugged in without touching the callers:

* ``"torch"``: chunked ``torch.mm`` + ``torch.topk`` with a running merge of the per-chunk top-k.
  Its extra memory is ``O(Q * chunk + Q * k)``; it never builds the ``Q x N`` score matrix.
* ``"auto"``: picks the best registered backend for the input. In this version it is ``"torch"``.

:func:`topk_similarity_reference` is the plain, un-chunked definition that every backend must match
(apart from the order of tied scores).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "available_backends",
    "topk_similarity",
    "topk_similarity_reference",
]

# The torch backend sizes its chunks so that one chunk of scores holds about this many elements.
_TARGET_CHUNK_ELEMENTS = 2**22

# Scores of valid keys are clamped at this value so that a valid key always outranks a masked one
# (masked keys score -inf), even when its own score overflows to -inf.
_LOWEST_VALID_SCORE = torch.finfo(torch.float32).min

BackendFn = Callable[..., tuple[Tensor, Tensor]]
"""A backend: ``fn(queries, keys, k, *, valid, chunk_size) -> (scores, indices)``.

It receives inputs already checked by :func:`topk_similarity` (2-D floating tensors on one device,
``1 <= k <= number of valid keys``, ``valid`` a bool mask or ``None``) and returns fp32 scores and
int64 indices of shape ``[Q, k]``, sorted by descending score.
"""


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _check_inputs(queries: Tensor, keys: Tensor, k: int, valid: Tensor | None) -> tuple[int, int]:
    """Validates the search inputs and returns ``(k, number of valid keys)``."""
    for name, tensor in (("queries", queries), ("keys", keys)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D ([{name[0].upper()}, D]), got shape {tuple(tensor.shape)}."
            )
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype (float32, float16 or bfloat16), "
                f"got {tensor.dtype}."
            )
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must have the same embedding size D, got queries D={queries.shape[1]} "
            f"and keys D={keys.shape[1]}."
        )
    if queries.device != keys.device:
        raise ValueError(
            f"queries and keys must be on the same device, got queries on {queries.device} and "
            f"keys on {keys.device}."
        )
    if isinstance(k, bool):
        raise TypeError(f"k must be an int, got {k!r}.")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}.") from None

    num_keys = keys.shape[0]
    if valid is None:
        num_valid = num_keys
    else:
        if not isinstance(valid, Tensor):
            raise TypeError(
                f"valid must be a bool torch.Tensor or None, got {type(valid).__name__}."
            )
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}.")
        if valid.shape != (num_keys,):
            raise ValueError(
                f"valid must have shape [N] = ({num_keys},) to match keys, got {tuple(valid.shape)}."
            )
        if valid.device != keys.device:
            raise ValueError(
                f"valid must be on the same device as keys ({keys.device}), got {valid.device}."
            )
        num_valid = int(valid.sum())

    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}.")
    if k > num_valid:
        raise ValueError(
            f"k={k} is larger than the memory: keys has only {num_valid} valid key(s) "
            f"(out of N={num_keys}); ask for at most {num_valid}."
        )
    if queries.numel() and bool(torch.isnan(queries).any()):
        raise ValueError("queries contains NaN; every query must be a finite embedding.")
    return k, num_valid


def _masked_scores(scores: Tensor, valid: Tensor | None) -> Tensor:
    """Sends masked keys to -inf and keeps every valid score above them (in place)."""
    if valid is None:
        return scores
    scores.clamp_(min=_LOWEST_VALID_SCORE)
    return scores.masked_fill_(~valid.unsqueeze(0), float("-inf"))


def _empty_result(queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores = torch.empty(0, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(0, k, dtype=torch.int64, device=queries.device)
    return scores, indices


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def topk_similarity_reference(
    queries: Tensor, keys: Tensor, k: int, *, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The plain definition of top-k similarity search, computed in one go.

    It builds the full ``[Q, N]`` score matrix ``queries.float() @ keys.float().T``, sets the scores
    of masked keys to ``-inf`` (valid scores are first clamped at the lowest finite fp32 value, so a
    valid key always ranks above a masked one) and takes ``torch.topk``. Every backend of
    :func:`topk_similarity` gives the same answer, apart from the order of tied scores. It uses
    ``Q * N`` memory; use it for tests and small inputs only.

    Args:
        queries (Tensor): the queries, ``[Q, D]``, any floating dtype.
        keys (Tensor): the keys, ``[N, D]``, any floating dtype.
        k (int): how many neighbours to return per query, ``1 <= k <= number of valid keys``.

    Keyword Args:
        valid (Tensor, optional): a bool mask ``[N]``; keys where it is ``False`` are never
            returned. Defaults to ``None`` (every key is valid).

    Returns:
        A tuple ``(scores, indices)``: fp32 scores ``[Q, k]`` sorted by descending score, and the
        int64 indices ``[Q, k]`` of the matching keys.

    Raises:
        TypeError: if an argument has the wrong type or dtype.
        ValueError: if shapes or devices disagree, ``k`` is out of range or the queries hold NaN.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.search import topk_similarity_reference
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> scores, indices = topk_similarity_reference(torch.tensor([[0.0, 1.0]]), keys, k=2)
        >>> scores
        tensor([[1.0000, 0.8000]])
        >>> indices
        tensor([[1, 2]])
    """
    k, _ = _check_inputs(queries, keys, k, valid)
    if queries.shape[0] == 0:
        return _empty_result(queries, k)
    with torch.no_grad():
        scores = queries.float() @ keys.float().T
        scores = _masked_scores(scores, valid)
        top_scores, top_indices = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    return top_scores, top_indices


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
def _default_chunk_size(num_queries: int, k: int) -> int:
    """Keys per chunk so that one ``[Q, chunk]`` score block holds about ``2**22`` elements."""
    return max(k, _TARGET_CHUNK_ELEMENTS // max(num_queries, 1), 1)


def _torch_backend(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked ``torch.mm`` + ``torch.topk`` with a running merge of the per-chunk top-k.

    Scores are computed in fp32: the queries and each key chunk are upcast before the product, so
    the result matches :func:`topk_similarity_reference` for fp32, fp16 and bf16 keys alike. Peak
    extra memory is one ``[Q, chunk]`` score block, one upcast ``[chunk, D]`` key block and the
    ``[Q, k]`` running top-k.
    """
    num_queries, num_keys = queries.shape[0], keys.shape[0]
    if chunk_size is None:
        chunk_size = _default_chunk_size(num_queries, k)
    chunk_size = min(chunk_size, num_keys)

    q = queries.float()
    best_scores = q.new_empty(num_queries, 0)
    best_indices = torch.empty(num_queries, 0, dtype=torch.int64, device=q.device)
    for start in range(0, num_keys, chunk_size):
        stop = min(start + chunk_size, num_keys)
        scores = torch.mm(q, keys[start:stop].float().T)
        scores = _masked_scores(scores, None if valid is None else valid[start:stop])
        chunk_scores, chunk_indices = torch.topk(
            scores, min(k, stop - start), dim=1, largest=True, sorted=False
        )
        del scores
        chunk_indices += start
        # Merge the chunk's candidates with the running best; at most 2k columns per query.
        merged_scores = torch.cat((best_scores, chunk_scores), dim=1)
        merged_indices = torch.cat((best_indices, chunk_indices), dim=1)
        best_scores, order = torch.topk(
            merged_scores, min(k, merged_scores.shape[1]), dim=1, largest=True, sorted=True
        )
        best_indices = torch.gather(merged_indices, 1, order)
    return best_scores, best_indices


# The registry of concrete backends. Further backends (e.g. "triton" on CUDA, "faiss") register a
# function with the `BackendFn` signature here, and teach `_resolve_auto` when to prefer them.
_BACKENDS: dict[str, BackendFn] = {
    "torch": _torch_backend,
}


def available_backends() -> tuple[str, ...]:
    """Names of the registered search backends, to pass as ``backend=`` to :func:`topk_similarity`.

    ``"auto"`` is always accepted as well; it is not listed because it only picks one of these.

    Examples:
        >>> from torchrl_hippo.search import available_backends
        >>> "torch" in available_backends()
        True
    """
    return tuple(_BACKENDS)


def _resolve_auto(queries: Tensor, keys: Tensor, k: int) -> str:
    """Picks the backend that ``backend="auto"`` stands for, given the (checked) inputs."""
    # Only the chunked torch backend exists for now; faster backends slot in here by device/size.
    return "torch"


def _resolve_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}.")
    if backend != "auto" and backend not in _BACKENDS:
        choices = ", ".join(repr(name) for name in ("auto", *_BACKENDS))
        raise ValueError(f"Unknown or unavailable backend {backend!r}; available: {choices}.")
    return backend


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Finds, for every query, the ``k`` keys with the largest dot product.

    The score of a key is ``q · key`` accumulated in fp32. Keys may be fp32, fp16 or bf16; queries
    are cast to the backend's compute dtype as needed (the ``"torch"`` backend computes in fp32),
    and the scores are always returned as fp32. Masked keys are never returned. The search works on
    any device (outputs live on the inputs' device) and is not differentiable: if gradients are
    needed, recompute ``queries @ keys[indices]`` afterwards.

    Args:
        queries (Tensor): the queries, ``[Q, D]``, a floating dtype, without NaN.
        keys (Tensor): the memory's keys, ``[N, D]``, a floating dtype, on the queries' device.
        k (int): how many neighbours to return per query, ``1 <= k <= number of valid keys``.

    Keyword Args:
        valid (Tensor, optional): a bool mask ``[N]`` on the keys' device; keys where it is
            ``False`` are never returned. Defaults to ``None`` (every key is valid).
        backend (str, optional): ``"auto"`` or one of :func:`available_backends`. ``"auto"`` picks
            the best one for the input (currently always ``"torch"``). Defaults to ``"auto"``.
        chunk_size (int, optional): keys scored at once by the chunked backends. Defaults to
            ``None``, which picks about ``2**22 / Q`` keys (and at least ``k``).

    Returns:
        A tuple ``(scores, indices)``: fp32 scores ``[Q, k]`` sorted by descending score, and the
        int64 indices ``[Q, k]`` of the matching rows of ``keys``. Tied scores may come in any
        order. With ``Q == 0`` both are empty ``[0, k]`` tensors.

    Raises:
        TypeError: if an argument has the wrong type or dtype (non-floating queries or keys, a
            non-bool ``valid``, a non-int ``k``).
        ValueError: if queries or keys are not 2-D, their ``D`` or devices differ, ``valid`` has
            the wrong shape or device, ``k < 1``, ``k`` exceeds the number of valid keys, the
            queries hold NaN, ``chunk_size < 1`` or the backend is unknown.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.search import topk_similarity
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> scores, indices = topk_similarity(queries, keys, k=2)
        >>> scores
        tensor([[1.0000, 0.6000],
                [1.0000, 0.8000]])
        >>> indices
        tensor([[0, 2],
                [1, 2]])

        Masked keys are skipped, and low-precision keys are scored in fp32:

        >>> valid = torch.tensor([False, True, True])
        >>> scores, indices = topk_similarity(queries, keys.bfloat16(), k=2, valid=valid)
        >>> scores.dtype, indices.tolist()
        (torch.float32, [[2, 1], [1, 2]])
        >>> topk_similarity(queries, keys, k=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: k=4 is larger than the memory: keys has only 3 valid key(s) (out of N=3); ...
    """
    backend = _resolve_backend(backend)
    if chunk_size is not None:
        if isinstance(chunk_size, bool):
            raise TypeError(f"chunk_size must be an int or None, got {chunk_size!r}.")
        try:
            chunk_size = operator.index(chunk_size)
        except TypeError:
            raise TypeError(
                f"chunk_size must be an int or None, got {type(chunk_size).__name__}."
            ) from None
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (or None), got {chunk_size}.")
    k, _ = _check_inputs(queries, keys, k, valid)
    if queries.shape[0] == 0:
        return _empty_result(queries, k)
    if backend == "auto":
        backend = _resolve_auto(queries, keys, k)
    with torch.no_grad():
        return _BACKENDS[backend](queries, keys, k, valid=valid, chunk_size=chunk_size)
