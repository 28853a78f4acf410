"""The package layout holds: imports run flows → operators → native, extraction
children import what their parent imported, and the installed wheel carries what its
commands need, used from outside the source tree."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Engine-, broker- and application-level packages the document library must not import.
FORBIDDEN_IN_OPERATORS = ("flows", "bytewax", "confluent_kafka")


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from … import`` names, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_operators_imports_neither_flows_nor_an_engine():
    offenders = {}
    for path in sorted((ROOT / "operators").rglob("*.py")):
        bad = sorted(m for m in _imported_modules(path) if m.split(".")[0] in FORBIDDEN_IN_OPERATORS)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"operators/ must stay engine-free: {offenders}"


def test_importing_operators_loads_no_engine():
    # The static check above misses imports made through importlib; this one does not.
    probe = (
        "import json, sys, operators, operators.extract, operators.embed, operators.isolation, "
        "operators.image_embed, operators.models; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[1:])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *FORBIDDEN_IN_OPERATORS], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_moved_modules_live_only_in_flows():
    for name in ("cli", "codecs", "config", "kafka_io", "kafka_local", "topics", "pipeline", "registry"):
        assert not (ROOT / "operators" / f"{name}.py").exists(), f"operators/{name}.py belongs in flows/"
    import operators

    # The public API stays as it was.
    assert set(operators.__all__) == {
        "EXTRACTION_REASONS",
        "SUPPORTED_TYPES",
        "Audio",
        "Chunk",
        "ChunkStrategy",
        "Chunker",
        "Document",
        "Embedder",
        "EmbeddingError",
        "EmbedstreamError",
        "ExtractionError",
        "ExtractorPool",
        "Image",
        "ImageEmbedder",
        "Limits",
        "ModelError",
        "ModelNotFoundError",
        "Segment",
        "Transcriber",
        "Transcript",
        "UnsupportedError",
        "extract",
    }


def _console_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_extraction_children_ignore_an_operators_folder_in_the_working_directory(tmp_path):
    # A source checkout, or any project with an `operators/` folder: a child started
    # with `python -m` would import that folder and die without `operators._native`.
    (tmp_path / "operators").mkdir()
    (tmp_path / "operators" / "__init__.py").write_text("")
    pdf = ROOT / "flows" / "samples" / "report.pdf"
    out = subprocess.run(
        [_console_script("embedstream"), "extract", "--strict", str(pdf)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "application/pdf" in out.stdout and "FAILED" not in out.stdout


# --- the installed wheel, outside the source tree -------------------------------------------


def _wheel(tmp_path_factory) -> Path:
    """The wheel CI built (``EMBEDSTREAM_WHEEL``), else one built now with the same
    profile, features and target directory, so candle compiles once."""
    given = os.environ.get("EMBEDSTREAM_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [_console_script("maturin"), "build", "--release", "--quiet", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=3600,
    )
    [wheel] = out.glob("embedstream-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    wheel = _wheel(tmp_path_factory)
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=900,
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "operators").mkdir()  # and a decoy, as in a user's project
    (elsewhere / "operators" / "__init__.py").write_text("")
    return {"python": python, "bin": env_dir / "bin", "cwd": elsewhere}


def _run(installed: dict[str, Path], *args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed['bin']}{os.pathsep}{env['PATH']}"
    out = subprocess.run(args, cwd=installed["cwd"], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out.stdout


def _site_packages(installed) -> Path:
    return Path(
        _run(
            installed,
            str(installed["python"]),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ).strip()
    )


def test_wheel_puts_schemas_samples_and_pom_inside_the_package(installed):
    site = _site_packages(installed)
    assert not (site / "schemas").exists(), "a top-level `schemas` folder collides with other projects"
    assert not (site / "deploy").exists()
    shipped = sorted(
        str(p.relative_to(site / "flows" / "schemas")) for p in (site / "flows" / "schemas").rglob("*.avsc")
    )
    assert shipped == sorted(str(p.relative_to(ROOT / "schemas")) for p in (ROOT / "schemas").rglob("*.avsc"))
    assert "history/VectorRecord-1.0.avsc" in shipped  # earlier writer schemas, for old records
    for avsc in (ROOT / "schemas").rglob("*.avsc"):
        assert (
            site / "flows" / "schemas" / avsc.relative_to(ROOT / "schemas")
        ).read_bytes() == avsc.read_bytes()
    assert (site / "flows" / "dev" / "pom.xml").is_file()
    where = _run(
        installed,
        str(installed["python"]),
        "-c",
        "import flows.cli as c, flows.codecs as k; print(c.SAMPLES); k.schema('VectorRecord')",
    )
    assert Path(where.strip()).is_relative_to(site)


def test_installed_commands_work_from_an_unrelated_directory(installed):
    models = _run(installed, "embedstream", "models", "path")
    assert models.strip()
    extracted = _run(
        installed, "embedstream", "extract", "--strict", str(_site_packages(installed) / "flows" / "samples")
    )
    assert "application/pdf" in extracted and "FAILED" not in extracted
    demo = _run(installed, "embedstream", "demo", timeout=600)
    assert "report.pdf" in demo and "guide.md" in demo and "chunks" in demo


def test_installed_broker_manager_resolves_its_pom(installed, tmp_path):
    # The step of `embedstream kafka start` that reads the POM: Maven resolves the
    # broker's jars from it (from the local Maven repository once it is warm).
    script = (
        "import sys; from pathlib import Path; from flows.dev.kafka import LocalKafka; "
        "k = LocalKafka(home=Path(sys.argv[1])); k.ensure_jars(); "
        "print(len(list(k.lib.glob('kafka_2.13-*.jar'))))"
    )
    out = _run(installed, str(installed["python"]), "-c", script, str(tmp_path), timeout=900)
    assert out.strip() == "1"


def test_the_dataflow_reads_as_the_pipeline_without_a_broker():
    # Defining the flow touches neither broker nor model: nothing listens on port 1.
    out = subprocess.run(
        [sys.executable, "-m", "bytewax.visualize", "flows.embed:flow"],
        env={**os.environ, "EMBEDSTREAM_BROKERS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    steps = ["documents (input)", "decode", "fetch_extract", "chunk", "embed", "encode", "kafka (output)"]
    positions = [out.index(f'["{step}') for step in steps]
    assert positions == sorted(positions), out
