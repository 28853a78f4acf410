"""Incremental mode end to end on the real broker, model and store: an update embeds
only its new chunks, the chunk state follows its partition through the changelog, and
after edits, deletes, `kill -9` and replays the sink's store equals the store of a
from-scratch full-mode run of the same events."""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import time
from pydoc_data.topics import topics as pydoc_topics
from typing import Any

import numpy as np
import pytest
from kafka_helpers import FlowTopics, avro_event, log_tail, run_args, start_flow

from flows.chunk_state import ID_PREFIX_BYTES, chunk_ids, lineage_key, pack, unpack
from flows.kafka.topics import create
from flows.settings import Settings
from flows.stores import open_store

MAX_TOKENS = "64"


def doc_text(seed: int, paragraphs: int = 14) -> list[str]:
    """Paragraphs of Python's documentation, a different run of them per seed."""
    found = [
        " ".join(p.split())
        for name in sorted(pydoc_topics)
        for p in pydoc_topics[name].split("\n\n")
        if len(p.split()) > 12
    ]
    start = (seed * 37) % (len(found) - paragraphs)
    return found[start : start + paragraphs]


def edited(paragraphs: list[str], rng: random.Random) -> list[str]:
    """One sentence inserted, deleted or changed in one paragraph."""
    out = list(paragraphs)
    i = rng.randrange(len(out))
    sentences = out[i].split(". ")
    j = rng.randrange(len(sentences))
    kind = rng.choice(["insert", "delete", "modify"])
    if kind == "insert":
        sentences.insert(j, f"An editor added sentence {rng.randrange(10**6)} here")
    elif kind == "delete" and len(sentences) > 1:
        del sentences[j]
    else:
        sentences[j] = sentences[j] + f" (revised {rng.randrange(10**6)})"
    out[i] = ". ".join(sentences)
    return out


def upsert(doc_id: str, paragraphs: list[str]) -> tuple[bytes, bytes]:
    content = "\n\n".join(paragraphs).encode()
    return doc_id.encode(), avro_event(
        doc_id, content=content, filename=f"{doc_id}.txt", metadata={"d": doc_id}
    )


def delete(doc_id: str) -> tuple[bytes, bytes]:
    return doc_id.encode(), avro_event(doc_id, op="DELETE")


def run_sink(topics: FlowTopics, output: str, store: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "sink",
            "--until-end",
            "--from",
            "beginning",
            "--brokers",
            topics.bootstrap,
            "--output-topic",
            output,
            "--store",
            store,
            "--group-id",
            f"{output}.sink",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def store_rows(url: str) -> dict[str, dict[str, Any]]:
    store = open_store(url)
    try:
        [spec] = store.tables()
        return {r["chunk_id"]: r for r in store.rows(spec)}
    finally:
        store.close()


def assert_same_store(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Row by row: every column equal but `embedded_at`; vectors within cosine 0.99999
    (a vector embedded in another batch differs in the last bits)."""
    assert set(got) == set(want)
    for chunk_id, row in want.items():
        mine = got[chunk_id]
        skip = ("embedded_at", "embedding")
        assert {k: v for k, v in mine.items() if k not in skip} == {
            k: v for k, v in row.items() if k not in skip
        }
        a, b = np.asarray(mine["embedding"]), np.asarray(row["embedding"])
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.99999


def full_reference(topics: FlowTopics, tmp_path, name: str = "full") -> dict[str, dict]:
    """The same events from scratch in full mode (stable chunking, so the chunks are
    the same), through the sink into a fresh store."""
    output = f"{topics.prefix}.{name}"
    create(Settings(brokers=topics.bootstrap), output, topics.partitions)
    topics.run(
        "--max-tokens",
        MAX_TOKENS,
        "--chunking",
        "stable",
        "--from",
        "beginning",
        "--group-id",
        f"{topics.prefix}.{name}",
        output=output,
    )
    url = f"lancedb:{tmp_path / name}"
    run_sink(topics, output, url)
    return store_rows(url)


def by_version(messages: list) -> dict[tuple[str, int], dict[str, list]]:
    found: dict[tuple[str, int], dict[str, list]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for kind, record, _ in messages:
        if kind in ("VectorRecord", "DocManifest"):
            found[(record["doc_id"], record["doc_version"]["offset"])][kind].append(record)
    return found


def test_chunk_ids_follow_content_occurrence_and_lineage():
    lineage = lineage_key("m", "r1", "f32", None, 384)
    ids = chunk_ids("doc", [b"a", b"b", b"a"], lineage)
    assert len(set(ids)) == 3  # the second "a" is another chunk
    assert chunk_ids("doc", [b"b", b"a"], lineage) == [ids[1], ids[0]]  # positions do not matter
    assert chunk_ids("other", [b"a"], lineage)[0] != ids[0]
    for changed in (
        ("m2", "r1", "f32", None, 384),
        ("m", "r1", "q8", None, 384),
        ("m", "r1", "f32", "doc", 384),
    ):
        assert chunk_ids("doc", [b"a"], lineage_key(*changed))[0] != ids[0]
    assert chunk_ids("doc", [b"a"], lineage_key("m", "r1", "f32", None, 128))[0] != ids[0]
    packed = pack(ids)
    assert len(packed) == 1 + 3 * ID_PREFIX_BYTES
    assert unpack(packed) == {bytes.fromhex(i[: 2 * ID_PREFIX_BYTES]) for i in ids}
    assert unpack(b"\x09" + packed[1:]) == set()  # a layout this release cannot read: embed again


def test_an_update_embeds_only_its_new_chunks_and_the_store_equals_a_full_run(
    kafka_bootstrap, minilm, tmp_path
):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    group = f"{topics.prefix}.inc"
    state_topic = f"{group}.chunk-state"
    rng = random.Random(4)
    v1 = {f"doc-{i}": doc_text(i) for i in range(6)}
    topics.produce([upsert(d, p) for d, p in v1.items()])
    args = ("--incremental", "--max-tokens", MAX_TOKENS, "--group-id", group)
    topics.run(*args)

    # Second pass, in a new process: its state comes back from the changelog.
    v2 = {d: edited(p, rng) for d, p in v1.items() if d not in ("doc-4", "doc-5")}
    topics.produce([upsert(d, p) for d, p in v2.items()] + [upsert("doc-4", v1["doc-4"]), delete("doc-5")])
    second = topics.run(*args)
    assert "chunk state of input partition" in second.stderr
    assert " kept; " in second.stderr  # the summary counts the chunks not embedded again

    messages = topics.read(topics.output)
    versions = by_version(messages)
    chunker = minilm.chunker(int(MAX_TOKENS), strategy="stable")
    lineage = lineage_key(minilm.model_id, minilm.model_revision, "f32", None, minilm.dim)
    latest = {}
    for (doc_id, _offset), kinds in sorted(versions.items(), key=lambda kv: kv[0][1]):
        latest.setdefault(doc_id, []).append(kinds)
    reembedded = []
    for doc_id, passes in latest.items():
        first_pass = passes[0]
        [m1] = first_pass["DocManifest"]
        assert len(first_pass["VectorRecord"]) == len(m1["chunks"])  # a new document: all of it
        if doc_id == "doc-5":
            assert len(passes) == 1
            continue
        [m2] = passes[1]["DocManifest"]
        text = "\n\n".join(v2.get(doc_id, v1[doc_id]))
        chunks = chunker.chunk(text)
        want_ids = chunk_ids(doc_id, [c.text.encode() for c in chunks], lineage)
        # The manifest lists every chunk of the version, at its current position.
        assert [c["chunk_id"] for c in m2["chunks"]] == want_ids
        assert [(c["char_start"], c["char_end"]) for c in m2["chunks"]] == [
            (c.char_start, c.char_end) for c in chunks
        ]
        sent = {r["chunk_id"] for r in passes[1]["VectorRecord"]}
        old = {c["chunk_id"] for c in m1["chunks"]}
        assert sent == set(want_ids) - old  # exactly the new ids, nothing else
        assert all(r["chunk_count"] == len(chunks) for r in passes[1]["VectorRecord"])
        if doc_id == "doc-4":
            assert sent == set()  # published again unchanged: a manifest only
        else:
            reembedded.append(len(sent))
    assert 0 < sum(reembedded) <= 2 * len(reembedded), reembedded
    assert any(kind == "DeleteMarker" and r["doc_id"] == "doc-5" for kind, r, _ in messages)

    # The changelog: the newest ids per document in its input partition, a tombstone for the delete.
    inputs = {m.key().decode(): m.partition() for _, _, m in topics.read(topics.input, decode=False)}
    state: dict[str, Any] = {}
    for _, _, m in topics.read(state_topic, decode=False):
        doc_id = m.key().decode()
        assert m.partition() == inputs[doc_id]
        state[doc_id] = m.value()
    assert state["doc-5"] is None
    for doc_id in ("doc-0", "doc-4"):
        [m] = [p[-1]["DocManifest"][0] for d, p in latest.items() if d == doc_id]
        assert unpack(state[doc_id]) == {
            bytes.fromhex(c["chunk_id"][: 2 * ID_PREFIX_BYTES]) for c in m["chunks"]
        }

    # The sink keeps the unchanged chunks and moves them: the store equals a full run's.
    url = f"lancedb:{tmp_path / 'incremental'}"
    run_sink(topics, topics.output, url)
    got = store_rows(url)
    assert_same_store(got, full_reference(topics, tmp_path))
    assert {r["doc_id"] for r in got.values()} == {f"doc-{i}" for i in range(5)}


def test_kill_9_and_replays_in_incremental_mode_leave_the_store_of_a_from_scratch_run(
    kafka_bootstrap, tmp_path
):
    topics = FlowTopics(kafka_bootstrap, partitions=3)
    group = f"{topics.prefix}.inc"
    rng = random.Random(8)
    docs = {f"doc-{i}": doc_text(i, paragraphs=6) for i in range(30)}
    events = [upsert(d, p) for d, p in docs.items()]
    for _ in range(150):  # edits, re-publishes, deletes and re-creations, interleaved
        doc_id = rng.choice(sorted(docs))
        roll = rng.random()
        if roll < 0.1:
            events.append(delete(doc_id))
        else:
            if roll > 0.9:
                docs[doc_id] = doc_text(rng.randrange(1000), paragraphs=6)
            else:
                docs[doc_id] = edited(docs[doc_id], rng)
            events.append(upsert(doc_id, docs[doc_id]))
    topics.produce(events)

    args = ("--incremental", "--max-tokens", MAX_TOKENS, "--group-id", group, "--batch-size", "8")
    kills = 0
    for delay in (9.0, 11.0, 13.0):  # a worker needs about 6 s to start
        proc = start_flow(topics, *args, "--snapshot-s", "1")
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
        assert proc.returncode in (0, -signal.SIGKILL), log_tail(proc)
    assert kills >= 2, "the flow finished before the kills: use more events"
    topics.run(*args)  # the rest, from the committed offsets
    # A replay of everything with the state of the end: chunks the state knows are not
    # sent again, and the store must not notice.
    topics.run(
        *args, "--from", "beginning", "--group-id", f"{group}.replay", "--state-topic", f"{group}.chunk-state"
    )

    url = f"lancedb:{tmp_path / 'incremental'}"
    run_sink(topics, topics.output, url)
    got = store_rows(url)
    want = full_reference(topics, tmp_path)
    assert_same_store(got, want)
    live = {d for d in docs if any(r["doc_id"] == d for r in want.values())}
    assert len(live) > 15


@pytest.mark.parametrize("partitions", [1])
def test_a_changelog_with_fewer_partitions_than_the_input_is_a_clear_error(kafka_bootstrap, partitions):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    state_topic = f"{topics.prefix}.small-state"
    create(Settings(brokers=kafka_bootstrap), state_topic, partitions)
    topics.produce([upsert("doc-0", doc_text(0))])
    result = subprocess.run(
        run_args(topics, "--until-end", "--incremental", "--state-topic", state_topic),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert f"{state_topic} has 1 partitions" in result.stderr
