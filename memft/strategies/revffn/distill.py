"""RevFFN's recovery loss: the converted model's next-token distributions pulled toward the original model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memft.data.batching import model_inputs
from memft.registry import LossOutput, at_least_float32
from memft.train.chunked_loss import hidden_states, linear_head, linear_kl_divergence


def distill_loss(model: nn.Module, teacher: nn.Module, batch: dict, t: float) -> LossOutput:
    """`t^2 KL(teacher || model)` at temperature `t`, summed over the batch's real tokens; the teacher runs under
    no_grad."""
    inputs = model_inputs(batch)
    mask = batch["attention_mask"].bool()
    head, teacher_head = linear_head(model), linear_head(teacher)
    if head is not None and teacher_head is not None:  # neither model forms its B x S x V logits
        with torch.no_grad():
            target = hidden_states(teacher, teacher_head, inputs)
        loss_sum, count = linear_kl_divergence(hidden_states(model, head, inputs), head, target, teacher_head, mask, t)
        return LossOutput(loss_sum, count)
    with torch.no_grad():
        target = F.log_softmax(at_least_float32(teacher(**inputs).logits) / t, dim=-1)
    student = F.log_softmax(at_least_float32(model(**inputs).logits) / t, dim=-1)
    kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1) * (t * t)
    return LossOutput(kl[mask].sum(), int(mask.sum()))
