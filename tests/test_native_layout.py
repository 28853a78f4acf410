"""The native core's module layout holds: the numeric blocks in ``native/src/nn`` use no
model (nothing of ``embed`` or ``speech``), no architecture in ``native/src/embed/models``
uses the dispatch, and only the dispatch (with the module that declares them) names the
architectures. Read from the Rust sources, as test_layout.py reads the Python imports;
nothing is built."""

from __future__ import annotations

import bisect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "native" / "src"
NN = SRC / "nn"
MODELS = SRC / "embed" / "models"
DISPATCH = SRC / "embed" / "dispatch.rs"
#: What the building blocks must not reach: the models built from them.
FORBIDDEN_IN_NN = ("embed", "speech")

# Comments, strings and char literals, blanked before reading paths (a lifetime has no
# closing quote, so it stays).
_NOT_CODE = re.compile(
    r"""//[^\n]*
      | /\*.*?\*/
      | b?r(?P<hashes>\#*)".*?"(?P=hashes)
      | b?"(?:\\.|[^"\\])*"
      | b?'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^'\\])'""",
    re.S | re.X,
)
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|::|\S")


def _module_of(path: Path) -> tuple[str, ...]:
    """The module a file under ``native/src`` defines: ``nn/q8.rs`` is ``crate::nn::q8``."""
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts


def _use_tree(tokens: list[str], i: int, prefix: list[str]) -> tuple[list[list[str]], int]:
    """The paths of the use tree at ``tokens[i]``, each after ``prefix``; and where it ends."""
    path = list(prefix)
    while True:
        token = tokens[i]
        if token == "{":
            i += 1
            paths: list[list[str]] = []
            while tokens[i] != "}":
                found, i = _use_tree(tokens, i, path)
                paths += found
                if tokens[i] == ",":
                    i += 1
            return paths, i + 1
        if token == "*":
            return [path], i + 1
        i += 1
        if not (token == "self" and path):  # `q8::{self, X}` names q8 itself
            path.append(token)
        if tokens[i] == "::":
            i += 1
            continue
        if tokens[i] == "as":
            i += 2
        return [path], i


def _absolute(path: list[str], module: tuple[str, ...], children: set[str]) -> tuple[str, ...] | None:
    """``path`` as seen from ``module`` (which declares the modules ``children``), from the
    crate root; None for an external crate or a name brought in by another ``use``."""
    head = path[0]
    if head == "crate":
        return tuple(path[1:])
    if head in ("super", "self"):
        base = list(module)
        while path and path[0] in ("super", "self"):
            if path[0] == "super":
                if not base:
                    return None
                base.pop()
            path = path[1:]
        return (*base, *path)
    if head in children:  # a child module, named as edition 2018 allows
        return (*module, *path)
    return None


def references(text: str, module: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """``(line, path from the crate root)`` of every module path in the Rust source ``text``
    of ``module``: the ``use`` items, and the ``crate::``, ``super::`` and ``self::`` paths
    written inline, inline ``mod`` blocks included."""
    code = _NOT_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    starts = [0] + [m.end() for m in re.finditer("\n", code)]
    matches = list(_TOKEN.finditer(code))
    tokens = [m.group() for m in matches] + [";"]
    line = [bisect.bisect_right(starts, m.start()) for m in matches]
    scopes = [(module, 0)]  # (module, brace depth inside it)
    children: dict[tuple[str, ...], set[str]] = {}
    found: list[tuple[int, tuple[str, ...], list[str]]] = []
    depth, i = 0, 0
    while i < len(matches):
        token, here = tokens[i], scopes[-1][0]
        if token == "mod" and tokens[i + 2] in ("{", ";"):
            children.setdefault(here, set()).add(tokens[i + 1])
            if tokens[i + 2] == "{":
                depth += 1
                scopes.append(((*here, tokens[i + 1]), depth))
            i += 3
        elif token == "use" and (i == 0 or tokens[i - 1] != "::"):
            paths, end = _use_tree(tokens, i + 1, [])
            found += [(line[i], here, p) for p in paths if p]
            i = end
        elif token in ("crate", "super", "self") and tokens[i + 1] == "::" and tokens[i - 1] != "::":
            start, path = i, [token]
            while tokens[i + 1] == "::" and re.fullmatch(r"[A-Za-z_]\w*", tokens[i + 2]):
                path.append(tokens[i + 2])
                i += 2
            found.append((line[start], here, path))
            i += 1
        else:
            if token == "{":
                depth += 1
            elif token == "}":
                if depth == scopes[-1][1] and len(scopes) > 1:
                    scopes.pop()
                depth -= 1
            i += 1
    resolved = []
    for at, scope, path in found:
        absolute = _absolute(path, scope, children.get(scope, set()))
        if absolute is not None:
            resolved.append((at, absolute))
    return resolved


def _references_in(root: Path) -> list[tuple[Path, int, tuple[str, ...]]]:
    files = sorted(root.rglob("*.rs"))
    assert files, f"no Rust sources under {root}"
    return [
        (path, at, target) for path in files for at, target in references(path.read_text(), _module_of(path))
    ]


def _where(path: Path, at: int) -> str:
    return f"{path.relative_to(ROOT)}:{at}"


def test_nn_uses_no_model():
    refs = _references_in(NN)
    assert any(target[:1] == ("error",) for _, _, target in refs), "the scan saw none of nn's own imports"
    offenders = {
        _where(path, at): "crate::" + "::".join(target)
        for path, at, target in refs
        if target[:1] and target[0] in FORBIDDEN_IN_NN
    }
    assert not offenders, f"native/src/nn holds building blocks and must not use a model: {offenders}"


def test_architectures_do_not_use_the_dispatch():
    dispatch = _module_of(DISPATCH)
    offenders = {
        _where(path, at): "crate::" + "::".join(target)
        for path, at, target in _references_in(MODELS)
        if target[: len(dispatch)] == dispatch
    }
    assert not offenders, f"the dispatch picks an architecture, never the other way: {offenders}"


def _family(path: Path) -> str | None:
    """The architecture a file in ``embed/models`` belongs to: ``bert.rs`` to bert, and
    ``clip/towers.rs`` to clip (an architecture with modules of its own)."""
    if not path.is_relative_to(MODELS) or path == MODELS / "mod.rs":
        return None
    return Path(path.relative_to(MODELS).parts[0]).stem


def test_only_the_dispatch_names_the_architectures():
    families = {_family(path) for path in MODELS.rglob("*.rs")} - {None}
    assert {"bert", "modernbert", "qwen3"} <= families, families
    models = _module_of(MODELS / "mod.rs")
    named_by_dispatch, offenders = set(), {}
    for path, at, target in _references_in(SRC):
        # `models::ClipEmbedder` names what the models module re-exports, not a family.
        family = (
            target[len(models)] if target[: len(models)] == models and len(target) > len(models) else None
        )
        if family not in families:
            continue
        if path == DISPATCH:
            named_by_dispatch.add(family)
        elif path != MODELS / "mod.rs" and _family(path) != family:
            offenders[_where(path, at)] = "crate::" + "::".join(target)
    assert named_by_dispatch, "the scan saw none of the dispatch's imports"
    assert not offenders, (
        f"only embed/dispatch.rs and embed/models/mod.rs may name an architecture: {offenders}"
    )


def test_the_scan_sees_every_way_of_writing_a_path():
    # The rules above are only as good as this reading of the sources.
    source = """
        //! use crate::embed::InAComment;
        use super::super::embed::models::bert;
        use crate::{error::EmbedError, speech::{self, whisper::Whisper as W}};
        use candle_core::Tensor;
        use child::Thing;
        mod child;
        const NOT_A_PATH: &str = "crate::embed::InAString";
        fn f<'a>(x: &'a str) -> char { crate::embed::dispatch::load(x); '"' }
        mod inner {
            use super::super::super::speech::mel;
            fn g() { self::h(); }
        }
        use self::inner::g;
    """
    found = {target for _, target in references(source, ("nn", "kernels"))}
    assert found == {
        ("embed", "models", "bert"),
        ("error", "EmbedError"),
        ("speech",),
        ("speech", "whisper", "Whisper"),
        ("nn", "kernels", "child", "Thing"),
        ("embed", "dispatch", "load"),
        ("speech", "mel"),
        ("nn", "kernels", "inner", "h"),
        ("nn", "kernels", "inner", "g"),
    }
