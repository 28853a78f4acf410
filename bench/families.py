"""Embedding throughput per model family: for each family, a random model with the
real configuration of its most used member, against sentence-transformers on the same
files and texts, in the same run, with MiniLM (real weights) as the yardstick.

    python bench/families.py [--texts 200] [--repeat 2] [--families e5,modernbert,...]

Needs an environment with sentence-transformers (and so PyTorch) next to the
embedstream wheel: PyTorch builds the random models once (cached under
~/.cache/embedstream/bench-models) and runs the peer. Prints one JSON object.

The weights are random, so the vectors mean nothing, but every shape that sets the
cost is the real one: layers, widths, heads, vocabulary size, positions, rope and
attention pattern. Tokenizers are of the family's kind, trained here on the bench
corpus with a smaller vocabulary; both sides use the same one, so token counts match.

Each f32 figure is also given as a share of the sgemm limit on that model's layer
shapes (flops.py; read with torch.matmul, the peer's BLAS, where PyTorch runs, and
with numpy's), with the share MiniLM's same-run ratio would take for that family.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine
from corpus import paragraphs
from embed import measure

from operators import models as model_files

CACHE = Path(os.environ.get("EMBEDSTREAM_BENCH_MODELS", Path.home() / ".cache/embedstream/bench-models"))
SEED = 7

#: The real configurations (config.json of each hub model), with the sentence-transformers
#: modules each ships. nomic-embed-text-v1.5 is written in transformers' own NomicBert
#: naming, which loads without remote code; its shapes are the hub model's.
FAMILIES: dict[str, dict] = {
    "multilingual-e5-small": {
        "kind": "xlm-roberta",
        "pooling": "mean",
        "max_seq_length": 512,
        "config": dict(
            vocab_size=250037,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
    },
    "gte-modernbert-base": {
        "kind": "modernbert",
        "pooling": "cls",
        "max_seq_length": 8192,
        "config": dict(
            vocab_size=50368,
            hidden_size=768,
            num_hidden_layers=22,
            num_attention_heads=12,
            intermediate_size=1152,
            max_position_embeddings=8192,
            norm_eps=1e-5,
            norm_bias=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_activation="gelu",
            local_attention=128,
            global_attn_every_n_layers=3,
            global_rope_theta=160000.0,
            local_rope_theta=10000.0,
            pad_token_id=50283,
            cls_token_id=50281,
            sep_token_id=50282,
            bos_token_id=50281,
            eos_token_id=50282,
        ),
    },
    "Qwen3-Embedding-0.6B": {
        "kind": "qwen3",
        "pooling": "lasttoken",
        "max_seq_length": 32768,
        "config": dict(
            vocab_size=151669,
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            attention_bias=False,
            tie_word_embeddings=True,
        ),
    },
    "nomic-embed-text-v1.5": {
        "kind": "nomic_bert",
        "pooling": "mean",
        "max_seq_length": 8192,
        "config": dict(
            vocab_size=30528,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=8192,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
            rope_theta=1000.0,
            pad_token_id=0,
        ),
    },
}


def _corpus() -> list[str]:
    return paragraphs(1900)


def _tokenizer(kind: str):
    """A fast tokenizer of the family's kind, trained on the bench corpus."""
    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing
    from tokenizers.trainers import BpeTrainer
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast, XLMRobertaTokenizerFast

    if kind == "nomic_bert":  # nomic-embed-text ships bert-base-uncased's WordPiece
        from operators import models

        return BertTokenizerFast.from_pretrained(models.resolve("default"))
    if kind == "xlm-roberta":
        unigram = SentencePieceUnigramTokenizer()
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        unigram.train_from_iterator(_corpus(), vocab_size=8000, special_tokens=specials, unk_token="<unk>")
        unigram.post_processor = TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        return XLMRobertaTokenizerFast(tokenizer_object=unigram._tokenizer)
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    if kind == "modernbert":
        specials = ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
        bpe.train_from_iterator(
            _corpus(),
            BpeTrainer(
                vocab_size=8000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
        cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
        bpe.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
    eos = "<|endoftext|>"  # qwen3: byte-level BPE appending EOS, left padding
    bpe.train_from_iterator(
        _corpus(),
        BpeTrainer(
            vocab_size=8000, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    bpe.post_processor = TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, bpe.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos, padding_side="left")


def _model(kind: str, config: dict):
    import transformers as t

    # Looked up by name, so a transformers without one family still builds the others.
    classes = {
        "xlm-roberta": "XLMRoberta",
        "modernbert": "ModernBert",
        "qwen3": "Qwen3",
        "nomic_bert": "NomicBert",  # transformers >= 5
    }
    prefix = classes[kind]
    config_class, model_class = getattr(t, f"{prefix}Config"), getattr(t, f"{prefix}Model")
    return model_class(config_class(**config)).eval()


def build(name: str) -> Path:
    """The family's random model, saved by sentence-transformers; built once and cached."""
    target = CACHE / name
    if (target / "modules.json").exists():
        return target
    import torch
    from sentence_transformers import SentenceTransformer, models

    spec = FAMILIES[name]
    torch.manual_seed(SEED)
    model = _model(spec["kind"], spec["config"])
    tokenizer = _tokenizer(spec["kind"])
    tokenizer.model_max_length = spec["max_seq_length"]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = models.Transformer(tmp, max_seq_length=spec["max_seq_length"])
        pooling = models.Pooling(spec["config"]["hidden_size"], pooling_mode=spec["pooling"])
        st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
        staging = target.with_name(target.name + ".partial")
        st.save(str(staging))
        staging.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES)
    )
    parser.add_argument("--dtypes", default="f32,q8", help="ours in each; q8 needs AVX2")
    parser.add_argument(
        "--qwen3-texts", type=int, default=64, help="texts for the 0.6B decoder (slow on CPU)"
    )
    args = parser.parse_args()

    from operators import UnsupportedError

    rows = {}
    for name in ["all-MiniLM-L6-v2", *args.families.split(",")]:
        model = "default" if name == "all-MiniLM-L6-v2" else str(build(name))
        texts = paragraphs(args.qwen3_texts if name.startswith("Qwen3") else args.texts)
        # The f32 limit on this model's layer shapes, with numpy's BLAS and the peer's
        # (torch.matmul), the faster of readings on either side of its runs.
        shapes = machine.layer_shapes(model_files.resolve(model))
        before = machine.sgemm_on_shapes(shapes)
        row: dict[str, object] = {}
        for dtype in args.dtypes.split(","):
            peers = {"sentence-transformers"} if dtype == "f32" else set()
            try:
                result = measure(model, texts, args.repeat, dtype, peers)
            except UnsupportedError as error:
                row[dtype] = f"unsupported: {error}"
                continue
            row["texts"], row["tokens"] = result["texts"], result["tokens"]
            row["mflop_per_token"] = result["mflop_per_token"]
            row[dtype] = result["embedstream"]["tokens_per_s"]
            if dtype == "f32":
                row["sentence_transformers"] = result["sentence_transformers"]["tokens_per_s"]
                row["cosine_min_vs_sentence_transformers"] = result["sentence_transformers"][
                    "cosine_min_vs_embedstream"
                ]
                row["ratio_f32"] = result["ratio_vs_sentence_transformers"]
            elif "f32" in row:
                row[f"ratio_{dtype}"] = round(row[dtype] / row["sentence_transformers"], 2)
        row["sgemm"] = machine.peer_limit(before, machine.sgemm_on_shapes(shapes))
        rows[name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    _against_the_sgemm_limit(rows)
    print(
        json.dumps(
            {
                "benchmark": "families",
                "unit": "tokens/s; ratio = ours / sentence-transformers, same run",
                "machine": machine.describe(),
                "families": rows,
            },
            indent=2,
        )
    )


def _against_the_sgemm_limit(rows: dict[str, dict]) -> None:
    """Each f32 figure as a share of its model's sgemm limit (flops.py, read with the
    peer's BLAS where it ran), and the share that MiniLM's ratio of this run would take:
    above 1.0, no f32 implementation reaches it."""
    minilm = rows.get("all-MiniLM-L6-v2", {}).get("ratio_f32")
    for row in rows.values():
        if not isinstance(row.get("f32"), float):
            continue
        gflops = row["sgemm"]["limit_gflops"]
        gflop_per_token = row["mflop_per_token"] / 1e3
        row["fraction_of_sgemm_limit"] = round(row["f32"] * gflop_per_token / gflops, 3)
        if minilm and "sentence_transformers" in row:
            needed = minilm * row["sentence_transformers"] * gflop_per_token / gflops
            row["fraction_of_sgemm_limit_at_minilm_ratio"] = round(needed, 3)


if __name__ == "__main__":
    main()
