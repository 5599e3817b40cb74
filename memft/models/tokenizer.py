"""Convert a SentencePiece BPE model (llama2.c / Llama-2 style) into a Hugging Face fast tokenizer.

transformers' own converter (`convert_slow_tokenizer.LlamaConverter`) needs the `protobuf` package to
read the `.model` file, and in transformers 5 a plain `LlamaTokenizer(vocab_file=...)` silently
builds an empty vocabulary (it encodes every text to just `[1]`). The `sentencepiece` package
itself reads the vocabulary and scores, so we rebuild the same pipeline with the `tokenizers`
library:

- model: BPE over the SentencePiece pieces, merges ordered by piece score (SentencePiece BPE
  merges the adjacent pair whose result has the highest score), byte fallback for unknown
  characters (`<0x0A>` for a newline, ...), so `<unk>` is never produced;
- normalizer: SentencePiece's default `remove_extra_whitespaces` (drop leading and trailing ASCII
  spaces, squeeze runs of spaces; tabs and newlines are kept) then `add_dummy_prefix` (a `▁` in front)
  and spaces -> `▁`;
- post-processor: BOS in front (`<s> $A`), as Llama does; no EOS;
- decoder: `▁` -> space, bytes -> UTF-8, drop the dummy prefix's space.

The result encodes exactly like `sentencepiece.SentencePieceProcessor(model_file=...).encode(text)`
for the stories260K `tok512.model` (checked in tests/test_models.py), except that literal special
token strings in the text (`"<s>"`) become the special token, as in every Hugging Face tokenizer.

Regenerate the built-in files with:
    python -m memft.models.tokenizer /work/shared/data/stories260K/tok512.model configs/stories260K
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges


def sentencepiece_to_fast(model_file: str | Path, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer equivalent to a SentencePiece BPE model with byte fallback.

    Args:
        model_file: the SentencePiece `.model` file (BPE type, with `<unk>`, `<s>`, `</s>` pieces).
        model_max_length: the model's context length, stored on the tokenizer (None: unlimited).

    Returns:
        A `PreTrainedTokenizerFast` with `bos_token="<s>"`, `eos_token="</s>"`, `unk_token="<unk>"` and no
        pad token; `tokenizer(text)["input_ids"] == [bos_id] + sp.encode(text)`.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # Only normal pieces take part in merges: control tokens and <0xNN> byte pieces never merge.
    scores = {
        piece: sp.get_score(i)
        for i, piece in enumerate(pieces)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    }
    unk, bos, eos = (pieces[i] for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))

    tok = Tokenizer(
        BPE(vocab=vocab, merges=generate_merges(vocab, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # \A and \z, not ^ and $: in the Oniguruma syntax tokenizers uses, ^/$ also match at newlines.
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(r" {2,}"), " "),
            normalizers.Prepend("▁"),
            normalizers.Replace(" ", "▁"),
        ]
    )
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, **kwargs)


def save_converted(model_file: str | Path, out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `model_file` into `out_dir`."""
    out = Path(out_dir)
    tokenizer = sentencepiece_to_fast(model_file, model_max_length)
    tokenizer.save_pretrained(out)
    # transformers 5 no longer writes this file; older readers and other tools still look for it.
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m memft.models.tokenizer TOKENIZER.model OUT_DIR [MODEL_MAX_LENGTH]")
    save_converted(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else None)
