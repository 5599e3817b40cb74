"""Write `recipes/data/stories260k_samples.jsonl`: stories sampled from the pretrained stories260K itself.

Text the model itself produced is the one corpus on which its loss is known to be low (about 1.4
nats/token), so it measures how much of the pretrained function a conversion loses and how fast a
recovery stage brings it back, with no dataset download. Deterministic: seeded, CPU, float32.

Usage: python benchmarks/make_stories.py [--n 600] [--tokens 192] [--seed 0] [--out FILE]
(benchmarks/revffn.py makes a larger training set with another seed the same way.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "configs" / "stories260K"
OUT = ROOT / "recipes" / "data" / "stories260k_samples.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    write_stories(args.out, args.n, args.tokens, args.seed)


def write_stories(out: Path, n: int, tokens: int = 192, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    tok = AutoTokenizer.from_pretrained(MODEL)
    rows = []
    with torch.no_grad():
        for start in range(0, n, 100):
            bos = torch.full((min(100, n - start), 1), tok.bos_token_id)
            samples = model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=tokens, pad_token_id=tok.eos_token_id)
            for seq in samples[:, 1:].tolist():
                if tok.eos_token_id in seq:
                    seq = seq[: seq.index(tok.eos_token_id)]
                text = tok.decode(seq, skip_special_tokens=True).strip()
                if text:
                    rows.append({"text": text})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} stories to {out}")


if __name__ == "__main__":
    main()
