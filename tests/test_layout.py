"""The package layout holds: imports run flows → operators → native, the runtime of
flows/ keeps clear of the developer services in flows/dev/, no module uses another's
private names, extraction children import what their parent imported, and the
installed wheel carries what its commands need, used from outside the source tree."""

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


#: Where modules moved to: each old path must be gone, each new one there.
MOVED = {
    "operators/cli.py": "flows/cli/__init__.py",
    "operators/codecs.py": "flows/codecs.py",
    "operators/config.py": "flows/settings.py",
    "operators/kafka_io.py": "flows/kafka/io.py",
    "operators/kafka_local.py": "flows/dev/kafka.py",
    "operators/topics.py": "flows/kafka/topics.py",
    "operators/pipeline.py": "flows/embed_steps.py",
    "operators/registry.py": "flows/registry.py",
    "operators/logs.py": "flows/logs.py",
    "operators/metrics.py": "flows/metrics.py",
    "operators/runtime.py": "flows/runtime.py",
    "flows/cli.py": "flows/cli/__init__.py",
    "flows/kafka/local.py": "flows/dev/kafka.py",
    "flows/kafka/pom.xml": "flows/dev/pom.xml",
    "flows/stores/local_postgres.py": "flows/dev/postgres.py",
    "flows/containers.py": "flows/dev/containers.py",
}
#: The only runtime modules that may import flows.dev: the commands that run its services.
USES_DEV_SERVICES = {"flows/cli/services.py"}


def test_moved_modules_live_only_where_they_moved():
    for old, new in MOVED.items():
        assert not (ROOT / old).exists(), f"{old} moved to {new}"
        assert (ROOT / new).is_file(), f"{new} is missing"
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
        "Reranker",
        "Segment",
        "SparseEmbedder",
        "SparseVector",
        "Transcriber",
        "Transcript",
        "UnsupportedError",
        "extract",
    }


def _flows_modules() -> list[Path]:
    return sorted((ROOT / "flows").rglob("*.py"))


def test_the_runtime_does_not_import_the_developer_services():
    offenders = {}
    for path in _flows_modules():
        where = str(path.relative_to(ROOT))
        if where.startswith("flows/dev/") or where in USES_DEV_SERVICES:
            continue
        bad = sorted(m for m in _imported_modules(path) if m == "flows.dev" or m.startswith("flows.dev."))
        if bad:
            offenders[where] = bad
    assert not offenders, f"runtime modules import developer services: {offenders}"
    for where in USES_DEV_SERVICES:  # the exception is still needed
        assert any(m.startswith("flows.dev") for m in _imported_modules(ROOT / where)), where


def _private_uses(path: Path) -> list[str]:
    """``from flows.x import _name`` and ``x._name`` on a module imported from flows or
    operators, in one file."""
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0]
            in (
                "flows",
                "operators",
            )
        ):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("flows", "operators"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_of_flows_uses_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): found for p in _flows_modules() if (found := _private_uses(p))}
    assert not offenders, offenders


def test_the_private_name_check_finds_them(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from flows import codecs, runtime\nfrom flows.runtime import _pipeline\n"
        "from operators import _native\ncodecs._crc64_table()\nruntime.current()\n"
    )
    assert _private_uses(probe) == [
        "line 2: from flows.runtime import _pipeline",
        "line 3: from operators import _native",
        "line 4: codecs._crc64_table",
    ]


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
