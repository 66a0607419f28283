"""Rebuild the small tokenizer and tiny-Llama config shipped in ``rlhf_lightning/assets/tiny-llama``.

The tests, the demo and CI cannot reach a model hub, so the repo ships a 1k-vocabulary byte-level BPE tokenizer
(digits split one per token, so arithmetic stays learnable) with a chat template, plus the config of a tiny
Llama that is randomly initialised from it. Deterministic: the corpus is generated here, not downloaded.

    python scripts/build_tiny_tokenizer.py
"""

import json
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "rlhf_lightning" / "assets" / "tiny-llama"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = (
    "the a an of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line differ turn cause "
    "much mean before move right boy old too same tell does set three want air well also play small end put home "
    "read hand port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father answer "
    "question reverse sort count sum add subtract multiply digits letters string list true false yes please "
    "model reward policy value train learn data token prompt response chosen rejected assistant user system"
).split()


def corpus(n_lines: int = 20000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.5:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))).capitalize() + ".")
        elif kind < 0.8:
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            lines.append(f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}")
        else:
            letters = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(2, 12)))
            lines.append(f"reverse {letters}: {letters[::-1]}; upper: {letters.upper()} (x={rng.random():.3f})")
    return lines


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    config.save_pretrained(OUT)
    print(json.dumps({"dir": str(OUT), "vocab": len(fast), "files": sorted(p.name for p in OUT.iterdir())}))


if __name__ == "__main__":
    main()
