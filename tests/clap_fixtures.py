"""A tiny CLAP with a tokenizer, offline, for tests that need a CLAP model or folder (the CLI, metrics).

Importable as `clap_fixtures` (tests/ is on sys.path, as for `fixtures`). The model is the "tiny" preset with
random weights moved off their init; the tokenizer a byte-level BPE trained here on a few music phrases.
"""

from pathlib import Path

import torch

PHRASES = ["soft piano and loud drums", "a calm synth pad with bass", "fast jazz guitar solo",
           "dark ambient drone", "happy pop song with vocals"]


def tiny_clap(tokenizer_folder: Path, *, seed: int = 0, noise: float = 0.2):
    """CLAP(PRESETS["tiny"]) in eval mode with `noise` * N(0, 1) added to every parameter and a BPE tokenizer
    (vocab.json + merges.txt written to `tokenizer_folder`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from musiclm_core.clap import PRESETS, CLAP, CLAPTokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clap = CLAP(PRESETS["tiny"]).eval()
        with torch.no_grad():
            for p in clap.parameters():
                p.add_(noise * torch.randn(p.shape))
    tokenizer_folder = Path(tokenizer_folder)
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(PHRASES * 20, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(tokenizer_folder))
    clap.tokenizer = CLAPTokenizer.from_folder(tokenizer_folder)
    return clap


def tiny_clap_folder(folder: Path, *, seed: int = 0) -> Path:
    """A native CLAP folder (config.json, model.safetensors, tokenizer.json) of `tiny_clap`, for
    `CLAP.from_pretrained(folder)` and the CLI's --clap / --model."""
    folder = Path(folder)
    tiny_clap(folder.parent / f".{folder.name}-bpe", seed=seed).save_pretrained(folder)
    return folder
