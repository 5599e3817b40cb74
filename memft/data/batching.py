"""Deterministic, resumable batches without a DataLoader.

Batch `(epoch, index)` is a pure function of the examples, the batch size, the seed and
`(epoch, index)`: epoch `e` visits the examples in `torch.randperm(n, seed + e)` order. So a run that
resumes at step k sees bit for bit the batches a run that never stopped would have seen, with no
sampler or worker state to save in the checkpoint.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch

from memft.data.formats import IGNORE_INDEX
from memft.errors import UserError


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch; the model takes `model(**model_inputs(batch))`.

    Returns:
        `input_ids` (B, T) long, padded with `pad_token_id`; `attention_mask` (B, T) long, 1 on real
        tokens; `labels`: (B, T) long with -100 on padding (causal examples with `labels`) or (B,)
        long (classification examples with `label`); `token_type_ids` (B, T) long, padded with 0,
        when the examples have them; `position_ids` (B, T) long, padded with 0, for packed rows
        (`memft.data.formats.pack_examples`): every padding token then starts a segment of its own,
        so it joins no example. T is the longest example in the batch.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    causal = "labels" in examples[0]
    with_types = "token_type_ids" in examples[0]
    packed = "position_ids" in examples[0]
    for ex in examples:
        if ("labels" in ex) != causal or ("token_type_ids" in ex) != with_types or ("position_ids" in ex) != packed:
            raise ValueError("collate got a mix of example kinds (causal and classification, with and without "
                             "token_type_ids, or packed and not)")
        if causal and len(ex["labels"]) != len(ex["input_ids"]):
            raise ValueError("a causal example's labels must have one entry per input id")
    batch_size, length = len(examples), max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long) if causal else None
    token_type_ids = torch.zeros((batch_size, length), dtype=torch.long) if with_types else None
    position_ids = torch.zeros((batch_size, length), dtype=torch.long) if packed else None
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        if labels is not None:
            labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        if token_type_ids is not None:
            token_type_ids[i, :n] = torch.tensor(ex["token_type_ids"], dtype=torch.long)
        if position_ids is not None:
            position_ids[i, :n] = torch.tensor(ex["position_ids"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch["labels"] = labels if labels is not None else torch.tensor([ex["label"] for ex in examples],
                                                                    dtype=torch.long)
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


# --------------------------------------------------------------------------------------------
# Packed batches (rows of several examples, `position_ids` restarting at 0 with each one).
#
# The model is called with `position_ids` and `attention_mask=None`: transformers' masking utils
# (`masking_utils.find_packed_sequence_indices`) then read a new segment wherever a position is not the previous
# one + 1 and build a block-diagonal causal mask (sdpa and eager, tested; flex attention, and flash attention
# reading the same `position_ids` as varlen sequences, by transformers' code, untested on CPU).
# `batch["attention_mask"]` stays in the batch for everything else that counts real tokens; module hooks that need
# it inside a forward read it through `token_mask(kwargs)`.

_PACKED: tuple[weakref.ref, torch.Tensor] | None = None
"""(the `position_ids` of the last packed batch `model_inputs` prepared, that batch's (B, T) attention_mask)."""


def model_inputs(batch: dict) -> dict:
    """The keyword arguments the model is called with for `batch`: every key but `labels`; for a packed batch
    (one with `position_ids`) `attention_mask=None`, so the model builds the block-diagonal mask from the
    positions (and `use_cache=False`: transformers looks for packed rows only without a cache)."""
    global _PACKED
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = inputs.get("position_ids")
    if positions is not None and isinstance(batch.get("attention_mask"), torch.Tensor):
        _PACKED = (weakref.ref(positions), batch["attention_mask"])
        inputs["attention_mask"], inputs["use_cache"] = None, False
    return inputs


def token_mask(kwargs: dict, args: tuple = ()) -> torch.Tensor | None:
    """(B, T), 1 at real tokens, of the forward whose keyword arguments (or positional `args`, the mask second) a
    module's pre-hook sees: the 2-D `attention_mask`, or for a packed batch (`model_inputs` passed None) the
    batch's own, found through the identity of its `position_ids`. None when the forward has no padding mask."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if isinstance(mask, torch.Tensor):
        return mask if mask.dim() == 2 else None
    positions = kwargs.get("position_ids")
    if mask is None and positions is not None and _PACKED is not None and _PACKED[0]() is positions:
        return _PACKED[1]
    return None


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) long: which segment each token belongs to, by transformers' rule (a segment starts wherever a
    position is not the previous one + 1), so a row's examples, and each padding token, are segments."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Positions the loss is averaged over: causal labels != -100 after the shift (`labels[:, 1:]`);
    B for classification."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.shape[0]
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) input tokens in the batch, for tokens/s."""
    return int(batch["attention_mask"].sum())


class Batcher:
    """Batches of `examples` addressed by `(epoch, index)`.

    Args:
        examples: tokenised examples (see `memft.data.formats`).
        batch_size: examples per batch.
        pad_token_id: padding id for `input_ids`.
        shuffle: visit the examples in a new seeded order each epoch; else in their given order.
        seed: epoch `e` uses `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`.
        drop_last: leave out the last batch of an epoch when it is smaller than `batch_size`.

    Raises:
        UserError: no examples, or `drop_last` with fewer examples than `batch_size`.
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_token_id: int, *, shuffle: bool, seed: int,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        n = len(examples)
        if n == 0:
            raise UserError("there are no examples to train on")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"`train.batch_size` ({batch_size}) is larger than the {n} examples, so every "
                            "batch would be dropped; lower `train.batch_size`")
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> list[int]:
        """Indices of the examples in the order epoch `epoch` visits them."""
        n = len(self.examples)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch `index` (0-based) of epoch `epoch`, collated (see `collate`)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range: an epoch has {self.batches_per_epoch} batches")
        if self._order_epoch != epoch:  # one permutation per epoch, not per batch
            self._order, self._order_epoch = self.order(epoch), epoch
        picked = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return collate([self.examples[i] for i in picked], self.pad_token_id)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of epoch `epoch`: resuming mid-epoch is `iter_epoch(e, k)`."""
        order = self.order(epoch)
        for index in range(start, self.batches_per_epoch):
            picked = order[index * self.batch_size:(index + 1) * self.batch_size]
            yield collate([self.examples[i] for i in picked], self.pad_token_id)
