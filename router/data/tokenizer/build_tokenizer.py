"""Rebuild kvroute's bundled tokenizer (`tokenizer.json` beside this file).

A byte-level BPE with 8,192 tokens trained on kvroute's own source and README, plus
Llama-3-style special tokens (`<|begin_of_text|>` added to completions prompts). It is what
the emulator and the router use by default so that block keys agree end to end without
downloading a model's tokenizer; for a real fleet, point `blocks.tokenizer_path` at the model's
own `tokenizer.json`. Run from the repository root:
`python router/data/tokenizer/build_tokenizer.py`.
"""

from __future__ import annotations

import glob
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def main() -> None:
    files = sorted(
        glob.glob("router/**/*.py", recursive=True)
        + glob.glob("scorers/*.py")
        + glob.glob("envoy_extproc/*.py")
        + glob.glob("*.md")
    )
    texts = [Path(f).read_text() for f in files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(str(Path(__file__).parent / "tokenizer.json"))


if __name__ == "__main__":
    main()
