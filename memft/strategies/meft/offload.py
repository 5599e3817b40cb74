"""One layer's MEFT keys and values kept in host memory, with their own AdamW.

Keys K (M, d) and values (the rows of V^T, (M, d)) and their optimizer state live on the CPU (pinned
when CUDA is present). Per step the batch's union of probed experts is gathered to the device
(`gather`), their gradients come back (`accumulate`), and `step` runs AdamW on the CPU. (The router,
E x d, is small and stays on the device as a model parameter.)

* `rows: touched` (lazy AdamW): only rows that received a gradient since the last step are
  updated; their moments, weight decay and bias correction advance with their own update count.
  An untouched row is left exactly as it was (its moments do not decay).
* `rows: all`: every row is updated, untouched ones with a zero gradient: exactly torch's AdamW over
  the whole matrices (moments decay, momentum keeps moving rows that were touched before).
"""

from __future__ import annotations

import torch

from memft.strategies.meft.adapter import Gathered


class HostAdapter:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, experts: int, pin: bool = False):
        """keys (M, d), values (M, d) (the rows of V^T, zero to start), split into `experts` contiguous blocks."""
        def host(t):
            t = t.detach().to("cpu", copy=True).contiguous()
            return t.pin_memory() if pin else t

        self.params = {"keys": host(keys), "values": host(values)}
        self.block = keys.size(0) // experts
        self.grads = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.touched = {k: torch.zeros(v.size(0), dtype=torch.bool) for k, v in self.params.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.row_steps = {k: torch.zeros(v.size(0), dtype=torch.long) for k, v in self.params.items()}

    def rows_of(self, experts: torch.Tensor) -> torch.Tensor:
        """Key / value row ids of the given experts' blocks."""
        start = experts.cpu()[:, None] * self.block
        return (start + torch.arange(self.block)).flatten()

    def gather(self, experts: torch.Tensor, router: torch.Tensor, device: torch.device,
               stream: torch.cuda.Stream | None = None) -> tuple[Gathered, torch.Tensor]:
        """The experts' key and value rows on `device`, as leaves that collect gradients, with the router.

        With a CUDA `stream` the rows are gathered into pinned staging memory and copied on that stream
        without blocking; `Gathered.wait()` makes the compute stream wait for them.
        """
        rows = self.rows_of(experts)
        p = self.params
        if stream is None:
            return Gathered(experts, p["keys"][rows].to(device).requires_grad_(),
                            p["values"][rows].to(device).requires_grad_(), router), rows
        staged = [torch.empty((rows.numel(), t.size(1)), dtype=t.dtype, pin_memory=True) for t in
                  (p["keys"], p["values"])]
        for t, out in zip((p["keys"], p["values"]), staged):
            torch.index_select(t, 0, rows, out=out)
        stream.wait_stream(torch.cuda.current_stream(device))  # `experts` was computed on the compute stream
        with torch.cuda.stream(stream):
            keys, values = (t.to(device, non_blocking=True) for t in staged)
            ready = torch.cuda.Event()
            ready.record(stream)
        return Gathered(experts, keys.requires_grad_(), values.requires_grad_(), router, ready), rows

    def accumulate(self, gathered: Gathered, rows: torch.Tensor) -> int:
        """Add the gathered leaves' gradients into the host gradients; returns the bytes sent back."""
        moved = 0
        for name, leaf in (("keys", gathered.keys), ("values", gathered.values)):
            if leaf.grad is None:
                continue
            grad = leaf.grad.to("cpu")
            moved += grad.numel() * grad.element_size()
            self.grads[name].index_add_(0, rows, grad)
            self.touched[name][rows] = True
        return moved

    @torch.no_grad()
    def step(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
             weight_decay: float = 0.0, rows: str = "touched") -> int:
        """AdamW on the CPU; returns the number of rows updated. Clears the gradients."""
        b1, b2 = betas
        updated = 0
        for name, param in self.params.items():
            sel = self.touched[name] if rows == "touched" else torch.ones_like(self.touched[name])
            if not sel.any():
                continue
            idx = sel.nonzero().squeeze(1)
            self.row_steps[name][idx] += 1
            t = self.row_steps[name][idx].to(param.dtype)[:, None]
            g = self.grads[name][idx]
            m = self.exp_avg[name][idx].mul_(b1).add_(g, alpha=1 - b1)
            v = self.exp_avg_sq[name][idx].mul_(b2).addcmul_(g, g, value=1 - b2)
            p = param[idx].mul_(1 - lr * weight_decay)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(m / (1 - b1 ** t), denom, value=-lr)
            param[idx], self.exp_avg[name][idx], self.exp_avg_sq[name][idx] = p, m, v
            updated += idx.numel()
            self.grads[name][idx] = 0
            self.touched[name][:] = False
        return updated
